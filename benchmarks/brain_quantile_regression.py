"""The voxelwise regressions of intensity and of the quantile score, against the true change on the model grid
and at 2 mm, with no model: does a change that depends on where the subject's voxel sits in the cohort beat
one that is the same for every subject? (docs/design-notes.md, "A change that is the subject's own").

    python benchmarks/brain_quantile_regression.py [--n-fit 2000] [--test-offset 30] [--n-test 6]

Fits both on the registered training subjects of `cdae-med train --dataset brain --size 32 --registration
affine --n-train 2000 --seed 0` (read from its cache), scores held-out subjects (the validation ones by
default) under brain_native.py's interventions: ``grid_mae`` the change on the 32^3 grid against the true
counterfactual's change there (x 255, inside the reference's head mask, over the whole grid), then image MAE,
volume errors and true direction at 2 mm with every change realised on the tissue. Writes
benchmarks/results/brain_native_evaluations/quantile_regression_grid_validation.json.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

from brain_native import (FINE, GRAPH, INTERVENTIONS, VOLUMES, VoxelwiseLinear, VoxelwiseQuantile, oracle_change,
                          realise, score)
from cdae_med.io import Scan
from pipelines.mri import Preprocessing, prepare_registered, reference_mask
from pipelines.registration import Reference
from pipelines.train_config import TrainConfig, test_seed
from pipelines.training_data import load_training_data, reference_space_labels
from synthetic_data import brain

ROOT = Path(__file__).resolve().parent


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n-fit", type=int, default=2000)
    p.add_argument("--test-offset", type=int, default=30)
    p.add_argument("--n-test", type=int, default=6)
    p.add_argument("--results", type=Path,
                   default=ROOT / "results" / "brain_native_evaluations" / "quantile_regression_grid_validation.json")
    args = p.parse_args()
    torch.set_num_threads(1)
    size = 32
    reference = Reference(*brain.reference(64))
    prep = Preprocessing(spacing_mm=(brain.FOV_MM / size,) * 3, spatial_size=(size,) * 3, registration="affine",
                         volume_variables=VOLUMES)
    mask = reference_mask(reference, prep)
    data = load_training_data(TrainConfig(dataset="brain", size=size, registration="affine", n_train=2000, seed=0))
    fit_images = ((data.images[:, 0] + 1) / 2).numpy()[:args.n_fit]
    fit_labels = data.dataset.graph.denormalise(data.labels.numpy())[:args.n_fit]
    prep = Preprocessing.from_dict(data.image_meta["preprocessing"])
    linear, quantile = VoxelwiseLinear().fit(fit_images, fit_labels), VoxelwiseQuantile().fit(fit_images, fit_labels)
    samples = brain.sample(args.n_test, seed=test_seed(0) + args.test_offset, size=FINE)
    affine = brain.affine(FINE)
    prepared = [prepare_registered(Scan(v[..., 0], affine, f"sub-{i:02d}"), prep, reference, mask)
                for i, v in enumerate(samples.images)]
    grid = np.stack([pp.image[0] for pp in prepared])
    ratios = np.array([pp.registration.volume_ratio for pp in prepared])
    input_vol = brain.measure_volumes(samples.images[..., 0], samples.noise, FINE)
    result = {"n_fit": args.n_fit, "test_seed": test_seed(0) + args.test_offset, "n_test": args.n_test,
              "residual": "tissue", "interventions": {}}
    for var, (text, target, affected) in INTERVENTIONS.items():
        truth = brain.counterfactual(samples, {var: target(samples.labels)}, size=FINE)
        factual, cf = (reference_space_labels(y, GRAPH, prep, ratios) for y in (samples.labels, truth.labels))
        true_change = np.stack([oracle_change(pp, prep, t) for pp, t in zip(prepared, truth.images[..., 0])])
        changes = {"copy": np.zeros_like(true_change), "linear": linear.change(factual, cf),
                   "quantile": quantile.change(grid, factual, cf)}
        outputs = {"copy": [s[..., 0] for s in samples.images]}
        outputs.update({name: [realise(pp, ch, mask, "tissue") for pp, ch in zip(prepared, changes[name])]
                        for name in ("linear", "quantile")})
        outputs["oracle"] = [realise(pp, ch, mask, "tissue") for pp, ch in zip(prepared, true_change)]
        row = {"intervention": text,
               "grid_mae": {k: float(np.abs((ch - true_change) * mask).mean() * 255) for k, ch in changes.items()},
               **score(outputs, samples, truth, affected, input_vol, ssim=False)}
        result["interventions"][var] = row
        print(json.dumps(row), flush=True)
    args.results.parent.mkdir(parents=True, exist_ok=True)
    args.results.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.results}")


if __name__ == "__main__":
    main()
