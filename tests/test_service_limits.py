"""Issue 15's bounds on the service, against real parts: uploads bounded before they are
inflated or resampled (the API's header and streamed checks, a worker's own; cdae_med.io's side
is tests/test_scan_limits.py), the key checked before the body is read and wrong keys
rate-limited, malformed values a 422 with a one-line reason, /docs offline, security headers,
/readyz details for admins only, keys in URLs refused.

The API runs in-process (TestClient) on the Redis at 127.0.0.1:6379 (else an embedded one) and
PostgreSQL (else SQLite), and as a real `cdae-med serve --no-worker` process on the same ones
where the test is about the process: memory, sockets, the access log. The worker is a real
Celery process."""

from __future__ import annotations

import json
import os
import socket
import threading
import time
import uuid
import warnings
from pathlib import Path

import pytest

from tests.hostile_scans import HOSTILE, head_scan, write_hostile
from tests.service_support import ROOT, RunningServe, Worker, free_port, isolated_env, service_parts, wait_for

with warnings.catch_warnings():  # starlette's TestClient warns that it will move from httpx to httpx2
    warnings.simplefilter("ignore")
    from fastapi.testclient import TestClient

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")
TINY = ROOT / "tests" / "assets" / "brain16-tiny"


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    return write_hostile(tmp_path_factory.mktemp("hostile"))


@pytest.fixture(scope="module")
def small_scan(tmp_path_factory):
    return head_scan(tmp_path_factory.mktemp("scan") / "head.nii.gz", size=32, spacing=6.0).read_bytes()


# -- the API in-process ------------------------------------------------------------------------
@pytest.fixture(scope="module")
def svc(tmp_path_factory):
    from pipelines.registry import register
    from service.api import create_app
    from service.db import Store

    root = tmp_path_factory.mktemp("limits")
    home = root / "home"
    register(TINY, "brain", home=home)
    with service_parts(home, CDAE_SWEEP_S="0", CDAE_DEVICE="cpu", CDAE_DDIM_STEPS="2", CDAE_HEARTBEAT_S="1",
                       CDAE_TORCH_THREADS="1", OMP_NUM_THREADS="1") as parts:
        store = Store(parts.settings.database_url)
        clinician, _ = store.create_key("clinic")
        admin, _ = store.create_key("operator", role="admin")
        with TestClient(create_app(parts.settings, sweep=False)) as client:
            yield {"client": client, "settings": parts.settings, "store": store, "env": parts.env, "root": root,
                   "c": {"X-API-Key": clinician}, "admin": {"X-API-Key": admin}}


def _submit(svc, content: bytes, headers=None, **form):
    data = {"interventions": '{"age": 70}', "model": "brain", **form}
    return svc["client"].post("/v1/counterfactuals", headers=svc["c"] if headers is None else headers,
                              files={"file": ("scan.nii.gz", content)}, data=data)


@pytest.mark.parametrize("name", sorted(HOSTILE))
def test_every_hostile_upload_is_a_422_and_leaves_nothing(svc, files, name):
    jobs = svc["settings"].jobs_dir
    before = set(os.listdir(jobs)) if jobs.exists() else set()
    r = _submit(svc, files[name].read_bytes())
    assert r.status_code == 422, r.text
    assert r.json()["detail"].startswith("file: ") and "\n" not in r.json()["detail"]
    assert (set(os.listdir(jobs)) if jobs.exists() else set()) == before


HUGE = "9" * 400
MALFORMED = [  # (form field or JSON body, what it says)
    ({"interventions": f'{{"age": {HUGE}}}'}, "an integer of 400 digits is too large"),
    ({"interventions": f'{{"age": {"9" * 5000}}}'}, "an integer of 5,000 digits is too large"),
    ({"interventions": "[" * 50_000 + "]" * 50_000}, "nested more than 32 levels deep"),
    ({"interventions": '{"age": 70, "age": 30}'}, "the key 'age' is given twice"),
    ({"interventions": '{"age": NaN}'}, "NaN is not a JSON number"),
    ({"interventions": '{"age": 1e999}'}, "the number 1e999 is too large"),
    ({"covariates": '{"sex": 0, "sex": 1}'}, "covariates: the key 'sex' is given twice"),
    ({"model": "brain\n"}, "model: model name 'brain\\n' must be"),
    ({"model": "brain:v1\n"}, "no version 'v1\\n'"),
]


