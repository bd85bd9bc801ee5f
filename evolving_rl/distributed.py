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


# -- train.sharding: fsdp --------------------------------------------------------------------
#
# The model is one FSDP2 unit (`fully_shard` on the root only). Per-layer units would keep
# less of the model whole at once, but every FSDP forward then all-gathers, and the number of
# forward calls of an update differs between processes: `HFPolicy.score` runs a shared
# prefix and then length buckets, a plan that depends on each process's shard. With one unit
# the collectives of an update are one all-gather and one reduce-scatter per micro-batch,
# whatever the calls inside it, so processes stay in step when they run equally many
# micro-batches (the updater pads the shorter shards with zero-weight ones).


def fully_shard_model(model: Any, compute_dtype: Any = None) -> Any:
    """Shard `model`'s weights, gradients (and so the optimizer state built on them) over the
    processes. `compute_dtype` (bf16 on GPUs): the weights are gathered in it for forward passes
    and gradients reduced in float32 into the float32 shards (FSDP2's MixedPrecisionPolicy).
    Gradients are summed, not averaged: each process's loss is already its share of the batch
    loss, as in the updater's own all-reduce."""
    import torch
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mp = MixedPrecisionPolicy() if compute_dtype is None else MixedPrecisionPolicy(
        param_dtype=compute_dtype, reduce_dtype=torch.float32)
    fully_shard(model, mp_policy=mp, reshard_after_forward=False)
    model.set_gradient_divide_factor(1.0)
    model.set_force_sum_reduction_for_comms(True)  # gloo has no PREMUL_SUM / AVG reduce-scatter
    return model


def is_fully_sharded(model: Any) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


class whole_weights:
    """Every process holds the whole weights inside this block (one all-gather, collective:
    every process must enter it), so each generates its own rollouts with no further
    communication; on leaving, the gathered copy is freed. Its cost: the model once more in
    the compute dtype (Qwen2.5-7B in bf16: 15 GB per GPU) for the rollout phase. The identity
    for a model that is not sharded."""

    def __init__(self, model: Any) -> None:
        self.model = model if is_fully_sharded(model) else None

    def __enter__(self) -> None:
        if self.model is not None:
            self.model.unshard()

    def __exit__(self, *exc: Any) -> None:
        if self.model is not None:
            self.model.reshard()


def full_state(model: Any, optimizer: Any) -> tuple[dict, dict]:
    """(whole float32 weights, whole optimizer state) gathered on the first process ({} on the
    others), on CPU; collective. The optimizer state is keyed by parameter names."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_optimizer_state_dict

    opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return get_model_state_dict(model, options=opts), get_optimizer_state_dict(model, optimizer, options=opts)


def load_full_optimizer_state(model: Any, optimizer: Any, state: dict) -> None:
    """Shard a whole optimizer state written by `full_state` (every process passes it)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    set_optimizer_state_dict(model, optimizer, optim_state_dict=state, options=StateDictOptions(full_state_dict=True))
