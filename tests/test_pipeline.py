"""End to end on a model trained for a few seconds (the session fixture in conftest.py)."""

import json

import numpy as np
import pytest
import torch

from cdae_med.checkpoint import META, WEIGHTS, CheckpointError, load_checkpoint, save_checkpoint
from cdae_med.counterfactual import abduct
from cdae_med.diffusion import DDIM
from cdae_med.graph import GraphError
from cdae_med.pipeline import CounterfactualPipeline
from pipelines.datasets import get_dataset, to_tensor, to_uint8
from pipelines.train import TrainConfig, train


@pytest.fixture(scope="module")
def test_batch():
    images, labels = get_dataset("pendulum").sample(16, seed=123, size=16)
    return images, labels


def test_training_writes_a_complete_checkpoint(tiny_checkpoint):
    names = {p.name for p in tiny_checkpoint.iterdir()}
    assert {META, WEIGHTS, "training.pt", "metrics.json", "counterfactual_grid.png"} <= names
    meta = json.loads((tiny_checkpoint / META).read_text())
    assert meta["format_version"] == 1 and meta["dataset"] == "pendulum" and meta["step"] == 250
    assert meta["image"]["size"] == [16, 16] and meta["graph"]["variables"][0]["name"] == "angle"
    metrics = json.loads((tiny_checkpoint / "metrics.json").read_text())
    assert metrics["eval"]["n"] == 4 and metrics["eval"]["reconstruction_mae"] >= 0
    # the run's CPU time covers at least its optimisation, which keeps a thread busy
    assert metrics["cpu_minutes"] >= 0.5 * metrics["train_minutes"] > 0


def test_encoder_learns_the_labels(tiny_checkpoint, test_batch):
    # The label prior must make each latent block read out its variable after a few seconds of training.
    ckpt = load_checkpoint(tiny_checkpoint)
    images, labels = test_batch
    with torch.no_grad():
        u, _ = ckpt.model.encode(to_tensor(images))
        est = ckpt.graph.denormalise(ckpt.model.latent_to_label(ckpt.model.causal(u))).numpy()
    for i, name in enumerate(("angle", "light")):
        r = np.corrcoef(est[:, i], labels[:, i])[0, 1]
        assert r > 0.8, f"{name}: correlation {r:.2f} between latent and label"


def test_ddim_inversion_reconstructs(tiny_checkpoint, test_batch):
    ckpt = load_checkpoint(tiny_checkpoint)
    model, ddim = ckpt.model, DDIM(ckpt.scheduler)
    images, _ = test_batch
    x0 = to_tensor(images)
    ab = abduct(model, ddim, x0, num_steps=50)
    assert abs(ab.x_t.std().item() - 1.0) < 0.35  # the code is noise-like, not the image
    with torch.no_grad():
        rec = ddim.decode(lambda x, t: model.denoise(x, t, ab.z), ab.x_t, num_steps=50)
        fresh = ddim.decode(lambda x, t: model.denoise(x, t, ab.z), torch.randn_like(ab.x_t), num_steps=50)
    rec_mae = np.abs(to_uint8(rec).astype(float) - images).mean()
    fresh_mae = np.abs(to_uint8(fresh).astype(float) - images).mean()
    # a bound a barely trained tiny model meets: reconstruction comes from the inverted code
    assert rec_mae < 6.0, f"reconstruction MAE {rec_mae:.2f}/255"
    assert fresh_mae > 10 * rec_mae  # identity lives in the inverted code, not in z alone


def test_counterfactual_shapes_and_errors(tiny_checkpoint, test_batch):
    pipe = CounterfactualPipeline.from_checkpoint(tiny_checkpoint, "cpu")
    x0 = to_tensor(test_batch[0][:3])
    res = pipe(x0, {"angle": torch.tensor([-20.0, 0.0, 20.0])}, num_steps=5)
    assert res.images.shape == x0.shape and res.reconstruction is None
    assert torch.allclose(res.counterfactual_values[:, 0], torch.tensor([-20.0, 0.0, 20.0]), atol=1e-4)
    # light is not a descendant of angle
    assert torch.allclose(res.counterfactual_values[:, 1], res.factual_values[:, 1])
    with pytest.raises(GraphError, match="outside the declared range"):
        pipe(x0, {"angle": 80.0}, num_steps=5)
    with pytest.raises(GraphError, match="unknown variable 'age'"):
        pipe(x0, {"age": 70.0}, num_steps=5)
    with pytest.raises(GraphError, match="2 values for a batch of 3"):
        pipe(x0, {"angle": torch.tensor([1.0, 2.0])}, num_steps=5)


