"""What a multipart request uploads: JSON form fields; a NIfTI volume, recognised by its content
and stored under a name of ours; a cohort (a manifest CSV and the scans its rows name) stored as
a manifest the trainer reads.

A client's file name is never used as a path: a scan is stored as ``input.nii[.gz]`` (or
``NNNNN.nii[.gz]`` in a cohort), the suffix chosen from its first bytes; a cohort's file names
only match rows to uploads. Every check runs before the job is accepted, so a bad upload is a
4xx with the reason and never a failed job.
"""

from __future__ import annotations

import csv
import io
import shutil
import uuid
from contextlib import contextmanager
from pathlib import Path, PureWindowsPath
from typing import Any, Iterator

from fastapi import HTTPException, UploadFile

from cdae_med.io import NiftiError, ScanLimits, check_nifti_file

from .config import Settings
from .deps import unprocessable
from .strict_json import JSONProblem, loads

__all__ = ["json_object", "sniff_nifti", "save_upload", "check_scan", "save_cohort", "new_job_dir"]

_CHUNK = 1 << 20
_MAX_MANIFEST = 8 * 1024 * 1024


@contextmanager
def new_job_dir(settings: Settings) -> Iterator[tuple[str, Path]]:
    """A fresh job id and its folder; the folder is removed if the block raises (a refused
    upload leaves nothing behind)."""
    job_id = uuid.uuid4().hex
    job_dir = settings.job_dir(job_id)
    try:
        yield job_id, job_dir
    except BaseException:
        shutil.rmtree(job_dir, ignore_errors=True)
        raise


def json_object(raw: str | None, field: str, example: str = '{"age": 70}') -> dict[str, Any]:
    """A multipart form field holding a JSON object ({} when empty); 422 if it is not one."""
    if raw is None or raw.strip() == "":
        return {}
    try:
        value = loads(raw)
    except JSONProblem as err:
        raise unprocessable(f"{field}: {err}; give an object such as {example}") from None
    if not isinstance(value, dict):
        raise unprocessable(f"{field}: must be a JSON object such as {example}, got {type(value).__name__}")
    return value


def sniff_nifti(head: bytes) -> str | None:
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


def save_upload(upload: UploadFile, job_dir: Path, limit: int, stem: str = "input", field: str = "file") -> Path:
    """Copy the upload into the job folder as STEM.nii[.gz], the suffix chosen from its content."""
    src = upload.file
    src.seek(0)
    head = src.read(1024)
    name = sniff_nifti(head)
    if name is None:
        raise unprocessable(f"{field}: not a NIfTI file (expected a .nii or .nii.gz volume; "
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


def check_scan(path: Path, limits: ScanLimits, field: str = "file") -> None:
    """Check the stored volume as the worker will read it, its header against ``limits`` first and
    then its data streamed a megabyte at a time (never the whole volume in memory); 422 with the
    reason if it cannot be used."""
    try:
        check_nifti_file(path, limits)
    except NiftiError as err:
        msg = str(err).replace(f"{path.name}: ", "", 1)
        raise unprocessable(f"{field}: {msg}") from None


def _manifest_rows(manifest: UploadFile) -> tuple[list[str], list[dict[str, str]]]:
    raw = manifest.file.read(_MAX_MANIFEST + 1)
    if len(raw) > _MAX_MANIFEST:
        raise HTTPException(413, "manifest: larger than 8 MiB")
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError:
        raise unprocessable("manifest: not UTF-8 text (expected a CSV)") from None
    reader = csv.DictReader(io.StringIO(text))
    header = [h.strip() for h in (reader.fieldnames or [])]
    reader.fieldnames = header
    if "path" not in header:
        raise unprocessable(f"manifest: no 'path' column (columns: {', '.join(header) or 'none'})")
    rows = list(reader)
    if not rows:
        raise unprocessable("manifest: no rows")
    return header, rows


def _by_name(files: list[UploadFile]) -> dict[str, UploadFile]:
    uploads: dict[str, UploadFile] = {}
    for up in files:
        base = PureWindowsPath(up.filename or "").name  # also strips any '/' or '\\' directories
        if not base:
            raise unprocessable("files: an upload has no file name; names match the manifest's paths")
        if base in uploads:
            raise unprocessable(f"files: two uploads are named {base!r}")
        uploads[base] = up
    return uploads


def save_cohort(manifest: UploadFile, files: list[UploadFile], job_dir: Path, settings: Settings) -> str:
    """A manifest and the scans its rows name, stored as cohort/manifest.csv and
    cohort/scans/NNNNN.nii[.gz]; returns the manifest's path in the job folder. The rows are
    read as training will read them (every graph variable, each value checked)."""
    from cdae_med.graph import builtin_graph
    from pipelines.cohort import ManifestError, read_manifest

    header, rows = _manifest_rows(manifest)
    uploads = _by_name(files)
    cohort = job_dir / "cohort"
    used: dict[str, str] = {}
    for row_no, row in enumerate(rows, start=2):
        base = PureWindowsPath((row.get("path") or "").strip()).name
        if base not in uploads:
            raise unprocessable(f"manifest row {row_no}: {row.get('path')!r} is not among the uploaded files "
                                f"({', '.join(sorted(uploads)) or 'none'})")
        if base not in used:
            field = f"files[{base}]"
            dest = save_upload(uploads[base], cohort / "scans", settings.max_upload_bytes,
                               stem=f"{len(used):05d}", field=field)
            check_scan(dest, settings.scan_limits, field=field)
            used[base] = f"scans/{dest.name}"
        row["path"] = used[base]
    with open(cohort / "manifest.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=header, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    try:
        read_manifest(cohort / "manifest.csv", builtin_graph("brain"))
    except ManifestError as err:
        raise unprocessable(f"manifest: {str(err).replace(str(cohort / 'manifest.csv') + ': ', '')}") from None
    return "cohort/manifest.csv"
