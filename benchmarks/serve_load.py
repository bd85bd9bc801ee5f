"""Load test of `evolving-rl serve`: many concurrent episodes on localhost, bounded in count and time.

Starts a real server (the shipped tiny checkpoint, a fresh library in a temporary directory,
a free 127.0.0.1 port) unless --url is given, then runs --sessions concurrent callers. Each
caller plays --episodes episodes of up to --steps actions, replaying the observations and
admissible actions of real TextWorld-Express games (recorded once from the gold paths), so
what is measured is the service (batching, prompts, policy calls), not a caller's engine.

    python benchmarks/serve_load.py --sessions 32 --episodes 2 --steps 8

Prints p50/p95/p99 latency of an action request, actions/s, episodes/s and the count of
failed requests (any non-2xx answer counts as a failure).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def record_games(n_tasks: int, steps: int) -> list[dict]:
    """(task, [(observation, admissible)]) of real TWX games along their gold paths."""
    from evolving_rl.envs.base import make_env, make_suite

    opts = {"tasks_per_game": 2}
    suite, env = make_suite("twx", opts), make_env("twx", opts)
    games = []
    try:
        for task in suite.tasks(suite.splits()[0])[:n_tasks]:
            r = env.reset(task)
            seq = [(r.observation, r.admissible)]
            while not r.done and len(seq) < steps:
                a = env.expert_action()
                if a is None:
                    break
                r = env.step(a)
                seq.append((r.observation, r.admissible))
            games.append({"task": task.description, "task_type": task.task_type, "steps": seq})
    finally:
        env.close()
    return games


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(lib: Path, overrides: list[str]) -> tuple[subprocess.Popen, str]:
    import httpx

    port = free_port()
    cmd = [sys.executable, "-m", "evolving_rl.cli", "serve", "-c", str(REPO / "configs" / "quickstart.yaml"),
           f"model.path={REPO / 'checkpoints' / 'tiny-alfworld-sft'}", f"serve.port={port}", f"serve.library={lib}",
           *overrides]
    log = open(lib.parent / "server.log", "w")
    proc = subprocess.Popen(cmd, cwd=lib.parent, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"server exited: {(lib.parent / 'server.log').read_text()[-2000:]}")
        try:
            if httpx.get(f"{url}/healthz", timeout=2).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    proc.kill()
    raise SystemExit("server not up after 240 s")


async def caller(client, games: list[dict], k: int, episodes: int, lat: list[float], fails: list[str], deadline: float):
    for e in range(episodes):
        g = games[(k + e) % len(games)]
        r = await client.post("/v1/episodes", json={"task": g["task"], "env": "twx", "task_type": g["task_type"]})
        if r.status_code != 200:
            fails.append(f"start {r.status_code} {r.text[:100]}")
            continue
        eid = r.json()["episode_id"]
        for obs, adm in g["steps"]:
            if time.monotonic() > deadline:
                return
            t0 = time.perf_counter()
            r = await client.post(f"/v1/episodes/{eid}/act", json={"observation": obs, "admissible": adm})
            lat.append(time.perf_counter() - t0)
            if r.status_code != 200:
                fails.append(f"act {r.status_code} {r.text[:100]}")
        r = await client.post(f"/v1/episodes/{eid}/end", json={"success": k % 2 == 0, "score": 0.5})
        if r.status_code != 200:
            fails.append(f"end {r.status_code} {r.text[:100]}")


async def run(url: str, games: list[dict], sessions: int, episodes: int, time_limit: float) -> dict:
    import httpx

    lat: list[float] = []
    fails: list[str] = []
    limits = httpx.Limits(max_connections=sessions + 4, max_keepalive_connections=sessions + 4)
    async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits) as client:
        t0 = time.perf_counter()
        deadline = time.monotonic() + time_limit
        await asyncio.gather(*(caller(client, games, k, episodes, lat, fails, deadline) for k in range(sessions)))
        wall = time.perf_counter() - t0
    lat.sort()
    q = statistics.quantiles(lat, n=100) if len(lat) >= 2 else [float("nan")] * 99
    return {"sessions": sessions, "actions": len(lat), "episodes": sessions * episodes, "wall_s": wall,
            "p50_ms": 1000 * q[49], "p95_ms": 1000 * q[94], "p99_ms": 1000 * q[98],
            "actions_per_s": len(lat) / wall, "episodes_per_s": sessions * episodes / wall, "failed": len(fails),
            "failures": fails[:5]}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--url", help="An already running server (default: start one on a free localhost port).")
    ap.add_argument("--sessions", type=int, default=32, help="Concurrent callers (>= 32 for the issue's check).")
    ap.add_argument("--episodes", type=int, default=2, help="Episodes per caller.")
    ap.add_argument("--steps", type=int, default=8, help="Actions per episode at most.")
    ap.add_argument("--time-limit", type=float, default=300.0, help="Stop sending after this many seconds.")
    ap.add_argument("--extract", action="store_true", help="Let the server extract skills meanwhile (slower actions).")
    ap.add_argument("overrides", nargs="*", help="Server config overrides, e.g. serve.batch_wait_ms=10")
    a = ap.parse_args(argv)
    if not 1 <= a.sessions <= 512 or not 1 <= a.episodes <= 100 or not 1 <= a.steps <= 100:
        ap.error("bounds: --sessions 1..512, --episodes 1..100, --steps 1..100")
    games = record_games(8, a.steps)
    proc = None
    with tempfile.TemporaryDirectory() as tmp:
        url = a.url
        if url is None:
            over = [f"serve.extract={'true' if a.extract else 'false'}", f"serve.max_sessions={max(512, a.sessions)}",
                    "serve.rate_per_s=100000", "serve.rate_burst=100000", *a.overrides]
            proc, url = start_server(Path(tmp) / "skills.sqlite", over)
        try:
            asyncio.run(run(url, games[:2], 2, 1, 60))  # warm-up: first calls compile and fill caches
            res = asyncio.run(run(url, games, a.sessions, a.episodes, a.time_limit))
        finally:
            if proc is not None:
                proc.terminate()
                proc.wait(30)
    print(f"{'sessions':>8} {'actions':>8} {'p50 ms':>8} {'p95 ms':>8} {'p99 ms':>8} {'act/s':>7} {'ep/s':>6} "
          f"{'failed':>6} {'wall s':>7}")
    print(f"{res['sessions']:>8} {res['actions']:>8} {res['p50_ms']:>8.0f} {res['p95_ms']:>8.0f} {res['p99_ms']:>8.0f} "
          f"{res['actions_per_s']:>7.1f} {res['episodes_per_s']:>6.2f} {res['failed']:>6} {res['wall_s']:>7.1f}")
    for f in res["failures"]:
        print("failure:", f)
    return 1 if res["failed"] else 0


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    raise SystemExit(main())
