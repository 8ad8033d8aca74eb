"""Deterministic DDIM encoding (x0 -> x_t) and decoding (x_t -> x0) around MONAI's DDIMScheduler.

MONAI's ``set_timesteps`` spaces inference timesteps with ``linspace(999, 0)`` while
``step``/``reversed_step`` move by a fixed stride ``T // num_steps``; the two disagree and
inversion indexes past the table. :class:`DDIM` therefore sets evenly spaced timesteps
(``stride * k``) itself, so encode and decode walk exactly the same grid and are each other's
inverse up to the model's error.

``depth`` (0, 1] chooses how far to invert: 1.0 goes to the last inference timestep (the
usual DDIM latent x_T); smaller values stop earlier, leaving more of the image's structure
to the noise code and less to the condition.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Callable, Mapping

import torch
from monai.networks.schedulers import DDIMScheduler

__all__ = ["DDIM", "DDIMConfig", "EpsFn"]

EpsFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (x_t, t) -> predicted noise


@dataclass(frozen=True)
class DDIMConfig:
    """The noise schedule a model is trained and decoded with (saved as ``scheduler`` in a checkpoint)."""

    num_train_timesteps: int = 1000
    beta_start: float = 1e-4
    beta_end: float = 0.02
    schedule: str = "linear_beta"

    def __post_init__(self) -> None:
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
        x = x0
        for t in self.timesteps(num_steps, depth):
            tt = torch.full((x.shape[0],), t, device=x.device, dtype=torch.long)
            x, _ = self.scheduler.reversed_step(eps_fn(x, tt), t, x)
            if progress:
                progress(1)
        return x

    @torch.no_grad()
    def decode(self, eps_fn: EpsFn, x_t: torch.Tensor, num_steps: int = 50, depth: float = 1.0,
               progress: Callable[[int], None] | None = None) -> torch.Tensor:
        """Deterministic DDIM sampling from the latent that :meth:`encode` returns down to x0."""
        self._prepare(num_steps)
        top = self.latent_timestep(num_steps, depth)
        stride = self.num_train_timesteps // num_steps
        x = x_t
        for t in range(top, -1, -stride):
            tt = torch.full((x.shape[0],), t, device=x.device, dtype=torch.long)
            x, _ = self.scheduler.step(eps_fn(x, tt), t, x)
            if progress:
                progress(1)
        return x
