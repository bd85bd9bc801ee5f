"""TextWorld: games generated offline with TextWorld's own challenges (what `tw-make` runs).

`generate_tw_games` writes a games directory with a manifest; `TWSuite` reads it and
`TWEnv` plays its games with admissible commands. Challenges: `tw-cooking` (drawn from its
own train/valid/test distributions), `tw-coin_collector`, `tw-treasure_hunter` and
`tw-simple` (test games from its test distribution). Game seeds come from disjoint ranges
per split, and a game whose content repeats an earlier one is skipped, so splits never share
a game. Seen/unseen challenge types mirror ALFWorld's held-out task types (default held
out: treasure hunter, which needs the navigation of coin collector and the fetching of
cooking).

The expert follows the game's walkthrough while the agent's actions are its prefix, and
after a deviation TextWorld's own planner (`policy_commands`) from the current state.
"""

from __future__ import annotations

import hashlib
import json
import re
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

try:
    import textworld
    import textworld.challenges
except ImportError as e:  # pragma: no cover - depends on the install
    raise ImportError(f"TextWorld is not installed ({e}); install it with: pip install evolving-rl[envs]") from e

from evolving_rl.envs.base import EnvError, max_steps_option, register
from evolving_rl.envs.splits import FOLDS, SPLITS, check_names, split_fold
from evolving_rl.types import StepResult, Task

CHALLENGES = ("tw-cooking", "tw-coin_collector", "tw-treasure_hunter", "tw-simple")
DEFAULT_UNSEEN = ("tw-treasure_hunter",)
DEFAULT_SETTINGS: dict[str, dict[str, Any]] = {
    "tw-cooking": {"recipe": 1, "take": 1, "go": 1, "open": True, "cook": False, "cut": False, "drop": False,
                   "recipe_seed": 0},
    "tw-coin_collector": {"level": 5},
    "tw-treasure_hunter": {"level": 5},
    "tw-simple": {"rewards": "balanced", "goal": "brief"},
}
_SEED_BASE = {"train": 0, "dev": 1_000_000, "test": 2_000_000}
MANIFEST = "manifest.json"
_BANNER_LINE = re.compile(r"[\s_|\\/$<>()=-]*")


