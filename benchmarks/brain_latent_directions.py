"""Which way does a trained brain model's decoder read each causal latent?

For held-out cohort subjects: abduct, then decode with one latent block overwritten (no
propagation through the graph) and with a full do(age) (descendants recomputed), and report the
mean intensity change inside the head (window units, [0, 1]; the factual scan's window for the
true counterfactual too, as `pipelines.datasets` does) beside the generator's true do(age) change. Brighter = more tissue (tissue is bright, CSF dark on this T1).

    python benchmarks/brain_latent_directions.py --checkpoint tests/assets/brain16-tiny

writes benchmarks/results/brain_latent_directions.json.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

from cdae_med.checkpoint import load_checkpoint
from cdae_med.counterfactual import abduct, act, predict
from cdae_med.diffusion import DDIM
from pipelines.datasets import get_dataset
from pipelines.train import test_seed

ROOT = Path(__file__).resolve().parent


def channel_first(images: np.ndarray) -> np.ndarray:
    return np.moveaxis(images, -1, 1).astype(np.float32)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--checkpoint", type=Path, required=True)
    ap.add_argument("--n", type=int, default=8)
    ap.add_argument("--steps", type=int, default=20, help="DDIM steps")
    args = ap.parse_args()
    torch.set_num_threads(1)
    ck = load_checkpoint(args.checkpoint)
    m, g, cfg = ck.model.eval(), ck.model.graph, ck.model.config
    size = cfg.image_size[0]
    ddim = DDIM(cfg.num_train_timesteps, cfg.beta_start, cfg.beta_end)
    ds = get_dataset("brain")
    s = ds.sample(args.n, seed=test_seed(0), size=size)  # each volume in its own intensity window
    x = channel_first(s.images)
    head = x > 0.1
    out = {"checkpoint": str(args.checkpoint), "training_steps": ck.step, "n": args.n, "ddim_steps": args.steps,
           "unit": "mean intensity change inside the head, window units", "rows": []}
    with torch.no_grad():
        ab = abduct(m, ddim, torch.from_numpy(x) * 2 - 1, args.steps)
        rec = predict(m, ddim, ab, ab.z)
        est = g.denormalise(m.latent_to_label(ab.z)).numpy()
        out["estimated_vs_true_mae"] = {v: float(np.abs(est[:, i] - s.labels[:, i]).mean()) for i, v in enumerate(g.names)}

        def change(z) -> float:
            return float(((predict(m, ddim, ab, z) - rec) / 2).numpy()[head].mean())

        for name, value in (("age", 30.0), ("age", 90.0), ("brain_volume", 900.0), ("brain_volume", 1400.0)):
            y = torch.zeros(args.n, len(g))
            y[:, g.index(name)] = value
            z = ab.z.clone()
            z[:, g.index(name)] = g.normalise(y)[:, g.index(name), None].expand(-1, cfg.latent_dim)
            out["rows"].append({"decode": f"only z_{name} := {value:g} (no propagation)", "model": change(z)})
        for age in (30.0, 90.0):
            z = act(m, ab, {"age": age})
            truth = ds.counterfactual(s, {"age": np.full(args.n, age)}, size=size)
            bv = g.denormalise(m.latent_to_label(z)).numpy()[:, g.index("brain_volume")]
            out["rows"].append({"decode": f"do(age = {age:g}), descendants recomputed", "model": change(z),
                                "true": float((channel_first(truth.images) - x)[head].mean()),
                                "model_brain_volume_change_ml": float((bv - est[:, g.index("brain_volume")]).mean()),
                                "true_brain_volume_change_ml": float((truth.labels[:, 2] - s.labels[:, 2]).mean())})
    for r in out["rows"]:
        print(r)
    dest = ROOT / "results" / "brain_latent_directions.json"
    dest.write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {dest}")


if __name__ == "__main__":
    main()
