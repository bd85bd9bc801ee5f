"""Engine worker processes: many episodes step at once, and a crashed or hung engine costs one
retried episode, never a hang or a lost batch (issue 2, item 7).

Why processes: ALFWorld's engine is pure Python (~10-17 steps/s, resets 0.2-3 s), so the
rollout engine keeps many episodes ("slots") live and spreads their env calls over worker
processes; one call fans out to every worker at once and gathers the answers.

Why replay: engines are deterministic for a given game, so the parent only has to remember
each slot's task and the actions sent so far to rebuild its episode on a fresh worker when the
old one dies or goes silent. A crash is blamed on the episode the worker was busy with (a
worker plays its slots in order); that episode is retried once, then reported as failed.
An exception raised *by an env* (a corrupt game, say) is a property of the task, not of the
process: it is re-raised in the parent, never retried.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import signal
import time
import traceback
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from multiprocessing.connection import Connection, wait
from typing import Any

from evolving_rl.envs.base import Env, lookup, make_env
from evolving_rl.envs.pool import PoolError
from evolving_rl.types import StepResult, Task

# One unit of work for a worker: (kind, slot, argument). Kinds: reset (Task), step (action),
# expert (None), release (None), replay ((Task, actions)).
Op = tuple[str, int, Any]


EnvCallError = PoolError  # the Pool contract's error (envs/pool.py), under the name this module always used


class _EnvHost:
    """The envs of one process: one per live slot, plus idle ones kept for the next task.

    Env objects play game after game and cache per-game costs, so a released env is reused,
    preferably for the same game it last played.
    """

    def __init__(self, env_name: str, options: dict[str, Any]) -> None:
        self.env_name, self.options = env_name, options
        self.live: dict[int, tuple[str, Env]] = {}  # slot -> (locator, env)
        self.idle: list[tuple[str, Env]] = []

    def _env_for(self, slot: int, task: Task) -> Env:
        if slot in self.live:
            env = self.live[slot][1]
        else:
            same = [i for i, (loc, _) in enumerate(self.idle) if loc == task.locator]
            if same:
                env = self.idle.pop(same[0])[1]
            elif self.idle:
                env = self.idle.pop()[1]
            else:
                env = make_env(self.env_name, self.options)
        self.live[slot] = (task.locator, env)
        return env

    def handle(self, kind: str, slot: int, arg: Any, tick: Callable[[], None] | None = None) -> Any:
        if kind == "reset":
            return self._env_for(slot, arg).reset(arg)
        if kind == "replay":
            task, actions = arg
            env = self._env_for(slot, task)
            result = env.reset(task)
            for action in actions:
                if tick:
                    tick()
                result = env.step(action)
            return result
        if kind == "release":
            if slot in self.live:
                self.idle.append(self.live.pop(slot))
            return None
        if slot not in self.live:
            raise KeyError(f"slot {slot} has no live episode in this worker")
        env = self.live[slot][1]
        if kind == "step":
            return env.step(arg)
        if kind == "expert":
            return env.expert_action()
        raise ValueError(f"unknown op {kind!r}")

    def discard(self, slot: int) -> None:
        """After an env raised, its state is unknown: drop it rather than reuse it."""
        _, env = self.live.pop(slot, ("", None))
        if env is not None:
            try:
                env.close()
            except Exception:
                pass

    def close(self) -> None:
        for _, env in [*self.live.values(), *self.idle]:
            try:
                env.close()
            except Exception:
                pass
        self.live.clear()
        self.idle.clear()


def _worker_main(conn: Connection, env_name: str, options: dict[str, Any]) -> None:
    # The parent owns Ctrl-C and shutdown; engines here are single-threaded Python.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ[var] = "1"
    host = _EnvHost(env_name, options)
    try:
        while True:
            try:
                ops = conn.recv()
            except (EOFError, OSError):  # parent gone
                return
            if ops is None:
                return
            for kind, slot, arg in ops:
                try:
                    value = host.handle(kind, slot, arg, tick=lambda: conn.send(("tick", slot, None)))
                    conn.send(("ok", slot, value))
                except Exception as e:
                    host.discard(slot)
                    conn.send(("error", slot, (f"{type(e).__name__}: {e}", traceback.format_exc())))
    finally:
        host.close()


class _Worker:
    def __init__(self, ctx: Any, env_name: str, options: dict[str, Any], index: int) -> None:
        self.conn, child = ctx.Pipe()
        self.process = ctx.Process(
            target=_worker_main, args=(child, env_name, options), daemon=True, name=f"evolving-rl-env-{index}"
        )
        self.process.start()
        child.close()

    def kill(self) -> None:
        if self.process.is_alive():
            self.process.kill()
        self.process.join()
        self.conn.close()


def _shutdown(workers: list[_Worker], host: _EnvHost | None, grace_s: float = 3.0) -> None:
    for w in workers:
        try:
            w.conn.send(None)
        except (OSError, ValueError):
            pass
    deadline = time.monotonic() + grace_s
    for w in workers:
        w.process.join(max(0.0, deadline - time.monotonic()))
        w.kill()
    workers.clear()
    if host is not None:
        host.close()


@dataclass
class _Slot:
    task: Task
    worker: int
    started: bool = False  # its reset succeeded, so it can be replayed
    actions: list[str] = field(default_factory=list)
    last_observation: str = ""
    strikes: int = 0  # crashes blamed on this episode


class EnvPool:
    """Live episodes ("slots") played in `num_workers` engine processes (0: in this process).

    Each call takes one request per slot, fans out to the workers at once and returns
    {slot: answer}. A slot stays on its worker for the whole episode. A slot that failed (its
    worker crashed or hung twice while on it) answers `StepResult("", None, done=True,
    info={"error": ...})` until released. Call `release` when an episode ends.

    Recovery is silent to the caller, so `stats` counts it: `restarts` (workers replaced after
    dying, hanging or breaking their pipe), `replayed_episodes` (live episodes rebuilt on a
    replacement by replaying their actions), `retried_episodes` (episodes blamed for a crash
    and given their one retry), `failed_episodes` (given up: a second crash, or a replay that
    diverged or raised) and `env_errors` (an env raised: the task's fault, re-raised).
    """

    def __init__(
        self,
        env_name: str,
        options: dict[str, Any],
        num_workers: int = 2,
        step_timeout_s: float = 120.0,
        start_method: str = "spawn",
    ) -> None:
        if num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got {num_workers}")
        if step_timeout_s <= 0:
            raise ValueError(f"step_timeout_s must be > 0, got {step_timeout_s}")
        lookup(env_name)  # an unknown name fails here, not in every worker
        self.env_name, self.options = env_name, dict(options)
        self.num_workers, self.step_timeout_s = num_workers, step_timeout_s
        self.stats = {"restarts": 0, "replayed_episodes": 0, "retried_episodes": 0, "failed_episodes": 0,
                      "env_errors": 0}
        self._slots: dict[int, _Slot] = {}
        self._failed: dict[int, StepResult] = {}  # slot -> its failure answer, until released
        self._home: dict[int, int] = {}  # last worker of each slot id: its env may be idle there
        self._stale: set[int] = set()  # restarted after an interrupted call: rebuild before use
        self._host = _EnvHost(env_name, self.options) if num_workers == 0 else None
        self._ctx = mp.get_context(start_method)
        self._workers = [self._spawn(i) for i in range(num_workers)]
        self._closed = False
        self._finalizer = weakref.finalize(self, _shutdown, self._workers, self._host)

    # ---- public API -------------------------------------------------------------------

    @property
    def worker_pids(self) -> list[int]:
        return [w.process.pid for w in self._workers]

    def reset(self, requests: list[tuple[int, Task]]) -> dict[int, StepResult]:
        self._check(requests)
        for slot, task in requests:
            if not isinstance(task, Task):
                raise TypeError(f"reset: slot {slot}: expected a Task, got {type(task).__name__}")
        self.release([slot for slot, _ in requests if slot in self._failed])
        load = [0] * max(1, self.num_workers)
        for s in self._slots.values():
            load[s.worker] += 1
        for slot, task in requests:
            if slot in self._slots:
                worker = self._slots[slot].worker
            else:
                home = self._home.get(slot)
                worker = min(range(len(load)), key=lambda w: (load[w], w != home, w))
                load[worker] += 1
            self._slots[slot] = _Slot(task=task, worker=worker)
            self._home[slot] = worker
        return self._call([("reset", slot, task) for slot, task in requests])

    def step(self, requests: list[tuple[int, str]]) -> dict[int, StepResult]:
        self._check(requests)
        out = {slot: self._failed[slot] for slot, _ in requests if slot in self._failed}
        ops = [("step", slot, action) for slot, action in requests if slot not in self._failed]
        self._require_live(ops)
        out.update(self._call(ops))
        return out

    def expert_action(self, slots: list[int]) -> dict[int, str | None]:
        self._check([(s, None) for s in slots])
        out: dict[int, str | None] = {s: None for s in slots if s in self._failed}
        ops = [("expert", s, None) for s in slots if s not in self._failed]
        self._require_live(ops)
        # a slot that failed during this very call answers None, like one that failed before
        out.update({s: None if isinstance(v, StepResult) else v for s, v in self._call(ops).items()})
        return out

    def release(self, slots: list[int]) -> None:
        self._check([(s, None) for s in slots])
        ops = []
        for slot in slots:
            if slot in self._slots:
                ops.append(("release", slot, None))
                del self._slots[slot]
            elif slot in self._failed:
                ops.append(("release", slot, None))  # its worker may still hold the env
        self._call(ops, workers={op[1]: self._home[op[1]] for op in ops})
        for slot in slots:
            self._failed.pop(slot, None)

    def close(self) -> None:
        self._closed = True
        self._finalizer()

    def __enter__(self) -> EnvPool:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # ---- plumbing ---------------------------------------------------------------------

    def _check(self, requests: list[tuple[int, Any]]) -> None:
        if self._closed:
            raise RuntimeError("EnvPool is closed")
        slots = [slot for slot, _ in requests]
        if len(set(slots)) != len(slots):
            raise ValueError(f"a slot appears twice in one request: {sorted(slots)}")

    def _require_live(self, ops: list[Op]) -> None:
        missing = [slot for _, slot, _ in ops if slot not in self._slots]
        if missing:
            raise ValueError(f"slots {missing} have no live episode: reset them first")

    def _call(self, ops: list[Op], workers: dict[int, int] | None = None) -> dict[int, Any]:
        results: dict[int, Any] = {}
        errors: list[tuple[Op, Task | None, str, str]] = []
        if self._host is not None:
            for op in ops:
                try:
                    self._accept(op, self._host.handle(*op), results)
                except Exception as e:
                    self._reject(op, (f"{type(e).__name__}: {e}", traceback.format_exc()), results, errors)
                    self._host.discard(op[1])
        else:
            jobs: dict[int, list[Op]] = {w: self._replays(w, set()) for w in self._stale}
            self._stale.clear()
            for op in ops:
                w = workers[op[1]] if workers else self._slots[op[1]].worker
                jobs.setdefault(w, []).append(op)
            restarted: set[int] = set()
            while jobs:  # a round per recovery: crashed workers come back with their replays
                try:
                    crashed = self._exchange(jobs, results, errors, restarted)
                except BaseException:  # Ctrl-C mid-call: answers still in flight would be misread later
                    for w in jobs:
                        self._restart(w)
                        self._stale.add(w)
                    raise
                jobs = {w: self._recover(w, left, reason, blame, results) for w, (left, reason, blame) in crashed.items()}
                jobs = {w: left for w, left in jobs.items() if left}
                restarted |= set(jobs)
        if errors:
            self._raise(errors, results)
        return results

    def _exchange(
        self, jobs: dict[int, list[Op]], results: dict, errors: list, restarted: set[int]
    ) -> dict[int, tuple[list[Op], str, bool]]:
        """Send every worker its ops at once; gather answers until done, dead or silent too long.

        A worker found dead before it got anything is no episode's fault, unless we restarted it
        during this call (a worker that cannot even start must still use up the retries).
        """
        crashed: dict[int, tuple[list[Op], str, bool]] = {}
        pending: dict[int, list[Op]] = {}
        for w, ops in jobs.items():
            worker = self._workers[w]
            if not worker.process.is_alive():
                crashed[w] = (ops, f"worker exited (code {worker.process.exitcode}) before the call", w in restarted)
                continue
            try:
                worker.conn.send(ops)
                pending[w] = list(ops)
            except (OSError, ValueError) as e:
                crashed[w] = (ops, f"worker pipe broke ({type(e).__name__})", True)
        deadline = {w: time.monotonic() + self.step_timeout_s for w in pending}
        while pending:
            by_conn = {self._workers[w].conn: w for w in pending}
            timeout = max(0.0, min(deadline[w] for w in pending) - time.monotonic())
            for conn in wait(list(by_conn), timeout):
                w = by_conn[conn]
                try:
                    kind, slot, value = conn.recv()
                except (EOFError, OSError):
                    self._workers[w].process.join(1.0)
                    code = self._workers[w].process.exitcode
                    crashed[w] = (pending.pop(w), f"worker died (exit code {code})", True)
                    continue
                deadline[w] = time.monotonic() + self.step_timeout_s
                if kind == "tick":
                    continue
                op = pending[w].pop(0)  # a worker answers its ops in order
                assert op[1] == slot, f"worker {w} answered slot {slot} for {op}"
                if kind == "ok":
                    self._accept(op, value, results)
                else:
                    self._reject(op, value, results, errors)
                if not pending[w]:
                    del pending[w]
            now = time.monotonic()
            for w in [w for w in pending if now >= deadline[w]]:
                crashed[w] = (pending.pop(w), f"worker silent for {self.step_timeout_s:g}s", True)
        return crashed

    def _accept(self, op: Op, value: Any, results: dict) -> None:
        kind, slot, arg = op
        s = self._slots.get(slot)
        if kind == "release":
            return
        if s is None:  # failed earlier in this call; its answer stands
            return
        if kind == "reset":
            s.started, s.actions, s.last_observation = True, [], value.observation
        elif kind == "step":
            s.actions.append(arg)
            s.last_observation = value.observation
        elif kind == "replay":
            if value.observation != s.last_observation:
                self._fail(slot, "replay diverged from the recorded episode (engine not deterministic?)", results)
            return
        results[slot] = value

    def _reject(self, op: Op, value: tuple[str, str], results: dict, errors: list) -> None:
        kind, slot, _ = op
        message, tb = value
        if kind == "replay":  # the task played fine before: the rebuild failed, not the task
            self._fail(slot, f"replay raised {message}", results)
        elif kind != "release":
            self.stats["env_errors"] += 1
            s = self._slots.pop(slot, None)  # the worker dropped that env
            errors.append((op, s.task if s else None, message, tb))

    def _fail(self, slot: int, reason: str, results: dict) -> None:
        s = self._slots.pop(slot)
        answer = StepResult(observation="", admissible=None, done=True, info={"error": f"slot {slot} (task {s.task.id!r}): {reason}"})
        self._failed[slot] = answer
        self.stats["failed_episodes"] += 1
        results[slot] = answer

    def _recover(self, w: int, left: list[Op], reason: str, blame: bool, results: dict) -> list[Op]:
        """Replace worker `w`, blame the op it was busy with, and return the ops that rebuild its
        slots (reset + recorded actions) followed by the ops still owed to the caller."""
        self._restart(w)
        if blame and left:
            kind, slot, _ = left[0]
            s = self._slots.get(slot)
            if s is not None:
                s.strikes += 1
                if s.strikes >= 2:
                    self._fail(slot, f"{reason}; failed again after one retry", results)
                else:
                    self.stats["retried_episodes"] += 1
            elif kind == "release":
                left = left[1:]
        left = [op for op in left if op[0] == "release" or op[1] in self._slots]
        left = [op for op in left if op[0] != "replay"]
        return self._replays(w, {op[1] for op in left if op[0] == "reset"}) + left

    def _spawn(self, index: int) -> Any:
        """A fresh worker for position `index` (the seam a Ray-actor pool overrides)."""
        return _Worker(self._ctx, self.env_name, self.options, index)

    def _restart(self, w: int) -> None:
        self._workers[w].kill()
        self._workers[w] = self._spawn(w)
        self.stats["restarts"] += 1

    def _replays(self, w: int, skip: set[int]) -> list[Op]:
        """Ops that rebuild worker `w`'s live episodes: reset, then the recorded actions."""
        ops: list[Op] = [
            ("replay", slot, (s.task, list(s.actions)))
            for slot, s in self._slots.items()
            if s.worker == w and s.started and slot not in skip
        ]
        self.stats["replayed_episodes"] += len(ops)
        return ops

    def _raise(self, errors: list[tuple[Op, Task | None, str, str]], results: dict) -> None:
        (kind, slot, _), task, message, tb = errors[0]
        more = f" (and {len(errors) - 1} more slot(s) in this call)" if len(errors) > 1 else ""
        where = f"task {task.id!r} at {task.locator!r}" if task else "its task"
        raise EnvCallError(f"env {kind} failed in slot {slot} ({where}): {message}{more}", slot, task, results, tb)
