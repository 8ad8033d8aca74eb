"""Tests for synthetic_data.pendulum (fast: small n, small images)."""

import json
import re

import numpy as np
import pytest

from synthetic_data import pendulum as P


def _labels(angle, light, s_len=None, s_pos=None):
    """(N, 4) labels; the shadow comes from the mechanism unless given (all args broadcast)."""
    angle, light = (np.asarray(v, dtype=float) for v in np.broadcast_arrays(np.atleast_1d(angle), light))
    ml, mp = P.shadow(angle, light)
    s_len = ml if s_len is None else s_len
    s_pos = mp if s_pos is None else s_pos
    return np.stack(np.broadcast_arrays(angle, light, s_len, s_pos), axis=1).astype(float)


def _ball_centroid_x(images):
    """Column centroid of the red ball pixels, per image."""
    im = images.astype(int)
    mask = (im[..., 0] > 150) & (im[..., 1] < 110) & (im[..., 2] < 110)
    cols = np.arange(images.shape[2])
    counts = mask.sum(axis=(1, 2))
    assert np.all(counts > 0)
    return (mask.sum(axis=1) * cols).sum(axis=1) / counts


def _shadow_centroid_x(images):
    """Column centroid (in canvas x units) of the dark shadow pixels in the bottom rows."""
    size = images.shape[1]
    # rows whose centre lies below y = 0.5 (canvas y range is [-1, 21], row 0 at the top)
    ys = 21 - (np.arange(size) + 0.5) * 22 / size
    rows = ys < 0.5
    darkness = np.clip(200.0 - images[:, rows].astype(float).mean(axis=-1), 0, None)
    w = darkness.sum(axis=1)  # (N, W)
    xs = (np.arange(size) + 0.5) * 20 / size
    return (w * xs).sum(axis=1) / w.sum(axis=1)


# --- constants ------------------------------------------------------------------------------


def test_constants_consistent():
    assert P.VARIABLES == ("angle", "light", "shadow_len", "shadow_pos")
    assert set(P.UNITS) == set(P.NORMALISATION) == set(P.RANGES) == set(P.VARIABLES)
    assert P.RANGES["angle"] == (-36.0, 38.7)
    assert P.RANGES["light"] == (54.0, 132.3)
    assert len(P.CSV_COLUMNS) == 1 + len(P.VARIABLES)
    assert P.CSV_COLUMNS == ("file", "angle_deg", "light_deg", "shadow_len", "shadow_pos")
    assert P.DEFAULT_SIZE == 32


# --- determinism, shapes ------------------------------------------------------------------------


def test_same_seed_identical_different_seed_differs():
    im1, lab1 = P.sample(16, seed=3)
    im2, lab2 = P.sample(16, seed=3)
    np.testing.assert_array_equal(im1, im2)
    np.testing.assert_array_equal(lab1, lab2)
    im3, lab3 = P.sample(16, seed=4)
    assert not np.array_equal(lab1, lab3)
    assert not np.array_equal(im1, im3)


@pytest.mark.parametrize("size", [32, 64])
def test_shapes_and_dtypes(size):
    im, lab = P.sample(7, seed=1, size=size)
    assert im.shape == (7, size, size, 3) and im.dtype == np.uint8
    assert lab.shape == (7, 4) and lab.dtype == np.float64
    # images are not blank and use anti-aliased (intermediate) intensities
    assert len(np.unique(im)) > 10


def test_default_size_and_other_sizes():
    im, _ = P.sample(2)
    assert im.shape == (2, 32, 32, 3)
    for size in (16, 96):
        assert P.render(_labels([0.0, 10.0], 100.0), size=size).shape == (2, size, size, 3)


def test_render_accepts_dict_and_array():
    lab = _labels([-20.0, 5.0, 30.0], [60.0, 90.0, 120.0])
    as_dict = {v: lab[:, k] for k, v in enumerate(P.VARIABLES)}
    np.testing.assert_array_equal(P.render(lab), P.render(as_dict))


def test_sample_labels_within_ranges():
    _, lab = P.sample(500, seed=0, size=16)
    for k, v in enumerate(P.VARIABLES):
        lo, hi = P.RANGES[v]
        assert np.all(lab[:, k] >= lo) and np.all(lab[:, k] <= hi), v
    # continuous, not the integer grid
    assert len(np.unique(lab[:, 0])) == 500


# --- mechanism -----------------------------------------------------------------------------


