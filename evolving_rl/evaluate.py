"""Evaluation you can reproduce: fixed splits, seeds and repeats, greedy by default,
success per split and task type with Wilson 95% intervals.
"""

from __future__ import annotations

import json
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from evolving_rl.common import check_no_overlap, wilson
from evolving_rl.config import SamplingConfig
from evolving_rl.extraction import extract_skills
from evolving_rl.rollout import Job, Rollout
from evolving_rl.skills.pg_library import is_postgres, location_name, open_library
from evolving_rl.types import Episode, Task


@dataclass
class Cell:
    """Success over a set of episodes (all repeats pooled)."""

    wins: int = 0
    n: int = 0
    steps: int = 0
    failed: int = 0

    def add(self, ep: Episode) -> None:
        if ep.failed:  # the engine failed twice: not the policy's fault, not counted
            self.failed += 1
            return
        self.n += 1
        self.wins += int(ep.won)
        self.steps += ep.steps

    @property
    def success(self) -> float:
        return self.wins / self.n if self.n else 0.0

    def to_dict(self) -> dict:
        lo, hi = wilson(self.wins, self.n)
        return {"success": self.success, "ci95": [lo, hi], "wins": self.wins, "n": self.n,
                "mean_steps": self.steps / self.n if self.n else 0.0, "engine_failures": self.failed}


@dataclass
class SplitResult:
    split: str
    protocol: str
    overall: Cell = field(default_factory=Cell)
    by_type: dict[str, Cell] = field(default_factory=lambda: defaultdict(Cell))
    episodes: list[Episode] = field(default_factory=list)

    def add(self, ep: Episode) -> None:
        self.overall.add(ep)
        self.by_type[ep.task.task_type].add(ep)
        self.episodes.append(ep)

    def to_dict(self) -> dict:
        return {"split": self.split, "protocol": self.protocol, **self.overall.to_dict(),
                "by_type": {k: v.to_dict() for k, v in sorted(self.by_type.items())}}


def cap_tasks(tasks: list[Task], cap: int | None) -> list[Task]:
    """The first `cap` tasks, taken round-robin over task types (suites list tasks grouped by
    type, so a plain prefix would evaluate one or two types only). Fixed order, no randomness."""
    if not cap or cap >= len(tasks):
        return list(tasks)
    by_type: dict[str, list[Task]] = {}
    for t in tasks:
        by_type.setdefault(t.task_type, []).append(t)
    queues = list(by_type.values())
    out: list[Task] = []
    while len(out) < cap:
        for q in queues:
            if q and len(out) < cap:
                out.append(q.pop(0))
    return out


def eval_sampling(base: SamplingConfig, greedy: bool) -> SamplingConfig:
    return base.model_copy(update={"temperature": 0.0}) if greedy else base


def run_no_skill(rollout: Rollout, split: str, tasks: list[Task], sampling: SamplingConfig, repeats: int, seed: int,
                 progress=None) -> SplitResult:
    """The policy alone; every repeat plays every task (seeded per repeat when sampling)."""
    res = SplitResult(split, "no_skill")
    jobs = [Job(t, None, {"repeat": r}) for r in range(repeats) for t in tasks]
    for ep in rollout.run(jobs, sampling, seed=seed, progress=progress):
        res.add(ep)
    return res


def format_table(results: list[SplitResult], title: str = "Evaluation") -> str:
    """A plain-text table: one row per (split, protocol), overall then per task type."""
    lines = [title, f"{'split':<12} {'protocol':<10} {'task type':<34} {'success':>8} {'95% CI':>15} {'n':>5} {'steps':>6}"]
    for r in results:
        rows = [("all", r.overall)] + sorted(r.by_type.items())
        for name, c in rows:
            lo, hi = wilson(c.wins, c.n)
            lines.append(f"{r.split:<12} {r.protocol:<10} {name:<34} {c.success:>8.1%} {f'[{lo:.2f}, {hi:.2f}]':>15} {c.n:>5} "
                         f"{(c.steps / c.n if c.n else 0):>6.1f}")
    return "\n".join(lines)


