import numpy as np
import pytest
import torch

from cdae_med.counterfactual import abduct
from cdae_med.diffusion import DDIM
from cdae_med.graph import GraphError, builtin_graph, load_graph
from cdae_med.model import CausalDiffAE, CausalDiffAEConfig, CausalLayer, kl_normal

from .conftest import TINY_MODEL


@pytest.fixture
def layer():
    torch.manual_seed(0)
    return CausalLayer(builtin_graph("pendulum"), latent_dim=4, hidden=8)


def test_root_intervention_reaches_descendants_only(layer):
    u = torch.randn(5, 4, 4)
    z = layer(u)
    z_do = layer(u, do={"angle": torch.full((5, 4), 0.7)})
    assert torch.allclose(z_do[:, 0], torch.full((5, 4), 0.7))
    assert torch.equal(z_do[:, 1], z[:, 1])  # light: not a descendant
    assert (z_do[:, 2] - z[:, 2]).abs().min() > 0  # shadow_len recomputed
    assert (z_do[:, 3] - z[:, 3]).abs().min() > 0  # shadow_pos recomputed


def test_leaf_intervention_changes_nothing_else(layer):
    u = torch.randn(3, 4, 4)
    z = layer(u)
    z_do = layer(u, do={"shadow_len": torch.zeros(3, 4)})
    assert torch.equal(z_do[:, [0, 1, 3]], z[:, [0, 1, 3]])


def test_descendants_use_parents_z_not_u(tmp_path):
    # Chain a -> b -> c: an intervention on a must reach c through b's *new* z.
    (tmp_path / "chain.yaml").write_text(
        "variables:\n - {name: a}\n - {name: b, parents: [a]}\n - {name: c, parents: [b]}\n")
    g = load_graph(tmp_path / "chain.yaml")
    torch.manual_seed(1)
    chain = CausalLayer(g, latent_dim=3, hidden=8)
    u = torch.randn(4, 3, 3)
    z, z_do = chain(u), chain(u, do={"a": torch.full((4, 3), 2.0)})
    assert (z_do[:, 2] - z[:, 2]).abs().min() > 0
    expected_c = chain.mechanisms["c"](z_do[:, 1]) + u[:, 2]
    assert torch.allclose(z_do[:, 2], expected_c)


def test_null_intervention_and_abduction_are_exact(layer):
    u = torch.randn(6, 4, 4)
    z = layer(u)
    assert torch.allclose(layer.abduct(z), u, atol=1e-6)
    for i, name in enumerate(("angle", "light", "shadow_len", "shadow_pos")):
        assert torch.allclose(layer(u, do={name: z[:, i]}), z, atol=1e-6)


