"""The subject's own anatomy changed by prescribed volumes (pipelines.anatomy, the "ventricles", "volumes" and
"atrophy" realisations): on generator subjects at 2 mm, measured by the generator's own tissue model."""

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from cdae_med.io import Scan, write_nifti
from pipelines.anatomy import AnatomicalRealisation, VentriclePush, brain_volume_ml, cortical_change, reference_levels
from pipelines.mri import Preprocessing, prepare_registered, reference_mask
from pipelines.realisation import deform_scan, jacobian_determinant
from pipelines.registration import Reference
from synthetic_data import brain

FINE = 96  # 2 mm
VV = brain.VARIABLES.index("ventricle_volume")


@pytest.fixture(scope="module")
def case():
    reference = Reference(*brain.reference(64))
    prep = Preprocessing(spacing_mm=(6.0,) * 3, spatial_size=(32,) * 3, registration="affine")
    mask = reference_mask(reference, prep)
    s = brain.sample(1, seed=43, size=FINE)
    p = prepare_registered(Scan(s.images[0, ..., 0], brain.affine(FINE), "s"), prep, reference, mask)
    return reference, prep, mask, s, p


def _measured(s, images):
    """Brain and ventricle volume (ml) of versions of subject 0 by the generator's tissue model."""
    return brain.measure_volumes(np.stack(images), {k: np.repeat(v, len(images), axis=0) for k, v in s.noise.items()},
                                 FINE)


def test_the_reference_levels_are_its_tissues():
    levels = reference_levels(Reference(*brain.reference(64)))
    # the generator's T1: CSF 0.12, grey 0.55, white 0.85 (grey 0.59 of the way from CSF to white)
    assert abs(levels.grey_share - (0.55 - 0.12) / (0.85 - 0.12)) < 0.06, levels
    assert levels.csf < 0.25 < levels.grey < levels.white


@pytest.mark.parametrize("delta", [12.0, -6.0])
def test_the_push_changes_the_ventricles_by_the_volume_asked_and_folds_nowhere(case, delta):
    reference, prep, mask, s, p = case
    push = VentriclePush(reference, 192.0, reference_levels(reference).grey_share)
    phi = push.deformation(p, delta)
    assert jacobian_determinant(phi).min() > 0
    out = deform_scan(p.registration, phi)
    assert abs(push.volume_ml(p, out) - push.volume_ml(p) - delta) < 0.5  # what it solved for, on its own reading
    moved = np.diff(_measured(s, [p.scan.data, out]), axis=0)[0]  # the generator's reading
    assert abs(moved[1] - delta) < 0.15 * abs(delta), moved
    # the push compresses the tissue next to the ventricles, so the brain gives up at most the ventricles' gain
    # (realisation `volumes` makes that up on the cortex: test_the_volumes_realisation_gives_...)
    assert abs(moved[0]) < abs(delta) + 2.5, moved


def test_a_push_warped_within_the_ventricles_region_is_the_whole_warp_there(case):
    """The push's solver warps only the box around the ventricles' region: the same values there as warping the
    whole scan, the input's elsewhere."""
    reference, prep, mask, s, p = case
    push = VentriclePush(reference, 192.0, reference_levels(reference).grey_share)
    reading = push.read(p)
    phi = push.deformation(p, 8.0, reading=reading)
    whole, boxed = deform_scan(p.registration, phi), deform_scan(p.registration, phi, within=reading.region)
    assert reading.region.any() and np.abs(whole - p.scan.data)[reading.region].max() > 0.1  # it moved something
    assert np.abs(boxed - whole)[reading.region].max() < 1e-5
    box = tuple(slice(int(i.min()), int(i.max()) + 1) for i in np.nonzero(reading.region))
    outside = np.ones(p.scan.data.shape, bool)
    outside[box] = False
    assert np.array_equal(boxed[outside], p.scan.data[outside])


