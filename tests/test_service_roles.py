"""Roles and model promotion against the real parts (the API in-process, a Celery worker process,
Redis, PostgreSQL or SQLite; see tests/test_service.py): clinician and admin keys, the 403 that
names the missing role, a new version serving ``model=NAME`` only once promoted, the exact
version recorded on each job, and databases made before roles existed (SQLite and PostgreSQL)."""

from __future__ import annotations

import time

import pytest
from sqlalchemy import JSON, Column, Float, ForeignKey, Integer, MetaData, String, Table, Text, create_engine
from typer.testing import CliRunner

from tests.service_support import postgres_or_skip
from tests.test_service import submit, svc, wait_done, worker  # noqa: F401 (the fixtures: svc, worker)

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

TRAIN = {"dataset": "brain", "name": "never-run", "steps": 3, "minutes": None, "size": 16, "eval_n": 0,
         "grid_rows": 1, "eval_steps": 2}


def test_clinician_keys_cannot_train_or_promote(svc):
    c = svc["client"]
    for path, kwargs in (("/v1/training-jobs", {"json": TRAIN}),
                         ("/v1/training-jobs/cohort", {"data": {"params": "{}"},
                                                       "files": [("manifest", ("m.csv", b"path\n")),
                                                                 ("files", ("a.nii.gz", b"x"))]}),
                         ("/v1/models/promote", {"json": {"model": "brain:v1"}})):
        r = c.post(path, headers=svc["b"], **kwargs)
        assert r.status_code == 403, (path, r.text)
        assert r.json()["detail"] == "this needs an API key with the admin role; key 'bob' has the clinician role"
    # a clinician still submits and reads its own jobs and lists the models
    assert c.get("/v1/models", headers=svc["b"]).status_code == 200
    assert c.get("/v1/jobs", headers=svc["b"]).status_code == 200
    # an admin may train (deleted at once: this test runs no training)
    r = c.post("/v1/training-jobs", headers=svc["a"], json=TRAIN)
    assert r.status_code == 202, r.text
    assert c.delete(f"/v1/jobs/{r.json()['id']}", headers=svc["a"]).status_code == 204
    assert "/v1/models/promote" in c.get("/openapi.json").json()["paths"]


def test_a_new_version_serves_only_once_promoted(svc, worker, tiny_brain_checkpoint):
    from pipelines.registry import register

    c, home = svc["client"], svc["settings"].home
    new = register(tiny_brain_checkpoint, "brain", home=home)
    assert new.version == 2 and not new.promoted
    models = {m["name"]: m for m in c.get("/v1/models", headers=svc["b"]).json()}
    assert (models["brain"]["version"], models["brain"]["promoted"]) == (1, True)  # the newest does not win
    before = submit(svc, key="b")
    assert before.status_code == 202, before.text
    assert c.get(f"/v1/jobs/{before.json()['id']}", headers=svc["b"]).json()["model"] == "brain:v1"

    r = c.post("/v1/models/promote", headers=svc["a"], json={"model": "brain:v9"})
    assert r.status_code == 422 and "no version 'v9'" in r.json()["detail"]
    r = c.post("/v1/models/promote", headers=svc["a"], json={"model": "brain:v2"})
    assert r.status_code == 200, r.text
    assert (r.json()["version"], r.json()["promoted"]) == (2, True)
    after = submit(svc, key="b")
    assert c.get(f"/v1/jobs/{after.json()['id']}", headers=svc["b"]).json()["model"] == "brain:v2"

    # each ran on the exact version recorded when it was accepted, whenever the worker got to it
    for job_id, ref in ((before.json()["id"], "brain:v1"), (after.json()["id"], "brain:v2")):
        job = wait_done(svc, job_id, key="b")
        assert job["status"] == "succeeded" and job["model"] == ref, job
        report = c.get(f"/v1/jobs/{job_id}/files/report.json", headers=svc["b"]).json()
        assert report["model"]["checkpoint"] == ref
    all_versions = c.get("/v1/models?all_versions=true", headers=svc["b"]).json()
    assert [(m["version"], m["promoted"]) for m in all_versions if m["name"] == "brain"] == [(1, False), (2, True)]
    r = c.post("/v1/models/promote", headers=svc["a"], json={"model": "brain:v1"})  # back, for the other tests
    assert r.status_code == 200


