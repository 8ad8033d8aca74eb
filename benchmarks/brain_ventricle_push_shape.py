"""Which shape of the ventricle push (:class:`pipelines.anatomy.VentriclePush`) renders the generator's ventricle
change best, given the true volume change and no model.

The validation subjects of `brain_native.py` (held-out generator subjects at 2 mm, ``--test-offset 30``) under
do(ventricle_volume): each subject's ventricles are pushed by a range of sizes, alone and with the cortex
making up the brain volume the push's compression of the tissue takes (as realisation ``volumes`` does), and
each output is compared with the generator's true counterfactual: image MAE (x 255) and the ventricle volume
error (ml, the generator's tissue model). Per push shape (decay length, grid spacing, smoothing, the share of
CSF its core starts from), the JSON gives the mean at the size where the push's own reading of the ventricles
has changed by the true volume (what the realisation solves for; interpolated between the sizes tried), and the
mean of each subject's best size (what a perfect choice of size would give).

    OMP_NUM_THREADS=1 python benchmarks/brain_ventricle_push_shape.py [--test-offset 30] [--n-test 6]

writes benchmarks/results/brain_native_evaluations/ventricle_push_shape.json.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

from brain_native import FINE, INTERVENTIONS, held_out_subjects
from pipelines.anatomy import VentriclePush
from pipelines.realisation import deform_scan, jacobian_determinant
from pipelines.registry import SHIPPED
from pipelines.scans import ScanModel
from pipelines.train_config import test_seed
from synthetic_data import brain

ROOT = Path(__file__).resolve().parent
VV = brain.VARIABLES.index("ventricle_volume")
# name: (VentriclePush settings, share of CSF the core starts from (None: the push's own))
SHAPES = {
    "decay 10 mm, 3 mm grid, smoothing 1.5": (dict(decay_mm=10.0, spacing_mm=3.0, smoothing_voxels=1.5), None),
    "decay 15 mm, 3 mm grid, smoothing 1.5": (dict(decay_mm=15.0, spacing_mm=3.0, smoothing_voxels=1.5), None),
    "decay 10 mm, 3 mm grid, smoothing 1": (dict(decay_mm=10.0, spacing_mm=3.0, smoothing_voxels=1.0), None),
    "decay 10 mm, 2 mm grid, smoothing 1.5": (dict(decay_mm=10.0, spacing_mm=2.0, smoothing_voxels=1.5), None),
    "decay 10 mm, 2 mm grid, smoothing 1": (dict(decay_mm=10.0, spacing_mm=2.0, smoothing_voxels=1.0), None),
    "decay 10 mm, 2 mm grid, smoothing 1, core 0.5": (dict(decay_mm=10.0, spacing_mm=2.0, smoothing_voxels=1.0), 0.5),
    "decay 7 mm, 2 mm grid, smoothing 1": (dict(decay_mm=7.0, spacing_mm=2.0, smoothing_voxels=1.0), None),
    "decay 7 mm, 2 mm grid, smoothing 0.75": (dict(decay_mm=7.0, spacing_mm=2.0, smoothing_voxels=0.75), None),
    "decay 5 mm, 2 mm grid, smoothing 1": (dict(decay_mm=5.0, spacing_mm=2.0, smoothing_voxels=1.0), None),
    "decay 3.5 mm, 2 mm grid, smoothing 1": (dict(decay_mm=3.5, spacing_mm=2.0, smoothing_voxels=1.0), None),
}
SIZES = (0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 5.0, 6.0)  # mm of push at the wall (the sign of the true change)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--test-offset", type=int, default=30)
    p.add_argument("--n-test", type=int, default=6)
    p.add_argument("--work", type=Path, default=ROOT / "work" / "brain_push_shape")
    p.add_argument("--results", type=Path,
                   default=ROOT / "results" / "brain_native_evaluations" / "ventricle_push_shape.json")
    args = p.parse_args()
    torch.set_num_threads(1)
    model = ScanModel.load(SHIPPED["brain"], device="cpu", realisation="volumes", residual="tissue")
    anatomy = model.anatomy
    samples, paths = held_out_subjects(args.n_test, args.test_offset, args.work)
    prepared = [model.prepare(path) for path in paths]
    _, target, _ = INTERVENTIONS["ventricle_volume"]
    truth = brain.counterfactual(samples, {"ventricle_volume": target(samples.labels)}, size=FINE)
    true_change = truth.labels[:, VV] - samples.labels[:, VV]
    input_vol = brain.measure_volumes(samples.images[..., 0], samples.noise, FINE)

    def score(i: int, out: np.ndarray) -> tuple[float, float]:
        vol = brain.measure_volumes(out[None], {k: v[i:i + 1] for k, v in samples.noise.items()}, FINE)[0]
        return float(np.abs(out - truth.images[i, ..., 0]).mean() * 255), float(vol[1] - input_vol[i, 1] - true_change[i])

    copy = [score(i, pp.scan.data) for i, pp in enumerate(prepared)]
    rows = {"copy": {"image_mae": round(float(np.mean([c[0] for c in copy])), 3),
                     "ventricle_volume_error_ml": round(float(np.mean([abs(c[1]) for c in copy])), 2)}}
    extent = float(model.preprocessing.spacing_mm[0]) * int(model.preprocessing.spatial_size[0])
    for name, (settings, core_share) in SHAPES.items():
        push = VentriclePush(model.reference, extent, anatomy.levels.grey_share, **settings)
        found = {"push": [], "push and cortex": []}
        folded = 0
        for i, pp in enumerate(prepared):
            reading = push.read(pp)
            share = push.share(push.on_grid(pp), reading.csf, reading.white) * push.region
            field = push.field(push.ventricle_core(share, core_share))
            tried = []
            for size in SIZES:
                phi = push.flow(field, float(np.sign(true_change[i])) * size)
                pushed = deform_scan(pp.registration, phi)
                balanced, _ = anatomy._on_cortex(pp, pushed, np.zeros_like(pushed), 0.0, reading)
                read = push.volume_ml(pp, pushed, reading) - push.volume_ml(pp, reading=reading)
                tried.append((abs(read), score(i, pushed), score(i, balanced), jacobian_determinant(phi).min() > 0))
            reads = np.array([t[0] for t in tried])
            at = int(np.searchsorted(reads, abs(true_change[i])))
            folded += not all(t[3] for t in tried[:min(at + 1, len(tried))])
            for key, k in (("push", 1), ("push and cortex", 2)):
                mae, err = (np.array([t[k][j] for t in tried]) for j in (0, 1))
                found[key].append((np.interp(abs(true_change[i]), reads, mae),
                                   abs(np.interp(abs(true_change[i]), reads, err)), mae.min()))
        rows[name] = {key: {"image_mae_at_true_change": round(float(np.mean([f[0] for f in v])), 3),
                            "ventricle_volume_error_ml_at_true_change": round(float(np.mean([f[1] for f in v])), 2),
                            "image_mae_at_best_size": round(float(np.mean([f[2] for f in v])), 3)}
                      for key, v in found.items()}
        rows[name]["subjects_folding_by_the_true_change"] = folded
        print(name, json.dumps(rows[name]), flush=True)
    args.results.parent.mkdir(parents=True, exist_ok=True)
    args.results.write_text(json.dumps({
        "test_seed": test_seed(0) + args.test_offset, "n": args.n_test, "intervention": INTERVENTIONS[
            "ventricle_volume"][0], "sizes_mm": SIZES,
        "settings": "image MAE x255 / ml against the generator's true counterfactual at 2 mm; no model, the true "
                    "volume change", "shapes": rows}, indent=1))


if __name__ == "__main__":
    main()
