"""NIfTI in and out, defensively.

Reading checks the header before a single voxel is read (format, dimensions, size, spacing,
affine, and the :class:`ScanLimits`: voxels, bytes and field of view), then the data
(truncation, NaN/Inf), and names the file in every error. The header is parsed from the file's
first bytes alone, so a hostile file costs nothing before it is refused: no extension, no
voxel is read and nothing is inflated. :func:`check_nifti_file` checks the data as well by
streaming it (gzip inflated in chunks, stopping past what the header describes), so a caller
that only validates (the API) never holds a volume in memory.

Writing builds a fresh header from the array and the affine alone, so free-text fields (descrip,
aux_file, intent_name, db_name) and header extensions of an input never reach an output.
Error messages quote only the file name and structural facts, never header text.
"""

from __future__ import annotations

import contextlib
import contextvars
import gzip
import io
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np

# Previews and the web page show a difference on one fixed scale: colours saturate at this share of
# the input's intensity range (its 0.5-99.5 percentiles), so that two results compare and a small
# change is not stretched to look large.
PREVIEW_DIFFERENCE_SCALE = 0.15

__all__ = ["NiftiError", "Scan", "ScanHeader", "ScanLimits", "read_header", "check_nifti_file", "nifti_limits",
           "PREVIEW_DIFFERENCE_SCALE",
           "read_nifti", "write_nifti", "NIFTI_SUFFIXES", "MAX_VOXELS", "MAX_SIDE", "MAX_VOLUME_BYTES",
           "MAX_FOV_MM"]

NIFTI_SUFFIXES = (".nii", ".nii.gz")
# A 1 mm whole-head scan is about 256^3 = 17 M voxels (64 MiB as float32, 128 MiB as float64,
# 256 mm across); 512^3 voxels, 256 MiB of data and 512 mm along any axis are the most a single
# scan may have by default. Larger headers are refused before any data is read.
MAX_VOXELS = 512**3
MAX_SIDE = 2048
MAX_VOLUME_BYTES = 256 * 1024 * 1024
MAX_FOV_MM = 512.0
# Header plus extensions (the data start at vox_offset): a DICOM-derived extension is a few
# hundred kB; more is refused before nibabel would read it into memory.
MAX_HEADER_BYTES = 16 * 1024 * 1024
# Data past what the header describes that a file may carry (some writers pad); more is refused.
TRAILING_BYTES = 1024 * 1024
# The direction part of the affine may deviate this much from a rotation (shear, skew) before
# the scan is refused: resampling a sheared grid silently distorts anatomy.
ORTHOGONALITY_TOLERANCE = 1e-3
_CHUNK = 1 << 20


class NiftiError(ValueError):
    """A file that is not a usable 3D NIfTI scan; the message names the file and the reason."""


@dataclass(frozen=True)
class ScanLimits:
    """The largest scan a reader accepts, checked on the header: voxels, bytes of data (voxels x
    bytes per voxel of the file's data type) and field of view (voxels x spacing along any axis,
    what resampling to a model's grid costs)."""

    max_voxels: int = MAX_VOXELS
    max_bytes: int = MAX_VOLUME_BYTES
    max_fov_mm: float = MAX_FOV_MM


_limits: contextvars.ContextVar[ScanLimits] = contextvars.ContextVar("nifti_limits", default=ScanLimits())


@contextlib.contextmanager
def nifti_limits(limits: ScanLimits) -> Iterator[ScanLimits]:
    """Within the block, :func:`read_nifti` called without ``limits`` applies these: a caller
    (a worker with its settings) sets them for code that reads scans on its behalf
    (``pipelines.mri.LoadScand``)."""
    token = _limits.set(limits)
    try:
        yield limits
    finally:
        _limits.reset(token)


