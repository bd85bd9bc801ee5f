"""Engine workers as Ray actors, so env steps spread over a cluster (issue 17).

ALFWorld and ScienceWorld are CPU-bound Python/Java engines: at the paper's scale (16 sources
x (1 + 8 x 4) = 528 episodes of up to 50 turns per step) the engines outgrow one machine's
cores, and the official code runs 256 worker servers. `RayEnvPool` is `EnvPool` with its
worker processes replaced by Ray actors: the slot bookkeeping, replay-based recovery and
failure accounting are inherited unchanged, so the two pools answer the same calls with the
same results and the same counters (`stats`); only how ops reach a worker differs.

Transport: each op is one actor method call, and each actor has one call in flight at a time
(all actors run at once). Ray may drop the reply of a call that finished just before its
actor died, so with calls queued a crash would be blamed on an episode that played fine;
one at a time, the unanswered call is the one the actor died in, the episode the process
pool would blame too. A cheap `pid()` call goes first in every exchange: if it fails, the
actor was already dead before the call (killed between calls, a node lost), which is no
episode's fault, exactly as the process pool treats a worker found dead before it was sent
anything.

Timeouts: a step answered later than `step_timeout_s` marks its actor hung; the actor is
killed and replaced. A replay rebuilds an episode by replaying k recorded actions on one
call, so it gets (k + 1) x `step_timeout_s` (the process pool's workers send a heartbeat
per replayed action instead; an actor call cannot).
"""

from __future__ import annotations

import os
import sys
import time
import traceback
import weakref
from typing import Any

from evolving_rl.envs.workers import EnvPool, Op, _EnvHost


ACTOR_START_S = 120.0  # how long a freshly started actor may take to answer its first call


def _require_ray() -> Any:
    try:
        import ray
    except ImportError:
        raise ImportError(
            "env.pool: ray needs the Ray package: pip install torch==2.13.0 -e '.[ray]' "
            "(or set env.pool: process)"
        ) from None
    return ray


class _EnvActor:
    """One Ray actor: the envs of its slots (an `_EnvHost`, as in a worker process)."""

    def __init__(self, env_name: str, options: dict[str, Any], driver_path: list[str]) -> None:
        # A local cluster's workers do not inherit the driver's sys.path the way spawned
        # processes do; an env named "module:Factory" (tests, user engines) must import here.
        for p in reversed(driver_path):
            if p and p not in sys.path and os.path.isdir(p):
                sys.path.insert(0, p)
        # Engines are single-threaded; BLAS threads per actor would only oversubscribe the node.
        for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
            os.environ[var] = "1"
        self.host = _EnvHost(env_name, options)

    def pid(self) -> int:
        return os.getpid()

    def handle(self, kind: str, slot: int, arg: Any) -> tuple[str, Any]:
        # An env's own exception is a property of the task: returned, never raised, so that
        # an actor error always means the actor died.
        try:
            return "ok", self.host.handle(kind, slot, arg)
        except Exception as e:
            self.host.discard(slot)
            return "error", (f"{type(e).__name__}: {e}", traceback.format_exc())


class _ActorWorker:
    """A handle on one actor; `kill` makes sure the process is gone before it is replaced."""

    def __init__(self, actor_class: Any, env_name: str, options: dict[str, Any], index: int) -> None:
        self.actor = actor_class.remote(env_name, options, list(sys.path))
        self.index = index
        self._pid: int | None = None
        self.started = False  # answered once: its process is up, imports done

    @property
    def pid(self) -> int:
        if self._pid is None:
            self._pid = int(_require_ray().get(self.actor.pid.remote()))
        return self._pid

    def kill(self) -> None:
        try:
            _require_ray().kill(self.actor, no_restart=True)
        except Exception:  # already dead, or Ray already shut down
            pass


def _kill_all(workers: list[_ActorWorker]) -> None:
    for w in workers:
        w.kill()
    workers.clear()


