import json

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from cdae_cli import app

runner = CliRunner()


def run(*args):
    return runner.invoke(app, [str(a) for a in args])


def test_counterfactual_from_the_test_set(tiny_checkpoint, tmp_path):
    out = tmp_path / "cf.png"
    r = run("counterfactual", "--checkpoint", tiny_checkpoint, "--dataset", "pendulum", "--index", 3,
            "--do", "angle=20", "--out", out, "--steps", 5)
    assert r.exit_code == 0, r.output
    assert Image.open(out).size == (16, 16)
    report = json.loads(r.stdout[r.stdout.index("{"):r.stdout.rindex("}") + 1])
    assert report["interventions"] == {"angle": 20.0}
    assert report["changed"] == ["angle", "shadow_len", "shadow_pos"]
    assert report["counterfactual"]["angle"] == pytest.approx(20.0)


def test_counterfactual_confines_its_change_on_request(tiny_checkpoint, tmp_path):
    outs = {}
    for confine in ("0", "0.5"):
        outs[confine] = tmp_path / f"cf{confine}.png"
        r = run("counterfactual", "--checkpoint", tiny_checkpoint, "--dataset", "pendulum", "--index", 3,
                "--do", "angle=20", "--out", outs[confine], "--steps", 5, "--confine", confine)
        assert r.exit_code == 0, r.output
    plain, confined = (np.asarray(Image.open(outs[c]), float) for c in ("0", "0.5"))
    assert np.abs(plain - confined).max() > 0  # some of the change is the input's own pixels again
    r = run("counterfactual", "--checkpoint", tiny_checkpoint, "--dataset", "pendulum", "--index", 3,
            "--do", "angle=20", "--out", tmp_path / "x.png", "--confine", "1.5")
    assert r.exit_code == 2 and "--confine" in r.output


def test_counterfactual_from_a_png(tiny_checkpoint, tmp_path):
    img = tmp_path / "in.png"
    Image.fromarray(np.full((16, 16, 3), 200, np.uint8)).save(img)
    r = run("counterfactual", "--checkpoint", tiny_checkpoint, "--input", img, "--do", "light=100",
            "--do", "angle=-10", "--out", tmp_path / "cf.png", "--steps", 3)
    assert r.exit_code == 0, r.output


@pytest.mark.parametrize(
    "do, message",
    [("angle=99", "angle=99 deg is outside the declared range"),
     ("age=70", "unknown variable 'age'"),
     ("angle", "not of the form variable=value"),
     ("angle=old", "'old' is not a number")],
)
def test_bad_interventions(tiny_checkpoint, tmp_path, do, message):
    r = run("counterfactual", "--checkpoint", tiny_checkpoint, "--dataset", "pendulum", "--index", 0,
            "--do", do, "--out", tmp_path / "cf.png")
    assert r.exit_code == 2
    assert message in r.output
    assert not (tmp_path / "cf.png").exists()


def test_bad_inputs(tiny_checkpoint, tmp_path):
    r = run("counterfactual", "--checkpoint", tmp_path / "nope", "--index", 0, "--do", "angle=1", "--out", "x.png")
    assert r.exit_code == 2 and "no checkpoint directory" in r.output
    junk = tmp_path / "junk.png"
    junk.write_bytes(b"not a png")
    r = run("counterfactual", "--checkpoint", tiny_checkpoint, "--input", junk, "--do", "angle=1", "--out", "x.png")
    assert r.exit_code == 2 and "cannot read image" in r.output
    big = tmp_path / "big.png"
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(big)
    r = run("counterfactual", "--checkpoint", tiny_checkpoint, "--input", big, "--do", "angle=1", "--out", "x.png")
    assert r.exit_code == 2 and "this model takes 16x16" in r.output
    r = run("counterfactual", "--checkpoint", tiny_checkpoint, "--do", "angle=1", "--out", "x.png")
    assert r.exit_code == 2 and "either --input" in r.output
    r = run("counterfactual", "--checkpoint", tiny_checkpoint, "--index", 5000, "--do", "angle=1", "--out", "x.png")
    assert r.exit_code == 2 and "--index must be in [0, 1000)" in r.output


