"""TextWorld-Express: eight fast text games on the package's own Java engine.

A task is (game, fold, seed); the package's seed ranges are its folds (train 0-999, dev
10000-10999, test 20000-20999), so splits drawn from different folds never share a game.
Each game takes a parameter string (`numLocations=3,...`); ours default to small settings
whose gold paths fit the default 50-step budget ("" gives the package's own defaults).

Seen/unseen *game types* mirror ALFWorld's held-out task types: by default `mapreader`
(navigation as in coin + putting the right thing in a box as in arithmetic/sorting) and
`peckingorder` (following written instructions as in simonsays/cookingworld) are held out,
so every unseen game needs skills a seen game teaches.

The engine runs in a JVM (py4j). If the JVM dies mid-episode, the env starts a new one and
replays the episode's actions before answering, so the caller never notices; an error the
live JVM raises is the task's (EnvError).
"""

from __future__ import annotations

import weakref
from dataclasses import replace
from typing import Any

try:
    from textworld_express import TextWorldExpressEnv
except ImportError as e:  # pragma: no cover - depends on the install
    raise ImportError(
        f"TextWorld-Express is not installed ({e}); install it with: pip install evolving-rl[envs]"
    ) from e

from evolving_rl.envs._jvm import JVMEpisode, stop_jvm
from evolving_rl.envs.base import EnvError, max_steps_option, register
from evolving_rl.envs.splits import FOLDS, SeenUnseenSuite, check_names
from evolving_rl.types import StepResult, Task

GAMES = ("cookingworld", "twc", "coin", "mapreader", "arithmetic", "sorting", "simonsays", "peckingorder")
DEFAULT_UNSEEN_GAMES = ("mapreader", "peckingorder")
DEFAULT_GAME_PARAMS = {
    "cookingworld": "numLocations=3,numIngredients=2,numDistractorItems=3,includeDoors=0,limitInventorySize=0",
    "twc": "numLocations=1,numItemsToPutAway=2,includeDoors=0,limitInventorySize=0",
    "coin": "numLocations=4,numDistractorItems=0,includeDoors=0,limitInventorySize=0",
    "mapreader": "numLocations=8,maxDistanceApart=3,maxDistractorItemsPerLocation=0,includeDoors=0,limitInventorySize=0",
    "arithmetic": "",
    "sorting": "",
    "simonsays": "gameLength=3,numDistractors=2",
    "peckingorder": "",
}


def game_params(options: dict[str, Any]) -> dict[str, str]:
    """Our defaults overridden per game by options['game_params'] ({game: "k=v,..."})."""
    given = options.get("game_params") or {}
    if not isinstance(given, dict):
        raise ValueError(f"twx option game_params: expected a mapping game -> parameter string, got {given!r}")
    check_names(list(given), GAMES, "twx option game_params", "game")
    return {**DEFAULT_GAME_PARAMS, **{g: str(p) for g, p in given.items()}}


def _start_jvm() -> TextWorldExpressEnv:
    return TextWorldExpressEnv(envStepLimit=10**9)  # our max_steps ends episodes


