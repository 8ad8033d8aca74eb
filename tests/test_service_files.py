"""Job files against the real parts (the API in-process, Celery worker processes, Redis,
PostgreSQL or SQLite; see tests/test_service.py): private modes, deleting a job (queued, running,
another key's), the retention sweep, and a worker that loses its lease stopping its work."""

from __future__ import annotations

import stat
import time
from pathlib import Path

import pytest

from tests.service_support import wait_for
from tests.test_service import submit, svc, wait_done, worker  # noqa: F401 (the fixtures: svc, worker)

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

# A training job long enough to be caught running (it reports progress every 10 steps).
LONG_TRAINING = {"dataset": "brain", "name": "long-run", "steps": 100000, "minutes": None, "size": 16,
                 "batch_size": 2, "n_train": 4, "eval_n": 0, "grid_rows": 1, "eval_steps": 2, "model": {
                     "latent_dim": 4, "encoder_channels": [16, 32], "unet_channels": [32, 32, 32],
                     "unet_attention": [False, False, True], "mechanism_hidden": 16}}


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_job_files_are_private(svc, worker):
    job = wait_done(svc, submit(svc, key="b").json()["id"], key="b")
    assert job["status"] == "succeeded", job
    jobs_dir = svc["settings"].jobs_dir
    job_dir = svc["settings"].job_dir(job["id"])
    assert _mode(jobs_dir) == 0o700
    folders = [job_dir, *[p for p in job_dir.rglob("*") if p.is_dir()]]
    files = [p for p in job_dir.rglob("*") if p.is_file()]
    assert {p.name for p in files} >= {"input.nii.gz", "counterfactual.nii.gz", "report.json"}
    assert {oct(_mode(p)) for p in folders} == {"0o700"}, [(p, oct(_mode(p))) for p in folders]
    assert {oct(_mode(p)) for p in files} == {"0o600"}, [(p, oct(_mode(p))) for p in files]


def test_sqlite_database_file_is_private(tmp_path):
    from service.db import Store

    Store(f"sqlite:///{tmp_path / 'new' / 'service.db'}").create_key("k")
    for p in (tmp_path / "new").iterdir():  # service.db and its -wal/-shm files
        assert _mode(p) == 0o600, (p, oct(_mode(p)))
    assert _mode(tmp_path / "new") == 0o700
    old = tmp_path / "old.db"
    old.touch(mode=0o644)
    old.chmod(0o644)  # as an earlier version left it
    Store(f"sqlite:///{old}")
    assert _mode(old) == 0o600


def test_delete_a_finished_job(svc, worker):
    c = svc["client"]
    job = wait_done(svc, submit(svc, key="b").json()["id"], key="b")
    job_dir = svc["settings"].job_dir(job["id"])
    assert job_dir.is_dir()
    assert c.delete(f"/v1/jobs/{job['id']}", headers=svc["a"]).status_code == 404  # another key: as if absent
    assert job_dir.is_dir()
    assert c.delete(f"/v1/jobs/{job['id']}", headers=svc["b"]).status_code == 204
    assert not job_dir.exists()
    for path in (f"/v1/jobs/{job['id']}", f"/v1/jobs/{job['id']}/files/report.json"):
        assert c.get(path, headers=svc["b"]).status_code == 404
    assert job["id"] not in [j["id"] for j in c.get("/v1/jobs", headers=svc["b"]).json()]
    assert c.delete(f"/v1/jobs/{job['id']}", headers=svc["b"]).status_code == 404  # once
    row = svc["store"].get_job(job["id"])  # a tombstone: no parameters, results or files
    assert (row.status, row.params, row.result, row.files) == ("deleted", {}, None, [])
    assert row.purged_at is not None


def test_delete_a_queued_job_it_never_runs(svc, worker):
    c, store = svc["client"], svc["store"]
    # accepted but not yet published (as while the broker is down): the message comes after the DELETE
    job = store.create_job("counterfactual", store.authenticate(svc["b"]["X-API-Key"]),
                           params={"interventions": {"age": 70}, "input": "input.nii.gz"}, model_ref="brain:v1")
    assert c.delete(f"/v1/jobs/{job.id}", headers=svc["b"]).status_code == 204
    svc["app"].state.send(job)
    wait_for(lambda: f"job {job.id} not claimed (deleted)" in worker.log.read_text(), 60, "the worker to skip it")
    assert store.get_job(job.id).status == "deleted" and store.get_job(job.id).attempts == 0