def test_null_intervention_with_guidance_reproduces_reconstruction(tiny_checkpoint, test_batch):
    pipe = CounterfactualPipeline.from_checkpoint(tiny_checkpoint, "cpu")
    ab = pipe.abduct(to_tensor(test_batch[0][:2]), num_steps=8)
    plain, _ = pipe.decode(ab, ab.z)
    guided, _ = pipe.decode(ab, ab.z, guidance=3.0)
    assert torch.allclose(plain, guided, atol=1e-4)


def test_checkpoint_round_trip(tiny_checkpoint, tmp_path, test_batch):
    ckpt = load_checkpoint(tiny_checkpoint)
    copy = save_checkpoint(tmp_path / "copy", ckpt.model, dataset=ckpt.dataset, image=ckpt.image,
                           training=ckpt.training, metrics=ckpt.metrics, step=ckpt.step)
    again = load_checkpoint(copy)
    assert again.graph == ckpt.graph and again.model.config == ckpt.model.config
    x = to_tensor(test_batch[0][:2])
    t = torch.tensor([500, 10])
    with torch.no_grad():
        z = ckpt.model.causal(ckpt.model.encode(x)[0])
        assert torch.equal(ckpt.model.denoise(x, t, z), again.model.denoise(x, t, z))


def test_checkpoint_errors(tiny_checkpoint, tmp_path):
    with pytest.raises(CheckpointError, match="no checkpoint directory"):
        load_checkpoint(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="checkpoint.json is missing"):
        load_checkpoint(tmp_path / "empty")
    import shutil

    other = tmp_path / "other"
    shutil.copytree(tiny_checkpoint, other)
    meta = json.loads((other / META).read_text())
    meta["format_version"] = 99
    (other / META).write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="format version 99; this cdae-med reads version 1"):
        load_checkpoint(other)
    meta["format_version"] = 1
    (other / META).write_text(json.dumps(meta))
    (other / WEIGHTS).write_bytes((other / WEIGHTS).read_bytes()[:1000])
    with pytest.raises(CheckpointError, match="weights.pt is corrupt"):
        load_checkpoint(other)
    (other / META).write_text("{not json")
    with pytest.raises(CheckpointError, match="checkpoint.json is corrupt"):
        load_checkpoint(other)


def test_resume_continues_from_the_saved_step(tiny_checkpoint, tmp_path):
    import shutil

    from .conftest import TINY_MODEL

    run = tmp_path / "run"
    shutil.copytree(tiny_checkpoint, run)
    cfg = TrainConfig(out=str(run), steps=255, minutes=None, size=16, batch_size=16, lr=1e-3, n_train=512,
                      device="cpu", gamma_warmup=20, eval_n=0, grid_rows=1, eval_steps=2, model=TINY_MODEL)
    train(cfg, progress=False, resume=True)
    assert load_checkpoint(run).step == 255
    with pytest.raises(CheckpointError, match="no training state"):
        train(TrainConfig(out=str(tmp_path / "fresh"), steps=1), progress=False, resume=True)


def test_training_reports_its_progress(tmp_path):
    from tests.conftest import TINY_MODEL

    seen = []
    cfg = TrainConfig(dataset="pendulum", out=str(tmp_path / "p"), steps=20, minutes=None, size=16, batch_size=8,
                      n_train=32, device="cpu", eval_n=0, grid_rows=1, eval_steps=2, model=TINY_MODEL)
    train(cfg, progress=False, on_progress=seen.append)
    assert seen == [1 / 20, 10 / 20, 20 / 20]  # step 1, then every 10 steps


