"""Synthetic T1 brain MRI cohort with a known causal graph, built from the MNI152 template.

Causal graph (the built-in ``brain`` graph of :mod:`cdae_med.graph`, as in Deep SCM,
Pawlowski et al. 2020, and Ribeiro et al. 2023 on UK Biobank)::

    age, sex -> brain_volume;   age, brain_volume -> ventricle_volume;   image <- all

Anatomy
-------
The MNI152 2009 template (T1, grey-matter, white-matter and brain masks) ships inside the
``nilearn`` package (``nilearn.datasets.load_mni152_*``, resolution 2 mm); nothing is
downloaded.  From it, in template space:

* ``M``: the brain mask, used as the intracranial (ICV) mask (1,883 ml in the template;
  grey + white matter fill 89 % of it, the young-adult brain fraction of 88 % below);
* ``G``, ``W``: grey/white-matter probabilities, scaled so that ``G + W <= M``;
* ``CSF = M - G - W``; the lateral ventricles ``Vt`` are the CSF inside the connected
  component of CSF > 0.5 lying at least 20 mm inside the mask that contains the lateral
  ventricles (seeds at MNI (+-14, -15, 15)), dilated by one voxel and restricted to a box
  around them (17 ml in the template); the rest of the CSF is "external" (sulci, cisterns).

Each subject is a cubic grid of ``size`` voxels covering a field of view of 192 mm
(spacing ``192 / size`` mm), RAS, world origin at the centre of the brain.  Every voxel
is mapped into template space by, in order: a small rigid misalignment (rotation,
translation), a smooth random anatomical deformation (low-frequency sine basis, a few mm),
the global head scale (``s**3 = ICV / template ICV``), and the ventricle warp (below).  The
template maps, pre-smoothed against aliasing (cached per ``size``), are sampled there
(trilinear), giving per-voxel tissue fractions; atrophy then converts tissue to CSF.  The
T1 image is rendered from the fractions: ``WM 0.85, GM 0.55, CSF 0.12, background 0``,
times an intensity scale and a smooth multiplicative bias field, plus Gaussian noise inside
the head; clipped to [0, 1] (float32, skull-stripped look).

Mechanisms (units: years, ml) and their sources
-----------------------------------------------
* ``sex -> head size``: ICV = (1,290 ml women, 1,470 ml men) x exp(0.085 u_icv), the
  sex means of FACTS.md ("intracranial volume about 1,470 cm^3 (men) / 1,290 cm^3
  (women), constant with age"), a within-sex SD of about 8.5 %.  Realised as the global
  scale of the anatomy.
* ``age, sex -> brain_volume``: B = ICV x 0.88 x exp(-A(age)) x exp(0.025 u_brain).
  0.88 is the young-adult brain/ICV fraction; A is the cumulative atrophy with the
  annual rate r(t) = 0.2 %/yr at 35 rising linearly to 0.5 %/yr at 60 (and on: 0.74 %/yr
  at 80), no atrophy before 35 (Hedman et al. 2012 review, via FACTS.md).  Between 40 and
  70 that is 12.4 % of brain volume.  Sex acts only through head size.
* ``age, brain_volume -> ventricle_volume``: V = 18 ml x exp(Q(age)) x (1150 ml / B)
  x exp(0.3 u_vent), Q the cumulative growth at q(t) = 1 %/yr up to 40 rising linearly to
  3.5 %/yr at 80; with the brain loss of ageing the observational growth is 1.3 %/yr at
  40, 3.5 %/yr at 70, 4.2 %/yr at 80 ("lateral ventricles grow about 3-5 %/yr in healthy
  elderly"); less brain -> larger ventricles (ex vacuo).  The graph gives ventricles no ICV
  parent, so at equal age men's (larger) brains come with slightly smaller ventricles here,
  unlike real data.

Realisation on the image
------------------------
* Ventricles: a smooth deformation pushing tissue away from the ventricles along the
  normal of their surface.  With ``D`` the (smoothed, signed) template distance to the
  ventricle surface, an image point at ``D`` samples the template at ``D' = D - t w(D)``,
  ``w = exp(-D / 15 mm) (1 - (D / 60 mm)^2)^2`` outside (1 inside, 0 beyond 60 mm): ``t > 0``
  dilates the ventricles by the ``d`` with ``d = t w(d)`` and compresses the tissue around them
  (displacement decaying with distance), ``t < 0`` shrinks them; image points deep inside the
  enlarged ventricles are pure CSF.  ``t`` is solved (Brent) so that the measured ventricle
  volume hits its target.  Below the smallest ventricles the warp can show (about 1.5-3 ml),
  the remaining ventricular CSF is partly turned into white matter.
* Brain volume: cortical thinning/erosion converts tissue to external CSF, grey matter
  at the rate ``alpha x e(x)`` and white matter at 0.3 ``alpha x e(x)`` per voxel (fractions
  capped at 1), where ``e`` is the smoothed fraction of non-brain (sulcal/outer CSF) around
  a voxel: the cortex next to CSF goes first and the front moves inward as ``alpha`` grows.
  ``alpha < 0`` (a brain larger than the subject's unatrophied one) fills external CSF next
  to tissue with grey matter.  ``alpha`` is solved (Brent) so that the measured brain volume
  (grey + white) hits its target to about 1e-7 relative; ventricles are untouched by it.
* If a requested brain + ventricles would not fit the subject's skull (an intervention far
  outside the subject's own values), the head is enlarged to ICV = (B + V) / 0.93; ICV is
  not a graph variable.

Labels ``brain_volume`` and ``ventricle_volume`` are **measured** from the generated
image's tissue maps (sum of partial-volume fractions x voxel volume), not copied from the
targets; targets are realised to about 1e-6 ml.  ``age``, ``sex`` are set values.
``sample`` draws age ~ Uniform(40, 90) years and sex ~ Bernoulli(0.5).

Measured here (2-core CPU, OMP_NUM_THREADS=1): one subject takes about 0.025 s at 32^3,
0.06 s at 48^3, 0.14 s at 64^3 (plus about 3 s once to load and prepare the template);
do(brain_volume = v) for v uniform over [550, 1800] ml gives |measured - v| < 1e-6 ml, and
do(ventricle_volume) moves the measured brain volume by < 1e-5 ml; counterfactual age 40 ->
70 loses 12.37 % of brain volume for every subject (mechanism: 12.37 %).

Exogenous noise (``Samples.noise``, all that is needed to re-render a subject):
``u_icv``, ``u_brain``, ``u_vent`` (standard normal, clipped to +-2.5 / +-2.5 / +-2),
``anatomy_seed``, ``anatomy_amp`` (mm, RMS of the deformation), ``rotation_deg`` (N, 3),
``translation_mm`` (N, 3), ``intensity_scale``, ``bias`` (N, 4: x, y, z, r^2 log-gain
coefficients), ``noise_seed``, ``noise_sd``.

Files (:func:`write_dataset`): ``sub-00000.nii.gz`` (float32, 3D, affine = voxel spacing,
qform and sform set, units mm), ``manifest.csv`` (columns :data:`CSV_COLUMNS`, paths
relative to the CSV, sex written as 0 (female) / 1 (male), like the graph) and
``noise.json`` (the exogenous noise, so :func:`read_dataset` returns Samples that
:func:`counterfactual` accepts).
"""

