"""Morpho-MNIST-style digits with a known causal graph: thickness -> intensity.

The causal mechanism is that of the synthetic Morpho-MNIST experiments of Pawlowski et al.
("Deep Structural Causal Models for Tractable Counterfactual Inference", NeurIPS 2020), built on
the morphometry of Castro et al. ("Morpho-MNIST", JMLR 2019)::

    thickness t = 0.5 + u_t,                     u_t ~ Gamma(concentration 10, rate 5)
    intensity i = 64 + 191 * sigmoid(2 (t - 2.5) + u_i),   u_i ~ Normal(0, std 0.5)

(the 0.5 of the paper's ``Normal(2 (t - 2.5), 0.5)`` is taken as the standard deviation, as in
Pyro's ``Normal(loc, scale)`` the paper's code uses).

Digit shapes.  No MNIST ships with any package, so by default each digit is drawn from a font
found on the machine (``*.ttf``/``*.otf`` under ``/usr/share/fonts`` and
``/usr/local/share/fonts``, sorted by path; PIL's built-in font when there is none): the glyph is
rendered large once, reduced to its skeleton (scikit-image ``skeletonize``) and cached as a point
set.  Each sample then warps that skeleton with its own random affine map (rotation, shear, scale,
aspect, shift) and a Simard-style elastic deformation (uniform noise smoothed by a Gaussian,
``alpha`` 30 px, ``sigma`` 4 px), all drawn from the sample's exogenous noise.  With
``mnist_dir`` the shapes come from real MNIST digits read from IDX files instead (their skeleton,
no warp).

Thickness.  The warped skeleton is rasterised on a x4 upsampled grid and *dilated by a disc* of
radius r (the exact dilation: the Euclidean distance transform of the skeleton, ``scipy.ndimage``,
thresholded at r, with a one-sub-pixel linear ramp for anti-aliasing, i.e. close to the coverage
of a x16 binary image), then averaged down to 28 x 28.  Growing the stroke from the skeleton is
thickening and thinning in one operation and never breaks a stroke.  r is calibrated per sample
(a safeguarded secant search, at most :data:`_MAX_EVALS` renderings) so that the thickness
*measured* on the rendered digit matches the target t.

Measurement (Castro 2019): the digit is upsampled x4 (bilinear), binarised at half its maximum,
skeletonised; thickness = 2 * mean of the distance transform along the skeleton / 4.  (Morpho-MNIST
uses ``medial_axis`` and a bicubic pyramid expansion; ``skeletonize`` and bilinear are 100x faster
and the calibration absorbs the difference.)  Intensity: the pixels are scaled so that the median
of the foreground (pixels >= 50 % of the maximum) equals i, clipped to [0, 255], rounded to uint8.

Labels are what is *measured* on the final 28 x 28 uint8 digit: thickness (px) and the foreground
median intensity.  Typical |measured - target| thickness is a few hundredths of a pixel (see the
tests); the intensity label is within about half a grey level of i.  Images are the 28 x 28 digit
zero-padded (centred) to ``size`` (default 32, so three stride-2 levels fit).

Reproducibility: ``sample(n, seed)`` is deterministic on one machine; font-based digits depend on
the fonts installed, so two machines with different fonts give different images for one seed.
"""

from __future__ import annotations

import csv
import gzip
import json
import math
import pathlib
from typing import Mapping

import numpy as np
from scipy import ndimage as ndi

from cdae_med.graph import builtin_graph

from .base import Samples, parse_do

__all__ = [
    "GRAPH",
    "VARIABLES",
    "UNITS",
    "NORMALISATION",
    "RANGES",
    "PARENTS",
    "DEFAULT_SIZE",
    "SPATIAL_DIMS",
    "CHANNELS",
    "CSV_COLUMNS",
    "DIGIT_SIZE",
    "intensity_mechanism",
    "measure_thickness",
    "measure_intensity",
    "font_paths",
    "read_idx",
    "load_mnist",
    "sample",
    "counterfactual",
    "normalise",
    "denormalise",
    "write_dataset",
    "read_dataset",
]

