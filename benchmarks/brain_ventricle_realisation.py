"""How much of a ventricle change each way of realising a change on the model grid carries onto the scan.

The validation subjects of `brain_native.py` (rendered at 2 mm, `--test-offset 30`) under one of its
interventions (default do(ventricle_volume)), with no trained model: the true change on the grid (oracle)
and the two voxelwise regressions (of intensity and of the demons displacement from the cohort's mean,
fitted on `--n-fit` subjects rendered at 2 mm and registered as a scan is), each realised

- as intensity on the tissue (`carry_change(..., "tissue")`, the shipped model's realisation);
- as a deformation only (`deform_scan`): demons fitted to the change (oracle) or the regressed displacement;
- as a deformation plus the rest of the change on the tissue (`deformation_change`): the deformation fitted to
  the change, or the regressed displacement with the intensity regression's change as the rest;
- as the intensity realisation followed by demons at the scan's own 2 mm (`fine_deformation`).

Beside them, a realisation that needs no image change at all (:class:`VentriclePush`): the subject's own
ventricles, read off the registered scan, grown by the volume change the graph prescribes (for
do(ventricle_volume) the intervention itself), by a push that decays away from their walls (10, 20 or 40 mm)
or by an incompressible flow; and the intensity regression's change followed by the 10 mm push, which makes
up the ventricle change that the intensity change has not made, or the push the scan itself needs after that
change, whole or without its part in the ventricles' region. ``--velocity`` smooths every push and integrates
it as a stationary velocity field, so that it cannot fold (`brain_ventricle_push_folding.py` measures that).
This push is the exploratory one; the model's realisations `ventricles` and `volumes` use
`pipelines.anatomy.VentriclePush`, which reads the ventricles at the scan's own resolution against grey matter
and pushes from their core along a signed distance (docs/design-notes.md, "The push as a realisation of the
model").

Brain and ventricle volume are measured on every output by the generator's tissue model, against the labels'
change and against the true image's own measured change (as `brain_native.py`); image MAE x 255 against the
true counterfactual at 2 mm.

    python benchmarks/brain_ventricle_realisation.py [--grid 32] [--n-fit 150] [--n-test 6] \
        [--intervention ventricle_volume|age|brain_volume] [--velocity] [--pushes-only] [--results R]

writes benchmarks/results/brain_ventricle_realisation_<grid>.json unless --results says otherwise (the committed
runs: brain_ventricle_realisation_32_<intervention>[_velocity].json).
"""

from __future__ import annotations

import argparse
import json
import time
from collections import defaultdict
from dataclasses import replace
from pathlib import Path

import numpy as np

import brain_native as bn
from cdae_med.io import Scan
from pipelines.mri import Preprocessing, prepare_registered, reference_mask
from pipelines.realisation import (GridDeformation, carry_change, deform_scan, deformation_change, fit_deformation,
                                   head_weight)
from pipelines.registration import Reference, grid_affine, resample_grid
from pipelines.train_config import test_seed
from pipelines.training_data import reference_space_labels
from synthetic_data import brain

ROOT = Path(__file__).resolve().parent
RESIDUAL = "tissue"


