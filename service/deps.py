"""Dependencies the routes share: the settings, the job store, the broker, the API key check,
submitting a job (record and publish). Each reads what :func:`service.api.create_app` put on
``app.state``, so one process can hold several apps (the tests do) with their own settings.
"""

from __future__ import annotations

import logging
from typing import Annotated, Any, Callable

from celery import Celery
from fastapi import Depends, Header, HTTPException, Request
from fastapi.responses import JSONResponse

from .config import Settings
from .db import ADMIN, JobView, KeyView, Store
from .middleware import INVALID_KEY, MISSING_KEY  # the KeyGate's words: the same 401 wherever it comes from
from .schemas import Accepted

__all__ = ["SettingsDep", "StoreDep", "CeleryDep", "ApiKey", "AdminKey", "OwnedJob", "Submit", "api_key",
           "require_role", "owned_job", "unprocessable"]

log = logging.getLogger("cdae_med.service")


def unprocessable(detail: str) -> HTTPException:
    """A 422 with the reason (a request that is well-formed HTTP but cannot be done)."""
    return HTTPException(status_code=422, detail=detail)


def _settings(request: Request) -> Settings:
    return request.app.state.settings


def _store(request: Request) -> Store:
    return request.app.state.store


def _celery(request: Request) -> Celery:
    return request.app.state.celery


SettingsDep = Annotated[Settings, Depends(_settings)]
StoreDep = Annotated[Store, Depends(_store)]
CeleryDep = Annotated[Celery, Depends(_celery)]


def api_key(store: StoreDep, x_api_key: Annotated[str | None, Header(alias="X-API-Key")] = None) -> int:
    """The id of the request's valid API key; 401 without one."""
    if not x_api_key:
        raise HTTPException(401, MISSING_KEY, headers={"WWW-Authenticate": "X-API-Key"})
    key_id = store.authenticate(x_api_key)
    if key_id is None:
        raise HTTPException(401, INVALID_KEY, headers={"WWW-Authenticate": "X-API-Key"})
    return key_id


ApiKey = Annotated[int, Depends(api_key)]


def require_role(role: str) -> Callable[..., KeyView]:
    """A dependency: the request's key if it has ``role`` (or a higher one); 403 naming the role
    it lacks. Every valid key is at least a clinician, so only admin routes need it."""
    def check(key_id: ApiKey, store: StoreDep) -> KeyView:
        key = store.key(key_id)
        if key is None:  # revoked between the two reads
            raise HTTPException(401, INVALID_KEY, headers={"WWW-Authenticate": "X-API-Key"})
        if not key.has_role(role):
            raise HTTPException(403, f"this needs an API key with the {role} role; key {key.name!r} has the "
                                     f"{key.role} role")
        return key

    return check


AdminKey = Annotated[KeyView, Depends(require_role(ADMIN))]


def owned_job(job_id: str, key_id: ApiKey, store: StoreDep) -> JobView:
    """The job of the path's ``job_id`` if this key submitted it; 404 for any other key's job."""
    job = store.get_job(job_id, key_id)
    if job is None:
        raise HTTPException(404, f"no job {job_id!r}")
    return job


OwnedJob = Annotated[JobView, Depends(owned_job)]


def _submitter(request: Request, key_id: ApiKey, store: StoreDep) -> Callable[..., JSONResponse]:
    send = request.app.state.send

    def submit(kind: str, params: dict[str, Any], model_ref: str | None = None,
               job_id: str | None = None) -> JSONResponse:
        """Record the job under the request's key, queue it, and answer 202 with its URL."""
        job = store.create_job(kind, key_id, params, model_ref=model_ref, job_id=job_id)
        try:
            send(job)
        except Exception as err:  # the record is kept: the sweep sends it when the broker is back
            log.warning("job %s accepted but not yet queued (broker: %s); the sweep will queue it", job.id, err)
        url = f"/v1/jobs/{job.id}"
        return JSONResponse(Accepted(id=job.id, status=job.status, url=url).model_dump(), status_code=202,
                            headers={"Location": url})

    return submit


Submit = Annotated[Callable[..., JSONResponse], Depends(_submitter)]
