"""The Celery tasks: ``celery -A service.worker worker -Q counterfactual,train -c 1``.

The app is configured in :mod:`service.queue` (queues, acknowledgement, one message reserved at a
time); this module adds the tasks and what a worker process keeps: its database connection and
the models it has loaded. A task first *claims* its job in the database (see :mod:`service.db`),
so a second delivery of the same message, or a re-queue by the sweep, never runs a job twice at
the same time; outputs are written beside their place and renamed into it, so a rerun after a
crash starts clean or finds the finished result. Every outcome ends in the database: succeeded,
or failed with the reason. A task whose lease is lost (the sweep gave the job to another worker,
or its owner deleted it) stops at its next progress report (:class:`LeaseLost`) and removes what
it wrote.

A worker's main process records itself in the database while it is up (the API's ``/readyz``
reads it); its pool processes end when it does (Linux), and everything the worker creates is
private to its user (:mod:`service.process`).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import socket
import threading
import time
import traceback
from collections import OrderedDict
from pathlib import Path
from typing import Any, Callable

from celery import signals

from .config import get_settings
from .db import DELETED, FAILED, SUCCEEDED, JobView, Store
from .process import die_with_parent, private_files
from .queue import TASKS, make_celery
from .sweep import _local_dead

__all__ = ["app", "settings", "worker_id", "run_job", "load_scan_model", "LeaseLost", "COUNTERFACTUAL_FILES",
           "TRAIN_FILES"]

log = logging.getLogger("cdae_med.service")

COUNTERFACTUAL_FILES = ("counterfactual.nii.gz", "difference.nii.gz", "preview.png", "report.json")
# checkpoint.json is not offered: its training config holds server paths; the model is in the registry.
TRAIN_FILES = ("metrics.json", "counterfactual_grid.png")


def worker_id() -> str:
    """host:pid of this process; the sweep on the same host can tell a dead pid at once."""
    return f"{socket.gethostname()}:{os.getpid()}"


# `celery -A service.worker` finds the app here; a worker process reads its settings once.
settings = get_settings()
app = make_celery(settings)
private_files()

# -- per-process state ----------------------------------------------------------------------
_stores: dict[str, Store] = {}
_models: "OrderedDict[str, Any]" = OrderedDict()


def _store() -> Store:
    url = settings.database_url
    if url not in _stores:
        _stores[url] = Store(url)
    return _stores[url]


def _set_torch_threads() -> None:
    """Apply CDAE_TORCH_THREADS to this process before torch work."""
    if settings.torch_threads:
        import torch

        torch.set_num_threads(settings.torch_threads)


def load_scan_model(path: Path):
    """The ScanModel of a registered checkpoint, loaded once per process and kept (the
    CDAE_MODEL_CACHE most recently used)."""
    key = str(Path(path).resolve())
    if key in _models:
        _models.move_to_end(key)
        return _models[key]
    from pipelines.scans import ScanModel

    _set_torch_threads()
    t0 = time.perf_counter()
    model = ScanModel.load(key, device=settings.device, num_steps=settings.ddim_steps,
                           limits=settings.scan_limits, out_of_range=settings.out_of_range)
    log.info("loaded %s on %s in %.1f s", key, model.device, time.perf_counter() - t0)
    _models[key] = model
    while len(_models) > settings.model_cache:
        _models.popitem(last=False)
    return model


class LeaseLost(Exception):
    """This worker no longer holds the job: raised into the running work to stop it."""


class _Lease:
    """Renews the job's lease in the database every heartbeat_s and records progress (throttled);
    once the lease is lost, :meth:`report` and :meth:`check` raise :class:`LeaseLost`."""

    def __init__(self, store: Store, job_id: str, worker: str, every_s: float, task=None):
        self.store, self.job_id, self.worker, self.every_s, self.task = store, job_id, worker, every_s, task
        self.progress: float | None = None
        self.lost = False
        self._last_write = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name=f"lease-{job_id}", daemon=True)

    def __enter__(self) -> "_Lease":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def _beat(self) -> None:
        try:
            if not self.store.heartbeat(self.job_id, self.worker, self.progress):
                self.lost = True
        except Exception:  # a database hiccup must not kill the job; the next beat retries
            log.exception("heartbeat for job %s failed", self.job_id)

    def _loop(self) -> None:
        while not self._stop.wait(self.every_s):
            self._beat()

    def check(self) -> None:
        if self.lost:
            raise LeaseLost(f"job {self.job_id} is no longer held by {self.worker}")

    def report(self, fraction: float) -> None:
        """The work's progress callback: records the fraction done; raises LeaseLost once the lease is gone."""
        self.check()
        self.progress = float(fraction)
        now = time.monotonic()
        if now - self._last_write >= min(1.0, self.every_s) or fraction >= 1.0:
            self._last_write = now
            self._beat()
            if self.task is not None and self.task.request.id:
                try:
                    self.task.update_state(state="PROGRESS", meta={"job": self.job_id, "progress": self.progress})
                except Exception:
                    log.debug("could not store task progress", exc_info=True)
            self.check()