from __future__ import annotations

import csv
import functools
import json
import math
import pathlib
from typing import Mapping

import numpy as np
from scipy import ndimage as ndi
from scipy.optimize import brentq

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
    "FOV_MM",
    "AGE_RANGE",
    "spacing",
    "affine",
    "icv",
    "brain_volume",
    "ventricle_volume",
    "atrophy",
    "ventricle_growth",
    "render",
    "reference",
    "measure_volumes",
    "tissue_maps",
    "sample",
    "counterfactual",
    "normalise",
    "denormalise",
    "write_dataset",
    "read_dataset",
]

GRAPH = builtin_graph("brain")
VARIABLES = GRAPH.names
UNITS = {v.name: v.unit for v in GRAPH.variables}
NORMALISATION = {v.name: (v.centre, v.scale) for v in GRAPH.variables}  # of the log for GRAPH[name].log
RANGES = {v.name: (v.low, v.high) for v in GRAPH.variables}
PARENTS = {v.name: v.parents for v in GRAPH.variables}
DEFAULT_SIZE = 32
SPATIAL_DIMS = 3
CHANNELS = 1
# manifest.csv written by write_dataset: path relative to the CSV; sex as 0 (female) / 1 (male).
CSV_COLUMNS = ("subject_id", "path", "age", "sex", "brain_volume_ml", "ventricle_volume_ml")

FOV_MM = 192.0  # side of the cubic field of view
AGE_RANGE = (40.0, 90.0)  # ages drawn by sample(): uniform
MIN_SIZE = 16

# --- mechanism constants ----------------------------------------------------------------
ICV_FEMALE, ICV_MALE = 1290.0, 1470.0  # ml
ICV_LOG_SD = 0.085
BPF_YOUNG = 0.88  # brain / ICV in young adults
BRAIN_LOG_SD = 0.025
ATROPHY_ONSET, ATROPHY_RATE_ONSET, ATROPHY_SLOPE = 35.0, 0.2, 0.3 / 25.0  # %/yr, %/yr per yr
VENT_REF, VENT_BRAIN_REF, VENT_LOG_SD = 18.0, 1150.0, 0.3  # ml, ml
VENT_AGE0, VENT_RATE0, VENT_SLOPE = 40.0, 1.0, 2.5 / 40.0  # %/yr, %/yr per yr
VENT_BRAIN_EXPONENT = 1.0
U_CLIP = {"u_icv": 2.5, "u_brain": 2.5, "u_vent": 2.0}
FIT_FRACTION = 0.93  # brain + ventricles may fill at most this fraction of the ICV

# --- rendering constants ----------------------------------------------------------------
T1_WM, T1_GM, T1_CSF = 0.85, 0.55, 0.12
WM_EROSION = 0.3  # white matter erodes at this fraction of the grey-matter rate
_VENT_SEEDS_MNI = ((14.0, -15.0, 15.0), (-14.0, -15.0, 15.0))
_VENT_BOX_MNI = ((-38.0, 38.0), (-62.0, 36.0), (-8.0, 34.0))
# ventricle warp: displacement along the normal of the ventricle surface, decaying away from it
_VENT_DECAY_MM = 15.0  # decay length L of the push, w(D) = exp(-D / L) (1 - (D / D_max)^2)^2
_VENT_REACH_MM = 60.0  # D_max: tissue further than this from the ventricles does not move
_VENT_CLAMP_MM = 1.5  # image points deep in a ventricle sample the template this far inside its wall
_VENT_T_MIN = -12.0  # most negative push (mm); f(D) = D - t w(D) stays monotone for t > -L
_NOISE_KEYS = ("u_icv", "u_brain", "u_vent", "anatomy_seed", "anatomy_amp", "rotation_deg",
               "translation_mm", "intensity_scale", "bias", "noise_seed", "noise_sd")


# =========================================================================================
# mechanisms
# =========================================================================================


def atrophy(age) -> np.ndarray:
    """Cumulative log brain loss A(age) = int_35^age r(t)/100 dt (0 before 35)."""
    t = np.maximum(np.asarray(age, dtype=np.float64) - ATROPHY_ONSET, 0.0)
    return (ATROPHY_RATE_ONSET * t + 0.5 * ATROPHY_SLOPE * t * t) / 100.0


def ventricle_growth(age) -> np.ndarray:
    """Cumulative log ventricle growth Q(age) = int_40^age q(t)/100 dt (age's own effect)."""
    a = np.asarray(age, dtype=np.float64) - VENT_AGE0
    t = np.maximum(a, 0.0)
    return (VENT_RATE0 * a + 0.5 * VENT_SLOPE * t * t) / 100.0


