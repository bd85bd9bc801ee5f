"""The RL trainer: rollout -> update -> periodic evaluation -> checkpoint, resumable.

One recipe serves every algorithm: `collect` turns a batch of training tasks into
Samples (GRPO: G episodes per task; Evolving-RL: the four stages), then one optimizer step.
A checkpoint holds model, optimizer, RNG states, step, data cursor and the metrics written
so far; it is written to a temporary directory and renamed, so a run killed at any moment
resumes from the last complete one with its curves continuous.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import time
from pathlib import Path

import numpy as np
import torch

from evolving_rl.config import RunConfig, save_config
from evolving_rl.envs.base import make_suite
from evolving_rl.envs.workers import EnvPool
from evolving_rl.common import TaskCursor, check_no_overlap, env_options, episode_samples, prompt_mismatch
from evolving_rl.evaluate import Evaluator, compare_table, format_table
from evolving_rl.rollout import Job, Rollout
from evolving_rl.types import Sample, Task


class Trainer:
    def __init__(self, cfg: RunConfig, resume: bool = False, console=None):
        from accelerate import Accelerator

        from evolving_rl.algorithms.grpo import GRPOUpdater
        from evolving_rl.policy.hf import HFPolicy

        self.cfg = cfg
        self.print = (lambda x: console.print(x, soft_wrap=True, highlight=False, markup=False)) if console is not None else print
        self.run_dir = Path(cfg.run_dir)
        self.ckpt_dir = self.run_dir / "checkpoints"
        self.metrics_path = self.run_dir / "metrics.jsonl"
        latest = self._latest_checkpoint() if resume else None
        if not resume and self.metrics_path.exists():
            raise FileExistsError(f"{self.run_dir} already holds a run: pass --resume to continue it, or choose another run_dir")
        self.run_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, self.run_dir / "config.yaml")

        self.suite = make_suite(cfg.env.name, env_options(cfg))
        self.train_tasks = self.suite.tasks("train")
        if not self.train_tasks:
            raise ValueError(f"env.games_dir {cfg.env.games_dir!r}: the train split is empty")
        self.eval_tasks = {s: self.suite.tasks(s) for s in cfg.eval.splits}
        check_no_overlap(self.train_tasks, self.eval_tasks, "training pool")

        torch.manual_seed(cfg.seed)
        self.accelerator = Accelerator(cpu=not torch.cuda.is_available())
        # LoRA resumes from the base weights plus the saved adapter (trainer.pt), not from the
        # merged model: fresh adapters on merged weights would not match the optimizer state.
        model_path = str(latest / "model") if latest and not cfg.model.lora.enabled else cfg.model.path
        self.policy = HFPolicy(cfg.model.model_copy(update={"path": model_path}), device=self.accelerator.device)
        if warn := prompt_mismatch(cfg, cfg.model.path):
            self.print(f"warning: {warn}")
        # The KL anchor is the *initial* policy, also after a resume.
        self.reference = HFPolicy(cfg.model, device=self.accelerator.device).reference() if latest else self.policy.reference()
        roles = self._roles()
        self.updater = GRPOUpdater(self.policy, self.reference, cfg.grpo, roles, accelerator=self.accelerator)
        self.pool = EnvPool(cfg.env.name, env_options(cfg), cfg.env.num_workers, cfg.env.step_timeout_s)
        self.rollout = Rollout(self.policy, self.pool, cfg.rollout, cfg.env.max_steps)
        self.step = 0
        self.initial = None
        self.cursor = TaskCursor(self.train_tasks, cfg.seed)
        self.algorithm = self._algorithm()
        self.evaluator = Evaluator(cfg, self.suite, self.rollout, self.policy, self.run_dir, self.print)
        if latest:
            self._load(latest)
        self.tb = self._tensorboard()
        self.wandb = self._wandb()

    # -- setup helpers ---------------------------------------------------------------------

    def _roles(self):
        if self.cfg.algorithm == "evolving":
            return {"solver": self.cfg.evolving.solver, "extractor": self.cfg.evolving.extractor}
        from evolving_rl.config import RoleConfig

        return {"solver": RoleConfig(kl_coef=self.cfg.grpo.kl_coef, entropy_coef=self.cfg.grpo.entropy_coef)}

    def _algorithm(self):
        if self.cfg.algorithm == "evolving":
            from evolving_rl.algorithms.evolving import EvolvingStep

            return EvolvingStep(self)
        return GRPOStep(self)

    def _tensorboard(self):
        if not self.cfg.train.tensorboard:
            return None
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            return None
        return SummaryWriter(str(self.run_dir / "tb"))

    def _wandb(self):
        if not self.cfg.train.wandb:
            return None
        try:
            import wandb
        except ImportError:
            raise ValueError("train.wandb: wandb is not installed; pip install 'evolving-rl[wandb]' or set train.wandb=false") from None
        return wandb.init(project="evolving-rl", name=self.run_dir.name, config=self.cfg.model_dump(mode="json"),
                          dir=str(self.run_dir), resume="allow")

    # -- logging ---------------------------------------------------------------------------

    def log(self, row: dict) -> None:
        row = {"step": self.step, "time": time.time(), **row}
        with self.metrics_path.open("a") as f:
            f.write(json.dumps(row) + "\n")
        if self.wandb is not None:
            kind = row.get("kind", "train")
            self.wandb.log({f"{kind}/{k}": v for k, v in row.items() if isinstance(v, (int, float))}, step=self.step)
        if self.tb is not None:
            kind = row.get("kind", "train")
            for k, v in row.items():
                if isinstance(v, (int, float)) and k not in ("step", "time"):
                    self.tb.add_scalar(f"{kind}/{k}", v, self.step)

    # -- the loop --------------------------------------------------------------------------

    def evaluate(self, tag: str) -> list:
        """Periodic evaluations play each task once; the final one uses eval.repeats."""
        final = tag == "final"
        cap = self.cfg.eval.max_tasks if final else (self.cfg.train.eval_max_tasks or self.cfg.eval.max_tasks)
        results = self.evaluator.run(tag, self.step, repeats=None if final else 1, cap=cap)
        for r in results:
            self.log({"kind": "eval", "tag": tag, "split": r.split, "protocol": r.protocol,
                      "success": r.overall.success, "n": r.overall.n})
        return results

    def fit(self) -> list:
        cfg = self.cfg
        if self.step == 0 and cfg.train.eval_initial:
            self.initial = self.evaluate("initial")
            self.print(format_table(self.initial, "Before RL (greedy)"))
        while self.step < cfg.train.steps:
            t0 = time.perf_counter()
            samples, info = self.algorithm.collect(self.step)
            t1 = time.perf_counter()
            stats = self.updater.update(samples) if samples else {"skipped": 1}
            info["time_update_s"] = time.perf_counter() - t1
            info["time_collect_s"] = t1 - t0
            self.step += 1
            self.log({"kind": "train", **info, **{k: v for k, v in stats.items() if isinstance(v, (int, float))}})
            self.print(f"step {self.step}/{cfg.train.steps}  reward {info.get('reward_mean', 0):.3f}  "
                       f"loss {stats.get('loss', float('nan')):.4f}  {time.perf_counter() - t0:.1f}s")
            if cfg.train.eval_every and self.step % cfg.train.eval_every == 0 and self.step < cfg.train.steps:
                self.evaluate(f"step{self.step}")
            if self.step % cfg.train.save_every == 0 or self.step == cfg.train.steps:
                self.save()
        final = self.evaluate("final")
        self.print(format_table(final, f"After {self.step} RL steps (greedy)"))
        if getattr(self, "initial", None):
            self.print(compare_table(self.initial, final, f"Success before vs after {self.step} {cfg.algorithm} steps"))
        return final

    def close(self) -> None:
        self.pool.close()
        if self.wandb is not None:
            self.wandb.finish()
        if self.tb is not None:
            self.tb.close()

    # -- checkpoints -----------------------------------------------------------------------

    def _latest_checkpoint(self) -> Path | None:
        pointer = self.ckpt_dir / "latest"
        if not pointer.exists():
            return None
        path = self.ckpt_dir / pointer.read_text().strip()
        return path if (path / "state.json").exists() else None

    def save(self) -> Path:
        name = f"step_{self.step:06d}"
        final = self.ckpt_dir / name
        tmp = self.ckpt_dir / (name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        self.policy.save(tmp / "model")
        torch.save(
            {
                "optimizer": self.updater.optimizer.state_dict(),
                "rng": {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()},
                "algorithm": self.algorithm.state_dict(),
                "adapter": self._adapter_state(),
            },
            tmp / "trainer.pt",
        )
        (tmp / "state.json").write_text(json.dumps({"step": self.step, "cursor": self.cursor.state()}))
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        pointer_tmp = self.ckpt_dir / "latest.tmp"
        pointer_tmp.write_text(name)
        os.replace(pointer_tmp, self.ckpt_dir / "latest")
        done = sorted(p for p in self.ckpt_dir.glob("step_*") if p.is_dir() and p.suffix != ".tmp")
        for old in done[:-2]:  # keep the last two
            shutil.rmtree(old, ignore_errors=True)
        return final

    def _adapter_state(self) -> dict | None:
        if not self.cfg.model.lora.enabled:
            return None
        from peft import get_peft_model_state_dict

        return {k: v.detach().clone() for k, v in get_peft_model_state_dict(self.policy.model).items()}

    def _load(self, path: Path) -> None:
        state = json.loads((path / "state.json").read_text())
        self.step = state["step"]
        self.cursor = TaskCursor(self.train_tasks, self.cfg.seed, **state["cursor"])
        blob = torch.load(path / "trainer.pt", weights_only=False)
        if blob.get("adapter") is not None:
            from peft import set_peft_model_state_dict

            set_peft_model_state_dict(self.policy.model, blob["adapter"])
        self.updater.optimizer.load_state_dict(blob["optimizer"])
        random.setstate(blob["rng"]["python"])
        np.random.set_state(blob["rng"]["numpy"])
        torch.set_rng_state(blob["rng"]["torch"])
        self.algorithm.load_state_dict(blob.get("algorithm", {}))
        # Drop metrics written after this checkpoint so curves continue without a seam.
        if self.metrics_path.exists():
            rows = [ln for ln in self.metrics_path.read_text().splitlines() if ln.strip()]
            keep = [ln for ln in rows if json.loads(ln).get("step", 0) <= self.step]
            self.metrics_path.write_text("".join(r + "\n" for r in keep))
        self.print(f"resumed from {path} at step {self.step}")


class GRPOStep:
    """Plain GRPO for agents: G episodes per training task, reward = success, group = task."""

    def __init__(self, trainer: Trainer):
        self.t = trainer

    def collect(self, step: int) -> tuple[list[Sample], dict]:
        cfg = self.t.cfg
        tasks = self.t.cursor.take(cfg.grpo.prompts_per_step)
        jobs = [Job(task, None, {"group": f"s{step}/{task.id}"}) for task in tasks for _ in range(cfg.grpo.group_size)]
        episodes = self.t.rollout.run(jobs, cfg.rollout.solver, seed=cfg.seed * 7919 + step)
        samples = []
        for i, (job, ep) in enumerate(zip(jobs, episodes)):
            if not ep.failed:
                samples += episode_samples(ep, "solver", job.tag["group"], float(ep.won) * cfg.grpo.reward_scale, f"s{step}/e{i}")
        ok = [ep for ep in episodes if not ep.failed]
        return samples, {
            "episodes": len(episodes),
            "engine_failures": len(episodes) - len(ok),
            "reward_mean": sum(ep.won for ep in ok) / max(1, len(ok)),
            "mean_steps": sum(ep.steps for ep in ok) / max(1, len(ok)),
        }

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass
