"""Training a CausalDiffAE: progress, periodic checkpoints, resume, DDP, and at the end a
counterfactual grid plus errors against the generator's truth.

The parameters are :class:`pipelines.train_config.TrainConfig` (one schema with the command line
and the service); the data come from :func:`pipelines.training_data.load_training_data`.
"""

from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.optim.swa_utils import AveragedModel
from tqdm.auto import tqdm

from cdae_med.checkpoint import CheckpointError, load_training_state, save_checkpoint
from cdae_med.diffusion import DDIM, DDIMConfig
from cdae_med.latent import DeformationAutoencoder
from cdae_med.model import CausalDiffAE, CausalDiffAEConfig
from cdae_med.pipeline import CounterfactualPipeline, validate_confine
from cdae_med.runtime import autocast, maybe_compile, optimise_for_device, resolve_device

from .distributed import Ranks, any_rank, check_in_sync, init_distributed, shutdown
from .evaluate_cf import counterfactual_errors
from .figures import counterfactual_grid
from .train_config import MODEL_DEFAULTS, TINY_MODEL, VOLUME_MODEL_DEFAULTS, TEST_SET_SIZE, TrainConfig, test_seed
from .training_data import TrainingData, labelled_mask, load_training_data, template_fields

__all__ = ["train", "TrainConfig", "TINY_MODEL", "TEST_SET_SIZE", "test_seed", "parameter_groups", "build_model",
           "labelled_mask"]

log = logging.getLogger("cdae_med")

# End-of-training evaluation of volumes is capped: a volume's counterfactual costs tens of seconds on a CPU.
VOLUME_EVAL_CAP = {"eval_n": 4, "grid_rows": 3}


def parameter_groups(model: CausalDiffAE, cfg: TrainConfig) -> list[dict]:
    """The optimiser's groups: the causal mechanisms at ``lr * mechanism_lr_factor``, the rest at ``lr``.

    Adam moves a weight by about lr per step whatever the loss's scale, and the mechanisms are
    small regressions whose outputs must travel a whole label range (docs/design-notes.md,
    "Mechanisms").
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


def build_model(cfg: TrainConfig, data: TrainingData) -> CausalDiffAE:
    ds = data.dataset
    defaults = {**MODEL_DEFAULTS, **(VOLUME_MODEL_DEFAULTS if ds.spatial_dims == 3 else {})}
    mcfg = CausalDiffAEConfig(**{"spatial_dims": ds.spatial_dims, "in_channels": ds.channels, "variant": cfg.variant,
                                 "image_size": (data.size,) * ds.spatial_dims, **defaults, **cfg.model})
    return CausalDiffAE(ds.graph, mcfg)


class TrainingObjective(nn.Module):
    """The loss as a module's forward: what DistributedDataParallel wraps and synchronises."""

    def __init__(self, model: CausalDiffAE):
        super().__init__()
        self.model = model

    def forward(self, x0, y, ddim, gamma, labelled=None, **recipe):
        return self.model.loss(x0, y, ddim, gamma, labelled=labelled, **recipe)



