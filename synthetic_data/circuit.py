"""Circuit: a 2D stand-in for CausalCircuit (a robot arm pressing buttons that switch lights).

CausalCircuit (Brehmer et al., "Weakly supervised causal representation learning", NeurIPS
2022) shows a MuJoCo-rendered TriFinger robot arm moving along an arc over a board with
buttons that switch a blue, a green and a red light; its four causal variables (arm position
and the three light intensities) all lie in [0, 1] and its graph is
``arm -> blue, arm -> green, arm -> red, blue -> red, green -> red``.  This module is a
**stand-in** for that data set, not a re-rendering of it: the same four variables and the same
graph (the built-in ``circuit`` graph of :mod:`cdae_med.graph`), a mechanism close in spirit
to the original (lights switch on when their button is pressed; red also when blue and green
are both on), and a flat, vectorised numpy drawing (analytic anti-aliasing) of a schematic
board seen from above.  No MuJoCo, no TriFinger mesh, no data of the original are used.

Scene (canvas coordinates, x and y in [0, 20], y up, square pixels; see the constants below):

* a dark board; three lamps in a row near the top: red at x = 4, blue at x = 10, green at
  x = 16 (y = 17, radius 2), each in a grey socket.  A lamp's disc is drawn with the colour
  ``off + v * (on - off)`` (``v`` its variable: 0 = dark, 1 = fully lit) and a halo (glow)
  around it whose opacity is proportional to ``v``;
* a two-segment arm whose shoulder sits at (10, 2).  ``arm`` in [0, 1] moves the fingertip
  along an arc of radius 8.5 around the shoulder, from angle 150 deg (``arm = 0``, left) to
  30 deg (``arm = 1``, right): ``phi = 150 - 120 * arm`` degrees.  Both segments are 5 long; the
  elbow always bends the same way (counter-clockwise of the shoulder-fingertip line);
* three small buttons on that arc, tinted like their lamps, at ``arm`` = 0.15 (red), 0.6 (blue)
  and 0.8 (green).  The fingertip covers a button when it presses it.

The lamps (rows whose centre lies above y = 12.3) and the arm (the rows below) occupy disjoint
bands of the image: the lamp pixels depend on the lights only, the arm's pixels on ``arm`` only.

Causal mechanism (all variables in [0, 1]; ``U`` exogenous, one per variable and subject)::

    arm   = U_arm,                                   U_arm ~ Uniform(0, 1)
    p_k   = exp(-|fingertip(arm) - button_k|^2 / (2 * 2.5^2))   (press of button k, k = r, b, g)
    blue  = clip(0.1 + 0.8 * p_b + U_blue, 0, 1),     U_blue  ~ N(0, 0.1^2)
    green = clip(0.1 + 0.8 * p_g + U_green, 0, 1),    U_green ~ N(0, 0.1^2)
    red   = clip(0.1 + 0.8 * (1 - (1 - p_r) * (1 - blue * green)) + U_red, 0, 1),
                                                      U_red   ~ N(0, 0.1^2)

i.e. a light is dim (about 0.1) unless its button is pressed (about 0.9); red is a noisy OR of
"red button pressed" and "blue AND green on" (the product of their intensities).  The blue and
green buttons are close enough that a fingertip between them half-presses both, which lights
red moderately through the AND even in observational data; ``do(blue=1, green=1)`` lights it
fully wherever the arm is.

``Samples.noise`` holds ``{"arm": U_arm, "blue": U_blue, "green": U_green, "red": U_red}``
(keyed by the variable each term belongs to; ``U_arm`` is ``arm`` itself).
:func:`counterfactual` holds these fixed, sets the intervened variables and recomputes every
descendant in topological order (arm, blue, green, red).  Each call intervenes on the units
described by ``samples.noise``: the counterfactual of a counterfactual does not remember the
first intervention.
"""

from __future__ import annotations

import csv
import json
import pathlib
from typing import Mapping

