"""Pendulum data set with a known causal graph (geometry of CausalVAE).

The scene and its causal mechanism follow the synthetic "pendulum" data set of
CausalVAE (Yang et al., "CausalVAE: Disentangled Representation Learning via
Neural Structural Causal Models", CVPR 2021).  Their generator walks an integer
grid: pendulum angle index ``i`` in -40..43 and light index ``j`` in 60..147, with
``theta = i*pi/200`` and ``phi = j*pi/200`` (one index unit = 0.9 degrees).  This
module is a *continuous* re-sampling of that grid: the exogenous angle and light
are drawn uniformly over the same rectangle, the shadow follows from the same
projection geometry, and the image is rendered with numpy (anti-aliased,
vectorised) rather than matplotlib.

Scene (canvas coordinates, x in [0, 20], y in [-1, 21], y up):

* pivot at (10, 10.5), rod of length 8, ball of radius 1.5 at
  ``(10 + 8 sin theta, 10.5 - 8 cos theta)`` (angle > 0 puts the ball right);
* parallel light rays with slope ``tan phi``; the light source is drawn as a
  small disc at ``x = proj(10, 10.5, 20.5)``, ``y = 20.5`` where
  ``proj(x, y, base) = (base - (y - x tan phi)) / tan phi``;
* the shadow on the ground (``base = -0.5``) spans the projections of the pivot
  and of the ball's far point ``(10 + 9.5 sin theta, 10.5 - 9.5 cos theta)``:
  ``shadow_pos`` is their mean and ``shadow_len = max(3, |difference|)``.

Causal graph: ``angle -> {shadow_len, shadow_pos} <- light``.

Label units: ``angle`` and ``light`` are in degrees (``angle = i * 0.9`` in
[-36, 38.7], ``light = j * 0.9`` in [54, 132.3]); ``shadow_len`` and
``shadow_pos`` are in canvas units.  :data:`NORMALISATION` holds CausalVAE's
(centre, scale) normalisation converted to these units; all of it comes from the
built-in ``pendulum`` graph of :mod:`cdae_med.graph`.
"""

from __future__ import annotations

import csv
import json
import pathlib
from typing import Mapping

import numpy as np

from cdae_med.graph import builtin_graph

from .base import Samples, parse_do

__all__ = [
    "VARIABLES",
    "UNITS",
    "NORMALISATION",
    "RANGES",
    "DEFAULT_SIZE",
    "CSV_COLUMNS",
    "PARENTS",
    "shadow",
    "render",
    "sample",
    "counterfactual",
    "normalise",
    "denormalise",
    "write_dataset",
    "read_dataset",
    "SPATIAL_DIMS",
    "CHANNELS",
]

# The causal graph, units, normalisation and ranges are declared once, in cdae_med's built-in
# "pendulum" graph; this module renders what it declares.
GRAPH = builtin_graph("pendulum")
VARIABLES = GRAPH.names
UNITS = {v.name: v.unit for v in GRAPH.variables}
NORMALISATION = {v.name: (v.centre, v.scale) for v in GRAPH.variables}
RANGES = {v.name: (v.low, v.high) for v in GRAPH.variables}
PARENTS = {v.name: v.parents for v in GRAPH.variables}
DEFAULT_SIZE = 32
SPATIAL_DIMS = 2
CHANNELS = 3
# Header of labels.csv written by write_dataset: the image path (relative to the data set
# directory) then the VARIABLES, each with its unit suffix where it has one.
CSV_COLUMNS = ("file", "angle_deg", "light_deg", "shadow_len", "shadow_pos")

# --- scene constants (canvas units) -------------------------------------------------------
_X_RANGE = (0.0, 20.0)
_Y_RANGE = (-1.0, 21.0)
_PIVOT = (10.0, 10.5)
_ROD_LEN = 8.0
_ROD_HALF_WIDTH = 0.35
_BALL_R = 1.5
_FAR_POINT = 9.5  # distance pivot -> far side of the ball, used for the shadow
_LIGHT_Y = 20.5
_LIGHT_R = 1.2
_GROUND = -0.5  # base of the projection; the shadow bar is centred on it
_SHADOW_HALF_THICKNESS = 0.5

