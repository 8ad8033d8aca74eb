"""Counterfactuals in three steps (Pearl): abduction, action, prediction.

- abduction: the factual image gives u (posterior mean of the encoder), the causal latents
  z = causal_layer(u), and the DDIM noise code x_t (deterministic inversion conditioned on z).
- action: do(var = value) in the variable's own units; the value is normalised and written
  into the variable's latent block through the label prior's mean mu(y).
- prediction: the causal layer recomputes every descendant from its parents' new z and its
  own abducted u (non-descendants keep their z), then DDIM decodes x_t under the new z.

Guidance: eps = eps(x, z_ref) + w * (eps(x, z_cf) - eps(x, z_ref)), with z_ref the factual z
("factual", default) or the unconditional model ("null"). w = 1 is plain conditional decoding.
With the factual reference a null intervention reproduces the inversion exactly for any w,
while w > 1 amplifies what the intervention changes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Literal, Mapping

import torch

from .diffusion import DDIM
from .graph import CausalGraph, GraphError
from .model import CausalDiffAE

__all__ = ["Abduction", "Counterfactual", "abduct", "act", "predict", "counterfactual", "parse_do"]

Interventions = Mapping[str, "float | torch.Tensor"]


@dataclass
class Abduction:
    u: torch.Tensor  # (B, n, d) exogenous latent noise
    z: torch.Tensor  # (B, n, d) factual causal latents
    x_t: torch.Tensor  # DDIM noise code at the inversion depth
    num_steps: int
    depth: float


@dataclass
class Counterfactual:
    image: torch.Tensor  # counterfactual images, same shape and range as the input
    z: torch.Tensor  # counterfactual causal latents
    factual: torch.Tensor  # (B, n) factual values read from z, own units
    values: torch.Tensor  # (B, n) counterfactual values read from z, own units (intervened ones exact)


def parse_do(graph: CausalGraph, items: list[str] | tuple[str, ...]) -> dict[str, float]:
    """['angle=20', 'light=90'] -> {'angle': 20.0, 'light': 90.0}, validated against the graph."""
    do: dict[str, float] = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or not name.strip():
            raise GraphError(f"intervention {item!r} is not of the form variable=value")
        try:
            number = float(value)
        except ValueError:
            raise GraphError(f"intervention {item!r}: {value!r} is not a number") from None
        name = name.strip()
        if name in do:
            raise GraphError(f"variable {name!r} is intervened on twice")
        do[name] = number
    graph.check_interventions(do)
    return do


def _validate(graph: CausalGraph, do: Interventions) -> None:
    if not do:
        raise GraphError("no intervention given")
    for name, value in do.items():
        var = graph[name]
        values = value.flatten().tolist() if torch.is_tensor(value) else [value]
        for v in values:
            var.check_value(float(v) if not isinstance(v, bool) else v)


@torch.no_grad()
def abduct(model: CausalDiffAE, ddim: DDIM, x0: torch.Tensor, num_steps: int = 50, depth: float = 1.0,
           progress: Callable[[int], None] | None = None,
           observed: Mapping[str, torch.Tensor] | None = None) -> Abduction:
    """``observed`` maps a variable to its known factual values (B,) in its own units, NaN where
    unknown: those latent blocks are set from the label prior instead of being estimated from the
    image, and u is re-derived (u_i = z_i - f_i(z_parents)) so that z stays the SCM's output."""
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
    return Abduction(u=u, z=z, x_t=x_t, num_steps=num_steps, depth=depth)


@torch.no_grad()
def act(model: CausalDiffAE, abduction: Abduction, do: Interventions, propagate: bool = True) -> torch.Tensor:
    """The counterfactual z: intervened blocks set, descendants recomputed in topological order.

    ``propagate=False`` only overwrites the intervened blocks, as the paper's public code does;
    it exists to measure what recomputing the descendants is worth.
    """
    graph = model.graph
    _validate(graph, do)
    b = abduction.u.shape[0]
    blocks = {}
    for name, value in do.items():
        var = graph[name]
        value_t = torch.as_tensor(value, dtype=abduction.u.dtype, device=abduction.u.device).reshape(-1)
        if value_t.numel() not in (1, b):
            raise GraphError(f"do({name}) has {value_t.numel()} values for a batch of {b}")
        y = var.normalise(value_t.expand(b))
        blocks[name] = model.label_latent(y)
    if not propagate:
        z = abduction.z.clone()
        for name, block in blocks.items():
            z[:, graph.index(name)] = block
        return z
    return model.causal(abduction.u, do=blocks)


@torch.no_grad()
def predict(model: CausalDiffAE, ddim: DDIM, abduction: Abduction, z_cf: torch.Tensor, guidance: float = 1.0,
            reference: Literal["factual", "null"] = "factual",
            progress: Callable[[int], None] | None = None) -> torch.Tensor:
    if reference not in ("factual", "null"):
        raise ValueError(f"reference must be 'factual' or 'null', got {reference!r}")
    if guidance == 1.0:
        def eps_fn(x, t):
            return model.denoise(x, t, z_cf)
    else:
        b = z_cf.shape[0]
        z_ref = abduction.z if reference == "factual" else torch.zeros_like(z_cf)
        z_both = torch.cat([z_cf, z_ref])
        keep = torch.cat([z_cf.new_ones(b), z_cf.new_full((b,), float(reference == "factual"))])

        def eps_fn(x, t):
            # Both conditions in one batched call: half the per-step overhead of two calls.
            e_cf, e_ref = model.denoise(torch.cat([x, x]), torch.cat([t, t]), z_both, keep).chunk(2)
            return e_ref + guidance * (e_cf - e_ref)

    # Images live in [-1, 1]; out-of-range values would be amplified by the next inversion
    # (a null intervention applied 10 times drifted to 58/255 without this clamp, 1.0 with one pass).
    return ddim.decode(eps_fn, abduction.x_t, abduction.num_steps, abduction.depth, progress).clamp(-1, 1)


@torch.no_grad()
def counterfactual(model: CausalDiffAE, ddim: DDIM, x0: torch.Tensor, do: Interventions, num_steps: int = 50,
                   depth: float = 1.0, guidance: float = 1.0, reference: Literal["factual", "null"] = "factual",
                   progress: Callable[[int], None] | None = None) -> Counterfactual:
    """x0 (B, C, *spatial) in the model's intensity range -> the counterfactual under ``do``."""
    _validate(model.graph, do)
    ab = abduct(model, ddim, x0, num_steps, depth, progress)
    z_cf = act(model, ab, do)
    image = predict(model, ddim, ab, z_cf, guidance, reference, progress)
    graph = model.graph
    return Counterfactual(
        image=image,
        z=z_cf,
        factual=graph.denormalise(model.latent_to_label(ab.z)),
        values=graph.denormalise(model.latent_to_label(z_cf)),
    )
