"""The data sets a model can be trained on, by name, and their image <-> tensor conversions.

A synthetic data set is a generator module of ``synthetic_data`` (the interface is in
``synthetic_data.base``); its causal graph is the built-in graph of the same name in
``cdae_med.graph``.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from types import ModuleType

import numpy as np
import torch

from cdae_med.graph import CausalGraph, builtin_graph
from synthetic_data.base import Samples

from .mri import intensity_window, normalise_intensity

__all__ = ["SyntheticDataset", "get_dataset", "DATASETS", "to_tensor", "to_uint8", "to_255", "preview"]

DATASETS = ("pendulum", "morphomnist", "circuit", "brain")


@dataclass(frozen=True)
class SyntheticDataset:
    name: str
    graph: CausalGraph
    generator: ModuleType
    default_size: int
    spatial_dims: int
    channels: int
    options: tuple = ()  # generator-specific keyword arguments for sample/write, e.g. mnist_dir
    field_of_view_mm: float | None = None  # volumes: side of the generator's cubic field of view

    def sample(self, n: int, seed: int, size: int) -> Samples:
        samples = self.generator.sample(n, seed=seed, size=size, **dict(self.options))
        if self.spatial_dims == 3:
            # Volumes are seen by the model as the MRI preprocessing leaves a scan: each in its own
            # intensity window (pipelines.mri), so training matches inference on a NIfTI file.
            windows = np.array([intensity_window(v) for v in samples.images], dtype=np.float64).reshape(-1, 2)
            samples = Samples(_apply_windows(samples.images, windows), samples.labels,
                              {**samples.noise, INTENSITY_WINDOW: windows})
        return samples

    def write(self, out, n: int, size: int, seed: int):
        return self.generator.write_dataset(out, n=n, size=size, seed=seed, **dict(self.options))

    def counterfactual(self, samples: Samples, do: dict, size: int) -> Samples:
        """The true counterfactual; volumes in the factual subject's intensity window (same scanner)."""
        noise = dict(samples.noise)
        windows = noise.pop(INTENSITY_WINDOW, None)
        truth = self.generator.counterfactual(Samples(samples.images, samples.labels, noise), do, size=size)
        if windows is not None:
            truth = Samples(_apply_windows(truth.images, windows), truth.labels, truth.noise)
        return truth


INTENSITY_WINDOW = "intensity_window"


def _apply_windows(images: np.ndarray, windows: np.ndarray) -> np.ndarray:
    return np.stack([normalise_intensity(v, tuple(w)) for v, w in zip(images, windows)]) if len(images) else images


def get_dataset(name: str, mnist_dir: str | None = None) -> SyntheticDataset:
    """A data set by name; ``mnist_dir`` (MNIST IDX files) makes morphomnist use real digits."""
    if mnist_dir is not None and name != "morphomnist":
        raise ValueError(f"--mnist-dir applies to morphomnist only, not {name!r}")
    if name not in DATASETS:
        raise ValueError(f"unknown data set {name!r}; available: {', '.join(DATASETS)}")
    try:
        module = importlib.import_module(f"synthetic_data.{name}")
    except ModuleNotFoundError as err:
        if err.name != f"synthetic_data.{name}":
            raise
        raise ValueError(f"data set {name!r} is not built yet (see README, status)") from None
    return SyntheticDataset(name=name, graph=builtin_graph(name), generator=module,
                            default_size=module.DEFAULT_SIZE, spatial_dims=module.SPATIAL_DIMS,
                            channels=module.CHANNELS, field_of_view_mm=getattr(module, "FOV_MM", None),
                            options=(("mnist_dir", str(mnist_dir)),) if mnist_dir is not None else ())


def to_tensor(images: np.ndarray) -> torch.Tensor:
    """(N, *spatial, C) -> float (N, C, *spatial) in [-1, 1]: uint8 from [0, 255], float from [0, 1]."""
    x = torch.tensor(images, dtype=torch.float32)
    x = x.div_(127.5).sub_(1.0) if images.dtype == np.uint8 else x.mul_(2.0).sub_(1.0)
    return x.movedim(-1, 1).contiguous()


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """float (N, C, *spatial) in [-1, 1] -> uint8 (N, *spatial, C)."""
    x = x.detach().float().cpu().movedim(1, -1)
    return ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).numpy()


def to_255(images: np.ndarray) -> np.ndarray:
    """Data-set images as float on the 0-255 scale the pixel metrics use."""
    return images.astype(np.float64) if images.dtype == np.uint8 else images.astype(np.float64) * 255.0


def preview(images: np.ndarray) -> np.ndarray:
    """Displayable uint8 (N, H, W, C): 2D images as they are, volumes by their middle axial slice."""
    if images.ndim == 5:  # (N, X, Y, Z, C) in RAS: the axial plane is X-Y at the middle Z
        images = np.rot90(images[:, :, :, images.shape[3] // 2], k=1, axes=(1, 2))
    return np.clip(to_255(images), 0, 255).round().astype(np.uint8)
