"""Data-parallel training across processes (``torchrun``), one process per GPU (or CPU, gloo).

The training loop stays the single-process one: every rank builds the same data and model,
takes its share of each global batch, and DistributedDataParallel averages the gradients, so
the ranks' weights stay equal step for step and rank 0 writes the usual checkpoint.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

__all__ = ["Ranks", "init_distributed", "any_rank", "check_in_sync", "shutdown"]

log = logging.getLogger("cdae_med")


@dataclass(frozen=True)
class Ranks:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world > 1 or dist.is_initialized()

    @property
    def main(self) -> bool:
        return self.rank == 0


def init_distributed(device: str = "auto") -> tuple[Ranks, torch.device]:
    """Join the process group that ``torchrun`` describes in the environment."""
    missing = [k for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
    if missing:
        raise RuntimeError("--distributed needs to be started by torchrun, e.g. "
                           "`torchrun --nproc_per_node 2 -m cdae_cli train ... --distributed` "
                           f"(missing {', '.join(missing)})")
    ranks = Ranks(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ["LOCAL_RANK"]))
    use_cuda = device != "cpu" and torch.cuda.is_available()
    if use_cuda:
        torch.cuda.set_device(ranks.local_rank)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    dev = torch.device(f"cuda:{ranks.local_rank}") if use_cuda else torch.device("cpu")
    if ranks.main:
        log.info("distributed: %d processes, backend %s", ranks.world, dist.get_backend())
    return ranks, dev


def any_rank(flag: bool, device: torch.device) -> bool:
    """True on every rank if ``flag`` is true on any (so all ranks stop on the same step)."""
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item() > 0)


def check_in_sync(model: torch.nn.Module, device: torch.device) -> float:
    """Compare a checksum of the weights across ranks; raise if any rank differs."""
    with torch.no_grad():
        total = sum(p.detach().double().sum() for p in model.parameters()).reshape(1).to(device)
    gathered = [torch.zeros_like(total) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, total)
    values = [g.item() for g in gathered]
    if max(values) - min(values) > 1e-6 * max(1.0, abs(values[0])):
        raise RuntimeError(f"ranks out of sync: weight checksums {values}")
    return values[0]


def shutdown(wait: bool = False) -> None:
    """Leave the process group; with ``wait``, first meet every other rank at a barrier.

    Every rank that waits must call this (rank 0 after writing its files, the others at once), so
    no rank destroys its connections while a peer is still using them.
    """
    if dist.is_initialized():
        if wait:
            dist.barrier()
        dist.destroy_process_group()