_BG = (250.0, 250.0, 247.0)
_ROD_RGB = (70.0, 70.0, 70.0)
_BALL_RGB = (220.0, 30.0, 30.0)
_LIGHT_RGB = (255.0, 170.0, 0.0)
_SHADOW_RGB = (20.0, 20.0, 20.0)

_PIXELS_PER_CHUNK = 1 << 20  # images are rendered in chunks of about this many pixels


def _cot(phi: np.ndarray) -> np.ndarray:
    # 1 / tan(phi) without the infinity of tan at phi = pi/2 (phi is in (0, pi), so sin > 0).
    return np.cos(phi) / np.sin(phi)


def _proj(x, y, base, phi):
    """CausalVAE's ``(base - (y - x tan phi)) / tan phi``, written as ``x + (base - y) cot phi``."""
    return x + (base - y) * _cot(phi)


def _light_x(light_deg) -> np.ndarray:
    return _proj(_PIVOT[0], _PIVOT[1], _LIGHT_Y, np.deg2rad(np.asarray(light_deg, dtype=np.float64)))


def shadow(angle_deg, light_deg) -> tuple[np.ndarray, np.ndarray]:
    """The causal mechanism: ``(shadow_len, shadow_pos)`` from angle and light (degrees).

    Vectorised; inputs broadcast against each other.
    """
    theta = np.deg2rad(np.asarray(angle_deg, dtype=np.float64))
    phi = np.deg2rad(np.asarray(light_deg, dtype=np.float64))
    x_pivot = _proj(_PIVOT[0], _PIVOT[1], _GROUND, phi)
    far_x = _PIVOT[0] + _FAR_POINT * np.sin(theta)
    far_y = _PIVOT[1] - _FAR_POINT * np.cos(theta)
    x_ball = _proj(far_x, far_y, _GROUND, phi)
    shadow_pos = (x_pivot + x_ball) / 2.0
    shadow_len = np.maximum(3.0, np.abs(x_pivot - x_ball))
    return shadow_len, shadow_pos


# --- label helpers ----------------------------------------------------------------------------


def _as_label_array(labels) -> np.ndarray:
    if isinstance(labels, Mapping):
        missing = [v for v in VARIABLES if v not in labels]
        if missing:
            raise ValueError(f"labels dict lacks {missing}; expected keys {VARIABLES}")
        unknown = [k for k in labels if k not in VARIABLES]
        if unknown:
            raise ValueError(f"unknown label variable(s) {unknown}; valid: {VARIABLES}")
        cols = [np.atleast_1d(np.asarray(labels[v], dtype=np.float64)) for v in VARIABLES]
        cols = np.broadcast_arrays(*cols)
        if cols[0].ndim != 1:
            raise ValueError("labels dict values must be 1-D arrays")
        return np.stack(cols, axis=1)
    arr = np.asarray(labels, dtype=np.float64)
    if arr.ndim == 1 and arr.shape[0] == len(VARIABLES):
        arr = arr[None, :]
    if arr.ndim != 2 or arr.shape[1] != len(VARIABLES):
        raise ValueError(f"labels must have shape (N, {len(VARIABLES)}) in order {VARIABLES}, got {arr.shape}")
    return arr


def normalise(labels: np.ndarray) -> np.ndarray:
    """``(labels - centre) / scale`` column-wise (VARIABLES order, last axis of size 4)."""
    return GRAPH.normalise(np.asarray(labels, dtype=np.float64))


def denormalise(z: np.ndarray) -> np.ndarray:
    """Inverse of :func:`normalise`."""
    return GRAPH.denormalise(np.asarray(z, dtype=np.float64))


