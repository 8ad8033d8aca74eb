"""MRI preprocessing as MONAI dictionary transforms, and its inverse.

A scan goes onto the model's grid by: load (checked, :func:`cdae_med.io.read_nifti`),
channel-first, orient to RAS, resample to the model's spacing, optional N4 bias-field
correction (SimpleITK), crop/pad to the model's grid; then its intensities are mapped to
[0, 1] by a per-scan window (percentiles). The spatial steps are MONAI invertible
transforms, so a change computed on the model's grid is carried back onto the input scan's
own grid (same shape, same affine) by ``Compose.inverse``.

With ``Preprocessing.registration`` set ("rigid" or "affine"), the spatial steps are instead a
registration to the model's reference (:mod:`pipelines.registration`): the scan is resampled
onto the model's grid in reference space, whatever its position, orientation and spacing, and
the change goes back through the inverse transform.

The settings are a :class:`Preprocessing`, stored in the checkpoint (``image.preprocessing``)
and replayed at inference.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Mapping

import numpy as np
import torch
from monai.data import MetaTensor
from monai.transforms import Compose, MapTransform, Orientationd, ResizeWithPadOrCropd, Spacingd

from cdae_med.io import Scan, read_nifti

from .registration import Reference, Registration, grid_affine, register, resample_grid

__all__ = ["Preprocessing", "to_slices", "from_slices", "LoadScand", "N4BiasFieldCorrectiond", "PreparedScan", "prepare", "restore_change",
           "intensity_window", "normalise_intensity", "spatial_transforms"]


@dataclass(frozen=True)
class Preprocessing:
    spacing_mm: tuple[float, float, float]
    spatial_size: tuple[int, int, int]
    orientation: str = "RAS"
    n4: bool = False
    # The intensity window: these percentiles of the resampled scan map to 0 and 1. A per-scan
    # window because scanners have no common intensity unit.
    percentiles: tuple[float, float] = (0.5, 99.5)
    # A 2D slice-wise model sees the grid as slices along this axis (2: axial, RAS); None: 3D.
    slice_axis: int | None = None
    # Registration to the model's reference ("rigid" or "affine"); None: orient, resample and crop only.
    registration: str | None = None
    # Variables that are volumes (ml): a registered model sees them in its reference space, as
    # value x cohort_volume_ratio / the scan's volume ratio (Registration.volume_ratio), so that an
    # affine registration, which scales every head to the reference's size, keeps what a volume
    # means on the image (see volume_factor).
    volume_variables: tuple[str, ...] = ()
    # The mean volume ratio of the training scans: reference-space volumes are expressed at the
    # cohort's mean head size, in the units and range of the graph's variables.
    cohort_volume_ratio: float = 1.0

    @property
    def grid_affine(self) -> np.ndarray:
        """The model grid in reference space (registered models)."""
        return grid_affine(self.spacing_mm[0], self.spatial_size[0])

    def to_dict(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}  # as JSON has it

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "Preprocessing":
        return cls(spacing_mm=tuple(float(s) for s in data["spacing_mm"]),
                   spatial_size=tuple(int(s) for s in data["spatial_size"]),
                   orientation=str(data.get("orientation", "RAS")), n4=bool(data.get("n4", False)),
                   percentiles=tuple(float(p) for p in data.get("percentiles", (0.5, 99.5))),
                   slice_axis=data.get("slice_axis"), registration=data.get("registration"),
                   volume_variables=tuple(str(v) for v in data.get("volume_variables", ())),
                   cohort_volume_ratio=float(data.get("cohort_volume_ratio", 1.0)))

    def volume_factor(self, volume_ratio: float) -> float:
        """What a scan's volumes (of a scan with this registration volume ratio) are multiplied by to
        give the model's reference-space values; 1 where the model has no volume variables."""
        return self.cohort_volume_ratio / volume_ratio if self.volume_variables else 1.0


