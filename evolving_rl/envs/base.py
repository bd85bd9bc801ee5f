"""The environment contract: every engine is played through this, so every algorithm,
evaluation protocol and benchmark works on every engine unchanged (Gymnasium-style).

An `Env` object lives in one process and can play task after task: `reset(task)` loads
the task (engines cache per-game costs), `step(action)` advances it. A `TaskSuite` knows
an engine's tasks and their named splits. Engines register both under one name so a
config selects them with a string (`env.name: alfworld`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol, runtime_checkable

from evolving_rl.types import StepResult, Task


class EnvError(RuntimeError):
    """A task cannot be played (missing or corrupt game file, bad locator). Names the culprit."""


@runtime_checkable
class Env(Protocol):
    max_steps: int

    def reset(self, task: Task) -> StepResult:
        """Start `task`. The observation is the initial observation (with the task in it)."""
        ...

    def step(self, action: str) -> StepResult:
        """Send one action string as the agent wrote it; invalid actions are the engine's to answer."""
        ...

    def expert_action(self) -> str | None:
        """The engine's expert's next action in the current state, or None if it has none."""
        ...

    def close(self) -> None: ...


@runtime_checkable
class TaskSuite(Protocol):
    env_name: str

    def splits(self) -> list[str]: ...

    def tasks(self, split: str) -> list[Task]:
        """Tasks of one split, in a fixed order. Raises ValueError naming the allowed splits."""
        ...


def max_steps_option(options: dict[str, Any], env: str, default: int) -> int:
    """`options["max_steps"]` (else `default`) as an int >= 1.

    Every engine ends its episodes at this budget itself, so a bad value must fail when the
    env is built, naming the env and the option, not as a wrong comparison mid-episode.
    "50" from a command line is accepted; 2.5, true or "fifty" are not.
    """
    value = options.get("max_steps", default)
    try:
        steps = int(str(value).strip())
    except ValueError:
        raise ValueError(f"{env} option max_steps must be an integer >= 1, got {value!r}") from None
    if steps < 1:
        raise ValueError(f"{env} option max_steps must be >= 1, got {value!r}")
    return steps


EnvFactory = Callable[[dict[str, Any]], Env]
SuiteFactory = Callable[[dict[str, Any]], TaskSuite]

_ENVS: dict[str, tuple[EnvFactory, SuiteFactory]] = {}


def register(name: str, env_factory: EnvFactory, suite_factory: SuiteFactory) -> None:
    _ENVS[name] = (env_factory, suite_factory)


def _load_builtin() -> None:
    # Importing an engine module registers it; engines whose package is missing are skipped
    # here and reported by `lookup` when a config asks for them.
    import importlib

    for mod in (
        "evolving_rl.envs.alfworld",
        "evolving_rl.envs.mind2web",
        "evolving_rl.envs.twx",
        "evolving_rl.envs.twc",
        "evolving_rl.envs.scienceworld",
        "evolving_rl.envs.textworld_env",
    ):
        try:
            importlib.import_module(mod)
        except ImportError:
            pass


def available() -> list[str]:
    _load_builtin()
    return sorted(_ENVS)


def lookup(name: str) -> tuple[EnvFactory, SuiteFactory]:
    """A registered name, or `"package.module:EnvFactory"` / `"package.module:EnvFactory:SuiteFactory"`
    for an engine of your own: an import path is the only name that spawned worker processes
    can resolve without the parent's registrations. Without a suite part, `EnvFactory.suite`
    is the suite factory if it exists."""
    if ":" in name:
        return _import_factories(name)
    _load_builtin()
    if name not in _ENVS:
        raise ValueError(f"env.name: unknown environment {name!r}; available: {', '.join(sorted(_ENVS))}")
    return _ENVS[name]


def _import_factories(name: str) -> tuple[EnvFactory, SuiteFactory]:
    import importlib

    module_name, env_attr, *rest = name.split(":")
    if not module_name or not env_attr or len(rest) > 1:
        raise ValueError(f"env.name: {name!r} is not of the form 'package.module:EnvFactory[:SuiteFactory]'")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise ValueError(f"env.name: {name!r}: cannot import module {module_name!r} ({e})") from e
    attrs = [env_attr, *rest]
    missing = [a for a in attrs if not hasattr(module, a)]
    if missing:
        raise ValueError(f"env.name: {name!r}: module {module_name!r} has no attribute {missing[0]!r}")
    env_factory = getattr(module, env_attr)
    suite_factory = getattr(module, rest[0]) if rest else getattr(env_factory, "suite", None)
    if suite_factory is None:

        def suite_factory(options: dict[str, Any]) -> TaskSuite:
            raise ValueError(f"env.name: {name!r} names no task suite (add ':SuiteFactory' or a 'suite' attribute)")

    return env_factory, suite_factory


def make_env(name: str, options: dict[str, Any]) -> Env:
    """Build an env in *this* process (workers call this in theirs)."""
    return lookup(name)[0](options)


def make_suite(name: str, options: dict[str, Any]) -> TaskSuite:
    return lookup(name)[1](options)