def _running(svc, job_id: str):
    return wait_for(lambda: (j := svc["store"].get_job(job_id)).status == "running" and j.progress > 0 and j,
                    120, f"job {job_id} to run", every=0.1)


def test_deleting_a_running_job_stops_its_work(svc, worker):
    """The owner deletes a training job while it runs: the worker's lease is gone, the training
    stops at its next progress report, nothing is registered, and the worker is free again."""
    from pipelines.registry import list_models

    c = svc["client"]
    r = c.post("/v1/training-jobs", headers=svc["a"], json=LONG_TRAINING)
    assert r.status_code == 202, r.text
    job_id = r.json()["id"]
    _running(svc, job_id)
    t0 = time.monotonic()
    assert c.delete(f"/v1/jobs/{job_id}", headers=svc["a"]).status_code == 204
    wait_for(lambda: f"job {job_id}: lease lost" in worker.log.read_text(), 30, "the work to stop")
    stopped_s = time.monotonic() - t0
    assert not svc["settings"].job_dir(job_id).exists()  # and nothing written since
    assert "long-run" not in [m.name for m in list_models(svc["settings"].home, all_versions=True)]
    nxt = wait_done(svc, submit(svc).json()["id"], timeout=60)  # the worker is free
    assert nxt["status"] == "succeeded", nxt
    print(f"\na deleted running job stopped {stopped_s:.1f} s after the DELETE")


def test_a_lost_lease_stops_the_work(svc, worker):
    """The sweep gives a running job to another worker (its lease looked stale): the first worker
    notices at its next progress report, stops, and leaves the job to the new holder."""
    c = svc["client"]
    job_id = c.post("/v1/training-jobs", headers=svc["a"], json=LONG_TRAINING).json()["id"]
    job = _running(svc, job_id)
    store = svc["store"]
    assert store.release(job) or store.release(store.get_job(job_id))  # what the sweep does to a stale lease
    taken = store.claim(job_id, "other-host:1", svc["settings"].stale_s, svc["settings"].max_attempts)
    assert taken is not None
    wait_for(lambda: f"job {job_id}: lease lost" in worker.log.read_text(), 30, "the work to stop")
    assert store.get_job(job_id).worker == "other-host:1"  # untouched by the first worker
    assert not list(svc["settings"].job_dir(job_id).glob(".out-*"))
    assert store.finish(job_id, "other-host:1", "failed", error="test over")


def test_lease_raises_once_lost(svc):
    """The lease's progress callback raises LeaseLost after a heartbeat finds the job gone."""
    from service.worker import LeaseLost, _Lease

    store = svc["store"]
    job = store.create_job("counterfactual", store.authenticate(svc["b"]["X-API-Key"]), params={})
    assert store.claim(job.id, "me:1", 60, 3) is not None
    with _Lease(store, job.id, "me:1", every_s=0.05) as lease:
        lease.report(0.1)
        store.delete_job(job.id, job.key_id)
        with pytest.raises(LeaseLost, match=f"job {job.id} is no longer held by me:1"):
            for _ in range(100):
                time.sleep(0.02)
                lease.report(0.2)


def test_retention_sweep_deletes_old_inputs_and_outputs(svc, worker):
    from service.sweep import sweep

    c = svc["client"]
    job = wait_done(svc, submit(svc, key="b").json()["id"], key="b")
    job_dir = svc["settings"].job_dir(job["id"])
    send = svc["app"].state.send
    assert job["id"] not in sweep(svc["store"], svc["settings"], send)["purged"]  # 30 days: kept
    assert job_dir.is_dir()
    done = sweep(svc["store"], svc["settings"].model_copy(update={"retention_days": 1e-9}), send)
    assert job["id"] in done["purged"] and not job_dir.exists()
    after = c.get(f"/v1/jobs/{job['id']}", headers=svc["b"]).json()
    assert after["status"] == "succeeded" and after["files"] == [] and after["result"]["report"]
    r = c.get(f"/v1/jobs/{job['id']}/files/report.json", headers=svc["b"])
    assert r.status_code == 404 and "deleted after the retention period" in r.json()["detail"]
    keep = svc["settings"].model_copy(update={"retention_days": 0.0})
    assert sweep(svc["store"], keep, send)["purged"] == []  # 0: kept for ever
