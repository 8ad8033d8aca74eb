"""Device and precision selection, shared by every run."""

from __future__ import annotations

import contextlib
import logging

import torch

log = logging.getLogger("cdae_med")


def resolve_device(name: str = "auto") -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError("--device cuda was asked for but torch sees no CUDA device "
                           "(is the CUDA build of torch installed? see README)")
    if name != "cpu" and not name.startswith("cuda"):
        raise ValueError(f"unknown device {name!r}; use auto, cpu or cuda")
    return torch.device(name)


def autocast(device: torch.device):
    """bf16 autocast on a GPU (no loss scaling needed), full precision on the CPU."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()
