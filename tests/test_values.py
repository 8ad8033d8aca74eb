"""Tests for cdae_med.values (values of a graph's variables, parsed and checked once) and
CausalGraph.roles."""

import math
import re

import numpy as np
import pytest
import torch

from cdae_med.graph import GraphError, builtin_graph
from cdae_med.values import ValuesError, levels, parse_assignments, parse_value, parse_values

BRAIN = builtin_graph("brain")  # age [20, 95] years, sex binary (0=female, 1=male), volumes in ml


# --- single values ------------------------------------------------------------------------------


@pytest.mark.parametrize("raw", [70, 70.0, np.float32(70.0), np.int64(70), "70", " 70.0 ", "7e1"])
def test_numbers_and_text_numbers(raw):
    value = parse_values(BRAIN, {"age": raw})["age"]
    assert value == 70.0 and type(value) is float


@pytest.mark.parametrize("raw,code", [("F", 0.0), ("f", 0.0), ("female", 0.0), ("Female", 0.0), ("0", 0.0),
                                      ("M", 1.0), ("male", 1.0), (" MALE ", 1.0), ("1", 1.0), (1, 1.0)])
def test_binary_level_names(raw, code):
    assert parse_values(BRAIN, {"sex": raw}) == {"sex": code}


def test_levels_come_from_the_unit():
    assert levels(BRAIN["sex"]) == {"0": 0.0, "1": 1.0, "female": 0.0, "f": 0.0, "male": 1.0, "m": 1.0}


def test_text_that_is_no_number_names_the_levels():
    with pytest.raises(ValuesError, match=r"sex: 'x' is not a number \(or one of \['f', 'female', 'm', 'male'\]\)"):
        parse_values(BRAIN, {"sex": "x"})
    # level names belong to binary variables only
    with pytest.raises(ValuesError, match=r"^age: 'F' is not a number$"):
        parse_values(BRAIN, {"age": "F"})


def test_huge_int_is_not_a_finite_number():
    for n in (None, 3):
        with pytest.raises(ValuesError, match=r"^age: value 10+\.\.\. is not a finite number$"):
            parse_values(BRAIN, {"age": 10**400}, n=n)
    with pytest.raises(ValuesError, match="age: value inf is not a finite number"):
        parse_values(BRAIN, {"age": "1e400"})
    with pytest.raises(ValuesError, match="age: values must be numbers"):  # no float holds it
        parse_values(BRAIN, {"age": [10**400, 50]}, n=2)


@pytest.mark.parametrize("raw", [True, False, np.bool_(True)])
def test_bool_is_not_a_number(raw):
    with pytest.raises(ValuesError, match=r"sex: '(True|False)' is not a number"):
        parse_values(BRAIN, {"sex": raw})
    with pytest.raises(ValuesError, match=r"^sex: (.* is not a number|values must be numbers)"):
        parse_values(BRAIN, {"sex": raw}, n=2)
    with pytest.raises(ValuesError, match="sex: values must be numbers"):
        parse_values(BRAIN, {"sex": np.array([raw, raw])}, n=2)


@pytest.mark.parametrize("raw", [math.nan, math.inf, -math.inf, "nan", "inf", "-inf", np.float64("nan")])
def test_nan_and_inf_are_refused(raw):
    with pytest.raises(ValuesError, match="age: value .* is not a finite number"):
        parse_values(BRAIN, {"age": raw})
    with pytest.raises(ValuesError, match="age: value .* is not a finite number"):
        parse_values(BRAIN, {"age": raw}, n=2)


def test_nan_inside_an_array_is_refused():
    with pytest.raises(ValuesError, match="brain_volume: value nan is not a finite number"):
        parse_values(BRAIN, {"brain_volume": [1000.0, math.nan, 1100.0]}, n=3)


def test_range_and_binary_messages():
    with pytest.raises(ValuesError, match=r"^age=120 years is outside the declared range \[20, 95\] years$"):
        parse_values(BRAIN, {"age": 120})
    with pytest.raises(ValuesError, match=r"^sex is binary: value must be 0 or 1, got 0.5$"):
        parse_values(BRAIN, {"sex": 0.5})
    for edge in (20, 95):  # the range is closed
        assert parse_values(BRAIN, {"age": edge}) == {"age": float(edge)}


def test_parse_value_of_one_variable():
    assert parse_value(BRAIN["sex"], "M") == 1.0
    with pytest.raises(GraphError, match="outside the declared range"):
        parse_value(BRAIN["age"], "19.5")


# --- arrays, one value per sample -----------------------------------------------------------------


@pytest.mark.parametrize("raw", [60, "60", [60.0], np.array([60]), torch.tensor([60.0]), torch.tensor(60)])
def test_one_value_is_broadcast_to_n(raw):
    arr = parse_values(BRAIN, {"age": raw}, n=4)["age"]
    assert arr.dtype == np.float64 and arr.shape == (4,)
    np.testing.assert_array_equal(arr, 60.0)


@pytest.mark.parametrize("raw", [[40, 50.5, 60], np.array([40.0, 50.5, 60.0], dtype=np.float32),
                                 torch.tensor([40.0, 50.5, 60.0], dtype=torch.float64)])
def test_one_value_per_sample(raw):
    arr = parse_values(BRAIN, {"age": raw}, n=3)["age"]
    assert arr.dtype == np.float64 and arr.shape == (3,)
    np.testing.assert_array_equal(arr, [40.0, 50.5, 60.0])


def test_arrays_are_copies():
    given = np.array([40.0, 50.0])
    arr = parse_values(BRAIN, {"age": given}, n=2)["age"]
    arr[0] = 70.0
    assert given[0] == 40.0


