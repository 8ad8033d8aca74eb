"""The clinicians' web page (``GET /``) and the image endpoints it reads: :data:`router`.

The page itself is static (``service/static/``: HTML, CSS and vanilla JavaScript modules,
shipped in the package; no CDN, no build step) and talks only to the public API with the
``X-API-Key`` header. Everything heavy stays on the server: the slices it shows are PNGs
rendered here from the job's volumes.

    GET /v1/limits                                   upload limits (for a check before sending)
    GET /v1/jobs/{id}/slices                         slice counts per plane, default window/level
    GET /v1/jobs/{id}/slices/{volume}/{plane}/{index}.png?window=W&level=L

``volume`` is ``input`` (the uploaded scan as the API stored it), ``counterfactual`` or
``difference``; ``plane`` is ``axial``, ``coronal`` or ``sagittal``. Slices are shown in RAS
whatever the file's voxel order (nibabel.orientations), in the neurological convention of the
job's preview.png (the patient's right on the image's right; anterior, superior up), resampled
(nearest voxel) to square millimetres. ``window``/``level`` apply to the input and
the counterfactual (grey, in the scan's own intensity units); the difference is a diverging map
(red: brighter in the counterfactual, blue: darker) over ``level +- window/2`` with level 0 by default.
The same ownership rule as every job route: another key's job is a 404.
"""

from __future__ import annotations

import io
import threading
from collections import OrderedDict
from pathlib import Path
from typing import Annotated, Literal

import numpy as np
from fastapi import APIRouter, Depends, HTTPException, Query
from fastapi.responses import FileResponse, Response
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel

from cdae_med.io import PREVIEW_DIFFERENCE_SCALE

from .config import Settings
from .db import JobView
from .deps import ApiKey, OwnedJob, SettingsDep

__all__ = ["router", "STATIC_DIR"]

STATIC_DIR = Path(__file__).resolve().parent / "static"
VOLUMES = ("input", "counterfactual", "difference")
PLANES = ("axial", "coronal", "sagittal")
MAX_PX = 1024


class Limits(BaseModel):
    max_upload_bytes: int
    max_voxels: int


class PlaneInfo(BaseModel):
    slices: int
    width_px: int
    height_px: int


class SliceInfo(BaseModel):
    volumes: list[str]
    planes: dict[str, PlaneInfo]
    shape_ras: list[int]
    spacing_ras_mm: list[float]
    window: float
    level: float
    intensity_range: list[float]
    difference_window: float


class _Volumes:
    """Volumes kept in RAS order between slice requests (a scrubber asks for many slices), up to a
    memory budget."""

    def __init__(self, budget_bytes: int = 768 * 1024 * 1024):
        self._items: OrderedDict[tuple, tuple[np.ndarray, np.ndarray]] = OrderedDict()
        self._budget, self._lock = budget_bytes, threading.Lock()

    def get(self, path: Path) -> tuple[np.ndarray, np.ndarray]:
        import nibabel as nib

        st = path.stat()
        key = (str(path), st.st_mtime_ns, st.st_size)
        with self._lock:
            if key in self._items:
                self._items.move_to_end(key)
                return self._items[key]
        img = nib.load(path)
        data = np.asanyarray(img.dataobj, dtype=np.float32)
        if data.ndim == 4 and data.shape[3] == 1:
            data = data[..., 0]
        ornt = nib.orientations.io_orientation(img.affine)
        ras = np.ascontiguousarray(nib.orientations.apply_orientation(data, ornt))
        zooms = np.linalg.norm(img.affine[:3, :3], axis=0)
        spacing_ras = np.empty(3)
        for file_axis, (ras_axis, _flip) in enumerate(ornt):  # file axis k becomes RAS axis ornt[k, 0]
            spacing_ras[int(ras_axis)] = zooms[file_axis]
        with self._lock:
            self._items[key] = (ras, spacing_ras)
            while len(self._items) > 1 and sum(v.nbytes for v, _ in self._items.values()) > self._budget:
                self._items.popitem(last=False)  # the oldest go first; the newest always stays
        return ras, spacing_ras


