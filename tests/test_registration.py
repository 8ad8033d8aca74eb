"""Registration to a brain model's reference: the same head wherever it sits in its voxels gives
the same read-out and the same change, bad scans are refused, a null intervention returns the
input exactly. All on generator subjects rendered at 2 mm, the resolution of a real scan."""

import json
from pathlib import Path

import numpy as np
import pytest
from scipy import ndimage as ndi

from cdae_med.io import Scan, read_nifti, write_nifti
from pipelines.registration import Reference, RegistrationError, register
from pipelines.scans import ScanError, ScanModel
from pipelines.train import TrainConfig, train
from synthetic_data import brain

from .conftest import TINY_MODEL

FINE = 96  # 2 mm over the cohort's 192 mm field of view
TRAINED_BRAIN = Path(__file__).parent / "assets" / "brain16-tiny"


@pytest.fixture(scope="module")
def reference():
    return Reference(*brain.reference(64))


@pytest.fixture(scope="module")
def subject():
    s = brain.sample(1, seed=11, size=FINE)
    return s.images[0, ..., 0], brain.affine(FINE)


def moved(volume, degrees=10.0, shift_vox=(0, 10, 0)):
    """The head rotated about x and shifted (10 voxels = 20 mm) inside the same voxel grid, and the
    map that brings an array on that grid back onto the original one."""
    th = np.deg2rad(degrees)
    rot = np.array([[1, 0, 0], [0, np.cos(th), -np.sin(th)], [0, np.sin(th), np.cos(th)]])
    c = (np.array(volume.shape) - 1) / 2
    offset = c - rot @ c - np.asarray(shift_vox, float)
    out = ndi.affine_transform(volume, rot, offset=offset, order=1)
    inv = np.linalg.inv(rot)

    def back(a):
        return ndi.affine_transform(a, inv, offset=-inv @ offset, order=1)
    return out, back


def test_registration_recovers_a_known_motion(reference, subject):
    vol, aff = subject
    base = register(Scan(vol, aff, "aligned"), reference).matrix_ras
    shifted, _ = moved(vol)
    reg = register(Scan(shifted, aff, "moved"), reference)
    # the moved head's reference -> scan map is the aligned one followed by the motion (20 mm in y, 10 deg)
    delta = reg.matrix_ras @ np.linalg.inv(base)
    assert np.degrees(np.arccos(np.clip(delta[1, 1], -1, 1))) == pytest.approx(10.0, abs=1.0)
    moved_centre = delta @ np.array([0.0, 0.0, 0.0, 1.0])
    assert moved_centre[1] == pytest.approx(20.0, abs=2.0)
    assert reg.correlation > 0.6 and reg.coverage > 0.95


def test_bad_scans_are_refused(reference, subject):
    vol, aff = subject
    with pytest.raises(RegistrationError, match="constant"):
        register(Scan(np.zeros_like(vol), aff, "empty"), reference)
    rng = np.random.default_rng(0)
    with pytest.raises(RegistrationError, match="correlates"):
        register(Scan(rng.random(vol.shape).astype(np.float32), aff, "noise"), reference)
    with pytest.raises(RegistrationError, match="partial scan"):
        register(Scan(vol[:, :, 60:].copy(), aff, "partial"), reference)  # the top third of the head
    sheared = aff.copy()
    sheared[0, 1] = 0.5
    with pytest.raises(RegistrationError, match="shear"):
        register(Scan(vol, sheared, "sheared"), reference)


def test_training_with_registration_ships_the_reference(tmp_path):
    cfg = TrainConfig(dataset="brain", out=str(tmp_path / "ckpt"), steps=4, minutes=None, size=16, batch_size=4,
                      n_train=8, device="cpu", eval_n=0, grid_rows=1, registration="rigid",
                      model={**TINY_MODEL, "unet_norm_groups": 8})
    path = train(cfg, progress=False)
    meta = json.loads((path / "checkpoint.json").read_text())
    assert meta["image"]["preprocessing"]["registration"] == "rigid"
    model = ScanModel.load(path, device="cpu", num_steps=2)
    assert model.reference.image.shape == (64, 64, 64) and model.mask.shape == (16, 16, 16)
    assert 0.3 < model.mask.mean() < 0.8  # the head, not the whole grid


