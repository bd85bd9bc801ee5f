"""TextWorld Commonsense (`twc`) as a skill-transfer benchmark: experience carries a fact the solver lacks.

Every twc game asks to put one object away "in its usual location"; each object kind has one
correct receptacle. TextWorld-Express draws the object kinds of its train, dev and test folds
from disjoint lists (measured: 158 kinds in 300 train games, 89 in 300 test games, none
shared), so a solver trained on train-fold games has never seen a test-fold object and cannot
know where it goes. The engine's score says it: taking the object raises the score to 0.5, a
placement in the right receptacle to 1.0 (won), in a wrong one back to 0. An episode that
explores therefore *reveals* where an unfamiliar object belongs, and a skill distilled from it
("the dirty blue jumper goes in the laundry basket; it does not go in the work table") is
exactly what a solver lacks on another game with that object.

Splits (by OBJECT KIND, not only by seed fold):
- train: train-fold games (seeds from 0); warm start, RL sources and the training retrieval pool.
- dev: dev-fold games, whose object kinds are neither train's nor test's: the warm start shows
  them only WITH a card from another game of the same object, never without, so the only way
  to place them is to read the card (a solver cloned on train games alone learns each seen
  object's place by heart and ignored even a card naming the right place: 19/40 with it,
  20/40 without, on eval_unseen).
- eval_seen: later train-fold games whose object kind occurs in `train`.
- eval_unseen: test-fold games whose object kind occurs in the experience pool: never in `train`.
- train_unseen: the test-time experience pool, other test-fold games (seeds from `pool_offset`)
  that share eval_unseen's object kinds; one_shot / library retrieve from here, training never.
`check_kinds_disjoint` enforces that no held-out kind reaches training data.

Budgets: an evaluated (or trained-on) game ends after `budget` actions (5: take, then at most
two placements with one take-back between), so brute force over the 2-7 receptacles of a room
does not solve an unfamiliar object; the experience pool's games run to the rollout's
`env.max_steps` (the agent's past, unhurried episodes, where exploring is what reveals the
place). The task description names the object to put away, because twc's own sentence is the
same for every game and retrieval keys on the description.

Observations say how the score moved after each action ("Your score went up."): the engine
prints nothing, and without it neither the solver nor the extractor could tell a right
placement from a wrong one. With the option `tried` (off by default) every observation also
lists this episode's placements and what the score said ("Tried: put X in Y (score went
down)."): the per-step prompt shows only the last two turns, so a greedy solver that forgot
its first wrong try repeated it, and an experience episode revealed a place almost only where
the first guess was already right. `prune_tried` (off by default) instead drops the
placements the score proved wrong from the admissible actions, a memory the solver need not
learn to read.
"""

from __future__ import annotations

import json
import random
import re
import weakref
from dataclasses import replace
from pathlib import Path
from typing import Any

from evolving_rl.envs.base import EnvError, register
from evolving_rl.envs.twx import TWXEnv
from evolving_rl.types import StepResult, Task

GAME_PARAMS = "numLocations=1,numItemsToPutAway=1,includeDoors=0,limitInventorySize=0"
DEFAULT_BUDGET = 5
SPLIT_NAMES = ("train", "dev", "eval_seen", "eval_unseen", "train_unseen")
SCORE_UP, SCORE_DOWN = "Your score went up.", "Your score went down."
_PUT_RE = re.compile(r"^put (.+) in (.+)$")
_TAKE_RE = re.compile(r"^take (.+)$")


def _int_option(options: dict[str, Any], key: str, default: int, lo: int, hi: int) -> int:
    v = options.get(key, default)
    if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
        raise ValueError(f"twc option {key}: expected an integer in {lo}..{hi}, got {v!r}")
    return v


