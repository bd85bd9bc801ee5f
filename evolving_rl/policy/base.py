"""The policy contract: everything the rollout engine and the GRPO updater need from a model.

Batched generation that returns the sampled ids and their log-probs, re-scoring of given ids
under the current weights, the chat boundaries of a multi-turn episode, the context size,
the trainable weights, a frozen reference and saving. The rollout and the updater reach no
further than this, so another backend (vLLM for generation, a served model for evaluation)
plugs in without touching either.

Keeping the sampled ids (never re-tokenising generated text) makes the trained tokens
exactly the generated ones, and lets a test check that sampling-time log-probs equal a
fresh forward pass on the same ids (SPEC, Update).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Protocol, runtime_checkable

import torch

from evolving_rl.types import Segment


@dataclass
class Generation:
    token_ids: list[int]  # generated ids, including the stop/eos token that ended it
    # log-prob of each id under the model's own distribution (temperature 1, no top-p), with
    # the constraint mask if any; `score()` computes the same quantity, so the GRPO ratio is 1
    # on-policy whatever the sampling temperature.
    logprobs: list[float]
    text: str  # decoded `token_ids` (stop string included, special tokens dropped)
    finish_reason: Literal["stop", "eos", "length"]


def row_seeds(seed: int | list[int] | None, n: int) -> list[int]:
    """One sampling stream per prompt of a `generate` call, so a row's sample depends on its own
    seed alone, never on its batch-mates: which prompts share the call, or in which order. That
    is what lets a multi-process run play a shard of a step's episodes and get exactly the
    episodes one process plays. An int seeds row i with seed * 1_000_003 + i; a list gives each
    row its own seed (the rollout: one stream per episode and turn); None draws a fresh base."""
    if isinstance(seed, list):
        if len(seed) != n:
            raise ValueError(f"generate: {len(seed)} seeds for {n} prompts (one seed per prompt, or one int)")
        return [s % 2**63 for s in seed]
    base = seed if seed is not None else int(torch.randint(0, 2**62, (1,)).item())
    return [(base * 1_000_003 + i) % 2**63 for i in range(n)]


@runtime_checkable
class Policy(Protocol):
    eos_token_id: int
    pad_token_id: int
    # The longest sequence the model was built for (max_position_embeddings): the rollout
    # refuses a prompt cap above it and keeps prompt + reply within it.
    max_context_tokens: int
    # Trainable backends only: under per-layer FSDP every process must make the same forward calls,
    # so the updater asks score() for exactly one forward per micro-batch (no chunks, no shared prefixes).
    one_forward_per_score: bool

    def encode_chat(self, messages: list[dict[str, str]], add_generation_prompt: bool = True) -> list[int]:
        """Prompt ids for chat messages, with the tokenizer's chat template when it has one."""
        ...

    def encode_next_turn(self, messages: list[dict[str, str]]) -> list[int]:
        """Multi-turn episodes: the ids that close the assistant turn just generated, then
        `messages` (the env's reply), then the prompt of the next assistant turn.

        Appended after the sampled ids, never re-tokenising them, so the episode's one
        sequence holds exactly the tokens that were generated."""
        ...

    def encode_text(self, text: str) -> list[int]:
        """Plain ids, no special tokens (used for completions in demos and constraint tries)."""
        ...

    def decode(self, ids: list[int]) -> str: ...

    def generate(
        self,
        prompts: list[list[int]],
        *,
        temperature: float,
        top_p: float,
        max_new_tokens: int,
        stop: list[str] | None = None,
        allowed: list[list[list[int]] | None] | None = None,
        seed: int | list[int] | None = None,
    ) -> list[Generation]:
        """Sample one completion per prompt, all prompts in one batched decode.

        temperature 0 is greedy. `seed` is an int or one seed per prompt (`row_seeds`). `allowed[i]`, when given, lists the only token sequences
        prompt i may produce (e.g. each admissible action + "</action>"): decoding follows a
        trie of them and log-probs are normalised over the allowed tokens.
        """
        ...

    def score(
        self, segments: list[Segment], *, with_entropy: bool = False, loss_positions_only: bool = False
    ) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
        """Per-token log-probs (and entropies) of each segment's ids under the current weights.

        Position i holds log p(ids[i] | ids[:i]); position 0 holds 0. Differentiable when
        grad is enabled. Segments with `allowed` set are scored under the same trie masks
        used when they were sampled. With `loss_positions_only`, positions where
        loss_mask == 0 may hold 0 instead of their log-prob (what GRPO needs; a backend may
        skip the output layer there).
        """
        ...

    def parameters(self) -> Iterable[torch.nn.Parameter]:
        """The weights an optimizer steps (LoRA: the adapters only)."""
        ...

    def reference(self) -> Policy:
        """A frozen copy of the current policy, for the KL term (scores only)."""
        ...

    def save(self, out_dir: str | Path) -> Path:
        """Write the policy where the same backend (or any tool for its format) loads it."""
        ...
