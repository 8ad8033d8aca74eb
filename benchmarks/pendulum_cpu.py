"""Train CausalDiffAE on Pendulum at a stated budget and score its counterfactuals against truth.

    python benchmarks/pendulum_cpu.py [--minutes 90] [--eval-n 128]

Writes benchmarks/results/pendulum_cpu.json (and the checkpoint under benchmarks/work/). Figures:
training images/s, seconds per counterfactual (batch 1 and batched), reconstruction MAE, and the
MAE (0-255) of do(angle) and do(light) counterfactuals against the generator's true
counterfactuals beside the MAE of returning the input unchanged, for several inversion depths and
guidance weights.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

from cdae_med.pipeline import CounterfactualPipeline
from pipelines.datasets import get_dataset, to_tensor
from pipelines.evaluate_cf import counterfactual_errors
from pipelines.train import train
from pipelines.train_config import TrainConfig, test_seed

ROOT = Path(__file__).resolve().parent


def seconds_per_counterfactual(pipe: CounterfactualPipeline, x: torch.Tensor, num_steps: int) -> float:
    t0 = time.perf_counter()
    pipe(x, {"angle": 10.0}, num_steps=num_steps)
    return (time.perf_counter() - t0) / len(x)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--minutes", type=float, default=90.0)
    p.add_argument("--eval-n", type=int, default=128)
    p.add_argument("--steps", type=int, default=50, help="DDIM steps for evaluation")
    p.add_argument("--out", type=Path, default=ROOT / "work" / "pendulum_cpu")
    p.add_argument("--results", type=Path, default=ROOT / "results" / "pendulum_cpu.json")
    p.add_argument("--skip-train", action="store_true", help="evaluate the checkpoint already in --out")
    args = p.parse_args()

    cfg = TrainConfig(dataset="pendulum", out=str(args.out), minutes=args.minutes, eval_n=0, device="cpu")
    if not args.skip_train:
        train(cfg)
    pipe = CounterfactualPipeline.from_checkpoint(args.out, device="cpu")
    ckpt = pipe.checkpoint
    ds = get_dataset("pendulum")
    size = ckpt.image["size"][0]
    test = ds.sample(args.eval_n, seed=test_seed(cfg.seed), size=size)
    images = test.images

    results = {
        "machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, "
                   f"torch {torch.__version__}",
        "budget": {"train_minutes": ckpt.metrics.get("train_minutes"), "steps": ckpt.step,
                   "batch_size": ckpt.training["batch_size"], "image_size": size,
                   "n_train": ckpt.training["n_train"]},
        "train_images_per_s": ckpt.metrics.get("train_images_per_s"),
        "ddim_steps": args.steps,
        "seconds_per_counterfactual": {
            "batch_1": seconds_per_counterfactual(pipe, to_tensor(images[:1]), args.steps),
            "batch_64": seconds_per_counterfactual(pipe, to_tensor(images[:64]), args.steps),
        },
        "settings": [],
    }
    for depth in (1.0, 0.6):
        for guidance in (1.0, 2.0, 3.0):
            t0 = time.perf_counter()
            errs = counterfactual_errors(pipe, ds, test, ("angle", "light"),
                                         num_steps=args.steps, depth=depth, guidance=guidance)
            errs["seconds"] = time.perf_counter() - t0
            results["settings"].append(errs)
            print(json.dumps(errs))
    args.results.parent.mkdir(parents=True, exist_ok=True)
    args.results.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {args.results}")


if __name__ == "__main__":
    main()