import numpy as np
from scipy.special import ndtr

from cdae_med.graph import builtin_graph

from .base import Samples, parse_do

__all__ = [
    "VARIABLES",
    "UNITS",
    "NORMALISATION",
    "RANGES",
    "PARENTS",
    "DEFAULT_SIZE",
    "SPATIAL_DIMS",
    "CHANNELS",
    "CSV_COLUMNS",
    "NOISE_SD",
    "BUTTON_ARM",
    "fingertip",
    "press",
    "mechanism",
    "render",
    "sample",
    "counterfactual",
    "normalise",
    "denormalise",
    "write_dataset",
    "read_dataset",
]

# Graph, units, normalisation and ranges are declared once, in cdae_med's built-in "circuit" graph.
GRAPH = builtin_graph("circuit")
VARIABLES = GRAPH.names  # ("arm", "blue", "green", "red")
UNITS = {v.name: v.unit for v in GRAPH.variables}
NORMALISATION = {v.name: (v.centre, v.scale) for v in GRAPH.variables}
RANGES = {v.name: (v.low, v.high) for v in GRAPH.variables}
PARENTS = {v.name: v.parents for v in GRAPH.variables}
DEFAULT_SIZE = 32
SPATIAL_DIMS = 2
CHANNELS = 3
# Header of labels.csv: the image path (relative to the data set directory), then VARIABLES
# (all unitless, so no unit suffix).
CSV_COLUMNS = ("file",) + tuple(VARIABLES)

# --- mechanism constants --------------------------------------------------------------------
NOISE_SD = 0.1  # standard deviation of U_blue, U_green, U_red
_OFF_LEVEL = 0.1  # light intensity with no press (before noise)
_ON_GAIN = 0.8  # added when fully pressed: pressed lights sit at about 0.9
_PRESS_SIGMA = 2.5  # canvas units: width of the press bump (fingertip-to-button distance)
# arm value at which the fingertip is centred on each button
BUTTON_ARM = {"red": 0.15, "blue": 0.6, "green": 0.8}

# --- scene constants (canvas units, x and y in [0, 20], y up) ----------------------------------
_CANVAS = 20.0
_SHOULDER = (10.0, 2.0)
_REACH = 8.5  # shoulder -> fingertip distance (radius of the arc)
_PHI0, _PHI1 = np.deg2rad(150.0), np.deg2rad(30.0)  # fingertip angle at arm = 0 and arm = 1
_SEGMENT = 5.0  # length of each arm segment
_ELBOW_OFFSET = float(np.arccos(_REACH / 2.0 / _SEGMENT))  # elbow angle relative to phi
_SEG_HALF_WIDTH = 0.5
_SHOULDER_R = 1.4
_ELBOW_R = 0.7
_TIP_R = 0.95
_BUTTON_R = 1.0
_TRACK_HALF_WIDTH = 0.12
_LAMP_Y = 17.0
_LAMP_X = {"red": 4.0, "blue": 10.0, "green": 16.0}
_LAMP_R = 2.0
_SOCKET_R = 2.4
_GLOW_WIDTH = 1.8  # the halo fades to nothing this far outside the lamp disc
_GLOW_MAX = 0.6  # halo opacity at the lamp's rim when fully lit
# Rows whose pixel centre lies above this y hold the lamps, the others the arm.  The fingertip
# reaches y = 11.45 (+ half a pixel of anti-aliasing, under 0.85 units for size >= 16), the halos
# reach down to y = 12.8: no drawing crosses the line.
_SPLIT_Y = 12.3

_BG = (38.0, 42.0, 50.0)
_TRACK_RGB = (62.0, 67.0, 78.0)
_SOCKET_RGB = (105.0, 108.0, 118.0)
_SHOULDER_RGB = (95.0, 98.0, 110.0)
_SEGMENT_RGB = (165.0, 170.0, 182.0)
_ELBOW_RGB = (120.0, 124.0, 136.0)
_TIP_RGB = (245.0, 245.0, 240.0)
_LAMP_OFF = {"red": (34.0, 18.0, 18.0), "blue": (16.0, 20.0, 38.0), "green": (16.0, 32.0, 18.0)}
_LAMP_ON = {"red": (255.0, 55.0, 45.0), "blue": (70.0, 140.0, 255.0), "green": (60.0, 230.0, 90.0)}
_BUTTON_MIX = 0.45  # buttons: this share of the lamp's "on" colour over the board colour

_LIGHTS = ("blue", "green", "red")  # in VARIABLES order
_PIXELS_PER_CHUNK = 1 << 20  # images are rendered in chunks of about this many pixels


# --- mechanism ------------------------------------------------------------------------------------


def _phi(arm) -> np.ndarray:
    return _PHI0 + (_PHI1 - _PHI0) * np.asarray(arm, dtype=np.float64)


def fingertip(arm) -> tuple[np.ndarray, np.ndarray]:
    """Canvas ``(x, y)`` of the fingertip for arm position(s) ``arm`` in [0, 1]."""
    phi = _phi(arm)
    return _SHOULDER[0] + _REACH * np.cos(phi), _SHOULDER[1] + _REACH * np.sin(phi)


def _button_xy(light: str) -> tuple[float, float]:
    x, y = fingertip(BUTTON_ARM[light])
    return float(x), float(y)


def press(arm, light: str) -> np.ndarray:
    """How hard the fingertip presses ``light``'s button: a Gaussian bump of their distance, in (0, 1]."""
    if light not in BUTTON_ARM:
        raise ValueError(f"no button {light!r}; buttons: {tuple(BUTTON_ARM)}")
    tx, ty = fingertip(arm)
    bx, by = _button_xy(light)
    d2 = (tx - bx) ** 2 + (ty - by) ** 2
    return np.exp(-d2 / (2.0 * _PRESS_SIGMA**2))


def mechanism(noise: Mapping[str, np.ndarray], do: Mapping[str, np.ndarray] | None = None) -> np.ndarray:
    """Solve the SCM: ``(N, 4)`` labels (VARIABLES order) from exogenous ``noise`` under ``do``.

    ``noise`` maps each variable to its exogenous term (see the module docstring); ``do`` maps
    variables to the values they are set to (already checked and broadcast to ``(N,)``).
    Variables are computed in topological order, so every descendant of an intervened variable
    follows it.
    """
    do = {} if do is None else do
    u = {v: np.asarray(noise[v], dtype=np.float64) for v in VARIABLES}
    vals: dict[str, np.ndarray] = {}
    vals["arm"] = do["arm"] if "arm" in do else u["arm"]
    for light in ("blue", "green"):
        if light in do:
            vals[light] = do[light]
        else:
            vals[light] = np.clip(_OFF_LEVEL + _ON_GAIN * press(vals["arm"], light) + u[light], 0.0, 1.0)
    if "red" in do:
        vals["red"] = do["red"]
    else:
        drive = 1.0 - (1.0 - press(vals["arm"], "red")) * (1.0 - vals["blue"] * vals["green"])
        vals["red"] = np.clip(_OFF_LEVEL + _ON_GAIN * drive + u["red"], 0.0, 1.0)
    n = len(u["arm"])
    return np.stack([np.broadcast_to(np.asarray(vals[v], dtype=np.float64), (n,)) for v in VARIABLES], axis=1)


# --- label helpers ----------------------------------------------------------------------------------


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
    """``(labels - centre) / scale`` column-wise (VARIABLES order): [0, 1] -> [-1, 1]."""
    return GRAPH.normalise(np.asarray(labels, dtype=np.float64))


def denormalise(z: np.ndarray) -> np.ndarray:
    """Inverse of :func:`normalise`."""
    return GRAPH.denormalise(np.asarray(z, dtype=np.float64))


# --- rendering ----------------------------------------------------------------------------------------


