"""Service settings, read from the environment each time they are asked for.

    CDAE_HOME              data directory (models, jobs, database, embedded Redis) [~/.cdae-med]
    CDAE_BROKER_URL        Celery broker and result backend, e.g. redis://host:6379/0. Unset: the
                           embedded Redis that `cdae-med serve` starts under CDAE_HOME
    CDAE_BROKER_PREFIX     a prefix for every Redis key (several deployments on one Redis) [none]
    CDAE_DATABASE_URL      SQLAlchemy URL of the job database [sqlite:///CDAE_HOME/service.db]
    CDAE_MAX_UPLOAD_MB     largest accepted request body in MiB [512]
    CDAE_MAX_VOXELS        largest accepted volume in voxels [512**3]
    CDAE_STALE_S           a running job whose worker has not reported for this long, or a queued job
                           the broker no longer holds for this long, is re-queued [120]
    CDAE_HEARTBEAT_S       how often a worker reports on a running job [10]
    CDAE_SWEEP_S           how often the API process sweeps for lost jobs (0 = never) [30]
    CDAE_MAX_ATTEMPTS      a job whose worker was lost this many times fails with that reason [3]
    CDAE_DDIM_STEPS        DDIM steps of a counterfactual (fewer: faster, coarser) [50]
    CDAE_DEVICE            the workers' device: auto, cpu or cuda [auto]
    CDAE_TORCH_THREADS     torch threads per worker process on a CPU [torch's default]; 1 is far
                           faster on a small machine shared with other work (measured 25x at 16^3)
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from pipelines.registry import default_home

__all__ = ["Settings", "get_settings", "embedded_broker_url"]


def _float(name: str, default: float) -> float:
    raw = os.environ.get(name)
    if raw in (None, ""):
        return default
    try:
        return float(raw)
    except ValueError:
        raise ValueError(f"{name}={raw!r} is not a number") from None


def embedded_broker_url(home: Path) -> str:
    """The URL of the embedded Redis (a Unix socket under CDAE_HOME)."""
    return f"redis+socket://{(home / 'redis' / 'redis.sock').resolve()}"


@dataclass(frozen=True)
class Settings:
    home: Path
    broker_url: str
    broker_embedded: bool  # no CDAE_BROKER_URL: the embedded Redis under home
    broker_prefix: str
    database_url: str
    max_upload_bytes: int
    max_voxels: int
    stale_s: float
    heartbeat_s: float
    sweep_s: float
    max_attempts: int
    ddim_steps: int

    @property
    def jobs_dir(self) -> Path:
        return self.home / "jobs"

    def job_dir(self, job_id: str) -> Path:
        return self.jobs_dir / job_id


def get_settings() -> Settings:
    home = default_home()
    broker = os.environ.get("CDAE_BROKER_URL") or ""
    db = os.environ.get("CDAE_DATABASE_URL") or f"sqlite:///{home / 'service.db'}"
    return Settings(
        home=home,
        broker_url=broker or embedded_broker_url(home),
        broker_embedded=not broker,
        broker_prefix=os.environ.get("CDAE_BROKER_PREFIX", ""),
        database_url=db,
        max_upload_bytes=int(_float("CDAE_MAX_UPLOAD_MB", 512) * 1024 * 1024),
        max_voxels=int(_float("CDAE_MAX_VOXELS", 512**3)),
        stale_s=_float("CDAE_STALE_S", 120.0),
        heartbeat_s=_float("CDAE_HEARTBEAT_S", 10.0),
        sweep_s=_float("CDAE_SWEEP_S", 30.0),
        max_attempts=int(_float("CDAE_MAX_ATTEMPTS", 3)),
        ddim_steps=int(_float("CDAE_DDIM_STEPS", 50)),
    )
