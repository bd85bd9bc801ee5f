"""The `Pool` contract: what the rollout engine needs from a set of live environments.

The rollout drives many episodes ("slots") at once and talks to them only through these
calls, so the process pool in `envs/workers.py` and a pool of Ray actors (or any other
backend) are interchangeable. A pool answers every call with {slot: result}; when an env
raises, it raises `PoolError` carrying the answers of the call's other slots, so the
rollout fails that one episode, not the batch.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol, runtime_checkable

from evolving_rl.envs.base import EnvError
from evolving_rl.types import StepResult, Task


class PoolError(EnvError):
    """An env raised inside a pool. Names the slot and task; `results` holds what the call's
    other slots returned, so a caller can keep them; `worker_traceback` is the env's traceback."""

    def __init__(self, message: str, slot: int, task: Task | None, results: dict, worker_traceback: str = ""):
        super().__init__(message)
        self.slot, self.task, self.results, self.worker_traceback = slot, task, results, worker_traceback


def answers_per_slot(call: Callable[[list], dict[int, Any]], requests: list) -> dict[int, Any]:
    """`call(requests)` on a pool, where a task the engine cannot play (a corrupt game) fails
    only its own slot: that slot answers `StepResult("", None, done=True, info={"error": ...})`
    and the call's other slots keep their answers."""
    try:
        return call(requests)
    except PoolError as e:
        results = dict(e.results or {})
        for slot, _ in requests:
            results.setdefault(slot, StepResult("", None, done=True, info={"error": str(e)}))
        return results


@runtime_checkable
class Pool(Protocol):
    """Live episodes keyed by slot. A slot whose engine failed for good answers
    `StepResult("", None, done=True, info={"error": ...})` until released."""

    # Counters the trainer and evaluator report: restarts, replayed_episodes, retried_episodes,
    # failed_episodes, env_errors (see EnvPool).
    stats: dict[str, int]

    def reset(self, requests: list[tuple[int, Task]]) -> dict[int, StepResult]: ...

    def step(self, requests: list[tuple[int, str]]) -> dict[int, StepResult]: ...

    def expert_action(self, slots: list[int]) -> dict[int, str | None]: ...

    def release(self, slots: list[int]) -> None: ...

    def close(self) -> None: ...

    def __enter__(self) -> Any: ...

    def __exit__(self, *exc: Any) -> None: ...
