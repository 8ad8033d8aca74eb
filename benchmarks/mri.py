"""Brain-MRI counterfactuals against the cohort's truth: 3D model vs 2D slice-wise model.

Trains both kinds for the same CPU budget on the synthetic brain cohort, writes held-out
subjects as NIfTI files, asks each model for do(age = age +- 20) through the scan pipeline
(`pipelines.scans`, given age and sex as known covariates), and compares the output with the
generator's true counterfactual:

- image MAE (input intensity units x 255, whole volume) beside copying the input;
- brain-volume error in ml, measured on the output image by a volumetry regressor (ridge on
  the intensity histogram, fitted on generated subjects; its own held-out error is reported),
  beside copying the input, and the error of the model's own counterfactual brain volume;
- the share of subjects whose measured brain volume moves in the true direction;
- seconds per scan (one at a time) and scans per hour in batch mode.

    python benchmarks/mri.py [--minutes 15] [--n-test 6] [--size 32]

writes benchmarks/results/mri.json.
"""

from __future__ import annotations

import argparse
import csv
import json
import platform
import shutil
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import torch

from pipelines.cohort import read_manifest
from pipelines.mri import intensity_window
from pipelines.batch import run_batch
from pipelines.scans import ScanModel
from pipelines.train import train
from pipelines.train_config import TINY_MODEL, TrainConfig, test_seed
from pipelines.volumetry import HistogramVolumetry
from synthetic_data import brain

ROOT = Path(__file__).resolve().parent
# The tests' tiny network; its levels are all 32 wide, so with 32 GroupNorm groups it cannot read z.
TINY_8_GROUPS = {**TINY_MODEL, "unet_norm_groups": 8}
# TrainConfig's largest step limit: the training budget is --minutes alone.
MAX_STEPS = 10_000_000


def fit_volumetry(size: int, n: int = 400, seed: int = 77):
    s = brain.sample(n, seed=seed, size=size)
    volumes, bv = s.images[..., 0], s.labels[:, brain.VARIABLES.index("brain_volume")]
    k = int(0.8 * n)
    reg = HistogramVolumetry().fit(volumes[:k], bv[:k])
    return reg, float(np.abs(reg.predict(volumes[k:]) - bv[k:]).mean())


