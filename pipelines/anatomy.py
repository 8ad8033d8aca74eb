"""The subject's own anatomy read off a registered scan, and changed by volumes a model prescribes.

A model on a 6 mm grid can say by how much a brain shrinks and its ventricles grow, not which 2 mm voxels
do: its change, carried onto the scan, moves only part of a ventricle wall even when it is the true change
(`benchmarks/results/brain_ventricle_realisation_32_ventricle_volume.json`: the oracle's intensity change
leaves 13.8 of copying's 15.1 ml ventricle error). So the volumes the causal model decides can be realised on
the scan's own anatomy, as atrophy happens (:class:`AnatomicalRealisation`, the realisations ``"ventricles"``,
``"volumes"`` and ``"atrophy"``, built on :mod:`pipelines.realisation`):

- :class:`TissueLevels`: a scan's CSF, grey- and white-matter intensities, read through its registration
  (CSF in the reference's lateral ventricles, white matter where the reference is brightest, grey matter at
  the reference's own grey-matter level between the two);
- :func:`brain_volume_ml`: brain (grey plus white matter) by partial volume between CSF and grey matter, as
  the generator's tissue model and partial-volume segmentations measure it;
- :class:`VentriclePush`: the subject's own ventricles grown or shrunk by a prescribed volume, the tissue
  around them pushed along the distance to their wall by a push that decays away from it, integrated as a
  stationary velocity field;
- :func:`cortical_change`: the subject's brain made smaller (or larger) by a prescribed volume where atrophy
  happens, tissue turning into CSF where CSF is near (grey matter first, white matter at a fraction of its
  rate), or the reverse.
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass

import numpy as np

from .mri import PreparedScan
from .realisation import GridDeformation, carry_change, deform_scan, head_weight, jacobian_determinant
from .registration import Reference, grid_affine, resample_grid

__all__ = ["ANATOMICAL_REALISATIONS", "AnatomicalRealisation", "TissueLevels", "VentricleReading", "VentriclePush",
           "brain_volume_ml", "cortical_change", "reference_levels"]

log = logging.getLogger("cdae_med")

# The reference's tissue classes, in its intensities scaled to its 99th percentile (white matter): CSF
# darker than CSF_BELOW deeper than DEEP_MM inside its head (its largest connected body: the lateral
# ventricles), white matter brighter than WHITE_ABOVE.
CSF_BELOW = 0.35
WHITE_ABOVE = 0.88
DEEP_MM = 25.0


@dataclass(frozen=True)
class TissueLevels:
    """A scan's (or the reference's) CSF, grey- and white-matter intensities."""

    csf: float
    grey: float
    white: float

    @property
    def grey_share(self) -> float:
        """Grey matter's place between CSF (0) and white matter (1)."""
        return (self.grey - self.csf) / (self.white - self.csf)

    def brain_fraction(self, data: np.ndarray) -> np.ndarray:
        """Each voxel's share of brain: 0 at CSF, 1 at grey matter and brighter."""
        return np.clip((np.asarray(data, np.float64) - self.csf) / (self.grey - self.csf), 0.0, 1.0)


def _reference_classes(reference: Reference, affine: np.ndarray, size: int) -> dict:
    """The reference's image (scaled to its white matter), head, lateral ventricles and white matter on a grid."""
    from scipy.ndimage import distance_transform_edt, label

    spacing = float(np.linalg.norm(affine[:3, 0]))
    image, mask = (resample_grid(a, reference.affine, affine, (size,) * 3) for a in (reference.image, reference.mask))
    head = mask > 0.5
    image = image / max(float(np.percentile(image[head], 99)), 1e-6)
    deep_csf = (image < CSF_BELOW) & (distance_transform_edt(head) * spacing > DEEP_MM)
    labels, n = label(deep_csf)  # the lateral ventricles: the largest body of deep CSF (not the third ventricle)
    core = labels == 1 + int(np.argmax(np.bincount(labels.ravel())[1:])) if n else deep_csf
    return {"image": image, "mask": mask, "head": head, "core": core, "white": (image > WHITE_ABOVE) & head}