def _install(tmp: Path, final: Path) -> None:
    """Rename a finished output folder into place; if another attempt got there first, keep theirs."""
    try:
        os.rename(tmp, final)
    except OSError:
        if not final.is_dir():
            raise
        shutil.rmtree(tmp, ignore_errors=True)


def _tmp_out(job: JobView) -> Path:
    """Where this attempt writes its outputs before renaming them into ``out``."""
    return settings.job_dir(job.id) / f".out-{job.attempts}-{os.getpid()}"


def _counterfactual(job: JobView, lease: _Lease) -> tuple[list[str], dict[str, Any]]:
    from pipelines.registry import resolve

    job_dir = settings.job_dir(job.id)
    out = job_dir / "out"
    if not (out / "report.json").is_file():
        registered = resolve(job.model_ref, home=settings.home)  # the exact NAME:vN recorded at submission
        model = load_scan_model(registered.path)
        tmp = _tmp_out(job)
        shutil.rmtree(tmp, ignore_errors=True)
        report = model.run(job_dir / job.params["input"], do=job.params["interventions"], out_dir=tmp,
                           covariates=job.params.get("covariates") or None, progress=lease.report)
        # The client gets the registered name, not where this server keeps the checkpoint.
        report.setdefault("model", {})["checkpoint"] = registered.ref
        (tmp / "report.json").write_text(json.dumps(report, indent=2) + "\n")
        lease.check()
        _install(tmp, out)
    report = json.loads((out / "report.json").read_text())
    return [f for f in COUNTERFACTUAL_FILES if (out / f).is_file()], {"report": report}


def _train(job: JobView, lease: _Lease) -> tuple[list[str], dict[str, Any]]:
    from pipelines.registry import register
    from pipelines.train import train
    from pipelines.train_config import TrainConfig

    p = job.params
    job_dir = settings.job_dir(job.id)
    run_dir = job_dir / "run"
    resume = (run_dir / "training.pt").is_file()  # a rerun after a crash continues the saved run
    data = str(job_dir / p["data"]) if p.get("data") else None
    cfg = TrainConfig.from_parameters(p, out=str(run_dir), device=settings.device, data=data)
    _set_torch_threads()
    # The optimisation's share done; evaluation after it is the last 10 %.
    path = train(cfg, progress=False, resume=resume, on_progress=lambda f: lease.report(0.9 * f))
    lease.check()  # a job this worker no longer holds registers nothing
    registered = register(path, name=p.get("name") or None, home=settings.home, source=job.id)
    out = job_dir / "out"
    tmp = _tmp_out(job)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for f in TRAIN_FILES:
        if (path / f).is_file():
            shutil.copy2(path / f, tmp / f)
    _install(tmp, out)
    metrics = json.loads((path / "metrics.json").read_text()) if (path / "metrics.json").is_file() else {}
    return [f for f in TRAIN_FILES if (out / f).is_file()], {"model": registered.ref, "promoted": registered.promoted,
                                                             "metrics": metrics}


def _user_error_types() -> tuple[type, ...]:
    from cdae_med.checkpoint import CheckpointError

    return (ValueError, CheckpointError, FileNotFoundError)  # ScanError, GraphError, RegistryError are ValueErrors


def _abandon(store: Store, job: JobView) -> None:
    """After the lease is lost: remove this attempt's unfinished outputs, and the whole job folder
    if its owner deleted the job (the API removed it, and this attempt may have written since)."""
    shutil.rmtree(_tmp_out(job), ignore_errors=True)
    current = store.get_job(job.id)
    if current is None or current.status == DELETED:
        shutil.rmtree(settings.job_dir(job.id), ignore_errors=True)


