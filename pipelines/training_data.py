"""What a training run learns from: images and labels of a generator or of a cohort of scans,
on the model's grid, with the record of how they were made that the checkpoint keeps.

Three sources, one result (:class:`TrainingData`): a generator's samples (2D images or volumes),
a cohort of NIfTI scans preprocessed as at inference (``TrainConfig.data``), and either kind of
volume cut into axial slices for a 2D slice-wise model (``TrainConfig.slicewise``).
"""

from __future__ import annotations

import hashlib
import inspect
import json
import logging
import math
import multiprocessing
import os
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cdae_med.graph import load_graph

from .cohort import load_cohort
from .datasets import SyntheticDataset, get_dataset, to_tensor
from .mri import Preprocessing, prepare_registered, reference_mask, to_slices
from .registration import Reference
from .train_config import TrainConfig

log = logging.getLogger("cdae_med")

__all__ = ["TrainingData", "load_training_data", "labelled_mask", "SLICE_AXIS"]

SLICE_AXIS = 2  # slice-wise volume models see axial slices (the grid is RAS)


@dataclass
class TrainingData:
    dataset: SyntheticDataset  # its graph and spatial_dims are the model's (a slice-wise model's are 2D)
    size: int
    images: torch.Tensor  # (N, C, *spatial) in [-1, 1]
    labels: torch.Tensor  # (N, n_vars) normalised; zero where hidden
    labelled: torch.Tensor  # (N,) bool: which images keep their labels
    image_meta: dict[str, Any]  # the checkpoint's ``image`` record
    reference: Reference | None = None  # registered models: the space their scans are registered to
    # (N, n_vars) normalised labels the causal mechanisms are fitted on where they differ from ``labels``: a
    # registered model's volumes in each scan's own space (:func:`mechanism_space_labels`); None: ``labels``.
    mechanism_labels: torch.Tensor | None = None


def labelled_mask(n: int, fraction: float, seed: int) -> torch.Tensor:
    """(n,) bool: which training images keep their labels; round(fraction * n) of them, a fixed
    seeded choice (the same for a resumed run)."""
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"labelled fraction must be in [0, 1], got {fraction}")
    mask = torch.zeros(n, dtype=torch.bool)
    mask[torch.randperm(n, generator=torch.Generator().manual_seed(seed + 424_242))[:round(fraction * n)]] = True
    return mask


def _preprocessing(cfg: TrainConfig, ds: SyntheticDataset, size: int) -> Preprocessing | None:
    """The MRI preprocessing a volume model's scans go through (recorded in the checkpoint)."""
    if ds.spatial_dims != 3:
        return None
    spacing = cfg.spacing_mm or ds.field_of_view_mm / size
    # A registered model sees the graph's volumes in its reference space (Preprocessing.volume_factor).
    volumes = tuple(n for n in ds.graph.names if ds.graph[n].unit == VOLUME_UNIT) if cfg.registration else ()
    return Preprocessing(spacing_mm=(spacing,) * 3, spatial_size=(size,) * 3, registration=cfg.registration,
                         volume_variables=volumes)


VOLUME_UNIT = "ml"  # a variable in this unit is a volume, which an affine registration scales
REFERENCE_SIZE = 64  # the reference's grid: 3 mm over the brain cohort's 192 mm field of view


def _registered_cache(ds: SyntheticDataset, cfg: TrainConfig, prep: Preprocessing, render: int) -> Path:
    """Where the registered subjects of this data set, count, seed and preprocessing are kept: one
    registration costs about a second here, so a second model trained on the same subjects reuses them."""
    from cdae_med import __version__

    from .registration import OPTIMIZER
    from .settings import RuntimeSettings

    key = json.dumps({"dataset": ds.name, "n": cfg.n_train, "seed": cfg.seed, "render": render,
                      "reference": REFERENCE_SIZE, "preprocessing": prep.to_dict(), "optimizer": OPTIMIZER,
                      "version": __version__},
                     sort_keys=True)
    return RuntimeSettings().home / "cache" / "registered" / f"{hashlib.sha1(key.encode()).hexdigest()[:16]}.npz"


def reference_space_labels(labels: np.ndarray, graph, prep: Preprocessing, ratios: np.ndarray) -> np.ndarray:
    """(N, n_vars) labels with the volume variables in the model's reference space
    (:meth:`Preprocessing.volume_factor` of each scan's registration volume ratio)."""
    out = np.array(labels, dtype=np.float64)
    factor = np.array([prep.volume_factor(r) for r in ratios])
    for name in prep.volume_variables:
        out[:, graph.names.index(name)] *= factor
    return out


