"""Issue 15's training/evaluation defects, each pinned by a test that failed before its fix:
engine failures in the Evolving-RL step, metric keys, greedy repeats, the library protocol's
bank, skill dedup by utility, the extractor's view of long trajectories, and resume faults."""

from __future__ import annotations

import json
import sqlite3

import numpy as np
import pytest
import torch

from evolving_rl.algorithms.evolving import EvolvingStep
from evolving_rl.config import ConfigError, load_config
from evolving_rl.policy.base import Generation
from evolving_rl.types import Episode, Segment, Task, Turn

VALID = {
    "name": "find-then-place", "description": "Find the target object, take it, and place it where the task says.",
    "workflow": [{"goal": "find", "action": "go to likely receptacles", "strategy": "open closed ones", "done_when": "seen"}],
}


def _task(i: int) -> Task:
    return Task(f"t{i}", "train", "pick_and_place_simple", f"put a thing {i} in place.", f"g{i}")


class NamedSkillPolicy:
    """Extractor outputs by position: candidate n writes a valid skill named `skill-n`."""

    eos_token_id, pad_token_id = 0, 0

    def __init__(self):
        self.batches = []

    def encode_chat(self, messages, add_generation_prompt=True):
        return [1, 2, 3]

    def generate(self, prompts, **kw):
        self.batches.append(len(prompts))
        n = kw.get("n_skills", 2)
        return [Generation([5, 6], [-0.1, -0.2], json.dumps({**VALID, "name": f"skill-{i % n}"}), "stop")
                for i in range(len(prompts))]


class ScriptedRollout:
    """Each job's outcome is scripted: `outcome(job)` -> True/False (won) or None (engine failure)."""

    def __init__(self, outcome):
        self.outcome, self.calls = outcome, []

    def run(self, jobs, sampling, seed=None, progress=None):
        self.calls.append(jobs)
        out = []
        for j in jobs:
            o = self.outcome(j)
            ep = Episode(task=j.task, skill_card=j.skill_card, won=bool(o), steps=3, failed=o is None)
            ep.segments = [] if o is None else [Segment([1, 2, 7], [0.0, 0.0, -0.5], [0, 0, 1])]
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


def _step(outcome, *overrides, library_path=None):
    cfg = load_config(None, ["evolving.sources_per_step=2", "evolving.num_skills=2", "evolving.num_downstream=2",
                             *overrides])
    policy, rollout = NamedSkillPolicy(), ScriptedRollout(outcome)
    step = EvolvingStep(cfg, policy, rollout, Cursor([_task(0), _task(1)]), FixedIndex(), library_path=library_path)
    return step, policy, rollout


def _is_source(job) -> bool:
    return job.task.id in ("t0", "t1")


# -- defect 9: engine failures are nobody's signal -------------------------------------------

def test_an_engine_failed_source_gets_no_extraction_and_no_training():
    step, policy, rollout = _step(lambda j: None if j.task.id == "t0" else True)
    samples, m = step.collect(0)
    assert policy.batches == [2]  # N=2 extractions, from t1 only
    down = rollout.calls[1]
    assert len(down) == 1 * 2 * 2 and {j.task.id for j in down} == {"t110", "t111"}  # t1's downstream tasks
    # one group: t1's candidates, named by t1's place among the drawn sources (as on every process)
    assert {s.group for s in samples if s.role == "extractor"} == {"x0/1"}
    assert m["rollout/episodes"] == 2 + 4 and m["rollout/engine_failures"] == 1


def test_a_skill_whose_episodes_all_failed_in_the_engine_is_left_out_not_scored_zero():
    # every downstream episode under skill 0 fails in the engine; skill 1's episodes win
    step, _, _ = _step(lambda j: True if _is_source(j) else (None if j.tag["n"] == 0 else True))
    samples, m = step.collect(0)
    ext = [s for s in samples if s.role == "extractor"]
    assert len(ext) == 2 and {s.reward for s in ext} == {1.0}  # only skill 1 of each source, measured at 1.0
    assert m["extractor/unmeasured"] == 2 and m["extractor/reward_mean"] == 1.0


# -- defect 9: one key, one meaning -----------------------------------------------------------

def test_metrics_are_namespaced_and_a_key_set_twice_is_an_error():
    from evolving_rl.train import NAMESPACES, merge_metrics, namespaced_update

    step, _, _ = _step(lambda j: _is_source(j) or j.tag["k"] == 0)
    _, m = step.collect(0)
    assert all(k.startswith(NAMESPACES) for k in m), sorted(k for k in m if not k.startswith(NAMESPACES))
    assert m["solver/success"] == 0.5  # downstream: won on the first of two tasks
    stats = namespaced_update({"loss/total": 0.3, "reward_mean": 0.9})
    assert stats == {"loss/total": 0.3, "loss/reward_mean": 0.9}  # the updater cannot overwrite solver/success
    row = merge_metrics(m, stats)
    assert row["solver/success"] == 0.5
    with pytest.raises(ValueError, match="solver/success"):
        merge_metrics(m, {"solver/success": 0.9})


# -- defect 4: greedy repeats are not independent ---------------------------------------------

def test_greedy_evaluation_with_repeats_is_refused():
    with pytest.raises(ConfigError, match=r"eval.repeats=3 with eval.greedy: true"):
        load_config(None, ["eval.repeats=3"])
    assert load_config(None, ["eval.repeats=3", "eval.greedy=false"]).eval.repeats == 3
    assert load_config(None, []).eval.repeats == 1


def test_algorithms_come_from_the_registry():
    from evolving_rl import algorithms

    assert algorithms.available() == ["evolving", "grpo"]
    assert algorithms.lookup("evolving") is EvolvingStep
    with pytest.raises(ConfigError, match="algorithm: unknown 'ppo'; allowed: evolving, grpo"):
        load_config(None, ["algorithm=ppo"])


# -- defect 9: the extractor's view of a long trajectory --------------------------------------

def test_the_extractor_reads_a_long_trajectory_whole_or_head_and_tail_with_a_marker():
    from evolving_rl.prompts import extractor_messages

    ep = Episode(task=_task(0), won=True, final_observation="You won.")
    ep.turns = [Turn(f"observation {i} " + "x" * 80, None, "", f"go to place {i}", True) for i in range(60)]
    whole = extractor_messages(ep, max_trajectory_chars=None)[1]["content"]
    assert "observation 0 " in whole and "observation 30 " in whole and "You won." in whole
    cut = extractor_messages(ep, max_trajectory_chars=2000)[1]["content"]
    assert "observation 0 " in cut and "You won." in cut and "observation 30 " not in cut
    marker = next(line for line in cut.splitlines() if "not shown" in line)
    assert "from the middle of this trajectory" in marker and "2000 characters" in marker
    omitted = int(marker.split("characters (")[1].split(" lines")[0])
    kept = sum(1 for line in cut.splitlines() if line.startswith(("observation ", "[step ")))
    assert kept + omitted == 2 * 60  # every line is either shown or counted as cut


# -- defect 5: each evaluation plays on a copy of the bank ------------------------------------

class Suite:
    def __init__(self, splits):
        self.splits_ = splits

    def tasks(self, split):
        return self.splits_[split]


def _bank(path, source_ids):
    from evolving_rl.skills.library import SkillLibrary

    lib = SkillLibrary(path)
    for i, src in enumerate(source_ids):
        vec = np.zeros(8, dtype=np.float32)
        vec[i] = 1.0
        lib.add({**VALID, "name": f"s{i}"}, f"card {i}", vec, {"source_task_id": src})
    lib.close()
    return path


def test_the_library_protocol_never_writes_into_the_bank_and_refuses_one_with_eval_skills(tmp_path):
    from evolving_rl.evaluate import Evaluator

    cfg = load_config(None, ["eval.splits=[eval_seen]", "eval.protocols=[library]"])
    eval_task = Task("eval_seen/0", "eval_seen", "pick_and_place_simple", "put a mug in the sink.", "e0")
    suite = Suite({"eval_seen": [eval_task]})
    bank = _bank(tmp_path / "skills.sqlite", ["train/0", "train/1"])
    ev = Evaluator(cfg, suite, None, None, tmp_path, bank=bank)
    first = ev.library_copy("step1", "eval_seen")
    assert first.path != bank and len(first) == 2
    vec = np.zeros(8, dtype=np.float32)
    vec[5] = 1.0
    first.add({**VALID, "name": "from-an-eval-task"}, "card", vec, {"source_task_id": "eval_seen/0"})
    first.close()
    assert sqlite3.connect(bank).execute("select count(*) from skills").fetchone()[0] == 2  # bank untouched
    assert len(ev.library_copy("step2", "eval_seen")) == 2  # the next evaluation starts from the bank again

    leaky = _bank(tmp_path / "leaky.sqlite", ["train/0", "eval_seen/0"])
    ev = Evaluator(cfg, suite, None, None, tmp_path / "b", bank=leaky)
    with pytest.raises(ValueError, match=r"leakage: the skill bank .*leaky.sqlite holds skills extracted from 1 task"):
        ev.library_copy("final", "eval_seen")


# -- checkpoints: the bank rolls back, an unreadable checkpoint is named --------------------