def icv(sex, u_icv) -> np.ndarray:
    """Intracranial volume (ml) from sex (0 female, 1 male) and its exogenous deviation."""
    sex = np.asarray(sex, dtype=np.float64)
    return (ICV_FEMALE + (ICV_MALE - ICV_FEMALE) * sex) * np.exp(ICV_LOG_SD * np.asarray(u_icv, dtype=np.float64))


def brain_volume(age, sex, u_icv, u_brain) -> np.ndarray:
    """Target brain (grey + white matter) volume in ml."""
    return icv(sex, u_icv) * BPF_YOUNG * np.exp(-atrophy(age) + BRAIN_LOG_SD * np.asarray(u_brain, dtype=np.float64))


def ventricle_volume(age, brain, u_vent) -> np.ndarray:
    """Target lateral-ventricle volume in ml."""
    brain = np.asarray(brain, dtype=np.float64)
    return (VENT_REF * np.exp(ventricle_growth(age) + VENT_LOG_SD * np.asarray(u_vent, dtype=np.float64))
            * (VENT_BRAIN_REF / brain) ** VENT_BRAIN_EXPONENT)


# =========================================================================================
# template (cached)
# =========================================================================================


class _Template:
    """Template-space maps at 2 mm (float32) and their geometry."""

    def __init__(self) -> None:
        from nilearn import datasets

        t1 = datasets.load_mni152_template(resolution=2)
        self.affine = np.asarray(t1.affine, dtype=np.float64)
        self.inv_affine = np.linalg.inv(self.affine)
        lin = self.affine[:3, :3]
        if not np.allclose(lin, np.diag(np.diag(lin))) or np.any(np.diag(lin) <= 0):
            raise RuntimeError("expected an axis-aligned RAS MNI152 template")
        m = np.asarray(datasets.load_mni152_brain_mask(resolution=2).get_fdata(), dtype=np.float64)
        g = np.clip(np.asarray(datasets.load_mni152_gm_template(resolution=2).get_fdata(), dtype=np.float64), 0, 1)
        w = np.clip(np.asarray(datasets.load_mni152_wm_template(resolution=2).get_fdata(), dtype=np.float64), 0, 1)
        m = np.clip(m, 0, 1)
        tissue = g + w
        factor = np.where(tissue > m, m / np.maximum(tissue, 1e-12), 1.0)
        g, w = g * factor, w * factor
        csf = np.clip(m - g - w, 0.0, None)
        vox = abs(np.linalg.det(self.affine[:3, :3]))
        self.voxel_ml = vox / 1000.0

        # lateral ventricles: CSF > 0.5 deep inside the mask, the component(s) holding the seeds
        depth = ndi.distance_transform_edt(m > 0.5) * 2.0
        cand = (csf > 0.5) & (depth > 20.0)
        ijk = np.indices(m.shape).reshape(3, -1).T
        world = (ijk @ self.affine[:3, :3].T + self.affine[:3, 3]).reshape(*m.shape, 3)
        box = np.ones(m.shape, dtype=bool)
        for ax, (lo, hi) in enumerate(_VENT_BOX_MNI):
            box &= (world[..., ax] >= lo) & (world[..., ax] <= hi)
        cand &= box
        lab, _ = ndi.label(cand)
        keep = np.zeros(m.shape, dtype=bool)
        for seed in _VENT_SEEDS_MNI:
            i = np.round(self.inv_affine @ np.array([*seed, 1.0]))[:3].astype(int)
            # nearest candidate voxel to the seed
            pts = np.argwhere(cand)
            near = pts[np.argmin(((pts - i) ** 2).sum(axis=1))]
            keep |= lab == lab[tuple(near)]
        keep = ndi.binary_dilation(keep) & box
        vent = csf * keep
        self.vent_centre = (world * vent[..., None]).reshape(-1, 3).sum(0) / vent.sum()
        self.brain_centre = np.array([(world[..., a][m > 0.5].min() + world[..., a][m > 0.5].max()) / 2
                                      for a in range(3)])

        ext = np.clip(m - g - w - vent, 0.0, None) + (1.0 - m)  # non-brain, non-ventricle
        sig = 4.0 / 2.0  # 4 mm in 2 mm voxels
        self.erode_w = np.maximum(ndi.gaussian_filter(ext, sig), 1e-3).astype(np.float32)
        self.grow_w = np.maximum(ndi.gaussian_filter(g + w, sig), 1e-3).astype(np.float32)
        self.m, self.g, self.w, self.vent = (a.astype(np.float32) for a in (m, g, w, vent))
        self.icv_ml = float(m.sum() * self.voxel_ml)
        self.brain_ml = float((g + w).sum() * self.voxel_ml)
        self.vent_ml = float(vent.sum() * self.voxel_ml)
        # signed distance (mm, > 0 outside) to the ventricle surface, smoothed, and its gradient
        core = vent > 0.5
        sd = ndi.distance_transform_edt(~core) * 2.0 - ndi.distance_transform_edt(core) * 2.0
        sd = np.where(core, sd + 1.0, sd - 1.0)  # the surface half-way between voxel centres
        sd = ndi.gaussian_filter(sd, 1.0)
        self.vent_dist = sd.astype(np.float32)
        self.vent_grad = [a.astype(np.float32) / 2.0 for a in np.gradient(sd)]  # per mm, template axes


@functools.lru_cache(maxsize=1)
def _template() -> _Template:
    return _Template()


@functools.lru_cache(maxsize=8)
def _maps_for_size(size: int):
    """Template maps pre-smoothed for sampling at ``size`` (anti-aliasing), and the subject grid."""
    tpl = _template()
    h = FOV_MM / size
    sigma = max(0.0, 0.45 * h / 2.0 - 0.3)  # in 2 mm template voxels; ~0 at 3 mm spacing
    smooth = (lambda a: ndi.gaussian_filter(a, sigma).astype(np.float32)) if sigma > 0.05 else (lambda a: a)
    maps = {"m": smooth(tpl.m), "g": smooth(tpl.g), "w": smooth(tpl.w), "vent": smooth(tpl.vent)}
    nz = np.argwhere(maps["vent"] > 0)  # bounding box of the ventricle map, for fast sampling
    maps["vent_box"] = (nz.min(0) - 1.0, nz.max(0) + 1.0)
    axis = (np.arange(size) - (size - 1) / 2.0) * h
    return maps, axis


