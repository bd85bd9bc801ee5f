"""ScienceWorld: 30 elementary-science tasks on the package's own Java simulator.

A task is (task type, variation); the package splits each task type's variations into
train/dev/test, so our splits never share a variation. Seen/unseen task types mirror
ALFWorld's held-out types: by default one task per family whose sibling is seen is held out
(DEFAULT_UNSEEN_TYPES), so every unseen task needs skills a seen one teaches.

Valid actions: the engine enumerates every valid action-object combination, often 400-3,000
strings (most are `connect X to Y`). What enters the prompt is bounded: deduplicated, then
ordered by how many objects the action names (none, one, two), then by a fixed verb order
(VERB_ORDER: moving and handling things first, looking at objects and wiring last), then
alphabetically, and cut to `max_admissible` (100; 0 keeps all). The agent may still type any action; the engine answers.
`info["num_valid"]` is the full count.

Speed: a step is ~40 ms, but enumerating valid actions costs more (tens to hundreds of ms),
so `admissible: false` skips it (admissible None). Gold paths can take seconds (40 s for the
mendelian-genetics tasks), so the expert is computed lazily, on the first `expert_action`
call: the task is reloaded with its gold path and the episode replayed. The env runs inside
EnvPool's worker processes unchanged; a JVM that dies is restarted by the env itself and the
episode replayed, so callers never see it.
"""

from __future__ import annotations

import json
import weakref
from dataclasses import replace
from pathlib import Path
from typing import Any

try:
    from scienceworld import ScienceWorldEnv
    from scienceworld.constants import TASKS
except ImportError as e:  # pragma: no cover - depends on the install
    raise ImportError(f"ScienceWorld is not installed ({e}); install it with: pip install evolving-rl[envs]") from e

from evolving_rl.envs._jvm import JVMEpisode, stop_jvm
from evolving_rl.envs.base import EnvError, max_steps_option, register
from evolving_rl.envs.splits import SeenUnseenSuite
from evolving_rl.types import StepResult, Task

TASK_TYPES = tuple(t["task_name"] for t in TASKS)
DEFAULT_UNSEEN_TYPES = (
    "freeze",  # boil, melt seen
    "find-plant",  # find-animal, find-living-thing seen
    "lifespan-shortest-lived",  # lifespan-longest-lived seen
    "chemistry-mix-paint-tertiary-color",  # secondary color seen
    "test-conductivity-of-unknown-substances",  # test-conductivity seen
    "measure-melting-point-unknown-substance",  # known substance seen
    "mendelian-genetics-unknown-plant",  # known plant seen
    "inclined-plane-friction-unnamed-surfaces",  # named surfaces seen
)
# Verb order for the bounded valid-action list (within the same number of objects).
VERB_ORDER = (
    "go", "open", "close", "pick", "put", "move", "focus", "activate", "deactivate", "use", "read",
    "examine", "pour", "dunk", "mix", "eat", "flush", "look", "inventory", "task", "wait", "wait1",
    "connect", "disconnect", "reset",
)
_RANK = {v: i for i, v in enumerate(VERB_ORDER)}


def bound_valid_actions(combos: list[dict], cap: int) -> list[str]:
    """The prompt's valid actions (module docstring): dedupe, order by (#objects, verb, text), cap."""
    best: dict[str, int] = {}
    for c in combos:
        text = str(c["action"]).strip()
        if text:
            best[text] = min(best.get(text, 99), len(c.get("obj_ids") or ()))
    ordered = sorted(best, key=lambda a: (best[a], _RANK.get(a.split(" ", 1)[0], len(_RANK)), a))
    return ordered[:cap] if cap > 0 else ordered


def _start_jvm() -> ScienceWorldEnv:
    return ScienceWorldEnv("", envStepLimit=10**9)  # our max_steps ends episodes


