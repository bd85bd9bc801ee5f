"""The deployment service on a shared PostgreSQL library (issue 19): the lifecycle engine's
guarantees with several writer processes (versions numbered once each, no lost audit row,
outcome or queued episode, each queued episode extracted by one worker, a killed worker's
episode freed), exact rollback as data, and two real `evolving-rl serve` replicas behind no
load balancer but one library: both see the same skills, versions and rollbacks.

The fast tests run on SQLite too (the same guarantees, one file). PostgreSQL runs are skipped
only when no server is given: set EVOLVING_RL_TEST_PG (`eval "$(scripts/pg_for_tests.sh)"`).
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from test_library import new_lib  # noqa: F401  (the library tests' backends: SQLite, PostgreSQL, pgvector)
from test_serve_evolver import _skill, _vec  # the lifecycle tests' skills and vectors

from evolving_rl.serve.evolver import Decision

REPO = Path(__file__).resolve().parents[1]
DIM = 32


@pytest.fixture
def location(new_lib) -> str:
    """The same library on each backend (test_library's fixture): a SQLite file, PostgreSQL
    (exact search) or PostgreSQL with pgvector (search in the database)."""
    return new_lib()


@pytest.fixture
def pg_url(new_lib) -> str:
    """A new PostgreSQL database; for tests marked `postgres_only`."""
    return new_lib()


postgres_only = pytest.mark.parametrize("new_lib", ["postgres"], indirect=True)


def _evolver(loc: str, *over: str):
    from evolving_rl.config import load_config
    from evolving_rl.serve.evolver import SkillEvolver
    from evolving_rl.skills.pg_library import PgSkillLibrary, is_postgres

    ev = SkillEvolver(loc, load_config(None, ["evolve.min_uses=5", "evolve.confidence=0.9", *over]).evolve)
    assert isinstance(ev.library, PgSkillLibrary) == is_postgres(loc)  # a URL is never taken for a file name
    return ev


WRITER = """
import sys, json
sys.path.insert(0, {tests!r})
from test_serve_pg import _evolver
from test_serve_evolver import _skill, _vec
from evolving_rl.serve.evolver import Decision
loc, w, n, claim = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4] == "1"
ev = _evolver(loc)
for i in range(n):
    k = w * n + i
    sid = ev.admit(*_skill(f"skill-{{k}}", f"search place {{k}} before the others"), _vec(k, {dim}), {{}},
                   actor=f"writer{{w}}", reason="concurrent")
    ev.record(Decision("trial", sid), 1.0, queue_payload={{"k": k}})
    ev.record(Decision("control", credited=[sid]), 0.0)
done = []
while claim:
    got = ev.claim()
    if got is None:
        if ev.queue_counts()["pending"] == 0:
            break
        continue
    ev.finish_queued(got[0], {{"by": w}})
    done.append(got[0])
