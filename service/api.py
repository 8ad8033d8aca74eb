"""The HTTP API (FastAPI): ``uvicorn --factory service.api:create_app``. OpenAPI docs at /docs.

Every /v1 route needs the header ``X-API-Key`` (401 without a valid one); a job and its files
are visible only to the key that submitted it (404 for any other). Interventions are checked
against the registered model's graph and the upload is read and checked as a NIfTI volume
*before* the job is accepted, so a bad request is a 4xx with the reason and never a failed job.
The upload's own file name is never used as a path: it is stored as ``input.nii[.gz]`` in the
job's folder, chosen by its content.
"""

import json
import logging
import math
import shutil
import uuid
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Annotated, Any, Literal

from fastapi import Depends, FastAPI, File, Form, Header, HTTPException, Request, UploadFile
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse
from pydantic import BaseModel, ConfigDict, Field

from .config import Settings, get_settings
from .db import JobView, Store

log = logging.getLogger("cdae_med.service")

__all__ = ["create_app"]

_MEDIA = {".gz": "application/gzip", ".png": "image/png", ".json": "application/json"}
_CHUNK = 1 << 20


# -- response and request models -----------------------------------------------------------
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


class TrainRequest(BaseModel):
    """A training job on a synthetic data set (the brain cohort, pendulum, ...)."""
    model_config = ConfigDict(extra="forbid")
    dataset: Literal["pendulum", "morphomnist", "circuit", "brain"] = "brain"
    name: str | None = Field(None, description="register the model under this name [the data set's]")
    steps: int = Field(100_000, ge=1, le=10_000_000)
    minutes: float | None = Field(12.0, gt=0, le=7 * 24 * 60, description="time budget; null = steps only")
    size: int | None = Field(None, ge=8, le=512)
    batch_size: int = Field(32, ge=1, le=4096)
    lr: float = Field(3e-4, gt=0, le=1.0)
    n_train: int = Field(10_000, ge=1, le=1_000_000)
    seed: int = Field(0, ge=0)
    eval_n: int = Field(32, ge=0, le=10_000)
    grid_rows: int = Field(6, ge=1, le=64)
    eval_steps: int = Field(50, ge=1, le=1000, description="DDIM steps of the end-of-training evaluation")
    model: dict[str, Any] | None = Field(None, description="CausalDiffAEConfig overrides, e.g. latent_dim")


class Problem(BaseModel):
    detail: str


# -- the upload size limit, enforced while the body is read ----------------------------------
class BodyLimit:
    """ASGI middleware: a request body over ``limit`` bytes is answered 413. With a Content-Length
    the answer comes before reading; otherwise reading stops at the limit (the app sees the client
    disconnect) and whatever the app answers is replaced by the 413."""

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        length = headers.get(b"content-length")
        too_large = JSONResponse({"detail": f"request body larger than the limit of {self.limit:,} bytes "
                                            "(CDAE_MAX_UPLOAD_MB)"}, status_code=413)
        if length is not None and length.isdigit() and int(length) > self.limit:
            return await too_large(scope, receive, send)
        seen, over, answered = 0, False, False

        async def limited_receive():
            nonlocal seen, over
            if over:
                return {"type": "http.disconnect"}
            msg = await receive()
            if msg["type"] == "http.request":
                seen += len(msg.get("body", b""))
                if seen > self.limit:  # the app sees the client go: it never runs on a cut-off body
                    over = True
                    return {"type": "http.disconnect"}
            return msg

        async def guarded_send(msg):
            nonlocal answered
            if over:
                if not answered:
                    answered = True
                    await too_large(scope, receive, send)
                return
            await send(msg)

        await self.app(scope, limited_receive, guarded_send)
        if over and not answered:
            await too_large(scope, receive, send)


# -- helpers ---------------------------------------------------------------------------------
def _unprocessable(detail: str) -> HTTPException:
    return HTTPException(status_code=422, detail=detail)


