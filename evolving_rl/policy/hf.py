"""The Hugging Face `transformers` policy backend: any causal-LM directory, CPU or GPU.

Two choices shape this file:

* **A lean decode loop** over the model's own forward with a KV cache, instead of
  `model.generate`: HF's generate spends most of a tiny model's step in per-token Python
  (SPEC), and we need things it does not give cheaply anyway (the trie mask of constrained
  decoding, per-row stop strings, dropping finished rows from the cache).
* **Which log-prob is returned.** GRPO's ratio compares the policy's probability of a token
  now with its probability when sampled, so both sides must be the *same* quantity. We
  define it as the log-prob of the id under the model's own distribution: temperature 1,
  no top-p truncation, but with the constraint mask of `allowed` applied (the mask is part
  of the policy when constrained decoding is on). `generate` returns exactly this for the
  sampled ids and `score` recomputes exactly this, so the two agree to float precision;
  temperature and top-p only shape which id is drawn.
"""

from __future__ import annotations

import copy
import inspect
import math
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, AutoTokenizer, DynamicCache, modeling_utils

from evolving_rl.config import ModelConfig
from evolving_rl.policy.base import Generation, row_seeds
from evolving_rl.policy.files import check_model_dir
from evolving_rl.types import Segment

# transformers >= 5.2x takes a [batch, seq] bool mask as `logits_to_keep` (the output layer
# runs only there); the vLLM venv pins transformers < 5.20, which does not.
_MASK_LOGITS_TO_KEEP = hasattr(modeling_utils, "slice_logits_to_keep")

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "auto": "auto"}


class _Trie:
    """Allowed completions as a prefix tree: node -> {token id: child node}; `None` marks an end."""

    def __init__(self, sequences: list[list[int]], where: str) -> None:
        if not sequences:
            raise ValueError(f"{where}: the allowed list is empty; give at least one sequence or None")
        self.root: dict = {}
        for seq in sequences:
            if not seq:
                raise ValueError(f"{where}: an allowed sequence is empty")
            node = self.root
            for t in seq:
                node = node.setdefault(int(t), {})
            node[None] = True

    @staticmethod
    def choices(node: dict) -> list[int]:
        return [t for t in node if t is not None]


def _completion_span(seg: Segment, where: str) -> tuple[int, int]:
    """The completion a trie mask applies to: the one run of loss_mask == 1.

    Constrained decoding produces one completion per segment (the per-step prompt format),
    so a segment with several generated runs and `allowed` set is a caller error.
    """
    mask = seg.loss_mask
    try:
        start = mask.index(1)
    except ValueError:
        raise ValueError(f"{where}: `allowed` is set but loss_mask has no 1 (no completion to constrain)") from None
    end = start
    while end < len(mask) and mask[end] == 1:
        end += 1
    if any(mask[end:]):
        raise ValueError(f"{where}: `allowed` is set but loss_mask has several generated runs; expected one")
    if start == 0:
        raise ValueError(f"{where}: the completion starts at position 0; a prompt token must come first")
    return start, end


