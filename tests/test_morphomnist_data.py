"""Tests for synthetic_data.morphomnist (fast: a few hundred 28-32 px digits)."""

import gzip
import json

import numpy as np
import pytest
from scipy import ndimage as ndi

from cdae_med.graph import GraphError
from synthetic_data import morphomnist as M
from synthetic_data.base import Samples

N = 300


@pytest.fixture(scope="module")
def samples():
    return M.sample(N, seed=0)


def _targets(s):
    t = 0.5 + s.noise["u_thickness"]
    return t, M.intensity_mechanism(t, s.noise["u_intensity"])


def _skeleton(image):
    from skimage.morphology import skeletonize

    img = image[..., 0].astype(float)
    return skeletonize(img >= 0.5 * img.max())


def _centroid(image):
    img = image[..., 0].astype(float)
    ys, xs = np.indices(img.shape)
    return np.array([(img * ys).sum(), (img * xs).sum()]) / img.sum()


def _skeleton_overlap(a, b, tol=1.0):
    """Fraction of b's skeleton within ``tol`` px of a's skeleton."""
    sa, sb = _skeleton(a), _skeleton(b)
    dist = ndi.distance_transform_edt(~sa)
    return float((dist[sb] <= tol).mean())


# --- constants ------------------------------------------------------------------------------


def test_constants():
    assert M.VARIABLES == ("thickness", "intensity")
    assert M.PARENTS["intensity"] == ("thickness",)
    assert M.DEFAULT_SIZE == 32 and M.SPATIAL_DIMS == 2 and M.CHANNELS == 1
    assert M.CSV_COLUMNS == ("file", "digit", "thickness_px", "intensity")
    assert M.UNITS["thickness"] == "px"
    assert len(M.font_paths()) >= 1


# --- determinism, shapes ----------------------------------------------------------------------


def test_same_seed_same_data_and_shapes(samples):
    again = M.sample(40, seed=0)
    other = M.sample(40, seed=1)
    assert samples.images.shape == (N, 32, 32, 1) and samples.images.dtype == np.uint8
    assert samples.labels.shape == (N, 2) and samples.labels.dtype == np.float64
    np.testing.assert_array_equal(again.images, samples.images[:40])
    np.testing.assert_array_equal(again.labels, samples.labels[:40])
    for k, v in again.noise.items():
        assert len(v) == 40
        np.testing.assert_array_equal(v, samples.noise[k][:40])
    assert not np.array_equal(other.images, again.images)
    # padding: the 28 px digit is centred in the 32 px image
    assert samples.images[:, :2].max() == 0 and samples.images[:, -2:].max() == 0
    assert set(np.unique(samples.noise["digit"])) == set(range(10))


def test_other_sizes():
    a = M.sample(3, seed=2, size=28)
    b = M.sample(3, seed=2, size=36)
    assert a.images.shape == (3, 28, 28, 1) and b.images.shape == (3, 36, 36, 1)
    np.testing.assert_array_equal(b.images[:, 4:32, 4:32], a.images)
    np.testing.assert_allclose(a.labels, b.labels)
    for bad in (24, 31):
        with pytest.raises(ValueError, match="size"):
            M.sample(2, size=bad)


# --- mechanism ---------------------------------------------------------------------------------


def test_measured_thickness_matches_target(samples):
    t, i = _targets(samples)
    err = np.abs(samples.labels[:, 0] - t)
    assert np.median(err) < 0.03
    assert np.percentile(err, 95) < 0.1
    assert err.max() < 0.6
    # the label is what measure_thickness gives on the image
    k = 7
    assert samples.labels[k, 0] == pytest.approx(M.measure_thickness(samples.images[k]))
    # intensity label: the foreground median, close to the mechanism's value
    ierr = np.abs(samples.labels[:, 1] - i)
    assert np.median(ierr) < 0.5 and np.percentile(ierr, 95) < 2.0
    assert samples.labels[:, 1].min() >= 60 and samples.labels[:, 1].max() <= 255


def test_thickness_intensity_dependence(samples):
    thick, inten = samples.labels.T
    assert np.corrcoef(thick, inten)[0, 1] > 0.6
    assert 2.2 < thick.mean() < 2.8  # E[t] = 0.5 + 10 / 5 = 2.5
    # E[intensity | t] = 64 + 191 E_u[sigmoid(2 (t - 2.5) + u)], u ~ N(0, 0.5): Gauss-Hermite
    x, w = np.polynomial.hermite_e.hermegauss(20)
    for lo, hi in ((1.0, 2.0), (2.0, 2.5), (2.5, 3.0), (3.0, 5.0)):
        sel = (thick >= lo) & (thick < hi)
        assert sel.sum() > 30
        expected = np.mean([(w * M.intensity_mechanism(t, 0.5 * x)).sum() / w.sum() for t in thick[sel]])
        assert inten[sel].mean() == pytest.approx(expected, abs=8.0)


