"""Offline ALFWorld game generation from what the `alfworld` package ships (SPEC, "Generating
ALFWorld games").

The official game download is impossible here, but the package ships the PDDL domain, the
text grammar, the goal library of the six task types and the object / receptacle lists of
the 120 AI2-THOR floorplans. A game is a PDDL problem in ALFRED naming written from one
floorplan; it is kept only if ALFWorld's handcoded expert wins it on ALFWorld's engine
within the step budget, and the winning walkthrough is stored in the game file.

Determinism: each candidate game draws from an RNG derived from (seed, split, task type,
index) only, verification runs in spawned workers with a fixed hash seed, and games are
accepted in index order, so the same seed gives byte-identical games and manifest with
any number of workers.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import random
import re
import shutil
import tempfile
import time
from collections.abc import Callable
from functools import lru_cache
from pathlib import Path
from typing import Any

from evolving_rl.envs.alfworld import (
    GAME_FILE,
    SEEN_TYPES,
    SPLITS,
    TASK_TYPES,
    UNSEEN_TYPES,
    AlfworldEnv,
)
from evolving_rl.envs.base import EnvError

GENERATOR_VERSION = "1"
ROOMS = {"Kitchen": range(1, 31), "LivingRoom": range(201, 231), "Bedroom": range(301, 331), "Bathroom": range(401, 431)}
HELD_OUT_PER_ROOM = 6  # as ALFWorld's own TEST_SCENE_NUMBERS: 6 of 30 floorplans per room type
SPLIT_TYPES = {"train": SEEN_TYPES, "train_unseen": UNSEEN_TYPES, "eval_seen": SEEN_TYPES, "eval_unseen": UNSEEN_TYPES}
NEEDED_RECEPTACLE = {
    "pick_clean_then_place_in_recep": "SinkBasin",
    "pick_heat_then_place_in_recep": "Microwave",
    "pick_cool_then_place_in_recep": "Fridge",
}
ACTION_PROPERTY = {
    "pick_clean_then_place_in_recep": "Cleanable",
    "pick_heat_then_place_in_recep": "Heatable",
    "pick_cool_then_place_in_recep": "Coolable",
}
# Targets the 0.4.2 expert cannot handle (SPEC): movable receptacles make it search blindly,
# TeddyBear's constants lack a comma.
BAD_TARGETS = {"Mug", "Bowl", "Cup", "Plate", "Pan", "Pot", "Box", "TeddyBear"}
LAMPS = ("DeskLamp", "FloorLamp")
LAMP_HOLDERS = ("SideTable", "Desk", "Dresser", "Shelf", "DiningTable", "CoffeeTable", "TVStand", "Ottoman")
MAX_RECEPTACLES = 36  # bigger scenes can need more than 50 expert steps (SPEC)
DOMAIN_CONSTANTS = {"SinkBasinType": "rtype", "MicrowaveType": "rtype", "FridgeType": "rtype",
                    "KnifeType": "otype", "ButterKnifeType": "otype"}  # fmt: skip


class GenerationError(ValueError):
    """A floorplan / task type / value the generator cannot use. Names the culprit."""


# ---------------------------------------------------------------------------------------
# Floorplans


def room_type(floorplan: int) -> str:
    for room, numbers in ROOMS.items():
        if floorplan in numbers:
            return room
    raise GenerationError(f"floorplan {floorplan} is not an AI2-THOR floorplan number (1-30, 201-230, ...)")


def floorplan_split(split_seed: int = 0) -> tuple[list[int], list[int]]:
    """(training, held-out) floorplans: a fixed, seeded 6 of each room type's 30 held out."""
    train, held = [], []
    for room, numbers in ROOMS.items():
        out = sorted(random.Random(f"floorplans/{split_seed}/{room}").sample(list(numbers), HELD_OUT_PER_ROOM))
        held += out
        train += [n for n in numbers if n not in out]
    return train, held


def _mangle(name: str) -> str:
    for a, b in (("-", "_minus_"), ("|", "_bar_"), ("+", "_plus_"), (".", "_dot_"), (",", "_comma_")):
        name = name.replace(a, b)
    return name


