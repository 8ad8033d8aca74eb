"""The counterfactual pipeline: a trained CausalDiffAE and its DDIM scheduler, as one object.

Shaped like a diffusers pipeline (``pipelines/ddim/pipeline_ddim.py``): the model and the
scheduler are separate objects that the pipeline holds; it loads from a checkpoint, moves to a
device, and one call runs the three steps of a counterfactual (:mod:`cdae_med.counterfactual`)
and returns a typed :class:`CounterfactualOutput`::

    pipe = CounterfactualPipeline.from_checkpoint("runs/pendulum", device="cpu")
    out = pipe(images, {"angle": 20.0}, num_steps=50, reconstruction=True)
    out.images, out.reconstruction, out.factual_values, out.counterfactual_values

Every entry point (command line, evaluation, figures, benchmarks, the scan code and with it the
service's worker) runs counterfactuals through this class, so the guidance mix, the read-out of
values from latents and the device handling exist once.

Guidance (:meth:`CounterfactualPipeline.decode`): eps = eps(x, z_ref) + w (eps(x, z_cf) - eps(x, z_ref))
with z_ref the factual z (``reference="factual"``, default) or the unconditional model
(``"null"``, the paper's classifier-free form). w = 1 is plain conditional decoding. With the
factual reference a null intervention reproduces the inversion exactly for any w, while w > 1
amplifies what the intervention changes. The factual reconstruction, when asked for, is decoded
in the same batch as the counterfactual, from the same noise code, so that their difference is
the intervention's effect with the model's reconstruction error cancelled.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Literal, Mapping

import torch

from .checkpoint import Checkpoint, load_checkpoint
from .confine import confine_change
from .counterfactual import Abduction, abduct, act
from .diffusion import DDIM
from .graph import CausalGraph
from .model import CausalDiffAE
from .runtime import autocast, resolve_device
from .values import parse_values

__all__ = ["CounterfactualPipeline", "CounterfactualOutput", "DEFAULT_CONFINE", "PROCEDURES", "REFERENCES",
           "validate_confine"]

# "ddim": ours (DDIM inversion, descendants recomputed). "original": the paper's public code, kept to
# measure what doing it properly is worth: x_T is fresh Gaussian noise (z is still abducted from the
# image) and an intervention overwrites its block without recomputing the descendants.
PROCEDURES = ("ddim", "original")
REFERENCES = ("factual", "null")
# The share of an image's largest change below which a counterfactual keeps the input's pixels
# (cdae_med.confine), where the command line and training's evaluation confine: the lowest image
# error of 0.2 / 0.35 / 0.5 on Pendulum (docs/design-notes.md, "Confining the change").
DEFAULT_CONFINE = 0.35
Progress = Callable[[int], None]


def validate_confine(model: CausalDiffAE, confine: float) -> None:
    """Raises where ``model`` cannot be decoded with ``confine`` (:meth:`CounterfactualPipeline.decode`): a
    share outside (0, 1), or a model with a first stage, whose change is realised on the scan itself."""
    if not confine:
        return
    if not 0.0 < confine < 1.0:
        raise ValueError(f"confine must be 0 (off) or in (0, 1), got {confine}")
    if model.first_stage is not None:
        raise ValueError("confine keeps the change where the decoded image changes; a model with a first "
                         "stage (the brain model) realises its change on the scan itself, so confine does "
                         "not apply to it")


def _where_changed(abduction: Abduction, z_cf: torch.Tensor, changed: torch.Tensor,
                   unchanged: torch.Tensor) -> torch.Tensor:
    """Per sample, ``changed`` where ``z_cf`` differs from the factual latents, ``unchanged`` where the
    intervention left them (a null intervention)."""
    differs = (z_cf != abduction.z).flatten(1).any(1)
    return torch.where(differs.view(-1, *([1] * (changed.ndim - 1))), changed, unchanged)


@dataclass
class CounterfactualOutput:
    """What one pipeline call returns; images in the model's range [-1, 1], values in own units."""

    images: torch.Tensor  # (B, C, *spatial) counterfactuals
    reconstruction: torch.Tensor | None  # (B, C, *spatial) factual reconstructions, if asked for
    factual_values: torch.Tensor  # (B, n) values read from the factual latents (given ones exact)
    counterfactual_values: torch.Tensor  # (B, n) values read from the counterfactual latents
    z: torch.Tensor  # (B, n, d) counterfactual latents
    abduction: Abduction
    # under a first stage: its decoded coefficients (counterfactual, reconstruction or None)
    latents: tuple[torch.Tensor, torch.Tensor | None] | None = None

    def values(self, graph: CausalGraph, i: int, which: Literal["factual", "counterfactual"] = "counterfactual"
               ) -> dict[str, float]:
        """Sample ``i``'s values as a mapping variable -> value."""
        t = self.factual_values if which == "factual" else self.counterfactual_values
        return dict(zip(graph.names, t[i].tolist()))


