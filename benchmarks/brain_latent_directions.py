"""Which way does a trained brain model's decoder read each causal latent?

For held-out cohort subjects: abduct, then decode with one latent block overwritten (no
propagation through the graph) and with a full do(age) (descendants recomputed), and report the
mean intensity change inside the head (window units, [0, 1]) beside the generator's true do(age)
change. The true counterfactual is shown in the factual scan's intensity window, as
`pipelines.datasets` does. Brighter = more tissue (tissue is bright, CSF dark on this T1).

    python benchmarks/brain_latent_directions.py --checkpoint tests/assets/brain16-tiny

writes benchmarks/results/brain_latent_directions.json.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

from cdae_med.pipeline import CounterfactualPipeline
from pipelines.datasets import get_dataset
from pipelines.train_config import test_seed

ROOT = Path(__file__).resolve().parent


def channel_first(images: np.ndarray) -> np.ndarray:
    return np.moveaxis(images, -1, 1).astype(np.float32)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--checkpoint", type=Path, required=True)
    ap.add_argument("--n", type=int, default=8)
    ap.add_argument("--steps", type=int, default=20, help="DDIM steps")
    ap.add_argument("--out", type=Path, default=ROOT / "results" / "brain_latent_directions.json")
    args = ap.parse_args()
    torch.set_num_threads(1)
    pipe = CounterfactualPipeline.from_checkpoint(args.checkpoint, device="cpu")
    g, size = pipe.graph, pipe.model.config.image_size[0]
    ds = get_dataset("brain")
    s = ds.sample(args.n, seed=test_seed(0), size=size)  # each volume in its own intensity window
    x = channel_first(s.images)
    head = x > 0.1
    out = {"checkpoint": str(args.checkpoint), "training_steps": pipe.checkpoint.step, "n": args.n,
           "ddim_steps": args.steps, "unit": "mean intensity change inside the head, window units", "rows": []}
    ab = pipe.abduct(torch.from_numpy(x) * 2 - 1, num_steps=args.steps)
    rec, _ = pipe.decode(ab, ab.z)
    est = pipe.read_values(ab.z).numpy()
    out["estimated_vs_true_mae"] = {v: float(np.abs(est[:, i] - s.labels[:, i]).mean()) for i, v in enumerate(g.names)}

    def change(z) -> float:
        return float(((pipe.decode(ab, z)[0] - rec) / 2).numpy()[head].mean())

    for name, value in (("age", 30.0), ("age", 90.0), ("brain_volume", 900.0), ("brain_volume", 1400.0)):
        z = pipe.act(ab, {name: value}, propagate=False)  # only this block overwritten
        out["rows"].append({"decode": f"only z_{name} := {value:g} (no propagation)", "model": change(z)})
    bv_i = g.index("brain_volume")
    for age in (30.0, 90.0):
        z = pipe.act(ab, {"age": age})
        truth = ds.counterfactual(s, {"age": np.full(args.n, age)}, size=size)
        bv = pipe.read_values(z).numpy()[:, bv_i]
        out["rows"].append({"decode": f"do(age = {age:g}), descendants recomputed", "model": change(z),
                            "true": float((channel_first(truth.images) - x)[head].mean()),
                            "model_brain_volume_change_ml": float((bv - est[:, bv_i]).mean()),
                            "true_brain_volume_change_ml": float((truth.labels[:, bv_i] - s.labels[:, bv_i]).mean())})
    for r in out["rows"]:
        print(r)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