@pytest.fixture(scope="module")
def registered_model(tmp_path_factory, reference):
    """The shipped 16^3 model (tests/assets/brain16-tiny), whose change moves brain volume the true way,
    set to register scans to the cohort's reference: it was trained on the generator's own frame, which
    is the reference's frame up to each subject's small misalignment, so registered scans are what it
    knows. Its output is the structured change these tests compare across poses."""
    return registering_copy(tmp_path_factory.mktemp("registered") / "ckpt", reference, registration="rigid")


def registering_copy(out, reference, **preprocessing) -> ScanModel:
    """The test model copied to ``out`` with its reference and these preprocessing settings."""
    import shutil

    shutil.copytree(TRAINED_BRAIN, out)
    meta = json.loads((out / "checkpoint.json").read_text())
    meta["image"]["preprocessing"].update(preprocessing)
    (out / "checkpoint.json").write_text(json.dumps(meta))
    reference.save(out)
    return ScanModel.load(out, device="cpu", num_steps=10)


def test_the_same_head_anywhere_in_its_voxels_gives_the_same_answer(registered_model, subject, tmp_path):
    vol, aff = subject
    runs = {}
    shifted, back = moved(vol)
    flip = np.diag([-1.0, -1.0, 1.0, 1.0])
    flip[:2, 3] = FINE - 1
    # anisotropic: every other slice along z dropped (2 x 2 x 4 mm)
    aniso_aff = aff.copy()
    aniso_aff[:3, 2] *= 2
    cases = {"aligned": (vol, aff), "moved": (shifted, aff), "lps": (vol[::-1, ::-1, :].copy(), aff @ flip),
             "anisotropic": (vol[:, :, ::2].copy(), aniso_aff)}
    for name, (data, a) in cases.items():
        write_nifti(tmp_path / f"{name}.nii.gz", data, a)
        report = registered_model.run(tmp_path / f"{name}.nii.gz", {"age": 85}, tmp_path / name)
        diff = read_nifti(tmp_path / name / "difference.nii.gz").data
        runs[name] = (report, diff)
    ref_report, ref_diff = runs["aligned"]
    assert ref_report["registration"]["transform"] == "rigid"
    for name, (report, diff) in runs.items():
        for var in ("age", "brain_volume", "ventricle_volume"):
            got, want = report["factual"][var]["value"], ref_report["factual"][var]["value"]
            scale = registered_model.graph[var].scale
            # a tenth of the variable's SD: a pose changes only interpolation (figures in the README)
            assert abs(got - want) < 0.1 * scale, (name, var, got, want)
    # the change, mapped back onto the aligned grid, is the aligned scan's change
    head = vol > 0.05
    for name, diff in (("moved", back(runs["moved"][1])), ("lps", runs["lps"][1][::-1, ::-1, :])):
        r = np.corrcoef(diff[head], ref_diff[head])[0, 1]
        assert r > 0.9, (name, r)
    r = np.corrcoef(runs["anisotropic"][1][head[:, :, ::2]], ref_diff[:, :, ::2][head[:, :, ::2]])[0, 1]
    assert r > 0.9, ("anisotropic", r)


def test_registered_null_intervention_returns_the_input_exactly(registered_model, subject, tmp_path):
    vol, aff = subject
    write_nifti(tmp_path / "s.nii.gz", vol, aff)
    registered_model.run(tmp_path / "s.nii.gz", {"age": 60}, tmp_path / "out", covariates={"age": 60})
    out = read_nifti(tmp_path / "out" / "counterfactual.nii.gz").data
    assert np.array_equal(out, read_nifti(tmp_path / "s.nii.gz").data)


def test_a_scan_that_is_not_a_head_is_a_clear_error(registered_model, subject, tmp_path):
    vol, aff = subject
    write_nifti(tmp_path / "noise.nii.gz", np.random.default_rng(1).random(vol.shape).astype(np.float32), aff)
    with pytest.raises(ScanError, match="noise.nii.gz: after registration the scan correlates"):
        registered_model.run(tmp_path / "noise.nii.gz", {"age": 70}, tmp_path / "out")


def zoomed(volume, factor):
    """The head ``factor`` times larger in every direction (about the grid's centre), same voxels."""
    c = (np.array(volume.shape) - 1) / 2
    return ndi.affine_transform(volume, np.eye(3) / factor, offset=c - c / factor, order=1)