def test_kl_normal_matches_closed_form():
    m, lv = torch.tensor([0.5]), torch.log(torch.tensor([0.25]))
    # KL(N(0.5, 0.25) || N(1, 0.5^2)) = log(0.5/0.5) + (0.25 + 0.25)/(2*0.25) - 0.5 = 0.5
    assert torch.allclose(kl_normal(m, lv, 1.0, 0.5), torch.tensor([0.5]), atol=1e-6)
    assert kl_normal(torch.zeros(3), torch.zeros(3)).abs().max() < 1e-7


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_one_code_path_for_2d_and_3d(spatial_dims):
    cfg = CausalDiffAEConfig(spatial_dims=spatial_dims, in_channels=1, image_size=(16,) * spatial_dims,
                             **{k: v for k, v in TINY_MODEL.items()})
    model = CausalDiffAE(load_graph("pendulum"), cfg)
    x = torch.randn(2, 1, *(16,) * spatial_dims)
    y = torch.zeros(2, 4)
    ddim = DDIM()
    losses = model.loss(x, y, ddim, gamma=1.0)
    losses["loss"].backward()
    assert losses["loss"].ndim == 0 and torch.isfinite(losses["loss"])
    ab = abduct(model, ddim, x, num_steps=3)
    assert ab.x_t.shape == x.shape and ab.z.shape == (2, 4, 4)


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_the_denoiser_reads_z_and_t(spatial_dims):
    """MONAI's ResBlock adds the embedding before a GroupNorm; with one channel per group (the old
    32 groups on 32 channels) the norm erased it and the denoiser ignored z and t altogether."""
    def sensitivity(groups, conditioning="add"):
        torch.manual_seed(0)
        cfg = CausalDiffAEConfig(spatial_dims=spatial_dims, in_channels=1, image_size=(16,) * spatial_dims,
                                 unet_norm_groups=groups, conditioning=conditioning, **TINY_MODEL)
        unet = CausalDiffAE(load_graph("brain"), cfg).eval()
        for m in unet.unet.modules():  # MONAI zero-initialises the output convolution: give it weights
            if isinstance(m, (torch.nn.Conv2d, torch.nn.Conv3d)):
                torch.nn.init.normal_(m.weight, std=0.1)
        x, z = torch.randn(2, 1, *(16,) * spatial_dims), torch.randn(2, 4, 4)
        t = torch.tensor([500, 500])
        with torch.no_grad():
            e = unet.denoise(x, t, z)
            dz = (unet.denoise(x, t, z + 1.0) - e).abs().mean() / e.abs().mean()
            dt = (unet.denoise(x, t // 50, z) - e).abs().mean() / e.abs().mean()
        return dz.item(), dt.item()

    dz, dt = sensitivity(8)  # at least 4 channels per group
    assert dz > 0.005 and dt > 0.005, (dz, dt)
    dz32, dt32 = sensitivity(32)
    assert dz32 < 1e-5 and dt32 < 1e-5, (dz32, dt32)  # one channel per group: erased
    # a scale and shift after the norm (AdaGN) survives it at any number of groups
    for groups in (8, 32):
        dz_ss, dt_ss = sensitivity(groups, "scale_shift")
        assert dz_ss > 0.005 and dt_ss > 0.005, (groups, dz_ss, dt_ss)
    with pytest.raises(ValueError, match="conditioning"):
        CausalDiffAEConfig(conditioning="film")
    with pytest.raises(ValueError, match="unet_norm_groups"):
        CausalDiffAEConfig(unet_channels=(32, 48, 48), unet_norm_groups=32)


def _tiny_brain_model(spatial_dims=2):
    cfg = CausalDiffAEConfig(spatial_dims=spatial_dims, in_channels=1, image_size=(16,) * spatial_dims,
                             unet_norm_groups=8, **TINY_MODEL)
    return CausalDiffAE(load_graph("brain"), cfg)


def test_only_the_mechanism_loss_trains_the_mechanisms():
    torch.manual_seed(0)
    model = _tiny_brain_model()
    mech = list(model.causal.mechanisms.parameters())
    x, y = torch.randn(4, 1, 16, 16), torch.randn(4, 4)
    mechanism_loss = model.mechanism_loss
    model.mechanism_loss = lambda y, labelled=None: torch.zeros(())  # leaves mse + KL terms
    rest = model.loss(x, y, DDIM(), gamma=1.0)["loss"]  # must not move the mechanisms
    model.mechanism_loss = mechanism_loss
    grads = torch.autograd.grad(rest, mech, allow_unused=True)
    assert all(g is None or g.abs().max() == 0 for g in grads)
    # ...but they do reach the encoder through the mechanisms' inputs
    enc = torch.autograd.grad(rest, list(model.encoder.parameters()), allow_unused=True)
    assert max(g.abs().max() for g in enc if g is not None) > 0
    mech_grads = torch.autograd.grad(model.mechanism_loss(y), mech)
    assert max(g.abs().max() for g in mech_grads) > 0


def test_mechanisms_learn_the_label_regression():
    """brain_volume = -0.7 age + 0.9 sex + noise (normalised units): the learned mechanism's slopes
    match the regression's within 0.1 after 200 steps at the training code's mechanism lr."""
    from pipelines.train import TrainConfig, parameter_groups

    torch.manual_seed(0)
    model = _tiny_brain_model()
    opt = torch.optim.AdamW(parameter_groups(model, TrainConfig()), lr=TrainConfig().lr, weight_decay=0.0)
    g = torch.Generator().manual_seed(1)

    def labels(n):
        age, sex = torch.rand(n, generator=g) * 2 - 1, (torch.rand(n, generator=g) < 0.5).float() * 2 - 1
        bv = -0.7 * age + 0.9 * sex + 0.1 * torch.randn(n, generator=g)
        return torch.stack([age, sex, bv, 0.5 * bv + 0.1 * torch.randn(n, generator=g)], dim=1)

    for _ in range(200):
        loss = model.mechanism_loss(labels(32))
        opt.zero_grad()
        loss.backward()
        opt.step()
    y = labels(512)
    z = model.label_latent(y)
    with torch.no_grad():
        f = model.causal.mechanism("brain_volume", [z[:, i] for i in range(4)]).mean(-1)
    a = torch.stack([y[:, 0], y[:, 1], torch.ones(512)], dim=1)
    slope = torch.linalg.lstsq(a, f[:, None]).solution[:2, 0]
    assert torch.allclose(slope, torch.tensor([-0.7, 0.9]), atol=0.1), slope


def test_config_validation():
    with pytest.raises(ValueError, match="spatial_dims must be 2 or 3"):
        CausalDiffAEConfig(spatial_dims=1, image_size=(16,))
    with pytest.raises(ValueError, match="multiple of"):
        CausalDiffAEConfig(image_size=(30, 30))


def test_ddim_timestep_grid():
    ddim = DDIM()
    assert ddim.timesteps(50)[:2] == [0, 20] and ddim.latent_timestep(50) == 980
    assert ddim.latent_timestep(50, depth=0.5) == 500
    with pytest.raises(ValueError, match="depth"):
        ddim.timesteps(50, depth=0)


def test_descendant_noise_is_one_draw_per_block_of_a_child_only():
    model = CausalDiffAE(builtin_graph("pendulum"), CausalDiffAEConfig(descendant_noise=0.3))
    torch.manual_seed(0)
    z = torch.randn(4000, 4, 16)
    noise = model.noisy_descendants(z) - z
    assert torch.equal(noise[:, :2], torch.zeros_like(noise[:, :2]))  # angle, light: roots, untouched
    assert torch.allclose(noise[:, 2:], noise[:, 2:, :1].expand(-1, -1, 16), atol=1e-5)  # same in every dimension
    assert noise[:, 2:, 0].std(dim=0).sub(0.3).abs().max() < 0.02
    assert abs(float(noise[:, 2, 0] @ noise[:, 3, 0]) / 4000) < 0.01  # the two shadows drawn independently
    plain = CausalDiffAE(builtin_graph("pendulum"), CausalDiffAEConfig())
    assert plain.noisy_descendants(z) is z
    with pytest.raises(ValueError, match="descendant_noise"):
        CausalDiffAEConfig(descendant_noise=-0.1)


def test_log_scale_volumes_make_the_counterfactual_scale_the_subjects_own_ventricles():
    """V = 30 ml x exp(0.4 age_n) x (1100 / B) x exp(0.5 e): with the brain graph's volumes on their log
    scale, mechanisms trained as in training make do(brain_volume = B - 100) scale each subject's own
    ventricles by B / (B - 100) (median within 4 %); the same mechanisms on a linear scale add one change
    to every subject, whatever its ventricles (median off by more than twice as much)."""
    import dataclasses

    from cdae_med.graph import CausalGraph
    from pipelines.train import TrainConfig, parameter_groups

    g = torch.Generator().manual_seed(1)
    n = 4000
    age = torch.rand(n, generator=g, dtype=torch.float64) * 50 + 40
    sex = (torch.rand(n, generator=g) < 0.5).double()
    brain = 1100 * torch.exp(-0.004 * (age - 60) + 0.05 * sex + 0.08 * torch.randn(n, generator=g, dtype=torch.float64))
    vent = 30 * torch.exp(0.4 * (age - 60) / 20 + 0.5 * torch.randn(n, generator=g, dtype=torch.float64)) * (1100 / brain)
    y = torch.stack([age, sex, brain, vent], 1)
    log_graph = load_graph("brain")
    linear = CausalGraph("brain", tuple(dataclasses.replace(v, log=False, centre=float(y[:, i].mean()),
                                                            scale=float(y[:, i].std()))
                                        if v.log else v for i, v in enumerate(log_graph.variables)))

    def ratio_error(graph):
        torch.manual_seed(0)
        cfg = CausalDiffAEConfig(spatial_dims=2, in_channels=1, image_size=(16, 16), unet_norm_groups=8, **TINY_MODEL)
        model = CausalDiffAE(graph, cfg)
        opt = torch.optim.AdamW(parameter_groups(model, TrainConfig()), lr=TrainConfig().lr, weight_decay=0.0)
        yn = graph.normalise(y).float()
        for _ in range(400):
            loss = model.mechanism_loss(yn[torch.randint(0, n, (256,), generator=g)])
            opt.zero_grad()
            loss.backward()
            opt.step()
        test = y[:300]
        z = model.label_latent(graph.normalise(test).float())
        do = graph.normalise(torch.stack([test[:, 0], test[:, 1], test[:, 2] - 100, test[:, 3]], 1))[:, 2]
        with torch.no_grad():
            cf = model.causal(model.causal.abduct(z), {"brain_volume": do.float()[:, None].expand(-1, z.shape[-1])})
        vent_cf = graph.denormalise(model.latent_to_label(cf).double())[:, 3]
        change, true_change = vent_cf - test[:, 3], test[:, 3] * (test[:, 2] / (test[:, 2] - 100) - 1)
        return float(((change - true_change) / true_change).abs().median())

    on_log, on_linear = ratio_error(log_graph), ratio_error(linear)
    assert on_log < 0.25 and on_linear > 1.5 * on_log, (on_log, on_linear)


def test_mechanisms_reading_values_ignore_how_a_parents_block_spreads():
    """An intervention that writes a parent's own value (its block's mean) back as an even block changes
    nothing downstream when the mechanisms read values; read as whole blocks, the child moves by the
    mechanism's answer to the block's spread alone."""
    graph = builtin_graph("pendulum")
    for reads, moves in (("values", False), ("blocks", True)):
        torch.manual_seed(0)
        layer = CausalLayer(graph, latent_dim=8, hidden=16, reads=reads)
        z = torch.randn(5, 4, 8)  # blocks whose dimensions differ, as an encoder's do
        u = layer.abduct(z)
        same_angle = z[:, 0].mean(-1, keepdim=True).expand(-1, 8)
        z_do = layer(u, do={"angle": same_angle})
        change = (z_do[:, 2:] - z[:, 2:]).abs().max().item()  # the shadows, angle's children
        assert (change > 1e-3) if moves else (change < 1e-5), (reads, change)
    with pytest.raises(ValueError, match="mechanism_input"):
        CausalDiffAEConfig(mechanism_input="means")
