"""The steps of a counterfactual (Pearl) on a CausalDiffAE's latents.

- abduction: the factual image gives u (posterior mean of the encoder), the causal latents
  z = causal_layer(u), and the DDIM noise code x_t (deterministic inversion conditioned on z).
- action: do(var = value) in the variable's own units; the value is normalised and written
  into the variable's latent block through the label prior's mean mu(y).
- prediction: the causal layer recomputes every descendant from its parents' new z and its
  own abducted u (non-descendants keep their z); decoding x_t under the new z is the
  pipeline's (:class:`cdae_med.pipeline.CounterfactualPipeline`, which also owns guidance and
  checks the values before these functions see them).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Mapping

import torch

from .diffusion import DDIM
from .graph import GraphError
from .model import CausalDiffAE

__all__ = ["Abduction", "abduct", "act"]

Interventions = Mapping[str, "float | torch.Tensor"]
# In normalised units: an intervened value this close to the factual read-out is a null intervention
# (a value printed to float32 precision and read back still counts).
NULL_TOLERANCE = 1e-5


@dataclass
class Abduction:
    u: torch.Tensor  # (B, n, d) exogenous latent noise
    z: torch.Tensor  # (B, n, d) factual causal latents
    x_t: torch.Tensor  # DDIM noise code at the inversion depth
    num_steps: int
    depth: float
    images: torch.Tensor | None = None  # the input, where a decoding keeps part of it (cdae_med.confine)


@torch.no_grad()
def abduct(model: CausalDiffAE, ddim: DDIM, x0: torch.Tensor, num_steps: int = 50, depth: float = 1.0,
           progress: Callable[[int], None] | None = None,
           observed: Mapping[str, torch.Tensor] | None = None) -> Abduction:
    """``observed`` maps a variable to its known factual values (B,) in its own units, NaN where
    unknown: those latent blocks are set from the label prior instead of being estimated from the
    image, and u is re-derived (u_i = z_i - f_i(z_parents)) so that z stays the SCM's output.
    The noise code is in the diffusion's space (:meth:`CausalDiffAE.to_latent`)."""
    images, x0 = x0, model.to_latent(x0)
    u, _ = model.encode(x0)
    z = model.causal(u)
    if observed:
        z = z.clone()
        for name, values in observed.items():
            values = torch.as_tensor(values, dtype=z.dtype, device=z.device).reshape(-1).expand(z.shape[0])
            known = torch.isfinite(values)
            if not known.any():
                continue
            var = model.graph[name]  # an unknown name is a GraphError
            for v in values[known].tolist():
                var.check_value(v)
            i = model.graph.index(name)
            block = model.label_latent(var.normalise(torch.where(known, values, 0.0)))
            z[:, i] = torch.where(known[:, None], block, z[:, i])
        u = model.causal.abduct(z)
    x_t = ddim.encode(lambda x, t: model.denoise(x, t, z), x0, num_steps, depth, progress)
    return Abduction(u=u, z=z, x_t=x_t, num_steps=num_steps, depth=depth, images=images)


@torch.no_grad()
def act(model: CausalDiffAE, abduction: Abduction, do: Interventions, propagate: bool = True) -> torch.Tensor:
    """The counterfactual z: intervened blocks set, descendants recomputed in topological order.

    ``propagate=False`` only overwrites the intervened blocks, as the paper's public code does;
    it exists to measure what recomputing the descendants is worth.
    """
    graph = model.graph
    b = abduction.u.shape[0]
    blocks = {}
    for name, value in do.items():
        var = graph[name]
        value_t = torch.as_tensor(value, dtype=abduction.u.dtype, device=abduction.u.device).reshape(-1)
        if value_t.numel() not in (1, b):
            raise GraphError(f"do({name}) has {value_t.numel()} values for a batch of {b}")
        y = var.normalise(value_t.expand(b))
        # A value equal to what the factual block reads as (the model's own estimate, as a report
        # gives it) keeps that block: a null intervention must change nothing, and writing the value
        # into every dimension of the block would.
        factual = abduction.z[:, graph.index(name)]
        same = (model.latent_to_label(factual) - y).abs() <= NULL_TOLERANCE
        blocks[name] = torch.where(same[:, None], factual, model.label_latent(y).to(factual.dtype))
    if not propagate:
        z = abduction.z.clone()
        for name, block in blocks.items():
            z[:, graph.index(name)] = block
        return z
    return _propagate(model, abduction, blocks)


def _propagate(model: CausalDiffAE, abduction: Abduction, blocks: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """z under do(blocks), each descendant recomputed f_i(z_parents) + u_i only for the samples whose
    parents changed; every other block keeps its factual value bit for bit, so a null intervention
    gives back exactly the factual z (u_i = z_i - f_i(...) does not round-trip exactly in floating point)."""
    graph, causal = model.graph, model.causal
    z = list(abduction.z.unbind(1))
    changed = {}
    for name in graph.order:
        i = graph.index(name)
        if name in blocks:
            new = blocks[name].expand_as(z[i]).to(z[i].dtype)
            changed[name] = (new != z[i]).any(-1)
            z[i] = new
        elif name in causal.mechanisms:
            moved = torch.zeros_like(z[i][:, 0], dtype=torch.bool)
            for p in graph[name].parents:
                moved = moved | changed[p]
            if moved.any():
                new = causal.mechanism(name, z) + abduction.u[:, i]
                z[i] = torch.where(moved[:, None], new, z[i])
            changed[name] = moved
        else:
            changed[name] = torch.zeros_like(z[i][:, 0], dtype=torch.bool)
    return torch.stack(z, dim=1)
