"""Counterfactuals of NIfTI scans: one scan or a thousand.

For each scan: preprocessing onto the model's grid (:mod:`pipelines.mri`), abduction (with the
factual values the user knows as given covariates, the rest estimated from the image), the
action, and decoding of both the counterfactual and the factual reconstruction in one batch.
The output is the input scan plus the change the intervention causes,
``input + inverse_preprocessing(counterfactual - reconstruction)``: the patient's own
full-resolution detail is kept, the model's reconstruction error cancels, and a null
intervention returns the input exactly. The change is carried back onto the input's grid by
the inverse of the spatial preprocessing, so every output overlays the input.

Outputs per scan: ``counterfactual.nii.gz``, ``difference.nii.gz`` (counterfactual - input),
``preview.png`` (axial, coronal and sagittal slices of input, counterfactual, difference) and
``report.json``. No header field of the input is copied (see :mod:`cdae_med.io`).
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping

import numpy as np
import torch

from cdae_med import __version__
from cdae_med.checkpoint import FORMAT_VERSION, CheckpointError, load_checkpoint
from cdae_med.diffusion import DDIM
from cdae_med.io import PREVIEW_DIFFERENCE_SCALE, NiftiError, ScanLimits, nifti_limits, write_nifti
from cdae_med.pipeline import CounterfactualPipeline
from cdae_med.runtime import optimise_for_device, resolve_device
from cdae_med.values import parse_values

from .mri import (Preprocessing, PreparedScan, from_slices, prepare, reference_mask,
                  spatial_transforms, to_slices)
from .anatomy import ANATOMICAL_REALISATIONS, AnatomicalRealisation
from .realisation import REALISATIONS, RESIDUALS, carry_change, deformation_change, model_deformation
from .registration import Reference, RegistrationError

__all__ = ["ScanError", "ScanModel", "OUTPUT_FILES", "orthogonal_preview"]

log = logging.getLogger("cdae_med")

# The graph's volumes the anatomical realisation puts on the scan (pipelines.anatomy.AnatomicalRealisation).
ANATOMY_VOLUMES = ("brain_volume", "ventricle_volume")
OUT_OF_RANGE = ("flag", "refuse")  # what an intervention outside the training range gets
OUTPUT_FILES = ("counterfactual.nii.gz", "difference.nii.gz", "preview.png", "report.json")


class ScanError(ValueError):
    """A scan that cannot be processed; the message names the file."""


@dataclass
class _Result:
    counterfactual: np.ndarray  # input grid, input units
    difference: np.ndarray
    factual: dict[str, float]
    values: dict[str, float]
    realised: dict | None = None  # what the anatomical realisation did (AnatomicalRealisation)


class ScanModel:
    """A checkpoint loaded once for many scans (a worker process keeps one)."""

    def __init__(self, checkpoint, device: torch.device, num_steps: int = 50, depth: float | None = None,
                 guidance: float = 1.0, limits: ScanLimits | None = None, out_of_range: str = "flag",
                 realisation: str | None = None, residual: str | None = None):
        if out_of_range not in OUT_OF_RANGE:
            raise ValueError(f"out_of_range must be one of {OUT_OF_RANGE}, got {out_of_range!r}")
        self.out_of_range = out_of_range
        # How the change reaches the scan (pipelines.realisation); a checkpoint may name its own default.
        realisation = realisation or checkpoint.image.get("realisation", "intensity")
        if realisation not in REALISATIONS:
            raise ValueError(f"realisation must be one of {REALISATIONS}, got {realisation!r}")
        self.realisation = realisation
        # How the intensity part of the change reaches the scan: upsampled, or onto the scan's own tissue
        # boundaries (pipelines.realisation.onto_tissue); a checkpoint may name its own default.
        residual = residual or checkpoint.image.get("residual", "upsampled")
        if residual not in RESIDUALS:
            raise ValueError(f"residual must be one of {RESIDUALS}, got {residual!r}")
        self.residual = residual
        # How far from the head's surface a deformation may move tissue (pipelines.realisation.head_weight).
        self.inset_mm = float(checkpoint.image.get("deformation_inset_mm", 0.0))
        if not self.inset_mm >= 0.0:
            raise CheckpointError(f"{checkpoint.path}: image.deformation_inset_mm must be a distance >= 0 mm, "
                                  f"got {self.inset_mm}")
        # The values the model was trained on (checkpoints from before the record have none).
        self.training_ranges = {k: tuple(v) for k, v in checkpoint.image.get("training_ranges", {}).items()}
        self.checkpoint = checkpoint
        model = optimise_for_device(checkpoint.model.to(device).eval(), device)
        self.pipeline = CounterfactualPipeline(model, DDIM(checkpoint.scheduler), checkpoint).to(device)
        log.info("scan model on %s, %s", device, "bf16 autocast" if device.type == "cuda" else "fp32")
        self.graph = model.graph
        self.device = device
        if not 0.0 < guidance <= 20.0:
            raise ValueError(f"guidance must be in (0, 20], got {guidance}")
        # The inversion depth: a checkpoint may name the one measured best for it (the shipped brain model,
        # pipelines/models/brain/README.md); 1.0, the full DDIM inversion, where it names none.
        depth = float(checkpoint.image.get("depth", 1.0)) if depth is None else depth
        if not 0.0 < depth <= 1.0:
            raise ValueError(f"depth must be in (0, 1], got {depth}")
        self.num_steps, self.depth, self.guidance = num_steps, depth, guidance
        self.limits = limits or ScanLimits()  # the largest scan read, checked on its header before resampling
        prep = checkpoint.image.get("preprocessing")
        if prep is None:
            raise CheckpointError(f"{checkpoint.path} was trained on {checkpoint.dataset!r} images, not on scans: "
                                  "it has no MRI preprocessing record")
        self.preprocessing = Preprocessing.from_dict(prep)
        # MONAI's spatial steps, built once; a registered model resamples through its registration instead
        self.spatial = spatial_transforms(self.preprocessing) if self.preprocessing.registration is None else None
        # A registered model works in its reference's space, where its reference's head is the mask.
        self.reference = self.mask = None
        if self.preprocessing.registration is not None:
            try:
                self.reference = Reference.load(checkpoint.path)
            except (OSError, ValueError, NiftiError) as err:
                raise CheckpointError(f"{checkpoint.path}: this model registers scans to its reference, "
                                      f"which cannot be read: {err}") from None
            self.mask = reference_mask(self.reference, self.preprocessing)
        if self.realisation != "intensity" and self.reference is None:
            raise ValueError(f"realisation {self.realisation!r} needs a registered model (its change is found in "
                             "reference space); this one is not registered")
        self.anatomy = None
        if self.realisation in ANATOMICAL_REALISATIONS:
            missing = [n for n in ANATOMY_VOLUMES if n not in self.graph.names]
            if missing:
                raise ValueError(f"realisation {self.realisation!r} realises the graph's {' and '.join(ANATOMY_VOLUMES)}; "
                                 f"this model's graph has no {', '.join(missing)}")
            self.anatomy = AnatomicalRealisation(self.reference, self.preprocessing, self.mask, self.realisation)

    @property
    def model_kind(self) -> str:
        cfg = self.checkpoint.model.config
        kind = "3D" if self.preprocessing.slice_axis is None else "2D slice-wise"
        if cfg.latent_shape_components:
            kind = (f"{kind}, diffusion on {cfg.latent_shape_components} principal components of the displacement "
                    f"from the template and {cfg.latent_components} of the intensity residual")
        elif cfg.latent_components:
            kind = f"{kind}, diffusion on {cfg.latent_components} principal components"
        spread = self.pipeline.model.spread
        if spread is not None:
            kind += f"; each voxel's spread in {', '.join(self.graph.names[r] for r in spread.roots)}"
        return kind

    @property
    def decodes_deformation(self) -> bool:
        """Whether the model's first stage codes shape, so that it decodes the deformation of its change
        itself (a 3D model; a slice-wise one's displacements are per slice, and its deformation is fitted)."""
        return bool(self.checkpoint.model.config.latent_shape_components) and self.preprocessing.slice_axis is None

    @classmethod
    def load(cls, checkpoint_dir, device: str = "auto", num_steps: int = 50, depth: float | None = None,
             guidance: float = 1.0, limits: ScanLimits | None = None, out_of_range: str = "flag",
             realisation: str | None = None, residual: str | None = None) -> "ScanModel":
        dev = resolve_device(device)
        return cls(load_checkpoint(checkpoint_dir, map_location=dev), dev, num_steps, depth, guidance, limits,
                   out_of_range, realisation, residual)

    # --- inputs ------------------------------------------------------------------------
    def interventions(self, do: Mapping[str, float | str]) -> dict[str, float]:
        """Checked interventions; with ``out_of_range="refuse"`` one outside the training range is an error."""
        values = parse_values(self.graph, do, what="interventions", allow_empty=False)
        outside = self.outside_training(values)
        if outside and self.out_of_range == "refuse":
            raise ScanError("; ".join(f"do({n}={values[n]:g}) is outside the values this model was trained on "
                                      f"[{lo:g}, {hi:g}] {self.graph[n].unit}".rstrip() for n, (lo, hi) in outside.items())
                            + " (out_of_range=refuse)")
        return values

    def outside_training(self, values: Mapping[str, float]) -> dict[str, tuple[float, float]]:
        """The variables whose value lies outside the training range, with that range."""
        return {n: self.training_ranges[n] for n, v in values.items()
                if n in self.training_ranges and not self.training_ranges[n][0] <= v <= self.training_ranges[n][1]
                and not self.graph[n].binary}

    def covariates(self, given: Mapping[str, float | str] | None) -> dict[str, float]:
        return parse_values(self.graph, given, what="covariates")

    def prepare(self, path) -> PreparedScan:
        try:
            with nifti_limits(self.limits):  # read_nifti in pipelines.mri applies them
                return prepare(path, self.preprocessing, self.spatial, reference=self.reference, mask=self.mask)
        except (NiftiError, RegistrationError) as err:  # their messages name the file
            raise ScanError(str(err)) from None
        except ValueError as err:
            raise ScanError(f"{Path(path).name}: {err}") from None

    # --- inference -----------------------------------------------------------------------
    @torch.no_grad()
    def _infer(self, prepared: list[PreparedScan], do: dict[str, float], covariates: list[dict[str, float]],
               progress: Callable[[float], None] | None = None) -> list[_Result]:
        graph, b = self.graph, len(prepared)
        volumes = np.stack([p.image for p in prepared])  # (B, 1, X, Y, Z)
        axis = self.preprocessing.slice_axis
        # A slice-wise model sees each scan as a batch of slices, every slice with the scan's values.
        per = volumes.shape[2 + axis] if axis is not None else 1
        x = volumes if axis is None else np.moveaxis(to_slices(np.moveaxis(volumes, 1, -1), axis), -1, 1)
        x0 = torch.from_numpy(np.ascontiguousarray(x)).to(self.device) * 2.0 - 1.0
        # The model's values: the graph's volumes in its reference space (Preprocessing.volume_factor).
        factor = np.array([self.preprocessing.volume_factor(p.registration.volume_ratio)
                           if p.registration is not None else 1.0 for p in prepared])
        scale = np.array([factor if n in self.preprocessing.volume_variables else np.ones(b) for n in graph.names]).T
        observed = {name: torch.tensor([c.get(name, float("nan")) * scale[i, graph.index(name)]
                                        for i, c in enumerate(covariates)], dtype=torch.float32).repeat_interleave(per)
                    for name in graph.names if any(name in c for c in covariates)}
        # (within the graph's declared range, which only the far edges of a valid value could leave)
        do = {name: torch.tensor(np.clip(v * scale[:, graph.index(name)], graph[name].low, graph[name].high)).repeat_interleave(per)
              if name in self.preprocessing.volume_variables else v for name, v in do.items()}
        total, done = 2 * len(self.pipeline.scheduler.timesteps(self.num_steps, self.depth)), 0

        def tick(_n: int = 1) -> None:
            nonlocal done
            done += 1
            if progress:
                progress(min(1.0, done / total))

        # Counterfactual and factual reconstruction decoded in one batch: their difference is the
        # intervention's effect with the reconstruction error cancelled.
        out = self.pipeline(x0, do, observed=observed, num_steps=self.num_steps, depth=self.depth,
                            guidance=self.guidance, reconstruction=True, progress=tick)
        first_stage = self.pipeline.model.first_stage
        if getattr(first_stage, "scores", None) is not None and axis is None:
            # A first stage on the voxels' scores: the change shifts the scan's own scores (LinearAutoencoder.change).
            with torch.no_grad():
                change = (first_stage.change(x0.float(), out.latents[1].float(), out.latents[0].float()).clamp(-2, 2)
                          / 2.0).cpu().numpy()
        else:
            change = ((out.images - out.reconstruction) / 2.0).cpu().numpy()  # [-1, 1] -> the [0, 1] window units
        reconstruction = ((out.reconstruction + 1.0) / 2.0).cpu().numpy()
        # A first stage that codes shape decodes the displacement the change moves tissue by.
        shape_coded = self.decodes_deformation and out.latents is not None
        if shape_coded and self.realisation == "deformation":
            displacements = [first_stage.displacement(c.float()).cpu().numpy() for c in (out.latents[1], out.latents[0])]
        factual = out.factual_values.cpu().numpy().astype(np.float64)
        values = out.counterfactual_values.cpu().numpy().astype(np.float64)
        if axis is not None:
            change = np.moveaxis(from_slices(np.moveaxis(change, 1, -1), b, axis), -1, 1)
            # A scan's values: the slices' estimates weighted by how much head each slice shows.
            weight = (x.reshape(b, per, -1) > 0.1).mean(-1) + 1e-6
            weight = weight / weight.sum(1, keepdims=True)
            factual = np.einsum("bs,bsn->bn", weight, factual.reshape(b, per, -1))
            values = np.einsum("bs,bsn->bn", weight, values.reshape(b, per, -1))
        factual, values = factual / scale, values / scale  # back to the scan's own volumes
        results = []
        for i, p in enumerate(prepared):
            # The intervention changes the head, not the air around it: decoding noise there would
            # otherwise add intensity to every background voxel and skew any volume read from the output.
            where = self.mask if self.mask is not None else head_mask(p.image[0])
            realised = None
            if self.anatomy is not None:
                brain_change, ventricle_change = (float(values[i, graph.index(n)] - factual[i, graph.index(n)])
                                                  for n in ANATOMY_VOLUMES)
                if change[i].any() or brain_change or ventricle_change:
                    diff, realised = self.anatomy(p, change[i, 0] * where, brain_change, ventricle_change,
                                                  self.residual)
                else:  # nothing changes: the input itself
                    diff = np.zeros_like(p.scan.data)
            elif self.realisation == "deformation" and change[i].any():
                decided = None if not shape_coded else model_deformation(
                    displacements[0][i], displacements[1][i], p.prep.grid_affine, where, inset_mm=self.inset_mm)
                diff = deformation_change(p, reconstruction[i, 0], change[i, 0], where, decided, self.inset_mm,
                                          self.residual)
            else:
                diff = carry_change(p, change[i] * where, self.residual)
            results.append(_Result(counterfactual=p.scan.data + diff, difference=diff,
                                   factual=dict(zip(graph.names, factual[i].tolist())),
                                   values=dict(zip(graph.names, values[i].tolist())), realised=realised))
        if progress:
            progress(1.0)
        return results

    def _report(self, p: PreparedScan, r: _Result, do: dict[str, float], given: dict[str, float],
                seconds: float) -> dict:
        graph = self.graph
        roles = graph.roles(do)
        factual = {}
        for n in graph.names:
            entry = {"value": given.get(n, r.factual[n]), "unit": graph[n].unit,
                     "source": "given" if n in given else "estimated from the image"}
            if graph[n].binary and n not in given:
                # A binary estimate is reported as its nearest level, with the model's raw value beside it.
                entry["value"], entry["raw_estimate"] = float(round(min(1.0, max(0.0, r.factual[n])))), r.factual[n]
            factual[n] = entry
        counterfactual = {}
        for n, role in roles.items():
            value = do[n] if n in do else factual[n]["value"] if role == "unchanged" else r.values[n]
            if graph[n].binary:
                value = float(round(min(1.0, max(0.0, value))))
            counterfactual[n] = {"value": value, "unit": graph[n].unit, "role": role}
        ck = self.checkpoint
        warnings = []
        for n, (lo, hi) in self.outside_training({k: e["value"] for k, e in factual.items()}).items():
            factual[n]["outside_training_range"] = True
            warnings.append(f"factual {n} = {factual[n]['value']:.4g} is outside the training range [{lo:g}, {hi:g}]"
                            f"{' (' + factual[n]['source'] + ')' if factual[n]['source'] != 'given' else ''}")
        for n, (lo, hi) in self.outside_training(do).items():
            counterfactual[n]["outside_training_range"] = True
            warnings.append(f"do({n}={do[n]:g}) is outside the training range [{lo:g}, {hi:g}]: the model extrapolates")
        reg = p.registration
        floor = ck.image.get("registration_correlation_p01")
        if reg is not None and floor is not None and reg.correlation < floor:
            warnings.append(f"the scan matches the model's reference less well (correlation {reg.correlation:.2f}) "
                            f"than 99 % of the training scans ({floor:.2f}): unlike the cohort")
        registration = None if reg is None else {
            "transform": self.preprocessing.registration, "correlation_with_reference": round(reg.correlation, 4),
            "volume_ratio": round(reg.volume_ratio, 4),
            "field_of_view_coverage": round(reg.coverage, 4),
            "reference_to_scan_ras": [[round(v, 5) for v in row] for row in reg.matrix_ras.tolist()]}
        return {
            "input": {"file": p.scan.name, "shape": list(p.scan.data.shape),
                      "spacing_mm": [round(s, 4) for s in p.scan.spacing]},
            **({"registration": registration} if registration else {}),
            "warnings": warnings,
            "interventions": do,
            "factual": factual,
            "counterfactual": counterfactual,
            "model": {"checkpoint": str(ck.path), "dataset": ck.dataset, "training_steps": ck.step,
                      "graph": list(graph.names), "format_version": FORMAT_VERSION, "cdae_med_version": __version__},
            "settings": {"ddim_steps": self.num_steps, "depth": self.depth, "guidance": self.guidance,
                         "realisation": self.realisation, "residual": self.residual,
                         **({"deformation_inset_mm": self.inset_mm} if self.realisation == "deformation" else {}),
                         "model_kind": self.model_kind,
                         "preprocessing": self.preprocessing.to_dict(),
                         "output": self._output_description(registered=reg is not None)
                                   + (", the intensity change moved onto the scan's tissue boundaries"
                                      if self.residual == "tissue" else "")},
            **({"realised": r.realised} if r.realised is not None else {}),
            "files": list(OUTPUT_FILES),
            "seconds": round(seconds, 3),
        }

    def _write(self, out_dir: Path, p: PreparedScan, r: _Result, report: dict) -> None:
        out_dir.mkdir(parents=True, exist_ok=True)
        # The counterfactual keeps the input's data type and space codes; the difference is signed: float32.
        write_nifti(out_dir / "counterfactual.nii.gz", r.counterfactual, p.scan.affine, like=p.scan)
        write_nifti(out_dir / "difference.nii.gz", r.difference, p.scan.affine)
        orthogonal_preview(p.scan.data, r.counterfactual, r.difference, p.scan.affine).save(out_dir / "preview.png")
        # The report goes last: its presence marks a finished subject for a resumed batch.
        tmp = out_dir / ".report.json.partial"
        tmp.write_text(json.dumps(report, indent=2) + "\n")
        tmp.replace(out_dir / "report.json")

    def _output_description(self, registered: bool) -> str:
        """What the counterfactual file is, in the report's words, for this realisation."""
        if self.realisation == "atrophy":
            return ("input + the model's intensity change around the ventricles and half of it elsewhere, the rest "
                    "of its brain-volume change made on the subject's own cortex (tissue turned into CSF where CSF is "
                    "near, or the reverse), through the inverse registration")
        if self.anatomy is not None:
            rest = (" (in full around them, half of it further out), the rest of its brain-volume change made on the "
                    "subject's own cortex" if self.realisation == "volumes" else "")
            return ("input with its ventricles grown by the model's ventricle-volume change (a push of the tissue "
                    f"around them) and the model's intensity change elsewhere{rest}, through the inverse registration")
        if self.realisation == "deformation":
            how = "decoded by the model" if self.decodes_deformation else "fitted by demons"
            return ("input warped by the deformation that carries the reconstruction onto the counterfactual "
                    f"({how}), plus its residual, through the inverse registration")
        return ("input + (counterfactual - reconstruction) carried back through the inverse "
                + ("registration" if registered else "preprocessing"))

    def run(self, input_path, do: Mapping[str, float | str], out_dir, covariates: Mapping | None = None,
            progress: Callable[[float], None] | None = None) -> dict:
        """Counterfactual of one scan under ``do``; writes :data:`OUTPUT_FILES` to ``out_dir``."""
        t0 = time.perf_counter()
        do = self.interventions(do)
        given = self.covariates(covariates)
        p = self.prepare(input_path)
        r = self._infer([p], do, [given], progress)[0]
        report = self._report(p, r, do, given, time.perf_counter() - t0)
        self._write(Path(out_dir), p, r, report)
        return report


def head_mask(image: np.ndarray, threshold: float = 0.02, margin: int = 1) -> np.ndarray:
    """Voxels of the head on the model grid ([0, 1] window units), grown by ``margin`` voxels so
    that a growing brain may move into the CSF at its edge."""
    from scipy.ndimage import binary_dilation

    return binary_dilation(image > threshold, iterations=margin).astype(np.float32)


def orthogonal_preview(image: np.ndarray, counterfactual: np.ndarray, difference: np.ndarray,
                       affine: np.ndarray, cell_px: int = 160):
    """PNG of the middle axial, coronal and sagittal slices (rows) of input, counterfactual and
    difference (columns), shown in RAS whatever the file's voxel order; the difference in red
    (brighter in the counterfactual) and blue (darker) on the fixed scale
    :data:`cdae_med.io.PREVIEW_DIFFERENCE_SCALE`, drawn as a labelled colour bar under the grid."""
    import nibabel as nib
    from PIL import Image, ImageDraw

    from .figures import image_grid

    ornt = nib.orientations.io_orientation(affine)
    vols = [nib.orientations.apply_orientation(v, ornt) for v in (image, counterfactual, difference)]
    lo, hi = np.percentile(vols[0], (0.5, 99.5))
    scale = PREVIEW_DIFFERENCE_SCALE * max(float(hi - lo), 1e-12)

    def grey(s):
        return (np.clip((s - lo) / max(hi - lo, 1e-12), 0, 1) * 255).astype(np.uint8)[..., None].repeat(3, -1)

    def signed(s, anatomy=None):
        # tinted over a faint copy of the input, so that a change is seen where it lies
        t = np.clip(s / scale, -1, 1)
        faint = 0.0 if anatomy is None else 70.0 * np.clip((anatomy - lo) / max(hi - lo, 1e-12), 0, 1)
        rgb = np.repeat((255.0 - faint * (1 - np.abs(t)))[..., None], 3, -1)
        rgb[..., 1] -= 255 * np.abs(t)
        rgb[..., 0] -= 255 * np.clip(-t, 0, 1)
        rgb[..., 2] -= 255 * np.clip(t, 0, 1)
        return np.clip(rgb, 0, 255).astype(np.uint8)

    def slices(v):
        x, y, z = (n // 2 for n in v.shape)
        return [np.rot90(v[:, :, z]), np.rot90(v[:, y, :]), np.rot90(v[x, :, :])]

    planes = [slices(v) for v in vols]
    cells = [[grey(planes[0][k]), grey(planes[1][k]), signed(planes[2][k], planes[0][k])] for k in range(3)]
    grid = image_grid(cells, ["input", "counterfactual", "counterfactual - input"], cell_px=cell_px,
                      row_labels=["axial", "coronal", "sagittal"])
    # the colour bar: -scale .. +scale under the difference column
    pct = round(100 * PREVIEW_DIFFERENCE_SCALE)
    bar_h, x0 = 12, grid.width - cell_px - 2
    out = Image.new("RGB", (grid.width, grid.height + bar_h + 32), "white")
    out.paste(grid, (0, 0))
    ramp = signed(np.linspace(-scale, scale, cell_px)[None].repeat(bar_h, 0))
    out.paste(Image.fromarray(ramp), (x0, grid.height + 2))
    draw = ImageDraw.Draw(out)
    y = grid.height + bar_h + 4
    draw.text((x0, y), f"-{pct}%", fill="black")
    draw.text((x0 + cell_px // 2 - 3, y), "0", fill="black")
    draw.text((x0 + cell_px - 24, y), f"+{pct}%", fill="black")
    draw.text((4, y + 14), f"difference: +-{pct} % of the input's intensity range (+-{scale:.3g}) saturates",
              fill="black")
    return out
