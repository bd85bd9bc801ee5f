"""GRPO checked against numbers worked out by hand, and the updater on a real (tiny, random)
Llama from `transformers`: micro-batching, role weights, frozen roles, one learning step."""

from __future__ import annotations

import copy
import math
import os

import pytest
import torch

from evolving_rl.algorithms.grpo import GRPOUpdater, group_advantages, micro_batches, policy_loss, sample_weights
from evolving_rl.config import GRPOConfig, RoleConfig
from evolving_rl.types import Sample, Segment

os.environ.setdefault("HF_HUB_OFFLINE", "1")

EPS = 1e-6


def sample(group: str, reward: float, role: str = "solver", episode: str | None = None) -> Sample:
    s = Sample(segment=Segment([1, 2], [0.0, -1.0], [0, 1]), role=role, group=group, reward=reward)
    if episode is not None:
        s.episode = episode  # per-step format: the turns of one episode
    return s


# --------------------------------------------------------------------------------------
# group_advantages
# --------------------------------------------------------------------------------------


def test_group_advantages_hand_computed():
    g1 = [sample("g1", r) for r in (1.0, 0.0, 0.0, 1.0)]  # mean 0.5, population std 0.5
    g2 = [sample("g2", 1.0) for _ in range(3)]  # all equal
    g3 = [sample("g3", 0.7)]  # a group of one
    g4 = [sample("g4", r) for r in (0.0, 0.25, 1.0)]
    out, stats = group_advantages(g1 + g2 + g3 + g4, EPS, drop_zero_groups=False)

    assert out == g1 + g2 + g3 + g4  # kept, order preserved
    a = 0.5 / (0.5 + EPS)  # (1 - 0.5) / (0.5 + eps)
    assert [s.advantage for s in g1] == pytest.approx([a, -a, -a, a])
    assert all(s.advantage == 0.0 for s in g2 + g3)  # exactly zero, not a rounding residue
    # g4 by hand: mean 1.25/3; population variance = sum of squared deviations / 3 (not / 2).
    mean = 1.25 / 3
    std = math.sqrt(((0 - mean) ** 2 + (0.25 - mean) ** 2 + (1 - mean) ** 2) / 3)
    assert std == pytest.approx(0.4249183, abs=1e-6)
    assert [s.advantage for s in g4] == pytest.approx([(r - mean) / (std + EPS) for r in (0.0, 0.25, 1.0)])
    assert stats["zero_adv_group_share"] == 0.5
    assert stats["num_groups"] == 4
    assert stats["dropped_samples"] == 0


def test_group_advantages_drop_mode_and_equal_floats():
    g1 = [sample("g1", r) for r in (1.0, 0.0)]
    g2 = [sample("g2", 0.1) for _ in range(3)]  # 0.1 * 3 / 3 != 0.1 in floats: must still be exactly 0
    g3 = [sample("g3", 0.0)]
    out, stats = group_advantages(g1 + g2 + g3, EPS, drop_zero_groups=True)
    assert out == g1
    assert stats["dropped_samples"] == 4
    assert stats["zero_adv_group_share"] == pytest.approx(2 / 3)
    assert all(s.advantage == 0.0 for s in g2)


def test_group_statistics_count_each_episode_once():
    # Per-step format: episode e1 (won) gave 3 turn samples, e2 (lost) gave 1.
    turns = [sample("task", 1.0, episode="e1") for _ in range(3)] + [sample("task", 0.0, episode="e2")]
    group_advantages(turns, EPS)
    # Over episodes: mean 0.5, std 0.5 -> +-1. Over samples it would be mean 0.75 (wrong).
    assert [s.advantage for s in turns] == pytest.approx([1.0] * 3 + [-1.0], abs=1e-5)

    bad = [sample("task", 1.0, episode="e1"), sample("task", 0.0, episode="e1")]
    with pytest.raises(ValueError, match="episode 'e1'"):
        group_advantages(bad, EPS)


# --------------------------------------------------------------------------------------
# policy_loss on hand-made tensors
# --------------------------------------------------------------------------------------


