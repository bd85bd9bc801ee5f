"""RayEnvPool: the process pool's contract over Ray actors on a local cluster (issue 17).

Same script, same answers, same counters as `EnvPool`; a killed actor is replaced and its
episode replayed; real engines (TextWorld-Express, ALFWorld) play their gold paths through it
to the very observations the process pool produces.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path

import pytest

ray = pytest.importorskip("ray", reason="ray not installed (pip install torch==2.13.0 -e '.[ray]')")

sys.path.insert(0, str(Path(__file__).parent))
import _pool_env  # noqa: E402
from _env_helpers import play  # noqa: E402
from _pool_env import toy_task  # noqa: E402
from test_workers import _play  # noqa: E402  (the process pool's fixed script)

from evolving_rl.envs.pool import Pool  # noqa: E402
from evolving_rl.envs.ray_pool import RayEnvPool  # noqa: E402
from evolving_rl.envs.workers import EnvCallError, EnvPool  # noqa: E402
from evolving_rl.types import Task  # noqa: E402

TOY = f"{_pool_env.__name__}:ToyEnv"


@pytest.fixture(scope="module", autouse=True)
def local_cluster():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def test_plays_exactly_like_the_process_pool():
    with EnvPool(TOY, {}, num_workers=2, step_timeout_s=30) as procs:
        expected = _play(procs)
        expected_stats = dict(procs.stats)
    with RayEnvPool(TOY, {}, num_workers=2, step_timeout_s=30) as pool:
        assert isinstance(pool, Pool)
        got = _play(pool)
        assert pool.stats == expected_stats == {"restarts": 0, "replayed_episodes": 0, "retried_episodes": 0,
                                                "failed_episodes": 0, "env_errors": 0}
    assert got == expected
    assert got[-1][0].observation == "g9: right" and got[-1][2].won


def test_slots_spread_over_both_actors_and_step_in_parallel():
    with RayEnvPool(TOY, {"delay": 0.5, "report_pid": True}, num_workers=2, step_timeout_s=30) as pool:
        pool.reset([(s, toy_task(f"g{s}")) for s in range(4)])
        pool.step([(s, "left") for s in range(4)])
        t0 = time.monotonic()
        out = pool.step([(s, "left") for s in range(4)])
        elapsed = time.monotonic() - t0
        pids = [out[s].info["pid"] for s in range(4)]
        assert sorted(pids.count(p) for p in set(pids)) == [2, 2]
        assert set(pids) == set(pool.worker_pids)
        assert elapsed < 1.6, f"4 steps of 0.5 s on 2 actors took {elapsed:.2f}s (serial: 2 s)"


def test_killed_actor_is_replaced_and_its_episode_replayed():
    with RayEnvPool(TOY, {"report_pid": True}, num_workers=2, step_timeout_s=30) as pool:
        pool.reset([(0, toy_task("a")), (1, toy_task("b"))])
        pool.step([(0, "left"), (1, "right")])
        out = pool.step([(0, "right"), (1, "left")])
        victim = out[0].info["pid"]
        os.kill(victim, signal.SIGKILL)  # between calls: no episode's fault
        out = pool.step([(0, "win"), (1, "left")])
        assert out[0].observation == "a: left right win" and out[0].won and out[0].done
        assert out[1].observation == "b: right left left" and not out[1].done
        assert out[0].info["pid"] != victim and victim not in pool.worker_pids
        assert pool.stats == {"restarts": 1, "replayed_episodes": 1, "retried_episodes": 0, "failed_episodes": 0,
                              "env_errors": 0}


def test_crash_counts_match_the_process_pool():
    """An episode whose engine kills its worker at step 2 every time: retried once, then failed,
    the other slots untouched; both pools must count it the same way."""
    def script(pool):
        tasks = {s: toy_task(f"t{s}") for s in range(4)}
        tasks[2] = toy_task("doomed", crash_at=2)
        pool.reset(list(tasks.items()))
        pool.step([(s, "left") for s in range(4)])
        out = pool.step([(s, "right") for s in range(4)])
        later = pool.step([(2, "win"), (0, "win")])
        return _plain(out), _plain(later), pool.expert_action([2, 1]), dict(pool.stats)

    with EnvPool(TOY, {}, num_workers=2, step_timeout_s=30) as procs:
        expected = script(procs)
    with RayEnvPool(TOY, {}, num_workers=2, step_timeout_s=30) as pool:
        out, later, expert, stats = script(pool)
        pool.release([2])
        assert pool.reset([(2, toy_task("fresh"))])[2].observation == "fresh: "
    assert (out, later, expert, stats) == expected
    assert out[2] == ("", None, True, False, "doomed") and later[2] == out[2]
    assert all(out[s] == (f"t{s}: left right", ["left", "right", "win"], False, False, "") for s in (0, 1, 3))
    assert stats == {"restarts": 2, "replayed_episodes": 3, "retried_episodes": 1, "failed_episodes": 1, "env_errors": 0}


def test_hung_actor_is_killed_and_the_step_redone(tmp_path):
    marker = tmp_path / "hung-once"
    with RayEnvPool(TOY, {}, num_workers=2, step_timeout_s=3.0) as pool:
        pool.reset([(0, toy_task("h", hang_once_at=2, marker=str(marker))), (1, toy_task("ok"))])
        pool.step([(0, "left"), (1, "left")])
        t0 = time.monotonic()
        out = pool.step([(0, "right"), (1, "win")])
        assert marker.exists(), "the env never hung: the test tests nothing"
        assert time.monotonic() - t0 < 30
        assert out[0].observation == "h: left right" and "error" not in out[0].info
        assert out[1].won
        assert pool.stats["restarts"] == 1 and pool.stats["retried_episodes"] == 1


def test_env_exception_is_the_pools_error_naming_slot_and_task():
    with RayEnvPool(TOY, {}, num_workers=2, step_timeout_s=30) as pool:
        with pytest.raises(EnvCallError, match=r"slot 1 \(task 'broken'.*corrupt game file toy/broken") as err:
            pool.reset([(0, toy_task("fine")), (1, toy_task("broken", corrupt=True))])
        assert err.value.results[0].observation == "fine: " and "EnvError" in err.value.worker_traceback
        assert pool.stats["restarts"] == 0 and pool.stats["env_errors"] == 1
        assert pool.step([(0, "win")])[0].won


def test_close_kills_the_actors_and_bad_sizes_are_named():
    pool = RayEnvPool(TOY, {}, num_workers=2, step_timeout_s=30)
    pool.reset([(0, toy_task("x"))])
    pids = pool.worker_pids
    pool.close()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and not all(_gone(p) for p in pids):
        time.sleep(0.1)
    assert all(_gone(p) for p in pids)
    with pytest.raises(RuntimeError, match="closed"):
        pool.step([(0, "left")])
    with pytest.raises(ValueError, match="num_workers must be >= 1"):
        RayEnvPool(TOY, {}, num_workers=0)


def _plain(results: dict) -> dict:
    """Answers without the transport's wording of a crash (exit code vs actor error): the
    failed slot keeps only whose episode it was."""
    return {
        s: (r.observation, r.admissible, r.done, r.won, "doomed" if "doomed" in r.info.get("error", "") else "")
        for s, r in results.items()
    }


def _gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


# ---- real engines -----------------------------------------------------------------------


def _gold_through(pool, tasks: list[Task], gold: dict[int, list[str]], kill_at: int | None = None):
    """Play each slot's recorded actions through `pool`, all slots per call; observations per slot."""
    seen = {s: [r.observation] for s, r in pool.reset(list(enumerate(tasks))).items()}
    last = {}
    for t in range(max(map(len, gold.values()))):
        if t == kill_at:
            os.kill(pool.worker_pids[0], signal.SIGKILL)
        out = pool.step([(s, gold[s][t]) for s in gold if t < len(gold[s])])
        for s, r in out.items():
            seen[s].append(r.observation)
        last.update(out)
    return seen, last