class _Grid:
    """Pixel centres of one image size, the static layers and the two bands' row slices."""

    def __init__(self, size: int):
        self.size = size
        self.px = np.float32(_CANVAS / size)  # canvas units per pixel (square)
        self.xs = ((np.arange(size) + 0.5) * self.px).astype(np.float32)
        self.ys = (_CANVAS - (np.arange(size) + 0.5) * self.px).astype(np.float32)  # row 0 is the top
        split = int(np.count_nonzero(self.ys > _SPLIT_Y))
        self.lamp_rows, self.arm_rows = slice(0, split), slice(split, size)  # top band, bottom band
        ys_arm, ys_lamp = self.ys[self.arm_rows], self.ys[self.lamp_rows]

        # static background of the arm band: board, arc track, buttons, shoulder
        bg = np.empty((len(ys_arm), size, 3), dtype=np.float32)
        bg[...] = np.asarray(_BG, dtype=np.float32)
        dx = self.xs[None, :] - _SHOULDER[0]
        dy = ys_arm[:, None] - _SHOULDER[1]
        ring = np.abs(np.sqrt(dx * dx + dy * dy) - _REACH)
        _composite(bg, self._ramp(ring, _TRACK_HALF_WIDTH), _TRACK_RGB)
        for light in ("red", "blue", "green"):
            bx, by = _button_xy(light)
            rgb = _BUTTON_MIX * np.asarray(_LAMP_ON[light]) + (1 - _BUTTON_MIX) * np.asarray(_BG)
            _composite(bg, self._disc_static(bx, by, _BUTTON_R, ys_arm), rgb)
        _composite(bg, self._disc_static(*_SHOULDER, _SHOULDER_R, ys_arm), _SHOULDER_RGB)
        self.arm_bg = bg

        # lamp band: board + sockets (static), per-light halo profile and disc coverage
        bg = np.empty((len(ys_lamp), size, 3), dtype=np.float32)
        bg[...] = np.asarray(_BG, dtype=np.float32)
        self.glow, self.lamp, self.socket = {}, {}, {}
        for light in _LIGHTS:
            dx = self.xs[None, :] - _LAMP_X[light]
            dy = ys_lamp[:, None] - _LAMP_Y
            d = np.sqrt(dx * dx + dy * dy)
            self.glow[light] = (_GLOW_MAX * np.clip(1.0 - (d - _SOCKET_R) / _GLOW_WIDTH, 0.0, 1.0) ** 2).astype(
                np.float32
            )
            self.lamp[light] = self._ramp(d, _LAMP_R)
            self.socket[light] = self._ramp(d, _SOCKET_R)
        self.lamp_bg = bg

    def _ramp(self, dist, radius):
        """Anti-aliased coverage of {dist <= radius}: one-pixel linear ramp on the signed distance."""
        return np.clip(np.float32(0.5) - (dist - np.float32(radius)) / self.px, 0.0, 1.0).astype(np.float32)

    def _disc_static(self, cx, cy, r, ys):
        dx = self.xs[None, :] - cx
        dy = ys[:, None] - cy
        return self._ramp(np.sqrt(dx * dx + dy * dy), r)


_GRIDS: dict[int, _Grid] = {}


def _grid(size: int) -> _Grid:
    if size not in _GRIDS:
        _GRIDS[size] = _Grid(size)
    return _GRIDS[size]


def _composite(img, alpha, rgb):
    """``img += alpha * (rgb - img)``; alpha (..., H, W), rgb (3,) or (N, 3) per image."""
    rgb = np.asarray(rgb, dtype=np.float32)
    if rgb.ndim == 2:  # one colour per image
        rgb = rgb[:, None, None, :]
    img += alpha[..., None] * (rgb - img)


def _disc(cx, cy, radius, g: _Grid, ys):
    dx = g.xs[None, None, :] - cx[:, None, None]
    dy = ys[None, :, None] - cy[:, None, None]
    return g._ramp(np.sqrt(dx * dx + dy * dy), radius)


