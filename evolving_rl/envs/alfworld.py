"""ALFWorld played on ALFWorld's own engine (textworld's PDDL backend + ALFWorld's wrappers).

One `AlfworldEnv` lives in one process and plays game after game: `reset(task)` loads the
task's `game.tw-pddl`. Two costs are cached because they dominate: Fast Downward's
PDDL-to-SAS translation (run twice per load and twice per reset, identical every time for
a game) is memoised per game, which brings reset from up to 3 s to ~0.2 s (SPEC).

The handcoded expert is ALFWorld's own, with two repairs: alfworld 0.4.2 names the put
command `move X to R` while the expert's state tracking still looks for "put" (so after a
put it believes it still holds the object and every pick_two game fails), and the expert's
exceptions never escape `step` (it just has no advice any more). It draws from its own
seeded RNG, so an episode is reproducible.

`AlfworldSuite` reads a generated games directory (manifest.json, see alfworld_gen) or
the official `json_2.1.1` layout and exposes the paper's splits.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import random
import re
import warnings
from collections import OrderedDict
from pathlib import Path
from typing import Any

from evolving_rl.envs.base import EnvError, max_steps_option, register
from evolving_rl.types import StepResult, Task

SEEN_TYPES = (
    "pick_and_place_simple",
    "pick_clean_then_place_in_recep",
    "pick_heat_then_place_in_recep",
    "pick_cool_then_place_in_recep",
)
UNSEEN_TYPES = ("look_at_obj_in_light", "pick_two_obj_and_place")
TASK_TYPES = SEEN_TYPES + UNSEEN_TYPES
SPLITS = ("train", "train_unseen", "eval_seen", "eval_unseen")
OFFICIAL_RAW_SPLITS = ("valid_seen", "valid_unseen")
GAME_FILE = "game.tw-pddl"


class BadGameWarning(UserWarning):
    """A game that cannot be read was left out of its split (env.options.skip_bad_games)."""
_GOAL_RE = re.compile(r"Your task is to: (.*?)\s*$", re.S)


# ---------------------------------------------------------------------------------------
# Memoised PDDL-to-SAS translation

_TRANSLATIONS: OrderedDict[str, Any] = OrderedDict()
_TRANSLATION_CAPACITY = [64]
_ORIGINAL_PDDL2SAS: list[Any] = []


def set_translation_cache(capacity: int) -> None:
    """Memoise `fast_downward.pddl2sas` per (domain, problem) in this process (LRU).

    textworld re-translates the same problem at every load and reset; the translation is a
    pure function of the two texts, so caching it changes nothing but the time. textworld
    also makes a second, optimised translation that only its planner reads (the
    `policy_commands` / `walkthrough` infos, which this adapter never requests); while
    memoising we hand it the plain translation instead, which halves a first load.
    0 restores textworld's own behaviour.
    """
    import fast_downward

    if not _ORIGINAL_PDDL2SAS:
        _ORIGINAL_PDDL2SAS.append(fast_downward.pddl2sas)
    _TRANSLATION_CAPACITY[0] = max(0, int(capacity))
    if capacity <= 0:
        fast_downward.pddl2sas = _ORIGINAL_PDDL2SAS[0]
        _TRANSLATIONS.clear()
    else:
        fast_downward.pddl2sas = _memo_pddl2sas


def _memo_pddl2sas(domain: str, problem: str, verbose: bool = False, optimize: bool = False):
    key = hashlib.sha1((domain + "\0" + problem).encode()).hexdigest()
    hit = _TRANSLATIONS.get(key)
    if hit is not None:
        _TRANSLATIONS.move_to_end(key)
        return hit
    out = _ORIGINAL_PDDL2SAS[0](domain, problem, verbose=verbose, optimize=False)
    _TRANSLATIONS[key] = out
    while len(_TRANSLATIONS) > _TRANSLATION_CAPACITY[0]:
        _TRANSLATIONS.popitem(last=False)
    return out


_PARSES: dict[tuple, Any] = {}
_QUERIES: dict[str, Any] = {}
_ORIGINAL_TEXTGEN: dict[str, Any] = {}


def set_text_speedups(enabled: bool) -> None:
    """Make textworld's text rendering cheap without changing a character of it.

    Every step, textworld renders a command for every admissible action: it re-parses each
    command template and each grammar condition with tatsu and deep-copies the entity infos
    into every derivation context. Both parses are pure functions of their text (memoised;
    the symbols are copied because derivation mutates them) and the contexts are only read
    (a shallow copy is equivalent). Together they are most of a step's time.
    The test suite checks that play is identical with and without.
    """
    from textworld.envs.pddl import textgen
    from textworld.logic import Rule

    if not _ORIGINAL_TEXTGEN:
        _ORIGINAL_TEXTGEN.update(
            parse=textgen._parse_and_convert, copy_context=textgen.copy_context, query=Rule.parse_conjunctive_query
        )
    if not enabled:
        textgen._parse_and_convert = _ORIGINAL_TEXTGEN["parse"]
        textgen.copy_context = _ORIGINAL_TEXTGEN["copy_context"]
        Rule.parse_conjunctive_query = _ORIGINAL_TEXTGEN["query"]
        return
    original_parse, original_query = _ORIGINAL_TEXTGEN["parse"], _ORIGINAL_TEXTGEN["query"]

    def parse(text, rule_name=None, **kwargs):
        key = (text, rule_name, tuple(sorted(kwargs.items())))
        hit = _PARSES.get(key)
        if hit is None:
            hit = _PARSES[key] = original_parse(text, rule_name=rule_name, **kwargs)
        return copy.deepcopy(hit)

    def copy_context(context):
        return {
            "state": context["state"],
            "facts": context["facts"],
            "variables": dict(context["variables"]),
            "mapping": dict(context["mapping"]),
            "entity_infos": context["entity_infos"],
        }

    def parse_conjunctive_query(expr: str):
        hit = _QUERIES.get(expr)
        if hit is None:
            hit = _QUERIES[expr] = original_query(expr)
        return hit

    textgen._parse_and_convert = parse
    textgen.copy_context = copy_context
    Rule.parse_conjunctive_query = staticmethod(parse_conjunctive_query)


# ---------------------------------------------------------------------------------------
# The expert wrapper


def _move_as_put(action: str) -> str:
    """Report `move X to R` to the expert's tracker as the put it is (alfworld 0.4.2 bug)."""
    if action.startswith("move ") and " to " in action:
        obj, recep = action[len("move ") :].split(" to ", 1)
        return f"put {obj} in {recep}"
    return action


