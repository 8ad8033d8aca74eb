"""A linear latent space for brain counterfactuals: how much it can hold, and a first model in it.

The 32^3 CausalDiffAE UNet takes about 4 s per step on this CPU and does not beat copying the input
after half an hour (``brain_native.json``). This benchmark asks whether a low-dimensional latent
space of the registered volumes makes the problem small enough to learn in minutes:

- **ceiling**: PCA (scikit-learn) of the registered 32^3 fit volumes inside the reference head; the
  generator's true counterfactual change on the model grid (the oracle of ``brain_native.py``),
  projected onto the first K components and carried back onto the 2 mm scan the same way. It says
  how much of a subject's change a K-dimensional latent space can express at all.
- **model**: a conditional diffusion model in that space (whitened PCA coefficients; an MLP
  denoiser with scale-shift conditioning on the time and label embedding, v-prediction, the
  library's DDIM with fixed-point inversion). A counterfactual inverts the subject's coefficients
  under its factual labels to ``--depths`` of the diffusion, decodes under the counterfactual
  labels and under the factual ones from the same code, and carries the difference of the two
  decoded volumes onto the scan (so the reconstruction error cancels, and a null intervention
  changes nothing). It is the label-conditional variant of CausalDiffAE in a latent space: the
  abduction is the DDIM code, the labels are the latents, and, as for the linear baseline, the
  counterfactual labels are the generator's (the graph's mechanisms are measured elsewhere), so
  this isolates the image model.

Beside them, as in ``brain_native.py``: copying the input, the registered voxelwise linear
baseline fitted on the same subjects, and the oracle. Held-out subjects at 2 mm (the same seed as
``brain_native.py``), do(age +- 20), do(brain_volume -+ 100 ml), do(ventricle_volume x or / 1.5).

    OMP_NUM_THREADS=1 python benchmarks/brain_latent.py [--fit 600@4242 400@5151 ...] [--k 64] \\
        [--minutes 0.15 1] [--depths 1 0.6 0.3] [--seeds 0 1]

Registered fit sets are cached under ``benchmarks/work/brain_latent`` (one registration is about
1 s here). Writes ``benchmarks/results/brain_latent.json``.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import time
from pathlib import Path

import numpy as np
import torch
from sklearn.decomposition import PCA
from torch import nn

from brain_native import (FINE, INTERVENTIONS, Preprocessing, Reference, Scan, VoxelwiseLinear, brain, prepare_registered,
                          oracle_change, realise, reference_mask, registered_fit_set, score, test_seed)
from cdae_med.diffusion import DDIM, DDIMConfig

ROOT = Path(__file__).resolve().parent
SIZE = 32


class LatentDenoiser(nn.Module):
    """v(c_t, t, y) for a vector c: residual MLP blocks, LayerNorm then scale-shift by (t, y)."""

    def __init__(self, k: int, n_vars: int, hidden: int = 256, depth: int = 2):
        super().__init__()
        self.inp = nn.Linear(k, hidden)
        self.emb = nn.Sequential(nn.Linear(64 + n_vars, hidden), nn.SiLU(), nn.Linear(hidden, hidden))
        self.norms = nn.ModuleList(nn.LayerNorm(hidden, elementwise_affine=False) for _ in range(depth))
        self.scale_shift = nn.ModuleList(nn.Linear(hidden, 2 * hidden) for _ in range(depth))
        self.mlps = nn.ModuleList(nn.Sequential(nn.Linear(hidden, hidden), nn.SiLU(), nn.Linear(hidden, hidden))
                                  for _ in range(depth))
        self.out = nn.Linear(hidden, k)
        self.register_buffer("freqs", torch.exp(-math.log(10000.0) * torch.arange(32) / 32))

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        a = t[:, None].float() * self.freqs[None]
        e = self.emb(torch.cat([a.sin(), a.cos(), y], 1))
        h = self.inp(x)
        for norm, ss, mlp in zip(self.norms, self.scale_shift, self.mlps):
            scale, shift = ss(e).chunk(2, 1)
            h = h + mlp(norm(h) * (1 + scale) + shift)
        return self.out(h)


def train(c: torch.Tensor, y: torch.Tensor, ddim: DDIM, minutes: float, seed: int, batch: int = 256,
          ema_decay: float = 0.999) -> tuple[LatentDenoiser, int]:
    """The EMA of the denoiser's weights after ``minutes`` of AdamW; the EMA's decay warms up as
    (1 + step) / (10 + step) (diffusers' EMAModel), so a short run is not pulled to its initialisation."""
    torch.manual_seed(seed)
    net, ema = LatentDenoiser(c.shape[1], y.shape[1]), LatentDenoiser(c.shape[1], y.shape[1])
    ema.load_state_dict(net.state_dict())
    opt = torch.optim.AdamW(net.parameters(), 1e-3, weight_decay=1e-4)
    t0, step = time.perf_counter(), 0
    while time.perf_counter() - t0 < minutes * 60:
        i = torch.randint(0, len(c), (batch,))
        t = torch.randint(0, ddim.num_train_timesteps, (batch,))
        noise = torch.randn_like(c[i])
        loss = ((net(ddim.add_noise(c[i], noise, t), t, y[i]) - ddim.target(c[i], noise, t)) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        step += 1
        with torch.no_grad():
            for pe, pn in zip(ema.parameters(), net.parameters()):
                pe.lerp_(pn, 1.0 - min(ema_decay, (1 + step) / (10 + step)))
    return ema.eval(), step


def fit_set(prep, reference, spec: str, cache: Path):
    n, seed = (int(v) for v in spec.split("@"))
    path = cache / f"fit{SIZE}_seed{seed}_n{n}.npz"
    if not path.exists():
        images, labels, _ = registered_fit_set(prep, reference, n, seed=seed)
        path.parent.mkdir(parents=True, exist_ok=True)
        np.savez_compressed(path, images=images, labels=labels)
    d = np.load(path)
    return d["images"], d["labels"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--fit", nargs="+", default=["600@4242", "400@5151", "400@6161", "400@7171"],
                   help="registered fit subjects as N@SEED")
    p.add_argument("--ceiling-k", type=int, nargs="+", default=[16, 64, 256])
    p.add_argument("--k", type=int, default=64, help="latent dimensions of the model")
    p.add_argument("--minutes", type=float, nargs="+", default=[0.15, 1.0], help="training minutes of each model")
    p.add_argument("--depths", type=float, nargs="+", default=[1.0, 0.6, 0.3])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--n-test", type=int, default=8)
    p.add_argument("--test-offset", type=int, default=17,
                   help="held-out subjects: test_seed(0) + this (17: brain_native.py's subjects)")
    p.add_argument("--steps", type=int, default=50, help="DDIM steps over the full depth")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--work", type=Path, default=ROOT / "work" / "brain_latent")
    p.add_argument("--results", type=Path, default=ROOT / "results" / "brain_latent.json")
    args = p.parse_args()
    torch.set_num_threads(args.threads)

    reference = Reference(*brain.reference(64))
    prep = Preprocessing(spacing_mm=(brain.FOV_MM / SIZE,) * 3, spatial_size=(SIZE,) * 3, registration="rigid")
    mask = reference_mask(reference, prep)
    inside = mask.reshape(-1) > 0.5
    parts = [fit_set(prep, reference, s, args.work) for s in args.fit]
    images, labels = np.concatenate([a for a, _ in parts]), np.concatenate([b for _, b in parts])
    x = images.reshape(len(images), -1)[:, inside]
    baseline = VoxelwiseLinear().fit(images, labels)
    pcas = {k: PCA(k, whiten=True, random_state=0).fit(x) for k in sorted({*args.ceiling_k, args.k})}
    pca = pcas[args.k]
    c = torch.tensor(pca.transform(x), dtype=torch.float32)
    y = torch.tensor(brain.normalise(labels), dtype=torch.float32)
    ddim = DDIM(DDIMConfig(prediction_type="v_prediction"))
    models = {}
    for minutes in args.minutes:
        for seed in args.seeds:
            name = f"model_{minutes:g}min_seed{seed}"
            models[name] = train(c, y, ddim, minutes, seed)
            print(f"{name}: {models[name][1]} steps", flush=True)

    samples = brain.sample(args.n_test, seed=test_seed(0) + args.test_offset, size=FINE)
    affine = brain.affine(FINE)
    prepared = [prepare_registered(Scan(v[..., 0], affine, f"sub-{i:02d}"), prep, reference, mask)
                for i, v in enumerate(samples.images)]
    c_in = torch.tensor(pca.transform(np.stack([pp.image[0].reshape(-1)[inside] for pp in prepared])),
                        dtype=torch.float32)
    y_in = torch.tensor(brain.normalise(samples.labels), dtype=torch.float32)
    input_vol = brain.measure_volumes(samples.images[..., 0], samples.noise, FINE)

    def on_grid(values: np.ndarray) -> np.ndarray:
        full = np.zeros(SIZE ** 3, np.float32)
        full[inside] = values
        return full.reshape((SIZE,) * 3)

    rows, seconds = [], []
    for var, (text, target, affected) in INTERVENTIONS.items():
        truth = brain.counterfactual(samples, {var: target(samples.labels)}, size=FINE)
        y_cf = torch.tensor(brain.normalise(truth.labels), dtype=torch.float32)
        outputs = {"copy": list(samples.images[..., 0]), "oracle": [],
                   **{f"oracle_pca{k}": [] for k in args.ceiling_k},
                   "baseline": [realise(pp, ch, mask) for pp, ch in
                                zip(prepared, baseline.change(samples.labels, truth.labels))]}
        for pp, t in zip(prepared, truth.images[..., 0]):
            change = oracle_change(pp, prep, t)
            outputs["oracle"].append(realise(pp, change, mask))
            for k in args.ceiling_k:
                comp = pcas[k].components_
                outputs[f"oracle_pca{k}"].append(realise(pp, on_grid(change.reshape(-1)[inside] @ comp.T @ comp), mask))
        for name, (net, _) in models.items():
            for depth in args.depths:
                t0 = time.perf_counter()
                with torch.no_grad():
                    code = ddim.encode(lambda v, t: net(v, t, y_in), c_in, args.steps, depth)
                    both = ddim.decode(lambda v, t: net(v, t, torch.cat([y_in, y_cf])), torch.cat([code, code]),
                                       args.steps, depth)
                change = pca.inverse_transform(both[len(c_in):].numpy()) - pca.inverse_transform(both[:len(c_in)].numpy())
                seconds.append((time.perf_counter() - t0) / len(c_in))
                outputs[f"{name}_depth{depth:g}"] = [realise(pp, on_grid(ch), mask)
                                                     for pp, ch in zip(prepared, change)]
        row = {"intervention": text, "resolution_mm": brain.FOV_MM / FINE, "n": args.n_test,
               **score(outputs, samples, truth, affected, input_vol, ssim=False)}
        rows.append(row)
        print(json.dumps({"intervention": text, "image_mae": {k: round(v, 3) for k, v in row["image_mae"].items()}}),
              flush=True)
    result = {
        "machine": f"{platform.machine()}, {args.threads} thread(s), torch {torch.__version__}",
        "grid": SIZE, "test_seed": test_seed(0) + args.test_offset, "fit_subjects": len(images), "fit": args.fit, "k": args.k,
        "explained_variance": {str(k): float(v.explained_variance_ratio_.sum()) for k, v in pcas.items()},
        "train_cpu_minutes": args.minutes, "train_steps": {name: m[1] for name, m in models.items()},
        "ddim_steps": args.steps, "depths": args.depths,
        "latent_seconds_per_scan": float(np.mean(seconds)),
        "interventions": rows,
    }
    args.results.parent.mkdir(parents=True, exist_ok=True)
    args.results.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.results}")


if __name__ == "__main__":
    main()
