"""The API's request and response models (pydantic): what OpenAPI documents at /docs."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, Field, field_validator

from pipelines.registry import check_name
from pipelines.train_config import Dataset, TrainParameters

from .db import JobView

__all__ = ["Accepted", "FileLink", "JobOut", "VariableOut", "ModelOut", "PromoteRequest", "TrainRequest", "Problem",
           "ERRORS"]


class Problem(BaseModel):
    detail: str


# The error answers every /v1 route may give, for the OpenAPI docs.
ERRORS: dict[int | str, dict[str, Any]] = {code: {"model": Problem} for code in (401, 404, 413, 422)}


class Accepted(BaseModel):
    id: str
    status: str
    url: str


class FileLink(BaseModel):
    name: str
    url: str


class JobOut(BaseModel):
    id: str
    kind: Literal["counterfactual", "train"]
    status: Literal["queued", "running", "succeeded", "failed"]
    progress: float = Field(description="0..1")
    error: str | None
    files: list[FileLink]
    model: str | None = Field(description="NAME:vN the job runs on (counterfactual) or registered (train)")
    params: dict[str, Any]
    result: dict[str, Any] | None
    created_at: float
    started_at: float | None
    finished_at: float | None
    attempts: int

    @classmethod
    def of(cls, job: JobView) -> "JobOut":
        """What a client sees of a job: no server paths (the stored input's and cohort's names)."""
        result = job.result or {}
        return cls(id=job.id, kind=job.kind, status=job.status, progress=job.progress, error=job.error,
                   files=[FileLink(name=f, url=f"/v1/jobs/{job.id}/files/{f}") for f in job.files],
                   model=result.get("model") if job.kind == "train" else job.model_ref,
                   params={k: v for k, v in job.params.items() if k not in ("input", "data")},
                   result={k: v for k, v in result.items() if k != "model"} or None,
                   created_at=job.created_at, started_at=job.started_at, finished_at=job.finished_at,
                   attempts=job.attempts)


class VariableOut(BaseModel):
    name: str
    unit: str
    range: list[float | None] | None
    binary: bool
    parents: list[str]


class ModelOut(BaseModel):
    name: str
    version: int
    dataset: str
    variant: str
    image: dict[str, Any]
    variables: list[VariableOut]
    registered_at: float
    promoted: bool = Field(description="this version serves model=NAME")


class PromoteRequest(BaseModel):
    model: str = Field(description="NAME:vN, the version that model=NAME is to run on", examples=["brain:v2"])


class TrainRequest(TrainParameters):
    """A training job on a synthetic data set (the brain cohort, pendulum, ...): the training
    parameters of ``cdae-med train`` and the name to register the model under."""

    # The service's clients work on brain scans, so a request trains a brain model unless it says
    # otherwise (the command line's default is pendulum).
    dataset: Dataset = Field("brain", description=TrainParameters.model_fields["dataset"].description)
    name: str | None = Field(None, description="register the model under this name [the data set's]")

    @field_validator("name")
    @classmethod
    def _registry_name(cls, name: str | None) -> str | None:
        return None if name is None else check_name(name)
