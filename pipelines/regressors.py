"""Anti-causal predictors: one CNN per variable, image -> value, for the effectiveness metric.

Trained once per (data set, image size) on generated images, as the paper trains one per factor:
MSE on the normalised label, Adam 1e-3, batch 64, the best validation epoch kept. The predictors for
the benchmarks' size (32 px) ship in ``pipelines/models/regressors`` and are used wherever they fit:
training them again, even seeded, gives other weights on another machine, thread count or process,
and four such trainings read the true counterfactual image's intervened shadows at 0.461-0.544
(shadow_len) and 0.454-0.572 (shadow_pos) normalised units, a spread wider than some differences
between models (pipelines/models/regressors/README.md).
Other sizes are trained on first use and cached under ``$CDAE_HOME/regressors`` (default ``~/.cdae-med``).
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
from pathlib import Path

import numpy as np
import torch
from monai.networks.nets import Regressor
from torch import nn
from tqdm.auto import tqdm

from .datasets import SyntheticDataset, to_tensor
from .settings import RuntimeSettings

log = logging.getLogger("cdae_med")

__all__ = ["AntiCausalPredictors", "cdae_home", "load_or_train_predictors"]

REGRESSOR_SEED = 7_000_001  # the predictors' own training data, apart from every model's
SHIPPED = Path(__file__).resolve().parent / "models" / "regressors"


def cdae_home() -> Path:
    """The data directory (:class:`pipelines.settings.RuntimeSettings`)."""
    return RuntimeSettings().home


class AntiCausalPredictors(nn.Module):
    def __init__(self, ds: SyntheticDataset, size: int):
        super().__init__()
        self.graph = ds.graph
        shape = (ds.channels,) + (size,) * ds.spatial_dims
        self.nets = nn.ModuleDict({
            v.name: Regressor(in_shape=shape, out_shape=(1,), channels=(16, 32, 64), strides=(2, 2, 2))
            for v in ds.graph.variables
        })

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Model-range images -> (N, n_vars) normalised predictions, graph order."""
        return torch.cat([self.nets[name](x) for name in self.graph.names], dim=1)

    @torch.no_grad()
    def predict(self, x: torch.Tensor, batch_size: int = 256) -> np.ndarray:
        """Model-range images -> (N, n_vars) predictions in the variables' own units."""
        self.eval()
        out = torch.cat([self(x[i:i + batch_size]) for i in range(0, len(x), batch_size)])
        return self.graph.denormalise(out.double().cpu().numpy())


def _train_one(net: nn.Module, x: torch.Tensor, y: torch.Tensor, xv: torch.Tensor, yv: torch.Tensor,
               epochs: int, bar) -> tuple[nn.Module, float]:
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    best, best_state = float("inf"), None
    g = torch.Generator().manual_seed(0)
    for _ in range(epochs):
        net.train()
        for idx in torch.randperm(len(x), generator=g).split(64):
            loss = nn.functional.mse_loss(net(x[idx]).squeeze(1), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            bar.update(1)
        net.eval()
        with torch.no_grad():
            val = torch.cat([net(xv[i:i + 256]).squeeze(1) for i in range(0, len(xv), 256)])
            mae = (val - yv).abs().mean().item()
        if mae < best:
            best, best_state = mae, copy.deepcopy(net.state_dict())
    net.load_state_dict(best_state)
    return net, best


def load_or_train_predictors(ds: SyntheticDataset, size: int, n_train: int = 8000, epochs: int = 6,
                             cache_dir: Path | None = None, progress: bool = True) -> AntiCausalPredictors:
    """The predictors of ``ds`` at ``size`` px: the shipped ones (:data:`SHIPPED`), else those cached in
    ``cache_dir`` (default ``$CDAE_HOME/regressors``), else trained now and cached there."""
    cache_dir = Path(cache_dir or cdae_home() / "regressors")
    # The predictors read normalised labels: a graph normalised otherwise needs its own.
    digest = hashlib.sha256(json.dumps(ds.graph.to_dict(), sort_keys=True).encode()).hexdigest()[:8]
    name = f"{ds.name}-{size}px-{digest}.pt"
    path = cache_dir / name
    model = AntiCausalPredictors(ds, size)
    for found in (SHIPPED / name, path):
        if found.is_file():
            # shipped in half precision; loading casts to the nets' float32
            model.load_state_dict(torch.load(found, map_location="cpu", weights_only=True))
            log.info("anti-causal predictors loaded from %s", found)
            return model.eval()
    torch.manual_seed(0)
    samples = ds.sample(n_train + n_train // 8, seed=REGRESSOR_SEED, size=size)
    x = to_tensor(samples.images)
    y = torch.as_tensor(ds.graph.normalise(samples.labels), dtype=torch.float32)
    x, xv, y, yv = x[:n_train], x[n_train:], y[:n_train], y[n_train:]
    steps = len(ds.graph) * epochs * -(-n_train // 64)
    report = {}
    # Callers evaluate under no_grad; training here needs gradients whatever the caller's mode.
    with torch.enable_grad(), tqdm(total=steps, desc=f"anti-causal predictors ({ds.name})", unit="step",
                                   disable=not progress) as bar:
        for j, name in enumerate(ds.graph.names):
            _, mae = _train_one(model.nets[name], x, y[:, j], xv, yv[:, j], epochs, bar)
            var = ds.graph[name]
            # a log-scale variable's normalised error is of its log: x scale, the error of ln(value)
            report[name] = {"val_mae_normalised": mae, "val_log_mae" if var.log else "val_mae": mae * var.scale,
                            "unit": var.unit}
    cache_dir.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), path)
    path.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
    log.info("anti-causal predictors trained (validation MAE %s), cached at %s",
             {k: round(v.get("val_mae", v.get("val_log_mae")), 3) for k, v in report.items()}, path)
    return model.eval()
