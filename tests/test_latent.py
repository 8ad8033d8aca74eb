"""The CausalDiffAE whose diffusion runs on principal components (cdae_med.latent)."""

import numpy as np
import pytest
import torch

from cdae_med.checkpoint import load_checkpoint
from cdae_med.diffusion import DDIM
from cdae_med.graph import builtin_graph
from cdae_med.latent import (DeformationAutoencoder, LinearAutoencoder, VectorDenoiser, VoxelQuantiles,
                              VoxelSpread)
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
    assert (y - x).abs().max() < 1e-3  # the basis is stored in half precision
    # a fresh one (another number of varying voxels than its init) loads the fit from the state dict
    fresh = LinearAutoencoder(5, (1, 6, 6, 6))
    fresh.load_state_dict(ae.state_dict())
    assert torch.equal(fresh.encode(x), c)
    with pytest.raises(ValueError, match="more than 5 training images"):
        LinearAutoencoder(5, (1, 6, 6, 6)).fit(x[:5])


def test_label_directions_make_the_codes_regression_the_voxelwise_regression():
    # volumes that move with two labels along directions of little variance, beside large unlabelled variation
    g = torch.Generator().manual_seed(1)
    n, v = 400, 64
    labels = torch.randn(n, 2, generator=g)
    slopes = torch.randn(2, v, generator=g) * 0.05
    x = (labels @ slopes + torch.randn(n, 20, generator=g) @ torch.randn(20, v, generator=g)
         + 0.01 * torch.randn(n, v, generator=g)).view(n, 1, 4, 4, 4)
    plain, directed = LinearAutoencoder(6, (1, 4, 4, 4)), LinearAutoencoder(6, (1, 4, 4, 4))
    plain.fit(x)
    directed.fit(x, labels=labels)
    rows = directed.components.float()
    assert torch.allclose(rows @ rows.T, torch.eye(6), atol=2e-3)  # an orthonormal basis: encode is a projection

    def regression_change(ae):  # a linear regression of the code on the labels, its change for d(label 0) = 1
        c = ae.encode(x)
        coef = torch.linalg.lstsq(torch.cat([labels, torch.ones(n, 1)], 1), c).solution
        return ae.decode(coef[0:1] + 0 * c[:1]) - ae.decode(0 * c[:1])

    design = torch.cat([labels, torch.ones(n, 1)], 1)
    voxelwise = torch.linalg.lstsq(design, x.reshape(n, -1)).solution[0]  # the voxels' own slopes on label 0
    err_directed = (regression_change(directed).reshape(-1) - voxelwise).abs().max()
    err_plain = (regression_change(plain).reshape(-1) - voxelwise).abs().max()
    assert err_directed < 2e-3 < 0.5 * err_plain  # principal components alone lose much of the labels' change
    # hidden labels are left out of the slopes: the same directions from the labelled rows alone
    labelled = torch.arange(n) < 300
    part = LinearAutoencoder(6, (1, 4, 4, 4))
    part.fit(x, labels=torch.where(labelled[:, None], labels, 0.0), labelled=labelled)
    ref = LinearAutoencoder(6, (1, 4, 4, 4))
    ref.fit(x[:300], labels=labels[:300])
    a, b = part.components[:2].float(), ref.components[:2].float()
    assert torch.linalg.svdvals(a @ b.T).min() > 0.99  # the same plane (the data's mean differs a little)
    with pytest.raises(ValueError, match="label rows"):
        LinearAutoencoder(6, (1, 4, 4, 4)).fit(x, labels=labels[:10])
    with pytest.raises(ValueError, match="cannot hold"):
        LinearAutoencoder(2, (1, 4, 4, 4)).fit(x, labels=labels)


