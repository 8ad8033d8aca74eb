"""How well a checkpoint's learned causal mechanisms match the data set's own label relations.

For each variable with parents: f_i(mu(y_parents)) (the mechanism on the labels' latent values,
averaged over its block) against the label mu(y_i), on 1,000 fresh generated samples: R^2 and MAE
in normalised units. A perfect mechanism of a deterministic relation (Pendulum's shadow) has
R^2 near 1; where the variable has its own noise (brain volume: head size) R^2 is below 1 even
for the true mechanism. Also copies each checkpoint's end-of-training counterfactual errors.

    python benchmarks/mechanism_fit.py --checkpoint runs/a runs/b [--label old new] [--results mechanism_fit.json]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

from cdae_med.checkpoint import load_checkpoint
from pipelines.datasets import get_dataset

ROOT = Path(__file__).resolve().parent


def mechanism_fit(path: Path, n: int = 1000, seed: int = 5) -> dict:
    ck = load_checkpoint(path)
    model = ck.model.eval()
    ds = get_dataset(ck.dataset)
    labels = ds.sample(n, seed=seed, size=ck.image["size"][0]).labels
    y = torch.tensor(ds.graph.normalise(labels), dtype=torch.float32)
    z = model.label_latent(y)
    blocks = [z[:, i] for i in range(z.shape[1])]
    fit = {}
    with torch.no_grad():
        for name in model.causal.mechanisms:
            f = model.causal.mechanism(name, blocks).mean(-1).numpy()
            t = y[:, model.causal.index[name]].numpy()
            fit[name] = {"r2": float(1 - ((f - t) ** 2).mean() / t.var()), "mae_normalised": float(np.abs(f - t).mean())}
    return {"checkpoint": str(path), "dataset": ck.dataset, "steps": ck.step, "mechanisms": fit,
            "eval": ck.metrics.get("eval")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--checkpoint", type=Path, nargs="+", required=True)
    ap.add_argument("--label", nargs="+", help="one name per checkpoint")
    ap.add_argument("--note", default="")
    ap.add_argument("--results", default="mechanism_fit.json", help="file name under benchmarks/results/")
    args = ap.parse_args()
    labels = args.label or [str(p) for p in args.checkpoint]
    if len(labels) != len(args.checkpoint):
        ap.error("--label needs one name per --checkpoint")
    out = {"note": args.note, "runs": {lab: mechanism_fit(p) for lab, p in zip(labels, args.checkpoint)}}
    print(json.dumps(out, indent=2))
    dest = ROOT / "results" / args.results
    dest.write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {dest}")


if __name__ == "__main__":
    main()
