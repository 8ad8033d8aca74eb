"""The paper's DCI and effectiveness tables, reproduced on our data sets beside its published numbers.

    python benchmarks/paper_tables.py --smoke                  # minutes: plumbing check, tiny models
    python benchmarks/paper_tables.py --datasets pendulum --models causaldiffae --part --threads 1 &
    python benchmarks/paper_tables.py --datasets morphomnist --models causaldiffae --part --threads 1 &
    python benchmarks/paper_tables.py --combine results/paper_tables_*_*.json   # into paper_tables.json
    python benchmarks/paper_tables.py --combine results/paper_tables.json results/paper_tables_<part>.json

A part is one data set and some of its models, sized to fit one sitting; two parts run side by
side with one torch thread each. A later part joins an earlier combined file given as a part (the
parts are consumed, the combined file is rewritten). CausalDiffAE trains for ``--minutes`` (45),
each baseline for ``--baseline-minutes`` (15), all with the training recipe ``--recipe`` (a name of
``benchmarks/recipes.py``'s RECIPES, "+"-joined; results/recipes.md says why the default).

For each data set (Pendulum, Morpho-MNIST, CausalCircuit) it trains, with the same code and one
switch each:

- ``causaldiffae``: CausalDiffAE, every training label used;
- ``diffae``: no causal layer, no label prior (``--variant diffae``);
- ``label_conditional``: the denoiser conditioned on the labels themselves (``--variant label_conditional``);
- ``causaldiffae_weak``: CausalDiffAE with labels for ``--labelled-fraction`` of the training set and z
  dropped at rate 0.5 (the paper's weak supervision),

then evaluates each with ``pipelines.evaluate.evaluate`` (DCI, effectiveness for every (measured,
intervened) pair, composition, reversibility, error against the true counterfactual), evaluates
``causaldiffae`` a second time with the original code's counterfactual procedure (fresh noise, no
propagation), and sweeps the guidance weight omega on ``causaldiffae_weak`` (classifier-free "null"
reference, as the paper) when the weak model is trained. Writes
``benchmarks/results/paper_tables{_smoke}.json`` and ``.md`` and the omega figures; checkpoints and
evaluations go under ``benchmarks/work/``. Per data set the JSON holds ``budget`` (training samples of
our CausalDiffAE beside the paper's, CPU minutes), ``dci`` and ``cells`` (ours beside the paper's)
and ``rows`` (every model and procedure, the baselines included).

The smoke budget trains tiny models for a few dozen steps: its numbers test the plumbing and say
nothing about the method. The paper's numbers are from ../shared/reference/FACTS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent

# The paper's published CausalDiffAE numbers (Komanduri et al. 2024), see FACTS.md. Effectiveness:
# MAE of anti-causal predictors on the counterfactual, normalised units; [measured][intervened].
PAPER = {
    "pendulum": {
        "dci": 0.999,
        "effectiveness": {
            "angle": {"angle": 0.297, "light": 0.132, "shadow_len": 0.031, "shadow_pos": 0.034},
            "light": {"angle": 0.045, "light": 0.434, "shadow_len": 0.035, "shadow_pos": 0.064},
            "shadow_len": {"angle": 0.136, "light": 0.322, "shadow_len": 0.492, "shadow_pos": 0.082},
            "shadow_pos": {"angle": 0.146, "light": 0.303, "shadow_len": 0.064, "shadow_pos": 0.471},
        },
        "train_samples": 35_000 * 32 * 5,
    },
    "morphomnist": {
        "dci": 0.993,
        "effectiveness": {
            "thickness": {"thickness": 0.392, "intensity": 0.309},
            "intensity": {"thickness": 0.503, "intensity": 0.256},
        },
        "train_samples": 14_000 * 32 * 5,
    },
    # The paper reports CausalCircuit's DCI only, no effectiveness cells.
    "circuit": {"dci": 0.999, "effectiveness": None, "train_samples": 20_000 * 32 * 5},
}
# Training samples of the paper's checkpoints: steps x batch 32 x 5 processes (FACTS.md).
PAPER_DIFFAE_DCI = 0.35  # quoted without a data set in FACTS.md


MODELS = ("causaldiffae", "diffae", "label_conditional", "causaldiffae_weak")
ROWS = {  # table row -> (model run, evaluation procedure)
    "CausalDiffAE (ours: DDIM inversion, descendants recomputed)": ("causaldiffae", "ddim"),
    "CausalDiffAE, original code's procedure (fresh noise, no propagation)": ("causaldiffae", "original"),
    "DiffAE (no causal layer, no label prior)": ("diffae", "ddim"),
    "label-conditional diffusion": ("label_conditional", "ddim"),
    "CausalDiffAE, weak supervision": ("causaldiffae_weak", "ddim"),
}


def budget(args) -> dict:
    if args.smoke:
        from pipelines.train_config import TINY_MODEL

        return {"name": "smoke", "steps": args.smoke_steps, "minutes": None, "baseline_minutes": None,
                "batch_size": 16, "n_train": 256, "recipe": args.recipe,
                "size": {"pendulum": 16, "morphomnist": 32, "circuit": 16}, "model": TINY_MODEL, "lr": 1e-3,
                "eval_n": 4, "ddim_steps": 5, "n_dci": 60, "n_composition": 2, "predictor_n_train": 256,
                "sweep_n": 2, "omegas": [0.0, 1.0, 3.0], "hold": args.hold, "confine": args.confine}
    return {"name": "full", "steps": 100_000, "minutes": args.minutes, "baseline_minutes": args.baseline_minutes,
            "batch_size": 32, "n_train": 10_000, "recipe": args.recipe,
            "size": {"pendulum": 32, "morphomnist": 32, "circuit": 32}, "model": {}, "lr": 3e-4,
            "eval_n": args.eval_n, "ddim_steps": args.ddim_steps, "n_dci": 500, "n_composition": 16,
            "predictor_n_train": 8000, "sweep_n": max(8, args.eval_n // 2), "omegas": args.omegas,
            "hold": args.hold, "confine": args.confine}


def run_dataset(ds: str, b: dict, args, work: Path) -> dict:
    from recipes import recipe_overrides

    from cdae_med.checkpoint import load_checkpoint
    from pipelines.evaluate import evaluate
    from pipelines.guidance_sweep import guidance_sweep
    from pipelines.train import train
    from pipelines.train_config import TrainConfig

    runs = {
        "causaldiffae": dict(variant="causaldiffae"),
        "diffae": dict(variant="diffae"),
        "label_conditional": dict(variant="label_conditional"),
        "causaldiffae_weak": dict(variant="causaldiffae", labelled_fraction=args.labelled_fraction,
                                  model={"cond_drop_prob": 0.5}),
    }
    recipe = recipe_overrides(b["recipe"]) if b["recipe"] else {}
    trained = {}
    for name in args.models:
        switch = dict(runs[name])
        out = work / ds / name
        model = {**b["model"], **recipe.get("model", {}), **switch.pop("model", {})}
        minutes = b["minutes"] if name == "causaldiffae" else b["baseline_minutes"]
        cfg = TrainConfig(dataset=ds, out=str(out), steps=b["steps"], minutes=minutes, size=b["size"][ds],
                          batch_size=b["batch_size"], lr=b["lr"], n_train=b["n_train"], device=args.device,
                          eval_n=0, eval_steps=b["ddim_steps"], grid_rows=2 if args.smoke else 6,
                          gamma_warmup=20 if args.smoke else 200, model=model, seed=args.seed,
                          **{k: v for k, v in recipe.items() if k != "model"}, **switch)
        if not (args.skip_train and (out / "checkpoint.json").is_file()):
            print(f"[{ds}] training {name} ...", flush=True)
            train(cfg, progress=not args.quiet)
        ck = load_checkpoint(out)
        trained[name] = {"checkpoint": str(out), "variant": ck.variant, "steps": ck.step, "seed": args.seed,
                         "train_samples": ck.step * b["batch_size"], "recipe": b["recipe"],
                         "train_minutes": ck.metrics.get("train_minutes"),
                         "labelled_fraction": ck.training.get("labelled_fraction", 1.0),
                         "cond_drop_prob": ck.model.config.cond_drop_prob}
    rows = {}
    for row, (name, procedure) in ROWS.items():
        if name not in trained:
            continue
        print(f"[{ds}] evaluating {row} ...", flush=True)
        t0 = time.perf_counter()
        # holding the unchanged variables is part of our counterfactual, not of the baselines' procedures
        hold = b["hold"] if row == OURS else 0
        # confining the change is a decoding of the input's own noise code, for every row that inverts
        confine = b["confine"] if procedure == "ddim" else 0.0
        res = evaluate(trained[name]["checkpoint"], work / ds / "evaluations" / f"{name}_{procedure}",
                       n=b["eval_n"], num_steps=b["ddim_steps"], procedure=procedure, n_dci=b["n_dci"],
                       n_composition=b["n_composition"], device=args.device,
                       predictor_n_train=b["predictor_n_train"], progress=not args.quiet, hold=hold,
                       confine=confine)
        rows[row] = {"model": trained[name], "procedure": procedure, "evaluation": res,
                     "eval_seconds": time.perf_counter() - t0, "hold": hold, "confine": confine}
    if "causaldiffae_weak" not in trained:
        return {"rows": rows}
    print(f"[{ds}] guidance sweep ...", flush=True)
    sweep = guidance_sweep(trained["causaldiffae_weak"]["checkpoint"], work / ds / "guidance_sweep",
                           omegas=b["omegas"], reference="null", n=b["sweep_n"], num_steps=b["ddim_steps"],
                           n_composition=b["n_composition"], device=args.device,
                           predictor_n_train=b["predictor_n_train"], progress=not args.quiet)
    return {"rows": rows, "guidance_sweep": sweep}


OURS = "CausalDiffAE (ours: DDIM inversion, descendants recomputed)"


def summarise(ds: str, data: dict) -> dict:
    """The data set's headline: our CausalDiffAE's budget, DCI and cells beside the paper's (from ``rows``)."""
    paper = PAPER[ds]
    out = {**data}
    if OURS not in data["rows"]:
        return out
    row = data["rows"][OURS]
    ev, model = row["evaluation"], row["model"]
    names = list(ev["effectiveness"])
    variables = [k[3:-1] for k in names]
    out["budget"] = {"train_samples": model["train_samples"], "paper_train_samples": paper["train_samples"],
                     "cpu_minutes": model["train_minutes"], "steps": model["steps"], "recipe": model.get("recipe")}
    out["dci"] = {"paper": paper["dci"], "ours": ev["dci"]}
    eff = paper["effectiveness"]
    out["cells"] = [{"measured": m, "intervened": v, "paper": eff[m][v] if eff else None,
                     "ours": ev["effectiveness"][f"do({v})"][m]["mae_normalised"],
                     **{k: ref[f"do({v})"][m]["mae_normalised"]
                        for k, ref in ev.get("effectiveness_references", {}).items()}}
                    for m in variables for v in variables]
    return out


