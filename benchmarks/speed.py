"""Where the time of a training step goes, at quickstart scale, measured on the real parts.

One Evolving-RL step and one GRPO step (the same episode count, so their times compare)
are timed stage by stage. Then, side by side with what the bare parts can do:

* rollout generated tokens/s vs the raw decode ceiling of the same model on the very batches
  the rollout sent (benchmarks/policy_speed.py's bare KV-cached greedy loop);
* training tokens/s of the GRPO update vs a bare forward+backward of the same samples;
* the update's share of the Evolving-RL step, re-timed `--update-repeats` times on the step's
  samples from the same weights (the spread on a shared machine), split into the policy's
  scoring forward, the reference's, and the rest (backward, optimizer), with the tokens the
  model actually ran against the samples' tokens (shared prefixes run once);
* env steps/s through EnvPool with 1 and 2 workers, for every engine that is installed;
* retrieval: building the task index (cold and cached) and top-K latency over the pool;
* step time against N x K: the step should cost a + b * episodes with the fixed part a small.

    .venv/bin/python benchmarks/speed.py [--config configs/quickstart.yaml] [--model DIR]
        [--games DIR] [--sweep 2x1,2x2,4x1,4x2] [--skip envs,sweep] [--update-repeats 3] [key=value ...]

Writes docs/results/speed.json (or --json PATH).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))  # common.py and policy_speed.py beside this file
from common import RESULTS_DIR, ROOT, ensure_games, ensure_model, machine, quiet_hf, rel, say, table, write_json  # noqa: E402

from evolving_rl.config import load_config  # noqa: E402

SECTIONS = ("steps", "grpo", "update", "decode", "train", "envs", "retrieval", "sweep")
FIXTURE_MIND2WEB = ROOT / "tests" / "fixtures" / "mind2web"


# ---------------------------------------------------------------------------- helpers


def fit_linear(xs: list[float], ys: list[float]) -> dict[str, float]:
    """Least squares y = a + b x, with R^2, and the fixed part's share a / y at the mean x.

    Step time should be a + b * episodes: `a` is what a step pays whatever its size (model
    update setup, retrieval, process round trips), `b` the price of one more episode.
    """
    if len(xs) != len(ys) or len(set(xs)) < 2:
        raise ValueError(f"fit_linear: need >= 2 distinct x values, got xs={xs}")
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    sxx = sum((x - mx) ** 2 for x in xs)
    b = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sxx
    a = my - b * mx
    ss_tot = sum((y - my) ** 2 for y in ys)
    ss_res = sum((y - a - b * x) ** 2 for x, y in zip(xs, ys))
    return {"a": a, "b": b, "r2": 1 - ss_res / ss_tot if ss_tot else 1.0,
            "fixed_share_at_mean": a / (a + b * mx) if a + b * mx else 0.0}


def grpo_matching(episodes_per_step: int, group_size: int) -> tuple[int, int, str]:
    """(group size, prompts per step, explanation) so one GRPO step plays exactly the
    episodes of one Evolving-RL step; the group size shrinks to the largest divisor if it must."""
    divisors = [d for d in range(2, group_size + 1) if episodes_per_step % d == 0]
    if not divisors:
        raise ValueError(f"no GRPO group size in 2..{group_size} divides {episodes_per_step} episodes per step")
    g = divisors[-1]
    why = f"{episodes_per_step} episodes/step = {episodes_per_step // g} prompts x group {g}"
    if g != group_size:
        why += f" (group {group_size} does not divide {episodes_per_step})"
    return g, episodes_per_step // g, why


class GenerateRecorder:
    """Wraps `policy.generate` on the instance to log every call (who asked, batch, tokens,
    seconds) and keep the prompts of the largest calls so the ceiling can replay them."""

    def __init__(self, policy, keep: int = 3):
        self.policy, self.keep = policy, keep
        self.calls: list[dict] = []
        self._orig = policy.generate
        policy.generate = self

    def __call__(self, prompts: list[list[int]], **kw):
        t = time.perf_counter()
        gens = self._orig(prompts, **kw)
        lens = [len(g.token_ids) for g in gens]
        self.calls.append({
            "role": "solver" if kw.get("stop") else "extractor", "batch": len(prompts),
            "prompt_tokens": sum(map(len, prompts)), "generated": sum(lens), "max_generated": max(lens, default=0),
            "s": time.perf_counter() - t, "prompts": prompts,
        })
        return gens

    def largest(self, role: str) -> list[dict]:
        return sorted((c for c in self.calls if c["role"] == role), key=lambda c: -c["batch"])[: self.keep]

    def close(self) -> None:
        del self.policy.generate  # the class method is visible again


def rollout_delta(before: dict, after: dict) -> dict:
    return {k: after[k] - before[k] for k in after}


def measure_step(trainer, algorithm, step: int, label: str) -> dict:
    """One collect + one update, with the rollout's own counters and every generate call."""
    rec = GenerateRecorder(trainer.policy)
    before = dict(trainer.rollout.stats)
    try:
        t0 = time.perf_counter()
        samples, info = algorithm.collect(step)
        t1 = time.perf_counter()
        upd = trainer.updater.update(samples) if samples else {}
        t2 = time.perf_counter()
    finally:
        rec.close()
    trained = [s for s in samples if trainer.updater.coefficients(s.role).train and s.segment.num_generated]
    solver_calls = [c for c in rec.calls if c["role"] == "solver"]
    out = {
        "label": label, "collect_s": t1 - t0, "update_s": t2 - t1, "step_s": t2 - t0,
        "episodes": info.get("rollout/episodes", 0), "info": {k: v for k, v in info.items() if isinstance(v, (int, float))},
        "rollout": rollout_delta(before, trainer.rollout.stats),
        "env_steps": sum(c["batch"] for c in solver_calls),
        "solver_calls": len(solver_calls),
        "extractor": {k: sum(c[k] for c in rec.calls if c["role"] == "extractor") for k in ("batch", "generated", "s")},
        "update_tokens": sum(len(s.segment.token_ids) for s in trained),
        "update_generated_tokens": sum(s.segment.num_generated for s in trained),
        "update_samples": len(trained),
        "update_metrics": {k: v for k, v in upd.items() if isinstance(v, (int, float))},
    }
    say(f"  {label} step: {out['episodes']} episodes, {out['env_steps']} env steps, {out['step_s']:.1f} s")
    out["_largest"] = {"solver": rec.largest("solver"), "extractor": rec.largest("extractor")}
    out["_samples"] = trained
    out["_all_samples"] = samples
    return out


