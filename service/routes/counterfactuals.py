"""``POST /v1/counterfactuals``: a counterfactual of one uploaded scan.

The interventions and covariates are checked against the registered model's graph and the upload
is read as a NIfTI volume before the job is accepted: a bad request is a 422 with the reason.
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, File, Form, UploadFile

from cdae_med.values import ValuesError, parse_values

from ..config import Settings
from ..deps import SettingsDep, Submit, unprocessable
from ..schemas import ERRORS, Accepted
from ..uploads import check_scan, json_object, new_job_dir, save_upload

__all__ = ["router"]

router = APIRouter(prefix="/v1", tags=["counterfactuals"], responses=ERRORS)


def checked_values(graph, raw: dict[str, Any], what: str, allow_empty: bool = True) -> dict[str, float]:
    """The graph's values of ``raw`` as checked floats; 422 naming every bad one."""
    try:
        return parse_values(graph, raw, what=what, allow_empty=allow_empty)
    except ValuesError as err:
        raise unprocessable(f"{what}: {err}") from None


def resolve_model(ref: str | None, settings: Settings):
    from pipelines.registry import RegistryError, resolve

    try:
        return resolve(ref or None, home=settings.home)
    except RegistryError as err:
        raise unprocessable(f"model: {err}") from None


@router.post("/counterfactuals", status_code=202, response_model=Accepted,
             summary="Submit a counterfactual of one scan")
def submit_counterfactual(
    submit: Submit,
    settings: SettingsDep,
    file: Annotated[UploadFile, File(description="a 3D NIfTI volume, .nii or .nii.gz")],
    interventions: Annotated[str, Form(description='JSON object, e.g. {"age": 70}')],
    model: Annotated[str | None, Form(description="registered model NAME or NAME:vN [the only one]")] = None,
    covariates: Annotated[str | None, Form(description='known factual values, JSON, e.g. {"sex": 1}')] = None,
):
    do = json_object(interventions, "interventions")
    given = json_object(covariates, "covariates")
    registered = resolve_model(model, settings)
    if registered.meta.get("image", {}).get("preprocessing") is None:
        raise unprocessable(f"model: {registered.ref} was trained on {registered.dataset!r} images, not scans")
    do = checked_values(registered.graph, do, "interventions", allow_empty=False)
    given = checked_values(registered.graph, given, "covariates")
    with new_job_dir(settings) as (job_id, job_dir):
        path = save_upload(file, job_dir, settings.max_upload_bytes)
        check_scan(path, settings.scan_limits)
    return submit("counterfactual", {"interventions": do, "covariates": given, "input": path.name},
                  model_ref=registered.ref, job_id=job_id)
