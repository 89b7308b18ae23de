"""One-stage training on several processes (torchrun): data parallel over each step's batch.

Launched as `torchrun --nproc-per-node N -m sfc.cli build ... --search one-stage`: every
process runs the same build up to the search (so each holds the same weights, data and
seeded Gumbel generator); in the search each takes rows rank, rank + N, ... of the step's
batch, returns its share of the loss (its rows' sum over the whole batch's count), and the
gradients are summed over the processes before every optimizer step, so each step is the
one-process step up to float summation order. gloo on CPU, nccl on CUDA (one GPU per
process). Only rank 0 writes checkpoints and the build's outputs; the others build into a
temporary folder that is removed. The same seed and world size give the same bits.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ..errors import SfcError

if TYPE_CHECKING:
    import torch

__all__ = ["ALONE", "World", "env_world", "join", "shard"]


@dataclass(frozen=True)
class World:
    """This process's rank among `size` training processes."""

    rank: int = 0
    size: int = 1

    @property
    def parallel(self) -> bool:
        return self.size > 1

    def sum_gradients(self, tensors: Iterable[torch.Tensor]) -> None:
        """Sum each tensor's gradient over the processes, in place (no-op alone)."""
        if not self.parallel:
            return
        import torch.distributed as dist

        for t in tensors:
            if t.grad is not None:
                dist.all_reduce(t.grad, op=dist.ReduceOp.SUM)

    def sum(self, value: float) -> float:
        """`value` summed over the processes."""
        if not self.parallel:
            return value
        import torch
        import torch.distributed as dist

        t = torch.tensor([value], dtype=torch.float64)
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return float(t.item())


ALONE = World()


def env_world() -> World:
    """The world torchrun describes in the environment (RANK, WORLD_SIZE); one process
    otherwise."""
    try:
        size = int(os.environ.get("WORLD_SIZE", "1"))
        rank = int(os.environ.get("RANK", "0"))
    except ValueError:
        raise SfcError("RANK and WORLD_SIZE must be integers (torchrun sets them)") from None
    if size < 1 or not 0 <= rank < size:
        raise SfcError(f"RANK {rank} does not fit WORLD_SIZE {size}")
    return World(rank, size)


def join(device: str) -> World:
    """Join the process group torchrun's environment describes (once; gloo on CPU, nccl on
    CUDA with this process's local GPU); the world, of size 1 without torchrun."""
    world = env_world()
    if not world.parallel:
        return world
    import torch
    import torch.distributed as dist

    if not dist.is_initialized():
        if device == "cuda":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("nccl" if device == "cuda" else "gloo")
    return World(dist.get_rank(), dist.get_world_size())


def shard(rows: int, world: World) -> slice:
    """This process's rows of a batch of `rows`: rank, rank + size, ..."""
    return slice(world.rank, rows, world.size)
