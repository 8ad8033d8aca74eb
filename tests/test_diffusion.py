"""The DDIM scheduler: prediction types, exact inversion, loss weights and timestep draws.

An analytic denoiser stands in for a trained one: for data x0 ~ N(0, s^2 I) the ideal predictions
at x_t are E[eps | x_t] = sqrt(1 - a) x_t / (a s^2 + 1 - a) and E[x0 | x_t] = sqrt(a) s^2 x_t / (a s^2 + 1 - a),
so decoding and inversion can be checked against closed forms without training anything.
"""

import pytest
import torch

from cdae_med.diffusion import DDIM, DDIMConfig

S2 = 0.25  # data variance


def oracle(ddim: DDIM):
    a_bar = ddim.scheduler.alphas_cumprod

    def output(x, t):
        a = a_bar[t].view(-1, *([1] * (x.ndim - 1))).to(x.dtype)
        denom = a * S2 + 1 - a
        eps, x0 = (1 - a).sqrt() * x / denom, a.sqrt() * S2 * x / denom
        if ddim.config.prediction_type == "v_prediction":
            return a.sqrt() * eps - (1 - a).sqrt() * x0
        return eps

    return output


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_fixed_point_inversion_makes_decoding_its_inverse(prediction_type):
    x0 = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(0)) * S2 ** 0.5
    errors = {}
    for iterations in (0, 4):
        ddim = DDIM(DDIMConfig(prediction_type=prediction_type, inversion_iterations=iterations))
        f = oracle(ddim)
        x_t = ddim.encode(f, x0, num_steps=50)
        errors[iterations] = (ddim.decode(f, x_t, num_steps=50) - x0).abs().max().item()
    assert errors[4] < 1e-4 and errors[0] > 1000 * errors[4], errors


def test_prediction_types_decode_to_the_same_image():
    """eps and v of the same ideal denoiser are one model: both decode one latent to one image."""
    x_t = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    out = [DDIM(DDIMConfig(prediction_type=p)) for p in ("epsilon", "v_prediction")]
    a, b = (d.decode(oracle(d), x_t, num_steps=20) for d in out)
    assert (a - b).abs().max() < 1e-5 and a.std() < 0.8 * x_t.std()  # decoded towards the data's scale


def test_training_target_is_noise_or_velocity():
    x0, noise = torch.randn(3, 1, 4, 4), torch.randn(3, 1, 4, 4)
    t = torch.tensor([0, 500, 999])
    assert torch.equal(DDIM().target(x0, noise, t), noise)
    ddim = DDIM(DDIMConfig(prediction_type="v_prediction"))
    a = ddim.scheduler.alphas_cumprod[t].view(-1, 1, 1, 1)
    assert torch.allclose(ddim.target(x0, noise, t), a.sqrt() * noise - (1 - a).sqrt() * x0, atol=1e-6)
    # to_epsilon inverts the target at (x_t, t)
    x_t = ddim.add_noise(x0, noise, t)
    for i, ti in enumerate(t.tolist()):
        eps = ddim.to_epsilon(ddim.target(x0, noise, t)[i:i + 1], x_t[i:i + 1], ti)
        assert torch.allclose(eps, noise[i:i + 1], atol=1e-4)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_min_snr_weights(prediction_type):
    ddim = DDIM(DDIMConfig(prediction_type=prediction_type))
    t = torch.arange(1000)
    w = ddim.loss_weights(t, "min_snr", snr_gamma=5.0)
    assert w.mean().item() == pytest.approx(1.0, abs=1e-5)
    snr = ddim.snr(t)
    raw = snr.clamp(max=5.0) / (snr + 1 if prediction_type == "v_prediction" else snr)
    assert torch.allclose(w / w[-1], raw / raw[-1], rtol=1e-4)
    assert w[0] < 0.01 * w.max()  # nearly clean timesteps are capped
    assert ddim.loss_weights(t, "uniform") is None
    with pytest.raises(ValueError, match="min_snr"):
        ddim.loss_weights(t, "snr")


def test_stratified_timesteps_cover_the_schedule():
    torch.manual_seed(0)
    ddim = DDIM()
    t = ddim.sample_timesteps(10, "cpu", "stratified")
    assert sorted((t // 100).tolist()) == list(range(10))
    assert ddim.sample_timesteps(64, "cpu").max() < 1000
    with pytest.raises(ValueError, match="stratified"):
        ddim.sample_timesteps(4, "cpu", "sobol")


def test_scheduler_config_is_checked():
    with pytest.raises(ValueError, match="prediction_type"):
        DDIMConfig(prediction_type="sample")
    with pytest.raises(ValueError, match="inversion_iterations"):
        DDIMConfig(inversion_iterations=-1)
    assert DDIMConfig.from_dict({"num_train_timesteps": 1000}).prediction_type == "epsilon"