def compare_table(before: list[SplitResult], after: list[SplitResult], title: str) -> str:
    """Before vs after RL, per split and protocol, with Wilson intervals."""
    prev = {(r.split, r.protocol): r.overall for r in before}
    lines = [title, f"{'split':<12} {'protocol':<10} {'before':>22} {'after':>22} {'delta':>7}"]
    for r in after:
        a = r.overall
        b = prev.get((r.split, r.protocol))

        def cell(c: Cell) -> str:
            lo, hi = wilson(c.wins, c.n)
            return f"{c.success:6.1%} [{lo:.2f},{hi:.2f}] n={c.n}"

        delta = f"{a.success - b.success:+.1%}" if b else ""
        lines.append(f"{r.split:<12} {r.protocol:<10} {cell(b) if b else '-':>22} {cell(a):>22} {delta:>7}")
    return "\n".join(lines)


def run_one_shot(rollout: Rollout, policy, split: str, tasks: list[Task], index, sampling: SamplingConfig,
                 extract_sampling: SamplingConfig, repeats: int, seed: int, *, min_chars: int, max_chars: int,
                 max_trajectory_chars: int, progress=None) -> tuple[SplitResult, list[dict]]:
    """The paper's protocol: per test task, the most similar task of the experience pool is
    played without skill, one skill is extracted from it, and the test task is played with it.

    `index` holds only the experience pool, so a test task can never retrieve itself.
    Returns the with-skill result and, per test task, the skill used (for reports).
    """
    res = SplitResult(split, "one_shot")
    used: list[dict] = []
    sims = [index.top_k(t, 1, exclusion="none")[0] for t in tasks]  # deterministic: once for all repeats
    for r in range(repeats):
        exp_eps = rollout.run([Job(s.as_experience()) for s, _ in sims], sampling, seed=seed * 31 + r)
        cands = extract_skills(policy, exp_eps, 1, extract_sampling, min_chars=min_chars, max_chars=max_chars,
                               seed=seed * 37 + r, max_trajectory_chars=max_trajectory_chars)
        cards = [c.card if c.valid else None for c in cands]
        eps = rollout.run([Job(t, card) for t, card in zip(tasks, cards)], sampling, seed=seed * 41 + r, progress=progress)
        for t, (src, sim), c, e, ep in zip(tasks, sims, cands, exp_eps, eps):
            res.add(ep)
            used.append({"repeat": r, "task": t.id, "experience_task": src.id, "similarity": sim,
                         "experience_won": e.won, "skill_valid": c.valid, "skill_reasons": c.reasons,
                         "card": c.card, "raw": c.gen.text[:4000], "won": ep.won})
    return res, used


def run_library(rollout: Rollout, policy, split: str, tasks: list[Task], library, embedder, sampling: SamplingConfig,
                extract_sampling: SamplingConfig, *, evolve, wave: int, seed: int, model_name: str,
                min_chars: int, max_chars: int, max_trajectory_chars: int, learn: bool = True,
                progress=None) -> tuple[SplitResult, list[dict]]:
    """Test-time self-evolution over a seeded task stream with a persistent skill library, on
    the deployment's engine (`serve.evolver.SkillEvolver`, configured by `evolve`), so the
    numbers evaluation reports are the ones the service would produce.

    Each episode plays one arm: no skill (no live skill matches, or the no-skill control share),
    a quarantined skill on trial, or a promoted one; one skill per episode, so each outcome is
    attributed to it. What the wave played is extracted into new quarantined skills, and the
    guardrail promotes or retires skills against their control as outcomes arrive. `learn=False`
    freezes the library (skill transfer: policy B uses the library policy A built).
    Returns the result and one log row per episode (position, task, won, arm, skills_used,
    skill_added: the admitted skill's id or None, status_changes).
    """
    from evolving_rl.serve.evolver import SkillEvolver, evolve_stream

    ev = SkillEvolver(library, evolve, min_chars=min_chars, max_chars=max_chars)
    eps, log = evolve_stream(ev, rollout, policy, embedder, tasks, sampling, extract_sampling, wave=wave, seed=seed,
                             model_name=model_name, max_trajectory_chars=max_trajectory_chars, learn=learn,
                             progress=progress)
    res = SplitResult(split, "library")
    for ep in eps:
        res.add(ep)
    return res, log


