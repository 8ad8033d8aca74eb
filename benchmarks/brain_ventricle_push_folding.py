"""Whether `brain_ventricle_realisation.VentriclePush` folds: the minimum Jacobian determinant of its deformation
(on its 3 mm grid) for each validation subject under do(ventricle_volume) and do(age), the amount being the
labels' true ventricle change (as in that benchmark). Prints them; nothing is written.

    python benchmarks/brain_ventricle_push_folding.py [--velocity]
"""

from __future__ import annotations

import numpy as np

import brain_native as bn
import brain_ventricle_realisation as realisation
from cdae_med.io import Scan
from pipelines.mri import Preprocessing, prepare_registered, reference_mask
from pipelines.realisation import jacobian_determinant
from pipelines.registration import Reference
from pipelines.train_config import test_seed
from synthetic_data import brain


def main() -> None:
    import sys

    velocity = "--velocity" in sys.argv[1:]  # the push integrated as a stationary velocity field
    reference = Reference(*brain.reference(64))
    prep = Preprocessing(spacing_mm=(6.0,) * 3, spatial_size=(32,) * 3, registration="affine",
                         volume_variables=bn.VOLUMES)
    mask = reference_mask(reference, prep)
    samples = brain.sample(6, seed=test_seed(0) + 30, size=bn.FINE)
    affine = brain.affine(bn.FINE)
    prepared = [prepare_registered(Scan(v[..., 0], affine, "test"), prep, reference, mask) for v in samples.images]
    push = realisation.VentriclePush(reference, velocity=velocity)
    captured = []
    warp = realisation.deform_scan
    realisation.deform_scan = lambda registration, deformation: (captured.append(deformation),
                                                                  warp(registration, deformation))[1]
    for var in ("ventricle_volume", "age"):
        truth = brain.counterfactual(samples, {var: bn.INTERVENTIONS[var][1](samples.labels)}, size=bn.FINE)
        delta = truth.labels[:, bn.VV] - samples.labels[:, bn.VV]
        captured.clear()
        for pp, d in zip(prepared, delta):
            push(pp, float(d))
        lowest = [float(jacobian_determinant(phi).min()) for phi in captured]
        print(f"do({var}): ventricle change {np.round(delta, 1)} ml, min Jacobian determinant {np.round(lowest, 3)}")


if __name__ == "__main__":
    main()