def _segment(ax_, ay_, bx, by, half_width, g: _Grid, ys):
    """Coverage of the capsule of ``half_width`` around segments (ax_, ay_) -> (bx, by), per image."""
    ux, uy = bx - ax_, by - ay_
    length = np.sqrt(ux * ux + uy * uy)
    ux, uy = ux / length, uy / length
    px = g.xs[None, None, :] - ax_[:, None, None]
    py = ys[None, :, None] - ay_[:, None, None]
    t = np.clip(px * ux[:, None, None] + py * uy[:, None, None], np.float32(0.0), length[:, None, None])
    dx = px - t * ux[:, None, None]
    dy = py - t * uy[:, None, None]
    return g._ramp(np.sqrt(dx * dx + dy * dy), half_width)


def _render_chunk(lab: np.ndarray, g: _Grid) -> np.ndarray:
    n, size = lab.shape[0], g.size
    img = np.empty((n, size, size, 3), dtype=np.float32)

    # lamps: halo (opacity ~ v) then socket then the disc in off + v (on - off)
    band = img[:, g.lamp_rows]
    band[...] = g.lamp_bg
    for k, light in enumerate(_LIGHTS, start=1):
        v = lab[:, k].astype(np.float32)
        _composite(band, v[:, None, None] * g.glow[light][None], _LAMP_ON[light])
    for light in _LIGHTS:
        _composite(band, g.socket[light][None], _SOCKET_RGB)
    for k, light in enumerate(_LIGHTS, start=1):
        v = lab[:, k : k + 1].astype(np.float32)
        off, on = np.asarray(_LAMP_OFF[light], np.float32), np.asarray(_LAMP_ON[light], np.float32)
        _composite(band, g.lamp[light][None], off + v * (on - off))

    # arm: upper segment, forearm, elbow joint, fingertip over the static band
    band = img[:, g.arm_rows]
    band[...] = g.arm_bg
    ys = g.ys[g.arm_rows]
    phi = _phi(lab[:, 0])
    sx = np.full(n, _SHOULDER[0], dtype=np.float32)
    sy = np.full(n, _SHOULDER[1], dtype=np.float32)
    ex = (_SHOULDER[0] + _SEGMENT * np.cos(phi + _ELBOW_OFFSET)).astype(np.float32)
    ey = (_SHOULDER[1] + _SEGMENT * np.sin(phi + _ELBOW_OFFSET)).astype(np.float32)
    tx, ty = (c.astype(np.float32) for c in fingertip(lab[:, 0]))
    _composite(band, _segment(sx, sy, ex, ey, _SEG_HALF_WIDTH, g, ys), _SEGMENT_RGB)
    _composite(band, _segment(ex, ey, tx, ty, _SEG_HALF_WIDTH, g, ys), _SEGMENT_RGB)
    _composite(band, _disc(ex, ey, _ELBOW_R, g, ys), _ELBOW_RGB)
    _composite(band, _disc(tx, ty, _TIP_R, g, ys), _TIP_RGB)

    np.rint(img, out=img)
    np.clip(img, 0, 255, out=img)
    return img.astype(np.uint8)


