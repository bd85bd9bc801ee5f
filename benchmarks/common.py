"""What both benchmark scripts need: games and a starting model that exist even on a fresh
checkout, plain-text tables, and JSON written where RESULTS.md reads it.

A benchmark must run before the project's shipped warm-start checkpoint exists, so a missing
model is replaced by a *fresh, untrained* tiny model built from the games' expert demos (the
same recipe as tests/conftest.py); the output always says which one was used, because an
untrained model makes speed numbers valid but success numbers meaningless.
"""

from __future__ import annotations

import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Before torch is imported: spin-waiting OpenMP threads are ~100x slower on a shared machine
# (benchmarks/policy_speed.py measured it).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import sys  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

from evolving_rl.config import RunConfig  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
RESULTS_DIR = ROOT / "docs" / "results"
if str(ROOT / "benchmarks") not in sys.path:  # `python benchmarks/x.py` and `import benchmarks.x` alike
    sys.path.insert(0, str(ROOT / "benchmarks"))


def rel(path: str | Path) -> str:
    """A path as results files record it: relative to the checkout, so they read the same on any machine."""
    p = Path(path).resolve()
    return str(p.relative_to(ROOT)) if p.is_relative_to(ROOT) else str(path)


def quiet_hf() -> None:
    """Loading bars from transformers would bury the tables."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()


def say(*parts: Any) -> None:
    print(*parts, flush=True)


def ensure_games(cfg: RunConfig) -> Path:
    """The config's games directory, generated from `cfg.games` on first use (like `quickstart`)."""
    from evolving_rl.envs.alfworld_gen import generate_games

    games = Path(cfg.env.games_dir)
    if (games / "manifest.json").exists():
        return games
    g = cfg.games
    sizes = {"train": g.train, "train_unseen": g.train_unseen, "eval_seen": g.eval_seen, "eval_unseen": g.eval_unseen}
    say(f"generating ALFWorld games into {games} {sizes} (expert-verified, first use only)")
    generate_games(games, g.seed, sizes, max_expert_steps=g.max_expert_steps, workers=max(1, cfg.env.num_workers))
    return games


def ensure_model(cfg: RunConfig, work_dir: Path, max_demos: int = 48) -> tuple[str, str]:
    """(model path, provenance). The configured checkpoint if it exists; otherwise a fresh
    untrained tiny model (cfg.tiny) whose tokenizer is trained on the train split's expert demos."""
    if (Path(cfg.model.path) / "config.json").is_file():
        return cfg.model.path, f"checkpoint {cfg.model.path}"
    from evolving_rl.demos import write_demos
    from evolving_rl.policy.tiny import build_tiny
    from evolving_rl.sft import corpus_from_demos, load_demos

    out = Path(work_dir) / "fresh-tiny"
    note = (f"NOTE: {cfg.model.path} does not exist; using a FRESH UNTRAINED tiny model built from "
            f"expert demos ({rel(out)}): speeds are valid, success rates are not")
    if (out / "config.json").is_file():
        return str(out), note
    demos = Path(work_dir) / "demos_train.jsonl"
    if not demos.exists():
        write_demos(cfg, "train", demos, max_tasks=max_demos)
    build_tiny(corpus_from_demos(load_demos([str(demos)]), cfg), cfg.tiny, out)
    return str(out), note


def table(headers: list[str], rows: list[list[Any]], title: str = "") -> str:
    """Columns sized to their widest cell; numbers right-aligned, text left-aligned."""
    cells = [[fmt(c) for c in r] for r in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) if cells else len(h) for i, h in enumerate(headers)]
    right = [all(isinstance(r[i], (int, float)) for r in rows) if rows else False for i in range(len(headers))]

    def line(vals: list[str]) -> str:
        return "  ".join(v.rjust(w) if r else v.ljust(w) for v, w, r in zip(vals, widths, right)).rstrip()

    out = [title] if title else []
    out += [line(headers), line(["-" * w for w in widths])] + [line(r) for r in cells]
    return "\n".join(out)


def fmt(x: Any) -> str:
    if isinstance(x, float):
        return f"{x:.3g}" if abs(x) < 1000 else f"{x:,.0f}"
    return str(x)


def write_json(path: Path, data: Any) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=1, default=str))
    os.replace(tmp, path)
    return path


def machine() -> dict:
    import platform

    import torch

    return {"python": platform.python_version(), "torch": torch.__version__, "cpus": os.cpu_count(),
            "torch_threads": torch.get_num_threads(), "platform": platform.platform(),
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}
