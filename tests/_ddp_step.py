"""Launched by tests/test_multiprocess.py as `torchrun --nproc_per_node N`: one whole training
step of the Trainer on a config file, with SGD in place of AdamW (Adam's first step is
~lr * sign(g), where float noise on a near-zero g flips a step; momentum only so the
optimizer has a state to checkpoint: its first step is plain SGD's), sharded over the processes
as the trainer shards AdamW (ZeRO stage 1), checkpointed at the end of the step. Each process
saves the episodes it played in the step and its weights after it to OUT/rank<k>.pt. With N=1
this is the single-process run."""

from __future__ import annotations

import sys

import torch

from evolving_rl import distributed
from evolving_rl.config import load_config
from evolving_rl.train import Trainer


def main(out_dir: str, config: str) -> None:
    trainer = Trainer(load_config(config, []))
    played, recording = [], [False]
    run, collect = trainer.rollout.run, trainer.algorithm.collect

    def run_and_record(jobs, sampling, seed=None, progress=None):
        episodes = run(jobs, sampling, seed=seed, progress=progress)
        if recording[0]:  # the step's episodes, not the final evaluation's
            played.extend(episodes)
        return episodes

    def collect_and_record(step):
        recording[0] = True
        try:
            return collect(step)
        finally:
            recording[0] = False

    trainer.rollout.run, trainer.algorithm.collect = run_and_record, collect_and_record
    sharded = type(trainer.updater.optimizer).__name__ == "ZeroRedundancyOptimizer"
    if sharded:  # the trainer's ZeRO stage 1, stepping with SGD
        trainer.updater.optimizer = type(trainer.updater.optimizer)(trainer.updater.params, optimizer_class=torch.optim.SGD,
                                                                    lr=1.0, momentum=0.9)
    else:
        trainer.updater.optimizer = torch.optim.SGD(trainer.updater.params, lr=1.0, momentum=0.9)
    try:
        trainer.fit()
    finally:
        trainer.close()
    episodes = [{"task": e.task.id, "card": e.skill_card, "won": e.won, "failed": e.failed,
                 "actions": [t.action for t in e.turns], "ids": [s.token_ids for s in e.segments],
                 "logprobs": [s.logprobs for s in e.segments]} for e in played]
    weights = {k: v.detach().clone() for k, v in trainer.policy.model.state_dict().items()}
    torch.save({"episodes": episodes, "weights": weights, "sharded_optimizer": sharded}, f"{out_dir}/rank{trainer.accelerator.process_index}.pt")
    distributed.leave()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