class RayEnvPool(EnvPool):
    """`EnvPool` over `num_workers` Ray actors (>= 1).

    Connects to the running Ray instance if there is one (`ray.init` done by the caller, or
    `RAY_ADDRESS`), else starts a local one (`address` is passed to `ray.init`). Each actor
    asks Ray for `cpus_per_worker` CPUs, so Ray places at most that many engines per core.
    """

    def __init__(
        self,
        env_name: str,
        options: dict[str, Any],
        num_workers: int = 2,
        step_timeout_s: float = 120.0,
        *,
        cpus_per_worker: float = 1.0,
        address: str | None = None,
    ) -> None:
        if num_workers < 1:
            raise ValueError(f"env.num_workers must be >= 1 for the Ray pool (actors), got {num_workers}")
        if cpus_per_worker < 0:
            raise ValueError(f"env.ray_cpus_per_worker must be >= 0, got {cpus_per_worker}")
        ray = _require_ray()
        if not ray.is_initialized():
            ray.init(address=address, include_dashboard=False, log_to_driver=False)
        # max_restarts=0: the pool restarts actors itself, after deciding whom to blame.
        self._actor_class = ray.remote(num_cpus=cpus_per_worker, max_restarts=0)(_EnvActor)
        super().__init__(env_name, options, num_workers=num_workers, step_timeout_s=step_timeout_s)
        # The base class registered a process-pool shutdown; actors are killed instead.
        self._finalizer.detach()
        self._finalizer = weakref.finalize(self, _kill_all, self._workers)

    @property
    def worker_pids(self) -> list[int]:
        return [w.pid for w in self._workers]

    def _spawn(self, index: int) -> _ActorWorker:
        return _ActorWorker(self._actor_class, self.env_name, self.options, index)

    def _budget(self, op: Op) -> float:
        kind, _, arg = op
        return self.step_timeout_s * (1 + len(arg[1])) if kind == "replay" else self.step_timeout_s

    def _exchange(
        self, jobs: dict[int, list[Op]], results: dict, errors: list, restarted: set[int]
    ) -> dict[int, tuple[list[Op], str, bool]]:
        """Run every worker's ops, all workers at once, each worker's one at a time; stop a
        worker at its first death or lateness. Same contract as `EnvPool._exchange`.

        One op in flight per actor, because Ray may drop the reply of a call that finished
        just before its actor died: with several calls queued, the death would be blamed on an
        episode that had played fine. Waiting for each reply costs one round trip per op
        (~1 ms locally), small beside an ALFWorld step (60-100 ms).
        """
        ray = _require_ray()
        dead = ray.exceptions.RayActorError
        crashed: dict[int, tuple[list[Op], str, bool]] = {}
        todo = {w: list(ops) for w, ops in jobs.items() if ops}
        # A `pid()` call goes first: if it fails, the actor was dead before the call, which is
        # no episode's fault, unless we started it during this very call (an actor that cannot
        # start must still use up the retries).
        inflight: dict[Any, int] = {self._workers[w].actor.pid.remote(): w for w in todo}
        # A new actor's first answer waits for Ray to start a process and import the engine
        # (seconds on a busy node): that is not a hung step.
        deadline = {
            w: time.monotonic() + (self.step_timeout_s if self._workers[w].started else max(self.step_timeout_s, ACTOR_START_S))
            for w in todo
        }
        started: set[int] = set()  # workers whose ping came back

        def send_next(w: int) -> None:
            if todo[w]:
                inflight[self._workers[w].actor.handle.remote(*todo[w][0])] = w
                deadline[w] = time.monotonic() + self._budget(todo[w][0])
            else:
                del todo[w]

        while inflight:
            timeout = max(0.0, min(deadline[w] for w in inflight.values()) - time.monotonic())
            ready, _ = ray.wait(list(inflight), num_returns=1, timeout=timeout)
            for ref in ready:
                w = inflight.pop(ref)
                try:
                    answer = ray.get(ref)
                except dead as e:
                    if w in started:
                        crashed[w] = (todo.pop(w), f"worker actor died ({type(e).__name__})", True)
                    else:
                        crashed[w] = (todo.pop(w), f"worker actor dead before the call ({type(e).__name__})", w in restarted)
                    continue
                if w not in started:
                    started.add(w)
                    self._workers[w].started = True
                else:
                    kind, value = answer
                    op = todo[w].pop(0)
                    if kind == "ok":
                        self._accept(op, value, results)
                    else:
                        self._reject(op, value, results, errors)
                send_next(w)
            now = time.monotonic()
            for ref, w in [(r, w) for r, w in inflight.items() if now >= deadline[w]]:
                del inflight[ref]
                crashed[w] = (todo.pop(w), f"worker silent past its deadline ({self.step_timeout_s:g}s per step)", True)
        return crashed
