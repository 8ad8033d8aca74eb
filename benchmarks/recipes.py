"""Training recipes side by side on Pendulum at one CPU budget: what learns more per step.

    python benchmarks/recipes.py run baseline --minutes 10 --seed 0     # one recipe, one thread
    python benchmarks/recipes.py run v_prediction --minutes 10 &        # a second one beside it
    python benchmarks/recipes.py table                                  # results/recipes.{json,md}
    python benchmarks/recipes.py run add+groups_8 --results benchmarks/results/recipes_round2   # a later sitting

Each recipe is one switch of the training or model config (:data:`RECIPES`) against ``baseline``,
the defaults of ``cdae-med train``. A run trains for ``--minutes`` with one torch thread (two runs
share the machine's two cores without starving each other), then scores the EMA model with
``pipelines.evaluate.evaluate`` on held-out images: the 16 effectiveness cells beside the paper's,
DCI, image error of do(angle) and do(light) against the generator's true counterfactual beside
copying the input, and composition (the null intervention applied 1 and 10 times) with the
checkpoint's inversion (fixed-point, :class:`cdae_med.diffusion.DDIMConfig`) and with the iterations
``--inversion-iterations`` lists (0: plain DDIM inversion).

Per-run results go to ``benchmarks/results/recipes/<recipe>_seed<seed>.json`` (or ``--results DIR``, one
directory per sitting, since runs are compared only within one) as soon as a run ends; ``table`` gathers
a directory into ``DIR.json`` and ``DIR.md``. Checkpoints go under ``benchmarks/work/recipes/``.
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent
RESULTS = ROOT / "results" / "recipes"

RECIPES: dict[str, dict] = {
    "baseline": {},
    "v_prediction": {"prediction_type": "v_prediction"},
    "min_snr": {"loss_weighting": "min_snr"},
    "stratified_t": {"timestep_sampling": "stratified"},
    "lr_1e-3_warmup": {"lr": 1e-3, "lr_warmup": 200},
    "scale_shift": {"model": {"conditioning": "scale_shift"}},
    "add": {"model": {"conditioning": "add"}},
    "groups_8": {"model": {"unet_norm_groups": 8}},
    "wide": {"model": {"unet_channels": (64, 128, 128)}},
    "no_ema": {"ema_decay": 0.0},
    "encoder_steps_4": {"encoder_steps": 4},
    "encoder_steps_8": {"encoder_steps": 8},
    "encoder_steps_16": {"encoder_steps": 16},
    "descendant_noise_0.05": {"model": {"descendant_noise": 0.05}},
    "descendant_noise_0.1": {"model": {"descendant_noise": 0.1}},
    "descendant_noise_0.3": {"model": {"descendant_noise": 0.3}},
}


def combine(names: list[str]) -> dict:
    """The union of several recipes' switches (their ``model`` overrides merged)."""
    out: dict = {}
    for name in names:
        for k, v in RECIPES[name].items():
            out[k] = {**out.get(k, {}), **v} if k == "model" else v
    return out


def recipe_overrides(name: str) -> dict:
    return combine(name.split("+"))


