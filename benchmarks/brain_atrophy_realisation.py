"""How much of the shipped brain model's intensity change to keep, and how far CSF reaches into the cortex, in the
``atrophy`` realisation (:class:`pipelines.anatomy.AnatomicalRealisation`), chosen on the validation subjects; and
``volumes`` (the ventricles pushed, the rest as ``atrophy``) at the chosen setting.

The shipped model (`pipelines/models/brain`) runs on held-out generator subjects at 2 mm (``--test-offset 30``,
the validation subjects of `benchmarks/brain_native.py`; the reported ones are offset 17) under the three
interventions of `brain_native.py`; each output is realised with every setting and compared with the generator's
true counterfactual: image MAE (x 255) and the brain and ventricle volume errors (ml, measured by the generator's
tissue model as changes from the input), beside copying the input, the model realised as intensity on the tissue,
and the oracle (the true change on the model's 32^3 grid, on the tissue).

    OMP_NUM_THREADS=1 python benchmarks/brain_atrophy_realisation.py [--test-offset 30] [--n-test 6]

writes benchmarks/results/brain_native_evaluations/atrophy_validation.json.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

from brain_native import FINE, INTERVENTIONS, held_out_subjects, oracle_change, realise
from pipelines.anatomy import AnatomicalRealisation
from pipelines.realisation import carry_change
from pipelines.registry import SHIPPED
from pipelines.scans import ScanModel
from pipelines.train_config import test_seed
from synthetic_data import brain

ROOT = Path(__file__).resolve().parent
AGE, SEX, BV, VV = (brain.VARIABLES.index(v) for v in ("age", "sex", "brain_volume", "ventricle_volume"))
# (mode, kept elsewhere, cortex reach mm, around the ventricles mm)
SETTINGS = [("atrophy", 0.0, 4.0, 4.0), ("atrophy", 0.25, 4.0, 4.0), ("atrophy", 0.5, 4.0, 4.0),
            ("atrophy", 0.75, 4.0, 4.0), ("atrophy", 1.0, 4.0, 4.0), ("atrophy", 0.5, 3.0, 4.0),
            ("atrophy", 0.5, 6.0, 4.0), ("atrophy", 0.5, 4.0, 8.0), ("volumes", 0.5, 4.0, 4.0),
            ("volumes", 1.0, 4.0, 4.0)]


class _Recorder:
    """Stands in for a model's anatomical realisation and keeps what it is given: (change on the grid, brain and
    ventricle volume changes, residual)."""

    def __init__(self, calls: list):
        self.calls = calls

    def __call__(self, prepared, change, delta_brain_ml, delta_ventricles_ml, residual):
        self.calls.append((change, delta_brain_ml, delta_ventricles_ml, residual))
        return np.zeros_like(prepared.scan.data), None


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--test-offset", type=int, default=30)
    p.add_argument("--n-test", type=int, default=6)
    p.add_argument("--steps", type=int, default=50, help="DDIM steps")
    p.add_argument("--work", type=Path, default=ROOT / "work" / "brain_atrophy")
    p.add_argument("--results", type=Path,
                   default=ROOT / "results" / "brain_native_evaluations" / "atrophy_validation.json")
    args = p.parse_args()
    torch.set_num_threads(1)
    model = ScanModel.load(SHIPPED["brain"], device="cpu", num_steps=args.steps, realisation="atrophy", residual="tissue")
    samples, paths = held_out_subjects(args.n_test, args.test_offset, args.work)
    prepared = [model.prepare(path) for path in paths]
    input_vol = brain.measure_volumes(samples.images[..., 0], samples.noise, FINE)
    rows = {}
    for var, (text, target, _) in INTERVENTIONS.items():
        targets = target(samples.labels)
        truth = brain.counterfactual(samples, {var: targets}, size=FINE)
        true_change = truth.labels[:, [BV, VV]] - samples.labels[:, [BV, VV]]
        outputs = {"copy": [pp.scan.data for pp in prepared],
                   "oracle": [realise(pp, oracle_change(pp, model.preprocessing, t), model.mask, "tissue")
                              for pp, t in zip(prepared, truth.images[..., 0])]}
        # the model's change and volume changes, decided once per subject: the settings differ only in realising them
        decided = []
        recorder, model.anatomy = model.anatomy, _Recorder(decided)
        intensity = []
        for i, pp in enumerate(prepared):
            given = model.covariates({"age": float(samples.labels[i, AGE]), "sex": float(samples.labels[i, SEX])})
            model._infer([pp], model.interventions({var: float(targets[i])}), [given])
            if len(decided) != i + 1:
                raise RuntimeError(f"{var} changes nothing for subject {i}: no change to realise")
            intensity.append(pp.scan.data + carry_change(pp, decided[-1][0] * model.mask, "tissue"))
        model.anatomy = recorder
        outputs["intensity"] = intensity  # the model's own change on the tissue, as realisation "intensity" gives it
        for mode, kept, reach, around in SETTINGS:
            realisation = AnatomicalRealisation(model.reference, model.preprocessing, model.mask, mode,
                                                around_ventricles_mm=around, elsewhere=kept, cortex_reach_mm=reach)
            outputs[f"{mode} kept {kept} reach {reach} around {around}"] = [
                pp.scan.data + realisation(pp, *args)[0] for pp, args in zip(prepared, decided)]
        row = {}
        for name, outs in outputs.items():
            o = np.stack(outs)
            vol = brain.measure_volumes(o, samples.noise, FINE)
            err = np.abs(vol - input_vol - true_change).mean(0)
            row[name] = {"image_mae": round(float(np.abs(o - truth.images[..., 0]).mean() * 255), 3),
                         "brain_volume_error_ml": round(float(err[0]), 1),
                         "ventricle_volume_error_ml": round(float(err[1]), 1)}
        rows[text] = row
        print(text, json.dumps(row), flush=True)
    args.results.parent.mkdir(parents=True, exist_ok=True)
    args.results.write_text(json.dumps({"test_seed": test_seed(0) + args.test_offset, "n": args.n_test,
                                        "ddim_steps": args.steps, "settings": "image MAE x255 / ml against the "
                                        "generator's true counterfactual at 2 mm", "interventions": rows}, indent=1))


if __name__ == "__main__":
    main()