def run_job(job_id: str, work: Callable[[JobView, _Lease], tuple[list[str], dict[str, Any]]], task=None) -> dict:
    """Claim the job, run ``work`` under a lease, record the outcome; a lost lease stops the work."""
    store = _store()
    me = worker_id()
    job = store.claim(job_id, me, settings.stale_s, settings.max_attempts)
    if job is None:
        current = store.get_job(job_id)
        # Redelivered because the pool process running it was killed: its lease names a dead pid on
        # this host, so it can be taken over now instead of after stale_s.
        if (current is not None and current.status == "running" and current.attempts < settings.max_attempts
                and _local_dead(current) and store.release(current)):
            job = store.claim(job_id, me, settings.stale_s, settings.max_attempts)
    if job is None:
        current = store.get_job(job_id)
        state = "missing" if current is None else current.status
        log.info("job %s not claimed (%s%s)", job_id, state,
                 f", held by {current.worker}" if current is not None and current.status == "running" else "")
        return {"job": job_id, "skipped": state}
    log.info("job %s (%s) claimed by %s, attempt %d", job.id, job.kind, me, job.attempts)
    t0 = time.perf_counter()
    with _Lease(store, job.id, me, settings.heartbeat_s, task) as lease:
        try:
            files, result = work(job, lease)
        except LeaseLost:
            _abandon(store, job)
            log.warning("job %s: lease lost (deleted, or given to another worker); stopped", job.id)
            return {"job": job.id, "skipped": "lease lost"}
        except _user_error_types() as err:
            if not store.finish(job.id, me, FAILED, error=str(err)):
                _abandon(store, job)
            log.info("job %s failed: %s", job.id, err)
            return {"job": job.id, "status": FAILED, "error": str(err)}
        except Exception as err:  # anything else is a bug or the machine; say so, keep the trace in the log
            log.error("job %s: internal error\n%s", job.id, traceback.format_exc())
            if not store.finish(job.id, me, FAILED, error=f"internal error: {type(err).__name__}: {err}"):
                _abandon(store, job)
            return {"job": job.id, "status": FAILED, "error": f"internal error: {type(err).__name__}"}
    result["seconds"] = round(time.perf_counter() - t0, 3)
    if not store.finish(job.id, me, SUCCEEDED, files=files, result=result):
        _abandon(store, job)
        log.warning("job %s: finished, but its lease had passed to another worker or it was deleted", job.id)
        return {"job": job.id, "skipped": "lease lost"}
    log.info("job %s succeeded in %.1f s", job.id, result["seconds"])
    return {"job": job.id, "status": SUCCEEDED}


@app.task(name=TASKS["counterfactual"], bind=True)
def counterfactual_task(self, job_id: str) -> dict:
    return run_job(job_id, _counterfactual, self)


@app.task(name=TASKS["train"], bind=True)
def train_task(self, job_id: str) -> dict:
    return run_job(job_id, _train, self)


# -- the worker process: its record for readiness, its pool processes ---------------------------
class _Presence:
    """Records this worker (its main process) in the database every heartbeat_s while it is up,
    and removes the record when it stops; a killed worker's record goes stale."""

    def __init__(self, name: str, queues: str):
        self.id, self.name, self.queues = worker_id(), name, queues
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="cdae-presence", daemon=True)

    def _beat(self) -> None:
        try:
            _store().worker_seen(self.id, self.name, self.queues)
        except Exception:  # the database is down: readiness says so until the next beat
            log.exception("could not record this worker in the database")

    def _loop(self) -> None:
        self._beat()
        while not self._stop.wait(settings.heartbeat_s):
            self._beat()

    def start(self) -> "_Presence":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        try:
            _store().worker_gone(self.id)
        except Exception:
            log.exception("could not remove this worker's record")


_presence: _Presence | None = None


@signals.worker_ready.connect
def _worker_ready(sender=None, **_) -> None:
    global _presence
    try:
        queues = ",".join(sorted(sender.app.amqp.queues.consume_from))
    except AttributeError:
        queues = ""
    _presence = _Presence(getattr(sender, "hostname", None) or worker_id(), queues).start()


@signals.worker_shutdown.connect
def _worker_shutdown(**_) -> None:
    if _presence is not None:
        _presence.stop()


@signals.worker_process_init.connect
def _pool_process_init(**_) -> None:
    """A pool process: it ends when the worker's main process does (no orphan keeps running a
    job), and it opens its own database connections (none shared across the fork)."""
    from .db import _engines

    die_with_parent(signal.SIGKILL)
    for engine in _engines.values():
        engine.dispose(close=False)

