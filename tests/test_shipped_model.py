"""The brain model that ships with cdae-med (pipelines/models/brain): a fresh install registers and
runs it without training, a null intervention returns the scan exactly, and do(age) on held-out
2 mm subjects moves the scan towards the generator's true counterfactual."""

import json
import os
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest

from cdae_med.io import write_nifti
from pipelines.registry import SHIPPED, resolve
from pipelines.scans import ScanModel
from synthetic_data import brain

FINE = 96  # 2 mm
SHIPPED_BRAIN = SHIPPED["brain"]


@pytest.fixture(scope="module")
def model():
    return ScanModel.load(SHIPPED_BRAIN, device="cpu", num_steps=20)


@pytest.fixture(scope="module")
def subjects(tmp_path_factory):
    """Four held-out subjects at 2 mm (a seed no training run or benchmark uses), as NIfTI files."""
    d = tmp_path_factory.mktemp("shipped")
    s = brain.sample(4, seed=3_000_017, size=FINE)
    paths = []
    for i, v in enumerate(s.images[..., 0]):
        paths.append(d / f"sub-{i}.nii.gz")
        write_nifti(paths[-1], v, brain.affine(FINE))
    return s, paths


def test_the_shipped_model_is_small_and_registers_on_first_use(tmp_path):
    size = sum(f.stat().st_size for f in SHIPPED_BRAIN.iterdir())
    assert size < 12e6, f"{size / 1e6:.1f} MB"
    assert (SHIPPED_BRAIN / "README.md").is_file()  # how it was made
    m = resolve("brain", home=tmp_path)  # a fresh registry
    assert m.ref == "brain:v1" and m.promoted and m.source.startswith("shipped with cdae-med")
    assert resolve(home=tmp_path).ref == "brain:v1" and resolve("brain", home=tmp_path).version == 1  # once
    assert m.meta["model"]["latent_components"] > 0 and m.meta["model"]["latent_shape_components"] > 0


def test_null_interventions_return_the_scan_exactly(tmp_path, model, subjects):
    s, paths = subjects
    age = float(s.labels[0, 0])
    model.run(paths[0], {"age": age}, tmp_path / "given", covariates={"age": age, "sex": float(s.labels[0, 1])})
    assert np.abs(nib.load(tmp_path / "given" / "difference.nii.gz").get_fdata()).max() == 0.0
    # without covariates: do(brain_volume = the model's own estimate, as its report gives it)
    report = model.run(paths[1], {"age": 70.0}, tmp_path / "first")
    estimate = report["factual"]["brain_volume"]["value"]
    model.run(paths[1], {"brain_volume": estimate}, tmp_path / "own")
    assert np.abs(nib.load(tmp_path / "own" / "difference.nii.gz").get_fdata()).max() == 0.0


def test_age_counterfactual_is_closer_to_the_truth_than_the_input(tmp_path, model, subjects):
    s, paths = subjects
    age, sex = s.labels[:, 0], s.labels[:, 1]
    target = np.where(age < 65, age + 20, age - 20)
    truth = brain.counterfactual(s, {"age": target}, size=FINE)
    mae, copy, moved = [], [], []
    bv = brain.VARIABLES.index("brain_volume")
    for i, path in enumerate(paths):
        out = tmp_path / f"sub-{i}"
        model.run(path, {"age": float(target[i])}, out, covariates={"age": float(age[i]), "sex": float(sex[i])})
        cf = nib.load(out / "counterfactual.nii.gz").get_fdata(dtype=np.float32)
        t, x = truth.images[i, ..., 0], s.images[i, ..., 0]
        mae.append(np.abs(cf - t).mean())
        copy.append(np.abs(x - t).mean())
        vol = brain.measure_volumes(np.stack([cf, x]), {k: v[i:i + 1].repeat(2, 0) for k, v in s.noise.items()},
                                    FINE)[:, 0]
        moved.append(np.sign(vol[0] - vol[1]) == np.sign(truth.labels[i, bv] - s.labels[i, bv]))
    assert np.mean(mae) < 0.95 * np.mean(copy), (np.round(mae, 4), np.round(copy, 4))
    assert all(moved)


def test_cli_counterfactual_runs_the_shipped_model_on_a_fresh_install(tmp_path, subjects):
    _, paths = subjects
    env = {**os.environ, "CDAE_HOME": str(tmp_path / "home"), "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-m", "cdae_cli", "counterfactual", "--input", str(paths[2]), "--do", "age=70",
                        "--out-dir", str(tmp_path / "out"), "--steps", "10"], env=env, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["counterfactual"]["age"]["value"] == 70.0
    assert report["model"]["checkpoint"].startswith(str(tmp_path / "home"))
    assert "principal components of the displacement" in report["settings"]["model_kind"]
    assert report["settings"]["model_kind"].endswith("each voxel's spread in age, sex")
    # its change reaches the scan as its checkpoint says: the realisation and the residual measured best for it
    # (pipelines/models/brain/README.md), the intensity change put on the scan's tissue boundaries
    image = json.loads((SHIPPED_BRAIN / "checkpoint.json").read_text())["image"]
    settings = report["settings"]
    assert settings["realisation"] == image["realisation"] and settings["residual"] == image["residual"] == "tissue"
    assert "tissue boundaries" in settings["output"]
    if image["realisation"] == "deformation":  # moved by the deformation the model decodes, kept inside the head
        assert "decoded by the model" in settings["output"]
        assert settings["deformation_inset_mm"] == image.get("deformation_inset_mm", 0.0)
    # registered affinely, its volumes read at this head's size (pipelines.mri.Preprocessing.volume_factor)
    assert report["registration"]["transform"] == "affine" and 0.6 < report["registration"]["volume_ratio"] < 1.4
    # the inversion depth the checkpoint names (pipelines/models/brain/README.md) where none is given
    assert report["settings"]["depth"] == json.loads((SHIPPED_BRAIN / "checkpoint.json").read_text())["image"]["depth"]


def test_a_depth_outside_the_unit_interval_is_refused():
    for depth in (0.0, 1.5):
        with pytest.raises(ValueError, match="depth must be in"):
            ScanModel.load(SHIPPED_BRAIN, device="cpu", depth=depth)


def test_a_negative_deformation_inset_is_refused(tmp_path):
    import shutil

    from cdae_med.checkpoint import CheckpointError

    copy = tmp_path / "brain"
    shutil.copytree(SHIPPED_BRAIN, copy)
    meta = json.loads((copy / "checkpoint.json").read_text())
    meta["image"]["deformation_inset_mm"] = -6.0
    (copy / "checkpoint.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="deformation_inset_mm must be a distance >= 0"):
        ScanModel.load(copy, device="cpu")
