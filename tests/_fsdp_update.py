"""Launched by tests/test_fsdp.py as `torchrun --nproc_per_node N`: GRPOUpdater steps on the
fixed samples of tests/_ddp_update.py with the tiny checkpoint's weights, gradients and
optimizer state sharded over the processes (train.sharding: fsdp, one unit per decoder layer),
then the whole weights and optimizer state gathered and saved to OUT/rank<k>.pt (the first
process's holds them, the others' are empty), and the whole weights each process holds for
generation. The first step leaves one sample out, so the two processes' shards (6 and 5
samples) differ in micro-batches: the shorter one must pad. Then a second
step on all 12, and, given RESUME, the whole state written after the first step reloaded into a
freshly sharded model and the second step taken again from it. With N=1 this is the
single-process run, unsharded.

Recorded besides: each process's own micro-batches and its model forward calls per step (equal
across processes when the padding works), and the most decoder layers whole at once during an
update's forward calls (per-layer units free a layer after its forward).
"""

from __future__ import annotations

import copy
import faulthandler
import sys
from datetime import timedelta

import torch
from accelerate import Accelerator
from accelerate.utils import InitProcessGroupKwargs

from _ddp_update import samples
from evolving_rl import distributed
from evolving_rl.algorithms.grpo import GRPOUpdater, micro_batches
from evolving_rl.config import GRPOConfig, ModelConfig
from evolving_rl.policy.hf import HFPolicy


def build(checkpoint: str, accelerator: Accelerator, state: dict | None = None):
    torch.manual_seed(0)
    policy = HFPolicy(ModelConfig(path=checkpoint))
    if state is not None:
        policy.model.load_state_dict(state["weights"])
    reference = HFPolicy(ModelConfig(path=checkpoint)).reference()
    sharded = accelerator.num_processes > 1
    if sharded:
        distributed.fully_shard_model(policy.model)
    # SGD with momentum: its first step is the (clipped) gradient, so equal weights mean equal
    # gradients (Adam's first step is ~lr * sign(g)); the momentum is an optimizer state to resume.
    sgd = torch.optim.SGD(list(policy.parameters()), lr=1.0, momentum=0.9)
    updater = GRPOUpdater(policy, reference, GRPOConfig(micro_batch_tokens=64, kl_coef=0.05), optimizer=sgd,
                          accelerator=accelerator, fully_sharded=sharded)
    if state is not None:
        if sharded:
            distributed.load_full_optimizer_state(policy.model, sgd, state["optimizer"])
        else:
            sgd.load_state_dict(state["optimizer"])
    return policy, updater


def whole(policy, updater) -> dict:
    if distributed.is_fully_sharded(policy.model):
        weights, optimizer = distributed.full_state(policy.model, updater.optimizer)
    else:
        weights = {k: v.detach().clone() for k, v in policy.model.state_dict().items()}
        optimizer = copy.deepcopy(updater.optimizer.state_dict())  # the live buffers move on
    return {"weights": weights, "optimizer": optimizer}


class Watch:
    """Counts the model's forward calls, and the most decoder layers holding whole (not
    sharded: FSDP2 swaps a DTensor shard for a plain tensor while a unit is gathered) weights
    at the start of any layer's forward."""

    def __init__(self, model) -> None:
        self.forwards, self.most_whole = 0, 0
        self.layers = distributed.layer_units(model)
        model.register_forward_pre_hook(lambda *_: setattr(self, "forwards", self.forwards + 1))
        for layer in self.layers:
            layer.register_forward_pre_hook(lambda *_: self.look())

    def look(self) -> None:
        whole = sum(not any(hasattr(p, "to_local") for p in m.parameters()) for m in self.layers)
        self.most_whole = max(self.most_whole, whole)

    def step(self, updater, batch) -> dict:
        self.forwards, self.most_whole = 0, 0
        metrics = updater.update(batch)
        rank, world = updater._process()
        order = sorted(range(len(batch)), key=lambda i: -len(batch[i].segment.token_ids))
        mine = micro_batches([len(batch[i].segment.token_ids) for i in order[rank::world]], updater.cfg.micro_batch_tokens)
        return {**metrics, "own_micro_batches": len(mine), "forwards": self.forwards, "most_whole_layers": self.most_whole}


def main(checkpoint: str, out_dir: str, resume: bool) -> None:
    # a collective that one process never joins fails in 60 s instead of hanging the test
    accelerator = Accelerator(cpu=True, kwargs_handlers=[InitProcessGroupKwargs(timeout=timedelta(seconds=60))])
    policy, updater = build(checkpoint, accelerator)
    watch = Watch(policy.model)
    ref = HFPolicy(ModelConfig(path=checkpoint))
    batch = samples(ref)
    first_metrics = watch.step(updater, batch[:11])
    first = whole(policy, updater)
    # generation from the whole weights on every process, no collective while it runs
    prompt = ref.encode_text("go to the kitchen")
    local = sum(p.to_local().numel() if hasattr(p, "to_local") else p.numel() for p in policy.parameters())
    with distributed.whole_weights(policy.model):
        held = {k: v.detach().clone() for k, v in policy.model.named_parameters()}  # this process's whole copy
        watch.most_whole = 0
        gen = policy.generate([prompt], seed=[accelerator.process_index], temperature=1.0, top_p=1.0,
                              max_new_tokens=12)[0]
        gen_whole = watch.most_whole  # every layer stays whole through the decode loop
    second_metrics = watch.step(updater, batch)
    second = whole(policy, updater)
    out = {"first": first, "second": second, "metrics": [first_metrics, second_metrics], "gen": gen.token_ids,
           "held": held, "local_numel": local, "units": len(distributed._units(policy.model)) if accelerator.num_processes > 1 else 0,
           "generation_whole_layers": gen_whole}
    if resume:  # every process reads the first process's whole state, as the trainer's resume does
        state = [first if accelerator.is_main_process else None]
        torch.distributed.broadcast_object_list(state, src=0) if accelerator.num_processes > 1 else None
        policy2, updater2 = build(checkpoint, accelerator, state[0])
        updater2.update(batch)
        out["resumed"] = whole(policy2, updater2)
    torch.save(out, f"{out_dir}/rank{accelerator.process_index}.pt")
    distributed.leave()


if __name__ == "__main__":
    # an abort in a collective (SIGABRT from gloo) then prints every thread's Python stack
    faulthandler.enable()
    main(sys.argv[1], sys.argv[2], resume="resume" in sys.argv[3:])