print(json.dumps(done))
"""


def _writers(loc: str, workers: int, n: int, claim: bool) -> list[list[int]]:
    code = textwrap.dedent(WRITER.format(tests=str(REPO / "tests"), dim=DIM))
    procs = [subprocess.Popen([sys.executable, "-c", code, loc, str(w), str(n), "1" if claim else "0"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for w in range(workers)]
    outs = []
    for p in procs:
        out, err = p.communicate(timeout=240)
        assert p.returncode == 0, err[-3000:]
        outs.append(json.loads(out.strip().splitlines()[-1]))
    return outs


def test_three_writers_lose_nothing_and_number_versions_once(location):
    """Three processes admit skills, count outcomes and queue episodes on one library at once."""
    ev = _evolver(location)  # creates the tables and version 1 before the writers race
    workers, n = 3, 4
    # On SQLite one serve process owns the queue (one worker); on PostgreSQL every replica claims.
    claimed = _writers(location, workers, n, claim=ev.pg)
    total = workers * n
    versions = sorted(v["version"] for v in ev.versions(1000))
    assert versions == list(range(1, total + 2))  # the initial one + one per admitted skill: no gap, none twice
    log = ev.audit_log(limit=1000)
    assert sorted(e["library_version"] for e in log) == list(range(2, total + 2))
    assert sorted(e["actor"] for e in log) == sorted(f"writer{w}" for w in range(workers) for _ in range(n))
    skills = ev.skills()
    assert len(skills) == total and {s["name"] for s in skills} == {f"skill-{k}" for k in range(total)}
    assert all((s["uses"], s["wins"], s["ctrl_uses"], s["ctrl_wins"]) == (1, 1.0, 1, 0.0) for s in skills)
    assert ev.arm_stats() == {"control": {"episodes": total, "wins": 0.0}, "trial": {"episodes": total, "wins": total}}
    if ev.pg:
        flat = [q for qs in claimed for q in qs]
        assert sorted(flat) == list(range(1, total + 1))  # every queued episode claimed, none twice
        assert ev.queue_counts() == {"pending": 0, "done": total, "failed": 0}
        assert all(ev.queued(q)["attempts"] == 1 for q in flat)
    else:
        assert ev.queue_counts() == {"pending": total, "done": 0, "failed": 0}
    ev.close()


def test_rollback_restores_a_version_exactly_and_ids_are_never_reused(location):
    """On every backend: the rolled-back library equals the version, history is kept, ids are not given again."""
    ev = _evolver(location)
    a = ev.admit(*_skill("find-objects"), _vec(0), {}, actor="test", reason="unit")
    for _ in range(3):
        ev.record(Decision("trial", a), 1.0)
    b = ev.admit(*_skill("clean-then-place", "clean the object at the sink first"), _vec(1), {}, actor="test",
                 reason="unit")
    at_v, before = ev.current_version(), ev.snapshot()
    ev.retire(a, actor="admin", reason="looks wrong")
    c = ev.admit(*_skill("heat-then-place", "heat the object in the microwave first"), _vec(2), {}, actor="test",
                 reason="unit")
    for _ in range(2):
        ev.record(Decision("trial", b), 0.0)
    assert ev.snapshot() != before
    new_v = ev.rollback(at_v, actor="admin", reason="undo")
    assert ev.snapshot() == before == ev.snapshot(at_v)  # every row and embedding byte, statistics included
    assert ev.statuses([a, b, c]) == {a: "quarantined", b: "quarantined"}
    assert new_v == ev.current_version() > at_v and ev.versions(1)[0]["reason"].startswith("rollback")
    with pytest.raises(KeyError, match="version 999"):
        ev.rollback(999, actor="admin", reason="x")
    d = ev.admit(*_skill("cool-then-place", "cool the object in the fridge first"), _vec(3), {}, actor="test",
                 reason="unit")
    assert d > c  # a rolled-back id is never given again: old audit rows keep naming the skill they meant
    assert [e["action"] for e in ev.audit_log()] == ["add", "rollback", "add", "retire", "add", "add"]
    other = _evolver(location)  # another process's view (a replica): the same library
    assert other.snapshot() == ev.snapshot() and other.current_version() == ev.current_version()
    other.close()
    ev.close()


@postgres_only
def test_audit_log_is_append_only_on_postgres(pg_url):
    import psycopg

    ev = _evolver(pg_url)
    ev.admit(*_skill("find-objects"), _vec(0), {}, actor="test", reason="unit")
    for sql in ("UPDATE skill_audit_log SET reason='edited'", "DELETE FROM skill_audit_log",
                "TRUNCATE skill_audit_log"):
        with pytest.raises(psycopg.Error, match="append-only"):
            ev.library._db.execute(sql)
    assert len(ev.audit_log()) == 1
    ev.close()


@postgres_only
def test_a_killed_workers_episode_is_freed_at_once(pg_url):
    """A worker holds the queued episode it extracts; another replica cannot take it until the
    holder dies, then takes it at once (no lease to wait out), and it is finished once."""
    from evolving_rl.serve.evolver import Decision

    ev = _evolver(pg_url)
    _, qid = ev.record(Decision("none"), 1.0, queue_payload={"task": "put a mug in the sink"})
    code = textwrap.dedent(f"""
        import sys, time
        sys.path.insert(0, {str(REPO / 'tests')!r})
        from test_serve_pg import _evolver
        ev = _evolver(sys.argv[1])
        print(ev.claim()[0], flush=True)
        time.sleep(600)
    """)
    holder = subprocess.Popen([sys.executable, "-c", code, pg_url], stdout=subprocess.PIPE, text=True)
    try:
        assert int(holder.stdout.readline()) == qid
        assert ev.claim() is None and ev.pending() == [(qid, {"task": "put a mug in the sink"})]
    finally:
        holder.kill()
        holder.wait(30)
    deadline = time.monotonic() + 30
    while (got := ev.claim()) is None:
        assert time.monotonic() < deadline, "the killed worker's episode was never freed"
        time.sleep(0.1)
    assert got[0] == qid and ev.claim() is None  # a worker never claims what it already holds
    ev.finish_queued(qid, {"skill_id": None})
    assert ev.queued(qid)["attempts"] == 1 and ev.claim() is None
    ev.close()


# -- two real replicas ---------------------------------------------------------------------------


@postgres_only
@pytest.mark.slow
def test_two_serve_replicas_share_one_postgres_library(pg_url, tmp_path, games_dir):
    from test_serve import ADMIN, CHECKPOINT, GUARDRAIL, Server, play, wait_extracted

    from evolving_rl.envs.base import make_env, make_suite

    if not CHECKPOINT.is_dir():
        pytest.skip(f"no checkpoint at {CHECKPOINT}")
    servers = []
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        # short extractions: what is measured here is who extracts, not what (a skill cut short is rejected)
        srv = Server(tmp_path / name, *GUARDRAIL, "rollout.extractor.max_new_tokens=160")
        srv.library = pg_url.replace("postgres@", "postgres:s3cret-pw@")  # the test server trusts localhost
        servers.append(srv)
    try:
        with ThreadPoolExecutor(2) as pool:  # both start together, racing for the migrations
            for f in [pool.submit(s.start) for s in servers]:
                f.result()
        a, b = servers
        assert all(s.proc and s.proc.poll() is None for s in servers), [s.log_text() for s in servers]
        ca, cb = a.client(), b.client()
        assert ca.get("/healthz").json()["library"].startswith("postgresql://")

        # admins submit skills through both replicas at once
        def submit(c, k):
            sk, _ = _skill(f"submitted-{k}", f"look in place {k} before the others")
            r = c.post("/v1/skills", json={"skill": sk, "task": f"find item number {k} in the attic {k * 7}",
                                           "reason": "seed"}, headers=ADMIN)
            assert r.status_code == 200, r.text
            return r.json()
        with ThreadPoolExecutor(4) as pool:
            ids = [f.result()["skill_id"] for f in [pool.submit(submit, c, k) for k, c in enumerate([ca, cb, ca, cb])]]
        assert sorted(ids) == [1, 2, 3, 4]
        la, lb = ca.get("/v1/skills").json(), cb.get("/v1/skills").json()
        assert la == lb and len(la["skills"]) == 4
        vs = [v["version"] for v in ca.get("/v1/versions").json()["versions"]]
        assert vs == list(range(5, 0, -1)) == [v["version"] for v in cb.get("/v1/versions").json()["versions"]]
        v_seeded = vs[0]

        # real ALFWorld episodes through both replicas (one after the other: the engine is not
        # thread-safe), the second played while the first is being extracted
        opts = {"games_dir": str(games_dir)}
        suite, env = make_suite("alfworld", opts), make_env("alfworld", opts)
        tasks = {t.task_type: t for t in suite.tasks("train")}
        ta, tb, tc = list(tasks.values())[:3]
        results = {"a": play(ca, env, ta, max_steps=4), "b": play(cb, env, tb, max_steps=4)}
        qids = [results[k][1]["queued"] for k in ("a", "b")]
        assert all(qids) and len(set(qids)) == 2
        for q in qids:
            done = wait_extracted(ca, q)
            assert done["state"] == "done" and done["attempts"] == 1 and cb.get(f"/v1/queue/{q}").json() == done
        arms = [ln for ln in ca.get("/metrics").text.splitlines() if ln.startswith("evolving_rl_arm_episodes")]
        assert sum(float(ln.split()[-1]) for ln in arms) == 2  # both replicas' outcomes counted once each

        # a rollback through replica A is what replica B serves
        want = cb.get(f"/v1/versions/{v_seeded}").json()
        r = ca.post(f"/v1/versions/{v_seeded}/rollback", json={"reason": "test: back to the seeded library"},
                    headers=ADMIN)
        assert r.status_code == 200, r.text
        now = cb.get("/v1/export").json()
        assert now["skills"] == want["skills"] and now["lifecycle"] == want["lifecycle"]
        assert cb.get("/v1/audit?limit=1").json()["audit_log"][0]["action"] == "rollback"
        assert cb.get("/v1/skills").json() == ca.get("/v1/skills").json()

        # a replica killed while it extracts: the other takes the episode over at once, nothing lost
        _, end, _ = play(ca, env, tc, max_steps=4)
        qid = end["queued"]
        deadline = time.monotonic() + 120
        holder = None
        while holder is None:
            assert time.monotonic() < deadline, "no replica started extracting the episode"
            holder = next((s for s, c in ((a, ca), (b, cb)) if c.get("/healthz").json()["extracting"] == qid), None)
            if holder is None and ca.get(f"/v1/queue/{qid}").json()["state"] != "pending":
                pytest.fail("the episode was extracted before a replica could be caught extracting it")
            time.sleep(0.02)
        holder.kill9()
        cs = cb if holder is a else ca
        done = wait_extracted(cs, qid)
        assert done["state"] == "done" and done["attempts"] == 1, done
        vs = [v["version"] for v in cs.get("/v1/versions?limit=1000").json()["versions"]]
        assert vs == list(range(len(vs), 0, -1))  # every change one version, numbered once, across replicas
        for s in servers:  # the startup banner and health name the library without its password
            assert "s3cret-pw" not in (s.tmp / f"server-{s.port}.log").read_text()
        assert "s3cret-pw" not in cs.get("/healthz").text
        print(f"replica {'a' if holder is a else 'b'} killed mid-extraction; the other finished episode {qid}; "
              f"{len(vs)} versions")
    finally:
        for s in servers:
            s.stop()


@postgres_only
def test_cli_skills_commands_take_a_postgres_library(pg_url, tmp_path):
    """list, show, export (both formats), import and retire on a served PostgreSQL library: only
    promoted skills leave as Agent Skills, and a retirement goes through the lifecycle."""
    from typer.testing import CliRunner

    from evolving_rl.cli import app
    from evolving_rl.serve.evolver import Decision
    from evolving_rl.skills.library import SkillLibrary

    ev = _evolver(pg_url, "evolve.min_uses=2", "evolve.confidence=0.6")
    good = ev.admit(*_skill("find-objects"), _vec(0), {"source_task_id": "t1"}, actor="test", reason="unit")
    new = ev.admit(*_skill("heat-then-place", "heat the object in the microwave first"), _vec(1), {}, actor="test",
                   reason="unit")
    for _ in range(3):
        ev.record(Decision("trial", good), 1.0)
        ev.record(Decision("control", credited=[good]), 0.0)
    assert ev.statuses([good, new]) == {good: "promoted", new: "quarantined"}

    def run(*args: str) -> str:
        r = CliRunner().invoke(app, list(args))
        assert r.exit_code == 0 and r.exception is None, r.output
        return r.output

    assert "find-objects" in run("skills", "list", pg_url) and "find-objects" in run("skills", "show", pg_url, str(good))
    run("skills", "export", "--format", "agent-skills", pg_url, str(tmp_path / "agent"))
    assert [p.name for p in (tmp_path / "agent").iterdir()] == ["find-objects"]  # the quarantined one stays home
    run("skills", "export", pg_url, str(tmp_path / "all.jsonl"))
    run("skills", "import", str(tmp_path / "copy.sqlite"), str(tmp_path / "all.jsonl"))
    with SkillLibrary(tmp_path / "copy.sqlite", mode="read") as copy:
        assert [r.to_dict() for r in copy.list(include_retired=True)] == \
            [r.to_dict() for r in ev.library.list(include_retired=True)]
    v = ev.current_version()
    run("skills", "retire", pg_url, str(good), "--reason", "superseded")
    assert ev.statuses([good]) == {good: "retired"} and ev.current_version() == v + 1
    top = ev.audit_log(limit=1)[0]
    assert (top["action"], top["actor"], top["skill_id"], top["reason"]) == ("retire", "cli", good, "superseded")
    ev.close()


@postgres_only
def test_copy_library_from_postgres_keeps_rows_and_statuses(pg_url, tmp_path):
    """An evaluation's own SQLite copy of a PostgreSQL skill bank: every row, promoted stays promoted."""
    from evolving_rl.serve.evolver import Decision, copy_library
    from evolving_rl.skills.library import SkillLibrary

    ev = _evolver(pg_url, "evolve.min_uses=2", "evolve.confidence=0.6")
    good = ev.admit(*_skill("find-objects"), _vec(0), {"source_task_id": "t1"}, actor="test", reason="unit")
    ev.admit(*_skill("heat-then-place", "heat the object in the microwave first"), _vec(1), {}, actor="test",
             reason="unit")
    for _ in range(3):
        ev.record(Decision("trial", good), 1.0)
        ev.record(Decision("control", credited=[good]), 0.0)
    copy_library(pg_url, tmp_path / "copy.sqlite")
    with SkillLibrary(tmp_path / "copy.sqlite", mode="read") as copy:
        assert [r.to_dict() for r in copy.list(include_retired=True)] == \
            [r.to_dict() for r in ev.library.list(include_retired=True)]
    local = _evolver(str(tmp_path / "copy.sqlite"))
    assert local.snapshot()["lifecycle"] == ev.snapshot()["lifecycle"] and local.statuses([good]) == {good: "promoted"}
    local.close()
    ev.close()


