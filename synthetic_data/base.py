"""What every generator in ``synthetic_data`` provides.

A generator is a module with:

- ``GRAPH``: its causal graph (a built-in graph of :mod:`cdae_med.graph`: names, units,
  normalisation, ranges), ``DEFAULT_SIZE`` (image side in pixels/voxels), ``SPATIAL_DIMS``
  (2 or 3) and ``CHANNELS``;
- ``sample(n, seed=0, size=DEFAULT_SIZE) -> Samples``: n subjects, deterministic for a seed;
- ``counterfactual(samples, do, size=DEFAULT_SIZE) -> Samples``: the *true* counterfactual of
  each subject: the same exogenous noise (``samples.noise``), the intervened variables set
  (scalars or one value per subject, in their own units, checked by :func:`parse_do`), every
  descendant recomputed by the mechanism, the image rendered again;
- ``write_dataset(out_dir, n, size=DEFAULT_SIZE, seed=0, progress=True) -> Path``: the data
  and a labels CSV whose columns carry units; returns the CSV path.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterator, Mapping

import numpy as np

from cdae_med.graph import CausalGraph
from cdae_med.values import ValuesError, parse_values

__all__ = ["Samples", "parse_do"]


@dataclass
class Samples:
    """A batch of generated subjects.

    images: uint8 (N, *spatial, C) for 2D data sets, float32 (N, *spatial, C) for volumes.
    labels: float64 (N, n_vars), the graph's declaration order, own units.
    noise: the exogenous values per subject (arrays of length N) that, with the labels'
        roots, determine every image; what ``counterfactual`` holds fixed.

    Unpacks as ``images, labels = samples`` for code that needs no noise.
    """

    images: np.ndarray
    labels: np.ndarray
    noise: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.labels)

    def __iter__(self) -> Iterator[np.ndarray]:
        return iter((self.images, self.labels))

    def __getitem__(self, index) -> "Samples":
        return Samples(self.images[index], self.labels[index], {k: v[index] for k, v in self.noise.items()})


def parse_do(graph: CausalGraph, do: Any, n: int) -> dict[str, np.ndarray]:
    """The intervention of a generator's ``counterfactual``: variable -> (n,) float64 values, checked
    by :func:`cdae_med.values.parse_values` (known names, finite numbers, binary levels, the
    graph's ranges, a scalar or one value per subject), every problem in one ``ValuesError``.

    ``None`` is refused as well (``parse_values`` reads it as no intervention): a generator's
    caller who passes no mapping has made a mistake; "change nothing" is spelt ``{}``.
    """
    if not isinstance(do, Mapping):
        raise ValuesError([f"do must be a mapping of variable to value(s), got {type(do).__name__}"], "interventions")
    return parse_values(graph, do, what="interventions", n=n)