def test_thickness_measurement_of_a_bar():
    img = np.zeros((28, 28))
    img[4:24, 12:15] = 200.0  # a 3 px wide bar
    assert M.measure_thickness(img) == pytest.approx(3.0, abs=0.35)
    assert M.measure_thickness(np.zeros((28, 28))) == 0.0
    assert M.measure_intensity(img) == 200.0


# --- counterfactuals ----------------------------------------------------------------------------


def test_do_thickness_changes_thickness_keeps_shape(samples):
    s = samples[:40]
    t, _ = _targets(s)
    v = np.where(t > 2.5, 1.5, 3.5)  # per-sample values
    cf = M.counterfactual(s, {"thickness": v})
    assert cf.images.shape == s.images.shape
    assert np.abs(cf.labels[:, 0] - v).max() < 0.15
    expected_i = M.intensity_mechanism(v, s.noise["u_intensity"])  # same intensity noise
    assert np.abs(cf.labels[:, 1] - expected_i).max() < 3.0
    assert np.all(np.sign(cf.labels[:, 1] - s.labels[:, 1]) == np.sign(v - t))
    np.testing.assert_array_equal(cf.noise["digit"], s.noise["digit"])
    np.testing.assert_allclose(cf.noise["u_thickness"], v - 0.5)
    overlap = np.array([_skeleton_overlap(a, b) for a, b in zip(s.images, cf.images)])
    shifted = np.array([_skeleton_overlap(a, b) for a, b in zip(s.images, np.roll(cf.images, 1, axis=0))])
    assert np.median(overlap) > 0.95 and overlap.mean() > 0.9
    assert shifted.mean() < 0.55  # the check tells different digits apart (about 0.4)
    shift = np.array([np.linalg.norm(_centroid(a) - _centroid(b)) for a, b in zip(s.images, cf.images)])
    assert np.median(shift) < 0.5 and shift.max() < 1.5


def test_do_intensity_keeps_thickness_and_shape(samples):
    s = samples[:30]
    cf = M.counterfactual(s, {"intensity": 200.0})
    assert np.abs(cf.labels[:, 1] - 200.0).max() < 3.0
    assert np.abs(cf.labels[:, 0] - s.labels[:, 0]).max() < 0.2
    def fg(x):  # foreground at half the maximum, per image
        return x >= 0.5 * x.max(axis=(1, 2, 3), keepdims=True)

    assert (fg(cf.images) != fg(s.images)).mean() < 0.005  # same shape
    assert ((cf.images > 0) != (s.images > 0)).mean() < 0.005  # only the faintest rim can round to 0
    # the returned noise is the counterfactual world's: the mechanism gives the set intensity
    t = 0.5 + cf.noise["u_thickness"]
    np.testing.assert_allclose(M.intensity_mechanism(t, cf.noise["u_intensity"]), 200.0)
    again = M.counterfactual(cf, {})
    np.testing.assert_array_equal(again.images, cf.images)


def test_null_intervention_reproduces(samples):
    s = samples[:20]
    t, i = _targets(s)
    np.testing.assert_array_equal(M.counterfactual(s, {"thickness": t}).images, s.images)
    np.testing.assert_array_equal(M.counterfactual(s, {}).images, s.images)
    both = M.counterfactual(s, {"thickness": t, "intensity": i})
    assert np.abs(both.images.astype(int) - s.images).max() <= 1
    # intervening with the measured label (not the target) is nearly a no-op too
    near = M.counterfactual(s, {"thickness": s.labels[:, 0]})
    assert np.abs(near.images.astype(float) - s.images).mean() < 1.0


def test_intervention_errors(samples):
    s = samples[:3]
    with pytest.raises(ValueError, match="unknown variable"):
        M.counterfactual(s, {"colour": 1.0})
    with pytest.raises(ValueError, match="outside"):
        M.counterfactual(s, {"thickness": 10.0})
    with pytest.raises(ValueError, match="outside"):
        M.counterfactual(s, {"thickness": [2.0, 2.0, 0.1]})
    with pytest.raises(ValueError, match="outside"):
        M.counterfactual(s, {"intensity": 300.0})
    with pytest.raises(ValueError):
        M.counterfactual(s, {"intensity": np.nan})
    with pytest.raises(ValueError, match="thickness: 2 values for a batch of 3"):
        M.counterfactual(s, {"thickness": [2.0, 3.0]})
    with pytest.raises(ValueError, match="noise"):
        M.counterfactual(s.labels, {"thickness": 2.0})
    with pytest.raises(GraphError):  # the graph's own error class (a ValueError)
        M.counterfactual(s, {"thickness": -1.0})


