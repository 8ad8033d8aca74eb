"""The service's tables (SQLAlchemy 2 declarative models) and detached views of their rows.

A job's status is one of :data:`STATUSES`, or :data:`DELETED` once its owner deleted it (a
tombstone no client sees). A key's role is one of :data:`ROLES`, each allowed what the ones
before it are. :mod:`service.db` holds the access to them.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

from sqlalchemy import JSON, Float, ForeignKey, Integer, String, Text
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

__all__ = ["Base", "ApiKey", "Job", "WorkerRecord", "JobView", "KeyView", "hash_key", "check_role", "QUEUED",
           "RUNNING", "SUCCEEDED", "FAILED", "DELETED", "STATUSES", "CLINICIAN", "ADMIN", "ROLES", "KEY_PREFIX"]

QUEUED, RUNNING, SUCCEEDED, FAILED, DELETED = "queued", "running", "succeeded", "failed", "deleted"
STATUSES = (QUEUED, RUNNING, SUCCEEDED, FAILED)  # what a client can see; DELETED is never shown
CLINICIAN, ADMIN = "clinician", "admin"
ROLES = (CLINICIAN, ADMIN)  # each includes what the one before may do
KEY_PREFIX = "cdae_"


class Base(DeclarativeBase):
    pass


class ApiKey(Base):
    __tablename__ = "api_keys"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    name: Mapped[str] = mapped_column(String(128))
    key_hash: Mapped[str] = mapped_column(String(64), unique=True, index=True)  # sha256 of the key
    prefix: Mapped[str] = mapped_column(String(16))  # the key's first characters, to tell keys apart
    created_at: Mapped[float] = mapped_column(Float)
    revoked_at: Mapped[float | None] = mapped_column(Float, nullable=True)
    role: Mapped[str] = mapped_column(String(16), default=CLINICIAN, server_default=CLINICIAN)


class Job(Base):
    __tablename__ = "jobs"
    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    kind: Mapped[str] = mapped_column(String(32))  # counterfactual | train
    status: Mapped[str] = mapped_column(String(16), index=True)
    progress: Mapped[float] = mapped_column(Float, default=0.0)
    error: Mapped[str | None] = mapped_column(Text, nullable=True)
    key_id: Mapped[int] = mapped_column(ForeignKey("api_keys.id"), index=True)
    model_ref: Mapped[str | None] = mapped_column(String(128), nullable=True)  # NAME:vN, resolved at submit
    params: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    files: Mapped[list[str]] = mapped_column(JSON, default=list)
    result: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    created_at: Mapped[float] = mapped_column(Float)
    queued_at: Mapped[float] = mapped_column(Float)  # last time a message was published for it
    published: Mapped[int] = mapped_column(Integer, default=0)  # messages published for it
    started_at: Mapped[float | None] = mapped_column(Float, nullable=True)
    finished_at: Mapped[float | None] = mapped_column(Float, nullable=True)
    heartbeat_at: Mapped[float | None] = mapped_column(Float, nullable=True)
    attempts: Mapped[int] = mapped_column(Integer, default=0)  # claims by a worker
    worker: Mapped[str | None] = mapped_column(String(255), nullable=True)
    purged_at: Mapped[float | None] = mapped_column(Float, nullable=True)  # its files deleted (retention, DELETE)


class WorkerRecord(Base):
    """A worker process that is up: written when it is ready, renewed every heartbeat_s."""
    __tablename__ = "workers"
    id: Mapped[str] = mapped_column(String(255), primary_key=True)  # host:pid of the worker's main process
    name: Mapped[str] = mapped_column(String(255))  # Celery node name
    queues: Mapped[str] = mapped_column(String(255))  # comma-separated
    started_at: Mapped[float] = mapped_column(Float)
    seen_at: Mapped[float] = mapped_column(Float, index=True)


def check_role(role: str) -> None:
    if role not in ROLES:
        raise ValueError(f"role {role!r} is not one of {', '.join(ROLES)}")


def hash_key(plain: str) -> str:
    # API keys are 256-bit random strings, so one SHA-256 is enough (no password stretching needed).
    return hashlib.sha256(plain.encode()).hexdigest()


@dataclass(frozen=True)
class JobView:
    """A detached copy of a job row."""
    id: str
    kind: str
    status: str
    progress: float
    error: str | None
    key_id: int
    model_ref: str | None
    params: dict[str, Any]
    files: list[str]
    result: dict[str, Any] | None
    created_at: float
    queued_at: float
    published: int
    started_at: float | None
    finished_at: float | None
    heartbeat_at: float | None
    attempts: int
    worker: str | None
    purged_at: float | None = None

    @classmethod
    def of(cls, job: Job) -> "JobView":
        return cls(**{f: getattr(job, f) for f in cls.__dataclass_fields__})


@dataclass(frozen=True)
class KeyView:
    """What a request's key may do: its id, name and role."""
    id: int
    name: str
    role: str

    def has_role(self, role: str) -> bool:
        return ROLES.index(self.role) >= ROLES.index(role)
