"""Warm-start demonstrations for any environment whose engine has an expert.

A tiny model trained from scratch cannot act by chance, so it is first cloned from the
engine's expert (`evolving-rl sft`). Every engine exposes its expert the same way
(`Env.expert_action`: a gold path, a walkthrough, a planner, the recorded Mind2Web action),
so one loop writes demos for all of them: many episodes live at once in an `EnvPool`, one
batched reset / expert / step call per turn across all of them, each episode ending when the
env says done, the expert has no action, or `env.max_steps` is reached.

Output: one JSON line per task, in the split's order, in the format `sft.load_demos` reads:
{"task": Task.to_dict(), "won", "steps": [{"observation", "admissible", "action"}],
"final_observation"}.

A game the engine cannot play (a corrupt file, a worker that crashed twice on it) is skipped,
named and counted, never written: one bad game among thousands must not cost the others.
"""

from __future__ import annotations

import json
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path

from evolving_rl.builders import build_pool, build_suite
from evolving_rl.config import RunConfig
from evolving_rl.envs.pool import Pool, PoolError, answers_per_slot
from evolving_rl.types import StepResult, Task

SLOTS_PER_WORKER = 4  # live episodes per engine process: keeps every worker busy between calls


def write_demos(
    cfg: RunConfig,
    split: str,
    out_path: str | Path,
    max_tasks: int | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> dict:
    """Play the expert on the first `max_tasks` tasks of `split` and write them as JSONL.

    Returns {"episodes", "won", "failed", "failures", "steps", "wall_s", "path"}. A task that
    could not be played (its game unreadable, its env raising, or its worker crashing twice) is
    not the expert's play: it is counted in `failed`, named in `failures` ("locator: why") and
    not written.
    """
    if max_tasks is not None and max_tasks < 1:
        raise ValueError(f"max_tasks must be >= 1, got {max_tasks}")
    suite = build_suite(cfg)
    with warnings.catch_warnings():  # a suite's skipped games are reported in `failures` instead
        warnings.simplefilter("ignore")
        tasks = suite.tasks(split)[:max_tasks]
    failures = [f"{path}: {why}" for path, why in getattr(suite, "skipped", [])]
    if not tasks:
        raise ValueError(f"{cfg.env.name}: split {split!r} has no tasks")
    out = Path(out_path)
    if out.is_dir():
        raise ValueError(f"demos output {out} is a directory; give the JSONL file to write")
    out.parent.mkdir(parents=True, exist_ok=True)
    close_suite = getattr(suite, "close", None)  # engine-backed suites (TWX) hold a JVM
    if close_suite:
        close_suite()
    t0 = time.perf_counter()
    stats = {"episodes": 0, "won": 0, "failed": len(failures), "steps": 0}
    live = SLOTS_PER_WORKER * max(1, cfg.env.num_workers)
    partial = out.with_name(out.name + ".partial")  # a run that stops midway leaves no demo file, short or partial
    try:
        with build_pool(cfg) as pool, partial.open("w") as f:
            for i, record in enumerate(expert_episodes(pool, tasks, cfg.env.max_steps, live), 1):
                if error := record.pop("error", None):
                    stats["failed"] += 1
                    failures.append(f"{record['task']['locator']}: {error}")
                else:
                    f.write(json.dumps(record) + "\n")
                    stats["episodes"] += 1
                    stats["won"] += bool(record["won"])
                    stats["steps"] += len(record["steps"])
                if progress:
                    progress(i, len(tasks))
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    partial.replace(out)
    return {**stats, "failures": failures, "wall_s": time.perf_counter() - t0, "path": str(out)}


def expert_episodes(pool: Pool, tasks: list[Task], max_steps: int, live: int) -> Iterator[dict]:
    """Yield one demo record per task, in `tasks` order, playing up to `live` at once.

    A record carries "error" when its task could not be played. Records that finish early
    wait in a buffer so the file's order (and so the SFT data) does not depend on timing.
    """
    if live < 1:
        raise ValueError(f"live must be >= 1, got {live}")
    queue = list(enumerate(tasks))[::-1]  # popped from the end: task order
    active: dict[int, tuple[int, Task, list[dict], StepResult]] = {}  # slot -> (index, task, steps, last)
    finished: dict[int, dict] = {}
    next_out = 0
    while queue or active:
        free = [s for s in range(live) if s not in active][: len(queue)]
        if free:
            starts = [(slot, queue.pop()) for slot in free]
            results = answers_per_slot(pool.reset, [(slot, task) for slot, (_, task) in starts])
            for slot, (index, task) in starts:
                active[slot] = (index, task, [], results[slot])
        playing = [s for s, (_, _, steps, last) in active.items() if not last.done and len(steps) < max_steps]
        advice = _expert_advice(pool, playing, active) if playing else {}
        moves = {s: a for s, a in advice.items() if a is not None}
        done = [s for s in active if s not in moves]
        for slot in done:
            index, task, steps, last = active.pop(slot)
            record = {"task": task.to_dict(), "won": last.won, "steps": steps, "final_observation": last.observation}
            if last.info.get("error"):  # the pool's answer for a task it could not play
                record["error"] = str(last.info["error"])
            finished[index] = record
        if done:
            pool.release(done)
        if moves:
            results = answers_per_slot(pool.step, list(moves.items()))
            for slot, action in moves.items():
                index, task, steps, last = active[slot]
                steps.append({"observation": last.observation, "admissible": last.admissible, "action": action})
                active[slot] = (index, task, steps, results[slot])
        while next_out in finished:
            yield finished.pop(next_out)
            next_out += 1


def _expert_advice(pool: Pool, slots: list[int], active: dict) -> dict[int, str | None]:
    """The expert's next action per slot; a slot whose env raised gets none and ends with the error."""
    try:
        return pool.expert_action(slots)
    except PoolError as e:
        advice = dict(e.results or {})
        for slot in slots:
            if slot not in advice:
                index, task, steps, _ = active[slot]
                active[slot] = (index, task, steps, StepResult("", None, done=True, info={"error": str(e)}))
                advice[slot] = None
        return advice
