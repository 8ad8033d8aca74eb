import os

import pytest

from pipelines.train import TINY_MODEL, TrainConfig, train  # noqa: F401 (TINY_MODEL: the tests import it from here)


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    out = tmp_path_factory.mktemp("ckpt") / "pendulum"
    cfg = TrainConfig(dataset="pendulum", out=str(out), steps=250, minutes=None, size=16, batch_size=16,
                      lr=1e-3, n_train=512, device="cpu", gamma_warmup=20, eval_n=4, eval_steps=10,
                      grid_rows=2, model=TINY_MODEL)
    return train(cfg, progress=False)


@pytest.fixture(scope="session", autouse=True)
def _cdae_home(tmp_path_factory):
    """`cdae-med train` registers models under CDAE_HOME: tests use a temporary one, never ~/.cdae-med."""
    old = os.environ.get("CDAE_HOME")
    os.environ["CDAE_HOME"] = str(tmp_path_factory.mktemp("cdae_home"))
    yield
    if old is None:
        os.environ.pop("CDAE_HOME", None)
    else:
        os.environ["CDAE_HOME"] = old


@pytest.fixture(scope="session")
def tiny_brain_checkpoint(tmp_path_factory):
    """A 16^3 brain-MRI model trained for 20 steps (about 10 s): for the service tests."""
    from tests.service_support import train_tiny_brain

    return train_tiny_brain(tmp_path_factory.mktemp("brain_ckpt") / "brain")