@pytest.mark.slow
def test_textworld_express_gold_paths_identical_to_the_process_pool():
    pytest.importorskip("textworld_express", reason="textworld-express not installed")
    from evolving_rl.envs.twx import TWXEnv

    name = "evolving_rl.envs.twx:TWXEnv:TWXSuite"
    tasks = [Task(id=f"twx/{loc}", split="train", task_type=loc.split("/")[0], description="", locator=loc, env="twx")
             for loc in ("cookingworld/train/11", "coin/train/3", "mapreader/train/5", "twc/test/20005")]
    env = TWXEnv({})
    try:
        gold = {s: play(env, t)[0] for s, t in enumerate(tasks)}
    finally:
        env.close()
    with EnvPool(name, {}, num_workers=2, step_timeout_s=60) as procs:
        expected, _ = _gold_through(procs, tasks, gold)
    with RayEnvPool(name, {}, num_workers=2, step_timeout_s=60) as pool:
        seen, last = _gold_through(pool, tasks, gold, kill_at=2)
        # the killed actor held two of the four slots (never released here): both are replayed
        assert pool.stats == {"restarts": 1, "replayed_episodes": 2, "retried_episodes": 0, "failed_episodes": 0,
                              "env_errors": 0}
    assert all(last[s].won for s in gold), {s: last[s].observation for s in last}
    assert seen == expected


@pytest.mark.slow
def test_alfworld_gold_play_through_ray_matches_the_process_pool(games_dir):
    from evolving_rl.envs.alfworld import AlfworldSuite

    options = {"games_dir": str(games_dir)}
    tasks = AlfworldSuite(options).tasks("train")[:2]
    gold: dict[int, list[str]] = {}
    with EnvPool("alfworld", options, num_workers=0) as local:
        for s, task in enumerate(tasks):
            local.reset([(0, task)])
            actions, r = [], None
            while r is None or not r.done:
                a = local.expert_action([0])[0]
                assert a is not None, f"{task.id}: the expert gave up after {actions}"
                actions.append(a)
                r = local.step([(0, a)])[0]
            assert r.won
            gold[s] = actions
            local.release([0])
    with EnvPool("alfworld", options, num_workers=2, step_timeout_s=120) as procs:
        expected, _ = _gold_through(procs, tasks, gold)
    with RayEnvPool("alfworld", options, num_workers=2, step_timeout_s=120) as pool:
        seen, last = _gold_through(pool, tasks, gold, kill_at=3)
        assert pool.stats["restarts"] == 1 and pool.stats["failed_episodes"] == 0
    assert all(last[s].won for s in gold)
    assert seen == expected
