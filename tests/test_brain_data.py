"""Tests for synthetic_data.brain (small n, 32^3 volumes unless a test is about size)."""

import csv
import time

import numpy as np
import pytest

from cdae_med.graph import GraphError
from synthetic_data import brain as BR
from synthetic_data.base import Samples

AGE, SEX, BRAIN, VENT = range(4)


@pytest.fixture(scope="module")
def cohort():
    return BR.sample(6, seed=11)


def _vox_ml(size):
    return BR.spacing(size) ** 3 / 1000.0


# --- constants ------------------------------------------------------------------------------


def test_constants_consistent():
    assert BR.VARIABLES == ("age", "sex", "brain_volume", "ventricle_volume")
    assert BR.GRAPH.name == "brain"
    assert BR.PARENTS["brain_volume"] == ("age", "sex")
    assert BR.PARENTS["ventricle_volume"] == ("age", "brain_volume")
    assert BR.UNITS["brain_volume"] == BR.UNITS["ventricle_volume"] == "ml"
    assert (BR.DEFAULT_SIZE, BR.SPATIAL_DIMS, BR.CHANNELS) == (32, 3, 1)
    assert BR.CSV_COLUMNS == ("subject_id", "path", "age", "sex", "brain_volume_ml", "ventricle_volume_ml")
    assert BR.spacing(32) == 6.0 and BR.spacing(64) == 3.0
    aff = BR.affine(32)
    assert np.allclose(np.diag(aff)[:3], 6.0)
    assert np.allclose(aff[:3, :3] @ np.full(3, 15.5) + aff[:3, 3], 0.0)  # centred


def test_graph_ranges_cover_the_cohort_mechanism():
    age, sex, noise = BR._draw(20000, seed=5)
    t = BR._targets(age, sex, noise)
    for j, name in ((BRAIN, "brain_volume"), (VENT, "ventricle_volume")):
        lo, hi = BR.RANGES[name]
        assert lo <= t[:, j].min() and t[:, j].max() <= hi, name
        # the volumes are normalised on a log scale: mean 0 and SD 1 of the normalised cohort
        assert BR.GRAPH[name].log
        normalised = BR.GRAPH[name].normalise(t[:, j])
        assert abs(normalised.mean()) < 0.1
        assert 0.9 < normalised.std() < 1.1


# --- shapes, determinism, measured labels ---------------------------------------------------


def test_shapes_dtype_and_intensity(cohort):
    im, lab = cohort
    assert im.shape == (6, 32, 32, 32, 1) and im.dtype == np.float32
    assert lab.shape == (6, 4) and lab.dtype == np.float64
    assert im.min() >= 0.0 and im.max() <= 1.0 and im.max() > 0.8
    assert np.all(im[:, 0, 0, 0] == 0) and np.all(im[:, -1, -1, -1] == 0)  # background
    assert set(np.unique(lab[:, SEX])) <= {0.0, 1.0}
    assert np.all((lab[:, AGE] >= 40) & (lab[:, AGE] <= 90))
    assert all(len(v) == 6 for v in cohort.noise.values())


def test_same_seed_same_data_different_seed_differs(cohort):
    again = BR.sample(6, seed=11)
    assert np.array_equal(again.images, cohort.images)
    assert np.array_equal(again.labels, cohort.labels)
    other = BR.sample(6, seed=12)
    assert not np.allclose(other.labels, cohort.labels)


def test_labels_are_measured_from_tissue_maps(cohort):
    maps = BR.tissue_maps(cohort[:3])
    v = _vox_ml(32)
    brain = (maps["gm"] + maps["wm"]).reshape(3, -1).sum(1, dtype=np.float64) * v
    vent = maps["ventricles"].reshape(3, -1).sum(1, dtype=np.float64) * v
    np.testing.assert_allclose(brain, cohort.labels[:3, BRAIN], atol=1e-2)
    np.testing.assert_allclose(vent, cohort.labels[:3, VENT], atol=1e-3)
    tot = maps["gm"] + maps["wm"] + maps["csf"]
    assert np.all(maps["ventricles"] <= maps["csf"] + 1e-5)
    np.testing.assert_allclose(tot, maps["icv"], atol=1e-4)
    # the mechanism's targets are realised closely
    t = BR._targets(cohort.labels[:, AGE], cohort.labels[:, SEX], cohort.noise)
    np.testing.assert_allclose(cohort.labels[:, BRAIN], t[:, BRAIN], atol=0.01)
    np.testing.assert_allclose(cohort.labels[:, VENT], t[:, VENT], atol=0.01)


