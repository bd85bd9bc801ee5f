"""GPU check: one GRPO training step and batched generation on a CUDA device, with our own code.

Run from the checkout on a machine with CUDA (no install needed, no env engines, no Java):

    python benchmarks/gpu_check.py [--layers 16 --hidden 1024] [--out gpu_check.json]

What it checks, and prints as numbers:
* generation with HFPolicy (our decode loop) on the shipped tiny checkpoint: tokens/s, and
  that the sampled log-probs equal `score()` on the same ids (fp32 weights; with bf16
  autocast the agreement is only bf16-deep, reported as well);
* one GRPOUpdater step (fp32 master weights, bf16 autocast forward) on a wider random Llama
  built here from a config (no hub), inputs built here: step time, trained tokens/s, peak
  memory, and that the weights stayed float32 and moved;
* if `vllm` imports: VLLMPolicy on the tiny checkpoint, tokens/s and its log-prob gap to
  `score()` (the GPU machine lent to this project has no vLLM; then it says so and skips).

Needs torch with CUDA, transformers, pydantic and PyYAML (evolving_rl's config types).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # run from a plain checkout: the package need not be installed

CHECKPOINT = ROOT / "checkpoints" / "tiny-alfworld-sft"


def _require() -> None:
    missing = []
    for mod, pip_name in (("torch", "torch"), ("transformers", "transformers"), ("pydantic", "pydantic"),
                          ("yaml", "PyYAML")):
        try:
            __import__(mod)
        except ImportError:
            missing.append(pip_name)
    if missing:
        sys.exit(f"gpu_check: missing {', '.join(missing)}: pip install {' '.join(missing)}")


def _prompts(policy, n: int, rng: random.Random) -> list[list[int]]:
    rooms = ["cabinet", "drawer", "countertop", "fridge", "microwave", "sinkbasin", "shelf", "desk"]
    objs = ["mug", "apple", "egg", "book", "knife", "plate", "potato", "cd"]
    out = []
    for _ in range(n):
        seen = ", ".join(f"a {rng.choice(rooms)} {rng.randint(1, 9)}" for _ in range(rng.randint(6, 14)))
        task = f"put a {rng.choice(objs)} in {rng.choice(rooms)}"
        out.append(policy.encode_chat([
            {"role": "system", "content": "You are a household agent acting in a text world."},
            {"role": "user", "content": f"Your task is to: {task}. You are in the middle of a room. "
                                        f"Looking quickly around you, you see {seen}."},
        ]))
    return out


DEVICE = "cuda"


def _sync(torch) -> None:
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def generation_check(torch, batch: int, new_tokens: int) -> dict:
    from evolving_rl.config import ModelConfig
    from evolving_rl.policy.hf import HFPolicy
    from evolving_rl.types import Segment

    out: dict = {}
    rng = random.Random(0)
    for autocast in ("none", "bfloat16"):
        policy = HFPolicy(ModelConfig(path=str(CHECKPOINT), autocast=autocast), device=DEVICE)
        prompts = _prompts(policy, batch, rng)
        policy.generate(prompts[:4], temperature=1.0, top_p=0.9, max_new_tokens=8, seed=0)  # warm-up
        # Timed twice, the same call: the first run of new shapes/dtypes pays lazy CUDA module
        # loading and GEMM heuristics (the H200 run timed bf16 once: 20x slower than fp32).
        times = []
        for _ in range(2):
            _sync(torch)
            t0 = time.perf_counter()
            gens = policy.generate(prompts, temperature=1.0, top_p=0.9, max_new_tokens=new_tokens, seed=1)
            _sync(torch)
            times.append(time.perf_counter() - t0)
        dt = min(times)
        tokens = sum(len(g.token_ids) for g in gens)
        segs = [Segment(token_ids=p + g.token_ids, logprobs=[0.0] * len(p) + g.logprobs,
                        loss_mask=[0] * len(p) + [1] * len(g.token_ids)) for p, g in zip(prompts, gens)]
        with torch.no_grad():
            scored = policy.score(segs)
        gap = max(float((lp[len(p):].cpu() - torch.tensor(g.logprobs)).abs().max())
                  for (lp, _), p, g in zip(scored, prompts, gens))
        out[f"hf_generate_{autocast}"] = {"batch": batch, "tokens": tokens, "seconds": [round(t, 3) for t in times],
                                          "tokens_per_s": round(tokens / dt, 1), "max_logprob_gap_vs_score": gap}
        del policy
        if DEVICE == "cuda":
            torch.cuda.empty_cache()
    return out


def train_step_check(torch, layers: int, hidden: int, batch: int, seq: int) -> dict:
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from evolving_rl.algorithms.grpo import GRPOUpdater
    from evolving_rl.config import GRPOConfig, ModelConfig
    from evolving_rl.policy.hf import HFPolicy
    from evolving_rl.types import Sample, Segment

    tok = AutoTokenizer.from_pretrained(CHECKPOINT)
    with tempfile.TemporaryDirectory() as tmp:
        cfg = LlamaConfig(vocab_size=len(tok), hidden_size=hidden, intermediate_size=hidden * 3,
                          num_hidden_layers=layers, num_attention_heads=max(1, hidden // 64),
                          num_key_value_heads=max(1, hidden // 256), max_position_embeddings=4096,
                          eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, tie_word_embeddings=True)
        torch.manual_seed(0)
        LlamaForCausalLM(cfg).save_pretrained(tmp)
        tok.save_pretrained(tmp)
        policy = HFPolicy(ModelConfig(path=tmp, dtype="float32", autocast="bfloat16"), device=DEVICE)
    params = sum(p.numel() for p in policy.parameters())
    ref = policy.reference()
    grpo = GRPOConfig(lr=1e-6, micro_batch_tokens=16384)
    updater = GRPOUpdater(policy, ref, grpo)
    rng = random.Random(1)
    samples = []
    for i in range(batch):
        prompt = [rng.randrange(2, len(tok)) for _ in range(seq // 2)]
        gen = [rng.randrange(2, len(tok)) for _ in range(seq // 2)]
        seg = Segment(token_ids=prompt + gen, logprobs=[0.0] * len(prompt) + [-5.0] * len(gen),
                      loss_mask=[0] * len(prompt) + [1] * len(gen))
        samples.append(Sample(segment=seg, role="solver", group=f"g{i // 4}", reward=float(i % 2)))  # mixed rewards in every group: non-zero advantages
    # old log-probs as sampled: the current weights' own, so the ratio starts at 1
    with torch.no_grad():
        for s in samples:
            lp, _ = policy.score([s.segment])[0]
            s.segment.logprobs = [v if m else 0.0 for v, m in zip(lp.float().cpu().tolist(), s.segment.loss_mask)]
    before = [p.detach().clone() for p in policy.parameters()]
    if DEVICE == "cuda":
        torch.cuda.reset_peak_memory_stats()
    _sync(torch)
    t0 = time.perf_counter()
    metrics = updater.update(samples)
    _sync(torch)
    first = time.perf_counter() - t0
    moved = sum(int((p.detach() != b).any()) for p, b in zip(policy.parameters(), before)) / len(before)
    # a second step on the same samples: the first also allocates Adam's state and loads kernels
    t0 = time.perf_counter()
    updater.update(samples)
    _sync(torch)
    dt = time.perf_counter() - t0
    return {
        "train_step": {
            "params_millions": round(params / 1e6, 1), "samples": batch, "tokens_per_sample": seq,
            "seconds": [round(first, 3), round(dt, 3)], "trained_tokens_per_s": round(batch * seq / dt, 1),
            "peak_memory_gb": round(torch.cuda.max_memory_allocated() / 2**30, 2) if DEVICE == "cuda" else None,
            "weights_float32": all(p.dtype == torch.float32 for p in policy.parameters()),
            "share_of_weight_tensors_changed": round(moved, 3),
            "optimizer_stepped": metrics.get("loss/optimizer_stepped", metrics.get("optimizer_stepped")),
        }
    }


def vllm_check(torch, batch: int, new_tokens: int) -> dict:
    try:
        import vllm  # noqa: F401
    except ImportError:
        return {"vllm": "not installed here: skipped (the VLLMPolicy tests run on CPU in .venv-vllm)"}
    from evolving_rl.config import ModelConfig
    from evolving_rl.policy.vllm_policy import VLLMPolicy
    from evolving_rl.types import Segment

    t0 = time.perf_counter()
    policy = VLLMPolicy(ModelConfig(path=str(CHECKPOINT)), device=DEVICE,
                        engine_kwargs={"gpu_memory_utilization": 0.3})
    startup = time.perf_counter() - t0
    prompts = _prompts(policy, batch, random.Random(2))
    policy.generate(prompts[:4], temperature=1.0, top_p=0.9, max_new_tokens=8, seed=0)
    t0 = time.perf_counter()
    gens = policy.generate(prompts, temperature=1.0, top_p=0.9, max_new_tokens=new_tokens, seed=1)
    dt = time.perf_counter() - t0
    tokens = sum(len(g.token_ids) for g in gens)
    segs = [Segment(token_ids=p + g.token_ids, logprobs=[0.0] * len(p) + g.logprobs,
                    loss_mask=[0] * len(p) + [1] * len(g.token_ids)) for p, g in zip(prompts, gens)]
    with torch.no_grad():
        scored = policy.score(segs)
    gap = max(float((lp[len(p):].cpu() - torch.tensor(g.logprobs)).abs().max()) for (lp, _), p, g in zip(scored, prompts, gens))
    return {"vllm_generate": {"startup_s": round(startup, 1), "batch": batch, "tokens": tokens,
                              "tokens_per_s": round(tokens / dt, 1), "max_logprob_gap_vs_score": gap}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=64, help="prompts per generation call")
    ap.add_argument("--new-tokens", type=int, default=48)
    ap.add_argument("--layers", type=int, default=16, help="the training-step model (random init)")
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--train-samples", type=int, default=32)
    ap.add_argument("--train-seq", type=int, default=1024)
    ap.add_argument("--out", default="", help="also write the numbers as JSON here")
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"], help="cpu: a smoke run of this script")
    args = ap.parse_args()
    _require()
    import torch
    import transformers

    global DEVICE
    DEVICE = args.device
    if DEVICE == "cuda" and not torch.cuda.is_available():
        sys.exit("gpu_check: no CUDA device visible (torch.cuda.is_available() is False)")
    name = torch.cuda.get_device_name(0) if DEVICE == "cuda" else "cpu"
    results = {"device": name, "torch": torch.__version__,
               "transformers": transformers.__version__, "python": sys.version.split()[0]}
    results.update(generation_check(torch, args.batch, args.new_tokens))
    results.update(train_step_check(torch, args.layers, args.hidden, args.train_samples, args.train_seq))
    results.update(vllm_check(torch, args.batch, args.new_tokens))
    text = json.dumps(results, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    ok = (results["hf_generate_none"]["max_logprob_gap_vs_score"] < 1e-3 and results["train_step"]["weights_float32"]
          and results["train_step"]["share_of_weight_tensors_changed"] > 0.9)
    print("gpu_check:", "OK" if ok else "FAILED (see the numbers above)")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
