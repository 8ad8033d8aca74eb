import math

import numpy as np
import pytest
import torch

from cdae_med.graph import CausalGraph, GraphError, Variable, builtin_graph, load_graph


def test_pendulum_graph_order_and_descendants():
    g = builtin_graph("pendulum")
    assert g.names == ("angle", "light", "shadow_len", "shadow_pos")
    assert g.order.index("angle") < g.order.index("shadow_len")
    assert g.descendants("angle") == ("shadow_len", "shadow_pos")
    assert g.descendants("shadow_len") == ()
    assert g.adjacency()[0] == [0, 0, 1, 1]


def test_normalisation_round_trip_numpy_and_torch():
    g = builtin_graph("pendulum")
    y = np.array([[20.0, 90.0, 5.0, 10.0]])
    assert np.allclose(g.denormalise(g.normalise(y)), y)
    # angle 1.8 deg is the centre; 1.8 + 37.8 maps to 1
    assert np.allclose(g.normalise(np.array([1.8 + 37.8, 93.6, 7.5, 11.0])), [1, 0, 0, 0])
    t = torch.tensor(y)
    assert torch.allclose(g.denormalise(g.normalise(t)), t)


def test_topological_order_is_computed_not_declared():
    g = CausalGraph("g", (Variable("c", parents=("b",)), Variable("b", parents=("a",)), Variable("a")))
    assert g.order == ("a", "b", "c")


def test_cycle_is_an_error():
    with pytest.raises(GraphError, match="cycle"):
        CausalGraph("g", (Variable("a", parents=("b",)), Variable("b", parents=("a",))))


def test_unknown_parent_is_an_error():
    with pytest.raises(GraphError, match="unknown parent 'x'"):
        CausalGraph("g", (Variable("a", parents=("x",)),))


def test_duplicate_name_is_an_error():
    with pytest.raises(GraphError, match="duplicate variable name 'a'"):
        CausalGraph("g", (Variable("a"), Variable("a")))


def test_unknown_variable_lookup_lists_valid_names():
    with pytest.raises(GraphError, match="unknown variable 'age'.*angle, light"):
        builtin_graph("pendulum")["age"]


def test_value_checks():
    g = builtin_graph("pendulum")
    g.check_interventions({"angle": 20.0})
    with pytest.raises(GraphError, match=r"angle=50 deg is outside the declared range \[-36, 38.7\]"):
        g.check_interventions({"angle": 50.0})
    with pytest.raises(GraphError, match="not a finite number"):
        g.check_interventions({"angle": math.nan})
    with pytest.raises(GraphError, match="no intervention"):
        g.check_interventions({})


def test_yaml_round_trip(tmp_path):
    f = tmp_path / "brain.yaml"
    f.write_text(
        "variables:\n"
        "  - {name: age, unit: years, centre: 60, scale: 15, range: [40, 90]}\n"
        "  - {name: sex, binary: true}\n"
        "  - {name: brain_volume, unit: ml, centre: 1100, scale: 150, parents: [age, sex]}\n"
    )
    g = load_graph(f)
    assert g.name == "brain"
    assert g["sex"].binary and (g["sex"].low, g["sex"].high) == (0, 1)
    assert g.descendants("age") == ("brain_volume",)
    assert CausalGraph.from_dict(g.to_dict()) == g
    with pytest.raises(GraphError, match="binary"):
        g.check_interventions({"sex": 0.5})


def test_yaml_errors(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("variables:\n  - {name: a, parents: [b]}\n  - {name: b, parents: [a]}\n")
    with pytest.raises(GraphError, match="cycle"):
        load_graph(bad)
    typo = tmp_path / "typo.yaml"
    typo.write_text("variables:\n  - {name: a, parnets: [b]}\n")
    with pytest.raises(GraphError, match="unknown keys"):
        load_graph(typo)
    with pytest.raises(GraphError, match="no built-in graph named 'nope'"):
        load_graph("nope")


def test_log_scale_variable_normalises_the_log_and_round_trips():
    g = builtin_graph("brain")
    assert g["ventricle_volume"].log and g["brain_volume"].log and not g["age"].log
    y = np.array([[60.0, 1.0, 1000.0, 40.0], [70.0, 0.0, 1200.0, 20.0]])
    n = g.normalise(y)
    assert np.allclose(g.denormalise(n), y)
    t = torch.tensor(y)
    assert torch.allclose(g.denormalise(g.normalise(t)), t)
    v = g["ventricle_volume"]
    # ln(value / centre) / scale: the centre maps to 0, and an additive step is a factor
    assert v.normalise(v.centre) == pytest.approx(0.0)
    assert v.denormalise(v.normalise(40.0) + 1.0) == pytest.approx(40.0 * math.exp(v.scale))
    tv = torch.tensor([20.0, 40.0])  # one variable's values, as an intervention's are normalised
    assert torch.allclose(v.denormalise(v.normalise(tv)), tv)
    assert torch.allclose(v.normalise(tv), torch.tensor(v.normalise(np.array([20.0, 40.0])), dtype=torch.float32))
    assert np.allclose(n[:, 0], [0.0, 0.5])  # age stays linear
    assert np.isnan(g.normalise(np.array([60.0, 1.0, np.nan, 40.0]))[2])  # unknown stays unknown


def test_log_scale_needs_a_positive_range_and_survives_serialisation(tmp_path):
    with pytest.raises(GraphError, match="log scale"):
        CausalGraph("g", (Variable("v", centre=1.0, low=-1.0, high=2.0, log=True),))
    with pytest.raises(GraphError, match="log scale"):
        CausalGraph("g", (Variable("v", centre=1.0, low=0.0, high=2.0, log=True),))
    g = CausalGraph.from_dict({"variables": [{"name": "v", "unit": "ml", "centre": 30, "scale": 0.5, "log": True,
                                              "range": [1, 300]}, {"name": "w", "parents": ["v"]}]})
    assert CausalGraph.from_dict(g.to_dict()) == g
    assert "log" not in g.to_dict()["variables"][1]  # a linear variable is written as it always was
    path = tmp_path / "g.yaml"
    path.write_text("variables:\n  - {name: v, centre: 30, scale: 0.5, log: true, range: [1, 300]}\n")
    assert load_graph(path)["v"].log
