"""The Hugging Face policy backend on a real (tiny, from-scratch) Llama model.

The central property: the log-probs returned at sampling time equal those a fresh forward
pass computes for the same ids, with and without constrained decoding (SPEC, Update).
"""

from __future__ import annotations

import os
import random

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from transformers.utils import logging as hf_logging  # noqa: E402

from evolving_rl.config import LoraConfig, ModelConfig, TinyModelConfig  # noqa: E402
from evolving_rl.policy.base import Policy  # noqa: E402
from evolving_rl.policy.hf import HFPolicy  # noqa: E402
from evolving_rl.policy.tiny import build_tiny  # noqa: E402
from evolving_rl.types import Segment  # noqa: E402

hf_logging.disable_progress_bar()
hf_logging.set_verbosity_error()

TINY = TinyModelConfig(vocab_size=400, hidden_size=64, num_layers=2, num_heads=4, intermediate_size=128, seed=0)
ACTIONS = ["go to cabinet 1", "go to cabinet 10", "go to countertop 2", "take apple 1 from countertop 2",
           "open fridge 1", "look"]


def alfworld_corpus(n: int = 120) -> list[str]:
    rng = random.Random(0)
    recs = ["cabinet", "countertop", "fridge", "microwave", "sinkbasin", "drawer", "shelf"]
    objs = ["apple", "mug", "knife", "plate", "egg", "potato"]
    out = []
    for _ in range(n):
        r = [f"{x} {rng.randint(1, 12)}" for x in rng.sample(recs, 4)]
        o = f"{rng.choice(objs)} {rng.randint(1, 3)}"
        out += [
            f"You are in the middle of a room. Looking quickly around you, you see a {', a '.join(r)}.",
            f"Your task is to: put a clean {o.split()[0]} in {r[0]}.",
            f"You arrive at {r[1]}. On the {r[1]}, you see a {o}.",
            "\n".join([f"go to {x}" for x in r] + [f"take {o} from {r[1]}"]),
            f"<action>go to {r[2]}</action>",
        ]
    return out


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return build_tiny(alfworld_corpus(), TINY, tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The model is tiny: on a shared 2-core machine, OpenMP threads spin-waiting for each
    other made a 16-token decode 150x slower than one thread (measured)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def policy(model_dir):
    return HFPolicy(ModelConfig(path=str(model_dir)))


def prompts_of(policy: HFPolicy, lengths=(1, 4, 2)) -> list[list[int]]:
    """Chat prompts of clearly different lengths, so the batch is left-padded."""
    task = "Your task is to: put a clean apple in cabinet 1. "
    return [policy.encode_chat([{"role": "system", "content": "You are a household agent."},
                                {"role": "user", "content": task * k}]) for k in lengths]


def segments(prompts, gens, allowed=None) -> list[Segment]:
    allowed = allowed or [None] * len(prompts)
    return [
        Segment(p + g.token_ids, [0.0] * len(p) + g.logprobs, [0] * len(p) + [1] * len(g.token_ids), allowed=a)
        for p, g, a in zip(prompts, gens, allowed)
    ]


def assert_scores_match(policy: HFPolicy, segs: list[Segment], tol: float = 1e-4) -> None:
    with torch.no_grad():
        res = policy.score(segs, with_entropy=True)
    for s, (lp, ent) in zip(segs, res):
        assert lp.shape == (len(s.token_ids),) and float(lp[0]) == 0.0
        m = torch.tensor(s.loss_mask, dtype=torch.bool)
        assert torch.allclose(lp[m], torch.tensor(s.logprobs)[m], atol=tol, rtol=0), (lp[m], s.logprobs)
        assert bool((ent[m] >= -1e-6).all())


def action_ids(policy: HFPolicy, actions=ACTIONS) -> list[list[int]]:
    return [policy.encode_text(a + "</action>") for a in actions]


# ---- tiny model + chat template -------------------------------------------------------------


def test_tiny_model_directory_loads_like_any_model(model_dir, policy):
    assert isinstance(policy, Policy)
    assert (model_dir / "config.json").is_file() and (model_dir / "tokenizer.json").is_file()
    assert policy.model.config.model_type == "llama"
    assert policy.vocab_size == len(policy.tokenizer) <= TINY.vocab_size
    assert policy.model.config.tie_word_embeddings
    assert policy.tokenizer.decode([policy.eos_token_id]) == "<|end|>"
    assert policy.pad_token_id != policy.eos_token_id


def test_build_tiny_is_deterministic_for_a_seed(tmp_path, model_dir):
    again = build_tiny(alfworld_corpus(), TINY, tmp_path / "again")
    assert (again / "tokenizer.json").read_text() == (model_dir / "tokenizer.json").read_text()
    a = HFPolicy(ModelConfig(path=str(again))).model.state_dict()
    b = HFPolicy(ModelConfig(path=str(model_dir))).model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    other = HFPolicy(ModelConfig(path=str(build_tiny(alfworld_corpus(), TINY.model_copy(update={"seed": 1}),
                                                      tmp_path / "other")))).model.state_dict()
    assert not torch.equal(other["model.layers.0.self_attn.q_proj.weight"], a["model.layers.0.self_attn.q_proj.weight"])


def test_build_tiny_rejects_bad_shapes(tmp_path):
    with pytest.raises(ValueError, match="num_heads"):
        build_tiny(["go to cabinet 1"], TINY.model_copy(update={"num_heads": 3}), tmp_path)
    with pytest.raises(ValueError, match="empty"):
        build_tiny([], TINY, tmp_path)


def test_chat_template_round_trip(policy):
    msgs = [{"role": "system", "content": "You are a household agent."},
            {"role": "user", "content": "Your task is to: put a clean mug in cabinet 10.\n> go to sinkbasin 1"},
            {"role": "assistant", "content": "<action>go to cabinet 10</action>"}]
    ids = policy.encode_chat(msgs, add_generation_prompt=True)
    text = policy.tokenizer.decode(ids, skip_special_tokens=False)
    assert text == policy.tokenizer.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
    assert text == ("<|system|>\nYou are a household agent.<|end|>\n"
                    "<|user|>\nYour task is to: put a clean mug in cabinet 10.\n> go to sinkbasin 1<|end|>\n"
                    "<|assistant|>\n<action>go to cabinet 10</action><|end|>\n<|assistant|>\n")
    no_gen = policy.encode_chat(msgs, add_generation_prompt=False)
    assert ids[: len(no_gen)] == no_gen
    assert policy.tokenizer.decode(ids[len(no_gen):], skip_special_tokens=False) == "<|assistant|>\n"
    assert policy.decode(ids) == text.replace("<|system|>", "").replace("<|user|>", "").replace(
        "<|assistant|>", "").replace("<|end|>", "")
    for s in ["take apple 1 from countertop 2", "naïve café ☕ — 42"]:
        assert policy.decode(policy.encode_text(s)) == s
    with pytest.raises(Exception, match="unknown chat role"):
        policy.encode_chat([{"role": "tool", "content": "x"}])


# ---- log-prob agreement ---------------------------------------------------------------------


@pytest.mark.parametrize("temperature,top_p", [(1.0, 0.9), (0.7, 1.0), (0.0, 1.0)])
def test_sampling_logprobs_equal_recomputed_logprobs(policy, temperature, top_p):
    prompts = prompts_of(policy)
    assert len({len(p) for p in prompts}) == 3
    gens = policy.generate(prompts, temperature=temperature, top_p=top_p, max_new_tokens=24, seed=3)
    assert all(len(g.token_ids) == len(g.logprobs) > 0 for g in gens)
    assert_scores_match(policy, segments(prompts, gens))


def test_constrained_logprobs_equal_recomputed_logprobs(policy):
    prompts = prompts_of(policy, (3, 1, 2, 1))
    acts = action_ids(policy)
    allowed = [acts, None, acts[:3], acts[3:]]
    gens = policy.generate(prompts, temperature=1.0, top_p=0.9, max_new_tokens=30, allowed=allowed, seed=5)
    assert_scores_match(policy, segments(prompts, gens, allowed))
    # the mask matters: without it the same ids score lower (the mass of other tokens is back)
    with torch.no_grad():
        plain = policy.score(segments(prompts, gens))
        constrained = policy.score(segments(prompts, gens, allowed))
    assert float(constrained[0][0].sum()) > float(plain[0][0].sum())


def test_constrained_sequence_probabilities_sum_to_one(policy):
    prompt = prompts_of(policy, (1,))[0]
    acts = action_ids(policy)
    segs = [Segment(prompt + a, [0.0] * (len(prompt) + len(a)), [0] * len(prompt) + [1] * len(a), allowed=acts)
            for a in acts]
    with torch.no_grad():
        total = sum(float((lp * torch.tensor(s.loss_mask)).sum().exp()) for (lp, _), s in zip(policy.score(segs), segs))
    assert total == pytest.approx(1.0, abs=1e-4)


def test_greedy_is_deterministic_and_argmax(policy):
    prompts = prompts_of(policy)
    a = policy.generate(prompts, temperature=0, top_p=1.0, max_new_tokens=12)
    b = policy.generate(prompts, temperature=0, top_p=1.0, max_new_tokens=12, seed=99)
    assert [g.token_ids for g in a] == [g.token_ids for g in b]
    with torch.no_grad():
        for p, g in zip(prompts, a):
            logits = policy.model(input_ids=torch.tensor([p + g.token_ids])).logits[0]
            steps = logits[len(p) - 1 : len(p) - 1 + len(g.token_ids)]
            assert steps.argmax(-1).tolist() == g.token_ids
            best = torch.log_softmax(steps, -1).max(-1).values
            assert torch.allclose(best, torch.tensor(g.logprobs), atol=1e-4)


def test_seeded_sampling_is_reproducible(policy):
    prompts = prompts_of(policy)
    kw = dict(temperature=1.0, top_p=0.95, max_new_tokens=16)
    a = policy.generate(prompts, seed=11, **kw)
    b = policy.generate(prompts, seed=11, **kw)
    c = policy.generate(prompts, seed=12, **kw)
    assert [(g.token_ids, g.logprobs) for g in a] == [(g.token_ids, g.logprobs) for g in b]
    assert [g.token_ids for g in a] != [g.token_ids for g in c]


# ---- stopping -------------------------------------------------------------------------------


def test_stop_string_stops_and_is_included(policy):
    prompts = prompts_of(policy, (1, 2))
    # Row 0 is forced through text that contains "</action>" before its allowed sequence ends.
    forced = policy.encode_text("go to cabinet 1</action> and then some more words")
    gens = policy.generate(prompts, temperature=1.0, top_p=1.0, max_new_tokens=40, stop=["</action>"],
                           allowed=[[forced], None], seed=0)
    g = gens[0]
    assert g.finish_reason == "stop" and g.text.endswith("</action>")
    assert g.token_ids == forced[: len(g.token_ids)] and len(g.token_ids) < len(forced)
    assert "</action>" not in policy.decode(g.token_ids[:-1])


def test_stop_string_on_free_sampling_matches_first_occurrence(policy):
    """Sample freely, pick a stop string from the output, and re-sample with the same seed:
    the row stops exactly at the first token whose text completes it; other rows are untouched."""
    prompts = prompts_of(policy, (2, 1, 3))
    kw = dict(temperature=1.0, top_p=1.0, max_new_tokens=30, seed=7)
    free = policy.generate(prompts, **kw)
    ids = free[0].token_ids
    texts = [policy.tokenizer.decode(ids[:j], skip_special_tokens=False) for j in range(len(ids) + 1)]
    stop = texts[12][-2:]
    expected = next(j for j in range(1, len(ids) + 1) if stop in texts[j])
    stopped = policy.generate(prompts, stop=[stop], **kw)
    assert stopped[0].finish_reason == "stop"
    assert stopped[0].token_ids == ids[:expected]
    for f, s in zip(free[1:], stopped[1:]):
        if s.finish_reason != "stop":
            # same ids; log-probs equal up to float noise (the batch shrank when row 0 stopped)
            assert s.token_ids == f.token_ids and s.logprobs == pytest.approx(f.logprobs, abs=1e-5)


def test_eos_and_length_finish_reasons(policy):
    prompts = prompts_of(policy, (1, 1))
    eos_seq = policy.encode_text("look") + [policy.eos_token_id]
    long_seq = policy.encode_text("take apple 1 from countertop 2</action>")
    assert len(long_seq) > len(eos_seq)
    gens = policy.generate(prompts, temperature=1.0, top_p=1.0, max_new_tokens=len(eos_seq),
                           allowed=[[eos_seq + policy.encode_text(" x")], [long_seq]], seed=0)
    assert gens[0].finish_reason == "eos" and gens[0].token_ids == eos_seq and gens[0].text == "look"
    assert gens[1].finish_reason == "length" and gens[1].token_ids == long_seq[: len(eos_seq)]


# ---- constrained decoding -------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(6))
def test_allowed_only_produces_allowed_sequences(policy, seed):
    rng = random.Random(seed)
    prompts = prompts_of(policy, (1, 2, 3, 1, 2))
    acts = action_ids(policy)
    allowed = [rng.sample(acts, rng.randint(1, len(acts))) for _ in prompts]
    gens = policy.generate(prompts, temperature=rng.choice([0.0, 0.5, 1.0, 2.0]), top_p=rng.choice([0.3, 1.0]),
                           max_new_tokens=40, stop=["</action>"], allowed=allowed, seed=seed)
    for g, a in zip(gens, allowed):
        assert g.token_ids in a and g.finish_reason == "stop"
        assert g.text.endswith("</action>") and all(lp <= 1e-6 for lp in g.logprobs)


def test_score_rejects_ids_outside_the_trie(policy):
    prompt = prompts_of(policy, (1,))[0]
    bad = policy.encode_text("go to fridge 9</action>")
    seg = Segment(prompt + bad, [0.0] * (len(prompt) + len(bad)), [0] * len(prompt) + [1] * len(bad),
                  allowed=action_ids(policy))
    with pytest.raises(ValueError, match="segment 0.*not allowed"):
        policy.score([seg])


def test_bad_inputs_get_clear_errors(policy, tmp_path):
    with pytest.raises(ValueError, match="prompt 1.*outside the vocabulary"):
        policy.generate([[5], [policy.vocab_size + 3]], temperature=1, top_p=1, max_new_tokens=2)
    with pytest.raises(ValueError, match="allowed\\[0\\].*empty"):
        policy.generate([[5]], temperature=1, top_p=1, max_new_tokens=2, allowed=[[]])
    with pytest.raises(FileNotFoundError, match="model.path"):
        HFPolicy(ModelConfig(path=str(tmp_path / "nowhere")))


# ---- scoring --------------------------------------------------------------------------------


def test_score_chunking_and_loss_positions_agree_and_are_differentiable(policy):
    prompts = prompts_of(policy, (3, 1, 2, 4, 1))
    gens = policy.generate(prompts, temperature=1.0, top_p=1.0, max_new_tokens=10, seed=1)
    segs = segments(prompts, gens)
    whole = policy.score(segs, with_entropy=True, max_tokens_per_chunk=100_000)
    small = policy.score(segs, with_entropy=True, max_tokens_per_chunk=64)
    only = policy.score(segs, with_entropy=True, loss_positions_only=True)
    for s, (a, ea), (b, eb), (c, ec) in zip(segs, whole, small, only):
        m = torch.tensor(s.loss_mask, dtype=torch.bool)
        assert torch.allclose(a, b, atol=1e-5) and torch.allclose(ea, eb, atol=1e-5)
        assert torch.allclose(a[m], c[m], atol=1e-5) and torch.allclose(ea[m], ec[m], atol=1e-5)
        assert float(c[~m].detach().abs().sum()) == 0.0
    loss = -sum((lp * torch.tensor(s.loss_mask)).sum() for (lp, _), s in zip(only, segs))
    loss.backward()
    grads = [p.grad for p in policy.model.parameters() if p.grad is not None]
    assert grads and any(float(g.abs().sum()) > 0 for g in grads)
    policy.model.zero_grad(set_to_none=True)


# ---- training paths -------------------------------------------------------------------------


def nll(policy: HFPolicy, seg: Segment) -> torch.Tensor:
    lp, _ = policy.score([seg])[0]
    return -(lp * torch.tensor(seg.loss_mask)).sum() / seg.num_generated


def demo_segment(policy: HFPolicy) -> Segment:
    prompt = prompts_of(policy, (1,))[0]
    comp = policy.encode_text("<action>go to cabinet 1</action>") + [policy.eos_token_id]
    return Segment(prompt + comp, [0.0] * (len(prompt) + len(comp)), [0] * len(prompt) + [1] * len(comp))


def test_lora_trains_only_adapters_and_saves_a_plain_model(model_dir, tmp_path):
    cfg = ModelConfig(path=str(model_dir), lora=LoraConfig(enabled=True, r=4, alpha=8,
                                                           target_modules=["q_proj", "v_proj", "up_proj", "down_proj"]))
    torch.manual_seed(0)  # peft draws lora_A at random
    policy = HFPolicy(cfg)
    plain = HFPolicy(ModelConfig(path=str(model_dir)))
    seg = demo_segment(policy)
    before = {k: v.detach().clone() for k, v in policy.model.named_parameters()}
    trainable = [p for p in policy.model.parameters() if p.requires_grad]
    assert trainable and all("lora_" in k for k, p in policy.model.named_parameters() if p.requires_grad)
    opt = torch.optim.Adam(trainable, lr=2e-2)
    losses = []
    for _ in range(10):
        loss = nll(policy, seg)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.5, losses
    changed = {k for k, v in policy.model.named_parameters() if not torch.equal(v.detach(), before[k])}
    assert changed and all("lora_" in k for k in changed)

    with torch.no_grad():
        ref = policy.reference()
        assert torch.allclose(nll(ref, seg), nll(plain, seg), atol=1e-5)  # adapters off = the base model
        assert float(nll(policy, seg)) < float(nll(ref, seg)) - 0.5  # and the trained view is unchanged
        saved = HFPolicy(ModelConfig(path=str(policy.save(tmp_path / "merged"))))
        assert not any("lora" in k for k in saved.model.state_dict())
        assert torch.allclose(nll(saved, seg), nll(policy, seg), atol=1e-4)


def test_full_finetune_reference_is_frozen(model_dir):
    policy = HFPolicy(ModelConfig(path=str(model_dir)))
    ref = policy.reference()
    seg = demo_segment(policy)
    with torch.no_grad():
        start = float(nll(ref, seg))
    opt = torch.optim.Adam(policy.model.parameters(), lr=1e-2)
    for _ in range(3):
        opt.zero_grad()
        nll(policy, seg).backward()
        opt.step()
    assert not any(p.requires_grad for p in ref.model.parameters())
    with torch.no_grad():
        assert float(nll(ref, seg)) == pytest.approx(start, abs=1e-6)
        assert float(nll(policy, seg)) < start - 0.5


def test_gradient_checkpointing_gives_the_same_gradients(model_dir):
    seg = None
    grads = []
    for gc in (False, True):
        policy = HFPolicy(ModelConfig(path=str(model_dir), gradient_checkpointing=gc))
        seg = seg or demo_segment(policy)
        nll(policy, seg).backward()
        grads.append(policy.model.model.layers[0].self_attn.q_proj.weight.grad.clone())
        assert not policy.model.training
    assert torch.allclose(grads[0], grads[1], atol=1e-6)


# ---- mixed precision (issue 15, defect 1) ---------------------------------------------------


def _changed_share(params, before) -> float:
    changed = sum(int((p.detach() != b).sum()) for p, b in zip(params, before))
    return changed / sum(b.numel() for b in before)


def test_bf16_weights_are_refused_and_fp32_master_weights_learn_at_lr_1e_6(model_dir):
    """An AdamW step of ~1e-6 is below half a bf16 ulp of most weights: stepped directly, bf16
    weights barely move (the issue measured 1.9% changed after 3 steps on the 7B config)."""
    from evolving_rl.algorithms.grpo import GRPOUpdater
    from evolving_rl.config import GRPOConfig
    from evolving_rl.types import Sample

    cfg = GRPOConfig(lr=1e-6, kl_coef=0.0, max_grad_norm=1e9)
    bf16 = HFPolicy(ModelConfig(path=str(model_dir), dtype="bfloat16"))
    with pytest.raises(ValueError, match=r"model\.dtype.*model\.autocast: bfloat16.*model\.lora\.enabled"):
        GRPOUpdater(bf16, None, cfg)

    mixed = HFPolicy(ModelConfig(path=str(model_dir), autocast="bfloat16"))
    assert mixed.autocast_dtype == torch.bfloat16
    assert all(p.dtype == torch.float32 for p in mixed.parameters())  # the master weights
    prompts = prompts_of(mixed, (1, 2, 3, 1))
    gens = mixed.generate(prompts, temperature=1.0, top_p=1.0, max_new_tokens=8, seed=0)
    samples = [Sample(seg, "solver", "g", float(i % 2)) for i, seg in enumerate(segments(prompts, gens))]

    def share_changed(policy, step) -> float:
        params = list(policy.parameters())
        before = [p.detach().clone() for p in params]
        for _ in range(3):
            step()
        return _changed_share(params, before)

    up = GRPOUpdater(mixed, None, cfg)
    fp32_share = share_changed(mixed, lambda: up.update(samples))

    # What the refusal prevents: the same loss, AdamW straight on the bf16 weights.
    opt = torch.optim.AdamW(list(bf16.parameters()), lr=1e-6)

    def bf16_step():
        opt.zero_grad()
        scored = bf16.score([s.segment for s in samples])
        loss = -sum((lp * torch.tensor(s.segment.loss_mask)).sum() * (s.reward - 0.5) for s, (lp, _) in zip(samples, scored))
        loss.backward()
        opt.step()

    bf16_share = share_changed(bf16, bf16_step)
    print(f"weights changed after 3 steps at lr 1e-6: fp32 master + bf16 autocast {fp32_share:.2%}, bf16 {bf16_share:.2%}")
    assert fp32_share > 0.9 and bf16_share < 0.1


def test_declared_transformers_range_is_the_tested_one():
    """Issue 15, defect 8: `transformers>=4.56` admitted 4.x, where `score`'s 2-D logits_to_keep crashes."""
    import tomllib
    from pathlib import Path

    import transformers
    from packaging.requirements import Requirement

    pyproject = Path(__file__).resolve().parent.parent / "pyproject.toml"
    deps = [Requirement(d) for d in tomllib.loads(pyproject.read_text())["project"]["dependencies"]]
    (req,) = [r for r in deps if r.name == "transformers"]
    assert req.specifier.contains(transformers.__version__), (str(req), transformers.__version__)
    assert not req.specifier.contains("4.57.0") and not req.specifier.contains("6.0.0")