def summarise_all(datasets: dict) -> dict:
    """Every data set's summary (``summarise``), in the paper's order."""
    return {ds: summarise(ds, datasets[ds]) for ds in PAPER if ds in datasets}


def _f(x, digits=3):
    return "–" if x is None else f"{x:.{digits}f}"


def markdown(results: dict) -> str:
    b = results["budget"]
    lines = [f"# Paper tables ({'SMOKE budget: plumbing only, not a result' if b['name'] == 'smoke' else 'full budget'})",
             "", f"Machine: {results['machine']}. Written by `benchmarks/paper_tables.py` in "
                 f"{results['seconds'] / 60:.1f} min.", "",
             f"Budget per model: {b['steps']} steps" + (f" or {b['minutes']} min (CausalDiffAE), "
                                                        f"{b.get('baseline_minutes')} min (the others)"
                                                        if b["minutes"] else "") +
             f", recipe {b.get('recipe') or 'defaults'}" +
             f", batch {b['batch_size']}, {b['n_train']} training images, model "
             f"{'tiny (tests TINY_MODEL)' if b['name'] == 'smoke' else 'default, ' + str(b['model'])}; evaluation on {b['eval_n']} test images per "
             f"intervention, {b['ddim_steps']} DDIM steps, DCI on {b['n_dci']} images, composition/reversibility on "
             f"{b['n_composition']}. Paper: CausalDiffAE row of Komanduri et al. 2024 (FACTS.md), trained for "
             "14k-35k steps at batch 32 x 5 with a 36-110 M parameter network.", "",
             "Reading the baselines: DiffAE's latent blocks have no assigned meaning, so its effectiveness "
             "shows what writing a label value into an unsupervised latent does; the label-conditional model and "
             "the original procedure do not recompute descendants, so their do(parent) rows measure what that costs.",
             ""]
    for ds, data in results["datasets"].items():
        paper = PAPER[ds]
        rows = data["rows"]
        names = list(rows)
        short = {r: f"({i + 1})" for i, r in enumerate(names)}
        lines += [f"## {ds}", ""] + [f"{short[r]} {r}; trained {rows[r]['model']['steps']} steps"
                                     + (f" in {rows[r]['model']['train_minutes']:.1f} min, recipe "
                                        f"{rows[r]['model'].get('recipe') or 'defaults'}"
                                        if rows[r]["model"].get("train_minutes") else "")
                                     + (f", labels for {rows[r]['model']['labelled_fraction']:g} of the training set, "
                                        f"z dropped at {rows[r]['model']['cond_drop_prob']:g}"
                                        if rows[r]["model"]["labelled_fraction"] < 1 else "")
                                     + (f"; the variables an intervention leaves held ({rows[r]['hold']} rounds, "
                                        "`--hold`)" if rows[r].get("hold") else "")
                                     + (f"; the change confined at {rows[r]['confine']:g} of its largest "
                                        "(`--confine`)" if rows[r].get("confine") else "") + "  "
                                     for r in names]
        lines += ["", "DCI disentanglement (higher is better):", "",
                  "| paper CausalDiffAE | paper DiffAE | " + " | ".join(short[r] for r in names) + " |",
                  "|---|---|" + "---|" * len(names),
                  f"| {paper['dci']} | {PAPER_DIFFAE_DCI} | " + " | ".join(_f(rows[r]["evaluation"]["dci"]) for r in names)
                  + " |", "",
                  "Effectiveness: MAE of the anti-causal predictor on the counterfactual against the true "
                  "counterfactual label, normalised units (lower is better):", "",
                  "| measured | intervention | paper CausalDiffAE | " + " | ".join(short[r] for r in names)
                  + " | copy the input | true counterfactual image |",
                  "|---|---|---|" + "---|" * (len(names) + 2)]
        first = rows[names[0]]["evaluation"]
        variables = [k[3:-1] for k in first["effectiveness"]]
        refs = first.get("effectiveness_references", {})
        for m in variables:
            for v in variables:
                p = paper["effectiveness"][m][v] if paper["effectiveness"] else None
                ours = [rows[r]["evaluation"]["effectiveness"][f"do({v})"][m]["mae_normalised"] for r in names]
                ref = [refs[k][f"do({v})"][m]["mae_normalised"] if k in refs else None for k in ("copy", "truth")]
                lines.append(f"| {m} | do({v}) | {_f(p)} | " + " | ".join(_f(x) for x in ours + ref) + " |")
        lines += ["", "Composition (null intervention k times), reversibility (do and back) and error against "
                      "the true counterfactual image, mean absolute pixel difference 0-255 (lower is better):", "",
                  "| | composition k=1 | k=10 | " + " | ".join(
                      f"reversibility {k}" for k in next(iter(rows.values()))["evaluation"]["reversibility"])
                  + " | true-counterfactual MAE (mean over do) |",
                  "|---|---|---|" + "---|" * (len(next(iter(rows.values()))["evaluation"]["reversibility"]) + 1)]
        for r in names:
            ev = rows[r]["evaluation"]
            tce = sum(e["mae"] for e in ev["true_counterfactual_error"].values()) / len(ev["true_counterfactual_error"])
            lines.append(f"| {short[r]} | {_f(ev['composition'].get('k=1'), 2)} | {_f(ev['composition'].get('k=10'), 2)} | "
                         + " | ".join(_f(x, 2) for x in ev["reversibility"].values()) + f" | {_f(tce, 2)} |")
        sw = data.get("guidance_sweep")
        if sw is None:
            lines.append("")
            continue
        lines += ["", f"Guidance weight omega on the weakly supervised model ({sw['reference']} reference, "
                      f"n = {sw['n']}); figure `{ds}_guidance_sweep{'_smoke' if b['name'] == 'smoke' else ''}.png`:", "",
                  "| omega | effectiveness, intervened variable | effectiveness, all cells | composition k=1 | k=10 |",
                  "|---|---|---|---|---|"]
        for r in sw["rows"]:
            lines.append(f"| {r['omega']:g} | {_f(r['effectiveness_intervened'])} | {_f(r['effectiveness_all'])} | "
                         f"{_f(r['composition_k1'], 2)} | {_f(r['composition_k10'], 2)} |")
        lines.append("")
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true", help="tiny models, a few dozen steps: minutes, plumbing only")
    p.add_argument("--smoke-steps", type=int, default=60)
    p.add_argument("--minutes", type=float, default=45.0, help="training minutes of CausalDiffAE (full budget)")
    p.add_argument("--baseline-minutes", type=float, default=15.0,
                   help="training minutes of each other model (full budget)")
    p.add_argument("--recipe", default="v_prediction",
                   help="training recipe of every model: names of benchmarks/recipes.py's RECIPES joined by '+' "
                        "('' for the training defaults)")
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    p.add_argument("--eval-n", type=int, default=128, help="test images per intervention (full budget)")
    p.add_argument("--hold", type=int, default=0,
                   help="rounds of holding the variables an intervention leaves, in our CausalDiffAE's row "
                        "(CounterfactualPipeline.decode)")
    p.add_argument("--confine", type=float, default=0.0,
                   help="keep each counterfactual's change only where it reaches this share of the image's largest "
                        "change, in every row that inverts (CounterfactualPipeline.decode; 0: off, as the tables "
                        "so far)")
    p.add_argument("--ddim-steps", type=int, default=50)
    p.add_argument("--omegas", type=float, nargs="+", default=[0.0, 1.0, 2.0, 3.0, 5.0])
    p.add_argument("--labelled-fraction", type=float, default=0.1)
    p.add_argument("--seed", type=int, default=0, help="training seed of every model (data, initialisation, batches)")
    p.add_argument("--datasets", nargs="+", default=list(PAPER), choices=list(PAPER))
    p.add_argument("--device", default="auto")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads; 1 is far faster than 2 on a 2-core machine that others share")
    p.add_argument("--skip-train", action="store_true", help="reuse checkpoints already in the work directory")
    p.add_argument("--work", type=Path, default=None)
    p.add_argument("--results", type=Path, default=ROOT / "results")
    p.add_argument("--quiet", action="store_true")
    p.add_argument("--part", action="store_true",
                   help="write paper_tables_<datasets>.json only (one process per data set, run side by side; "
                        "--combine joins them)")
    p.add_argument("--combine", type=Path, nargs="+", metavar="PART_JSON",
                   help="join the --part results of separate processes into paper_tables.json/.md; trains nothing")
    args = p.parse_args()
    if args.combine:
        combine(args.combine, args.results)
        return

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    suffix = "_smoke" if args.smoke else ""
    work = args.work or ROOT / "work" / f"paper_tables{suffix}"
    if args.smoke:
        # The anti-causal predictors are cached per (data set, size); smoke ones are trained on a few
        # hundred images and must never be picked up by a real evaluation.
        os.environ["CDAE_HOME"] = str(work / "cdae_home")
    b = budget(args)
    t0 = time.perf_counter()
    results = {"budget": b, "machine": f"{platform.machine()}, {torch.get_num_threads()} torch threads, "
                                       f"torch {torch.__version__}, device {args.device}",
               "paper": PAPER, "datasets": {}}
    for ds in args.datasets:
        results["datasets"][ds] = run_dataset(ds, b, args, work)
    results["seconds"] = time.perf_counter() - t0
    args.results.mkdir(parents=True, exist_ok=True)
    figure_suffix = suffix
    if args.part:
        suffix += "_" + "_".join(args.datasets) + "_" + "_".join(args.models)
    results["datasets"] = summarise_all(results["datasets"])
    (args.results / f"paper_tables{suffix}.json").write_text(json.dumps(results, indent=2) + "\n")
    (args.results / f"paper_tables{suffix}.md").write_text(markdown(results))
    for ds in results["datasets"]:
        if "guidance_sweep" in results["datasets"][ds]:
            shutil.copy(work / ds / "guidance_sweep" / "guidance_sweep.png",
                        args.results / f"{ds}_guidance_sweep{figure_suffix}.png")
    print(markdown(results))
    print(f"wrote {args.results / f'paper_tables{suffix}.json'} and .md in {results['seconds'] / 60:.1f} min")


