"""How high DCI disentanglement can go on a data set whose factors are correlated, and what limits it.

DCI (Eastwood & Williams 2018, as the CausalDiffAE paper computes it: one gradient-boosted regressor
per factor on every latent dimension) rewards each code for informing one factor only. Where the
graph makes the factors correlated (Morpho-MNIST: thickness -> intensity, correlation 0.90 on the test labels),
a code that reads its own factor imprecisely is beaten, inside the regressor, by the *other*
factor's code, and the importance spreads over both. So DCI there measures mostly how precisely
the encoder reads the labels. Three parts, all on the data set's held-out test images:

- ``noise``: the ideal code (each factor's normalised label, one dimension per factor) plus Gaussian
  read-out noise of a given standard deviation per factor: DCI as a function of read-out precision.
- ``label_only``: CausalDiffAE's own encoder (the model defaults for the data set) trained on the
  labels alone (squared error of the posterior mean to the label, in every dimension of the block),
  for ``--minutes`` on ``--n-train`` images per run: the precision this network reaches when it has
  nothing else to learn, and the DCI that comes with it (evaluated every ``--eval-every`` steps, since
  both move from one step to the next).
- ``checkpoints``: DCI and read-out error of trained CausalDiffAE checkpoints (``--checkpoint``).

    python benchmarks/dci_ceiling.py --dataset morphomnist --n-train 10000 60000 --minutes 8 --threads 1
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import numpy as np
import torch

from cdae_med.metrics import dci_disentanglement
from cdae_med.model import CausalDiffAEConfig, Encoder
from pipelines.datasets import get_dataset, to_tensor
from pipelines.evaluate import posterior_causal_latents
from pipelines.train_config import MODEL_DEFAULTS, test_seed

ROOT = Path(__file__).resolve().parent
NOISE_STD = (0.0, 0.01, 0.02, 0.03, 0.05, 0.1)


def test_set(ds, n: int, size: int):
    test = ds.sample(n, seed=test_seed(0), size=size)
    return to_tensor(test.images), ds.graph.normalise(test.labels)


def readout(codes: np.ndarray, y: np.ndarray) -> dict:
    """DCI of (N, n_vars, d) codes and the MAE of each block's mean against its normalised label."""
    return {"dci": dci_disentanglement(codes.reshape(len(codes), -1), y),
            "readout_mae": np.abs(codes.mean(-1) - y).mean(0).round(4).tolist()}


def noise_sensitivity(y: np.ndarray, seed: int = 0) -> list[dict]:
    rng = np.random.default_rng(seed)
    return [{"noise_std": s, "dci": dci_disentanglement(y + rng.normal(0.0, s, y.shape), y)} for s in NOISE_STD]


def label_only(ds, n_train: int, minutes: float, x_test: torch.Tensor, y_test: np.ndarray, size: int,
               lr: float, eval_every: int, seed: int = 0) -> dict:
    t0 = time.perf_counter()
    train = ds.sample(n_train, seed=seed, size=size)
    x, y = to_tensor(train.images), torch.as_tensor(ds.graph.normalise(train.labels), dtype=torch.float32)
    generated_s = time.perf_counter() - t0
    torch.manual_seed(seed)
    cfg = CausalDiffAEConfig(spatial_dims=ds.spatial_dims, in_channels=ds.channels, image_size=(size,) * ds.spatial_dims,
                             **MODEL_DEFAULTS)
    encoder = Encoder(cfg, len(ds.graph.names))
    opt = torch.optim.AdamW(encoder.parameters(), lr=lr)
    gen = torch.Generator().manual_seed(seed)
    evals, step, t0 = [], 0, time.perf_counter()
    while time.perf_counter() - t0 < minutes * 60:
        idx = torch.randint(0, n_train, (32,), generator=gen)
        mean, _ = encoder(x[idx])
        loss = ((mean - y[idx, :, None]) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        step += 1
        if step % eval_every == 0:
            with torch.no_grad():
                evals.append({"step": step, **readout(encoder(x_test)[0].numpy(), y_test)})
    late = [e["dci"] for e in evals[len(evals) // 2:]]
    return {"n_train": n_train, "minutes": minutes, "steps": step, "generated_s": round(generated_s, 1),
            "dci_second_half": {"mean": float(np.mean(late)), "min": float(np.min(late)), "max": float(np.max(late))}
            if late else None, "evaluations": evals}


def checkpoint_readout(path: Path, x_test: torch.Tensor, y_test: np.ndarray) -> dict:
    from cdae_med.checkpoint import load_checkpoint

    ck = load_checkpoint(path)
    z = posterior_causal_latents(ck.model.eval(), x_test, "cpu")
    return {"checkpoint": str(path), "steps": ck.step, **readout(z.numpy(), y_test)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dataset", default="morphomnist")
    ap.add_argument("--size", type=int, default=32)
    ap.add_argument("--n-test", type=int, default=500, help="test images (the paper tables' DCI uses 500)")
    ap.add_argument("--n-train", type=int, nargs="*", default=[10_000], help="one label-only run per size")
    ap.add_argument("--minutes", type=float, default=8.0, help="training minutes of each label-only run")
    ap.add_argument("--lr", type=float, default=3e-4)
    ap.add_argument("--eval-every", type=int, default=1000)
    ap.add_argument("--checkpoint", type=Path, nargs="*", default=[])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--results", default="dci_ceiling.json", help="file name under benchmarks/results/")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    ds = get_dataset(args.dataset)
    x_test, y_test = test_set(ds, args.n_test, args.size)
    out = {"dataset": args.dataset, "n_test": args.n_test, "machine": f"{platform.machine()}, {args.threads} torch threads",
           "factor_correlation": np.corrcoef(y_test.T).round(3).tolist(), "noise": noise_sensitivity(y_test),
           "label_only": [label_only(ds, n, args.minutes, x_test, y_test, args.size, args.lr, args.eval_every)
                          for n in args.n_train],
           "checkpoints": [checkpoint_readout(p, x_test, y_test) for p in args.checkpoint]}
    dest = ROOT / "results" / args.results
    dest.write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps({k: v for k, v in out.items() if k != "label_only"}, indent=2))
    for run in out["label_only"]:
        print(run["n_train"], run["steps"], "steps; DCI over the second half:", run["dci_second_half"])
    print(f"wrote {dest}")


if __name__ == "__main__":
    main()
