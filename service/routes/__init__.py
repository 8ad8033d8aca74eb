"""The API's routes, one router per resource; :data:`router` holds them all."""

from fastapi import APIRouter

from . import counterfactuals, health, jobs, models, training

__all__ = ["router"]

router = APIRouter()
for _module in (counterfactuals, training, jobs, models, health):
    router.include_router(_module.router)