class SciWorldEnv(JVMEpisode):
    """One ScienceWorld task variation at a time (see module docstring).

    options: max_steps (100), simplifications ("" = none; e.g. "easy" or
    "openDoors,teleportAction"), admissible (True), max_admissible (100; 0 = all),
    expert (True: `expert_action` follows the gold path while the agent's actions are its
    prefix, None after a deviation).
    Won = the engine reports the task completed with full score; score = engine score / 100,
    clipped to [0, 1] (a failed task scores -100 in the engine and ends the episode).
    """

    _task_label = "scienceworld task"

    def __init__(self, options: dict[str, Any] | None = None) -> None:
        options = dict(options or {})
        self.max_steps = max_steps_option(options, "scienceworld", 100)
        self.simplifications = str(options.get("simplifications", ""))
        self.admissible = bool(options.get("admissible", True))
        self.max_admissible = int(options.get("max_admissible", 100))
        self.use_expert = bool(options.get("expert", True))
        self._engine: ScienceWorldEnv | None = None
        self._game: tuple[str, int] | None = None
        self._gold_loaded = False  # the engine holds the current task with its gold path
        self._gold: list[str] | None = None
        self._actions: list[str] = []
        self._last: tuple[str, float, bool] = ("", 0.0, False)
        self.description = ""
        self.jvm_restarts = 0

    def _locate(self, task: Task) -> tuple[str, int]:
        name, _, var = task.locator.partition("/")
        if name not in TASK_TYPES or not var.isdigit():
            raise EnvError(f"scienceworld task {task.id!r}: locator {task.locator!r} is not 'task-name/variation'")
        return name, int(var)

    def _start(self, engine: ScienceWorldEnv, gold: bool) -> str:
        name, var = self._game
        if not 0 <= var < engine.get_max_variations(name):
            raise EnvError(f"scienceworld task {name}: variation {var} out of range "
                           f"(0..{engine.get_max_variations(name) - 1})")
        try:
            engine.load(name, var, self.simplifications, generateGoldPath=gold)
        except ValueError as e:  # unknown simplification, say
            raise EnvError(f"scienceworld task {name}/{var}: {e}") from None
        self._gold_loaded = gold
        engine.server.reset()
        return engine.server.step("look around")

    def _replay(self, engine: ScienceWorldEnv, gold: bool) -> None:
        self._start(engine, gold)
        for a in self._actions:
            engine.server.step(a)

    def _new_engine(self) -> ScienceWorldEnv:
        return _start_jvm()

    def _restore(self, engine: ScienceWorldEnv) -> None:
        """A fresh JVM holds no task: reload it as it was (with its gold path or not) and replay."""
        self._replay(engine, self._gold_loaded)

    def reset(self, task: Task) -> StepResult:
        self._game = self._locate(task)
        self._actions, self._gold = [], None
        obs = self._call(lambda e: self._start(e, False))
        self.description = str(self._call(lambda e: e.server.getTaskDescription()))
        return self._result(f"{self.description}\n\n{obs}")

    def step(self, action: str) -> StepResult:
        if self._game is None:
            raise EnvError("SciWorldEnv.step called before reset")
        action = str(action)
        obs = self._call(lambda e: e.server.step(action))
        self._actions.append(action)
        return self._result(obs)

    def _result(self, observation: str) -> StepResult:
        def read(e: ScienceWorldEnv):
            score, completed = float(e.server.getScore()), bool(e.server.getCompleted())
            combos = json.loads(e.server.getValidActionObjectCombinationsJSON())["validActions"] if self.admissible else None
            return score, completed, combos

        score, completed, combos = self._call(read)
        won = completed and score >= 1.0
        lost = score < 0
        steps = len(self._actions)
        done = won or lost or completed or steps >= self.max_steps
        name, var = self._game
        info = {"task": self.description, "steps": steps, "task_name": name, "variation": var,
                "raw_score": round(score * 100), "lost": lost, "jvm_restarts": self.jvm_restarts}
        admissible = None
        if combos is not None:
            admissible = bound_valid_actions(combos, self.max_admissible)
            info["num_valid"] = len({c["action"] for c in combos})
        return StepResult(observation, admissible, done, won, min(1.0, max(0.0, score)), info)

    def expert_action(self) -> str | None:
        if not self.use_expert or self._game is None:
            return None
        if self._gold is None:  # lazily: reload with the gold path, replay, then read it
            self._call(lambda e: self._replay(e, True))
            self._gold = [str(a) for a in self._call(lambda e: e.server.getGoldActionSequence())]
        n = len(self._actions)
        if n < len(self._gold) and self._gold[:n] == self._actions:
            return self._gold[n]
        return None

    def close(self) -> None:
        stop_jvm(self._engine)
        self._engine, self._game = None, None


