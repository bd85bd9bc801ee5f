"""Evaluation on the real engine with tiny models: the three protocols, skill transfer with a
second model directory, and the leakage guard."""

from __future__ import annotations

import json
import sqlite3

import pytest

from evolving_rl.evaluate import wilson

pytestmark = pytest.mark.slow


def test_wilson_interval_matches_hand_computation():
    lo, hi = wilson(3, 10)
    assert (round(lo, 4), round(hi, 4)) == (0.1078, 0.6032)
    assert wilson(0, 0) == (0.0, 0.0) and wilson(5, 5)[1] == 1.0


@pytest.fixture(scope="module")
def second_model(games_dir, demos_path, tmp_path_factory, make_config):
    """Policy B for transfer: same recipe, another seed (a different set of weights)."""
    from evolving_rl.policy.tiny import build_tiny
    from evolving_rl.sft import corpus_from_demos, load_demos

    cfg = make_config(games_dir, "unused", "unused", "tiny.seed=1")
    out = tmp_path_factory.mktemp("models_b") / "tiny_b"
    build_tiny(corpus_from_demos(load_demos([str(demos_path)]), cfg), cfg.tiny, out)
    return out


@pytest.fixture(scope="module")
def library_a(games_dir, demos_path, tmp_path_factory):
    """A library of real skills (rule-derived from expert trajectories), provenance 'policy A'."""
    from evolving_rl.retrieval import make_embedder
    from evolving_rl.sft import load_demos
    from evolving_rl.skills.library import SkillLibrary
    from evolving_rl.skills.skill import render_card, rule_skill_from_demo

    path = tmp_path_factory.mktemp("lib") / "skills.sqlite"
    lib = SkillLibrary(path)
    emb = make_embedder()
    for d in load_demos([str(demos_path)]):
        sk = rule_skill_from_demo(d)
        lib.add(sk, render_card(sk), emb.embed([d["task"]["description"]])[0],
                {"source_task_id": d["task"]["id"], "model": "policy-A", "success": d["won"]})
    lib.close()
    return path


def test_no_skill_and_one_shot_protocols(games_dir, tiny_model, tmp_path, make_config):
    from evolving_rl.evaluate import evaluate_checkpoint

    cfg = make_config(games_dir, tiny_model, tmp_path, "eval.protocols=[no_skill,one_shot]", "eval.repeats=2",
                      "eval.greedy=false")
    results = evaluate_checkpoint(cfg, str(tiny_model), tmp_path, tag="t")
    assert [(r.split, r.protocol) for r in results] == [
        ("eval_seen", "no_skill"), ("eval_seen", "one_shot"), ("eval_unseen", "no_skill"), ("eval_unseen", "one_shot")]
    for r in results:
        assert r.overall.n + r.overall.failed == 2 * 2  # max_tasks x repeats
    payload = json.loads((tmp_path / "eval" / "t.json").read_text())
    assert set(payload["deltas"]) == {"eval_seen", "eval_unseen"}
    rows = [json.loads(x) for x in (tmp_path / "eval" / "t_episodes.jsonl").read_text().splitlines()]
    one_shot = [r for r in rows if r["protocol"] == "one_shot"]
    assert len(one_shot) == 8
    pool = {"train", "train_unseen"}
    for r in one_shot:  # experience came from the declared pool, never from the test split
        assert r["skill_meta"]["experience_task"].split("/")[0] in pool
        assert r["skill_meta"]["experience_task"] != r["task"]["id"]
    # unseen test tasks find same-type experience among the never-trained unseen types
    unseen = [r for r in one_shot if r["split"] == "eval_unseen"]
    assert any(r["skill_meta"]["experience_task"].startswith("train_unseen/") for r in unseen)


def test_library_protocol_and_transfer_to_a_second_model(games_dir, second_model, library_a, tmp_path, make_config):
    from evolving_rl.evaluate import evaluate_checkpoint

    before = sqlite3.connect(library_a).execute("select sum(uses) from skills").fetchone()[0]
    # The protocol runs the service's engine: no control share and every skill matching, so
    # each episode tries one of A's skills (adopted quarantined, hence the `trial` arm).
    cfg = make_config(games_dir, second_model, tmp_path, "eval.splits=[eval_seen]", "eval.library_wave=1",
                      "evolve.control_share=0", "evolve.min_similarity=-1")
    results = evaluate_checkpoint(cfg, str(second_model), tmp_path, tag="transfer", skills=str(library_a))
    assert [r.protocol for r in results] == ["library"]
    rows = [json.loads(x) for x in (tmp_path / "eval" / "transfer_episodes.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and all(r["skill_card"] for r in rows)  # policy B played with A's skills
    assert [r["skill_meta"]["arm"] for r in rows] == ["trial", "trial"]
    payload = json.loads((tmp_path / "eval" / "transfer.json").read_text())
    stream = payload["library_stream_eval_seen"]["log"]
    assert sorted(x["position"] for x in stream) == [0, 1] and all(len(x["skills_used"]) == 1 for x in stream)
    assert [x["skill_added"] for x in stream] == [None, None]  # frozen: nothing extracted
    # usage was recorded in B's copy, per skill and in the lifecycle; A's library file is untouched
    from evolving_rl.skills.library import SkillLibrary

    copy_path = tmp_path / "eval" / "transfer_eval_seen_skills.sqlite"
    copy = SkillLibrary(copy_path)
    assert sum(r.uses for r in copy.list()) == 2
    assert sqlite3.connect(copy_path).execute("select sum(uses) from skill_lifecycle").fetchone()[0] == 2
    assert sqlite3.connect(library_a).execute("select sum(uses) from skills").fetchone()[0] == before
    assert not sqlite3.connect(library_a).execute(
        "select 1 from sqlite_master where name='skill_lifecycle'").fetchall()  # no lifecycle tables in A's file
    # the stream order is seeded: the same seed gives the same order
    again = evaluate_checkpoint(cfg, str(second_model), tmp_path / "again", tag="transfer", skills=str(library_a))
    log2 = json.loads((tmp_path / "again" / "eval" / "transfer.json").read_text())["library_stream_eval_seen"]["log"]
    assert [x["task"] for x in log2] == [x["task"] for x in stream]
    assert again[0].overall.n == results[0].overall.n


def test_leakage_guard_refuses_overlap(games_dir, tiny_model, tmp_path, make_config):
    from evolving_rl.evaluate import Evaluator, check_no_overlap
    from evolving_rl.envs.base import make_suite
    from evolving_rl.common import env_options
    from evolving_rl.train import Trainer

    cfg = make_config(games_dir, tiny_model, tmp_path / "a", "eval.splits=[eval_seen,train]")
    with pytest.raises(ValueError, match=r"leakage: \d+ task\(s\) of eval split 'train' are also in the training pool"):
        Trainer(cfg)
    cfg = make_config(games_dir, tiny_model, tmp_path / "b", "eval.experience_pool=[train,eval_seen]",
                      "eval.splits=[eval_seen]")
    ev = Evaluator(cfg, make_suite("alfworld", env_options(cfg)), None, None, tmp_path / "b")
    with pytest.raises(ValueError, match="experience pool"):
        ev.experience_index()
    suite = make_suite("alfworld", env_options(cfg))
    t = suite.tasks("eval_seen")[0]
    from evolving_rl.types import Task

    same_file = Task("other-id", "train", t.task_type, t.description, t.locator)
    with pytest.raises(ValueError, match=t.id.replace("/", ".")):
        check_no_overlap([same_file], {"eval_seen": [t]}, "pool")
