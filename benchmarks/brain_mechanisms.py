"""The brain graph's causal mechanisms alone: how well each way of fitting them makes the generator's
counterfactual volumes, with no image in the way.

Mechanisms are fitted on the labels of the training subjects (``synthetic_data.brain``'s targets, seed 0)
exactly as the model's are (:class:`cdae_med.model.CausalLayer`, :meth:`CausalDiffAE.mechanism_loss`), then
held-out subjects are abducted from their true labels and intervened on: do(age = age ± 20) (+20 below 65,
-20 above) and do(brain_volume = B ∓ 100 ml). The error of each counterfactual volume against the generator's
own law is given as a share of copying's (the factual value). Settings:

- normalisation: ``linear`` ((v - mean) / SD, the brain graph before) or ``log`` (ln(v / centre) / SD of the
  log, the graph's ``log`` variables);
- fit: ``joint`` (as in training alongside the rest: mini-batches of 256, Adam at lr 3e-3 x the mechanism
  factor 10, the trainer's moving average of the weights, 1,500 steps) or ``first``
  (:func:`fit_first`: all labels at once, to convergence, as if fitted before the rest and then held fixed);
- hidden: units of each mechanism's MLP.

    python benchmarks/brain_mechanisms.py [--seeds 0 1] [--results benchmarks/results/brain_mechanisms.json]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

import numpy as np
import torch
from torch.optim.swa_utils import AveragedModel

from cdae_med.graph import CausalGraph, builtin_graph
from cdae_med.model import CausalDiffAE, CausalDiffAEConfig
from pipelines.train import ema_avg
from synthetic_data import brain

ROOT = Path(__file__).resolve().parent
# The brain graph's linear normalisation before its volumes went on a log scale: mean / SD of 200,000 draws.
LINEAR = {"brain_volume": (1080.0, 150.0), "ventricle_volume": (38.0, 23.0)}


def linear_graph(graph: CausalGraph) -> CausalGraph:
    return CausalGraph(graph.name, tuple(
        dataclasses.replace(v, log=False, centre=LINEAR[v.name][0], scale=LINEAR[v.name][1]) if v.log else v
        for v in graph.variables))


def subjects(n: int, seed: int):
    age, sex, noise = brain._draw(n, seed)
    return age, sex, noise, brain._targets(age, sex, noise)


def fit_first(model: CausalDiffAE, y_norm: torch.Tensor, steps: int = 3000, lr: float = 1e-2) -> None:
    """The mechanisms fitted to convergence on all the labels at once (Adam, cosine schedule)."""
    params = list(model.causal.mechanisms.parameters())
    opt = torch.optim.Adam(params, lr=lr)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    for _ in range(steps):
        loss = model.mechanism_loss(y_norm)
        opt.zero_grad()
        loss.backward()
        opt.step()
        schedule.step()


def fit(graph: CausalGraph, labels: np.ndarray, how: str, hidden: int, seed: int) -> CausalDiffAE:
    torch.manual_seed(seed)
    model = CausalDiffAE(graph, CausalDiffAEConfig(spatial_dims=3, image_size=(8, 8, 8), encoder_channels=(8,),
                                                   unet_channels=(8, 8, 8), unet_norm_groups=8,
                                                   unet_attention=(False, False, False), unet_head_channels=8,
                                                   mechanism_hidden=hidden, latent_dim=16))
    y = torch.tensor(graph.normalise(labels), dtype=torch.float32)
    if how == "first":
        fit_first(model, y)
        return model
    opt = torch.optim.AdamW(model.causal.mechanisms.parameters(), lr=3e-2, weight_decay=0.0)
    ema = AveragedModel(model.causal, avg_fn=ema_avg(0.999))  # the trainer's moving average
    g = torch.Generator().manual_seed(seed)
    for _ in range(1500):
        loss = model.mechanism_loss(y[torch.randint(0, len(y), (256,), generator=g)])
        opt.zero_grad()
        loss.backward()
        opt.step()
        ema.update_parameters(model.causal)
    model.causal = ema.module
    return model


@torch.no_grad()
def counterfactual(model: CausalDiffAE, labels: np.ndarray, name: str, value: np.ndarray) -> np.ndarray:
    graph = model.graph
    z = model.label_latent(torch.tensor(graph.normalise(labels), dtype=torch.float32)).contiguous()
    u = model.causal.abduct(z)
    do = labels.copy()
    do[:, graph.index(name)] = value
    target = torch.tensor(graph.normalise(do)[:, graph.index(name)], dtype=torch.float32)
    z_cf = model.causal(u, {name: target[:, None].expand(-1, z.shape[-1])})
    return graph.denormalise(model.latent_to_label(z_cf).double().numpy())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n-fit", type=int, default=2000)
    ap.add_argument("--n-test", type=int, default=1000)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--results", type=Path, default=ROOT / "results" / "brain_mechanisms.json")
    args = ap.parse_args()
    torch.set_num_threads(1)
    graph = builtin_graph("brain")
    *_, train = subjects(args.n_fit, 0)
    age, sex, noise, test = subjects(args.n_test, 77)
    older = np.where(age < 65, 20.0, -20.0)
    less = np.where(np.random.default_rng(1).random(len(age)) < 0.5, -100.0, 100.0)
    truth = {"age": brain._targets(age, sex, noise, {"age": age + older}),
             "brain_volume": brain._targets(age, sex, noise, {"brain_volume": test[:, 2] + less})}
    values = {"age": age + older, "brain_volume": test[:, 2] + less}
    settings = [("linear", "joint", 64), ("log", "joint", 64), ("log", "first", 64), ("linear", "first", 4),
                ("log", "first", 4)]
    rows = []
    for norm, how, hidden in settings:
        g = graph if norm == "log" else linear_graph(graph)
        for seed in args.seeds:
            model = fit(g, train, how, hidden, seed)
            row = {"normalisation": norm, "fit": how, "hidden": hidden, "seed": seed}
            for name in ("age", "brain_volume"):
                cf = counterfactual(model, test, name, values[name])
                for measured in ("brain_volume", "ventricle_volume"):
                    if measured == name:
                        continue
                    j = graph.index(measured)
                    err = np.abs(cf[:, j] - truth[name][:, j]).mean()
                    copy_err = np.abs(test[:, j] - truth[name][:, j]).mean()
                    row[f"do({name}) {measured} error, share of copying's"] = round(float(err / copy_err), 3)
                    row[f"do({name}) {measured} error ml"] = round(float(err), 2)
                    row[f"do({name}) {measured} copy error ml"] = round(float(copy_err), 2)
            print({k: v for k, v in row.items() if "share" in k or k in ("normalisation", "fit", "hidden", "seed")},
                  flush=True)
            rows.append(row)
    args.results.parent.mkdir(parents=True, exist_ok=True)
    args.results.write_text(json.dumps({"n_fit": args.n_fit, "n_test": args.n_test, "rows": rows}, indent=2) + "\n")
    print(f"wrote {args.results}")


if __name__ == "__main__":
    main()
