"""Registration of a scan to a brain model's reference, and back.

A model trained on registered scans sees every head in one place, whatever its position,
orientation, voxel order or spacing in the file; that is what the anchors of the field do
(BrLP, causal-gen: affine registration to MNI) and what lets a small model learn anatomy
instead of head poses. The reference (:class:`Reference`: a T1 image, its intracranial mask and
their RAS affine) ships in the checkpoint. A scan is registered to it with SimpleITK (rigid, or
rigid then affine), resampled onto the model's grid in reference space, and masked to the
reference's head; the change the model makes is carried back through the inverse transform
onto the scan's own grid.

An affine registration scales every head to the reference's size. The graph's volumes are
absolute, so a model registered that way sees them in reference space, divided by the scan's
:attr:`Registration.volume_ratio` (``pipelines.mri.Preprocessing.volume_factor``), as
neuroimaging adjusts volumes for intracranial volume. Under a rigid one head size stays in the
image and confounds brain volume (sex -> head size -> brain volume, and head size is no graph
variable): a voxelwise regression on brain volume then learns mostly a larger head, and
do(brain_volume) scales the skull (``benchmarks/results/brain_native.json``).

Registration that fails is an error, never a silent wrong answer: a scan whose registered
image correlates poorly with the reference (no head, another modality) or whose field of view
leaves part of the reference head uncovered is refused with the figure that failed
(:class:`RegistrationError`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cdae_med.io import Scan, read_nifti, write_nifti

__all__ = ["Reference", "RegistrationError", "Registration", "register", "grid_affine", "to_sitk", "resample_grid",
           "TRANSFORMS", "MIN_CORRELATION", "MIN_COVERAGE"]

TRANSFORMS = ("rigid", "affine")
MIN_CORRELATION = 0.3  # registered scan vs reference inside the head (see register())
MIN_COVERAGE = 0.95  # share of the reference head the scan's field of view must cover
REFERENCE_FILE, MASK_FILE = "reference.nii.gz", "reference_mask.nii.gz"
_LPS = np.diag([-1.0, -1.0, 1.0])  # NIfTI's world is RAS, ITK's is LPS


class RegistrationError(ValueError):
    """A scan that cannot be registered to the model's reference; the message says why."""


@dataclass
class Reference:
    """The space a brain model works in: a T1 image, its intracranial mask, their RAS affine."""

    image: np.ndarray  # float32 (X, Y, Z)
    mask: np.ndarray  # float32 (X, Y, Z) in [0, 1]
    affine: np.ndarray  # float64 (4, 4), voxel -> RAS mm

    def save(self, directory: str | Path) -> None:
        directory = Path(directory)
        write_nifti(directory / REFERENCE_FILE, self.image, self.affine)
        write_nifti(directory / MASK_FILE, self.mask, self.affine)

    @classmethod
    def load(cls, directory: str | Path) -> "Reference":
        directory = Path(directory)
        image, mask = read_nifti(directory / REFERENCE_FILE), read_nifti(directory / MASK_FILE)
        if image.data.shape != mask.data.shape or not np.allclose(image.affine, mask.affine):
            raise ValueError(f"{directory}: reference image and mask are on different grids")
        return cls(image.data, mask.data, image.affine)


def grid_affine(spacing_mm: float, size: int) -> np.ndarray:
    """The model's cubic grid in reference space: RAS axes, ``size`` voxels of ``spacing_mm``,
    centred on the reference's world origin."""
    a = np.diag([spacing_mm, spacing_mm, spacing_mm, 1.0])
    a[:3, 3] = -(size - 1) / 2.0 * spacing_mm
    return a


def to_sitk(data: np.ndarray, affine: np.ndarray):
    """A NIfTI-style volume (X, Y, Z) on a RAS affine -> a SimpleITK image in its LPS world."""
    import SimpleITK as sitk

    lin = _LPS @ np.asarray(affine, dtype=np.float64)[:3, :3]
    spacing = np.linalg.norm(lin, axis=0)
    direction = lin / spacing
    if not np.allclose(direction.T @ direction, np.eye(3), atol=1e-4):
        raise RegistrationError("the scan's affine has shear; it cannot be registered as it is")
    img = sitk.GetImageFromArray(np.ascontiguousarray(np.asarray(data, dtype=np.float32).transpose(2, 1, 0)))
    img.SetSpacing([float(s) for s in spacing])
    img.SetDirection([float(v) for v in direction.reshape(-1)])
    img.SetOrigin([float(v) for v in _LPS @ np.asarray(affine, dtype=np.float64)[:3, 3]])
    return img


def _array(img) -> np.ndarray:
    import SimpleITK as sitk

    return sitk.GetArrayFromImage(img).transpose(2, 1, 0).astype(np.float32)


