"""Tests for synthetic_data.circuit (fast: small n, small images)."""

import json
import re

import numpy as np
import pytest

from synthetic_data import circuit as C
from synthetic_data.base import Samples

LIGHTS = ("blue", "green", "red")


def _col(name):
    return C.VARIABLES.index(name)


def _pixel_centres(size):
    xs = (np.arange(size) + 0.5) * 20.0 / size
    ys = 20.0 - (np.arange(size) + 0.5) * 20.0 / size  # row 0 at the top
    return xs, ys


def _lamp_mask(light, size, inset=0.6):
    """Pixels whose centre lies well inside the lamp disc (radius 2 at (x_light, 17))."""
    xs, ys = _pixel_centres(size)
    lx = {"red": 4.0, "blue": 10.0, "green": 16.0}[light]
    d = np.hypot(xs[None, :] - lx, ys[:, None] - 17.0)
    return d < 2.0 - inset


def _halo_mask(light, size):
    """A ring just outside the lamp's socket (radius 2.4), where only the glow is drawn."""
    xs, ys = _pixel_centres(size)
    lx = {"red": 4.0, "blue": 10.0, "green": 16.0}[light]
    d = np.hypot(xs[None, :] - lx, ys[:, None] - 17.0)
    return (d > 2.4 + 20.0 / size) & (d < 3.4)


def _lamp_rows(size):
    _, ys = _pixel_centres(size)
    return ys > 12.3


def _tip_centroid(images):
    """(x, y) canvas centroid of the near-white fingertip pixels, per image."""
    im = images.astype(int)
    mask = (im > 200).all(axis=-1)
    counts = mask.sum(axis=(1, 2))
    assert np.all(counts > 0)
    xs, ys = _pixel_centres(images.shape[1])
    cx = (mask.sum(axis=1) * xs).sum(axis=1) / counts
    cy = (mask.sum(axis=2) * ys).sum(axis=1) / counts
    return cx, cy


def _labels(arm, blue=0.1, green=0.1, red=0.1):
    return np.stack(np.broadcast_arrays(np.atleast_1d(np.asarray(arm, float)), blue, green, red), axis=1).astype(float)


def _red_drive(arm, blue, green):
    return 1 - (1 - C.press(arm, "red")) * (1 - blue * green)


# --- constants ------------------------------------------------------------------------------------


def test_constants_consistent():
    assert C.VARIABLES == ("arm", "blue", "green", "red")
    assert C.CSV_COLUMNS == ("file", "arm", "blue", "green", "red")
    assert C.DEFAULT_SIZE == 32 and C.SPATIAL_DIMS == 2 and C.CHANNELS == 3
    assert set(C.UNITS) == set(C.NORMALISATION) == set(C.RANGES) == set(C.VARIABLES)
    assert all(C.RANGES[v] == (0.0, 1.0) for v in C.VARIABLES)
    assert C.PARENTS == {"arm": (), "blue": ("arm",), "green": ("arm",), "red": ("arm", "blue", "green")}
    assert C.GRAPH.descendants("arm") == ("blue", "green", "red")


# --- determinism, shapes ----------------------------------------------------------------------------


def test_same_seed_identical_different_seed_differs():
    a = C.sample(16, seed=3)
    b = C.sample(16, seed=3)
    np.testing.assert_array_equal(a.images, b.images)
    np.testing.assert_array_equal(a.labels, b.labels)
    assert set(a.noise) == set(C.VARIABLES)
    for k in a.noise:
        np.testing.assert_array_equal(a.noise[k], b.noise[k])
    c = C.sample(16, seed=4)
    assert not np.array_equal(a.labels, c.labels)
    assert not np.array_equal(a.images, c.images)


@pytest.mark.parametrize("size", [32, 64])
def test_shapes_and_dtypes(size):
    s = C.sample(7, seed=1, size=size)
    assert s.images.shape == (7, size, size, 3) and s.images.dtype == np.uint8
    assert s.labels.shape == (7, 4) and s.labels.dtype == np.float64
    assert all(v.shape == (7,) for v in s.noise.values())
    assert len(np.unique(s.images)) > 10  # anti-aliased, not blank
    images, labels = s  # unpacks like the other generators
    assert images is s.images and labels is s.labels


def test_default_and_odd_sizes_and_too_small():
    assert C.sample(2).images.shape == (2, 32, 32, 3)
    for size in (16, 17, 48):
        assert C.render(_labels([0.0, 1.0]), size=size).shape == (2, size, size, 3)
    with pytest.raises(ValueError, match="size"):
        C.render(_labels(0.5), size=15)


