"""The brain benchmark's baselines (benchmarks/brain_native.py) recover what they model on data made by it."""

import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from brain_native import VoxelwiseLinear, VoxelwiseLocationScale  # noqa: E402
from synthetic_data import brain  # noqa: E402


def _cohort(n: int, seed: int):
    """Six voxels whose mean and spread both change with age (the spread log-linearly, more in later voxels),
    labels in the generator's units (age 40-90, sex, brain and ventricle volume), and the standardised
    residuals that made them."""
    rng = np.random.default_rng(seed)
    labels = np.column_stack([rng.uniform(40, 90, n), rng.integers(0, 2, n), rng.normal(1100, 100, n),
                              rng.normal(30, 10, n)])
    e = rng.standard_normal((n, 6))
    return labels, e


def _voxels(labels: np.ndarray, e: np.ndarray) -> np.ndarray:
    age = brain.normalise(labels)[:, :1]
    return 0.5 + 0.1 * age + np.exp(-2.0 + 0.4 * age * np.linspace(0, 1, 6)) * e


def test_location_scale_keeps_a_subjects_standardised_residual():
    labels, e = _cohort(4000, seed=1)
    images = _voxels(labels, e).reshape(-1, 1, 2, 3)
    model, linear = VoxelwiseLocationScale().fit(images, labels), VoxelwiseLinear().fit(images, labels)
    test_labels, e = _cohort(50, seed=2)
    x = _voxels(test_labels, e)
    cf_labels = test_labels.copy()
    cf_labels[:, 0] = np.where(test_labels[:, 0] < 65, test_labels[:, 0] + 20, test_labels[:, 0] - 20)
    truth = _voxels(cf_labels, e)  # the same subjects, the same residuals, other ages
    moved = x + model.change(x.reshape(-1, 1, 2, 3), test_labels, cf_labels).reshape(-1, 6)
    shifted = x + linear.change(test_labels, cf_labels).reshape(-1, 6)
    err, err_linear = np.abs(moved - truth).mean(), np.abs(shifted - truth).mean()
    assert err < 0.5 * err_linear, (err, err_linear)  # the change of spread is the subject's own
    assert np.allclose(model.change(x.reshape(-1, 1, 2, 3), test_labels, test_labels), 0, atol=1e-12)