# --- rendering --------------------------------------------------------------------------------


def _pixel_grid(size: int):
    sx = (_X_RANGE[1] - _X_RANGE[0]) / size  # canvas units per pixel, horizontally
    sy = (_Y_RANGE[1] - _Y_RANGE[0]) / size  # ... vertically
    xs = (_X_RANGE[0] + (np.arange(size) + 0.5) * sx).astype(np.float32)
    ys = (_Y_RANGE[1] - (np.arange(size) + 0.5) * sy).astype(np.float32)  # row 0 is the top
    return xs, ys, np.float32(sx), np.float32(sy)


def _coverage_from_offset(dx, dy, radius, sx, sy):
    """Anti-aliased coverage of the set {distance to a point/segment <= radius}.

    ``dx, dy`` are canvas offsets from the nearest point of the core shape.  The
    signed distance ``d - radius`` is converted to pixel units with the local
    gradient (pixels are not square), then a one-pixel linear ramp gives coverage.
    """
    d2 = dx * dx + dy * dy
    d = np.sqrt(d2)
    # |grad in pixel coords| * d  = sqrt((dx*sx)^2 + (dy*sy)^2)
    g = np.sqrt((dx * sx) ** 2 + (dy * sy) ** 2)
    np.maximum(g, np.float32(1e-12), out=g)
    dpix = (d - radius) * d / g
    # inside the core (d ~ 0) the formula is 0/0-ish; it is deep inside anyway
    dpix = np.where(d2 > 1e-12, dpix, -radius / np.minimum(sx, sy))
    return np.clip(np.float32(0.5) - dpix, 0.0, 1.0, dtype=np.float32)


def _disc(cx, cy, radius, xs, ys, sx, sy):
    dx = xs[None, None, :] - cx[:, None, None]
    dy = ys[None, :, None] - cy[:, None, None]
    return _coverage_from_offset(dx, dy, np.float32(radius), sx, sy)


def _capsule(px, py, ux, uy, length, half_width, xs, ys, sx, sy):
    ax = xs[None, None, :] - px[:, None, None]  # (N, 1, W)
    ay = ys[None, :, None] - py[:, None, None]  # (N, H, 1)
    t = ax * ux[:, None, None] + ay * uy[:, None, None]
    h = np.clip(t, np.float32(0.0), np.float32(length))
    dx = ax - h * ux[:, None, None]
    dy = ay - h * uy[:, None, None]
    return _coverage_from_offset(dx, dy, np.float32(half_width), sx, sy)


def _interval_cover(centres, half_pixel, lo, hi):
    """Fraction of each pixel interval [c - hp, c + hp] inside [lo, hi] (exact box filter)."""
    a = np.maximum(centres - half_pixel, lo)
    b = np.minimum(centres + half_pixel, hi)
    return np.clip((b - a) / (2 * half_pixel), 0.0, 1.0).astype(np.float32)


def _composite(img, alpha, rgb):
    # img (N, H, W, 3) float32; alpha (N, H, W)
    img += alpha[..., None] * (np.asarray(rgb, dtype=np.float32) - img)


