"""The CausalDiffAE whose diffusion runs on principal components (cdae_med.latent)."""

import numpy as np
import pytest
import torch

from cdae_med.checkpoint import load_checkpoint
from cdae_med.diffusion import DDIM
from cdae_med.graph import builtin_graph
from cdae_med.latent import LinearAutoencoder
from cdae_med.model import CausalDiffAE, CausalDiffAEConfig
from cdae_med.pipeline import CounterfactualPipeline
from pipelines.datasets import get_dataset, to_tensor
from pipelines.train import TrainConfig, train


def low_rank_volumes(n: int, rank: int, shape=(1, 6, 6, 6), seed: int = 0) -> torch.Tensor:
    """Volumes that vary along ``rank`` directions inside a cube and are -1 outside it."""
    g = torch.Generator().manual_seed(seed)
    x = torch.full((n, *shape), -1.0)
    inside = (slice(None), slice(None), slice(1, 5), slice(1, 5), slice(1, 5))
    basis = torch.randn(rank, 64, generator=g)
    x[inside] = (torch.randn(n, rank, generator=g) @ basis).view(n, 1, 4, 4, 4) * 0.1
    return x


def test_linear_first_stage_round_trips_what_it_can_hold():
    x = low_rank_volumes(50, rank=5)
    ae = LinearAutoencoder(5, (1, 6, 6, 6))
    with pytest.raises(RuntimeError, match="not been fitted"):
        ae.encode(x)
    share = ae.fit(x)
    assert share == pytest.approx(1.0, abs=1e-4)
    assert int(ae.varying.sum()) == 64  # only the cube varies
    c = ae.encode(x)
    assert c.shape == (50, 5)
    assert torch.allclose(c.std(0), torch.ones(5), atol=0.05)  # whitened
    y = ae.decode(c)
    assert y.shape == x.shape
    assert (y[:, :, 0] == -1.0).all()  # the voxels that never vary keep their value exactly
    assert (y - x).abs().max() < 1e-4
    # a fresh one (another number of varying voxels than its init) loads the fit from the state dict
    fresh = LinearAutoencoder(5, (1, 6, 6, 6))
    fresh.load_state_dict(ae.state_dict())
    assert torch.equal(fresh.encode(x), c)
    with pytest.raises(ValueError, match="more than 5 training images"):
        LinearAutoencoder(5, (1, 6, 6, 6)).fit(x[:5])


def test_latent_model_inverts_and_keeps_a_null_intervention_exact():
    torch.manual_seed(0)
    graph = builtin_graph("brain")
    model = CausalDiffAE(graph, CausalDiffAEConfig(spatial_dims=3, in_channels=1, image_size=(6, 6, 6),
                                                   latent_dim=2, latent_components=8, latent_hidden=32))
    assert not hasattr(model, "unet")
    x = low_rank_volumes(40, rank=8)
    model.first_stage.fit(x)
    pipe = CounterfactualPipeline(model)
    ab = pipe.abduct(x[:4], num_steps=50)
    assert ab.x_t.shape == (4, 8)  # the noise code lives in the components' space
    rec, _ = pipe.decode(ab, ab.z)
    # decoding inverts the (fixed-point) inversion: the reconstruction is the input's projection, up
    # to the iteration's residual for this untrained network (0.003 of the [-1, 1] range here)
    assert (rec - model.first_stage.decode(model.first_stage.encode(x[:4]))).abs().max() < 1e-2
    age = pipe.read_values(ab.z)[:, graph.index("age")]
    out = pipe(x[:4], {"age": age}, num_steps=20, reconstruction=True)
    assert torch.equal(out.images, out.reconstruction)  # do(age = its own estimate) changes nothing
    moved = pipe(x[:4], {"age": 85.0}, num_steps=20, reconstruction=True)
    assert moved.images.shape == x[:4].shape and not torch.equal(moved.images, moved.reconstruction)


def test_latent_brain_model_learns_and_round_trips_its_checkpoint(tmp_path):
    """Trained for a few seconds on generated 16^3 brains, the encoder reads brain volume from the
    components far better than guessing the mean, and the saved checkpoint decodes the same."""
    torch.set_num_threads(1)
    out = tmp_path / "latent"
    train(TrainConfig(dataset="brain", size=16, n_train=300, steps=300, minutes=None, batch_size=64, lr=1e-3,
                      model={"latent_components": 16, "latent_dim": 4}, out=str(out), eval_n=0, grid_rows=1),
          progress=False)
    ckpt = load_checkpoint(out)
    assert ckpt.model.config.latent_components == 16 and ckpt.model.first_stage.fitted
    pipe = CounterfactualPipeline(ckpt.model, DDIM(ckpt.scheduler), ckpt)
    test = get_dataset("brain").sample(32, seed=777, size=16)
    x = to_tensor(test.images)
    with torch.no_grad():
        u, _ = ckpt.model.encode(ckpt.model.to_latent(x))
        est = pipe.read_values(ckpt.model.causal(u)).numpy()
    i = ckpt.graph.index("brain_volume")
    err = np.abs(est[:, i] - test.labels[:, i]).mean()
    spread = np.abs(test.labels[:, i] - test.labels[:, i].mean()).mean()
    assert err < 0.5 * spread, f"brain volume read-out error {err:.0f} ml, spread {spread:.0f} ml"
    again = CounterfactualPipeline.from_checkpoint(out, device="cpu")
    a = pipe(x[:2], {"age": 80.0}, num_steps=10, reconstruction=True)
    b = again(x[:2], {"age": 80.0}, num_steps=10, reconstruction=True)
    assert torch.equal(a.images, b.images)