@contextmanager
def _quiet() -> Iterator[None]:
    """Silence jericho's "unsupported game" warnings: they mean "not an Infocom game", i.e. every
    generated game, and TextWorld supplies what jericho cannot (score, walkthrough, commands)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def _check_challenges(names, key: str) -> tuple[str, ...]:
    return check_names(names, CHALLENGES, f"textworld {key}", "challenge")


def _split_settings(challenge: str, fold: str, settings: dict[str, Any]) -> dict[str, Any]:
    s = dict(settings)
    if challenge == "tw-cooking":
        s["split"] = {"train": "train", "dev": "valid", "test": "test"}[fold]
    if challenge == "tw-simple":
        s["test"] = fold == "test"
    return s


def generate_tw_games(
    out_dir: str | Path,
    seed: int = 0,
    counts: dict[str, int | dict[str, int]] | None = None,
    settings: dict[str, dict[str, Any]] | None = None,
    max_tries: int = 20,
) -> Path:
    """Generate games into `out_dir` and write its manifest; returns the manifest path.

    counts: {challenge: n per fold} or {challenge: {fold: n}} (default 5 per fold for every
    challenge); settings: per-challenge overrides of DEFAULT_SETTINGS. Deterministic in
    `seed`. Each game costs a few seconds (Inform 7 compilation).
    """
    counts = {c: 5 for c in CHALLENGES} if counts is None else dict(counts)
    _check_challenges(list(counts), "counts")
    _check_challenges(list(settings or {}), "settings")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    games, seen_content = [], set()
    for challenge in CHALLENGES:
        if challenge not in counts:
            continue
        per_fold = counts[challenge]
        per_fold = per_fold if isinstance(per_fold, dict) else {f: int(per_fold) for f in FOLDS}
        bad = [f for f in per_fold if f not in FOLDS]
        if bad:
            raise ValueError(f"textworld counts[{challenge!r}]: unknown fold {bad[0]!r}; folds: {', '.join(FOLDS)}")
        base_settings = {**DEFAULT_SETTINGS[challenge], **(settings or {}).get(challenge, {})}
        make = textworld.challenges.CHALLENGES[challenge][1]
        for fold in FOLDS:
            want, made, i = int(per_fold.get(fold, 0)), 0, 0
            while made < want:
                if i >= want + max_tries:
                    raise RuntimeError(f"textworld: only {made} distinct {challenge} {fold} games after {i} seeds; "
                                       "widen its settings or lower its count")
                game_seed = _SEED_BASE[fold] + seed * 10_000 + i
                i += 1
                options = textworld.GameOptions()
                options.seeds = game_seed
                with _quiet():
                    game = make(settings=_split_settings(challenge, fold, base_settings), options=options)
                data = game.serialize()
                data.pop("metadata", None)
                digest = hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()
                if digest in seen_content:
                    continue
                seen_content.add(digest)
                name = f"{challenge}-{fold}-{made:04d}"
                rel = Path(challenge) / fold / f"{name}.z8"
                options.path = str(out / rel)
                options.file_ext = ".z8"
                options.force_recompile = True
                with _quiet():
                    textworld.generator.compile_game(game, options)
                games.append({"id": name, "challenge": challenge, "fold": fold, "seed": game_seed,
                              "path": rel.as_posix(), "objective": game.objective,
                              "walkthrough": list(game.walkthrough or []), "content": digest})
                made += 1
    manifest = out / MANIFEST
    manifest.write_text(json.dumps({"seed": seed, "settings": settings or {}, "games": games}, indent=1))
    return manifest


def strip_banner(text: str) -> str:
    """The first observation without TextWorld's ASCII-art banner (lines of only art characters)."""
    lines = text.split("\n")
    while lines and _BANNER_LINE.fullmatch(lines[0]):
        lines.pop(0)
    return "\n".join(lines).strip()


class TWEnv:
    """One generated TextWorld game at a time.

    options: max_steps (50), games_dir (resolves relative locators), expert (True: request
    the walkthrough and TextWorld's planner for `expert_action`).
    """

    def __init__(self, options: dict[str, Any] | None = None) -> None:
        options = dict(options or {})
        self.max_steps = max_steps_option(options, "textworld", 50)
        self.games_dir = Path(options.get("games_dir") or ".")
        self.use_expert = bool(options.get("expert", True))
        self._infos = textworld.EnvInfos(
            admissible_commands=True, won=True, lost=True, score=True, max_score=True, objective=True,
            policy_commands=self.use_expert, extras=["walkthrough"] if self.use_expert else [],
        )
        self._env: Any = None
        self._path: Path | None = None
        self._state: Any = None
        self._actions: list[str] = []
        self._walkthrough: list[str] = []
        self.description = ""

    def reset(self, task: Task) -> StepResult:
        p = Path(task.locator)
        path = p if p.is_absolute() else self.games_dir / p
        if not path.is_file():
            raise EnvError(f"textworld task {task.id!r}: game file not found: {path}")
        try:
            with _quiet():
                if path != self._path:
                    self.close()
                    self._env = textworld.start(str(path), self._infos)
                    self._path = path
                self._state = self._env.reset()
        except Exception as e:
            self.close()
            raise EnvError(f"textworld game {path} cannot be played: {type(e).__name__}: {e}") from None
        self._actions = []
        self._walkthrough = list(self._state.get("extra.walkthrough") or []) if self.use_expert else []
        self.description = str(self._state.get("objective") or "").strip()
        return self._result(strip_banner(self._state["feedback"]))

    def step(self, action: str) -> StepResult:
        if self._state is None:
            raise EnvError("TWEnv.step called before reset")
        action = str(action)
        try:
            with _quiet():
                self._state, _, _ = self._env.step(action)
        except Exception as e:
            raise EnvError(f"textworld game {self._path}: engine failed on {action!r}: {e}") from None
        self._actions.append(action)
        return self._result(self._state["feedback"])

    def _result(self, observation: str) -> StepResult:
        s = self._state
        won, lost = bool(s.get("won")), bool(s.get("lost"))
        steps = len(self._actions)
        max_score = s.get("max_score") or 0
        score = 1.0 if won else (float(s.get("score") or 0) / max_score if max_score else 0.0)
        info = {"task": self.description, "steps": steps, "gamefile": str(self._path), "lost": lost}
        done = won or lost or steps >= self.max_steps
        return StepResult(observation, list(s.get("admissible_commands") or []), done, won,
                          min(1.0, max(0.0, score)), info)

    def expert_action(self) -> str | None:
        if not self.use_expert or self._state is None:
            return None
        n = len(self._actions)
        if n < len(self._walkthrough) and self._walkthrough[:n] == self._actions:
            return self._walkthrough[n]
        plan = self._state.get("policy_commands") or []
        return str(plan[0]) if plan else None

    def close(self) -> None:
        if self._env is not None:
            try:
                self._env.close()
            except Exception:
                pass
        self._env, self._path, self._state = None, None, None