def _recep_class(rid: str) -> str:
    parts = rid.split("|")
    return parts[-1] if len(parts) == 5 else parts[0]  # Sink|x|y|z|SinkBasin reads as "sinkbasin"


def _loc(x: float, z: float, rot: float, horizon: float) -> str:
    return f"loc|{round(x / 0.25)}|{round(z / 0.25)}|{int(round(rot / 90)) % 4}|{int(round(horizon))}"


def _coord(v: float) -> str:
    return f"{v:+06.2f}"


@lru_cache(maxsize=None)
def load_floorplan(floorplan: int) -> tuple[tuple[str, ...], tuple[tuple[str, str, tuple[float, ...]], ...]]:
    """(object classes, receptacles as (id, class, pose)) of one floorplan.

    Receptacle poses come from `-openable.json`; classes listed in `-objects.json` but absent
    there (CoffeeMachine, GarbageCan, StoveBurner, Toaster, towel holders...) are synthesised
    at a deterministic pose derived from the floorplan number.
    """
    import alfworld.gen.constants as C

    layouts = Path(C.__file__).parent / "layouts"
    obj_path, open_path = layouts / f"FloorPlan{floorplan}-objects.json", layouts / f"FloorPlan{floorplan}-openable.json"
    try:
        classes = tuple(json.loads(obj_path.read_text()))
        openable = json.loads(open_path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise GenerationError(f"floorplan {floorplan}: cannot read {obj_path.name} / {open_path.name}: {e}") from None
    receps = [(rid, _recep_class(rid), tuple(float(v) for v in pose)) for rid, pose in sorted(openable.items())]
    have = {c for _, c, _ in receps}
    rng = random.Random(f"synth/{floorplan}")
    for cls in sorted(set(classes)):
        if cls in C.VAL_RECEPTACLE_OBJECTS and cls not in have and cls not in C.MOVABLE_RECEPTACLES:
            for _ in range(4 if cls == "StoveBurner" else 1):
                x, y, z = (rng.uniform(-3, 3), rng.uniform(0.3, 1.5), rng.uniform(-3, 3))
                prefix = {"SinkBasin": "Sink", "BathtubBasin": "Bathtub"}.get(cls)
                rid = f"{prefix or cls}|{_coord(x)}|{_coord(y)}|{_coord(z)}" + (f"|{cls}" if prefix else "")
                pose = (round(x * 4) / 4, round(z * 4) / 4, float(rng.choice([0, 90, 180, 270])), 30.0)
                receps.append((rid, cls, pose))
    return classes, tuple(receps)


def _names_clash(name: str, others: set[str]) -> bool:
    """The expert matches names by substring ("pen" in "pencil", "knife" in "butterknife")."""
    n = name.lower()
    return any(n != o.lower() and n in o.lower() for o in others)


def task_options(floorplan: int, task_type: str) -> list[tuple[str, str]]:
    """Every valid (object target, parent or lamp) for a task type in a floorplan.

    Raises GenerationError naming the floorplan when it lacks what the task type needs.
    """
    import alfworld.gen.constants as C

    if task_type not in TASK_TYPES:
        raise GenerationError(f"unknown task type {task_type!r}; allowed: {', '.join(TASK_TYPES)}")
    room = room_type(floorplan)
    if room not in C.GOALS_VALID[task_type]:
        raise GenerationError(f"floorplan {floorplan} is a {room}; {task_type} needs one of {sorted(C.GOALS_VALID[task_type])}")
    classes, receps = load_floorplan(floorplan)
    rclasses = {c for _, c, _ in receps}
    needed = NEEDED_RECEPTACLE.get(task_type)
    if needed and needed not in rclasses:
        raise GenerationError(f"floorplan {floorplan} has no {needed} receptacle, needed by {task_type}")
    V = C.VAL_RECEPTACLE_OBJECTS
    names = set(classes) | rclasses
    targets = sorted(
        o
        for o in set(classes)
        if o not in BAD_TARGETS
        and o in C.OBJECTS
        and any(o in V[r] for r in rclasses if r in V)
        and not _names_clash(o, names)
        and (task_type not in ACTION_PROPERTY or o in C.VAL_ACTION_OBJECTS[ACTION_PROPERTY[task_type]])
    )
    if task_type == "look_at_obj_in_light":
        lamps = [lamp for lamp in LAMPS if lamp in classes and any(r in rclasses for r in LAMP_HOLDERS)]
        opts = [(o, lamp) for o in targets for lamp in lamps]
    else:
        parents = sorted(r for r in rclasses if r in V and r not in C.MOVABLE_RECEPTACLES and not _names_clash(r, names))
        opts = [
            (o, p)
            for o in targets
            for p in parents
            if o in V[p] and p != needed
            # the object must also fit somewhere else, since it may not start in its parent
            and any(o in V[r] and r != p for r in rclasses if r in V)
        ]
    if not opts:
        raise GenerationError(f"floorplan {floorplan} has no object/receptacle pair usable for {task_type}")
    return opts


def eligible_floorplans(floorplans: list[int], task_type: str) -> list[int]:
    out = []
    for fp in floorplans:
        try:
            task_options(fp, task_type)
        except GenerationError:
            continue
        if len(load_floorplan(fp)[1]) <= MAX_RECEPTACLES:
            out.append(fp)
    return out


# ---------------------------------------------------------------------------------------
# One game


def build_game(floorplan: int, task_type: str, rng: random.Random, target: tuple[str, str] | None = None) -> dict:
    """A game (the game.tw-pddl JSON, traj_data, dir name, goal) for one floorplan.

    Objects go only into receptacles that may hold them (ALFWorld's VAL_RECEPTACLE_OBJECTS),
    openables start closed, every placeable class of the floorplan appears as a distractor.
    """
    import alfworld.gen.constants as C
    import alfworld.gen.goal_library as glib
    from alfworld.agents.utils.misc import add_task_to_grammar
    from alfworld.info import ALFRED_PDDL_PATH, ALFRED_TWL2_PATH

    opts = task_options(floorplan, task_type)
    obj_t, second = target if target is not None else rng.choice(opts)
    if (obj_t, second) not in opts:
        raise GenerationError(f"floorplan {floorplan}: ({obj_t}, {second}) is not valid for {task_type}")
    lamp = second if task_type == "look_at_obj_in_light" else ""
    parent = "" if lamp else second
    classes, receps = load_floorplan(floorplan)
    V = C.VAL_RECEPTACLE_OBJECTS

    # Where things may start: never the target inside its parent or the appliance of its task.
    forbidden = {parent, NEEDED_RECEPTACLE.get(task_type, "")}
    objects: list[tuple[str, str]] = []  # (object id, receptacle id)
    used_ids: set[str] = set()

    def place(cls: str, holders: list[tuple[str, str, tuple[float, ...]]]) -> None:
        rid, _, pose = rng.choice(holders)
        while True:
            oid = f"{cls}|{_coord(pose[0] + rng.uniform(-0.4, 0.4))}|{_coord(rng.uniform(0.1, 1.8))}|{_coord(pose[1] + rng.uniform(-0.4, 0.4))}"
            if oid not in used_ids:
                break
        used_ids.add(oid)
        objects.append((oid, rid))

    for cls in sorted(set(classes)):
        if cls not in C.OBJECTS or cls in LAMPS:
            continue
        holders = [r for r in receps if r[1] in V and cls in V[r[1]]]
        if cls == obj_t:
            holders = [r for r in holders if r[1] not in forbidden]
            count = rng.randint(2, 3) if task_type == "pick_two_obj_and_place" else rng.randint(1, 2)
        else:
            count = rng.randint(1, 2)
        for _ in range(count if holders else 0):
            place(cls, holders)
    lamps: list[tuple[str, str]] = []
    for cls in LAMPS:
        holders = [r for r in receps if r[1] in LAMP_HOLDERS]
        if cls in classes and holders:
            rid, _, pose = rng.choice(holders)
            lamps.append((f"{cls}|{_coord(pose[0])}|{_coord(rng.uniform(0.5, 1.5))}|{_coord(pose[1])}", rid))

    # --- the PDDL problem
    recep_loc = {rid: _loc(*pose) for rid, _, pose in receps}
    taken = set(recep_loc.values())
    agent_loc = _loc(rng.uniform(-2, 2), rng.uniform(-2, 2), rng.choice([0, 90, 180, 270]), 30)
    while agent_loc in taken:
        agent_loc = _loc(rng.uniform(-3, 3), rng.uniform(-3, 3), rng.choice([0, 90, 180, 270]), 30)
    obj_cls = {oid: oid.split("|")[0] for oid, _ in objects + lamps}
    otypes = set(obj_cls.values()) | {obj_t} | ({lamp} if lamp else set())
    rtypes = {c for _, c, _ in receps} | ({parent} if parent else set())
    decl = {"agent1": "agent"}
    decl.update({f"{t}Type": "otype" for t in sorted(otypes)})  # sorted: no hash-seed order
    decl.update({f"{t}Type": "rtype" for t in sorted(rtypes)})
    for name, kind in DOMAIN_CONSTANTS.items():
        decl.setdefault(name, kind)
    decl.update({_mangle(loc): "location" for loc in sorted(taken | {agent_loc})})
    decl.update({_mangle(rid): "receptacle" for rid, _, _ in receps})
    decl.update({_mangle(oid): "object" for oid in obj_cls})

    init = [f"(atLocation agent1 {_mangle(agent_loc)})", "(= (total-cost) 0)"]
    for rid, cls, _ in receps:
        m = _mangle(rid)
        init += [f"(receptacleType {m} {cls}Type)", f"(receptacleAtLocation {m} {_mangle(recep_loc[rid])})"]
        if cls in C.OPENABLE_CLASS_LIST:
            init.append(f"(openable {m})")
    for oid, rid in objects + lamps:
        m, cls = _mangle(oid), obj_cls[oid]
        init += [f"(objectType {m} {cls}Type)", f"(inReceptacle {m} {_mangle(rid)})", f"(objectAtLocation {m} {_mangle(recep_loc[rid])})"]
        if cls in LAMPS:
            init.append(f"(toggleable {m})")
            continue
        init.append(f"(pickupable {m})")
        for prop, pred in (("Heatable", "heatable"), ("Coolable", "coolable"), ("Cleanable", "cleanable"), ("Sliceable", "sliceable")):
            if cls in C.VAL_ACTION_OBJECTS[prop]:
                init.append(f"({pred} {m})")
    for rt in sorted(rtypes):
        for ot in sorted(otypes):
            if rt in V and ot in V[rt]:
                init.append(f"(canContain {rt}Type {ot}Type)")

    goal = glib.gdict[task_type]["pddl"].format(obj=obj_t, recep=parent, toggle=lamp, mrecep="").replace("#", "-")
    scene = f"{task_type}-{obj_t}-None-{parent or lamp}-{floorplan}"
    problem = "\n".join(
        [f"(define (problem plan_{_mangle(scene).lower()})", "(:domain alfred)", "(:objects"]
        + [f"    {name} - {kind}" for name, kind in decl.items()]
        + [")", "(:init"]
        + [f"    {fact}" for fact in init]
        + [")", goal.strip(), ""]
    )
    traj_data = {
        "task_type": task_type,
        "scene": {"floor_plan": f"FloorPlan{floorplan}"},
        "pddl_params": {"object_target": obj_t, "parent_target": parent, "toggle_target": lamp,
                        "mrecep_target": "", "object_sliced": False},  # fmt: skip
    }
    saved = random.getstate()  # add_task_to_grammar picks its template with the global random
    try:
        random.seed(rng.getrandbits(64))
        grammar = add_task_to_grammar(Path(ALFRED_TWL2_PATH).read_text(), traj_data)
    finally:
        random.setstate(saved)
    description = re.search(r"Your task is to: (.*?)\.?\"", grammar).group(1).strip()
    game = {"pddl_domain": Path(ALFRED_PDDL_PATH).read_text(), "grammar": grammar, "pddl_problem": problem, "solvable": True}
    return {"game": game, "traj_data": traj_data, "scene": scene, "description": description, "floorplan": floorplan}


def _write_json(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")


# ---------------------------------------------------------------------------------------
# Verification in worker processes

_WORKER: dict[str, Any] = {}


def _worker_env(max_steps: int) -> AlfworldEnv:
    env = _WORKER.get("env")
    if env is None or env.max_steps != max_steps:
        env = _WORKER["env"] = AlfworldEnv({"max_steps": max_steps, "seed": 0, "translation_cache": 8})
    return env


def expert_walkthrough(env: AlfworldEnv, game_path: str) -> tuple[list[str] | None, str]:
    """The expert's winning actions on a game, or (None, why it lost)."""
    r = env.reset(game_path)
    actions: list[str] = []
    while not r.done:
        a = env.expert_action()
        if a is None:
            return None, f"expert gave up ({env.expert_error})"
        r = env.step(a)
        actions.append(a)
    return (actions, "won") if r.won else (None, f"not won within {env.max_steps} steps")


def _candidate_spec(seed: int, split: str, task_type: str, index: int, floorplans: list[int]) -> dict:
    """Candidate `index` of (split, task type): a function of these values only."""
    rng = random.Random(f"alfworld-gen/{GENERATOR_VERSION}/{seed}/{split}/{task_type}/{index}")
    return build_game(rng.choice(floorplans), task_type, rng)


def _candidate(job: tuple[int, str, str, int, list[int], int, str]) -> dict:
    """Build and verify one candidate in a worker; only the verdict travels back (the parent
    rebuilds accepted games from the same seed, so no game text crosses processes)."""
    seed, split, task_type, index, floorplans, max_steps, scratch = job
    spec = _candidate_spec(seed, split, task_type, index, floorplans)
    d = Path(scratch) / f"{split}-{task_type}-{index}"
    d.mkdir(parents=True, exist_ok=True)
    try:
        _write_json(d / GAME_FILE, spec["game"])
        _write_json(d / "traj_data.json", spec["traj_data"])
        walk, why = expert_walkthrough(_worker_env(max_steps), str(d / GAME_FILE))
    except EnvError as e:  # the engine refused the game: a discard, not a crash
        walk, why = None, str(e)
    finally:
        shutil.rmtree(d, ignore_errors=True)
    return {"split": split, "task_type": task_type, "index": index, "walkthrough": walk, "why": why}


def _pool(workers: int):
    """Spawned workers with a fixed hash seed: the engine's fact order (a set) feeds the expert."""
    old = os.environ.get("PYTHONHASHSEED")
    os.environ["PYTHONHASHSEED"] = "0"
    try:
        return mp.get_context("spawn").Pool(max(1, workers))
    finally:
        if old is None:
            del os.environ["PYTHONHASHSEED"]
        else:
            os.environ["PYTHONHASHSEED"] = old


# ---------------------------------------------------------------------------------------
# Public entry points


def generate_games(
    out_dir: str | Path,
    seed: int,
    sizes: dict[str, int],
    max_expert_steps: int = 50,
    workers: int = 2,
    progress: Callable[[int, int], None] | None = None,
    split_seed: int = 0,
) -> dict:
    """Generate expert-verified games for the named splits into `out_dir`; returns the manifest.

    sizes: games per split (train, train_unseen, eval_seen, eval_unseen), spread evenly over
    the split's task types. Unsolvable candidates are discarded and counted per split and type.
    """
    for split, n in sizes.items():
        if split not in SPLIT_TYPES:
            raise GenerationError(f"unknown split {split!r}; allowed: {', '.join(SPLITS)}")
        if not isinstance(n, int) or n < 0:
            raise GenerationError(f"games for split {split!r} must be a non-negative integer, got {n!r}")
    for name, v in (("max_expert_steps", max_expert_steps), ("workers", workers)):
        if not isinstance(v, int) or v < 1:  # checked here: the engine would only fail after out_dir exists
            raise GenerationError(f"{name} must be an integer >= 1, got {v!r}")
    out = Path(out_dir).resolve()  # the engine does not find games by relative path from workers
    if out.exists() and not out.is_dir():
        raise GenerationError(f"output directory {out} is a file; choose a new directory")
    if (out / "manifest.json").exists() or (out.exists() and any(out.iterdir())):
        raise GenerationError(f"output directory {out} is not empty; choose a new one")
    train_fps, held_fps = floorplan_split(split_seed)
    quotas: dict[tuple[str, str], int] = {}
    fps: dict[tuple[str, str], list[int]] = {}
    for split in SPLITS:
        types = SPLIT_TYPES[split]
        n = sizes.get(split, 0)
        for i, t in enumerate(types):
            q = n // len(types) + (1 if i < n % len(types) else 0)
            if q == 0:
                continue
            quotas[(split, t)] = q
            fps[(split, t)] = eligible_floorplans(held_fps if split.startswith("eval") else train_fps, t)
            if not fps[(split, t)]:
                raise GenerationError(f"no floorplan of split {split} can host {t}")
    total = sum(quotas.values())
    accepted: dict[tuple[str, str], list[dict]] = {k: [] for k in quotas}
    results: dict[tuple[str, str], dict[int, dict]] = {k: {} for k in quotas}
    next_index = dict.fromkeys(quotas, 0)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    scratch = tempfile.mkdtemp(prefix=".scratch-", dir=out)
    pool = _pool(workers)
    try:
        while True:
            jobs = []
            for key, q in quotas.items():
                need = q - len(accepted[key])
                if need <= 0:
                    continue
                if next_index[key] > 20 * q + 50:
                    raise GenerationError(f"{key[0]}/{key[1]}: the expert won too few candidates ({len(accepted[key])}/{q})")
                k = need + need // 20  # discards are rare: a small margin, another round if short
                jobs += [(seed, key[0], key[1], i, fps[key], max_expert_steps, scratch) for i in range(next_index[key], next_index[key] + k)]
                next_index[key] += k
            if not jobs:
                break
            for r in pool.imap_unordered(_candidate, jobs, chunksize=1):
                key = (r["split"], r["task_type"])
                results[key][r["index"]] = r
                if progress:
                    won = {k: sum(1 for x in results[k].values() if x["walkthrough"]) for k in quotas}
                    progress(sum(min(q, won[k]) for k, q in quotas.items()), total)
            for key, q in quotas.items():  # accept in index order: independent of scheduling
                accepted[key] = [r for _, r in sorted(results[key].items()) if r["walkthrough"]][:q]
    finally:
        pool.terminate()
        pool.join()
        shutil.rmtree(scratch, ignore_errors=True)

    manifest: dict[str, Any] = {
        "generator": "evolving_rl.envs.alfworld_gen",
        "generator_version": GENERATOR_VERSION,
        "seed": seed,
        "split_seed": split_seed,
        "max_expert_steps": max_expert_steps,
        "floorplans": {"train": train_fps, "held_out": held_fps},
        "sizes": {s: sizes.get(s, 0) for s in SPLITS},
        "counts": {},
        "discarded": {},
        "splits": {},
    }
    for split in SPLITS:
        manifest["splits"][split] = []
        manifest["counts"][split] = {}
        manifest["discarded"][split] = {}
        for t in SPLIT_TYPES[split]:
            if (split, t) not in quotas:
                continue
            games = accepted[(split, t)]
            last = games[-1]["index"] if games else -1
            lost = [r for i, r in sorted(results[(split, t)].items()) if i <= last and not r["walkthrough"]]
            manifest["counts"][split][t] = len(games)
            manifest["discarded"][split][t] = len(lost)
            for r in games:
                spec = _candidate_spec(seed, split, t, r["index"], fps[(split, t)])
                rel = Path(split) / spec["scene"] / f"trial_s{seed}_{r['index']:05d}"
                (out / rel).mkdir(parents=True)
                _write_json(out / rel / GAME_FILE, {**spec["game"], "walkthrough": r["walkthrough"]})
                _write_json(out / rel / "traj_data.json", spec["traj_data"])
                manifest["splits"][split].append(
                    {
                        "dir": f"{spec['scene']}/trial_s{seed}_{r['index']:05d}",
                        "path": (rel / GAME_FILE).as_posix(),
                        "task_type": t,
                        "floorplan": spec["floorplan"],
                        "description": spec["description"],
                        "expert_steps": len(r["walkthrough"]),
                    }
                )
    _write_json(out / "manifest.json", manifest)
    manifest["seconds"] = time.perf_counter() - t0  # not written: the file stays reproducible
    return manifest