def one_token(logp: float, old: float, adv: float, clip_low=0.1, clip_high=0.15, **kw):
    lp = torch.tensor([[0.0, logp]], requires_grad=True)
    loss, m = policy_loss(
        lp, torch.tensor([[0.0, old]]), None, torch.tensor([[0, 1]]), torch.tensor([adv]), clip_low, clip_high, 0.0, **kw
    )
    loss.backward()
    return loss.item(), m, lp.grad[0, 1].item()


def test_unclipped_two_tokens():
    lp = torch.tensor([[0.0, -1.0, -2.0]], requires_grad=True)
    old = torch.tensor([[0.0, -1.05, -1.95]])
    loss, m = policy_loss(lp, old, None, torch.tensor([[0, 1, 1]]), torch.tensor([2.0]), 0.1, 0.15, 0.0)
    # ratios e^0.05 = 1.051271 and e^-0.05 = 0.951229, both inside (0.9, 1.15): loss = -2 * mean(ratios).
    assert loss.item() == pytest.approx(-2 * (1.051271 + 0.951229) / 2, abs=1e-5)
    assert m["clip_frac"] == 0.0
    # approx KL (k3 vs old): mean of (r - 1 - log r) = (0.001271 + 0.001229) / 2
    assert m["approx_kl"] == pytest.approx((0.0012711 + 0.0012294) / 2, abs=1e-6)


def test_ratio_above_high_clip_with_positive_advantage_is_clipped():
    loss, m, grad = one_token(-0.7, -1.0, adv=1.0)  # ratio e^0.3 = 1.3499 > 1.15
    assert loss == pytest.approx(-1.15)
    assert m["clip_frac_high"] == 1.0 and m["clip_frac_low"] == 0.0
    assert grad == 0.0  # the clipped branch carries no gradient


def test_ratio_below_low_clip_with_negative_advantage_is_clipped():
    loss, m, grad = one_token(-1.3, -1.0, adv=-1.0)  # ratio e^-0.3 = 0.7408 < 0.9
    assert loss == pytest.approx(0.9)
    assert m["clip_frac_low"] == 1.0 and m["clip_frac_high"] == 0.0
    assert grad == 0.0


def test_pessimistic_bound_leaves_the_other_side_unclipped():
    # Positive advantage, ratio below 1 - eps_low: the unclipped term is the larger loss.
    loss, m, grad = one_token(-1.3, -1.0, adv=1.0)
    assert loss == pytest.approx(-math.exp(-0.3))
    assert m["clip_frac"] == 0.0
    assert grad == pytest.approx(-math.exp(-0.3))  # d(-r)/dlogp = -r


def test_asymmetric_clip_matters():
    r = 1.12  # inside eps_high = 0.15, outside a symmetric 0.1
    assert one_token(math.log(r), 0.0, 1.0, 0.1, 0.15)[0] == pytest.approx(-1.12)
    assert one_token(math.log(r), 0.0, 1.0, 0.1, 0.10)[0] == pytest.approx(-1.10)
    r = 0.88  # outside eps_low = 0.1, inside 0.15
    assert one_token(math.log(r), 0.0, -1.0, 0.10, 0.15)[0] == pytest.approx(0.90)
    assert one_token(math.log(r), 0.0, -1.0, 0.15, 0.15)[0] == pytest.approx(0.88)


def test_k3_kl_to_reference():
    lp = torch.tensor([[0.0, -1.0]])
    ref = torch.tensor([[0.0, -1.5]])
    loss, m = policy_loss(lp, lp.clone(), ref, torch.tensor([[0, 1]]), torch.tensor([0.0]), 0.1, 0.15, 0.1)
    k3 = math.exp(-0.5) - (-0.5) - 1  # 0.1065307
    assert m["kl_ref"] == pytest.approx(k3, abs=1e-6)
    assert loss.item() == pytest.approx(0.1 * k3, abs=1e-7)


