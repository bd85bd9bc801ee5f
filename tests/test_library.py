from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
import uuid

import numpy as np
import pytest

from evolving_rl.skills.library import Provenance, SkillLibrary
from evolving_rl.skills.pg_library import open_library
from evolving_rl.skills.skill import Skill, render_card

DIM = 32
# libpq URLs of servers the tests may create databases on: any PostgreSQL, and one with pgvector.
PG_ENVS = {"postgres": "EVOLVING_RL_TEST_PG", "pgvector": "EVOLVING_RL_TEST_PGVECTOR"}


@pytest.fixture(params=["sqlite", "postgres", "pgvector"])
def new_lib(request, tmp_path):
    """A factory of fresh, empty library locations on each backend: a SQLite file, or a new
    PostgreSQL database (dropped afterwards) on a plain server (exact search) or one with
    pgvector. PostgreSQL runs are skipped only when no server is given or reachable; .ci/run
    starts them (scripts/pg_for_tests.sh)."""
    if request.param == "sqlite":
        names = iter(range(1000))
        yield lambda: str(tmp_path / f"lib{next(names)}.sqlite")
        return
    psycopg = pytest.importorskip("psycopg", reason="PostgreSQL backend: pip install 'evolving-rl[postgres]'")
    env = PG_ENVS[request.param]
    url = os.environ.get(env)
    if not url:
        pytest.skip(f"no {request.param} server: set {env} (scripts/pg_for_tests.sh starts one)")
    try:
        admin = psycopg.connect(url, autocommit=True, connect_timeout=5)
    except psycopg.Error as e:
        pytest.skip(f"no PostgreSQL server reachable at {env} ({e})")
    has_vector = admin.execute("SELECT 1 FROM pg_available_extensions WHERE name='vector'").fetchone() is not None
    if has_vector != (request.param == "pgvector"):
        pytest.fail(f"{env} must point at a server {'with' if request.param == 'pgvector' else 'without'} pgvector")
    made: list[str] = []

    def make() -> str:
        name = f"t_{uuid.uuid4().hex[:16]}"
        admin.execute(f"CREATE DATABASE {name}")
        made.append(name)
        return url.rsplit("/", 1)[0] + "/" + name

    yield make
    for name in made:
        admin.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
    admin.close()


