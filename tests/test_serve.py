"""`evolving-rl serve` as a user runs it: a real server process on a free localhost port, the
shipped tiny checkpoint as solver and extractor, real ALFWorld games played through HTTP by
the caller (who owns the environment), MiniLM retrieval and the SQLite library.

One server serves the module: first every endpoint gets hostile input (only 4xx, nothing
stored), then episodes are played until the guardrail promotes or retires a skill, a rollback
restores the earlier library exactly, and a kill -9 during an extraction loses no episode.
"""

from __future__ import annotations

import os
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
CHECKPOINT = REPO / "checkpoints" / "tiny-alfworld-sft"
TOKEN = "test-admin-token-1234"
MAX_STEPS = 20
# Two episodes per arm and 90% confidence, so a decision fits a test's budget of episodes (the
# rule itself, and that one episode never decides, is tested in test_serve_evolver.py). Only a
# game's own skill matches its replays (min_similarity 0.9): each game is its own A/B test.
GUARDRAIL = ["evolve.min_uses=2", "evolve.confidence=0.9", "evolve.control_share=0.5", "evolve.min_similarity=0.9"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """A real `evolving-rl serve` subprocess."""

    def __init__(self, tmp: Path, *overrides: str) -> None:
        self.tmp, self.library = tmp, tmp / "skills.sqlite"
        self.overrides = list(overrides)
        self.proc: subprocess.Popen | None = None
        self.port = 0

    def start(self) -> None:
        self.port = free_port()
        cmd = [sys.executable, "-m", "evolving_rl.cli", "serve", "-c", str(REPO / "configs" / "quickstart.yaml"),
               f"model.path={CHECKPOINT}", f"serve.port={self.port}", f"serve.library={self.library}",
               f"env.max_steps={MAX_STEPS}", *self.overrides]
        env = {**os.environ, "EVOLVING_RL_ADMIN_TOKEN": TOKEN}
        self.log = open(self.tmp / f"server-{self.port}.log", "w")
        self.proc = subprocess.Popen(cmd, cwd=self.tmp, env=env, stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"server exited {self.proc.returncode}: {self.log_text()}")
            try:
                if httpx.get(f"{self.url}/healthz", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        raise AssertionError(f"server not up after 240 s: {self.log_text()}")

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def log_text(self) -> str:
        return (self.tmp / f"server-{self.port}.log").read_text()[-3000:]

    def client(self) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=120)

    def kill9(self) -> None:
        os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait(30)

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()


ADMIN = {"Authorization": f"Bearer {TOKEN}"}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    if not CHECKPOINT.is_dir():
        pytest.skip(f"no checkpoint at {CHECKPOINT}")
    srv = Server(tmp_path_factory.mktemp("serve"), *GUARDRAIL)
    srv.start()
    yield srv
    srv.stop()


def play(c: httpx.Client, env, task, max_steps: int = MAX_STEPS) -> tuple[dict, dict, bool]:
    """One real ALFWorld episode through the API; returns (start reply, end reply, won)."""
    r = env.reset(task)
    st = c.post("/v1/episodes", json={"task": task.description, "env": "alfworld", "task_type": task.task_type})
    assert st.status_code == 200, st.text
    st = st.json()
    steps = 0
    while not r.done and steps < max_steps:
        a = c.post(f"/v1/episodes/{st['episode_id']}/act", json={"observation": r.observation, "admissible": r.admissible})
        assert a.status_code == 200, a.text
        assert a.json()["valid"]  # decoding is constrained to the admissible actions
        r = env.step(a.json()["action"])
        steps += 1
    end = c.post(f"/v1/episodes/{st['episode_id']}/end", json={"success": bool(r.won), "final_observation": r.observation})
    assert end.status_code == 200, end.text
    print(st["arm"], (st["skill"] or {}).get("id"), task.id, "won" if r.won else "lost", steps, flush=True)
    return st, end.json(), bool(r.won)


def state(c: httpx.Client) -> dict:
    """Everything the service stores: the library, versions, audit log, queue and outcome counts."""
    h = c.get("/healthz").json()
    return {"export": c.get("/v1/export").json(), "versions": c.get("/v1/versions").json(),
            "audit": c.get("/v1/audit").json(), "queue": h["queue"], "skills": h["skills"],
            "metrics_arms": [ln for ln in c.get("/metrics").text.splitlines() if ln.startswith("evolving_rl_arm_")]}


def wait_extracted(c: httpx.Client, qid: int, timeout_s: float = 300) -> dict:
    deadline = time.monotonic() + timeout_s
    while (q := c.get(f"/v1/queue/{qid}").json())["state"] == "pending":
        assert time.monotonic() < deadline, f"queued episode {qid} not extracted within {timeout_s} s"
        time.sleep(0.3)
    return q


def test_bad_input_gets_4xx_and_stores_nothing(server):
    c = server.client()
    live = c.post("/v1/episodes", json={"task": "put a clean mug in the coffeemachine"}).json()["episode_id"]
    before = state(c)
    big = "x" * 300_000
    js = {"Content-Type": "application/json"}
    e = f"/v1/episodes/{live}"
    skill = {"name": "find-objects", "description": "Find the target object: search likely places first.",
             "workflow": [{"goal": "find it", "action": "go to each likely place"}]}
    hostile = {**skill, "description": "Find it. <script>fetch('/v1/export')</script>"}
    cases = [
        # (method, path, kwargs, expected status)
        ("POST", "/v1/episodes", {"content": b"{not json", "headers": js}, 400),
        ("POST", "/v1/episodes", {"json": ["a", "list"]}, 422),
        ("POST", "/v1/episodes", {"json": {}}, 422),
        ("POST", "/v1/episodes", {"json": {"task": ""}}, 422),
        ("POST", "/v1/episodes", {"json": {"task": "t" * 2001}}, 422),
        ("POST", "/v1/episodes", {"json": {"task": "ok", "env": "<script>"}}, 422),
        ("POST", "/v1/episodes", {"json": {"task": "ok", "surprise": 1}}, 422),
        ("POST", "/v1/episodes", {"json": {"task": big}}, 413),
        ("POST", "/v1/episodes", {"content": (b"x" * 65536 for _ in range(5)), "headers": js}, 413),  # chunked
        ("POST", f"{e}/act", {"content": b"\xff\xfe", "headers": js}, 400),
        ("POST", f"{e}/act", {"json": {"observation": "o" * 8001}}, 422),
        ("POST", f"{e}/act", {"json": {"observation": "o", "admissible": ["go"] * 257}}, 422),
        ("POST", f"{e}/act", {"json": {"observation": "o", "admissible": ["a" * 301]}}, 422),
        ("POST", f"{e}/act", {"json": {"observation": "o", "admissible": [""]}}, 422),
        ("POST", f"{e}/act", {"json": {"observation": "o", "admissible": [1, {"x": 2}]}}, 422),
        ("POST", f"{e}/act", {"json": {"observation": None}}, 422),
        ("POST", "/v1/episodes/nope/act", {"json": {"observation": "o"}}, 404),
        ("POST", f"{e}/end", {"json": {}}, 422),
        ("POST", f"{e}/end", {"json": {"score": 2.0}}, 422),
        ("POST", f"{e}/end", {"json": {"success": "maybe"}}, 422),
        ("POST", f"{e}/end", {"json": {"success": True, "final_observation": "o" * 8001}}, 422),
        ("POST", "/v1/episodes/" + "z" * 5000 + "/end", {"json": {"success": True}}, 404),
        ("GET", "/v1/queue/abc", {}, 422),
        ("GET", "/v1/queue/0", {}, 422),
        ("GET", "/v1/queue/99999999999999999999999", {}, 422),
        ("GET", "/v1/queue/424242", {}, 404),
        ("GET", "/v1/skills?status=bogus", {}, 422),
        ("GET", "/v1/skills?limit=0", {}, 422),
        ("GET", "/v1/skills?limit=100000", {}, 422),
        ("GET", "/v1/skills?offset=-1", {}, 422),
        ("GET", "/v1/skills/abc", {}, 422),
        ("GET", "/v1/skills/424242", {}, 404),
        ("GET", "/v1/skills/424242/history", {}, 404),
        ("GET", "/v1/versions?limit=0", {}, 422),
        ("GET", "/v1/audit?limit=abc", {}, 422),
        ("POST", "/v1/skills", {"json": {"skill": skill, "task": "t", "reason": "r"}}, 401),
        ("POST", "/v1/skills", {"json": {"skill": skill, "task": "t", "reason": "r"},
                                "headers": {"Authorization": "Bearer wrong"}}, 401),
        ("POST", "/v1/skills", {"json": {"skill": skill, "task": "t", "reason": "r"},
                                "headers": {"Authorization": TOKEN}}, 401),  # no Bearer
        ("POST", "/v1/skills", {"json": {"skill": hostile, "task": "find a mug", "reason": "r"}, "headers": ADMIN}, 422),
        ("POST", "/v1/skills", {"json": {"skill": {"name": "x"}, "task": "t", "reason": "r"}, "headers": ADMIN}, 422),
        ("POST", "/v1/skills", {"json": {"skill": "not a dict", "task": "t", "reason": "r"}, "headers": ADMIN}, 422),
        ("POST", "/v1/skills", {"json": {"skill": {**skill, "description": "é" * 50}, "task": "t", "reason": "r"},
                                "headers": ADMIN}, 422),
        ("POST", "/v1/skills", {"content": big.encode(), "headers": {**ADMIN, **js}}, 413),
        ("POST", "/v1/skills", {"json": {"skill": skill, "task": "t", "reason": "r"},
                                "headers": {**ADMIN, "X-Actor": "<b>eve</b>"}}, 422),
        ("POST", "/v1/skills/1/retire", {"json": {"reason": "r"}}, 401),
        ("POST", "/v1/skills/424242/retire", {"json": {"reason": "r"}, "headers": ADMIN}, 404),
        ("POST", "/v1/skills/424242/restore", {"json": {"reason": "r"}, "headers": ADMIN}, 404),
        ("POST", "/v1/skills/1/retire", {"json": {}, "headers": ADMIN}, 422),
        ("POST", "/v1/versions/1/rollback", {"json": {"reason": "r"}, "headers": {"Authorization": "Bearer x"}}, 401),
        ("POST", "/v1/versions/424242/rollback", {"json": {"reason": "r"}, "headers": ADMIN}, 404),
        ("POST", "/v1/versions/1/rollback", {"json": {"reason": "r" * 501}, "headers": ADMIN}, 422),
        ("GET", "/v1/versions/424242", {}, 404),
        ("DELETE", "/v1/skills/1", {}, 405),
        ("GET", "/etc/passwd", {}, 404),
    ]
    bad = []
    for method, path, kw, want in cases:
        r = c.request(method, path, **kw)
        detail = r.json().get("detail") if r.headers.get("content-type", "").startswith("application/json") else None
        if r.status_code != want or not isinstance(detail, str) or "Traceback" in r.text:
            bad.append(f"{method} {path[:60]} -> {r.status_code} {r.text[:200]} (want {want})")
    assert not bad, "\n".join(bad)
    assert "markup" in c.post("/v1/skills", json={"skill": hostile, "task": "find a mug", "reason": "r"},
                              headers=ADMIN).json()["detail"]
    after = state(c)
    assert after == before  # nothing from a rejected request was stored
    assert c.get("/healthz").json()["live_episodes"] == 1  # the one valid start, still live
    ok = c.post("/v1/episodes", content=(p for p in [b'{"task": "put a mug', b' in the sink"}']), headers=js)
    assert ok.status_code == 200, ok.text  # a small chunked body (no Content-Length) is read whole


def test_rate_limiter_bounds_a_burst():
    from evolving_rl.serve.app import RateLimiter

    rl = RateLimiter(rate=10.0, burst=5)
    assert [rl.allow("a", now=0.0) for _ in range(7)] == [True] * 5 + [False] * 2
    assert rl.allow("b", now=0.0)  # per client
    assert rl.allow("a", now=0.1) and not rl.allow("a", now=0.1)  # 10/s refills one token per 0.1 s
    small = RateLimiter(rate=1.0, burst=1, max_clients=3)
    for i in range(10):
        small.allow(f"c{i}", now=0.0)
    assert len(small.buckets) <= 3


def test_episodes_become_skills_promoted_or_retired_rollback_and_kill9(server, games_dir):
    from evolving_rl.envs.base import make_env, make_suite

    opts = {"games_dir": str(games_dir)}
    suite, env = make_suite("alfworld", opts), make_env("alfworld", opts)
    # One real training game, replayed: greedy decoding makes each arm's episode the same every
    # time, so the test is deterministic. Its first episode (no skill yet) is won in 16 steps
    # and the extractor writes a skill from it; with that skill in its prompt the solver wins in
    # 12 steps. Replays get a 14-step budget, so the skill is the difference between winning and
    # losing: the guardrail must see it in the numbers and promote the skill.
    task = next(t for t in suite.tasks("train") if "Egg-None-CounterTop-25" in t.id)
    c = server.client()
    t0 = time.perf_counter()
    st, end, won = play(c, env, task, max_steps=20)
    assert st["arm"] == "none" and won and end["queued"]
    wait_extracted(c, end["queued"])
    decided, played, arms = None, 1, set()
    while not decided and played < 14:
        st, end, won = play(c, env, task, max_steps=14)
        played += 1
        arms.add(st["arm"])
        assert won == (st["arm"] == "trial")  # the measured effect, episode by episode
        decided = end["status_changes"][0] if end["status_changes"] else None
    assert decided, f"no skill promoted or retired after {played} episodes: {c.get('/v1/skills').text[:2000]}"
    assert arms == {"control", "trial"} and decided["status"] == "promoted"
    print(f"{played} episodes in {time.perf_counter() - t0:.0f} s; {decided}")

    # every skill came from the extractor and entered quarantined; the decision is logged with its numbers
    log = c.get("/v1/audit").json()["audit_log"]
    adds = [e for e in log if e["action"] == "add"]
    assert adds and all(e["actor"] == "extractor" for e in adds)
    sid, status = decided["skill_id"], decided["status"]
    hist = c.get(f"/v1/skills/{sid}/history").json()["audit_log"]
    assert [e["action"] for e in hist] == ["promote" if status == "promoted" else "retire", "add"]
    assert hist[0]["actor"] == "guardrail" and hist[0]["library_version"] == decided["version"]
    d = hist[0]["detail"]
    assert d["uses"] >= 2 and d["ctrl_uses"] >= 2  # measured against its control, not one episode
    assert (d["wins"] / d["uses"] > d["ctrl_wins"] / d["ctrl_uses"]) == (status == "promoted")
    first = c.get(f"/v1/versions/{hist[1]['library_version']}").json()
    assert [r[1] for r in first["lifecycle"] if r[0] == sid] == ["quarantined"]
    sk = c.get(f"/v1/skills/{sid}").json()
    assert sk["status"] == status and sk["ctrl_uses"] >= 2 and "<script" not in sk["card"]

    # rollback to the version before the decision: the library is that version exactly
    v_before = decided["version"] - 1
    want = c.get(f"/v1/versions/{v_before}").json()
    r = c.post(f"/v1/versions/{v_before}/rollback", json={"reason": "test: undo the decision"}, headers=ADMIN)
    assert r.status_code == 200, r.text
    now = c.get("/v1/export").json()
    assert now["skills"] == want["skills"] and now["lifecycle"] == want["lifecycle"]
    assert c.get(f"/v1/skills/{sid}").json()["status"] == "quarantined"
    top = c.get("/v1/audit?limit=1").json()["audit_log"][0]
    assert top["action"] == "rollback" and top["actor"].startswith("admin@127.0.0.1")
    assert top["detail"]["to_version"] == v_before
    assert top["detail"]["counts_set_aside"][str(sid)]["uses"] == d["uses"]  # the evidence it undid stays on record

    # kill -9 while an ended episode is being extracted: after a restart it is extracted
    while c.get("/healthz").json()["extracting"] is not None or c.get("/healthz").json()["queue"]["pending"]:
        time.sleep(0.2)
    other = next(t for t in suite.tasks("train") if t.task_type != task.task_type)  # no skill yet: extracted
    _, end, _ = play(c, env, other, max_steps=4)
    qid = end["queued"]
    deadline = time.monotonic() + 60
    while c.get("/healthz").json()["extracting"] != qid:
        assert time.monotonic() < deadline, "the worker never started extracting the episode"
        time.sleep(0.02)
    server.kill9()
    with sqlite3.connect(server.library) as db:  # the row is still there, still pending
        assert db.execute("SELECT state, attempts FROM episode_queue WHERE id=?", (qid,)).fetchone() == ("pending", 0)
    server.start()
    c = server.client()
    q = wait_extracted(c, qid)
    assert q["state"] == "done" and q["attempts"] == 1 and q["result"] is not None
