"""Evolving-RL's training step (SPEC, "One training step"), batched across everything.

Per source task: (1) a source episode without skill; (2) N candidate skills written by the
extractor from that trajectory, the task and the true outcome; (3) K similar tasks retrieved
from the training pool (the source excluded by default); (4) N x K downstream episodes, each
skill card in the solver's system prompt. Rewards: an extractor sample earns its skill's
mean downstream success (0, or `format_penalty`, when it does not parse or fails the audit),
grouped over the N candidates of one source; each downstream episode earns its success,
grouped with the N episodes of the *same* downstream task under the N skills, which teaches
the solver to exploit good skills and ignore bad ones. One optimizer step over all samples.

All B source episodes run in one rollout, all B x N extractions in one generate call, and all
B x N x K downstream episodes in one rollout.
"""

from __future__ import annotations

import random
import statistics
import time
from collections import Counter

from evolving_rl.common import episode_samples
from evolving_rl.extraction import Candidate, extract_skills
from evolving_rl.rollout import Job
from evolving_rl.types import Sample


class EvolvingStep:
    def __init__(self, trainer):
        from evolving_rl.retrieval import build_index, make_embedder

        self.t = trainer
        cfg = trainer.cfg
        t0 = time.perf_counter()
        # The pool is the training split only: evaluation tasks can never be retrieved.
        r = cfg.retrieval
        self.index = build_index(trainer.train_tasks, make_embedder(r.embedder), cache_dir=r.cache_dir, backend=r.backend)
        self.index_build_s = time.perf_counter() - t0
        self.rng = random.Random(cfg.seed)

    def collect(self, step: int) -> tuple[list[Sample], dict]:
        t, cfg = self.t, self.t.cfg
        ev = cfg.evolving
        timing: dict[str, float] = {}
        clock = time.perf_counter()

        def lap(name: str) -> None:
            nonlocal clock
            now = time.perf_counter()
            timing[f"time_{name}_s"] = now - clock
            clock = now

        # (1) source episodes, no skill
        sources = t.cursor.take(ev.sources_per_step)
        src_eps = t.rollout.run([Job(s) for s in sources], cfg.rollout.solver, seed=cfg.seed * 7919 + step)
        lap("source")

        # (2) N candidate skills per source
        cands: list[Candidate] = []
        if ev.skill_mode != "none":
            cands = extract_skills(t.policy, src_eps, ev.num_skills, cfg.rollout.extractor, min_chars=ev.min_skill_chars,
                                   max_chars=ev.max_skill_chars, seed=cfg.seed * 104_729 + step,
                                   max_trajectory_chars=ev.max_trajectory_chars)
        lap("extract")

        # (3) K downstream tasks per source from the training pool
        downstream = [self.index.top_k(s, ev.num_downstream, exclusion=ev.exclusion) for s in sources]
        lap("retrieve")

        # (4) N x K (x repeats) downstream episodes, all in one rollout
        jobs = []
        for b, src in enumerate(sources):
            for n in range(ev.num_skills):
                card = self._card_for(cands, b, n, len(sources))
                for k, (task, _sim) in enumerate(downstream[b]):
                    for r in range(ev.downstream_repeats):
                        jobs.append(Job(task, card, {"b": b, "n": n, "k": k, "r": r}))
        down_eps = t.rollout.run(jobs, cfg.rollout.solver, seed=cfg.seed * 15_485_863 + step)
        lap("downstream")

        # Rewards and groups
        wins: dict[tuple[int, int], list[float]] = {}
        for job, ep in zip(jobs, down_eps):
            if not ep.failed:
                wins.setdefault((job.tag["b"], job.tag["n"]), []).append(float(ep.won))
        samples: list[Sample] = []
        if ev.solver.train:
            for i, (job, ep) in enumerate(zip(jobs, down_eps)):
                if not ep.failed:
                    g = f"d{step}/{job.tag['b']}/{job.tag['k']}/{job.tag['r']}"
                    samples += episode_samples(ep, "solver", g, float(ep.won), f"d{step}/e{i}")
            if ev.train_on_source:  # a batch-level group: each source task is played once
                for i, ep in enumerate(src_eps):
                    if not ep.failed:
                        samples += episode_samples(ep, "solver", f"src{step}", float(ep.won), f"src{step}/e{i}")
        for c in cands:
            got = wins.get((c.source, c.index), [])
            c.reward = (sum(got) / len(got) if got else 0.0) if c.valid else ev.format_penalty
            if ev.extractor.train and ev.skill_mode == "extracted":
                samples.append(Sample(c.segment(), "extractor", f"x{step}/{c.source}", c.reward,
                                      episode=f"x{step}/{c.source}/{c.index}"))
        lap("rewards")
        persisted = self._persist(step, sources, src_eps, cands)
        m = self._metrics(src_eps, cands, downstream, down_eps, timing)
        m["skills_persisted"] = persisted
        return samples, m

    def _persist(self, step: int, sources, src_eps, cands: list[Candidate]) -> int:
        """Keep each source's best-scoring valid skills in the run's library, so a checkpoint
        ships with a skill bank (library.persist_top per source; skills that helped only)."""
        lib_cfg = self.t.cfg.library
        if not lib_cfg.persist_top or not cands:
            return 0
        if getattr(self, "library", None) is None:
            from evolving_rl.retrieval import make_embedder
            from evolving_rl.skills.library import SkillLibrary

            path = lib_cfg.path or str(self.t.run_dir / "skills.sqlite")
            self.library = SkillLibrary(path, lib_cfg.dedup_threshold)
            self.embedder = make_embedder(self.t.cfg.retrieval.embedder)
        kept = 0
        for b, src in enumerate(sources):
            best = sorted((c for c in cands if c.source == b and c.valid and c.reward > 0), key=lambda c: -c.reward)
            for c in best[: lib_cfg.persist_top]:
                self.library.add(c.skill, c.card, self.embedder.embed([src.description])[0], {
                    "source_task_id": src.id, "model": self.t.cfg.model.path, "step": step,
                    "success": bool(src_eps[b].won), "extra": {"extractor_reward": c.reward}})
                kept += 1
        return kept

    def _card_for(self, cands: list[Candidate], b: int, n: int, n_sources: int) -> str | None:
        """The card downstream episodes of (source b, skill n) see; None plays without a skill.

        An invalid candidate's episodes play without a skill: the solver group keeps its size
        and the extractor is scored 0 regardless.
        """
        mode = self.t.cfg.evolving.skill_mode
        if mode == "none" or not cands:
            return None
        if mode == "random":  # a valid skill from another source of this step (an unrelated task)
            others = [c for c in cands if c.source != b and c.valid]
            return self.rng.choice(others).card if others else None
        c = cands[b * self.t.cfg.evolving.num_skills + n]
        return c.card if c.valid else None

    def _metrics(self, src_eps, cands, downstream, down_eps, timing) -> dict:
        ok_src = [e for e in src_eps if not e.failed]
        ok_down = [e for e in down_eps if not e.failed]
        with_skill = [e for e in ok_down if e.skill_card]
        rewards = [c.reward for c in cands]
        reasons = Counter(r.split(":")[0] for c in cands for r in c.reasons)
        sims = [s for d in downstream for _, s in d]
        m = {
            "episodes": len(src_eps) + len(down_eps),
            "engine_failures": len(src_eps) + len(down_eps) - len(ok_src) - len(ok_down),
            "source_success": sum(e.won for e in ok_src) / max(1, len(ok_src)),
            "downstream_success": sum(e.won for e in ok_down) / max(1, len(ok_down)),
            "downstream_success_with_skill": sum(e.won for e in with_skill) / max(1, len(with_skill)),
            "reward_mean": sum(e.won for e in ok_down) / max(1, len(ok_down)),
            "extractor_samples": len(cands),
            "parse_rate": sum(c.skill is not None for c in cands) / max(1, len(cands)),
            "valid_skill_rate": sum(c.valid for c in cands) / max(1, len(cands)),
            "extractor_reward_mean": statistics.fmean(rewards) if rewards else 0.0,
            "extractor_reward_std": statistics.pstdev(rewards) if len(rewards) > 1 else 0.0,
            "skill_chars_mean": statistics.fmean([len(c.card) for c in cands if c.card]) if any(c.card for c in cands) else 0.0,
            "retrieval_similarity_mean": statistics.fmean(sims) if sims else 0.0,
            "mean_steps": sum(e.steps for e in ok_down) / max(1, len(ok_down)),
            **timing,
        }
        for reason, count in reasons.items():
            m[f"audit_fail_{reason}"] = count / max(1, len(cands))
        return m

    def state_dict(self) -> dict:
        return {"rng": self.rng.getstate()}

    def load_state_dict(self, state: dict) -> None:
        if "rng" in state:
            self.rng.setstate(state["rng"])