def vec(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(DIM).astype(np.float32)


def skill(name: str) -> Skill:
    return Skill(name=name, description=f"what {name} does", workflow=[{"goal": "g", "action": f"do {name}"}])


def add(lib: SkillLibrary, name: str, v: np.ndarray, success: bool | None = True, **kw) -> int:
    s = skill(name)
    return lib.add(s, render_card(s), v, Provenance(source_task_id=f"task-{name}", model="tiny", step=3, success=success), **kw)


def run_py(code: str, *args: str) -> str:
    out = subprocess.run([sys.executable, "-c", textwrap.dedent(code), *args], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return out.stdout


def test_persistence_across_processes(new_lib):
    db = new_lib()
    run_py(
        """
        import sys, numpy as np
        from evolving_rl.skills.library import Provenance
        from evolving_rl.skills.pg_library import open_library
        lib = open_library(sys.argv[1])
        a = lib.add({"name": "a", "description": "A"}, "# Skill: a", np.ones(8, np.float32), Provenance(source_task_id="t1", success=True))
        b = lib.add({"name": "b", "description": "B"}, "# Skill: b", np.arange(8, dtype=np.float32) - 3.5, {"source_task_id": "t2"})
        lib.record_use(a, True); lib.record_use(a, False); lib.retire(b, "hurt success")
        """,
        str(db),
    )
    out = run_py(
        """
        import sys, json
        from evolving_rl.skills.pg_library import open_library
        lib = open_library(sys.argv[1])
        print(json.dumps([[r.name, r.uses, r.successes, r.retired, r.retired_reason, r.provenance["source_task_id"]]
                          for r in lib.list(include_retired=True)]))
        """,
        str(db),
    )
    assert json.loads(out) == [["a", 2, 1, False, None, "t1"], ["b", 0, 0, True, "hurt success", "t2"]]
    lib = open_library(db)
    assert len(lib) == 1 and lib.get(1).card == "# Skill: a" and lib.get(1).success_rate == 0.5


def test_concurrent_writers_lose_nothing(new_lib):
    db = new_lib()
    code = """
        import sys, time, numpy as np
        from evolving_rl.skills.pg_library import open_library
        path, w, start = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
        time.sleep(max(0.0, start - time.time()))  # all workers hit the fresh file at once
        lib = open_library(path)
        shared = np.ones(32, np.float32)  # every worker adds the same skill once: must merge into one
        for i in range(15):
            v = np.random.default_rng(1000 * w + i).standard_normal(32).astype(np.float32)
            sid = lib.add({"name": f"w{w}-{i}", "description": "d"}, f"card {w} {i}", v)
            lib.record_use(sid, i % 2 == 0)
            if i == 7:
                lib.add({"name": f"shared-{w}", "description": "d"}, "shared card", shared)
        """
    start = str(time.time() + 1.5)
    procs = [subprocess.Popen([sys.executable, "-c", textwrap.dedent(code), str(db), str(w), start], stderr=subprocess.PIPE, text=True)
             for w in range(3)]
    for p in procs:
        assert p.wait(timeout=180) == 0, p.stderr.read()
    lib = open_library(db)
    names = [r.name for r in lib.list()]
    assert len(lib) == 3 * 15 + 1
    assert {f"w{w}-{i}" for w in range(3) for i in range(15)} <= set(names)
    shared = [r for r in lib.list() if r.name.startswith("shared-")]
    assert len(shared) == 1 and shared[0].version == 3 and len(shared[0].history) == 2
    assert sum(r.uses for r in lib.list()) == 45 and sum(r.successes for r in lib.list()) == 3 * 8


def test_near_duplicates_merge(new_lib):
    lib = open_library(new_lib(), dedup_threshold=0.95)
    v = vec(0)
    a = add(lib, "first", v)
    lib.record_use(a, True)
    lib.record_use(a, False)
    near = v + 0.05 * vec(1)
    assert float(near @ v / np.linalg.norm(near) / np.linalg.norm(v)) > 0.95
    b = add(lib, "second", near)
    assert b == a and len(lib) == 1
    rec = lib.get(a)
    assert rec.version == 2 and rec.name == "second" and "do second" in rec.card  # newer card kept
    assert (rec.uses, rec.successes) == (2, 1)  # statistics survive the merge
    assert rec.history[0]["source_task_id"] == "task-first"
    np.testing.assert_array_equal(rec.embedding, v)  # the anchor embedding stays
    # A card from a failed run never replaces one from a successful run.
    c = add(lib, "from-a-failure", v + 0.01 * vec(2), success=False)
    rec = lib.get(c)
    assert c == a and rec.version == 3 and rec.name == "second" and rec.history[-1]["success"] is False
    assert add(lib, "other", vec(3)) != a and len(lib) == 2  # unrelated: a new record
    assert add(lib, "forced", v, merge=False) != a and len(lib) == 3


def test_retrieval_ranks_and_skips_retired(new_lib):
    lib = open_library(new_lib())
    ids = [add(lib, f"s{i}", vec(10 + i)) for i in range(5)]
    q = vec(12) + 0.3 * vec(13)
    got = lib.retrieve(q, m=2)
    assert [r.id for r in got] == [ids[2], ids[3]] and got[0].similarity > got[1].similarity
    lib.retire(ids[2], "manual")
    assert ids[2] not in [r.id for r in lib.retrieve(q, m=5)]
    assert len(lib) == 4 and len(lib.list(include_retired=True)) == 5
    assert lib.get(ids[2]).retired_reason == "manual"
    # A near-duplicate of a retired skill starts over as a new record.
    assert add(lib, "again", vec(12)) not in ids
    with pytest.raises(KeyError, match="99"):
        lib.retire(99, "x")
    with pytest.raises(KeyError):
        lib.record_use(99, True)
    with pytest.raises(ValueError, match="dimension"):
        lib.retrieve(np.ones(DIM + 1), 1)


def test_jsonl_round_trip_is_exact(new_lib, tmp_path):
    lib = open_library(new_lib())
    a = add(lib, "a", vec(30))
    add(lib, "b", vec(31), success=False)
    add(lib, "a2", vec(30) + 0.01 * vec(32))  # merged into a: version 2, history
    lib.record_use(a, True)
    lib.retire(a, "because <script>alert(1)</script>")
    assert lib.export_jsonl(tmp_path / "a.jsonl") == 2
    other = open_library(new_lib())
    assert other.import_jsonl(tmp_path / "a.jsonl") == [1, 2]
    other.export_jsonl(tmp_path / "b.jsonl")
    assert (tmp_path / "a.jsonl").read_bytes() == (tmp_path / "b.jsonl").read_bytes()
    for x, y in zip(lib.list(include_retired=True), other.list(include_retired=True)):
        assert x.to_dict() == y.to_dict() and x.embedding.dtype == y.embedding.dtype == np.float32
    # Importing into a library that already holds those ids appends with new ids.
    assert other.import_jsonl(tmp_path / "a.jsonl") == [3, 4]


def test_bad_inputs_name_the_culprit(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"id": 1, "name": "x"}) + "\n")
    lib = SkillLibrary(tmp_path / "lib.sqlite")
    with pytest.raises(ValueError, match=r"bad\.jsonl:1: missing field 'card'"):
        lib.import_jsonl(bad)
    with pytest.raises(ValueError, match="cannot read"):
        lib.import_jsonl(tmp_path / "nope.jsonl")
    with pytest.raises(ValueError, match="embedding"):
        lib.add({"name": "z", "description": "d"}, "card", np.zeros(DIM))
    notdb = tmp_path / "notdb.sqlite"
    notdb.write_text("this is not a database" * 100)
    with pytest.raises(ValueError, match="notdb.sqlite"):
        SkillLibrary(notdb)
    with pytest.raises(KeyError, match="not in the library"):
        lib.get(5)


