"""Deterministic DDIM encoding (x0 -> x_t) and decoding (x_t -> x0) around MONAI's DDIMScheduler.

MONAI's ``set_timesteps`` spaces inference timesteps with ``linspace(999, 0)`` while
``step``/``reversed_step`` move by a fixed stride ``T // num_steps``; the two disagree and
inversion indexes past the table. :class:`DDIM` therefore sets evenly spaced timesteps
(``stride * k``) itself, so encode and decode walk exactly the same grid and are each other's
inverse up to the model's error.

Decoding ends at the timestep-0 sample, where inversion starts, so the two walk the same k
steps in opposite directions (an extra final denoising step would move every reconstruction by
about sqrt(1 - alpha_0) |eps|, 1/255, and a null intervention applied k times by k times that).

Plain DDIM inversion evaluates the model at the step's start (x_t, t) where decoding evaluates
it at the step's end (x_t+1, t+1), so decode(encode(x)) misses x by the model's change over one
step. ``inversion_iterations`` > 0 solves each inversion step as the fixed point
x_t+1 = F(x_t, eps(x_t+1, t+1)) instead (Pan et al. 2023, "Effective real image editing with
accelerated iterative diffusion inversion"; Garibi et al. 2024, "ReNoise"), which makes decoding
the inverse of inversion up to the iteration's residual, at (1 + iterations) model calls per step.

The model's output is the noise (``prediction_type="epsilon"``) or the velocity
v = sqrt(alpha) eps - sqrt(1 - alpha) x0 (``"v_prediction"``, Salimans & Ho 2022). It is turned into
eps at the (x_t, t) it was computed for, and MONAI's scheduler always steps in eps, so both
prediction types share one exact inversion.

``depth`` (0, 1] chooses how far to invert: 1.0 goes to the last inference timestep (the
usual DDIM latent x_T); smaller values stop earlier, leaving more of the image's structure
to the noise code and less to the condition.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Callable, Literal, Mapping

import torch
from monai.networks.schedulers import DDIMScheduler

__all__ = ["DDIM", "DDIMConfig", "EpsFn", "PREDICTION_TYPES"]

EpsFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (x_t, t) -> the model's output
PREDICTION_TYPES = ("epsilon", "v_prediction")


@dataclass(frozen=True)
class DDIMConfig:
    """The noise schedule a model is trained and decoded with (saved as ``scheduler`` in a checkpoint)."""

    num_train_timesteps: int = 1000
    beta_start: float = 1e-4
    beta_end: float = 0.02
    schedule: str = "linear_beta"
    # What the model predicts. Checkpoints written before the field existed predict eps.
    prediction_type: Literal["epsilon", "v_prediction"] = "epsilon"
    # Fixed-point iterations per inversion step (0: plain DDIM inversion); see the module docstring.
    inversion_iterations: int = 2

    def __post_init__(self) -> None:
        if self.prediction_type not in PREDICTION_TYPES:
            raise ValueError(f"prediction_type must be one of {PREDICTION_TYPES}, got {self.prediction_type!r}")
        if not 0 <= self.inversion_iterations <= 20:
            raise ValueError(f"inversion_iterations must be in [0, 20], got {self.inversion_iterations}")
        if self.num_train_timesteps < 2:
            raise ValueError(f"num_train_timesteps must be at least 2, got {self.num_train_timesteps}")
        if not 0.0 < self.beta_start < self.beta_end < 1.0:
            raise ValueError(f"need 0 < beta_start < beta_end < 1, got {self.beta_start}, {self.beta_end}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "DDIMConfig":
        unknown = set(data) - set(cls.__dataclass_fields__)
        if unknown:
            raise ValueError(f"unknown scheduler settings {sorted(unknown)}")
        return cls(**data)


class DDIM:
    """MONAI's DDIMScheduler with deterministic encode/decode on one timestep grid."""

    def __init__(self, config: DDIMConfig | None = None):
        self.config = config or DDIMConfig()
        self.scheduler = DDIMScheduler(
            num_train_timesteps=self.config.num_train_timesteps,
            schedule=self.config.schedule,
            beta_start=self.config.beta_start,
            beta_end=self.config.beta_end,
            clip_sample=False,  # clipping x0-predictions breaks the exact reversibility of inversion
        )
        self.num_train_timesteps = self.config.num_train_timesteps

    def to(self, device: str | torch.device) -> "DDIM":
        """Move the schedule's tables to ``device`` (where the images are); returns self."""
        s = self.scheduler
        s.alphas_cumprod = s.alphas_cumprod.to(device)
        s.final_alpha_cumprod = s.final_alpha_cumprod.to(device)
        return self

    def add_noise(self, original_samples, noise, timesteps):
        return self.scheduler.add_noise(original_samples=original_samples, noise=noise, timesteps=timesteps)

    def target(self, x0: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """What the model is trained to output for x_t = add_noise(x0, noise, t)."""
        if self.config.prediction_type == "v_prediction":
            return self.scheduler.get_velocity(x0, noise, timesteps)
        return noise

    def snr(self, timesteps: torch.Tensor) -> torch.Tensor:
        """Signal-to-noise ratio alpha_bar / (1 - alpha_bar) at integer timesteps."""
        a = self.scheduler.alphas_cumprod.to(timesteps.device)[timesteps]
        return a / (1 - a)

    def loss_weights(self, timesteps: torch.Tensor, weighting: str = "uniform", snr_gamma: float = 5.0
                     ) -> torch.Tensor | None:
        """Per-sample weights of the denoising loss at ``timesteps``; None for uniform.

        ``"min_snr"``: min-SNR-gamma (Hang et al. 2023, "Efficient diffusion training via min-SNR
        weighting strategy"): min(SNR, gamma) / SNR for eps-prediction, / (SNR + 1) for v-prediction,
        which caps the weight of the nearly clean timesteps whose gradients conflict with the rest.
        Normalised to mean 1 over all timesteps, so the denoising term keeps its scale against the
        KL terms that ``gamma`` weighs.
        """
        if weighting == "uniform":
            return None
        if weighting != "min_snr":
            raise ValueError(f"loss weighting must be 'uniform' or 'min_snr', got {weighting!r}")
        snr = self.snr(torch.arange(self.num_train_timesteps, device=timesteps.device))
        denominator = snr + 1 if self.config.prediction_type == "v_prediction" else snr
        raw = snr.clamp(max=snr_gamma) / denominator
        return (raw / raw.mean())[timesteps]

    def sample_timesteps(self, n: int, device: torch.device | str, sampling: str = "uniform") -> torch.Tensor:
        """Training timesteps for a batch of ``n``. ``"stratified"``: one per equal slice of [0, T)
        (a low-discrepancy draw, as in Kingma et al. 2021's variational diffusion models), which lowers
        the variance of the batch's loss without changing its expectation."""
        T = self.num_train_timesteps
        if sampling == "uniform":
            return torch.randint(0, T, (n,), device=device)
        if sampling != "stratified":
            raise ValueError(f"timestep sampling must be 'uniform' or 'stratified', got {sampling!r}")
        u = (torch.arange(n, device=device) + torch.rand(n, device=device)) / n
        return (u * T).long().clamp(max=T - 1)[torch.randperm(n, device=device)]

    def to_epsilon(self, output: torch.Tensor, x_t: torch.Tensor, t: int) -> torch.Tensor:
        """The noise a model output stands for at (x_t, t)."""
        if self.config.prediction_type == "epsilon":
            return output
        a = self.scheduler.alphas_cumprod[t]
        return a.sqrt() * output + (1 - a).sqrt() * x_t

    def timesteps(self, num_steps: int, depth: float = 1.0) -> list[int]:
        """Ascending timesteps the inversion visits; decoding visits ``[last + stride] + reversed``."""
        if not 1 <= num_steps <= self.num_train_timesteps:
            raise ValueError(f"num_steps must be in [1, {self.num_train_timesteps}], got {num_steps}")
        if not 0.0 < depth <= 1.0:
            raise ValueError(f"depth must be in (0, 1], got {depth}")
        stride = self.num_train_timesteps // num_steps
        k = min(num_steps - 1, max(1, round(depth * num_steps)))  # latent timestep = k * stride
        return [i * stride for i in range(k)]

    def _prepare(self, num_steps: int) -> None:
        self.scheduler.set_timesteps(num_steps)
        stride = self.num_train_timesteps // num_steps
        self.scheduler.timesteps = torch.arange(num_steps - 1, -1, -1) * stride

    def latent_timestep(self, num_steps: int, depth: float = 1.0) -> int:
        ts = self.timesteps(num_steps, depth)
        return ts[-1] + self.num_train_timesteps // num_steps

    @torch.no_grad()
    def encode(self, eps_fn: EpsFn, x0: torch.Tensor, num_steps: int = 50, depth: float = 1.0,
               progress: Callable[[int], None] | None = None) -> torch.Tensor:
        """Deterministic DDIM inversion of x0 to the latent at ``latent_timestep(num_steps, depth)``."""
        self._prepare(num_steps)
        stride = self.num_train_timesteps // num_steps
        x = x0
        for t in self.timesteps(num_steps, depth):
            x_next, _ = self.scheduler.reversed_step(self._eps(eps_fn, x, t), t, x)
            for _ in range(self.config.inversion_iterations):
                # the eps that decoding will use at (x_t+1, t+1), carried back from x_t
                x_next, _ = self.scheduler.reversed_step(self._eps(eps_fn, x_next, t + stride), t, x)
            x = x_next
            if progress:
                progress(1)
        return x

    def _eps(self, eps_fn: EpsFn, x: torch.Tensor, t: int) -> torch.Tensor:
        tt = torch.full((x.shape[0],), t, device=x.device, dtype=torch.long)
        return self.to_epsilon(eps_fn(x, tt), x, t)

    @torch.no_grad()
    def decode(self, eps_fn: EpsFn, x_t: torch.Tensor, num_steps: int = 50, depth: float = 1.0,
               progress: Callable[[int], None] | None = None) -> torch.Tensor:
        """Deterministic DDIM sampling from the latent that :meth:`encode` returns down to x0.
        ``eps_fn`` returns the model's output (eps or v, as the config says)."""
        self._prepare(num_steps)
        top = self.latent_timestep(num_steps, depth)
        stride = self.num_train_timesteps // num_steps
        x = x_t
        for t in range(top, 0, -stride):  # ends at the timestep-0 sample, where inversion starts
            x, _ = self.scheduler.step(self._eps(eps_fn, x, t), t, x)
            if progress:
                progress(1)
        return x
