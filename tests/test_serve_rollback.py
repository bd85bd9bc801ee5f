"""What a rollback does with the evidence (issue 18): the skills' usage and outcome counts go back
with the version, so the guardrail decisions it undoes hold, and the counts it replaces stay on
record in the rollback's audit-log row. On a real SQLite library."""

from __future__ import annotations

from test_serve_evolver import _evolver, _skill, _vec  # noqa: E402  (the lifecycle tests' skills and vectors)

from evolving_rl.serve.evolver import Decision


def test_rollback_restores_the_counts_and_keeps_the_replaced_evidence_on_record(tmp_path):
    ev = _evolver(tmp_path)  # min_uses 5, confidence 0.9
    a = ev.admit(*_skill("find-objects"), _vec(0), {}, actor="test", reason="unit")
    at_v = ev.current_version()
    changes = []
    for _ in range(5):
        changes += ev.record(Decision("trial", a), 1.0)[0]
    for _ in range(5):
        changes += ev.record(Decision("control", credited=[a]), 0.0)[0]
    assert [c["status"] for c in changes] == ["promoted"]  # 5/5 against 0/5
    for _ in range(2):  # outcomes after the promotion: counted, in no version yet
        ev.record(Decision("promoted", a), 0.0)
    ev.rollback(at_v, actor="admin", reason="undo the promotion")

    assert ev.statuses([a]) == {a: "quarantined"}
    (s,) = ev.skills()
    assert (s["uses"], s["wins"], s["ctrl_uses"], s["ctrl_wins"]) == (0, 0, 0, 0)  # the version's counts
    row = ev.audit_log(limit=1)[0]
    assert row["action"] == "rollback" and row["detail"]["to_version"] == at_v
    assert row["detail"]["counts_set_aside"] == {str(a): {"uses": 7, "wins": 5.0, "ctrl_uses": 5, "ctrl_wins": 0.0}}
    # traffic totals are what happened, not library state: a rollback leaves them
    assert ev.arm_stats() == {"control": {"episodes": 5, "wins": 0.0}, "promoted": {"episodes": 2, "wins": 0.0},
                              "trial": {"episodes": 5, "wins": 5.0}}
    # the undone decision holds: one more good outcome is not enough evidence to re-promote
    assert ev.record(Decision("trial", a), 1.0)[0] == [] and ev.statuses([a]) == {a: "quarantined"}
    ev.close()
