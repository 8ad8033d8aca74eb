"""The service's settings: :class:`Settings`, read from ``CDAE_*`` environment variables.

:func:`get_settings` reads the environment afresh on every call. The variables (the README's
"Settings" section lists the same ones):

"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator

from cdae_med.io import MAX_FOV_MM, MAX_VOLUME_BYTES, MAX_VOXELS, ScanLimits
from pipelines.settings import RuntimeSettings, settings_table

__all__ = ["Settings", "get_settings", "embedded_broker_url"]


def embedded_broker_url(home: Path) -> str:
    """The URL of the embedded Redis (a Unix socket under CDAE_HOME)."""
    return f"redis+socket://{(home / 'redis' / 'redis.sock').resolve()}"


class Settings(RuntimeSettings):
    """The runtime settings plus the API's, the queue's and the workers'."""

    broker_url: str = Field("", description="Celery broker and result backend, e.g. redis://host:6379/0; unset: the "
                                            "embedded Redis that `cdae-med serve` starts under CDAE_HOME.")
    broker_prefix: str = Field("", description="A prefix for every Redis key (several deployments on one Redis).")
    database_url: str = Field("", description="SQLAlchemy URL of the job database [sqlite:///CDAE_HOME/service.db].")
    max_upload_mb: float = Field(512.0, gt=0, description="Largest accepted request body, in MiB.")
    max_voxels: int = Field(MAX_VOXELS, ge=1, description="Largest accepted volume, in voxels.")
    max_volume_mb: float = Field(MAX_VOLUME_BYTES / 2**20, gt=0, description="Largest accepted volume's data, in MiB: voxels x bytes "
                                                          "per voxel as its header says, checked before any voxel "
                                                          "is read or inflated (a 1 mm 256^3 head is 64 MiB as "
                                                          "float32).")
    max_fov_mm: float = Field(MAX_FOV_MM, gt=0, description="Largest accepted field of view along any axis of a "
                                                       "volume, in mm (voxels x spacing; a head is about 256): "
                                                       "what bounds resampling it to a model's grid.")
    auth_failures_per_min: int = Field(20, ge=0, description="Wrong API keys a client address may send in a "
                                                             "minute; past that its /v1 requests are a 429 with "
                                                             "Retry-After (0 = no limit).")
    stale_s: float = Field(120.0, ge=0, description="A running job whose worker has not reported for this long, or "
                                                    "a queued job the broker no longer holds for this long, is "
                                                    "re-queued (seconds).")
    heartbeat_s: float = Field(10.0, gt=0, description="How often a worker reports on a running job, and that it "
                                                       "is up (seconds; /readyz counts a worker seen within three).")
    sweep_s: float = Field(30.0, ge=0, description="How often the API process sweeps for lost jobs (seconds; "
                                                   "0 = never).")
    max_attempts: int = Field(3, ge=1, description="A job whose worker was lost this many times fails with that "
                                                   "reason.")
    ddim_steps: int = Field(50, ge=1, le=1000, description="DDIM steps of a counterfactual (fewer: faster, "
                                                           "coarser).")
    model_cache: int = Field(2, ge=1, description="Models a worker process keeps loaded (least recently used "
                                                  "go first).")
    out_of_range: Literal["flag", "refuse"] = Field(
        "flag", description="An intervention outside the values the model was trained on: flag it in the "
                            "report (the model extrapolates) or refuse the job.")
    retention_days: float = Field(30.0, ge=0, description="A finished job's stored input and outputs are deleted "
                                                          "by the sweep this many days after it ended; its record "
                                                          "stays (0 = keep them).")

    @model_validator(mode="after")
    def _derived(self) -> "Settings":
        # Unset broker and database: the embedded Redis and an SQLite file, both under home.
        if not self.broker_url:
            object.__setattr__(self, "broker_url", embedded_broker_url(self.home))
        if not self.database_url:
            object.__setattr__(self, "database_url", f"sqlite:///{self.home / 'service.db'}")
        return self

    @property
    def broker_embedded(self) -> bool:
        """No CDAE_BROKER_URL: the broker is the embedded Redis under home."""
        return self.broker_url == embedded_broker_url(self.home)

    @property
    def max_upload_bytes(self) -> int:
        return int(self.max_upload_mb * 1024 * 1024)

    @property
    def scan_limits(self) -> ScanLimits:
        """The largest scan the API accepts and a worker reads (cdae_med.io checks them on the header)."""
        return ScanLimits(max_voxels=self.max_voxels, max_bytes=int(self.max_volume_mb * 1024 * 1024),
                          max_fov_mm=self.max_fov_mm)

    @property
    def jobs_dir(self) -> Path:
        return self.home / "jobs"

    def job_dir(self, job_id: str) -> Path:
        return self.jobs_dir / job_id


def get_settings() -> Settings:
    """The settings as the environment holds them now."""
    return Settings()


__doc__ += settings_table(Settings) + "\n"