# ---------------------------------------------------------------------------- sections


class ScoreRecorder:
    """Wraps `score` on a policy instance to sum the seconds its calls take (forward only:
    the backward runs later, in the updater)."""

    def __init__(self, policy):
        self.policy, self.s, self.calls = policy, 0.0, 0
        self._orig = policy.score
        policy.score = self

    def __call__(self, segments, **kw):
        t = time.perf_counter()
        out = self._orig(segments, **kw)
        self.s += time.perf_counter() - t
        self.calls += 1
        return out

    def close(self) -> None:
        del self.policy.score


def update_repeats(trainer, samples, step: dict, repeats: int) -> dict:
    """The step's update re-run `repeats` times on its samples, each from the weights and
    optimizer state the step ended with (restored after, so later sections see the step's
    result): update seconds (median and range), its share of the step, and where it goes."""
    import copy

    import torch

    updater, model = trainer.updater, trainer.policy.model
    weights, opt_state = copy.deepcopy(model.state_dict()), copy.deepcopy(updater.optimizer.state_dict())
    fed: list[int] = []  # tokens the policy's model ran (its input embedding sees each forward)
    hook = model.get_input_embeddings().register_forward_hook(lambda mod, args, out: fed.append(args[0].numel()))
    runs = []
    try:
        for _ in range(repeats):
            pol, ref = ScoreRecorder(updater.policy), ScoreRecorder(updater.reference_policy) \
                if updater.reference_policy is not None else None
            fed.clear()
            try:
                t, cpu = time.perf_counter(), time.process_time()
                updater.update(list(samples))
                wall, cpu = time.perf_counter() - t, time.process_time() - cpu
            finally:
                pol.close()
                if ref is not None:
                    ref.close()
            ref_s = ref.s if ref is not None else 0.0
            runs.append({"update_s": wall, "cpu_s": cpu, "policy_forward_s": pol.s, "reference_forward_s": ref_s,
                         "backward_optimizer_s": wall - pol.s - ref_s, "model_tokens": sum(fed)})
            with torch.no_grad():
                model.load_state_dict(weights)
            updater.optimizer.load_state_dict(opt_state)
    finally:
        hook.remove()
    med = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
    collect = step["collect_s"]
    return {"repeats": repeats, "runs": runs, "median": med,
            "update_s_range": [min(r["update_s"] for r in runs), max(r["update_s"] for r in runs)],
            "collect_s": collect, "share_of_step": med["update_s"] / (collect + med["update_s"]),
            "sample_tokens": sum(len(s.segment.token_ids) for s in samples), "samples": len(samples)}