class VentriclePush:
    """The subject's own ventricles grown (or shrunk) by a prescribed volume, as ventricles enlarge: the
    tissue around them pushed outward along the distance to their wall, by a push that decays with that
    distance (``decay_mm``), or by an incompressible flow (``incompressible``: the gradient of the potential
    whose Laplacian is the ventricles, so that only the ventricles change volume). The push's size is solved
    so that the ventricles measured on the warped image change by the volume asked for; the deformation,
    found on a 3 mm grid of reference space, warps the scan at its own resolution (``deform_scan``).

    The ventricles are read off the registered scan: within a region around the reference's deep CSF (dark
    voxels over 25 mm inside its head), a voxel's ventricle fraction is where its intensity lies between the
    scan's own CSF there and its white matter. With ``velocity`` the push is smoothed over ``smoothing_voxels``
    and integrated as a stationary velocity field (scaling and squaring, MONAI's ``DVF2DDF``): one displacement
    of the size a large change needs folds where the direction to the nearest wall jumps."""

    def __init__(self, reference: Reference, decay_mm: float = 10.0, incompressible: bool = False,
                 spacing_mm: float = 3.0, deep_mm: float = 25.0, region_mm: float = 12.0, velocity: bool = False,
                 smoothing_voxels: float = 1.5):
        from scipy.ndimage import binary_dilation, distance_transform_edt

        self.spacing, self.decay, self.incompressible, self.velocity = spacing_mm, decay_mm, incompressible, velocity
        self.smoothing = smoothing_voxels
        if velocity:
            from monai.networks.blocks import DVF2DDF

            self.integrate = DVF2DDF(num_steps=7)
        self.size = int(round(brain.FOV_MM / spacing_mm))
        self.affine = grid_affine(spacing_mm, self.size)
        ref = reference_on_grid(reference, self.affine, self.size)
        inside = ref["mask"] > 0.5
        self.core = (ref["image"] < 0.3) & (distance_transform_edt(inside) * spacing_mm > deep_mm)
        self.region = binary_dilation(self.core, iterations=int(round(region_mm / spacing_mm))) & inside
        self.white = (ref["image"] > 0.75) & inside
        self.weight = head_weight(ref["mask"].astype(np.float32), 0.0, spacing_mm)

    def fraction(self, g: np.ndarray, csf: float, white: float) -> np.ndarray:
        """Each voxel's share of ventricle (0 outside the region around the reference's ventricles)."""
        return np.clip((white - g) / (white - csf), 0.0, 1.0) * self.region

    def field(self, v: np.ndarray) -> np.ndarray:
        """(3, X, Y, Z) RAS, per unit of push: the counterfactual at p samples the scan at p + s field(p)."""
        from scipy.ndimage import distance_transform_edt, gaussian_filter

        if self.incompressible:
            k = np.fft.fftfreq(self.size, d=self.spacing) * 2 * np.pi
            k2 = k[:, None, None] ** 2 + k[None, :, None] ** 2 + k[None, None, :] ** 2
            k2[0, 0, 0] = 1.0
            potential = np.real(np.fft.ifftn(-np.fft.fftn(v - v.mean()) / k2))
            grad = np.stack(np.gradient(potential, self.spacing))
            return -grad / np.abs(grad).max() * self.weight[None]
        distance = gaussian_filter(distance_transform_edt(v < 0.5) * self.spacing, 1.0)
        grad = np.stack(np.gradient(distance, self.spacing))
        outward = grad / np.maximum(np.linalg.norm(grad, axis=0), 1e-6)
        return -np.exp(-distance / self.decay)[None] * outward * self.weight[None]

    def deformation(self, pp, delta_ml: float, measured_on: np.ndarray | None = None) -> GridDeformation:
        """The push (on this grid of reference space) that grows the ventricles of ``pp``'s scan by ``delta_ml``
        (its volume, ml); measured on ``measured_on`` (another version of the scan on its grid) where given, so
        that the push makes up what that version's own change has not made."""
        from scipy.optimize import brentq

        lo, hi = pp.window
        grid = (self.affine, (self.size,) * 3)
        g = (pp.registration.resample(*grid) - lo) / (hi - lo)
        csf, white = float(np.median(g[self.core])), float(np.median(g[self.white]))
        voxel_ml = self.spacing ** 3 / 1000.0
        target = self.fraction(g, csf, white).sum() * voxel_ml + delta_ml / pp.registration.volume_ratio
        if measured_on is not None:
            g = (pp.registration.resample(*grid, data=measured_on) - lo) / (hi - lo)
        field = self.field(self.fraction(g, csf, white))
        if self.velocity:  # a velocity integrates to a diffeomorphism only where it is smooth on the grid
            from scipy.ndimage import gaussian_filter

            field = np.stack([gaussian_filter(c, self.smoothing) for c in field])

        def deformation(s: float) -> GridDeformation:
            u = s * field
            if self.velocity:  # the push as a stationary velocity field, integrated by scaling and squaring
                import torch

                u = self.integrate(torch.from_numpy((u / self.spacing).astype(np.float32))[None])[0]
                u = u.numpy().astype(np.float64) * self.spacing
            return GridDeformation.from_displacement(u.transpose(1, 2, 3, 0) * np.array([-1.0, -1.0, 1.0]),
                                                     self.affine)  # RAS -> ITK's LPS

        def excess(s: float) -> float:
            return self.fraction(deformation(s).warp_grid(g), csf, white).sum() * voxel_ml - target

        lo_s, hi_s = -12.0, 12.0
        s = lo_s if excess(lo_s) > 0 else hi_s if excess(hi_s) < 0 else brentq(excess, lo_s, hi_s, xtol=1e-3)
        return deformation(s)

    def __call__(self, pp, delta_ml: float, changed: np.ndarray | None = None, solve_on_changed: bool = True
                 ) -> np.ndarray:
        """The scan (or ``changed``, another version of it, e.g. with an intensity change) warped so that its
        ventricles are the scan's plus ``delta_ml``; measured on ``changed`` (so that the push makes up what
        its change has not made) or, with ``solve_on_changed=False``, on the scan (the push the scan needs,
        applied to ``changed``)."""
        phi = self.deformation(pp, delta_ml, changed if solve_on_changed else None)
        registration = pp.registration
        if changed is not None:
            registration = replace(registration, scan=replace(registration.scan, data=changed.astype(np.float32)))
        return deform_scan(registration, phi)