# ---------------------------------------------------------------------------------------
# Task suite

_VARIATIONS: dict[str, dict[str, list[int]]] = {}  # task type -> fold -> variations
_DESCRIPTIONS: dict[tuple[str, int, str], str] = {}  # (task type, variation, simplifications)


class SciWorldSuite(SeenUnseenSuite):
    """ScienceWorld tasks: for each task type, the first `tasks_per_type` variations of a fold.

    options: task_types (all 30), unseen_types (DEFAULT_UNSEEN_TYPES; [] for the plain
    train/dev/test protocol), tasks_per_type (10), simplifications (""), cache_dir (a
    directory for a JSON cache of variation folds and descriptions; each costs one task load,
    ~0.2 s, the first time).
    Splits as in TextWorld-Express: train/dev/test (seen types), *_unseen (unseen types;
    train_unseen is an experience pool only), eval_seen/eval_unseen = the test folds.
    """

    env_name = "scienceworld"

    def __init__(self, options: dict[str, Any] | None = None) -> None:
        options = dict(options or {})
        self.types = self._choose_kinds(options, "task_types", TASK_TYPES, "unseen_types", DEFAULT_UNSEEN_TYPES, "task")
        self.tasks_per_type = int(options.get("tasks_per_type", 10))
        if self.tasks_per_type < 1:
            raise ValueError(f"scienceworld option tasks_per_type must be >= 1, got {self.tasks_per_type}")
        self.simplifications = str(options.get("simplifications", ""))
        cache_dir = options.get("cache_dir")
        self.cache_file = Path(cache_dir).expanduser() / "scienceworld-tasks.json" if cache_dir else None
        self._cache: dict[str, list[Task]] = {}
        self._jvm: ScienceWorldEnv | None = None

    def _build(self, split: str, fold: str, types: tuple[str, ...]) -> list[Task]:
        self._load_cache()
        out = [replace(t, split=split) for name in types for t in self._make(fold, name)]
        self._save_cache()
        return out

    def _engine(self) -> ScienceWorldEnv:
        if self._jvm is None:  # one engine for every split; stopped with the suite
            self._jvm = _start_jvm()
            self._closer = weakref.finalize(self, stop_jvm, self._jvm)
        return self._jvm

    def _make(self, fold: str, name: str) -> list[Task]:
        if name not in _VARIATIONS:
            engine = self._engine()
            engine.server.load(name, 0, "", False)
            _VARIATIONS[name] = {"train": list(engine.get_variations_train()),
                                 "dev": list(engine.get_variations_dev()),
                                 "test": list(engine.get_variations_test())}
        out = []
        for var in sorted(_VARIATIONS[name][fold])[: self.tasks_per_type]:
            key = (name, var, self.simplifications)
            if key not in _DESCRIPTIONS:
                engine = self._engine()
                engine.server.load(name, var, self.simplifications, False)
                _DESCRIPTIONS[key] = str(engine.server.getTaskDescription())
            out.append(Task(id=f"scienceworld/{name}/{var}", split=fold, task_type=name,
                            description=_DESCRIPTIONS[key], locator=f"{name}/{var}", env="scienceworld",
                            meta=(("fold", fold), ("variation", var))))
        return out

    def close(self) -> None:
        """Stop the suite's engine (it also stops when the suite is garbage-collected)."""
        if self._jvm is not None:
            self._closer()
            self._jvm = None

    def _load_cache(self) -> None:
        if self.cache_file is None or not self.cache_file.is_file():
            return
        try:
            data = json.loads(self.cache_file.read_text())
            _VARIATIONS.update({k: v for k, v in data["variations"].items() if k not in _VARIATIONS})
            for name, var, simp, text in data["descriptions"]:
                _DESCRIPTIONS.setdefault((name, int(var), simp), text)
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise ValueError(f"scienceworld cache {self.cache_file} is unreadable ({e}); delete it") from None

    def _save_cache(self) -> None:
        if self.cache_file is None:
            return
        self.cache_file.parent.mkdir(parents=True, exist_ok=True)
        data = {"variations": _VARIATIONS, "descriptions": [[*k, v] for k, v in sorted(_DESCRIPTIONS.items())]}
        tmp = self.cache_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(data))
        tmp.replace(self.cache_file)


register("scienceworld", SciWorldEnv, SciWorldSuite)
