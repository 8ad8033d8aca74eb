"""Cohort manifests: a CSV with ``subject_id``, ``path`` and one column per graph variable.

Paths are resolved against the CSV's folder. A variable's column is named as the variable
(``age``) or the variable with a unit suffix (``brain_volume_ml``, as the brain generator
writes it). Binary variables whose unit names their levels (``0=female, 1=male``) accept the
level names or their initials (``F``/``M``) as well as 0/1. Every problem is reported with its
row number; nothing is dropped silently.
"""

from __future__ import annotations

import csv
import re
from dataclasses import dataclass, field
from pathlib import Path

from cdae_med.graph import CausalGraph, GraphError
from cdae_med.values import parse_value
from cdae_med.io import is_nifti

__all__ = ["ManifestError", "Subject", "read_manifest", "subjects_in_folder", "variable_columns"]


class ManifestError(ValueError):
    """A manifest that cannot be used; the message lists every bad row."""


@dataclass
class Subject:
    subject_id: str
    path: Path
    values: dict[str, float] = field(default_factory=dict)  # the graph variables the manifest gives


def variable_columns(header: list[str], graph: CausalGraph) -> dict[str, str]:
    """Graph variable -> the manifest column holding it."""
    found = {}
    for var in graph.variables:
        matches = [c for c in header if c == var.name or c.startswith(var.name + "_") and c not in graph.names]
        if len(matches) > 1:
            raise ManifestError(f"columns {matches} could all be {var.name!r}; keep one")
        if matches:
            found[var.name] = matches[0]
    return found


def read_manifest(csv_path: str | Path, graph: CausalGraph, require_all: bool = True) -> list[Subject]:
    """Subjects of a manifest. ``require_all``: every graph variable must have a column and a value
    in every row (training); otherwise the columns present are read as known covariates."""
    csv_path = Path(csv_path)
    if not csv_path.is_file():
        raise ManifestError(f"{csv_path}: no such manifest")
    with open(csv_path, newline="") as fh:
        reader = csv.DictReader(fh)
        header = [h.strip() for h in (reader.fieldnames or [])]
        reader.fieldnames = header
        rows = list(reader)
    for col in ("subject_id", "path"):
        if col not in header:
            raise ManifestError(f"{csv_path}: no {col!r} column (columns: {', '.join(header) or 'none'})")
    columns = variable_columns(header, graph)
    missing = [v for v in graph.names if v not in columns]
    if require_all and missing:
        raise ManifestError(f"{csv_path}: no column for {', '.join(missing)} (a column per graph variable, "
                            f"named as the variable, optionally with a unit suffix such as brain_volume_ml)")
    subjects, problems, seen = [], [], set()
    for row_no, row in enumerate(rows, start=2):  # row 1 is the header
        sid = (row.get("subject_id") or "").strip()
        rel = (row.get("path") or "").strip()
        errs = []
        if not sid:
            errs.append("empty subject_id")
        elif sid in seen:
            errs.append(f"subject_id {sid!r} repeats an earlier row")
        elif not re.fullmatch(r"[\w.-]+", sid):
            errs.append(f"subject_id {sid!r} may hold only letters, digits, '.', '_' and '-'")
        path = (csv_path.parent / rel) if rel else None
        if path is None:
            errs.append("empty path")
        elif not is_nifti(path):
            errs.append(f"{rel!r} is not a .nii or .nii.gz file")
        elif not path.is_file():
            errs.append(f"{rel!r} does not exist")
        values = {}
        for name, col in columns.items():
            text = (row.get(col) or "").strip()
            if not text:
                if require_all:
                    errs.append(f"{col} is empty")
                continue
            try:
                values[name] = parse_value(graph[name], text)
            except GraphError as err:
                errs.append(str(err) if col == name else f"{col}: {err}")
        if errs:
            problems.append(f"row {row_no}: " + "; ".join(errs))
        else:
            seen.add(sid)
            subjects.append(Subject(sid, path, values))
    if problems:
        shown = problems[:20] + ([f"... and {len(problems) - 20} more rows"] if len(problems) > 20 else [])
        raise ManifestError(f"{csv_path}: {len(problems)} bad row(s):\n  " + "\n  ".join(shown))
    if not subjects:
        raise ManifestError(f"{csv_path}: no subjects")
    return subjects


def subjects_in_folder(folder: str | Path) -> list[Subject]:
    """Every .nii/.nii.gz file of a folder (not recursive), named by its file name without suffix."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ManifestError(f"{folder}: no such folder")
    files = sorted(p for p in folder.iterdir() if p.is_file() and is_nifti(p) and not p.name.startswith("."))
    if not files:
        raise ManifestError(f"{folder}: no .nii or .nii.gz files")
    subjects = []
    for p in files:
        sid = re.sub(r"\.nii(\.gz)?$", "", p.name, flags=re.IGNORECASE)
        subjects.append(Subject(re.sub(r"[^\w.-]", "_", sid), p))
    return subjects


def load_cohort(data: str | Path, graph: CausalGraph, prep, progress: bool = True, reference=None):
    """Images (N, *grid, 1) float32 in [0, 1] on the model's grid, labels (N, n_vars) and, for a
    registered model, the scans' registration volume ratios (N,) (else None) of a cohort (a manifest
    CSV, or a folder holding ``manifest.csv``), preprocessed as at inference."""
    import numpy as np
    from tqdm.auto import tqdm

    from cdae_med.io import NiftiError

    from .mri import prepare, reference_mask

    data = Path(data)
    csv_path = data / "manifest.csv" if data.is_dir() else data
    subjects = read_manifest(csv_path, graph, require_all=True)
    images, ratios, problems = [], [], []
    mask = reference_mask(reference, prep) if reference is not None else None
    for s in tqdm(subjects, desc="preprocess cohort", unit="scan", disable=not progress):
        try:
            prepared = prepare(s.path, prep, reference=reference, mask=mask)
            images.append(prepared.image[0])
            if prepared.registration is not None:
                ratios.append(prepared.registration.volume_ratio)
        except (NiftiError, ValueError) as err:
            problems.append(f"{s.subject_id}: {err}")
    if problems:
        raise ManifestError(f"{csv_path}: {len(problems)} scan(s) could not be read:\n  " + "\n  ".join(problems[:20]))
    labels = np.array([[s.values[n] for n in graph.names] for s in subjects], dtype=np.float64)
    return np.stack(images)[..., None].astype(np.float32), labels, (np.array(ratios) if ratios else None)
