"""Whether `brain_ventricle_realisation.VentriclePush` folds: the minimum Jacobian determinant of its deformation
(on its 3 mm grid) for each validation subject under do(ventricle_volume) and do(age), the amount being the
labels' true ventricle change (as in that benchmark). Prints them; nothing is written.

    python benchmarks/brain_ventricle_push_folding.py [--velocity]
"""

from __future__ import annotations

import argparse

import numpy as np

import brain_native as bn
from brain_ventricle_realisation import VentriclePush
from cdae_med.io import Scan
from pipelines.mri import Preprocessing, prepare_registered, reference_mask
from pipelines.realisation import jacobian_determinant
from pipelines.registration import Reference
from pipelines.train_config import test_seed
from synthetic_data import brain


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--velocity", action="store_true", help="the push integrated as a stationary velocity field")
    p.add_argument("--test-offset", type=int, default=30, help="as brain_native.py (30: validation subjects)")
    args = p.parse_args()
    reference = Reference(*brain.reference(64))
    prep = Preprocessing(spacing_mm=(6.0,) * 3, spatial_size=(32,) * 3, registration="affine",
                         volume_variables=bn.VOLUMES)
    mask = reference_mask(reference, prep)
    samples = brain.sample(6, seed=test_seed(0) + args.test_offset, size=bn.FINE)
    affine = brain.affine(bn.FINE)
    prepared = [prepare_registered(Scan(v[..., 0], affine, "test"), prep, reference, mask) for v in samples.images]
    push = VentriclePush(reference, velocity=args.velocity)
    for var in ("ventricle_volume", "age"):
        truth = brain.counterfactual(samples, {var: bn.INTERVENTIONS[var][1](samples.labels)}, size=bn.FINE)
        delta = truth.labels[:, bn.VV] - samples.labels[:, bn.VV]
        lowest = [float(jacobian_determinant(push.deformation(pp, float(d))).min()) for pp, d in zip(prepared, delta)]
        print(f"do({var}): ventricle change {np.round(delta, 1)} ml, min Jacobian determinant {np.round(lowest, 3)}")


if __name__ == "__main__":
    main()
