"""Process-group helpers for torchrun: one code path for 1 and N processes.

torchrun sets RANK, LOCAL_RANK and WORLD_SIZE. Without them every helper here
behaves as a single process, so library code calls them unconditionally.
Collectives use gloo on CPU and NCCL when the run's device is CUDA; each
process of a multi-GPU node computes on cuda:<LOCAL_RANK>.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class DistributedContext:
    """This process's place in the process group (rank 0 of 1 without torchrun)."""

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()

    def rank_device(self, device: torch.device) -> torch.device:
        """Return the device this process computes on: cuda:<local_rank> for a CUDA run under torchrun.

        A CPU device, a single process, or a device with an explicit index is
        returned unchanged.
        """
        device = torch.device(device)
        if self.enabled and device.type == "cuda" and device.index is None:
            return torch.device("cuda", self.local_rank)
        return device

    def all_gather_rows(self, array: np.ndarray) -> np.ndarray:
        """Concatenate each rank's rows in rank order: [n_0 + n_1 + ..., ...].

        Ranks may hold different row counts; shapes past the first axis and the
        dtype must agree.
        """
        if not self.enabled:
            return array
        gathered: list = [None] * self.world_size
        dist.all_gather_object(gathered, array)
        return np.concatenate(gathered, axis=0)

    def mean_over_ranks(self, value: float) -> float:
        """Average a Python number over all ranks; every rank gets the same result."""
        if not self.enabled:
            return float(value)
        gathered: list = [None] * self.world_size
        dist.all_gather_object(gathered, float(value))
        return float(np.mean(gathered))

    def broadcast_object(self, value):
        if not self.enabled:
            return value
        holder = [value]
        dist.broadcast_object_list(holder, src=0)
        return holder[0]


def init_distributed(device: torch.device | None = None) -> DistributedContext:
    """Join the process group that torchrun describes, or return a single-process context.

    For a CUDA device the process first selects cuda:<LOCAL_RANK>, which NCCL
    collectives need.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return DistributedContext()

    rank = int(os.environ["RANK"])
    local_rank = int(os.environ.get("LOCAL_RANK", rank))
    use_cuda = device is not None and torch.device(device).type == "cuda"
    if use_cuda:
        torch.cuda.set_device(local_rank)
    if not dist.is_initialized():
        backend = "nccl" if use_cuda and dist.is_nccl_available() else "gloo"
        dist.init_process_group(backend=backend)
        logger.info("joined process group: rank %d of %d (%s)", rank, world_size, backend)
    return DistributedContext(rank=rank, local_rank=local_rank, world_size=world_size)


def shard_indices(count: int, context: DistributedContext) -> np.ndarray:
    """Indices 0..count-1 that this rank handles: rank, rank + world, ..."""
    return np.arange(context.rank, count, context.world_size)


def unshard_rows(rows: np.ndarray, count: int, context: DistributedContext) -> np.ndarray:
    """Gather rows that `shard_indices` split across ranks back into index order."""
    if not context.enabled:
        return rows
    gathered: list = [None] * context.world_size
    dist.all_gather_object(gathered, rows)
    result = np.empty((count,) + rows.shape[1:], dtype=rows.dtype)
    for rank, part in enumerate(gathered):
        result[rank::context.world_size] = part
    return result
