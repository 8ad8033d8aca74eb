"""Confining a counterfactual's change (cdae_med.confine) and the pipeline's use of it."""

import numpy as np
import pytest
import torch

from cdae_med.confine import change_mask, confine_change
from cdae_med.pipeline import DEFAULT_CONFINE, CounterfactualPipeline
from pipelines.datasets import get_dataset, to_tensor
from pipelines.registry import SHIPPED


def _scene(spatial_dims: int = 2, size: int = 24):
    """An input, its true counterfactual (a block moved) and a decoding of it that adds a faint tint
    everywhere and a weak blob far from the change, as a decoder off its data's manifold does."""
    g = torch.Generator().manual_seed(0)
    shape = (2, 1) + (size,) * spatial_dims
    x = torch.full(shape, -1.0)
    x[(slice(None), slice(None)) + (slice(4, 8),) * spatial_dims] = 1.0
    truth = torch.full(shape, -1.0)
    truth[(slice(None), slice(None)) + (slice(6, 10),) * spatial_dims] = 1.0
    decoded = truth + 0.03 * torch.randn(shape, generator=g) + 0.05
    decoded[(slice(None), slice(None)) + (slice(18, 21),) * spatial_dims] += 0.2
    return x, truth, decoded


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_confining_keeps_the_change_and_the_input_elsewhere(spatial_dims):
    x, truth, decoded = _scene(spatial_dims)
    confined, mask = confine_change(x, decoded, 0.35)
    assert mask.shape == (2, 1) + x.shape[2:] and set(mask.unique().tolist()) <= {0.0, 1.0}
    inside = mask.expand_as(x).bool()
    # the moved block is kept, the tint and the far blob are the input's own pixels again
    block = (slice(None), slice(None)) + (slice(4, 10),) * spatial_dims
    assert inside[block].all()
    assert not inside[(slice(None), slice(None)) + (slice(18, 21),) * spatial_dims].any()
    assert torch.equal(confined[~inside], x[~inside]) and torch.equal(confined[inside], decoded[inside])
    # and the result is closer to the truth than the decoding: under a quarter of its error here
    assert (confined - truth).abs().mean() < 0.25 * (decoded - truth).abs().mean()


def test_change_mask_follows_the_threshold_and_refuses_bad_input():
    x, _, decoded = _scene()
    low, high = change_mask(decoded, x, 0.05), change_mask(decoded, x, 0.5)
    assert high.sum() < low.sum() and bool((high <= low).all())
    # an image that did not change keeps nothing
    assert change_mask(x, x, 0.35).sum() == 0
    for bad in (0.0, 1.0, -0.2):
        with pytest.raises(ValueError, match="threshold must be in"):
            change_mask(decoded, x, bad)
    with pytest.raises(ValueError, match="one shape"):
        change_mask(decoded, x[:, :, :20], 0.35)
    with pytest.raises(ValueError, match="one shape"):
        change_mask(decoded[:, :, 0], x[:, :, 0], 0.35)


def test_the_pipeline_confines_on_request(tiny_checkpoint):
    pipe = CounterfactualPipeline.from_checkpoint(tiny_checkpoint, "cpu")
    assert pipe.default_confine == DEFAULT_CONFINE
    x0 = to_tensor(get_dataset("pendulum").sample(6, seed=321, size=16).images)
    ab = pipe.abduct(x0, num_steps=8)
    # a null intervention is the input itself
    assert torch.equal(pipe.decode(ab, ab.z, confine=0.35)[0], x0)
    z_cf = pipe.act(ab, {"angle": torch.linspace(-30, 30, 6, dtype=torch.float64)})
    plain, _ = pipe.decode(ab, z_cf)
    confined, _ = pipe.decode(ab, z_cf, confine=0.35)
    mask = change_mask(plain, x0, 0.35).expand_as(x0).bool()
    assert 0 < mask.float().mean() < 1
    assert torch.equal(confined[mask], plain[mask]) and torch.equal(confined[~mask], x0[~mask])
    # the one call confines the same way
    out = pipe(x0, {"angle": torch.linspace(-30, 30, 6, dtype=torch.float64)}, num_steps=8, confine=0.35)
    np.testing.assert_allclose(out.images.numpy(), confined.numpy(), atol=1e-5)
    with pytest.raises(ValueError, match="confine must be 0"):
        pipe.decode(ab, z_cf, confine=1.5)


def test_a_model_with_a_first_stage_refuses_confining():
    pipe = CounterfactualPipeline.from_checkpoint(SHIPPED["brain"], "cpu")
    assert pipe.default_confine == 0.0
    with pytest.raises(ValueError, match="first stage"):
        pipe.check_confine(DEFAULT_CONFINE)
