"""Job records and API keys in a SQL database (SQLAlchemy 2): SQLite by default, PostgreSQL by URL.

The database, not the broker, is the record of what was accepted. A job moves
queued -> running -> succeeded | failed. A worker *claims* a job with one conditional UPDATE
(queued, or running under a lease that has gone stale), so two deliveries of the same task
never both run it; while it runs, the worker renews its lease (``heartbeat_at``); it can
finish the job only while it still holds that lease. Times are Unix seconds (floats) so that
SQLite and PostgreSQL behave the same.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

from sqlalchemy import (JSON, Float, ForeignKey, Integer, String, Text, create_engine, event, func, select,
                        text, update)
from sqlalchemy.engine import Engine
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, sessionmaker

__all__ = ["Base", "ApiKey", "Job", "Store", "hash_key", "QUEUED", "RUNNING", "SUCCEEDED", "FAILED", "STATUSES"]

QUEUED, RUNNING, SUCCEEDED, FAILED = "queued", "running", "succeeded", "failed"
STATUSES = (QUEUED, RUNNING, SUCCEEDED, FAILED)
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

    @classmethod
    def of(cls, job: Job) -> "JobView":
        return cls(**{f: getattr(job, f) for f in cls.__dataclass_fields__})


_engines: dict[str, Engine] = {}
_engines_lock = threading.Lock()


def _make_engine(url: str) -> Engine:
    if url.startswith("sqlite"):
        from sqlalchemy.engine import make_url

        database = make_url(url).database
        if database and database != ":memory:":
            Path(database).expanduser().parent.mkdir(parents=True, exist_ok=True)  # a fresh CDAE_HOME
        engine = create_engine(url, connect_args={"timeout": 30, "check_same_thread": False})

        @event.listens_for(engine, "connect")
        def _pragmas(conn, _record):  # several processes write: WAL and a busy timeout
            cur = conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA busy_timeout=30000")
            cur.close()

        return engine
    return create_engine(url, pool_pre_ping=True, pool_size=5, max_overflow=10)


class Store:
    """All database access of the service."""

    def __init__(self, url: str, create: bool = True):
        with _engines_lock:
            engine = _engines.get(url)
            if engine is None:
                engine = _engines[url] = _make_engine(url)
        self.url = url
        self.engine = engine
        self.session = sessionmaker(engine, expire_on_commit=False)
        if create:
            Base.metadata.create_all(engine)

    # -- health --------------------------------------------------------------------------
    def ping(self) -> None:
        with self.engine.connect() as conn:
            conn.execute(text("SELECT 1"))

    # -- API keys ------------------------------------------------------------------------
    def create_key(self, name: str) -> tuple[str, int]:
        """A new key; the plain key is returned once and only its hash is stored."""
        if not name or len(name) > 128:
            raise ValueError("a key needs a name of 1-128 characters")
        plain = KEY_PREFIX + secrets.token_urlsafe(32)
        with self.session.begin() as s:
            row = ApiKey(name=name, key_hash=hash_key(plain), prefix=plain[:12], created_at=time.time())
            s.add(row)
            s.flush()
            return plain, row.id

    def authenticate(self, plain: str | None) -> int | None:
        """The key's id, or None for a missing, unknown or revoked key."""
        if not plain:
            return None
        digest = hash_key(plain)
        with self.session() as s:
            row = s.scalar(select(ApiKey).where(ApiKey.key_hash == digest))
            if row is None or row.revoked_at is not None or not hmac.compare_digest(row.key_hash, digest):
                return None
            return row.id

    def list_keys(self) -> list[dict[str, Any]]:
        with self.session() as s:
            return [{"id": k.id, "name": k.name, "prefix": k.prefix, "created_at": k.created_at,
                     "revoked": k.revoked_at is not None} for k in s.scalars(select(ApiKey).order_by(ApiKey.id))]

    def revoke_key(self, key_id: int) -> bool:
        with self.session.begin() as s:
            r = s.execute(update(ApiKey).where(ApiKey.id == key_id, ApiKey.revoked_at.is_(None))
                          .values(revoked_at=time.time()))
            return r.rowcount == 1

    # -- jobs ----------------------------------------------------------------------------
    def create_job(self, kind: str, key_id: int, params: dict[str, Any], model_ref: str | None = None,
                   job_id: str | None = None) -> JobView:
        now = time.time()
        with self.session.begin() as s:
            job = Job(id=job_id or uuid.uuid4().hex, kind=kind, status=QUEUED, progress=0.0, key_id=key_id,
                      model_ref=model_ref, params=params, files=[], created_at=now, queued_at=now, published=0,
                      attempts=0)
            s.add(job)
            s.flush()
            return JobView.of(job)

    def get_job(self, job_id: str, key_id: int | None = None) -> JobView | None:
        """The job, or None if it does not exist or (with key_id) belongs to another key."""
        with self.session() as s:
            job = s.get(Job, job_id)
            if job is None or (key_id is not None and job.key_id != key_id):
                return None
            return JobView.of(job)

    def list_jobs(self, key_id: int, limit: int = 100) -> list[JobView]:
        with self.session() as s:
            rows = s.scalars(select(Job).where(Job.key_id == key_id).order_by(Job.created_at.desc()).limit(limit))
            return [JobView.of(j) for j in rows]

    def count_by_status(self) -> dict[str, int]:
        with self.session() as s:
            return {st: n for st, n in s.execute(select(Job.status, func.count()).group_by(Job.status))}

    def mark_published(self, job_id: str) -> None:
        with self.session.begin() as s:
            s.execute(update(Job).where(Job.id == job_id)
                      .values(published=Job.published + 1, queued_at=time.time()))

    def claim(self, job_id: str, worker: str, stale_s: float, max_attempts: int) -> JobView | None:
        """Take the job for this worker; None if it is finished, or running under a live lease."""
        now = time.time()
        with self.session.begin() as s:
            r = s.execute(
                update(Job)
                .where(Job.id == job_id, Job.attempts < max_attempts,
                       (Job.status == QUEUED) | ((Job.status == RUNNING) & (Job.heartbeat_at < now - stale_s)))
                .values(status=RUNNING, worker=worker, started_at=now, heartbeat_at=now, attempts=Job.attempts + 1,
                        error=None)
                .execution_options(synchronize_session=False))
            if r.rowcount != 1:
                return None
            return JobView.of(s.get(Job, job_id))

    def heartbeat(self, job_id: str, worker: str, progress: float | None = None) -> bool:
        """Renew the lease (and record progress); False if this worker no longer holds the job."""
        values: dict[str, Any] = {"heartbeat_at": time.time()}
        if progress is not None:
            values["progress"] = float(min(1.0, max(0.0, progress)))
        with self.session.begin() as s:
            r = s.execute(update(Job).where(Job.id == job_id, Job.worker == worker, Job.status == RUNNING)
                          .values(**values).execution_options(synchronize_session=False))
            return r.rowcount == 1

    def finish(self, job_id: str, worker: str | None, status: str, *, error: str | None = None,
               files: Iterable[str] = (), result: dict[str, Any] | None = None) -> bool:
        """Succeed or fail the job; with a worker, only while that worker holds it."""
        assert status in (SUCCEEDED, FAILED)
        cond = [Job.id == job_id, Job.status.in_((QUEUED, RUNNING))]
        if worker is not None:
            cond += [Job.worker == worker, Job.status == RUNNING]
        values: dict[str, Any] = {"status": status, "finished_at": time.time(), "error": error,
                                  "files": list(files), "result": result}
        if status == SUCCEEDED:
            values["progress"] = 1.0
        with self.session.begin() as s:
            r = s.execute(update(Job).where(*cond).values(**values).execution_options(synchronize_session=False))
            return r.rowcount == 1

    # -- the sweep -----------------------------------------------------------------------
    def lost_running(self, stale_s: float) -> list[JobView]:
        cutoff = time.time() - stale_s
        with self.session() as s:
            rows = s.scalars(select(Job).where(Job.status == RUNNING, Job.heartbeat_at < cutoff))
            return [JobView.of(j) for j in rows]

    def running(self) -> list[JobView]:
        with self.session() as s:
            return [JobView.of(j) for j in s.scalars(select(Job).where(Job.status == RUNNING))]

    def waiting(self, older_than_s: float) -> list[JobView]:
        cutoff = time.time() - older_than_s
        with self.session() as s:
            rows = s.scalars(select(Job).where(Job.status == QUEUED, Job.queued_at < cutoff))
            return [JobView.of(j) for j in rows]

    def release(self, job: JobView) -> bool:
        """running (lease gone stale) -> queued again, if nobody changed it meanwhile."""
        with self.session.begin() as s:
            r = s.execute(update(Job).where(Job.id == job.id, Job.status == RUNNING,
                                            Job.heartbeat_at == job.heartbeat_at)
                          .values(status=QUEUED, worker=None, queued_at=time.time())
                          .execution_options(synchronize_session=False))
            return r.rowcount == 1

    def touch_queued(self, job: JobView) -> bool:
        """Take the right to re-publish a waiting job (one sweeper wins)."""
        with self.session.begin() as s:
            r = s.execute(update(Job).where(Job.id == job.id, Job.status == QUEUED, Job.queued_at == job.queued_at)
                          .values(queued_at=time.time()).execution_options(synchronize_session=False))
            return r.rowcount == 1
