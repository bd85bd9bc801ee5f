"""A training step's episodes shared out over the processes of a multi-process run.

Under torchrun or `accelerate launch` every process holds the same config, seed and task
cursor, so every process draws the same tasks for a step. Each plays only its block of them
(`block`), and the step's samples and metrics are gathered back (`gather`) so that every
process hands the same whole batch to the updater, which shards the update itself. Groups
stay whole on one process (all episodes of a source or a GRPO task are played where the task
is), so rewards and advantages never need another process's episodes. Every episode samples
from its own seeded stream (`policy.base.row_seeds`), so the union of the processes'
episodes is exactly what one process plays for the same seed.

Without an initialised process group (one process) everything here is the identity.
"""

from __future__ import annotations

from typing import Any


def process() -> tuple[int, int]:
    """(this process's rank, number of processes); (0, 1) outside a process group."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def block(n: int, rank: int, world: int) -> range:
    """The items of `n` this rank plays: contiguous, sizes differing by at most one, so that
    gathering the blocks in rank order gives the items back in their single-process order."""
    return range(n * rank // world, n * (rank + 1) // world)


def gather(obj: Any) -> list[Any]:
    """Every process's `obj`, in rank order, on every process (a list of one without a group)."""
    rank, world = process()
    if world == 1:
        return [obj]
    import torch.distributed as dist

    out: list[Any] = [None] * world
    dist.all_gather_object(out, obj)
    return out