GRAPH = builtin_graph("morphomnist")
VARIABLES = GRAPH.names  # ("thickness", "intensity")
UNITS = {v.name: v.unit for v in GRAPH.variables}
NORMALISATION = {v.name: (v.centre, v.scale) for v in GRAPH.variables}
RANGES = {v.name: (v.low, v.high) for v in GRAPH.variables}
PARENTS = {v.name: v.parents for v in GRAPH.variables}
DEFAULT_SIZE = 32
SPATIAL_DIMS = 2
CHANNELS = 1
DIGIT_SIZE = 28  # the digit canvas; images are this canvas zero-padded to ``size``
# Header of labels.csv: image path (relative to the data set directory), digit class (-1 when
# unknown), then the VARIABLES with their unit suffix where they have a short one.
CSV_COLUMNS = ("file", "digit", "thickness_px", "intensity")

# --- mechanism constants -----------------------------------------------------------------------
_T_OFFSET = 0.5
_GAMMA_SHAPE = 10.0
_GAMMA_RATE = 5.0
_I_LOW = 64.0
_I_SPAN = 191.0
_I_NOISE_STD = 0.5

# --- shape constants ---------------------------------------------------------------------------
_UP = 4  # sub-pixels per pixel for rendering and measuring
_SKELETON_HEIGHT = 17.0  # px: height of a glyph's skeleton before the random scale
_GLYPH_PX = 128  # font size glyphs are rasterised at
_ROT_STD, _ROT_MAX = 8.0, 20.0  # degrees
_SHEAR_MAX = 0.25
_SCALE_RANGE = (0.85, 1.1)
_ASPECT_RANGE = (0.85, 1.15)
_SHIFT_MAX = 1.0  # px
_ELASTIC_ALPHA = 30.0  # px
_ELASTIC_SIGMA = 4.0  # px
_FONT_DIRS = ("/usr/share/fonts", "/usr/local/share/fonts")

# --- calibration of the dilation radius ------------------------------------------------------------
_SLOPE = 2.1  # d(measured thickness)/d(radius), roughly, for a first guess and steps
_OFFSET = 0.05
_R_MIN = 0.05  # px
_MARGIN_PX = 5  # the distance map extends this far beyond the skeleton ...
_R_MAX = _MARGIN_PX - 0.5  # ... so a disc of at most this radius (px) fits (thickness ~9.5 px)
_TOL = 0.02  # px: stop the search when the measured thickness is this close
_MAX_EVALS = 5


# --- mechanism --------------------------------------------------------------------------------------


def _sigmoid(x):
    return 0.5 * (1.0 + np.tanh(0.5 * np.asarray(x, dtype=np.float64)))


def intensity_mechanism(thickness, u_intensity) -> np.ndarray:
    """``64 + 191 * sigmoid(2 (t - 2.5) + u)``; vectorised."""
    t = np.asarray(thickness, dtype=np.float64)
    return _I_LOW + _I_SPAN * _sigmoid(2.0 * (t - 2.5) + np.asarray(u_intensity, dtype=np.float64))


def _abduct_u_intensity(thickness, intensity) -> np.ndarray:
    """The u_i that makes :func:`intensity_mechanism` give ``intensity`` (clipped to be finite)."""
    p = np.clip((np.asarray(intensity, dtype=np.float64) - _I_LOW) / _I_SPAN, 1e-12, 1.0 - 1e-12)
    return np.log(p) - np.log1p(-p) - 2.0 * (np.asarray(thickness, dtype=np.float64) - 2.5)


def normalise(labels: np.ndarray) -> np.ndarray:
    """``(labels - centre) / scale`` column-wise (VARIABLES order)."""
    return GRAPH.normalise(np.asarray(labels, dtype=np.float64))


def denormalise(z: np.ndarray) -> np.ndarray:
    """Inverse of :func:`normalise`."""
    return GRAPH.denormalise(np.asarray(z, dtype=np.float64))


# --- measurement --------------------------------------------------------------------------------------


def _skeletonize(binary: np.ndarray) -> np.ndarray:
    from skimage.morphology import skeletonize

    return skeletonize(binary)