def test_render_accepts_dict_and_array():
    lab = _labels([0.1, 0.5, 0.9], [0.0, 0.5, 1.0], 0.3, [1.0, 0.2, 0.0])
    as_dict = {v: lab[:, k] for k, v in enumerate(C.VARIABLES)}
    np.testing.assert_array_equal(C.render(lab), C.render(as_dict))


# --- mechanism ----------------------------------------------------------------------------------------


def test_labels_in_range_and_follow_the_mechanism():
    s = C.sample(2000, seed=0, size=16)
    assert np.all((s.labels >= 0) & (s.labels <= 1))
    np.testing.assert_array_equal(s.labels[:, 0], s.noise["arm"])
    np.testing.assert_array_equal(C.mechanism(s.noise), s.labels)
    arm = s.labels[:, 0]
    assert abs(arm.mean() - 0.5) < 0.03 and arm.min() < 0.01 and arm.max() > 0.99  # Uniform(0, 1)
    for k in ("blue", "green", "red"):
        assert abs(np.std(s.noise[k]) - C.NOISE_SD) < 0.01


def test_press_peaks_at_its_button():
    arm = np.linspace(0, 1, 1001)
    for light, at in C.BUTTON_ARM.items():
        p = C.press(arm, light)
        assert arm[np.argmax(p)] == pytest.approx(at, abs=1e-3)
        assert p.max() == pytest.approx(1.0, abs=1e-6)
        assert p[np.abs(arm - at) > 0.4].max() < 0.1  # far from the button: not pressed


def test_mechanism_shows_in_the_data():
    s = C.sample(3000, seed=1, size=16)
    arm, blue, green, red = s.labels.T
    # each of blue, green follows the press of its own button
    assert np.corrcoef(C.press(arm, "blue"), blue)[0, 1] > 0.9
    assert np.corrcoef(C.press(arm, "green"), green)[0, 1] > 0.9
    # red follows "red pressed OR (blue AND green)", and is high only when those causes are
    drive = _red_drive(arm, blue, green)
    assert np.corrcoef(drive, red)[0, 1] > 0.9
    assert np.mean(drive[red > 0.7] > 0.4) > 0.99
    assert red[drive < 0.05].mean() < 0.2
    # the blue/green AND matters on its own: with the red button far away, red rises with blue * green
    far = C.press(arm, "red") < 0.01
    assert np.corrcoef((blue * green)[far], red[far])[0, 1] > 0.7
    # lights are bright when pressed, dim when not
    assert blue[C.press(arm, "blue") > 0.95].mean() > 0.8
    assert blue[C.press(arm, "blue") < 0.05].mean() < 0.2


# --- counterfactuals ------------------------------------------------------------------------------------


def test_do_arm_recomputes_all_lights():
    s = C.sample(200, seed=7, size=16)
    cf = C.counterfactual(s, {"arm": 0.6}, size=16)  # press the blue button
    np.testing.assert_array_equal(cf.labels[:, 0], 0.6)
    for k in s.noise:
        np.testing.assert_array_equal(cf.noise[k], s.noise[k])
    np.testing.assert_array_equal(cf.labels, C.mechanism(s.noise, {"arm": np.full(200, 0.6)}))
    # the lights moved, and blue now sits at its "pressed" level (0.9 + noise, clipped)
    for light in LIGHTS:
        assert np.mean(cf.labels[:, _col(light)] != s.labels[:, _col(light)]) > 0.9
    np.testing.assert_allclose(cf.labels[:, 1], np.clip(0.9 + s.noise["blue"], 0, 1), atol=1e-12)
    np.testing.assert_array_equal(cf.images, C.render(cf.labels, 16))
    assert s.labels[0, 0] != 0.6  # the input is not modified in place


def test_do_blue_moves_red_only():
    s = C.sample(300, seed=8, size=16)
    cf = C.counterfactual(s, {"blue": 1.0}, size=16)
    np.testing.assert_array_equal(cf.labels[:, [0, 2]], s.labels[:, [0, 2]])  # arm, green kept
    np.testing.assert_array_equal(cf.labels[:, 1], 1.0)
    arm, _, green, _ = s.labels.T
    expected_red = np.clip(0.1 + 0.8 * _red_drive(arm, 1.0, green) + s.noise["red"], 0, 1)
    np.testing.assert_allclose(cf.labels[:, 3], expected_red, atol=1e-12)
    # where green is on, switching blue on lights red
    on = (green > 0.6) & (s.labels[:, 1] < 0.3)
    assert on.sum() > 5
    assert np.all(cf.labels[on, 3] > s.labels[on, 3])