class TWCEnv(TWXEnv):
    """One twc game; the score's moves are written into the observation, and a task's
    `budget` (its meta) ends it early (see module docstring)."""

    _task_label = "twc game"

    def __init__(self, options: dict[str, Any] | None = None) -> None:
        options = dict(options or {})
        options["game_params"] = {"twc": str(options.get("twc_params", GAME_PARAMS))}
        super().__init__({k: v for k, v in options.items() if k != "twc_params"})
        self._budget = self.max_steps
        self._score = 0.0
        self.show_tried, self.prune_tried = options.get("tried", False), options.get("prune_tried", False)
        for key, v in (("tried", self.show_tried), ("prune_tried", self.prune_tried)):
            if not isinstance(v, bool):
                raise ValueError(f"twc option {key}: expected true or false, got {v!r}")
        self._tried: list[str] = []
        # rl_invented games: (real kind's pattern, invented name) for what the agent reads, and
        # (invented name's pattern, real kind) for the actions the engine gets
        self._to_agent: tuple[re.Pattern, str] | None = None
        self._to_engine: tuple[re.Pattern, str] | None = None

    def reset(self, task: Task) -> StepResult:
        if not task.locator.startswith("twc/"):
            raise EnvError(f"twc task {task.id!r}: locator {task.locator!r} is not 'twc/fold/seed'")
        meta = dict(task.meta)
        self._budget = min(self.max_steps, int(meta.get("budget", self.max_steps)))
        self._score = 0.0
        self._tried = []
        kind, name = str(meta.get("kind", "")), str(meta.get("object", ""))
        invented = bool(kind) and name != kind
        self._to_agent = (object_re(kind), name) if invented else None
        self._to_engine = (object_re(name), kind) if invented else None
        r = super().reset(task)
        self.description = task.description or self.description  # the suite's names the object
        return r

    def step(self, action: str) -> StepResult:
        if self._to_engine:  # the agent names the invented object; the engine knows only its kind
            action = renamed(str(action), *self._to_engine)
        return super().step(action)

    def _renamed(self, text: str) -> str:
        return renamed(text, *self._to_agent) if self._to_agent else text

    def _result(self, observation: str) -> StepResult:
        r = super()._result(observation)
        moved = "" if r.score == self._score else (SCORE_UP if r.score > self._score else SCORE_DOWN)
        self._score = r.score
        last = self._actions[-1] if self._actions else ""
        if moved and _PUT_RE.match(last):
            self._tried.append(f"{last} (score went {'up' if moved == SCORE_UP else 'down'})")
        memory = f" Tried: {'; '.join(self._tried)}." if self.show_tried and self._tried else ""
        admissible = r.admissible
        if self.prune_tried and admissible:  # a placement the score proved wrong cannot be repeated
            wrong = {t.rsplit(" (", 1)[0] for t in self._tried if t.endswith("(score went down)")}
            admissible = [a for a in admissible if a not in wrong]
        done = r.done or len(self._actions) >= self._budget
        observation = self._renamed(f"{observation.strip()} {moved}".strip() + memory)
        return replace(r, observation=observation, done=done, admissible=[self._renamed(a) for a in admissible],
                       info={**r.info, "budget": self._budget})

    def expert_action(self) -> str | None:
        a = super().expert_action()
        if a == "look around" and not self._actions:  # reset already showed the room
            self._gold = self._gold[1:]
            a = super().expert_action()
        return None if a is None else self._renamed(a)


def game_facts(env: TWCEnv, fold: str, seed: int) -> tuple[str, str, str]:
    """(engine description, object kind, its receptacle), read off the engine's gold path."""
    task = Task(id=f"twc/{fold}/{seed}", split=fold, task_type="twc", description="", locator=f"twc/{fold}/{seed}", env="twc")
    env.reset(task)
    puts = [m.groups() for a in env._gold if (m := _PUT_RE.match(a))]
    if len(puts) != 1:
        raise EnvError(f"twc game {fold}/{seed}: expected one placement in the gold path, got {env._gold}")
    return str(env._infos.get("taskDescription", "")).strip(), puts[0][0], puts[0][1]


def describe(engine_description: str, kind: str) -> str:
    return f"{engine_description} The object to put away: the {kind}."