def test_the_brain_volume_is_read_as_the_generator_reads_it(case):
    reference, prep, mask, s, p = case
    truth = brain.counterfactual(s, {"brain_volume": s.labels[:, 2] - 100.0}, size=FINE)
    realise = AnatomicalRealisation(reference, prep, mask)
    head = p.registration.carry_back(mask.astype(np.float32), prep.grid_affine) > 0.5
    levels = realise.scan_levels(p)
    ours = [brain_volume_ml(x, head, levels, 0.008) for x in (p.scan.data, truth.images[0, ..., 0])]
    theirs = _measured(s, [p.scan.data, truth.images[0, ..., 0]])[:, 0]
    assert abs((ours[1] - ours[0]) - (theirs[1] - theirs[0])) < 0.2 * abs(theirs[1] - theirs[0]), (ours, theirs)


def test_the_volumes_realisation_gives_the_volumes_it_is_given(case):
    """No model: an intensity change that darkens the whole brain a little, realised with the volumes a graph
    would prescribe; the output's volumes, read by the generator, move by them."""
    reference, prep, mask, s, p = case
    realise = AnatomicalRealisation(reference, prep, mask, "volumes")
    change = -0.03 * mask * (p.image[0] > 0.4)
    diff, details = realise(p, change, -60.0, 10.0)
    moved = np.diff(_measured(s, [p.scan.data, p.scan.data + diff]), axis=0)[0]
    assert details["cortex_change_ml"] < 0 and "brain_volume_change_reached" not in details
    # the generator's reading misses grey matter lost from voxels brighter than grey matter, as it does on its own
    # counterfactuals (brain_native.json's volume_measurement_floor_ml)
    assert -66.0 < moved[0] < -42.0 and abs(moved[1] - 10.0) < 2.0, (moved, details)
    zero, _ = realise(p, np.zeros_like(change), 0.0, 0.0)
    assert np.abs(zero).max() == 0.0


@pytest.mark.parametrize("delta", [-60.0, 40.0])
def test_the_cortex_changes_by_the_volume_asked_where_the_true_change_is(case, delta):
    """Brain made smaller or larger on the subject's own cortex: the shares change by the volume asked, the
    generator reads the brain moving that way, and the output is far closer to the generator's own counterfactual
    than the input is (both: its brain changed by the same volume, ventricles kept)."""
    reference, prep, mask, s, p = case
    realise = AnatomicalRealisation(reference, prep, mask, "atrophy")
    reading = realise.push.read(p)
    head = p.registration.carry_back(mask.astype(np.float32), prep.grid_affine) > 0.5
    change, reached = cortical_change(p.scan.data, head, realise.scan_levels(p, reading), delta, p.scan.spacing,
                                      deep=reading.region)
    assert reached == pytest.approx(delta, rel=1e-3)
    assert (np.sign(delta) * change >= 0).all() and not change[~head].any()
    moved = np.diff(_measured(s, [p.scan.data, p.scan.data + change]), axis=0)[0]
    assert 0.5 * abs(delta) < np.sign(delta) * moved[0] < 1.2 * abs(delta) and abs(moved[1]) < 1.0, moved
    truth = brain.counterfactual(s, {"brain_volume": s.labels[:, 2] + delta}, size=FINE).images[0, ..., 0]
    assert np.abs(p.scan.data + change - truth).mean() < 0.75 * np.abs(p.scan.data - truth).mean()
    assert cortical_change(p.scan.data, head, realise.scan_levels(p, reading), 0.0, p.scan.spacing)[0].max() == 0.0


@pytest.fixture(scope="module")
def shipped(tmp_path_factory):
    from pipelines.registry import SHIPPED
    from pipelines.scans import ScanModel

    d = tmp_path_factory.mktemp("anatomy")
    s = brain.sample(1, seed=3_000_019, size=FINE)
    path = d / "sub.nii.gz"
    write_nifti(path, s.images[0, ..., 0], brain.affine(FINE))
    return ScanModel.load(SHIPPED["brain"], device="cpu", num_steps=10, realisation="volumes"), s, path