def test_entropy_sign_convention():
    lp = torch.tensor([[0.0, -1.0, -1.0]])
    H = torch.tensor([[9.0, 2.0, 4.0]])  # position 0 is masked
    mask = torch.tensor([[0, 1, 1]])
    args = (lp, lp.clone(), None, mask, torch.tensor([0.0]), 0.1, 0.15, 0.0)
    rewarded, m = policy_loss(*args, entropy=H, entropy_coef=0.5)
    penalised, _ = policy_loss(*args, entropy=H, entropy_coef=-0.03)
    assert m["entropy"] == pytest.approx(3.0)
    assert rewarded.item() == pytest.approx(-0.5 * 3.0)  # entropy_coef > 0 lowers the loss: rewards entropy
    assert penalised.item() == pytest.approx(0.03 * 3.0)


def test_token_mean_per_sample_not_over_all_tokens():
    # Sample 0: one token with ratio 1, A = 1 -> loss -1. Sample 1: three tokens, A = -2 -> loss 2.
    lp = torch.zeros(2, 4)
    mask = torch.tensor([[0, 1, 0, 0], [0, 1, 1, 1]])
    loss, m = policy_loss(lp, lp.clone(), None, mask, torch.tensor([1.0, -2.0]), 0.1, 0.15, 0.0)
    per_sample = (-1.0 + 2.0) / 2  # 0.5
    over_all_tokens = (-1.0 + 3 * 2.0) / 4  # 1.25
    assert loss.item() == pytest.approx(per_sample)
    assert loss.item() != pytest.approx(over_all_tokens)
    assert m["tokens"] == 4 and m["samples"] == 2


def test_masked_tokens_contribute_nothing():
    mask = torch.tensor([[0, 1, 1, 0]])
    base = dict(lp=[0.0, -1.0, -2.0, 0.0], old=[0.0, -1.1, -1.9, 0.0], ref=[0.0, -1.2, -2.2, 0.0], H=[0.0, 1.0, 2.0, 0.0])
    noisy = dict(lp=[-5.0, -1.0, -2.0, -7.0], old=[3.0, -1.1, -1.9, -2.0], ref=[-float("inf"), -1.2, -2.2, 40.0], H=[99.0, 1.0, 2.0, 50.0])
    results = []
    for v in (base, noisy):
        lp = torch.tensor([v["lp"]], requires_grad=True)
        loss, _ = policy_loss(
            lp, torch.tensor([v["old"]]), torch.tensor([v["ref"]]), mask, torch.tensor([1.5]), 0.1, 0.15, 0.05,
            entropy=torch.tensor([v["H"]]), entropy_coef=0.1,
        )
        loss.backward()
        results.append((loss.item(), lp.grad.clone()))
    assert math.isfinite(results[0][0])
    assert results[1][0] == pytest.approx(results[0][0])
    assert torch.equal(results[1][1], results[0][1])
    assert results[1][1][0, 0] == 0 and results[1][1][0, 3] == 0


def test_per_sample_coefficients():
    lp = torch.tensor([[0.0, -1.0], [0.0, -1.0]])
    ref = torch.tensor([[0.0, -1.5], [0.0, -1.5]])
    H = torch.tensor([[0.0, 2.0], [0.0, 2.0]])
    loss, _ = policy_loss(
        lp, lp.clone(), ref, torch.tensor([[0, 1], [0, 1]]), torch.tensor([0.0, 0.0]), 0.1, 0.15,
        torch.tensor([0.0, 0.1]), entropy=H, entropy_coef=torch.tensor([-0.03, 0.0]),
    )
    k3 = math.exp(-0.5) + 0.5 - 1
    assert loss.item() == pytest.approx(((0.03 * 2.0) + (0.1 * k3)) / 2, abs=1e-7)


def test_micro_batches_respect_the_token_budget():
    lengths = [30, 10, 64, 20, 100, 5]
    chunks = micro_batches(lengths, 64)
    assert sorted(i for c in chunks for i in c) == list(range(6))
    for c in chunks:
        assert len(c) == 1 or len(c) * max(lengths[i] for i in c) <= 64


# --------------------------------------------------------------------------------------
# GRPOUpdater on a real tiny Llama
# --------------------------------------------------------------------------------------

VOCAB = 61


def tiny_llama(seed: int) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128, attn_implementation="eager",
    )
    return LlamaForCausalLM(cfg).eval()


