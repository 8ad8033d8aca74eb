"""Training a CausalDiffAE on a synthetic data set: progress, periodic checkpoints, resume, and a
counterfactual grid plus errors against the generator's truth at the end."""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.optim.swa_utils import AveragedModel
from tqdm.auto import tqdm

from cdae_med.checkpoint import CheckpointError, load_training_state, save_checkpoint
from cdae_med.diffusion import DDIM
from cdae_med.graph import load_graph
from synthetic_data.brain import FOV_MM
from cdae_med.model import CausalDiffAE, CausalDiffAEConfig

from .cohort import load_cohort
from .datasets import SyntheticDataset, get_dataset, to_tensor
from .distributed import Ranks, any_rank, check_in_sync, init_distributed, shutdown
from .mri import Preprocessing, to_slices
from .evaluate_cf import counterfactual_errors
from .figures import counterfactual_grid
from .runtime import autocast, maybe_compile, optimise_for_device, resolve_device

log = logging.getLogger("cdae_med")

TEST_SET_SIZE = 1000
SLICE_AXIS = 2  # slice-wise volume models see axial slices (the grid is RAS)


def test_seed(seed: int) -> int:
    """The held-out test set's seed: far from any training seed a user is likely to pick."""
    return seed + 1_000_003


@dataclass
class TrainConfig:
    dataset: str = "pendulum"
    out: str = "runs/pendulum"
    steps: int = 100_000
    minutes: float | None = 12.0  # wall-clock budget for the optimisation; None = steps only
    size: int | None = None  # image side in pixels; None = the data set's default
    batch_size: int = 32
    lr: float = 3e-4
    mechanism_lr_factor: float = 10.0  # the causal mechanisms learn at lr x this (see parameter_groups)
    n_train: int = 10_000
    seed: int = 0
    device: str = "auto"
    gamma: float = 1.0
    gamma_warmup: int = 200
    ema_decay: float = 0.999
    checkpoint_minutes: float = 2.0
    eval_n: int = 32
    eval_steps: int = 50
    eval_depth: float = 1.0
    eval_guidance: float = 1.0
    grid_rows: int = 6
    mnist_dir: str | None = None  # real MNIST digits for morphomnist
    variant: str = "causaldiffae"  # causaldiffae, diffae or label_conditional (cdae_med.model)
    labelled_fraction: float = 1.0  # weak supervision: labels for this share of the training set
    model: dict[str, Any] = field(default_factory=dict)  # CausalDiffAEConfig overrides
    data: str | None = None  # a cohort (manifest CSV or its folder) instead of the generator's samples
    graph: str | None = None  # built-in graph name or YAML file; default: the data set's graph
    compile: bool = False  # torch.compile the training step on a GPU
    distributed: bool = False  # one process per GPU under torchrun (DistributedDataParallel)
    slicewise: bool = False  # volumes: a 2D model of axial slices instead of a 3D model
    spacing_mm: float | None = None  # volumes: the model grid's spacing; default: the brain cohort's FOV / size


def parameter_groups(model: CausalDiffAE, cfg: TrainConfig) -> list[dict]:
    """The optimiser's groups: the causal mechanisms at ``lr * mechanism_lr_factor``, the rest at ``lr``.

    Adam moves a weight by about lr per step whatever the loss's scale, and the mechanisms are
    small regressions whose outputs must travel a whole label range: at lr 3e-4 the brain
    mechanism age -> brain volume reached a tenth of the label regression's slope in 300 steps.
    """
    mechanisms = list(model.causal.mechanisms.parameters())
    if not mechanisms:
        return [{"params": list(model.parameters())}]
    ids = {id(p) for p in mechanisms}
    return [{"params": [p for p in model.parameters() if id(p) not in ids]},
            {"params": mechanisms, "lr": cfg.lr * cfg.mechanism_lr_factor}]


def ema_avg(decay: float):
    # Ramp the decay up from 0 so that short runs are not dominated by their initial weights.
    def avg(ema_p, p, n):
        d = min(decay, (1 + float(n)) / (10 + float(n)))
        return ema_p + (p - ema_p) * (1 - d)

    return avg


# Volumes: self-attention only at the coarsest level. At 32^3 on a 2-core CPU one denoiser pass
# took 1.33 s with attention at the two lower levels and 0.33 s with it at the lowest only.
# A network small enough to train in seconds on 2 CPU cores: the tests' and the smoke benchmarks'.
TINY_MODEL = {"latent_dim": 4, "encoder_channels": (16, 32), "unet_channels": (32, 32, 32),
              "unet_attention": (False, False, True), "mechanism_hidden": 16}