def test_cli_roles_and_promotion(tmp_path, monkeypatch, tiny_brain_checkpoint):
    from cdae_cli import app
    from service.config import get_settings
    from service.db import Store

    monkeypatch.setenv("CDAE_HOME", str(tmp_path / "home"))
    for name in ("CDAE_DATABASE_URL", "CDAE_BROKER_URL"):
        monkeypatch.delenv(name, raising=False)
    run = CliRunner().invoke
    r = run(app, ["keys", "create", "--name", "ops", "--role", "admin"])
    assert r.exit_code == 0 and "(ops, admin) created" in r.output
    plain = r.output.split()[0]
    r = run(app, ["keys", "create", "--name", "ward"])
    assert r.exit_code == 0 and "(ward, clinician)" in r.output
    r = run(app, ["keys", "create", "--name", "x", "--role", "root"])
    assert r.exit_code == 2 and "role 'root' is not one of clinician, admin" in r.output
    assert [line.split("\t")[1:3] for line in run(app, ["keys", "list"]).output.splitlines()] == [
        ["ops", "admin"], ["ward", "clinician"]]
    assert run(app, ["keys", "set-role", "2", "admin"]).exit_code == 0
    store = Store(get_settings().database_url)
    assert store.key(store.authenticate(plain)).role == "admin" and store.key(2).role == "admin"
    assert run(app, ["keys", "set-role", "9", "admin"]).exit_code == 2

    for _ in range(2):
        r = run(app, ["models", "register", str(tiny_brain_checkpoint), "--name", "mri"])
        assert r.exit_code == 0, r.output
    assert "mri serves v1; `cdae-med models promote mri:v2`" in r.output
    listed = run(app, ["models", "list", "--all"]).output.splitlines()
    assert [(line.split("\t")[0], line.endswith("\tpromoted")) for line in listed] == [("mri:v1", True),
                                                                                      ("mri:v2", False)]
    r = run(app, ["models", "promote", "mri:v2"])
    assert r.exit_code == 0 and "mri:v2 now serves mri" in r.output
    assert run(app, ["models", "list"]).output.startswith("mri:v2\t")
    assert run(app, ["models", "promote", "mri"]).exit_code == 2


# -- a database from before roles ----------------------------------------------------------------
def _old_schema(url: str, plain: str) -> int:
    """The tables as the previous release created them (no role, no purged_at, no workers), with
    one key and one finished job."""
    from service.db import hash_key

    meta = MetaData()
    keys = Table("api_keys", meta, Column("id", Integer, primary_key=True, autoincrement=True),
                 Column("name", String(128)), Column("key_hash", String(64), unique=True, index=True),
                 Column("prefix", String(16)), Column("created_at", Float), Column("revoked_at", Float, nullable=True))
    jobs = Table("jobs", meta, Column("id", String(32), primary_key=True), Column("kind", String(32)),
                 Column("status", String(16), index=True), Column("progress", Float), Column("error", Text),
                 Column("key_id", ForeignKey("api_keys.id"), index=True), Column("model_ref", String(128)),
                 Column("params", JSON), Column("files", JSON), Column("result", JSON), Column("created_at", Float),
                 Column("queued_at", Float), Column("published", Integer), Column("started_at", Float),
                 Column("finished_at", Float), Column("heartbeat_at", Float), Column("attempts", Integer),
                 Column("worker", String(255)))
    engine = create_engine(url)
    meta.create_all(engine)
    now = time.time()
    with engine.begin() as conn:
        key_id = conn.execute(keys.insert().values(name="old", key_hash=hash_key(plain), prefix=plain[:12],
                                                   created_at=now)).inserted_primary_key[0]
        conn.execute(jobs.insert().values(id="j1", kind="counterfactual", status="succeeded", progress=1.0, key_id=key_id,
                                          model_ref="brain:v1", params={"interventions": {"age": 70}},
                                          files=["report.json"], created_at=now, queued_at=now, published=1,
                                          finished_at=now, attempts=1))
    engine.dispose()
    return key_id


def _check_migrated(url: str) -> None:
    import threading

    from service.db import Store

    plain = "cdae_old-key-from-before-roles"
    old_id = _old_schema(url, plain)
    stores, errors = [], []

    def open_store():  # two processes' worth of first opens at once: one adds the columns
        try:
            stores.append(Store(url))
        except Exception as err:
            errors.append(err)

    threads = [threading.Thread(target=open_store) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    store = stores[0]
    assert store.authenticate(plain) == old_id
    assert store.key(old_id).role == "clinician"  # an old key keeps working, as a clinician
    job = store.get_job("j1", old_id)
    assert job.files == ["report.json"] and job.purged_at is None
    store.worker_seen("h:1", "w@h", "counterfactual")
    assert [w["id"] for w in store.workers(60)] == ["h:1"]
    new_plain, new_id = store.create_key("new", role="admin")
    assert store.key(store.authenticate(new_plain)).role == "admin"
    assert {k["name"]: k["role"] for k in store.list_keys()} == {"old": "clinician", "new": "admin"}


def test_sqlite_database_from_before_roles_is_migrated(tmp_path):
    _check_migrated(f"sqlite:///{tmp_path / 'old.db'}")


def test_postgres_database_from_before_roles_is_migrated():
    pg = postgres_or_skip()
    try:
        _check_migrated(pg.url)
    finally:
        pg.drop()

