"""Plain GRPO for agents (the baseline): G episodes per training task, reward = success,
group = the G episodes of one task."""

from __future__ import annotations

from evolving_rl import distributed
from evolving_rl.algorithms import register
from evolving_rl.algorithms.base import StepParts
from evolving_rl.common import episode_samples
from evolving_rl.policy.base import row_seeds
from evolving_rl.rollout import Job
from evolving_rl.types import Sample


@register("grpo")
class GRPOStep:
    def __init__(self, cfg, rollout, cursor):
        self.cfg, self.rollout, self.cursor = cfg, rollout, cursor

    @classmethod
    def roles(cls, cfg) -> dict:
        from evolving_rl.config import RoleConfig

        return {"solver": RoleConfig(kl_coef=cfg.grpo.kl_coef, entropy_coef=cfg.grpo.entropy_coef)}

    @classmethod
    def check(cls, cfg, train_tasks) -> None:
        pass

    @classmethod
    def setup(cls, parts: StepParts) -> GRPOStep:
        return cls(parts.cfg, parts.rollout, parts.cursor)

    def collect(self, step: int) -> tuple[list[Sample], dict]:
        cfg = self.cfg
        G = cfg.grpo.group_size
        # Every process draws the same tasks and plays the G episodes of its block of them, so a
        # group is whole on one process; an episode's seed is its place in the whole step.
        rank, world = distributed.process()
        tasks = self.cursor.take(cfg.grpo.prompts_per_step)
        seeds = row_seeds(cfg.seed * 7919 + step, len(tasks) * G)
        jobs = [Job(tasks[t], None, {"group": f"s{step}/{tasks[t].id}", "i": t * G + g})
                for t in distributed.block(len(tasks), rank, world) for g in range(G)]
        episodes = self.rollout.run(jobs, cfg.rollout.solver, seed=[seeds[j.tag["i"]] for j in jobs])
        samples = []
        for job, ep in zip(jobs, episodes):
            if not ep.failed:
                samples += episode_samples(ep, "solver", job.tag["group"], float(ep.won) * cfg.grpo.reward_scale,
                                           f"s{step}/e{job.tag['i']}")
        # The whole step on every process: the updater shards the update itself.
        parts = distributed.gather((samples, [(ep.failed, ep.won, ep.steps) for ep in episodes]))
        samples = [s for p in parts for s in p[0]]
        outcomes = [o for p in parts for o in p[1]]
        ok = [(won, steps) for failed, won, steps in outcomes if not failed]
        return samples, {
            "rollout/episodes": len(outcomes),
            "rollout/engine_failures": len(outcomes) - len(ok),
            "rollout/mean_steps": sum(steps for _, steps in ok) / max(1, len(ok)),
            "solver/success": sum(won for won, _ in ok) / max(1, len(ok)),
        }

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass
