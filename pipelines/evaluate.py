"""``cdae-med evaluate``: every metric of cdae_med.metrics for a checkpoint's synthetic data set.

Writes ``evaluation.json``, ``evaluation.md`` (tables) and PNG figures (a counterfactual grid and
an intervention sweep) to the output directory.

``procedure="original"`` reproduces the counterfactual procedure of the paper's public code, to
measure what doing it properly is worth: x_T drawn as fresh noise instead of DDIM inversion, and
the intervened block overwritten without recomputing its descendants. Composition and
reversibility are measured under the same procedure (fresh noise at every pass), so they show
what the original procedure loses of the subject. The figures always use the DDIM procedure.

``reference`` is the guidance reference of :meth:`cdae_med.pipeline.CounterfactualPipeline.decode`: "factual" (ours)
or "null" (the paper's classifier-free form). Any checkpoint variant (causaldiffae, diffae,
label_conditional) is evaluated the same way; ``n_dci=0`` skips DCI and ``figures=False`` the PNGs.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from tqdm.auto import tqdm

from cdae_med.metrics import composition, dci_disentanglement, effectiveness_mae, image_errors, reversibility
from cdae_med.pipeline import PROCEDURES, REFERENCES, CounterfactualPipeline

from .datasets import get_dataset, preview, to_tensor, to_uint8
from .evaluate_cf import random_targets
from .figures import counterfactual_grid, image_grid
from .regressors import load_or_train_predictors
from .train_config import test_seed

log = logging.getLogger("cdae_med")

__all__ = ["evaluate", "posterior_causal_latents"]


@torch.no_grad()
def posterior_causal_latents(model, x: torch.Tensor, device, batch: int = 256) -> torch.Tensor:
    """z at the posterior mean of u (the causal layer applied to q(u | x)'s mean), (N, n, d) on the CPU."""
    return torch.cat([model.causal_latents(model.to_latent(x[i:i + batch].to(device))).float().cpu()
                      for i in range(0, len(x), batch)])


@torch.no_grad()
def evaluate(checkpoint: str | Path, out: str | Path | None = None, n: int = 64, num_steps: int = 50,
             depth: float = 1.0, guidance: float = 1.0, procedure: Literal["ddim", "original"] = "ddim",
             n_dci: int = 500, n_composition: int = 16, batch_size: int = 64, device: str = "auto",
             predictor_n_train: int = 8000, progress: bool = True, reference: str = "factual",
             figures: bool = True, hold: int = 0, confine: float | None = None) -> dict:
    """DCI, the effectiveness cells, the errors against the true counterfactual, composition and
    reversibility of ``checkpoint`` on ``n`` test images per intervention, written to ``out``.

    ``confine``: as :meth:`CounterfactualPipeline.decode`, default the pipeline's
    (:attr:`~CounterfactualPipeline.default_confine`); it applies to the effectiveness cells, the
    errors against the true counterfactual and the figures. Composition and reversibility measure the
    model's own decoding, unconfined (a confined null intervention is the input itself)."""
    if procedure not in PROCEDURES:
        raise ValueError(f"procedure must be 'ddim' or 'original', got {procedure!r}")
    if reference not in REFERENCES:
        raise ValueError(f"reference must be 'factual' or 'null', got {reference!r}")
    t_start = time.perf_counter()
    # composition and reversibility use the first of the n test images (--n 4 with the default 16 failed)
    n_composition = min(n_composition, n)
    pipe = CounterfactualPipeline.from_checkpoint(checkpoint, device)
    ckpt, model, dev = pipe.checkpoint, pipe.model, pipe.device
    confine = pipe.resolve_confine(confine)
    ds = get_dataset(ckpt.dataset)
    graph = ds.graph
    size = ckpt.image["size"][0]
    out = Path(out or Path(checkpoint) / "evaluation")
    out.mkdir(parents=True, exist_ok=True)
    seed = ckpt.training.get("seed", 0)
    test = ds.sample(max(n, n_dci), seed=test_seed(seed), size=size)
    predictors = load_or_train_predictors(ds, size, n_train=predictor_n_train, progress=progress).to(dev)
    result: dict = {"checkpoint": str(checkpoint), "dataset": ds.name, "variant": ckpt.variant,
                    "labelled_fraction": ckpt.training.get("labelled_fraction", 1.0), "step": ckpt.step, "n": n,
                    "num_steps": num_steps, "depth": depth, "guidance": guidance, "reference": reference,
                    "procedure": procedure, "n_composition": n_composition, "hold": hold, "confine": confine}
    gen = torch.Generator().manual_seed(seed)  # fresh noise of the original procedure

    # DCI on the posterior-mean causal latents
    z = posterior_causal_latents(model, to_tensor(test.images), dev).flatten(1)
    result["dci"] = dci_disentanglement(z[:n_dci].numpy(), graph.normalise(test.labels[:n_dci])) if n_dci else None

    # Effectiveness and error against the true counterfactual, for do() on every variable
    variables = graph.names
    eval_set = test[:n]
    # Each cell also for three references: the input unchanged ("copy"), the generator's true
    # counterfactual image (the predictors' own error, the floor of any model) and the values the
    # counterfactual latents stand for ("latent": what the decoder was asked to draw).
    kinds = ("model", "copy", "truth", "latent")
    eff = {k: {v: {m: [] for m in variables} for v in variables} for k in kinds}
    img_err = {v: [] for v in variables}
    bar = tqdm(total=n * len(variables), desc="counterfactuals", unit="img", disable=not progress)
    for s in range(0, n, batch_size):
        batch = eval_set[s:s + batch_size]
        x0 = to_tensor(batch.images)
        ab = pipe.abduct(x0, num_steps=num_steps, depth=depth, procedure=procedure, generator=gen)
        pred_copy = predictors.predict(x0.to(dev))
        for v_i, v in enumerate(variables):
            targets = random_targets(ds, v, n, seed + v_i)[s:s + batch_size]
            z_cf = pipe.act(ab, {v: targets}, propagate=procedure == "ddim")
            x_cf, _ = pipe.decode(ab, z_cf, guidance, reference, hold=hold, confine=confine)
            truth = ds.counterfactual(batch, {v: targets}, size)
            x_true = to_tensor(truth.images).to(dev)
            preds = {"model": predictors.predict(x_cf), "copy": pred_copy, "truth": predictors.predict(x_true),
                     "latent": pipe.read_values(z_cf).cpu().double().numpy()}
            for k in kinds:
                for m_i, m in enumerate(variables):
                    eff[k][v][m].append(np.stack([preds[k][:, m_i], truth.labels[:, m_i]], 1))
            img_err[v].append((len(x0), image_errors(x_cf, x_true)))
            bar.update(len(x0))
    bar.close()
    cells = {k: {f"do({v})": {m: effectiveness_mae(*np.concatenate(eff[k][v][m]).T, graph, m) for m in variables}
                 for v in variables} for k in kinds}
    result["effectiveness"] = cells["model"]
    result["effectiveness_references"] = {k: cells[k] for k in kinds[1:]}
    result["true_counterfactual_error"] = {
        f"do({v})": {k: float(sum(w * e[k] for w, e in img_err[v]) / n) for k in ("mae", "psnr", "ssim")}
        for v in variables}

    # Composition (null intervention 1 and 10 times) and reversibility (to pa' and back)
    x_c = to_tensor(eval_set.images[:n_composition]).to(dev)
    result["composition"] = {f"k={k}": d for k, d in composition(
        pipe, x_c, 10, num_steps, depth, guidance=guidance, reference=reference, procedure=procedure,
        seed=seed).items()}
    roots = [v for v in graph.variables if not v.parents]
    result["reversibility"] = {}
    for v_i, var in enumerate(roots):
        targets = random_targets(ds, var.name, n_composition, seed + 100 + v_i)
        back = eval_set.labels[:n_composition, graph.index(var.name)]
        result["reversibility"][f"do({var.name})"] = reversibility(
            pipe, x_c, {var.name: targets}, {var.name: back}, num_steps, depth, guidance, reference,
            procedure, seed)
    if procedure == "original":
        result["composition_note"] = ("original procedure: every pass decodes fresh noise, so composition "
                                      "measures how much of the subject is lost")

    # Figures
    if figures:
        roots_names = tuple(v.name for v in graph.variables if not v.parents)
        counterfactual_grid(pipe, ds, test[:6], roots_names, num_steps=num_steps, depth=depth,
                            guidance=guidance, seed=seed, confine=confine).save(out / "counterfactual_grid.png")
        _sweep(pipe, ds, test[:1], roots_names, num_steps, depth, guidance, confine=confine).save(out / "sweep.png")
    result["seconds"] = time.perf_counter() - t_start
    (out / "evaluation.json").write_text(json.dumps(result, indent=2) + "\n")
    (out / "evaluation.md").write_text(markdown_tables(result, graph.names))
    return result


@torch.no_grad()
def _sweep(pipe: CounterfactualPipeline, ds, sample, variables, num_steps, depth, guidance, n_values: int = 7,
           confine: float = 0.0):
    """For each root variable: the model's counterfactual row and the true row across its range."""
    size = sample.images.shape[1]
    ab = pipe.abduct(to_tensor(np.repeat(sample.images, n_values, axis=0)), num_steps=num_steps, depth=depth)
    rows, labels = [], []
    for v in variables:
        var = ds.graph[v]
        values = np.linspace(var.low, var.high, n_values)
        x_cf, _ = pipe.decode(ab, pipe.act(ab, {v: values}), guidance, confine=confine)
        rows.append(preview(to_uint8(x_cf)))
        rows.append(preview(ds.counterfactual(sample[np.zeros(n_values, int)], {v: values}, size).images))
        labels += [f"do({v})", "true"]
    headers = [f"{k}/{n_values - 1} of range" for k in range(n_values)]
    return image_grid([[r[i] for i in range(n_values)] for r in rows], headers, row_labels=labels)


def markdown_tables(result: dict, variables: tuple[str, ...]) -> str:
    lines = [f"# Evaluation of {result['checkpoint']}", "",
             f"data set {result['dataset']}, model {result.get('variant', 'causaldiffae')}, labelled fraction "
             f"{result.get('labelled_fraction', 1.0):g}, step {result['step']}, n = {result['n']}, "
             f"{result['num_steps']} DDIM steps, depth {result['depth']}, guidance {result['guidance']} "
             f"({result.get('reference', 'factual')} reference), procedure {result['procedure']}"
             + (f", unchanged variables held ({result['hold']} rounds)" if result.get("hold") else "")
             + (f", change confined at {result['confine']:g} of its largest" if result.get("confine") else ""), "",
             "DCI disentanglement: " + ("not measured" if result["dci"] is None else f"{result['dci']:.3f}"), "",
             "## Effectiveness: MAE of the anti-causal predictor on the counterfactual vs the true label",
             "", "Normalised units (the paper's); rows = measured variable, columns = intervention.", "",
             "| measured | " + " | ".join(f"do({v})" for v in variables) + " |",
             "|---|" + "---|" * len(variables)]
    for m in variables:
        lines.append(f"| {m} | " + " | ".join(
            f"{result['effectiveness'][f'do({v})'][m]['mae_normalised']:.3f}" for v in variables) + " |")
    references = result.get("effectiveness_references", {})
    if references:
        lines += ["", "The same cells for references: the input unchanged (copy), the true counterfactual image "
                      "(the predictors' own error) and the values the counterfactual latents stand for (latent); "
                      "each entry copy / truth / latent:", "",
                  "| measured | " + " | ".join(f"do({v})" for v in variables) + " |", "|---|" + "---|" * len(variables)]
        for m in variables:
            lines.append(f"| {m} | " + " | ".join(" / ".join(
                f"{references[k][f'do({v})'][m]['mae_normalised']:.3f}" for k in ("copy", "truth", "latent"))
                for v in variables) + " |")
    lines += ["", "Own units:", "", "| measured | unit | " + " | ".join(f"do({v})" for v in variables) + " |",
              "|---|---|" + "---|" * len(variables)]
    for m in variables:
        unit = result["effectiveness"][f"do({variables[0]})"][m]["unit"]
        lines.append(f"| {m} | {unit} | " + " | ".join(
            f"{result['effectiveness'][f'do({v})'][m]['mae']:.3g}" for v in variables) + " |")
    lines += ["", "## Error against the true counterfactual image", "", "| intervention | MAE (0-255) | PSNR (dB) | SSIM |",
              "|---|---|---|---|"]
    for key, e in result["true_counterfactual_error"].items():
        lines.append(f"| {key} | {e['mae']:.2f} | {e['psnr']:.2f} | {e['ssim']:.3f} |")
    lines += ["", "## Axiomatic soundness (mean absolute pixel difference, 0-255)", ""]
    for k, d in result.get("composition", {}).items():
        lines.append(f"- composition, null intervention {k}: {d:.2f}")
    for k, d in result["reversibility"].items():
        lines.append(f"- reversibility, {k} and back: {d:.2f}")
    return "\n".join(lines) + "\n"