def decode_vs_ceiling(policy, calls: list[dict]) -> dict:
    """Ours (as recorded during the step) vs the bare greedy loop on the same prompts, each row
    decoded to the longest row's length (the ceiling's tokens are all useful work)."""
    from policy_speed import raw_decode

    ours_tok = sum(c["generated"] for c in calls)
    ours_s = sum(c["s"] for c in calls)
    ceil_tok = ceil_s = 0.0
    for c in calls:
        t = time.perf_counter()
        ceil_tok += raw_decode(policy, c["prompts"], max(1, c["max_generated"]))
        ceil_s += time.perf_counter() - t
    return {"calls": len(calls), "batch": [c["batch"] for c in calls],
            "mean_prompt_tokens": sum(c["prompt_tokens"] for c in calls) / max(1, sum(c["batch"] for c in calls)),
            "ours_tok_s": ours_tok / ours_s if ours_s else 0.0, "ceiling_tok_s": ceil_tok / ceil_s if ceil_s else 0.0}


def train_vs_bare(policy, samples, micro_batch_tokens: int, update_s: float) -> dict:
    """The update's tokens/s (policy + reference forward, backward, optimizer) vs a bare
    forward+backward of the same segments in the same micro-batches."""
    from policy_speed import bare_step

    from evolving_rl.algorithms.grpo import micro_batches

    segs = [s.segment for s in samples]
    tokens = sum(len(s.token_ids) for s in segs)
    t = time.perf_counter()
    for chunk in micro_batches([len(s.token_ids) for s in segs], micro_batch_tokens):
        bare_step(policy, [segs[i] for i in chunk])
    bare_s = time.perf_counter() - t
    return {"tokens": tokens, "update_tok_s": tokens / update_s if update_s else 0.0,
            "bare_tok_s": tokens / bare_s if bare_s else 0.0}


def env_suites(cfg, work: Path) -> dict[str, tuple[str, dict, Any]]:
    """Every engine that imports here: (registered name, options, a few tasks)."""
    from evolving_rl.envs.base import available, make_suite
    from evolving_rl.common import env_options

    names = available()
    out: dict[str, tuple[str, dict, Any]] = {}
    opts = env_options(cfg)
    out["alfworld"] = ("alfworld", opts, lambda: make_suite("alfworld", opts).tasks("train")[:16])
    if "twx" in names:
        o = {"tasks_per_game": 2, "max_steps": cfg.env.max_steps}
        out["twx"] = ("twx", o, lambda: make_suite("twx", o).tasks("train"))
    if "scienceworld" in names:
        o = {"task_types": ["find-non-living-thing", "lifespan-longest-lived"], "unseen_types": [],
             "tasks_per_type": 2, "max_steps": cfg.env.max_steps}
        out["scienceworld"] = ("scienceworld", o, lambda: make_suite("scienceworld", o).tasks("train"))
    if "textworld" in names:
        def tw_tasks():
            from evolving_rl.envs.textworld_env import generate_tw_games

            d = work / "twgames"
            if not (d / "manifest.json").exists():
                generate_tw_games(d, seed=0, counts={"tw-cooking": {"train": 2}})
            return make_suite("textworld", {"games_dir": str(d)}).tasks("train")

        o = {"games_dir": str(work / "twgames"), "max_steps": cfg.env.max_steps}
        out["textworld"] = ("textworld", o, tw_tasks)
    if "mind2web" in names and FIXTURE_MIND2WEB.is_dir():
        o = {"data_dir": str(FIXTURE_MIND2WEB), "cache_dir": str(work / "m2w-cache"), "max_steps": cfg.env.max_steps}

        def m2w_tasks():
            s = make_suite("mind2web", o)
            return [t for split in s.splits() for t in s.tasks(split)]

        out["mind2web"] = ("mind2web", o, m2w_tasks)
    return out