def _make_expert_wrapper():
    import alfworld.agents.expert.handcoded_expert as handcoded
    from alfworld.agents.environment.alfred_tw_env import AlfredExpert, AlfredExpertType

    class SeededAlfredExpert(AlfredExpert):
        """ALFWorld's handcoded expert, seeded per game, put-tracking fixed, never raising."""

        def __init__(self, env=None):
            super().__init__(env, expert_type=AlfredExpertType.HANDCODED)
            self.rng = random.Random(0)
            self.error: str | None = None

        def _gather_infos(self) -> None:
            self.state["extra.expert_plan"] = []
            if self.error is not None:
                return
            handcoded.random = self.rng  # the expert's random fallback draws from our RNG
            try:
                if not self.prev_command:
                    self._handcoded_expert.observe(self.state["feedback"])
                    plan = ["look"]
                else:
                    action = self._handcoded_expert.act(self.state, 0, self.state["won"], self.prev_command)
                    plan = [action if action in self.state["admissible_commands"] else "look"]
                self.state["extra.expert_plan"] = plan
            except Exception as e:  # HandCodedAgentFailed / Timeout / its own bugs: no advice
                self.error = f"{type(e).__name__}: {e}"

        def reset(self):
            self.error = None
            self.state = self._wrapped_env.reset()
            self.prev_command = ""
            try:
                self._handcoded_expert.reset(self.gamefile)
                policy = self._handcoded_expert.policy
                track = policy.update_state_tracking
                policy.update_state_tracking = lambda state, last: track(state, _move_as_put(last))
            except Exception as e:  # e.g. no traj_data.json beside the game: playable, no expert
                self.error = f"{type(e).__name__}: {e}"
            self._gather_infos()
            return self.state

    return SeededAlfredExpert


