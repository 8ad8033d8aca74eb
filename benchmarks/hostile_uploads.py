"""Hostile uploads (issue 15) -> benchmarks/results/hostile_uploads.json: the API's and the
worker's peak memory for each file of tests/hostile_scans.py, against real processes.

1. `cdae-med serve` (API, worker, embedded Redis, SQLite) on a temporary CDAE_HOME with the
   default limits and tests/assets/brain16-tiny registered as `brain`: each hostile file is
   submitted once, then three 1 GiB bombs at once while /healthz is polled, then a legitimate
   256^3 1 mm head. Recorded: the answer, and how far the API process's resident memory (and
   the worker's: its Celery process tree) rose above its level just before.
2. The worker's own check: `cdae-med serve --no-worker` with limits far above the defaults
   (an API that lets everything through) and `cdae-med worker` on the defaults. The field of
   view files and the bomb are accepted by that API and must fail in the worker with the
   reason; the worker's growth is set against two legitimate 256^3 heads at the limits
   (1 mm, and 2 mm: a 512 mm field of view, the default CDAE_MAX_FOV_MM).

    .venv/bin/python benchmarks/hostile_uploads.py [--ddim-steps 5] [--out PATH]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
MB = 2**20


class Peak:
    """Samples the resident memory of a process (and, with ``tree``, its descendants) every 5 ms."""

    def __init__(self, pid: int, tree: bool = False):
        import psutil

        self.proc, self.tree = psutil.Process(pid), tree
        self._stop, self._thread, self.peak = threading.Event(), None, 0

    def rss(self) -> int:
        import psutil

        procs = [self.proc] + (self.proc.children(recursive=True) if self.tree else [])
        total = 0
        for p in procs:
            try:
                total += p.memory_info().rss
            except psutil.NoSuchProcess:
                pass
        return total

    def __enter__(self) -> "Peak":
        self.base = self.peak = self.rss()
        self._stop.clear()

        def sample():
            while not self._stop.is_set():
                self.peak = max(self.peak, self.rss())
                time.sleep(0.005)

        self._thread = threading.Thread(target=sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.rss())

    def figures(self) -> dict:
        return {"before_mb": round(self.base / MB, 1), "peak_mb": round(self.peak / MB, 1),
                "grew_mb": round((self.peak - self.base) / MB, 1)}


def _cli(env, *args) -> str:
    r = subprocess.run([sys.executable, "-m", "cdae_cli", *args], cwd=ROOT, env=env, capture_output=True, text=True,
                       timeout=300)
    if r.returncode:
        raise SystemExit(f"cdae-med {' '.join(args)} failed:\n{r.stderr[-2000:]}")
    return r.stdout.strip()


def _start(cmd, env, log: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "cdae_cli", *cmd], cwd=ROOT, env=env, stdout=open(log, "wb"),
                            stderr=subprocess.STDOUT, start_new_session=True)


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=45)
        except subprocess.TimeoutExpired:
            pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _wait(what, fn, timeout: float, log: Path):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if fn():
            return
        time.sleep(0.3)
    raise SystemExit(f"{what} timed out:\n{log.read_text()[-3000:]}")


def _up(url: str, path: str = "/healthz") -> bool:
    import httpx

    try:
        return httpx.get(url + path, timeout=3).status_code == 200
    except httpx.TransportError:
        return False


def _worker_pid(serve_pid: int) -> int:
    import psutil

    for child in psutil.Process(serve_pid).children():
        if "celery" in " ".join(child.cmdline()):
            return child.pid
    raise RuntimeError("serve has no worker child")


class Client:
    def __init__(self, url: str, key: str):
        import httpx

        self.http = httpx.Client(base_url=url, headers={"X-API-Key": key}, timeout=300)

    def submit(self, path: Path):
        return self.http.post("/v1/counterfactuals", data={"interventions": '{"age": 70}', "model": "brain"},
                              files={"file": ("scan.nii.gz", path.read_bytes())})

    def finish(self, job_id: str, timeout: float = 600) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            job = self.http.get(f"/v1/jobs/{job_id}").json()
            if job["status"] in ("succeeded", "failed"):
                return job
            time.sleep(0.25)
        raise TimeoutError(job_id)


def _case(client: Client, path: Path, what: str, api: Peak, worker: Peak) -> dict:
    t0 = time.perf_counter()
    with api, worker:
        r = client.submit(path)
        answered = time.perf_counter() - t0
        job = client.finish(r.json()["id"]) if r.status_code == 202 else None
    out = {"what": what, "file_bytes": path.stat().st_size, "status_code": r.status_code,
           "answer_s": round(answered, 3), "api": api.figures(), "worker": worker.figures()}
    if job is None:
        out["detail"] = r.json().get("detail")
    else:
        out.update(job_status=job["status"], job_error=job["error"], seconds=round(time.perf_counter() - t0, 2))
    print(json.dumps({"file": path.name, **out}), flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ddim-steps", type=int, default=5)
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "hostile_uploads.json")
    args = ap.parse_args()

    from tests.hostile_scans import HOSTILE, LEGITIMATE, write_hostile
    from tests.service_support import free_port

    work = Path(tempfile.mkdtemp(prefix="cdae-hostile-"))
    files = {**write_hostile(work / "files"), **write_hostile(work / "files", table=LEGITIMATE)}
    what = {n: w for n, (w, _) in {**HOSTILE, **LEGITIMATE}.items()}
    env = {k: v for k, v in os.environ.items() if not k.startswith("CDAE_")}
    env.update(CDAE_HOME=str(work / "home"), CDAE_DDIM_STEPS=str(args.ddim_steps), CDAE_DEVICE="cpu",
               CDAE_TORCH_THREADS="1", OMP_NUM_THREADS="1", CDAE_SWEEP_S="0", CDAE_HEARTBEAT_S="2")
    _cli(env, "models", "register", str(ROOT / "tests" / "assets" / "brain16-tiny"), "--name", "brain")
    key = _cli(env, "keys", "create", "--name", "bench").splitlines()[0]
    results: dict = {}
    procs: list[subprocess.Popen] = []
    try:
        # 1. defaults: the API refuses every hostile file itself.
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        serve = _start(["serve", "--port", str(port)], env, work / "serve.log")
        procs.append(serve)
        _wait("cdae-med serve", lambda: _up(url, "/readyz"), 180, work / "serve.log")
        client = Client(url, key)
        api, worker = Peak(serve.pid), Peak(_worker_pid(serve.pid), tree=True)
        _case(client, files["head_256_1mm"], "warm-up (torch import, model load)", api, worker)
        defaults = {n: _case(client, files[n], what[n], api, worker) for n in HOSTILE}
        health, codes = [], []
        with api, worker:
            threads = [threading.Thread(target=lambda: codes.append(client.submit(files["bomb_512_float64"])
                                                                   .status_code)) for _ in range(3)]
            for t in threads:
                t.start()
            while any(t.is_alive() for t in threads):
                t0 = time.perf_counter()
                client.http.get("/healthz")
                health.append(time.perf_counter() - t0)
            for t in threads:
                t.join()
        concurrent = {"what": "three bomb_512_float64 at once", "status_codes": codes, "api": api.figures(),
                      "worker": worker.figures(), "healthz_max_ms": round(1000 * max(health), 1),
                      "healthz_polls": len(health)}
        print(json.dumps(concurrent), flush=True)
        legit_default = _case(client, files["head_256_1mm"], what["head_256_1mm"], api, worker)
        client.http.close()
        _stop(serve)
        results["defaults"] = {"hostile": defaults, "three_bombs_at_once": concurrent,
                               "legitimate_head_256_1mm": legit_default}

        # 2. the worker's own check, behind an API that lets everything through.
        lenient = {**env, "CDAE_MAX_FOV_MM": "1000000", "CDAE_MAX_VOLUME_MB": "4096"}
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        api_proc = _start(["serve", "--no-worker", "--port", str(port)], lenient, work / "lenient.log")
        procs.append(api_proc)
        _wait("cdae-med serve --no-worker", lambda: _up(url), 120, work / "lenient.log")
        worker_proc = _start(["worker"], env, work / "worker.log")
        procs.append(worker_proc)
        _wait("cdae-med worker", lambda: b" ready." in (work / "worker.log").read_bytes(), 180, work / "worker.log")
        client = Client(url, key)
        api, worker = Peak(api_proc.pid), Peak(worker_proc.pid, tree=True)
        _case(client, files["head_256_1mm"], "warm-up (torch import, model load)", api, worker)
        legit = {n: _case(client, files[n], what[n], api, worker) for n in LEGITIMATE}
        passed = {n: _case(client, files[n], what[n], api, worker)
                  for n in ("voxels_200mm", "voxels_1000mm", "bomb_512_float64")}
        client.http.close()
        need = max(c["worker"]["grew_mb"] for c in legit.values())
        results["worker_check"] = {
            "api_limits": {"CDAE_MAX_FOV_MM": 1e6, "CDAE_MAX_VOLUME_MB": 4096}, "worker_limits": "defaults",
            "legitimate": legit, "hostile": passed, "legitimate_worker_growth_mb": need,
            "hostile_worker_growth_mb_max": max(c["worker"]["grew_mb"] for c in passed.values()),
        }
    finally:
        for p in procs:
            _stop(p)
        shutil.rmtree(work, ignore_errors=True)
    growth = [c["api"]["grew_mb"] for c in results["defaults"]["hostile"].values()]
    out = {
        "what": "API and worker resident memory for hostile NIfTI uploads (issue 15), real processes",
        "limits": {"CDAE_MAX_VOXELS": "512^3", "CDAE_MAX_VOLUME_MB": 256, "CDAE_MAX_FOV_MM": 512,
                   "CDAE_MAX_UPLOAD_MB": 512},
        "model": "tests/assets/brain16-tiny (16^3, 12 mm voxels)", "ddim_steps": args.ddim_steps,
        "api_growth_mb_max_per_hostile_request": max(growth),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                    "load_average_at_end": [round(x, 2) for x in os.getloadavg()]},
        **results,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
