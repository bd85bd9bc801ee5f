"""EnvPool: parallel engine workers that survive crashes and hangs (issue 2, item 7)."""

from __future__ import annotations

import gc
import multiprocessing as mp
import os
import signal
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))  # spawned workers inherit sys.path
import _pool_env  # noqa: E402
from _pool_env import toy_task  # noqa: E402

from evolving_rl.envs.base import lookup  # noqa: E402
from evolving_rl.envs.workers import EnvCallError, EnvPool  # noqa: E402

TOY = f"{_pool_env.__name__}:ToyEnv"


def _gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


def _play(pool: EnvPool) -> list:
    """A fixed script: 4 episodes of different lengths, then slot reuse with new tasks."""
    log = []
    log.append(pool.reset([(s, toy_task(f"g{s}")) for s in range(4)]))
    for t in range(3):
        log.append(pool.expert_action([0, 1, 2, 3]))
        log.append(pool.step([(s, ["left", "right", "win"][(s + t) % 3]) for s in range(4) if t < s + 1]))
    pool.release([0, 2])
    log.append(pool.reset([(2, toy_task("g0")), (0, toy_task("g9"))]))
    log.append(pool.step([(0, "right"), (2, "win"), (3, "left")]))
    return log


def test_workers_play_exactly_like_in_process():
    with EnvPool(TOY, {}, num_workers=0) as local:
        expected = _play(local)
    with EnvPool(TOY, {}, num_workers=2, step_timeout_s=30) as pool:
        got = _play(pool)
    assert got == expected
    assert got[-1][0].observation == "g9: right" and got[-1][2].won


def test_slots_are_balanced_and_workers_step_in_parallel():
    with EnvPool(TOY, {"delay": 0.5, "report_pid": True}, num_workers=2, step_timeout_s=30) as pool:
        pool.reset([(s, toy_task(f"g{s}")) for s in range(4)])
        pool.step([(s, "left") for s in range(4)])  # workers warm
        t0 = time.monotonic()
        out = pool.step([(s, "left") for s in range(4)])
        elapsed = time.monotonic() - t0
        pids = [out[s].info["pid"] for s in range(4)]
        assert sorted(pids.count(p) for p in set(pids)) == [2, 2]
        assert set(pids) == set(pool.worker_pids)
        assert elapsed < 1.6, f"4 steps of 0.5 s on 2 workers took {elapsed:.2f}s (serial: 2 s)"


def test_sigkill_mid_episode_is_replayed_on_a_fresh_worker():
    with EnvPool(TOY, {"report_pid": True}, num_workers=2, step_timeout_s=30) as pool:
        pool.reset([(0, toy_task("a")), (1, toy_task("b"))])
        out = pool.step([(0, "left"), (1, "right")])
        out = pool.step([(0, "right"), (1, "left")])
        victim = out[0].info["pid"]
        os.kill(victim, signal.SIGKILL)
        out = pool.step([(0, "win"), (1, "left")])
        assert out[0].observation == "a: left right win" and out[0].won and out[0].done
        assert out[1].observation == "b: right left left" and not out[1].done
        assert out[0].info["pid"] != victim and victim not in pool.worker_pids
        assert pool.stats["restarts"] == 1 and pool.stats["failed_episodes"] == 0


def test_killed_worker_mid_episode_is_counted_as_replayed_episodes():
    """Recovery must be visible: a worker killed mid-episode costs a restart and one replayed
    episode per live episode it held (two here), while the episodes themselves play on."""
    with EnvPool(TOY, {"report_pid": True}, num_workers=2, step_timeout_s=30) as pool:
        pool.reset([(s, toy_task(f"t{s}")) for s in range(4)])
        out = pool.step([(s, "left") for s in range(4)])
        victim = out[0].info["pid"]
        held = [s for s in range(4) if out[s].info["pid"] == victim]
        assert len(held) == 2
        os.kill(victim, signal.SIGKILL)
        out = pool.step([(s, "right") for s in range(4)])
        assert all(out[s].observation == f"t{s}: left right" for s in range(4))
        # retried_episodes is 0 or 1: whether the pipe still took the call before the kill landed
        # decides if the episode in flight is blamed (a strike); replays are counted either way.
        assert pool.stats["restarts"] == 1 and pool.stats["replayed_episodes"] == 2
        assert pool.stats["failed_episodes"] == 0 and pool.stats["env_errors"] == 0


def test_hung_worker_is_killed_and_the_step_redone(tmp_path):
    marker = tmp_path / "hung-once"
    with EnvPool(TOY, {}, num_workers=2, step_timeout_s=3.0) as pool:
        pool.reset([(0, toy_task("h", hang_once_at=2, marker=str(marker))), (1, toy_task("ok"))])
        pool.step([(0, "left"), (1, "left")])
        t0 = time.monotonic()
        out = pool.step([(0, "right"), (1, "win")])
        assert marker.exists(), "the env never hung: the test tests nothing"
        assert time.monotonic() - t0 < 30
        assert out[0].observation == "h: left right" and "error" not in out[0].info
        assert out[1].won
        assert pool.stats["restarts"] == 1 and pool.stats["retried_episodes"] == 1