def run_pushes(pushes: dict, outputs: dict, pp, delta_ml: float, change: np.ndarray, outside: np.ndarray) -> None:
    """Every push alone, and the 10 mm one after the intensity regression's change (``outputs`` holds it), and
    after that change with its ventricle part (``outside``: 0 in the ventricles' region on the model grid) left out."""
    for name, push in pushes.items():
        outputs[name].append(push(pp, delta_ml))
    changed = outputs["intensity_regression"][-1]
    outputs["ventricle_push_plus_intensity_regression"].append(pushes["ventricle_push"](pp, delta_ml, changed=changed))
    outputs["intensity_regression_then_scans_own_ventricle_push"].append(
        pushes["ventricle_push"](pp, delta_ml, changed=changed, solve_on_changed=False))
    outside_change = pp.scan.data + carry_change(pp, change * outside, RESIDUAL)
    outputs["intensity_regression_outside_ventricles_then_push"].append(
        pushes["ventricle_push"](pp, delta_ml, changed=outside_change, solve_on_changed=False))


def reference_on_grid(reference: Reference, affine: np.ndarray, size: int) -> dict:
    """The reference's image and mask on another grid of its space."""
    return {k: resample_grid(getattr(reference, k), reference.affine, affine, (size,) * 3) for k in ("image", "mask")}