class LoadScand(MapTransform):
    """Path -> channel-first MetaTensor (1, X, Y, Z) with the file's affine, via the checked reader."""

    def __init__(self, keys="image", allow_missing_keys: bool = False):
        super().__init__(keys, allow_missing_keys)

    def __call__(self, data: Mapping) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            scan = read_nifti(d[key])
            d[f"{key}_scan"] = scan
            d[key] = MetaTensor(torch.from_numpy(scan.data)[None], affine=torch.as_tensor(scan.affine))
        return d


class N4BiasFieldCorrectiond(MapTransform):
    """N4 bias-field correction (SimpleITK) inside an Otsu head mask.

    Not inverted: the counterfactual is carried back as a *change* added to the uncorrected
    input (see :func:`restore_change`), which keeps the input's own bias field.
    """

    def __init__(self, keys="image", shrink: int = 2, iterations: int = 50, allow_missing_keys: bool = False):
        super().__init__(keys, allow_missing_keys)
        self.shrink, self.iterations = shrink, iterations

    def __call__(self, data: Mapping) -> dict:
        import SimpleITK as sitk

        d = dict(data)
        for key in self.key_iterator(d):
            x = d[key]
            arr = x[0].detach().cpu().numpy().astype(np.float32)
            image = sitk.GetImageFromArray(arr)
            mask = sitk.OtsuThreshold(image, 0, 1, 200)
            # Shrinking a small grid leaves N4 too few voxels: at 16^3 it removed 40 % of a
            # left-right bias shrunk by 2 and 65 % unshrunk.
            shrink = self.shrink if min(arr.shape) >= 32 else 1
            small = sitk.Shrink(image, [shrink] * 3)
            small_mask = sitk.Shrink(mask, [shrink] * 3)
            n4 = sitk.N4BiasFieldCorrectionImageFilter()
            n4.SetMaximumNumberOfIterations([self.iterations] * 3)
            n4.Execute(small, small_mask)
            log_field = n4.GetLogBiasFieldAsImage(image)
            corrected = arr / np.exp(sitk.GetArrayFromImage(log_field)).astype(np.float32)
            out = x.clone()
            out[0] = torch.from_numpy(corrected)
            d[key] = out
        return d


def spatial_transforms(prep: Preprocessing, key: str = "image") -> Compose:
    """The invertible spatial steps after loading (MONAI's Compose would wrap a loading error
    in a RuntimeError, so :class:`LoadScand` runs before it)."""
    steps = [
        # The labels are NIfTI's world axes, given explicitly: MONAI is changing their default.
        Orientationd(key, axcodes=prep.orientation, labels=(("L", "R"), ("P", "A"), ("I", "S"))),
        Spacingd(key, pixdim=prep.spacing_mm, mode="bilinear", padding_mode="zeros"),
    ]
    if prep.n4:
        steps.append(N4BiasFieldCorrectiond(key))
    steps.append(ResizeWithPadOrCropd(key, spatial_size=prep.spatial_size, mode="constant"))
    return Compose(steps)


def intensity_window(x: np.ndarray, percentiles: tuple[float, float] = (0.5, 99.5)) -> tuple[float, float]:
    lo, hi = np.percentile(np.asarray(x, dtype=np.float64), percentiles)
    if not hi > lo:
        raise ValueError("the scan has no intensity contrast (constant image)")
    return float(lo), float(hi)


def normalise_intensity(x: np.ndarray, window: tuple[float, float]) -> np.ndarray:
    lo, hi = window
    return np.clip((np.asarray(x, dtype=np.float32) - lo) / (hi - lo), 0.0, 1.0)


@dataclass
class PreparedScan:
    scan: Scan  # the input as read: its data and affine are what outputs are written against
    image: np.ndarray  # float32 (1, *spatial_size) in [0, 1], RAS, the model's spacing
    window: tuple[float, float]  # input intensities mapped to 0 and 1
    transformed: MetaTensor | None = field(default=None, repr=False)  # MONAI's record of the spatial steps
    transform: Compose | None = field(default=None, repr=False)
    registration: Registration | None = field(default=None, repr=False)  # registered models
    prep: Preprocessing | None = field(default=None, repr=False)