def pool_rate(name: str, options: dict, tasks: list, workers: int, budget_steps: int, slots: int = 8,
              timeout_s: float = 120.0, max_s: float = 30.0, pool_class: Any = None) -> dict:
    """Expert play (first admissible action where the engine has no expert) on `slots` live
    episodes through EnvPool (or `pool_class`, e.g. RayEnvPool), as the rollout drives it: one
    step call for all slots per turn. Stops after `budget_steps` steps or `max_s` seconds
    (ScienceWorld runs ~5 steps/s here)."""
    from evolving_rl.envs.workers import EnvPool

    with (pool_class or EnvPool)(name, options, workers, timeout_s) as pool:
        t = time.perf_counter()
        live = pool.reset([(s, tasks[s % len(tasks)]) for s in range(slots)])
        first_reset_s = time.perf_counter() - t
        nxt, steps, step_s, resets = slots, 0, 0.0, 0
        t_all = time.perf_counter()
        while steps < budget_steps and live and time.perf_counter() - t_all < max_s:
            experts = pool.expert_action(list(live))
            reqs = []
            for s, r in live.items():
                a = experts.get(s) or (r.admissible[0] if r.admissible else "look")
                reqs.append((s, a))
            t = time.perf_counter()
            replies = pool.step(reqs)
            step_s += time.perf_counter() - t
            steps += len(reqs)
            done = [s for s, r in replies.items() if r.done]
            live = {s: r for s, r in replies.items() if not r.done}
            if done:
                pool.release(done)
                live.update(pool.reset([(s, tasks[(nxt + i) % len(tasks)]) for i, s in enumerate(done)]))
                nxt += len(done)
                resets += len(done)
        wall = time.perf_counter() - t_all
    return {"workers": workers, "steps": steps, "steps_per_s": steps / step_s if step_s else 0.0,
            "steps_per_s_all": steps / wall if wall else 0.0, "resets": resets, "first_reset_s": first_reset_s}


def retrieval_latency(cfg, tasks, work: Path, k: int) -> dict:
    from evolving_rl.retrieval import build_index, make_embedder

    emb = make_embedder(cfg.retrieval.embedder)  # already loaded by the trainer's index
    cache = work / "emb-cache"
    t = time.perf_counter()
    build_index(tasks, emb, cache_dir=cache, backend=cfg.retrieval.backend)
    cold = time.perf_counter() - t
    t = time.perf_counter()
    index = build_index(tasks, emb, cache_dir=cache, backend=cfg.retrieval.backend)
    warm = time.perf_counter() - t
    lat = []
    for task in tasks:
        t = time.perf_counter()
        index.top_k(task, k)
        lat.append(time.perf_counter() - t)
    q = []
    for task in tasks[:20]:
        t = time.perf_counter()
        emb.embed([task.description])
        q.append(time.perf_counter() - t)
    lat.sort()
    return {"pool": len(tasks), "k": k, "build_cold_s": cold, "build_cached_s": warm,
            "top_k_median_ms": 1e3 * statistics.median(lat), "top_k_p95_ms": 1e3 * lat[int(0.95 * (len(lat) - 1))],
            "embed_one_query_ms": 1e3 * statistics.median(q)}


# ---------------------------------------------------------------------------- main