def stream_curve(log: list[dict], window: int = 10) -> list[float]:
    """Rolling success over the stream position: does the agent improve as experience grows?"""
    wins = [float(r["won"]) for r in sorted(log, key=lambda r: r["position"])]
    return [sum(wins[max(0, i - window + 1) : i + 1]) / len(wins[max(0, i - window + 1) : i + 1]) for i in range(len(wins))]


def episode_record(ep: Episode, protocol: str, repeat: int, meta: dict | None = None) -> dict:
    return {"split": ep.task.split, "protocol": protocol, "repeat": repeat, "task": ep.task.to_dict(), "won": ep.won,
            "steps": ep.steps, "failed": ep.failed, "skill_card": ep.skill_card, "skill_meta": meta,
            "turns": [{"observation": t.observation, "action": t.action, "completion": t.completion, "valid": t.valid}
                      for t in ep.turns],
            "final_observation": ep.final_observation}


class Evaluator:
    """Runs the configured protocols on fixed splits and writes eval/<tag>.json + episodes."""

    def __init__(self, cfg, suite, rollout: Rollout, policy, out_dir, console_print=print, *, bank=None,
                 extractor=None):
        self.cfg, self.suite, self.rollout, self.policy = cfg, suite, rollout, policy
        # who writes the one_shot and library skills: the solver itself unless `extractor_model`
        # names another model (builders.build_extractor)
        self.extractor = policy if extractor is None else extractor
        self.out_dir = Path(out_dir)
        # The skill bank the `library` protocol starts from (a run's shipped skills.sqlite, or
        # another model's for skill transfer). Never written: each evaluation plays on a copy.
        self.bank = (str(bank) if is_postgres(str(bank)) else Path(bank)) if bank else None
        self.say = console_print
        self._index = None
        self._embedder = None

    def tasks(self, split: str, cap: int | None) -> list[Task]:
        return cap_tasks(self.suite.tasks(split), cap)

    def experience_index(self):
        """The one-shot experience pool: declared splits, never an evaluated split."""
        if self._index is None:
            from evolving_rl.retrieval import build_index

            pool = [t for s in self.cfg.eval.experience_pool for t in self.suite.tasks(s)]
            check_no_overlap(pool, {s: self.suite.tasks(s) for s in self.cfg.eval.splits}, "experience pool")
            r = self.cfg.retrieval
            self._index = build_index(pool, self.embedder(), cache_dir=r.cache_dir, backend=r.backend)
        return self._index

    def embedder(self):
        if self._embedder is None:
            from evolving_rl.retrieval import make_embedder

            self._embedder = make_embedder(self.cfg.retrieval.embedder)
        return self._embedder

    def run(self, tag: str, step: int, *, protocols=None, repeats: int | None = None, cap: int | None = None,
            learn: bool = True) -> list[SplitResult]:
        from evolving_rl.builders import extractor_name

        cfg = self.cfg
        protocols = protocols or cfg.eval.protocols
        repeats = repeats or cfg.eval.repeats
        sampling = eval_sampling(cfg.rollout.solver, cfg.eval.greedy)
        extract = eval_sampling(cfg.rollout.extractor, cfg.eval.greedy)
        lim = dict(min_chars=cfg.evolving.min_skill_chars, max_chars=cfg.evolving.max_skill_chars,
                   max_trajectory_chars=cfg.evolving.max_trajectory_chars)
        results: list[SplitResult] = []
        records: list[dict] = []
        extras: dict = {}
        # Every split is resolved before anything is played or written: a bad name fails first.
        by_split = {split: self.tasks(split, cap if cap is not None else cfg.eval.max_tasks) for split in cfg.eval.splits}
        pool_before = dict(getattr(getattr(self.rollout, "pool", None), "stats", None) or {})
        for split, tasks in by_split.items():
            for proto in protocols:
                if proto == "no_skill":
                    r = run_no_skill(self.rollout, split, tasks, sampling, repeats, cfg.eval.seed)
                    for i, ep in enumerate(r.episodes):
                        records.append(episode_record(ep, proto, i // max(1, len(tasks))))
                elif proto == "one_shot":
                    r, used = run_one_shot(self.rollout, self.extractor, split, tasks, self.experience_index(), sampling,
                                           extract, repeats, cfg.eval.seed, **lim)
                    for ep, u in zip(r.episodes, used):
                        records.append(episode_record(ep, proto, u["repeat"], {k: v for k, v in u.items() if k != "card"}))
                else:
                    lib = self.library_copy(tag, split)
                    r, log = run_library(self.rollout, self.extractor, split, tasks, lib, self.embedder(), sampling,
                                         extract, evolve=cfg.evolve, wave=cfg.eval.library_wave, seed=cfg.eval.seed,
                                         model_name=extractor_name(cfg), learn=learn, **lim)
                    # The guardrail retired these against their own no-skill control during the stream.
                    retired = [c["skill_id"] for row in log for c in row["status_changes"] if c["status"] == "retired"]
                    lib.close()
                    extras[f"library_stream_{split}"] = {"log": log, "rolling_success": stream_curve(log),
                                                         "retired": retired, "library": lib.path.name,
                                                         "started_from": location_name(self.bank) if self.bank else None}
                    for ep, entry in zip(r.episodes, log):
                        records.append(episode_record(ep, proto, 0, {"position": entry["position"], "arm": entry["arm"],
                                                                     "skills_used": entry["skills_used"]}))
                results.append(r)
        # Engine workers that crashed or hung were retried by the pool: say how often, next to the numbers.
        pool_after = getattr(getattr(self.rollout, "pool", None), "stats", None) or {}
        extras["engine"] = {k: v - pool_before.get(k, 0) for k, v in pool_after.items() if isinstance(v, (int, float))}
        self.write(tag, step, results, records, extras)
        return results

    def library_copy(self, tag: str, split: str):
        """This evaluation's own library: a fresh copy of the bank (or an empty library), so
        skills extracted from evaluation tasks never reach the bank, another split or a later
        evaluation. The bank itself is checked for skills from the evaluated splits first."""
        from evolving_rl.skills.library import SkillLibrary

        path = self.out_dir / "eval" / f"{tag}_{split}_skills.sqlite"
        for suffix in ("", "-wal", "-shm"):
            Path(str(path) + suffix).unlink(missing_ok=True)
        if self.bank is not None and (isinstance(self.bank, str) or self.bank.is_file()):
            check_bank_no_overlap(self.bank, {s: self.suite.tasks(s) for s in self.cfg.eval.splits})
            from evolving_rl.serve.evolver import copy_library

            copy_library(self.bank, path)
        return SkillLibrary(path, self.cfg.library.dedup_threshold)

    def write(self, tag: str, step: int, results: list[SplitResult], records: list[dict], extras: dict) -> None:
        d = self.out_dir / "eval"
        d.mkdir(parents=True, exist_ok=True)
        payload = {"tag": tag, "step": step, "results": [r.to_dict() for r in results],
                   "deltas": skill_deltas(results), **extras}
        (d / f"{tag}.json").write_text(json.dumps(payload, indent=1))
        with (d / f"{tag}_episodes.jsonl").open("w") as f:
            for rec in records:
                f.write(json.dumps(rec) + "\n")


def skill_deltas(results: list[SplitResult]) -> dict[str, dict[str, float]]:
    """With-skill minus without-skill success per split, for every skill protocol evaluated."""
    by = {(r.split, r.protocol): r.overall.success for r in results}
    out: dict[str, dict[str, float]] = {}
    for (split, proto), s in by.items():
        if proto != "no_skill" and (split, "no_skill") in by:
            out.setdefault(split, {})[proto] = s - by[(split, "no_skill")]
    return out


def check_bank_no_overlap(bank: str | Path, eval_sets: dict[str, list[Task]]) -> None:
    """Refuse a skill bank that holds skills extracted from evaluation tasks (their provenance's
    `source_task_id`): evaluating with them would score tasks the bank has already seen."""
    import sqlite3

    if is_postgres(str(bank)):
        with open_library(str(bank), mode="read") as lib:  # ValueError names it when unreachable
            rows = lib._db.execute("SELECT id, provenance FROM skills").fetchall()
        bank = location_name(bank)
    else:
        try:
            with sqlite3.connect(f"file:{bank}?mode=ro", uri=True) as db:
                rows = db.execute("SELECT id, provenance FROM skills").fetchall()
        except sqlite3.Error as e:
            raise ValueError(f"skill bank {bank}: not a readable skill library ({e})") from None
    sources: dict[str, list[int]] = {}
    for sid, prov in rows:
        try:
            src = json.loads(prov).get("source_task_id")
        except (TypeError, ValueError, AttributeError):
            continue
        if src is not None:
            sources.setdefault(str(src), []).append(sid)
    for split, tasks in eval_sets.items():
        bad = sorted(t.id for t in tasks if t.id in sources)
        if bad:
            shown = ", ".join(bad[:5]) + (f" and {len(bad) - 5} more" if len(bad) > 5 else "")
            raise ValueError(f"leakage: the skill bank {bank} holds skills extracted from {len(bad)} task(s) of eval "
                             f"split {split!r}: {shown}; evaluate with a bank built from training tasks only")


def load_results(path: str | Path) -> list[SplitResult]:
    """An eval/<tag>.json back as results (for tables after a resume): counts, not episodes."""
    payload = json.loads(Path(path).read_text())

    def cell(d: dict) -> Cell:
        n = int(d.get("n", 0))
        return Cell(wins=int(d.get("wins", 0)), n=n, steps=round(float(d.get("mean_steps", 0.0)) * n),
                    failed=int(d.get("engine_failures", 0)))

    out = []
    for r in payload.get("results", []):
        res = SplitResult(r["split"], r["protocol"], overall=cell(r))
        for k, v in (r.get("by_type") or {}).items():
            res.by_type[k] = cell(v)
        out.append(res)
    return out


def evaluate_checkpoint(cfg, checkpoint: str, out_dir, *, tag: str = "eval", protocols=None, skills: str | None = None,
                        learn: bool | None = None, console_print=print) -> list[SplitResult]:
    """`evolving-rl eval`: any Hugging Face model directory, the configured splits and protocols.

    With `skills`, the `library` protocol starts from that library (skill transfer: policy B
    using the library policy A built); it is frozen unless `learn` is set, and each split plays
    on its own copy (eval/<tag>_<split>_skills.sqlite), so the source library is never
    modified. A library holding skills extracted from the evaluated tasks is refused. Without
    `skills`, a bank already in `out_dir` (a training run's skills.sqlite) is the start.
    """
    from evolving_rl.builders import build_extractor, build_policy, build_pool, build_rollout, build_suite
    from evolving_rl.common import prompt_mismatch

    out = Path(out_dir)
    suite = build_suite(cfg)
    cfg = cfg.model_copy(update={"model": cfg.model.model_copy(update={"path": checkpoint})})
    policy = build_policy(cfg)
    extractor = build_extractor(cfg, policy)
    for m in (checkpoint, cfg.extractor_model.path if cfg.extractor_model else None):
        if m and (warn := prompt_mismatch(cfg, m)):
            console_print(f"warning: {warn}")
    if skills:
        src = skills if is_postgres(skills) else Path(skills)
        if isinstance(src, Path) and not src.is_file():
            raise FileNotFoundError(f"--skills: no skill library at {src}")
        check_bank_no_overlap(src, {s: suite.tasks(s) for s in cfg.eval.splits})
        protocols = protocols or ["library"]
    with build_pool(cfg) as pool:
        rollout = build_rollout(cfg, policy, pool)
        # Without --skills, a run directory's own shipped bank is where the library protocol starts.
        bank = skills or (out / "skills.sqlite" if (out / "skills.sqlite").is_file() else None)
        ev = Evaluator(cfg, suite, rollout, policy, out, console_print, bank=bank, extractor=extractor)
        results = ev.run(tag, 0, protocols=protocols, learn=(learn if learn is not None else skills is None))
    console_print(format_table(results, f"{checkpoint} ({tag})"))
    return results
