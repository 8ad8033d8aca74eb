"""Hostile NIfTI uploads (issue 15), for tests/test_service_limits.py and
benchmarks/hostile_uploads.py: small files whose headers or gzip streams ask for gigabytes,
written a chunk at a time so making them costs no memory either."""

from __future__ import annotations

import gzip
from pathlib import Path
from typing import Callable

import numpy as np

__all__ = ["HOSTILE", "LEGITIMATE", "write_hostile", "gzip_bomb", "head_scan"]

_ZEROS = bytes(1 << 24)


def gzip_bomb(path: Path, header: bytes, zeros: int) -> Path:
    """A .nii.gz of ``header`` then ``zeros`` zero bytes: one gzip member compressed once and
    repeated (a gzip file may hold many; readers inflate them as one stream). Zeros deflate
    about 1000:1, so 1 GiB of them is a 1 MB file, made in a few milliseconds."""
    block = gzip.compress(_ZEROS, compresslevel=9)
    with open(path, "wb") as f:
        f.write(gzip.compress(header))
        full, rest = divmod(zeros, len(_ZEROS))
        for _ in range(full):
            f.write(block)
        if rest:
            f.write(gzip.compress(_ZEROS[:rest], compresslevel=9))
    return path


def _header(shape, dtype=np.float32, spacing=1.0, offset=352) -> bytes:
    import nibabel as nib

    hdr = nib.Nifti1Header()
    hdr.set_data_shape(shape)
    hdr.set_data_dtype(dtype)
    hdr.set_zooms((spacing,) * len(shape))
    hdr.set_sform(np.diag([spacing] * 3 + [1.0]), code=1)
    hdr["vox_offset"] = offset
    return hdr.binaryblock + b"\x00" * 4  # no extensions


def head_scan(path: Path, size: int = 256, spacing: float = 1.0, nan: bool = False) -> Path:
    """A legitimate-looking float32 head on a ``size``^3 grid of ``spacing`` mm (256 at 1 mm: a
    1 mm whole-head scan): an ellipsoid of tissue 160 x 180 x 150 mm with a brighter core, in
    air; ``nan``: one voxel NaN."""
    import nibabel as nib

    mm = (np.arange(size, dtype=np.float32) - (size - 1) / 2.0) * spacing
    r2 = (mm[:, None, None] / 80.0) ** 2 + (mm[None, :, None] / 90.0) ** 2 + (mm[None, None, :] / 75.0) ** 2
    data = np.where(r2 < 1.0, 400.0, 0.0).astype(np.float32) + np.where(r2 < 0.6, 300.0, 0.0).astype(np.float32)
    if nan:
        data[-1, -1, -1] = np.nan
    affine = np.diag([spacing] * 3 + [1.0])
    affine[:3, 3] = -spacing * (size - 1) / 2.0
    nib.save(nib.Nifti1Image(data, affine), path)
    return path


def _small(spacing: float) -> Callable[[Path], Path]:
    def make(path: Path) -> Path:
        import nibabel as nib

        data = np.zeros((32, 32, 32), np.float32)
        data[8:24, 8:24, 8:24] = 500.0
        nib.save(nib.Nifti1Image(data, np.diag([spacing, spacing, spacing, 1.0])), path)
        return path

    return make


# name -> (what it is, how to make it as PATH.nii.gz). Each is refused by the API's header or
# streamed check with the default limits.
HOSTILE: dict[str, tuple[str, Callable[[Path], Path]]] = {
    "bomb_512_float64": ("1 MB gzip; header 512^3 float64: 1 GiB once inflated",
                         lambda p: gzip_bomb(p, _header((512, 512, 512), np.float64), 512**3 * 8)),
    "bomb_trailing": ("1 MB gzip; header 16^3 float32, then 1 GiB of data the header does not describe",
                      lambda p: gzip_bomb(p, _header((16, 16, 16)), 1 << 30)),
    "bomb_extension": ("1 MB gzip; data said to start at 1 GiB (header extensions nibabel would read)",
                       lambda p: gzip_bomb(p, _header((16, 16, 16), offset=1 << 30)[:-4] + b"\x01\x00\x00\x00",
                                           (1 << 30) + 16**3 * 4)),
    "voxels_200mm": ("32^3 with 200 mm voxels: a 6.4 m field of view", _small(200.0)),
    "voxels_1000mm": ("32^3 with 1000 mm voxels: a 32 m field of view", _small(1000.0)),
    "huge_dimensions": ("header only; 2000^3 float32 (32 GB)", lambda p: gzip_bomb(p, _header((2000,) * 3), 0)),
    "nan_256": ("256^3 1 mm float32 head, one voxel NaN (caught by the streamed check)",
                lambda p: head_scan(p, 256, 1.0, nan=True)),
}
# Legitimate scans at the limits: what a worker needs for a real scan of that size.
LEGITIMATE: dict[str, tuple[str, Callable[[Path], Path]]] = {
    "head_256_1mm": ("256^3 1 mm float32 head (64 MiB, 256 mm field of view)", lambda p: head_scan(p, 256, 1.0)),
    "head_256_2mm": ("256^3 2 mm float32 head (64 MiB, 512 mm field of view: the default limit)",
                     lambda p: head_scan(p, 256, 2.0)),
}


def write_hostile(folder: Path, names=None, table=HOSTILE) -> dict[str, Path]:
    """The files of ``table`` (all, or ``names``) as FOLDER/NAME.nii.gz."""
    folder.mkdir(parents=True, exist_ok=True)
    return {n: make(folder / f"{n}.nii.gz") for n, (_, make) in table.items() if names is None or n in names}