def test_the_volume_ratio_is_the_head_size(reference, subject):
    vol, aff = subject
    assert register(Scan(vol, aff, "rigid"), reference, "rigid").volume_ratio == pytest.approx(1.0, abs=1e-9)
    base = register(Scan(vol, aff, "aligned"), reference, "affine").volume_ratio
    bigger = register(Scan(zoomed(vol, 1.1), aff, "bigger"), reference, "affine").volume_ratio
    assert bigger / base == pytest.approx(1.1 ** 3, rel=0.03)


def test_affine_training_data_holds_volumes_in_reference_space():
    from pipelines.training_data import load_training_data

    cfg = TrainConfig(dataset="brain", size=16, n_train=4, seed=5, registration="affine")
    data = load_training_data(cfg, progress=False)
    prep = data.image_meta["preprocessing"]
    assert prep["volume_variables"] == ["brain_volume", "ventricle_volume"]
    native = brain.sample(4, seed=5, size=32).labels
    seen = data.dataset.graph.denormalise(data.labels.numpy())
    factor = seen[:, 2] / native[:, 2]
    # volumes scaled by cohort ratio / each scan's ratio (mean of the ratios: factors about 1), the rest kept
    assert np.allclose(seen[:, 3] / native[:, 3], factor) and np.allclose(seen[:, :2], native[:, :2], atol=1e-4)
    assert np.all(np.abs(factor - 1) < 0.3) and np.std(factor) > 0.005
    assert np.mean(1 / factor) * prep["cohort_volume_ratio"] == pytest.approx(prep["cohort_volume_ratio"], rel=1e-6)
    # the user-facing ranges stay in the graph's own units
    assert data.image_meta["training_ranges"]["brain_volume"] == [native[:, 2].min(), native[:, 2].max()]
    # the mechanisms are fitted on the scans' own volumes (log scale: the scaling is an offset abduction keeps)
    assert np.allclose(data.dataset.graph.denormalise(data.mechanism_labels.numpy()), native, rtol=1e-5)
    linear = TrainConfig(dataset="brain", size=16, n_train=4, seed=5, registration="affine",
                         graph=str(Path(__file__).parent / "assets" / "brain_linear.yaml"))
    assert load_training_data(linear, progress=False).mechanism_labels is None  # a scaling is no offset there


@pytest.fixture(scope="module")
def affine_model(tmp_path_factory, reference):
    """The registered test model set to register affinely, with its volumes in reference space."""
    return registering_copy(tmp_path_factory.mktemp("affine") / "ckpt", reference, registration="affine",
                            volume_variables=["brain_volume", "ventricle_volume"], cohort_volume_ratio=0.95)


def test_an_affine_model_reads_and_sets_volumes_at_the_scans_head_size(affine_model, subject, tmp_path):
    vol, aff = subject
    reports = {}
    for name, data in (("aligned", vol), ("bigger", zoomed(vol, 1.1))):
        write_nifti(tmp_path / f"{name}.nii.gz", data, aff)
        reports[name] = affine_model.run(tmp_path / f"{name}.nii.gz", {"brain_volume": 900}, tmp_path / name)
    a, b = reports["aligned"], reports["bigger"]
    ratio = b["registration"]["volume_ratio"] / a["registration"]["volume_ratio"]
    assert ratio == pytest.approx(1.1 ** 3, rel=0.03)
    # the same image in reference space: the bigger head's volumes are the model's read-out times its size
    for var in ("brain_volume", "ventricle_volume"):
        assert b["factual"][var]["value"] / a["factual"][var]["value"] == pytest.approx(ratio, rel=0.05), var
    assert b["factual"]["age"]["value"] == pytest.approx(a["factual"]["age"]["value"], abs=2.0)
    assert a["counterfactual"]["brain_volume"]["value"] == 900
    # do(brain_volume = its own estimate) is a null intervention, in the scan's own millilitres
    own = a["factual"]["brain_volume"]["value"]
    affine_model.run(tmp_path / "aligned.nii.gz", {"brain_volume": own}, tmp_path / "null")
    assert np.array_equal(read_nifti(tmp_path / "null" / "counterfactual.nii.gz").data,
                          read_nifti(tmp_path / "aligned.nii.gz").data)