def parse_sweep(text: str) -> list[tuple[int, int]]:
    out = []
    for part in filter(None, text.split(",")):
        try:
            n, k = (int(x) for x in part.lower().split("x"))
        except ValueError:
            raise SystemExit(f"--sweep: {part!r} is not NxK (e.g. 4x2)") from None
        if n < 1 or k < 1:
            raise SystemExit(f"--sweep: {part!r}: N and K must be >= 1")
        out.append((n, k))
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="evolving-rl bench speed", description=__doc__.splitlines()[0])
    ap.add_argument("--config", default=str(ROOT / "configs" / "quickstart.yaml"))
    ap.add_argument("--model", help="A causal-LM directory (default: the config's model.path).")
    ap.add_argument("--games", help="An ALFWorld games directory (default: the config's env.games_dir).")
    ap.add_argument("--sweep", default="2x1,2x2,4x1,4x2", help="N x K points of the step-time sweep.")
    ap.add_argument("--skip", default="", help=f"Comma-separated sections to skip: {', '.join(SECTIONS)}.")
    ap.add_argument("--env-steps", type=int, default=200, help="Steps per engine and worker count.")
    ap.add_argument("--update-repeats", type=int, default=3, help="Re-timings of the Evolving-RL step's update.")
    ap.add_argument("--json", default=str(RESULTS_DIR / "speed.json"))
    ap.add_argument("--work", help="Scratch directory (default: a temporary one).")
    ap.add_argument("overrides", nargs="*", help="key=value config overrides")
    args = ap.parse_args(argv)
    skip = {s for s in args.skip.split(",") if s}
    if skip - set(SECTIONS):
        raise SystemExit(f"--skip: unknown section(s) {sorted(skip - set(SECTIONS))}; allowed: {', '.join(SECTIONS)}")
    sweep = parse_sweep(args.sweep)
    quiet_hf()

    overrides = list(args.overrides)
    overrides += [f"env.games_dir={args.games}"] if args.games else []
    overrides += [f"model.path={args.model}"] if args.model else []
    with tempfile.TemporaryDirectory(prefix="speed-") as tmp:
        work = Path(args.work) if args.work else Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        cfg = load_config(args.config, overrides)
        ensure_games(cfg)
        model_path, provenance = ensure_model(cfg, work)
        e = cfg.evolving
        per_step = e.sources_per_step * (1 + e.num_skills * e.num_downstream * e.downstream_repeats)
        g, p, why = grpo_matching(per_step, e.num_skills)
        cfg = load_config(args.config, overrides + [
            f"model.path={model_path}", f"run_dir={work / 'run'}", "algorithm=evolving", "train.tensorboard=false",
            f"retrieval.cache_dir={work / 'trainer-emb-cache'}", f"grpo.group_size={g}", f"grpo.prompts_per_step={p}"])
        say(f"speed benchmark: {provenance}")
        say(f"config {args.config}; B={e.sources_per_step} N={e.num_skills} K={e.num_downstream}; "
            f"GRPO step matched to the Evolving-RL step: {why}")
        report: dict[str, Any] = {"machine": machine(), "config": rel(args.config), "overrides": overrides,
                                  "model": provenance, "grpo_matching": why}
        run(cfg, work, report, skip, sweep, args.env_steps, args.update_repeats)
        say(f"\nwrote {write_json(Path(args.json), report)}")
    return 0


