"""Brain counterfactuals at the scan's own resolution, against the generator's truth.

Held-out generator subjects are rendered at 2 mm (the resolution of a clinical T1, finer than any
model grid here), written as NIfTI files and sent through the scan pipeline
(`pipelines.scans.ScanModel.run`, age and sex given as known covariates; ``--given all``: the volumes
too) under three
interventions: do(age = age +- 20), do(brain_volume = brain volume -+ 100 ml) and
do(ventricle_volume = ventricle volume x 1.5 or / 1.5). Every output is compared, at 2 mm, with
the generator's true counterfactual of the same subject, beside three references that are
realised on the scan the same way (registered to the cohort's reference, a change on the model
grid, carried back through the inverse registration onto the 2 mm grid):

- ``copy``: the input unchanged;
- ``baseline``: a voxelwise linear regression of registered intensity on the graph's variables
  (fitted on generated subjects), whose change is coefficients x (counterfactual - factual values).
  Every baseline is given the generator's true values, factual and counterfactual, the descendants'
  included: it is compared with the model as an image model, the model having to read the volumes off
  the scan and to compute the descendants with its mechanisms;
- ``baseline_quantile``: the same regression of every voxel's normal score under the cohort's quantiles
  there (:class:`VoxelwiseQuantile`), its shift mapped back through the subject's own voxel;
- ``baseline_location_scale``: the same regression with a log-variance linear in the variables too
  (:class:`VoxelwiseLocationScale`), a subject's standardised residual kept;
- ``baseline_deformation``: the same regression of the demons displacement onto each subject from
  the cohort's mean (:class:`VoxelwiseDeformation`), its change warping the scan itself;
- ``baseline_latent``: the same regression of the first model's own first-stage code
  (:class:`LatentLinear`), realised as that model's change is (as intensity on the tissue for a model realised
  on the anatomy): what the diffusion model adds;
- ``oracle``: the true counterfactual itself, registered and resampled onto the model grid: the
  best any model on that grid can do, so model error and realisation error are told apart;
  ``oracle_deformation`` the same change realised as a deformation plus residual;
- ``baseline_<realisation>``, ``baseline_quantile_<realisation>``, ``oracle_<realisation>``: where the first
  model is realised on the subject's anatomy (``atrophy``, ``volumes``, ``ventricles``), the intensity and
  quantile regressions' changes and the oracle's realised that way too, with the true volume changes, so that
  what the realisation gains is told apart from what the model gains;
- ``oracle_code``: the true counterfactual coded by the first model's own first stage and realised as
  that model's change is: the best its diffusion model can do, so first-stage error and diffusion
  error are told apart.

Measured: image MAE (x 255, whole volume) and SSIM; the change of brain and ventricle volume from
the input, measured on each output by the generator's tissue model
(`synthetic_data.brain.measure_volumes`), against the true change (the labels' difference), with
the floor of that measurement (the true counterfactual image measured the same way); the share of
subjects whose affected volume moves the true way; seconds per scan.

    python benchmarks/brain_native.py --model registered=benchmarks/work/brain32-registered \\
        [--model unregistered=...] [--n-test 8] [--steps 20] [--n-fit 200]

writes benchmarks/results/brain_native.json (per intervention: image_mae, ssim, volume errors and
true-direction shares for model, copy, baseline, baseline_deformation and oracle, under "interventions"; the first
--model is "model", the others are under "other_models").
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from skimage.metrics import structural_similarity

from cdae_med.io import Scan, read_nifti, write_nifti
from pipelines.anatomy import ANATOMICAL_REALISATIONS, AnatomicalRealisation
from pipelines.mri import Preprocessing, prepare_registered, reference_mask
from pipelines.realisation import (RESIDUALS, GridDeformation, carry_change, deform_scan, deformation_change,
                                   fit_deformation, model_deformation)
from pipelines.registration import Reference
from pipelines.scans import ScanModel
from pipelines.train_config import TrainConfig, test_seed
from pipelines.training_data import VOLUME_UNIT, load_training_data, reference_space_labels
from synthetic_data import brain

ROOT = Path(__file__).resolve().parent
FINE = 96  # 2 mm over the cohort's 192 mm field of view
GRAPH = brain.GRAPH
VOLUMES = tuple(n for n in GRAPH.names if GRAPH[n].unit == VOLUME_UNIT)
AGE, SEX, BV, VV = (brain.VARIABLES.index(v) for v in ("age", "sex", "brain_volume", "ventricle_volume"))
INTERVENTIONS = {
    "age": ("do(age = age + 20 if age < 65 else age - 20)", lambda y: np.where(y[:, AGE] < 65, y[:, AGE] + 20,
                                                                               y[:, AGE] - 20), BV),
    "brain_volume": ("do(brain_volume = brain volume - 100 ml if above 1,000 ml else + 100 ml)",
                     lambda y: np.where(y[:, BV] > 1000, y[:, BV] - 100, y[:, BV] + 100), BV),
    "ventricle_volume": ("do(ventricle_volume = ventricle volume x 1.5 if under 40 ml else / 1.5)",
                         lambda y: np.where(y[:, VV] < 40, y[:, VV] * 1.5, y[:, VV] / 1.5), VV),
}


def registered_fit_set(prep: Preprocessing, reference: Reference, n: int, seed: int, size: int | None = None):
    """Generated subjects (rendered ``size`` voxels a side, twice the model grid's by default) registered onto
    the model grid as a scan is: (N, X, Y, Z) in [0, 1], labels in the model's reference space and ``prep``
    with the cohort's volume ratio."""
    size = size or 2 * prep.spatial_size[0]
    s = brain.sample(n, seed=seed, size=size)
    affine = brain.affine(size)
    mask = reference_mask(reference, prep)
    prepared = [prepare_registered(Scan(v[..., 0], affine, "fit"), prep, reference, mask) for v in s.images]
    ratios = np.array([pp.registration.volume_ratio for pp in prepared])
    prep = replace(prep, cohort_volume_ratio=float(ratios.mean()))
    return np.stack([pp.image[0] for pp in prepared]), reference_space_labels(s.labels, GRAPH, prep, ratios), prep


def held_out_subjects(n: int, offset: int, work: Path):
    """The ``n`` held-out generator subjects ``test_seed(0) + offset``, rendered at 2 mm and written to ``work``
    as NIfTI: (samples, paths)."""
    samples = brain.sample(n, seed=test_seed(0) + offset, size=FINE)
    work.mkdir(parents=True, exist_ok=True)
    paths = [work / f"sub-{i:02d}.nii.gz" for i in range(n)]
    for path, v in zip(paths, samples.images[..., 0]):
        write_nifti(path, v, brain.affine(FINE))
    return samples, paths


def design(labels: np.ndarray) -> np.ndarray:
    """The baselines' regressors: [1, normalised graph variables]."""
    return np.column_stack([np.ones(len(labels)), brain.normalise(labels)])


class VoxelwiseLinear:
    """Intensity at every voxel of the registered grid ~ [1, normalised graph variables]."""

    def fit(self, images: np.ndarray, labels: np.ndarray) -> "VoxelwiseLinear":
        x = design(labels)
        self.coef, *_ = np.linalg.lstsq(x, images.reshape(len(images), -1), rcond=None)
        self.shape = images.shape[1:]
        return self

    def change(self, labels: np.ndarray, labels_cf: np.ndarray) -> np.ndarray:
        d = brain.normalise(labels_cf) - brain.normalise(labels)
        return (d @ self.coef[1:]).reshape(len(labels), *self.shape)


class VoxelwiseLocationScale:
    """:class:`VoxelwiseLinear` with a variance that depends on the variables too: every voxel's intensity
    ~ mu(y) + sigma(y) e, mu and log sigma^2 linear in [1, normalised graph variables]
    (:class:`cdae_med.latent.VoxelSpread` with every variable in its log-variance, where a model's has only the
    roots). Its counterfactual keeps a subject's standardised residual e: x' = mu(y') + sigma(y') / sigma(y)
    (x - mu(y)), so a subject far from the cohort's mean at a voxel whose spread grows with the change (atrophy
    spreading with age) moves further than one near it."""

    def fit(self, images: np.ndarray, labels: np.ndarray) -> "VoxelwiseLocationScale":
        from cdae_med.latent import VoxelSpread

        n = labels.shape[1]
        self.spread = VoxelSpread(n, range(n), images.shape[1:]).fit(
            torch.from_numpy(np.asarray(images, np.float64)), torch.from_numpy(brain.normalise(labels)), eps=1e-6)
        return self

    def change(self, images: np.ndarray, labels: np.ndarray, labels_cf: np.ndarray) -> np.ndarray:
        y, y_cf = (torch.from_numpy(brain.normalise(v)).float() for v in (labels, labels_cf))
        x = torch.from_numpy(np.asarray(images, np.float32))
        mean_change = ((y_cf - y) @ self.spread.mean[1:]).reshape(x.shape)
        return (mean_change + self.spread.change(x, y, y_cf)).double().numpy()


class VoxelwiseQuantile:
    """:class:`VoxelwiseLinear` in quantile space: every voxel's intensity through the cohort's quantiles
    at that voxel to a normal score (:class:`cdae_med.latent.VoxelQuantiles`, the transform of a first
    stage with ``latent_quantiles``), the score ~ [1, normalised graph variables]. Its counterfactual keeps
    a subject's residual score and maps the shifted score back through the same voxel's quantiles, so a
    shift that is the same for every subject changes the intensity most where the subject sits between
    the cohort's modes at that voxel and least on a mode: what a model on that first stage can do with a
    change that is the population's."""

    def __init__(self, n_quantiles: int = 256):
        self.n_quantiles = n_quantiles

    def fit(self, images: np.ndarray, labels: np.ndarray) -> "VoxelwiseQuantile":
        from cdae_med.latent import VoxelQuantiles

        flat = torch.from_numpy(np.asarray(images, np.float32).reshape(len(images), -1))
        self.transform = VoxelQuantiles(self.n_quantiles, flat.shape[1]).fit(flat)
        with torch.no_grad():
            scores = self.transform(flat).numpy()
        self.coef, *_ = np.linalg.lstsq(design(labels), scores, rcond=None)
        self.shape = images.shape[1:]
        return self

    def change(self, images: np.ndarray, labels: np.ndarray, labels_cf: np.ndarray) -> np.ndarray:
        flat = torch.from_numpy(np.asarray(images, np.float32).reshape(len(images), -1))
        shift = torch.from_numpy(((brain.normalise(labels_cf) - brain.normalise(labels)) @ self.coef[1:])
                                 .astype(np.float32))
        with torch.no_grad():
            moved = self.transform.inverse(self.transform(flat) + shift)
        return (moved - flat).numpy().reshape(len(images), *self.shape)


class VoxelwiseDeformation:
    """The deformation analogue of :class:`VoxelwiseLinear`: the displacement that carries ``template``
    (the cohort's mean registered image) onto each subject (diffeomorphic demons, as
    ``pipelines.realisation``), at every voxel ~ [1, normalised graph variables]. Its change,
    coefficients x (counterfactual - factual values), warps the scan itself at its own resolution
    (``deform_scan``), no intensity added: the regression of shape on the variables that issue 17 asks
    for beside the intensity one."""

    def __init__(self, template: np.ndarray, grid_affine: np.ndarray, mask: np.ndarray, iterations: int = 40):
        self.template, self.grid_affine, self.mask, self.iterations = template, grid_affine, mask, iterations

    def fields(self, images: np.ndarray) -> np.ndarray:
        """(N, X, Y, Z, 3): template(x) ~ subject(x + u(x)), each subject's field in the template's coordinates."""
        return np.stack([fit_deformation(im, self.template, self.grid_affine, self.mask, self.iterations).displacement
                         for im in images])

    def fit(self, fields: np.ndarray, labels: np.ndarray) -> "VoxelwiseDeformation":
        x = design(labels)
        self.coef, *_ = np.linalg.lstsq(x, fields.reshape(len(fields), -1), rcond=None)
        self.shape = fields.shape[1:]
        return self

    def deformations(self, labels: np.ndarray, labels_cf: np.ndarray) -> list[GridDeformation]:
        """Per subject: the counterfactual samples the subject at x - du(x), du the predicted change of u."""
        d = brain.normalise(labels_cf) - brain.normalise(labels)
        return [GridDeformation.from_displacement(-du, self.grid_affine)
                for du in (d @ self.coef[1:]).reshape(len(labels), *self.shape)]


class LatentLinear:
    """A linear regression in a model's own first-stage code: the coefficients (:meth:`CausalDiffAE.to_latent`)
    of registered subjects ~ [1, normalised graph variables], its change decoded from the subject's own
    code and realised as that model's is (through its decoded deformation where its first stage codes
    shape). It asks what the diffusion model adds to its first stage beyond a linear model of the labels."""

    def __init__(self, first_stage, grid_affine: np.ndarray, mask: np.ndarray, inset_mm: float = 0.0,
                 residual: str = "upsampled", as_intensity: bool = False):
        self.first_stage, self.grid_affine, self.mask, self.inset_mm = first_stage, grid_affine, mask, inset_mm
        self.residual, self.as_intensity = residual, as_intensity

    def fit(self, images01: np.ndarray, labels: np.ndarray) -> "LatentLinear":
        x = design(labels)
        self.coef, *_ = np.linalg.lstsq(x, encode_images(self.first_stage, images01).numpy(), rcond=None)
        return self

    def outputs(self, prepared: list, labels: np.ndarray, labels_cf: np.ndarray) -> list[np.ndarray]:
        c = encode_images(self.first_stage, np.stack([pp.image[0] for pp in prepared]))
        c_cf = c + torch.from_numpy(((brain.normalise(labels_cf) - brain.normalise(labels)) @ self.coef[1:])
                                    .astype(np.float32))
        return realise_codes(self.first_stage, prepared, c, c_cf, self.grid_affine, self.mask, self.as_intensity,
                             self.inset_mm, self.residual)


def encode_images(first_stage, images01: np.ndarray) -> torch.Tensor:
    """A first stage's codes of registered grid images in [0, 1] (N, X, Y, Z)."""
    with torch.no_grad():
        return first_stage.encode(torch.from_numpy(np.asarray(images01, np.float32))[:, None] * 2 - 1)


def realise_codes(first_stage, prepared: list, c: torch.Tensor, c_cf: torch.Tensor, grid_affine: np.ndarray,
                  mask: np.ndarray, as_intensity: bool = False, inset_mm: float = 0.0,
                  residual: str = "upsampled") -> list[np.ndarray]:
    """The scans changed by decoding first-stage codes ``c`` -> ``c_cf``, realised as a model with that
    first stage realises its change (through the decoded deformation where the first stage codes shape,
    unless ``as_intensity``)."""
    with torch.no_grad():
        rec, cf = (((first_stage.decode(code).clamp(-1, 1) + 1) / 2)[:, 0].numpy() for code in (c, c_cf))
        shape = None if as_intensity else getattr(first_stage, "displacement", None)
        disp = None if shape is None else (shape(c).numpy(), shape(c_cf).numpy())
    out = []
    for i, pp in enumerate(prepared):
        if disp is None:
            out.append(realise(pp, cf[i] - rec[i], mask, residual))
        else:
            phi = model_deformation(disp[0][i], disp[1][i], grid_affine, mask, inset_mm=inset_mm)
            out.append(pp.scan.data + deformation_change(pp, rec[i], cf[i] - rec[i], mask, phi, residual=residual))
    return out


def score(outputs: dict[str, list[np.ndarray]], samples, truth, affected: int, input_vol: np.ndarray,
          ssim: bool = True) -> dict[str, dict[str, float]]:
    """Every method's outputs (2 mm volumes) against the true counterfactual: image MAE (x 255), SSIM,
    brain and ventricle volume errors (ml) and the share of subjects whose ``affected`` volume moves
    the true way.

    Volumes are compared as changes from the input, measured on both images the same way, so the
    segmentation's own bias on a subject cancels: error = |measured change - true change|, the true change
    being the labels' difference. That segmentation misreads a change of tissue even on the true
    counterfactual image (by the intervention's ``volume_measurement_floor_ml``), so the same errors are
    also given against the true image's own measured change (``volume_error_against_true_image_ml``), where
    the true counterfactual scores 0 and the segmentation's bias on a change cancels as well.
    """
    t = truth.images[..., 0]
    true_change = truth.labels[:, [BV, VV]] - samples.labels[:, [BV, VV]]
    measured_true = brain.measure_volumes(t, truth.noise, FINE)
    want = np.sign(truth.labels[:, affected] - samples.labels[:, affected])
    col = 0 if affected == BV else 1
    row = {"image_mae": {}, **({"ssim": {}} if ssim else {}), "brain_volume_error_ml": {},
           "ventricle_volume_error_ml": {}, "true_direction_share": {},
           "volume_error_against_true_image_ml": {"brain": {}, "ventricles": {}}}
    for name, outs in outputs.items():
        o = np.stack(outs)
        vol = brain.measure_volumes(o, samples.noise, FINE)
        err = np.abs(vol - input_vol - true_change).mean(0)
        against_image = np.abs(vol - measured_true).mean(0)
        row["volume_error_against_true_image_ml"]["brain"][name] = float(against_image[0])
        row["volume_error_against_true_image_ml"]["ventricles"][name] = float(against_image[1])
        row["image_mae"][name] = float(np.abs(o - t).mean() * 255)
        if ssim:
            row["ssim"][name] = float(np.mean([structural_similarity(a, b, data_range=1.0) for a, b in zip(o, t)]))
        row["brain_volume_error_ml"][name] = float(err[0])
        row["ventricle_volume_error_ml"][name] = float(err[1])
        row["true_direction_share"][name] = float(np.mean(np.sign(vol[:, col] - input_vol[:, col]) == want))
    return row


def oracle_change(prepared, prep: Preprocessing, truth: np.ndarray) -> np.ndarray:
    """The true counterfactual's change on the model grid (window units), registered as the scan is."""
    lo, hi = prepared.window
    grid = (prep.grid_affine, prep.spatial_size)
    return (prepared.registration.resample(*grid, data=truth) - prepared.registration.resample(*grid)) / (hi - lo)


def realise(prepared, change_on_grid: np.ndarray, mask: np.ndarray, residual: str = "upsampled") -> np.ndarray:
    """The scan plus a change on the model grid (window units), carried back as the model's is."""
    return prepared.scan.data + carry_change(prepared, change_on_grid * mask, residual)


def realise_deformation(prepared, change_on_grid: np.ndarray, mask: np.ndarray,
                        residual: str = "upsampled") -> np.ndarray:
    """The scan plus a change on the model grid realised as a model's is with ``realisation="deformation"``."""
    return prepared.scan.data + deformation_change(prepared, prepared.image[0], change_on_grid, mask,
                                                   residual=residual)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", action="append", required=True,
                   help="NAME=CHECKPOINT[@REALISATION[,RESIDUAL]] (intensity or deformation; upsampled or tissue: "
                        "pipelines.realisation); the first is 'model'")
    p.add_argument("--residual", choices=RESIDUALS, default=None,
                   help="how the baselines' and oracles' intensity changes reach the scan [default: the first model's]")
    p.add_argument("--n-test", type=int, default=8)
    p.add_argument("--steps", type=int, default=20, help="DDIM steps")
    p.add_argument("--depth", type=float, default=None,
                   help="inversion depth of the models [default: each checkpoint's, else 1.0]")
    p.add_argument("--n-fit", type=int, default=200, help="subjects the voxelwise baseline is fitted on")
    p.add_argument("--fit-seed", type=int, default=None,
                   help="fit the baseline on the registered training subjects of `cdae-med train --dataset brain "
                        "--registration R --n-train N-FIT --seed FIT-SEED` (read from its cache, so the model's "
                        "own subjects) [default: 4242, rendered here]")
    p.add_argument("--n-fit-deformation", type=int, default=500,
                   help="subjects (the first of the fit set) the deformation baseline is fitted on")
    p.add_argument("--deformation-iterations", type=int, default=40,
                   help="demons iterations of the deformation baseline's fields")
    p.add_argument("--test-offset", type=int, default=17,
                   help="held-out subjects: test_seed(0) + this (17: the reported ones; choose settings on others)")
    p.add_argument("--size", type=int, default=32, help="the reference model grid of baseline and oracle")
    p.add_argument("--registration", choices=("rigid", "affine"), default=None,
                   help="of the baselines and oracle [default: the first model's]")
    p.add_argument("--given", choices=("age_sex", "all"), default="age_sex",
                   help="the factual values the models are given (age_sex: the volumes are read off the scan; "
                        "all: the volumes too, as the baselines are, so that the image models are compared "
                        "and not the read-out)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--work", type=Path, default=ROOT / "work" / "brain_native")
    p.add_argument("--results", type=Path, default=ROOT / "results" / "brain_native.json")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    specs = {name: spec.partition("@") for name, spec in (m.split("=", 1) for m in args.model)}
    models = {name: path for name, (path, _, _) in specs.items()}
    args.work.mkdir(parents=True, exist_ok=True)

    reference = Reference(*brain.reference(64))
    registration = args.registration or _training(next(iter(models.values())))["registration"] or "rigid"
    prep = Preprocessing(spacing_mm=(brain.FOV_MM / args.size,) * 3, spatial_size=(args.size,) * 3,
                         registration=registration, volume_variables=VOLUMES)
    mask = reference_mask(reference, prep)
    t0 = time.perf_counter()
    if args.fit_seed is None:
        fit_images, fit_labels, prep = registered_fit_set(prep, reference, args.n_fit, seed=4242)
    else:
        data = load_training_data(TrainConfig(dataset="brain", size=args.size, registration=registration,
                                              n_train=args.n_fit, seed=args.fit_seed))
        fit_images = ((data.images[:, 0] + 1) / 2).numpy()
        fit_labels = data.dataset.graph.denormalise(data.labels.numpy())
        prep = Preprocessing.from_dict(data.image_meta["preprocessing"])
    baseline = VoxelwiseLinear().fit(fit_images, fit_labels)
    print(f"baseline fitted on {args.n_fit} registered subjects in {time.perf_counter() - t0:.0f} s", flush=True)
    quantile_baseline = VoxelwiseQuantile().fit(fit_images, fit_labels)
    location_scale_baseline = VoxelwiseLocationScale().fit(fit_images, fit_labels)
    t0 = time.perf_counter()
    n_def = min(args.n_fit_deformation, len(fit_images))
    shape_baseline = VoxelwiseDeformation(fit_images[:n_def].mean(0), prep.grid_affine, mask, args.deformation_iterations)
    shape_baseline.fit(shape_baseline.fields(fit_images[:n_def]), fit_labels[:n_def])
    print(f"deformation baseline fitted on {n_def} subjects in {time.perf_counter() - t0:.0f} s", flush=True)

    samples, inputs = held_out_subjects(args.n_test, args.test_offset, args.work)
    affine = brain.affine(FINE)
    scan_models = {}
    for name, (path, _, how) in specs.items():
        realisation, _, residual = how.partition(",")
        scan_models[name] = ScanModel.load(path, device="cpu", num_steps=args.steps, depth=args.depth,
                                           realisation=realisation or None, residual=residual or None)
    residual = args.residual or next(iter(scan_models.values())).residual  # of the baselines and oracles
    # a first model realised on the subject's anatomy: the regressions and the oracle realised the same way too
    anatomical = next(iter(scan_models.values())).realisation
    anatomy = AnatomicalRealisation(reference, prep, mask, anatomical) if anatomical in ANATOMICAL_REALISATIONS else None
    prepared = [prepare_registered(Scan(v[..., 0], affine, f"sub-{i:02d}"), prep, reference, mask)
                for i, v in enumerate(samples.images)]
    grid_images = np.stack([pp.image[0] for pp in prepared])  # the subjects registered onto the model grid
    # the linear regression in the first model's own code, where it has a first stage
    coded = next(iter(scan_models.values())).pipeline.model.first_stage
    latent_baseline = None
    if coded is not None and tuple(coded.shape[1:]) == tuple(prep.spatial_size):
        t0 = time.perf_counter()
        # realised as the model's change is
        inset = next(iter(scan_models.values())).inset_mm
        as_intensity = next(iter(scan_models.values())).realisation != "deformation"
        latent_baseline = LatentLinear(coded, prep.grid_affine, mask, inset, residual, as_intensity).fit(
            fit_images[:n_def], fit_labels[:n_def])
        print(f"latent baseline fitted on {n_def} subjects in {time.perf_counter() - t0:.0f} s", flush=True)
        factual_code = encode_images(coded, grid_images)  # the oracle_code row's starting point, every intervention's
    test_ratios = np.array([pp.registration.volume_ratio for pp in prepared])
    input_vol = brain.measure_volumes(samples.images[..., 0], samples.noise, FINE)
    first = next(iter(models))
    given = AGE, SEX, *((BV, VV) if args.given == "all" else ())  # the factual values the models are told
    seconds = {name: [] for name in models}
    rows = []
    for var, (text, target, affected) in INTERVENTIONS.items():
        targets = target(samples.labels)
        truth = brain.counterfactual(samples, {var: targets}, size=FINE)
        outputs: dict[str, list[np.ndarray]] = {"copy": [s[..., 0] for s in samples.images]}
        # the baselines' variables in reference space, as the model's
        factual, cf = (reference_space_labels(y, GRAPH, prep, test_ratios) for y in (samples.labels, truth.labels))
        outputs["baseline"] = [realise(pp, ch, mask, residual) for pp, ch in zip(prepared, baseline.change(factual, cf))]
        outputs["baseline_quantile"] = [realise(pp, ch, mask, residual) for pp, ch in
                                        zip(prepared, quantile_baseline.change(grid_images, factual, cf))]
        outputs["baseline_location_scale"] = [realise(pp, ch, mask, residual) for pp, ch in
                                              zip(prepared, location_scale_baseline.change(grid_images, factual, cf))]
        outputs["baseline_deformation"] = [deform_scan(pp.registration, phi) for pp, phi in
                                           zip(prepared, shape_baseline.deformations(factual, cf))]
        if latent_baseline is not None:
            outputs["baseline_latent"] = latent_baseline.outputs(prepared, factual, cf)
        outputs["oracle"] = [realise(pp, oracle_change(pp, prep, t), mask, residual)
                             for pp, t in zip(prepared, truth.images[..., 0])]
        outputs["oracle_deformation"] = [realise_deformation(pp, oracle_change(pp, prep, t), mask, residual)
                                         for pp, t in zip(prepared, truth.images[..., 0])]
        if anatomy is not None:  # given the true volume changes, as the regressions are given the true values
            volume_change = truth.labels[:, [BV, VV]] - samples.labels[:, [BV, VV]]

            def as_the_model(changes) -> list[np.ndarray]:
                return [pp.scan.data + anatomy(pp, ch, float(d[0]), float(d[1]), residual)[0]
                        for pp, ch, d in zip(prepared, changes, volume_change)]

            outputs[f"baseline_{anatomical}"] = as_the_model(baseline.change(factual, cf))
            outputs[f"baseline_quantile_{anatomical}"] = as_the_model(quantile_baseline.change(grid_images, factual, cf))
            outputs[f"oracle_{anatomical}"] = as_the_model([oracle_change(pp, prep, t)
                                                            for pp, t in zip(prepared, truth.images[..., 0])])
        if latent_baseline is not None:  # the true counterfactual in the model's own code, realised as its change
            true_grid = grid_images + np.stack([oracle_change(pp, prep, t) * mask
                                                 for pp, t in zip(prepared, truth.images[..., 0])])
            outputs["oracle_code"] = realise_codes(coded, prepared, factual_code, encode_images(coded, true_grid),
                                                   prep.grid_affine, mask, as_intensity, inset, residual)
        for name, sm in scan_models.items():
            outs = []
            for i, path in enumerate(inputs):
                t1 = time.perf_counter()
                sm.run(path, {var: float(targets[i])}, args.work / name / var / f"sub-{i:02d}",
                       covariates={brain.VARIABLES[j]: float(samples.labels[i, j]) for j in given})
                seconds[name].append(time.perf_counter() - t1)
                outs.append(read_nifti(args.work / name / var / f"sub-{i:02d}" / "counterfactual.nii.gz").data)
            outputs[name] = outs
        true_change = truth.labels[:, [BV, VV]] - samples.labels[:, [BV, VV]]
        floor = np.abs(brain.measure_volumes(truth.images[..., 0], truth.noise, FINE) - input_vol - true_change).mean(0)
        row = {"intervention": text, "resolution_mm": brain.FOV_MM / FINE, "n": args.n_test,
               **score(outputs, samples, truth, affected, input_vol),
               "volume_measurement_floor_ml": {"brain": float(floor[0]), "ventricles": float(floor[1])}}
        row["other_models"] = {}
        against_image = row["volume_error_against_true_image_ml"]
        for key, values in [*((k, row[k]) for k in ("image_mae", "ssim", "brain_volume_error_ml",
                                                     "ventricle_volume_error_ml", "true_direction_share")),
                            *((f"{part}_volume_error_against_true_image_ml", against_image[part])
                              for part in ("brain", "ventricles"))]:
            values["model"] = values.pop(first)
            for n in [n for n in list(values) if n in models and n != first]:
                row["other_models"].setdefault(n, {})[key] = values.pop(n)
        # the model's share as the number, every method's beside it
        row["true_direction_share_by_method"] = row["true_direction_share"]
        row["true_direction_share"] = row["true_direction_share_by_method"]["model"]
        rows.append(row)
        print(json.dumps(row), flush=True)

    training = {name: _training(path) for name, path in models.items()}
    result = {
        "machine": f"{platform.machine()}, {args.threads} thread(s), torch {torch.__version__}",
        "models": {name: {"checkpoint": str(path), "realisation": scan_models[name].realisation,
                          "residual": scan_models[name].residual,
                          "depth": scan_models[name].depth, **training[name]}
                   for name, path in models.items()},
        "model": first,
        # the whole recipe (rendering, registration, first stage, optimisation) where the checkpoint
        # recorded it, else the optimisation's minutes alone
        "train_cpu_minutes": training[first]["cpu_minutes"] or training[first]["train_minutes"],
        "seconds_per_scan": float(np.mean(seconds[first])),
        "seconds_per_scan_by_model": {n: float(np.mean(s)) for n, s in seconds.items()},
        "test_seed": test_seed(0) + args.test_offset, "ddim_steps": args.steps,
        "models_given": args.given,
        "depth": scan_models[first].depth,
        "baseline_fit_subjects": args.n_fit, "baseline_deformation_fit_subjects": n_def,
        "baseline_deformation_iterations": args.deformation_iterations,
        "baseline_quantile": f"voxelwise regression of the normal score under {quantile_baseline.n_quantiles} quantiles "
                             f"per voxel, fitted on {args.n_fit} subjects",
        "baseline_location_scale": f"voxelwise regression of intensity and of its log-variance, fitted on {args.n_fit} "
                                   "subjects",
        "baseline_latent": None if latent_baseline is None else
        f"linear regression in the first model's first-stage code, fitted on {n_def} subjects",
        "baseline_fit_seed": 4242 if args.fit_seed is None else args.fit_seed, "registration": registration,
        "reference_grid": args.size, "baseline_residual": residual,
        "interventions": rows,
    }
    args.results.parent.mkdir(parents=True, exist_ok=True)
    args.results.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.results}")


def _training(path) -> dict:
    meta = json.loads((Path(path) / "checkpoint.json").read_text())
    metrics = meta.get("metrics", {})
    prep = meta.get("image", {}).get("preprocessing", {})
    return {"steps": meta.get("step"), "train_minutes": metrics.get("train_minutes"),
            "cpu_minutes": metrics.get("cpu_minutes"),
            "registration": prep.get("registration"), "grid": prep.get("spatial_size")}


if __name__ == "__main__":
    main()