class HFPolicy:
    """A `Policy` over a Hugging Face causal LM (see the module docstring for the log-prob definition).

    The model stays in eval mode: dropout would make the on-policy ratio differ from 1. With
    `gradient_checkpointing`, `score` switches to train mode only while grad is enabled (HF
    checkpoints only in train mode); models used here have zero dropout.
    """

    def __init__(
        self,
        cfg: ModelConfig,
        device: str | torch.device = "cpu",
        *,
        compact_fraction: float = 0.25,
    ) -> None:
        path = Path(cfg.path)
        check_model_dir(path)  # a corrupt or partial model directory: one message naming the file
        self.cfg = cfg
        self.device = torch.device(device)
        # Mixed precision: the weights keep `cfg.dtype` (float32 for training, so small updates
        # are not rounded away) while forward passes compute in the autocast dtype. On CPUs
        # with avx512_bf16 bf16 is also 1.5-2x faster (SPEC). Log-probs then agree between
        # sampling and scoring only to bf16 precision, so the tiny configs leave it off.
        self.autocast_dtype: torch.dtype | None = None if cfg.autocast == "none" else _DTYPES[cfg.autocast]
        # Drop finished rows from the batch (and the KV cache) once this share of it is done.
        self.compact_fraction = compact_fraction
        self.tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        model = AutoModelForCausalLM.from_pretrained(path, local_files_only=True, dtype=_DTYPES[cfg.dtype])
        model.to(self.device)
        if cfg.gradient_checkpointing:
            # transformers 5 renamed it; 4.x only has the old name
            (getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable)()
            model.config.use_cache = False  # training forward; the decode loop passes its own cache
        if cfg.lora.enabled:
            from peft import LoraConfig as PeftLoraConfig, get_peft_model

            if cfg.gradient_checkpointing:
                model.enable_input_require_grads()
            model = get_peft_model(
                model,
                PeftLoraConfig(
                    r=cfg.lora.r,
                    lora_alpha=cfg.lora.alpha,
                    lora_dropout=cfg.lora.dropout,
                    target_modules=list(cfg.lora.target_modules),
                    task_type="CAUSAL_LM",
                ),
            )
        model.eval()
        self.model = model
        self._adapters_disabled = False  # True for the LoRA reference view (see `reference`)
        # train.sharding: fsdp sets it: each `score` call is one forward call of the model (no
        # chunks, shared prefixes or length buckets), because a per-layer FSDP unit all-gathers
        # in every call and every process must make equally many (`evolving_rl.distributed`).
        self.one_forward_per_score = False

        eos = self.tokenizer.eos_token_id
        if eos is None:
            raise ValueError(f"model.path={cfg.path!r}: the tokenizer defines no eos_token")
        self.eos_token_id: int = int(eos)
        gen_eos = getattr(getattr(self._base_model(), "generation_config", None), "eos_token_id", None)
        extra = gen_eos if isinstance(gen_eos, list) else ([gen_eos] if gen_eos is not None else [])
        self.eos_token_ids: set[int] = {self.eos_token_id, *map(int, extra)}
        pad = self.tokenizer.pad_token_id
        self.pad_token_id: int = int(pad if pad is not None else eos)
        self.vocab_size: int = int(self._base_model().get_output_embeddings().weight.shape[0])
        self.max_context_tokens: int = int(getattr(self._base_model().config, "max_position_embeddings", None) or 1 << 30)
        # transformers 5.x renamed the KV-cache argument; older versions only know the old name.
        params = inspect.signature(self._base_model().forward).parameters
        self._cache_kw = "cache" if "cache" in params else "past_key_values"

    # ---- text <-> ids -------------------------------------------------------------------

    def encode_chat(self, messages: list[dict[str, str]], add_generation_prompt: bool = True) -> list[int]:
        """Chat template when the tokenizer has one; otherwise a plain documented fallback:
        `"{role}: {content}\\n"` per message, then `"assistant: "` as the generation prompt."""
        if getattr(self.tokenizer, "chat_template", None):
            out = self.tokenizer.apply_chat_template(
                messages, add_generation_prompt=add_generation_prompt, tokenize=True, return_dict=True
            )
            return list(out["input_ids"])
        text = "".join(f"{m['role']}: {m['content']}\n" for m in messages)
        if add_generation_prompt:
            text += "assistant: "
        return self.encode_text(text)

    def encode_next_turn(self, messages: list[dict[str, str]]) -> list[int]:
        """The template's text after an assistant reply, rendered around a sentinel reply so
        any model's template works and the sampled ids before it are never re-tokenised."""
        sentinel = "\x00SENTINEL\x00"
        msgs = [
            {"role": "system", "content": "s"},
            {"role": "user", "content": "u"},
            {"role": "assistant", "content": sentinel},
            *messages,
        ]
        if getattr(self.tokenizer, "chat_template", None):
            text = self.tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
        else:  # the fallback format of `encode_chat`
            text = "".join(f"{m['role']}: {m['content']}\n" for m in msgs) + "assistant: "
        return self.encode_text(text.split(sentinel, 1)[1])

    def encode_text(self, text: str) -> list[int]:
        return list(self.tokenizer.encode(text, add_special_tokens=False))

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    # ---- internals ----------------------------------------------------------------------

    def _base_model(self) -> Any:
        m = self.model
        return m.get_base_model() if hasattr(m, "get_base_model") else m

    def _ctx(self) -> ExitStack:
        """Autocast and, for the LoRA reference view, adapters switched off."""
        stack = ExitStack()
        if self._adapters_disabled:
            stack.enter_context(self.model.disable_adapter())
        if self.autocast_dtype is not None:
            stack.enter_context(torch.autocast(device_type=self.device.type, dtype=self.autocast_dtype))
        return stack

    def _check_ids(self, ids: list[int], where: str) -> None:
        if not ids:
            raise ValueError(f"{where}: empty token list")
        bad = [t for t in ids if not 0 <= t < self.vocab_size]
        if bad:
            raise ValueError(f"{where}: token id {bad[0]} outside the vocabulary [0, {self.vocab_size})")

    # ---- generation ---------------------------------------------------------------------

    @torch.no_grad()
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
        """Batched, left-padded, KV-cached decode; see the module docstring for the log-probs."""
        n = len(prompts)
        if n == 0:
            return []
        tries = self._generate_inputs(prompts, temperature, top_p, max_new_tokens, allowed)
        stops = [s for s in (stop or []) if s]
        # A stop string needs at most 4 tokens per character (byte-level BPE), so decoding this
        # many trailing tokens always sees a stop string the newest token completed.
        tail = 4 * max((len(s) for s in stops), default=0) + 1
        # One uniform per row and step from the row's own stream (`row_seeds`): a row's sample
        # depends neither on which other rows share the call nor on which are still decoding.
        gen = torch.Generator()
        uniforms = torch.stack([torch.rand(max_new_tokens, generator=gen.manual_seed(s))
                                for s in row_seeds(seed, n)]).to(self.device)

        dev = self.device
        lengths = [len(p) for p in prompts]
        width = max(lengths)
        ids = torch.full((n, width), self.pad_token_id, dtype=torch.long)
        attn = torch.zeros((n, width + max_new_tokens), dtype=torch.long)
        for i, p in enumerate(prompts):
            ids[i, width - len(p) :] = torch.tensor(p)
            attn[i, width - len(p) : width] = 1
        ids, attn = ids.to(dev), attn.to(dev)
        positions = (attn[:, :width].cumsum(-1) - 1).clamp(min=0)
        next_pos = torch.tensor(lengths, device=dev)

        out_ids: list[list[int]] = [[] for _ in range(n)]
        out_lp: list[list[float]] = [[] for _ in range(n)]
        reason: list[str | None] = [None] * n
        nodes = [t.root if t is not None else None for t in tries]
        rows = list(range(n))  # batch slot -> original prompt index
        cache = DynamicCache(config=self._base_model().config)
        with self._ctx():
            logits = self.model(
                input_ids=ids,
                attention_mask=attn[:, :width],
                position_ids=positions,
                use_cache=True,
                logits_to_keep=1,
                **{self._cache_kw: cache},
            ).logits[:, -1, :]
        cur = width
        for step in range(max_new_tokens):
            logits = logits.float()
            mask = self._trie_mask([nodes[r] for r in rows], logits.shape[-1])
            if mask is not None:
                logits = logits + mask
            logp = torch.log_softmax(logits, dim=-1)
            if temperature == 0:
                tok = logits.argmax(-1)
            else:
                u = uniforms[torch.tensor(rows, device=dev), step][:, None]
                tok = _sample(logits, temperature, top_p, u)
            tok_lp = logp.gather(-1, tok[:, None])[:, 0]
            toks, lps = tok.tolist(), tok_lp.tolist()

            check: list[int] = []
            for slot, r in enumerate(rows):
                if reason[r] is not None:
                    continue
                t = toks[slot]
                out_ids[r].append(t)
                out_lp[r].append(lps[slot])
                if nodes[r] is not None:
                    nodes[r] = nodes[r][t]
                    if None in nodes[r]:
                        reason[r] = "stop"  # a complete allowed sequence
                        continue
                if t in self.eos_token_ids:
                    reason[r] = "eos"
                elif stops:
                    check.append(r)
            if check:
                texts = self.tokenizer.batch_decode([out_ids[r][-tail:] for r in check], skip_special_tokens=False)
                for r, text in zip(check, texts):
                    if any(s in text for s in stops):
                        reason[r] = "stop"
            if step == max_new_tokens - 1:
                break
            done = [slot for slot, r in enumerate(rows) if reason[r] is not None]
            if len(done) == len(rows):
                break
            if len(done) >= max(1, math.ceil(self.compact_fraction * len(rows))):
                keep = [slot for slot, r in enumerate(rows) if reason[r] is None]
                keep_t = torch.tensor(keep, device=dev)
                cache.batch_select_indices(keep_t)
                attn, next_pos, tok = attn[keep_t], next_pos[keep_t], tok[keep_t]
                rows = [rows[s] for s in keep]
            attn[:, cur] = 1
            cur += 1
            with self._ctx():
                logits = self.model(
                    input_ids=tok[:, None],
                    attention_mask=attn[:, :cur],
                    position_ids=next_pos[:, None],
                    use_cache=True,
                    **{self._cache_kw: cache},
                ).logits[:, -1, :]
            next_pos = next_pos + 1

        return [
            Generation(
                token_ids=out_ids[i],
                logprobs=out_lp[i],
                text=self.decode(out_ids[i]),
                finish_reason=reason[i] or "length",  # type: ignore[arg-type]
            )
            for i in range(n)
        ]

    def _generate_inputs(
        self,
        prompts: list[list[int]],
        temperature: float,
        top_p: float,
        max_new_tokens: int,
        allowed: list[list[list[int]] | None] | None,
    ) -> list[_Trie | None]:
        """Check `generate`'s arguments (any backend's) and build each prompt's trie (or None)."""
        n = len(prompts)
        if temperature < 0 or not 0 < top_p <= 1 or max_new_tokens < 1:
            raise ValueError(
                f"generate: temperature={temperature} (>= 0), top_p={top_p} (in (0, 1]), "
                f"max_new_tokens={max_new_tokens} (>= 1)"
            )
        if allowed is not None and len(allowed) != n:
            raise ValueError(f"generate: {len(allowed)} allowed lists for {n} prompts")
        for i, p in enumerate(prompts):
            self._check_ids(p, f"generate: prompt {i}")
        return [
            _Trie(a, f"generate: allowed[{i}]") if a is not None else None
            for i, a in enumerate(allowed or [None] * n)
        ]

    def _trie_mask(self, nodes: list[dict | None], vocab: int) -> torch.Tensor | None:
        """Additive mask (0 allowed, -inf elsewhere) for the rows that follow a trie; None if none do."""
        if all(nd is None for nd in nodes):
            return None
        mask = torch.zeros((len(nodes), vocab), device=self.device)
        r_idx, t_idx = [], []
        for slot, nd in enumerate(nodes):
            if nd is None:
                continue
            mask[slot] = float("-inf")
            ch = _Trie.choices(nd)
            r_idx += [slot] * len(ch)
            t_idx += ch
        mask[torch.tensor(r_idx, device=self.device), torch.tensor(t_idx, device=self.device)] = 0.0
        return mask

    # ---- scoring ------------------------------------------------------------------------

    def score(
        self,
        segments: list[Segment],
        *,
        with_entropy: bool = False,
        max_tokens_per_chunk: int = 8192,
        loss_positions_only: bool = False,
    ) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
        """Per-token log-probs (position 0 = 0) and entropies, in the input order.

        Segments are packed into chunks of at most `max_tokens_per_chunk` tokens (count x
        longest), so memory stays bounded; sorted by their ids, so segments that share a
        prefix (turns of one episode, samples of one prompt) land in one chunk, where the
        prefix runs once (`_predicted_logits`). With `loss_positions_only`, the output
        layer runs only where loss_mask == 1 (the rest hold 0): what GRPO needs, and cheaper
        when prompts are long.
        """
        for i, s in enumerate(segments):
            self._check_ids(s.token_ids, f"score: segment {i}")
        order = sorted(range(len(segments)), key=lambda i: segments[i].token_ids)
        results: list[tuple[torch.Tensor, torch.Tensor | None]] = [None] * len(segments)  # type: ignore[list-item]
        chunk: list[int] = []
        longest = 0
        for i in order:
            longest = max(longest, len(segments[i].token_ids))
            if chunk and (len(chunk) + 1) * longest > max_tokens_per_chunk and not self.one_forward_per_score:
                self._score_chunk(segments, chunk, with_entropy, loss_positions_only, results)
                chunk, longest = [], len(segments[i].token_ids)
            chunk.append(i)
        if chunk:
            self._score_chunk(segments, chunk, with_entropy, loss_positions_only, results)
        return results

    def _score_chunk(
        self,
        segments: list[Segment],
        chunk: list[int],
        with_entropy: bool,
        loss_only: bool,
        results: list,
    ) -> None:
        dev = self.device
        segs = [segments[i] for i in chunk]
        width = max(len(s.token_ids) for s in segs)
        ids = torch.full((len(segs), width), self.pad_token_id, dtype=torch.long)
        for b, s in enumerate(segs):
            ids[b, : len(s.token_ids)] = torch.tensor(s.token_ids)
        ids = ids.to(dev)
        # predict[b, t] is True where the logits at t are needed (they predict token t + 1)
        predict = torch.zeros((len(segs), width), dtype=torch.bool)
        for b, s in enumerate(segs):
            if loss_only:
                lm = torch.tensor(s.loss_mask[1:], dtype=torch.bool)
                predict[b, : len(lm)] = lm
            else:
                predict[b, : len(s.token_ids) - 1] = True
        predict = predict.to(dev)
        targets = torch.zeros_like(ids)
        targets[:, :-1] = ids[:, 1:]

        # The flat row of each predicted position's logits (-1 where none is computed).
        flat_index = torch.full(predict.shape, -1, dtype=torch.long, device=dev)
        flat_index[predict] = torch.arange(int(predict.sum()), device=dev)

        train_mode = self.cfg.gradient_checkpointing and torch.is_grad_enabled()
        # HF's checkpointed layers run without a KV cache, which prefix sharing needs.
        plan = _shared_prefixes([s.token_ids for s in segs], predict,
                                share=not train_mode and not self.one_forward_per_score)
        if train_mode:
            self.model.train()
        try:
            with self._ctx():
                logits = self._predicted_logits(ids, [len(s.token_ids) for s in segs], predict, flat_index, plan)
        finally:
            if train_mode:
                self.model.eval()
        logits = logits.reshape(-1, logits.shape[-1]).float()  # (num predicted positions, vocab)
        flat_targets = targets[predict]

        # The trie mask of constrained segments, on their completion positions only.
        rows, cols = [], []
        for b, (i, s) in enumerate(zip(chunk, segs)):
            if s.allowed is None:
                continue
            start, end = _completion_span(s, f"score: segment {i}")
            node = _Trie(s.allowed, f"score: segment {i}.allowed").root
            for t in range(start, end):
                choices = _Trie.choices(node)
                tid = s.token_ids[t]
                if tid not in node:
                    raise ValueError(
                        f"score: segment {i}: token {tid} at position {t} is not allowed by its trie "
                        f"(allowed next: {choices[:10]})"
                    )
                row = int(flat_index[b, t - 1])
                rows += [row] * len(choices)
                cols += choices
                node = node[tid]
        if rows:
            masked = torch.zeros(logits.shape[0], dtype=torch.bool, device=dev)
            masked[torch.tensor(rows, device=dev)] = True
            add = torch.zeros_like(logits)
            add[masked] = float("-inf")
            add[torch.tensor(rows, device=dev), torch.tensor(cols, device=dev)] = 0.0
            logits = logits + add

        logp_all = torch.log_softmax(logits, dim=-1)
        tok_lp = logp_all.gather(-1, flat_targets[:, None])[:, 0]
        ent = None
        if with_entropy:
            p = logp_all.exp()
            ent = -(p * torch.where(p > 0, logp_all, torch.zeros_like(logp_all))).sum(-1)

        zero = tok_lp.new_zeros(1)
        for b, (i, s) in enumerate(zip(chunk, segs)):
            n = len(s.token_ids)
            idx = flat_index[b, : n - 1]
            have = idx >= 0
            safe = idx.clamp(min=0)
            lp = torch.cat([zero, torch.where(have, tok_lp[safe], torch.zeros_like(safe, dtype=tok_lp.dtype))])
            e = None
            if ent is not None:
                e = torch.cat([zero, torch.where(have, ent[safe], torch.zeros_like(safe, dtype=ent.dtype))])
            results[i] = (lp, e)

    def _logits(
        self, ids: torch.Tensor, attn: torch.Tensor, predict: torch.Tensor, **kw: Any
    ) -> torch.Tensor:
        """The logits at the `predict` positions, (num predicted, vocab) in row-major order."""
        if _MASK_LOGITS_TO_KEEP:
            return self.model(input_ids=ids, attention_mask=attn, logits_to_keep=predict, **kw).logits
        # older transformers (the vLLM venv's): every position, then the wanted ones
        return self.model(input_ids=ids, attention_mask=attn, **kw).logits[predict]

    def _predicted_logits(
        self,
        ids: torch.Tensor,
        lengths: list[int],
        predict: torch.Tensor,
        flat_index: torch.Tensor,
        plan: tuple[list[int], list[int], list[list[int]]],
    ) -> torch.Tensor:
        """`_logits` of a chunk, with each shared prefix of `plan` run through the model once
        and the rows batched by length (`_padding_buckets`), not padded to the longest.

        Per-step segments of one episode repeat the system prompt and skill card, and the N
        extractor samples of a source repeat its whole trajectory prompt (a quickstart update:
        73k tokens in its samples, 40k run through the model this way, 76k padded before). A causal model's keys and values at a
        position depend only on the tokens up to it, so one forward pass over the prefixes
        gives each row's past; the rows' remaining tokens (their suffixes) then run on top of
        it, at their true positions. Gradients flow back through the gathered past into the
        prefix pass, summed over the rows that share it: the loss and its gradient are the
        same function of the weights as with whole rows, up to float summation order.
        """
        dev, pad = self.device, self.pad_token_id
        starts, owner, groups = plan  # per row: prefix length, prefix index; per prefix: its rows
        config = self._base_model().config
        widest = max(starts)
        kv: list[tuple[torch.Tensor, torch.Tensor]] = []  # per layer: every prefix's keys, values
        if groups:
            prefix = [starts[rows[0]] for rows in groups]
            pieces, places = [], []
            for batch in _padding_buckets(prefix):  # short prefixes are not padded to the longest
                width = max(prefix[g] for g in batch)
                pre_ids = torch.full((len(batch), width), pad, dtype=torch.long, device=dev)
                pre_attn = torch.zeros((len(batch), width), dtype=torch.long, device=dev)
                for b, g in enumerate(batch):
                    pre_ids[b, : prefix[g]] = ids[groups[g][0], : prefix[g]]
                    pre_attn[b, : prefix[g]] = 1
                past = DynamicCache(config=config)
                self.model(input_ids=pre_ids, attention_mask=pre_attn, use_cache=True, logits_to_keep=1,
                           **{self._cache_kw: past})
                grow = (0, 0, 0, widest - width)  # to the widest prefix; the rows mask what they lack
                pieces.append([(F.pad(layer.keys, grow), F.pad(layer.values, grow)) for layer in past.layers])
                places += batch
            back = torch.tensor(places, device=dev).argsort()  # prefix index -> row of the concatenation
            kv = [
                (torch.cat([p[i][0] for p in pieces])[back], torch.cat([p[i][1] for p in pieces])[back])
                for i in range(len(pieces[0]))
            ]

        parts, where = [], []
        suffix = [n - p for n, p in zip(lengths, starts)]
        buckets = [list(range(len(suffix)))] if self.one_forward_per_score else _padding_buckets(suffix)
        for rows in buckets:
            width, past_len = max(suffix[r] for r in rows), max(starts[r] for r in rows)
            s_ids = torch.full((len(rows), width), pad, dtype=torch.long, device=dev)
            s_attn = torch.zeros((len(rows), past_len + width), dtype=torch.long, device=dev)
            s_pos = torch.zeros((len(rows), width), dtype=torch.long, device=dev)
            s_pred = torch.zeros((len(rows), width), dtype=torch.bool, device=dev)
            for b, r in enumerate(rows):
                p, n = starts[r], lengths[r]
                s_ids[b, : n - p] = ids[r, p:n]
                s_attn[b, :p] = 1
                s_attn[b, past_len : past_len + n - p] = 1
                s_pos[b] = torch.arange(p, p + width, device=dev)
                s_pred[b, : n - p] = predict[r, p:n]
                where.append(flat_index[r, p:n][predict[r, p:n]])
            kw: dict[str, Any] = {"position_ids": s_pos, "use_cache": bool(past_len)}
            if past_len:
                pick = torch.tensor([owner[r] for r in rows], device=dev)
                kw[self._cache_kw] = DynamicCache(
                    ddp_cache_data=[(k[pick, :, :past_len], v[pick, :, :past_len]) for k, v in kv], config=config
                )
            parts.append(self._logits(s_ids, s_attn, s_pred, **kw).reshape(-1, self.vocab_size))
        logits = torch.cat(parts)
        position = torch.cat(where)  # the flat row each part's row belongs to
        inverse = torch.empty_like(position)
        inverse[position] = torch.arange(len(position), device=dev)
        return logits[inverse]

    # ---- training helpers ---------------------------------------------------------------

    def parameters(self) -> Iterator[torch.nn.Parameter]:
        """The trainable weights (LoRA: the adapters; peft keeps them in float32)."""
        return (p for p in self.model.parameters() if p.requires_grad)

    def reference(self) -> HFPolicy:
        """A frozen policy for the KL term.

        Full fine-tuning: a deep copy of the current weights (double the memory). LoRA: a view
        that shares the weights and runs with the adapters disabled, i.e. the base model;
        equal to the initial policy when the adapters start at zero (peft's default).
        """
        ref = copy.copy(self)
        if self.cfg.lora.enabled:
            ref._adapters_disabled = True
        else:
            ref.model = copy.deepcopy(self.model)
            ref.model.requires_grad_(False)
            ref.model.eval()
        return ref

    def save(self, out_dir: str | Path, *, merge_lora: bool = True) -> Path:
        """Write a Hugging Face directory that `HFPolicy` (or any HF tool) loads.

        LoRA: by default merged into a copy of the base weights, so the directory is a plain
        model; `merge_lora=False` writes only the adapter (loading it then needs peft).
        """
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        model = self.model
        if self.cfg.lora.enabled and merge_lora:
            model = copy.deepcopy(self.model).merge_and_unload()
        model.save_pretrained(out)
        self.tokenizer.save_pretrained(out)
        return out