@dataclass
class Scan:
    """A 3D scalar volume on its own grid."""

    data: np.ndarray  # float32 (X, Y, Z), voxel order of the file
    affine: np.ndarray  # float64 (4, 4), voxel -> world (mm, RAS+ world as NIfTI defines it)
    name: str  # the file name, for messages
    stored_dtype: np.dtype | None = None  # the file's data type, which outputs keep where they can
    scaled: bool = False  # the file stores scaled integers (scl_slope / scl_inter)
    xform_codes: tuple[int, int] = (1, 1)  # qform_code, sform_code (1 scanner, 2 aligned, 3 Talairach, 4 MNI)

    @property
    def spacing(self) -> tuple[float, float, float]:
        return tuple(float(s) for s in np.linalg.norm(self.affine[:3, :3], axis=0))


@dataclass(frozen=True)
class ScanHeader:
    """What a checked header says of the data: shape (3D), data type, where the data start,
    the affine, and the scaling nibabel applies on reading (None: none)."""

    name: str
    shape: tuple[int, int, int]
    dtype: np.dtype
    offset: int
    affine: np.ndarray
    slope_inter: tuple[float | None, float | None]

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * self.dtype.itemsize

    @property
    def fov_mm(self) -> tuple[float, float, float]:
        """Extent along each voxel axis in mm (voxels x spacing)."""
        spacing = np.linalg.norm(self.affine[:3, :3], axis=0)
        return tuple(float(n * s) for n, s in zip(self.shape, spacing))


def is_nifti(path: str | Path) -> bool:
    return str(path).lower().endswith(NIFTI_SUFFIXES)


def _gzipped(path: Path) -> bool:
    return str(path).lower().endswith(".gz")  # as nibabel decides


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


def _parse_header(raw: bytes, name: str):
    """A nibabel NIfTI-1/2 header from the file's first bytes (no extension is read)."""
    import nibabel as nib

    for klass, size in ((nib.Nifti1Header, 348), (nib.Nifti2Header, 540)):
        for order in ("little", "big"):
            if len(raw) >= size and int.from_bytes(raw[:4], order) == size:
                try:
                    return klass.from_fileobj(io.BytesIO(raw[:size]))
                except Exception as err:  # HeaderDataError, ValueError, ...
                    raise NiftiError(f"{name}: not a readable NIfTI file ({type(err).__name__})") from None
    raise NiftiError(f"{name}: not a readable NIfTI file (no NIfTI-1 or NIfTI-2 header)")