def combine(parts: list[Path], out_dir: Path) -> None:
    """Join per-data-set results run side by side; `seconds` is the longest part's (the wall time)."""
    loaded = [json.loads(p.read_text()) for p in parts]
    # Parts may differ in a model's training time and recipe (every row records its own: model.train_minutes,
    # model.recipe), not in anything the evaluation does; the budget shown is that of the parts that hold
    # our CausalDiffAE, the later one where several do.
    per_model = ("minutes", "recipe", "hold", "confine")  # hold and confine: each row records its own
    budgets = {json.dumps({k: v for k, v in r["budget"].items() if k not in per_model}, sort_keys=True)
               for r in loaded}
    if len(budgets) != 1:
        raise SystemExit("the parts were evaluated with different settings; combine only parts of one evaluation")
    ours = [r for r in loaded if any(OURS in d["rows"] for d in r["datasets"].values())] or loaded
    machine = loaded[0]["machine"]  # a combined file may be given as a part: it says so already
    if len(parts) > 1 and "side by side" not in machine:
        machine += f", {len(parts)} processes side by side"
    results = {**loaded[0], "budget": ours[-1]["budget"], "datasets": {}, "seconds": max(r["seconds"] for r in loaded),
               "machine": machine}
    for r in loaded:  # parts may split one data set's models: merge their rows
        for ds, data in r["datasets"].items():
            merged = results["datasets"].setdefault(ds, {"rows": {}})
            merged["rows"].update(data["rows"])
            if "guidance_sweep" in data:
                merged["guidance_sweep"] = data["guidance_sweep"]
    results["datasets"] = summarise_all(results["datasets"])
    suffix = "_smoke" if results["budget"]["name"] == "smoke" else ""
    dest = out_dir / f"paper_tables{suffix}.json"
    dest.write_text(json.dumps(results, indent=2) + "\n")
    dest.with_suffix(".md").write_text(markdown(results))
    for p in parts:  # the parts are consumed; an earlier combined file given as a part is the output
        if p.resolve() == dest.resolve():
            continue
        p.unlink()
        p.with_suffix(".md").unlink(missing_ok=True)
    print(markdown(results))


if __name__ == "__main__":
    main()