def mechanism_space_labels(labels: np.ndarray, graph, prep: Preprocessing) -> np.ndarray | None:
    """The labels a registered model's causal mechanisms are fitted on: each scan's own volumes, where every
    volume variable is on a log scale; else None (the reference-space labels).

    An affine registration scales a head's volumes by one factor, which on the log scale is one offset per
    subject in every volume: abduction keeps it in u, so a mechanism of the scans' own volumes makes the same
    counterfactuals in reference space. Its slopes are what differ: the scaling takes out the head size along
    which brain volume varies at a given age, and in reference space the brain volume's effect on the
    ventricles is measured over what little is left (design notes, "Volumes on a log scale")."""
    volumes = [graph[n] for n in prep.volume_variables]
    if not volumes or not all(v.log for v in volumes):
        return None
    return np.array(labels, dtype=np.float64)


REGISTRATION_CHUNK = 16  # subjects per task of the registration pool
_registrar: tuple | None = None  # a pool process's (prep, reference, mask, affine)


def _start_registrar(prep: Preprocessing, reference: Reference, mask: np.ndarray, affine: np.ndarray) -> None:
    """A registration pool process (forked: registration needs numpy and SimpleITK, not torch's thread
    pool), one thread each: the pool has one process per thread."""
    global _registrar
    import SimpleITK as sitk

    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(1)
    _registrar = (prep, reference, mask, affine)


