"""One self-describing directory per trained model.

    DIR/checkpoint.json   format version, graph, model config, scheduler (DDIM) config, image
                          geometry, training config, data set, metrics, library version
    DIR/weights.pt        the (EMA) model weights used for inference, a plain state dict
    DIR/training.pt       optimizer, step and raw weights, for --resume (optional)

Everything needed to rebuild the model is in checkpoint.json; weights load with
``weights_only=True`` so a checkpoint cannot execute code. The model variant (causaldiffae,
diffae, label_conditional) is part of the model config and repeated at the top level for
readers; a checkpoint written before variants existed has neither and loads as causaldiffae.
The noise schedule is its own ``scheduler`` section (:class:`cdae_med.diffusion.DDIMConfig`); a
checkpoint written before that kept it in the model config, from where it is read.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .diffusion import DDIMConfig
from .graph import CausalGraph, GraphError
from .model import CausalDiffAE, CausalDiffAEConfig

__all__ = ["FORMAT_VERSION", "CheckpointError", "Checkpoint", "save_checkpoint", "load_checkpoint"]

FORMAT_VERSION = 1
META, WEIGHTS, TRAINING = "checkpoint.json", "weights.pt", "training.pt"


class CheckpointError(RuntimeError):
    """A checkpoint directory is missing, corrupt or of another format version."""


@dataclass
class Checkpoint:
    model: CausalDiffAE
    path: Path
    dataset: str = ""
    image: dict[str, Any] = field(default_factory=dict)  # channels, size, value range
    training: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)
    step: int = 0
    scheduler: DDIMConfig = field(default_factory=DDIMConfig)

    @property
    def graph(self) -> CausalGraph:
        return self.model.graph

    @property
    def variant(self) -> str:
        return self.model.config.variant


def _atomic_write(path: Path, write) -> None:
    # Write beside the target then rename: an interrupted save never leaves a half file.
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def save_checkpoint(path: str | Path, model: CausalDiffAE, *, dataset: str, image: dict[str, Any],
                    training: dict[str, Any], metrics: dict[str, Any] | None = None, step: int = 0,
                    training_state: dict[str, Any] | None = None, scheduler: DDIMConfig | None = None) -> Path:
    from . import __version__

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    meta = {
        "format_version": FORMAT_VERSION,
        "library": "cdae-med",
        "library_version": __version__,
        "dataset": dataset,
        "variant": model.config.variant,
        "step": step,
        "graph": model.graph.to_dict(),
        "model": model.config.to_dict(),
        "scheduler": (scheduler or DDIMConfig()).to_dict(),
        "image": image,
        "training": training,
        "metrics": metrics or {},
    }
    _atomic_write(path / WEIGHTS, lambda tmp: torch.save(model.state_dict(), tmp))
    if training_state is not None:
        _atomic_write(path / TRAINING, lambda tmp: torch.save(training_state, tmp))
    _atomic_write(path / META, lambda tmp: Path(tmp).write_text(json.dumps(meta, indent=2) + "\n"))
    return path


def read_meta(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"no checkpoint directory at {path}")
    meta_path = path / META
    if not meta_path.is_file():
        raise CheckpointError(f"{path} is not a cdae-med checkpoint: {META} is missing")
    try:
        meta = json.loads(meta_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{meta_path} is corrupt: {err}") from None
    version = meta.get("format_version") if isinstance(meta, dict) else None
    if version != FORMAT_VERSION:
        raise CheckpointError(
            f"{path} has checkpoint format version {version!r}; this cdae-med reads version {FORMAT_VERSION}. "
            "Retrain the model, or load it with the cdae-med release that wrote it."
        )
    return meta


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> Checkpoint:
    path = Path(path)
    meta = read_meta(path)
    try:
        graph = CausalGraph.from_dict(meta["graph"])
        model_meta = dict(meta["model"])
        # written before the scheduler had its own section: its settings sat in the model config
        old_schedule = {k: model_meta.pop(k) for k in DDIMConfig.__dataclass_fields__ if k in model_meta}
        scheduler = DDIMConfig.from_dict(meta.get("scheduler") or old_schedule)
        # written before the setting existed: trained with MONAI's default 32 groups
        config = CausalDiffAEConfig.from_dict({"unet_norm_groups": 32, **model_meta})
        if meta.get("variant", config.variant) != config.variant:
            raise ValueError(f"variant {meta['variant']!r} disagrees with the model config's {config.variant!r}")
    except (KeyError, TypeError, ValueError, GraphError) as err:
        raise CheckpointError(f"{path / META} does not describe a valid model: {err}") from None
    model = CausalDiffAE(graph, config)
    weights = path / WEIGHTS
    if not weights.is_file():
        raise CheckpointError(f"{path} has no {WEIGHTS}")
    try:
        state = torch.load(weights, map_location=map_location, weights_only=True)
        model.load_state_dict(state)
    except Exception as err:  # torch raises many types for a damaged file
        raise CheckpointError(f"{weights} is corrupt or does not match {META}: {type(err).__name__}: {err}") from None
    model.eval()
    return Checkpoint(model=model, path=path, dataset=meta.get("dataset", ""), image=meta.get("image", {}),
                      training=meta.get("training", {}), metrics=meta.get("metrics", {}), step=meta.get("step", 0),
                      scheduler=scheduler)


def load_training_state(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any] | None:
    file = Path(path) / TRAINING
    if not file.is_file():
        return None
    try:
        return torch.load(file, map_location=map_location, weights_only=True)
    except Exception as err:
        raise CheckpointError(f"{file} is corrupt: {type(err).__name__}: {err}") from None
