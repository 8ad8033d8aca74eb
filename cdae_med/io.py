"""NIfTI in and out, defensively.

Reading checks the header before a single voxel is read (format, dimensions, size, spacing,
affine), then the data (truncation, NaN/Inf), and names the file in every error. Writing
builds a fresh header from the array and the affine alone, so free-text fields (descrip,
aux_file, intent_name, db_name) and header extensions of an input never reach an output.
Error messages quote only the file name and structural facts, never header text.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

__all__ = ["NiftiError", "Scan", "read_nifti", "write_nifti", "NIFTI_SUFFIXES", "MAX_VOXELS", "MAX_SIDE"]

NIFTI_SUFFIXES = (".nii", ".nii.gz")
# A 1 mm whole-head scan is about 256^3 = 17 M voxels; 512^3 (134 M, 0.5 GB as float32) is the
# most a single scan may have. Larger headers are refused before any data is read.
MAX_VOXELS = 512**3
MAX_SIDE = 2048
# The direction part of the affine may deviate this much from a rotation (shear, skew) before
# the scan is refused: resampling a sheared grid silently distorts anatomy.
ORTHOGONALITY_TOLERANCE = 1e-3


class NiftiError(ValueError):
    """A file that is not a usable 3D NIfTI scan; the message names the file and the reason."""


@dataclass
class Scan:
    """A 3D scalar volume on its own grid."""

    data: np.ndarray  # float32 (X, Y, Z), voxel order of the file
    affine: np.ndarray  # float64 (4, 4), voxel -> world (mm, RAS+ world as NIfTI defines it)
    name: str  # the file name, for messages

    @property
    def spacing(self) -> tuple[float, float, float]:
        return tuple(float(s) for s in np.linalg.norm(self.affine[:3, :3], axis=0))


def is_nifti(path: str | Path) -> bool:
    return str(path).lower().endswith(NIFTI_SUFFIXES)


def _check_affine(affine: np.ndarray, name: str) -> None:
    if not np.all(np.isfinite(affine)):
        raise NiftiError(f"{name}: the affine has non-finite entries")
    m = affine[:3, :3]
    zooms = np.linalg.norm(m, axis=0)
    if np.any(zooms < 1e-6) or abs(np.linalg.det(m)) < 1e-12:
        raise NiftiError(f"{name}: the affine is singular (zero voxel size or collapsed axes); "
                         "the scan's orientation cannot be determined")
    direction = m / zooms
    if np.max(np.abs(direction.T @ direction - np.eye(3))) > ORTHOGONALITY_TOLERANCE:
        raise NiftiError(f"{name}: the affine is sheared (its axes are not perpendicular); "
                         "reslice the scan to an orthogonal grid first")


def read_nifti(path: str | Path, max_voxels: int = MAX_VOXELS) -> Scan:
    """Read one 3D NIfTI-1/2 scan (a 4D file with a single volume is accepted as 3D)."""
    import nibabel as nib

    path = Path(path)
    name = path.name
    if not path.is_file():
        raise NiftiError(f"{path}: no such file")
    if not is_nifti(path):
        raise NiftiError(f"{name}: not a NIfTI file (expected {' or '.join(NIFTI_SUFFIXES)})")
    try:
        img = nib.load(path)  # header only; the data is read lazily below
    except Exception as err:  # nibabel raises ImageFileError, EOFError, zlib/gzip errors, ...
        raise NiftiError(f"{name}: not a readable NIfTI file ({type(err).__name__})") from None
    if not isinstance(img, (nib.Nifti1Image, nib.Nifti2Image)):
        raise NiftiError(f"{name}: not a NIfTI image")
    shape = tuple(int(s) for s in img.header.get_data_shape())
    if len(shape) == 4 and shape[3] == 1:
        shape = shape[:3]
    if len(shape) == 4:
        raise NiftiError(f"{name}: a 4D series of {shape[3]} volumes; give one 3D volume")
    if len(shape) != 3:
        raise NiftiError(f"{name}: {len(shape)}D image of shape {shape}; a 3D volume is needed")
    if min(shape) < 1 or max(shape) > MAX_SIDE or int(np.prod(shape, dtype=np.int64)) > max_voxels:
        raise NiftiError(f"{name}: dimensions {shape} are outside what a scan can be "
                         f"(each side 1..{MAX_SIDE}, at most {max_voxels:,} voxels)")
    zooms = np.asarray(img.header.get_zooms()[:3], dtype=np.float64)
    if not np.all(np.isfinite(zooms)) or np.any(zooms <= 0):
        raise NiftiError(f"{name}: voxel sizes {tuple(zooms.tolist())} are not positive numbers")
    affine = np.asarray(img.affine, dtype=np.float64)
    _check_affine(affine, name)
    if not str(path).lower().endswith(".gz"):
        itemsize = img.header.get_data_dtype().itemsize
        needed = int(img.header["vox_offset"]) + int(np.prod(shape, dtype=np.int64)) * itemsize
        if path.stat().st_size < needed:
            raise NiftiError(f"{name}: truncated ({path.stat().st_size:,} bytes, the header needs {needed:,})")
    try:
        data = np.asarray(img.dataobj, dtype=np.float32).reshape(shape)
    except (EOFError, OSError, zlib.error, ValueError) as err:
        raise NiftiError(f"{name}: truncated or corrupt data ({type(err).__name__})") from None
    if not np.all(np.isfinite(data)):
        bad = int(np.count_nonzero(~np.isfinite(data)))
        raise NiftiError(f"{name}: {bad:,} voxels are NaN or infinite")
    return Scan(data=data, affine=affine, name=name)


def write_nifti(path: str | Path, data: np.ndarray, affine: np.ndarray) -> Path:
    """Write float32 ``data`` on ``affine`` with a fresh header (units mm, qform = sform)."""
    import nibabel as nib

    path = Path(path)
    img = nib.Nifti1Image(np.asarray(data, dtype=np.float32), np.asarray(affine, dtype=np.float64))
    img.header.set_data_dtype(np.float32)
    img.header.set_xyzt_units(xyz="mm")
    img.set_qform(affine, code="scanner")
    img.set_sform(affine, code="scanner")
    path.parent.mkdir(parents=True, exist_ok=True)
    # Written under a temporary name and renamed, so a crash never leaves a half-written output;
    # the temporary name keeps the suffix because nibabel picks gzip from it.
    tmp = path.with_name(f".partial-{path.name}")
    nib.save(img, tmp)
    return tmp.replace(path)