def render(labels, size: int = DEFAULT_SIZE) -> np.ndarray:
    """Render circuit images from labels.

    ``labels`` is a dict of 1-D arrays keyed by :data:`VARIABLES` or an ``(N, 4)`` array in
    VARIABLES order.  The lights are drawn from the GIVEN intensities (not recomputed from the
    arm), so interventions on the lights can be rendered.  Returns uint8 RGB images of shape
    ``(N, size, size, 3)``.
    """
    size = int(size)
    if size < 16:
        raise ValueError(f"size must be >= 16, got {size}")
    lab = _as_label_array(labels)
    if not np.all(np.isfinite(lab)):
        raise ValueError("labels contain non-finite values")
    n = lab.shape[0]
    out = np.empty((n, size, size, 3), dtype=np.uint8)
    g = _grid(size)
    chunk = max(1, _PIXELS_PER_CHUNK // (size * size))
    for start in range(0, n, chunk):
        out[start : start + chunk] = _render_chunk(lab[start : start + chunk], g)
    return out


# --- sampling and interventions ---------------------------------------------------------------------


def _sample_noise(n: int, seed: int) -> dict[str, np.ndarray]:
    if int(n) < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    n = int(n)
    # One (n, 4) normal draw, row by row, so sample(k, seed) is the first k of sample(n, seed);
    # the arm's uniform comes from its normal through the normal CDF.
    z = np.random.default_rng(seed).standard_normal((n, 4))
    lo, hi = RANGES["arm"]
    arm = lo + (hi - lo) * ndtr(z[:, 0])
    u = NOISE_SD * z[:, 1:].T
    return {"arm": arm, "blue": u[0], "green": u[1], "red": u[2]}


def sample(n: int, seed: int = 0, size: int = DEFAULT_SIZE) -> Samples:
    """Draw ``n`` observational samples.

    With ``np.random.default_rng(seed)``: one row of four standard normals per sample, giving
    ``arm`` ~ Uniform(0, 1) (through the normal CDF) and U_blue, U_green, U_red.  Labels follow :func:`mechanism`; images are uint8
    ``(n, size, size, 3)``, labels float64 ``(n, 4)``, ``noise`` the exogenous terms.
    """
    noise = _sample_noise(n, seed)
    labels = mechanism(noise)
    return Samples(render(labels, size), labels, noise)


def counterfactual(samples: Samples, do: Mapping[str, float | np.ndarray], size: int = DEFAULT_SIZE) -> Samples:
    """True counterfactual images and labels under the intervention ``do``.

    ``samples`` must carry its exogenous noise (a :class:`Samples` from :func:`sample` or a
    previous counterfactual): each subject keeps its noise, the intervened variables are set
    (scalars or one value per subject, within [0, 1]; see :func:`synthetic_data.base.parse_do`)
    and every other variable is recomputed from the mechanism in topological order, so do(arm)
    moves blue, green and red, do(blue) or do(green) moves red only, do(red) nothing else.  The
    returned noise is the input's.
    """
    noise = getattr(samples, "noise", None)
    if not isinstance(samples, Samples) or not noise or any(v not in noise for v in VARIABLES):
        raise ValueError(
            "circuit.counterfactual needs the Samples returned by sample() (or counterfactual()), with "
            f"its exogenous noise for {VARIABLES}: the lights' noise cannot be recovered from labels alone"
        )
    n = len(samples)
    lab = mechanism(noise, parse_do(GRAPH, do, n))
    return Samples(render(lab, size), lab, {k: np.array(v, copy=True) for k, v in noise.items()})


# --- files --------------------------------------------------------------------------------------------


def write_dataset(out_dir, n: int, size: int = DEFAULT_SIZE, seed: int = 0, progress: bool = True) -> pathlib.Path:
    """Write ``n`` samples (same as ``sample(n, seed, size)``) to ``out_dir``.

    Creates ``images/000000.png ...``, ``labels.csv`` (header :data:`CSV_COLUMNS`, file paths
    relative to ``out_dir``) and ``normalisation.json``.  Returns the CSV path.  The exogenous
    noise is not written (regenerate it with ``sample(n, seed)``).
    """
    from PIL import Image
    from tqdm import tqdm

    out_dir = pathlib.Path(out_dir)
    img_dir = out_dir / "images"
    img_dir.mkdir(parents=True, exist_ok=True)
    labels = mechanism(_sample_noise(n, seed))
    width = max(6, len(str(max(int(n) - 1, 0))))
    chunk = max(1, _PIXELS_PER_CHUNK // (int(size) * int(size)))
    files = []
    with tqdm(total=int(n), disable=not progress, desc="circuit", unit="img") as bar:
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
