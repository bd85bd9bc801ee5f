"""Helpers that training, evaluation and SFT all use, kept below them so that none of those
modules imports another to reach them (dependencies point down: nanoGPT's model never
imports its train script).

Only `config` and `types` sit below this module.
"""

from __future__ import annotations

import math
import random
from pathlib import Path

from evolving_rl.types import Episode, Sample, Task


def env_options(cfg) -> dict:
    """The options every engine of a run is built with: the config's env section plus the run seed."""
    return {"games_dir": cfg.env.games_dir, "max_steps": cfg.env.max_steps, "seed": cfg.seed, **cfg.env.options}


def episode_samples(ep: Episode, role: str, group: str, reward: float, episode_id: str) -> list[Sample]:
    """An episode's segments as training samples sharing one reward, group and episode id
    (the updater weights turns of one episode by that id)."""
    return [Sample(seg, role, group, reward, episode=episode_id) for seg in ep.segments]


class TaskCursor:
    """Seeded epoch-wise shuffles of the training pool; (epoch, position) is all its state,
    so a checkpoint that stores it replays exactly the same source tasks after a resume."""

    def __init__(self, tasks: list[Task], seed: int, epoch: int = 0, pos: int = 0):
        self.tasks, self.seed, self.epoch, self.pos = tasks, seed, epoch, pos
        self._order = self._perm()

    def _perm(self) -> list[int]:
        order = list(range(len(self.tasks)))
        random.Random(self.seed * 1_000_003 + self.epoch).shuffle(order)
        return order

    def take(self, n: int) -> list[Task]:
        out = []
        for _ in range(n):
            if self.pos >= len(self._order):
                self.epoch, self.pos = self.epoch + 1, 0
                self._order = self._perm()
            out.append(self.tasks[self._order[self.pos]])
            self.pos += 1
        return out

    def state(self) -> dict:
        return {"epoch": self.epoch, "pos": self.pos}


def check_no_overlap(pool: list[Task], eval_sets: dict[str, list[Task]], pool_name: str) -> None:
    """Refuse to run when an evaluation split shares a task (by id or by game file) with a pool."""
    ids = {t.id for t in pool}
    files = {t.locator for t in pool}
    for split, tasks in eval_sets.items():
        bad = [t.id for t in tasks if t.id in ids or t.locator in files]
        if bad:
            shown = ", ".join(bad[:5]) + (f" and {len(bad) - 5} more" if len(bad) > 5 else "")
            raise ValueError(f"leakage: {len(bad)} task(s) of eval split {split!r} are also in the {pool_name}: {shown}")


PROMPT_FIELDS = ("rollout.prompt_format", "rollout.history", "rollout.state_line", "rollout.list_admissible",
                 "rollout.constrain_to_admissible", "evolving.max_trajectory_chars")


def prompt_mismatch(cfg, model_path: str) -> str | None:
    """How this run's prompts differ from the ones a cloned checkpoint learned (its
    sft_config.yaml), or None. A from-scratch clone knows only its own prompt layout: shown
    another, it plays at chance, silently."""
    import yaml

    p = Path(model_path) / "sft_config.yaml"
    if not p.is_file():
        return None
    cloned = yaml.safe_load(p.read_text()) or {}
    diff = []
    for name in PROMPT_FIELDS:
        section, key = name.split(".")
        was, now = (cloned.get(section) or {}).get(key), getattr(getattr(cfg, section), key)
        if was is not None and was != now:
            diff.append(f"{name}: cloned with {was!r}, this run {now!r}")
    return f"{model_path} was cloned on other prompts ({'; '.join(diff)})" if diff else None


def snapshot_sqlite(src: str | Path, dst: str | Path) -> None:
    """Copy a SQLite file with SQLite's backup API: consistent even in WAL mode (a plain file
    copy can miss committed pages still in the -wal file). `dst` is replaced whole."""
    import sqlite3

    dst = Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    with sqlite3.connect(f"file:{Path(src)}?mode=ro", uri=True) as s, sqlite3.connect(dst) as d:
        s.backup(d)
    s.close()
    d.close()


def wilson(successes: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson score interval: honest at the small n and extreme rates of tiny-model evals."""
    if n == 0:
        return (0.0, 0.0)
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return (max(0.0, centre - half), min(1.0, centre + half))
