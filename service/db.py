"""Job records and API keys in a SQL database (SQLAlchemy 2): SQLite by default, PostgreSQL by URL.

The database, not the broker, is the record of what was accepted. A job moves
queued -> running -> succeeded | failed, or to deleted (by its owner; the row stays as a
tombstone without parameters or results). A worker *claims* a job with one conditional UPDATE
(queued, or running under a lease that has gone stale), so two deliveries of the same task
never both run it; while it runs, the worker renews its lease (``heartbeat_at``); it can
finish the job only while it still holds that lease. Times are Unix seconds (floats) so that
SQLite and PostgreSQL behave the same.

A key has a role, ``clinician`` (submit and read its own jobs) or ``admin`` (also training
jobs and promoting models). Workers report in the ``workers`` table (readiness). A database
made by an earlier version gets the columns added since (:func:`add_missing_columns`); its
keys become clinicians. An SQLite file is created readable by its owner only.
"""

from __future__ import annotations

import hmac
import os
import secrets
import threading
import time
import uuid
from pathlib import Path
from typing import Any, Iterable

from sqlalchemy import create_engine, delete, event, func, inspect, select, text, update
from sqlalchemy.engine import Engine
from sqlalchemy.exc import DBAPIError, OperationalError, ProgrammingError
from sqlalchemy.orm import sessionmaker
from sqlalchemy.schema import CreateColumn

from .tables import (ADMIN, CLINICIAN, DELETED, FAILED, KEY_PREFIX, QUEUED, ROLES, RUNNING, STATUSES, SUCCEEDED,
                     ApiKey, Base, Job, JobView, KeyView, WorkerRecord, check_role, hash_key)

__all__ = ["Base", "ApiKey", "Job", "WorkerRecord", "Store", "JobView", "KeyView", "hash_key",
           "add_missing_columns", "QUEUED", "RUNNING", "SUCCEEDED", "FAILED", "DELETED", "STATUSES", "CLINICIAN",
           "ADMIN", "ROLES"]

_engines: dict[str, Engine] = {}
_engines_lock = threading.Lock()


def _make_engine(url: str) -> Engine:
    if url.startswith("sqlite"):
        from sqlalchemy.engine import make_url

        database = make_url(url).database
        if database and database != ":memory:":
            _private_file(Path(database).expanduser())
        engine = create_engine(url, connect_args={"timeout": 30, "check_same_thread": False})

        @event.listens_for(engine, "connect")
        def _pragmas(conn, _record):  # several processes write: WAL and a busy timeout
            cur = conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA busy_timeout=30000")
            cur.close()

        return engine
    return create_engine(url, pool_pre_ping=True, pool_size=5, max_overflow=10)