def test_postgres_migrations_ids_and_modes(new_lib, tmp_path):
    loc = new_lib()
    if not loc.startswith("postgresql://"):
        pytest.skip("PostgreSQL only: schema migrations and the id sequence")
    import psycopg

    with pytest.raises(ValueError, match="holds no skill library"):
        open_library(loc, mode="read")
    lib = open_library(loc)  # version 0 -> 1 by the migrations
    assert lib.import_jsonl(_export_of_two(tmp_path)) == [1, 2]
    assert add(lib, "new", vec(44)) == 3  # the identity sequence moved past the restored ids
    ro = open_library(loc, mode="read")
    assert [r.id for r in ro.list()] == [1, 2, 3]
    with pytest.raises(psycopg.errors.ReadOnlySqlTransaction):
        ro.record_use(1, True)
    with psycopg.connect(loc, autocommit=True) as c:
        c.execute("UPDATE meta SET value='99' WHERE key='schema_version'")
    with pytest.raises(ValueError, match="schema version 99, this code reads 1"):
        open_library(loc)
    with pytest.raises(ValueError, match=r"cannot connect"):
        open_library(loc.rsplit("/", 1)[0].replace("postgres@", "postgres:secret@") + "/no_such_db")
    try:
        open_library(loc.replace("postgres@", "postgres:secret@") + "_missing")
    except ValueError as e:
        assert "secret" not in str(e) and "***" in str(e)


def _export_of_two(tmp_path) -> str:
    src = SkillLibrary(tmp_path / "src.sqlite")
    add(src, "a", vec(40))
    add(src, "b", vec(41))
    src.export_jsonl(tmp_path / "two.jsonl")
    return str(tmp_path / "two.jsonl")


def test_search_backend_ranks_as_exact_cosine(new_lib):
    """pgvector where the server has it, numpy otherwise: the same ranking and similarities."""
    loc = new_lib()
    lib = open_library(loc)
    server = os.environ.get(PG_ENVS["pgvector"], "")
    assert getattr(lib, "pgvector", False) == bool(server and loc.startswith(server.rsplit("/", 1)[0] + "/"))
    ids = [add(lib, f"s{i}", vec(50 + i)) for i in range(12)]
    lib.retire(ids[3], "manual")
    matrix = np.stack([vec(50 + i) for i in range(12)])
    for j in range(5):
        q = vec(90 + j) + 0.5 * vec(50 + j)
        sims = matrix @ q / np.linalg.norm(matrix, axis=1) / np.linalg.norm(q)
        sims[3] = -np.inf
        want = [ids[i] for i in np.argsort(-sims, kind="stable")[:4]]
        got = lib.retrieve(q, 4)
        assert [r.id for r in got] == want
        np.testing.assert_allclose([r.similarity for r in got], np.sort(sims)[::-1][:4], atol=1e-5)
    # a row written later (no vector yet) is found too
    late = add(lib, "late", vec(99))
    assert lib.retrieve(vec(99), 1)[0].id == late
