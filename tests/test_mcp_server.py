"""The MCP server (issue 19): started as a real subprocess through the CLI, and driven by the
MCP SDK's own client, over stdio and over streamable HTTP on a free localhost port."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import anyio
import pytest

mcp = pytest.importorskip("mcp", reason="the MCP SDK: pip install 'evolving-rl[mcp]'")
from mcp import Client  # noqa: E402
from mcp.client.stdio import StdioServerParameters  # noqa: E402

from evolving_rl.skills.library import Provenance, SkillLibrary  # noqa: E402
from evolving_rl.skills.skill import parse_skill, render_card  # noqa: E402

def cli(*args):
    return subprocess.run([sys.executable, "-m", "evolving_rl.cli", *map(str, args)], capture_output=True, text=True,
                          timeout=300)


FIX = Path(__file__).parent / "fixtures" / "extractor_outputs"
TOKEN = "test-admin-token-0123456789"
TASKS = {  # a source task per fixture skill: what the library embeds (the source task's description)
    "valid_pure.txt": "heat some egg and put it in countertop",
    "fenced_json.txt": "cool some mug and put it in cabinet",
    "trailing_commas.txt": "look at alarmclock under the desklamp",
    "two_objects.txt": "put a pencil in drawer",
}


@pytest.fixture(scope="module")
def library(tmp_path_factory):
    from evolving_rl.retrieval import Embedder

    path = tmp_path_factory.mktemp("mcp") / "skills.sqlite"
    lib = SkillLibrary(path)
    emb = Embedder.shared()  # the real MiniLM the server will embed queries with
    vecs = emb.embed(list(TASKS.values()))
    ids = {}
    for (f, task), v in zip(TASKS.items(), vecs):
        s = parse_skill((FIX / f).read_text(encoding="utf-8")).skill
        ids[f] = lib.add(s, render_card(s), v, Provenance(source_task_id=task, model="tiny", success=True))
    lib.record_use(ids["valid_pure.txt"], True)
    lib.retire(ids["two_objects.txt"], "hurt success")
    lib.close()
    return path, ids


def data(result) -> dict:
    assert not result.is_error, result.content
    return result.structured_content or json.loads(result.content[0].text)


def error_text(result) -> str:
    assert result.is_error
    return " ".join(c.text for c in result.content)


async def exercise(client, ids: dict, admin: bool) -> None:
    tools = {t.name for t in (await client.list_tools()).tools}
    assert tools == {"list_skills", "search_skills", "get_skill"} | ({"retire_skill"} if admin else set())

    listed = data(await client.call_tool("list_skills", {}))
    assert listed["total"] == 3  # the retired skill is not served
    assert [s["id"] for s in listed["skills"]] == sorted(ids[f] for f in TASKS if f != "two_objects.txt")
    heat = next(s for s in listed["skills"] if s["id"] == ids["valid_pure.txt"])
    assert heat["name"] == "heat-and-place-object" and heat["uses"] == 1 and heat["success_rate"] == 1.0

    found = data(await client.call_tool("search_skills", {"task": "warm up a potato in the microwave, then put it on the table", "k": 2}))
    assert [s["id"] for s in found["skills"]][0] == ids["valid_pure.txt"]
    assert len(found["skills"]) == 2 and found["skills"][0]["similarity"] > found["skills"][1]["similarity"]
    assert found["skills"][0]["card"].startswith("# Skill: heat-and-place-object")
    lamp = data(await client.call_tool("search_skills", {"task": "examine the cd under the desklamp", "k": 1}))
    assert [s["id"] for s in lamp["skills"]] == [ids["trailing_commas.txt"]]

    one = data(await client.call_tool("get_skill", {"skill_id": ids["fenced_json.txt"]}))
    assert one["name"] == "cool-and-store-kitchenware" and one["provenance"]["source_task_id"] == TASKS["fenced_json.txt"]
    assert "## Workflow" in one["card"] and one["skill"]["name"] == one["name"]

    # Bounded inputs: each answer is a tool error that says what to send, never a crash.
    assert "no such promoted skill" in error_text(await client.call_tool("get_skill", {"skill_id": ids["two_objects.txt"]}))
    assert "no such promoted skill" in error_text(await client.call_tool("get_skill", {"skill_id": 999}))
    assert "k" in error_text(await client.call_tool("search_skills", {"task": "x", "k": 1000}))
    assert "task" in error_text(await client.call_tool("search_skills", {"task": "y" * 5000}))
    assert "task" in error_text(await client.call_tool("search_skills", {"task": "   "}))
    assert error_text(await client.call_tool("list_skills", {"limit": 10_000}))

    if admin:
        wrong = await client.call_tool("retire_skill", {"skill_id": ids["fenced_json.txt"], "reason": "r", "admin_token": "nope"})
        assert "wrong token" in error_text(wrong)
        assert data(await client.call_tool("list_skills", {}))["total"] == 3
        ok = data(await client.call_tool("retire_skill", {"skill_id": ids["fenced_json.txt"], "reason": "bad advice",
                                                          "admin_token": TOKEN}))
        assert ok == {"retired": ids["fenced_json.txt"]}
        assert data(await client.call_tool("list_skills", {}))["total"] == 2


def server_args(lib: Path, *extra: str) -> list[str]:
    return ["-m", "evolving_rl.cli", "skills", "mcp", str(lib), *extra]


def over_stdio(lib: Path | str, check, token: str = "") -> None:
    """Launch `evolving-rl skills mcp LIB` as the client's subprocess (read-only unless a token
    is given) and run `await check(client)` against it."""
    params = StdioServerParameters(command=sys.executable, args=server_args(lib),
                                   env={"EVOLVING_RL_ADMIN_TOKEN": token, "OMP_WAIT_POLICY": "PASSIVE"})

    async def main():
        async with Client(params, read_timeout_seconds=180) as client:
            await check(client)

    anyio.run(main)


def test_stdio_server_serves_skills_read_only(library):
    path, ids = library
    before = path.read_bytes()
    over_stdio(path, lambda client: exercise(client, ids, admin=False))
    assert path.read_bytes() == before  # read-only: not one byte of the library changed
    assert not SkillLibrary(path).get(ids["fenced_json.txt"]).retired


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_http_server_with_admin_token(library, tmp_path):
    src, ids = library
    path = tmp_path / "copy.sqlite"
    path.write_bytes(src.read_bytes())
    port = free_port()
    env = {**os.environ, "EVOLVING_RL_ADMIN_TOKEN": TOKEN}
    proc = subprocess.Popen([sys.executable, *server_args(path, "--transport", "http", "--port", str(port))],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 120
        while True:
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", port)) == 0:
                    break
            assert proc.poll() is None, proc.stdout.read()
            assert time.monotonic() < deadline, "the HTTP server did not start in 120 s"
            time.sleep(0.3)

        async def main():
            async with Client(f"http://127.0.0.1:{port}/mcp", read_timeout_seconds=180) as client:
                await exercise(client, ids, admin=True)

        anyio.run(main)
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    rec = SkillLibrary(path).get(ids["fenced_json.txt"])
    assert rec.retired and rec.retired_reason == "mcp admin: bad advice"


def test_bad_start_is_one_clear_message(tmp_path):
    r = cli("skills", "mcp", tmp_path / "missing.sqlite")
    assert r.returncode == 2 and "missing.sqlite" in r.stdout + r.stderr and "Traceback" not in r.stdout + r.stderr
    lib = tmp_path / "lib.sqlite"
    SkillLibrary(lib).close()
    r = subprocess.run([sys.executable, *server_args(lib)], env={**os.environ, "EVOLVING_RL_ADMIN_TOKEN": "short"},
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "at least 16" in r.stdout + r.stderr and "Traceback" not in r.stdout + r.stderr


def test_stdio_server_on_postgres(library, tmp_path):
    """The same tools on a PostgreSQL library (the replicas' shared one): skipped only without a server."""
    psycopg = pytest.importorskip("psycopg", reason="PostgreSQL backend: pip install 'evolving-rl[postgres]'")
    url = os.environ.get("EVOLVING_RL_TEST_PG")
    if not url:
        pytest.skip('no PostgreSQL server: set EVOLVING_RL_TEST_PG (eval "$(scripts/pg_for_tests.sh)" starts one)')
    from evolving_rl.skills.pg_library import open_library

    src, ids = library
    name = f"t_mcp_{os.getpid()}"
    with psycopg.connect(url, autocommit=True) as admin:
        admin.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
        admin.execute(f"CREATE DATABASE {name}")
    loc = url.rsplit("/", 1)[0] + "/" + name
    try:
        SkillLibrary(src, mode="read").export_jsonl(tmp_path / "lib.jsonl")
        pg = open_library(loc)
        assert pg.import_jsonl(tmp_path / "lib.jsonl") == sorted(ids.values())
        pg.close()
        over_stdio(loc, lambda client: exercise(client, ids, admin=False))
    finally:
        with psycopg.connect(url, autocommit=True) as admin:
            admin.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


def test_stdio_server_serves_only_what_the_service_promoted(library, tmp_path):
    from evolving_rl.config import load_config
    from evolving_rl.serve.evolver import SkillEvolver

    src, ids = library
    path = tmp_path / "served.sqlite"
    path.write_bytes(src.read_bytes())
    ev = SkillEvolver(path, load_config(None, []).evolve)  # adopts every live skill as quarantined
    with ev.library._write() as db:
        ev._set_status(db, ids["fenced_json.txt"], "promoted", "beats the no-skill control")
    ev.close()

    async def check(client):
        listed = data(await client.call_tool("list_skills", {}))
        assert [s["id"] for s in listed["skills"]] == [ids["fenced_json.txt"]]
        found = data(await client.call_tool("search_skills", {"task": "heat an egg in the microwave", "k": 3}))
        assert [s["id"] for s in found["skills"]] == [ids["fenced_json.txt"]]  # quarantined ones held back
        assert "no such promoted skill" in error_text(
            await client.call_tool("get_skill", {"skill_id": ids["valid_pure.txt"]}))
        done = await client.call_tool("retire_skill", {"skill_id": ids["fenced_json.txt"], "reason": "stale",
                                                       "admin_token": TOKEN})
        assert data(done) == {"retired": ids["fenced_json.txt"]}
        assert data(await client.call_tool("list_skills", {}))["total"] == 0

    over_stdio(path, check, token=TOKEN)
    ev = SkillEvolver(path, load_config(None, []).evolve)
    assert ev.statuses([ids["fenced_json.txt"]]) == {ids["fenced_json.txt"]: "retired"}
    (row,) = ev.audit_log(ids["fenced_json.txt"], limit=1)  # the retirement went through the service's log
    assert (row["actor"], row["action"], row["reason"]) == ("mcp admin", "retire", "mcp admin: stale")