def measure_thickness(image) -> float:
    """Morpho-MNIST mean thickness (px) of one 2-D grey image (any scale, background 0).

    The image is cropped to its support, upsampled x4 (bilinear), binarised at half its maximum
    and skeletonised; the result is twice the mean Euclidean distance transform along the
    skeleton, divided by 4.  0.0 for an empty image.
    """
    img = np.asarray(image, dtype=np.float64)
    if img.ndim == 3 and img.shape[-1] == 1:
        img = img[..., 0]
    m = float(img.max()) if img.size else 0.0
    if m <= 0:
        return 0.0
    rows = np.flatnonzero(img.max(axis=1) > 0)
    cols = np.flatnonzero(img.max(axis=0) > 0)
    crop = img[max(rows[0] - 1, 0) : rows[-1] + 2, max(cols[0] - 1, 0) : cols[-1] + 2]
    up = ndi.zoom(crop, _UP, order=1, grid_mode=True, mode="grid-constant")
    binary = np.pad(up >= 0.5 * m, 1)
    skel = _skeletonize(binary)
    if not skel.any():
        return 0.0
    dist = ndi.distance_transform_edt(binary)
    return float(2.0 * dist[skel].mean() / _UP)


def measure_intensity(image) -> float:
    """Median of the foreground (pixels >= 50 % of the maximum); 0.0 for an empty image."""
    img = np.asarray(image, dtype=np.float64)
    m = float(img.max()) if img.size else 0.0
    if m <= 0:
        return 0.0
    return float(np.median(img[img >= 0.5 * m]))


# --- digit shapes: fonts ------------------------------------------------------------------------------

_FONT_CACHE: dict = {}


def font_paths() -> tuple[str, ...]:
    """Font files usable for digits, sorted (``"<PIL default>"`` alone when there is none)."""
    return tuple(name for name, _ in _font_glyphs())


def _load_font(name: str):
    from PIL import ImageFont

    if name == "<PIL default>":
        return ImageFont.load_default(size=_GLYPH_PX)
    return ImageFont.truetype(name, _GLYPH_PX)