def run(cfg, work: Path, report: dict, skip: set[str], sweep: list[tuple[int, int]], env_steps: int,
        update_reps: int = 3) -> None:
    from evolving_rl.algorithms.grpo_step import GRPOStep
    from evolving_rl.train import Trainer

    trainer = Trainer(cfg)  # one trainer: the GRPO step reuses its policy, pool and optimizer
    try:
        step = 0
        if "steps" not in skip or "decode" not in skip or "train" not in skip:
            evo = measure_step(trainer, trainer.algorithm, step, "Evolving-RL")
            if "update" not in skip and update_reps > 0 and evo["_samples"]:
                u = update_repeats(trainer, evo["_all_samples"], evo, update_reps)
                report["update"] = u
                med = u["median"]
                say("\n" + table(
                    ["update s (median)", "range", "step share", "policy fwd s", "reference fwd s", "backward+optim s",
                     "CPU s", "sample tokens", "model tokens"],
                    [[round(med["update_s"], 2), f"{u['update_s_range'][0]:.1f}-{u['update_s_range'][1]:.1f}",
                      f"{u['share_of_step']:.0%}", round(med["policy_forward_s"], 2), round(med["reference_forward_s"], 2),
                      round(med["backward_optimizer_s"], 2), round(med["cpu_s"], 2), u["sample_tokens"],
                      round(med["model_tokens"])]],
                    f"The Evolving-RL step's update, {update_reps} repeats on its samples (collect {u['collect_s']:.1f} s)"))
            grpo = None
            if "grpo" not in skip:
                grpo = measure_step(trainer, GRPOStep(trainer.cfg, trainer.rollout, trainer.cursor), step + 1, "GRPO")
            step += 2
            print_steps(evo, grpo, report, trainer.algorithm.index_build_s)
            if "decode" not in skip:
                rows, out = [], {}
                for label, m in (("Evolving-RL", evo), ("GRPO", grpo)):
                    if m is None:
                        continue
                    for role in ("solver", "extractor"):
                        calls = m["_largest"][role]
                        if calls:
                            d = decode_vs_ceiling(trainer.policy, calls)
                            out[f"{label}/{role}"] = d
                            rows.append([f"{label} {role}", d["calls"], f"{max(d['batch'])}", round(d["mean_prompt_tokens"]),
                                         round(d["ours_tok_s"]), round(d["ceiling_tok_s"]),
                                         f"{d['ours_tok_s'] / d['ceiling_tok_s']:.0%}" if d["ceiling_tok_s"] else "-"])
                report["decode"] = out
                say("\n" + table(["generate calls", "calls", "max batch", "prompt tok", "ours tok/s", "ceiling tok/s",
                                  "ours/ceiling"], rows,
                                 "Generation: the step's largest policy calls vs the raw decode ceiling on the same prompts"))
            if "train" not in skip:
                rows, out = [], {}
                for label, m in (("Evolving-RL", evo), ("GRPO", grpo)):
                    if m is not None and m["_samples"]:
                        d = train_vs_bare(trainer.policy, m["_samples"], cfg.grpo.micro_batch_tokens, m["update_s"])
                        out[label] = d
                        rows.append([label, len(m["_samples"]), d["tokens"], round(d["update_tok_s"]), round(d["bare_tok_s"]),
                                     f"{d['update_tok_s'] / d['bare_tok_s']:.0%}" if d["bare_tok_s"] else "-"])
                report["train"] = out
                say("\n" + table(["update", "samples", "tokens", "update tok/s", "bare fwd+bwd tok/s", "update/bare"], rows,
                                 "Training: one GRPO update (policy + reference forward, backward, AdamW) vs bare forward+backward"))
        if "retrieval" not in skip:
            r = retrieval_latency(cfg, trainer.train_tasks, work, cfg.evolving.num_downstream)
            report["retrieval"] = r
            say("\n" + table(["measure", "value"], [[k, v] for k, v in r.items()], "Retrieval over the training pool"))
        if "sweep" not in skip and len({n * k for n, k in sweep}) >= 2:
            report["sweep"] = run_sweep(trainer, sweep, step)
    finally:
        trainer.close()
    if "envs" not in skip:
        report["envs"] = run_envs(cfg, work, env_steps)


def print_steps(evo: dict, grpo: dict | None, report: dict, index_build_s: float) -> None:
    stages = ["source", "extract", "retrieve", "downstream", "rewards"]
    steps = [m for m in (evo, grpo) if m is not None]
    rows = []
    for m in steps:
        info = m["info"]
        cols = [info.get(f"time/{s}_s", m["collect_s"] if (s == "downstream" and m is grpo) else 0.0) for s in stages]
        rows.append([m["label"], m["episodes"], m["env_steps"], *[round(c, 2) for c in cols], round(m["update_s"], 2),
                     round(m["step_s"], 2)])
    say("\n" + table(["step", "episodes", "env steps", *[f"{s} s" for s in stages], "update s", "total s"], rows,
                     "Time per stage of one step (GRPO's rollout shown under 'downstream')"))
    rows = []
    for m in steps:
        r = m["rollout"]
        rows.append([m["label"], round(r["policy_s"], 2), round(r["env_s"], 2),
                     round(r["generated_tokens"] / r["policy_s"]) if r["policy_s"] else 0,
                     round(m["env_steps"] / r["env_s"], 1) if r["env_s"] else 0,
                     round(m["env_steps"] / max(1, m["solver_calls"]), 1),
                     f"{m['extractor']['batch']} / {m['extractor']['generated']} / {m['extractor']['s']:.1f}s"])
    say("\n" + table(["rollout", "policy s", "env s", "gen tok/s", "env steps/s", "mean batch", "extractor rows/tokens/s"], rows,
                     "Inside the rollouts (env s includes resets; index build at trainer start: "
                     f"{index_build_s:.1f} s)"))
    report["steps"] = {m["label"]: {k: v for k, v in m.items() if not k.startswith("_")} for m in steps}