def test_do_blue_and_green_light_red_everywhere():
    s = C.sample(300, seed=9, size=16)
    cf = C.counterfactual(s, {"blue": 1.0, "green": 1.0}, size=16)
    np.testing.assert_array_equal(cf.labels[:, 0], s.labels[:, 0])
    np.testing.assert_allclose(cf.labels[:, 3], np.clip(0.9 + s.noise["red"], 0, 1), atol=1e-12)
    assert cf.labels[:, 3].mean() > 0.85


def test_do_red_changes_only_red():
    s = C.sample(50, seed=10, size=32)
    cf = C.counterfactual(s, {"red": 0.0})
    np.testing.assert_array_equal(cf.labels[:, :3], s.labels[:, :3])
    np.testing.assert_array_equal(cf.labels[:, 3], 0.0)
    # only the red lamp's neighbourhood changed in the image
    changed = np.any(cf.images != s.images, axis=(0, 3))
    xs, ys = _pixel_centres(32)
    near_red = np.hypot(xs[None, :] - 4.0, ys[:, None] - 17.0) < 2.4 + 1.8 + 1.0
    assert changed.any() and not np.any(changed & ~near_red)


def test_array_valued_do_and_broadcast_error():
    s = C.sample(4, seed=8, size=16)
    vals = np.array([0.0, 0.3, 0.7, 1.0])
    cf = C.counterfactual(s, {"arm": vals}, size=16)
    np.testing.assert_array_equal(cf.labels[:, 0], vals)
    with pytest.raises(ValueError, match="arm: 2 values for a batch of 4"):
        C.counterfactual(s, {"arm": np.array([0.1, 0.2])}, size=16)


@pytest.mark.parametrize("name", C.VARIABLES)
def test_null_intervention_reproduces_factual_image(name):
    s = C.sample(20, seed=11)
    cf = C.counterfactual(s, {name: s.labels[:, _col(name)]})
    np.testing.assert_array_equal(cf.labels, s.labels)
    np.testing.assert_array_equal(cf.images, s.images)
    # and applying it again (composition) changes nothing either
    cf2 = C.counterfactual(cf, {name: cf.labels[:, _col(name)]})
    np.testing.assert_array_equal(cf2.images, s.images)


def test_reversibility():
    s = C.sample(20, seed=12)
    there = C.counterfactual(s, {"arm": 0.5})
    back = C.counterfactual(there, {"arm": s.labels[:, 0]})
    np.testing.assert_array_equal(back.images, s.images)
    np.testing.assert_array_equal(back.labels, s.labels)


def test_counterfactual_of_sliced_samples():
    s = C.sample(10, seed=13, size=16)
    cf = C.counterfactual(s[2:5], {"green": 0.5}, size=16)
    np.testing.assert_array_equal(cf.labels, C.counterfactual(s, {"green": 0.5}, size=16).labels[2:5])


# --- errors ------------------------------------------------------------------------------------------------


def test_counterfactual_unknown_variable():
    s = C.sample(2, seed=0, size=16)
    with pytest.raises(ValueError, match=r"(?s)yellow.*arm.*blue.*green.*red"):
        C.counterfactual(s, {"yellow": 0.5})


@pytest.mark.parametrize("name,value", [("arm", 1.5), ("arm", -0.1), ("blue", 2.0), ("green", -1.0), ("red", 1.01)])
def test_counterfactual_out_of_range(name, value):
    s = C.sample(2, seed=0, size=16)
    with pytest.raises(ValueError, match=re.escape(f"{name}={value:g} is outside the declared range [0, 1]")):
        C.counterfactual(s, {name: value})


def test_counterfactual_rejects_nan_and_array_out_of_range():
    s = C.sample(3, seed=0, size=16)
    with pytest.raises(ValueError, match="blue: value nan is not a finite number"):
        C.counterfactual(s, {"blue": float("nan")})
    with pytest.raises(ValueError, match=r"red=1\.2"):
        C.counterfactual(s, {"red": np.array([0.5, 1.2, 0.1])})


def test_counterfactual_range_edges_allowed():
    s = C.sample(2, seed=0, size=16)
    for name in C.VARIABLES:
        for v in (0.0, 1.0):
            C.counterfactual(s, {name: v}, size=16)


def test_counterfactual_needs_the_noise():
    s = C.sample(3, seed=0, size=16)
    with pytest.raises(ValueError, match="noise"):
        C.counterfactual(s.labels, {"arm": 0.5})
    with pytest.raises(ValueError, match="noise"):
        C.counterfactual(Samples(s.images, s.labels), {"arm": 0.5})


