"""How a change decided on the model's grid is best put onto a 2 mm scan: upsampled, or moved onto the
scan's tissue boundaries (`pipelines.realisation.onto_tissue`) with which weights.

Scored with the oracle, the generator's true counterfactual resampled onto the model's 32^3 grid (6 mm,
affine space) and carried back, so that the choice depends on no trained model: held-out subjects at
2 mm, image MAE x255 and volume errors against the true counterfactual, as `benchmarks/brain_native.py`
scores them, beside copying the input. A variant is ``NAME=EDGE_MM,POWER,FLOOR,SPREAD[,keep]``
(`onto_tissue`'s keywords; ``keep``: keep the change's local sum exactly).

    python benchmarks/brain_tissue_weights.py [--test-offset 30 --n-test 6] \\
        [--variant chosen=2,2,0.02,0.667 ...] [--results results/brain_tissue_weights.json]
"""

from __future__ import annotations

import argparse
import json
import platform
from pathlib import Path

import numpy as np
import torch

from brain_native import FINE, INTERVENTIONS, ROOT, VOLUMES, oracle_change, score
from cdae_med.io import Scan
from pipelines.mri import Preprocessing, prepare_registered, reference_mask, restore_change
from pipelines.realisation import onto_tissue
from pipelines.registration import Reference
from pipelines.train_config import test_seed
from synthetic_data import brain

VARIANTS = ["edge1=2,1,0.02,0.5", "chosen=2,2,0.02,0.667", "power2=2,2,0.02,0.5", "power3=2,3,0.02,0.5",
            "spread1=2,2,0.02,1.0", "sharp_edge=1.4,2,0.02,0.667", "floor0.05=2,1,0.05,0.5",
            "keep=2,2,0.02,0.5,keep", "keep_spread=2,2,0.02,0.333,keep"]


def variant(spec: str) -> tuple[str, dict]:
    name, _, values = spec.partition("=")
    v = values.split(",")
    if len(v) not in (4, 5) or (len(v) == 5 and v[4] != "keep"):
        raise SystemExit(f"--variant {spec!r}: expected NAME=EDGE_MM,POWER,FLOOR,SPREAD[,keep]")
    return name, {"edge_mm": float(v[0]), "power": float(v[1]), "floor": float(v[2]), "spread": float(v[3]),
                  "keep_sum": len(v) == 5}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--variant", action="append", default=None, help="NAME=EDGE_MM,POWER,FLOOR,SPREAD[,keep]")
    p.add_argument("--n-test", type=int, default=6)
    p.add_argument("--test-offset", type=int, default=30,
                   help="held-out subjects: test_seed(0) + this (30: the validation subjects; 17: the reported ones)")
    p.add_argument("--results", type=Path, default=ROOT / "results" / "brain_tissue_weights.json")
    args = p.parse_args()
    torch.set_num_threads(1)
    variants = dict(variant(s) for s in (args.variant or VARIANTS))

    reference = Reference(*brain.reference(64))
    prep = Preprocessing(spacing_mm=(6.0,) * 3, spatial_size=(32,) * 3, registration="affine",
                         volume_variables=VOLUMES)
    mask = reference_mask(reference, prep)
    samples = brain.sample(args.n_test, seed=test_seed(0) + args.test_offset, size=FINE)
    affine = brain.affine(FINE)
    prepared = [prepare_registered(Scan(v[..., 0], affine, f"sub-{i:02d}"), prep, reference, mask)
                for i, v in enumerate(samples.images)]
    input_vol = brain.measure_volumes(samples.images[..., 0], samples.noise, FINE)
    rows = []
    for var, (text, target, affected) in INTERVENTIONS.items():
        truth = brain.counterfactual(samples, {var: target(samples.labels)}, size=FINE)
        outputs = {"copy": [s[..., 0] for s in samples.images], "upsampled": []}
        for pp, t in zip(prepared, truth.images[..., 0]):
            up = restore_change(pp, oracle_change(pp, prep, t) * mask)
            outputs["upsampled"].append(pp.scan.data + up)
            for name, kw in variants.items():
                outputs.setdefault(name, []).append(pp.scan.data + onto_tissue(up, pp.scan.data, pp.scan.spacing, 6.0,
                                                                               **kw))
        row = score(outputs, samples, truth, affected, input_vol, ssim=False)
        rows.append({"intervention": text, **row})
        print(text, {k: round(v, 3) for k, v in row["image_mae"].items()}, flush=True)
    result = {"machine": f"{platform.machine()}, 1 thread, torch {torch.__version__}",
              "test_seed": test_seed(0) + args.test_offset, "n_test": args.n_test, "resolution_mm": 2.0,
              "model_grid": "32^3, 6 mm, affine", "variants": variants, "interventions": rows}
    args.results.parent.mkdir(parents=True, exist_ok=True)
    args.results.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.results}")


if __name__ == "__main__":
    main()
