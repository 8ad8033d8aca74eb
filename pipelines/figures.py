"""PNG figures: counterfactual grids with the generator's truth beside the model's answer."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image, ImageDraw

from cdae_med.pipeline import CounterfactualPipeline
from synthetic_data.base import Samples

from .datasets import SyntheticDataset, preview, to_tensor, to_uint8
from .evaluate_cf import random_targets

__all__ = ["image_grid", "counterfactual_grid"]


def image_grid(cells: list[list[np.ndarray]], headers: list[str], cell_px: int = 96,
               row_labels: list[str] | None = None) -> Image.Image:
    """rows x columns of uint8 HWC images, upscaled to ``cell_px``, with a header line and
    optional row labels on the left."""
    rows, cols = len(cells), len(headers)
    head, pad = 16, 2
    left = 8 + 6 * max((len(t) for t in row_labels), default=0) if row_labels else 0
    grid = Image.new("RGB", (left + cols * (cell_px + pad) + pad, head + rows * (cell_px + pad) + pad), "white")
    draw = ImageDraw.Draw(grid)
    for c, text in enumerate(headers):
        draw.text((left + pad + c * (cell_px + pad) + 2, 2), text, fill="black")
    for r, row in enumerate(cells):
        if row_labels:
            draw.text((4, head + pad + r * (cell_px + pad) + cell_px // 2 - 6), row_labels[r], fill="black")
        for c, img in enumerate(row):
            tile = Image.fromarray(img.squeeze(-1) if img.shape[-1] == 1 else img)
            grid.paste(tile.resize((cell_px, cell_px), Image.NEAREST),
                       (left + pad + c * (cell_px + pad), head + pad + r * (cell_px + pad)))
    return grid


@torch.no_grad()
def counterfactual_grid(pipe: CounterfactualPipeline, ds: SyntheticDataset, samples: Samples,
                        variables: tuple[str, ...], *, num_steps: int = 50,
                        depth: float = 1.0, guidance: float = 1.0, seed: int = 0, confine: float = 0.0) -> Image.Image:
    """Rows = samples; columns = input, reconstruction, then do(v) and the true do(v) for each v;
    ``confine`` as in :meth:`CounterfactualPipeline.decode`."""
    images = samples.images
    size = images.shape[1]
    ab = pipe.abduct(to_tensor(images), num_steps=num_steps, depth=depth)
    columns = [preview(images), preview(to_uint8(pipe.decode(ab, ab.z)[0]))]
    headers = ["input", "reconstruction"]
    for v_i, v in enumerate(variables):
        targets = random_targets(ds, v, len(images), seed + v_i)
        cf, _ = pipe.decode(ab, pipe.act(ab, {v: targets}), guidance, confine=confine)
        columns.append(preview(to_uint8(cf)))
        columns.append(preview(ds.counterfactual(samples, {v: targets}, size).images))
        headers += [f"do({v})", f"true do({v})"]
    cells = [[col[r] for col in columns] for r in range(len(images))]
    return image_grid(cells, headers)