def test_mechanism_matches_sample_labels():
    _, lab = P.sample(200, seed=5, size=16)
    s_len, s_pos = P.shadow(lab[:, 0], lab[:, 1])
    np.testing.assert_allclose(lab[:, 2], s_len, rtol=0, atol=1e-12)
    np.testing.assert_allclose(lab[:, 3], s_pos, rtol=0, atol=1e-12)
    assert np.all(s_len >= 3.0)


def test_mechanism_matches_causalvae_formula():
    # direct transcription of the CausalVAE projection, in index units
    def proj(x, y, base, phi):
        return (base - (y - x * np.tan(phi))) / np.tan(phi)

    for i, j in [(-40, 60), (0, 80), (17, 120), (43, 147), (-25, 133)]:
        theta, phi = i * np.pi / 200, j * np.pi / 200
        a = proj(10.0, 10.5, -0.5, phi)
        b = proj(10 + 9.5 * np.sin(theta), 10.5 - 9.5 * np.cos(theta), -0.5, phi)
        s_len, s_pos = P.shadow(i * 0.9, j * 0.9)
        assert s_len == pytest.approx(max(3.0, abs(a - b)), abs=1e-9)
        assert s_pos == pytest.approx((a + b) / 2, abs=1e-9)


def test_ranges_bound_mechanism_on_dense_grid():
    a = np.linspace(*P.RANGES["angle"], 401)
    l = np.linspace(*P.RANGES["light"], 401)
    A, L = np.meshgrid(a, l, indexing="ij")
    s_len, s_pos = P.shadow(A, L)
    assert s_len.min() >= P.RANGES["shadow_len"][0]
    assert s_len.max() <= P.RANGES["shadow_len"][1]
    assert s_pos.min() >= P.RANGES["shadow_pos"][0]
    assert s_pos.max() <= P.RANGES["shadow_pos"][1]
    # and they are tight (rounded outward by at most 0.1)
    assert s_len.max() > P.RANGES["shadow_len"][1] - 0.1
    assert s_pos.min() < P.RANGES["shadow_pos"][0] + 0.1
    assert s_pos.max() > P.RANGES["shadow_pos"][1] - 0.1


def test_normalise_roundtrip_and_values():
    _, lab = P.sample(50, seed=2, size=16)
    z = P.normalise(lab)
    np.testing.assert_allclose(P.denormalise(z), lab, atol=1e-12)
    centre = np.array([P.NORMALISATION[v][0] for v in P.VARIABLES])
    np.testing.assert_allclose(P.normalise(centre[None]), 0.0, atol=1e-12)
    # the paper's normalisation maps the ranges to roughly [-1, 1]
    assert np.all(np.abs(z) < 1.3)


# --- counterfactuals ----------------------------------------------------------------------------


def test_counterfactual_do_angle():
    im, lab = P.sample(10, seed=7)
    cf_im, cf_lab = P.counterfactual(lab, {"angle": 20.0})
    np.testing.assert_array_equal(cf_lab[:, 0], 20.0)
    np.testing.assert_array_equal(cf_lab[:, 1], lab[:, 1])  # light kept
    s_len, s_pos = P.shadow(cf_lab[:, 0], cf_lab[:, 1])
    np.testing.assert_allclose(cf_lab[:, 2], s_len, atol=1e-12)
    np.testing.assert_allclose(cf_lab[:, 3], s_pos, atol=1e-12)
    np.testing.assert_array_equal(cf_im, P.render(cf_lab))
    assert not np.array_equal(cf_im, im)
    assert lab[0, 0] != 20.0  # the input is not modified in place


def test_counterfactual_array_valued_do():
    _, lab = P.sample(4, seed=8)
    vals = np.array([-30.0, -10.0, 10.0, 30.0])
    _, cf_lab = P.counterfactual(lab, {"angle": vals})
    np.testing.assert_array_equal(cf_lab[:, 0], vals)


def test_null_intervention_reproduces_factual_image():
    im, lab = P.sample(10, seed=9)
    cf_im, cf_lab = P.counterfactual(lab, {"light": lab[:, 1]})
    np.testing.assert_array_equal(cf_lab, lab)
    np.testing.assert_array_equal(cf_im, im)


def test_do_shadow_len_leaves_others_unchanged():
    im, lab = P.sample(10, seed=10)
    cf_im, cf_lab = P.counterfactual(lab, {"shadow_len": 11.0})
    np.testing.assert_array_equal(cf_lab[:, [0, 1, 3]], lab[:, [0, 1, 3]])
    np.testing.assert_array_equal(cf_lab[:, 2], 11.0)
    np.testing.assert_array_equal(cf_im, P.render(cf_lab))
    assert not np.array_equal(cf_im, im)