def test_slot_that_always_crashes_fails_after_one_retry_and_spares_the_others():
    with EnvPool(TOY, {}, num_workers=2, step_timeout_s=30) as pool:
        tasks = {s: toy_task(f"t{s}") for s in range(4)}
        tasks[2] = toy_task("doomed", crash_at=2)
        pool.reset(list(tasks.items()))
        pool.step([(s, "left") for s in range(4)])
        out = pool.step([(s, "right") for s in range(4)])
        assert out[2].done and out[2].admissible is None and "doomed" in out[2].info["error"]
        for s in (0, 1, 3):
            assert out[s].observation == f"t{s}: left right" and "error" not in out[s].info
        assert pool.stats == {"restarts": 2, "replayed_episodes": 3, "retried_episodes": 1, "failed_episodes": 1,
                              "env_errors": 0}
        # the failed slot keeps answering the failure; the others play on; the slot is reusable
        out = pool.step([(2, "win"), (0, "win")])
        assert "error" in out[2].info and out[0].won
        assert pool.expert_action([2, 1]) == {2: None, 1: "win"}
        pool.release([2])
        assert pool.reset([(2, toy_task("fresh"))])[2].observation == "fresh: "


class _Interrupted(Exception):
    pass


def test_interrupted_call_leaves_no_stale_answers_behind():
    """Ctrl-C mid-call: the next call must not read the old call's answers as its own."""

    def interrupt(*_):
        raise _Interrupted

    old = signal.signal(signal.SIGALRM, interrupt)
    try:
        with EnvPool(TOY, {"delay": 0.6}, num_workers=2, step_timeout_s=30) as pool:
            pool.reset([(0, toy_task("a")), (1, toy_task("b"))])
            pool.step([(0, "left"), (1, "left")])
            signal.setitimer(signal.ITIMER_REAL, 0.2)
            with pytest.raises(_Interrupted):
                pool.step([(0, "right"), (1, "right")])
            out = pool.step([(0, "win"), (1, "win")])
            assert out[0].observation == "a: left win" and out[1].observation == "b: left win"
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


@pytest.mark.parametrize("num_workers", [0, 2])
def test_env_exception_is_reraised_naming_slot_and_task(num_workers):
    with EnvPool(TOY, {}, num_workers=num_workers, step_timeout_s=30) as pool:
        with pytest.raises(EnvCallError, match=r"slot 1 \(task 'broken'.*corrupt game file toy/broken") as err:
            pool.reset([(0, toy_task("fine")), (1, toy_task("broken", corrupt=True))])
        assert err.value.task.id == "broken" and err.value.results[0].observation == "fine: "
        assert pool.stats["restarts"] == 0 and pool.stats["env_errors"] == 1
        assert pool.step([(0, "win")])[0].won
        with pytest.raises(ValueError, match="no live episode"):
            pool.step([(1, "left")])


def test_close_and_garbage_collection_leave_no_child_processes():
    pool = EnvPool(TOY, {}, num_workers=2, step_timeout_s=30)
    pool.reset([(0, toy_task("x"))])
    pids = pool.worker_pids
    pool.close()
    assert all(_gone(p) for p in pids)
    with pytest.raises(RuntimeError, match="closed"):
        pool.step([(0, "left")])
    forgotten = EnvPool(TOY, {}, num_workers=1, step_timeout_s=30)
    forgotten.reset([(0, toy_task("y"))])
    pids = forgotten.worker_pids
    del forgotten
    gc.collect()
    assert all(_gone(p) for p in pids)
    assert not [p for p in mp.active_children() if p.name.startswith("evolving-rl-env")]


def test_import_path_names_are_checked():
    env_factory, _ = lookup(TOY)
    assert env_factory is _pool_env.ToyEnv
    with pytest.raises(ValueError, match="cannot import module 'no_such_module_xyz'"):
        lookup("no_such_module_xyz:Env")
    with pytest.raises(ValueError, match="has no attribute 'Nope'"):
        lookup(f"{_pool_env.__name__}:Nope")
    with pytest.raises(ValueError, match="names no task suite"):
        lookup(TOY)[1]({})


@pytest.mark.slow
def test_real_alfworld_episode_survives_a_killed_worker(tmp_path):
    """Replay on ALFWorld's own engine: after the kill the episode must be in the very state an
    unbroken in-process run reaches with the same actions (winning alone would not show it:
    the expert replans from wherever it is)."""
    from evolving_rl.envs.alfworld import AlfworldSuite
    from evolving_rl.envs.alfworld_gen import generate_games

    options = {"games_dir": str(tmp_path / "games")}
    generate_games(tmp_path / "games", seed=3, sizes={"train": 1}, workers=1)
    (task,) = AlfworldSuite(options).tasks("train")
    with EnvPool("alfworld", options, num_workers=1, step_timeout_s=120) as pool:
        seen = [pool.reset([(0, task)])[0].observation]
        actions = []
        for k in range(50):
            if k == 3:
                os.kill(pool.worker_pids[0], signal.SIGKILL)
            actions.append(pool.expert_action([0])[0])
            assert actions[-1] is not None, f"the expert lost its plan at step {k}: {seen[-1]!r}"
            last = pool.step([(0, actions[-1])])[0]
            assert "error" not in last.info, last.info
            seen.append(last.observation)
            if last.done:
                break
        assert last.won, f"not won after {k + 1} steps: {seen[-1]!r}"
        assert pool.stats["restarts"] == 1 and pool.stats["failed_episodes"] == 0
    with EnvPool("alfworld", options, num_workers=0) as local:
        unbroken = [local.reset([(0, task)])[0].observation]
        unbroken += [local.step([(0, a)])[0].observation for a in actions]
    assert seen == unbroken
