"""Counterfactuals of a synthetic data set's test samples, scored against the generator's truth."""

from __future__ import annotations

import numpy as np
import torch
from tqdm.auto import tqdm

from cdae_med.pipeline import CounterfactualPipeline
from synthetic_data.base import Samples

from .datasets import SyntheticDataset, to_255, to_tensor, to_uint8

__all__ = ["random_targets", "counterfactual_errors"]


def _mae(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Per-image mean absolute difference on the 0-255 scale."""
    return np.abs(to_255(a) - to_255(b)).reshape(len(a), -1).mean(axis=1)


def random_targets(dataset: SyntheticDataset, variable: str, n: int, seed: int) -> np.ndarray:
    var = dataset.graph[variable]
    rng = np.random.default_rng(seed)
    if var.binary:
        return rng.integers(0, 2, size=n).astype(float)
    return rng.uniform(var.low, var.high, size=n)


@torch.no_grad()
def counterfactual_errors(pipe: CounterfactualPipeline, dataset: SyntheticDataset, samples: Samples,
                          variables: tuple[str, ...], *, num_steps: int = 50,
                          depth: float = 1.0, guidance: float = 1.0, batch_size: int = 64, seed: int = 0,
                          progress: bool = True, confine: float = 0.0) -> dict:
    """Mean absolute pixel error (0-255) of reconstructions and of do(v) counterfactuals (``confine`` as
    in :meth:`CounterfactualPipeline.decode`), each against the generator's true counterfactual, beside
    the error of returning the input unchanged."""
    images = samples.images
    size = images.shape[1]
    out: dict = {"n": len(images), "num_steps": num_steps, "depth": depth, "guidance": guidance, "confine": confine}
    passes = len(variables) + 1
    bar = tqdm(total=passes * len(images), desc="counterfactuals", unit="img", disable=not progress, leave=False)
    recon_err, cf_err = [], {v: [] for v in variables}
    copy_err = {v: [] for v in variables}
    for v_i, v in enumerate(variables):
        targets = random_targets(dataset, v, len(images), seed + v_i)
        true_imgs = dataset.counterfactual(samples, {v: targets}, size).images
        for s in range(0, len(images), batch_size):
            x0 = to_tensor(images[s:s + batch_size])
            ab = pipe.abduct(x0, num_steps=num_steps, depth=depth)
            z_cf = pipe.act(ab, {v: targets[s:s + batch_size]})
            # the reconstruction once, decoded with the first variable's counterfactuals
            cf, rec = pipe.decode(ab, z_cf, guidance, reconstruction=v_i == 0, confine=confine)
            if rec is not None:
                recon_err.append(_mae(to_uint8(rec), images[s:s + batch_size]))
                bar.update(len(x0))
            truth = true_imgs[s:s + batch_size]
            cf_err[v].append(_mae(to_uint8(cf), truth))
            copy_err[v].append(_mae(images[s:s + batch_size], truth))
            bar.update(len(x0))
    bar.close()
    out["reconstruction_mae"] = float(np.concatenate(recon_err).mean())
    for v in variables:
        out[f"do_{v}_mae"] = float(np.concatenate(cf_err[v]).mean())
        out[f"do_{v}_copy_input_mae"] = float(np.concatenate(copy_err[v]).mean())
    return out