# =========================================================================================
# geometry
# =========================================================================================


def spacing(size: int = DEFAULT_SIZE) -> float:
    """Voxel spacing in mm for a grid of ``size`` voxels per axis."""
    return FOV_MM / int(size)


def affine(size: int = DEFAULT_SIZE) -> np.ndarray:
    """The RAS voxel -> world (mm) affine of every image at ``size``; world origin at the brain centre."""
    h = spacing(size)
    a = np.diag([h, h, h, 1.0])
    a[:3, 3] = -(int(size) - 1) / 2.0 * h
    return a


def _rotation(deg: np.ndarray) -> np.ndarray:
    ax, ay, az = np.deg2rad(np.asarray(deg, dtype=np.float64))
    rx = np.array([[1, 0, 0], [0, math.cos(ax), -math.sin(ax)], [0, math.sin(ax), math.cos(ax)]])
    ry = np.array([[math.cos(ay), 0, math.sin(ay)], [0, 1, 0], [-math.sin(ay), 0, math.cos(ay)]])
    rz = np.array([[math.cos(az), -math.sin(az), 0], [math.sin(az), math.cos(az), 0], [0, 0, 1]])
    return rz @ ry @ rx


_ANAT_K = 3  # sine modes per axis in the anatomical deformation


def _anatomy_field(seed: int, amp: float, axis: np.ndarray) -> np.ndarray:
    """Smooth random displacement (3, n, n, n) in mm on the image grid, RMS about ``amp``."""
    rng = np.random.default_rng(int(seed))
    k = np.arange(1, _ANAT_K + 1)
    coef = rng.standard_normal((3, _ANAT_K, _ANAT_K, _ANAT_K))
    weight = 1.0 / (k[:, None, None] ** 2 + k[None, :, None] ** 2 + k[None, None, :] ** 2)
    coef = coef * weight
    coef *= amp / math.sqrt((coef ** 2).sum() / 8.0)
    half = FOV_MM / 2.0
    phi = np.sin(np.pi * k[None, :] * (axis[:, None] + half) / (2 * half))  # (n, K)
    # d_c(x, y, z) = sum_ijk C_cijk phi_i(x) phi_j(y) phi_k(z)
    f = np.einsum("cijk,zk->cijz", coef, phi)
    f = np.einsum("cijz,yj->ciyz", f, phi)
    return np.einsum("ciyz,xi->cxyz", f, phi)


def _bias_field(coef: np.ndarray, axis: np.ndarray) -> np.ndarray:
    """exp(bx x + by y + bz z + br r^2) on the grid, coordinates scaled to [-1, 1]."""
    u = axis / (FOV_MM / 2.0)
    bx, by, bz, br = (float(c) for c in coef)
    lx = bx * u + br * u * u
    ly = by * u + br * u * u
    lz = bz * u + br * u * u
    return np.exp(lx[:, None, None] + ly[None, :, None] + lz[None, None, :]).astype(np.float32)


def _sample_map(arr: np.ndarray, idx: np.ndarray) -> np.ndarray:
    return ndi.map_coordinates(arr, idx, order=1, mode="constant", cval=0.0, prefilter=False)


# =========================================================================================
# rendering one subject
# =========================================================================================


def _render_one(brain_target: float, vent_target: float, sex: float, nz: dict, size: int,
                want_maps: bool = False):
    """Render one subject; returns (image float32 (n,n,n), measured brain ml, measured vent ml[, maps])."""
    tpl = _template()
    maps, axis = _maps_for_size(size)
    n = size
    h = FOV_MM / n
    vox_ml = h ** 3 / 1000.0

    head_icv = float(icv(sex, nz["u_icv"]))
    icv_eff = max(head_icv, (brain_target + vent_target) / FIT_FRACTION)

    # image grid -> template space up to the ventricle warp: y = c0 + (R (p + d(p)) + t) / s
    disp = _anatomy_field(nz["anatomy_seed"], nz["anatomy_amp"], axis)
    p = np.empty((3, n, n, n), dtype=np.float64)
    p[0] = axis[:, None, None]
    p[1] = axis[None, :, None]
    p[2] = axis[None, None, :]
    p += disp
    rot = _rotation(nz["rotation_deg"])
    for _ in range(4):
        s = (icv_eff / tpl.icv_ml) ** (1.0 / 3.0)
        y = (np.tensordot(rot, p.reshape(3, -1), axes=1) + np.asarray(nz["translation_mm"], float)[:, None]) / s
        y += tpl.brain_centre[:, None]
        out = _realise(y, brain_target, vent_target, maps, tpl, vox_ml)
        if out is not None:
            break
        icv_eff *= 1.08  # the brain did not fit: enlarge the head and try again
    else:  # pragma: no cover - FIT_FRACTION leaves ample room
        raise RuntimeError(f"could not realise brain {brain_target:.1f} ml / ventricles {vent_target:.1f} ml")
    gm, wm, vent, csf, m = (a.reshape(n, n, n) for a in out)

    t1 = T1_WM * wm + T1_GM * gm + T1_CSF * csf
    t1 *= np.float32(nz["intensity_scale"]) * _bias_field(np.asarray(nz["bias"]), axis)
    rng = np.random.default_rng(int(nz["noise_seed"]))
    t1 += np.float32(nz["noise_sd"]) * m * rng.standard_normal((n, n, n), dtype=np.float32)
    np.clip(t1, 0.0, 1.0, out=t1)
    brain_ml = float((gm.sum(dtype=np.float64) + wm.sum(dtype=np.float64)) * vox_ml)
    vent_ml = float(vent.sum(dtype=np.float64) * vox_ml)
    if want_maps:
        return t1, brain_ml, vent_ml, {"gm": gm, "wm": wm, "csf": csf, "ventricles": vent, "icv": m}
    return t1, brain_ml, vent_ml


