"""Encoder-only steps between full ones (TrainConfig.encoder_steps): the encoder reads the labels
more precisely at the same number of full steps, and nothing else of the run changes its meaning."""

import numpy as np
import pytest
import torch

from cdae_med.checkpoint import load_checkpoint
from pipelines.datasets import get_dataset, to_tensor
from pipelines.evaluate import posterior_causal_latents
from pipelines.train import TINY_MODEL, TrainConfig, train


def readout_error(path, ds, x, y) -> float:
    model = load_checkpoint(path).model.eval()
    with torch.no_grad():
        z = posterior_causal_latents(model, x, torch.device("cpu"))
    return float(np.abs(z.mean(-1).numpy() - ds.graph.normalise(y)).mean())


def test_encoder_steps_sharpen_the_read_out(tmp_path):
    torch.set_num_threads(1)
    ds = get_dataset("pendulum")
    test = ds.sample(128, seed=1_000_003, size=16)
    x = to_tensor(test.images)
    errors = {}
    for k in (0, 8):
        out = tmp_path / f"k{k}"
        train(TrainConfig(dataset="pendulum", out=str(out), steps=60, minutes=None, size=16, batch_size=32, lr=1e-3,
                          n_train=512, gamma_warmup=10, eval_n=0, grid_rows=1, model=TINY_MODEL, encoder_steps=k),
              progress=False)
        errors[k] = readout_error(out, ds, x, test.labels)
    assert errors[8] < 0.7 * errors[0], errors


def test_encoder_steps_are_refused_where_they_mean_nothing(tmp_path):
    with pytest.raises(ValueError, match="diffae"):
        train(TrainConfig(dataset="pendulum", out=str(tmp_path / "d"), steps=1, minutes=None, size=16, n_train=64,
                          eval_n=0, grid_rows=1, model=TINY_MODEL, variant="diffae", encoder_steps=2), progress=False)