# --- the picture moves with the labels ------------------------------------------------------------------


@pytest.mark.parametrize("light", LIGHTS)
def test_lamp_pixels_brighten_with_its_light(light):
    size = 64
    values = np.linspace(0, 1, 6)
    lab = np.full((6, 4), 0.5)
    lab[:, 0] = 0.3
    lab[:, _col(light)] = values
    im = C.render(lab, size).astype(float)
    lamp = im[:, _lamp_mask(light, size)].mean(axis=1)  # (6, 3) mean colour inside the disc
    channel = {"red": 0, "green": 1, "blue": 2}[light]
    halo = im[:, _halo_mask(light, size), channel].mean(axis=1)
    assert np.all(np.diff(lamp[:, channel]) > 5)  # brighter in its own colour
    assert np.all(np.diff(lamp.sum(axis=1)) > 0)
    assert lamp[-1, channel] > 220 and lamp[0].max() < 50  # fully lit vs. dark
    assert np.all(np.diff(halo) > 0) and halo[-1] - halo[0] > 40  # the glow around it
    # the other lamps and the arm's half of the image do not move
    for other in LIGHTS:
        if other != light:
            m = _lamp_mask(other, size)
            assert np.all(im[:, m] == im[:1, m])
    below = ~_lamp_rows(size)
    assert np.all(im[:, below] == im[:1, below])


def test_fingertip_sweeps_the_arc():
    size = 64
    arm = np.linspace(0, 1, 9)
    images = C.render(_labels(arm, 0.4, 0.6, 0.8), size)
    cx, cy = _tip_centroid(images)
    tx, ty = C.fingertip(arm)
    assert np.all(np.diff(cx) > 0)  # left to right
    np.testing.assert_allclose(cx, tx, atol=0.4)
    np.testing.assert_allclose(cy, ty, atol=0.4)
    # the lamps' half of the image does not depend on the arm
    top = _lamp_rows(size)
    assert np.all(images[:, top] == images[:1, top])
    # ... and the arm's does: each position draws a different picture there
    below = images[:, ~top].reshape(len(arm), -1).astype(int)
    assert np.all(np.abs(np.diff(below, axis=0)).sum(axis=1) > 1000)


def test_do_arm_image_shows_the_press():
    s = C.sample(20, seed=14, size=32)
    cf = C.counterfactual(s, {"arm": C.BUTTON_ARM["green"]})
    cx, _ = _tip_centroid(cf.images)
    np.testing.assert_allclose(cx, C.fingertip(C.BUTTON_ARM["green"])[0], atol=0.6)
    green = cf.images[:, _lamp_mask("green", 32)].astype(float).mean(axis=1)[:, 1]
    green0 = s.images[:, _lamp_mask("green", 32)].astype(float).mean(axis=1)[:, 1]
    raised = cf.labels[:, 2] > s.labels[:, 2] + 0.1
    assert raised.sum() > 5 and np.all(green[raised] > green0[raised])


# --- files --------------------------------------------------------------------------------------------------


def test_write_read_roundtrip(tmp_path):
    out = tmp_path / "nested" / "circuit"
    csv_path = C.write_dataset(out, n=5, size=32, seed=11, progress=False)
    assert csv_path == out / "labels.csv"
    assert csv_path.read_text().splitlines()[0] == "file,arm,blue,green,red"
    assert (out / "images" / "000000.png").exists() and (out / "images" / "000004.png").exists()
    norm = json.loads((out / "normalisation.json").read_text())
    assert set(norm) == set(C.VARIABLES)
    for v in C.VARIABLES:
        assert norm[v] == {"centre": C.NORMALISATION[v][0], "scale": C.NORMALISATION[v][1], "unit": C.UNITS[v]}
    images, labels = C.read_dataset(out)
    ref = C.sample(5, seed=11, size=32)
    np.testing.assert_array_equal(images, ref.images)
    np.testing.assert_array_equal(labels, ref.labels)
    assert images.dtype == np.uint8 and images.shape == (5, 32, 32, 3)


def test_write_dataset_progress_bar(tmp_path, capsys):
    C.write_dataset(tmp_path, n=2, size=16, seed=0, progress=True)
    assert "2/2" in capsys.readouterr().err


def test_normalise_roundtrip():
    s = C.sample(50, seed=2, size=16)
    z = C.normalise(s.labels)
    assert np.all(np.abs(z) <= 1.0 + 1e-12)
    np.testing.assert_allclose(C.denormalise(z), s.labels, atol=1e-12)