class ScoringPolicy:
    """The smallest `Policy.score` over a transformers model (a stand-in for HFPolicy)."""

    def __init__(self, model: torch.nn.Module):
        self.model = model

    def parameters(self):
        return self.model.parameters()

    def score(self, segments: list[Segment], *, with_entropy: bool = False, loss_positions_only: bool = False):
        out = []
        for seg in segments:
            ids = torch.tensor([seg.token_ids])
            logits = self.model(input_ids=ids).logits[0, :-1].float()
            logprobs = torch.log_softmax(logits, dim=-1)
            lp = torch.cat([torch.zeros(1), logprobs.gather(1, ids[0, 1:, None])[:, 0]])
            H = torch.cat([torch.zeros(1), -(logprobs.exp() * logprobs).sum(-1)]) if with_entropy else None
            out.append((lp, H))
        return out


def make_samples(policy: ScoringPolicy, spec, seed=0, noise=0.0) -> list[Sample]:
    """spec: (role, group, reward, prompt_len, gen_len). Old log-probs = current ones (+ noise)."""
    g = torch.Generator().manual_seed(seed)
    segs = []
    for _, _, _, p, n in spec:
        ids = torch.randint(1, VOCAB, (p + n,), generator=g).tolist()
        segs.append(Segment(ids, [0.0] * (p + n), [0] * p + [1] * n))
    with torch.no_grad():
        scored = policy.score(segs)
    samples = []
    for seg, (lp, _), (role, group, reward, p, n) in zip(segs, scored, spec):
        jitter = noise * (torch.rand(len(lp), generator=g) * 2 - 1)
        seg.logprobs = [(float(x) + float(j)) if m else 0.0 for x, j, m in zip(lp, jitter, seg.loss_mask)]
        samples.append(Sample(seg, role, group, reward))
    return samples


SPEC = [
    ("solver", "t1", 1.0, 5, 9), ("solver", "t1", 0.0, 7, 4), ("solver", "t1", 1.0, 3, 20), ("solver", "t1", 0.0, 6, 2),
    ("solver", "t2", 1.0, 4, 6), ("solver", "t2", 1.0, 8, 5),  # all equal: advantage 0
    ("extractor", "s1", 0.75, 10, 12), ("extractor", "s1", 0.25, 9, 15), ("extractor", "s1", 0.0, 4, 30),
]


def sgd_delta(model, samples, cfg, roles=None, reference=None, accelerator=None):
    """Run one update with SGD(lr=1) so the parameter change is exactly minus the gradient."""
    model = copy.deepcopy(model)
    before = [p.detach().clone() for p in model.parameters()]
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    up = GRPOUpdater(ScoringPolicy(model), reference, cfg, roles, optimizer=opt, accelerator=accelerator)
    metrics = up.update(samples)
    return torch.cat([(p.detach() - b).flatten() for p, b in zip(model.parameters(), before)]), metrics


def full_batch_gradient(model, reference, samples, cfg, roles):
    """The loss written out directly: every sample in one padded batch, no updater."""
    model = copy.deepcopy(model)
    samples, _ = group_advantages(samples, cfg.adv_eps, cfg.drop_zero_advantage_groups)
    rc = [roles[s.role] for s in samples]
    segs = [s.segment for s in samples]
    pad = torch.nn.utils.rnn.pad_sequence
    scored = ScoringPolicy(model).score(segs, with_entropy=True)
    with torch.no_grad():
        ref = pad([lp for lp, _ in ScoringPolicy(reference.model).score(segs)], batch_first=True)
    loss, _ = policy_loss(
        pad([lp for lp, _ in scored], batch_first=True),
        pad([torch.tensor(s.logprobs) for s in segs], batch_first=True),
        ref,
        pad([torch.tensor(s.loss_mask) for s in segs], batch_first=True),
        torch.tensor([s.advantage * r.adv_weight for s, r in zip(samples, rc)]),
        cfg.clip_low, cfg.clip_high,
        torch.tensor([r.kl_coef for r in rc]),
        entropy=pad([H for _, H in scored], batch_first=True),
        entropy_coef=torch.tensor([r.entropy_coef for r in rc]),
    )
    loss.backward()
    return torch.cat([p.grad.flatten() for p in model.parameters()])


