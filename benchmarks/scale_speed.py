"""Scale-out parts against the default ones, same work on both (issue 17):

* env steps/s: the process pool vs the Ray-actor pool (2 workers, 8 live episodes, expert play),
  on TextWorld-Express (a fast engine: shows the transport's cost) and ALFWorld (engine-bound);
* generated tokens/s: our decode loop (HFPolicy) vs vLLM (VLLMPolicy) on the same prompts and
  model, sampled at temperature 1 / top-p 0.9 as the rollout does;
* training step wall time and episodes/s with 1 vs 2 training processes (`train`): the same
  quickstart Evolving-RL steps (tiny checkpoint, same seed, so the same episodes), launched
  with torchrun; the two processes split the rollouts and the update. The machine's cores and
  engine workers are shared out, not added: on a 2-core machine this measures the overhead of
  going multi-process, not scaling.

Each part runs where its package imports: Ray in the main venv, vLLM in .venv-vllm
(`bash scripts/vllm_venv.sh`), so run it once in each:

    .venv/bin/python benchmarks/scale_speed.py --parts pools
    .venv-vllm/bin/python benchmarks/scale_speed.py --parts decode
    .venv/bin/python benchmarks/scale_speed.py --parts train

Writes docs/results/scale_speed_<part>.json.
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS_DIR, machine, say, table, write_json  # noqa: E402


def pools(steps: int) -> dict:
    import ray

    from evolving_rl.envs.alfworld import AlfworldSuite
    from evolving_rl.envs.alfworld_gen import generate_games
    from evolving_rl.envs.ray_pool import RayEnvPool
    from speed import pool_rate

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    out, rows = {}, []
    with tempfile.TemporaryDirectory() as tmp:
        engines = {}
        try:
            from evolving_rl.envs.twx import TWXSuite

            o = {"tasks_per_game": 2}
            engines["twx"] = ("evolving_rl.envs.twx:TWXEnv:TWXSuite", o, TWXSuite(o).tasks("train"))
        except ImportError:
            say("  twx: textworld-express not installed, skipped")
        generate_games(Path(tmp) / "games", seed=0, sizes={"train": 8}, workers=2)
        o = {"games_dir": str(Path(tmp) / "games")}
        engines["alfworld"] = ("alfworld", o, AlfworldSuite(o).tasks("train"))
        for label, (name, options, tasks) in engines.items():
            res = {kind: pool_rate(name, options, tasks, 2, steps, pool_class=cls, max_s=60.0)
                   for kind, cls in (("process", None), ("ray", RayEnvPool))}
            out[label] = res
            p, r = res["process"]["steps_per_s"], res["ray"]["steps_per_s"]
            rows.append([label, round(p, 1), round(r, 1), f"{r / p:.2f}x" if p else "-"])
    ray.shutdown()
    say("\n" + table(["engine", "process pool", "Ray pool", "Ray / process"], rows,
                     "Env steps/s, 2 workers, 8 live episodes, expert actions"))
    return out


def decode(batch: int, new_tokens: int, repeats: int) -> dict:
    from evolving_rl.config import ModelConfig
    from evolving_rl.policy.hf import HFPolicy
    from evolving_rl.policy.vllm_policy import VLLMPolicy
    from gpu_check import CHECKPOINT, _prompts

    out, rows = {}, []
    t0 = time.perf_counter()
    vp = VLLMPolicy(ModelConfig(path=str(CHECKPOINT)))
    out["vllm_startup_s"] = round(time.perf_counter() - t0, 1)
    hp = HFPolicy(ModelConfig(path=str(CHECKPOINT)))
    prompts = _prompts(hp, batch, random.Random(0))
    for label, pol in (("decode loop (HFPolicy)", hp), ("vLLM (VLLMPolicy)", vp)):
        pol.generate(prompts[:4], temperature=1.0, top_p=0.9, max_new_tokens=8, seed=0)  # warm-up
        rates = []
        for r in range(repeats):
            t = time.perf_counter()
            gens = pol.generate(prompts, temperature=1.0, top_p=0.9, max_new_tokens=new_tokens, seed=r + 1)
            rates.append(sum(len(g.token_ids) for g in gens) / (time.perf_counter() - t))
        out[label] = {"batch": batch, "tokens_per_s": [round(x, 1) for x in rates]}
        rows.append([label, batch, round(max(rates), 1)])
    say("\n" + table(["engine", "batch", "tokens/s (best)"], rows,
                     f"Generated tokens/s, tiny checkpoint, {new_tokens} new tokens, temperature 1 / top-p 0.9"))
    return out


def train(steps: int) -> dict:
    """1 vs 2 torchrun processes on the same quickstart steps, the cores (torch threads) and the
    engine workers shared out so that both runs use the same machine."""
    import json
    import subprocess

    from common import ROOT, ensure_games

    from evolving_rl.config import load_config

    config = ROOT / "configs" / "quickstart.yaml"
    games = ensure_games(load_config(config, [f"env.games_dir={ROOT / load_config(config).env.games_dir}"]))
    cores = os.cpu_count() or 1
    out, rows = {}, []
    with tempfile.TemporaryDirectory() as tmp:
        for procs in (1, 2):
            run = Path(tmp) / f"p{procs}"
            env = {**os.environ, "OMP_NUM_THREADS": str(max(1, cores // procs)), "PYTHONPATH": str(ROOT)}
            cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(procs),
                   "-m", "evolving_rl.cli", "train", "-c", str(config), f"env.games_dir={games}", f"run_dir={run}", f"train.steps={steps}", "train.eval_initial=false",
                   f"env.num_workers={max(1, 2 // procs)}", "library.persist_top=0",
                   "eval.splits=[eval_seen]", "eval.protocols=[no_skill]", "eval.max_tasks=1"]
            t0 = time.perf_counter()
            done = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True)
            if done.returncode != 0:
                raise SystemExit(f"train with {procs} process(es) failed:\n{done.stderr[-3000:]}")
            rows_p = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
            steps_p = [r for r in rows_p if r.get("kind") == "train"]
            wall = [r["time/collect_s"] + r["time/update_s"] for r in steps_p]
            eps = [r["rollout/episodes"] for r in steps_p]
            out[f"{procs}_process"] = {
                "step_s": [round(w, 1) for w in wall], "collect_s": [round(r["time/collect_s"], 1) for r in steps_p],
                "update_s": [round(r["time/update_s"], 1) for r in steps_p], "episodes": eps,
                "episodes_per_s": round(sum(eps) / sum(wall), 3), "torch_threads_each": max(1, cores // procs),
                "engine_workers_each": max(1, 2 // procs), "launch_to_exit_s": round(time.perf_counter() - t0, 1),
                "solver_success": [r["solver/success"] for r in steps_p]}
            rows.append([procs, " / ".join(f"{w:.1f}" for w in wall), round(sum(wall) / len(wall), 1),
                         round(sum(eps) / sum(wall), 3)])
    say("\n" + table(["processes", "step wall s (each)", "mean step s", "episodes/s"], rows,
                     f"quickstart Evolving-RL steps, tiny checkpoint, {cores} cores shared out "
                     "(overhead, not scaling, when processes x threads = cores)"))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--parts", default="pools", help="pools, decode, train, or several comma-separated")
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=48)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--train-steps", type=int, default=2, help="train: RL steps per run")
    args = ap.parse_args()
    for part in args.parts.split(","):
        report = {"machine": machine()}
        if part == "pools":
            report.update(pools(args.steps))
        elif part == "decode":
            report.update(decode(args.batch, args.new_tokens, args.repeats))
        elif part == "train":
            report.update(train(args.train_steps))
        else:
            raise SystemExit(f"--parts: unknown part {part!r}; choose pools, decode or train")
        write_json(RESULTS_DIR / f"scale_speed_{part}.json", report)


if __name__ == "__main__":
    main()