def _push_weight(d: np.ndarray) -> np.ndarray:
    """w(D): 1 inside the ventricles, exp(-D/L) (1 - (D/D_max)^2)^2 outside, 0 beyond D_max."""
    dp = np.clip(d, 0.0, _VENT_REACH_MM)
    return np.exp(-dp / _VENT_DECAY_MM) * (1.0 - (dp / _VENT_REACH_MM) ** 2) ** 2


def _realise(y: np.ndarray, brain_target: float, vent_target: float, maps: dict, tpl: _Template, vox_ml: float):
    """Solve the ventricle warp and the atrophy for the targets; None if they do not fit."""
    aff = tpl.inv_affine

    def to_index(z: np.ndarray) -> np.ndarray:
        return aff[:3, :3] @ z + aff[:3, 3:4]

    # The ventricle warp moves an image point at template distance D from the ventricle surface
    # to distance D' = D - t w(D) along the surface normal (t > 0: ventricles dilate by the d
    # with d = t w(d), tissue is pushed outward; t < 0: they shrink).  Points with D' < -c
    # sample the template at -c and are filled with ventricle CSF as D' goes to -2c.
    idx_y = to_index(y)
    dist = _sample_map(tpl.vent_dist, idx_y).astype(np.float64)
    sup = np.flatnonzero(dist < _VENT_REACH_MM)
    d_s = dist[sup]
    w_s = _push_weight(d_s)
    grad = np.stack([_sample_map(gm_, idx_y[:, sup]) for gm_ in tpl.vent_grad]).astype(np.float64)
    y_s = y[:, sup]
    c = _VENT_CLAMP_MM

    def warp(t: float):
        dprime = d_s - t * w_s
        shift = d_s - np.maximum(dprime, -c)
        fill = np.clip((-dprime - c) / c, 0.0, 1.0)
        return y_s - shift * grad, dprime, fill

    vent_map, m_map = maps["vent"], maps["m"]

    def vent_ml(t: float) -> float:
        z, dprime, fill = warp(t)
        near = np.flatnonzero(np.maximum(dprime, -c) < 20.0)  # the ventricle map is 0 further out
        idx = to_index(z[:, near])
        v = _sample_map(vent_map, idx).astype(np.float64)
        m = _sample_map(m_map, idx).astype(np.float64)
        f = fill[near]
        return float((v + f * (m - v)).sum()) * vox_ml

    f = lambda t: vent_ml(t) - vent_target  # noqa: E731  (increasing in t)
    keep = 1.0  # fraction of the ventricle CSF kept (< 1 only below the warp's smallest ventricles)
    v_min = vent_ml(_VENT_T_MIN)
    if v_min >= vent_target:
        t = _VENT_T_MIN
        keep = vent_target / v_min  # the rest of the (partial-volume) ventricle CSF becomes white matter
    elif f(0.0) >= 0:
        t_lo, t_hi = _VENT_T_MIN, 0.0
    else:
        t_lo, t_hi = 0.0, 4.0
        while f(t_hi) < 0:
            t_lo, t_hi = t_hi, t_hi * 2.0
            if t_hi > 1e5:
                return None
    if keep == 1.0:
        t = brentq(f, t_lo, t_hi, xtol=1e-10, rtol=1e-12, maxiter=200)

    z = y.copy()
    zs, _, fill_s = warp(t)
    z[:, sup] = zs
    fill = np.zeros(y.shape[1])
    fill[sup] = fill_s
    idx = to_index(z)
    m = _sample_map(maps["m"], idx)
    body = m > 1e-6
    idx_b = idx[:, body]
    mb = m[body].astype(np.float64)
    fb_ = fill[body]
    gm = _sample_map(maps["g"], idx_b).astype(np.float64) * (1 - fb_)
    wm = _sample_map(maps["w"], idx_b).astype(np.float64) * (1 - fb_)
    vent = _sample_map(maps["vent"], idx_b).astype(np.float64)
    vent = vent + fb_ * (mb - vent)
    if keep < 1.0:
        wm = wm + (1.0 - keep) * vent
        vent = keep * vent
    ew = _sample_map(tpl.erode_w, idx_b).astype(np.float64)

    ext = np.clip(mb - gm - wm - vent, 0.0, None)
    gw = _sample_map(tpl.grow_w, idx_b).astype(np.float64)
    gm_sum, wm_sum = gm.sum(), wm.sum()

    # cortical thinning (alpha > 0) or filling of external CSF (alpha < 0) for the brain target
    def brain(alpha: float) -> float:
        if alpha >= 0:
            e = alpha * ew
            kept = (gm * (1 - np.minimum(1.0, e))).sum() + (wm * (1 - np.minimum(1.0, WM_EROSION * e))).sum()
            return float(kept) * vox_ml
        return float(gm_sum + wm_sum + (ext * np.minimum(1.0, -alpha * gw)).sum()) * vox_ml

    fb = lambda al: brain(al) - brain_target  # noqa: E731  (decreasing in alpha)
    if fb(0.0) >= 0:
        lo_a, hi_a = 0.0, 1.0
        while fb(hi_a) > 0:
            lo_a, hi_a = hi_a, hi_a * 4.0
            if hi_a > 1e7:
                return None
    else:
        lo_a, hi_a = -1.0, 0.0
        while fb(lo_a) < 0:
            lo_a, hi_a = lo_a * 4.0, lo_a
            if lo_a < -1e7:
                return None
    alpha = brentq(fb, lo_a, hi_a, xtol=1e-14, rtol=1e-14, maxiter=200)
    if alpha >= 0:
        e = alpha * ew
        gm = gm * (1 - np.minimum(1.0, e))
        wm = wm * (1 - np.minimum(1.0, WM_EROSION * e))
    else:
        gm = gm + ext * np.minimum(1.0, -alpha * gw)
    csf = np.clip(mb - gm - wm, 0.0, None)  # ventricles included

    def full(v):
        outv = np.zeros(m.shape, dtype=np.float32)
        outv[body] = v
        return outv

    return full(gm), full(wm), full(vent), full(csf), m.astype(np.float32)


