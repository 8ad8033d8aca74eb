"""A key's jobs and their output files, and deleting a job. Another key's job is a 404, as if it
did not exist.

``DELETE /v1/jobs/{id}`` removes the job's stored input and outputs at once and leaves a record
no client sees (then a 404). A queued job is never run; a running one is stopped: its worker's
lease is gone, so the work ends at its next progress report and removes what it wrote since.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from fastapi import APIRouter, HTTPException, Response
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
    if job.purged_at is not None:
        raise HTTPException(404, f"the files of job {job.id} were deleted after the retention period")
    if name not in job.files:  # names come from the worker's fixed list, never from a request
        raise HTTPException(404, f"job {job.id} has no file {name!r}"
                                 + (f"; it has {', '.join(job.files)}" if job.files else f" (it is {job.status})"))
    path = settings.job_dir(job.id) / "out" / name
    if not path.is_file():
        raise HTTPException(404, f"file {name!r} of job {job.id} is no longer stored")
    suffix = "".join(Path(name).suffixes[-1:])
    return FileResponse(path, media_type=_MEDIA.get(suffix, "application/octet-stream"), filename=name)


@router.delete("/{job_id}", status_code=204, response_class=Response,
               summary="Delete a job: its stored input and outputs now; a running job is stopped")
def delete_job(job: OwnedJob, key_id: ApiKey, store: StoreDep, settings: SettingsDep):
    if store.delete_job(job.id, key_id) is None:
        raise HTTPException(404, f"no job {job.id!r}")
    folder = settings.job_dir(job.id)
    shutil.rmtree(folder, ignore_errors=True)
    if not folder.exists():
        store.mark_purged(job.id)  # else the sweep removes what is left
    return Response(status_code=204)