def read_header(path: str | Path, limits: ScanLimits | None = None) -> ScanHeader:
    """The header of a 3D NIfTI-1/2 scan (a 4D file with a single volume counts as 3D), checked
    against ``limits`` (default: those of :func:`nifti_limits`) from the file's first bytes."""
    limits = limits or _limits.get()
    path = Path(path)
    name = path.name
    if not path.is_file():
        raise NiftiError(f"{path}: no such file")
    if not is_nifti(path):
        raise NiftiError(f"{name}: not a NIfTI file (expected {' or '.join(NIFTI_SUFFIXES)})")
    try:
        with (gzip.open if _gzipped(path) else open)(path, "rb") as f:
            raw = f.read(540)
    except (OSError, EOFError, zlib.error) as err:  # gzip.BadGzipFile is an OSError
        raise NiftiError(f"{name}: not a readable NIfTI file ({type(err).__name__})") from None
    hdr = _parse_header(raw, name)
    shape = tuple(int(s) for s in hdr.get_data_shape())
    if len(shape) == 4 and shape[3] == 1:
        shape = shape[:3]
    if len(shape) == 4:
        raise NiftiError(f"{name}: a 4D series of {shape[3]} volumes; give one 3D volume")
    if len(shape) != 3:
        raise NiftiError(f"{name}: {len(shape)}D image of shape {shape}; a 3D volume is needed")
    if min(shape) < 1 or max(shape) > MAX_SIDE or int(np.prod(shape, dtype=np.int64)) > limits.max_voxels:
        raise NiftiError(f"{name}: dimensions {shape} are outside what a scan can be "
                         f"(each side 1..{MAX_SIDE}, at most {limits.max_voxels:,} voxels)")
    try:
        dtype = np.dtype(hdr.get_data_dtype())
    except Exception as err:
        raise NiftiError(f"{name}: unknown data type ({type(err).__name__})") from None
    if dtype.kind not in "biuf":
        raise NiftiError(f"{name}: data type {dtype} is not a scalar intensity (give integers or floats)")
    header = ScanHeader(name=name, shape=shape, dtype=dtype, offset=int(hdr.get_data_offset()),
                        affine=np.asarray(hdr.get_best_affine(), dtype=np.float64),
                        slope_inter=hdr.get_slope_inter())
    if header.nbytes > limits.max_bytes:
        raise NiftiError(f"{name}: {header.nbytes / 2**20:,.0f} MiB of data ({shape} voxels of {dtype.itemsize} "
                         f"bytes) is more than a scan may have (at most {limits.max_bytes / 2**20:,.0f} MiB)")
    if not 0 <= header.offset <= MAX_HEADER_BYTES:
        raise NiftiError(f"{name}: the data start at byte {header.offset:,}; a header with its extensions "
                         f"may take at most {MAX_HEADER_BYTES:,} bytes")
    zooms = np.asarray(hdr.get_zooms()[:3], dtype=np.float64)
    if not np.all(np.isfinite(zooms)) or np.any(zooms <= 0):
        raise NiftiError(f"{name}: voxel sizes {tuple(zooms.tolist())} are not positive numbers")
    _check_affine(header.affine, name)
    if max(header.fov_mm) > limits.max_fov_mm:
        fov = " x ".join(f"{v:,.0f}" for v in header.fov_mm)
        raise NiftiError(f"{name}: a field of view of {fov} mm is larger than a scan may cover (at most "
                         f"{limits.max_fov_mm:,.0f} mm along any axis); check the voxel sizes")
    return header


def _finite(chunk: np.ndarray, slope_inter: tuple[float | None, float | None]) -> np.ndarray:
    """Which values stay finite once read as float32 (nibabel's scaling applied)."""
    slope, inter = slope_inter
    values = chunk.astype(np.float64)
    if slope is not None:
        values = values * slope + (inter or 0.0)
    with np.errstate(over="ignore", invalid="ignore"):
        return np.isfinite(values.astype(np.float32))


def check_nifti_file(path: str | Path, limits: ScanLimits | None = None) -> ScanHeader:
    """Check a scan as :func:`read_nifti` would, holding at most a megabyte of it: the header
    (:func:`read_header`), then the data streamed in chunks (a gzip file inflated chunk by
    chunk), refusing truncated or corrupt data, NaN/Inf, and data that go on past what the
    header describes (stopping there: a gzip bomb is never inflated past the limit)."""
    header = read_header(path, limits)
    path, name = Path(path), header.name
    needed, seen, bad = header.nbytes, 0, 0
    checks_values = header.dtype.kind == "f" or header.slope_inter[0] is not None
    itemsize, tail = header.dtype.itemsize, b""
    try:
        with (gzip.open if _gzipped(path) else open)(path, "rb") as f:
            skip = header.offset
            while skip > 0 and (got := len(f.read(min(skip, _CHUNK)))):
                skip -= got
            while seen < needed and (chunk := f.read(min(_CHUNK, needed - seen))):
                seen += len(chunk)
                if checks_values:
                    buf = tail + chunk
                    whole = len(buf) - len(buf) % itemsize
                    values = np.frombuffer(buf[:whole], dtype=header.dtype)
                    bad += int(values.size - np.count_nonzero(_finite(values, header.slope_inter)))
                    tail = buf[whole:]
            extra = len(f.read(TRAILING_BYTES + 1)) if seen == needed else 0
    except (OSError, EOFError, zlib.error) as err:
        raise NiftiError(f"{name}: truncated or corrupt data ({type(err).__name__})") from None
    if skip > 0 or seen < needed:
        raise NiftiError(f"{name}: truncated ({header.offset - skip + seen:,} bytes, the header needs "
                         f"{header.offset + needed:,})")
    if extra > TRAILING_BYTES:
        raise NiftiError(f"{name}: more data than its header describes (past {header.offset + needed:,} bytes); "
                         "not a single scan")
    if bad:
        raise NiftiError(f"{name}: {bad:,} voxels are NaN or infinite")
    return header


