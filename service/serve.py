"""``cdae-med serve`` and ``cdae-med worker``.

``serve`` runs the API in this process and, from one supervisor thread, a worker process and,
with no broker configured, the embedded Redis (:mod:`service.redis_server`):

- a worker that exits is started again after a back-off (1 s, doubling up to 60 s; back to 1 s
  once a run lasted 60 s), each exit and restart logged with its status;
- an embedded Redis that stops answering is started again (its append-only file brings the
  queues back);
- every child is started from the supervisor thread with a parent-death signal
  (:func:`service.process.dies_with_me`), so when ``serve`` ends in any way, even kill -9, the
  kernel ends them: the worker with SIGKILL (its pool processes follow it; the next sweep
  re-queues its job), the Redis with SIGTERM (it writes its append-only file);
- on SIGINT/SIGTERM the worker gets SIGTERM (its running task finishes or is re-queued) and 30 s,
  then a Redis that ``serve`` started is stopped; a Redis it found running is left alone.

Every process of the service creates its files for its own user only (:mod:`service.process`).
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import threading
import time

from .config import Settings, get_settings
from .process import dies_with_me, private_files
from .redis_server import EmbeddedRedis, answers, socket_path, start_embedded_redis, stop_embedded_redis

log = logging.getLogger("cdae_med.service")

__all__ = ["start_embedded_redis", "stop_embedded_redis", "worker_command", "serve", "run_worker", "Backoff",
           "Supervisor"]

def worker_command(queues: str = "counterfactual,train", concurrency: int = 1, name: str | None = None,
                   loglevel: str = "INFO") -> list[str]:
    cmd = [sys.executable, "-m", "celery", "-A", "service.worker", "worker", "-Q", queues,
           "-c", str(concurrency), "--loglevel", loglevel, "--without-gossip", "--without-mingle"]
    if name:
        cmd += ["-n", name]
    return cmd


def _require_broker(settings: Settings) -> None:
    if settings.broker_embedded and not answers(socket_path(settings)):
        raise RuntimeError("no CDAE_BROKER_URL is set and no embedded Redis is running under "
                           f"{settings.home}; start `cdae-med serve` first or set CDAE_BROKER_URL=redis://...")


def run_worker(queues: str = "counterfactual,train", concurrency: int = 1, gpu: int | None = None,
               name: str | None = None) -> int:
    """Run a Celery worker in the foreground as a child process; returns its exit status. The
    child gets SIGTERM (a warm shutdown) if this process dies."""
    settings = get_settings()
    _require_broker(settings)
    private_files()
    env = dict(os.environ)
    if gpu is not None:
        env["CUDA_VISIBLE_DEVICES"] = str(gpu)  # one GPU per worker
    proc = subprocess.Popen(worker_command(queues, concurrency, name), env=env,
                            preexec_fn=dies_with_me(signal.SIGTERM))
    try:
        return proc.wait()
    except KeyboardInterrupt:
        proc.send_signal(signal.SIGTERM)
        return proc.wait()


class Backoff:
    """Seconds to wait before restarting a child that exited: ``first``, doubling up to
    ``longest``; back to ``first`` after a run that lasted ``healthy_s``."""

    def __init__(self, first: float = 1.0, longest: float = 60.0, healthy_s: float = 60.0):
        self.first, self.longest, self.healthy_s = first, longest, healthy_s
        self._delay = first

    def after(self, ran_s: float) -> float:
        if ran_s >= self.healthy_s:
            self._delay = self.first
        delay = self._delay
        self._delay = min(self.longest, self._delay * 2)
        return delay


class Supervisor:
    """Starts, watches and stops ``serve``'s children from one thread (see the module's text)."""

    def __init__(self, settings: Settings, worker_cmd: list[str] | None, backoff: Backoff | None = None,
                 grace_s: float = 30.0):
        self.settings, self.worker_cmd, self.grace_s = settings, worker_cmd, grace_s
        self.backoff = backoff or Backoff()
        self.redis: EmbeddedRedis | None = None  # only a Redis this supervisor started
        self.worker: subprocess.Popen | None = None
        self.restarts = 0
        self._worker_started = 0.0
        self._restart_at: float | None = None
        self._stop = threading.Event()
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="cdae-supervisor", daemon=True)

    def start(self) -> "Supervisor":
        """Start the children; raises what stopped them from starting."""
        self._thread.start()
        self._ready.wait()
        if self._error is not None:
            self._thread.join()
            raise self._error
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()

    def _start_worker(self) -> None:
        self.worker = subprocess.Popen(self.worker_cmd, env=dict(os.environ), preexec_fn=dies_with_me(signal.SIGKILL))
        self._worker_started = time.monotonic()
        log.info("worker started (pid %d): %s", self.worker.pid, " ".join(self.worker_cmd[-6:]))

    def _watch_worker(self) -> None:
        now = time.monotonic()
        if self._restart_at is None and self.worker.poll() is not None:
            ran = now - self._worker_started
            delay = self.backoff.after(ran)
            self._restart_at = now + delay
            log.warning("worker (pid %d) exited with status %s after %.0f s; restarting it in %.0f s",
                        self.worker.pid, self.worker.returncode, ran, delay)
        elif self._restart_at is not None and now >= self._restart_at:
            self._restart_at = None
            self.restarts += 1
            self._start_worker()
            log.warning("worker restarted (restart %d)", self.restarts)

    def _watch_redis(self) -> None:
        if answers(socket_path(self.settings)):
            return
        log.warning("embedded Redis is not answering; starting it again")
        try:
            if self.redis is not None:
                self.redis.stop()
            self.redis = start_embedded_redis(self.settings) or self.redis
        except Exception:
            log.exception("could not restart the embedded Redis")

    def _run(self) -> None:
        try:
            if self.settings.broker_embedded:
                self.redis = start_embedded_redis(self.settings)
            if self.worker_cmd:
                self._start_worker()
        except BaseException as err:
            self._error = err
            self._shutdown()
            self._ready.set()
            return
        self._ready.set()
        last_redis_check = time.monotonic()
        while not self._stop.wait(0.5):
            if self.worker_cmd:
                self._watch_worker()
            if self.settings.broker_embedded and time.monotonic() - last_redis_check >= 2.0:
                last_redis_check = time.monotonic()
                self._watch_redis()
        self._shutdown()

    def _shutdown(self) -> None:
        if self.worker is not None and self.worker.poll() is None:
            self.worker.send_signal(signal.SIGTERM)  # warm shutdown: the running task finishes or is re-queued
            try:
                self.worker.wait(timeout=self.grace_s)
            except subprocess.TimeoutExpired:
                self.worker.kill()
                self.worker.wait()
        stop_embedded_redis(self.redis)


def serve(host: str = "127.0.0.1", port: int = 8000, worker: bool = True, queues: str = "counterfactual,train",
          log_level: str = "info") -> None:
    """The API in this process; a supervised worker subprocess; the embedded Redis when no broker is configured."""
    import uvicorn

    if not logging.getLogger().handlers:  # the supervisor's messages (uvicorn configures only its own loggers)
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    private_files()
    settings = get_settings()
    settings.home.mkdir(parents=True, exist_ok=True)
    cmd = worker_command(queues, name=f"embedded-{os.getpid()}@%h") if worker else None
    supervisor = Supervisor(settings, cmd).start()
    log.info("data directory %s; broker %s; database %s", settings.home,
             "embedded Redis" if settings.broker_embedded else settings.broker_url.split("@")[-1],
             settings.database_url.split("@")[-1])
    # uvicorn shuts down gracefully on SIGINT/SIGTERM and then re-raises the signal to the handler
    # it found: these no-op handlers let the clean-up below run (worker, embedded Redis) instead of
    # the default handler killing the process.
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: None)
    try:
        uvicorn.run("service.api:create_app", factory=True, host=host, port=port, log_level=log_level)
    finally:
        supervisor.stop()