def test_the_shipped_model_realised_by_volumes(tmp_path, shipped):
    model, s, path = shipped
    age, sex = float(s.labels[0, 0]), float(s.labels[0, 1])
    covariates = {"age": age, "sex": sex}
    model.run(path, {"age": age}, tmp_path / "null", covariates=covariates)  # a null intervention: the input
    assert np.abs(nib.load(tmp_path / "null" / "difference.nii.gz").get_fdata()).max() == 0.0
    report = model.run(path, {"ventricle_volume": float(s.labels[0, VV]) * 1.5}, tmp_path / "vv", covariates=covariates)
    realised, asked = report["realised"], report["counterfactual"]["ventricle_volume"]["value"]
    assert realised["ventricle_volume_change_ml"] == pytest.approx(asked - report["factual"]["ventricle_volume"]["value"])
    assert "ventricles grown" in report["settings"]["output"] and report["settings"]["realisation"] == "volumes"
    out = nib.load(tmp_path / "vv" / "counterfactual.nii.gz").get_fdata(dtype=np.float32)
    moved = np.diff(_measured(s, [s.images[0, ..., 0], out]), axis=0)[0]
    # the generator's reading of the output moves by the model's ventricle change, and the brain stays
    assert abs(moved[1] - realised["ventricle_volume_change_ml"]) < 0.35 * abs(realised["ventricle_volume_change_ml"])
    assert abs(moved[0]) < 15.0, moved


def test_an_anatomical_realisation_needs_a_registered_model():
    from pipelines.scans import ScanModel

    tiny = Path(__file__).parent / "assets" / "brain16-tiny"  # not registered
    for how in ("ventricles", "volumes", "atrophy"):
        with pytest.raises(ValueError, match="needs a registered model"):
            ScanModel.load(tiny, device="cpu", realisation=how)


def test_a_push_too_large_to_stay_unfolded_is_halved_until_it_does(case, caplog):
    """Shrinking the ventricles by most of their volume needs a pull that folds on the push's grid; it is applied
    at a half (a quarter, ...) of its size, with a warning, and folds nowhere."""
    import logging

    reference, prep, mask, s, p = case
    push = VentriclePush(reference, 192.0, reference_levels(reference).grey_share)
    with caplog.at_level(logging.WARNING, logger="cdae_med"):
        phi = push.deformation(p, -0.8 * float(s.labels[0, VV]))
    assert jacobian_determinant(phi).min() > 0
    assert any("folded" in r.getMessage() for r in caplog.records)


def test_the_shipped_model_realised_by_atrophy(tmp_path, shipped):
    """The model's brain change put on the subject's cortex: the generator's reading of the output moves by about
    the model's brain change, and a null intervention is the input."""
    from pipelines.registry import SHIPPED
    from pipelines.scans import ScanModel

    _, s, path = shipped
    model = ScanModel.load(SHIPPED["brain"], device="cpu", num_steps=10, realisation="atrophy")
    covariates = {"age": float(s.labels[0, 0]), "sex": float(s.labels[0, 1])}
    model.run(path, {"age": covariates["age"]}, tmp_path / "null", covariates=covariates)
    assert np.abs(nib.load(tmp_path / "null" / "difference.nii.gz").get_fdata()).max() == 0.0
    report = model.run(path, {"brain_volume": float(s.labels[0, 2]) - 100.0}, tmp_path / "bv", covariates=covariates)
    asked = report["counterfactual"]["brain_volume"]["value"] - report["factual"]["brain_volume"]["value"]
    assert report["settings"]["realisation"] == "atrophy" and "cortex" in report["settings"]["output"]
    assert "brain_volume_change_reached" not in report["realised"]
    out = nib.load(tmp_path / "bv" / "counterfactual.nii.gz").get_fdata(dtype=np.float32)
    moved = np.diff(_measured(s, [s.images[0, ..., 0], out]), axis=0)[0]
    assert 0.5 * asked > moved[0] > 1.2 * asked, (moved, asked)  # the generator reads most of a change made