def test_subjects_differ_beyond_noise(cohort):
    im = cohort.images[..., 0].astype(np.float64)
    # the same subject with a fresh noise pattern: the size of pure noise differences
    noise = {k: v.copy() for k, v in cohort.noise.items()}
    noise["noise_seed"] = noise["noise_seed"] + 1
    renoised = BR.render(cohort.labels, noise).images[..., 0]
    noise_mae = np.abs(renoised - im).mean()
    between = [np.abs(im[i] - im[j]).mean() for i in range(6) for j in range(i + 1, 6)]
    assert min(between) > 3 * noise_mae


def test_sizes_48_64_and_speed(cohort):
    t0 = time.perf_counter()
    s32 = BR.render(cohort.labels[:4], {k: v[:4] for k, v in cohort.noise.items()}, 32)
    per32 = (time.perf_counter() - t0) / 4
    for size in (48, 64):
        t0 = time.perf_counter()
        s = BR.render(cohort.labels[:1], {k: v[:1] for k, v in cohort.noise.items()}, size)
        dt = time.perf_counter() - t0
        assert s.images.shape == (1, size, size, size, 1)
        # the same subject measures about the same at every resolution (targets are realised)
        np.testing.assert_allclose(s.labels[0, 2:], cohort.labels[0, 2:], rtol=1e-4)
        if size == 64:
            assert dt < 2.0, f"64^3 subject took {dt:.2f} s"
    # re-rendered from the measured labels (within 1e-6 ml of the targets): the same images
    np.testing.assert_allclose(s32.images, cohort.images[:4], atol=1e-3)
    assert per32 < 0.25, f"32^3 subject took {per32:.3f} s"


# --- mechanisms ----------------------------------------------------------------------------


def test_atrophy_rate_matches_literature(cohort):
    b40 = BR.counterfactual(cohort, {"age": 40.0}).labels[:, BRAIN]
    b70 = BR.counterfactual(cohort, {"age": 70.0}).labels[:, BRAIN]
    loss = 1 - b70 / b40
    # 0.2 %/yr at 35 rising linearly to 0.5 %/yr at 60: 12.4 % between 40 and 70
    np.testing.assert_allclose(loss, 0.124, atol=0.003)
    # the annual rate at 60 is about 0.5 %/yr and higher later
    b59, b61 = (BR.counterfactual(cohort[:2], {"age": a}).labels[:, BRAIN] for a in (59.0, 61.0))
    np.testing.assert_allclose((1 - b61 / b59) / 2, 0.005, atol=0.0005)
    # no atrophy in young adults (before 35), about 88 % of ICV
    b20, b30 = (BR.counterfactual(cohort[:2], {"age": a}).labels[:, BRAIN] for a in (20.0, 30.0))
    np.testing.assert_allclose(b20, b30, rtol=1e-5)
    icv = BR.icv(cohort.labels[:2, SEX], cohort.noise["u_icv"][:2])
    np.testing.assert_allclose(b20 / icv, 0.88, atol=0.06)


def test_sex_changes_head_and_brain_size(cohort):
    f = BR.counterfactual(cohort[:3], {"sex": 0})
    m = BR.counterfactual(cohort[:3], {"sex": 1})
    np.testing.assert_allclose(m.labels[:, BRAIN] / f.labels[:, BRAIN], 1470 / 1290, rtol=1e-3)
    np.testing.assert_array_equal(m.labels[:, AGE], f.labels[:, AGE])
    np.testing.assert_array_equal(m.labels[:, AGE], cohort.labels[:3, AGE])
    # the head itself is larger (ICV mask of the image)
    head_f = BR.tissue_maps(f)["icv"].reshape(3, -1).sum(1)
    head_m = BR.tissue_maps(m)["icv"].reshape(3, -1).sum(1)
    np.testing.assert_allclose(head_m / head_f, 1470 / 1290, rtol=0.03)
    # ventricles follow the brain (ex vacuo): a bigger brain, smaller ventricles at equal age
    assert np.all(m.labels[:, VENT] < f.labels[:, VENT])
    # and in the observational cohort men's brains are larger on average
    obs = BR._targets(*BR._draw(4000, seed=2)[:2], BR._draw(4000, seed=2)[2])
    men, women = obs[obs[:, SEX] == 1, BRAIN].mean(), obs[obs[:, SEX] == 0, BRAIN].mean()
    assert 1.10 < men / women < 1.18


