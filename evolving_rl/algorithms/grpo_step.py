"""Plain GRPO for agents (the baseline): G episodes per training task, reward = success,
group = the G episodes of one task."""

from __future__ import annotations

from evolving_rl.algorithms import register
from evolving_rl.algorithms.base import StepParts
from evolving_rl.common import episode_samples
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
        tasks = self.cursor.take(cfg.grpo.prompts_per_step)
        jobs = [Job(task, None, {"group": f"s{step}/{task.id}"}) for task in tasks for _ in range(cfg.grpo.group_size)]
        episodes = self.rollout.run(jobs, cfg.rollout.solver, seed=cfg.seed * 7919 + step)
        samples = []
        for i, (job, ep) in enumerate(zip(jobs, episodes)):
            if not ep.failed:
                samples += episode_samples(ep, "solver", job.tag["group"], float(ep.won) * cfg.grpo.reward_scale, f"s{step}/e{i}")
        ok = [ep for ep in episodes if not ep.failed]
        return samples, {
            "rollout/episodes": len(episodes),
            "rollout/engine_failures": len(episodes) - len(ok),
            "rollout/mean_steps": sum(ep.steps for ep in ok) / max(1, len(ok)),
            "solver/success": sum(ep.won for ep in ok) / max(1, len(ok)),
        }

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass
