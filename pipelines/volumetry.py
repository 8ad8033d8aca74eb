"""Brain volume read off an image, to check counterfactuals on their *output* (not on the model's
own latent estimate): a ridge regression on the intensity histogram inside a fixed window,
fitted on generated subjects whose brain volume is known. Atrophy turns tissue (bright) into
CSF (dark), so the histogram's tissue bins carry the volume.

The window is the *input* scan's, applied to input and counterfactual alike, so a change of
intensities shows as a change of histogram rather than being normalised away.
"""

from __future__ import annotations

import numpy as np
from sklearn.linear_model import Ridge

from .mri import intensity_window, normalise_intensity

__all__ = ["HistogramVolumetry"]


class HistogramVolumetry:
    def __init__(self, bins: int = 48, alpha: float = 1.0):
        self.bins = bins
        self.ridge = Ridge(alpha=alpha)

    def features(self, volume: np.ndarray, window: tuple[float, float] | None = None) -> np.ndarray:
        x = normalise_intensity(volume, window or intensity_window(volume))
        return np.histogram(x, bins=self.bins, range=(0.0, 1.0))[0][1:].astype(np.float64)  # bin 0: background

    def fit(self, volumes, brain_volumes_ml) -> "HistogramVolumetry":
        self.ridge.fit(np.stack([self.features(v) for v in volumes]), np.asarray(brain_volumes_ml))
        return self

    def predict(self, volumes, window: tuple[float, float] | None = None) -> np.ndarray:
        """Brain volume (ml) of each volume; ``window`` fixes the intensity window for all of them."""
        return self.ridge.predict(np.stack([self.features(v, window) for v in volumes]))
