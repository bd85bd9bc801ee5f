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


def leave() -> None:
    """End this process's part in the process group once every process is done (a barrier, then
    destroy): left to interpreter exit, gloo's threads were destroyed while still joinable and
    the process aborted after its work (SIGABRT, "terminate called without an active exception",
    no Python frame): 2 of 8 two-process trainer-test runs here. The identity without a group."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


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
# One FSDP2 unit per decoder layer, then the root (embeddings, final norm, output layer): an
# update's forward gathers a layer, runs it and frees it, and its backward gathers it again and
# reduce-scatters its gradients, so only a layer or two (and the root) are ever whole. Every
# unit's all-gather is a collective, so every process must make the same forward and backward
# calls: the updater gives each process equally many micro-batches (zero-weight ones pad the
# shorter shards) and `HFPolicy.score` runs each micro-batch as one forward call
# (`one_forward_per_score`). Generation needs the whole weights on each process with no
# collective per decode step: `whole_weights` gathers every unit once and keeps them.


def layer_units(model: Any) -> list[Any]:
    """The modules that get a unit of their own: Hugging Face's `_no_split_modules` (the decoder
    layer class, e.g. Qwen2DecoderLayer), the same choice as accelerate's transformer auto-wrap."""
    names = set(getattr(model, "_no_split_modules", None) or [])
    # by the class's ancestry: a sharded layer's class is FSDP<name>, a subclass of <name>
    return [m for m in model.modules() if m is not model and any(c.__name__ in names for c in type(m).__mro__)]


def fully_shard_model(model: Any, compute_dtype: Any = None) -> Any:
    """Shard `model`'s weights, gradients (and so the optimizer state built on them) over the
    processes, one unit per decoder layer (`layer_units`; one unit for the whole model if it
    names none). `compute_dtype` (bf16 on GPUs): weights are gathered in it for forward passes
    and gradients reduced in float32 into the float32 shards (FSDP2's MixedPrecisionPolicy).
    Gradients are summed, not averaged: each process's loss is already its share of the batch
    loss, as in the updater's own all-reduce."""
    import torch
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mp = MixedPrecisionPolicy() if compute_dtype is None else MixedPrecisionPolicy(
        param_dtype=compute_dtype, reduce_dtype=torch.float32)
    for layer in layer_units(model):
        fully_shard(layer, mp_policy=mp, reshard_after_forward=True)
    fully_shard(model, mp_policy=mp, reshard_after_forward=False)  # used first in backward: keep it
    for unit in _units(model):  # both setters act on one unit only
        unit.set_gradient_divide_factor(1.0)
        unit.set_force_sum_reduction_for_comms(True)  # gloo has no PREMUL_SUM / AVG reduce-scatter
    return model


def is_fully_sharded(model: Any) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def _units(model: Any) -> list[Any]:
    """The model's FSDP units, in module order (the same on every process)."""
    from torch.distributed.fsdp import FSDPModule

    return [m for m in model.modules() if isinstance(m, FSDPModule)]


class whole_weights:
    """Every process holds the whole weights inside this block (one all-gather per unit,
    collective: every process must enter it) and keeps them through every forward call, so each
    generates its own rollouts with no further communication; on leaving, the gathered copy is
    freed and the layers reshard after each forward again. Its cost: the model once more in the
    compute dtype (Qwen2.5-7B in bf16: 15 GB per GPU) for the rollout phase. The identity for a
    model that is not sharded."""

    def __init__(self, model: Any) -> None:
        self.model = model if is_fully_sharded(model) else None

    def __enter__(self) -> None:
        if self.model is not None:
            units = _units(self.model)
            for unit in units:
                unit.set_reshard_after_forward(False, recurse=False)
            for handle in [unit.unshard(async_op=True) for unit in units]:
                handle.wait()

    def __exit__(self, *exc: Any) -> None:
        if self.model is not None:
            for unit in _units(self.model):
                unit.reshard()
                unit.set_reshard_after_forward(unit is not self.model, recurse=False)


def store_in_compute_dtype(model: Any, dtype: Any) -> Any:
    """The frozen KL reference's linear layers stored in `dtype` (bf16), the rest (embeddings,
    norms) kept: under autocast to `dtype` a linear layer casts its float32 weight to `dtype`
    before every matmul, so storing it cast gives bit-identical log-probs in half the memory
    (Qwen2.5-7B: 14 GB instead of 28 GB per GPU). A weight tied to the input embeddings stays:
    the embedding lookup is not autocast."""
    import torch

    tied = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Embedding)}
    for m in model.modules():
        if isinstance(m, torch.nn.Linear) and id(m.weight) not in tied:
            m.to(dtype)
    return model


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
