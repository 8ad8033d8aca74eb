"""How much of the true brain counterfactual a first stage can hold: the code oracle per first stage.

A latent CausalDiffAE changes a scan only through its first stage's code (`cdae_med.latent`): the
diffusion model moves the code, the first stage decodes it, and the change is realised on the scan
(`pipelines.realisation`). However good the diffusion model, its counterfactual can be no closer to
the truth than the true counterfactual itself coded by the same first stage and realised the same way
(``oracle_code`` in `benchmarks/brain_native.py`). This script fits first stages of several sizes on
the registered training subjects of ``cdae-med train --dataset brain --registration affine`` (read
from its cache) and scores that ceiling on held-out subjects at 2 mm, beside copying the input and
the oracles that bypass the code (the true change on the model grid added as intensity, or fitted as
a deformation plus residual). No diffusion model is trained: a first stage whose ceiling is no better
than today's model cannot help however the model is trained.

    python benchmarks/brain_code_ceiling.py --stage deformation:32:64:2 --stage deformation:32:256:2 \\
        --stage intensity:256 [--test-offset 30 --n-test 6] [--results results/brain_code_ceiling.json]

A stage is ``deformation:SHAPE:RESIDUAL:SMOOTHING`` (`DeformationAutoencoder`, its change realised
through its decoded deformation plus residual) or ``intensity:K`` (`LinearAutoencoder`, realised as an
intensity change); ``@intensity`` after a deformation stage realises its decoded change as intensity,
``@inset=MM`` keeps its deformation MM away from the head's surface (`pipelines.realisation.head_weight`).
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import numpy as np
import torch

from brain_native import (FINE, INTERVENTIONS, ROOT, encode_images, oracle_change, realise, realise_codes,
                          realise_deformation, score)
from cdae_med.io import Scan
from cdae_med.latent import DeformationAutoencoder, LinearAutoencoder
from pipelines.mri import Preprocessing, prepare_registered, reference_mask
from pipelines.train_config import TrainConfig, test_seed
from pipelines.training_data import load_training_data, template_fields
from synthetic_data import brain


def first_stage(spec: str, shape: tuple[int, ...]):
    kind, *numbers = spec.split(":")
    if kind == "deformation" and len(numbers) == 3:
        return DeformationAutoencoder(int(numbers[0]), int(numbers[1]), shape, smoothing_voxels=float(numbers[2]))
    if kind == "intensity" and len(numbers) == 1:
        return LinearAutoencoder(int(numbers[0]), shape)
    raise SystemExit(f"--stage {spec!r}: expected deformation:SHAPE:RESIDUAL:SMOOTHING or intensity:K")


def realisation(spec: str) -> dict:
    """The ``realise_codes`` options a stage's ``@...`` suffix asks for."""
    suffix = spec.partition("@")[2]
    if suffix.startswith("inset="):
        return {"inset_mm": float(suffix[len("inset="):])}
    if suffix not in ("", "intensity"):
        raise SystemExit(f"--stage {spec!r}: a realisation is @intensity or @inset=MM")
    return {"as_intensity": suffix == "intensity"}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--stage", action="append", required=True, help="a first stage to score (see above)")
    p.add_argument("--n-fit", type=int, default=2000, help="registered training subjects the stages are fitted on")
    p.add_argument("--fit-seed", type=int, default=0)
    p.add_argument("--n-test", type=int, default=6)
    p.add_argument("--test-offset", type=int, default=30,
                   help="held-out subjects: test_seed(0) + this (30: the validation subjects; 17: the reported ones)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--results", type=Path, default=ROOT / "results" / "brain_code_ceiling.json")
    args = p.parse_args()
    torch.set_num_threads(args.threads)

    data = load_training_data(TrainConfig(dataset="brain", size=32, registration="affine", n_train=args.n_fit,
                                          seed=args.fit_seed))
    prep = Preprocessing.from_dict(data.image_meta["preprocessing"])
    mask = reference_mask(data.reference, prep)
    samples = brain.sample(args.n_test, seed=test_seed(0) + args.test_offset, size=FINE)
    affine = brain.affine(FINE)
    prepared = [prepare_registered(Scan(v[..., 0], affine, f"sub-{i:02d}"), prep, data.reference, mask)
                for i, v in enumerate(samples.images)]
    factual = np.stack([pp.image[0] for pp in prepared])
    input_vol = brain.measure_volumes(samples.images[..., 0], samples.noise, FINE)
    truths = {}
    for var, (text, target, affected) in INTERVENTIONS.items():
        truth = brain.counterfactual(samples, {var: target(samples.labels)}, size=FINE)
        changes = np.stack([oracle_change(pp, prep, t) * mask for pp, t in zip(prepared, truth.images[..., 0])])
        truths[var] = (text, truth, affected, changes)

    rows = {var: {} for var in truths}
    for var, (text, truth, affected, changes) in truths.items():
        outputs = {"copy": [s[..., 0] for s in samples.images],
                   "oracle": [realise(pp, ch, mask) for pp, ch in zip(prepared, changes)],
                   "oracle_deformation": [realise_deformation(pp, ch, mask) for pp, ch in zip(prepared, changes)]}
        rows[var] = score(outputs, samples, truth, affected, input_vol, ssim=False)
    stages, fitted = {}, {}
    for spec in args.stage:
        t0 = time.perf_counter()
        options = realisation(spec)
        base = spec.partition("@")[0]
        if base not in fitted:  # a stage realised several ways is fitted and coded once
            stage = first_stage(base, tuple(data.images.shape[1:]))
            fields = ({"fields": template_fields(stage, data.images)}
                      if isinstance(stage, DeformationAutoencoder) else {})
            with torch.no_grad():
                _, share = stage.fit_transform(data.images, seed=args.fit_seed, **fields)
            codes_cf = {var: encode_images(stage, factual + truths[var][3]) for var in truths}
            fitted[base] = stage, share, encode_images(stage, factual), codes_cf
        stage, share, c, codes_cf = fitted[base]
        size_mb = sum(b.numel() * b.element_size() for b in stage.state_dict().values()) / 1e6
        stages[spec] = {"variance_share": share, "seconds": time.perf_counter() - t0, "buffers_mb": size_mb}
        for var, (text, truth, affected, changes) in truths.items():
            outs = realise_codes(stage, prepared, c, codes_cf[var], prep.grid_affine, mask, **options)
            row = score({spec: outs}, samples, truth, affected, input_vol, ssim=False)
            for key, values in row.items():
                rows[var][key].update(values)
        print(spec, json.dumps(stages[spec]), {var: round(rows[var]["image_mae"][spec], 3) for var in rows},
              flush=True)

    result = {"machine": f"{platform.machine()}, {args.threads} thread(s), torch {torch.__version__}",
              "fit_subjects": args.n_fit, "fit_seed": args.fit_seed,
              "test_seed": test_seed(0) + args.test_offset, "n_test": args.n_test, "resolution_mm": 2.0,
              "stages": stages,
              "interventions": [{"intervention": truths[var][0], **rows[var]} for var in truths]}
    args.results.parent.mkdir(parents=True, exist_ok=True)
    args.results.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.results}")


if __name__ == "__main__":
    main()
