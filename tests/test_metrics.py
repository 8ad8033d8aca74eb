import numpy as np
import pytest
import torch

from cdae_med.graph import builtin_graph
from cdae_med.metrics import dci_disentanglement, effectiveness_mae, image_errors, pixel_mae


def test_dci_known_answers():
    assert dci_disentanglement(importance=np.eye(4)) == pytest.approx(1.0)
    assert dci_disentanglement(importance=np.ones((4, 4))) == pytest.approx(0.0, abs=1e-9)
    # Two codes split evenly over two of four factors (1 - log4(2) = 0.5 each), two clean codes
    # (1.0 each), all four carrying a quarter of the importance: 0.25 * (0.5 + 0.5 + 1 + 1).
    r = np.array([[1, 1, 0, 0], [1, 1, 0, 0], [0, 0, 2, 0], [0, 0, 0, 2]], float)
    assert dci_disentanglement(importance=r) == pytest.approx(0.75)


def test_dci_on_data():
    rng = np.random.default_rng(0)
    factors = rng.uniform(-1, 1, size=(400, 3))
    clean = np.repeat(factors, 2, axis=1) + 0.01 * rng.normal(size=(400, 6))  # two dims per factor
    rotation, _ = np.linalg.qr(rng.normal(size=(3, 3)))
    mixed = factors @ rotation  # every code a blend of all factors
    d_clean = dci_disentanglement(clean, factors)
    d_mixed = dci_disentanglement(mixed, factors)
    assert d_clean > 0.95 and d_mixed < 0.5


def test_effectiveness_units():
    g = builtin_graph("pendulum")
    out = effectiveness_mae(np.array([10.0, 20.0]), np.array([12.0, 16.0]), g, "angle")
    assert out["mae"] == pytest.approx(3.0) and out["mae_normalised"] == pytest.approx(3.0 / 37.8)
    assert out["unit"] == "deg"


def test_image_errors():
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    same = image_errors(x, x)
    assert same["mae"] == 0 and same["ssim"] == pytest.approx(1.0, abs=1e-4)
    shifted = image_errors((x + 2 / 255 * 10).clamp(-1, 1), x)
    assert 0 < shifted["mae"] <= 10.0001 and shifted["psnr"] > 20
    assert pixel_mae(torch.full((1, 1, 4, 4), 1.0), torch.full((1, 1, 4, 4), -1.0)).item() == pytest.approx(255)
    vol = image_errors(torch.zeros(1, 1, 8, 8, 8), torch.zeros(1, 1, 8, 8, 8))
    assert vol["mae"] == 0