def test_train_rejects_bad_options(tmp_path):
    r = run("train", "--dataset", "mnist", "--out", tmp_path)
    assert r.exit_code == 2 and "unknown data set 'mnist'" in r.output
    r = run("train", "--steps", 0, "--out", tmp_path)
    assert r.exit_code == 2 and "--steps must be at least 1" in r.output
    r = run("train", "--dataset", "brain", "--latent-quantiles", 16, "--out", tmp_path)
    assert r.exit_code == 2 and "--latent-quantiles must be 0 or >= 2 and needs latent_components > 0" in r.output
    r = run("train", "--dataset", "brain", "--latent-components", 8, "--latent-denoiser", "gaussian", "--out", tmp_path)
    assert r.exit_code == 2 and "unknown --latent-denoiser 'gaussian'; available: mlp, mlp+linear, linear" in r.output
    r = run("train", "--dataset", "brain", "--latent-denoiser", "linear", "--out", tmp_path)
    assert r.exit_code == 2 and "--latent-denoiser needs latent_components > 0" in r.output
    r = run("train", "--dataset", "brain", "--voxel-spread", "--out", tmp_path)
    assert r.exit_code == 2 and "--voxel-spread needs latent_components > 0" in r.output
    r = run("train", "--descendant-noise", -1, "--out", tmp_path)
    assert r.exit_code == 2 and "--descendant-noise must be in [0, 10] normalised units, got -1.0" in r.output


def test_data_generate(tmp_path):
    r = run("data", "generate", "--dataset", "pendulum", "--out", tmp_path / "d", "--n", 3, "--size", 24)
    assert r.exit_code == 0, r.output
    lines = (tmp_path / "d" / "labels.csv").read_text().splitlines()
    assert lines[0] == "file,angle_deg,light_deg,shadow_len,shadow_pos" and len(lines) == 4
    assert Image.open(tmp_path / "d" / "images" / "000002.png").size == (24, 24)
    r = run("data", "generate", "--dataset", "nope", "--out", tmp_path / "e")
    assert r.exit_code == 2 and "unknown data set 'nope'" in r.output


@pytest.mark.parametrize("name, csv, header", [
    ("morphomnist", "labels.csv", "file,digit,thickness_px,intensity"),
    ("circuit", "labels.csv", "file,arm,blue,green,red"),
    ("brain", "manifest.csv", "subject_id,path,age,sex,brain_volume_ml,ventricle_volume_ml"),
])
def test_data_generate_every_dataset(tmp_path, name, csv, header):
    r = run("data", "generate", "--dataset", name, "--out", tmp_path / name, "--n", 2)
    assert r.exit_code == 0, r.output
    lines = (tmp_path / name / csv).read_text().splitlines()
    assert lines[0] == header and len(lines) == 3


def test_mnist_dir_only_for_morphomnist(tmp_path):
    r = run("data", "generate", "--dataset", "pendulum", "--out", tmp_path, "--mnist-dir", tmp_path)
    assert r.exit_code == 2 and "applies to morphomnist only" in r.output
    r = run("data", "generate", "--dataset", "morphomnist", "--out", tmp_path / "m", "--mnist-dir", tmp_path)
    assert r.exit_code == 2 and "no MNIST file" in r.output


def test_train_options_come_from_the_training_schema():
    import inspect

    from cdae_cli.research import train
    from pipelines.train_config import TrainConfig

    options = inspect.signature(train).parameters
    # --out defaults to runs/DATASET, which depends on --dataset
    shared = [name for name in options if name in TrainConfig.model_fields and name != "out"]
    assert len(shared) >= 18
    for name in shared:
        info = options[name].default
        assert info.default == TrainConfig.model_fields[name].get_default(call_default_factory=True), name
        assert info.help == TrainConfig.model_fields[name].description, name


def test_train_rejects_values_the_schema_bounds(tmp_path):
    r = run("train", "--labelled-fraction", 1.5, "--out", tmp_path)
    assert r.exit_code == 2 and "--labelled-fraction must be in [0, 1], got 1.5" in r.output
    r = run("train", "--size", 20, "--out", tmp_path)  # caught before any data is generated
    assert r.exit_code == 2 and "multiple of 8" in r.output
    r = run("train", "--conditioning", "film", "--out", tmp_path)
    assert r.exit_code == 2 and "unknown --conditioning 'film'" in r.output
    r = run("train", "--prediction-type", "sample", "--out", tmp_path)
    assert r.exit_code == 2 and "--prediction-type" in r.output and "v_prediction" in r.output


def test_latent_denoiser_names_build_their_denoisers():
    from cdae_cli.research import LATENT_DENOISERS
    from cdae_med.model import CausalDiffAE, CausalDiffAEConfig
    from synthetic_data import brain

    parts = {}
    for name, settings in LATENT_DENOISERS.items():
        cfg = CausalDiffAEConfig(spatial_dims=3, in_channels=1, image_size=(6, 6, 6), latent_components=4, latent_dim=2,
                                 **settings)
        parts[name] = {key.split(".")[0] for key in CausalDiffAE(brain.GRAPH, cfg).denoiser.state_dict()}
    assert "mean" not in parts["mlp"] and "out" in parts["mlp"]
    assert {"mean", "out"} <= parts["mlp+linear"]
    assert "mean" in parts["linear"] and "out" not in parts["linear"]