# =========================================================================================
# batches, sampling, interventions
# =========================================================================================


def _check_size(size) -> int:
    if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or int(size) < MIN_SIZE:
        raise ValueError(f"size must be an integer >= {MIN_SIZE} (voxels per axis), got {size!r}")
    return int(size)


def _check_noise(noise: Mapping, n: int) -> dict:
    if not isinstance(noise, Mapping):
        raise ValueError("noise must be a mapping of exogenous arrays")
    missing = [k for k in _NOISE_KEYS if k not in noise]
    if missing:
        raise ValueError(f"samples.noise lacks {missing}: the brain counterfactual needs the exogenous noise of "
                         f"sample()/read_dataset() (keys {list(_NOISE_KEYS)})")
    out = {}
    for k in _NOISE_KEYS:
        arr = np.asarray(noise[k])
        if arr.shape[:1] != (n,):
            raise ValueError(f"noise[{k!r}] has shape {arr.shape}; expected {n} rows")
        out[k] = arr
    return out


def _subject_noise(noise: dict, i: int) -> dict:
    return {k: v[i] for k, v in noise.items()}


def _draw(n: int, seed: int) -> tuple[np.ndarray, np.ndarray, dict]:
    """Roots (age, sex) and every exogenous noise term for n subjects."""
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or int(n) < 0:
        raise ValueError(f"n must be an integer >= 0, got {n!r}")
    n = int(n)
    # One generator per subject (seeded by (seed, i)), so sample(k, seed) is the first k of
    # sample(n, seed) and a subject never depends on how many others were drawn.
    rows = [_draw_subject(np.random.default_rng([int(seed), i])) for i in range(n)]
    shapes = {k: np.shape(v) for k, v in _draw_subject(np.random.default_rng(0)).items()}

    def column(key):
        return np.array([r[key] for r in rows]) if rows else np.empty((0,) + shapes[key])

    age, sex = column("age"), column("sex").astype(np.float64)
    noise = {k: column(k) for k in shapes if k not in ("age", "sex")}
    return age, sex, noise


def _draw_subject(rng: np.random.Generator) -> dict:
    return {
        "age": rng.uniform(*AGE_RANGE),
        "sex": float(rng.integers(0, 2)),
        "u_icv": np.clip(rng.standard_normal(), -U_CLIP["u_icv"], U_CLIP["u_icv"]),
        "u_brain": np.clip(rng.standard_normal(), -U_CLIP["u_brain"], U_CLIP["u_brain"]),
        "u_vent": np.clip(rng.standard_normal(), -U_CLIP["u_vent"], U_CLIP["u_vent"]),
        "anatomy_seed": np.int64(rng.integers(0, 2 ** 31 - 1)),
        "anatomy_amp": rng.uniform(2.0, 5.0),
        "rotation_deg": np.clip(rng.normal(0.0, 2.0, size=3), -5.0, 5.0),
        "translation_mm": np.clip(rng.normal(0.0, 2.0, size=3), -5.0, 5.0),
        "intensity_scale": rng.uniform(0.92, 1.08),
        "bias": np.clip(rng.normal(0.0, 0.05, size=4), -0.12, 0.12),
        "noise_seed": np.int64(rng.integers(0, 2 ** 31 - 1)),
        "noise_sd": rng.uniform(0.01, 0.03),
    }


def _targets(age, sex, noise: dict, do: Mapping[str, np.ndarray] | None = None) -> np.ndarray:
    """(N, 4) targets in VARIABLES order: roots as given, volumes from the mechanisms unless in ``do``."""
    do = do or {}
    age = do.get("age", age)
    sex = do.get("sex", sex)
    brain = do["brain_volume"] if "brain_volume" in do else brain_volume(age, sex, noise["u_icv"], noise["u_brain"])
    vent = do["ventricle_volume"] if "ventricle_volume" in do else ventricle_volume(age, brain, noise["u_vent"])
    return np.stack(np.broadcast_arrays(*(np.asarray(a, dtype=np.float64) for a in (age, sex, brain, vent))), axis=1)


def _render_batch(targets: np.ndarray, noise: dict, size: int, want_maps: bool = False, progress: bool = False):
    from tqdm.auto import tqdm

    n = len(targets)
    images = np.empty((n, size, size, size, CHANNELS), dtype=np.float32)
    labels = targets.astype(np.float64).copy()
    maps = {k: np.empty((n, size, size, size), dtype=np.float32) for k in ("gm", "wm", "csf", "ventricles", "icv")} \
        if want_maps else None
    for i in tqdm(range(n), desc="render", unit="subject", disable=not progress):
        out = _render_one(float(targets[i, 2]), float(targets[i, 3]), float(targets[i, 1]),
                          _subject_noise(noise, i), size, want_maps)
        images[i, ..., 0] = out[0]
        labels[i, 2], labels[i, 3] = out[1], out[2]
        if want_maps:
            for k, v in out[3].items():
                maps[k][i] = v
    return (images, labels, maps) if want_maps else (images, labels)


def render(labels, noise: Mapping, size: int = DEFAULT_SIZE) -> Samples:
    """Render subjects whose (N, 4) ``labels`` (VARIABLES order) are the targets to realise.

    The volumes of the returned labels are measured on the rendered images (within about
    1e-6 ml of the targets); ``noise`` is a Samples.noise mapping.
    """
    size = _check_size(size)
    lab = np.asarray(labels, dtype=np.float64)
    if lab.ndim != 2 or lab.shape[1] != len(VARIABLES):
        raise ValueError(f"labels must have shape (N, {len(VARIABLES)}) in order {VARIABLES}, got {lab.shape}")
    noise = _check_noise(noise, len(lab))
    images, measured = _render_batch(lab, noise, size)
    return Samples(images, measured, noise)