VOLUME_MODEL_DEFAULTS = {"unet_attention": (False, False, True)}
# End-of-training evaluation of volumes is capped: about 50 s per counterfactual at 32^3 on a CPU.
VOLUME_EVAL_CAP = {"eval_n": 4, "grid_rows": 3}


def labelled_mask(n: int, fraction: float, seed: int) -> torch.Tensor:
    """(n,) bool: which training images keep their labels; round(fraction * n) of them, a fixed
    seeded choice (the same for a resumed run)."""
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"labelled fraction must be in [0, 1], got {fraction}")
    mask = torch.zeros(n, dtype=torch.bool)
    mask[torch.randperm(n, generator=torch.Generator().manual_seed(seed + 424_242))[:round(fraction * n)]] = True
    return mask


def build_model(cfg: TrainConfig, ds: SyntheticDataset, size: int) -> CausalDiffAE:
    defaults = VOLUME_MODEL_DEFAULTS if ds.spatial_dims == 3 else {}
    mcfg = CausalDiffAEConfig(**{"spatial_dims": ds.spatial_dims, "in_channels": ds.channels, "variant": cfg.variant,
                                 "image_size": (size,) * ds.spatial_dims, **defaults, **cfg.model})
    return CausalDiffAE(ds.graph, mcfg)


class TrainingObjective(nn.Module):
    """The loss as a module's forward: what DistributedDataParallel wraps and synchronises."""

    def __init__(self, model: CausalDiffAE):
        super().__init__()
        self.model = model

    def forward(self, x0, y, ddim, gamma, labelled=None):
        return self.model.loss(x0, y, ddim, gamma, labelled=labelled)


