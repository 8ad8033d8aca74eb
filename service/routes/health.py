"""Liveness (``/healthz``: the process answers) and readiness (``/readyz``: so do the database
and the broker). Neither needs a key: load balancers and health checks call them."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import JSONResponse

from ..deps import CeleryDep, StoreDep

__all__ = ["router"]

router = APIRouter(tags=["health"])


@router.get("/healthz", summary="The API process is up")
def healthz():
    return {"status": "ok"}


@router.get("/readyz", summary="The database and the broker answer", responses={503: {"model": dict}})
def readyz(store: StoreDep, celery: CeleryDep):
    checks: dict[str, str] = {}
    try:
        store.ping()
        checks["database"] = "ok"
    except Exception as err:
        checks["database"] = f"error: {type(err).__name__}: {err}"
    try:
        with celery.connection_for_write() as conn:
            conn.ensure_connection(max_retries=1, timeout=3)
            conn.default_channel.client.ping() if hasattr(conn.default_channel, "client") else None
        checks["broker"] = "ok"
    except Exception as err:
        checks["broker"] = f"error: {type(err).__name__}: {err}"
    ok = all(v == "ok" for v in checks.values())
    return JSONResponse({"status": "ready" if ok else "not ready", "checks": checks},
                        status_code=200 if ok else 503)