def test_a_resume_rolls_the_skill_bank_back_to_the_checkpoint(tmp_path):
    from evolving_rl.common import snapshot_sqlite
    from evolving_rl.train import Trainer

    bank = _bank(tmp_path / "skills.sqlite", ["train/0", "train/1"])
    snapshot_sqlite(bank, tmp_path / "ckpt" / "skills.sqlite")
    _bank(bank, ["train/2"])  # a step after the checkpoint stores one more skill (kill -9 follows)
    t = Trainer.__new__(Trainer)  # only the bank logic: no model, pool or engine
    t.run_dir, t.print, t.algorithm = tmp_path, print, type("A", (), {"library_path": bank})()
    t._restore_bank(tmp_path / "ckpt" / "skills.sqlite")
    assert sqlite3.connect(bank).execute("select count(*) from skills").fetchone()[0] == 2  # replay stores it once
    t._restore_bank(None)  # no checkpoint at all: the run's own bank starts empty
    assert not bank.exists()


def test_an_unreadable_checkpoint_is_recognised(tmp_path):
    from evolving_rl.train import checkpoint_problem

    ck = tmp_path / "step_000002"
    (ck / "model").mkdir(parents=True)
    (ck / "model" / "config.json").write_text("{}")
    (ck / "state.json").write_text(json.dumps({"step": 2, "cursor": {"epoch": 0, "pos": 4}}))
    torch.save({"optimizer": {"state": {}}, "rng": {}, "pad": torch.zeros(4096)}, ck / "trainer.pt")
    assert checkpoint_problem(ck) is None
    from safetensors.torch import save_file

    save_file({"w": torch.zeros(256)}, ck / "model" / "model.safetensors")
    assert checkpoint_problem(ck) is None
    blob = (ck / "model" / "model.safetensors").read_bytes()
    (ck / "model" / "model.safetensors").write_bytes(blob[:-100])
    assert "model.safetensors truncated" in checkpoint_problem(ck)
    (ck / "model" / "model.safetensors").write_bytes(blob)
    raw = (ck / "trainer.pt").read_bytes()
    (ck / "trainer.pt").write_bytes(raw[: len(raw) // 2])
    assert checkpoint_problem(ck).startswith("trainer.pt unreadable")


# -- defect 6: dedup keeps the better skill ---------------------------------------------------

@pytest.mark.slow
def test_persist_keeps_the_skill_with_the_higher_measured_utility(tmp_path):
    from evolving_rl.skills.library import SkillLibrary

    lib = tmp_path / "skills.sqlite"
    step, _, rollout = _step(lambda j: _is_source(j) or (j.tag["n"] == 0 and j.tag["k"] == 0), "library.persist_top=2",
                             library_path=lib)
    step.cursor = Cursor([Task("t0", "train", "heat_then_place_in_recep", "heat some egg and put it in fridge.", "g0"),
                          Task("t1", "train", "pick_two_obj_and_place", "find two pencil and put them in drawer.", "g1")])

    def live():
        return {r.provenance["source_task_id"]: (r.name, r.provenance["step"]) for r in SkillLibrary(lib).list()}

    step.collect(0)  # skill-0 earns 0.5, skill-1 0: one skill per source
    assert live() == {"t0": ("skill-0", 0), "t1": ("skill-0", 0)}
    rollout.outcome = lambda j: _is_source(j) or j.tag["n"] == 1
    step.collect(1)  # skill-1 earns 1.0 > 0.5 on the same source embedding: it replaces skill-0, retired for audit
    assert live() == {"t0": ("skill-1", 1), "t1": ("skill-1", 1)}
    retired = [r for r in SkillLibrary(lib).list(include_retired=True) if r.retired]
    assert len(retired) == 2 and all("higher measured utility" in r.retired_reason for r in retired)
    rollout.outcome = lambda j: _is_source(j) or (j.tag["n"] == 0 and j.tag["k"] == 0)
    step.collect(2)  # a later, weaker near-duplicate (0.5 < 1.0) does not displace it (before: the last one won)
    assert live() == {"t0": ("skill-1", 1), "t1": ("skill-1", 1)}


# -- start-up validation and resume faults on the real trainer --------------------------------

@pytest.mark.slow
def test_num_downstream_larger_than_the_pool_fails_before_anything_is_written(games_dir, tiny_model, tmp_path,
                                                                             make_config):
    from evolving_rl.train import Trainer

    run = tmp_path / "run"
    cfg = make_config(games_dir, tiny_model, run, "algorithm=evolving", "evolving.num_downstream=8")
    with pytest.raises(ValueError, match=r"evolving.num_downstream=8: the training pool \(8 tasks, exclusion "
                                         r"'source'\) offers at most 7"):
        Trainer(cfg)
    assert not run.exists()


@pytest.mark.slow
def test_a_shared_bank_holding_eval_task_skills_is_refused_at_start_up(games_dir, tiny_model, tmp_path, make_config):
    from evolving_rl.envs.base import make_suite
    from evolving_rl.common import env_options
    from evolving_rl.train import Trainer

    run = tmp_path / "run"
    cfg = make_config(games_dir, tiny_model, run, "algorithm=evolving", "library.persist_top=1",
                      f"library.path={tmp_path / 'shared.sqlite'}", "eval.splits=[eval_seen]")
    eval_id = make_suite("alfworld", env_options(cfg)).tasks("eval_seen")[0].id
    _bank(tmp_path / "shared.sqlite", ["train/x", eval_id])
    with pytest.raises(ValueError, match="leakage: the skill bank .*shared.sqlite holds skills extracted from 1 task"):
        Trainer(cfg)
    assert not run.exists()


def _rows(run):
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if x.strip()]


@pytest.mark.slow
def test_resume_faults_first_checkpoint_lost_corrupt_latest_and_a_finished_run(games_dir, tiny_model, tmp_path,
                                                                               make_config):
    import shutil

    from evolving_rl.train import Trainer

    # (1) killed while the FIRST checkpoint was written: a row for step 1, no complete checkpoint
    run = tmp_path / "first"
    cfg = make_config(games_dir, tiny_model, run, "train.steps=1", "eval.splits=[eval_seen]", "eval.max_tasks=1")
    t = Trainer(cfg)
    try:
        t.fit()
    finally:
        t.close()
    shutil.rmtree(run / "checkpoints")
    (run / "checkpoints" / "step_000001.tmp").mkdir(parents=True)  # what the kill left behind
    said = []
    t = Trainer(cfg, resume=True, console=type("C", (), {"print": lambda self, x, **k: said.append(str(x))})())
    try:
        assert t.step == 0 and not _rows(run)
        t.fit()
    finally:
        t.close()
    assert any("no complete checkpoint" in s for s in said)
    assert [r["step"] for r in _rows(run) if r["kind"] == "train"] == [1]  # not [1, 1]
    row = next(r for r in _rows(run) if r["kind"] == "train")
    assert row["rollout/pool_retried_episodes"] == 0 and row["rollout/pool_restarts"] == 0  # visible, even when 0

    # (2) a finished run: --resume re-runs nothing and still prints the before/after table
    run = tmp_path / "done"
    cfg = make_config(games_dir, tiny_model, run, "train.steps=2", "eval.splits=[eval_seen]", "eval.max_tasks=1",
                      "train.eval_initial=true")
    t = Trainer(cfg)
    try:
        t.fit()
    finally:
        t.close()
    before = _rows(run)
    engine = json.loads((run / "eval" / "final.json").read_text())["engine"]
    assert engine["retried_episodes"] == 0 and engine["failed_episodes"] == 0  # the evaluation JSON counts retries
    said.clear()
    t = Trainer(cfg, resume=True, console=type("C", (), {"print": lambda self, x, **k: said.append(str(x))})())
    try:
        t.fit()
    finally:
        t.close()
    assert _rows(run) == before and sum(r.get("tag") == "final" for r in before) == 1
    assert any("not re-running the final evaluation" in s for s in said)
    assert any(s.startswith("Success before vs after 2 grpo steps") for s in said)

    # (3) the latest checkpoint is corrupt (trainer.pt truncated): fall back to the one before, saying so
    raw = (run / "checkpoints" / "step_000002" / "trainer.pt").read_bytes()
    (run / "checkpoints" / "step_000002" / "trainer.pt").write_bytes(raw[: len(raw) // 3])
    said.clear()
    more = make_config(games_dir, tiny_model, run, "train.steps=3", "eval.splits=[eval_seen]", "eval.max_tasks=1",
                       "train.eval_initial=true")
    t = Trainer(more, resume=True, console=type("C", (), {"print": lambda self, x, **k: said.append(str(x))})())
    try:
        assert t.step == 1
        assert [r["step"] for r in _rows(run) if r["kind"] == "train"] == [1]
        assert not any(r.get("tag") == "final" for r in _rows(run))
        t.fit()
    finally:
        t.close()
    assert any("step_000002 is unusable (trainer.pt unreadable" in s for s in said)
    assert any("previous complete checkpoint step_000001" in s for s in said)
    rows = _rows(run)
    assert [r["step"] for r in rows if r["kind"] == "train"] == [1, 2, 3]
    assert [r["step"] for r in rows if r.get("tag") == "final"] == [3]
    assert any(s.startswith("Success before vs after 3 grpo steps") for s in said)  # the table after a resume


def test_the_process_pool_meets_the_pool_contract_the_rollout_depends_on():
    from evolving_rl.envs.pool import Pool, PoolError
    from evolving_rl.envs.workers import EnvCallError, EnvPool

    with EnvPool("alfworld", {}, num_workers=0) as pool:
        assert isinstance(pool, Pool)
    assert issubclass(EnvCallError, PoolError)
    assert not isinstance(object(), Pool)
