"""One picture per synthetic data set for the README: a few samples and their true counterfactuals.

    python docs/make_dataset_figures.py [--datasets pendulum morphomnist circuit brain]

Row 1: samples; row 2: the generator's true counterfactual of each under do(first root = a value
across its range); row 3 (where the graph has a second root): the same for the second root.
Volumes are shown by their middle axial slice.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from pipelines.datasets import DATASETS, get_dataset, preview
from pipelines.figures import image_grid

HERE = Path(__file__).resolve().parent


def figure(name: str, n: int = 6, seed: int = 0):
    ds = get_dataset(name)
    samples = ds.sample(n, seed=seed, size=ds.default_size)
    rows, labels = [preview(samples.images)], ["sample"]
    roots = [v for v in ds.graph.variables if not v.parents][:2]
    for var in roots:
        values = np.array([var.low, var.high]) if var.binary else np.linspace(var.low, var.high, n)
        values = np.resize(values, n)
        rows.append(preview(ds.counterfactual(samples, {var.name: values}, ds.default_size).images))
        labels.append(f"do({var.name})")
    headers = [", ".join(f"{v.name[:5]}={x:.3g}" for v, x in zip(ds.graph.variables, row)) for row in samples.labels]
    headers = [h[:24] for h in headers]
    cells = [[row[i] for i in range(n)] for row in rows]
    return image_grid(cells, headers, cell_px=128, row_labels=labels)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--datasets", nargs="+", default=list(DATASETS))
    p.add_argument("--out", type=Path, default=HERE, help="folder for the pictures")
    args = p.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    for name in args.datasets:
        out = args.out / f"data_{name}.png"
        figure(name).save(out)
        print(f"wrote {out}")


if __name__ == "__main__":
    main()
