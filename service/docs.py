"""``/docs``: Swagger UI over ``/openapi.json``, every file served by this app (it works offline).

The ``fastapi`` wheel does not ship Swagger UI (FastAPI's own /docs page loads it from a CDN);
the ``fastapi-offline`` wheel does (Swagger UI 5, which reads the OpenAPI 3.1 FastAPI writes),
and only its files are used here, under ``/docs/assets``. The page is ``service/static/docs.html``
with its start-up script in ``docs.js`` rather than inline, so the content security policy
(:data:`service.middleware.SECURITY_HEADERS`) needs no ``'unsafe-inline'``.
"""

from __future__ import annotations

from importlib.resources import files

from fastapi import APIRouter
from fastapi.responses import FileResponse
from fastapi.staticfiles import StaticFiles

from .web import STATIC_DIR

__all__ = ["router", "SWAGGER_UI_DIR"]

SWAGGER_UI_DIR = files("fastapi_offline") / "static"

router = APIRouter(include_in_schema=False)
router.mount("/docs/assets", StaticFiles(directory=str(SWAGGER_UI_DIR)), name="docs-assets")


@router.get("/docs")
def docs():
    return FileResponse(STATIC_DIR / "docs.html", media_type="text/html", headers={"Cache-Control": "no-cache"})