def run(args) -> None:
    import numpy as np
    import torch

    torch.set_num_threads(args.threads)
    from cdae_med.diffusion import DDIM
    from cdae_med.metrics import composition
    from cdae_med.pipeline import CounterfactualPipeline
    from pipelines.datasets import get_dataset, to_tensor
    from pipelines.evaluate import evaluate
    from pipelines.evaluate_cf import _mae, random_targets
    from pipelines.train import train
    from pipelines.train_config import TrainConfig, test_seed

    from paper_tables import PAPER

    overrides = recipe_overrides(args.recipe)
    out = ROOT / "work" / "recipes" / f"{args.recipe}_seed{args.seed}"
    if out.exists() and not args.skip_train:
        shutil.rmtree(out)
    cfg = TrainConfig(dataset="pendulum", out=str(out), minutes=args.minutes, seed=args.seed, eval_n=0,
                      grid_rows=1, device="cpu", **overrides)
    t0 = time.perf_counter()
    if not args.skip_train:
        train(cfg, progress=not args.quiet)
    t_train = time.perf_counter() - t0
    ev = evaluate(out, n=args.eval_n, device="cpu", figures=False, progress=not args.quiet)
    pipe = CounterfactualPipeline.from_checkpoint(out, device="cpu")
    ckpt = pipe.checkpoint
    ds = get_dataset("pendulum")
    size = ckpt.image["size"][0]
    test = ds.sample(args.eval_n, seed=test_seed(args.seed), size=size)
    names = ds.graph.names
    copy = {}
    for v_i, v in enumerate(names):
        truth = ds.counterfactual(test, {v: random_targets(ds, v, args.eval_n, args.seed + v_i)}, size)
        copy[f"do({v})"] = float(_mae(test.images, truth.images).mean())
    # composition with fixed-point inversion, on the same images as evaluate's
    x_c = to_tensor(test.images[:16])
    fixed = {}
    for iterations in args.inversion_iterations:
        pipe.scheduler = DDIM(type(pipe.scheduler.config)(**{**pipe.scheduler.config.to_dict(),
                                                             "inversion_iterations": iterations}))
        t1 = time.perf_counter()
        fixed[str(iterations)] = {f"k={k}": d for k, d in composition(pipe, x_c, 10, seed=args.seed).items()}
        fixed[str(iterations)]["seconds"] = time.perf_counter() - t1
    paper = PAPER["pendulum"]["effectiveness"]
    cells = [{"measured": m, "intervened": v, "paper": paper[m][v],
              "ours": ev["effectiveness"][f"do({v})"][m]["mae_normalised"]} for m in names for v in names]
    result = {
        "recipe": args.recipe, "seed": args.seed, "overrides": overrides,
        "machine": f"{platform.machine()}, {args.threads} torch thread(s), torch {torch.__version__}",
        "budget": {"minutes": args.minutes, "steps": ckpt.step, "batch_size": cfg.batch_size,
                   "train_samples": ckpt.step * cfg.batch_size,
                   "train_images_per_s": ckpt.metrics.get("train_images_per_s")},
        "parameters": sum(p.numel() for p in pipe.model.parameters()),
        "eval_n": args.eval_n, "dci": ev["dci"], "cells": cells,
        "cells_at_or_below_paper": sum(c["ours"] <= c["paper"] for c in cells),
        "intervened_cells_mean": float(np.mean([c["ours"] for c in cells if c["measured"] == c["intervened"]])),
        "image_mae": {k: {"model": e["mae"], "copy": copy[k]} for k, e in ev["true_counterfactual_error"].items()},
        "inversion_iterations": pipe.checkpoint.scheduler.inversion_iterations,
        "composition": {"checkpoint": ev["composition"], **fixed},
        "reversibility": ev["reversibility"],
        "seconds": {"train": t_train, "evaluate": ev["seconds"]},
    }
    args.results.mkdir(parents=True, exist_ok=True)
    path = args.results / f"{args.recipe}_seed{args.seed}.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {path}")


def _shown(path: Path) -> str:
    """``path`` relative to the repository where it lies inside it."""
    path = path.resolve()
    return str(path.relative_to(ROOT.parent)) if path.is_relative_to(ROOT.parent) else str(path)


