"""The skill lifecycle on a real SQLite library: quarantine, control share, promotion and
retirement with confidence, the append-only audit log, exact rollback, the durable queue.

Embeddings here are plain vectors (the retrieval math is the library's, tested elsewhere);
everything else is the real engine."""

from __future__ import annotations

import sqlite3

import numpy as np
import pytest

from evolving_rl.config import load_config
from evolving_rl.serve.evolver import Decision, SkillEvolver, SkillRejected
from evolving_rl.serve.guardrails import decide, hostile_markup, lift_posterior
from evolving_rl.skills.skill import Skill, render_card


def _skill(name: str, hint: str = "search every countertop before the cabinets") -> tuple[dict, str]:
    sk = Skill.model_validate({
        "name": name, "description": f"How to find a target object quickly: {hint}.",
        "workflow": [{"goal": "find the object", "action": "go to each likely place", "done_when": "it is in view"}],
        "decision_rules": ["if the object is not in view, open the closed receptacles nearby"],
    })
    return sk.to_dict(), render_card(sk)


def _vec(i: int, dim: int = 8) -> np.ndarray:
    v = np.zeros(dim, dtype=np.float32)
    v[i] = 1.0
    return v


def _evolver(tmp_path, *over: str) -> SkillEvolver:
    cfg = load_config(None, ["evolve.min_uses=5", "evolve.confidence=0.9", *over])
    return SkillEvolver(tmp_path / "skills.sqlite", cfg.evolve)


def test_decision_needs_evidence_not_one_episode():
    assert decide("quarantined", 1, 1, 0, 1, min_uses=1, confidence=0.9, margin=0.0)[0] is None  # 1/1 vs 0/1
    assert decide("quarantined", 9, 10, 2, 10, min_uses=5, confidence=0.9, margin=0.0)[0] == "promoted"
    assert decide("quarantined", 2, 10, 8, 10, min_uses=5, confidence=0.9, margin=0.0)[0] == "retired"
    assert decide("quarantined", 9, 10, 2, 10, min_uses=11, confidence=0.9, margin=0.0)[0] is None  # too few uses
    assert decide("promoted", 9, 10, 2, 10, min_uses=5, confidence=0.9, margin=0.0)[0] is None  # already promoted
    assert decide("promoted", 1, 20, 15, 20, min_uses=5, confidence=0.9, margin=0.0)[0] == "retired"
    lift = lift_posterior(9, 10, 2, 10)
    assert 0.5 < lift.mean < 0.7 and lift.lo > 0.2 and lift.p_better > 0.99
    assert lift_posterior(9, 10, 2, 10) == lift  # deterministic: the same counts, the same verdict
    with pytest.raises(ValueError, match="wins must lie"):
        lift_posterior(3, 2, 0, 1)


def test_hostile_markup_found():
    assert hostile_markup("Open the <script>alert(1)</script> drawer") == "<script"
    assert hostile_markup("click <a href='x'>here</a>") == "<a"
    assert hostile_markup("<img src=x onerror=alert(1)>") is not None
    assert hostile_markup("reply inside <action>...</action>; go to the drawer, then take it") is None


def test_new_skill_quarantined_promoted_with_control_and_audited(tmp_path):
    ev = _evolver(tmp_path, "evolve.control_share=0.3")
    sk, card = _skill("find-objects")
    sid = ev.admit(sk, card, _vec(0), {"source_task_id": "t1"}, actor="test", reason="unit")
    assert ev.statuses([sid]) == {sid: "quarantined"}
    arms = [ev.choose(_vec(0)).arm for _ in range(400)]
    assert abs(arms.count("control") / 400 - 0.3) < 0.07 and set(arms) == {"control", "trial"}
    assert ev.choose(_vec(5)).arm == "none"  # no matching skill: outside the test
    # the skill wins, its control loses: promoted once both arms hold min_uses episodes, not before
    for i in range(4):
        ev.record(Decision("trial", sid), 1.0)
        ev.record(Decision("control", credited=[sid]), 0.0)
        assert ev.statuses([sid])[sid] == "quarantined"
    changes, _ = ev.record(Decision("trial", sid), 1.0)
    assert changes == []
    changes, _ = ev.record(Decision("control", credited=[sid]), 0.0)
    assert [c["status"] for c in changes] == ["promoted"] and ev.statuses([sid])[sid] == "promoted"
    s = ev.skill(sid)
    assert (s["uses"], s["wins"], s["ctrl_uses"], s["ctrl_wins"]) == (5, 5.0, 5, 0.0) and s["lift"]["mean"] > 0.5
    assert ev.library.get(sid).uses == 5 and ev.library.get(sid).successes == 5  # the library's own counters agree
    log = ev.audit_log(sid)
    assert [e["action"] for e in log] == ["promote", "add"]
    assert log[0]["actor"] == "guardrail" and "beats the no-skill control" in log[0]["reason"]
    assert log[0]["detail"] == {"uses": 5, "wins": 5.0, "ctrl_uses": 5, "ctrl_wins": 0.0}
    # a promoted skill keeps being measured and is retired when it turns out worse
    for _ in range(15):
        ev.record(Decision("promoted", sid), 0.0)
        ev.record(Decision("control", credited=[sid]), 1.0)
    assert ev.statuses([sid])[sid] == "retired" and ev.audit_log(sid)[0]["action"] == "retire"
    assert len(ev.library) == 0 and ev.choose(_vec(0)).arm == "none"  # retired: never retrieved


def test_audit_log_is_append_only(tmp_path):
    ev = _evolver(tmp_path)
    sk, card = _skill("find-objects")
    ev.admit(sk, card, _vec(0), {}, actor="test", reason="unit")
    db = ev.library._db
    with pytest.raises(sqlite3.DatabaseError, match="append-only"):
        db.execute("UPDATE skill_audit_log SET reason='edited'")
    with pytest.raises(sqlite3.DatabaseError, match="append-only"):
        db.execute("DELETE FROM skill_audit_log")
    assert len(ev.audit_log()) == 1


def test_rejected_skill_stores_nothing(tmp_path):
    ev = _evolver(tmp_path)
    v0 = ev.current_version()
    sk, card = _skill("find-objects", "then <script>fetch('/x')</script>")
    with pytest.raises(SkillRejected, match="markup"):
        ev.admit(sk, card, _vec(0), {}, actor="test", reason="unit")
    sk, card = _skill("find-objects", "cherchez l'objet près de la fenêtre")
    with pytest.raises(SkillRejected, match="non_english"):
        ev.admit(sk, card, _vec(0), {}, actor="test", reason="unit")
    assert len(ev.library.list(include_retired=True)) == 0 and ev.current_version() == v0 and ev.audit_log() == []


def test_near_duplicate_keeps_the_measured_skill(tmp_path):
    ev = _evolver(tmp_path, "evolve.min_uses=2", "evolve.confidence=0.6")
    sid = ev.admit(*_skill("find-objects"), _vec(0), {"success": True}, actor="test", reason="unit")
    for _ in range(3):
        ev.record(Decision("trial", sid), 1.0)
        ev.record(Decision("control", credited=[sid]), 0.0)
    assert ev.statuses([sid])[sid] == "promoted"
    card, v = ev.library.get(sid).card, ev.current_version()
    same = ev.admit(*_skill("find-objects-v2", "look in the drawers first"), _vec(0), {"success": True},
                    actor="test", reason="unit")
    assert same == sid and ev.library.get(sid).card == card and ev.statuses([sid])[sid] == "promoted"
    assert ev.current_version() == v and ev.skill(sid)["uses"] == 3  # not a change: nothing logged
    other = ev.admit(*_skill("heat-then-place", "heat it first"), _vec(1), {}, actor="test", reason="unit")
    assert other != sid and ev.statuses([other])[other] == "quarantined"