@pytest.mark.parametrize("form,says", MALFORMED, ids=[m[1][:30] for m in MALFORMED])
def test_malformed_form_values_are_a_422_with_one_line(svc, small_scan, form, says):
    r = _submit(svc, small_scan, **form)
    assert r.status_code == 422, r.text
    detail = r.json()["detail"]
    assert says in detail and "\n" not in detail.replace("\\n", ""), detail


TRAINING = [
    ('{"dataset": "brain", "steps": 5, "steps": 6}', "body: the key 'steps' is given twice"),
    ('{"steps": %s}' % ("9" * 5000), "body: an integer of 5,000 digits is too large"),
    ('{"steps": %s}' % HUGE, "body: an integer of 400 digits is too large"),
    ("[" * 50_000 + "]" * 50_000, "body: nested more than 32 levels deep"),
    ('{"lr": NaN}', "body: NaN is not a JSON number"),
    ('{"eval_steps": 1}', "eval_steps"),  # the end-of-training evaluation would fail after training
    ('{"seed": 99999999999999999999}', "seed"),  # seeds torch past 2^64 once training runs
    ('{"model": {"latent_dim": -3}}', "model: latent_dim must be in [1, 4096]"),
    ('{"name": "brain\\n"}', "name: model name"),
]


@pytest.mark.parametrize("body,says", TRAINING, ids=[t[1][:30] for t in TRAINING])
def test_malformed_training_requests_are_a_422_with_one_line(svc, body, says):
    r = svc["client"].post("/v1/training-jobs", headers={**svc["admin"], "Content-Type": "application/json"},
                           content=body)
    assert r.status_code == 422, r.text
    assert says in r.json()["detail"] and "\n" not in r.json()["detail"], r.json()


def test_non_finite_window_or_level_is_a_422(svc, small_scan):
    r = _submit(svc, small_scan)
    assert r.status_code == 202, r.text
    url = f"/v1/jobs/{r.json()['id']}/slices/input/axial/8.png"
    c = svc["client"]
    assert c.get(url, headers=svc["c"]).headers["content-type"] == "image/png"
    for query in ("window=nan", "window=inf", "level=nan", "level=-inf", "window=1e999"):
        r = c.get(f"{url}?{query}", headers=svc["c"])
        assert r.status_code == 422 and "finite" in r.json()["detail"], (query, r.text)


def test_security_headers_on_every_answer(svc, small_scan):
    from service.middleware import SECURITY_HEADERS

    c = svc["client"]
    job = _submit(svc, small_scan).json()["id"]
    answers = {"page": c.get("/"), "docs": c.get("/docs"), "openapi": c.get("/openapi.json"),
               "health": c.get("/healthz"), "static": c.get("/static/app.js"), "not found": c.get("/nope"),
               "401": c.get("/v1/jobs"), "422": _submit(svc, b"not a scan"), "job": c.get(f"/v1/jobs/{job}",
                                                                                            headers=svc["c"]),
               "jobs": c.get("/v1/jobs", headers=svc["c"]), "models": c.get("/v1/models", headers=svc["c"]),
               "slice": c.get(f"/v1/jobs/{job}/slices/input/axial/0.png", headers=svc["c"])}
    for what, r in answers.items():
        for name, value in SECURITY_HEADERS.items():
            assert r.headers.get(name) == value, (what, name, r.headers)
        if what in ("401", "422", "job", "jobs", "models", "slice"):
            assert r.headers["cache-control"] == "no-store", (what, r.headers)
    assert "frame-ancestors 'none'" in SECURITY_HEADERS["Content-Security-Policy"]


def test_docs_are_served_by_the_app_itself(svc):
    import re

    c = svc["client"]
    page = c.get("/docs")
    assert page.status_code == 200 and "swagger-ui" in page.text
    refs = re.findall(r'(?:src|href)="([^"]+)"', page.text)
    assert refs and all(ref.startswith("/") and not ref.startswith("//") for ref in refs), refs
    for ref in refs:
        assert c.get(ref).status_code == 200, ref
    assert "<script>" not in page.text  # no inline script: the CSP allows none
    assert c.get("/redoc").status_code == 404  # FastAPI's ReDoc page loads from a CDN: off
    assert c.get("/openapi.json").json()["openapi"].startswith("3.1")