def _json_object(raw: str | None, field: str) -> dict[str, Any]:
    if raw is None or raw.strip() == "":
        return {}
    try:
        value = json.loads(raw)
    except ValueError as err:
        raise _unprocessable(f"{field}: not valid JSON ({err.msg} at position {err.pos}); "
                             'give an object such as {"age": 70}') from None
    if not isinstance(value, dict):
        raise _unprocessable(f'{field}: must be a JSON object such as {{"age": 70}}, got {type(value).__name__}')
    for k, v in value.items():
        ok = isinstance(v, str) or (isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v))
        if not ok:
            raise _unprocessable(f"{field}: {k!r} must be a number (or a level name for a binary variable), got {v!r}")
    return value


def _check_values(graph, values: dict[str, Any], field: str) -> dict[str, float]:
    from cdae_med.graph import GraphError
    from pipelines.cohort import parse_value

    out = {}
    for name, value in values.items():
        try:
            out[name] = parse_value(graph[name], value)
        except GraphError as err:
            raise _unprocessable(f"{field}: {err}") from None
    return out


def _sniff_nifti(head: bytes) -> str | None:
    """'input.nii.gz', 'input.nii' or None, from the first bytes of the upload."""
    if head[:2] == b"\x1f\x8b":
        return "input.nii.gz"
    if len(head) >= 348:
        for order in ("little", "big"):
            size = int.from_bytes(head[:4], order)
            if size == 348 and head[344:348] in (b"n+1\x00", b"ni1\x00"):
                return "input.nii"
            if size == 540 and head[4:8] in (b"n+2\x00", b"ni2\x00"):
                return "input.nii"
    return None


def _save_upload(upload: UploadFile, job_dir: Path, limit: int, stem: str = "input", field: str = "file") -> Path:
    """Copy the upload into the job folder as STEM.nii[.gz], the suffix chosen from its content."""
    src = upload.file
    src.seek(0)
    head = src.read(1024)
    name = _sniff_nifti(head)
    if name is None:
        raise _unprocessable(f"{field}: not a NIfTI file (expected a .nii or .nii.gz volume; "
                             "the content is neither gzip nor a NIfTI-1/2 header)")
    name = name.replace("input", stem, 1)
    job_dir.mkdir(parents=True, exist_ok=True)
    dest = job_dir / name
    total = len(head)
    with open(dest, "wb") as f:
        f.write(head)
        while chunk := src.read(_CHUNK):
            total += len(chunk)
            if total > limit:
                raise HTTPException(413, f"file larger than the limit of {limit:,} bytes")
            f.write(chunk)
    return dest


def _check_scan(path: Path, max_voxels: int, field: str = "file") -> None:
    from cdae_med.io import NiftiError, read_nifti

    try:
        read_nifti(path, max_voxels=max_voxels)
    except NiftiError as err:
        msg = str(err).replace(f"{path.name}: ", "", 1)
        raise _unprocessable(f"{field}: {msg}") from None