class CounterfactualPipeline:
    """Abduction, action and prediction with a CausalDiffAE (see the module docstring)."""

    def __init__(self, model: CausalDiffAE, scheduler: DDIM | None = None, checkpoint: Checkpoint | None = None):
        self.model = model.eval()
        self.scheduler = scheduler or DDIM()
        self.checkpoint = checkpoint
        self.scheduler.to(self.device)

    @classmethod
    def from_checkpoint(cls, path: str | Path, device: str | torch.device = "auto") -> "CounterfactualPipeline":
        """Load a checkpoint directory (:mod:`cdae_med.checkpoint`) onto ``device`` (auto, cpu, cuda)."""
        dev = device if isinstance(device, torch.device) else resolve_device(device)
        ckpt = load_checkpoint(path, map_location=dev)
        return cls(ckpt.model, DDIM(ckpt.scheduler), ckpt).to(dev)

    def to(self, device: str | torch.device) -> "CounterfactualPipeline":
        self.model.to(device)
        self.scheduler.to(device)
        return self

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def default_confine(self) -> float:
        """:data:`DEFAULT_CONFINE` for a model that decodes images, 0 (off) for one with a first stage,
        whose change is realised on the scan by its own code (pipelines.scans)."""
        return DEFAULT_CONFINE if self.model.first_stage is None else 0.0

    @property
    def graph(self) -> CausalGraph:
        return self.model.graph

    # --- the steps ------------------------------------------------------------------------
    @torch.no_grad()
    def abduct(self, images: torch.Tensor, observed: Mapping[str, torch.Tensor] | None = None,
               num_steps: int = 50, depth: float = 1.0, procedure: str = "ddim",
               generator: torch.Generator | None = None, progress: Progress | None = None) -> Abduction:
        """u, z and the noise code of ``images`` (B, C, *spatial) in [-1, 1]. ``observed`` maps a
        variable to its known factual values (B,) in own units, NaN where unknown."""
        if procedure not in PROCEDURES:
            raise ValueError(f"procedure must be one of {PROCEDURES}, got {procedure!r}")
        images = images.to(self.device)
        with autocast(self.device):
            if procedure == "original":
                x = self.model.to_latent(images)
                u, _ = self.model.encode(x)
                noise = torch.randn(x.shape, generator=generator, dtype=torch.float32)
                return Abduction(u=u, z=self.model.causal(u), x_t=noise.to(x.device, x.dtype),
                                 num_steps=num_steps, depth=depth, images=images)
            return abduct(self.model, self.scheduler, images, num_steps, depth, progress, observed=observed)

    @torch.no_grad()
    def act(self, abduction: Abduction, interventions: Mapping[str, object], propagate: bool = True) -> torch.Tensor:
        """The counterfactual z under ``interventions`` (scalars or one value per sample, own units)."""
        checked = parse_values(self.graph, interventions, allow_empty=False, n=abduction.u.shape[0])
        return self._act(abduction, checked, propagate)

    def _act(self, abduction: Abduction, checked: Mapping[str, object], propagate: bool) -> torch.Tensor:
        return act(self.model, abduction, {k: torch.as_tensor(v) for k, v in checked.items()}, propagate)

    @torch.no_grad()
    def decode(self, abduction: Abduction, z_cf: torch.Tensor, guidance: float = 1.0,
               reference: str = "factual", reconstruction: bool = False,
               progress: Progress | None = None, hold: int = 0,
               confine: float = 0.0) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Decode the noise code under ``z_cf`` (and, with ``reconstruction``, under the factual z in
        the same batch). Returns (counterfactuals, reconstructions or None), float32 in [-1, 1].
        ``hold``: rounds of holding the variables the intervention leaves (:meth:`decode_latents`).
        ``confine`` in (0, 1): the change is kept only where it reaches that fraction of the image's
        largest change, the input's own pixels elsewhere (:mod:`cdae_med.confine`); 0 keeps it all."""
        self.check_confine(confine)
        if confine and abduction.images is None:
            raise ValueError("confine needs the input images: abduct them with this pipeline")
        cf, rec = self.to_images(*self.decode_latents(abduction, z_cf, guidance, reference, reconstruction,
                                                      progress, hold))
        if confine:
            cf = self._confine(abduction, z_cf, cf, confine)
        return cf, rec

    def resolve_confine(self, confine: float | None) -> float:
        """``confine``, or :attr:`default_confine` where it is None, checked (:meth:`check_confine`)."""
        confine = self.default_confine if confine is None else confine
        self.check_confine(confine)
        return confine

    def check_confine(self, confine: float) -> None:
        """Before any decoding: :func:`validate_confine` for this pipeline's model."""
        validate_confine(self.model, confine)

    def _confine(self, abduction: Abduction, z_cf: torch.Tensor, cf: torch.Tensor, confine: float) -> torch.Tensor:
        images = abduction.images.to(cf.device, cf.dtype)
        # a sample whose latents the intervention left is its input
        return _where_changed(abduction, z_cf, confine_change(images, cf, confine)[0], images)

    @torch.no_grad()
    def decode_latents(self, abduction: Abduction, z_cf: torch.Tensor, guidance: float = 1.0,
                       reference: str = "factual", reconstruction: bool = False,
                       progress: Progress | None = None, hold: int = 0) -> tuple[torch.Tensor, torch.Tensor | None]:
        """:meth:`decode` in the diffusion's space (the images, or a first stage's coefficients).

        ``hold`` > 0: the variables whose latents the intervention leaves as they were (neither intervened
        on nor descendants) are held at their factual values. The model's own encoder reads them off the
        decoded counterfactual, each such block of the condition is shifted by what the read-out is off,
        and the code is decoded again, ``hold`` times. Where a descendant is a function of its parents
        (Pendulum's shadow), no training image shows it disagree with them, and a decoder asked for a new
        shadow changes the pendulum and the light as well; the condition's shift takes back what the encoder
        reads of that (docs/design-notes.md, "Interventions on descendants"). Each round costs one more
        decoding, which ``progress`` does not count."""
        if hold < 0:
            raise ValueError(f"hold must be >= 0 rounds, got {hold}")
        cf, rec = self._decode_latents(abduction, z_cf, guidance, reference, reconstruction, progress)
        held = (z_cf == abduction.z).flatten(2).all(2)  # (B, n): blocks the intervention left
        changed = ~held.all(1)  # a null intervention stays the decoded code itself
        held = held & changed[:, None]
        if not hold or not held.any():
            return cf, rec
        model = self.model
        factual = model.latent_to_label(abduction.z)
        condition, first = z_cf, cf
        for _ in range(hold):
            with autocast(self.device):
                read = model.latent_to_label(model.causal_latents(cf)).float()
            condition = condition + ((factual - read) * held).unsqueeze(-1).to(condition.dtype)
            cf, _ = self._decode_latents(abduction, condition, guidance, reference, False, None)
        return _where_changed(abduction, z_cf, cf, first), rec

    def _decode_latents(self, abduction: Abduction, z_cf: torch.Tensor, guidance: float, reference: str,
                        reconstruction: bool, progress: Progress | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        if reference not in REFERENCES:
            raise ValueError(f"reference must be 'factual' or 'null', got {reference!r}")
        if not 0.0 <= guidance <= 20.0:
            raise ValueError(f"guidance must be in [0, 20], got {guidance}")
        eps = self._guided_eps(z_cf, abduction.z, guidance, reference, reconstruction)
        x_t = torch.cat([abduction.x_t, abduction.x_t]) if reconstruction else abduction.x_t
        with autocast(self.device):
            out = self.scheduler.decode(eps, x_t, abduction.num_steps, abduction.depth, progress).float()
        if reconstruction:
            cf, rec = out.chunk(2)
            # A sample whose latents did not change is its reconstruction bit for bit (the two halves
            # of a batch can differ in the last float bits), so a null intervention changes nothing.
            return _where_changed(abduction, z_cf, cf, rec), rec
        return out, None

    def to_images(self, cf: torch.Tensor, rec: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Decoded latents (:meth:`decode_latents`) -> images, float32 in [-1, 1]."""
        def image(x):
            # Images live in [-1, 1]; out-of-range values would be amplified by a next inversion (see
            # the composition figures in benchmarks/results/paper_tables.md).
            with autocast(self.device):
                return self.model.from_latent(x).clamp(-1, 1).float()

        return image(cf), None if rec is None else image(rec)

    def _guided_eps(self, z_cf: torch.Tensor, z: torch.Tensor, guidance: float, reference: str,
                    reconstruction: bool):
        """eps(x, t) for the batch [counterfactual] or [counterfactual; reconstruction], every
        condition of a step in one batched denoiser call."""
        b = z_cf.shape[0]
        conds, keeps = [z_cf], [z_cf.new_ones(b)]
        if guidance != 1.0:
            conds.append(z if reference == "factual" else torch.zeros_like(z_cf))
            keeps.append(z_cf.new_full((b,), float(reference == "factual")))
        if reconstruction:
            conds.append(z)
            keeps.append(z_cf.new_ones(b))
        z_all, keep_all = torch.cat(conds), torch.cat(keeps)
        n_cf = 2 if guidance != 1.0 else 1
        model = self.model

        def eps(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            x_cf, t_cf = x[:b], t[:b]
            xs, ts = [x_cf] * n_cf, [t_cf] * n_cf
            if reconstruction:
                xs.append(x[b:])
                ts.append(t[b:])
            e = model.denoise(torch.cat(xs), torch.cat(ts), z_all, keep_all).chunk(len(xs))
            e_cf = e[0] if n_cf == 1 else e[1] + guidance * (e[0] - e[1])
            return torch.cat([e_cf, e[-1]]) if reconstruction else e_cf

        return eps

    def read_values(self, z: torch.Tensor) -> torch.Tensor:
        """(B, n, d) latents -> (B, n) values in each variable's own units."""
        return self.graph.denormalise(self.model.latent_to_label(z).float())

    # --- all three ---------------------------------------------------------------------------
    @torch.no_grad()
    def __call__(self, images: torch.Tensor, interventions: Mapping[str, object],
                 observed: Mapping[str, torch.Tensor] | None = None, num_steps: int = 50, depth: float = 1.0,
                 guidance: float = 1.0, reference: str = "factual", reconstruction: bool = False,
                 procedure: str = "ddim", generator: torch.Generator | None = None,
                 progress: Progress | None = None, confine: float = 0.0) -> CounterfactualOutput:
        """Counterfactuals of ``images`` (B, C, *spatial) in [-1, 1] under ``interventions``;
        ``confine`` as in :meth:`decode`."""
        # checked before the costly steps, once
        checked = parse_values(self.graph, interventions, allow_empty=False, n=images.shape[0])
        self.check_confine(confine)
        ab = self.abduct(images, observed, num_steps, depth, procedure, generator, progress)
        z_cf = self._act(ab, checked, propagate=procedure == "ddim")
        latents = self.decode_latents(ab, z_cf, guidance, reference, reconstruction, progress)
        cf, rec = self.to_images(*latents)
        if confine:
            cf = self._confine(ab, z_cf, cf, confine)
        if self.model.spread is not None and procedure == "ddim":
            # the subject's deviation from the cohort's mean, scaled by the spread's ratio (VoxelSpread)
            spread = self.model.spread.change(images.to(cf.device), self.model.latent_to_label(ab.z),
                                              self.model.latent_to_label(z_cf))
            cf = (cf + spread).clamp(-1, 1)
        return CounterfactualOutput(images=cf, reconstruction=rec, factual_values=self.read_values(ab.z),
                                    counterfactual_values=self.read_values(z_cf), z=z_cf, abduction=ab,
                                    latents=latents if self.model.first_stage is not None else None)
