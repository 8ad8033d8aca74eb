"""The sweep: re-queue accepted jobs whose work was lost, so that every accepted job ends
succeeded or failed with a reason.

- A *running* job whose worker has stopped renewing its lease for ``stale_s`` (the machine
  died, the worker was killed -9), or whose worker was a process on this host that no longer
  exists, goes back to *queued* and its message is sent again; after ``max_attempts`` lost
  workers it fails with that reason instead.
- A *queued* job whose message the broker no longer holds (Redis restarted without its data,
  flushed, or the message sat with a worker that died before claiming it) is sent again once
  it has waited ``stale_s``. With a Redis broker the queues are read to tell; with another
  broker the message is simply sent again (a duplicate is harmless: the task's claim skips it).

- The files of a deleted job, and of a job that ended more than ``retention_days`` ago (its
  stored input, outputs and training run), are deleted; the job's record stays, with no files.
- Records of workers silent for a day are dropped (a killed worker leaves its own).

Several API processes may sweep at once: each change is a conditional UPDATE, so one wins.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import socket
import threading
import time
from typing import Any

from .config import Settings
from .db import FAILED, JobView, Store
from .queue import QUEUES

log = logging.getLogger("cdae_med.service")

__all__ = ["sweep", "purge", "broker_held_ids", "process_gone", "Sweeper"]

_PRIORITY_SEP = "\x06\x16"  # kombu's Redis transport: queue name + sep + priority for priorities > 0


def _redis_client(url: str):
    import redis

    if url.startswith("redis+socket://"):
        return redis.Redis(unix_socket_path=url[len("redis+socket://"):], socket_timeout=5)
    if url.startswith(("redis://", "rediss://")):
        return redis.Redis.from_url(url, socket_timeout=5)
    return None


def broker_held_ids(settings: Settings, queues: tuple[str, ...] = QUEUES) -> set[str] | None:
    """Task ids waiting in the broker's queues, or None if the broker cannot be read."""
    try:
        client = _redis_client(settings.broker_url)
    except Exception:
        return None
    if client is None:
        return None
    held: set[str] = set()
    try:
        prefix = settings.broker_prefix
        for q in queues:
            for key in [q] + [f"{q}{_PRIORITY_SEP}{p}" for p in range(1, 10)]:
                for raw in client.lrange(prefix + key, 0, -1):
                    try:
                        held.add(json.loads(raw)["headers"]["id"])
                    except (ValueError, KeyError, TypeError):
                        continue
        return held
    except Exception as err:
        log.warning("sweep: cannot read the broker's queues (%s)", err)
        return None
    finally:
        client.close()


def _local_dead(job: JobView) -> bool:
    """The job's worker was a process on this host that has exited."""
    return process_gone(job.worker)


def process_gone(worker: str | None) -> bool:
    """``worker`` (host:pid) names a process on this host that has exited."""
    host, _, pid = (worker or "").rpartition(":")
    if host != socket.gethostname() or not pid.isdigit():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    try:  # a killed process whose parent died too may linger as a zombie nobody reaps
        with open(f"/proc/{int(pid)}/stat") as f:
            return f.read().rpartition(")")[2].split()[0] in ("Z", "X")
    except (OSError, IndexError):
        return False


def purge(store: Store, settings: Settings) -> list[str]:
    """Delete the stored files of deleted jobs and of jobs past retention; returns their ids."""
    cutoff = time.time() - settings.retention_days * 86400 if settings.retention_days > 0 else None
    purged = []
    for job in store.to_purge(cutoff):
        folder = settings.job_dir(job.id)
        shutil.rmtree(folder, ignore_errors=True)
        if not folder.exists():  # else (a file busy on some file systems) the next pass tries again
            store.mark_purged(job.id)
            purged.append(job.id)
    return purged


def sweep(store: Store, settings: Settings, send, held: set[str] | None | str = "read",
          before_send=None) -> dict[str, Any]:
    """One pass. ``send(job)`` publishes a job's message; ``before_send()`` runs once before the
    first (the API re-declares the queues there). Returns what was done."""
    if held == "read":
        held = broker_held_ids(settings)
    prepared = False
    _send = send

    def send(job):
        nonlocal prepared
        if not prepared and before_send is not None:
            before_send()
        prepared = True
        _send(job)
    done: dict[str, Any] = {"requeued_running": [], "requeued_queued": [], "failed": []}
    running = {j.id: j for j in store.lost_running(settings.stale_s)}
    for j in store.running():  # a dead worker process on this host needs no waiting
        if j.id not in running and _local_dead(j):
            running[j.id] = j
    for job in running.values():
        if job.attempts >= settings.max_attempts:
            reason = (f"the worker running this job was lost {job.attempts} times (last: {job.worker}); "
                      "giving up")
            if store.finish(job.id, None, FAILED, error=reason):
                done["failed"].append(job.id)
            continue
        if store.release(job):
            send(store.get_job(job.id))
            done["requeued_running"].append(job.id)
    for job in store.waiting(settings.stale_s):
        if held is not None and job.id in held:
            continue
        if store.touch_queued(job):
            send(job)
            done["requeued_queued"].append(job.id)
    done["purged"] = purge(store, settings)
    store.forget_workers(86400.0)
    if any(done.values()):
        log.warning("sweep: %s", {k: len(v) for k, v in done.items()})
    return done


class Sweeper:
    """Runs :func:`sweep` every ``settings.sweep_s`` seconds in a daemon thread."""

    def __init__(self, store: Store, settings: Settings, send, before_send=None):
        self.store, self.settings, self.send, self.before_send = store, settings, send, before_send
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="cdae-sweep", daemon=True)

    def start(self) -> "Sweeper":
        if self.settings.sweep_s > 0:
            self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=10)

    def _loop(self) -> None:
        while not self._stop.wait(self.settings.sweep_s):
            try:
                sweep(self.store, self.settings, self.send, before_send=self.before_send)
            except Exception:
                log.exception("sweep failed; retrying in %.0f s", self.settings.sweep_s)
