"""Liveness (``/healthz``: the process answers) and readiness (``/readyz``: so do the database
and the broker, and at least one worker has reported within three heartbeats; a worker on this
host whose process is gone does not count). Neither needs a key: load balancers and health checks call them. Why a check
failed (error text, which may hold host names and socket paths) is logged, and shown only to a
request with an admin key (:func:`shows_details`)."""

from __future__ import annotations

import logging
from typing import Annotated

from fastapi import APIRouter, Header
from fastapi.responses import JSONResponse

from ..db import ADMIN, Store
from ..deps import CeleryDep, SettingsDep, StoreDep
from ..sweep import process_gone

__all__ = ["router"]

router = APIRouter(tags=["health"])
log = logging.getLogger("cdae_med.service")


def shows_details(store: Store, key: str | None) -> bool:
    """Whether ``/readyz`` may say why a check failed: only to a valid key with the admin role."""
    key_id = store.authenticate(key) if key else None
    view = store.key(key_id) if key_id is not None else None
    return view is not None and view.has_role(ADMIN)


@router.get("/healthz", summary="The API process is up")
def healthz():
    return {"status": "ok"}


def live_workers(store: Store, heartbeat_s: float) -> list[dict]:
    """Workers that reported within three heartbeats, less those on this host that have exited."""
    return [w for w in store.workers(3 * heartbeat_s) if not process_gone(w["id"])]


@router.get("/readyz", summary="The database, the broker and a worker answer", responses={503: {"model": dict}})
def readyz(store: StoreDep, celery: CeleryDep, settings: SettingsDep,
           x_api_key: Annotated[str | None, Header(alias="X-API-Key", description="admin: say why")] = None):
    checks: dict[str, str] = {}
    details: dict[str, str] = {}
    try:
        store.ping()
        checks["database"] = "ok"
    except Exception as err:
        checks["database"], details["database"] = "error", f"{type(err).__name__}: {err}"
    try:
        with celery.connection_for_write() as conn:
            conn.ensure_connection(max_retries=1, timeout=3)
            conn.default_channel.client.ping() if hasattr(conn.default_channel, "client") else None
        checks["broker"] = "ok"
    except Exception as err:
        checks["broker"], details["broker"] = "error", f"{type(err).__name__}: {err}"
    try:
        workers = live_workers(store, settings.heartbeat_s)
        checks["workers"] = "ok" if workers else "error"
        if not workers:
            details["workers"] = f"no worker has reported in the last {3 * settings.heartbeat_s:g} s"
    except Exception as err:
        checks["workers"], details["workers"] = "error", f"{type(err).__name__}: {err}"
    for name, why in details.items():
        log.warning("readiness: %s: %s", name, why)
    ok = all(v == "ok" for v in checks.values())
    body = {"status": "ready" if ok else "not ready", "checks": checks}
    if details and "database" not in details and shows_details(store, x_api_key):
        body["details"] = details
    return JSONResponse(body, status_code=200 if ok else 503)
