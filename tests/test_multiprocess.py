"""Multi-process training through accelerate (issue 17): GRPOUpdater shards the samples over
the processes and sums their gradients, so one update on 2 CPU processes gives both the
weights a single process gets from the same samples."""

from __future__ import annotations

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


def _launch(out: Path, processes: int, *extra: str, expect_ok: bool = True) -> str:
    # torchrun, not `accelerate launch --cpu --num_processes 2`: accelerate 1.16 starts several
    # CPU processes only through mpirun, and otherwise silently runs one. The Accelerator in the
    # script reads torchrun's RANK/WORLD_SIZE and runs MULTI_CPU over gloo all the same.
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(HERE.parent)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes),
           str(HERE / "_ddp_update.py"), str(CHECKPOINT), str(out), *extra]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert (done.returncode == 0) == expect_ok, done.stderr[-3000:]
    return done.stderr


@pytest.mark.slow
def test_two_processes_update_exactly_like_one(tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    one.mkdir()
    two.mkdir()
    _launch(one, 1)
    _launch(two, 2)
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
    err = _launch(tmp_path, 2, "skew", expect_ok=False)
    assert "the processes hold different samples" in err
    assert not list(tmp_path.glob("rank*.pt"))