# --- files --------------------------------------------------------------------------------------


def test_write_read_round_trip(tmp_path):
    csv_path = M.write_dataset(tmp_path / "ds", 12, size=32, seed=4, progress=False)
    assert csv_path.name == "labels.csv"
    header = csv_path.read_text().splitlines()[0].split(",")
    assert tuple(header) == M.CSV_COLUMNS
    images, labels, digits = M.read_dataset(tmp_path / "ds", with_digits=True)
    ref = M.sample(12, seed=4)
    np.testing.assert_array_equal(images, ref.images)
    np.testing.assert_array_equal(labels, ref.labels)
    np.testing.assert_array_equal(digits, ref.noise["digit"])
    assert M.read_dataset(tmp_path / "ds")[0].shape == (12, 32, 32, 1)
    norm = json.loads((tmp_path / "ds" / "normalisation.json").read_text())
    assert norm["thickness"] == {"centre": 3.4, "scale": 2.4, "unit": "px"}


# --- real digits from IDX files ----------------------------------------------------------------


def _idx_bytes(array: np.ndarray) -> bytes:
    header = bytes([0, 0, 0x08, array.ndim]) + np.array(array.shape, dtype=">u4").tobytes()
    return header + array.astype(np.uint8).tobytes()


def _tiny_mnist():
    imgs = np.zeros((3, 28, 28), dtype=np.uint8)
    imgs[0, 5:23, 13:15] = 255  # a "1"
    yy, xx = np.indices((28, 28))
    ring = np.abs(np.hypot(yy - 13.5, xx - 13.5) - 7) < 1.2
    imgs[1][ring] = 255  # a "0"
    imgs[2, 6:8, 8:20] = 255  # a "7"
    imgs[2][(np.abs(xx - (19 - (yy - 7) * 0.5)) < 1.1) & (yy >= 7) & (yy < 23)] = 255
    return imgs, np.array([1, 0, 7], dtype=np.uint8)


def test_mnist_idx(tmp_path):
    imgs, labs = _tiny_mnist()
    (tmp_path / "train-images-idx3-ubyte.gz").write_bytes(gzip.compress(_idx_bytes(imgs)))
    (tmp_path / "train-labels-idx1-ubyte").write_bytes(_idx_bytes(labs))
    np.testing.assert_array_equal(M.read_idx(tmp_path / "train-images-idx3-ubyte.gz"), imgs)
    loaded, digits = M.load_mnist(tmp_path)
    np.testing.assert_array_equal(loaded, imgs)
    np.testing.assert_array_equal(digits, labs)

    s = M.sample(6, seed=0, mnist_dir=tmp_path)
    assert s.images.shape == (6, 32, 32, 1)
    np.testing.assert_array_equal(s.noise["digit"], labs[s.noise["mnist_index"]])
    assert np.all(s.noise["font"] == -1)
    assert np.abs(s.labels[:, 0] - (0.5 + s.noise["u_thickness"])).max() < 0.25
    for k in range(6):  # the rendered digit follows its source digit's skeleton
        src = np.zeros((32, 32, 1), np.uint8)
        src[2:30, 2:30, 0] = imgs[s.noise["mnist_index"][k]]
        assert _skeleton_overlap(src, s.images[k]) > 0.8
    cf = M.counterfactual(s, {"thickness": 4.0})  # needs no mnist_dir: the source is in the noise
    assert np.abs(cf.labels[:, 0] - 4.0).max() < 0.3
    np.testing.assert_array_equal(M.counterfactual(s, {}).images, s.images)

    # errors name the file
    bad = tmp_path / "bad"
    bad.mkdir()
    with pytest.raises(ValueError, match="train-images-idx3-ubyte"):
        M.load_mnist(bad)
    (bad / "train-images-idx3-ubyte").write_bytes(b"\x00\x00\x08\x03" + np.array([2, 28, 28], ">u4").tobytes() + b"x")
    with pytest.raises(ValueError, match=r"bad[/\\]train-images-idx3-ubyte"):
        M.sample(2, mnist_dir=bad)
    (bad / "train-images-idx3-ubyte").write_bytes(b"PK\x03\x04junk")
    with pytest.raises(ValueError, match="not an IDX file"):
        M.load_mnist(bad)


def test_samples_indexing_keeps_noise(samples):
    sub = samples[[3, 5]]
    assert isinstance(sub, Samples) and len(sub) == 2
    cf = M.counterfactual(sub, {"intensity": [100.0, 150.0]})
    assert cf.labels[:, 1] == pytest.approx([100.0, 150.0], abs=3.0)