def reference_mask(reference: Reference, prep: Preprocessing) -> np.ndarray:
    """The reference's head on the model grid (bool), grown by one voxel: where a registered model's
    input is kept and its change may fall."""
    from scipy.ndimage import binary_dilation

    on_grid = resample_grid(reference.mask, reference.affine, prep.grid_affine, prep.spatial_size)
    return binary_dilation(on_grid > 0.5, iterations=1)


def prepare_registered(scan: Scan, prep: Preprocessing, reference: Reference,
                       mask: np.ndarray | None = None) -> PreparedScan:
    """A scan registered to ``reference`` and resampled onto the model grid, outside the reference's
    head set to 0 (skull and neck do not enter the model), intensities windowed as :func:`prepare`."""
    reg = register(scan, reference, prep.registration, detail_mm=prep.spacing_mm[0])
    arr = reg.resample(prep.grid_affine, prep.spatial_size)
    mask = reference_mask(reference, prep) if mask is None else mask
    window = intensity_window(arr[mask], prep.percentiles)
    image = normalise_intensity(arr, window) * mask
    return PreparedScan(scan=scan, image=image[None].astype(np.float32), window=window, registration=reg, prep=prep)


def prepare(path, prep: Preprocessing, transform: Compose | None = None, reference: Reference | None = None,
            mask: np.ndarray | None = None) -> PreparedScan:
    """``transform``: the spatial steps of ``prep`` built once by a caller that prepares many scans.
    A registered model's scans need its ``reference`` (and may pass its grid ``mask``, built once)."""
    if prep.registration is not None:
        if reference is None:
            raise ValueError("this model registers scans to its reference, and none was given")
        return prepare_registered(read_nifti(path), prep, reference, mask)
    transform = transform or spatial_transforms(prep)
    d = transform(LoadScand("image")({"image": str(path)}))
    x: MetaTensor = d["image"]
    arr = x[0].numpy()
    window = intensity_window(arr, prep.percentiles)
    return PreparedScan(scan=d["image_scan"], image=normalise_intensity(arr, window)[None], window=window,
                        transformed=x, transform=transform)


def restore_change(prepared: PreparedScan, change: np.ndarray) -> np.ndarray:
    """A change on the model's grid (normalised units, (1, *spatial) or (*spatial)) -> the same change
    on the input scan's grid, in the input's intensity units, shape ``prepared.scan.data.shape``."""
    change = np.asarray(change, dtype=np.float32).reshape(prepared.image.shape)
    lo, hi = prepared.window
    if prepared.registration is not None:
        return prepared.registration.carry_back(change[0] * (hi - lo), prepared.prep.grid_affine)
    t = MetaTensor(torch.from_numpy(change * (hi - lo)), meta=dict(prepared.transformed.meta),
                   applied_operations=list(prepared.transformed.applied_operations))
    # Only the invertible spatial steps are undone; N4 has no inverse to apply.
    restored = prepared.transform.inverse({"image": t})["image"]
    out = np.asarray(restored[0].detach().cpu().numpy(), dtype=np.float32)
    if out.shape != prepared.scan.data.shape:
        raise RuntimeError(f"inverse preprocessing gave shape {out.shape}, the input has {prepared.scan.data.shape}")
    if not np.allclose(np.asarray(restored.affine, dtype=np.float64), prepared.scan.affine, atol=1e-3):
        raise RuntimeError("inverse preprocessing did not restore the input's affine")
    return out


def to_slices(volumes: np.ndarray, axis: int = 2) -> np.ndarray:
    """(N, X, Y, Z, C) volumes -> (N * Z, X, Y, C) slices along spatial ``axis`` (0-based), subject-major."""
    moved = np.moveaxis(volumes, 1 + axis, 1)
    return moved.reshape(-1, *moved.shape[2:])


def from_slices(slices: np.ndarray, n: int, axis: int = 2) -> np.ndarray:
    """Inverse of :func:`to_slices`."""
    stacked = slices.reshape(n, -1, *slices.shape[1:])
    return np.moveaxis(stacked, 1, 1 + axis)