def run_sweep(trainer, sweep: list[tuple[int, int]], step: int) -> dict:
    """Evolving-RL steps at each N x K (same trainer: N and K are read at every collect)."""
    ev = trainer.cfg.evolving
    saved = (ev.num_skills, ev.num_downstream)
    points = []
    try:
        for n, k in sweep:
            ev.num_skills, ev.num_downstream = n, k
            m = measure_step(trainer, trainer.algorithm, step, f"N={n} K={k}")
            step += 1
            points.append({"N": n, "K": k, "episodes": m["episodes"], "env_steps": m["env_steps"],
                           "step_s": m["step_s"], "update_s": m["update_s"],
                           **{s: m["info"].get(f"time/{s}_s", 0.0) for s in ("source", "extract", "retrieve", "downstream")}})
    finally:
        ev.num_skills, ev.num_downstream = saved
    fit = fit_linear([p["episodes"] for p in points], [p["step_s"] for p in points])
    fit_steps = fit_linear([p["env_steps"] for p in points], [p["step_s"] for p in points]) \
        if len({p["env_steps"] for p in points}) > 1 else None
    rows = [[p["N"], p["K"], p["episodes"], p["env_steps"], round(p["step_s"], 1), round(fit["a"] + fit["b"] * p["episodes"], 1),
             f"{fit['a'] / (fit['a'] + fit['b'] * p['episodes']):.0%}" if fit["a"] + fit["b"] * p["episodes"] else "-"]
            for p in points]
    say("\n" + table(["N", "K", "episodes", "env steps", "step s", "fit s", "fixed share"], rows,
                     f"Step time vs N x K: fit step_s = {fit['a']:.2f} + {fit['b']:.3f} * episodes (R^2 {fit['r2']:.2f})"))
    if fit_steps:
        say(f"  per env step instead: step_s = {fit_steps['a']:.2f} + {fit_steps['b']:.4f} * env_steps "
            f"(R^2 {fit_steps['r2']:.2f}): the better fit when episode lengths vary")
    return {"points": points, "fit_episodes": fit, "fit_env_steps": fit_steps}


def run_envs(cfg, work: Path, budget: int) -> dict:
    out, rows = {}, []
    for label, (name, options, tasks_fn) in env_suites(cfg, work).items():
        try:
            tasks = tasks_fn()
            if not tasks:
                raise ValueError("no tasks")
            res = [pool_rate(name, options, tasks, w, budget) for w in (1, 2)]
        except Exception as e:  # an engine that is installed but cannot run here is reported, not fatal
            out[label] = {"error": f"{type(e).__name__}: {e}"}
            rows.append([label, "-", "-", "-", "-", f"error: {str(e)[:60]}"])
            say(f"  {label}: {type(e).__name__}: {e}")
            continue
        out[label] = {"tasks": len(tasks), "by_workers": res}
        one, two = res
        rows.append([label, round(one["steps_per_s"], 1), round(two["steps_per_s"], 1),
                     f"{two['steps_per_s'] / one['steps_per_s']:.2f}x" if one["steps_per_s"] else "-",
                     round(two["steps_per_s_all"], 1), f"{one['first_reset_s']:.1f} / {two['first_reset_s']:.1f}"])
        say(f"  {label}: {one['steps_per_s']:.1f} / {two['steps_per_s']:.1f} steps/s (1 / 2 workers)")
    say("\n" + table(["engine", "1 worker", "2 workers", "speed-up", "2 w. incl. resets+expert", "first reset s (1/2 w.)"],
                     rows, "Env steps/s through EnvPool, 8 live episodes, expert actions"))
    return out


if __name__ == "__main__":
    raise SystemExit(main())