def _private_file(path: Path) -> None:
    """Create the SQLite file (and its folder) for its owner only before SQLite opens it: SQLite
    gives its -wal and -shm files the database file's mode. An existing file is made private too."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    os.close(os.open(path, os.O_CREAT | os.O_WRONLY, 0o600))  # an empty file is an empty database
    for p in (path, path.with_name(path.name + "-wal"), path.with_name(path.name + "-shm")):
        if p.exists():
            os.chmod(p, 0o600)


def add_missing_columns(engine: Engine) -> list[str]:
    """Add the columns declared here that an existing table lacks (``create_all`` adds only
    missing tables), with their server defaults; returns ``table.column`` of each added. Two
    processes may race: a column the other one added is not an error."""
    added = []
    for table in Base.metadata.sorted_tables:
        insp = inspect(engine)
        if not insp.has_table(table.name):
            continue
        have = {c["name"] for c in insp.get_columns(table.name)}
        for column in table.columns:
            if column.name in have:
                continue
            ddl = f"ALTER TABLE {table.name} ADD COLUMN {CreateColumn(column).compile(dialect=engine.dialect)}"
            try:
                with engine.begin() as conn:
                    conn.execute(text(ddl))
                added.append(f"{table.name}.{column.name}")
            except (OperationalError, ProgrammingError):
                if column.name not in {c["name"] for c in inspect(engine).get_columns(table.name)}:
                    raise
    return added


def _create_schema(engine: Engine, tries: int = 3) -> None:
    """The tables and the columns added since; another process doing the same at the same moment
    makes one attempt fail ("already exists"), so it is tried again (each step checks first)."""
    for attempt in range(tries):
        try:
            Base.metadata.create_all(engine)
            add_missing_columns(engine)
            return
        except DBAPIError:
            if attempt == tries - 1:
                raise
            time.sleep(0.2 * (attempt + 1))


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
            _create_schema(engine)

    # -- health --------------------------------------------------------------------------
    def ping(self) -> None:
        with self.engine.connect() as conn:
            conn.execute(text("SELECT 1"))

    # -- API keys ------------------------------------------------------------------------
    def create_key(self, name: str, role: str = CLINICIAN) -> tuple[str, int]:
        """A new key; the plain key is returned once and only its hash is stored."""
        if not name or len(name) > 128:
            raise ValueError("a key needs a name of 1-128 characters")
        check_role(role)
        plain = KEY_PREFIX + secrets.token_urlsafe(32)
        with self.session.begin() as s:
            row = ApiKey(name=name, key_hash=hash_key(plain), prefix=plain[:12], created_at=time.time(), role=role)
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

    def key(self, key_id: int) -> KeyView | None:
        """The key's name and role, or None for an unknown or revoked key."""
        with self.session() as s:
            row = s.get(ApiKey, key_id)
            if row is None or row.revoked_at is not None:
                return None
            return KeyView(row.id, row.name, row.role or CLINICIAN)

    def set_role(self, key_id: int, role: str) -> bool:
        check_role(role)
        with self.session.begin() as s:
            return s.execute(update(ApiKey).where(ApiKey.id == key_id).values(role=role)).rowcount == 1

    def list_keys(self) -> list[dict[str, Any]]:
        with self.session() as s:
            return [{"id": k.id, "name": k.name, "prefix": k.prefix, "created_at": k.created_at,
                     "revoked": k.revoked_at is not None, "role": k.role or CLINICIAN}
                    for k in s.scalars(select(ApiKey).order_by(ApiKey.id))]

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
        """The job, or None if it does not exist or (with key_id) belongs to another key or was deleted."""
        with self.session() as s:
            job = s.get(Job, job_id)
            if job is None or (key_id is not None and (job.key_id != key_id or job.status == DELETED)):
                return None
            return JobView.of(job)

    def list_jobs(self, key_id: int, limit: int = 100) -> list[JobView]:
        with self.session() as s:
            rows = s.scalars(select(Job).where(Job.key_id == key_id, Job.status != DELETED)
                             .order_by(Job.created_at.desc()).limit(limit))
            return [JobView.of(j) for j in rows]

    def delete_job(self, job_id: str, key_id: int) -> JobView | None:
        """The key's job becomes a tombstone (no parameters, results or files); a worker running it
        loses its lease. Returns the job as it was, or None if the key has no such job."""
        with self.session.begin() as s:
            job = s.get(Job, job_id, with_for_update=True)
            if job is None or job.key_id != key_id or job.status == DELETED:
                return None
            before = JobView.of(job)
            job.status, job.finished_at, job.params, job.result, job.files = DELETED, time.time(), {}, None, []
            return before

    def to_purge(self, finished_before: float | None) -> list[JobView]:
        """Jobs whose files are still stored but should not be: deleted ones, and (with a time)
        those that ended before it."""
        cond = Job.status == DELETED
        if finished_before is not None:
            cond = cond | (Job.status.in_((SUCCEEDED, FAILED)) & (Job.finished_at < finished_before))
        with self.session() as s:
            return [JobView.of(j) for j in s.scalars(select(Job).where(Job.purged_at.is_(None), cond))]

    def mark_purged(self, job_id: str) -> None:
        with self.session.begin() as s:
            s.execute(update(Job).where(Job.id == job_id).values(purged_at=time.time(), files=[])
                      .execution_options(synchronize_session=False))

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

    # -- workers -------------------------------------------------------------------------
    def worker_seen(self, worker_id: str, name: str, queues: str) -> None:
        """Record that this worker is up (insert or renew)."""
        now = time.time()
        with self.session.begin() as s:
            r = s.execute(update(WorkerRecord).where(WorkerRecord.id == worker_id)
                          .values(seen_at=now, name=name, queues=queues).execution_options(synchronize_session=False))
            if r.rowcount == 0:
                s.add(WorkerRecord(id=worker_id, name=name, queues=queues, started_at=now, seen_at=now))

    def worker_gone(self, worker_id: str) -> None:
        with self.session.begin() as s:
            s.execute(delete(WorkerRecord).where(WorkerRecord.id == worker_id))

    def workers(self, seen_within_s: float) -> list[dict[str, Any]]:
        """Workers that reported in the last ``seen_within_s`` seconds."""
        with self.session() as s:
            rows = s.scalars(select(WorkerRecord).where(WorkerRecord.seen_at >= time.time() - seen_within_s)
                             .order_by(WorkerRecord.id))
            return [{"id": w.id, "name": w.name, "queues": w.queues.split(","), "started_at": w.started_at,
                     "seen_at": w.seen_at} for w in rows]

    def forget_workers(self, not_seen_for_s: float) -> int:
        """Drop the records of workers silent this long (killed ones leave theirs)."""
        with self.session.begin() as s:
            return s.execute(delete(WorkerRecord).where(WorkerRecord.seen_at < time.time() - not_seen_for_s)).rowcount

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