class TWXEnv(JVMEpisode):
    """One TextWorld-Express game at a time (see module docstring).

    options: max_steps (50), game_params ({game: "k=v,..."}, defaults DEFAULT_GAME_PARAMS),
    expert (True: generate the gold path at reset for `expert_action`).

    `expert_action` follows the gold path computed at reset while the agent's actions are
    its prefix; once the agent deviates it answers None (the engine cannot plan from a
    mid-game state). Some gold paths are random walks (coin) that differ between resets of
    the same game, so an episode rebuilt on a fresh process by replay may lose its expert.
    """

    _task_label = "twx game"

    def __init__(self, options: dict[str, Any] | None = None) -> None:
        options = dict(options or {})
        self.max_steps = max_steps_option(options, "twx", 50)
        self.game_params = game_params(options)
        self.use_expert = bool(options.get("expert", True))
        self._engine: TextWorldExpressEnv | None = None
        self._loaded: tuple[str, str] | None = None
        self._game: tuple[str, str, int, str] | None = None  # game, fold, seed, params
        self._actions: list[str] = []
        self._gold: list[str] = []
        self._infos: dict[str, Any] = {}
        self.description = ""
        self.jvm_restarts = 0

    def _locate(self, task: Task) -> tuple[str, str, int, str]:
        parts = task.locator.split("/")
        if len(parts) != 3 or parts[0] not in GAMES or parts[1] not in FOLDS or not parts[2].isdigit():
            raise EnvError(f"twx task {task.id!r}: locator {task.locator!r} is not 'game/fold/seed' "
                           f"(games: {', '.join(GAMES)}; folds: {', '.join(FOLDS)})")
        game, fold, seed = parts[0], parts[1], int(parts[2])
        params = dict(task.meta).get("game_params", self.game_params[game])
        return game, fold, seed, str(params)

    def _start(self, engine: TextWorldExpressEnv, keep_gold: bool = False) -> tuple[str, dict]:
        game, fold, seed, params = self._game
        if self._loaded != (game, params):
            try:
                engine.load(game, params)
            except ValueError as e:  # the engine names the bad parameter
                raise EnvError(f"twx game {game!r}: bad game_params {params!r}: {e}".strip()) from None
            self._loaded = (game, params)
        obs, infos = engine.reset(seed=seed, gameFold=fold, generateGoldPath=self.use_expert)
        if self.use_expert and not keep_gold:  # some gold paths (coin) are random walks: keep ours
            self._gold = [str(a) for a in engine.getGoldActionSequence()]
        return obs, infos

    def _new_engine(self) -> TextWorldExpressEnv:
        self._loaded = None  # a fresh JVM has no game loaded
        return _start_jvm()

    def _restore(self, engine: TextWorldExpressEnv) -> None:
        """A fresh JVM holds no game: start it again, keeping the first reset's gold path, and replay."""
        self._start(engine, keep_gold=True)
        for a in self._actions:
            engine.step(a)

    def reset(self, task: Task) -> StepResult:
        self._game = self._locate(task)
        self._actions, self._gold = [], []
        obs, self._infos = self._call(self._start)
        self.description = str(self._infos.get("taskDescription", ""))
        return self._result(f"{self.description}\n\n{obs}")

    def step(self, action: str) -> StepResult:
        if self._game is None:
            raise EnvError("TWXEnv.step called before reset")
        action = str(action)
        obs, _, _, self._infos = self._call(lambda engine: engine.step(action))
        self._actions.append(action)
        return self._result(obs)

    def _result(self, observation: str) -> StepResult:
        i = self._infos
        won = bool(i.get("tasksuccess"))
        steps = len(self._actions)
        done = won or bool(i.get("taskfailure")) or steps >= self.max_steps
        game, fold, seed, _ = self._game
        info = {"task": self.description, "steps": steps, "game": game, "fold": fold, "seed": seed,
                "lost": bool(i.get("taskfailure")), "jvm_restarts": self.jvm_restarts}
        score = min(1.0, max(0.0, float(i.get("score", 0.0))))
        return StepResult(observation, sorted(i.get("validActions", [])), done, won, score, info)

    def expert_action(self) -> str | None:
        n = len(self._actions)
        if n < len(self._gold) and self._gold[:n] == self._actions:
            return self._gold[n]
        return None

    def close(self) -> None:
        stop_jvm(self._engine)
        self._engine, self._loaded, self._game = None, None, None


class TWXSuite(SeenUnseenSuite):
    """TextWorld-Express tasks: for each game type, the first `tasks_per_game` seeds of a fold.

    options: games (all eight), unseen_games (DEFAULT_UNSEEN_GAMES; [] for the plain
    train/dev/test protocol over all games), tasks_per_game (50), game_params.
    Splits: train/dev/test = seen games in the package's folds; train_unseen/dev_unseen/
    test_unseen = unseen games (train_unseen is an experience pool only); eval_seen/eval_unseen
    = the test folds, under ALFWorld's names. Descriptions come from the engine (one reset per
    task, ~5 ms), because some games (mapreader) name the rooms in theirs.
    """

    env_name = "twx"

    def __init__(self, options: dict[str, Any] | None = None) -> None:
        options = dict(options or {})
        self.games = self._choose_kinds(options, "games", GAMES, "unseen_games", DEFAULT_UNSEEN_GAMES, "game")
        self.tasks_per_game = int(options.get("tasks_per_game", 50))
        if not 1 <= self.tasks_per_game <= 1000:
            raise ValueError(f"twx option tasks_per_game must be in 1..1000, got {self.tasks_per_game}")
        self.game_params = game_params(options)
        self._cache: dict[str, list[Task]] = {}
        self._made: dict[tuple[str, str], list[Task]] = {}  # (fold, game) -> tasks
        self._env: TWXEnv | None = None

    def _build(self, split: str, fold: str, games: tuple[str, ...]) -> list[Task]:
        out = []
        for game in games:
            if (fold, game) not in self._made:
                self._made[(fold, game)] = self._make(fold, game)
            out.extend(replace(t, split=split) for t in self._made[(fold, game)])
        return out

    def _make(self, fold: str, game: str) -> list[Task]:
        if self._env is None:  # one engine for every split; closed with the suite
            self._env = TWXEnv({"game_params": self.game_params, "expert": False})
            self._closer = weakref.finalize(self, self._env.close)
        env = self._env
        getter = {"train": "getValidSeedsTrain", "dev": "getValidSeedsDev", "test": "getValidSeedsTest"}[fold]
        seeds = sorted(int(s) for s in env._call(lambda e: getattr(e, getter)()))[: self.tasks_per_game]
        params = self.game_params[game]
        out = []
        for seed in seeds:
            locator = f"{game}/{fold}/{seed}"
            meta = (("fold", fold), ("game_params", params), ("seed", seed))
            task = Task(id=f"twx/{locator}", split=fold, task_type=game, description="", locator=locator,
                        env="twx", meta=meta)
            env.reset(task)
            out.append(replace(task, description=env.description))
        return out

    def close(self) -> None:
        """Stop the suite's engine (it also stops when the suite is garbage-collected)."""
        if self._env is not None:
            self._closer()
            self._env = None


register("twx", TWXEnv, TWXSuite)
