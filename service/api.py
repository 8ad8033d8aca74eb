"""The HTTP API (FastAPI): ``uvicorn --factory service.api:create_app``. OpenAPI docs at /docs.

Every /v1 route needs the header ``X-API-Key`` (401 without a valid one, answered before the
body is read; 429 for an address that sent too many wrong ones; a key in the URL is a 400); a
job and its files are visible only to the key that submitted it (404 for any other). A request is checked in full
before its job is accepted (:mod:`service.uploads`, the routes in :mod:`service.routes`), so a
bad request is a 4xx with the reason and never a failed job. The app publishes jobs through
:mod:`service.queue` and never imports the worker's tasks.
"""

from __future__ import annotations

from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

from . import docs, routes, web
from .config import Settings, get_settings
from .db import JobView, Store
from .middleware import BodyLimit, FailedKeys, KeyGate, SecurityHeaders, redact_access_log
from .process import private_dir, private_files
from .queue import declare_queues, make_celery, publish
from .sweep import Sweeper

__all__ = ["create_app"]

_PLACES = ("body", "query", "path", "header", "form")


async def _readable_422(_request: Request, exc: RequestValidationError) -> JSONResponse:
    """One readable line ("interventions: Field required; ..."), the structured list beside it."""
    parts = []
    for e in exc.errors():
        loc = ".".join(str(x) for x in e.get("loc", ()) if x not in _PLACES)
        msg = str(e.get("msg", "invalid")).removeprefix("Value error, ")
        parts.append(f"{loc}: {msg}" if loc else msg)
    return JSONResponse({"detail": "; ".join(parts), "errors": jsonable_encoder(exc.errors())}, status_code=422)


def create_app(settings: Settings | None = None, sweep: bool = True) -> FastAPI:
    """The API with its own job store and broker connection; ``sweep``: re-queue lost jobs
    every ``settings.sweep_s`` while it runs. The process's files (uploads, the SQLite database)
    are created for its user only from here on (:func:`service.process.private_files`)."""
    settings = settings or get_settings()
    private_files()
    private_dir(settings.jobs_dir)
    store = Store(settings.database_url)
    celery = make_celery(settings)

    def send(job: JobView) -> None:
        publish(celery, store, job)

    def declare() -> None:
        declare_queues(celery)

    @asynccontextmanager
    async def lifespan(_app: FastAPI):
        sweeper = Sweeper(store, settings, send, declare).start() if sweep else None
        yield
        if sweeper is not None:
            sweeper.stop()

    app = FastAPI(title="cdae-med counterfactual service", version="1",
                  description="Counterfactual brain MRI with Causal Diffusion Autoencoders. "
                              "Authenticate with the X-API-Key header.", lifespan=lifespan,
                  docs_url=None, redoc_url=None)  # FastAPI's pages load from a CDN: service.docs serves /docs
    # What the dependencies in service.deps read.
    app.state.settings, app.state.store, app.state.celery = settings, store, celery
    app.state.send, app.state.declare = send, declare
    # The last added runs first: security headers on every answer, then the key (before any body is
    # read), then the body size limit.
    app.add_middleware(BodyLimit, limit=settings.max_upload_bytes)
    app.add_middleware(KeyGate, authenticate=store.authenticate, failures=FailedKeys(settings.auth_failures_per_min))
    app.add_middleware(SecurityHeaders)
    redact_access_log()
    app.add_exception_handler(RequestValidationError, _readable_422)
    app.include_router(routes.router)
    app.include_router(web.router)  # the page at / and the slice PNGs it shows, under the same key rules
    app.include_router(docs.router)  # /docs, its Swagger UI files served from here
    return app
