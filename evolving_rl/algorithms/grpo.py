"""GRPO as Evolving-RL uses it: group-normalised advantages, then one clipped-ratio optimizer
step over every sample of a training step (SPEC, "Rewards and groups" and "Update").

Read top to bottom: `group_advantages` -> `policy_loss` -> `GRPOUpdater.update`.
No critic: a sample's baseline is the mean reward of its group, a group being the samples
that answer the same question (GRPO: one prompt, G completions; Evolving-RL: the N candidate
skills of one source task, or the N episodes on one downstream task under N skills).

The loss, per sample i with generated tokens t (loss_mask = 1):

    ratio_t  = exp(logp_t - old_logp_t)                          # old = sampling-time log-probs
    pg_t     = max(-A_i * ratio_t, -A_i * clip(ratio_t, 1 - eps_low, 1 + eps_high))
    kl_t     = exp(ref_t - logp_t) - (ref_t - logp_t) - 1         # k3 estimator of KL(pi || pi_ref)
    loss_i   = token_mean_t(pg_t + kl_coef_i * kl_t - entropy_coef_i * H_t)
    loss     = sum_i w_i * loss_i,   w_i = 1 / (E * n_e(i))

so `entropy_coef > 0` rewards entropy and a negative one (the paper's ALFWorld extractor,
-0.03) penalises it. The token mean is taken per sample (a segment), so a long reply does
not outweigh a short one. A sample's weight w_i splits its episode's 1/E (E episodes in the
loss) over that episode's n_e segments: in the per-step format an episode is one segment per
turn, and a plain mean over samples would weight a 50-turn episode 10x a 5-turn one
(`grpo.sample_weighting: segment` keeps that plain mean, w_i = 1 / number of samples). In the
multi-turn format an episode is one segment (or a few, when its context overflowed), so the
two agree.
"""

from __future__ import annotations

import math
from collections import Counter, defaultdict
from dataclasses import dataclass
from typing import Any

import torch

from evolving_rl.config import GRPOConfig, RoleConfig
from evolving_rl.policy.base import Policy
from evolving_rl.types import Sample, Segment

# --------------------------------------------------------------------------------------
# 1. Rewards -> advantages
# --------------------------------------------------------------------------------------


def _episode_key(sample: Sample) -> object:
    """Which episode a sample came from, so group statistics count each episode once.

    In the per-step prompt format one episode yields one sample per turn, all with the
    episode's reward. Counting each turn would weight a 50-step failure 10x more than a
    5-step success in the group mean and std; verl-agent dedupes trajectories for the same
    reason. Samples carry the id in an optional `episode` attribute; without it each sample
    is its own episode (the multi-turn format, and extractor samples).
    """
    episode = getattr(sample, "episode", None)
    return episode if episode is not None else id(sample)


def group_advantages(
    samples: list[Sample], eps: float, drop_zero_groups: bool = False
) -> tuple[list[Sample], dict[str, float]]:
    """Set `advantage = (r - mean_group) / (std_group + eps)` on every sample; return the kept
    samples and statistics.

    std is the *population* std (divide by the number of episodes, not n - 1), as in most
    GRPO code (TRL uses the sample std; with G=8 the two differ by ~7%, and by nothing after
    the sign). Statistics are over the group's distinct episodes (see `_episode_key`).
    A group whose rewards are all equal (including a group of one) carries no learning
    signal: its advantage is exactly 0 (not a rounding residue), and with `drop_zero_groups`
    (dynamic sampling) its samples are dropped instead. The input order is preserved.
    """
    if eps <= 0:
        raise ValueError(f"group_advantages: eps must be > 0, got {eps!r}")
    groups: dict[str, list[Sample]] = defaultdict(list)
    for s in samples:
        groups[s.group].append(s)

    kept: list[Sample] = []
    zero_groups: set[str] = set()
    all_episode_rewards: list[float] = []
    for group, members in groups.items():
        episode_reward: dict[object, float] = {}
        for s in members:
            key = _episode_key(s)
            if key in episode_reward and episode_reward[key] != s.reward:
                raise ValueError(
                    f"group {group!r}: samples of episode {key!r} have different rewards "
                    f"({episode_reward[key]!r} and {s.reward!r}); an episode has one reward"
                )
            episode_reward[key] = float(s.reward)
        rewards = list(episode_reward.values())
        all_episode_rewards += rewards
        mean = sum(rewards) / len(rewards)
        std = math.sqrt(sum((r - mean) ** 2 for r in rewards) / len(rewards))  # population std
        all_equal = max(rewards) == min(rewards)
        if all_equal:
            zero_groups.add(group)
        for s in members:
            s.advantage = 0.0 if all_equal else (s.reward - mean) / (std + eps)

    for s in samples:
        if not (drop_zero_groups and s.group in zero_groups):
            kept.append(s)

    n = len(all_episode_rewards)
    reward_mean = sum(all_episode_rewards) / n if n else 0.0
    reward_std = math.sqrt(sum((r - reward_mean) ** 2 for r in all_episode_rewards) / n) if n else 0.0
    stats = {
        "reward_mean": reward_mean,
        "reward_std": reward_std,
        "num_groups": float(len(groups)),
        "zero_adv_group_share": len(zero_groups) / len(groups) if groups else 0.0,
        "dropped_samples": float(len(samples) - len(kept)),
    }
    return kept, stats