def _render_chunk(lab: np.ndarray, size: int, grid) -> np.ndarray:
    xs, ys, sx, sy = grid
    n = lab.shape[0]
    angle, light, s_len, s_pos = (lab[:, k] for k in range(4))
    theta = np.deg2rad(angle)
    ux = np.sin(theta).astype(np.float32)
    uy = (-np.cos(theta)).astype(np.float32)
    px = np.full(n, _PIVOT[0], dtype=np.float32)
    py = np.full(n, _PIVOT[1], dtype=np.float32)
    ball_x = (_PIVOT[0] + _ROD_LEN * np.sin(theta)).astype(np.float32)
    ball_y = (_PIVOT[1] - _ROD_LEN * np.cos(theta)).astype(np.float32)
    light_x = _light_x(light).astype(np.float32)
    light_y = np.full(n, _LIGHT_Y, dtype=np.float32)

    img = np.empty((n, size, size, 3), dtype=np.float32)
    img[...] = np.asarray(_BG, dtype=np.float32)

    # shadow: axis-aligned bar, exact area coverage (separable)
    x0 = (s_pos - s_len / 2.0).astype(np.float32)[:, None]
    x1 = (s_pos + s_len / 2.0).astype(np.float32)[:, None]
    cov_x = _interval_cover(xs[None, :], sx / 2, x0, x1)  # (N, W)
    cov_y = _interval_cover(
        ys, sy / 2, np.float32(_GROUND - _SHADOW_HALF_THICKNESS), np.float32(_GROUND + _SHADOW_HALF_THICKNESS)
    )  # (H,)
    _composite(img, cov_y[None, :, None] * cov_x[:, None, :], _SHADOW_RGB)

    _composite(img, _capsule(px, py, ux, uy, _ROD_LEN, _ROD_HALF_WIDTH, xs, ys, sx, sy), _ROD_RGB)
    _composite(img, _disc(ball_x, ball_y, _BALL_R, xs, ys, sx, sy), _BALL_RGB)
    _composite(img, _disc(light_x, light_y, _LIGHT_R, xs, ys, sx, sy), _LIGHT_RGB)

    np.rint(img, out=img)
    np.clip(img, 0, 255, out=img)
    return img.astype(np.uint8)