def read_game_file(path: str | Path) -> dict:
    """The game JSON, checked enough that textworld never fails deep inside on it."""
    path = Path(path)
    if not path.is_file():
        raise EnvError(f"ALFWorld game file not found: {path}")
    try:
        data = json.loads(path.read_bytes().decode("utf-8"))
    except OSError as e:
        raise EnvError(f"ALFWorld game file {path} cannot be read: {e.strerror or e}") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise EnvError(f"ALFWorld game file {path} is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise EnvError(f"ALFWorld game file {path}: expected a JSON object, got {type(data).__name__}")
    for key in ("pddl_domain", "grammar", "pddl_problem"):
        if not isinstance(data.get(key), str) or not data[key].strip():
            raise EnvError(f"ALFWorld game file {path}: missing or empty {key!r}")
    return data


def task_description(observation: str) -> str:
    """The goal sentence of an initial observation ("put a clean apple in fridge")."""
    m = _GOAL_RE.search(observation)
    return m.group(1).strip().rstrip(".") if m else ""


class AlfworldEnv:
    """One ALFWorld game at a time, through ALFWorld's own wrappers (see module docstring).

    options: max_steps (50), games_dir (resolves relative locators), seed (expert RNG),
    expert (True: track the handcoded expert; False saves the per-step facts rendering),
    translation_cache (games whose translation is memoised in this process, 64).
    """

    def __init__(self, options: dict[str, Any] | None = None) -> None:
        import textworld
        from alfworld.agents.environment.alfred_tw_env import AlfredDemangler, AlfredInfos
        from textworld.envs.pddl import PddlEnv

        options = dict(options or {})
        self.max_steps = max_steps_option(options, "alfworld", 50)
        self.seed = int(options.get("seed", 0))
        games_dir = options.get("games_dir") or os.environ.get("ALFWORLD_DATA") or "."
        self.games_dir = Path(games_dir)
        self.use_expert = bool(options.get("expert", True))
        set_translation_cache(int(options.get("translation_cache", 64)))
        set_text_speedups(bool(options.get("fast_text", True)))

        infos = textworld.EnvInfos(won=True, admissible_commands=True, facts=self.use_expert, extras=["gamefile"])
        env: Any = PddlEnv(infos)
        env = AlfredDemangler(shuffle=False)(env)
        env = AlfredInfos(env)
        if self.use_expert:
            env = _make_expert_wrapper()(env)
        self._env = env
        self._state: Any = None
        self._steps = 0
        self._won = False
        self.gamefile: str | None = None
        self.description = ""

    def _resolve(self, locator: str) -> Path:
        p = Path(locator)
        return p if p.is_absolute() else self.games_dir / p

    def reset(self, task: Task | str) -> StepResult:
        path = self._resolve(task.locator if isinstance(task, Task) else str(task))
        data = read_game_file(path)
        try:
            self._env.load(str(path))
            if self.use_expert:
                self._env.rng.seed(self._expert_seed(data["pddl_problem"]))
            self._state = self._env.reset()
        except (Exception, SystemExit) as e:  # Fast Downward exits on a malformed problem
            raise EnvError(f"ALFWorld game {path} cannot be played: {type(e).__name__}: {e}") from None
        self.gamefile = str(path)
        self._steps = 0
        self._won = bool(self._state["won"])
        self.description = task_description(self._state["feedback"])
        return self._result()

    def _expert_seed(self, problem: str) -> int:
        # From the game's content, not its path: a game verified in a scratch dir replays
        # identically once moved into place.
        h = hashlib.sha256(f"{self.seed}\0{problem}".encode()).digest()
        return int.from_bytes(h[:8], "little")

    def step(self, action: str) -> StepResult:
        if self._state is None:
            raise EnvError("AlfworldEnv.step called before reset")
        try:
            self._state, _, _ = self._env.step(str(action))
        except (Exception, SystemExit) as e:
            raise EnvError(f"ALFWorld game {self.gamefile}: engine failed on {action!r}: {e}") from None
        self._steps += 1
        self._won = bool(self._state["won"])
        return self._result()

    def _result(self) -> StepResult:
        s = self._state
        admissible = [a for a in s["admissible_commands"] if a != "help"]
        done = self._won or self._steps >= self.max_steps
        info = {"gamefile": self.gamefile, "task": self.description, "steps": self._steps}
        return StepResult(s["feedback"], admissible, done, self._won, 1.0 if self._won else 0.0, info)

    def expert_action(self) -> str | None:
        if not self.use_expert or self._state is None:
            return None
        plan = self._state.get("extra.expert_plan") or []
        return plan[0] if plan else None

    @property
    def expert_error(self) -> str | None:
        """Why the expert gave up on this episode (None while it still advises)."""
        return getattr(self._env, "error", None) if self.use_expert else None

    def close(self) -> None:
        try:
            self._env.close()
        except Exception:
            pass
        self._state = None


# ---------------------------------------------------------------------------------------
# Task suite


def _game_goal(path: Path) -> str:
    """The goal sentence inserted in a game's grammar, without running the engine."""
    data = read_game_file(path)
    m = re.search(r"Your task is to: (.*?)\.?\"", data["grammar"])
    if not m:
        raise EnvError(f"ALFWorld game file {path}: no 'Your task is to:' goal in its grammar")
    return m.group(1).strip()


class AlfworldSuite:
    """ALFWorld tasks with the paper's splits (SPEC; issue 2).

    `train` (seen types, training floorplans) is the RL pool, `train_unseen` (held-out
    types, training floorplans) only an experience pool, `eval_seen` / `eval_unseen` are on
    held-out floorplans. The official layout maps train -> train/train_unseen and
    valid_unseen -> eval_seen/eval_unseen by task type (the paper's protocol) and also
    exposes valid_seen and valid_unseen as they are.

    Every game of a split is read when the split is first listed (~0.1 ms a game): a game that
    cannot be read would otherwise fail each of its episodes in the engine, and an evaluation
    would report a silent 0% on fewer tasks. Such a game is an error naming the file, or, with
    the option `skip_bad_games`, a `BadGameWarning` naming it (listed in `skipped`).
    """

    env_name = "alfworld"

    def __init__(self, options: dict[str, Any] | None = None) -> None:
        options = dict(options or {})
        root = options.get("games_dir") or os.environ.get("ALFWORLD_DATA")
        if not root:
            raise ValueError("alfworld: no games directory (set env.games_dir or $ALFWORLD_DATA)")
        self.root = Path(root).expanduser().resolve()
        self.skip_bad_games = bool(options.get("skip_bad_games", False))
        self.skipped: list[tuple[str, str]] = []  # (game file, why), in listing order
        self._cache: dict[str, list[Task]] = {}
        if (self.root / "manifest.json").is_file():
            self.layout = "generated"
            self._manifest = _read_manifest(self.root / "manifest.json")
            self._splits = list(SPLITS)
        else:
            official = self.root if self.root.name == "json_2.1.1" else self.root / "json_2.1.1"
            if not official.is_dir():
                raise ValueError(
                    f"alfworld games_dir {self.root}: neither a generated games directory "
                    "(manifest.json) nor the official data (json_2.1.1/)"
                )
            self.layout = "official"
            self.official = official
            self._splits = list(SPLITS) + list(OFFICIAL_RAW_SPLITS)

    def splits(self) -> list[str]:
        return list(self._splits)

    def tasks(self, split: str) -> list[Task]:
        if split not in self._splits:
            raise ValueError(f"alfworld: unknown split {split!r}; allowed: {', '.join(self._splits)}")
        if split not in self._cache:
            self._cache[split] = self._generated(split) if self.layout == "generated" else self._official(split)
        return list(self._cache[split])

    def _readable(self, split: str, path: Path) -> dict | None:
        """The game's JSON, or None for a skipped bad game (see the class docstring)."""
        try:
            return read_game_file(path)
        except EnvError as e:
            if not self.skip_bad_games:
                raise ValueError(f"alfworld split {split!r}: {e}. Fix or remove that game, or set "
                                 "env.options.skip_bad_games=true to leave such games out with a warning") from None
            self.skipped.append((str(path), str(e)))
            warnings.warn(f"alfworld split {split!r}: skipping a game that cannot be read: {e}", BadGameWarning,
                          stacklevel=3)
            return None

    def _generated(self, split: str) -> list[Task]:
        out = []
        for g in self._manifest["splits"].get(split, []):
            if self._readable(split, self.root / g["path"]) is None:
                continue
            meta = {"floorplan": g.get("floorplan"), "expert_steps": g.get("expert_steps")}
            out.append(
                Task(
                    id=f"{split}/{g['dir']}",
                    split=split,
                    task_type=g["task_type"],
                    description=g["description"],
                    locator=str(self.root / g["path"]),
                    meta=tuple(sorted(meta.items())),
                )
            )
        return out

    def _official(self, split: str) -> list[Task]:
        source, types = {
            "train": ("train", SEEN_TYPES),
            "train_unseen": ("train", UNSEEN_TYPES),
            "eval_seen": ("valid_unseen", SEEN_TYPES),
            "eval_unseen": ("valid_unseen", UNSEEN_TYPES),
            "valid_seen": ("valid_seen", TASK_TYPES),
            "valid_unseen": ("valid_unseen", TASK_TYPES),
        }[split]
        base = self.official / source
        out = []
        if not base.is_dir():
            return out
        for game in sorted(base.glob(f"*/*/{GAME_FILE}")):
            trial = game.parent
            rel = trial.relative_to(base)
            if "movable" in str(rel) or "Sliced" in str(rel):  # as ALFWorld's own collector
                continue
            task_type = rel.parts[0].split("-", 1)[0]
            if task_type not in types:
                continue
            data = self._readable(split, game)
            if data is None or not data.get("solvable", False):
                continue
            m = re.search(r"Your task is to: (.*?)\.?\"", data["grammar"])
            out.append(
                Task(
                    id=f"{split}/{rel.as_posix()}",
                    split=split,
                    task_type=task_type,
                    description=m.group(1).strip() if m else "",
                    locator=str(game),
                )
            )
        return out


def _read_manifest(path: Path) -> dict:
    try:
        m = json.loads(path.read_bytes().decode("utf-8"))
    except OSError as e:
        raise ValueError(f"alfworld manifest {path} cannot be read: {e.strerror or e}") from None
    except UnicodeDecodeError as e:
        raise ValueError(f"alfworld manifest {path} is not UTF-8 text (byte {e.start}); regenerate it with "
                         "`evolving-rl games generate`") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"alfworld manifest {path} is not valid JSON: {e}") from None
    if not isinstance(m, dict) or not isinstance(m.get("splits"), dict):
        raise ValueError(f"alfworld manifest {path}: missing 'splits' mapping")
    for split, games in m["splits"].items():
        if not isinstance(games, list):
            raise ValueError(f"alfworld manifest {path}: splits.{split} must be a list of games")
        for i, g in enumerate(games):
            if not isinstance(g, dict):
                raise ValueError(f"alfworld manifest {path}: splits.{split}[{i}] must be an object")
            for key in ("dir", "path", "task_type", "description"):
                if key not in g:
                    raise ValueError(f"alfworld manifest {path}: splits.{split}[{i}] lacks {key!r}")
                if not isinstance(g[key], str):
                    raise ValueError(f"alfworld manifest {path}: splits.{split}[{i}].{key} must be a string, "
                                     f"got {json.dumps(g[key])[:60]}")
            if g["task_type"] not in TASK_TYPES:
                raise ValueError(f"alfworld manifest {path}: splits.{split}[{i}].task_type {g['task_type']!r} is not "
                                 f"an ALFWorld task type; allowed: {', '.join(TASK_TYPES)}")
    return m


register("alfworld", AlfworldEnv, AlfworldSuite)
