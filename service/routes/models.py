"""The registered models a counterfactual may name."""

from __future__ import annotations

from fastapi import APIRouter

from ..deps import ApiKey, SettingsDep
from ..schemas import ERRORS, ModelOut

__all__ = ["router"]

router = APIRouter(prefix="/v1", tags=["models"], responses=ERRORS)


@router.get("/models", response_model=list[ModelOut], summary="Registered models (newest versions)")
def models(key_id: ApiKey, settings: SettingsDep, all_versions: bool = False):
    from pipelines.registry import list_models

    return [ModelOut(**{k: v for k, v in m.summary().items() if k in ModelOut.model_fields})
            for m in list_models(settings.home, all_versions=all_versions)]