# --------------------------------------------------------------------------------------
# 2. The loss on padded tensors
# --------------------------------------------------------------------------------------


def _as_per_sample(value: float | torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A coefficient as a [B, 1] column so it broadcasts over tokens (scalars allowed)."""
    t = torch.as_tensor(value, dtype=like.dtype, device=like.device)
    if t.dim() == 0:
        t = t.expand(like.shape[0])
    if t.shape != (like.shape[0],):
        raise ValueError(f"per-sample coefficient has shape {tuple(t.shape)}, expected ({like.shape[0]},)")
    return t.unsqueeze(1)


def policy_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    ref_logp: torch.Tensor | None,
    mask: torch.Tensor,
    advantages: torch.Tensor,
    clip_low: float,
    clip_high: float,
    kl_coef: float | torch.Tensor,
    entropy: torch.Tensor | None = None,
    entropy_coef: float | torch.Tensor = 0.0,
    sample_weight: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """The GRPO loss of the module docstring on [B, T] tensors, and its diagnostics.

    `advantages`, `kl_coef` and `entropy_coef` are per sample ([B]) or scalars; role
    weights must already be folded into `advantages`. `ref_logp` may be None only when
    every kl_coef is 0. Masked positions (prompt, observations, padding) contribute nothing.
    `sample_weight` ([B]) is each sample's w_i; without it the loss is the plain mean over
    samples.

    Metrics: `pg_loss`, `kl_ref`, `entropy` are weighted the same way as the loss (per-sample
    token means, then the weighted mean); `approx_kl` (k3 estimator of KL(pi_old || pi),
    `(ratio - 1) - log ratio`, CleanRL's choice) and the clip fractions are shares over all
    generated tokens of the batch. `clip_frac_high`: tokens with A > 0 and ratio > 1 + eps_high;
    `clip_frac_low`: A < 0 and ratio < 1 - eps_low; i.e. where the clipped term wins and the
    token's gradient is zero.
    """
    terms = per_sample_terms(logp, old_logp, ref_logp, mask, advantages, clip_low, clip_high, kl_coef,
                             entropy, entropy_coef)
    w = terms["loss"].new_full(terms["loss"].shape, 1.0 / logp.shape[0]) if sample_weight is None else sample_weight
    loss = (w * terms["loss"]).sum()
    with torch.no_grad():
        total_w = w.sum().clamp(min=1e-30)
        n_tokens = terms["tokens"].sum()
        metrics = {k: float((w * terms[k]).sum() / total_w) for k in ("pg_loss", "kl_ref", "entropy")}
        metrics["loss"] = loss.item()
        for k in ("approx_kl", "clip_frac_low", "clip_frac_high"):
            metrics[k] = float(terms[k + "_tokens"].sum() / n_tokens.clamp(min=1.0))
        metrics["clip_frac"] = metrics["clip_frac_low"] + metrics["clip_frac_high"]
        metrics["tokens"], metrics["samples"] = float(n_tokens), float(logp.shape[0])
    return loss, metrics


def per_sample_terms(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    ref_logp: torch.Tensor | None,
    mask: torch.Tensor,
    advantages: torch.Tensor,
    clip_low: float,
    clip_high: float,
    kl_coef: float | torch.Tensor,
    entropy: torch.Tensor | None = None,
    entropy_coef: float | torch.Tensor = 0.0,
) -> dict[str, torch.Tensor]:
    """Each sample's loss_i (differentiable) and its parts, as [B] tensors.

    `pg_loss`, `kl_ref`, `entropy`: token means; `*_tokens`: token counts or sums (the clipped
    tokens, the approx-KL sum) so a caller can form shares over any set of samples.
    """
    if not (logp.shape == old_logp.shape == mask.shape) or logp.dim() != 2:
        raise ValueError(
            f"policy_loss: logp {tuple(logp.shape)}, old_logp {tuple(old_logp.shape)} and "
            f"mask {tuple(mask.shape)} must be the same [B, T] shape"
        )
    keep = mask.bool()
    mask = mask.to(logp.dtype)
    A = _as_per_sample(advantages, logp)  # [B, 1]
    kl_coef = _as_per_sample(kl_coef, logp)
    entropy_coef = _as_per_sample(entropy_coef, logp)
    tokens_per_sample = mask.sum(dim=1).clamp(min=1.0)  # a sample without tokens adds 0

    def masked(x: torch.Tensor) -> torch.Tensor:
        # where, not x * mask: a prompt position may hold -inf (a trie-masked score), and
        # 0 * inf would turn the whole sum into nan.
        return torch.where(keep, x, torch.zeros_like(x))

    def token_mean_per_sample(x: torch.Tensor) -> torch.Tensor:  # [B, T] -> [B]
        return masked(x).sum(dim=1) / tokens_per_sample

    # Clipped surrogate (PPO's pessimistic bound) with the asymmetric clip.
    log_ratio = masked(logp - old_logp)
    ratio = torch.exp(log_ratio)
    pg_unclipped = -A * ratio
    pg_clipped = -A * torch.clamp(ratio, 1.0 - clip_low, 1.0 + clip_high)
    pg = torch.maximum(pg_unclipped, pg_clipped)
    per_token = pg

    # k3 KL to the frozen reference: unbiased, always >= 0, low variance (Schulman's k3).
    if ref_logp is not None:
        ref_minus_logp = masked(ref_logp - logp)
        kl_ref = torch.exp(ref_minus_logp) - ref_minus_logp - 1.0
        per_token = per_token + kl_coef * kl_ref
    elif bool((kl_coef != 0).any()):
        raise ValueError("policy_loss: kl_coef is non-zero but no ref_logp was given")
    else:
        kl_ref = torch.zeros_like(logp)

    if entropy is not None:
        per_token = per_token - entropy_coef * entropy
    elif bool((entropy_coef != 0).any()):
        raise ValueError("policy_loss: entropy_coef is non-zero but no entropy was given")

    terms = {"loss": token_mean_per_sample(per_token)}
    with torch.no_grad():
        terms["pg_loss"] = token_mean_per_sample(pg)
        terms["kl_ref"] = token_mean_per_sample(kl_ref)
        terms["entropy"] = token_mean_per_sample(entropy) if entropy is not None else torch.zeros_like(terms["pg_loss"])
        terms["tokens"] = mask.sum(dim=1)
        terms["approx_kl_tokens"] = masked((ratio - 1.0) - log_ratio).sum(dim=1)
        terms["clip_frac_high_tokens"] = masked(((ratio > 1.0 + clip_high) & (A > 0)).to(mask.dtype)).sum(dim=1)
        terms["clip_frac_low_tokens"] = masked(((ratio < 1.0 - clip_low) & (A < 0)).to(mask.dtype)).sum(dim=1)
    return terms


# --------------------------------------------------------------------------------------
# 3. One optimizer step over all samples
# --------------------------------------------------------------------------------------

_SAMPLE_MEAN_TERMS = ("pg_loss", "kl_ref", "entropy")  # weighted like the loss
_TOKEN_SHARE_TERMS = ("approx_kl", "clip_frac_low", "clip_frac_high")  # shares of generated tokens
# The names these take under `loss/` (CleanRL's losses/ namespace) and per role `loss/<role>/`.
_METRIC_NAMES = {"pg_loss": "pg", "kl_ref": "kl", "entropy": "entropy", "approx_kl": "approx_kl",
                 "clip_frac_low": "clip_frac_low", "clip_frac_high": "clip_frac_high"}


@dataclass
class _Coefficients:
    """A sample's role coefficients, gathered once (the role weight multiplies A exactly here)."""

    adv_weight: float
    kl_coef: float
    entropy_coef: float
    train: bool


def _pad(rows: list[torch.Tensor]) -> torch.Tensor:
    """Right-pad 1-D rows into [B, T] float32 (log-prob ratios in bf16 would be too coarse)."""
    return torch.nn.utils.rnn.pad_sequence([r.float() for r in rows], batch_first=True, padding_value=0.0)


def micro_batches(lengths: list[int], budget_tokens: int) -> list[list[int]]:
    """Indices grouped so each chunk's padded size (count x longest) stays within the budget.

    Longest first, so similar lengths share a chunk and little compute goes to padding. A
    sequence longer than the budget gets a chunk of its own. The split cannot change the
    update: each sample carries its weight in the whole batch's loss.
    """
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    chunks: list[list[int]] = []
    for i in order:
        if chunks and (len(chunks[-1]) + 1) * lengths[chunks[-1][0]] <= budget_tokens:
            chunks[-1].append(i)
        else:
            chunks.append([i])
    return chunks


def sample_weights(samples: list[Sample], mode: str = "episode") -> list[float]:
    """Each sample's w_i in the loss (module docstring); they sum to 1.

    "episode": the samples of one episode (`_episode_key`) share 1 / (number of episodes), so an
    episode counts once however many segments it produced. "segment": 1 / (number of samples).
    """
    if not samples:
        return []
    if mode == "segment":
        return [1.0 / len(samples)] * len(samples)
    if mode != "episode":
        raise ValueError(f"grpo.sample_weighting: unknown mode {mode!r}; allowed: episode, segment")
    per_episode = Counter(_episode_key(s) for s in samples)
    return [1.0 / (len(per_episode) * per_episode[_episode_key(s)]) for s in samples]


def trainable_parameters(policy: Any) -> list[torch.nn.Parameter]:
    """The policy's trainable weights, refused when they are not float32.

    AdamW's step is ~lr per weight; at the paper's lr 1e-6 that is below half a bf16 ulp for
    any weight above ~2e-4, so bf16 (or fp16) weights stepped directly barely move (measured
    on the issue's 7B run: 1.9% of weights changed after 3 steps, 99.98% in float32).
    """
    params = [p for p in policy.parameters() if p.requires_grad]
    low = Counter(str(p.dtype).removeprefix("torch.") for p in params if p.dtype != torch.float32)
    if low:
        kinds = ", ".join(f"{n} in {d}" for d, n in low.items())
        raise ValueError(
            f"model.dtype: the trainable weights are low precision ({kinds} tensors): a fine-tuning step "
            "(~lr, 1e-6 in the 7B configs) rounds away in them, so the model would not learn. Set model.dtype: float32 with "
            "model.autocast: bfloat16 (float32 master weights, bf16 compute), or model.lora.enabled: true "
            "(the adapters are float32)"
        )
    return params


class GRPOUpdater:
    """Owns the optimizer; `update(samples)` = advantages -> loss -> exactly one optimizer step.

    `roles` maps a Sample.role to its RoleConfig (Evolving-RL: extractor and solver). When
    given, a role's `kl_coef` and `entropy_coef` replace `cfg`'s for its samples and its
    `adv_weight` scales their advantages; a role with `train=False` is left out of the loss
    altogether (not counted in the mean either), so freezing the extractor leaves the
    solver's update exactly as if only solver samples had been collected. Without `roles`
    every sample uses `cfg.kl_coef` / `cfg.entropy_coef` and weight 1 (plain GRPO).

    It uses only the `Policy` protocol: `parameters()` for the optimizer and `score()` (with
    `loss_positions_only`, since only generated tokens enter the loss).

    With an `accelerate.Accelerator`, backward and gradient clipping go through it. Our own
    micro-batching does the accumulation, so the accelerator's gradient_accumulation_steps
    must be 1. Over several processes (DDP-style data parallelism) every process is given
    the same whole batch: advantages and per-sample weights are computed on all of it, each
    process runs only its shard (every num_processes-th sample, longest first) through the
    model, and the gradients are summed across processes before clipping. The loss is then
    exactly the single-process loss (up to float summation order), whatever the shards'
    sizes, and every process takes the same optimizer step.
    """

    def __init__(
        self,
        policy: Policy,
        reference_policy: Policy | None,
        cfg: GRPOConfig,
        roles: dict[str, RoleConfig] | None = None,
        optimizer: torch.optim.Optimizer | None = None,
        accelerator: Any | None = None,
        fully_sharded: bool = False,
    ) -> None:
        self.policy = policy
        # train.sharding: fsdp. The weights' FSDP units all-gather in every forward and backward
        # call and reduce-scatter the gradients in every backward, so every process must run as
        # many micro-batches as the others, each one forward call (`one_forward_per_score`).
        self.fully_sharded = fully_sharded
        if fully_sharded:
            policy.one_forward_per_score = True
        self.reference_policy = reference_policy
        self.cfg = cfg
        self.roles = roles
        self.accelerator = accelerator
        if accelerator is not None and getattr(accelerator, "gradient_accumulation_steps", 1) != 1:
            raise ValueError(
                "GRPOUpdater accumulates micro-batches itself; create the Accelerator with "
                f"gradient_accumulation_steps=1 (got {accelerator.gradient_accumulation_steps})"
            )
        self.params = trainable_parameters(policy)
        self.optimizer = optimizer or torch.optim.AdamW(self.params, lr=cfg.lr, weight_decay=cfg.weight_decay)
        if reference_policy is None and self._any_kl():
            raise ValueError("GRPOUpdater: kl_coef > 0 (config or a role) needs a reference_policy")

    def _any_kl(self) -> bool:
        if self.roles is not None:
            return any(r.kl_coef > 0 and r.train for r in self.roles.values())
        return self.cfg.kl_coef > 0

    def coefficients(self, role: str) -> _Coefficients:
        if self.roles is None:
            return _Coefficients(1.0, self.cfg.kl_coef, self.cfg.entropy_coef, True)
        if role not in self.roles:
            raise ValueError(f"sample role {role!r} has no RoleConfig; configured roles: {sorted(self.roles)}")
        r = self.roles[role]
        return _Coefficients(r.adv_weight, r.kl_coef, r.entropy_coef, r.train)

    def update(self, samples: list[Sample], *, compute_advantages: bool = True) -> dict[str, float]:
        """One optimizer step over `samples`; returns the step's metrics, all under `loss/`.

        Keys: `loss/total` (the loss), `loss/pg`, `loss/kl` (k3 KL to the reference),
        `loss/entropy` (weighted like the loss), `loss/approx_kl`, `loss/clip_frac` (+ `_low`,
        `_high`; shares of generated tokens), the same per role as `loss/<role>/<term>` plus
        `loss/<role>/weight` (the role's share of the loss weight) and `loss/<role>/samples`;
        `loss/grad_norm`, `loss/optimizer_stepped`, `loss/num_samples`, `loss/num_episodes`,
        `loss/trained_tokens`, `loss/skipped_zero_samples`; and, when advantages are computed
        here, `loss/reward_mean`, `loss/reward_std`, `loss/num_groups`,
        `loss/zero_adv_group_share`, `loss/dropped_samples` (over the mixed samples of every role).

        With `compute_advantages` (default) the group advantages are (re)computed from the
        rewards here; pass False when the caller has set `Sample.advantage` itself. Samples
        whose advantage, kl_coef and entropy_coef are all 0 have an exactly zero loss and
        gradient: they keep their weight but are not run through the model.
        """
        cfg = self.cfg
        metrics: dict[str, float] = {}
        if compute_advantages:
            samples, adv_stats = group_advantages(samples, cfg.adv_eps, cfg.drop_zero_advantage_groups)
            metrics.update({f"loss/{k}": v for k, v in adv_stats.items()})
        for role, count in sorted(Counter(s.role for s in samples).items()):
            metrics[f"loss/{role}/samples"] = float(count)

        # Which samples are in the loss, with which coefficients and weights.
        trained: list[tuple[Sample, _Coefficients]] = []
        for s in samples:
            c = self.coefficients(s.role)
            if c.train and s.segment.num_generated > 0:
                trained.append((s, c))
        weights = sample_weights([s for s, _ in trained], cfg.sample_weighting)
        metrics["loss/num_samples"] = float(len(trained))
        metrics["loss/num_episodes"] = float(len({_episode_key(s) for s, _ in trained}))
        metrics["loss/trained_tokens"] = float(sum(s.segment.num_generated for s, _ in trained))
        active = [
            (s, c, w) for (s, c), w in zip(trained, weights)
            if not (s.advantage * c.adv_weight == 0 and c.kl_coef == 0 and c.entropy_coef == 0)
        ]
        metrics["loss/skipped_zero_samples"] = float(len(trained) - len(active))

        self.optimizer.zero_grad(set_to_none=True)
        # Per role: weighted sums of the sample-mean terms, sums of the token-share terms.
        sums: dict[str, dict[str, float]] = defaultdict(lambda: defaultdict(float))
        total = 0.0
        rank, world = self._process()
        shard = active
        if world > 1:  # longest first, dealt round-robin: shards of similar token counts
            self._check_same_batch(samples)
            order = sorted(range(len(active)), key=lambda i: -len(active[i][0].segment.token_ids))
            shard = [active[i] for i in order[rank::world]]
        metrics["loss/process_samples"] = float(len(shard))
        chunks = micro_batches([len(s.segment.token_ids) for s, _, _ in shard], cfg.micro_batch_tokens)
        padding = self._padding_micro_batches(len(chunks)) if world > 1 and self.fully_sharded and active else 0
        for chunk in chunks + [None] * padding:
            # None: a zero-weight pass over one sample, a gradient of exactly 0 that keeps this
            # process's collectives in step with a process that has more micro-batches
            batch = [shard[i] for i in chunk] if chunk is not None else [active[-1]]
            terms = self._micro_batch_terms(batch)
            w = torch.tensor([w if chunk is not None else 0.0 for _, _, w in batch], dtype=terms["loss"].dtype,
                             device=terms["loss"].device)
            loss = (w * terms["loss"]).sum()  # this chunk's share of the batch loss
            if self.accelerator is not None:
                self.accelerator.backward(loss)
            else:
                loss.backward()
            total += loss.item()
            if chunk is None:
                continue
            for b, (s, _, wb) in enumerate(batch):
                acc = sums[s.role]
                for k in _SAMPLE_MEAN_TERMS:
                    acc[k] += wb * float(terms[k][b])
                for k in _TOKEN_SHARE_TERMS:
                    acc[k + "_tokens"] += float(terms[k + "_tokens"][b])
                acc["tokens"] += float(terms["tokens"][b])

        if world > 1:
            total, sums = self._sum_over_processes(total, sums)
        if active:
            if self.accelerator is not None:
                grad_norm = self.accelerator.clip_grad_norm_(self.params, cfg.max_grad_norm)
            else:
                grad_norm = torch.nn.utils.clip_grad_norm_(self.params, cfg.max_grad_norm)
            self.optimizer.step()
            if hasattr(grad_norm, "full_tensor"):  # sharded gradients: a DTensor of the partial norms
                grad_norm = grad_norm.full_tensor()
            metrics["loss/grad_norm"] = float(grad_norm)
        else:
            metrics["loss/grad_norm"] = 0.0  # nothing to learn from: no step, optimizer state unchanged
        self.optimizer.zero_grad(set_to_none=True)
        metrics["loss/optimizer_stepped"] = float(bool(active))
        metrics["loss/total"] = total

        # Skipped samples have loss 0 exactly, so they count in the weights with zero terms.
        role_weight: dict[str, float] = defaultdict(float)
        for (s, _), w in zip(trained, weights):
            role_weight[s.role] += w
        for prefix, roles in [("loss/", sorted(role_weight))] + [(f"loss/{r}/", [r]) for r in sorted(role_weight)]:
            weight = sum(role_weight[r] for r in roles)
            tokens = sum(sums[r]["tokens"] for r in roles)
            for k in _SAMPLE_MEAN_TERMS:
                metrics[prefix + _METRIC_NAMES[k]] = sum(sums[r][k] for r in roles) / weight if weight else 0.0
            for k in _TOKEN_SHARE_TERMS:
                metrics[prefix + _METRIC_NAMES[k]] = sum(sums[r][k + "_tokens"] for r in roles) / tokens if tokens else 0.0
            metrics[prefix + "clip_frac"] = metrics[prefix + "clip_frac_low"] + metrics[prefix + "clip_frac_high"]
            if prefix != "loss/":
                metrics[prefix + "weight"] = weight
        return metrics

    def _process(self) -> tuple[int, int]:
        """(this process's index, number of processes); (0, 1) without an accelerator."""
        if self.accelerator is None:
            return 0, 1
        return int(self.accelerator.process_index), int(self.accelerator.num_processes)

    def _check_same_batch(self, samples: list[Sample]) -> None:
        """Sharding is only right if every process holds the very same batch; a process that
        played other episodes (another seed, a nondeterministic engine) would mix gradients
        of different batches silently, so compare a fingerprint first."""
        import hashlib

        from accelerate.utils import gather_object

        # not hash(): str hashes are salted per process
        text = repr([(s.segment.token_ids, s.reward, s.group, s.role) for s in samples])
        prints = gather_object([hashlib.sha256(text.encode()).hexdigest()])
        if len(set(prints)) != 1:
            raise ValueError(
                f"GRPOUpdater over {len(prints)} processes: the processes hold different samples; every "
                "process must pass the same whole batch to update() (it shards the batch itself)"
            )

    def _padding_micro_batches(self, mine: int) -> int:
        """How many zero-weight micro-batches this process adds to reach the most any process has."""
        import torch.distributed as dist

        most = torch.tensor([mine], dtype=torch.long)
        dist.all_reduce(most, op=dist.ReduceOp.MAX)
        return int(most.item()) - mine

    def _sum_over_processes(self, total: float, sums: dict) -> tuple[float, dict]:
        """Sum the shards' gradients (every process, also one whose shard was empty, since the
        collective needs all of them; under FSDP its backward has summed them already) and
        their metric sums."""
        import torch.distributed as dist
        from accelerate.utils import gather_object

        if not self.fully_sharded:
            grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in self.params]
            flat = torch.cat([g.reshape(-1) for g in grads])
            dist.all_reduce(flat, op=dist.ReduceOp.SUM)
            offset = 0
            for p, g in zip(self.params, grads):
                p.grad = flat[offset : offset + g.numel()].view_as(g).clone()
                offset += g.numel()
        merged: dict[str, dict[str, float]] = defaultdict(lambda: defaultdict(float))
        parts = gather_object([(total, {r: dict(v) for r, v in sums.items()})])
        for _, part in parts:
            for role, acc in part.items():
                for k, v in acc.items():
                    merged[role][k] += v
        return sum(t for t, _ in parts), merged

    def _micro_batch_terms(self, batch: list[tuple[Sample, _Coefficients, float]]) -> dict[str, torch.Tensor]:
        segments: list[Segment] = [s.segment for s, _, _ in batch]
        need_entropy = any(c.entropy_coef != 0 for _, c, _ in batch)
        scored = self.policy.score(segments, with_entropy=True, loss_positions_only=True)
        logp = _pad([lp for lp, _ in scored])
        if need_entropy and any(h is None for _, h in scored):
            raise ValueError(f"{type(self.policy).__name__}.score returned no entropy with with_entropy=True")
        entropy = _pad([h for _, h in scored]) if all(h is not None for _, h in scored) else None
        if entropy is not None and not need_entropy:
            entropy = entropy.detach()  # logged only: no backward through a vocab-wide softmax

        def row(values: list[float] | list[int]) -> torch.Tensor:
            return torch.tensor(values, dtype=torch.float32, device=logp.device)

        old_logp = _pad([row(seg.logprobs) for seg in segments])
        mask = _pad([row(seg.loss_mask) for seg in segments])
        if logp.shape != mask.shape:
            raise ValueError(f"score returned {tuple(logp.shape)} log-probs for segments padded to {tuple(mask.shape)}")

        kl_coef = row([c.kl_coef for _, c, _ in batch])
        ref_logp = None
        if bool((kl_coef != 0).any()):
            with torch.no_grad():
                ref = self.reference_policy.score(segments, loss_positions_only=True)
                ref_logp = _pad([lp for lp, _ in ref])

        advantages = row([s.advantage * c.adv_weight for s, c, _ in batch])  # the role weight, once
        return per_sample_terms(
            logp,
            old_logp,
            ref_logp,
            mask,
            advantages,
            self.cfg.clip_low,
            self.cfg.clip_high,
            kl_coef,
            entropy=entropy,
            entropy_coef=row([c.entropy_coef for _, c, _ in batch]),
        )
