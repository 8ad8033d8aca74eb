"""`cdae-med batch` integrity: outputs are reused only for the same scan and request, two scans
never share an output folder, and the exit status counts the failures. Real scans from the
brain generator, the shipped 16^3 model, 2 DDIM steps."""

import csv
import gzip
import json
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from cdae_cli import app
from pipelines.batch import BatchError, run_batch
from pipelines.cohort import read_manifest, subjects_in_folder
from pipelines.scans import OUTPUT_FILES, ScanModel
from synthetic_data import brain

MODEL = Path(__file__).parent / "assets" / "brain16-tiny"


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    out = tmp_path_factory.mktemp("cohort")
    brain.write_dataset(out, n=3, size=16, seed=5, progress=False)
    return out


@pytest.fixture(scope="module")
def model():
    return ScanModel.load(MODEL, device="cpu", num_steps=2)


def _rows(summary: Path) -> dict[str, dict]:
    return {r["subject_id"]: r for r in csv.DictReader(open(summary))}


def _statuses(summary: Path) -> list[str]:
    rows = _rows(summary)
    return [rows[k]["status"] for k in sorted(rows)]


def _folder(tmp_path: Path, cohort: Path) -> Path:
    folder = tmp_path / "in"
    folder.mkdir()
    for f in sorted(cohort.glob("*.nii.gz")):
        shutil.copy(f, folder)
    return folder


def test_a_changed_request_is_computed_again(tmp_path, cohort, model):
    folder, out = _folder(tmp_path, cohort), tmp_path / "out"
    s = run_batch(model, subjects_in_folder(folder), {"age": 80}, out, batch_size=2, progress=False)
    assert _statuses(s) == ["done"] * 3
    first = json.loads((out / "sub-00000" / "report.json").read_text())["request"]
    assert first["interventions"] == {"age": 80.0} and len(first["key"]) == 64
    assert first["model"]["sha256"] and first["settings"] == {"ddim_steps": 2, "depth": 1.0, "guidance": 1.0,
                                                           "realisation": "intensity", "residual": "upsampled"}

    s = run_batch(model, subjects_in_folder(folder), {"age": 80}, out, batch_size=2, progress=False)
    assert _statuses(s) == ["done earlier"] * 3  # the same request: kept

    s = run_batch(model, subjects_in_folder(folder), {"age": 40}, out, batch_size=2, progress=False)
    assert _statuses(s) == ["done"] * 3  # another intervention: never the old outputs
    for sub in ("sub-00000", "sub-00001", "sub-00002"):
        report = json.loads((out / sub / "report.json").read_text())
        assert report["interventions"] == {"age": 40.0} and report["counterfactual"]["age"]["value"] == 40.0
    assert {r["cf_age"] for r in _rows(s).values()} == {"40"}

    # other decoding settings, and another model file, are other requests too
    for other in (ScanModel.load(MODEL, device="cpu", num_steps=3),
                  ScanModel.load(MODEL, device="cpu", num_steps=2, guidance=2.0)):
        s = run_batch(other, subjects_in_folder(folder), {"age": 40}, out, batch_size=3, progress=False)
        assert _statuses(s) == ["done"] * 3
    copy = tmp_path / "model"
    shutil.copytree(MODEL, copy)
    meta = json.loads((copy / "checkpoint.json").read_text())
    meta["step"] = meta.get("step", 0) + 1  # as if trained further in the same folder
    (copy / "checkpoint.json").write_text(json.dumps(meta))
    s = run_batch(ScanModel.load(copy, device="cpu", num_steps=2, guidance=2.0), subjects_in_folder(folder),
                  {"age": 40}, out, batch_size=3, progress=False)
    assert _statuses(s) == ["done"] * 3


def test_changed_scan_or_covariates_recompute_only_that_subject(tmp_path, cohort, model):
    out = tmp_path / "out"
    manifest = tmp_path / "manifest.csv"
    rows = list(csv.DictReader(open(cohort / "manifest.csv")))
    keep = ["subject_id", "path", "sex"]

    def write(rows):
        with open(manifest, "w", newline="") as fh:
            w = csv.DictWriter(fh, fieldnames=keep)
            w.writeheader()
            w.writerows({"subject_id": r["subject_id"], "path": str(cohort / r["path"]), "sex": r["sex"]}
                        for r in rows)

    write(rows)
    assert _statuses(run_batch(model, read_manifest(manifest, model.graph, require_all=False), {"age": 70}, out,
                               progress=False)) == ["done"] * 3
    rows[1]["sex"] = "1" if float(rows[1]["sex"]) == 0 else "0"
    write(rows)
    s = run_batch(model, read_manifest(manifest, model.graph, require_all=False), {"age": 70}, out, progress=False)
    assert _statuses(s) == ["done earlier", "done", "done earlier"]
    assert json.loads((out / "sub-00001" / "report.json").read_text())["request"]["covariates"]["sex"] == \
        float(rows[1]["sex"])

    # a scan replaced under the same name is another scan; if it now fails, no old output is left
    scan = tmp_path / "sub-00002.nii.gz"
    shutil.copy(cohort / rows[2]["path"], scan)
    rows[2]["path"] = str(scan)
    write(rows)
    subjects = read_manifest(manifest, model.graph, require_all=False)
    assert _statuses(run_batch(model, subjects, {"age": 70}, out, progress=False)) == ["done earlier"] * 3
    scan.write_bytes(gzip.compress(b"\0" * 400))
    s = run_batch(model, subjects, {"age": 70}, out, progress=False)
    assert _statuses(s) == ["done earlier", "done earlier", "failed"]
    assert not any((out / "sub-00002" / f).exists() for f in OUTPUT_FILES)


def test_two_scans_never_share_an_output_folder(tmp_path, cohort, model):
    folder = tmp_path / "in"
    folder.mkdir()
    src = sorted(cohort.glob("*.nii.gz"))
    shutil.copy(src[0], folder / "colin.nii.gz")
    shutil.copy(src[1], folder / "colin.nii.gz.tmp")
    (folder / "colin.nii.gz.tmp").rename(folder / "Colin.nii.gz")  # differs only in case
    shutil.copy(src[2], folder / "other.nii.gz")
    with pytest.raises(BatchError, match=r"1 output folder\(s\) would each hold two scans: Colin.nii.gz"):
        run_batch(model, subjects_in_folder(folder), {"age": 70}, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()  # refused before any work

    import nibabel as nib

    (folder / "Colin.nii.gz").unlink()
    nib.save(nib.load(src[1]), folder / "colin.nii")  # an uncompressed scan of the same stem
    res = CliRunner().invoke(app, ["batch", "--checkpoint", str(MODEL), "--folder", str(folder), "--do", "age=70",
                                   "--out-dir", str(tmp_path / "out"), "--steps", "2", "--quiet", "--device", "cpu"])
    assert res.exit_code == 2, res.output
    assert "colin.nii (as 'colin') and colin.nii.gz (as 'colin')" in res.output


def test_cli_exit_status_counts_failed_scans(tmp_path, cohort):
    folder = _folder(tmp_path, cohort)
    (folder / "broken.nii.gz").write_bytes(gzip.compress(b"\0" * 100))
    args = ["batch", "--checkpoint", str(MODEL), "--folder", str(folder), "--do", "age=70",
            "--out-dir", str(tmp_path / "out"), "--steps", "2", "--quiet", "--device", "cpu"]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 1, res.output
    assert "3 done, 0 done earlier, 1 failed" in res.output and "1 of 4 scans failed" in res.output
    (folder / "broken.nii.gz").unlink()
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0 and "0 done, 3 done earlier, 0 failed" in res.output, res.output
