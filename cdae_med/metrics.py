"""Metrics of counterfactual quality.

- :func:`dci_disentanglement`: DCI disentanglement (Eastwood & Williams 2018) with gradient-boosted
  importances and entropy base K (the number of factors), as the CausalDiffAE paper computes it.
- :func:`effectiveness_mae`: MAE of an anti-causal predictor's reading of counterfactuals against
  the true counterfactual labels, in normalised units and in the variable's own units.
- :func:`composition` and :func:`reversibility` (Monteiro et al. 2023): mean absolute pixel
  difference (0-255) after a null intervention applied k times, and after do(pa') then back.
- :func:`image_errors`: MAE (0-255), PSNR and SSIM of counterfactuals against the generator's true
  counterfactual images, which only synthetic data allows.
"""

from __future__ import annotations

from typing import Mapping

import numpy as np
import torch
from monai.metrics import PSNRMetric, SSIMMetric

from .graph import CausalGraph
from .pipeline import CounterfactualPipeline

__all__ = ["dci_disentanglement", "importance_matrix", "effectiveness_mae", "composition", "reversibility",
           "image_errors", "pixel_mae"]

def importance_matrix(codes: np.ndarray, factors: np.ndarray, seed: int = 0, **gbr_kwargs) -> np.ndarray:
    """R[i, j]: importance of code dimension i for factor j, one GradientBoostingRegressor per factor."""
    from sklearn.ensemble import GradientBoostingRegressor

    codes, factors = np.asarray(codes, float), np.asarray(factors, float)
    r = np.zeros((codes.shape[1], factors.shape[1]))
    for j in range(factors.shape[1]):
        model = GradientBoostingRegressor(random_state=seed, **gbr_kwargs).fit(codes, factors[:, j])
        r[:, j] = np.abs(model.feature_importances_)
    return r


def dci_disentanglement(codes: np.ndarray | None = None, factors: np.ndarray | None = None, *,
                        importance: np.ndarray | None = None, seed: int = 0) -> float:
    """D = sum_i rho_i (1 - H_K(P_i)), P_i the code's importance spread over the K factors."""
    r = importance_matrix(codes, factors, seed) if importance is None else np.asarray(importance, float)
    k = r.shape[1]
    if k < 2:
        raise ValueError("DCI disentanglement needs at least two factors")
    total = r.sum()
    if total <= 0:
        return 0.0
    p = r / np.clip(r.sum(axis=1, keepdims=True), 1e-12, None)
    entropy = -(p * np.log(np.clip(p, 1e-12, None))).sum(axis=1) / np.log(k)
    rho = r.sum(axis=1) / total
    return float((rho * (1.0 - entropy)).sum())


def effectiveness_mae(predicted: np.ndarray, true: np.ndarray, graph: CausalGraph, variable: str) -> dict:
    """MAE of predicted vs true counterfactual values of one variable (given in own units)."""
    var = graph[variable]
    predicted, true = np.asarray(predicted, float), np.asarray(true, float)
    err = np.abs(predicted - true)
    normalised = np.abs(var.normalise(predicted) - var.normalise(true))  # of the log, for a log-scale variable
    return {"mae": float(err.mean()), "mae_normalised": float(normalised.mean()), "unit": var.unit}


def pixel_mae(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-image mean absolute difference on a 0-255 scale of model-range ([-1, 1]) images."""
    return ((a.float() - b.float()).abs() * 127.5).flatten(1).mean(1)


@torch.no_grad()
def composition(pipe: CounterfactualPipeline, x0: torch.Tensor, times: int = 10, num_steps: int = 50,
                depth: float = 1.0, report: tuple[int, ...] = (1, 10), guidance: float = 1.0,
                reference: str = "factual", procedure: str = "ddim", seed: int = 0) -> dict[int, float]:
    """Distance between x and the null intervention (z unchanged) applied k times, for k in ``report``.

    With the factual guidance reference a null intervention does not depend on ``guidance``; with the
    "null" (classifier-free) reference it does. ``procedure="original"`` decodes fresh noise each time.
    """
    out, x = {}, x0
    gen = torch.Generator().manual_seed(seed)
    for k in range(1, times + 1):
        ab = pipe.abduct(x, num_steps=num_steps, depth=depth, procedure=procedure, generator=gen)
        x, _ = pipe.decode(ab, ab.z, guidance, reference)
        if k in report:
            out[k] = float(pixel_mae(x, x0).mean())
    return out


@torch.no_grad()
def reversibility(pipe: CounterfactualPipeline, x0: torch.Tensor, do: Mapping[str, object],
                  undo: Mapping[str, object], num_steps: int = 50, depth: float = 1.0,
                  guidance: float = 1.0, reference: str = "factual", procedure: str = "ddim",
                  seed: int = 0) -> float:
    """Distance between x and the counterfactual of its counterfactual: do(pa'), then do(pa) back."""
    gen = torch.Generator().manual_seed(seed)
    propagate = procedure == "ddim"
    ab = pipe.abduct(x0, num_steps=num_steps, depth=depth, procedure=procedure, generator=gen)
    x_cf, _ = pipe.decode(ab, pipe.act(ab, do, propagate), guidance, reference)
    ab_cf = pipe.abduct(x_cf, num_steps=num_steps, depth=depth, procedure=procedure, generator=gen)
    x_back, _ = pipe.decode(ab_cf, pipe.act(ab_cf, undo, propagate), guidance, reference)
    return float(pixel_mae(x_back, x0).mean())


def image_errors(pred: torch.Tensor, true: torch.Tensor) -> dict[str, float]:
    """MAE (0-255), PSNR (dB, 0-255 range) and SSIM of model-range images against the truth."""
    spatial_dims = pred.ndim - 2
    p, t = (pred.float().clamp(-1, 1) + 1) / 2, (true.float().clamp(-1, 1) + 1) / 2
    side = min(p.shape[2:])
    win = min(7, side if side % 2 else side - 1)  # SSIM's window must be odd and fit the image
    ssim = SSIMMetric(spatial_dims=spatial_dims, data_range=1.0, win_size=win)(p, t)
    psnr = PSNRMetric(max_val=1.0)(p, t)
    return {"mae": float(pixel_mae(pred, true).mean()), "psnr": float(psnr.mean()), "ssim": float(ssim.mean())}