@pytest.mark.parametrize(
    "kl, ent",
    [(0.1, -0.03), (0.0, 0.0)],  # every term active / zero-advantage samples skipped
)
def test_micro_batched_update_equals_full_batch(kl, ent):
    model, reference = tiny_llama(0), ScoringPolicy(tiny_llama(1))
    samples = make_samples(ScoringPolicy(model), SPEC, noise=0.3)  # noise: some tokens clipped
    roles = {"solver": RoleConfig(kl_coef=kl, entropy_coef=ent), "extractor": RoleConfig(adv_weight=0.2, kl_coef=kl, entropy_coef=ent)}
    expected = full_batch_gradient(model, reference, samples, GRPOConfig(), roles)

    small = GRPOConfig(micro_batch_tokens=64, max_grad_norm=1e9)
    lengths = [len(s.segment.token_ids) for s in samples]
    assert len(micro_batches(lengths, 64)) > 1
    delta_small, m = sgd_delta(model, samples, small, roles, reference)
    delta_big, _ = sgd_delta(model, samples, GRPOConfig(micro_batch_tokens=100_000, max_grad_norm=1e9), roles, reference)

    assert expected.abs().max() > 1e-4  # a real gradient, not a vacuous comparison
    torch.testing.assert_close(-delta_small, expected, atol=1e-6, rtol=1e-4)
    torch.testing.assert_close(-delta_big, expected, atol=1e-6, rtol=1e-4)
    assert m["loss/num_samples"] == 9
    assert m["loss/skipped_zero_samples"] == (2 if kl == 0 and ent == 0 else 0)
    assert m["loss/clip_frac"] > 0
    assert m["loss/extractor/samples"] == 3 and m["loss/solver/samples"] == 6
    assert m["loss/trained_tokens"] == 9 + 4 + 20 + 2 + 6 + 5 + 12 + 15 + 30


def test_role_weight_applied_exactly_once():
    model = tiny_llama(0)
    samples = make_samples(ScoringPolicy(model), [s for s in SPEC if s[0] == "extractor"])
    cfg = GRPOConfig(max_grad_norm=1e9, kl_coef=0.0)

    def roles(w):
        return {"extractor": RoleConfig(adv_weight=w, kl_coef=0.0)}

    d1, _ = sgd_delta(model, samples, cfg, roles(1.0))
    advantages = [s.advantage for s in samples]
    d02, _ = sgd_delta(model, samples, cfg, roles(0.2))
    assert d1.abs().max() > 1e-4
    torch.testing.assert_close(d02, 0.2 * d1, atol=1e-7, rtol=1e-4)
    assert [s.advantage for s in samples] == advantages  # the stored advantage is never re-weighted


def test_frozen_role_contributes_zero_gradient():
    model = tiny_llama(0)
    samples = make_samples(ScoringPolicy(model), SPEC)
    cfg = GRPOConfig(max_grad_norm=1e9, kl_coef=0.0)
    frozen = {"solver": RoleConfig(kl_coef=0.0), "extractor": RoleConfig(adv_weight=0.2, kl_coef=0.0, train=False)}
    d_mixed, m = sgd_delta(model, samples, cfg, frozen)
    d_solver_only, _ = sgd_delta(model, [s for s in samples if s.role == "solver"], cfg, frozen)
    torch.testing.assert_close(d_mixed, d_solver_only, atol=1e-7, rtol=1e-5)
    assert m["loss/num_samples"] == 6

    d_none, m = sgd_delta(model, [s for s in samples if s.role == "extractor"], cfg, frozen)
    assert torch.count_nonzero(d_none) == 0 and m["loss/optimizer_stepped"] == 0


