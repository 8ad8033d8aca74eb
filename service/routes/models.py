"""The registered models a counterfactual may name, and promoting a version (admin keys only)."""

from __future__ import annotations

from fastapi import APIRouter

from ..deps import AdminKey, ApiKey, SettingsDep, unprocessable
from ..schemas import ERRORS, ModelOut, PromoteRequest

__all__ = ["router"]

router = APIRouter(prefix="/v1", tags=["models"], responses=ERRORS)


def _out(m) -> ModelOut:
    return ModelOut(**{k: v for k, v in m.summary().items() if k in ModelOut.model_fields})


@router.get("/models", response_model=list[ModelOut], summary="Registered models (the promoted versions)")
def models(key_id: ApiKey, settings: SettingsDep, all_versions: bool = False):
    from pipelines.registry import list_models

    return [_out(m) for m in list_models(settings.home, all_versions=all_versions)]


@router.post("/models/promote", response_model=ModelOut, responses={403: ERRORS[401]},
             summary="Make NAME:vN the version that model=NAME runs on (admin)")
def promote(req: PromoteRequest, key: AdminKey, settings: SettingsDep):
    from pipelines.registry import RegistryError, promote as promote_version

    try:
        return _out(promote_version(req.model, home=settings.home, by=f"API key {key.name!r} (id {key.id})"))
    except RegistryError as err:
        raise unprocessable(f"model: {err}") from None