def test_queue_survives_a_restart_and_export_import(tmp_path):
    ev = _evolver(tmp_path)
    sid = ev.admit(*_skill("find-objects"), _vec(0), {}, actor="test", reason="unit")
    _, qid = ev.record(Decision("trial", sid), 1.0, queue_payload={"task": "put a mug in the sink"})
    ev.close()
    again = _evolver(tmp_path)  # a new process on the same file
    assert again.pending() == [(qid, {"task": "put a mug in the sink"})]
    again.finish_queued(qid, {"skill_id": sid})
    assert again.pending() == [] and again.queued(qid)["state"] == "done"
    assert again.export(tmp_path / "out.json") == 1
    other = SkillEvolver(tmp_path / "other.sqlite", load_config(None, []).evolve)
    ids, rejected = other.import_(tmp_path / "out.json", actor="admin", reason="transfer")
    assert len(ids) == 1 and rejected == [] and other.statuses(ids) == {ids[0]: "quarantined"}
    assert other.library.get(ids[0]).card == again.library.get(sid).card
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ValueError, match="bad.json: not a skill export"):
        other.import_(tmp_path / "bad.json", actor="admin", reason="x")


def test_evolve_stream_records_arms_and_admits_extracted_skills(tmp_path):
    """The stream logic in isolation: a stand-in rollout (the solver wins exactly when it holds
    a card) and a stand-in extractor that writes one fixed skill; real evolver and library."""
    import json

    from evolving_rl.policy.base import Generation
    from evolving_rl.serve.evolver import evolve_stream
    from evolving_rl.types import Episode, Task

    sk, _ = _skill("find-objects")

    class Policy:
        def encode_chat(self, messages, add_generation_prompt=True):
            return [1, 2, 3]

        def generate(self, prompts, **kw):
            return [Generation([4], [0.0], "analysis... " + json.dumps(sk), "stop") for _ in prompts]

    class Rollout:
        def run(self, jobs, sampling, seed=None, progress=None):
            return [Episode(task=j.task, skill_card=j.skill_card, won=j.skill_card is not None, steps=3) for j in jobs]

    class Embedder:
        def embed(self, texts):
            return np.stack([_vec(0) for _ in texts])

    ev = _evolver(tmp_path, "evolve.min_uses=3", "evolve.confidence=0.9", "evolve.control_share=0.5")
    tasks = [Task(id=f"t{i}", split="s", task_type="x", description="find the key", locator="") for i in range(40)]
    sampling = load_config(None, []).rollout.solver
    eps, log = evolve_stream(ev, Rollout(), Policy(), Embedder(), tasks, sampling, sampling, wave=4, seed=0,
                             model_name="m", max_trajectory_chars=1000)
    assert len(eps) == len(log) == 40 and sorted(r["position"] for r in log) == list(range(40))
    assert [r["arm"] for r in log[:4]] == ["none"] * 4  # the first wave finds an empty library
    assert log[0]["skill_added"] == 1 and log[4]["skill_added"] == 1  # later waves: the same skill (duplicate)
    arms = [r["arm"] for r in log]
    assert {"trial", "control"} <= set(arms)
    promoted = next(i for i, r in enumerate(log) if r["status_changes"])
    assert log[promoted]["status_changes"][0]["status"] == "promoted" and ev.statuses([1]) == {1: "promoted"}
    later = arms[(promoted // 4 + 1) * 4:]  # arms of a wave are chosen before it plays
    assert "promoted" in later and "trial" not in later
    won = {a: [r["won"] for r in log if r["arm"] == a] for a in set(arms)}
    assert all(won["promoted"]) and not any(won["control"])


def test_cli_serve_and_evolve_help_and_clear_errors(tmp_path):
    from typer.testing import CliRunner

    from evolving_rl.cli import app

    run = CliRunner().invoke
    r = run(app, ["serve", "--help"])
    assert r.exit_code == 0 and "EVOLVING_RL_ADMIN_TOKEN" in r.output and "--library" in r.output
    r = run(app, ["serve", f"model.path={tmp_path / 'none'}"])
    assert r.exit_code == 2 and "model.path: no model directory" in r.output
    r = run(app, ["serve", "serve.port=70000"])
    assert r.exit_code == 2 and "serve.port" in r.output
    r = run(app, ["evolve", "--help"])
    assert r.exit_code == 0 and "--no-learn" in r.output
    r = run(app, ["evolve", f"model.path={tmp_path / 'none'}"])
    assert r.exit_code == 2 and "model.path: no model directory" in r.output