class TWCSuite:
    """The splits of the module docstring; options: train_games (600), dev_games (600), eval_games
    (40 per split), pool_games (200, the test-fold seeds scanned for the experience pool), budget (5)."""

    env_name = "twc"

    OPTIONS = ("train_games", "dev_games", "eval_games", "pool_games", "budget", "rl_fold", "rl_invented", "tried", "prune_tried", "twc_params",
               "games_dir", "max_steps", "seed", "expert")  # the last four: every engine's run options

    def __init__(self, options: dict[str, Any] | None = None) -> None:
        options = dict(options or {})
        if unknown := sorted(set(options) - set(self.OPTIONS)):  # a misspelt budget would silently be 5
            raise ValueError(f"twc: unknown env.options {unknown}; allowed: {', '.join(self.OPTIONS[:-4])}")
        self.train_games = _int_option(options, "train_games", 600, 1, 800)
        self.dev_games = _int_option(options, "dev_games", 600, 0, 1000)
        self.eval_games = _int_option(options, "eval_games", 40, 1, 100)
        self.pool_games = _int_option(options, "pool_games", 200, 1, 800)
        self.budget = _int_option(options, "budget", DEFAULT_BUDGET, 2, 100)
        self.params = str(options.get("twc_params", GAME_PARAMS))
        # rl_fold=dev: the split named `train` (RL sources, downstream tasks and the training
        # retrieval pool) holds the dev-fold games, whose objects a warm start cloned on the
        # train fold alone has never placed: the only fold where a skill can change an RL reward
        # (on train-fold games the clone wins every downstream episode, so every advantage is 0).
        self.rl_fold = str(options.get("rl_fold", "train"))
        if self.rl_fold not in ("train", "dev"):
            raise ValueError(f"twc option rl_fold: 'train' or 'dev', got {self.rl_fold!r}")
        # rl_invented=G: every RL game's object is renamed to an invented name shared by at most
        # G games of its kind (and receptacle). RL on real names lets a solver learn each training
        # object's place by heart, so on training tasks a card is redundant and RL stops rewarding
        # reading it; a name met in only G games cannot be learnt by heart in a run, only read from
        # a card written from another game with that name (retrieval finds those: same name).
        self.rl_invented = _int_option(options, "rl_invented", 0, 0, 100)
        self._splits: dict[str, list[Task]] | None = None
        self._env: TWCEnv | None = None

    def splits(self) -> list[str]:
        return list(SPLIT_NAMES)

    def tasks(self, split: str) -> list[Task]:
        if split not in SPLIT_NAMES:
            raise ValueError(f"twc: unknown split {split!r}; allowed: {', '.join(SPLIT_NAMES)}")
        if self._splits is None:
            self._splits = self._build()
        return list(self._splits[split])

    def _task(self, split: str, fold: str, seed: int, desc: str, kind: str, place: str, budget: int | None) -> Task:
        meta = [("fold", fold), ("seed", seed), ("object", kind), ("receptacle", place)]
        meta += [("budget", budget)] if budget else []
        return Task(id=f"twc/{fold}/{seed}", split=split, task_type="twc", description=describe(desc, kind),
                    locator=f"twc/{fold}/{seed}", env="twc", meta=tuple(meta))

    def _build(self) -> dict[str, list[Task]]:
        env = TWCEnv({"twc_params": self.params, "expert": True})
        self._env = env
        self._closer = weakref.finalize(self, env.close)
        try:
            seeds = {f: sorted(int(s) for s in env._call(lambda e, g=g: getattr(e, g)()))
                     for f, g in (("train", "getValidSeedsTrain"), ("dev", "getValidSeedsDev"), ("test", "getValidSeedsTest"))}
            train = [(s, *game_facts(env, "train", s)) for s in seeds["train"][: self.train_games]]
            dev = [(s, *game_facts(env, "dev", s)) for s in seeds["dev"][: self.dev_games]]
            later = [(s, *game_facts(env, "train", s)) for s in seeds["train"][self.train_games : self.train_games + 4 * self.eval_games]]
            pool = [(s, *game_facts(env, "test", s)) for s in seeds["test"][-self.pool_games :]]
            first = [(s, *game_facts(env, "test", s)) for s in seeds["test"][: 4 * self.eval_games]]
        finally:
            self.close()
        seen_kinds = {k for _, _, k, _ in train}
        pool_kinds = {k for _, _, k, _ in pool}
        b = self.budget
        out = {
            "train": [self._task("train", "train", s, d, k, p, b) for s, d, k, p in train],
            "dev": [self._task("dev", "dev", s, d, k, p, b) for s, d, k, p in dev],
            "eval_seen": [self._task("eval_seen", "train", s, d, k, p, b) for s, d, k, p in later if k in seen_kinds][: self.eval_games],
            "eval_unseen": [self._task("eval_unseen", "test", s, d, k, p, b) for s, d, k, p in first
                            if k in pool_kinds and k not in seen_kinds][: self.eval_games],
            "train_unseen": [self._task("train_unseen", "test", s, d, k, p, None) for s, d, k, p in pool],
        }
        check_kinds_disjoint(out["train"] + out["dev"], out["eval_unseen"] + out["train_unseen"])
        if self.rl_fold == "dev":
            out["train"], out["dev"] = [replace(t, split="train") for t in out["dev"]], out["train"]
        if self.rl_invented:
            real = {task_object(t) for ts in out.values() for t in ts}
            out["train"] = invent_objects(out["train"], self.rl_invented, real, seed=RL_NAMES_SEED)
        return out

    def close(self) -> None:
        if self._env is not None:
            self._closer()
            self._env = None


def task_object(task: Task | dict) -> str:
    meta = dict(task.meta) if isinstance(task, Task) else dict(task.get("meta") or {})
    return str(meta.get("object", ""))