class TWSuite:
    """Tasks of a games directory written by `generate_tw_games`.

    options: games_dir (required), unseen_challenges (DEFAULT_UNSEEN; [] for the plain
    train/dev/test protocol). Splits as in TextWorld-Express: train/dev/test (seen
    challenges), *_unseen, eval_seen/eval_unseen = the test folds.
    """

    env_name = "textworld"

    def __init__(self, options: dict[str, Any] | None = None) -> None:
        options = dict(options or {})
        root = options.get("games_dir")
        if not root:
            raise ValueError("textworld: no games directory (set env.options.games_dir; generate one with generate_tw_games)")
        self.root = Path(root).expanduser().resolve()
        path = self.root / MANIFEST
        try:
            manifest = json.loads(path.read_text())
        except FileNotFoundError:
            raise ValueError(f"textworld games_dir {self.root}: no {MANIFEST} (generate one with generate_tw_games)") from None
        except (OSError, json.JSONDecodeError) as e:
            raise ValueError(f"textworld manifest {path} is not valid JSON: {e}") from None
        games = manifest.get("games") if isinstance(manifest, dict) else None
        if not isinstance(games, list):
            raise ValueError(f"textworld manifest {path}: missing 'games' list")
        for i, g in enumerate(games):
            for key in ("id", "challenge", "fold", "path", "objective"):
                if not isinstance(g, dict) or key not in g:
                    raise ValueError(f"textworld manifest {path}: games[{i}] lacks {key!r}")
            if g["fold"] not in FOLDS or g["challenge"] not in CHALLENGES:
                raise ValueError(f"textworld manifest {path}: games[{i}] has fold {g['fold']!r} / challenge "
                                 f"{g['challenge']!r}; allowed folds {FOLDS}, challenges {CHALLENGES}")
        self._games = games
        self.unseen = _check_challenges(options.get("unseen_challenges", DEFAULT_UNSEEN), "unseen_challenges")

    def splits(self) -> list[str]:
        return list(SPLITS)

    def tasks(self, split: str) -> list[Task]:
        fold, seen = split_fold("textworld", split)
        return [
            Task(id=f"textworld/{g['id']}", split=split, task_type=g["challenge"].removeprefix("tw-"),
                 description=str(g["objective"]).strip(), locator=str(self.root / g["path"]), env="textworld",
                 meta=(("fold", fold), ("seed", g.get("seed"))))
            for g in self._games
            if g["fold"] == fold and (g["challenge"] not in self.unseen) == seen
        ]


register("textworld", TWEnv, TWSuite)
