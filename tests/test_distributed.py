"""Data-parallel training under torchrun, on CPU with two gloo processes."""

import json
import os
import subprocess
import sys

import torch

ARGS = ["train", "--dataset", "pendulum", "--size", "16", "--steps", "6", "--batch-size", "8", "--n-train", "64",
        "--eval-n", "0", "--minutes", "0", "--device", "cpu", "--quiet"]


def run(args, tmp_path, name):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    res = subprocess.run(args, capture_output=True, text=True, env=env, timeout=600, cwd=tmp_path)
    assert res.returncode == 0, res.stdout + res.stderr
    return res


def test_two_ranks_stay_in_sync_and_write_the_single_process_format(tmp_path):
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone",
                "-m", "cdae_cli"]
    res = run(torchrun + ARGS + ["--out", str(tmp_path / "ddp"), "--distributed"], tmp_path, "ddp")
    assert "distributed: 2 processes, backend gloo" in res.stderr
    assert "ranks in sync after 6 steps" in res.stderr
    single = run([sys.executable, "-m", "cdae_cli"] + ARGS + ["--out", str(tmp_path / "one")], tmp_path, "one")
    assert "distributed" not in single.stderr
    ddp_meta = json.loads((tmp_path / "ddp" / "checkpoint.json").read_text())
    one_meta = json.loads((tmp_path / "one" / "checkpoint.json").read_text())
    assert ddp_meta.keys() == one_meta.keys() and ddp_meta["step"] == one_meta["step"] == 6
    assert ddp_meta["model"] == one_meta["model"] and ddp_meta["image"] == one_meta["image"]
    ddp_w = torch.load(tmp_path / "ddp" / "weights.pt", weights_only=True)
    one_w = torch.load(tmp_path / "one" / "weights.pt", weights_only=True)
    assert ddp_w.keys() == one_w.keys()
    assert all(ddp_w[k].shape == one_w[k].shape for k in ddp_w)