def fine_deformation(scan: Scan, changed: np.ndarray, smoothing_voxels: float = 2.0) -> np.ndarray:
    """The scan warped, at its own resolution, by the demons deformation that carries it onto ``changed``
    (its intensity realisation): the change, already on the scan's own edges, turned into their movement."""
    head = (scan.data > 0.02 * scan.data.max()).astype(np.float32)
    phi = fit_deformation(scan.data, changed, scan.affine, head, smoothing_voxels=smoothing_voxels)
    return phi.warp_grid(scan.data)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--grid", type=int, default=32, help="model grid side (192 mm field of view)")
    p.add_argument("--n-fit", type=int, default=150, help="subjects the regressions are fitted on")
    p.add_argument("--n-test", type=int, default=6)
    p.add_argument("--test-offset", type=int, default=30, help="as brain_native.py (30: validation subjects)")
    p.add_argument("--intervention", choices=list(bn.INTERVENTIONS), default="ventricle_volume")
    p.add_argument("--velocity", action="store_true",
                   help="every push integrated as a stationary velocity field (VentriclePush(velocity=True))")
    p.add_argument("--pushes-only", action="store_true",
                   help="only copy, the pushes and the intensity regression (no displacement fields or oracle)")
    p.add_argument("--results", type=Path, default=None)
    args = p.parse_args()
    import SimpleITK as sitk

    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(1)
    t0 = time.perf_counter()
    size = args.grid
    reference = Reference(*brain.reference(64))
    prep = Preprocessing(spacing_mm=(brain.FOV_MM / size,) * 3, spatial_size=(size,) * 3, registration="affine",
                         volume_variables=bn.VOLUMES)
    mask = reference_mask(reference, prep)
    fit_images, fit_labels, prep = bn.registered_fit_set(prep, reference, args.n_fit, seed=4242, size=bn.FINE)
    if not args.pushes_only:
        shape = bn.VoxelwiseDeformation(fit_images.mean(0), prep.grid_affine, mask)
        shape.fit(shape.fields(fit_images), fit_labels)
    intensity = bn.VoxelwiseLinear().fit(fit_images, fit_labels)
    print(f"regressions fitted on {args.n_fit} subjects in {time.perf_counter() - t0:.0f} s", flush=True)

    samples = brain.sample(args.n_test, seed=test_seed(0) + args.test_offset, size=bn.FINE)
    targets = bn.INTERVENTIONS[args.intervention][1](samples.labels)
    truth = brain.counterfactual(samples, {args.intervention: targets}, size=bn.FINE)
    affine = brain.affine(bn.FINE)
    prepared = [prepare_registered(Scan(v[..., 0], affine, "test"), prep, reference, mask) for v in samples.images]
    ratios = np.array([pp.registration.volume_ratio for pp in prepared])
    factual, cf = (reference_space_labels(y, bn.GRAPH, prep, ratios) for y in (samples.labels, truth.labels))
    regressed = [None] * len(prepared) if args.pushes_only else shape.deformations(factual, cf)
    changes = intensity.change(factual, cf)
    outputs: dict[str, list[np.ndarray]] = defaultdict(list)  # method -> its output per subject
    v = args.velocity
    pushes = {"ventricle_push": VentriclePush(reference, velocity=v),
              "ventricle_push_20mm": VentriclePush(reference, 20.0, velocity=v),
              "ventricle_push_40mm": VentriclePush(reference, 40.0, velocity=v),
              "ventricle_push_incompressible": VentriclePush(reference, incompressible=True, velocity=v)}
    region = pushes["ventricle_push"].region.astype(np.float32)
    outside = (1.0 - resample_grid(region, pushes["ventricle_push"].affine, prep.grid_affine, prep.spatial_size)) * mask
    # the volume change the graph prescribes (here the true one: do(ventricle_volume) sets it)
    delta_vv = truth.labels[:, bn.VV] - samples.labels[:, bn.VV]
    for pp, t, phi, change, dv in zip(prepared, truth.images[..., 0], regressed, changes, delta_vv):
        outputs["copy"].append(pp.scan.data)
        outputs["intensity_regression"].append(bn.realise(pp, change, mask, RESIDUAL))
        if args.pushes_only:
            run_pushes(pushes, outputs, pp, float(dv), change, outside)
            continue
        g = pp.image[0]
        true_change = bn.oracle_change(pp, prep, t)
        fitted = fit_deformation(g, g + true_change * mask, prep.grid_affine, mask)
        outputs["oracle_intensity"].append(bn.realise(pp, true_change, mask, RESIDUAL))
        outputs["oracle_deformation_only"].append(deform_scan(pp.registration, fitted))
        outputs["oracle_deformation_plus_rest"].append(
            pp.scan.data + deformation_change(pp, g, true_change, mask, fitted, residual=RESIDUAL))
        outputs["intensity_regression_as_deformation_plus_rest"].append(
            pp.scan.data + deformation_change(pp, g, change, mask, residual=RESIDUAL))
        outputs["displacement_regression_only"].append(deform_scan(pp.registration, phi))
        outputs["displacement_regression_plus_intensity_regression_rest"].append(
            pp.scan.data + deformation_change(pp, g, change, mask, phi, residual=RESIDUAL))
        for name in ("oracle_intensity", "intensity_regression"):
            outputs[f"{name}_then_fine_deformation"].append(fine_deformation(pp.scan, outputs[name][-1]))
        run_pushes(pushes, outputs, pp, float(dv), change, outside)
    volumes_in = brain.measure_volumes(samples.images[..., 0], samples.noise, bn.FINE)
    image_change = brain.measure_volumes(truth.images[..., 0], truth.noise, bn.FINE) - volumes_in
    label_change = truth.labels[:, [bn.BV, bn.VV]] - samples.labels[:, [bn.BV, bn.VV]]
    rows = {}
    for name, outs in outputs.items():
        outs = np.stack(outs)
        moved = brain.measure_volumes(outs, samples.noise, bn.FINE) - volumes_in
        e_label, e_image = np.abs(moved - label_change).mean(0), np.abs(moved - image_change).mean(0)
        rows[name] = {"image_mae": float(np.abs(outs - truth.images[..., 0]).mean() * 255),
                      "brain_volume_error_ml": float(e_label[0]), "ventricle_volume_error_ml": float(e_label[1]),
                      "brain_volume_error_against_true_image_ml": float(e_image[0]),
                      "ventricle_volume_error_against_true_image_ml": float(e_image[1])}
        print(f"{name:56s} MAE {rows[name]['image_mae']:.2f}  brain {e_label[0]:5.1f} ({e_image[0]:5.1f})  "
              f"ventricles {e_label[1]:5.1f} ({e_image[1]:5.1f}) ml", flush=True)
    result = {"intervention": bn.INTERVENTIONS[args.intervention][0], "grid": size,
              "grid_mm": brain.FOV_MM / size, "resolution_mm": brain.FOV_MM / bn.FINE, "n_fit": args.n_fit,
              "n_test": args.n_test, "test_offset": args.test_offset, "residual": RESIDUAL, "methods": rows,
              "seconds": time.perf_counter() - t0}
    out = args.results or ROOT / "results" / f"brain_ventricle_realisation_{size}.json"
    out.write_text(json.dumps(result, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