def reference_levels(reference: Reference) -> TissueLevels:
    """The reference's own levels: CSF and white matter as medians of its classes, grey matter the most
    common intensity between them (a T1 head's largest tissue peak after white matter's)."""
    classes = _reference_classes(reference, reference.affine, reference.image.shape[0])
    image, head = classes["image"], classes["head"]
    csf, white = float(np.median(image[classes["core"]])), float(np.median(image[classes["white"]]))
    lo, hi = csf + 0.35 * (white - csf), white - 0.2 * (white - csf)
    counts, edges = np.histogram(image[head & (image > lo) & (image < hi)], bins=24, range=(lo, hi))
    grey = float((edges[np.argmax(counts)] + edges[np.argmax(counts) + 1]) / 2)
    return TissueLevels(csf, grey, white)


@dataclass(frozen=True)
class VentricleReading:
    """A scan's CSF and white matter (its window's [0, 1]) and the ventricles' region on its grid (bool)."""

    csf: float
    white: float
    region: np.ndarray


def brain_volume_ml(data: np.ndarray, head: np.ndarray, levels: TissueLevels, voxel_ml: float) -> float:
    """Brain volume (ml) of a scan inside ``head`` (bool, the scan's grid) by partial volume."""
    return float(levels.brain_fraction(data[head]).sum() * voxel_ml)


# cortical_change: how far CSF reaches into the tissue it erodes (a Gaussian's sigma; chosen in
# benchmarks/results/brain_native_evaluations/atrophy_validation.json), and white matter's rate of loss against
# grey matter's (cortex next to CSF goes first: Hedman et al. 2012, as synthetic_data.brain models it).
CORTEX_REACH_MM = 4.0
WHITE_RATE = 0.3


def cortical_change(data: np.ndarray, head: np.ndarray, levels: TissueLevels, delta_ml: float, spacing_mm,
                    deep: np.ndarray | None = None, reach_mm: float = CORTEX_REACH_MM, white_rate: float = WHITE_RATE,
                    iterations: int = 20) -> tuple[np.ndarray, float]:
    """The change (``data``'s grid and units) that makes the brain in ``head`` (bool) ``delta_ml`` larger, and the
    ml it reaches: for a loss, tissue turned into CSF in proportion to how much CSF is near (``reach_mm``) and to
    the tissue a voxel holds, grey matter at a rate k and white matter at ``white_rate`` k (each at most all of
    it); for a gain, the reverse, up to the CSF a voxel holds. The CSF of ``deep`` (bool, the ventricles' region)
    does not count as near: atrophy there is the ventricles growing, which a model's change or a push makes.
    Shares are read by partial volume between ``levels``; k is solved so that the shares change by
    ``delta_ml``."""
    from scipy.ndimage import gaussian_filter

    x = np.asarray(data, np.float64)
    if delta_ml == 0:
        return np.zeros(x.shape, np.float32), 0.0
    spacing = np.asarray(spacing_mm, np.float64)
    voxel_ml = float(np.prod(spacing)) / 1000.0
    csf = 1.0 - levels.brain_fraction(x)
    white = np.clip((x - levels.grey) / (levels.white - levels.grey), 0.0, 1.0)
    grey = 1.0 - csf - white
    nonbrain = np.where(head, csf, 1.0)
    if deep is not None:
        nonbrain[deep] = 0.0
    near = gaussian_filter(nonbrain, reach_mm / spacing) * head
    fillable = csf * (head & (x > 0.5 * levels.csf))  # the intracranial CSF, not the air around the head

    def shares(k: float) -> tuple[np.ndarray, np.ndarray]:
        if delta_ml < 0:
            return -np.minimum(1.0, k * near) * grey, -np.minimum(1.0, white_rate * k * near) * white
        return np.minimum(k * near * grey, fillable), np.minimum(white_rate * k * near * white, 1.0 - white)

    k = abs(delta_ml) / max(float(((grey + white_rate * white) * near).sum()) * voxel_ml, 1e-12)
    for _ in range(iterations):  # each share is capped, so k is raised until the capped shares reach the volume
        reached = float(sum(d.sum() for d in shares(k))) * voxel_ml
        if abs(reached - delta_ml) < 1e-3 * abs(delta_ml) or reached == 0:
            break
        k *= delta_ml / reached
    dg, dw = shares(k)
    reached = float((dg.sum() + dw.sum()) * voxel_ml)
    change = dg * (levels.grey - levels.csf) + dw * (levels.white - levels.csf)
    return change.astype(np.float32), reached