def test_level_name_broadcast_for_a_binary_variable():
    np.testing.assert_array_equal(parse_values(BRAIN, {"sex": "male"}, n=3)["sex"], [1.0, 1.0, 1.0])


def test_every_value_of_an_array_is_checked():
    with pytest.raises(ValuesError, match=r"^age=100 years is outside the declared range \[20, 95\] years$"):
        parse_values(BRAIN, {"age": [50.0, 100.0, 60.0]}, n=3)
    with pytest.raises(ValuesError, match=r"^sex is binary: value must be 0 or 1, got 0.5$"):
        parse_values(BRAIN, {"sex": [0.0, 0.5]}, n=2)


@pytest.mark.parametrize("raw,size", [([50.0, 60.0], 2), ([50.0] * 4, 4), (np.full((3, 1), 50.0), 3)])
def test_wrong_number_of_values(raw, size):
    expected = rf"^age: {size} values for a batch of 3; give a scalar or one value per sample$"
    with pytest.raises(ValuesError, match=expected):
        parse_values(BRAIN, {"age": raw}, n=3)


def test_text_arrays_are_refused():
    with pytest.raises(ValuesError, match="sex: values must be numbers"):
        parse_values(BRAIN, {"sex": ["F", "M"]}, n=2)


# --- mappings -----------------------------------------------------------------------------------------


def test_several_problems_in_one_error():
    raw = {"height": 1.8, "age": "old", "sex": 2, "brain_volume": [1000.0], "ventricle_volume": [1.0, 2.0, 3.0]}
    with pytest.raises(ValuesError) as err:
        parse_values(BRAIN, raw, n=2)
    e = err.value
    assert isinstance(e, GraphError) and isinstance(e, ValueError) and e.what == "interventions"
    unknown, age, sex, ventricles = e.problems  # brain_volume's one value is valid
    assert unknown == "unknown variable 'height'; graph 'brain' has: age, sex, brain_volume, ventricle_volume"
    assert age == "age: 'old' is not a number"
    assert sex.startswith("sex is binary: value must be 0 or 1, got 2")
    assert ventricles == "ventricle_volume: 3 values for a batch of 2; give a scalar or one value per sample"
    assert str(e) == "; ".join(e.problems)


def test_valid_mapping_keeps_its_order():
    out = parse_values(BRAIN, {"ventricle_volume": 40, "age": "65", "sex": "F"}, what="covariates")
    assert list(out.items()) == [("ventricle_volume", 40.0), ("age", 65.0), ("sex", 0.0)]


def test_empty_and_missing_mappings():
    assert parse_values(BRAIN, {}) == {}
    assert parse_values(BRAIN, None) == {}
    with pytest.raises(ValuesError, match=r"^no interventions given; e.g. age=<value>$"):
        parse_values(BRAIN, {}, allow_empty=False)
    with pytest.raises(ValuesError, match=r"^covariates must be a mapping of variable to value, got list$"):
        parse_values(BRAIN, [("age", 50)], what="covariates")


def test_check_interventions_uses_the_same_rules():
    BRAIN.check_interventions({"sex": "M"})
    with pytest.raises(ValuesError, match="no interventions given"):
        BRAIN.check_interventions({})


# --- parse_assignments --------------------------------------------------------------------------------


def test_parse_assignments():
    assert parse_assignments(["age=70", " sex = F ", "x=a=b"]) == {"age": "70", "sex": "F", "x": "a=b"}
    assert parse_values(BRAIN, parse_assignments(["age=70", "sex=F"])) == {"age": 70.0, "sex": 0.0}
    assert parse_assignments([]) == {}


@pytest.mark.parametrize("item", ["age", "=70", "age=", " = ", ""])
def test_parse_assignments_malformed_item(item):
    with pytest.raises(ValuesError, match="^" + re.escape(f"--do {item!r} is not of the form variable=value") + "$"):
        parse_assignments([item])


def test_parse_assignments_name_twice_and_several_problems():
    with pytest.raises(ValuesError, match=r"^--covariates: 'age' is given twice$"):
        parse_assignments(["age=70", "age=71"], option="--covariates")
    with pytest.raises(ValuesError) as err:
        parse_assignments(["age=70", "sex", "age=80"])
    assert err.value.problems == ["--do 'sex' is not of the form variable=value", "--do: 'age' is given twice"]
    assert err.value.what == "--do"


# --- CausalGraph.roles ----------------------------------------------------------------------------------


@pytest.mark.parametrize("do,roles", [
    (["age"], ["intervened", "unchanged", "descendant", "descendant"]),
    (["sex"], ["unchanged", "intervened", "descendant", "descendant"]),
    (["brain_volume"], ["unchanged", "unchanged", "intervened", "descendant"]),
    (["ventricle_volume"], ["unchanged", "unchanged", "unchanged", "intervened"]),
    (["age", "brain_volume"], ["intervened", "unchanged", "intervened", "descendant"]),
    ([], ["unchanged"] * 4),
])
def test_roles_in_topological_order(do, roles):
    out = BRAIN.roles(do)
    assert list(out) == list(BRAIN.order) == ["age", "sex", "brain_volume", "ventricle_volume"]
    assert list(out.values()) == roles


def test_roles_take_a_mapping_and_refuse_unknown_names():
    assert BRAIN.roles({"sex": 1.0})["ventricle_volume"] == "descendant"
    circuit = builtin_graph("circuit")
    assert circuit.roles(["blue"]) == {"arm": "unchanged", "blue": "intervened", "green": "unchanged",
                                       "red": "descendant"}
    with pytest.raises(GraphError, match="unknown variable 'height'"):
        BRAIN.roles(["height"])