def table(args) -> None:
    rows = [json.loads(p.read_text()) for p in sorted(args.results.glob("*.json"))]
    if not rows:
        raise SystemExit(f"no results in {args.results}; run a recipe first")
    order = {name: i for i, name in enumerate(RECIPES)}
    rows.sort(key=lambda r: (order.get(r["recipe"], len(order)), r["recipe"], r["seed"]))
    iters = sorted({k for r in rows for k in r["composition"] if k != "checkpoint"})
    lines = ["# Training recipes on Pendulum at one CPU budget", "",
             f"Written by `benchmarks/recipes.py table` from `{_shown(args.results)}/*.json`. Each run: "
             f"{rows[0]['budget']['minutes']:g} minutes of training on one torch thread beside one other run, "
             "batch 32, then evaluation on "
             f"{rows[0]['eval_n']} held-out images per intervention (50 DDIM steps). Image errors are MAE x255 "
             "against the generator's true counterfactual; effectiveness is the paper's metric (normalised units, "
             "lower is better); composition is the MAE x255 after the null intervention applied 10 times, with "
             "plain DDIM inversion and with fixed-point inversion (iterations per step).", "",
             "| recipe | seed | steps | recon (k=1) | do(angle) | do(light) | do(shadow_len) | do(shadow_pos) | "
             "cells <= paper | mean of the 4 "
             "intervened cells (paper 0.423) | DCI | composition k=10, "
             f"{rows[0]['inversion_iterations']} it. | "
             + " | ".join(f"k=10, {i} it." for i in iters) + " |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|" + "---|" * len(iters)]
    for r in rows:
        im = r["image_mae"]
        lines.append(
            f"| {r['recipe']} | {r['seed']} | {r['budget']['steps']} | {r['composition']['checkpoint']['k=1']:.2f} | "
            f"{im['do(angle)']['model']:.2f} | {im['do(light)']['model']:.2f} | {im['do(shadow_len)']['model']:.2f} | "
            f"{im['do(shadow_pos)']['model']:.2f} | {r['cells_at_or_below_paper']}/16 | "
            f"{r['intervened_cells_mean']:.3f} | {r['dci']:.3f} | {r['composition']['checkpoint']['k=10']:.1f} | "
            + " | ".join(f"{r['composition'][i]['k=10']:.1f}" if i in r["composition"] else "-" for i in iters)
            + " |")
    copy = rows[0]["image_mae"]
    lines += ["", "Copying the input: " + ", ".join(f"{k} {v['copy']:.2f}" for k, v in copy.items()) + ".", "",
              "## The 16 effectiveness cells", "",
              "| recipe | seed | " + " | ".join(f"{c['measured']} / do({c['intervened']})" for c in rows[0]["cells"]) + " |",
              "|---|---|" + "---|" * 16,
              "| paper | | " + " | ".join(f"{c['paper']:.3f}" for c in rows[0]["cells"]) + " |"]
    for r in rows:
        lines.append(f"| {r['recipe']} | {r['seed']} | " + " | ".join(
            f"**{c['ours']:.3f}**" if c["ours"] <= c["paper"] else f"{c['ours']:.3f}" for c in r["cells"]) + " |")
    directory = args.results.resolve()
    (directory.parent / f"{directory.name}.md").write_text("\n".join(lines) + "\n")
    (directory.parent / f"{directory.name}.json").write_text(json.dumps({"runs": rows}, indent=2) + "\n")
    print("\n".join(lines))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run", help="train and evaluate one recipe")
    r.add_argument("recipe", help="a name of RECIPES, or several joined by '+'")
    r.add_argument("--minutes", type=float, default=10.0)
    r.add_argument("--seed", type=int, default=0)
    r.add_argument("--eval-n", type=int, default=64)
    r.add_argument("--threads", type=int, default=1)
    r.add_argument("--inversion-iterations", type=int, nargs="*", default=[0])
    r.add_argument("--skip-train", action="store_true", help="evaluate the checkpoint already there")
    r.add_argument("--quiet", action="store_true")
    r.add_argument("--results", type=Path, default=RESULTS,
                   help="directory of the per-run files (one per sitting: runs are compared within one)")
    t = sub.add_parser("table", help="gather the runs of --results DIR into DIR.{json,md}")
    t.add_argument("--results", type=Path, default=RESULTS)
    args = p.parse_args()
    if args.command == "run":
        for part in args.recipe.split("+"):
            if part not in RECIPES:
                raise SystemExit(f"unknown recipe {part!r}; available: {', '.join(RECIPES)}")
        run(args)
    else:
        table(args)


if __name__ == "__main__":
    main()