class VentriclePush:
    """The subject's own ventricles grown (or shrunk) by a prescribed volume, as ventricles enlarge: the
    tissue around them pushed along the signed distance to their wall (the inside moving with the wall, so
    that a shrinking ventricle does not collapse onto it), by a push that decays outside with that distance.
    The push is smoothed over ``smoothing_voxels`` of a ``spacing_mm`` grid of reference space spanning
    ``extent_mm`` and integrated as a stationary velocity field (scaling and squaring, MONAI's ``DVF2DDF``): one
    displacement of the size a large change needs folds where the direction to the nearest wall jumps
    (`benchmarks/brain_ventricle_push_folding.py`). Decay, grid and smoothing were chosen on validation subjects
    with the true volume change (`benchmarks/results/brain_native_evaluations/ventricle_push_shape.json`: a
    short decay on a fine grid, lightly smoothed, renders the generator's ventricles best). Its size is solved
    so that the ventricles measured on the warped scan, at the scan's own resolution, change by the volume asked
    for; where it folds, it is smoothed more and solved again, and halved only where it still folds.

    The ventricles are read off the scan: within ``region_mm`` of the reference's lateral ventricles (carried
    through the registration), a voxel's share of CSF by partial volume between the scan's CSF there and its
    grey matter (``grey_share`` of the way to its white matter: :attr:`TissueLevels.grey_share`)."""

    # The push starts from the ventricles' core, the voxels of its grid above this share of CSF (or 0.9 of the
    # largest share, where none is), so that their partial-volume wall already lies within its decay (design
    # notes, "The push as a realisation of the model").
    ventricle_share = 0.95
    # the smoothings, in units of the push's own, that a push folding on its grid is solved again with
    fold_smoothing = (1.0, 1.5, 2.25)
    # the largest push (mm at the wall) the solver tries; a change it cannot reach is made as far as this
    max_push_mm = 12.0

    def __init__(self, reference: Reference, extent_mm: float, grey_share: float, decay_mm: float = 7.0,
                 spacing_mm: float = 2.0, region_mm: float = 16.0, smoothing_voxels: float = 1.0):
        from scipy.ndimage import binary_dilation

        self.spacing, self.decay, self.smoothing, self.grey_share = spacing_mm, decay_mm, smoothing_voxels, grey_share
        self.size = int(round(extent_mm / spacing_mm))
        self.affine = grid_affine(spacing_mm, self.size)
        classes = _reference_classes(reference, self.affine, self.size)
        self.core, self.white = classes["core"], classes["white"]
        if not self.core.any():
            raise ValueError("the reference has no deep CSF (ventricles) to grow")
        self.region = binary_dilation(self.core, iterations=int(round(region_mm / spacing_mm))) & classes["head"]
        self.weight = head_weight(classes["mask"].astype(np.float32), 0.0, spacing_mm)
        from monai.networks.blocks import DVF2DDF

        with warnings.catch_warnings():  # MONAI notes that it uses torch's grid_sample, which is what we want
            warnings.simplefilter("ignore")
            self.integrate = DVF2DDF(num_steps=7)

    def share(self, g: np.ndarray, csf: float, white: float) -> np.ndarray:
        """Each voxel's share of CSF (``g`` in any units the levels are in)."""
        grey = csf + self.grey_share * (white - csf)
        return np.clip((grey - g) / (grey - csf), 0.0, 1.0)

    def on_grid(self, prepared, data: np.ndarray | None = None) -> np.ndarray:
        """The scan (or ``data`` on its grid) on this grid of reference space, in [0, 1] of its window."""
        lo, hi = prepared.window
        return (prepared.registration.resample(self.affine, (self.size,) * 3, data=data) - lo) / (hi - lo)

    def read(self, prepared) -> "VentricleReading":
        """What every measurement of ``prepared``'s ventricles needs, read once: the scan's CSF (in the
        reference's lateral ventricles) and white matter, in its window's [0, 1], and the ventricles' region
        carried onto the scan's grid."""
        g = self.on_grid(prepared)
        region = prepared.registration.carry_back(self.region.astype(np.float32), self.affine) > 0.5
        return VentricleReading(float(np.median(g[self.core])), float(np.median(g[self.white])), region)

    def field(self, ventricles: np.ndarray, smoothing_voxels: float | None = None) -> np.ndarray:
        """(3, X, Y, Z) RAS, per unit of push, from the ventricles (bool) on this grid: the counterfactual at p
        samples the scan at p + s field(p); smoothed (over ``smoothing_voxels``, by default the push's), so that
        it integrates to a diffeomorphism."""
        from scipy.ndimage import distance_transform_edt, gaussian_filter

        distance = (distance_transform_edt(~ventricles) - distance_transform_edt(ventricles)) * self.spacing
        distance = gaussian_filter(distance, 1.0)
        grad = np.stack(np.gradient(distance, self.spacing))
        outward = grad / np.maximum(np.linalg.norm(grad, axis=0), 1e-6)
        field = -np.exp(-np.maximum(distance, 0.0) / self.decay)[None] * outward * self.weight[None]
        return np.stack([gaussian_filter(c, smoothing_voxels or self.smoothing) for c in field])

    def ventricle_core(self, share: np.ndarray, at: float | None = None) -> np.ndarray:
        """The ventricles' core on this grid (bool) from each voxel's share of CSF: above ``at`` (by default
        :attr:`ventricle_share`), or above 0.9 of the largest share where none is."""
        return share > min(at or self.ventricle_share, 0.9 * float(share.max()))

    def flow(self, field: np.ndarray, size_mm: float) -> GridDeformation:
        """The push of ``size_mm`` at the wall along ``field`` (:meth:`field`), as a stationary velocity field
        integrated by scaling and squaring."""
        import torch

        u = self.integrate(torch.from_numpy((size_mm * field / self.spacing).astype(np.float32))[None])[0]
        u = u.numpy().astype(np.float64) * self.spacing
        return GridDeformation.from_displacement(u.transpose(1, 2, 3, 0) * np.array([-1.0, -1.0, 1.0]),
                                                 self.affine)  # RAS -> ITK's LPS

    def wall(self, prepared, within_mm: float, reading: "VentricleReading | None" = None) -> np.ndarray:
        """The scan's ventricles and the tissue within ``within_mm`` of their wall, on its grid, in [0, 1]
        (smoothed over a voxel): where a change of the ventricles is the push's, not an intensity change's."""
        from scipy.ndimage import distance_transform_edt, gaussian_filter

        r = reading or self.read(prepared)
        lo, hi = prepared.window
        ventricles = (self.share((prepared.scan.data - lo) / (hi - lo), r.csf, r.white) > 0.5) & r.region
        near = distance_transform_edt(~ventricles, sampling=prepared.scan.spacing) <= within_mm
        return np.clip(gaussian_filter(near.astype(np.float32), 1.0), 0.0, 1.0)

    def volume_ml(self, prepared, data: np.ndarray | None = None, reading: "VentricleReading | None" = None) -> float:
        """The ventricles (ml) of the scan, or of ``data`` (another version of it on its grid), by partial
        volume within the region, at the scan's own resolution."""
        r = reading or self.read(prepared)
        lo, hi = prepared.window
        data = prepared.scan.data if data is None else data
        return float(self.share((data[r.region] - lo) / (hi - lo), r.csf, r.white).sum()
                     * np.prod(prepared.scan.spacing) / 1000.0)

    def deformation(self, prepared, delta_ml: float, measured_on: np.ndarray | None = None,
                    reading: "VentricleReading | None" = None, max_halvings: int = 6):
        """The push (a :class:`GridDeformation` on this grid) that grows the ventricles
        of ``prepared``'s scan by ``delta_ml`` (the scan's ml), measured at the scan's own resolution (a 3 mm
        grid's partial volumes are not a 2 mm scan's) on ``measured_on`` (another version of the scan on its
        grid, e.g. with the rest of a change) where given. Where it folds on its grid (tissue squeezed between
        two walls, as the septum is), it is smoothed more (:attr:`fold_smoothing` times) and solved again, and
        only then halved."""
        from scipy.optimize import brentq

        r = reading or self.read(prepared)
        measured = prepared.scan.data if measured_on is None else np.asarray(measured_on, np.float32)
        target = self.volume_ml(prepared, reading=r) + delta_ml
        core = self.ventricle_core(self.share(self.on_grid(prepared, measured), r.csf, r.white) * self.region)
        # from no push towards the change's side
        end = self.max_push_mm if self.volume_ml(prepared, measured, r) < target else -self.max_push_mm

        for smoothing in self.smoothing * np.asarray(self.fold_smoothing):
            field = self.field(core, smoothing)

            def excess(s: float) -> float:
                warped = deform_scan(prepared.registration, self.flow(field, s), measured, within=r.region)
                return self.volume_ml(prepared, warped, r) - target

            s = end if np.sign(end) * excess(end) < 0 else brentq(excess, 0.0, end, xtol=1e-2)
            phi = self.flow(field, s)
            if jacobian_determinant(phi).min() > 0:
                return phi
        for halving in range(1, max_halvings + 1):
            phi = self.flow(field, s / 2 ** halving)
            if jacobian_determinant(phi).min() > 0:
                log.warning("the ventricle push folded on its grid; applied at 1/%d of its size", 2 ** halving)
                return phi
        raise RuntimeError("the ventricle push folds even at 1/%d of its size" % 2 ** max_halvings)