def object_re(kind: str) -> re.Pattern:
    """Where `kind` is named as the object: after an article or a verb, ending the phrase; a
    longer name that starts with it is another thing (the receptacle "umbrella stand" is not an umbrella)."""
    return re.compile(rf"(\b(?:take|put|the|The|a|an) ){re.escape(kind)}(?= in\b| goes\b| does\b|[.,;:\"]|$)", re.M)


def renamed(text: str, pattern: re.Pattern, new: str) -> str:
    """`text` with the object that `pattern` (an `object_re`) finds called `new`."""
    return pattern.sub(lambda m: m.group(1) + new, text)


def check_kinds_disjoint(training: list[Task] | list[dict], held_out: list[Task] | list[dict], what: str = "training data") -> None:
    """Raise if an object kind of the held-out tasks occurs in `training` (tasks or demo records'
    tasks), or in any text of the demo records (observations, cards): the unseen kinds must
    reach no warm-start example, RL source or training retrieval pool."""
    kinds = {task_object(t) for t in held_out} - {""}
    texts = []
    for t in training:
        if isinstance(t, dict) and "task" in t:  # a demo record
            texts.append(json.dumps(t))
            t = t["task"]
        texts.append(task_object(t))
    blob = "\n".join(texts)
    leaked = sorted(k for k in kinds if object_re(k).search(blob))
    if leaked:
        raise ValueError(f"twc: held-out object kinds occur in {what}: {', '.join(leaked[:5])}"
                         f"{' ...' if len(leaked) > 5 else ''} (unseen kinds must stay out of training)")


# --- invented objects: examples only a card can solve, and names only copying can write ---

_MODIFIERS = ("clean", "dirty", "used", "wet", "old", "red", "blue", "green", "white", "black", "brown")


def invented_names(n: int, seed: int, avoid: set[str]) -> list[str]:
    """`n` distinct pronounceable object names that are no real object kind (`avoid`), e.g.
    "dirty molvetra". The warm start renames training objects with them: a clone cannot have
    learnt where such an object goes nor how it is spelt, so it must read the card to place it
    and copy the trajectory's words to write one, which is what an unseen kind asks of it."""
    rng = random.Random(seed)
    cons, vows = "bcdfghklmnprstvz", "aeiou"

    def word() -> str:
        return "".join(rng.choice(cons) + rng.choice(vows) + (rng.choice("lmnrs") if rng.random() < 0.3 else "")
                       for _ in range(rng.randint(2, 3)))

    names: list[str] = []
    taken = {a.lower() for a in avoid}
    # Neither may name the other as an object: each taken name's pattern compiled once (compiling
    # one per pair took 140 s for 1,500 names), the new name's searched in all taken names at once.
    patterns = [object_re(a) for a in taken]
    phrases = "\n".join(f"the {a}." for a in taken)
    while len(names) < n:
        r = rng.random()
        name = f"{rng.choice(_MODIFIERS)} {word()}" if r < 0.3 else f"{word()} {word()}" if r < 0.45 else word()
        if name not in taken and not any(p.search(f"the {name}.") for p in patterns) and not object_re(name).search(phrases):
            taken.add(name)
            names.append(name)
            patterns.append(object_re(name))
            phrases += f"\nthe {name}."
    return names


RL_NAMES_SEED = 7919  # not the warm start's seeds: RL's invented names are new to the clone


def invent_objects(tasks: list[Task], per_name: int, avoid: set[str], seed: int) -> list[Task]:
    """`tasks` with each object renamed to an invented name shared by at most `per_name` games of
    one kind (a last group of one joins the one before it, so a name always has a game to transfer
    to, unless its kind has one game). The real kind stays in the meta (`kind`) for the engine:
    TWCEnv shows the invented name in every text and maps it back in every action."""
    by_kind: dict[str, list[Task]] = {}
    for t in tasks:
        by_kind.setdefault(task_object(t), []).append(t)
    groups: list[list[Task]] = []
    for kind in sorted(by_kind):
        games = by_kind[kind]
        chunks = [games[i : i + per_name] for i in range(0, len(games), per_name)]
        if len(chunks) > 1 and len(chunks[-1]) == 1:
            last = chunks.pop()
            chunks[-1] = chunks[-1] + last
        groups += chunks
    names = invented_names(len(groups), seed, avoid)
    out = {}
    for name, group in zip(names, groups):
        for t in group:
            kind = task_object(t)
            meta = tuple((k, name if k == "object" else v) for k, v in t.meta) + (("kind", kind),)
            out[t.id] = replace(t, description=renamed(t.description, object_re(kind), name), meta=meta)
    return [out[t.id] for t in tasks]


