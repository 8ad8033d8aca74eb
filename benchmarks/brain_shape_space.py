"""How much of a true brain counterfactual a low-dimensional space of deformations can carry.

``brain_native.json`` finds a voxelwise linear regression of deformation the strongest simple
baseline on do(age) and do(ventricle_volume). Before a model learns its change as a deformation,
this asks what such a model could reach at best: the diffeomorphic-demons displacement from the
cohort's mean registered image onto a subject (``VoxelwiseDeformation``'s fields), for the
held-out subject and for its true counterfactual, both registered as the scan is; their
difference warps the scan itself (``shape oracle``), and the same difference after projecting
both fields onto the first K principal components of the fit subjects' fields (``shape oracle,
K PCs``). Beside them, as in ``brain_native.py``: copying the input and the deformation baseline.
Image MAE x 255 at 2 mm against the true counterfactual, volume errors by the generator's tissue
model.

    python benchmarks/brain_shape_space.py [--n-fit 500] [--components 16 64] [--n-test 8]

writes benchmarks/results/brain_shape_space.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import numpy as np
import torch
from sklearn.decomposition import PCA

from brain_native import (FINE, INTERVENTIONS, ROOT, Preprocessing, Reference, Scan, VoxelwiseDeformation, brain,
                          prepare_registered, reference_mask, score, test_seed)
from pipelines.mri import normalise_intensity
from pipelines.realisation import GridDeformation, deform_scan
from pipelines.train_config import TrainConfig
from pipelines.training_data import load_training_data


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n-fit", type=int, default=500, help="registered training subjects the fields are fitted on")
    p.add_argument("--components", type=int, nargs="+", default=[16, 64])
    p.add_argument("--n-test", type=int, default=8)
    p.add_argument("--test-offset", type=int, default=17, help="brain_native.py's reported subjects")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--results", type=Path, default=ROOT / "results" / "brain_shape_space.json")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    reference = Reference(*brain.reference(64))
    prep = Preprocessing(spacing_mm=(brain.FOV_MM / 32,) * 3, spatial_size=(32,) * 3, registration="rigid")
    mask = reference_mask(reference, prep)
    data = load_training_data(TrainConfig(dataset="brain", size=32, registration="rigid", n_train=2000, seed=0))
    images = ((data.images[: args.n_fit, 0] + 1) / 2).numpy()
    labels = data.dataset.graph.denormalise(data.labels.numpy())[: args.n_fit]
    t0 = time.perf_counter()
    baseline = VoxelwiseDeformation(images.mean(0), prep.grid_affine, mask)
    fields = baseline.fields(images)
    fit_s = time.perf_counter() - t0
    baseline.fit(fields, labels)
    pcas = {k: PCA(k, random_state=0).fit(fields.reshape(len(fields), -1)) for k in args.components}
    print(f"{len(fields)} fields in {fit_s:.0f} s", flush=True)

    samples = brain.sample(args.n_test, seed=test_seed(0) + args.test_offset, size=FINE)
    affine = brain.affine(FINE)
    prepared = [prepare_registered(Scan(v[..., 0], affine, f"sub-{i:02d}"), prep, reference, mask)
                for i, v in enumerate(samples.images)]
    grid = (prep.grid_affine, prep.spatial_size)

    def registered(volumes):
        """2 mm volumes of the subjects' spaces, registered and windowed as each subject's scan is."""
        return np.stack([normalise_intensity(pp.registration.resample(*grid, data=v), pp.window) * mask
                         for pp, v in zip(prepared, volumes)])

    def warp(du):
        """The scans warped as by a change du of their fields (VoxelwiseDeformation.deformations)."""
        return [deform_scan(pp.registration, GridDeformation.from_displacement(-d, grid[0]))
                for pp, d in zip(prepared, du)]

    def project(pca, u):
        return pca.inverse_transform(pca.transform(u.reshape(len(u), -1))).reshape(u.shape)

    factual_fields = baseline.fields(np.stack([pp.image[0] for pp in prepared]))
    factual_projected = {k: project(pca, factual_fields) for k, pca in pcas.items()}
    input_vol = brain.measure_volumes(samples.images[..., 0], samples.noise, FINE)
    rows = []
    for var, (text, target, affected) in INTERVENTIONS.items():
        truth = brain.counterfactual(samples, {var: target(samples.labels)}, size=FINE)
        outputs = {"copy": [s[..., 0] for s in samples.images]}
        outputs["baseline_deformation"] = [deform_scan(pp.registration, phi) for pp, phi in
                                           zip(prepared, baseline.deformations(samples.labels, truth.labels))]
        cf_fields = baseline.fields(registered(truth.images[..., 0]))
        outputs["shape_oracle"] = warp(cf_fields - factual_fields)
        for k, pca in pcas.items():
            outputs[f"shape_oracle_{k}pc"] = warp(project(pca, cf_fields) - factual_projected[k])
        row = {"intervention": text, "resolution_mm": brain.FOV_MM / FINE, "n": args.n_test,
               **score(outputs, samples, truth, affected, input_vol, ssim=False)}
        rows.append(row)
        print(json.dumps(row), flush=True)
    results = {"machine": f"{platform.machine()}, {args.threads} thread(s), torch {torch.__version__}",
               "fit_subjects": len(fields), "fit_seconds": fit_s, "components": args.components,
               "explained_variance": {k: float(p.explained_variance_ratio_.sum()) for k, p in pcas.items()},
               "test_seed": test_seed(0) + args.test_offset, "interventions": rows}
    args.results.parent.mkdir(parents=True, exist_ok=True)
    args.results.write_text(json.dumps(results, indent=2))
    print(f"wrote {args.results}")


if __name__ == "__main__":
    main()
