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


def optimise_for_device(model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """GPU-only: channels-last memory for 2D convolutions (tensor cores read NHWC without a
    transpose); logged. On a CPU the model is returned as it is."""
    if device.type == "cuda" and getattr(getattr(model, "config", None), "spatial_dims", 2) == 2:
        model = model.to(memory_format=torch.channels_last)
        log.info("channels-last memory format")
    return model


def maybe_compile(fn, device: torch.device, compile: bool):
    """``torch.compile`` on a GPU when asked (minutes of compilation, so off by default). The
    caller compiles a wrapper, never the model itself, so checkpoint keys stay the same."""
    if not compile:
        return fn
    if device.type != "cuda":
        log.info("--compile is ignored on the CPU")
        return fn
    log.info("compiling with torch.compile")
    return torch.compile(fn)