def _save_cohort(manifest: UploadFile, files: list[UploadFile], job_dir: Path, settings: Settings) -> str:
    """A manifest and the scans its rows name, stored as cohort/manifest.csv and cohort/scans/NNNNN.nii[.gz].
    The clients' file names only match rows to uploads; the stored paths are ours."""
    import csv
    import io
    from pathlib import PureWindowsPath

    from cdae_med.graph import builtin_graph
    from pipelines.cohort import ManifestError, read_manifest

    raw = manifest.file.read(8 * 1024 * 1024 + 1)
    if len(raw) > 8 * 1024 * 1024:
        raise HTTPException(413, "manifest: larger than 8 MiB")
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError:
        raise _unprocessable("manifest: not UTF-8 text (expected a CSV)") from None
    reader = csv.DictReader(io.StringIO(text))
    header = [h.strip() for h in (reader.fieldnames or [])]
    reader.fieldnames = header
    if "path" not in header:
        raise _unprocessable(f"manifest: no 'path' column (columns: {', '.join(header) or 'none'})")
    rows = list(reader)
    if not rows:
        raise _unprocessable("manifest: no rows")
    uploads: dict[str, UploadFile] = {}
    for up in files:
        base = PureWindowsPath(up.filename or "").name  # also strips any '/' or '\\' directories
        if not base:
            raise _unprocessable("files: an upload has no file name; names match the manifest's paths")
        if base in uploads:
            raise _unprocessable(f"files: two uploads are named {base!r}")
        uploads[base] = up
    cohort = job_dir / "cohort"
    used: dict[str, str] = {}
    for row_no, row in enumerate(rows, start=2):
        base = PureWindowsPath((row.get("path") or "").strip()).name
        if base not in uploads:
            raise _unprocessable(f"manifest row {row_no}: {row.get('path')!r} is not among the uploaded files "
                                 f"({', '.join(sorted(uploads)) or 'none'})")
        if base not in used:
            field = f"files[{base}]"
            dest = _save_upload(uploads[base], cohort / "scans", settings.max_upload_bytes,
                                stem=f"{len(used):05d}", field=field)
            _check_scan(dest, settings.max_voxels, field=field)
            used[base] = f"scans/{dest.name}"
        row["path"] = used[base]
    with open(cohort / "manifest.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=header, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    try:
        read_manifest(cohort / "manifest.csv", builtin_graph("brain"))
    except ManifestError as err:
        raise _unprocessable(f"manifest: {str(err).replace(str(cohort / 'manifest.csv') + ': ', '')}") from None
    return "cohort/manifest.csv"


def _job_out(job: JobView, base: str = "") -> JobOut:
    return JobOut(id=job.id, kind=job.kind, status=job.status, progress=job.progress, error=job.error,
                  files=[FileLink(name=f, url=f"{base}/v1/jobs/{job.id}/files/{f}") for f in job.files],
                  model=(job.result or {}).get("model") if job.kind == "train" else job.model_ref,
                  params={k: v for k, v in job.params.items() if k not in ("input", "data")},
                  result={k: v for k, v in (job.result or {}).items() if k != "model"} or None,
                  created_at=job.created_at, started_at=job.started_at, finished_at=job.finished_at,
                  attempts=job.attempts)


# -- the app ---------------------------------------------------------------------------------
def create_app(settings: Settings | None = None, sweep: bool = True) -> FastAPI:
    settings = settings or get_settings()
    from .sweep import Sweeper
    from .worker import declare_queues, make_celery, publish

    store = Store(settings.database_url)
    celery = make_celery(settings)

    def send(job: JobView) -> None:
        publish(celery, store, job)

    @asynccontextmanager
    async def lifespan(_app: FastAPI):
        sweeper = Sweeper(store, settings, send, lambda: declare_queues(celery)).start() if sweep else None
        yield
        if sweeper is not None:
            sweeper.stop()

    app = FastAPI(title="cdae-med counterfactual service", version="1",
                  description="Counterfactual brain MRI with Causal Diffusion Autoencoders. "
                              "Authenticate with the X-API-Key header.", lifespan=lifespan)
    app.state.settings, app.state.store, app.state.celery, app.state.send = settings, store, celery, send
    app.state.declare = lambda: declare_queues(celery)
    app.add_middleware(BodyLimit, limit=settings.max_upload_bytes)

    @app.exception_handler(RequestValidationError)
    async def _readable_422(_request: Request, exc: RequestValidationError):
        # One readable line ("interventions: Field required; ..."), the structured list beside it.
        parts = []
        for e in exc.errors():
            loc = [str(x) for x in e.get("loc", ()) if x not in ("body", "query", "path", "header", "form")]
            parts.append(f"{'.'.join(loc) or 'request'}: {e.get('msg', 'invalid')}")
        return JSONResponse({"detail": "; ".join(parts), "errors": jsonable_encoder(exc.errors())},
                            status_code=422)

    def api_key(x_api_key: Annotated[str | None, Header(alias="X-API-Key")] = None) -> int:
        if not x_api_key:
            raise HTTPException(401, "missing X-API-Key header", headers={"WWW-Authenticate": "X-API-Key"})
        key_id = store.authenticate(x_api_key)
        if key_id is None:
            raise HTTPException(401, "invalid or revoked API key", headers={"WWW-Authenticate": "X-API-Key"})
        return key_id

    Key = Annotated[int, Depends(api_key)]
    errors = {401: {"model": Problem}, 404: {"model": Problem}, 413: {"model": Problem}, 422: {"model": Problem}}

    def accept(job: JobView) -> JSONResponse:
        try:
            send(job)
        except Exception as err:  # the record is kept: the sweep sends it when the broker is back
            log.warning("job %s accepted but not yet queued (broker: %s); the sweep will queue it", job.id, err)
        url = f"/v1/jobs/{job.id}"
        return JSONResponse(Accepted(id=job.id, status=job.status, url=url).model_dump(), status_code=202,
                            headers={"Location": url})

    def resolve_model(ref: str | None):
        from pipelines.registry import RegistryError, resolve

        try:
            return resolve(ref or None, home=settings.home)
        except RegistryError as err:
            raise _unprocessable(f"model: {err}") from None

    @app.post("/v1/counterfactuals", status_code=202, response_model=Accepted, responses=errors,
              summary="Submit a counterfactual of one scan")
    def submit_counterfactual(
        key_id: Key,
        file: Annotated[UploadFile, File(description="a 3D NIfTI volume, .nii or .nii.gz")],
        interventions: Annotated[str, Form(description='JSON object, e.g. {"age": 70}')],
        model: Annotated[str | None, Form(description="registered model NAME or NAME:vN [the only one]")] = None,
        covariates: Annotated[str | None, Form(description='known factual values, JSON, e.g. {"sex": 1}')] = None,
    ):
        do = _json_object(interventions, "interventions")
        if not do:
            raise _unprocessable('interventions: give at least one, e.g. {"age": 70}')
        given = _json_object(covariates, "covariates")
        registered = resolve_model(model)
        if registered.meta.get("image", {}).get("preprocessing") is None:
            raise _unprocessable(f"model: {registered.ref} was trained on {registered.dataset!r} images, not scans")
        graph = registered.graph
        do = _check_values(graph, do, "interventions")
        given = _check_values(graph, given, "covariates")
        job_id = uuid.uuid4().hex
        job_dir = settings.job_dir(job_id)
        try:
            path = _save_upload(file, job_dir, settings.max_upload_bytes)
            _check_scan(path, settings.max_voxels)
        except BaseException:
            shutil.rmtree(job_dir, ignore_errors=True)
            raise
        job = store.create_job("counterfactual", key_id, job_id=job_id, model_ref=registered.ref,
                               params={"interventions": do, "covariates": given, "input": path.name})
        return accept(job)

    @app.post("/v1/training-jobs", status_code=202, response_model=Accepted, responses=errors,
              summary="Submit a training job; the model is registered when it finishes")
    def submit_training(key_id: Key, req: TrainRequest):
        check_train_request(req)
        job = store.create_job("train", key_id, params=req.model_dump())
        return accept(job)

    def check_train_request(req: TrainRequest) -> None:
        from pipelines.registry import RegistryError, check_name

        if req.name is not None:
            try:
                check_name(req.name)
            except RegistryError as err:
                raise _unprocessable(f"name: {err}") from None
        if req.model:
            from dataclasses import fields

            from cdae_med.model import CausalDiffAEConfig

            known = {f.name for f in fields(CausalDiffAEConfig)} - {"spatial_dims", "in_channels", "image_size"}
            unknown = sorted(set(req.model) - known)
            if unknown:
                raise _unprocessable(f"model: unknown settings {unknown}; known: {sorted(known)}")

    @app.post("/v1/training-jobs/cohort", status_code=202, response_model=Accepted, responses=errors,
              summary="Submit a training job on uploaded scans: a manifest CSV and the NIfTI files it names")
    def submit_training_cohort(
        key_id: Key,
        manifest: Annotated[UploadFile, File(description="CSV: subject_id, path, one column per graph variable")],
        files: Annotated[list[UploadFile], File(description="the scans; each matched to a row by its file name")],
        params: Annotated[str, Form(description="training parameters as JSON, as for /v1/training-jobs")] = "{}",
    ):
        from pydantic import ValidationError

        try:
            values = json.loads(params or "{}")
        except ValueError as err:
            raise _unprocessable(f"params: not valid JSON ({err})") from None
        if not isinstance(values, dict):
            raise _unprocessable("params: must be a JSON object of training parameters")
        try:
            req = TrainRequest(**values)
        except ValidationError as err:
            raise _unprocessable("params: " + "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}"
                                                        for e in err.errors())) from None
        if req.dataset != "brain":
            raise _unprocessable("params: a cohort of scans trains a brain model (dataset 'brain')")
        check_train_request(req)
        job_id = uuid.uuid4().hex
        job_dir = settings.job_dir(job_id)
        try:
            data = _save_cohort(manifest, files, job_dir, settings)
        except BaseException:
            shutil.rmtree(job_dir, ignore_errors=True)
            raise
        job = store.create_job("train", key_id, job_id=job_id, params={**req.model_dump(), "data": data})
        return accept(job)

    @app.get("/v1/jobs/{job_id}", response_model=JobOut, responses=errors, summary="A job's status")
    def get_job(job_id: str, key_id: Key):
        job = store.get_job(job_id, key_id)
        if job is None:
            raise HTTPException(404, f"no job {job_id!r}")
        return _job_out(job)

    @app.get("/v1/jobs", response_model=list[JobOut], responses=errors, summary="This key's jobs, newest first")
    def list_jobs(key_id: Key, limit: int = 100):
        return [_job_out(j) for j in store.list_jobs(key_id, limit=max(1, min(limit, 1000)))]

    @app.get("/v1/jobs/{job_id}/files/{name}", responses=errors, response_class=FileResponse,
             summary="Download an output: counterfactual.nii.gz, difference.nii.gz, preview.png, report.json")
    def get_file(job_id: str, name: str, key_id: Key):
        job = store.get_job(job_id, key_id)
        if job is None:
            raise HTTPException(404, f"no job {job_id!r}")
        if name not in job.files:  # names come from the worker's fixed list, never from a request
            raise HTTPException(404, f"job {job_id} has no file {name!r}"
                                     + (f"; it has {', '.join(job.files)}" if job.files else f" (it is {job.status})"))
        path = settings.job_dir(job.id) / "out" / name
        if not path.is_file():
            raise HTTPException(404, f"file {name!r} of job {job_id} is no longer stored")
        suffix = "".join(Path(name).suffixes[-1:])
        return FileResponse(path, media_type=_MEDIA.get(suffix, "application/octet-stream"), filename=name)

    @app.get("/v1/models", response_model=list[ModelOut], responses=errors, summary="Registered models (newest versions)")
    def models(key_id: Key, all_versions: bool = False):
        from pipelines.registry import list_models

        return [ModelOut(**{k: v for k, v in m.summary().items() if k in ModelOut.model_fields})
                for m in list_models(settings.home, all_versions=all_versions)]

    @app.get("/healthz", summary="The API process is up")
    def healthz():
        return {"status": "ok"}

    @app.get("/readyz", summary="The database and the broker answer", responses={503: {"model": dict}})
    def readyz():
        checks: dict[str, str] = {}
        try:
            store.ping()
            checks["database"] = "ok"
        except Exception as err:
            checks["database"] = f"error: {type(err).__name__}: {err}"
        try:
            with celery.connection_for_write() as conn:
                conn.ensure_connection(max_retries=1, timeout=3)
                conn.default_channel.client.ping() if hasattr(conn.default_channel, "client") else None
            checks["broker"] = "ok"
        except Exception as err:
            checks["broker"] = f"error: {type(err).__name__}: {err}"
        ok = all(v == "ok" for v in checks.values())
        return JSONResponse({"status": "ready" if ok else "not ready", "checks": checks},
                            status_code=200 if ok else 503)

    from .web import add_web  # the page at / and the slice PNGs it shows, under the same key rules

    add_web(app, settings, store, api_key)
    return app