def read_nifti(path: str | Path, limits: ScanLimits | None = None) -> Scan:
    """Read one 3D NIfTI-1/2 scan (a 4D file with a single volume is accepted as 3D), its header
    checked first against ``limits`` (default: those of :func:`nifti_limits`)."""
    import nibabel as nib

    header = read_header(path, limits)
    path, name, shape = Path(path), header.name, header.shape
    if not _gzipped(path) and path.stat().st_size < header.offset + header.nbytes:
        raise NiftiError(f"{name}: truncated ({path.stat().st_size:,} bytes, the header needs "
                         f"{header.offset + header.nbytes:,})")
    try:
        img = nib.load(path)  # the header again, now with its (bounded) extensions; the data lazily
    except Exception as err:  # nibabel raises ImageFileError, EOFError, zlib/gzip errors, ...
        raise NiftiError(f"{name}: not a readable NIfTI file ({type(err).__name__})") from None
    if not isinstance(img, (nib.Nifti1Image, nib.Nifti2Image)):
        raise NiftiError(f"{name}: not a NIfTI image")
    try:
        data = np.asarray(img.dataobj, dtype=np.float32).reshape(shape)
    except (EOFError, OSError, zlib.error, ValueError) as err:
        raise NiftiError(f"{name}: truncated or corrupt data ({type(err).__name__})") from None
    if not np.all(np.isfinite(data)):
        bad = int(np.count_nonzero(~np.isfinite(data)))
        raise NiftiError(f"{name}: {bad:,} voxels are NaN or infinite")
    slope, inter = header.slope_inter
    scaled = (slope not in (None, 1.0)) or (inter not in (None, 0.0))
    codes = (int(img.header["qform_code"]), int(img.header["sform_code"]))
    return Scan(data=data, affine=header.affine, name=name, stored_dtype=header.dtype, scaled=scaled,
                xform_codes=codes)


def write_nifti(path: str | Path, data: np.ndarray, affine: np.ndarray, like: Scan | None = None) -> Path:
    """Write ``data`` on ``affine`` with a fresh header (units mm, qform = sform; no text field of
    any input). ``like``: the scan the data stand for, whose data type (integers rounded and
    clipped to the type's range; a scaled type as a scaled integer) and qform/sform codes the file
    keeps; without it, float32 and "scanner" codes."""
    import nibabel as nib

    path = Path(path)
    data = np.asarray(data, dtype=np.float32)
    dtype = np.dtype(np.float32)
    codes = (1, 1)
    if like is not None:
        codes = tuple(c if 0 <= c <= 4 else 1 for c in like.xform_codes)
        if like.stored_dtype is not None and like.stored_dtype.kind in "iu":
            dtype = like.stored_dtype
            if not like.scaled:  # stored as the integers they are: round, and clip to what the type holds
                info = np.iinfo(dtype)
                data = np.clip(np.rint(data), info.min, info.max).astype(dtype)
    img = nib.Nifti1Image(data, np.asarray(affine, dtype=np.float64))
    img.header.set_data_dtype(dtype)  # a scaled type: nibabel chooses scl_slope / scl_inter to fit the data
    img.header.set_xyzt_units(xyz="mm")
    img.set_qform(affine, code=int(codes[0]))
    img.set_sform(affine, code=int(codes[1]))
    path.parent.mkdir(parents=True, exist_ok=True)
    # Written under a temporary name and renamed, so a crash never leaves a half-written output;
    # the temporary name keeps the suffix because nibabel picks gzip from it.
    tmp = path.with_name(f".partial-{path.name}")
    nib.save(img, tmp)
    return tmp.replace(path)