def _grid_image(shape, affine):
    return to_sitk(np.zeros(shape, np.float32), affine)


def _resample(image, onto, transform, default: float = 0.0):
    import SimpleITK as sitk

    return sitk.Resample(image, onto, transform, sitk.sitkLinear, default, sitk.sitkFloat32)


def resample_grid(data: np.ndarray, affine: np.ndarray, onto_affine: np.ndarray, shape) -> np.ndarray:
    """A volume on one grid (``affine``) resampled (linear) onto another grid of the same world."""
    import SimpleITK as sitk

    return _array(_resample(to_sitk(data, affine), _grid_image(shape, onto_affine), sitk.Transform(3, sitk.sitkIdentity)))


def _levels(reference: "Reference", detail_mm: float | None) -> tuple[list[int], list[float]]:
    """Shrink factors (of the reference grid) and smoothing (mm) per resolution level: down to
    ``detail_mm`` (about the model's spacing: finer detail does not change what the model sees),
    or to the reference's own spacing."""
    ref_mm = float(np.linalg.norm(reference.affine[:3, 0]))
    finest = max(1, int((detail_mm or ref_mm) / ref_mm + 1e-6))
    shrink = [4, 2, 1] if finest == 1 else [2 * finest, finest]
    return shrink, [ref_mm * (f - 1) * 2 / 3 if f > 1 else 0.0 for f in shrink]


# The optimiser of every stage. A step floor of 1e-3 (in the scales of physical shift) stops a stage once
# its steps move head points by well under a voxel; 1e-4 took a third more time per scan, and a model
# trained on registrations at either floor scores the same (benchmarks/results/brain_recipe_time.txt,
# brain_native_evaluations/tissue_validation.json against the shipped model's README).
OPTIMIZER = {"learningRate": 1.0, "minStep": 1e-3, "relaxationFactor": 0.6, "gradientMagnitudeTolerance": 1e-6}


def _fit(fixed, moving, transform, initial, iterations: int, levels):
    """One SimpleITK registration stage: Mattes mutual information over resolution ``levels``."""
    import SimpleITK as sitk

    reg = sitk.ImageRegistrationMethod()
    reg.SetNumberOfThreads(1)  # ITK's threaded metric sums in a varying order: one thread is repeatable
    reg.SetMetricAsMattesMutualInformation(numberOfHistogramBins=32)
    reg.SetMetricSamplingStrategy(reg.REGULAR)
    reg.SetMetricSamplingPercentage(0.3, seed=20261201)  # fixed: the same scan registers the same way
    reg.SetInterpolator(sitk.sitkLinear)
    reg.SetOptimizerAsRegularStepGradientDescent(numberOfIterations=iterations, **OPTIMIZER)
    reg.SetOptimizerScalesFromPhysicalShift()
    reg.SetShrinkFactorsPerLevel(levels[0])
    reg.SetSmoothingSigmasPerLevel(levels[1])
    reg.SmoothingSigmasAreSpecifiedInPhysicalUnitsOn()
    if initial is not None:
        transform.SetMatrix(initial.GetMatrix())
        transform.SetTranslation(initial.GetTranslation())
        transform.SetCenter(initial.GetCenter())
    reg.SetInitialTransform(transform, inPlace=True)
    reg.Execute(fixed, moving)
    return transform


def _as_affine(transform):
    import SimpleITK as sitk

    out = sitk.AffineTransform(3)
    out.SetMatrix(transform.GetMatrix())
    out.SetTranslation(transform.GetTranslation())
    out.SetCenter(transform.GetCenter())
    return out