def test_each_episode_counts_once_however_many_turns():
    """Issue 15, defect 7: in the per-step format an episode is one sample per turn; a plain mean
    over samples gave a 3-turn episode 3x the weight of a 1-turn one with the same |advantage|."""
    model = tiny_llama(0)
    won, lost = make_samples(ScoringPolicy(model), [("solver", "g", 1.0, 5, 6), ("solver", "g", 0.0, 4, 7)])
    won.episode, lost.episode = "won", "lost"
    lost_turns = [copy.deepcopy(lost) for _ in range(3)]  # the same turn three times: one episode, 3 samples
    cfg = GRPOConfig(max_grad_norm=1e9, kl_coef=0.0)
    assert sample_weights([won, *lost_turns]) == pytest.approx([0.5, 1 / 6, 1 / 6, 1 / 6])

    once, _ = sgd_delta(model, [won, lost], cfg)
    thrice, m = sgd_delta(model, [won, *lost_turns], cfg)
    assert once.abs().max() > 1e-4
    torch.testing.assert_close(thrice, once, atol=1e-7, rtol=1e-5)  # the episode counts once
    assert m["loss/num_samples"] == 4 and m["loss/num_episodes"] == 2
    per_segment, _ = sgd_delta(model, [won, *lost_turns], cfg.model_copy(update={"sample_weighting": "segment"}))
    assert (per_segment - once).abs().max() > 1e-3 * once.abs().max()  # the documented other option differs


def test_metrics_per_role_under_loss_prefix():
    model, reference = tiny_llama(0), ScoringPolicy(tiny_llama(1))
    samples = make_samples(ScoringPolicy(model), SPEC, noise=0.3)
    roles = {"solver": RoleConfig(kl_coef=0.1), "extractor": RoleConfig(adv_weight=0.2, kl_coef=0.1, entropy_coef=-0.03)}
    _, m = sgd_delta(model, samples, GRPOConfig(max_grad_norm=1e9), roles, reference)
    assert all(k.startswith("loss/") for k in m), sorted(m)
    for role in ("solver", "extractor"):
        for term in ("pg", "kl", "entropy", "approx_kl", "clip_frac", "weight"):
            assert f"loss/{role}/{term}" in m
    # 6 solver and 3 extractor episodes of one segment each: the roles hold 6/9 and 3/9 of the weight
    assert m["loss/solver/weight"] == pytest.approx(6 / 9) and m["loss/extractor/weight"] == pytest.approx(3 / 9)
    assert m["loss/kl"] == pytest.approx(6 / 9 * m["loss/solver/kl"] + 3 / 9 * m["loss/extractor/kl"])
    assert m["loss/solver/kl"] > 0 and m["loss/extractor/entropy"] > 0
    by_hand = sum(m[f"loss/{r}/weight"] * (m[f"loss/{r}/pg"] + 0.1 * m[f"loss/{r}/kl"] - c * m[f"loss/{r}/entropy"])
                  for r, c in (("solver", 0.0), ("extractor", -0.03)))
    assert m["loss/total"] == pytest.approx(by_hand, rel=1e-5)


def test_accelerator_path_matches_plain_backward():
    from accelerate import Accelerator

    model = tiny_llama(0)
    samples = make_samples(ScoringPolicy(model), SPEC[:6], noise=0.2)
    cfg = GRPOConfig(max_grad_norm=1e9, kl_coef=0.0, micro_batch_tokens=64)
    plain, _ = sgd_delta(model, samples, cfg)
    via_accelerate, _ = sgd_delta(model, samples, cfg, accelerator=Accelerator(cpu=True))
    torch.testing.assert_close(via_accelerate, plain, atol=1e-7, rtol=1e-5)


def test_missing_role_and_missing_reference_are_clear_errors():
    model = tiny_llama(0)
    with pytest.raises(ValueError, match="reference_policy"):
        GRPOUpdater(ScoringPolicy(model), None, GRPOConfig(kl_coef=0.01))
    up = GRPOUpdater(ScoringPolicy(model), None, GRPOConfig(), {"solver": RoleConfig(kl_coef=0.0)})
    with pytest.raises(ValueError, match="'extractor' has no RoleConfig"):
        up.update(make_samples(ScoringPolicy(model), SPEC[6:]))


