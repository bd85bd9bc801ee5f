"""Launched by tests/test_multiprocess.py as `torchrun --nproc_per_node N` (accelerate's
Accelerator reads the launcher's environment): one
GRPOUpdater step on fixed samples from the tiny checkpoint; each process saves its weights
after the step to OUT/rank<k>.pt. With N=1 (or no launcher) this is the single-process run."""

from __future__ import annotations

import random
import sys

import torch
from accelerate import Accelerator

from evolving_rl import distributed
from evolving_rl.algorithms.grpo import GRPOUpdater
from evolving_rl.config import GRPOConfig, ModelConfig
from evolving_rl.policy.hf import HFPolicy
from evolving_rl.types import Sample, Segment


def samples(policy: HFPolicy, n: int = 12) -> list[Sample]:
    """Mixed lengths and rewards in every group, old log-probs a little off-policy, so the
    clip, the KL and the per-sample weights all take part."""
    rng = random.Random(0)
    vocab = policy.vocab_size
    out = []
    for i in range(n):
        prompt = [rng.randrange(2, vocab) for _ in range(rng.randint(8, 30))]
        gen = [rng.randrange(2, vocab) for _ in range(rng.randint(3, 20))]
        seg = Segment(token_ids=prompt + gen, logprobs=[0.0] * len(prompt) + [0.0] * len(gen),
                      loss_mask=[0] * len(prompt) + [1] * len(gen))
        out.append(Sample(segment=seg, role="solver", group=f"g{i // 4}", reward=float(rng.random() < 0.5) + 0.1 * i,
                          episode=f"e{i}"))
    with torch.no_grad():
        for s in out:
            lp, _ = policy.score([s.segment])[0]
            s.segment.logprobs = [v - 0.05 * m for v, m in zip(lp.tolist(), s.segment.loss_mask)]
    return out


def main(checkpoint: str, out_dir: str, skew: bool = False) -> None:
    accelerator = Accelerator(cpu=True)
    torch.manual_seed(0)
    policy = HFPolicy(ModelConfig(path=checkpoint))
    # Plain SGD: the step is the (clipped) gradient itself, so equal weights mean equal losses'
    # gradients. Adam's first step is ~lr * sign(g), where float noise on a near-zero g flips a step.
    sgd = torch.optim.SGD(list(policy.parameters()), lr=1.0)
    updater = GRPOUpdater(policy, policy.reference(), GRPOConfig(micro_batch_tokens=64), optimizer=sgd,
                          accelerator=accelerator)
    batch = samples(policy)
    if skew and accelerator.process_index == 1:
        batch[3].reward += 1.0  # this process played something else
    metrics = updater.update(batch)
    torch.save({"weights": {k: v.detach().clone() for k, v in policy.model.state_dict().items()}, "metrics": metrics},
               f"{out_dir}/rank{accelerator.process_index}.pt")
    distributed.leave()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], skew=sys.argv[3:] == ["skew"])