def _register_subjects(volumes: np.ndarray, first: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(n, *render) generator volumes -> their (n, *model grid) registered images, correlations and
    volume ratios."""
    from cdae_med.io import Scan

    prep, reference, mask, affine = _registrar
    out = [prepare_registered(Scan(v, affine, f"subject {first + i}"), prep, reference, mask)
           for i, v in enumerate(volumes)]
    return (np.stack([p.image[0] for p in out]), np.array([p.registration.correlation for p in out]),
            np.array([p.registration.volume_ratio for p in out]))


def _registered_samples(ds: SyntheticDataset, cfg: TrainConfig, prep: Preprocessing, reference: Reference,
                        progress: bool):
    """Generator subjects rendered at twice the model's resolution (a scan is finer than the model),
    registered to the reference and resampled onto the model grid as a scan at inference is; read from
    :func:`_registered_cache` where an earlier run made them."""
    from tqdm.auto import tqdm

    size = prep.spatial_size[0]
    render = min(2 * size, 96)
    cache = _registered_cache(ds, cfg, prep, render)
    if cache.is_file():
        try:
            with np.load(cache) as d:
                log.info("registered training subjects read from %s", cache)
                return d["images"], d["labels"], d["correlations"], d["volume_ratios"]
        except (OSError, ValueError, KeyError) as err:  # a damaged (or older) cache is made again
            log.warning("ignoring the unreadable cache %s: %s", cache, err)
    shows_progress = "progress" in inspect.signature(ds.generator.sample).parameters  # rendering takes minutes
    samples = ds.generator.sample(cfg.n_train, seed=cfg.seed, size=render,
                                  **({"progress": progress} if shows_progress else {}))
    affine = ds.generator.affine(render)
    mask = reference_mask(reference, prep)
    images = np.empty((len(samples.images), size, size, size, 1), np.float32)
    correlations, ratios = np.empty(len(images)), np.empty(len(images))
    workers = min(torch.get_num_threads(), len(images))  # one single-threaded registration per thread
    chunks = [range(i, min(i + REGISTRATION_CHUNK, len(images))) for i in range(0, len(images), REGISTRATION_CHUNK)]
    with tqdm(total=len(images), desc="register", unit="scan", disable=not progress) as bar, \
            ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("fork"), initializer=_start_registrar,
                                initargs=(prep, reference, mask, affine)) as pool:
        futures = {pool.submit(_register_subjects, samples.images[c.start:c.stop, ..., 0], c.start): c for c in chunks}
        for future in as_completed(futures):
            c = futures[future]
            images[c.start:c.stop, ..., 0], correlations[c.start:c.stop], ratios[c.start:c.stop] = future.result()
            bar.update(len(c))
    cache.parent.mkdir(parents=True, exist_ok=True)
    tmp = cache.with_name(f".{cache.stem}.{os.getpid()}.npz")  # written beside, renamed: never half a file
    np.savez(tmp, images=images, labels=samples.labels, correlations=correlations, volume_ratios=ratios)
    os.replace(tmp, cache)
    return images, samples.labels, correlations, ratios


def load_training_data(cfg: TrainConfig, progress: bool = True) -> TrainingData:
    ds = get_dataset(cfg.dataset, mnist_dir=cfg.mnist_dir)
    size = cfg.size or ds.default_size
    if cfg.graph is not None:
        graph = load_graph(cfg.graph)
        if cfg.data is None and graph.names != ds.graph.names:
            raise ValueError(f"--graph: the {ds.name} generator gives labels for {', '.join(ds.graph.names)}; "
                             f"a graph over other variables needs --data with a manifest")
        ds = replace(ds, graph=graph)
    preprocessing = _preprocessing(cfg, ds, size)
    if preprocessing is None and (cfg.data is not None or cfg.slicewise):
        what = "--data takes a cohort of NIfTI scans" if cfg.data is not None else "--slicewise applies to volumes"
        raise ValueError(f"{what}; {ds.name} is not a volume data set")

    reference, correlations, ratios = None, None, None
    if preprocessing is not None and preprocessing.registration is not None:
        if not hasattr(ds.generator, "reference"):
            raise ValueError(f"registration needs a reference head; the {ds.name} data set has none")
        image, mask, affine = ds.generator.reference(REFERENCE_SIZE)
        reference = Reference(image, mask, affine)
    t0 = time.perf_counter()
    if cfg.data is not None:
        images, labels, ratios = load_cohort(cfg.data, ds.graph, preprocessing, progress=progress, reference=reference)
    elif reference is not None:
        images, labels, correlations, ratios = _registered_samples(ds, cfg, preprocessing, reference, progress)
    else:
        # Slice-wise: n_train counts slices, so the number of subjects is n_train / slices per subject.
        n = math.ceil(cfg.n_train / size) if cfg.slicewise else cfg.n_train
        images, labels = ds.sample(n, seed=cfg.seed, size=size)
    native, mechanism = labels, None
    if ratios is not None and preprocessing.volume_variables:
        preprocessing = replace(preprocessing, cohort_volume_ratio=float(np.mean(ratios)))
        labels = reference_space_labels(labels, ds.graph, preprocessing, ratios)
        mechanism = mechanism_space_labels(native, ds.graph, preprocessing)
    if cfg.slicewise:
        native = np.repeat(native, size, axis=0)
        mechanism = None if mechanism is None else np.repeat(mechanism, size, axis=0)
        images, labels = to_slices(images, SLICE_AXIS), np.repeat(labels, size, axis=0)
        preprocessing = replace(preprocessing, slice_axis=SLICE_AXIS)
        ds = replace(ds, spatial_dims=2)
    log.info("%s %d %s training images at %d px in %.1f s", "read" if cfg.data else "generated", len(images),
             ds.name, size, time.perf_counter() - t0)

    labelled = labelled_mask(len(labels), cfg.labelled_fraction, cfg.seed)

    def training_labels(values: np.ndarray) -> torch.Tensor:
        out = torch.as_tensor(ds.graph.normalise(values), dtype=torch.float32)
        out[~labelled] = 0.0  # the hidden labels cannot leak into training
        return out

    y = training_labels(labels)
    y_mechanism = None if mechanism is None else training_labels(mechanism)
    if cfg.labelled_fraction < 1.0:
        log.info("weak supervision: labels for %d of %d training images", int(labelled.sum()), len(y))
    # The values the model saw (labelled images only): the scan code flags estimates and interventions
    # outside them, where the model extrapolates.
    seen = native[labelled.numpy()] if labelled.any() else native  # in the graph's own units
    ranges = {n: [float(seen[:, i].min()), float(seen[:, i].max())] for i, n in enumerate(ds.graph.names)}
    meta = {"training_ranges": ranges,
            "channels": ds.channels, "size": [size] * ds.spatial_dims, "spatial_dims": ds.spatial_dims,
            "value_range": [0, 255] if images.dtype == np.uint8 else [0.0, 1.0], "model_range": [-1.0, 1.0]}
    if preprocessing is not None:
        meta["preprocessing"] = preprocessing.to_dict()
    if correlations is not None:  # how well training scans matched the reference: below this, a scan is unusual
        meta["registration_correlation_p01"] = float(np.percentile(correlations, 1))
    return TrainingData(dataset=ds, size=size, images=to_tensor(images), labels=y, labelled=labelled, image_meta=meta,
                        reference=reference, mechanism_labels=y_mechanism)


def template_fields(first_stage, images: torch.Tensor) -> torch.Tensor:
    """The displacements of ``images`` from their mean that a deformation first stage is fitted on
    (:meth:`cdae_med.latent.DeformationAutoencoder.fit_transform`): demons of 2,000 subjects at 32^3 take
    minutes, so they are cached under ``$CDAE_HOME/cache/fields``, keyed by the images and the demons
    settings, and a second model of the same subjects reuses them."""
    x = images.float()
    key = hashlib.sha1(np.ascontiguousarray(x.numpy()).tobytes())
    key.update(json.dumps([first_stage.iterations, first_stage.smoothing_voxels]).encode())
    from .settings import RuntimeSettings

    cache = RuntimeSettings().home / "cache" / "fields" / f"{key.hexdigest()[:16]}.npy"
    if cache.is_file():
        try:
            fields = torch.from_numpy(np.load(cache))
            if fields.shape == (len(x), x.ndim - 2, *x.shape[2:]):
                log.info("template displacements read from %s", cache)
                return fields
        except (OSError, ValueError) as err:
            log.warning("ignoring the unreadable cache %s: %s", cache, err)
    first_stage.template = x.mean(0)
    t0 = time.perf_counter()
    fields = first_stage.fields(x)
    log.info("template displacements of %d images in %.0f s", len(x), time.perf_counter() - t0)
    cache.parent.mkdir(parents=True, exist_ok=True)
    tmp = cache.with_name(f".{cache.stem}.{os.getpid()}.npy")  # written beside, renamed: never half a file
    np.save(tmp, fields.numpy())
    os.replace(tmp, cache)
    return fields