def reference(size: int = DEFAULT_SIZE) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The cohort's reference head on the ``size`` grid (:func:`affine`): the template's tissue maps
    rendered as a T1 without misalignment, anatomical deformation, atrophy, bias or noise, at the mean
    head size of the two sexes. Returns (image float32 in [0, 1], intracranial mask float32 in
    [0, 1], affine). It is what scans are registered to before a brain model sees them."""
    size = _check_size(size)
    tpl = _template()
    maps, axis = _maps_for_size(size)
    n = size
    mean_icv = 0.5 * (ICV_FEMALE + ICV_MALE) * math.exp(0.5 * ICV_LOG_SD ** 2)
    s = (mean_icv / tpl.icv_ml) ** (1.0 / 3.0)
    p = np.stack(np.meshgrid(axis, axis, axis, indexing="ij")).reshape(3, -1)
    idx = tpl.inv_affine[:3, :3] @ (p / s + tpl.brain_centre[:, None]) + tpl.inv_affine[:3, 3:4]
    m, g, w = (_sample_map(maps[k], idx).reshape(n, n, n) for k in ("m", "g", "w"))
    t1 = T1_WM * w + T1_GM * g + T1_CSF * np.clip(m - g - w, 0.0, None)
    return np.clip(t1, 0.0, 1.0).astype(np.float32), np.clip(m, 0.0, 1.0).astype(np.float32), affine(size)


def measure_volumes(images: np.ndarray, noise: Mapping, size: int = DEFAULT_SIZE) -> np.ndarray:
    """Brain and ventricle volume (ml), (N, 2), segmented from any images of generated subjects (an
    output of a model, say) with the generator's tissue model: intensities divided by the subject's
    intensity scale and bias field, each voxel split into two classes by partial volume (between CSF
    and grey matter below the grey-matter level, brain above it), and ventricles the CSF inside the
    subject's ventricle region (the template's ventricles grown by ``_VENT_ROI_MM``, mapped into the
    subject's head as the renderer maps them, before its ventricle warp). It is biased on an absolute
    volume, so it is meant for differences between images of the same subject
    (benchmarks/brain_native.py reports its floor)."""
    size = _check_size(size)
    noise = _check_noise(noise, len(images))
    tpl = _template()
    maps, axis = _maps_for_size(size)
    vox_ml = (FOV_MM / size) ** 3 / 1000.0
    roi = _ventricle_roi()
    out = np.empty((len(images), 2))
    for i in range(len(images)):
        nz = _subject_noise(noise, i)
        x = np.asarray(images[i], dtype=np.float64).reshape(size, size, size)
        x = x / (float(nz["intensity_scale"]) * _bias_field(np.asarray(nz["bias"]), axis))
        head = x > 0.5 * T1_CSF
        brain = np.clip((x - T1_CSF) / (T1_GM - T1_CSF), 0.0, 1.0) * head
        csf = head - brain
        # the renderer's map of image points into the template, without the ventricle warp
        disp = _anatomy_field(nz["anatomy_seed"], nz["anatomy_amp"], axis)
        p = np.stack(np.meshgrid(axis, axis, axis, indexing="ij")) + disp
        scale = (max(float(head.sum()) * vox_ml, 1.0) / tpl.icv_ml) ** (1.0 / 3.0)  # the head's size, from itself
        y = (np.tensordot(_rotation(nz["rotation_deg"]), p.reshape(3, -1), axes=1)
             + np.asarray(nz["translation_mm"], float)[:, None]) / scale + tpl.brain_centre[:, None]
        inside = _sample_map(roi, tpl.inv_affine[:3, :3] @ y + tpl.inv_affine[:3, 3:4]).reshape(x.shape) > 0.5
        out[i] = brain.sum() * vox_ml, (csf * inside).sum() * vox_ml
    return out


_VENT_ROI_MM = 16.0  # a ventricle grown under do(age = 90) reaches about this far beyond the template's


@functools.lru_cache(maxsize=1)
def _ventricle_roi() -> np.ndarray:
    """The template's lateral ventricles grown by ``_VENT_ROI_MM`` (2 mm template voxels), float32 0/1."""
    tpl = _template()
    grown = ndi.binary_dilation(tpl.vent > 0.5, iterations=int(round(_VENT_ROI_MM / 2.0)))
    deep = ndi.distance_transform_edt(tpl.m > 0.5) * 2.0 > 15.0  # away from the cortex and its sulci
    return (grown & deep).astype(np.float32)


def tissue_maps(samples: Samples, size: int = DEFAULT_SIZE) -> dict[str, np.ndarray]:
    """Partial-volume tissue maps (N, size, size, size) of the samples, re-rendered from their labels and
    noise: ``gm``, ``wm``, ``csf`` (ventricles included), ``ventricles``, ``icv``.  Brain volume is
    ``(gm + wm).sum() * spacing**3 / 1000`` ml, ventricle volume ``ventricles.sum() * ...``."""
    size = _check_size(size)
    noise = _check_noise(samples.noise, len(samples))
    return _render_batch(np.asarray(samples.labels, dtype=np.float64), noise, size, want_maps=True)[2]


def sample(n: int, seed: int = 0, size: int = DEFAULT_SIZE, progress: bool = False) -> Samples:
    """Draw ``n`` subjects: age ~ Uniform(40, 90) years, sex ~ Bernoulli(0.5), volumes from the
    mechanisms, images float32 (n, size, size, size, 1) in [0, 1]; labels (n, 4) with the volumes
    measured on the images; ``noise`` holds every exogenous term.  Deterministic for a seed.
    ``progress``: a progress bar over the subjects rendered (about half a CPU-second each at 64^3)."""
    size = _check_size(size)
    age, sex, noise = _draw(n, seed)
    images, labels = _render_batch(_targets(age, sex, noise), noise, size, progress=progress)
    return Samples(images, labels, noise)