def rename_object(demo: dict, new: str) -> dict:
    """The demo record with its object called `new` everywhere it is named (the task, every
    observation, admissible action and action); raises if the old name survives anywhere."""
    old = task_object(demo["task"])
    pattern = object_re(old)

    def sub(x: Any) -> Any:
        if isinstance(x, str):
            return renamed(x, pattern, new)
        if isinstance(x, list):
            return [sub(v) for v in x]
        if isinstance(x, dict):
            return {k: sub(v) for k, v in x.items()}
        return x

    out = sub(demo)
    out["task"]["meta"] = {**demo["task"]["meta"], "object": new}
    if pattern.search(json.dumps(out)):
        raise ValueError(f"twc: {old!r} still named in the renamed demo of {demo['task']['id']}")
    return out


# --- the rule-based skill: what the trajectory revealed, as the score showed it ---


def placements(actions: list[str], results: list[str]) -> list[tuple[str, str, bool]]:
    """(object, receptacle, right?) for each placement whose result moved the score."""
    out = []
    for a, r in zip(actions, results):
        if (m := _PUT_RE.match(a)) and (SCORE_UP in r or SCORE_DOWN in r):
            out.append((m.group(1), m.group(2), SCORE_UP in r))
    return out


def facts_skill(facts: list[tuple[str, str, bool]]) -> dict:
    """The skill a twc trajectory supports: where its object goes and where it does not.

    Only what the score proved is stated; the one-off parts of the game (the room, the other
    receptacles, the step numbers) are left out, so the card applies to any game with that object."""
    rules = []
    for obj, place, right in facts:
        rule = f"The {obj} goes in the {place}." if right else f"The {obj} does not go in the {place}."
        if rule not in rules:
            rules.append(rule)
    if not any(right for _, _, right in facts):
        rules.append("If the score went down after a placement, take the object back and try another place.")
    return {"name": "put-away-where-the-score-rises",
            "description": "Where the objects of these tasks belong, as the score showed; check the score after each placement.",
            "decision_rules": rules}


def skill_from_demo(demo: dict) -> dict:
    actions = [s["action"] for s in demo["steps"]]
    results = [s["observation"] for s in demo["steps"][1:]] + [demo.get("final_observation", "")]
    return facts_skill(placements(actions, results))


# --- warm-start demonstrations: the expert, and the expert that explores first ---


def write_demos(tasks: list[Task], out_path: str | Path, *, explore_fraction: float = 0.5, seed: int = 0,
                max_steps: int = 12, wrong_tries: int = 1, tried: bool = False, prune_tried: bool = False) -> dict:
    """Expert demos of `tasks`; a share of them first puts the object in 1..`wrong_tries`
    different wrong receptacles (the score goes down each time, the object is taken back) and
    then puts it right: what a solver without the fact must do, and what makes an experience
    episode reveal it. `tried`, `prune_tried`: the env options of those names."""
    rng = random.Random(seed)
    env = TWCEnv({"max_steps": max_steps, "expert": True, "tried": tried, "prune_tried": prune_tried})
    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    stats = {"demos": 0, "won": 0, "explored": 0}
    try:
        with out.open("w") as f:
            for task in tasks:
                t = replace(task, meta=tuple((k, v) for k, v in task.meta if k != "budget"))
                r = env.reset(t)
                steps: list[dict] = []
                explore = rng.random() < explore_fraction
                while not r.done:
                    a = env.expert_action()
                    if a is None:
                        break
                    if explore and a.startswith("put "):
                        wrong = [x for x in r.admissible if x.startswith("put ") and x != a]
                        if wrong:
                            before = len(env._actions)
                            # one wrong try draws as it always did, so the shipped demos stay reproducible
                            tries = [rng.choice(wrong)] if wrong_tries == 1 else \
                                rng.sample(wrong, min(len(wrong), rng.randint(1, wrong_tries)))
                            for w in tries:
                                obj = _PUT_RE.match(w).group(1)
                                for act in (w, f"take {obj}"):
                                    steps.append({"observation": r.observation, "admissible": r.admissible, "action": act})
                                    r = env.step(act)
                            stats["explored"] += 1
                            env._gold = env._actions + env._gold[before:]  # the expert resumes its path
                        explore = False
                        continue
                    steps.append({"observation": r.observation, "admissible": r.admissible, "action": a})
                    r = env.step(a)
                f.write(json.dumps({"task": task.to_dict(), "won": r.won, "steps": steps, "final_observation": r.observation}) + "\n")
                stats["demos"] += 1
                stats["won"] += r.won
    finally:
        env.close()
    return stats


register("twc", TWCEnv, TWCSuite)