def train(cfg: TrainConfig, progress: bool = True, resume: bool = False,
          on_progress: Callable[[float], None] | None = None) -> Path:
    """Train, checkpoint, evaluate. ``on_progress`` gets the optimisation's share done, in [0, 1]
    (steps or time budget, whichever is nearer its end), every 10 steps; evaluation follows."""
    ds = get_dataset(cfg.dataset, mnist_dir=cfg.mnist_dir)
    size = cfg.size or ds.default_size
    if ds.spatial_dims == 3 and (cfg.eval_n > VOLUME_EVAL_CAP["eval_n"] or cfg.grid_rows > VOLUME_EVAL_CAP["grid_rows"]):
        cfg = replace(cfg, eval_n=min(cfg.eval_n, VOLUME_EVAL_CAP["eval_n"]),
                      grid_rows=min(cfg.grid_rows, VOLUME_EVAL_CAP["grid_rows"]))
        log.info("volumes: end-of-training evaluation on %d subjects (about 50 s each on a CPU)", cfg.eval_n)
    if cfg.distributed:
        ranks, device = init_distributed(cfg.device)
        progress = progress and ranks.main
        if not ranks.main:
            log.setLevel(logging.WARNING)
    else:
        ranks, device = Ranks(), resolve_device(cfg.device)
    torch.manual_seed(cfg.seed)
    out = Path(cfg.out)
    log.info("device %s, precision %s; training for up to %s steps%s", device,
             "bf16 autocast" if device.type == "cuda" else "fp32", cfg.steps,
             f" or {cfg.minutes:g} minutes" if cfg.minutes else "")

    if cfg.graph is not None:
        graph = load_graph(cfg.graph)
        if cfg.data is None and graph.names != ds.graph.names:
            raise ValueError(f"--graph: the {ds.name} generator gives labels for {', '.join(ds.graph.names)}; "
                             f"a graph over other variables needs --data with a manifest")
        ds = replace(ds, graph=graph)
    preprocessing = Preprocessing(spacing_mm=(cfg.spacing_mm or FOV_MM / size,) * 3,
                                  spatial_size=(size,) * 3) if ds.spatial_dims == 3 else None

    t0 = time.perf_counter()
    if cfg.data is not None:
        if preprocessing is None:
            raise ValueError(f"--data takes a cohort of NIfTI scans; {ds.name} is not a volume data set")
        images, labels = load_cohort(cfg.data, ds.graph, preprocessing, progress=progress)
    else:
        # Slice-wise: n_train counts slices, so the number of subjects is n_train / slices per subject.
        n = math.ceil(cfg.n_train / size) if cfg.slicewise else cfg.n_train
        images, labels = ds.sample(n, seed=cfg.seed, size=size)
    if cfg.slicewise:
        if preprocessing is None:
            raise ValueError(f"--slicewise applies to volume data sets (brain), not {ds.name}")
        images, labels = to_slices(images, SLICE_AXIS), np.repeat(labels, size, axis=0)
        preprocessing = replace(preprocessing, slice_axis=SLICE_AXIS)
        ds = replace(ds, spatial_dims=2)
    x_all = to_tensor(images)
    y_all = torch.as_tensor(ds.graph.normalise(labels), dtype=torch.float32)
    labelled_all = labelled_mask(len(y_all), cfg.labelled_fraction, cfg.seed)
    y_all[~labelled_all] = 0.0  # the hidden labels cannot leak into training
    if cfg.labelled_fraction < 1.0:
        log.info("weak supervision: labels for %d of %d training images", int(labelled_all.sum()), len(y_all))
    log.info("generated %d %s training images at %d px in %.1f s", len(images), ds.name, size,
             time.perf_counter() - t0)

    model = optimise_for_device(build_model(cfg, ds, size).to(device), device)
    if ranks.enabled:
        # Same initial weights on every rank (DDP also broadcasts rank 0's), different diffusion noise.
        torch.manual_seed(cfg.seed + 7919 * ranks.rank)
        objective = DistributedDataParallel(TrainingObjective(model), find_unused_parameters=True,
                                            device_ids=[device.index] if device.type == "cuda" else None)
    else:
        objective = TrainingObjective(model)
    objective = maybe_compile(objective, device, cfg.compile)
    ema = AveragedModel(model, avg_fn=ema_avg(cfg.ema_decay), use_buffers=True)
    opt = torch.optim.AdamW(parameter_groups(model, cfg), lr=cfg.lr, weight_decay=0.0)
    ddim = DDIM(model.config.num_train_timesteps, model.config.beta_start, model.config.beta_end)
    ddim.scheduler.alphas_cumprod = ddim.scheduler.alphas_cumprod.to(device)

    step, elapsed = 0, 0.0
    if resume:
        state = load_training_state(out)
        if state is None:
            raise CheckpointError(f"--resume: no training state in {out}; start without --resume")
        if (state["config"]["dataset"] != cfg.dataset or state["config"]["model"] != cfg.model
                or state["config"].get("variant", "causaldiffae") != cfg.variant
                or state["config"].get("labelled_fraction", 1.0) != cfg.labelled_fraction):
            raise CheckpointError(f"--resume: {out} was trained with another data set or model settings")
        model.load_state_dict(state["model"])
        ema.load_state_dict(state["ema"])
        try:
            opt.load_state_dict(state["optimizer"])
        except ValueError as e:  # written before the mechanisms had their own parameter group
            raise CheckpointError(f"--resume: the optimiser state in {out} is from an older version "
                                  f"of cdae-med ({e}); start without --resume") from e
        step, elapsed = state["step"], state["elapsed_s"]
        log.info("resumed from step %d (%.1f min trained)", step, elapsed / 60)

    image_meta = {"channels": ds.channels, "size": [size] * ds.spatial_dims, "spatial_dims": ds.spatial_dims,
                  "value_range": [0, 255] if images.dtype == np.uint8 else [0.0, 1.0], "model_range": [-1.0, 1.0]}
    if preprocessing is not None:
        image_meta["preprocessing"] = preprocessing.to_dict()
    train_meta = {**asdict(cfg), "size": size}

    def save(metrics: dict | None = None) -> None:
        save_checkpoint(out, ema.module, dataset=ds.name, image=image_meta, training=train_meta,
                        metrics=metrics, step=step,
                        training_state={"model": model.state_dict(), "ema": ema.state_dict(),
                                        "optimizer": opt.state_dict(), "step": step, "elapsed_s": elapsed,
                                        "config": {"dataset": cfg.dataset, "model": cfg.model, "variant": cfg.variant,
                                                   "labelled_fraction": cfg.labelled_fraction}})

    budget_s = math.inf if cfg.minutes is None else cfg.minutes * 60
    n = len(x_all)
    # A time-budgeted run shows progress against its budget, a step-budgeted one against its steps.
    by_time = budget_s < math.inf
    bar = tqdm(total=round(budget_s) if by_time else cfg.steps, desc=f"train {ds.name}",
               unit="s" if by_time else "step", disable=not progress, dynamic_ncols=True)
    last_save = time.perf_counter()
    run_start = time.perf_counter() - elapsed
    images_seen_this_run, this_run_start = 0, time.perf_counter()
    model.train()
    while True:
        stop = step >= cfg.steps or elapsed >= budget_s
        if ranks.enabled:  # a time budget runs out at different moments on different ranks
            stop = any_rank(stop, device)
        if stop:
            break
        # The batch order is a function of the step alone, so a resumed run sees the same data.
        g = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step // max(1, n // cfg.batch_size))
        perm = torch.randperm(n, generator=g)
        offset = (step % max(1, n // cfg.batch_size)) * cfg.batch_size
        idx = perm[offset:offset + cfg.batch_size][ranks.rank::ranks.world]  # this rank's share
        x0, y = x_all[idx].to(device, non_blocking=True), y_all[idx].to(device, non_blocking=True)
        gamma = cfg.gamma * min(1.0, (step + 1) / max(1, cfg.gamma_warmup))
        with autocast(device):
            losses = objective(x0, y, ddim, gamma,
                               labelled=None if cfg.labelled_fraction >= 1.0 else labelled_all[idx].to(device))
        opt.zero_grad(set_to_none=True)
        losses["loss"].backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        ema.update_parameters(model)
        step += 1
        images_seen_this_run += len(idx)
        elapsed = time.perf_counter() - run_start
        if not math.isfinite(losses["loss"].item()):
            raise FloatingPointError(f"loss became {losses['loss'].item()} at step {step}; lower --lr")
        if step % 10 == 0 or step == 1:
            rate = images_seen_this_run / (time.perf_counter() - this_run_start)
            bar.set_postfix(step=step, loss=f"{losses['loss'].item():.4f}", mse=f"{losses['mse'].item():.4f}",
                            kl_z=f"{losses['kl_z'].item():.3f}", img_s=f"{rate:.1f}", refresh=False)
            bar.n = min(bar.total, round(elapsed) if by_time else step)
            bar.refresh()
            if on_progress is not None:
                on_progress(min(1.0, max(step / cfg.steps, elapsed / budget_s if by_time else 0.0)))
        if ranks.main and time.perf_counter() - last_save > cfg.checkpoint_minutes * 60:
            save()
            last_save = time.perf_counter()
    bar.close()
    train_rate = images_seen_this_run / max(1e-9, time.perf_counter() - this_run_start)
    stopped = "step limit" if step >= cfg.steps else f"time budget of {cfg.minutes} min"
    log.info("trained %d steps (%s), %.1f images/s", step, stopped, train_rate * ranks.world)
    if ranks.enabled:
        checksum = check_in_sync(model, device)
        log.info("ranks in sync after %d steps: weight checksum %.6f on all %d ranks", step, checksum, ranks.world)
        if not ranks.main:
            shutdown()
            return out

    model.eval()
    ema.module.eval()
    metrics: dict[str, Any] = {"steps": step, "train_minutes": elapsed / 60, "train_images_per_s": train_rate}
    if cfg.data is not None or cfg.slicewise:
        # A cohort has no true counterfactuals to score against; slice-wise models are scored on
        # whole scans (benchmarks/mri.py).
        log.info("no end-of-training counterfactual errors for %s; run `cdae-med batch` on held-out scans",
                 "a cohort" if cfg.data is not None else "a slice-wise model")
        save(metrics)
        (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
        shutdown()
        return out
    # Only the test subjects used below: generators give the same first k for any n.
    test = ds.sample(max(cfg.eval_n, cfg.grid_rows, 1), seed=test_seed(cfg.seed), size=size)
    variables = tuple(v.name for v in ds.graph.variables if not v.parents)
    if cfg.eval_n > 0:
        t1 = time.perf_counter()
        errs = counterfactual_errors(ema.module, ddim, ds, test[:cfg.eval_n], variables, num_steps=cfg.eval_steps, depth=cfg.eval_depth,
                                     guidance=cfg.eval_guidance, seed=cfg.seed, progress=progress)
        errs["seconds_per_counterfactual"] = (time.perf_counter() - t1) / (cfg.eval_n * (len(variables) + 1))
        metrics["eval"] = errs
    save(metrics)
    grid = counterfactual_grid(ema.module, ddim, ds, test[:cfg.grid_rows], variables, num_steps=cfg.eval_steps, depth=cfg.eval_depth,
                               guidance=cfg.eval_guidance, seed=cfg.seed)
    grid.save(out / "counterfactual_grid.png")
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    shutdown()
    return out
