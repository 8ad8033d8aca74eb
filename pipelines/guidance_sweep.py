"""Effectiveness and composition across the guidance weight omega (weak supervision, issue 4).

For each omega the checkpoint is evaluated by :func:`pipelines.evaluate.evaluate` (DCI and figures
skipped) and four numbers are kept:

- ``effectiveness_intervened``: mean over interventions do(v) of the anti-causal predictor's MAE on
  v itself (normalised units): does the counterfactual show the value asked for?
- ``effectiveness_all``: the mean over every (measured, intervened) cell of the effectiveness table;
- ``composition_k1`` / ``composition_k10``: the null intervention applied 1 and 10 times (0-255);
- ``true_counterfactual_mae``: pixel MAE (0-255) against the generator's true counterfactual.

With the "null" reference (the paper's classifier-free guidance, eps = w eps(z) + (1 - w) eps(no z))
omega changes composition too; with the "factual" reference (ours) a null intervention does not
depend on omega, so composition is flat by construction and only effectiveness moves.

Writes ``guidance_sweep.json`` and ``guidance_sweep.png`` (two panels: effectiveness, composition).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw

from cdae_med.checkpoint import read_meta

from .evaluate import evaluate

__all__ = ["guidance_sweep", "summarise", "line_chart", "sweep_figure"]

COLOURS = ((31, 119, 180), (214, 39, 40), (44, 160, 44), (148, 103, 189))


def summarise(result: dict) -> dict:
    """The four numbers of one evaluation that the sweep plots."""
    eff = result["effectiveness"]
    names = [k[3:-1] for k in eff]  # "do(angle)" -> "angle"
    diag = [eff[f"do({v})"][v]["mae_normalised"] for v in names]
    cells = [cell["mae_normalised"] for row in eff.values() for cell in row.values()]
    comp = result.get("composition", {})
    return {
        "omega": result["guidance"],
        "effectiveness_intervened": float(np.mean(diag)),
        "effectiveness_all": float(np.mean(cells)),
        "composition_k1": comp.get("k=1"),
        "composition_k10": comp.get("k=10"),
        "true_counterfactual_mae": float(np.mean([e["mae"] for e in result["true_counterfactual_error"].values()])),
    }


def guidance_sweep(checkpoint: str | Path, out: str | Path, omegas: Sequence[float] = (0.0, 1.0, 2.0, 3.0, 5.0),
                   reference: str = "null", n: int = 32, num_steps: int = 50, n_composition: int = 8,
                   device: str = "auto", predictor_n_train: int = 8000, progress: bool = True) -> dict:
    read_meta(checkpoint)  # a clear CheckpointError before anything is written
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for w in omegas:
        res = evaluate(checkpoint, out / f"omega_{w:g}", n=n, num_steps=num_steps, guidance=float(w),
                       reference=reference, n_dci=0, n_composition=n_composition, device=device,
                       predictor_n_train=predictor_n_train, progress=progress, figures=False)
        rows.append(summarise(res))
    result = {"checkpoint": str(checkpoint), "reference": reference, "n": n, "n_composition": n_composition,
              "num_steps": num_steps, "rows": rows}
    (out / "guidance_sweep.json").write_text(json.dumps(result, indent=2) + "\n")
    sweep_figure(result, title=f"{Path(checkpoint).name}, {reference} reference").save(out / "guidance_sweep.png")
    return result


def line_chart(series: dict[str, tuple[Sequence[float], Sequence[float]]], title: str, xlabel: str,
               ylabel: str, size: tuple[int, int] = (360, 260)) -> Image.Image:
    """A plain line chart with PIL (the project carries no plotting library)."""
    w, h = size
    left, right, top, bottom = 52, 12, 24, 36
    img = Image.new("RGB", size, "white")
    d = ImageDraw.Draw(img)
    xs = [x for xs_, ys_ in series.values() for x, y in zip(xs_, ys_) if y is not None]
    ys = [y for xs_, ys_ in series.values() for y in ys_ if y is not None]
    if not xs:
        d.text((left, h // 2), "no data", fill="black")
        return img
    x0, x1 = min(xs), max(xs)
    y0, y1 = min(0.0, min(ys)), max(ys)
    x1, y1 = (x1 if x1 > x0 else x0 + 1), (y1 if y1 > y0 else y0 + 1)
    y1 = y1 * 1.05

    def px(x, y):
        return (left + (x - x0) / (x1 - x0) * (w - left - right), h - bottom - (y - y0) / (y1 - y0) * (h - top - bottom))

    d.rectangle([left, top, w - right, h - bottom], outline="black")
    for k in range(5):
        yv = y0 + (y1 - y0) * k / 4
        _, yy = px(x0, yv)
        d.line([left - 3, yy, left, yy], fill="black")
        d.text((2, yy - 6), f"{yv:.3g}", fill="black")
    for xv in sorted(set(xs)):
        xx, _ = px(xv, y0)
        d.line([xx, h - bottom, xx, h - bottom + 3], fill="black")
        d.text((xx - 6, h - bottom + 5), f"{xv:g}", fill="black")
    d.text((left, 4), title, fill="black")
    d.text((w // 2 - 20, h - 14), xlabel, fill="black")
    d.text((left + 4, top + 2), ylabel, fill="gray")
    for i, (name, (sx, sy)) in enumerate(series.items()):
        colour = COLOURS[i % len(COLOURS)]
        pts = [px(x, y) for x, y in zip(sx, sy) if y is not None]
        if len(pts) > 1:
            d.line(pts, fill=colour, width=2)
        for p in pts:
            d.ellipse([p[0] - 3, p[1] - 3, p[0] + 3, p[1] + 3], fill=colour)
        d.text((w - right - 130, top + 14 + 12 * i), name, fill=colour)
    return img


def sweep_figure(result: dict, title: str = "") -> Image.Image:
    rows = result["rows"]
    om = [r["omega"] for r in rows]
    eff = line_chart({"on the intervened var.": (om, [r["effectiveness_intervened"] for r in rows]),
                      "all cells": (om, [r["effectiveness_all"] for r in rows])},
                     f"effectiveness MAE ({title})", "omega", "normalised")
    comp = line_chart({"k = 1": (om, [r["composition_k1"] for r in rows]),
                       "k = 10": (om, [r["composition_k10"] for r in rows])},
                      "composition", "omega", "0-255")
    img = Image.new("RGB", (eff.width + comp.width, max(eff.height, comp.height)), "white")
    img.paste(eff, (0, 0))
    img.paste(comp, (eff.width, 0))
    return img
