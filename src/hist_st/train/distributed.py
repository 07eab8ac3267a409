"""Data parallelism over processes with ``torch.distributed`` (launched by ``torchrun``).

Each rank trains on its shard of the slides (`hist_st.train.data.shard_indices`), one slide per step;
after the backward pass the gradients are averaged over ranks with one all-reduce of a flat buffer.
We average explicitly instead of wrapping the model in ``DistributedDataParallel``: HiST's graph
changes with every slide (sparse lattices, empty coarse levels on tiny slides), and an explicit
all-reduce treats a parameter without a gradient on one rank as a zero gradient instead of hanging or
raising, while giving exactly DDP's result (the mean of the per-rank gradients). gloo on CPU, nccl on
GPU. Rank 0 is the master process: it alone writes checkpoints, logs and shows progress bars.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass

import torch
import torch.distributed as dist

__all__ = [
    "DistInfo",
    "init_distributed",
    "average_gradients",
    "broadcast_parameters",
    "all_reduce_mean",
    "gather_objects",
    "barrier",
]


@dataclass(frozen=True)
class DistInfo:
    """This process's place in the job: ``rank`` of ``world_size``; ``local_rank`` picks the GPU."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: str | None = None

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_master(self) -> bool:
        return self.rank == 0


def init_distributed(device_pref: str = "auto") -> DistInfo:
    """Join the process group described by torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK).

    Without those variables (or with WORLD_SIZE 1) this is a single-process run and nothing is
    initialised. An already initialised default group (e.g. tests that spawn ranks) is reused.
    """
    if dist.is_available() and dist.is_initialized():
        return DistInfo(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", dist.get_rank())),
                        dist.get_backend())
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo()
    rank = int(os.environ["RANK"])
    local = int(os.environ.get("LOCAL_RANK", rank))
    use_cuda = device_pref.startswith("cuda") or (device_pref == "auto" and torch.cuda.is_available())
    backend = "nccl" if use_cuda else "gloo"
    if use_cuda:
        torch.cuda.set_device(local % max(1, torch.cuda.device_count()))
    dist.init_process_group(backend=backend, rank=rank, world_size=world)
    return DistInfo(rank, world, local, backend)


def average_gradients(params: Iterable[torch.nn.Parameter], info: DistInfo) -> None:
    """Replace each gradient by its mean over ranks (one all-reduce of a flat buffer).

    A parameter without a gradient counts as a zero gradient on that rank; after the call every
    trainable parameter has a gradient, identical on all ranks.
    """
    if not info.enabled:
        return
    params = [p for p in params if p.requires_grad]
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    if not params:
        return
    flat = torch.cat([p.grad.reshape(-1).float() for p in params])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    flat /= info.world_size
    offset = 0
    for p in params:
        n = p.numel()
        p.grad.copy_(flat[offset : offset + n].view_as(p.grad))
        offset += n


def broadcast_parameters(module: torch.nn.Module, info: DistInfo) -> None:
    """Copy rank 0's parameters and buffers to every rank."""
    if not info.enabled:
        return
    with torch.no_grad():
        for t in list(module.parameters()) + list(module.buffers()):
            dist.broadcast(t.data, src=0)


def all_reduce_mean(value: float, info: DistInfo, device: torch.device | None = None) -> float:
    """Mean of a scalar over ranks (identity when not distributed)."""
    if not info.enabled:
        return float(value)
    t = torch.tensor([float(value)], dtype=torch.float64, device=device or "cpu")
    if info.backend == "nccl" and t.device.type != "cuda":
        t = t.cuda()
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return float(t.item()) / info.world_size


def gather_objects(obj: object, info: DistInfo) -> list:
    """Every rank's picklable ``obj``, in rank order (``[obj]`` when not distributed)."""
    if not info.enabled:
        return [obj]
    parts: list = [None] * info.world_size
    dist.all_gather_object(parts, obj)
    return parts


def barrier(info: DistInfo) -> None:
    """Wait for every rank (nothing when not distributed)."""
    if info.enabled:
        dist.barrier()