def test_voxel_quantiles_give_normal_scores_and_invert():
    g = torch.Generator().manual_seed(0)
    n = 2000
    x = torch.rand(n, 4, generator=g)
    # voxel 1: a tissue boundary, 0.8 in 60 % of subjects, 0.1 in the rest; voxel 2: background everywhere
    x[:, 1] = torch.where(torch.rand(n, generator=g) < 0.6, 0.8, 0.1) + 0.01 * torch.randn(n, generator=g)
    x[:, 2] = -1.0
    q = VoxelQuantiles(64, 4)
    with pytest.raises(RuntimeError, match="not been fitted"):
        q(x)
    q.fit(x)
    s = q(x)
    assert s.shape == x.shape
    assert torch.allclose(s[:, [0, 1, 3]].mean(0), torch.zeros(3), atol=0.05)
    assert torch.allclose(s[:, [0, 1, 3]].std(0), torch.ones(3), atol=0.05)
    assert (s[:, 2] == 0).all()  # a run of equal quantiles: its middle level
    assert (q.inverse(s) - x).abs().max() < 3e-3  # half-precision quantiles, interpolated
    assert (q.inverse(torch.full_like(s, 10.0))[:, 0] <= x[:, 0].max() + 1e-3).all()  # decodes within the range
    # the same shift of score moves a subject between the two modes far more than one on a mode
    shifted = q.inverse(s - 0.5)[:, 1] - x[:, 1]
    between = (x[:, 1] - 0.45).abs().argmin()  # none sits between: the nearest to the boundary
    on_mode = (x[:, 1] - 0.8).abs().argmin()
    assert shifted[between].abs() > 10 * shifted[on_mode].abs()
    fresh = VoxelQuantiles(64, 4)
    fresh.load_state_dict(q.state_dict())
    assert torch.equal(fresh(x), s)
    with pytest.raises(ValueError, match="at least 2"):
        VoxelQuantiles(1, 4)


def test_linear_first_stage_on_scores_decodes_intensities():
    x = low_rank_volumes(200, rank=4)
    ae = LinearAutoencoder(4, (1, 6, 6, 6), quantiles=32)
    ae.fit(x)
    y = ae.decode(ae.encode(x))
    assert y.shape == x.shape and (y[:, :, 0] == -1.0).all()
    # the scores of a Gaussian low-rank volume are nearly its whitened values: four components hold it
    assert (y - x).abs().mean() < 0.1 * (x - x.mean(0)).abs().mean()
    fresh = LinearAutoencoder(4, (1, 6, 6, 6), quantiles=32)
    fresh.load_state_dict(ae.state_dict())
    # (against the same batch: a batch of 3 and one of 200 may round differently in the matrix products)
    assert torch.equal(fresh.decode(fresh.encode(x[:3])), ae.decode(ae.encode(x[:3])))
    # a change taken at the images' own scores: none for an unchanged code, bit for bit; otherwise
    # the shifted scores of the images themselves, decoded
    c = ae.encode(x[:3])
    assert torch.equal(ae.change(x[:3], c, c), torch.zeros_like(x[:3]))
    moved = c.clone()
    moved[:, 0] += 1.0
    d = ae.change(x[:3], c, moved)
    shift = ae.decode(moved) - ae.decode(c)
    assert d.shape == x[:3].shape and (d[:, :, 0] == 0).all()
    assert torch.corrcoef(torch.stack([d.flatten(), shift.flatten()]))[0, 1] > 0.9
    plain = LinearAutoencoder(4, (1, 6, 6, 6))
    plain.fit(x)
    c = plain.encode(x[:3])
    assert torch.allclose(plain.change(x[:3], c, c + 1), plain.decode(c + 1) - plain.decode(c), atol=1e-5)
    with pytest.raises(ValueError, match="latent_quantiles"):
        CausalDiffAEConfig(spatial_dims=3, in_channels=1, image_size=(6, 6, 6), latent_components=4,
                           latent_shape_components=4, latent_quantiles=16)