@dataclass
class Registration:
    """A scan registered to a reference: the forward transform maps reference (model-space)
    points to the scan's points, as ITK's registration gives it."""

    scan: Scan
    transform: object  # SimpleITK AffineTransform, reference LPS -> scan LPS
    correlation: float  # of the registered scan with the reference, inside the reference head
    coverage: float  # share of the reference head inside the scan's field of view

    @property
    def matrix_ras(self) -> np.ndarray:
        """The 4x4 map from reference RAS mm to scan RAS mm."""
        m = np.eye(4)
        a = np.asarray(self.transform.GetMatrix(), dtype=np.float64).reshape(3, 3)
        c = np.asarray(self.transform.GetCenter(), dtype=np.float64)
        t = np.asarray(self.transform.GetTranslation(), dtype=np.float64)
        m[:3, :3] = _LPS @ a @ _LPS
        m[:3, 3] = _LPS @ (t + c - a @ c)
        return m

    @property
    def volume_ratio(self) -> float:
        """Volume in the scan per volume in reference space, |det| of the transform: 1 for a rigid
        one; for an affine one the scan's head size relative to the reference's (the estimate of
        intracranial volume that FreeSurfer's eTIV takes from its Talairach transform, Buckner et al.
        2004)."""
        return float(abs(np.linalg.det(np.asarray(self.transform.GetMatrix(), dtype=np.float64).reshape(3, 3))))

    def resample(self, affine: np.ndarray, shape, data: np.ndarray | None = None) -> np.ndarray:
        """The scan's intensities (or ``data``, another volume on the scan's grid) on a grid of
        reference space (``affine``, ``shape``), low-pass filtered first where the grid is coarser
        than the scan: sampling a fine scan at coarse points without it aliases, and the model would
        see another image for every sub-voxel pose."""
        import SimpleITK as sitk

        image = to_sitk(self.scan.data if data is None else data, self.scan.affine)
        target = float(np.linalg.norm(np.asarray(affine)[:3, 0]))
        sigma = [0.4 * math.sqrt(max(target ** 2 - s ** 2, 0.0)) for s in image.GetSpacing()]
        if max(sigma) > 0:
            image = sitk.SmoothingRecursiveGaussian(image, sigma)
        return _array(_resample(image, _grid_image(shape, affine), self.transform))

    def carry_back(self, change: np.ndarray, affine: np.ndarray) -> np.ndarray:
        """A change on a reference-space grid (``affine``) -> the same change on the scan's grid,
        through the inverse transform; zero outside the grid."""
        back = _resample(to_sitk(change, affine), to_sitk(self.scan.data, self.scan.affine),
                         self.transform.GetInverse())
        return _array(back)


def register(scan: Scan, reference: Reference, kind: str = "rigid", iterations: int = 200,
             detail_mm: float | None = None) -> Registration:
    """Register ``scan`` to ``reference`` (rigid, or rigid then affine) and check the result;
    ``detail_mm``: the finest resolution that matters (the model's spacing).

    :data:`MIN_CORRELATION` sits below every generated subject (old, atrophied brains correlate
    least) and above noise and inverted (T2-like) contrast; the measured spread is in the README
    (Brain MRI, Registration)."""
    import SimpleITK as sitk

    if kind not in TRANSFORMS:
        raise ValueError(f"registration must be one of {TRANSFORMS}, got {kind!r}")
    data = np.nan_to_num(np.asarray(scan.data, dtype=np.float32))
    if not np.ptp(data) > 0:
        raise RegistrationError(f"{scan.name}: the scan is constant; there is no head to register")
    fixed = to_sitk(reference.image, reference.affine)
    lo, hi = np.percentile(data, (0.5, 99.5))
    moving = to_sitk(np.clip((data - lo) / max(hi - lo, 1e-12), 0, 1), scan.affine)
    start = sitk.CenteredTransformInitializer(fixed, moving, sitk.Euler3DTransform(),
                                              sitk.CenteredTransformInitializerFilter.MOMENTS)
    try:
        levels = _levels(reference, detail_mm)
        rigid = _fit(fixed, moving, sitk.Euler3DTransform(), start, iterations, levels)
        transform = _as_affine(rigid)
        if kind == "affine":
            transform = _fit(fixed, moving, sitk.AffineTransform(3), transform, iterations, levels)
    except RuntimeError as err:  # ITK: too few samples overlap, the optimiser left the image, ...
        raise RegistrationError(f"{scan.name}: registration to the model's reference failed "
                                f"({str(err).strip().splitlines()[-1][:200]})") from None
    head = reference.mask > 0.5
    on_ref = _array(_resample(moving, fixed, transform))
    inside = _array(_resample(to_sitk(np.ones_like(data), scan.affine), fixed, transform)) > 0.5
    coverage = float(inside[head].mean())
    a, b = on_ref[head], reference.image[head]
    correlation = float(np.corrcoef(a, b)[0, 1]) if a.std() > 0 else 0.0
    if not correlation >= MIN_CORRELATION:
        partial = coverage < MIN_COVERAGE
        raise RegistrationError(
            f"{scan.name}: after registration the scan correlates {correlation:.2f} with the model's reference "
            f"head (at least {MIN_CORRELATION} needed) and its field of view covers {100 * coverage:.0f} % of it: "
            "not a brain T1 like the model's, or no head" + (", or a partial scan" if partial else ""))
    if coverage < MIN_COVERAGE:
        raise RegistrationError(f"{scan.name}: the field of view covers {100 * coverage:.0f} % of the model's "
                                f"reference head (at least {100 * MIN_COVERAGE:.0f} % needed): a partial scan")
    return Registration(scan=scan, transform=transform, correlation=correlation, coverage=coverage)
