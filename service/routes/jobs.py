"""A key's jobs and their output files. Another key's job is a 404, as if it did not exist."""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter, HTTPException
from fastapi.responses import FileResponse

from ..deps import ApiKey, OwnedJob, SettingsDep, StoreDep
from ..schemas import ERRORS, JobOut

__all__ = ["router"]

router = APIRouter(prefix="/v1/jobs", tags=["jobs"], responses=ERRORS)

_MEDIA = {".gz": "application/gzip", ".png": "image/png", ".json": "application/json"}


@router.get("/{job_id}", response_model=JobOut, summary="A job's status")
def get_job(job: OwnedJob):
    return JobOut.of(job)


@router.get("", response_model=list[JobOut], summary="This key's jobs, newest first")
def list_jobs(key_id: ApiKey, store: StoreDep, limit: int = 100):
    return [JobOut.of(j) for j in store.list_jobs(key_id, limit=max(1, min(limit, 1000)))]


@router.get("/{job_id}/files/{name}", response_class=FileResponse,
            summary="Download an output: counterfactual.nii.gz, difference.nii.gz, preview.png, report.json")
def get_file(job: OwnedJob, name: str, settings: SettingsDep):
    if name not in job.files:  # names come from the worker's fixed list, never from a request
        raise HTTPException(404, f"job {job.id} has no file {name!r}"
                                 + (f"; it has {', '.join(job.files)}" if job.files else f" (it is {job.status})"))
    path = settings.job_dir(job.id) / "out" / name
    if not path.is_file():
        raise HTTPException(404, f"file {name!r} of job {job.id} is no longer stored")
    suffix = "".join(Path(name).suffixes[-1:])
    return FileResponse(path, media_type=_MEDIA.get(suffix, "application/octet-stream"), filename=name)