def test_ventricles_grow_with_age(cohort):
    v50 = BR.counterfactual(cohort, {"age": 50.0}).labels[:, VENT]
    v80 = BR.counterfactual(cohort, {"age": 80.0}).labels[:, VENT]
    assert np.all(v80 > v50 * 1.8)
    v79 = BR.counterfactual(cohort[:2], {"age": 79.0}).labels[:, VENT]
    v81 = BR.counterfactual(cohort[:2], {"age": 81.0}).labels[:, VENT]
    rate = np.log(v81 / v79) / 2
    assert np.all((rate > 0.03) & (rate < 0.05))  # 3-5 %/yr in the elderly


# --- counterfactuals -------------------------------------------------------------------------


def test_do_brain_volume_moves_ventricles_only(cohort):
    cf = BR.counterfactual(cohort, {"brain_volume": 900.0})
    np.testing.assert_array_equal(cf.labels[:, [AGE, SEX]], cohort.labels[:, [AGE, SEX]])
    np.testing.assert_allclose(cf.labels[:, BRAIN], 900.0, atol=0.01)
    expected = BR.ventricle_volume(cohort.labels[:, AGE], 900.0, cohort.noise["u_vent"])
    np.testing.assert_allclose(cf.labels[:, VENT], expected, atol=0.01)
    assert not np.allclose(cf.labels[:, VENT], cohort.labels[:, VENT])


def test_do_brain_volume_extremes_realised(cohort):
    lo, hi = BR.RANGES["brain_volume"]
    vals = np.array([lo, hi, 700.0, 1500.0, lo, hi])
    cf = BR.counterfactual(cohort, {"brain_volume": vals})
    np.testing.assert_allclose(cf.labels[:, BRAIN], vals, atol=0.01)
    lo, hi = BR.RANGES["ventricle_volume"]
    vals = np.array([lo, hi, 10.0, 150.0, hi, lo])
    cf = BR.counterfactual(cohort, {"ventricle_volume": vals})
    np.testing.assert_allclose(cf.labels[:, VENT], vals, atol=0.01)
    np.testing.assert_allclose(cf.labels[:, BRAIN], cohort.labels[:, BRAIN], atol=0.01)


def test_do_ventricle_volume_changes_only_ventricles(cohort):
    cf = BR.counterfactual(cohort, {"ventricle_volume": 60.0})
    np.testing.assert_array_equal(cf.labels[:, [AGE, SEX]], cohort.labels[:, [AGE, SEX]])
    np.testing.assert_allclose(cf.labels[:, BRAIN], cohort.labels[:, BRAIN], atol=0.01)
    np.testing.assert_allclose(cf.labels[:, VENT], 60.0, atol=0.01)
    assert np.abs(cf.images - cohort.images).max() > 0.2


def test_do_age_moves_descendants_keeps_sex(cohort):
    ages = np.array([45.0, 55.0, 65.0, 75.0, 85.0, 95.0])
    cf = BR.counterfactual(cohort, {"age": ages})
    np.testing.assert_array_equal(cf.labels[:, AGE], ages)
    np.testing.assert_array_equal(cf.labels[:, SEX], cohort.labels[:, SEX])
    t = BR._targets(ages, cohort.labels[:, SEX], cohort.noise)
    np.testing.assert_allclose(cf.labels[:, 2:], t[:, 2:], atol=0.01)
    assert np.all(np.abs(cf.labels[:, BRAIN] - cohort.labels[:, BRAIN]) > 1.0)
    for k, v in cohort.noise.items():  # exogenous noise carried over
        np.testing.assert_array_equal(cf.noise[k], v)


def test_null_intervention_reproduces(cohort):
    same = BR.counterfactual(cohort, {"age": cohort.labels[:, AGE]})
    np.testing.assert_array_equal(same.images, cohort.images)
    np.testing.assert_array_equal(same.labels, cohort.labels)
    assert np.array_equal(BR.counterfactual(cohort, {}).images, cohort.images)


def test_counterfactual_image_changes_are_local_to_the_brain(cohort):
    cf = BR.counterfactual(cohort[:2], {"age": 90.0})
    diff = np.abs(cf.images - cohort.images[:2])
    assert diff[:, 0, 0, 0].max() == 0  # background untouched
    assert diff.mean() > 0.005


def test_sex_by_level_name(cohort):
    s = cohort[:2]
    by_code = BR.counterfactual(s, {"sex": 0.0})
    for name in ("F", "female"):
        cf = BR.counterfactual(s, {"sex": name})
        np.testing.assert_array_equal(cf.labels, by_code.labels)
        np.testing.assert_array_equal(cf.images, by_code.images)


# --- errors ----------------------------------------------------------------------------------