def test_docs_render_offline_in_a_browser(svc):
    """Chromium with every request off this origin refused: Swagger UI still renders the routes."""
    exe = os.environ.get("CDAE_TEST_CHROMIUM", "/usr/bin/chromium")
    if not Path(exe).exists():
        pytest.skip(f"no Chromium at {exe}")
    sync_api = pytest.importorskip("playwright.sync_api")
    import uvicorn

    from service.api import create_app

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(svc["settings"], sweep=False), port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    wait_for(lambda: server.started, 30, "uvicorn")
    elsewhere, problems = [], []
    try:
        with sync_api.sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=exe, headless=True)
            page = browser.new_page()
            page.on("console", lambda m: problems.append(m.text) if m.type == "error" else None)

            def route(r):
                if r.request.url.startswith(f"http://127.0.0.1:{port}/"):
                    return r.continue_()
                elsewhere.append(r.request.url)
                return r.abort()

            page.route("**/*", route)
            page.goto(f"http://127.0.0.1:{port}/docs")
            page.wait_for_selector(".opblock", timeout=30_000)
            assert page.locator(".opblock").count() >= 8
            browser.close()
    finally:
        server.should_exit = True
        thread.join(timeout=10)
    assert elsewhere == [] and not [p for p in problems if "Content Security Policy" in p], (elsewhere, problems)


def test_readyz_says_why_only_to_admins(svc):
    from service.api import create_app

    broken = svc["settings"].model_copy(update={"broker_url": "redis://127.0.0.1:9/0"})  # nothing listens on 9
    with TestClient(create_app(broken, sweep=False)) as c:
        for headers in ({}, svc["c"]):  # no key, a clinician's
            r = c.get("/readyz", headers=headers)
            assert r.status_code == 503 and r.json()["checks"]["broker"] == "error", r.text
            assert "details" not in r.json() and "127.0.0.1" not in r.text and "Error" not in r.text
        r = c.get("/readyz", headers=svc["admin"])
        assert r.status_code == 503 and "127.0.0.1:9" in r.json()["details"]["broker"], r.text


def test_a_key_in_the_url_is_refused(svc):
    for query in ("api_key", "X-API-Key", "key", "token"):
        key = svc["c"]["X-API-Key"]
        r = svc["client"].get(f"/v1/jobs?{query}={key}")
        assert r.status_code == 400 and "X-API-Key header" in r.json()["detail"], r.text
        assert key not in r.text
    assert svc["client"].get("/readyz?api_key=x").status_code == 400


def test_wrong_keys_are_rate_limited_per_address(svc):
    from service.api import create_app

    app = create_app(svc["settings"].model_copy(update={"auth_failures_per_min": 3}), sweep=False)
    with TestClient(app, client=("10.1.2.3", 4000)) as guesser, TestClient(app, client=("10.9.9.9", 4000)) as other:
        for _ in range(3):
            assert guesser.get("/v1/jobs", headers={"X-API-Key": "cdae_guess"}).status_code == 401
        for headers in ({"X-API-Key": "cdae_guess"}, svc["c"]):  # the right key too: no oracle
            r = guesser.get("/v1/jobs", headers=headers)
            assert r.status_code == 429 and 1 <= int(r.headers["retry-after"]) <= 60, r.text
            assert "too many wrong API keys" in r.json()["detail"]
        assert other.get("/v1/jobs", headers=svc["c"]).status_code == 200  # another address is not held up
        assert guesser.get("/healthz").status_code == 200  # only /v1 is held back


# -- a worker with its own limits ---------------------------------------------------------------
def test_a_worker_refuses_what_a_lenient_api_let_through(svc, files):
    """An API started with far larger limits (or an older one) queues a 32 m field of view and a
    1 GiB bomb; the worker, on the default limits, fails each job with the reason, before
    reading or resampling a voxel."""
    from service.api import create_app

    lenient = svc["settings"].model_copy(update={"max_fov_mm": 1e6, "max_volume_mb": 4096.0})
    worker = Worker(svc["env"], svc["root"] / "worker.log", "limits")
    try:
        worker.wait_ready()
        with TestClient(create_app(lenient, sweep=False)) as c:
            jobs = {}
            for name in ("voxels_1000mm", "voxels_200mm", "bomb_512_float64"):
                r = c.post("/v1/counterfactuals", headers=svc["c"], data={"interventions": '{"age": 70}'},
                           files={"file": ("scan.nii.gz", files[name].read_bytes())})
                assert r.status_code == 202, r.text
                jobs[name] = r.json()["id"]

            def finished():
                states = {n: c.get(f"/v1/jobs/{j}", headers=svc["c"]).json() for n, j in jobs.items()}
                return states if all(s["status"] in ("succeeded", "failed") for s in states.values()) else None

            states = wait_for(finished, 120, "the worker to refuse the jobs", every=0.3)
    finally:
        worker.stop()
    for name, says in (("voxels_1000mm", "field of view of 32,000"), ("voxels_200mm", "field of view of 6,400"),
                       ("bomb_512_float64", "1,024 MiB of data")):
        assert states[name]["status"] == "failed" and says in states[name]["error"], states[name]
        assert "Spacing" not in states[name]["error"] and "\n" not in states[name]["error"]


