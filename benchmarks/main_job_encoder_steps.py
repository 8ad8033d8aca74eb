"""The 12-minute main job with and without encoder-only steps, side by side.

For each seed, `cdae-med train --dataset pendulum --seed S --encoder-steps E --out runs/es{E}_s{S}` (E = 0
and 8 at the same time, one torch thread each, so that they share the machine alike), then `cdae-med
evaluate --checkpoint ... --n 128`; the evaluations are copied to
benchmarks/results/main_job_encoder_steps/encoder_steps{E}_seed{S}_evaluation.json. This script only reads
them and writes the side-by-side table (main_job_encoder_steps.md beside them):

    python benchmarks/main_job_encoder_steps.py
"""

from __future__ import annotations

import json
from pathlib import Path

from paper_tables import PAPER

RESULTS = Path(__file__).resolve().parent / "results" / "main_job_encoder_steps"
DO = ("angle", "light", "shadow_len", "shadow_pos")


def row(ev: dict, train: dict) -> dict:
    paper = PAPER["pendulum"]["effectiveness"]
    cells = {(m, d): ev["effectiveness"][f"do({d})"][m]["mae_normalised"] for m in DO for d in DO}
    return {"steps": train.get("steps") or ev["step"],
            "reconstruction (32 images)": train.get("eval", {}).get("reconstruction_mae"),
            **{f"do({d})": ev["true_counterfactual_error"][f"do({d})"]["mae"] for d in DO},
            "cells_met": sum(v <= paper[m][d] for (m, d), v in cells.items()),
            "intervened_mean": sum(cells[(d, d)] for d in DO) / 4,
            "dci": ev["dci"], "composition_k10": ev["composition"]["k=10"],
            "reversibility_angle": ev["reversibility"]["do(angle)"]}


def main() -> None:
    rows = {}
    for path in sorted(RESULTS.glob("encoder_steps*_seed*_evaluation.json")):
        es, seed = path.name.removeprefix("encoder_steps").removesuffix("_evaluation.json").split("_seed")
        train_path = path.with_name(path.name.replace("evaluation", "train_metrics"))
        train = json.loads(train_path.read_text()) if train_path.exists() else {}
        rows[(int(seed), int(es))] = row(json.loads(path.read_text()), train)
    keys = list(next(iter(rows.values())))
    lines = ["| seed | encoder steps | " + " | ".join(keys) + " |", "|" + "---|" * (len(keys) + 2)]
    for (seed, es), r in sorted(rows.items()):
        lines.append(f"| {seed} | {es} | " + " | ".join(
            "-" if v is None else f"{v:.3f}" if isinstance(v, float) else str(v) for v in r.values()) + " |")
    (RESULTS / "main_job_encoder_steps.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