def test_pipeline_decodes_the_reconstruction_in_the_same_batch(tiny_checkpoint, test_batch):
    pipe = CounterfactualPipeline.from_checkpoint(tiny_checkpoint, "cpu")
    x0 = to_tensor(test_batch[0][:3])
    both = pipe(x0, {"light": 100.0}, num_steps=6, reconstruction=True)
    alone = pipe(x0, {"light": 100.0}, num_steps=6)
    ab = pipe.abduct(x0, num_steps=6)
    rec, _ = pipe.decode(ab, ab.z)
    assert both.reconstruction.shape == x0.shape
    assert torch.allclose(both.images, alone.images, atol=1e-4)
    assert torch.allclose(both.reconstruction, rec, atol=1e-4)
    # with guidance the counterfactual half mixes two conditions; the reconstruction half is unchanged
    guided = pipe(x0, {"light": 100.0}, num_steps=6, guidance=3.0, reconstruction=True)
    assert torch.allclose(guided.reconstruction, rec, atol=1e-4)
    assert (guided.images - rec).abs().mean() > (both.images - rec).abs().mean()
    assert both.values(pipe.graph, 0)["light"] == pytest.approx(100.0, abs=1e-4)
    assert pipe.graph.roles({"light"}) == {"angle": "unchanged", "light": "intervened",
                                           "shadow_len": "descendant", "shadow_pos": "descendant"}


def test_checkpoint_records_the_scheduler_and_old_checkpoints_still_load(tiny_checkpoint, tmp_path):
    import shutil

    from cdae_med.diffusion import DDIMConfig

    meta = json.loads((tiny_checkpoint / META).read_text())
    # what training writes: the default schedule, the training default v-prediction
    assert meta["scheduler"] == DDIMConfig(prediction_type="v_prediction").to_dict()
    assert "beta_start" not in meta["model"]
    # a checkpoint written before the scheduler had its own section kept it in the model config
    old = tmp_path / "old"
    shutil.copytree(tiny_checkpoint, old)
    old_meta = {**meta, "model": {**meta["model"], "num_train_timesteps": 500, "beta_start": 2e-4, "beta_end": 0.02}}
    del old_meta["scheduler"]
    (old / META).write_text(json.dumps(old_meta))
    pipe = CounterfactualPipeline.from_checkpoint(old, "cpu")
    assert pipe.scheduler.config == DDIMConfig(num_train_timesteps=500, beta_start=2e-4, beta_end=0.02)
    assert pipe.scheduler.scheduler.alphas_cumprod.shape == (500,)
    old_meta["model"]["beta_end"] = 5.0
    (old / META).write_text(json.dumps(old_meta))
    with pytest.raises(CheckpointError, match="beta_start < beta_end < 1"):
        load_checkpoint(old)


def test_pipeline_moves_to_a_device_with_its_scheduler(tiny_checkpoint):
    pipe = CounterfactualPipeline.from_checkpoint(tiny_checkpoint, "cpu").to("cpu")
    assert pipe.device.type == "cpu" and pipe.scheduler.scheduler.alphas_cumprod.device.type == "cpu"
    with pytest.raises(ValueError, match="reference must be"):
        pipe.decode(pipe.abduct(torch.zeros(1, 3, 16, 16), num_steps=2), torch.zeros(1, 4, 4), reference="x")


def test_holding_the_variables_an_intervention_leaves(tiny_checkpoint, test_batch):
    pipe = CounterfactualPipeline.from_checkpoint(tiny_checkpoint, "cpu")
    model = pipe.model
    x0 = to_tensor(test_batch[0][:8])
    ab = pipe.abduct(x0, num_steps=8)
    # a null intervention is the decoded code itself, held or not
    assert torch.equal(pipe.decode(ab, ab.z, hold=2)[0], pipe.decode(ab, ab.z)[0])
    targets = torch.tensor(pipe.graph["shadow_pos"].low + np.linspace(0.1, 0.9, 8)
                           * (pipe.graph["shadow_pos"].high - pipe.graph["shadow_pos"].low))
    z_cf = pipe.act(ab, {"shadow_pos": targets})
    factual = model.latent_to_label(ab.z)
    held = [pipe.graph.index(n) for n in ("angle", "light", "shadow_len")]  # neither shadow_pos nor its descendants

    def read_error(images):
        with torch.no_grad():
            read = model.latent_to_label(model.causal(model.encode(model.to_latent(images))[0]))
        return (read - factual)[:, held].abs().mean().item()

    plain, _ = pipe.decode(ab, z_cf)
    kept, rec = pipe.decode(ab, z_cf, hold=3, reconstruction=True)
    assert rec is not None and kept.shape == plain.shape
    # the variables the intervention leaves read closer to their factual values
    assert read_error(kept) < 0.7 * read_error(plain)
    with pytest.raises(ValueError, match="hold must be >= 0"):
        pipe.decode(ab, z_cf, hold=-1)
