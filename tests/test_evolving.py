"""Evolving-RL's step: which samples share a group, their rewards and advantages (a hand-built
step with scripted episodes and extractor outputs), and one real step on ALFWorld's engine."""

from __future__ import annotations

import dataclasses
import json

import pytest

from evolving_rl.algorithms.evolving import EvolvingStep
from evolving_rl.algorithms.grpo import group_advantages
from evolving_rl.config import load_config
from evolving_rl.policy.base import Generation
from evolving_rl.types import Episode, Segment, Task

VALID = json.dumps({
    "name": "find-then-place", "description": "Find the target object, take it, and place it where the task says.",
    "workflow": [{"goal": "find", "action": "go to likely receptacles", "strategy": "open closed ones", "done_when": "seen"}],
})


def _task(i: int, ttype: str = "pick_and_place_simple") -> Task:
    return Task(f"t{i}", "train", ttype, f"put a thing {i} in place.", f"g{i}")


class ScriptedPolicy:
    """Extractor outputs by position: even candidates write a valid skill, odd ones junk."""

    eos_token_id, pad_token_id = 0, 0

    def encode_chat(self, messages, add_generation_prompt=True):
        return [1, 2, 3]

    def generate(self, prompts, **kw):
        return [Generation([5, 6], [-0.1, -0.2], VALID if i % 2 == 0 else "no json here", "stop") for i in range(len(prompts))]


class ScriptedRollout:
    """Downstream success is scripted by (skill card present?, downstream task)."""

    def __init__(self, wins):
        self.wins = wins
        self.calls = []

    def run(self, jobs, sampling, seed=None, progress=None):
        self.calls.append(jobs)
        out = []
        for j in jobs:
            won = self.wins(j)
            ep = Episode(task=j.task, skill_card=j.skill_card, won=won, steps=3)
            ep.segments = [Segment([1, 2, 7], [0.0, 0.0, -0.5], [0, 0, 1]), Segment([1, 8], [0.0, -0.3], [0, 1])]
            out.append(ep)
        return out


class FixedIndex:
    def top_k(self, task, k, exclusion="source"):
        n = int(task.id[1:])
        return [(_task(100 + 10 * n + i), 0.9 - i / 10) for i in range(k)]


class Cursor:
    def __init__(self, tasks):
        self.tasks = tasks

    def take(self, n):
        return self.tasks[:n]


def _step(overrides, wins, run_dir=None):
    cfg = load_config(None, ["evolving.sources_per_step=2", "evolving.num_skills=2", "evolving.num_downstream=2", *overrides])
    rollout = ScriptedRollout(wins)
    lib = (run_dir / "skills.sqlite") if run_dir is not None and cfg.library.persist_top else None
    step = EvolvingStep(cfg, ScriptedPolicy(), rollout, Cursor([_task(0), _task(1)]), FixedIndex(), library_path=lib)
    return step, rollout


def test_groups_rewards_and_advantages_of_a_hand_built_step():
    # A skill helps on the first downstream task of each source (id ending in 0), never on the second.
    step, rollout = _step([], lambda j: j.skill_card is not None and j.task.id.endswith("0"))
    samples, m = step.collect(step=3)
    source_jobs, down_jobs = rollout.calls
    assert [j.skill_card for j in source_jobs] == [None, None]
    assert len(down_jobs) == 2 * 2 * 2  # B x N x K
    # candidate 0 of each source is valid -> its card; candidate 1 is junk -> played without a skill
    assert all((j.skill_card is not None) == (j.tag["n"] == 0) for j in down_jobs)

    ext = [s for s in samples if s.role == "extractor"]
    sol = [s for s in samples if s.role == "solver"]
    assert len(ext) == 4 and len(sol) == 8 * 2  # two segments (per-step turns) per downstream episode
    assert {s.group for s in ext} == {"x3/0", "x3/1"}  # one group per source: its N candidates
    assert sorted(s.reward for s in ext) == [0.0, 0.0, 0.5, 0.5]  # valid skill: 1 of its K=2 tasks won
    # solver groups: the N episodes on the same downstream task under the N skills
    groups = {}
    for s in sol:
        groups.setdefault(s.group, set()).add(s.episode)
    assert len(groups) == 4 and all(len(eps) == 2 for eps in groups.values())
    assert m["extractor/parse_rate"] == 0.5 and m["extractor/valid_skill_rate"] == 0.5
    assert m["extractor/audit_fail_unparseable"] == 0.5 and m["solver/success_with_skill"] == 0.5

    kept, stats = group_advantages(samples, eps=1e-6)
    adv = {(s.role, s.group, s.reward) for s in kept if s.advantage != 0}
    # extractor: rewards (0.5, 0) in each group -> advantages +1 / -1
    assert sorted({round(a.advantage, 4) for a in kept if a.role == "extractor"}) == [-1.0, 1.0]
    # solver groups on the first downstream task: (won with skill, lost without) -> +1/-1; second task: all lost -> 0
    first = [s for s in kept if s.role == "solver" and s.group.endswith("/0/0")]
    second = [s for s in kept if s.role == "solver" and s.group.endswith("/1/0")]
    assert sorted({round(s.advantage, 4) for s in first}) == [-1.0, 1.0]
    assert {s.advantage for s in second} == {0.0}
    assert adv and stats["zero_adv_group_share"] == pytest.approx(2 / 6)  # 2 of 2 extractor + 4 solver groups


