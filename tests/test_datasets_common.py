"""What every generator promises (synthetic_data.base)."""

import numpy as np
import pytest

from cdae_med.values import ValuesError
from pipelines.datasets import get_dataset

TWO_D = ["pendulum", "morphomnist", "circuit", "brain"]


@pytest.mark.parametrize("name", TWO_D)
def test_first_k_samples_do_not_depend_on_n(name):
    ds = get_dataset(name)
    a = ds.sample(3, seed=5, size=ds.default_size)
    b = ds.sample(7, seed=5, size=ds.default_size)
    assert np.array_equal(a.images, b.images[:3]) and np.array_equal(a.labels, b.labels[:3])


@pytest.mark.parametrize("name", TWO_D)
def test_counterfactual_keeps_non_descendants(name):
    ds = get_dataset(name)
    s = ds.sample(5, seed=1, size=ds.default_size)
    root = ds.graph.variables[0]
    value = (root.low + root.high) / 2
    cf = ds.counterfactual(s, {root.name: value}, ds.default_size)
    assert np.allclose(cf.labels[:, 0], value, atol=0.6)  # measured labels may differ slightly
    for v in ds.graph.variables[1:]:
        j = ds.graph.index(v.name)
        if v.name not in ds.graph.descendants(root.name):
            assert np.allclose(cf.labels[:, j], s.labels[:, j])
    assert cf.images.shape == s.images.shape


@pytest.mark.parametrize("name", TWO_D)
def test_counterfactual_reports_every_problem_of_do_at_once(name):
    ds = get_dataset(name)
    s = ds.sample(2, seed=0, size=ds.default_size)
    first, second = ds.graph.variables[:2]
    do = {"nonsense": 1.0, first.name: first.high + 1.0, second.name: [1.0, 2.0, 3.0]}
    with pytest.raises(ValuesError) as err:
        ds.counterfactual(s, do, ds.default_size)
    unknown, outside, length = err.value.problems
    assert unknown.startswith("unknown variable 'nonsense'") and first.name in unknown
    assert outside.startswith(f"{first.name}={first.high + 1.0:g}") and "outside the declared range" in outside
    assert length.startswith(f"{second.name}: 3 values for a batch of 2")


@pytest.mark.parametrize("name", TWO_D)
@pytest.mark.parametrize("do", [None, [("x", 1.0)], 0.5])
def test_counterfactual_needs_a_mapping(name, do):
    ds = get_dataset(name)
    s = ds.sample(1, seed=0, size=ds.default_size)
    with pytest.raises(ValuesError, match=f"do must be a mapping of variable to value.*got {type(do).__name__}"):
        ds.counterfactual(s, do, ds.default_size)
