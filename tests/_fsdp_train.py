"""Launched by tests/test_fsdp.py as `torchrun --nproc_per_node 2`: the Trainer under
train.sharding: fsdp on a config file (AdamW, as configured), `fit()` to train.steps, and,
with `resume`, resumed from the run's newest complete checkpoint first. Each process saves
its whole weights after the run (gathered) to OUT/rank<k>.pt, and what its updater was built
on: whether the model was sharded and the optimizer's class."""

from __future__ import annotations

import faulthandler
import sys

import torch

from evolving_rl import distributed
from evolving_rl.config import load_config
from evolving_rl.train import Trainer


def main(out_dir: str, config: str, resume: bool) -> None:
    trainer = Trainer(load_config(config, []), resume=resume)
    try:
        trainer.fit()
    finally:
        trainer.close()
    model = trainer.policy.model
    sharded = distributed.is_fully_sharded(model)
    weights = distributed.full_state(model, trainer.updater.optimizer)[0] if sharded else model.state_dict()
    torch.save({"weights": {k: v.detach().clone() for k, v in weights.items()}, "sharded": sharded,
                "optimizer": type(trainer.updater.optimizer).__name__, "step": trainer.step},
               f"{out_dir}/rank{trainer.accelerator.process_index}.pt")
    distributed.leave()


if __name__ == "__main__":
    # an abort in a collective (SIGABRT from gloo) then prints every thread's Python stack
    faulthandler.enable()
    main(sys.argv[1], sys.argv[2], resume="resume" in sys.argv[3:])