def _sample(logits: torch.Tensor, temperature: float, top_p: float, u: torch.Tensor) -> torch.Tensor:
    """One id per row from softmax(logits / temperature) cut to the top-p nucleus, by inverting
    the sorted CDF at the given uniforms `u` (shape (rows, 1))."""
    probs = torch.softmax(logits / temperature, dim=-1)
    sorted_p, sorted_i = probs.sort(dim=-1, descending=True)
    if top_p < 1:
        keep = (sorted_p.cumsum(-1) - sorted_p) < top_p  # the most likely id is always kept
        sorted_p = sorted_p * keep
    cum = sorted_p.cumsum(-1)
    u = (u * cum[:, -1:]).clamp(min=torch.finfo(cum.dtype).tiny)  # never land on a zero-probability id
    pick = torch.searchsorted(cum, u).clamp(max=cum.shape[-1] - 1)
    return sorted_i.gather(-1, pick)[:, 0]


# Tokens a shared prefix must save before it pays for its own forward call and the padding of
# the prefix pass; measured on the tiny model (smaller values gained nothing on quickstart).
_MIN_SHARED_TOKENS = 64
# A padded batch's fixed cost in tokens (a forward call's overhead on the tiny model, CPU).
_BATCH_COST_TOKENS = 64


def _shared_prefixes(
    seqs: list[list[int]], predict: torch.Tensor, share: bool = True
) -> tuple[list[int], list[int], list[list[int]]]:
    """Which rows share a prefix worth running once, for `HFPolicy._predicted_logits`.

    Returns each row's prefix length (0: none), each row's prefix index, and each prefix's
    rows; no prefixes without `share` or when none saves `_MIN_SHARED_TOKENS`. A prefix ends
    before a row's first predicted position, so every logit the caller wants comes from the
    suffix pass. Rows sorted by their ids put shared prefixes side by side; a dynamic
    programme then splits that order into runs maximising the tokens saved,
    (rows - 1) x the run's common prefix, less `_MIN_SHARED_TOKENS` per run.
    """
    n = len(seqs)
    none: tuple[list[int], list[int], list[list[int]]] = ([0] * n, [0] * n, [])
    if n < 2 or not share:
        return none
    has = predict.any(dim=1)
    first = torch.where(has, predict.float().argmax(dim=1), torch.zeros_like(has, dtype=torch.long)).tolist()
    order = sorted(range(n), key=lambda i: seqs[i])
    common = []  # shareable prefix of neighbours in `order`
    for a, b in zip(order, order[1:]):
        x, y, cap = seqs[a], seqs[b], min(first[a], first[b])
        k = 0
        while k < cap and x[k] == y[k]:
            k += 1
        common.append(k)
    best = [0] * (n + 1)  # best[j]: tokens saved over order[:j]
    start = [0] * (n + 1)  # where the last run of that optimum begins
    for j in range(1, n + 1):
        best[j], start[j] = best[j - 1], j - 1
        shared = 1 << 62
        for i in range(j - 2, -1, -1):  # the run order[i:j]
            shared = min(shared, common[i])
            if shared == 0:
                break
            gain = best[i] + (j - 1 - i) * shared - _MIN_SHARED_TOKENS
            if gain > best[j]:
                best[j], start[j] = gain, i
    if best[n] <= 0:
        return none
    starts, owner, groups = [0] * n, [0] * n, []
    j = n
    while j > 0:
        i = start[j]
        if j - i > 1:
            rows = order[i:j]
            for r in rows:
                starts[r], owner[r] = min(common[i : j - 1]), len(groups)
            groups.append(rows)
        j = i
    return starts, owner, groups


def _padding_buckets(lengths: list[int]) -> list[list[int]]:
    """Rows split into batches so padded tokens plus a per-batch cost are least (sorted by
    length, an optimal split of that order): rows whose prefix was shared have short
    suffixes, and padding them to a whole unshared row's length would give the saving back."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    cost = [0] + [1 << 62] * len(order)
    cut = [0] * (len(order) + 1)
    for j in range(1, len(order) + 1):
        longest = lengths[order[j - 1]]
        for i in range(j):
            c = cost[i] + (j - i) * longest + _BATCH_COST_TOKENS
            if c < cost[j]:
                cost[j], cut[j] = c, i
    buckets, j = [], len(order)
    while j > 0:
        buckets.append(order[cut[j] : j])
        j = cut[j]
    return buckets[::-1]
