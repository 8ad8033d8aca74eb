"""Counterfactuals of many scans (``cdae-med batch``): ``out_dir/SUBJECT_ID/`` per scan, then
``out_dir/summary.csv``.

A subject's outputs are reused by a rerun only for the same request. Its ``report.json`` records
the request and a key over it: the scan's content (SHA-256), the model's identity (SHA-256 of
its checkpoint folder's files but ``training.pt``), the interventions, the subject's covariates and the
decoding settings (DDIM steps, depth, guidance). A subject whose recorded key differs, or who
has no report, is computed again, and its old outputs are removed before any new one is
written, so a folder never holds one request's report beside another's images.

Two subjects whose output folders would be one folder (the same id, or ids that differ only
in case, such as ``colin.nii`` and ``colin.nii.gz`` of a ``--folder``) stop the batch before
any work, with an error naming them.
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import time
from collections import defaultdict
from pathlib import Path
from typing import Any, Iterable, Mapping

from cdae_med.graph import GraphError

from .cohort import Subject
from .mri import PreparedScan
from .scans import OUTPUT_FILES, ScanError, ScanModel

__all__ = ["BatchError", "SUMMARY_FILE", "run_batch", "request_record", "model_identity", "check_unique"]

log = logging.getLogger("cdae_med")

SUMMARY_FILE = "summary.csv"
_PARTIAL = ".report.json.partial"  # what ScanModel writes before renaming it to report.json


class BatchError(ValueError):
    """A batch that cannot start (its outputs would be ambiguous); the message names the subjects."""


def file_sha256(path: Path) -> str:
    with open(path, "rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()


def model_identity(model: ScanModel) -> dict[str, Any]:
    """Where the model's checkpoint is, its training step and a digest of its files (all but the
    optimizer state, which inference does not read): a model retrained in the same folder is
    another model."""
    path = Path(model.checkpoint.path)
    digest = hashlib.sha256()
    for f in sorted(p for p in path.iterdir() if p.is_file() and p.name != "training.pt"):
        digest.update(f"{f.name}:{file_sha256(f)}\n".encode())
    return {"checkpoint": str(path.resolve()), "step": model.checkpoint.step, "sha256": digest.hexdigest()}


def request_record(scan_sha256: str, model: dict[str, Any], do: Mapping[str, float],
                   covariates: Mapping[str, float], settings: Mapping[str, float]) -> dict[str, Any]:
    """What a subject's outputs were made from, with ``key``: a digest of all of it."""
    record = {"scan_sha256": scan_sha256, "model": dict(model), "interventions": dict(do),
              "covariates": dict(covariates), "settings": dict(settings)}
    canonical = json.dumps(record, sort_keys=True, separators=(",", ":"))
    return {"key": hashlib.sha256(canonical.encode()).hexdigest(), **record}


def check_unique(subjects: list[Subject]) -> None:
    """Refuse subjects that would share an output folder (compared without case, as a
    case-insensitive file system would)."""
    groups: dict[str, list[Subject]] = defaultdict(list)
    for s in subjects:
        groups[s.subject_id.casefold()].append(s)
    clashes = [g for g in groups.values() if len(g) > 1]
    if clashes:
        shown = "; ".join(" and ".join(f"{s.path.name} (as {s.subject_id!r})" for s in g) for g in clashes[:10])
        more = f" and {len(clashes) - 10} more" if len(clashes) > 10 else ""
        raise BatchError(f"{len(clashes)} output folder(s) would each hold two scans: {shown}{more}; "
                         "rename one of each, or list them in a manifest with distinct subject_ids")


def _finished(folder: Path, key: str) -> dict | None:
    """The subject's report if its outputs are complete and were made for this request."""
    try:
        report = json.loads((folder / "report.json").read_text())
    except (OSError, ValueError):
        return None
    request = report.get("request") if isinstance(report, dict) else None
    if not isinstance(request, dict) or request.get("key") != key:
        return None
    if not all((folder / f).is_file() for f in OUTPUT_FILES):
        return None
    return report