def test_ablations_change_what_is_trained():
    wins = lambda j: j.skill_card is not None  # noqa: E731
    step, _ = _step(["evolving.extractor.train=false"], wins)
    assert {s.role for s in step.collect(0)[0]} == {"solver"}  # solver-only
    step, _ = _step(["evolving.solver.train=false"], wins)
    assert {s.role for s in step.collect(0)[0]} == {"extractor"}  # extractor-only
    step, rollout = _step(["evolving.skill_mode=none"], wins)
    samples, m = step.collect(0)
    assert {s.role for s in samples} == {"solver"} and m["extractor/samples"] == 0
    assert all(j.skill_card is None for j in rollout.calls[1])
    step, rollout = _step(["evolving.skill_mode=random"], wins)
    step.collect(0)
    cards = [j.skill_card for j in rollout.calls[1]]
    assert any(c is not None for c in cards)  # valid skills from the *other* source
    step, _ = _step(["evolving.format_penalty=-1"], wins)
    assert sorted({s.reward for s in step.collect(0)[0] if s.role == "extractor"}) == [-1.0, 1.0]
    step, _ = _step(["evolving.train_on_source=true"], wins)
    assert any(s.group == "src0" for s in step.collect(0)[0])


@pytest.mark.slow
def test_training_persists_the_best_helpful_skills(tmp_path):
    from evolving_rl.skills.library import SkillLibrary

    step, _ = _step(["library.persist_top=1"], lambda j: j.skill_card is not None and j.task.id.endswith("0"), tmp_path)
    _, m = step.collect(step=7)
    assert m["extractor/skills_persisted"] == 2  # one per source: its valid skill helped on 1 of 2 tasks
    recs = SkillLibrary(tmp_path / "skills.sqlite").list()
    # keyed by the source task's embedding: two different tasks keep two records
    assert len(recs) == 2 and {r.name for r in recs} == {"find-then-place"}
    assert {r.provenance["source_task_id"] for r in recs} == {"t0", "t1"} and recs[0].provenance["step"] == 7
    step, _ = _step(["library.persist_top=1"], lambda j: False, tmp_path / "none")
    assert step.collect(step=0)[1]["extractor/skills_persisted"] == 0  # skills that never helped are not kept


@pytest.mark.slow
def test_a_real_step_on_alfworld_produces_both_roles(games_dir, tiny_model, tmp_path, make_config):
    from evolving_rl.train import Trainer

    cfg = make_config(games_dir, tiny_model, tmp_path / "run", "algorithm=evolving", "train.steps=1",
                      "eval.splits=[eval_seen]", "eval.max_tasks=1")
    trainer = Trainer(cfg)
    try:
        samples, m = trainer.algorithm.collect(0)
        stats = trainer.updater.update(samples)
    finally:
        trainer.close()
    roles = {s.role for s in samples}
    assert roles == {"solver", "extractor"}
    assert m["extractor/samples"] == 4 and m["rollout/episodes"] == 2 + 2 * 2 * 2
    assert 0.0 <= m["rollout/retrieval_similarity_mean"] <= 1.0
    assert stats["loss/optimizer_stepped"] == 1 and stats["loss/extractor/samples"] == 4
    # the source task is never among its downstream tasks
    for ep_task in trainer.train_tasks[:2]:
        assert ep_task.id not in {t.id for t, _ in trainer.algorithm.index.top_k(ep_task, 2)}


def test_sources_play_as_experience_without_the_evaluated_budget_and_downstream_keep_it():
    """A source is the experience a skill is distilled from: it plays as the one-shot pool's
    episodes do, unhurried (no meta budget), while downstream tasks are held to their budget, as
    test tasks are; else training extracts from trajectories evaluation never gives it."""
    def budgeted(t):
        return dataclasses.replace(t, meta=(("budget", 3), ("object", "x")))

    class BudgetIndex(FixedIndex):
        def top_k(self, task, k, exclusion="source"):
            return [(budgeted(t), s) for t, s in super().top_k(task, k, exclusion)]

    cfg = load_config(None, ["evolving.sources_per_step=2", "evolving.num_skills=2", "evolving.num_downstream=2"])
    rollout = ScriptedRollout(lambda j: False)
    step = EvolvingStep(cfg, ScriptedPolicy(), rollout, Cursor([budgeted(_task(0)), budgeted(_task(1))]), BudgetIndex())
    step.collect(step=1)
    source_jobs, down_jobs = rollout.calls
    assert [dict(j.task.meta) for j in source_jobs] == [{"object": "x"}] * 2
    assert all(dict(j.task.meta)["budget"] == 3 for j in down_jobs) and len(down_jobs) == 8
    assert _task(5).as_experience() == _task(5)  # no budget: nothing to drop