@pytest.mark.slow
def test_one_update_raises_logprob_of_positive_advantage_sequences():
    model = tiny_llama(0)
    policy, reference = ScoringPolicy(model), ScoringPolicy(copy.deepcopy(model))
    spec = [("solver", "t", 1.0, 6, 10), ("solver", "t", 0.0, 6, 10), ("solver", "t", 1.0, 5, 8), ("solver", "t", 0.0, 7, 9)]
    samples = make_samples(policy, spec, seed=3)
    up = GRPOUpdater(policy, reference, GRPOConfig(lr=1e-2, kl_coef=0.01))

    def seq_logp() -> list[float]:
        with torch.no_grad():
            return [float((lp * torch.tensor(s.segment.loss_mask)).sum()) for s, (lp, _) in zip(samples, policy.score([s.segment for s in samples]))]

    before = seq_logp()
    m = up.update(samples)
    after = seq_logp()
    assert m["loss/optimizer_stepped"] == 1 and m["loss/grad_norm"] > 0
    for s, b, a in zip(samples, before, after):
        assert (a > b) if s.advantage > 0 else (a < b), (s.reward, b, a)


# --------------------------------------------------------------------------------------
# Shared prefixes: HFPolicy runs a prefix common to several samples once (issue 17)
# --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def hf_policy(tmp_path_factory):
    from transformers.utils import logging as hf_logging

    from evolving_rl.config import ModelConfig, TinyModelConfig
    from evolving_rl.policy.hf import HFPolicy
    from evolving_rl.policy.tiny import build_tiny

    hf_logging.disable_progress_bar()
    corpus = [f"go to cabinet {i}. take mug {i % 3} from cabinet {i}. You see a fridge {i % 5}." for i in range(40)]
    tiny = TinyModelConfig(vocab_size=256, hidden_size=32, num_layers=2, num_heads=4, intermediate_size=64, seed=0)
    return HFPolicy(ModelConfig(path=str(build_tiny(corpus, tiny, tmp_path_factory.mktemp("tiny")))))


def prefix_sharing_samples(vocab: int, seed: int = 0) -> list[Sample]:
    """What one Evolving-RL step trains on, in miniature, with ids drawn at random.

    Per-step turns of three episodes of 1, 3 and 5 turns (each turn repeats the system prompt
    and its episode's task), three extractor completions of one trajectory prompt, and two
    multi-turn episodes, one of which overflowed its context: its closed segment and the
    continuation that starts again from the head, with the kept turn as context only."""
    import random

    rng = random.Random(seed)

    def ids(n: int) -> list[int]:
        return [rng.randrange(3, vocab) for _ in range(n)]

    def segment(parts: list[tuple[list[int], int]]) -> Segment:
        toks = [t for p, _ in parts for t in p]
        return Segment(toks, [0.0] * len(toks), [m for p, m in parts for _ in p])

    system = ids(40)
    out = []
    for e, (turns, reward) in enumerate([(1, 1.0), (3, 0.0), (5, 1.0)]):
        head = system + ids(10 + 7 * e)  # the task (and card) of this episode
        for _ in range(turns):
            seg = segment([(head + ids(rng.randint(5, 25)), 0), (ids(rng.randint(2, 8)), 1)])
            out.append(Sample(seg, "solver", "task", reward, episode=f"e{e}"))
    trajectory = ids(90)
    for n, reward in ((4, 1.0), (11, 0.0), (19, 0.5)):
        out.append(Sample(segment([(trajectory, 0), (ids(n), 1)]), "extractor", "source", reward))
    head = system + ids(15)
    obs, replies = [ids(rng.randint(4, 9)) for _ in range(5)], [ids(rng.randint(2, 5)) for _ in range(5)]
    closed = segment([(head, 0)] + [p for k in range(3) for p in ((obs[k], 0), (replies[k], 1))])
    kept = segment([(head + obs[2] + replies[2], 0)] + [p for k in (3, 4) for p in ((obs[k], 0), (replies[k], 1))])
    whole = segment([(system + ids(15), 0)] + [p for k in range(2) for p in ((obs[k], 0), (replies[k], 1))])
    out += [Sample(closed, "solver", "mt", 1.0, episode="long"), Sample(kept, "solver", "mt", 1.0, episode="long"),
            Sample(whole, "solver", "mt", 0.0, episode="short")]
    return out


