"""Dockerfile and docker-compose.yml: no Docker engine runs here, so what can be checked is
checked: the files parse, say what the deployment needs, and the exact commands they run exist
and start (the API answers the image's health check; the worker answers the compose health
check's ping)."""

import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
import uuid
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from cdae_cli import app
from tests.service_support import free_port, system_redis_url

ROOT = Path(__file__).resolve().parents[1]


def dockerfile() -> list[tuple[str, str]]:
    """(instruction, arguments) with continuation lines joined."""
    text = re.sub(r"\\\n", " ", (ROOT / "Dockerfile").read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def compose() -> dict:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


def exec_form(args: str) -> list[str]:
    import json

    return json.loads(args)


def test_dockerfile_builds_a_non_root_image_with_a_health_check_and_no_secrets():
    ins = dockerfile()
    words = [w for w, _ in ins]
    args = dict(ins)
    assert words[0] == "ARG" and "nvidia/cuda" in ins[0][1] and "runtime" in ins[0][1]  # CUDA runtime base
    assert words.count("FROM") == 1 and args["FROM"] == "${BASE}"  # CPU variant: --build-arg BASE=...
    users = [a for w, a in ins if w == "USER"]
    assert users and users[-1] not in ("root", "0")
    assert words.index("USER") > max(i for i, w in enumerate(words) if w == "RUN")  # nothing runs as root after
    assert "/healthz" in args["HEALTHCHECK"]
    pinned = re.search(r'"torch==([\d.]+)"', (ROOT / "pyproject.toml").read_text()).group(1)
    assert f"torch=={pinned}" in " ".join(a for w, a in ins if w == "RUN")
    secretish = re.compile(r"(KEY|SECRET|PASSWORD|TOKEN)", re.I)
    assert not [a for w, a in ins if w in ("ENV", "ARG") and secretish.search(a.split("=")[0])]
    copied = [a.split()[0] for w, a in ins if w == "COPY"]
    assert not any(c.startswith(("tests", "runs", "benchmarks", ".")) for c in copied)  # no data baked in
    for src in copied:
        assert (ROOT / src).exists(), src
    include = re.search(r"include\s*=\s*\[([^\]]*)\]", (ROOT / "pyproject.toml").read_text()).group(1)
    packages = {p.strip(' "*') for p in include.split(",") if p.strip()}
    assert packages and packages <= set(copied), f"packages the image does not copy: {packages - set(copied)}"


def test_compose_has_persistent_redis_api_gpu_worker_and_a_volume():
    c = compose()
    services = c["services"]
    assert {"redis", "api", "worker"} <= services.keys()
    assert "--appendonly" in services["redis"]["command"]
    assert services["redis"]["volumes"]
    worker = services["worker"]
    devices = worker["deploy"]["resources"]["reservations"]["devices"]
    assert devices[0]["driver"] == "nvidia" and "gpu" in devices[0]["capabilities"]
    for name in ("api", "worker"):
        s = services[name]
        assert s["environment"]["CDAE_BROKER_URL"].startswith("redis://redis:")
        assert any(v.endswith(":/data") for v in s["volumes"])
    assert set(c["volumes"]) >= {"cdae-data", "redis-data"}
    assert services["api"]["command"] == exec_form(dict(dockerfile())["CMD"])


@pytest.mark.parametrize("service", ["api", "worker"])
def test_the_commands_the_files_run_exist_with_those_options(service):
    cmd = compose()["services"][service]["command"]
    assert cmd[0] == "cdae-med"
    res = CliRunner().invoke(app, cmd[1:] + ["--help"])
    assert res.exit_code == 0, res.output



def test_api_and_worker_commands_start_and_pass_their_health_checks(tmp_path):
    broker = system_redis_url()
    if broker is None:
        pytest.skip("no Redis at 127.0.0.1:6379 (the compose file's broker); CI here has one")
    env = {**os.environ, "CDAE_HOME": str(tmp_path), "CDAE_BROKER_URL": broker,
           "CDAE_BROKER_PREFIX": f"cdae-deploy-{uuid.uuid4().hex[:8]}:", "CDAE_DEVICE": "cpu",
           "CDAE_DATABASE_URL": f"sqlite:///{tmp_path / 'service.db'}"}
    port = free_port()
    api_cmd = compose()["services"]["api"]["command"]
    api_cmd = [*api_cmd[:api_cmd.index("--port") + 1], str(port), *api_cmd[api_cmd.index("--port") + 2:]]
    api_cmd[api_cmd.index("0.0.0.0")] = "127.0.0.1"
    worker_cmd = compose()["services"]["worker"]["command"]
    exe = str(Path(sys.executable).parent / "cdae-med")
    procs = []
    try:
        for cmd, log in ((api_cmd, "api.log"), (worker_cmd + ["--name", "deploy@%h"], "worker.log")):
            procs.append(subprocess.Popen([exe, *cmd[1:]], env=env, cwd=tmp_path, stdout=open(tmp_path / log, "wb"),
                                          stderr=subprocess.STDOUT, start_new_session=True))
        deadline = time.monotonic() + 60
        healthy = False
        while time.monotonic() < deadline and not healthy:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=2) as r:
                    healthy = r.status == 200
            except OSError:
                assert procs[0].poll() is None, (tmp_path / "api.log").read_text()[-2000:]
                time.sleep(0.3)
        assert healthy, (tmp_path / "api.log").read_text()[-2000:]
        # The compose file's worker health check, run as it is written there.
        check = compose()["services"]["worker"]["healthcheck"]["test"][1]
        deadline = time.monotonic() + 60
        while True:
            res = subprocess.run(check.replace("celery ", f"{sys.executable} -m celery ", 1), shell=True, env=env,
                                 cwd=ROOT, capture_output=True, text=True, timeout=60)
            if res.returncode == 0 or time.monotonic() > deadline:
                break
            assert procs[1].poll() is None, (tmp_path / "worker.log").read_text()[-2000:]
            time.sleep(1)
        assert res.returncode == 0, res.stdout + res.stderr + (tmp_path / "worker.log").read_text()[-2000:]
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGTERM)
                try:
                    p.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    os.killpg(p.pid, signal.SIGKILL)
