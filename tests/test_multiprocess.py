"""Multi-process training through accelerate (issue 17): each process plays its block of a
step's episodes, the step's samples are gathered, and GRPOUpdater shards the update over the
processes and sums their gradients, so one step on 2 CPU processes plays exactly the episodes
and gives both processes the weights a single process gets."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

HERE = Path(__file__).parent
CHECKPOINT = HERE.parent / "checkpoints" / "tiny-alfworld-sft"
# Float sums in another order (two half-batch gradients summed, not one): fp32 rounding of the
# gradient, ~1e-7 of a weight's step; the steps themselves are ~1e-4-1e-2 (SGD, lr 1, clipped).
ATOL = 1e-6
# A whole step also samples its old log-probs in other batches on 2 processes (other padding,
# other matmul shapes): ~1e-7 apart, which moves the ratio, and the step, by about as much.
STEP_ATOL = 1e-5


def _launch(script: str, processes: int, *args: str, expect_ok: bool = True) -> str:
    # torchrun, not `accelerate launch --cpu --num_processes 2`: accelerate 1.16 starts several
    # CPU processes only through mpirun, and otherwise silently runs one. The Accelerator in the
    # script reads torchrun's RANK/WORLD_SIZE and runs MULTI_CPU over gloo all the same.
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(HERE.parent)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes),
           str(HERE / script), *args]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert (done.returncode == 0) == expect_ok, done.stderr[-3000:]
    return done.stderr


@pytest.mark.slow
def test_two_processes_update_exactly_like_one(tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    one.mkdir()
    two.mkdir()
    _launch("_ddp_update.py", 1, str(CHECKPOINT), str(one))
    _launch("_ddp_update.py", 2, str(CHECKPOINT), str(two))
    single = torch.load(one / "rank0.pt")
    ranks = [torch.load(two / f"rank{r}.pt") for r in range(2)]
    start = __import__("safetensors.torch", fromlist=["load_file"]).load_file(str(CHECKPOINT / "model.safetensors"))
    moved = max(float((single["weights"][k] - start[k]).abs().max()) for k in start if k in single["weights"])
    assert moved > 1e-4, "the single-process step did not move the weights: nothing is tested"
    for k, w in single["weights"].items():
        assert torch.equal(ranks[0]["weights"][k], ranks[1]["weights"][k]), f"{k}: the two processes differ"
        gap = float((ranks[0]["weights"][k] - w).abs().max())
        assert gap < ATOL, f"{k}: 2 processes vs 1 differ by {gap}"
    # each process ran only its shard through the model, and the shards cover the batch once
    shards = [r["metrics"]["loss/process_samples"] for r in ranks]
    assert sum(shards) == single["metrics"]["loss/process_samples"] == 12 and max(shards) < 12
    for key in ("loss/total", "loss/num_samples", "loss/trained_tokens", "loss/pg", "loss/kl", "loss/clip_frac"):
        assert ranks[0]["metrics"][key] == pytest.approx(single["metrics"][key], rel=1e-5, abs=1e-7), key
        assert ranks[1]["metrics"][key] == pytest.approx(single["metrics"][key], rel=1e-5, abs=1e-7), key


@pytest.mark.slow
def test_processes_holding_different_batches_are_refused(tmp_path):
    err = _launch("_ddp_update.py", 2, str(CHECKPOINT), str(tmp_path), "skew", expect_ok=False)
    assert "the processes hold different samples" in err
    assert not list(tmp_path.glob("rank*.pt"))


def test_a_rows_sample_depends_on_its_own_seed_only():
    """What lets a process play a shard of a step: the same prompt with the same seed samples the
    same tokens whatever else shares the generate call, and in whichever position."""
    from evolving_rl.config import ModelConfig
    from evolving_rl.policy.hf import HFPolicy

    policy = HFPolicy(ModelConfig(path=str(CHECKPOINT)))
    a, b, c = (policy.encode_text(t) for t in ("go to the kitchen", "open the fridge 1", "take apple"))
    kw = dict(temperature=1.0, top_p=1.0, max_new_tokens=20)
    alone = policy.generate([b], seed=[7], **kw)[0]
    among = policy.generate([a, c, b], seed=[5, 6, 7], **kw)[2]
    assert among.token_ids == alone.token_ids
    assert among.logprobs == pytest.approx(alone.logprobs, abs=1e-5)
    other = policy.generate([b] * 4, seed=[8, 9, 10, 11], **kw)
    assert any(g.token_ids != alone.token_ids for g in other), "other seeds never sample otherwise: nothing tested"
    with pytest.raises(ValueError, match="2 seeds for 3 prompts"):
        policy.generate([a, b, c], seed=[1, 2], **kw)


def _episode_key(e: dict) -> tuple:
    return (e["task"], e["card"], e["won"], e["failed"], tuple(e["actions"]), tuple(tuple(i) for i in e["ids"]))


@pytest.mark.slow
def test_two_processes_play_a_shard_each_and_step_like_one(games_dir, tmp_path):
    """One Evolving-RL step of the Trainer on 2 processes: the two ranks' episodes together are
    exactly the single process's (same seed), neither rank plays them all, both end with the
    single-process weights (the optimizer state sharded over the two, ZeRO stage 1), and the
    first rank alone wrote the run, with the whole optimizer state in its checkpoint."""
    from conftest import tiny_config

    from evolving_rl.config import save_config

    overrides = [f"env.games_dir={games_dir}", f"model.path={CHECKPOINT}", "algorithm=evolving", "train.steps=1",
                 "evolving.extractor.entropy_coef=-0.03",  # a gradient from every extractor sample
                 "eval.splits=[eval_seen]", "eval.protocols=[no_skill]", "eval.max_tasks=1"]
    runs = {}
    for n in (1, 2):
        out = tmp_path / f"p{n}"
        out.mkdir()
        save_config(tiny_config(games_dir, CHECKPOINT, out / "run", *overrides), out / "config.yaml")
        _launch("_ddp_step.py", n, str(out), str(out / "config.yaml"))
        runs[n] = [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(n)]
    single, ranks = runs[1][0], runs[2]
    union = [e for r in ranks for e in r["episodes"]]
    assert all(0 < len(r["episodes"]) < len(single["episodes"]) for r in ranks), "a rank played every episode"
    assert sorted(map(_episode_key, union)) == sorted(map(_episode_key, single["episodes"]))
    by_key = {_episode_key(e): e for e in single["episodes"]}
    lp_gap = max(abs(x - y) for e in union for s, t in zip(e["logprobs"], by_key[_episode_key(e)]["logprobs"])
                 for x, y in zip(s, t))
    assert lp_gap < 1e-4, f"sampling-time log-probs differ by {lp_gap} between 2 processes and 1"
    start = __import__("safetensors.torch", fromlist=["load_file"]).load_file(str(CHECKPOINT / "model.safetensors"))
    moved = max(float((single["weights"][k] - start[k]).abs().max()) for k in start if k in single["weights"])
    assert moved > 1e-4, "the single-process step did not move the weights: nothing is tested"
    assert [r["sharded_optimizer"] for r in ranks] == [True, True] and not single["sharded_optimizer"]
    for k, w in single["weights"].items():
        assert torch.equal(ranks[0]["weights"][k], ranks[1]["weights"][k]), f"{k}: the two processes differ"
        gap = float((ranks[0]["weights"][k] - w).abs().max())
        assert gap < STEP_ATOL, f"{k}: 2 processes vs 1 differ by {gap}"
    # the first process wrote the checkpoint, holding the whole optimizer state
    blob = torch.load(tmp_path / "p2" / "run" / "checkpoints" / "step_000001" / "trainer.pt", weights_only=False)
    params = sum(len(g["params"]) for g in blob["optimizer"]["param_groups"])
    assert len(blob["optimizer"]["state"]) == params > 0
    rows = {n: [json.loads(x) for x in (tmp_path / f"p{n}" / "run" / "metrics.jsonl").read_text().splitlines()]
            for n in (1, 2)}
    train = {n: [r for r in rows[n] if r["kind"] == "train"] for n in rows}
    assert len(train[2]) == 1, "more than one process logged the step"
    for key in ("rollout/episodes", "solver/success", "extractor/reward_mean", "loss/num_samples", "loss/trained_tokens"):
        assert train[2][0][key] == pytest.approx(train[1][0][key], rel=1e-6), key