def counterfactual(samples: Samples, do: Mapping[str, float | np.ndarray], size: int = DEFAULT_SIZE) -> Samples:
    """True counterfactuals under ``do``: same exogenous noise, intervened variables set (scalars or one
    value per subject, own units), descendants recomputed, images rendered again.

    do(age): brain and ventricle volumes follow; do(sex): head size -> brain -> ventricles;
    do(brain_volume): ventricles follow; do(ventricle_volume): only the ventricles change.
    Values are checked by :func:`synthetic_data.base.parse_do` (sex also as ``"F"``/``"M"``); unknown
    variables, values outside the graph's ranges and non-binary sex raise one
    :class:`cdae_med.values.ValuesError` (a :class:`cdae_med.graph.GraphError`, a ValueError).
    """
    size = _check_size(size)
    if not isinstance(samples, Samples):
        raise ValueError("counterfactual needs a Samples object with its exogenous noise (from sample() or "
                         "read_dataset()), not bare labels")
    lab = np.asarray(samples.labels, dtype=np.float64)
    noise = _check_noise(samples.noise, len(lab))
    dov = parse_do(GRAPH, do, len(lab))
    targets = _targets(lab[:, 0], lab[:, 1], noise, dov)
    images, labels = _render_batch(targets, noise, size)
    return Samples(images, labels, {k: v.copy() for k, v in noise.items()})


def normalise(labels: np.ndarray) -> np.ndarray:
    """Normalised labels column-wise (VARIABLES order): ``(labels - centre) / scale``, of the log for the
    volumes (:meth:`cdae_med.graph.CausalGraph.normalise`)."""
    return GRAPH.normalise(np.asarray(labels, dtype=np.float64))


def denormalise(z: np.ndarray) -> np.ndarray:
    """Inverse of :func:`normalise`."""
    return GRAPH.denormalise(np.asarray(z, dtype=np.float64))


# =========================================================================================
# files
# =========================================================================================


def _nifti(volume: np.ndarray, size: int):
    import nibabel as nib

    aff = affine(size)
    img = nib.Nifti1Image(np.asarray(volume, dtype=np.float32), aff)
    img.header.set_data_dtype(np.float32)
    img.header.set_xyzt_units(xyz="mm", t="sec")
    img.set_qform(aff, code="scanner")
    img.set_sform(aff, code="scanner")
    return img


def write_dataset(out_dir, n: int, size: int = DEFAULT_SIZE, seed: int = 0, progress: bool = True) -> pathlib.Path:
    """Write ``n`` subjects (the same as ``sample(n, seed, size)``) to ``out_dir``.

    Creates ``sub-00000.nii.gz ...`` (float32 3D volumes, RAS affine with the voxel spacing, qform and
    sform set, units mm), ``manifest.csv`` (header :data:`CSV_COLUMNS`; paths relative to the CSV; sex
    0 = female, 1 = male; volumes in ml, measured) and ``noise.json`` (exogenous noise, the generator's
    settings).  Returns the CSV path.
    """
    import nibabel as nib
    from tqdm.auto import tqdm

    size = _check_size(size)
    out_dir = pathlib.Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    age, sex, noise = _draw(n, seed)
    targets = _targets(age, sex, noise)
    n = len(targets)
    width = max(5, len(str(max(n - 1, 0))))
    rows = []
    with tqdm(total=n, disable=not progress, desc="brain", unit="subject") as bar:
        for i in range(n):
            t1, b_ml, v_ml = _render_one(float(targets[i, 2]), float(targets[i, 3]), float(targets[i, 1]),
                                         _subject_noise(noise, i), size)
            sid = f"sub-{i:0{width}d}"
            rel = f"{sid}.nii.gz"
            nib.save(_nifti(t1, size), out_dir / rel)
            rows.append([sid, rel, repr(float(targets[i, 0])), str(int(targets[i, 1])), repr(b_ml), repr(v_ml)])
            bar.update(1)

    csv_path = out_dir / "manifest.csv"
    with open(csv_path, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(CSV_COLUMNS)
        writer.writerows(rows)
    meta = {
        "generator": "synthetic_data.brain",
        "seed": seed,
        "size": size,
        "spacing_mm": spacing(size),
        "sex_coding": "0 = female, 1 = male",
        "units": {v: UNITS[v] for v in VARIABLES},
        "normalisation": {v.name: {"centre": v.centre, "scale": v.scale, **({"log": True} if v.log else {})}
                          for v in GRAPH.variables},
        "noise": {k: np.asarray(v).tolist() for k, v in noise.items()},
    }
    with open(out_dir / "noise.json", "w") as fh:
        json.dump(meta, fh)
    return csv_path


def read_dataset(out_dir) -> Samples:
    """Read a data set written by :func:`write_dataset`: Samples with images (N, n, n, n, 1) float32,
    labels (N, 4) and, when ``noise.json`` is there, the exogenous noise (so it can be intervened on)."""
    import nibabel as nib

    out_dir = pathlib.Path(out_dir)
    csv_path = out_dir / "manifest.csv"
    if not csv_path.exists():
        raise ValueError(f"{csv_path} does not exist; write one with write_dataset()")
    with open(csv_path, newline="") as fh:
        reader = csv.reader(fh)
        header = tuple(next(reader, ()))
        if header != CSV_COLUMNS:
            raise ValueError(f"{csv_path}: header {header} != expected {CSV_COLUMNS}")
        rows = list(reader)
    sex_code = {"0": 0.0, "1": 1.0, "F": 0.0, "M": 1.0, "f": 0.0, "m": 1.0}
    labels = np.array([[float(r[2]), sex_code[r[3].strip()], float(r[4]), float(r[5])] for r in rows],
                      dtype=np.float64).reshape(len(rows), len(VARIABLES))
    vols = [np.asarray(nib.load(out_dir / r[1]).get_fdata(dtype=np.float32)) for r in rows]
    images = np.stack(vols)[..., None] if vols else np.zeros((0, 0, 0, 0, CHANNELS), dtype=np.float32)
    noise: dict = {}
    meta_path = out_dir / "noise.json"
    if meta_path.exists():
        with open(meta_path) as fh:
            meta = json.load(fh)
        noise = {k: np.asarray(v) for k, v in meta["noise"].items()}
        for k in ("anatomy_seed", "noise_seed"):
            noise[k] = noise[k].astype(np.int64)
    return Samples(images.astype(np.float32, copy=False), labels, noise)
