"""``POST /v1/training-jobs`` (a synthetic data set) and ``POST /v1/training-jobs/cohort``
(uploaded scans), for admin keys only (403 for others). The parameters are
:class:`service.schemas.TrainRequest`, the training schema of ``cdae-med train``; the model is
registered when the job ends, and serves ``model=NAME`` only once an admin promotes it (the first
version of a name is promoted as it is registered)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, File, Form, UploadFile
from pydantic import ValidationError

from pipelines.train_config import describe_validation_error

from ..deps import AdminKey, SettingsDep, Submit, unprocessable
from ..schemas import ERRORS, Accepted, TrainRequest
from ..strict_json import StrictJSONRoute
from ..uploads import json_object, new_job_dir, save_cohort

__all__ = ["router"]

# StrictJSONRoute: a JSON body with a duplicate key, a huge number or deep nesting is a 422 with the reason.
router = APIRouter(prefix="/v1/training-jobs", tags=["training"], responses={**ERRORS, 403: ERRORS[401]},
                   route_class=StrictJSONRoute)


@router.post("", status_code=202, response_model=Accepted,
             summary="Submit a training job; the model is registered when it finishes")
def submit_training(_admin: AdminKey, submit: Submit, req: TrainRequest):
    return submit("train", req.model_dump())


def _train_request(params: str) -> TrainRequest:
    values = json_object(params, "params", example='{"steps": 1000}')
    try:
        return TrainRequest.model_validate(values)
    except ValidationError as err:
        raise unprocessable(f"params: {describe_validation_error(err)}") from None


@router.post("/cohort", status_code=202, response_model=Accepted,
             summary="Submit a training job on uploaded scans: a manifest CSV and the NIfTI files it names")
def submit_training_cohort(
    _admin: AdminKey,
    submit: Submit,
    settings: SettingsDep,
    manifest: Annotated[UploadFile, File(description="CSV: subject_id, path, one column per graph variable")],
    files: Annotated[list[UploadFile], File(description="the scans; each matched to a row by its file name")],
    params: Annotated[str, Form(description="training parameters as JSON, as for /v1/training-jobs")] = "{}",
):
    req = _train_request(params)
    if req.dataset != "brain":
        raise unprocessable("params: a cohort of scans trains a brain model (dataset 'brain')")
    with new_job_dir(settings) as (job_id, job_dir):
        data = save_cohort(manifest, files, job_dir, settings)
    return submit("train", {**req.model_dump(), "data": data}, job_id=job_id)