@postgres_only
def test_a_replica_reconnects_after_the_server_drops_it(pg_url):
    """A long-running replica outlives a dropped database session (a restart, a failover): the
    call that meets the broken connection fails, the next one reconnects."""
    import psycopg

    from evolving_rl.serve.evolver import Decision

    ev = _evolver(pg_url)
    ev.record(Decision("none"), 1.0)
    pid = ev.library._db.raw.info.backend_pid
    with psycopg.connect(pg_url, autocommit=True) as admin:
        admin.execute("SELECT pg_terminate_backend(%s)", (pid,))
    with pytest.raises(psycopg.OperationalError):
        ev.arm_stats()
    ev.record(Decision("none"), 0.0)
    assert ev.arm_stats() == {"none": {"episodes": 2, "wins": 1.0}}
    assert ev.library._db.raw.info.backend_pid != pid
    ev.close()


@postgres_only
@pytest.mark.slow
def test_eval_starts_from_a_postgres_skill_bank(pg_url, games_dir, demos_path, tiny_model, tmp_path, make_config):
    """`eval --skills postgresql://...`: the library protocol plays on its own SQLite copy of the
    bank (the bank is never written) and the result file names the bank without its password."""
    from evolving_rl.evaluate import evaluate_checkpoint
    from evolving_rl.retrieval import make_embedder
    from evolving_rl.sft import load_demos
    from evolving_rl.skills.pg_library import open_library
    from evolving_rl.skills.skill import render_card, rule_skill_from_demo

    bank = pg_url.replace("postgres@", "postgres:s3cret-pw@")  # the test server trusts localhost: any password
    emb = make_embedder()
    with open_library(bank) as lib:
        for d in load_demos([str(demos_path)]):
            sk = rule_skill_from_demo(d)
            lib.add(sk, render_card(sk), emb.embed([d["task"]["description"]])[0],
                    {"source_task_id": d["task"]["id"], "model": "policy-A", "success": d["won"]})
        before = [r.to_dict() for r in lib.list(include_retired=True)]
    cfg = make_config(games_dir, tiny_model, tmp_path, "eval.splits=[eval_seen]", "eval.library_wave=1",
                      "evolve.control_share=0", "evolve.min_similarity=-1")
    results = evaluate_checkpoint(cfg, str(tiny_model), tmp_path, tag="pg", skills=bank)
    assert [r.protocol for r in results] == ["library"]
    rows = [json.loads(x) for x in (tmp_path / "eval" / "pg_episodes.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and [r["skill_meta"]["arm"] for r in rows] == ["trial", "trial"]  # the bank's skills
    payload = (tmp_path / "eval" / "pg.json").read_text()
    assert "s3cret-pw" not in payload and json.loads(payload)["library_stream_eval_seen"]["started_from"] == \
        pg_url.replace("postgres@", "postgres:***@")
    with open_library(pg_url, mode="read") as lib:
        assert [r.to_dict() for r in lib.list(include_retired=True)] == before  # uses counted in the copy only