def test_shared_prefixes_leave_the_loss_and_gradient_unchanged(hf_policy):
    """The update with every sample in one micro-batch (prefixes run once) against each sample
    scored alone as one whole sequence by a plain forward pass (what `score` did before)."""
    model = hf_policy.model
    samples = prefix_sharing_samples(hf_policy.vocab_size)
    total = sum(len(s.segment.token_ids) for s in samples)
    reference = hf_policy.reference()
    with torch.no_grad():
        torch.manual_seed(0)
        for p in reference.model.parameters():
            p.add_(0.05 * torch.randn_like(p))  # a reference that differs: the KL term is not 0
        g = torch.Generator().manual_seed(1)
        for s, (lp, _) in zip(samples, ScoringPolicy(model).score([s.segment for s in samples])):
            noise = 0.3 * (torch.rand(len(lp), generator=g) * 2 - 1)  # old log-probs off: some ratios clipped
            s.segment.logprobs = [float(x + n) if m else 0.0 for x, n, m in zip(lp, noise, s.segment.loss_mask)]
    roles = {"solver": RoleConfig(kl_coef=0.05, entropy_coef=0.01),
             "extractor": RoleConfig(adv_weight=0.2, kl_coef=0.05, entropy_coef=-0.03)}
    cfg = GRPOConfig(micro_batch_tokens=100_000, max_grad_norm=1e9)

    def delta(policy, ref) -> tuple[torch.Tensor, dict[str, float]]:
        params = list(policy.parameters())
        before = [p.detach().clone() for p in params]
        up = GRPOUpdater(policy, ref, cfg, roles, optimizer=torch.optim.SGD(params, lr=1.0))
        m = up.update(copy.deepcopy(samples))
        out = torch.cat([(p.detach() - b).flatten() for p, b in zip(params, before)])
        with torch.no_grad():
            for p, b in zip(params, before):
                p.copy_(b)
        return out, m

    fed = []
    hook = model.get_input_embeddings().register_forward_hook(lambda mod, args, out: fed.append(args[0].numel()))
    try:
        shared, m = delta(hf_policy, reference)
    finally:
        hook.remove()
    whole, m_whole = delta(ScoringPolicy(model), ScoringPolicy(reference.model))

    assert whole.abs().max() > 1e-3  # a real gradient
    torch.testing.assert_close(shared, whole, atol=1e-6 * float(whole.abs().max()), rtol=1e-4)
    for k in ("loss/total", "loss/pg", "loss/kl", "loss/entropy", "loss/clip_frac"):
        assert m[k] == pytest.approx(m_whole[k], rel=1e-4, abs=1e-7), k
    assert m["loss/clip_frac"] > 0 and m["loss/kl"] > 0
    # The system prompt (40 tokens) of 11 solver samples and the trajectory (90) of 3
    # extractor samples ran once each, with padding in any batch: > 400 of 1,270 tokens saved.
    assert total == 1270
    assert sum(fed) < total - 400, (sum(fed), total)


def test_shared_prefix_plan_stops_before_the_first_scored_token():
    from evolving_rl.policy.hf import _shared_prefixes

    seqs = [[5] * 60 + [1, 2, 3], [5] * 60 + [4, 4], [5] * 60 + [6] * 3, [7] * 70]
    predict = torch.zeros(4, 70, dtype=torch.bool)
    predict[0, 61:62] = predict[1, 50:61] = predict[2, 60:62] = predict[3, 69] = True
    starts, owner, groups = _shared_prefixes(seqs, predict)
    assert [sorted(g) for g in groups] == [[0, 1, 2]]  # the row with nothing in common runs alone
    assert starts == [50, 50, 50, 0]  # row 1's first scored position (50) ends the shared prefix
    predict[1, 50:60] = False
    predict[1, 20] = True  # now sharing 20 tokens twice does not pay for a forward call
    assert _shared_prefixes(seqs, predict)[2] == []
    assert owner[:3] == [0, 0, 0]
    assert _shared_prefixes(seqs, predict, share=False) == ([0] * 4, [0] * 4, [])  # gradient checkpointing