ANATOMICAL_REALISATIONS = ("ventricles", "volumes", "atrophy")


class AnatomicalRealisation:
    """The volumes the causal model decides, realised on the scan's own anatomy (``mode``).

    ``"atrophy"``: the model's intensity change (on the scan's tissue) around the ventricles, where a 6 mm change
    renders their growth well, and ``elsewhere`` of it further out; the rest of the model's brain-volume change
    put on the subject's own cortex (:func:`cortical_change`), so that the output's brain changes by what the
    graph decides, where the subject's CSF meets its tissue. Chosen against the oracle on the validation subjects
    (docs/design-notes.md, "Atrophy on the subject's own cortex").

    ``"ventricles"``: the subject's ventricles grown by the model's ventricle-volume change
    (:class:`VentriclePush`), measured on the scan with the rest of the model's change (its
    intensity change, on the scan's tissue, everywhere but within ``wall_mm`` of the ventricles' wall, where
    the change is the push's). ``"volumes"``: both volumes as the graph decides them, the ventricles pushed as
    by ``"ventricles"`` and the rest as by ``"atrophy"`` (the push's compression of the tissue around the
    ventricles counted in the brain change the cortex makes up). A 6 mm change carries only part of a volume
    change onto a 2 mm scan, even the true change does
    (`benchmarks/results/brain_ventricle_realisation_32_*.json`); what each realisation gains in volumes and
    costs in image error is in `benchmarks/results/brain_native.json`. Where the cortex cannot make up the
    brain change (it holds too little tissue or CSF near enough), the details say so
    (``brain_volume_change_reached``)."""

    def __init__(self, reference, prep, mask: np.ndarray, mode: str = "ventricles", wall_mm: float = 4.0,
                 around_ventricles_mm: float = 4.0, elsewhere: float = 0.5, cortex_reach_mm: float = CORTEX_REACH_MM):
        if mode not in ANATOMICAL_REALISATIONS:
            raise ValueError(f"mode must be one of {ANATOMICAL_REALISATIONS}, got {mode!r}")
        self.levels = reference_levels(reference)
        extent = float(prep.spacing_mm[0]) * int(prep.spatial_size[0])
        self.push = VentriclePush(reference, extent, self.levels.grey_share)
        self.mask, self.mode, self.wall_mm = mask, mode, wall_mm
        self.around_ventricles_mm, self.elsewhere, self.cortex_reach_mm = around_ventricles_mm, elsewhere, cortex_reach_mm

    def scan_levels(self, prepared, reading: VentricleReading | None = None):
        """The scan's CSF, grey- and white-matter intensities (its units): white matter read through the
        registration; CSF the commonest intensity of the darker voxels of the ventricles' region at the scan's own
        resolution (the reading's median on the push's 3 mm grid mixes a small ventricle with its wall); grey
        matter where the reference's lies between them."""
        r = reading or self.push.read(prepared)
        lo, hi = prepared.window
        csf, white = (lo + v * (hi - lo) for v in (r.csf, r.white))
        data = prepared.scan.data[r.region]
        dark = data[data < csf + self.levels.grey_share * (white - csf) / 2]
        if dark.size > 100:
            counts, edges = np.histogram(dark, bins=32)
            csf = float((edges[np.argmax(counts)] + edges[np.argmax(counts) + 1]) / 2)
        return TissueLevels(csf, csf + self.levels.grey_share * (white - csf), white)

    def _on_cortex(self, prepared: PreparedScan, start: np.ndarray, intensity: np.ndarray, delta_brain_ml: float,
                   reading: VentricleReading) -> tuple[np.ndarray, dict]:
        """``start`` (the scan, or the scan pushed) plus the intensity change in full around the ventricles and
        ``elsewhere`` of it further out, plus the cortex's change for the rest of ``delta_brain_ml``."""
        from scipy.ndimage import gaussian_filter

        scan, spacing = prepared.scan.data, np.asarray(prepared.scan.spacing, np.float64)
        around = np.clip(gaussian_filter(reading.region.astype(np.float32), self.around_ventricles_mm / spacing), 0, 1)
        base = start + (around + self.elsewhere * (1.0 - around)) * intensity
        head = prepared.registration.carry_back(self.mask.astype(np.float32), prepared.prep.grid_affine) > 0.5
        levels, voxel_ml = self.scan_levels(prepared, reading), float(np.prod(spacing)) / 1000.0
        rest = delta_brain_ml - (brain_volume_ml(base, head, levels, voxel_ml) - brain_volume_ml(scan, head, levels, voxel_ml))
        cortex, reached = cortical_change(base, head, levels, rest, spacing, deep=reading.region,
                                          reach_mm=self.cortex_reach_mm)
        details = {"brain_volume_change_ml": float(delta_brain_ml), "kept_elsewhere": self.elsewhere,
                   "cortex_change_ml": round(reached, 2)}
        if abs(reached - rest) > 0.05 * abs(rest) + 0.5:
            details["brain_volume_change_reached"] = False
        return base + cortex, details

    def __call__(self, prepared: PreparedScan, change: np.ndarray, delta_brain_ml: float,
                 delta_ventricles_ml: float, residual: str = "tissue") -> tuple[np.ndarray, dict]:
        """The scan's change (its grid, its units) for the model's ``change`` on its grid (window units) and
        its volume changes (ml of the scan), with what was done."""
        scan = prepared.scan.data
        reading = self.push.read(prepared)
        intensity = carry_change(prepared, change.reshape(self.mask.shape) * self.mask, residual)
        if self.mode == "atrophy":
            out, details = self._on_cortex(prepared, scan, intensity, delta_brain_ml, reading)
            return out - scan, details
        intensity *= 1.0 - self.push.wall(prepared, self.wall_mm, reading)
        if delta_ventricles_ml:
            phi = self.push.deformation(prepared, delta_ventricles_ml, scan + intensity, reading)
            pushed = deform_scan(prepared.registration, phi)
            intensity = deform_scan(prepared.registration, phi, intensity)
        else:
            pushed = scan
        if self.mode == "volumes":
            out, details = self._on_cortex(prepared, pushed, intensity, delta_brain_ml, reading)
        else:
            out, details = pushed + intensity, {"brain_volume_change_ml": float(delta_brain_ml)}
        details["ventricle_volume_change_ml"] = float(delta_ventricles_ml)
        details["ventricle_volume_change_measured_ml"] = round(self.push.volume_ml(prepared, out, reading)
                                                               - self.push.volume_ml(prepared, reading=reading), 2)
        return out - scan, details
