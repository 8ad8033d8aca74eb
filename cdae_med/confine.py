"""Confining a counterfactual's change to where the intervention changes the image.

A decoder asked for a combination of values that no training image shows (Pendulum's shadow
apart from its pendulum, docs/design-notes.md "Interventions on descendants") draws what it
chooses there, and part of it lies far from anything the intervention concerns: a grey tint
over the flat background, a faint second pendulum. And any decoding adds the model's
reconstruction error to every pixel. DiffEdit (Couairon et al., ICLR 2023) keeps an edit to a
mask of where two conditions' predictions differ and the input everywhere else. Here the mask
is taken from the decoded change itself: the counterfactual's difference from the input,
averaged over channels and smoothed, is kept where it reaches ``threshold`` of the image's
largest change, widened by a pixel, and every other pixel is the input's own. Against the
reconstruction decoded from the same noise code, the mask came out the same to 0.05/255 of
image error (design notes, "Confining the change"), so no second decoding is spent on it.
"""

from __future__ import annotations

import torch
from monai.networks.layers import GaussianFilter
from monai.transforms.utils_morphological_ops import dilate

__all__ = ["change_mask", "confine_change"]


def change_mask(counterfactual: torch.Tensor, reference: torch.Tensor, threshold: float,
                sigma: float = 1.0) -> torch.Tensor:
    """(B, 1, *spatial) float mask, 1 where ``counterfactual`` departs from ``reference`` (both
    (B, C, *spatial)) by at least ``threshold`` (0-1) of that image's largest smoothed change."""
    if not 0.0 < threshold < 1.0:
        raise ValueError(f"threshold must be in (0, 1), got {threshold}")
    spatial_dims = counterfactual.ndim - 2
    if spatial_dims not in (2, 3) or counterfactual.shape != reference.shape:
        raise ValueError(f"counterfactual and reference must be one shape, (B, C, H, W) or (B, C, D, H, W); "
                         f"got {tuple(counterfactual.shape)} and {tuple(reference.shape)}")
    change = (counterfactual - reference).abs().mean(1, keepdim=True).float()
    smooth = GaussianFilter(spatial_dims, sigma=sigma).to(change.device)(change)
    largest = smooth.flatten(1).amax(1).view(-1, *([1] * (smooth.ndim - 1)))
    # an image that did not change keeps nothing
    mask = ((smooth >= threshold * largest) & (largest > 0)).float()
    return dilate(mask, filter_size=3)


def confine_change(images: torch.Tensor, counterfactual: torch.Tensor, threshold: float,
                   sigma: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """The counterfactual where :func:`change_mask` keeps its change from ``images``, the input
    elsewhere. Returns (confined counterfactuals, masks)."""
    images = images.to(counterfactual.device, counterfactual.dtype)
    mask = change_mask(counterfactual, images, threshold, sigma).to(counterfactual.dtype)
    return mask * counterfactual + (1 - mask) * images, mask