def render(labels, size: int = DEFAULT_SIZE) -> np.ndarray:
    """Render pendulum images from labels.

    ``labels`` is a dict of 1-D arrays keyed by :data:`VARIABLES` or an ``(N, 4)`` array in
    VARIABLES order (own units).  The shadow is drawn from the GIVEN ``shadow_len`` and
    ``shadow_pos`` (not recomputed), so interventions on the shadow can be rendered.
    Returns uint8 RGB images of shape ``(N, size, size, 3)``.
    """
    size = int(size)
    if size < 16:
        raise ValueError(f"size must be >= 16, got {size}")
    lab = _as_label_array(labels)
    if not np.all(np.isfinite(lab)):
        raise ValueError("labels contain non-finite values")
    n = lab.shape[0]
    out = np.empty((n, size, size, 3), dtype=np.uint8)
    grid = _pixel_grid(size)
    chunk = max(1, _PIXELS_PER_CHUNK // (size * size))
    for start in range(0, n, chunk):
        out[start : start + chunk] = _render_chunk(lab[start : start + chunk], size, grid)
    return out


# --- sampling and interventions -----------------------------------------------------------------


def _sample_labels(n: int, seed: int) -> np.ndarray:
    if int(n) < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    # One (n, 2) draw, row by row: sample(k, seed) is the first k rows of sample(n, seed).
    u = np.random.default_rng(seed).random((int(n), 2))
    (a_lo, a_hi), (l_lo, l_hi) = RANGES["angle"], RANGES["light"]
    angle = a_lo + (a_hi - a_lo) * u[:, 0]
    light = l_lo + (l_hi - l_lo) * u[:, 1]
    s_len, s_pos = shadow(angle, light)
    return np.stack([angle, light, s_len, s_pos], axis=1)


def sample(n: int, seed: int = 0, size: int = DEFAULT_SIZE) -> Samples:
    """Draw ``n`` observational samples.

    Angle and light are uniform (continuous) over their RANGES, drawn with
    ``np.random.default_rng(seed)`` one row per sample, so the first k of n samples do not
    depend on n; the shadow comes from
    :func:`shadow`.  Images are uint8 (n, size, size, 3), labels float64 (n, 4); the
    exogenous noise is the angle and light themselves (the scene has no other randomness).
    """
    labels = _sample_labels(n, seed)
    return Samples(render(labels, size), labels, {"angle": labels[:, 0].copy(), "light": labels[:, 1].copy()})


def counterfactual(samples, do: Mapping[str, float | np.ndarray], size: int = DEFAULT_SIZE) -> Samples:
    """True counterfactual images and labels under the intervention ``do``.

    Each row keeps its exogenous values (angle, light); the intervened variables are set
    (scalars or one value per row, inside the graph's ranges; see
    :func:`synthetic_data.base.parse_do`); shadow_len/shadow_pos are recomputed from the
    mechanism unless intervened themselves.  ``samples`` is a :class:`Samples` or an (N, 4)
    label array (the labels hold all of this scene's exogenous values).
    """
    lab = _as_label_array(samples.labels if isinstance(samples, Samples) else samples).copy()
    values = parse_do(GRAPH, do, lab.shape[0])
    for name, value in values.items():
        lab[:, VARIABLES.index(name)] = value
    s_len, s_pos = shadow(lab[:, 0], lab[:, 1])
    if "shadow_len" not in values:
        lab[:, 2] = s_len
    if "shadow_pos" not in values:
        lab[:, 3] = s_pos
    return Samples(render(lab, size), lab, {"angle": lab[:, 0].copy(), "light": lab[:, 1].copy()})


# --- files ------------------------------------------------------------------------------------


def write_dataset(out_dir, n: int, size: int = DEFAULT_SIZE, seed: int = 0, progress: bool = True) -> pathlib.Path:
    """Write ``n`` samples (same as ``sample(n, seed, size)``) to ``out_dir``.

    Creates ``images/000000.png ...``, ``labels.csv`` (header :data:`CSV_COLUMNS`, file paths
    relative to ``out_dir``) and ``normalisation.json``.  Returns the CSV path.
    """
    from PIL import Image
    from tqdm import tqdm

    out_dir = pathlib.Path(out_dir)
    img_dir = out_dir / "images"
    img_dir.mkdir(parents=True, exist_ok=True)
    labels = _sample_labels(n, seed)
    width = max(6, len(str(max(int(n) - 1, 0))))
    chunk = max(1, _PIXELS_PER_CHUNK // (int(size) * int(size)))
    files = []
    with tqdm(total=int(n), disable=not progress, desc="pendulum", unit="img") as bar:
        for start in range(0, int(n), chunk):
            images = render(labels[start : start + chunk], size)
            for k, im in enumerate(images):
                rel = f"images/{start + k:0{width}d}.png"
                Image.fromarray(im).save(out_dir / rel)
                files.append(rel)
            bar.update(len(images))

    csv_path = out_dir / "labels.csv"
    with open(csv_path, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(CSV_COLUMNS)
        for rel, row in zip(files, labels):
            writer.writerow([rel] + [repr(float(v)) for v in row])

    norm = {v: {"centre": NORMALISATION[v][0], "scale": NORMALISATION[v][1], "unit": UNITS[v]} for v in VARIABLES}
    with open(out_dir / "normalisation.json", "w") as fh:
        json.dump(norm, fh, indent=2)
    return csv_path


def read_dataset(out_dir) -> tuple[np.ndarray, np.ndarray]:
    """Read a data set written by :func:`write_dataset`: ``(images uint8 NHWC, labels (N, 4))``."""
    from PIL import Image

    out_dir = pathlib.Path(out_dir)
    with open(out_dir / "labels.csv", newline="") as fh:
        reader = csv.reader(fh)
        header = tuple(next(reader))
        if header != CSV_COLUMNS:
            raise ValueError(f"{out_dir / 'labels.csv'}: header {header} != expected {CSV_COLUMNS}")
        rows = list(reader)
    labels = np.array([[float(v) for v in r[1:]] for r in rows], dtype=np.float64).reshape(len(rows), len(VARIABLES))
    images = []
    for r in rows:
        with Image.open(out_dir / r[0]) as im:
            images.append(np.asarray(im.convert("RGB"), dtype=np.uint8))
    if images:
        return np.stack(images), labels
    return np.zeros((0, 0, 0, 3), dtype=np.uint8), labels