def evaluate_model(ckpt: Path, kind: str, work: Path, samples, targets, truth, reg, batch_size: int,
                   num_steps: int, guidance: float = 1.0) -> dict:
    model = ScanModel.load(ckpt, device="cpu", num_steps=num_steps, guidance=guidance)
    cohort = work / "cohort"
    t0 = time.perf_counter()
    model.run(cohort / "sub-00000.nii.gz", {"age": float(targets[0])}, work / f"single-{kind}",
              covariates={"age": float(samples.labels[0, 0]), "sex": float(samples.labels[0, 1])})
    single_s = time.perf_counter() - t0
    # One intervention value per batch run: group the subjects by target age.
    subjects = read_manifest(cohort / "manifest.csv", model.graph, require_all=False)
    out = work / f"batch-{kind}"
    shutil.rmtree(out, ignore_errors=True)
    t0 = time.perf_counter()
    for target in sorted(set(targets.tolist())):
        chosen = [s for s, t in zip(subjects, targets) if t == target]
        run_batch(model, chosen, {"age": float(target)}, out, batch_size=batch_size, progress=False)
    batch_s = time.perf_counter() - t0
    bv_i = brain.VARIABLES.index("brain_volume")
    img_err, copy_err, vol_err, vol_copy, vol_report, moved, true_moved = [], [], [], [], [], [], []
    for i, s in enumerate(subjects):
        inp = samples.images[i, ..., 0]
        window = intensity_window(inp)
        cf = nib.load(out / s.subject_id / "counterfactual.nii.gz").get_fdata(dtype=np.float32)
        report = json.loads((out / s.subject_id / "report.json").read_text())
        true_img = truth.images[i, ..., 0]
        img_err.append(np.abs(cf - true_img).mean() * 255)
        copy_err.append(np.abs(inp - true_img).mean() * 255)
        v_cf, v_in = reg.predict([cf, inp], window)
        true_bv = truth.labels[i, bv_i]
        vol_err.append(abs(v_cf - true_bv))
        vol_copy.append(abs(v_in - true_bv))
        vol_report.append(abs(report["counterfactual"]["brain_volume"]["value"] - true_bv))
        moved.append(v_cf - v_in)
        true_moved.append(true_bv - samples.labels[i, bv_i])
    meta = json.loads((ckpt / "checkpoint.json").read_text())
    return {
        "model": kind,
        "guidance": guidance,
        "training": {"steps": meta["step"], "minutes": meta["metrics"].get("train_minutes"),
                     "images_per_s": meta["metrics"].get("train_images_per_s"),
                     "batch_size": meta["training"]["batch_size"]},
        "image_mae_255": float(np.mean(img_err)),
        "image_mae_255_copy_input": float(np.mean(copy_err)),
        "brain_volume_error_ml": float(np.mean(vol_err)),
        "brain_volume_error_ml_copy_input": float(np.mean(vol_copy)),
        "brain_volume_error_ml_model_report": float(np.mean(vol_report)),
        "brain_volume_true_direction_share": float(np.mean(np.sign(moved) == np.sign(true_moved))),
        "brain_volume_change_ml_measured": [round(float(x), 1) for x in moved],
        "brain_volume_change_ml_true": [round(float(x), 1) for x in true_moved],
        "seconds_per_scan_single": single_s,
        "scans_per_hour_batch": len(subjects) / batch_s * 3600,
        "batch_size": batch_size,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--minutes", type=float, default=15.0, help="training budget per model")
    ap.add_argument("--size", type=int, default=32)
    ap.add_argument("--n-test", type=int, default=6)
    ap.add_argument("--steps", type=int, default=50, help="DDIM steps")
    ap.add_argument("--work", type=Path, default=ROOT / "work" / "mri")
    ap.add_argument("--kinds", default="2d,3d")
    ap.add_argument("--reuse", action="store_true", help="evaluate models trained by an earlier run")
    ap.add_argument("--guidance", type=float, nargs="+", default=[1.0],
                    help="guidance weights to evaluate each model at (factual reference)")
    ap.add_argument("--tiny", action="store_true", help="the tests' tiny network, with 8 GroupNorm groups, instead of the default")
    ap.add_argument("--results", default="mri.json", help="file name under benchmarks/results/")
    ap.add_argument("--batch-size", type=int, default=None, help="training batch (default 32 for 2D, 4 for 3D)")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    args.work.mkdir(parents=True, exist_ok=True)

    reg, reg_err = fit_volumetry(args.size)
    print(f"volumetry regressor: held-out brain-volume MAE {reg_err:.1f} ml", flush=True)
    seed = test_seed(0)
    shutil.rmtree(args.work / "cohort", ignore_errors=True)
    brain.write_dataset(args.work / "cohort", n=args.n_test, size=args.size, seed=seed, progress=False)
    samples = brain.sample(args.n_test, seed=seed, size=args.size)
    age = samples.labels[:, 0]
    targets = np.where(age < 65, np.round(age) + 20, np.round(age) - 20)
    truth = brain.counterfactual(samples, {"age": targets}, size=args.size)
    with open(args.work / "cohort" / "manifest.csv") as fh:  # keep only what a clinic knows: age, sex
        rows = [[r[0], r[1], r[2], r[3]] for r in csv.reader(fh)]
    with open(args.work / "cohort" / "manifest.csv", "w", newline="") as fh:
        csv.writer(fh).writerows(rows)

    results = []
    for kind in args.kinds.split(","):
        cfg = TrainConfig(dataset="brain", out=str(args.work / f"model-{kind}"), size=args.size,
                          minutes=args.minutes, steps=MAX_STEPS, eval_n=0, grid_rows=1, device="cpu",
                          slicewise=kind == "2d", batch_size=args.batch_size or (32 if kind == "2d" else 4),
                          n_train=10_000 if kind == "2d" else 2_000, model=TINY_8_GROUPS if args.tiny else {})
        t0 = time.perf_counter()
        if args.reuse and (Path(cfg.out) / "checkpoint.json").is_file():
            ckpt = Path(cfg.out)
            print(f"{kind}: reusing the model trained earlier in {ckpt}", flush=True)
        else:
            ckpt = train(cfg, progress=False)
            print(f"{kind}: trained in {(time.perf_counter() - t0) / 60:.1f} min", flush=True)
        for w in args.guidance:
            res = evaluate_model(ckpt, kind, args.work, samples, targets, truth, reg,
                                 batch_size=4, num_steps=args.steps, guidance=w)
            print(json.dumps(res, indent=2), flush=True)
            results.append(res)

    out = {
        "machine": f"{platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}",
        "note": "CPU budget per model; the machine was shared with other work during the run",
        "size": args.size, "network": "tiny (tests' TINY_MODEL)" if args.tiny else "default", "n_test": args.n_test, "ddim_steps": args.steps,
        "intervention": "do(age = age + 20 if age < 65 else age - 20); age and sex given as covariates",
        "volumetry_regressor_heldout_mae_ml": reg_err,
        "results": results,
    }
    dest = ROOT / "results" / args.results
    dest.parent.mkdir(parents=True, exist_ok=True)
    dest.write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {dest}")


if __name__ == "__main__":
    main()