def shifted_blobs(n: int, size: int = 12, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Gaussian blobs of random brightness whose centres (returned, voxels) move by about a voxel."""
    g = torch.Generator().manual_seed(seed)
    grid = torch.stack(torch.meshgrid(*[torch.arange(size, dtype=torch.float32)] * 3, indexing="ij"))
    centres = (size - 1) / 2 + torch.randn(n, 3, generator=g) * 0.8
    brightness = 0.5 + 0.2 * torch.rand(n, generator=g)
    r2 = ((grid[None] - centres[:, :, None, None, None]) ** 2).sum(1)
    return (2 * brightness[:, None, None, None] * torch.exp(-r2 / 8) - 1)[:, None], centres


def test_deformation_first_stage_codes_where_things_are_and_round_trips():
    """A blob that moves is one displacement away from the template: the shape code holds where it
    is (the decoded displacement at the centre follows the true shift), the residual its brightness,
    and the pair reconstructs better than as many intensity components."""
    x, centres = shifted_blobs(60)
    ae = DeformationAutoencoder(3, 3, (1, 12, 12, 12))
    with pytest.raises(RuntimeError, match="not been fitted"):
        ae.encode(x)
    codes, share = ae.fit_transform(x)
    assert codes.shape == (60, 6) and share > 0.95
    linear = LinearAutoencoder(6, (1, 12, 12, 12))
    linear.fit(x)
    held_out, true_centres = shifted_blobs(10, seed=1)
    err = (ae.decode(ae.encode(held_out)) - held_out).abs().mean()
    assert err < 0.5 * (linear.decode(linear.encode(held_out)) - held_out).abs().mean()
    # x(p) ~ template(p + v(p)): v at the centre is the template's centre minus the blob's
    v = ae.displacement(ae.encode(held_out))[:, :, 5:7, 5:7, 5:7].mean((2, 3, 4))
    shift = centres.mean(0) - true_centres
    for axis in range(3):
        assert np.corrcoef(v[:, axis], shift[:, axis])[0, 1] > 0.95
    fresh = DeformationAutoencoder(3, 3, (1, 12, 12, 12))
    fresh.load_state_dict(ae.state_dict())
    assert torch.equal(fresh.encode(held_out), ae.encode(held_out))
    with pytest.raises(ValueError, match="one channel"):
        DeformationAutoencoder(3, 3, (2, 12, 12, 12))


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


@pytest.fixture(scope="module")
def shape_scan_model(tmp_path_factory):
    """A registered 16^3 model whose first stage codes shape and appearance, trained for seconds."""
    from pipelines.scans import ScanModel

    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("shape") / "brain"
    train(TrainConfig(dataset="brain", size=16, registration="affine", n_train=150, steps=200, minutes=None,
                      batch_size=64, lr=1e-3, model={"latent_components": 8, "latent_shape_components": 8,
                                                     "latent_dim": 4}, out=str(out), eval_n=0, grid_rows=1),
          progress=False)
    return ScanModel.load(out, device="cpu", num_steps=10, realisation="deformation")


def test_a_shape_coding_model_moves_the_scan_by_its_own_deformation(tmp_path, shape_scan_model):
    """Through ScanModel, a model that codes shape realises its change with the deformation it decodes:
    do(age = +30 years) changes the 2 mm scan, and a null intervention returns it exactly."""
    import nibabel as nib

    from cdae_med.io import write_nifti
    from synthetic_data import brain

    s = brain.sample(1, seed=3_000_101, size=32)
    path = tmp_path / "sub.nii.gz"
    write_nifti(path, s.images[0, ..., 0], brain.affine(32))
    age, sex = float(s.labels[0, 0]), float(s.labels[0, 1])
    report = shape_scan_model.run(path, {"age": min(age + 30, 95.0)}, tmp_path / "older",
                                  covariates={"age": age, "sex": sex})
    assert "displacement" in report["settings"]["model_kind"]
    assert "decoded by the model" in report["settings"]["output"]
    diff = nib.load(tmp_path / "older" / "difference.nii.gz").get_fdata()
    assert np.abs(diff).max() > 0.01 * np.ptp(s.images[0])
    shape_scan_model.run(path, {"age": age}, tmp_path / "null", covariates={"age": age, "sex": sex})
    assert np.abs(nib.load(tmp_path / "null" / "difference.nii.gz").get_fdata()).max() == 0.0


def test_a_model_on_quantile_scores_changes_the_scan_and_keeps_a_null_intervention_exact(tmp_path):
    """A registered 16^3 model whose first stage codes the voxels' quantile scores, through ScanModel:
    its checkpoint keeps the quantiles, do(age = +30 years) changes the 2 mm scan (at the scan's own
    scores, LinearAutoencoder.change) and do(age = its value) returns the scan exactly."""
    import nibabel as nib

    from cdae_med.io import write_nifti
    from pipelines.scans import ScanModel
    from synthetic_data import brain

    torch.set_num_threads(1)
    out = tmp_path / "brain"
    # the registered subjects of the shape model's fixture: read from the same cache
    train(TrainConfig(dataset="brain", size=16, registration="affine", n_train=150, steps=200, minutes=None,
                      batch_size=64, lr=1e-3, model={"latent_components": 8, "latent_quantiles": 16, "latent_dim": 4},
                      out=str(out), eval_n=0, grid_rows=1), progress=False)
    model = ScanModel.load(out, device="cpu", num_steps=10)
    scores = model.pipeline.model.first_stage.scores
    assert scores is not None and scores.fitted and scores.quantiles.shape == (16 ** 3, 16)
    s = brain.sample(1, seed=3_000_101, size=32)
    path = tmp_path / "sub.nii.gz"
    write_nifti(path, s.images[0, ..., 0], brain.affine(32))
    age, sex = float(s.labels[0, 0]), float(s.labels[0, 1])
    model.run(path, {"age": min(age + 30, 95.0)}, tmp_path / "older", covariates={"age": age, "sex": sex})
    diff = nib.load(tmp_path / "older" / "difference.nii.gz").get_fdata()
    assert np.abs(diff).max() > 0.01 * np.ptp(s.images[0])
    model.run(path, {"age": age}, tmp_path / "null", covariates={"age": age, "sex": sex})
    assert np.abs(nib.load(tmp_path / "null" / "difference.nii.gz").get_fdata()).max() == 0.0


def test_shape_smoothing_is_one_setting_however_it_is_written():
    """2 and 2.0 voxels are one setting: the template displacements' cache is keyed by it."""
    a, b = (CausalDiffAEConfig(spatial_dims=3, in_channels=1, image_size=(6, 6, 6), latent_components=4,
                               latent_shape_components=4, latent_shape_smoothing=v) for v in (2, 2.0))
    assert repr(a.latent_shape_smoothing) == repr(b.latent_shape_smoothing) == "2.0"


def test_the_denoisers_linear_path_starts_at_nothing_and_adds_a_linear_mean():
    torch.manual_seed(0)
    plain, linear = VectorDenoiser(4, 3, 16, 1), VectorDenoiser(4, 3, 16, 1, linear_path=True)
    missing, unexpected = linear.load_state_dict(plain.state_dict(), strict=False)
    assert not unexpected and {m.split(".")[0] for m in missing} == {"gate_c", "gate_z", "mean"}
    c_t, t = torch.randn(5, 4), torch.randint(0, 1000, (5,))
    cond = torch.cat([torch.randn(5, 3), torch.ones(5, 1)], 1)
    assert torch.equal(linear(c_t, t, cond), plain(c_t, t, cond))  # zero gates: the MLP alone
    with torch.no_grad():
        linear.gate_c.bias.fill_(0.5)
        linear.gate_z.bias.fill_(2.0)
    expected = plain(c_t, t, cond) + 0.5 * c_t + 2.0 * linear.mean(cond[:, :3])
    assert torch.allclose(linear(c_t, t, cond), expected, atol=1e-6)
    dropped = cond.clone()
    dropped[:, 3] = 0  # the null condition has no mean
    assert torch.allclose(linear(c_t, t, dropped), plain(c_t, t, dropped) + 0.5 * c_t, atol=1e-6)



def test_the_linear_path_alone_is_the_gaussian_denoiser_and_nothing_else():
    """``mlp=False``: no MLP parameters, the output a(t) c_t + b(t) (W z + w); an empty denoiser is refused."""
    torch.manual_seed(0)
    alone = VectorDenoiser(4, 3, 16, 2, linear_path=True, mlp=False)
    assert {name.split(".")[0] for name in alone.state_dict()} == {"gate_c", "gate_z", "mean", "time"}
    c_t, t = torch.randn(5, 4), torch.randint(0, 1000, (5,))
    cond = torch.cat([torch.randn(5, 3), torch.ones(5, 1)], 1)
    assert torch.equal(alone(c_t, t, cond), torch.zeros(5, 4))  # zero gates at initialisation
    with torch.no_grad():
        alone.gate_c.bias.fill_(0.5)
        alone.gate_z.bias.fill_(2.0)
    assert torch.allclose(alone(c_t, t, cond), 0.5 * c_t + 2.0 * alone.mean(cond[:, :3]), atol=1e-6)
    with pytest.raises(ValueError, match="MLP, its linear path or both"):
        VectorDenoiser(4, 3, 16, 2, linear_path=False, mlp=False)
    with pytest.raises(ValueError, match="latent_mlp=False needs latent_linear_path=True"):
        CausalDiffAEConfig(spatial_dims=3, in_channels=1, image_size=(6, 6, 6), latent_components=4, latent_mlp=False)


def test_voxel_spread_scales_a_subjects_deviation_where_the_spread_grows_with_a_root():
    """Images whose mean moves with a root a and a child b, and whose spread grows as exp(0.3 a) on half the
    voxels: the fitted spread scales a subject's deviation there by exp(0.3) for a + 1, leaves the other half,
    and changes nothing, exactly, when only the child changes."""
    g = torch.Generator().manual_seed(0)
    n = 4000
    a = torch.randn(n, generator=g)
    b = 0.8 * a + 0.6 * torch.randn(n, generator=g)
    y = torch.stack([a, b], 1)
    grows = torch.zeros(1, 4, 4, dtype=torch.bool)
    grows[..., :2] = True
    sigma = torch.where(grows, 0.05 * torch.exp(0.3 * a).view(n, 1, 1, 1), torch.tensor(0.05))
    e = torch.randn(n, 1, 4, 4, generator=g)
    x = 0.2 + 0.1 * a.view(n, 1, 1, 1) - 0.05 * b.view(n, 1, 1, 1) + sigma * e
    spread = VoxelSpread(n_vars=2, roots=[0], shape=(1, 4, 4)).fit(x, y)
    assert spread.mean.shape == (3, 16) and spread.log_var.shape == (2, 16)
    subject = torch.tensor([[0.5, 0.4]])
    deviation = torch.full((1, 1, 4, 4), 0.1)
    at = 0.2 + 0.1 * 0.5 - 0.05 * 0.4 + deviation
    older = spread.change(at, subject, subject + torch.tensor([[1.0, 0.8]]))
    expected = (np.exp(0.3) - 1) * 0.1
    assert np.allclose(older[0][grows].numpy(), expected, rtol=0.15)  # 0.035
    assert older[0][~grows].abs().max() < 0.2 * expected  # no spread change there
    # the child alone changes: the roots, and with them the spread, stay
    assert torch.equal(spread.change(at, subject, subject + torch.tensor([[0.0, 1.0]])), torch.zeros_like(at))
    # a checkpoint's spread loads with the fitted buffers; an unfitted one refuses
    again = VoxelSpread(2, [0], (1, 4, 4))
    with pytest.raises(RuntimeError, match="not been fitted"):
        again.change(at, subject, subject)
    again.load_state_dict(spread.state_dict())
    assert torch.equal(again.change(at, subject, subject + 1), spread.change(at, subject, subject + 1))
    with pytest.raises(ValueError, match="needs root variables"):
        VoxelSpread(2, [], (1, 4, 4))
    with pytest.raises(ValueError, match="voxel_spread needs latent_components > 0"):
        CausalDiffAEConfig(spatial_dims=3, in_channels=1, image_size=(8, 8, 8), voxel_spread=True)
    with pytest.raises(ValueError, match="voxel_spread does not combine with latent_quantiles"):
        CausalDiffAEConfig(spatial_dims=3, in_channels=1, image_size=(8, 8, 8), voxel_spread=True,
                           latent_components=4, latent_quantiles=8)


def test_a_models_voxel_spread_moves_do_age_and_leaves_do_brain_volume(tmp_path):
    """A registered 16^3 brain model with a voxel spread (the roots: age and sex), trained for seconds: its
    checkpoint keeps the fitted spread; under do(age) the counterfactual differs from the same model's without
    the spread, under do(brain_volume) and a null intervention it is that model's, bit for bit."""
    torch.set_num_threads(1)
    out = tmp_path / "brain"
    # the registered subjects of the shape model's fixture: read from the same cache
    train(TrainConfig(dataset="brain", size=16, registration="affine", n_train=150, steps=100, minutes=None,
                      batch_size=64, lr=3e-3, model={"latent_components": 8, "latent_dim": 4, "voxel_spread": True,
                                                     "latent_linear_path": True, "latent_mlp": False},
                      out=str(out), eval_n=0, grid_rows=1), progress=False)
    pipe = CounterfactualPipeline.from_checkpoint(out, device="cpu")
    spread = pipe.model.spread
    assert spread is not None and spread.fitted and spread.roots == (0, 1) and spread.mean.shape == (5, 16 ** 3)
    x = to_tensor(get_dataset("brain").sample(4, seed=777, size=16).images)
    age = pipe.read_values(pipe.abduct(x, num_steps=10).z)[:, 0]
    # A model trained for seconds may read an age beyond the graph's range, where do(age = it) is refused:
    # the null intervention is checked on the subjects whose own estimate is a valid value.
    valid = (age >= 20.0) & (age <= 95.0)
    assert valid.any(), age

    def both(do):
        with_spread = pipe(x, do, num_steps=10, reconstruction=True)
        pipe.model.spread = None
        try:
            without = pipe(x, do, num_steps=10, reconstruction=True)
        finally:
            pipe.model.spread = spread
        return with_spread, without

    older, plain = both({"age": (age + 20).clamp(20.0, 95.0)})
    assert torch.equal(older.reconstruction, plain.reconstruction)
    assert (older.images - plain.images).abs().max() > 1e-3
    a, b = both({"brain_volume": 1100.0})
    assert torch.equal(a.images, b.images)
    x = x[valid]
    a, b = both({"age": age[valid]})
    assert torch.equal(a.images, b.images)
