"""Speed on whatever machine this runs on, against that machine's own limit, in one run.

- the machine's matmul peak, measured (fp32 on a CPU; bf16 on a GPU): the physical limit;
- the denoiser's FLOPs per forward pass (torch's FlopCounterMode: nominal counts, a 3x3
  convolution as 2 x MACs of the direct method) and the FLOP/s it achieves, as a share of that
  peak, for our default Pendulum configuration and for a reference configuration of the
  original paper's network size (base 128 channels, mults 1-2-3-4, 3 res blocks, 96 px;
  FACTS.md). The share can exceed 1: oneDNN computes 3x3 convolutions by Winograd, with fewer
  operations than the nominal count (README, Speed);
- training images/s (loss, backward, AdamW step) at batch 32;
- counterfactual latency per image (batch 1) and throughput (batch 32) at DDIM steps
  10, 25, 50, 100;
- with ``--checkpoint`` (a trained Pendulum model), the error against the true
  counterfactual at each step count: the quality cost of fewer steps.

    python benchmarks/speed.py [--checkpoint runs/pendulum] [--device auto]

writes benchmarks/results/speed.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode

from cdae_med.checkpoint import load_checkpoint
from cdae_med.diffusion import DDIM
from cdae_med.graph import builtin_graph
from cdae_med.model import CausalDiffAE, CausalDiffAEConfig
from cdae_med.pipeline import CounterfactualPipeline
from cdae_med.runtime import autocast, optimise_for_device, resolve_device
from pipelines.datasets import get_dataset, to_255, to_tensor, to_uint8
from pipelines.evaluate_cf import random_targets
from pipelines.train_config import test_seed

ROOT = Path(__file__).resolve().parent
STEPS = (10, 25, 50, 100)
REFERENCE = {"unet_channels": (128, 256, 384, 512), "unet_attention": (False, False, True, True),
             "unet_res_blocks": 3, "unet_head_channels": 64, "encoder_channels": (32, 64, 128, 256)}


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def machine_name(device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return f"{line.split(':', 1)[1].strip()}, {torch.get_num_threads()} threads"
    except OSError:
        pass
    return f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"


def timed(fn, device, repeat: int, warmup: int = 1) -> float:
    for _ in range(warmup):
        fn()
    sync(device)
    t0 = time.perf_counter()
    for _ in range(repeat):
        fn()
    sync(device)
    return (time.perf_counter() - t0) / repeat


def matmul_peak(device, trials: int = 5) -> dict:
    """The best of several timings: on a shared machine the fastest run is the closest to the limit."""
    n, dtype = (8192, torch.bfloat16) if device.type == "cuda" else (4096, torch.float32)
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    s = min(timed(lambda: a @ b, device, repeat=10 if device.type == "cuda" else 1) for _ in range(trials))
    return {"flop_per_s": 2 * n**3 / s, "size": n, "dtype": str(dtype).replace("torch.", ""), "trials": trials}


def build(device, size: int, overrides: dict) -> CausalDiffAE:
    cfg = CausalDiffAEConfig(spatial_dims=2, in_channels=3, image_size=(size, size), **overrides)
    return optimise_for_device(CausalDiffAE(builtin_graph("pendulum"), cfg).to(device).eval(), device)


def denoiser_figures(model: CausalDiffAE, device, size: int, batch: int, peak: float, repeat: int) -> dict:
    x = torch.randn(batch, 3, size, size, device=device)
    t = torch.full((batch,), 500, device=device, dtype=torch.long)
    z = torch.randn(batch, model.n_vars, model.config.latent_dim, device=device)

    @torch.no_grad()
    def forward():
        with autocast(device):
            model.denoise(x, t, z)

    with FlopCounterMode(display=False) as counter:
        forward()
    flops = counter.get_total_flops()
    s = timed(forward, device, repeat)
    return {"params_millions": sum(p.numel() for p in model.parameters()) / 1e6, "batch": batch,
            "flops_per_forward": flops, "seconds_per_forward": s, "achieved_flop_per_s": flops / s,
            "share_of_matmul_peak": flops / s / peak}


def training_rate(model: CausalDiffAE, device, size: int, batch: int, steps: int, warmup: int = 2) -> float:
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    ddim = DDIM().to(device)  # the default schedule, as training uses
    x = torch.rand(batch, 3, size, size, device=device) * 2 - 1
    y = torch.randn(batch, model.n_vars, device=device)

    def step():
        with autocast(device):
            loss = model.loss(x, y, ddim, 1.0)["loss"]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    s = timed(step, device, steps, warmup=warmup)
    model.eval()
    return batch / s


def counterfactual_speed(model: CausalDiffAE, device, size: int, batches=(1, 32)) -> list[dict]:
    pipe = CounterfactualPipeline(model)
    rows = []
    for steps in STEPS:
        row = {"ddim_steps": steps}
        for b in batches:
            x = torch.rand(b, 3, size, size, device=device) * 2 - 1

            def run():
                pipe(x, {"angle": 20.0}, num_steps=steps)

            s = timed(run, device, repeat=1, warmup=0 if device.type == "cpu" else 1)
            row[f"batch_{b}_seconds_per_image"] = s / b
            row[f"batch_{b}_images_per_s"] = b / s
        rows.append(row)
        print(row, flush=True)
    return rows


def step_quality(checkpoint: Path, device, n: int) -> list[dict]:
    """Error against the generator's true counterfactual at each DDIM step count."""
    ck = load_checkpoint(checkpoint, map_location=device)
    pipe = CounterfactualPipeline(optimise_for_device(ck.model.to(device), device), DDIM(ck.scheduler), ck)
    ds = get_dataset(ck.dataset)
    size = ck.image["size"][0]
    test = ds.sample(n, seed=test_seed(ck.training.get("seed", 0)), size=size)
    targets = random_targets(ds, "angle", n, 0)
    truth = to_255(ds.counterfactual(test, {"angle": targets}, size).images)
    x0 = to_tensor(test.images).to(device)
    rows = []
    for steps in STEPS:
        t0 = time.perf_counter()
        cf = pipe(x0, {"angle": targets}, num_steps=steps).images
        rows.append({"ddim_steps": steps, "do_angle_mae_255": float(np.abs(to_255(to_uint8(cf)) - truth).mean()),
                     "seconds_per_image": (time.perf_counter() - t0) / n})
        print(rows[-1], flush=True)
    rows.append({"copy_input_mae_255": float(np.abs(to_255(test.images) - truth).mean())})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="auto")
    ap.add_argument("--checkpoint", type=Path, help="a trained Pendulum checkpoint for the step-quality figures")
    ap.add_argument("--n", type=int, default=64, help="test images for the step-quality figures")
    ap.add_argument("--out", type=Path, default=ROOT / "results" / "speed.json")
    args = ap.parse_args()
    device = resolve_device(args.device)
    gpu = device.type == "cuda"
    result = {"machine": machine_name(device), "device": str(device), "torch": torch.__version__,
              "precision": "bf16 autocast" if gpu else "fp32"}
    peak = matmul_peak(device)
    result["matmul_peak"] = peak
    print(f"{result['machine']}: matmul peak {peak['flop_per_s'] / 1e9:.1f} GFLOP/s ({peak['dtype']})", flush=True)

    ours = build(device, 32, {})
    result["ours"] = {"config": "pendulum default, 32 px",
                      "denoiser": denoiser_figures(ours, device, 32, 32, peak["flop_per_s"], repeat=5),
                      "training_images_per_s": training_rate(ours, device, 32, 32, steps=10 if gpu else 3)}
    print("ours", result["ours"], flush=True)
    result["ours"]["counterfactuals"] = counterfactual_speed(ours, device, 32)

    ref = build(device, 96, REFERENCE)
    result["paper_size_reference"] = {
        "config": "UNet base 128, mults 1-2-3-4, 3 res blocks, 96 px (the paper's Pendulum network size)",
        "denoiser": denoiser_figures(ref, device, 96, 1, peak["flop_per_s"], repeat=2),
        "training_images_per_s": training_rate(ref, device, 96, 32 if gpu else 2, steps=5 if gpu else 1,
                                               warmup=2 if gpu else 1)}
    print("reference", result["paper_size_reference"], flush=True)
    r_o, r_r = result["ours"]["denoiser"], result["paper_size_reference"]["denoiser"]
    result["ratios"] = {
        "reference_over_ours_flops_per_image": (r_r["flops_per_forward"] / r_r["batch"]) /
                                               (r_o["flops_per_forward"] / r_o["batch"]),
        "reference_over_ours_seconds_per_image_forward": (r_r["seconds_per_forward"] / r_r["batch"]) /
                                                         (r_o["seconds_per_forward"] / r_o["batch"]),
        "ours_over_reference_training_images_per_s": result["ours"]["training_images_per_s"] /
                                                     result["paper_size_reference"]["training_images_per_s"],
    }
    if args.checkpoint:
        result["step_quality"] = {"checkpoint": str(args.checkpoint), "n": args.n,
                                  "rows": step_quality(args.checkpoint, device, args.n)}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