def test_counterfactual_unknown_variable():
    _, lab = P.sample(2, seed=0, size=16)
    with pytest.raises(ValueError, match=r"(?s)shadow_width.*angle.*light.*shadow_len.*shadow_pos"):
        P.counterfactual(lab, {"shadow_width": 5.0})


@pytest.mark.parametrize(
    "name,value",
    [("angle", 50.0), ("angle", -36.5), ("light", 40.0), ("shadow_len", 2.0), ("shadow_pos", 25.0)],
)
def test_counterfactual_out_of_range(name, value):
    _, lab = P.sample(2, seed=0, size=16)
    lo, hi = P.RANGES[name]
    with pytest.raises(ValueError, match=re.escape(f"{name}={value:g} ") + r".*" + re.escape(f"[{lo:g}, {hi:g}]")):
        P.counterfactual(lab, {name: value})


def test_counterfactual_range_edges_allowed():
    _, lab = P.sample(2, seed=0, size=16)
    for name in ("angle", "light"):
        for v in P.RANGES[name]:
            P.counterfactual(lab, {name: v}, size=16)


# --- the picture moves with the labels ------------------------------------------------------------


def test_ball_moves_right_when_angle_grows():
    angles = np.linspace(-36, 38.7, 9)
    images = P.render(_labels(angles, 90.0), size=64)
    cx = _ball_centroid_x(images)
    assert np.all(np.diff(cx) > 0)
    # sign consistent with ball_x = 10 + 8 sin(theta): right of centre for angle > 0
    expected_px = (10 + 8 * np.sin(np.deg2rad(angles))) / 20 * 64 - 0.5
    np.testing.assert_allclose(cx, expected_px, atol=1.0)


def test_shadow_bar_follows_shadow_pos():
    pos = np.linspace(5.0, 15.0, 6)
    images = P.render(_labels(0.0, 100.0, s_len=4.0, s_pos=pos), size=64)
    cx = _shadow_centroid_x(images)
    assert np.all(np.diff(cx) > 0)
    np.testing.assert_allclose(cx, pos, atol=0.3)


def test_shadow_bar_length_follows_shadow_len():
    lens = np.array([3.0, 6.0, 9.0, 12.0])
    images = P.render(_labels(0.0, 100.0, s_len=lens, s_pos=10.0), size=64)
    ys = 21 - (np.arange(64) + 0.5) * 22 / 64
    bottom = images[:, ys < -0.5].astype(float).mean(axis=-1)  # rows fully inside the bar
    dark_width = (bottom < 100).sum(axis=-1).mean(axis=-1) * 20 / 64
    np.testing.assert_allclose(dark_width, lens, atol=0.5)


def test_light_moves_opposite_to_shadow():
    # light at the left (phi > 90 deg) -> shadow to the right of the pivot, and vice versa
    lab = _labels(0.0, [60.0, 120.0])
    assert lab[0, 3] < 10 < lab[1, 3]
    im = P.render(lab, size=64).astype(int)
    orange = (im[..., 0] > 200) & (im[..., 1] > 100) & (im[..., 1] < 220) & (im[..., 2] < 80)
    cols = np.arange(64)
    lx = (orange.sum(axis=1) * cols).sum(axis=1) / orange.sum(axis=(1, 2))
    assert lx[0] > 32 > lx[1]


# --- files ---------------------------------------------------------------------------------


def test_write_read_roundtrip(tmp_path):
    out = tmp_path / "nested" / "pendulum"
    csv_path = P.write_dataset(out, n=5, size=32, seed=11, progress=False)
    assert csv_path == out / "labels.csv"
    header = csv_path.read_text().splitlines()[0]
    assert header == "file,angle_deg,light_deg,shadow_len,shadow_pos"
    assert (out / "images" / "000000.png").exists() and (out / "images" / "000004.png").exists()
    norm = json.loads((out / "normalisation.json").read_text())
    assert set(norm) == set(P.VARIABLES)
    for v in P.VARIABLES:
        assert norm[v] == {"centre": P.NORMALISATION[v][0], "scale": P.NORMALISATION[v][1], "unit": P.UNITS[v]}

    images, labels = P.read_dataset(out)
    ref_im, ref_lab = P.sample(5, seed=11, size=32)
    np.testing.assert_array_equal(images, ref_im)
    np.testing.assert_array_equal(labels, ref_lab)
    assert images.dtype == np.uint8 and images.shape == (5, 32, 32, 3)


def test_write_dataset_progress_bar(tmp_path, capsys):
    P.write_dataset(tmp_path, n=2, size=16, seed=0, progress=True)
    assert "2/2" in capsys.readouterr().err