def _glyph_skeleton(font, digit: int) -> np.ndarray | None:
    """Skeleton points of one glyph, (P, 2) (y, x), centred, skeleton height 1; None if blank."""
    from PIL import Image, ImageDraw

    size = 2 * _GLYPH_PX
    im = Image.new("L", (size, size), 0)
    ImageDraw.Draw(im).text((_GLYPH_PX // 2, _GLYPH_PX // 4), str(digit), fill=255, font=font)
    binary = np.asarray(im) >= 128
    if binary.sum() < 20:
        return None
    rows = np.flatnonzero(binary.any(axis=1))
    cols = np.flatnonzero(binary.any(axis=0))
    binary = np.pad(binary[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1], 2)
    ys, xs = np.nonzero(_skeletonize(binary))
    height = float(ys.max() - ys.min())
    if height < 8:
        return None
    cy, cx = (ys.max() + ys.min()) / 2.0, (xs.max() + xs.min()) / 2.0
    return np.stack([(ys - cy) / height, (xs - cx) / height], axis=1)


def _font_glyphs() -> list[tuple[str, list[np.ndarray]]]:
    """[(font name, [skeleton points of digits 0..9])], built once per process."""
    if "glyphs" in _FONT_CACHE:
        return _FONT_CACHE["glyphs"]
    files: set[str] = set()
    for d in _FONT_DIRS:
        p = pathlib.Path(d)
        if p.is_dir():
            files.update(str(f) for f in p.rglob("*") if f.suffix.lower() in (".ttf", ".otf") and f.is_file())
    out = []
    for name in sorted(files):
        glyphs = _try_font(name)
        if glyphs is not None:
            out.append((name, glyphs))
    if not out:
        glyphs = _try_font("<PIL default>")
        if glyphs is None:
            raise RuntimeError("no font renders the digits 0-9 (none under /usr/share/fonts, PIL default failed)")
        out.append(("<PIL default>", glyphs))
    _FONT_CACHE["glyphs"] = out
    return out


def _try_font(name: str):
    try:
        font = _load_font(name)
        glyphs = [_glyph_skeleton(font, d) for d in range(10)]
    except Exception:  # unreadable font file, bitmap-only font, ...
        return None
    if any(g is None for g in glyphs):
        return None
    # a font without digits draws the same "missing glyph" box for all ten
    keys = {(len(g), round(float(np.abs(g).sum()), 3)) for g in glyphs}
    if len(keys) < 10:
        return None
    return glyphs


def _warp(base: np.ndarray, rot, shear, scale, aspect, shift_x, shift_y, elastic_seed) -> np.ndarray:
    """Skeleton points (height 1, centred) -> (y, x) in 28-px canvas coordinates."""
    y = base[:, 0] * _SKELETON_HEIGHT
    x = base[:, 1] * _SKELETON_HEIGHT
    x = x - shear * y  # slant to the right going up (y grows downwards)
    y = y * scale
    x = x * scale * aspect
    c, s = math.cos(math.radians(rot)), math.sin(math.radians(rot))
    y, x = c * y - s * x, s * y + c * x
    centre = (DIGIT_SIZE - 1) / 2.0
    y = y + centre + shift_y
    x = x + centre + shift_x
    if elastic_seed >= 0:
        field = np.random.default_rng(int(elastic_seed)).uniform(-1.0, 1.0, size=(2, DIGIT_SIZE, DIGIT_SIZE))
        dy = ndi.gaussian_filter(field[0], _ELASTIC_SIGMA, mode="constant") * _ELASTIC_ALPHA
        dx = ndi.gaussian_filter(field[1], _ELASTIC_SIGMA, mode="constant") * _ELASTIC_ALPHA
        yx = np.stack([y, x])
        y = y + ndi.map_coordinates(dy, yx, order=1, mode="nearest")
        x = x + ndi.map_coordinates(dx, yx, order=1, mode="nearest")
    return np.stack([y, x], axis=1)


# --- digit shapes: MNIST IDX files ---------------------------------------------------------------------


def read_idx(path) -> np.ndarray:
    """Read an IDX file (optionally gzipped) of unsigned bytes into a numpy array.

    Raises ValueError naming the file if it is not an IDX file of unsigned bytes or is truncated.
    """
    path = pathlib.Path(path)
    try:
        with open(path, "rb") as fh:
            raw = fh.read()
        if raw[:2] == b"\x1f\x8b":
            raw = gzip.decompress(raw)
    except OSError as err:  # includes a corrupt gzip stream
        raise ValueError(f"{path}: cannot read IDX file ({err})") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0:
        raise ValueError(f"{path}: not an IDX file (bad magic number {raw[:4].hex() or 'empty'})")
    if raw[2] != 0x08:
        raise ValueError(f"{path}: IDX data type 0x{raw[2]:02x} is not unsigned byte (0x08)")
    ndim = raw[3]
    header = 4 + 4 * ndim
    if ndim == 0 or len(raw) < header:
        raise ValueError(f"{path}: truncated IDX header")
    shape = tuple(int(v) for v in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    count = int(np.prod(shape))
    if len(raw) - header != count:
        raise ValueError(f"{path}: IDX header says {shape} ({count} bytes) but the file holds {len(raw) - header}")
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(shape)


def _find_idx(mnist_dir: pathlib.Path, stem: str, required: bool) -> pathlib.Path | None:
    candidates = [stem, stem + ".gz", stem.replace("-idx", ".idx"), stem.replace("-idx", ".idx") + ".gz"]
    for c in candidates:
        if (mnist_dir / c).is_file():
            return mnist_dir / c
    if required:
        raise ValueError(f"no MNIST file {mnist_dir / stem} (or {stem}.gz) in {mnist_dir}")
    return None


def load_mnist(mnist_dir) -> tuple[np.ndarray, np.ndarray]:
    """``(images uint8 (N, 28, 28), digits int64 (N,))`` from ``train-images-idx3-ubyte[.gz]`` and,
    when present, ``train-labels-idx1-ubyte[.gz]`` (digits are -1 without it)."""
    mnist_dir = pathlib.Path(mnist_dir)
    if not mnist_dir.is_dir():
        raise ValueError(f"mnist_dir {mnist_dir} is not a directory")
    img_path = _find_idx(mnist_dir, "train-images-idx3-ubyte", required=True)
    images = read_idx(img_path)
    if images.ndim != 3 or images.shape[1:] != (DIGIT_SIZE, DIGIT_SIZE) or len(images) == 0:
        raise ValueError(f"{img_path}: expected MNIST images of shape (N, 28, 28), got {images.shape}")
    lab_path = _find_idx(mnist_dir, "train-labels-idx1-ubyte", required=False)
    if lab_path is None:
        digits = np.full(len(images), -1, dtype=np.int64)
    else:
        digits = read_idx(lab_path).astype(np.int64)
        if digits.shape != (len(images),):
            raise ValueError(f"{lab_path}: expected {len(images)} labels, got shape {digits.shape}")
    return images, digits


def _mnist_skeleton(image: np.ndarray) -> np.ndarray:
    """Skeleton points (y, x) of a real digit in 28-px canvas coordinates (empty if blank)."""
    img = np.asarray(image, dtype=np.float64)
    m = img.max()
    if m <= 0:
        return np.zeros((0, 2))
    up = ndi.zoom(img, _UP, order=1, grid_mode=True, mode="grid-constant")
    ys, xs = np.nonzero(_skeletonize(up >= 0.5 * m))
    return np.stack([(ys + 0.5) / _UP - 0.5, (xs + 0.5) / _UP - 0.5], axis=1)


# --- rendering -----------------------------------------------------------------------------------------


class _Shape:
    """A sample's warped skeleton and its distance transform, for rendering at any radius."""

    def __init__(self, points: np.ndarray):
        self.empty = len(points) == 0
        if self.empty:
            return
        idx = np.rint(points * _UP + (_UP - 1) / 2.0).astype(np.int64)  # nearest sub-pixel
        margin = _MARGIN_PX * _UP  # sub-pixels; radii are capped so that every disc fits
        lo = (np.floor((idx.min(axis=0) - margin) / _UP) * _UP).astype(np.int64)
        hi = (np.ceil((idx.max(axis=0) + margin + 1) / _UP) * _UP).astype(np.int64)
        lo = np.maximum(lo, -margin)  # points further than the margin off the canvas cannot reach it
        hi = np.minimum(hi, DIGIT_SIZE * _UP + margin)
        if np.any(hi <= lo):
            self.empty = True
            return
        keep = np.all((idx >= lo) & (idx < hi), axis=1)
        mask = np.ones(tuple(hi - lo), dtype=bool)
        mask[idx[keep, 0] - lo[0], idx[keep, 1] - lo[1]] = False
        self.empty = not keep.any()
        if self.empty:
            return
        self.dist = ndi.distance_transform_edt(mask).astype(np.float32)
        self.lo = lo // _UP  # block origin in canvas pixels
        self.cache: dict[float, np.ndarray] = {}

    def coverage(self, radius: float) -> np.ndarray:
        """28 x 28 float coverage in [0, 1] of the skeleton dilated by a disc of ``radius`` px."""
        out = np.zeros((DIGIT_SIZE, DIGIT_SIZE), dtype=np.float64)
        if self.empty:
            return out
        key = float(radius)
        if key in self.cache:
            return self.cache[key]
        cov = np.clip(np.float32(radius * _UP + 0.5) - self.dist, 0.0, 1.0)
        h, w = cov.shape[0] // _UP, cov.shape[1] // _UP
        blocks = cov.reshape(h, _UP, w, _UP).mean(axis=(1, 3), dtype=np.float64)
        y0, x0 = int(self.lo[0]), int(self.lo[1])
        ys, xs = max(0, -y0), max(0, -x0)
        ye, xe = min(h, DIGIT_SIZE - y0), min(w, DIGIT_SIZE - x0)
        if ye > ys and xe > xs:
            out[y0 + ys : y0 + ye, x0 + xs : x0 + xe] = blocks[ys:ye, xs:xe]
        self.cache[key] = out
        return out


def _calibrate(shape: _Shape, target: float) -> np.ndarray:
    """Coverage whose measured thickness is closest to ``target`` (safeguarded secant on the radius)."""
    if shape.empty:
        return shape.coverage(0.0)
    r_max = _R_MAX
    r = float(np.clip((target - _OFFSET) / _SLOPE, _R_MIN, r_max))
    best = (math.inf, None)
    lo = hi = None  # (r, measured) with measured < target / > target
    for _ in range(_MAX_EVALS):
        cov = shape.coverage(r)
        m = measure_thickness(cov)
        err = m - target
        if abs(err) < best[0]:
            best = (abs(err), cov)
        if abs(err) <= _TOL:
            break
        if err < 0:
            lo = (r, m) if lo is None or r > lo[0] else lo
        else:
            hi = (r, m) if hi is None or r < hi[0] else hi
        if lo is not None and hi is not None:
            (r0, m0), (r1, m1) = lo, hi
            if r1 - r0 < 1e-3:
                break
            nxt = r0 + (target - m0) * (r1 - r0) / (m1 - m0) if m1 > m0 else 0.5 * (r0 + r1)
            nxt = float(np.clip(nxt, r0 + 0.1 * (r1 - r0), r1 - 0.1 * (r1 - r0)))
        else:
            nxt = float(np.clip(r - err / _SLOPE, _R_MIN, r_max))
            if nxt == r:
                break
        r = nxt
    return best[1]


def _scale_intensity(cov: np.ndarray, intensity: float) -> np.ndarray:
    """uint8 digit whose foreground median is ``intensity`` (pixels scaled, clipped to [0, 255])."""
    m = cov.max()
    if m <= 0:
        return np.zeros(cov.shape, dtype=np.uint8)
    k = intensity / np.median(cov[cov >= 0.5 * m])
    best = (math.inf, None)
    # Rounding and clipping at 255 move the foreground (>= half the maximum) and so its median, a
    # step function of k: a few fixed-point steps on the final uint8 image, keeping the closest.
    for _ in range(6):
        img = np.rint(np.clip(k * cov, 0.0, 255.0))
        med = measure_intensity(img)
        if abs(med - intensity) < best[0]:
            best = (abs(med - intensity), img)
        if abs(med - intensity) <= 0.5 or med <= 0:
            break
        k *= intensity / med
    return best[1].astype(np.uint8)


def _shape_points(noise: Mapping[str, np.ndarray], k: int) -> np.ndarray:
    if int(noise["mnist_index"][k]) >= 0:
        return _mnist_skeleton(noise["source_image"][k])
    glyphs = _font_glyphs()
    f = int(noise["font"][k])
    if not 0 <= f < len(glyphs):
        raise ValueError(
            f"sample {k}: font index {f} but this machine has {len(glyphs)} usable fonts "
            "(samples drawn on another machine cannot be re-rendered here)"
        )
    base = glyphs[f][1][int(noise["digit"][k])]
    return _warp(base, float(noise["rotation_deg"][k]), float(noise["shear"][k]), float(noise["scale"][k]),
                 float(noise["aspect"][k]), float(noise["shift_x"][k]), float(noise["shift_y"][k]),
                 int(noise["elastic_seed"][k]))


def _render(noise, thickness: np.ndarray, intensity: np.ndarray, size: int, bar=None) -> Samples:
    """Render every sample at the given (target) thickness and intensity; labels are measured."""
    n = len(thickness)
    pad = (size - DIGIT_SIZE) // 2
    images = np.zeros((n, size, size, CHANNELS), dtype=np.uint8)
    labels = np.zeros((n, len(VARIABLES)), dtype=np.float64)
    for k in range(n):
        cov = _calibrate(_Shape(_shape_points(noise, k)), float(thickness[k]))
        digit = _scale_intensity(cov, float(intensity[k]))
        images[k, pad : pad + DIGIT_SIZE, pad : pad + DIGIT_SIZE, 0] = digit
        labels[k, 0] = measure_thickness(digit)
        labels[k, 1] = measure_intensity(digit)
        if bar is not None:
            bar.update(1)
    return Samples(images, labels, {key: np.array(v, copy=True) for key, v in noise.items()})


def _check_size(size) -> int:
    size = int(size)
    if size < DIGIT_SIZE or size % 2:
        raise ValueError(f"size must be an even number >= {DIGIT_SIZE} (a multiple of 4 for the models), got {size}")
    return size


# --- sampling and interventions ------------------------------------------------------------------------


def _draw_noise(n: int, seed: int, mnist_dir=None) -> dict[str, np.ndarray]:
    """Every sample's exogenous noise from one (n, 11) matrix of uniforms, row by row, so that
    the first k samples of ``sample(n, seed)`` are ``sample(k, seed)``."""
    from scipy.special import gammaincinv, ndtri

    if int(n) < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    n = int(n)
    rng = np.random.default_rng(seed)
    if mnist_dir is not None:
        images, digits = load_mnist(mnist_dir)
        order = rng.permutation(len(images))  # without repetition while n <= len(images)
    u = rng.random((n, 11))
    u = np.clip(u, 1e-12, 1.0 - 1e-12)
    noise: dict[str, np.ndarray] = {}
    if mnist_dir is None:
        noise["digit"] = np.floor(u[:, 0] * 10).astype(np.int64)
        noise["font"] = np.floor(u[:, 1] * len(_font_glyphs())).astype(np.int64)
        noise["mnist_index"] = np.full(n, -1, dtype=np.int64)
        noise["rotation_deg"] = np.clip(ndtri(u[:, 2]) * _ROT_STD, -_ROT_MAX, _ROT_MAX)
        noise["shear"] = _SHEAR_MAX * (2.0 * u[:, 3] - 1.0)
        noise["scale"] = _SCALE_RANGE[0] + (_SCALE_RANGE[1] - _SCALE_RANGE[0]) * u[:, 4]
        noise["aspect"] = _ASPECT_RANGE[0] + (_ASPECT_RANGE[1] - _ASPECT_RANGE[0]) * u[:, 5]
        noise["shift_x"] = _SHIFT_MAX * (2.0 * u[:, 6] - 1.0)
        noise["shift_y"] = _SHIFT_MAX * (2.0 * u[:, 7] - 1.0)
        noise["elastic_seed"] = np.floor(u[:, 8] * 2.0**53).astype(np.int64)
    else:
        index = order[np.arange(n) % len(images)].astype(np.int64)
        noise["digit"] = digits[index]
        noise["font"] = np.full(n, -1, dtype=np.int64)
        noise["mnist_index"] = index
        for key, value in (("rotation_deg", 0.0), ("shear", 0.0), ("scale", 1.0), ("aspect", 1.0),
                           ("shift_x", 0.0), ("shift_y", 0.0)):
            noise[key] = np.full(n, value)
        noise["elastic_seed"] = np.full(n, -1, dtype=np.int64)
        noise["source_image"] = images[index].copy()
    noise["u_thickness"] = gammaincinv(_GAMMA_SHAPE, u[:, 9]) / _GAMMA_RATE  # Gamma(10, rate 5)
    noise["u_intensity"] = _I_NOISE_STD * ndtri(u[:, 10])  # Normal(0, std 0.5)
    return noise


def sample(n: int, seed: int = 0, size: int = DEFAULT_SIZE, mnist_dir=None, progress: bool = False) -> Samples:
    """Draw ``n`` observational digits.

    All exogenous noise comes from ``np.random.default_rng(seed)`` (by inverse CDFs of one row of
    uniforms per sample, so ``sample(k, seed)`` is the first k of ``sample(n, seed)``): digit
    class, font index, affine parameters and elastic seed (fonts) or an MNIST index (a seeded
    permutation, ``mnist_dir``), then ``u_thickness`` and ``u_intensity``.  The target thickness
    is ``0.5 + u_thickness``; the intensity comes from :func:`intensity_mechanism`.  Returns uint8 images (n, size, size, 1) and float64 labels
    (n, 2) = measured (thickness px, foreground median intensity); ``noise`` holds the exogenous
    values (and, for MNIST, the source digits under ``source_image``).
    """
    size = _check_size(size)
    noise = _draw_noise(n, seed, mnist_dir)
    return _render_noise(noise, size, progress)


def _render_noise(noise, size, progress=False, desc="morphomnist") -> Samples:
    from tqdm import tqdm

    t = _T_OFFSET + noise["u_thickness"]
    i = intensity_mechanism(t, noise["u_intensity"])
    with tqdm(total=len(t), disable=not progress, desc=desc, unit="img") as bar:
        return _render(noise, t, i, size, bar)


def counterfactual(samples: Samples, do: Mapping[str, float | np.ndarray], size: int = DEFAULT_SIZE) -> Samples:
    """True counterfactual digits under ``do``, for the exogenous noise of ``samples``.

    do(thickness=v) re-renders the same warped digit at target thickness v and recomputes the
    intensity from the mechanism with the same ``u_intensity``; do(intensity=v) keeps the shape and
    thickness and sets the intensity.  Values are scalars or one per sample, in the variables' units,
    inside the graph's ranges.  The returned noise is the counterfactual world's: ``u_thickness``
    = v - 0.5 and, under do(intensity), the ``u_intensity`` that gives v from the mechanism.
    """
    if not isinstance(samples, Samples) or "u_thickness" not in samples.noise:
        raise ValueError("counterfactual needs the Samples returned by morphomnist.sample (with their noise)")
    size = _check_size(size)
    values = parse_do(GRAPH, do, len(samples))
    noise = {k: np.array(v, copy=True) for k, v in samples.noise.items()}
    t = _T_OFFSET + noise["u_thickness"]
    if "thickness" in values:
        t = values["thickness"]
        noise["u_thickness"] = t - _T_OFFSET
    if "intensity" in values:
        i = values["intensity"]
        noise["u_intensity"] = _abduct_u_intensity(t, i)
    else:
        i = intensity_mechanism(t, noise["u_intensity"])
    return _render(noise, t, i, size)


# --- files ---------------------------------------------------------------------------------------------


def write_dataset(out_dir, n: int, size: int = DEFAULT_SIZE, seed: int = 0, progress: bool = True,
                  mnist_dir=None) -> pathlib.Path:
    """Write ``n`` samples (the same as ``sample(n, seed, size, mnist_dir)``) to ``out_dir``.

    Creates ``images/000000.png ...`` (8-bit grey), ``labels.csv`` (header :data:`CSV_COLUMNS`,
    paths relative to ``out_dir``) and ``normalisation.json``.  Returns the CSV path.
    """
    from PIL import Image
    from tqdm import tqdm

    size = _check_size(size)
    out_dir = pathlib.Path(out_dir)
    img_dir = out_dir / "images"
    img_dir.mkdir(parents=True, exist_ok=True)
    noise = _draw_noise(n, seed, mnist_dir)
    t = _T_OFFSET + noise["u_thickness"]
    i = intensity_mechanism(t, noise["u_intensity"])
    width = max(6, len(str(max(int(n) - 1, 0))))
    chunk = 1000
    rows = []
    with tqdm(total=int(n), disable=not progress, desc="morphomnist", unit="img") as bar:
        for start in range(0, int(n), chunk):
            part = {k: v[start : start + chunk] for k, v in noise.items()}
            s = _render(part, t[start : start + chunk], i[start : start + chunk], size, bar)
            for k, (im, lab) in enumerate(zip(s.images, s.labels)):
                rel = f"images/{start + k:0{width}d}.png"
                Image.fromarray(im[..., 0], mode="L").save(out_dir / rel)
                rows.append([rel, int(part["digit"][k])] + [repr(float(v)) for v in lab])

    csv_path = out_dir / "labels.csv"
    with open(csv_path, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(CSV_COLUMNS)
        writer.writerows(rows)
    norm = {v: {"centre": NORMALISATION[v][0], "scale": NORMALISATION[v][1], "unit": UNITS[v]} for v in VARIABLES}
    with open(out_dir / "normalisation.json", "w") as fh:
        json.dump(norm, fh, indent=2)
    return csv_path


def read_dataset(out_dir, with_digits: bool = False):
    """Read a data set written by :func:`write_dataset`: ``(images uint8 (N, H, W, 1), labels (N, 2))``,
    plus the digit classes (int64, -1 unknown) as a third item when ``with_digits``."""
    from PIL import Image

    out_dir = pathlib.Path(out_dir)
    with open(out_dir / "labels.csv", newline="") as fh:
        reader = csv.reader(fh)
        header = tuple(next(reader))
        if header != CSV_COLUMNS:
            raise ValueError(f"{out_dir / 'labels.csv'}: header {header} != expected {CSV_COLUMNS}")
        rows = list(reader)
    labels = np.array([[float(v) for v in r[2:]] for r in rows], dtype=np.float64).reshape(len(rows), len(VARIABLES))
    digits = np.array([int(r[1]) for r in rows], dtype=np.int64)
    images = []
    for r in rows:
        with Image.open(out_dir / r[0]) as im:
            images.append(np.asarray(im.convert("L"), dtype=np.uint8)[..., None])
    images = np.stack(images) if images else np.zeros((0, 0, 0, CHANNELS), dtype=np.uint8)
    return (images, labels, digits) if with_digits else (images, labels)