# -- the API as a real process -----------------------------------------------------------------
@pytest.fixture(scope="module")
def api_process(svc, tmp_path_factory):
    """`cdae-med serve --no-worker` (uvicorn) on the home, database and broker of ``svc``."""
    settings = svc["settings"]
    log = tmp_path_factory.mktemp("api_process") / "api.log"
    env = isolated_env(settings.home, CDAE_DATABASE_URL=settings.database_url, CDAE_BROKER_URL=settings.broker_url,
                       CDAE_BROKER_PREFIX=settings.broker_prefix, CDAE_SWEEP_S="0", OMP_NUM_THREADS="1",
                       CDAE_MAX_UPLOAD_MB="64")
    served = RunningServe(env, log, args=("--no-worker",), ready="/healthz")
    try:
        yield {"url": served.url, "pid": served.proc.pid, "log": log, "port": served.port}
    finally:
        served.stop()


def test_no_key_is_a_401_before_the_body_is_sent(api_process):
    """A client announces 50 MB and sends 64 kB: the 401 comes at once, the rest never needed."""
    head = (b"POST /v1/counterfactuals HTTP/1.1\r\nHost: test\r\nContent-Type: multipart/form-data; boundary=b\r\n"
            b"Content-Length: 50000000\r\n")
    for extra, says in ((b"", b"missing X-API-Key"), (b"X-API-Key: cdae_wrong\r\n", b"invalid or revoked")):
        with socket.create_connection(("127.0.0.1", api_process["port"]), timeout=10) as s:
            t0 = time.perf_counter()
            s.sendall(head + extra + b"\r\n" + b"x" * 65536)
            answer = b""
            while says not in answer and (chunk := s.recv(65536)):  # the headers, then the body
                answer += chunk
            took = time.perf_counter() - t0
        assert answer.startswith(b"HTTP/1.1 401") and says in answer, answer[:300]
        assert took < 5, took


def test_the_api_process_grows_little_on_hostile_uploads(api_process, svc, files):
    """Each hostile file, and three 1 GiB bombs at once: the API's resident memory grows by far
    under 100 MB (it once read the whole inflated volume), and /healthz stays quick meanwhile."""
    import httpx
    import psutil

    proc = psutil.Process(api_process["pid"])
    client = httpx.Client(base_url=api_process["url"], headers=svc["c"], timeout=60)

    def post(name):
        return client.post("/v1/counterfactuals", data={"interventions": '{"age": 70}', "model": "brain"},
                           files={"file": ("scan.nii.gz", files[name].read_bytes())})

    assert post("voxels_200mm").status_code == 422  # the first upload imports what the checks need
    peak, stop = [0], threading.Event()

    def sample():
        while not stop.is_set():
            peak[0] = max(peak[0], proc.memory_info().rss)
            time.sleep(0.005)

    base = proc.memory_info().rss
    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        for name in sorted(HOSTILE):
            assert post(name).status_code == 422, name
        slowest = []
        threads = [threading.Thread(target=lambda: slowest.append(post("bomb_512_float64").status_code))
                   for _ in range(3)]
        for t in threads:
            t.start()
        health = []
        while any(t.is_alive() for t in threads):
            t0 = time.perf_counter()
            assert client.get("/healthz").status_code == 200
            health.append(time.perf_counter() - t0)
        for t in threads:
            t.join()
    finally:
        stop.set()
        sampler.join()
        client.close()
    assert slowest == [422, 422, 422]
    grew = (peak[0] - base) / 2**20
    assert grew < 100, f"the API grew by {grew:.0f} MiB"
    assert max(health, default=0) < 2.0, health


def test_a_key_in_the_url_is_kept_out_of_the_access_log(api_process):
    import httpx

    secret = f"cdae_{uuid.uuid4().hex}"
    r = httpx.get(f"{api_process['url']}/v1/jobs?api_key={secret}&limit=5", timeout=10)
    assert r.status_code == 400
    log = wait_for(lambda: (t := api_process["log"].read_text()) and "api_key=REDACTED" in t and t, 10,
                   "the access log line")
    assert secret not in log and "limit=5" in log
    assert json.loads(r.text)["detail"].endswith("send it in the X-API-Key header")
