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
B x N x K downstream episodes in one rollout. Over several processes each plays a block of
the B sources with everything that follows from them (`evolving_rl.distributed`), and the
first process alone writes the skill bank.

Engine failures are nobody's signal: a source episode the engine failed gets no extraction
and no downstream play, and a skill whose downstream episodes all failed in the engine was
never measured, so it is left out of the extractor's group instead of being scored 0.
"""

from __future__ import annotations

import copy
import dataclasses
import random
import statistics
import time
from collections import Counter
from pathlib import Path

from evolving_rl import distributed
from evolving_rl.algorithms import register
from evolving_rl.algorithms.base import StepParts
from evolving_rl.common import episode_samples
from evolving_rl.extraction import Candidate, extract_skills
from evolving_rl.policy.base import row_seeds
from evolving_rl.rollout import Job
from evolving_rl.types import Sample


@register("evolving")
class EvolvingStep:
    def __init__(self, cfg, policy, rollout, cursor, index, *, library_path: str | Path | None = None):
        self.cfg, self.policy, self.rollout, self.cursor, self.index = cfg, policy, rollout, cursor, index
        # Where `library.persist_top` keeps the best skills; opened on first use, so a run that
        # persists nothing leaves no file behind.
        self.library_path = Path(library_path) if library_path else None
        self.library = None
        self._embedder = None
        self.rng = random.Random(cfg.seed)

    @classmethod
    def roles(cls, cfg) -> dict:
        return {"solver": cfg.evolving.solver, "extractor": cfg.evolving.extractor}

    @classmethod
    def check(cls, cfg, train_tasks) -> None:
        """K downstream tasks must exist for every source, else a step silently plays fewer
        (or, through a wrapped pool, far more) episodes than the config says."""
        ev = cfg.evolving
        n = len(train_tasks)
        if ev.exclusion == "source":
            eligible = n - 1
        elif ev.exclusion == "identical_description":  # the same key retrieval excludes by
            from evolving_rl.retrieval import _desc_key

            eligible = n - max(Counter(_desc_key(t.description) for t in train_tasks).values(), default=0)
        else:
            eligible = n
        if ev.num_downstream > eligible:
            raise ValueError(
                f"evolving.num_downstream={ev.num_downstream}: the training pool ({n} tasks, exclusion "
                f"{ev.exclusion!r}) offers at most {max(eligible, 0)} downstream tasks per source; lower "
                f"evolving.num_downstream or use a larger env.games_dir")

    @classmethod
    def setup(cls, parts: StepParts) -> EvolvingStep:
        from evolving_rl.retrieval import build_index, make_embedder

        cfg = parts.cfg
        r = cfg.retrieval
        t0 = time.perf_counter()
        # The pool is the training split only: evaluation tasks can never be retrieved.
        index = build_index(parts.train_tasks, make_embedder(r.embedder), cache_dir=r.cache_dir, backend=r.backend)
        lib = (cfg.library.path or str(Path(parts.run_dir) / "skills.sqlite")) if cfg.library.persist_top else None
        step = cls(cfg, parts.policy, parts.rollout, parts.cursor, index, library_path=lib)
        step.index_build_s = time.perf_counter() - t0
        return step

    def collect(self, step: int) -> tuple[list[Sample], dict]:
        cfg = self.cfg
        ev = cfg.evolving
        N, K, R = ev.num_skills, ev.num_downstream, ev.downstream_repeats
        timing: dict[str, float] = {}
        clock = time.perf_counter()

        def lap(name: str) -> None:
            nonlocal clock
            now = time.perf_counter()
            timing[f"time/{name}_s"] = now - clock
            clock = now

        # (1) source episodes, no skill, played as experience is (Task.as_experience). In a
        # multi-process run every process draws the same B sources and plays its block of
        # them, with everything downstream of them, so each group is whole on one process; a
        # source is named by its index b among the drawn ones, and every episode's seed comes
        # from its place in the whole step.
        rank, world = distributed.process()
        drawn = self.cursor.take(ev.sources_per_step)
        mine = list(distributed.block(len(drawn), rank, world))
        seeds = row_seeds(cfg.seed * 7919 + step, len(drawn))
        played = self.rollout.run([Job(drawn[b].as_experience()) for b in mine], cfg.rollout.solver,
                                  seed=[seeds[b] for b in mine])
        src_eps = dict(zip(mine, played))
        # A source the engine failed has no trajectory worth extracting from: it leaves the step.
        kept = [b for b in mine if not src_eps[b].failed]
        lap("source")

        # (2) N candidate skills per source
        cands: list[Candidate] = []
        if ev.skill_mode != "none" and kept:
            seeds = row_seeds(cfg.seed * 104_729 + step, len(drawn) * N)
            cands = extract_skills(self.policy, [src_eps[b] for b in kept], N, cfg.rollout.extractor,
                                   min_chars=ev.min_skill_chars, max_chars=ev.max_skill_chars,
                                   seed=[seeds[b * N + n] for b in kept for n in range(N)],
                                   max_trajectory_chars=ev.max_trajectory_chars)
            for c in cands:
                c.source = kept[c.source]
        lap("extract")

        # (3) K downstream tasks per source from the training pool
        downstream = {b: self.index.top_k(drawn[b], K, exclusion=ev.exclusion) for b in kept}
        lap("retrieve")

        # (4) N x K (x repeats) downstream episodes, all in one rollout
        cards = self._cards(cands, kept)
        seeds = row_seeds(cfg.seed * 15_485_863 + step, len(drawn) * N * K * R)
        jobs = []
        for b in kept:
            for n in range(N):
                for k, (task, _sim) in enumerate(downstream[b]):
                    for r in range(R):
                        g = ((b * N + n) * K + k) * R + r  # the episode's place in the whole step
                        jobs.append(Job(task, cards.get((b, n)), {"b": b, "n": n, "k": k, "r": r, "g": g}))
        down_eps = self.rollout.run(jobs, cfg.rollout.solver, seed=[seeds[j.tag["g"]] for j in jobs]) if jobs else []
        lap("downstream")

        # Rewards and groups
        wins: dict[tuple[int, int], list[float]] = {}
        for job, ep in zip(jobs, down_eps):
            if not ep.failed:
                wins.setdefault((job.tag["b"], job.tag["n"]), []).append(float(ep.won))
        samples: list[Sample] = []
        if ev.solver.train:
            for job, ep in zip(jobs, down_eps):
                if not ep.failed:
                    g = f"d{step}/{job.tag['b']}/{job.tag['k']}/{job.tag['r']}"
                    samples += episode_samples(ep, "solver", g, float(ep.won), f"d{step}/e{job.tag['g']}")
            if ev.train_on_source:  # a batch-level group: each source task is played once
                for b in kept:
                    samples += episode_samples(src_eps[b], "solver", f"src{step}", float(src_eps[b].won), f"src{step}/e{b}")
        for c in cands:
            got = wins.get((c.source, c.index), [])
            if c.valid:
                c.measured = bool(got)
                c.reward = sum(got) / len(got) if got else 0.0
            else:
                c.reward = ev.format_penalty
            if ev.extractor.train and ev.skill_mode == "extracted" and c.measured:
                samples.append(Sample(c.segment(), "extractor", f"x{step}/{c.source}", c.reward,
                                      episode=f"x{step}/{c.source}/{c.index}"))
        lap("rewards")
        if world > 1:
            # Every process gets the whole step: the updater takes the same batch everywhere, and the
            # metrics count every episode. What the metrics and the skill bank need is small (no
            # token ids beyond the samples'), so episodes and candidates travel light.
            parts = distributed.gather((samples, {b: _light(e) for b, e in src_eps.items()}, [_light_candidate(c) for c in cands],
                                        downstream, [_light(e) for e in down_eps]))
            samples = [s for p in parts for s in p[0]]
            src_eps = {b: e for p in parts for b, e in p[1].items()}
            cands = [c for p in parts for c in p[2]]
            downstream = {b: d for p in parts for b, d in p[3].items()}
            down_eps = [e for p in parts for e in p[4]]
        # One writer for the skill bank: the first process (every process holds the same cands).
        persisted = self._persist(step, drawn, src_eps, cands) if rank == 0 else 0
        m = self._metrics([src_eps[b] for b in sorted(src_eps)], cands, list(downstream.values()), down_eps, timing)
        m["extractor/skills_persisted"] = persisted
        return samples, m

    def _persist(self, step: int, drawn, src_eps: dict, cands: list[Candidate]) -> int:
        """Keep each source's best-scoring valid skills in the run's library, so a checkpoint
        ships with a skill bank (library.persist_top per source; skills that helped only).

        All candidates of one source share its task's embedding, so the library would merge
        them and keep whichever came last. The bank keeps the skill with the higher measured
        utility (extractor reward) instead: a weaker near-duplicate is not stored, a stronger
        one retires the weaker record (kept for audit) and takes its place.
        """
        lib_cfg = self.cfg.library
        if not lib_cfg.persist_top or not cands or self.library_path is None:
            return 0
        if self.library is None:
            from evolving_rl.retrieval import make_embedder
            from evolving_rl.skills.library import SkillLibrary

            self.library = SkillLibrary(self.library_path, lib_cfg.dedup_threshold)
            self._embedder = make_embedder(self.cfg.retrieval.embedder)
        kept = 0
        for b in sorted({c.source for c in cands}):
            src = drawn[b]
            best = sorted((c for c in cands if c.source == b and c.valid and c.measured and c.reward > 0),
                          key=lambda c: -c.reward)
            vec = None
            for c in best[: lib_cfg.persist_top]:
                vec = self._embedder.embed([src.description])[0] if vec is None else vec
                near = self.library.retrieve(vec, 1)
                if near and near[0].similarity >= lib_cfg.dedup_threshold:
                    if utility(near[0]) >= c.reward:
                        continue
                    self.library.retire(near[0].id, f"superseded at step {step} by a skill with higher measured "
                                                    f"utility ({c.reward:.3f} > {utility(near[0]):.3f})")
                self.library.add(c.skill, c.card, vec, {
                    "source_task_id": src.id, "model": self.cfg.model.path, "step": step,
                    "success": bool(src_eps[b].won), "extra": {"extractor_reward": c.reward}}, merge=False)
                kept += 1
        return kept

    def _cards(self, cands: list[Candidate], kept: list[int]) -> dict[tuple[int, int], str | None]:
        """(source b, skill n) -> the card their downstream episodes see; missing or None plays
        without a skill.

        An invalid candidate's episodes play without a skill: the solver group keeps its size
        and the extractor is scored 0 regardless.
        """
        mode = self.cfg.evolving.skill_mode
        if mode == "random":  # a valid skill from another source of this step (an unrelated task)
            # Every process draws every source's cards in the same order from the valid skills
            # of all processes, so self.rng stays in step across them and with one process.
            parts = distributed.gather((kept, [(c.source, c.card) for c in cands if c.valid]))
            valid = [x for p in parts for x in p[1]]
            out = {}
            for b in (b for p in parts for b in p[0]):
                for n in range(self.cfg.evolving.num_skills):
                    others = [card for src, card in valid if src != b]
                    out[b, n] = self.rng.choice(others) if others else None
            return out
        if mode == "none":
            return {}
        return {(c.source, c.index): c.card if c.valid else None for c in cands}

    def _metrics(self, src_eps, cands, downstream, down_eps, timing) -> dict:
        ok_src = [e for e in src_eps if not e.failed]
        ok_down = [e for e in down_eps if not e.failed]
        with_skill = [e for e in ok_down if e.skill_card]
        scored = [c for c in cands if c.measured]
        rewards = [c.reward for c in scored]
        reasons = Counter(r.split(":")[0] for c in cands for r in c.reasons)
        sims = [s for d in downstream for _, s in d]
        m = {
            "rollout/episodes": len(src_eps) + len(down_eps),
            "rollout/engine_failures": len(src_eps) + len(down_eps) - len(ok_src) - len(ok_down),
            "rollout/mean_steps": sum(e.steps for e in ok_down) / max(1, len(ok_down)),
            "rollout/retrieval_similarity_mean": statistics.fmean(sims) if sims else 0.0,
            "solver/source_success": sum(e.won for e in ok_src) / max(1, len(ok_src)),
            "solver/success": sum(e.won for e in ok_down) / max(1, len(ok_down)),
            "solver/success_with_skill": sum(e.won for e in with_skill) / max(1, len(with_skill)),
            "extractor/samples": len(cands),
            "extractor/unmeasured": len(cands) - len(scored),
            "extractor/parse_rate": sum(c.skill is not None for c in cands) / max(1, len(cands)),
            "extractor/valid_skill_rate": sum(c.valid for c in cands) / max(1, len(cands)),
            "extractor/reward_mean": statistics.fmean(rewards) if rewards else 0.0,
            "extractor/reward_std": statistics.pstdev(rewards) if len(rewards) > 1 else 0.0,
            "extractor/skill_chars_mean": statistics.fmean([len(c.card) for c in cands if c.card]) if any(c.card for c in cands) else 0.0,
            **timing,
        }
        for reason, count in reasons.items():
            m[f"extractor/audit_fail_{reason}"] = count / max(1, len(cands))
        return m

    def state_dict(self) -> dict:
        return {"rng": self.rng.getstate()}

    def load_state_dict(self, state: dict) -> None:
        if "rng" in state:
            self.rng.setstate(state["rng"])

    def close(self) -> None:
        if self.library is not None:
            self.library.close()
            self.library = None


def _light(ep):
    """An episode without its token ids and turns: what the metrics and the skill bank read."""
    return dataclasses.replace(ep, turns=[], segments=[], info={}, final_observation="")


def _light_candidate(c: Candidate) -> Candidate:
    """A candidate without its generation and prompt ids (its sample already holds them)."""
    out = copy.copy(c)
    out.gen, out.prompt_ids = None, []
    return out


def utility(rec) -> float:
    """A stored skill's measured utility: the extractor reward it earned when it was persisted."""
    extra = rec.provenance.get("extra") if isinstance(rec.provenance, dict) else None
    value = extra.get("extractor_reward") if isinstance(extra, dict) else None
    return float(value) if isinstance(value, (int, float)) else float("-inf")