def _clear(folder: Path) -> None:
    """Remove a subject's outputs (of another request, or unfinished), the report first so that a
    crash part-way leaves the subject unfinished; nothing else in the folder is touched."""
    for name in ("report.json", _PARTIAL, *OUTPUT_FILES):
        (folder / name).unlink(missing_ok=True)


def run_batch(model: ScanModel, subjects: Iterable[Subject], do: Mapping[str, float | str], out_dir,
              batch_size: int = 4, progress: bool = True) -> Path:
    """Counterfactuals of many scans, ``batch_size`` at a time, into ``out_dir/SUBJECT_ID/``.

    A subject finished earlier for the same request is kept ("done earlier"); a subject that
    fails is recorded with its reason and the batch goes on. Writes and returns
    ``out_dir/summary.csv`` (a row per subject: status ``done``, ``done earlier`` or ``failed``).
    Raises :class:`BatchError` before any work if two subjects would share a folder.
    """
    from tqdm.auto import tqdm

    subjects = list(subjects)
    check_unique(subjects)
    do = model.interventions(do)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    names = model.graph.names
    identity = model_identity(model)
    settings = {"ddim_steps": model.num_steps, "depth": model.depth, "guidance": model.guidance,
                "realisation": model.realisation, "residual": model.residual}
    rows: dict[str, dict] = {}

    def record(s: Subject, status: str, error: str = "", report: dict | None = None, seconds: float = 0.0,
               request: dict | None = None):
        row = {"subject_id": s.subject_id, "input": s.path.name, "status": status, "error": error,
               "seconds": f"{seconds:.2f}", "request": (request or {}).get("key", "")[:16]}
        for n in names:
            row[f"cf_{n}"] = f"{report['counterfactual'][n]['value']:.6g}" if report else ""
        rows[s.subject_id] = row

    pending: list[tuple[Subject, dict, dict]] = []
    for s in subjects:
        try:
            given = model.covariates(s.values)
            request = request_record(file_sha256(s.path), identity, do, given, settings)
        except GraphError as err:
            record(s, "failed", str(err))
            continue
        except OSError as err:
            record(s, "failed", f"{s.path.name}: cannot be read ({err.strerror or err})")
            continue
        folder = out_dir / s.subject_id
        try:
            earlier = _finished(folder, request["key"])
            if earlier is not None:
                record(s, "done earlier", report=earlier, request=request)
                continue
            _clear(folder)
        except (KeyError, TypeError) as err:  # a report of another layout: computed again
            log.info("%s: earlier report not usable (%s); computing again", s.subject_id, err)
            _clear(folder)
        pending.append((s, given, request))
    bar = tqdm(total=len(subjects), initial=len(subjects) - len(pending), desc="counterfactuals", unit="scan",
               disable=not progress, dynamic_ncols=True)
    for start in range(0, len(pending), batch_size):
        chunk = pending[start:start + batch_size]
        t0 = time.perf_counter()
        ready: list[tuple[Subject, PreparedScan, dict, dict]] = []
        for s, given, request in chunk:
            try:
                ready.append((s, model.prepare(s.path), given, request))
            except ScanError as err:
                log.warning("skipped %s: %s", s.subject_id, err)
                record(s, "failed", str(err), request=request)
                bar.update(1)
        if not ready:
            continue
        try:
            results = model._infer([p for _, p, _, _ in ready], do, [g for _, _, g, _ in ready])
        except (RuntimeError, ValueError) as err:
            for s, _, _, request in ready:
                record(s, "failed", f"inference failed: {err}", request=request)
            bar.update(len(ready))
            continue
        seconds = (time.perf_counter() - t0) / len(ready)
        for (s, p, given, request), r in zip(ready, results):
            try:
                report = model._report(p, r, do, given, seconds)
                report["request"] = request
                model._write(out_dir / s.subject_id, p, r, report)
                record(s, "done", report=report, seconds=seconds, request=request)
            except OSError as err:
                record(s, "failed", f"could not write outputs: {err}", request=request)
            bar.update(1)
    bar.close()
    summary = out_dir / SUMMARY_FILE
    with open(summary, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=["subject_id", "input", "status", "error", "seconds", "request",
                                                *[f"cf_{n}" for n in names]])
        writer.writeheader()
        writer.writerows(rows[s.subject_id] for s in subjects)
    return summary