def test_bad_arguments(cohort):
    with pytest.raises(GraphError, match=r"(?s)unknown variable 'height'.*age.*sex.*brain_volume"):
        BR.counterfactual(cohort, {"height": 1.8})
    with pytest.raises(ValueError, match=r"age=120 years is outside the declared range \[20, 95\]"):
        BR.counterfactual(cohort, {"age": 120.0})
    with pytest.raises(ValueError, match=r"brain_volume=100 ml is outside"):
        BR.counterfactual(cohort, {"brain_volume": np.full(6, 100.0)})
    with pytest.raises(ValueError, match=r"sex is binary: value must be 0 or 1, got 0.5"):
        BR.counterfactual(cohort, {"sex": 0.5})
    with pytest.raises(ValueError, match="not a finite number"):
        BR.counterfactual(cohort, {"ventricle_volume": float("nan")})
    with pytest.raises(ValueError, match="age: 2 values for a batch of 6; give a scalar or one value per"):
        BR.counterfactual(cohort, {"age": [50.0, 60.0]})
    with pytest.raises(ValueError, match="noise"):
        BR.counterfactual(Samples(cohort.images, cohort.labels, {}), {"age": 50.0})
    with pytest.raises(ValueError, match="Samples"):
        BR.counterfactual(cohort.labels, {"age": 50.0})
    with pytest.raises(ValueError, match="size"):
        BR.sample(1, size=8)
    with pytest.raises(ValueError, match="n must be"):
        BR.sample(-1)
    with pytest.raises(ValueError, match=r"shape \(N, 4\)"):
        BR.render(np.zeros((2, 3)), cohort.noise)


# --- files -----------------------------------------------------------------------------------


def test_write_read_dataset_nifti(tmp_path, cohort):
    nib = pytest.importorskip("nibabel")
    csv_path = BR.write_dataset(tmp_path / "ds", 3, seed=11, progress=False)
    assert csv_path == tmp_path / "ds" / "manifest.csv"
    with open(csv_path, newline="") as fh:
        rows = list(csv.reader(fh))
    assert tuple(rows[0]) == BR.CSV_COLUMNS
    assert [r[0] for r in rows[1:]] == ["sub-00000", "sub-00001", "sub-00002"]
    assert all(r[3] in ("0", "1") for r in rows[1:])
    ref = BR.sample(3, seed=11)
    img = nib.load(csv_path.parent / rows[1][1])
    assert img.shape == (32, 32, 32) and img.get_data_dtype() == np.float32
    assert img.header.get_zooms() == (6.0, 6.0, 6.0)
    assert img.header.get_xyzt_units() == ("mm", "sec")
    assert int(img.header["qform_code"]) > 0 and int(img.header["sform_code"]) > 0
    np.testing.assert_allclose(img.affine, BR.affine(32))
    np.testing.assert_allclose(img.header.get_qform(), BR.affine(32))
    np.testing.assert_array_equal(np.asarray(img.dataobj), ref.images[0, ..., 0])

    back = BR.read_dataset(tmp_path / "ds")
    np.testing.assert_array_equal(back.images, ref.images)
    np.testing.assert_array_equal(back.labels, ref.labels)
    cf_file = BR.counterfactual(back, {"age": 80.0})
    cf_mem = BR.counterfactual(ref, {"age": 80.0})
    np.testing.assert_array_equal(cf_file.images, cf_mem.images)


def test_nifti_loads_with_monai(tmp_path):
    pytest.importorskip("monai")
    from monai.transforms import LoadImage

    csv_path = BR.write_dataset(tmp_path, 1, size=48, seed=3, progress=False)
    img = LoadImage(image_only=True)(str(csv_path.parent / "sub-00000.nii.gz"))
    assert tuple(img.shape) == (48, 48, 48)
    np.testing.assert_allclose(np.asarray(img.pixdim), [4.0, 4.0, 4.0])
    assert float(img.max()) > 0.5


def test_write_dataset_progress_bar(tmp_path, capsys):
    BR.write_dataset(tmp_path, 2, progress=True)
    assert "brain" in capsys.readouterr().err
    with pytest.raises(ValueError, match="manifest.csv"):
        BR.read_dataset(tmp_path / "missing")


def test_rendering_can_show_its_progress_and_renders_the_same(capsys):
    """Training data renders thousands of subjects (minutes), so sample() can show a progress bar."""
    quiet = BR.sample(2, seed=5, size=16)
    assert "render" not in capsys.readouterr().err
    shown = BR.sample(2, seed=5, size=16, progress=True)
    err = capsys.readouterr().err
    assert "render" in err and "2/2" in err
    assert np.array_equal(quiet.images, shown.images) and np.array_equal(quiet.labels, shown.labels)