def _plane(vol: np.ndarray, spacing: np.ndarray, plane: str, index: int) -> tuple[np.ndarray, float, float]:
    """The slice as rows top-to-bottom (superior/anterior up), columns left-to-right; and the
    row and column spacing in mm."""
    if plane == "axial":  # x (R) across, y (A) up
        s, col, row = vol[:, :, index], spacing[0], spacing[1]
    elif plane == "coronal":  # x across, z (S) up
        s, col, row = vol[:, index, :], spacing[0], spacing[2]
    else:  # sagittal: y across, z up
        s, col, row = vol[index, :, :], spacing[1], spacing[2]
    return np.rot90(s), float(row), float(col)


def _size(shape: tuple[int, int], row_mm: float, col_mm: float) -> tuple[int, int]:
    """Pixel size (width, height) with square millimetres, at least 256 px on the longer side."""
    h_mm, w_mm = shape[0] * row_mm, shape[1] * col_mm
    base = max(shape) if max(shape) >= 256 else 256
    scale = min(base, MAX_PX) / max(h_mm, w_mm)
    return max(1, round(w_mm * scale)), max(1, round(h_mm * scale))


def _grey(s: np.ndarray, window: float, level: float) -> np.ndarray:
    lo = level - window / 2.0
    return (np.clip((s - lo) / max(window, 1e-12), 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


def _signed(s: np.ndarray, window: float, level: float) -> np.ndarray:
    t = np.clip((s - level) / max(window / 2.0, 1e-12), -1.0, 1.0)
    rgb = np.full(s.shape + (3,), 255.0)
    rgb[..., 1] -= 255.0 * np.abs(t)
    rgb[..., 0] -= 255.0 * np.clip(-t, 0, 1)
    rgb[..., 2] -= 255.0 * np.clip(t, 0, 1)
    return (rgb + 0.5).astype(np.uint8)


def _defaults(ras: np.ndarray) -> tuple[float, float, float, float]:
    lo, hi = (float(v) for v in np.percentile(ras, (0.5, 99.5)))
    if not hi > lo:
        lo, hi = float(ras.min()), float(ras.max())
        if not hi > lo:
            hi = lo + 1.0
    return hi - lo, (hi + lo) / 2.0, float(ras.min()), float(ras.max())


def _difference_window(diff: np.ndarray, input_window: float) -> float:
    """Full width of the difference map's default window: a fixed share of the input's window, the
    preview's scale (:data:`cdae_med.io.PREVIEW_DIFFERENCE_SCALE`), so that every job is shown
    alike and a small change is not stretched to look large (the page's slider changes it)."""
    del diff  # the scale does not depend on the change
    return 2.0 * PREVIEW_DIFFERENCE_SCALE * input_window


router = APIRouter()
router.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
_volumes = _Volumes()  # keyed by path and modification time: one cache serves every app in the process
_ERRORS = {401: {"description": "no or a wrong X-API-Key"}, 404: {"description": "no such job (or not yours)"}}


@router.get("/", include_in_schema=False)
def index():
    return FileResponse(STATIC_DIR / "index.html", media_type="text/html", headers={"Cache-Control": "no-cache"})


@router.get("/v1/limits", response_model=Limits, summary="Upload limits (checked again by the server)")
def limits(_key: ApiKey, settings: SettingsDep):
    return Limits(max_upload_bytes=settings.max_upload_bytes, max_voxels=settings.max_voxels)


def _counterfactual_job(job: OwnedJob) -> JobView:
    if job.kind != "counterfactual":
        raise HTTPException(404, f"no counterfactual job {job.id!r}")
    return job


CounterfactualJob = Annotated[JobView, Depends(_counterfactual_job)]


def _volume(settings: Settings, job: JobView, volume: str) -> tuple[np.ndarray, np.ndarray]:
    """The job's volume in RAS order and its spacing."""
    job_dir = settings.job_dir(job.id)
    if volume == "input":
        name = job.params.get("input")
        path = job_dir / name if name in ("input.nii", "input.nii.gz") else None
    else:
        name = f"{volume}.nii.gz"
        if name not in job.files:
            raise HTTPException(404, f"job {job.id} has no {volume} yet (it is {job.status})")
        path = job_dir / "out" / name
    if path is None or not path.is_file():
        raise HTTPException(404, f"the {volume} volume of job {job.id} is no longer stored")
    return _volumes.get(path)


@router.get("/v1/jobs/{job_id}/slices", response_model=SliceInfo, responses=_ERRORS,
            summary="Slice counts per plane (RAS) and the default window/level of a counterfactual job")
def slice_info(job: CounterfactualJob, settings: SettingsDep):
    ras, spacing = _volume(settings, job, "input")
    window, level, vmin, vmax = _defaults(ras)
    planes = {}
    for i, plane in enumerate(PLANES[::-1]):  # sagittal: x, coronal: y, axial: z
        s, row, col = _plane(ras, spacing, plane, 0)
        w, h = _size(s.shape, row, col)
        planes[plane] = PlaneInfo(slices=ras.shape[i], width_px=w, height_px=h)
    have = ["input"] + [v for v in VOLUMES[1:] if f"{v}.nii.gz" in job.files]
    diff_window = 1.0
    if "difference" in have:
        d, _ = _volume(settings, job, "difference")
        diff_window = _difference_window(d, window)
    return SliceInfo(volumes=have, planes={p: planes[p] for p in PLANES}, shape_ras=list(ras.shape),
                     spacing_ras_mm=[round(float(s), 4) for s in spacing], window=window, level=level,
                     intensity_range=[vmin, vmax], difference_window=diff_window)


@router.get("/v1/jobs/{job_id}/slices/{volume}/{plane}/{index}.png", responses={**_ERRORS, 200: {
    "content": {"image/png": {}}, "description": "the slice"}}, response_class=Response,
            summary="One slice of the input, counterfactual or difference as a PNG (RAS, square mm)")
def slice_png(job: CounterfactualJob, settings: SettingsDep, volume: Literal["input", "counterfactual", "difference"],
              plane: Literal["axial", "coronal", "sagittal"], index: int,
              window: float | None = Query(None, gt=0, allow_inf_nan=False,
                                           description="grey: width of the window [auto]; difference: full width "
                                                       "[auto]"),
              level: float | None = Query(None, allow_inf_nan=False,
                                          description="centre of the window [auto; 0 for difference]")):
    from PIL import Image

    ras, spacing = _volume(settings, job, volume)
    n = ras.shape[{"sagittal": 0, "coronal": 1, "axial": 2}[plane]]
    if not 0 <= index < n:
        raise HTTPException(422, f"index: {plane} slice {index} is outside 0..{n - 1}")
    s, row, col = _plane(ras, spacing, plane, index)
    if volume == "difference":
        if window is None:
            window = _difference_window(ras, _defaults(_volume(settings, job, "input")[0])[0])
        pixels = _signed(s, window, 0.0 if level is None else level)
    else:
        if window is None or level is None:
            w0, l0, _, _ = _defaults(_volume(settings, job, "input")[0])
            window, level = window or w0, l0 if level is None else level
        pixels = _grey(s, window, level)
    img = Image.fromarray(np.ascontiguousarray(pixels))  # uint8: 'L' for grey, 'RGB' for the difference
    img = img.resize(_size(s.shape, row, col), Image.Resampling.NEAREST)
    buf = io.BytesIO()
    img.save(buf, format="PNG", compress_level=1)
    return Response(buf.getvalue(), media_type="image/png")  # Cache-Control: no-store (service.middleware)
