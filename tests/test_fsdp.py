"""train.sharding: fsdp (issue 17): weights, gradients and AdamW state sharded over the
processes with torch's FSDP2, gathered whole for the rollouts and for checkpoints. Run for
real on 2 CPU processes (torchrun, gloo) with the tiny checkpoint."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file
from test_multiprocess import CHECKPOINT, _launch

# The sharded step sums the two processes' gradients in a reduce-scatter, one process sums its
# micro-batches' in backward: fp32 rounding of another summation order, ~1e-7 of a weight's
# step of ~1e-2 (SGD, lr 1, clipped); measured 1.2e-7 after one step, 2.5e-7 after two.
ATOL = 1e-6


@pytest.mark.slow
def test_fsdp_update_equals_one_process_and_resumes(tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    one.mkdir()
    two.mkdir()
    _launch("_fsdp_update.py", 1, str(CHECKPOINT), str(one), "resume")
    _launch("_fsdp_update.py", 2, str(CHECKPOINT), str(two), "resume")
    single = torch.load(one / "rank0.pt", weights_only=False)
    ranks = [torch.load(two / f"rank{r}.pt", weights_only=False) for r in range(2)]
    start = load_file(str(CHECKPOINT / "model.safetensors"))
    total = single["local_numel"]
    # each process stores about half of the weights (and so of their gradients and momenta)
    assert [r["local_numel"] for r in ranks] == pytest.approx([total / 2] * 2, rel=0.02)
    moved = max(float((single["first"]["weights"][k] - start[k]).abs().max()) for k in start)
    assert moved > 1e-4, "the single-process step did not move the weights: nothing is tested"
    # gathered on the first process only; whole and identical on both while they generate
    assert ranks[1]["first"]["weights"] == {} and ranks[1]["first"]["optimizer"] == {}
    for k, w in ranks[0]["held"].items():
        assert torch.equal(w, ranks[1]["held"][k]), f"{k}: the two processes' whole weights differ"
    for phase in ("first", "second"):
        gathered = ranks[0][phase]["weights"]
        assert set(gathered) == set(single[phase]["weights"])
        for k, w in single[phase]["weights"].items():
            gap = float((gathered[k] - w).abs().max())
            assert gap < ATOL, f"{phase} step, {k}: 2 sharded processes vs 1 differ by {gap}"
    for k, w in ranks[0]["held"].items():
        assert float((w - single["first"]["weights"][k]).abs().max()) < ATOL, k
    # the same seed samples the same tokens from the gathered weights as from one process's
    assert ranks[0]["gen"] == single["gen"] and ranks[1]["gen"] != single["gen"]
    for key in ("loss/total", "loss/num_samples", "loss/pg", "loss/kl", "loss/clip_frac", "loss/grad_norm"):
        for r in ranks:
            for step in (0, 1):
                assert r["metrics"][step][key] == pytest.approx(single["metrics"][step][key], rel=1e-5, abs=1e-7), key
    # one unit per decoder layer and the root; an update's forward holds at most the running
    # layer and the next (prefetched) whole, generation all of them
    layers = 4
    assert [r["units"] for r in ranks] == [layers + 1] * 2
    assert single["metrics"][0]["most_whole_layers"] == layers
    for r in ranks:
        assert 1 <= r["metrics"][0]["most_whole_layers"] <= 2 and r["generation_whole_layers"] == layers
    # the first step's shards differ in micro-batches: the shorter one pads, so both processes
    # make the same forward calls (one per micro-batch), as many as the longer shard has
    first = [r["metrics"][0] for r in ranks]
    assert sorted(m["loss/process_samples"] for m in first) == [5.0, 6.0]
    assert first[0]["own_micro_batches"] != first[1]["own_micro_batches"]
    assert [m["forwards"] for m in first] == [max(m["own_micro_batches"] for m in first)] * 2
    assert sorted(r["metrics"][1]["loss/process_samples"] for r in ranks) == [6.0, 6.0]
    # the whole state written after step 1, loaded into freshly sharded models: step 2 again
    for k, w in ranks[0]["second"]["weights"].items():
        assert float((ranks[0]["resumed"]["weights"][k] - w).abs().max()) < ATOL, f"{k}: resume diverged"
    momenta = ranks[0]["first"]["optimizer"]["state"]
    assert len(momenta) == len(single["first"]["optimizer"]["state"]) > 0
    assert all(v["momentum_buffer"].shape == single["first"]["weights"][k].shape for k, v in momenta.items())


@pytest.mark.slow
def test_fsdp_trainer_checkpoint_resumes_where_it_left_off(games_dir, tmp_path):
    """The Trainer under train.sharding: fsdp (AdamW, GRPO): two steps straight, and the same
    run resumed from its step-1 checkpoint, end with the same weights; the checkpoint holds
    the whole model, loadable by Hugging Face, and the whole optimizer state."""
    from conftest import tiny_config

    from evolving_rl.config import save_config

    overrides = [f"env.games_dir={games_dir}", f"model.path={CHECKPOINT}", "algorithm=grpo", "train.steps=2",
                 "train.sharding=fsdp", "grpo.entropy_coef=-0.03",  # a gradient from every sample
                 # the 8-GPU config's path: bf16 compute, checkpointed layers, bf16 reference
                 "model.autocast=bfloat16", "model.gradient_checkpointing=true",
                 "eval.splits=[eval_seen]", "eval.protocols=[no_skill]", "eval.max_tasks=1"]
    runs = {}
    for name in ("straight", "resumed"):
        out = tmp_path / name
        out.mkdir()
        save_config(tiny_config(games_dir, CHECKPOINT, out / "run", *overrides), out / "config.yaml")
        if name == "resumed":  # killed after step 1: only its checkpoint and the rows up to it
            shutil.copytree(tmp_path / "straight" / "run", out / "run", dirs_exist_ok=True)
            ckpts = out / "run" / "checkpoints"
            shutil.rmtree(ckpts / "step_000002")
            (ckpts / "finished").unlink()
            (ckpts / "latest").write_text("step_000001")
        _launch("_fsdp_train.py", 2, str(out), str(out / "config.yaml"), *(["resume"] if name == "resumed" else []))
        runs[name] = torch.load(out / "rank0.pt", weights_only=False)
    straight, resumed = runs["straight"], runs["resumed"]
    assert straight["sharded"] and straight["optimizer"] == "AdamW" and resumed["step"] == 2
    ckpt = tmp_path / "straight" / "run" / "checkpoints" / "step_000001"
    step1 = load_file(str(ckpt / "model" / "model.safetensors"))
    assert json.loads((ckpt / "model" / "config.json").read_text())["architectures"] == ["LlamaForCausalLM"]
    moved = max(float((straight["weights"][k] - step1[k]).abs().max()) for k in step1)
    assert moved > 1e-4, "step 2 did not move the weights: the resume is not tested"
    for k, w in straight["weights"].items():
        gap = float((resumed["weights"][k] - w).abs().max())
        assert gap < ATOL, f"{k}: resumed run vs straight run differ by {gap}"
    blob = torch.load(ckpt / "trainer.pt", weights_only=False)
    state = blob["optimizer"]["state"]
    assert set(state) <= set(step1) | {"lm_head.weight"} and len(state) == len(blob["optimizer"]["param_groups"][0]["params"])
    assert all(v["exp_avg"].shape == step1.get(k, step1.get("model.embed_tokens.weight")).shape for k, v in state.items())
    rows = [json.loads(x) for x in (tmp_path / "resumed" / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if r["kind"] == "train"] == [1, 2]


@pytest.mark.slow
def test_fsdp_with_lora_is_refused_naming_the_field(games_dir, tmp_path):
    from conftest import tiny_config

    from evolving_rl.config import save_config

    save_config(tiny_config(games_dir, CHECKPOINT, tmp_path / "run", "train.sharding=fsdp", "model.lora.enabled=true"),
                tmp_path / "config.yaml")
    err = _launch("_fsdp_train.py", 2, str(tmp_path), str(tmp_path / "config.yaml"), expect_ok=False)
    assert "train.sharding: fsdp shards a full fine-tune" in err and "set train.sharding: zero1" in err
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_reference_stored_in_the_compute_dtype_scores_exactly_as_in_float32():
    """store_in_compute_dtype (the fsdp trainer's frozen reference): under bf16 autocast its
    log-probs and entropies are bit-identical to the float32 copy's, in less memory."""
    from _ddp_update import samples

    from evolving_rl import distributed
    from evolving_rl.config import ModelConfig
    from evolving_rl.policy.hf import HFPolicy

    policy = HFPolicy(ModelConfig(path=str(CHECKPOINT), autocast="bfloat16"))
    segments = [s.segment for s in samples(policy, n=6)]
    full, half = policy.reference(), policy.reference()
    distributed.store_in_compute_dtype(half.model, torch.bfloat16)
    size = {k: sum(p.numel() * p.element_size() for p in r.model.parameters()) for k, r in (("fp32", full), ("bf16", half))}
    # the tiny model ties its output layer to the embeddings, which stay float32: the 4 layers' linears shrink
    assert size["bf16"] < 0.8 * size["fp32"]
    assert {p.dtype for p in half.model.get_input_embeddings().parameters()} == {torch.float32}
    with torch.no_grad():
        a = full.score(segments, with_entropy=True, loss_positions_only=True)
        b = half.score(segments, with_entropy=True, loss_positions_only=True)
        plain = HFPolicy(ModelConfig(path=str(CHECKPOINT))).score(segments, loss_positions_only=True)
    for (lp, h), (lp16, h16) in zip(a, b):
        assert torch.equal(lp, lp16) and torch.equal(h, h16)
    # not a vacuous comparison: bf16 compute itself moves the log-probs
    assert max(float((lp - p).abs().max()) for (lp, _), (p, _) in zip(a, plain)) > 1e-4


def test_one_forward_per_score_gives_the_same_log_probs_in_one_call():
    """Under fsdp `score` runs a micro-batch as one forward call (per-layer units all-gather in
    each call); segments sharing a prompt, which the default path runs as a shared prefix and
    length buckets in several calls, score the same."""
    from _ddp_update import samples

    from evolving_rl.config import ModelConfig
    from evolving_rl.policy.hf import HFPolicy
    from evolving_rl.types import Segment

    policy = HFPolicy(ModelConfig(path=str(CHECKPOINT)))
    base = [s.segment for s in samples(policy, n=6)]
    prompt = [5 + i % 900 for i in range(90)]  # a prompt long enough to be shared
    segments = base + [Segment(token_ids=prompt + s.token_ids, logprobs=[0.0] * (90 + len(s.token_ids)),
                               loss_mask=[0] * 90 + s.loss_mask) for s in base]
    calls = []
    policy.model.register_forward_pre_hook(lambda *_: calls.append(1))
    with torch.no_grad():
        default = policy.score(segments, with_entropy=True, loss_positions_only=True)
        several = len(calls)
        calls.clear()
        policy.one_forward_per_score = True
        one = policy.score(segments, with_entropy=True, loss_positions_only=True)
    assert several > 1 and len(calls) == 1
    for (lp, h), (lp1, h1) in zip(default, one):
        assert float((lp - lp1).abs().max()) < 1e-5 and float((h - h1).abs().max()) < 1e-4