class _Run:
    """One training run's state: model, EMA, optimiser, step and time, and how to save them."""

    def __init__(self, cfg: TrainConfig, data: TrainingData, device: torch.device, ranks: Ranks):
        self.cfg, self.data, self.device, self.ranks = cfg, data, device, ranks
        model = build_model(cfg, data)
        validate_confine(model, cfg.eval_confine or 0.0)  # before the fitting and the steps (None: the default)
        # What a step's batch is drawn from: the images, or their coefficients under a first stage, which
        # is fitted once on the training images (before the weights' average copies the model) and codes
        # them once (a deformation first stage registers every image).
        self.inputs, self.encoded = data.images, False
        if model.first_stage is not None:
            t0 = time.perf_counter()
            fields = ({"fields": template_fields(model.first_stage, data.images)}
                      if isinstance(model.first_stage, DeformationAutoencoder) else {})
            if model.config.latent_label_directions:
                fields.update(labels=data.labels, labelled=data.labelled)
            self.inputs, share = model.first_stage.fit_transform(data.images, seed=cfg.seed, **fields)
            self.encoded = True
            log.info("first stage: %d components hold %.1f %% of the training images' variance (%.0f s)",
                     model.first_stage.k, 100 * share, time.perf_counter() - t0)
        if model.spread is not None:  # the voxels' spread about their mean, from the labelled images
            t0 = time.perf_counter()
            keep = data.labelled.bool()
            model.spread.fit(data.images[keep], data.labels[keep])
            log.info("voxel spread fitted on %d labelled images (%.0f s)", int(keep.sum()), time.perf_counter() - t0)
        self.model = optimise_for_device(model.to(device), device)
        if ranks.enabled:
            # Same initial weights on every rank (DDP also broadcasts rank 0's), different diffusion noise.
            torch.manual_seed(cfg.seed + 7919 * ranks.rank)
            objective = DistributedDataParallel(TrainingObjective(self.model), find_unused_parameters=True,
                                                device_ids=[device.index] if device.type == "cuda" else None)
        else:
            objective = TrainingObjective(self.model)
        self.objective = maybe_compile(objective, device, cfg.compile)
        self.ema = AveragedModel(self.model, avg_fn=ema_avg(cfg.ema_decay), use_buffers=True)
        self.opt = torch.optim.AdamW(parameter_groups(self.model, cfg), lr=cfg.lr, weight_decay=0.0)
        # a function of the step alone, so a resumed run continues the same ramp
        self.lr_schedule = torch.optim.lr_scheduler.LambdaLR(self.opt, self._warmup)
        self.scheduler = DDIM(DDIMConfig(prediction_type=cfg.prediction_type)).to(device)
        self.recipe = {"weighting": cfg.loss_weighting, "snr_gamma": cfg.snr_gamma,
                       "timestep_sampling": cfg.timestep_sampling, "encoded": self.encoded}
        self.step, self.elapsed = 0, 0.0
        if cfg.encoder_steps and (ranks.enabled or cfg.variant == "diffae"):
            raise ValueError("--encoder-steps takes neither --distributed (the ranks' encoders would part) nor "
                             "--variant diffae (its encoder has no label prior)")

    def _warmup(self, step: int) -> float:
        return min(1.0, (step + 1) / max(1, self.cfg.lr_warmup))

    def _identity(self) -> dict[str, Any]:
        """What a resumed run must share with the saved one."""
        cfg = self.cfg
        return {"dataset": cfg.dataset, "model": cfg.model, "variant": cfg.variant,
                "labelled_fraction": cfg.labelled_fraction, "prediction_type": cfg.prediction_type}

    def resume(self, out: Path) -> None:
        state = load_training_state(out)
        if state is None:
            raise CheckpointError(f"--resume: no training state in {out}; start without --resume")
        saved = {"variant": "causaldiffae", "labelled_fraction": 1.0, "prediction_type": "epsilon",
                 **state["config"]}
        if saved != self._identity():
            raise CheckpointError(f"--resume: {out} was trained with another data set or model settings")
        self.model.load_state_dict(state["model"])
        self.ema.load_state_dict(state["ema"])
        try:
            self.opt.load_state_dict(state["optimizer"])
        except ValueError as e:  # written before the mechanisms had their own parameter group
            raise CheckpointError(f"--resume: the optimiser state in {out} is from an older version "
                                  f"of cdae-med ({e}); start without --resume") from e
        self.step, self.elapsed = state["step"], state["elapsed_s"]
        self.lr_schedule.last_epoch = self.step
        for group, base in zip(self.opt.param_groups, self.lr_schedule.base_lrs):
            group["lr"] = base * self._warmup(self.step)
        log.info("resumed from step %d (%.1f min trained)", self.step, self.elapsed / 60)

    def save(self, out: Path, metrics: dict | None = None) -> None:
        cfg = self.cfg
        save_checkpoint(out, self.ema.module, dataset=self.data.dataset.name, image=self.data.image_meta,
                        training={**cfg.model_dump(), "size": self.data.size}, metrics=metrics, step=self.step,
                        scheduler=self.scheduler.config,
                        training_state={"model": self.model.state_dict(), "ema": self.ema.state_dict(),
                                        "optimizer": self.opt.state_dict(), "step": self.step,
                                        "elapsed_s": self.elapsed, "config": self._identity()})
        if self.data.reference is not None:
            self.data.reference.save(out)

    def batch(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """This rank's share of the step's batch: inputs, labels, which are labelled, and the labels the
        mechanisms are fitted on where they differ (:attr:`TrainingData.mechanism_labels`). The order is a
        function of the step alone, so a resumed run sees the same data."""
        cfg, n = self.cfg, len(self.data.images)
        per_epoch = max(1, n // cfg.batch_size)
        g = torch.Generator().manual_seed(cfg.seed * 1_000_003 + self.step // per_epoch)
        perm = torch.randperm(n, generator=g)
        offset = (self.step % per_epoch) * cfg.batch_size
        idx = perm[offset:offset + cfg.batch_size][self.ranks.rank::self.ranks.world]
        labelled = None if cfg.labelled_fraction >= 1.0 else self.data.labelled[idx].to(self.device)
        mechanism = self.data.mechanism_labels
        return (self.inputs[idx].to(self.device, non_blocking=True),
                self.data.labels[idx].to(self.device, non_blocking=True), labelled,
                None if mechanism is None else mechanism[idx].to(self.device, non_blocking=True))

    def encoder_step(self, k: int, gamma: float) -> None:
        """One encoder-only step (``TrainConfig.encoder_steps``) on a batch of its own, drawn as a function of
        the step and ``k`` so that a resumed run repeats it. Only the encoder has gradients, so only it moves."""
        n = len(self.inputs)
        g = torch.Generator().manual_seed(self.cfg.seed * 1_000_003 + 7_919 * self.step + k + 1)
        idx = torch.randint(0, n, (min(self.cfg.batch_size, n),), generator=g)
        labelled = None if self.cfg.labelled_fraction >= 1.0 else self.data.labelled[idx].to(self.device)
        with autocast(self.device):
            loss = gamma * self.model.encoder_loss(self.inputs[idx].to(self.device), self.data.labels[idx].to(self.device),
                                                   labelled, encoded=self.encoded)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        self.opt.step()

    def optimise(self, out: Path, progress: bool, on_progress: Callable[[float], None] | None) -> float:
        """Optimisation steps until the step or time budget is spent; returns images per second."""
        cfg, ranks = self.cfg, self.ranks
        budget_s = math.inf if cfg.minutes is None else cfg.minutes * 60
        # A time-budgeted run shows progress against its budget, a step-budgeted one against its steps.
        by_time = budget_s < math.inf
        bar = tqdm(total=round(budget_s) if by_time else cfg.steps, desc=f"train {self.data.dataset.name}",
                   unit="s" if by_time else "step", disable=not progress, dynamic_ncols=True)
        last_save = time.perf_counter()
        run_start = time.perf_counter() - self.elapsed
        seen, this_run_start = 0, time.perf_counter()
        self.model.train()
        while True:
            stop = self.step >= cfg.steps or self.elapsed >= budget_s
            if ranks.enabled:  # a time budget runs out at different moments on different ranks
                stop = any_rank(stop, self.device)
            if stop:
                break
            x0, y, labelled, y_mechanism = self.batch()
            gamma = cfg.gamma * min(1.0, (self.step + 1) / max(1, cfg.gamma_warmup))
            with autocast(self.device):
                losses = self.objective(x0, y, self.scheduler, gamma, labelled=labelled,
                                        mechanism_labels=y_mechanism, **self.recipe)
            self.opt.zero_grad(set_to_none=True)
            losses["loss"].backward()
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
            self.opt.step()
            for k in range(cfg.encoder_steps):
                self.encoder_step(k, gamma)
            self.lr_schedule.step()
            self.ema.update_parameters(self.model)
            self.step += 1
            seen += len(x0)
            self.elapsed = time.perf_counter() - run_start
            if not math.isfinite(losses["loss"].item()):
                raise FloatingPointError(f"loss became {losses['loss'].item()} at step {self.step}; lower --lr")
            if self.step % 10 == 0 or self.step == 1:
                rate = seen / (time.perf_counter() - this_run_start)
                bar.set_postfix(step=self.step, loss=f"{losses['loss'].item():.4f}",
                                mse=f"{losses['mse'].item():.4f}", kl_z=f"{losses['kl_z'].item():.3f}",
                                img_s=f"{rate:.1f}", refresh=False)
                bar.n = min(bar.total, round(self.elapsed) if by_time else self.step)
                bar.refresh()
                if on_progress is not None:
                    on_progress(min(1.0, max(self.step / cfg.steps, self.elapsed / budget_s if by_time else 0.0)))
            if ranks.main and time.perf_counter() - last_save > cfg.checkpoint_minutes * 60:
                self.save(out)
                last_save = time.perf_counter()
        bar.close()
        return seen / max(1e-9, time.perf_counter() - this_run_start)


def _final_evaluation(run: _Run, out: Path, progress: bool, metrics: dict[str, Any]) -> None:
    """Errors against the generator's true counterfactuals (into ``metrics``, saved with the
    checkpoint) and the counterfactual grid."""
    cfg, ds, size = run.cfg, run.data.dataset, run.data.size
    pipe = CounterfactualPipeline(run.ema.module.eval(), run.scheduler)
    # Only the test subjects used below: generators give the same first k for any n.
    test = ds.sample(max(cfg.eval_n, cfg.grid_rows, 1), seed=test_seed(cfg.seed), size=size)
    roots = tuple(v.name for v in ds.graph.variables if not v.parents)
    settings = {"num_steps": cfg.eval_steps, "depth": cfg.eval_depth, "guidance": cfg.eval_guidance,
                "seed": cfg.seed, "confine": pipe.resolve_confine(cfg.eval_confine)}
    if cfg.eval_n > 0:
        t1 = time.perf_counter()
        errs = counterfactual_errors(pipe, ds, test[:cfg.eval_n], roots, progress=progress, **settings)
        errs["seconds_per_counterfactual"] = (time.perf_counter() - t1) / (cfg.eval_n * (len(roots) + 1))
        metrics["eval"] = errs
    run.save(out, metrics)
    counterfactual_grid(pipe, ds, test[:cfg.grid_rows], roots, **settings).save(out / "counterfactual_grid.png")


def _cpu_seconds() -> float:
    """CPU seconds used so far by this process and the worker processes it has waited for."""
    import resource

    return sum(u.ru_utime + u.ru_stime for u in (resource.getrusage(resource.RUSAGE_SELF),
                                                 resource.getrusage(resource.RUSAGE_CHILDREN)))


def train(cfg: TrainConfig, progress: bool = True, resume: bool = False,
          on_progress: Callable[[float], None] | None = None) -> Path:
    """Train, checkpoint, evaluate. ``on_progress`` gets the optimisation's share done, in [0, 1]
    (steps or time budget, whichever is nearer its end), every 10 steps; evaluation follows."""
    if cfg.dataset == "brain" and not cfg.slicewise and (cfg.eval_n > VOLUME_EVAL_CAP["eval_n"]
                                                         or cfg.grid_rows > VOLUME_EVAL_CAP["grid_rows"]):
        cfg = cfg.model_copy(update={"eval_n": min(cfg.eval_n, VOLUME_EVAL_CAP["eval_n"]),
                                     "grid_rows": min(cfg.grid_rows, VOLUME_EVAL_CAP["grid_rows"])})
        log.info("volumes: end-of-training evaluation on %d subjects (about 50 s each on a CPU)", cfg.eval_n)
    if cfg.distributed:
        ranks, device = init_distributed(cfg.device)
        progress = progress and ranks.main
        if not ranks.main:
            log.setLevel(logging.WARNING)
    else:
        ranks, device = Ranks(), resolve_device(cfg.device)
    torch.manual_seed(cfg.seed)
    cpu_start = _cpu_seconds()
    out = Path(cfg.out)
    log.info("device %s, precision %s; training for up to %s steps%s", device,
             "bf16 autocast" if device.type == "cuda" else "fp32", cfg.steps,
             f" or {cfg.minutes:g} minutes" if cfg.minutes else "")
    data = load_training_data(cfg, progress)
    run = _Run(cfg, data, device, ranks)
    if resume:
        run.resume(out)
    rate = run.optimise(out, progress, on_progress)
    stopped = "step limit" if run.step >= cfg.steps else f"time budget of {cfg.minutes} min"
    log.info("trained %d steps (%s), %.1f images/s", run.step, stopped, rate * ranks.world)
    if ranks.enabled:
        checksum = check_in_sync(run.model, device)
        log.info("ranks in sync after %d steps: weight checksum %.6f on all %d ranks", run.step, checksum, ranks.world)
        if not ranks.main:
            # Wait for rank 0 to write the checkpoint before leaving the group: tearing gloo down while a
            # peer still holds its connections aborts the process ("terminate called without an active
            # exception").
            shutdown(wait=True)
            return out

    run.model.eval()
    # cpu_minutes: the whole run on this process and its workers (rendering, registration and first-stage
    # fitting where no cache held them, then optimisation); train_minutes: the optimisation's wall clock.
    metrics: dict[str, Any] = {"steps": run.step, "train_minutes": run.elapsed / 60, "train_images_per_s": rate,
                               "cpu_minutes": (_cpu_seconds() - cpu_start) / 60}
    if cfg.data is not None or cfg.slicewise or cfg.registration:
        # A cohort has no true counterfactuals to score against; slice-wise and registered models are
        # scored on whole scans (benchmarks/mri.py, benchmarks/brain_native.py).
        what = "a cohort" if cfg.data is not None else "a slice-wise model" if cfg.slicewise else "a registered model"
        log.info("no end-of-training counterfactual errors for %s; run `cdae-med batch` on held-out scans", what)
        run.save(out, metrics)
    else:
        _final_evaluation(run, out, progress, metrics)
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    shutdown(wait=ranks.enabled)
    return out
