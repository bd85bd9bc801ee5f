"""vLLM as the generation engine, training kept in transformers (issue 17; `model.backend: vllm`).

At the paper's scale (528 episodes of up to 50 turns per step) generation dominates; vLLM
brings paged attention, continuous batching and prefix caching (per-step prompts share
their system prompt, skill card and task). `VLLMPolicy` is an `HFPolicy` (tokenizer,
`score`, `parameters`, `reference`, `save` unchanged: the updater trains the transformers
model) whose `generate` runs on a vLLM engine holding a copy of the same weights.

What must stay exactly as `HFPolicy` defines it (hf.py's docstring): the returned log-prob
of a sampled id is its log-prob under the model's own distribution, temperature 1, no top-p
cut, with the admissible-action trie mask applied, so GRPO's first ratio is 1.

* vLLM's `raw_logprobs` mode returns log_softmax of the model's logits before temperature,
  top-p and logits processors: our definition for unconstrained rows.
* Constrained rows: the trie mask is a vLLM logits processor (`_TrieMask`), so the token is
  drawn only among allowed ids, with vLLM's own temperature and top-p. Its raw log-prob is
  normalised over the whole vocabulary, so the processor also records, per row and step,
  log Z = logsumexp of the raw logits over the allowed ids; the masked log-prob is then
  raw - log Z, exactly log_softmax(logits + mask) as `score` computes it.
* A trie that reaches the end of an allowed sequence ends the completion in HFPolicy; a
  logits processor cannot end a request, so it forces EOS on the next step and that extra
  token is dropped from the result (with the stop string "</action>" the rollout passes,
  vLLM's own stop check ends it first anyway).

Weights: after an optimizer step the transformers weights differ from the engine's. Every
in-place update bumps a tensor's version counter, so `generate` compares the parameters'
versions with those at the last sync and, if any moved, loads the current weights into the
running engine (`load_weights`, no restart) and clears its prefix cache. `sync_weights()`
does it explicitly.

LoRA (`model.lora.enabled`): the engine keeps the base weights and runs with vLLM's own
LoRA layers; a sync writes the current adapter (peft's adapter_config.json and
safetensors, a few MB at 7B) to a fresh directory and hands it to the engine as a new
`LoRARequest` with a fresh id, so no full-weight copy. A fresh id, not an in-place reload of
one id: vLLM's prefix cache keys blocks by the adapter's name and path, so KV computed under
an older adapter can never be reused. The previous adapter is removed from the engine and its
directory deleted. The first sync runs at start-up (the adapters are zero then, so the
engine's distribution is the base model's), which also checks that vLLM can apply LoRA to
`model.lora.target_modules` before any rollout. The reference view (`reference()`, adapters
disabled) samples from the base weights: no adapter.

The engine runs in this process (VLLM_ENABLE_V1_MULTIPROCESSING=0): the logits processor
reports log Z through memory shared with this object, and weights are loaded by reference.
That is the colocated setting (one device holds trainer and engine); a vLLM server on other
GPUs, with adapters synced over HTTP, is vllm_server.py (`model.base_url`).
"""

from __future__ import annotations

import functools
import itertools
import json
import os
import shutil
import tempfile
import threading
import typing
import weakref
from pathlib import Path
from typing import Any

import torch

from evolving_rl.policy.base import Generation, row_seeds
from evolving_rl.policy.hf import HFPolicy, _Trie

_ARG = "evolving_rl_trie"  # SamplingParams.extra_args key naming a request's trie
# Over HTTP (vllm_server.py) a request carries its trie itself, in `vllm_xargs` (str/int values
# only): the allowed id sequences as JSON, and the id the mask forces once one is complete.
SERVER_ALLOWED, SERVER_EOS = "evolving_rl_allowed", "evolving_rl_eos"
# key -> {"trie": _Trie, "log_z": {step: float}}; filled by `generate`, read by `_TrieMask`
# inside the (in-process) engine. A lock because vLLM may run the processor off-thread.
_REQUESTS: dict[str, dict[str, Any]] = {}
_LOCK = threading.Lock()
_KEYS = itertools.count()


def _require_vllm() -> Any:
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    if os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] != "0":
        raise RuntimeError(
            "model.backend: vllm runs its engine in this process; unset VLLM_ENABLE_V1_MULTIPROCESSING "
            "or set it to 0"
        )
    try:
        import vllm
    except ImportError:
        raise ImportError(
            "model.backend: vllm needs vLLM, which pins its own transformers: build its venv with "
            "`bash scripts/vllm_venv.sh` and run there (.venv-vllm/bin/python), or set model.backend: hf"
        ) from None
    return vllm


def _server_entry(args: dict) -> dict[str, Any] | None:
    """A request's trie from its `vllm_xargs` (a server's request: nothing is shared with the client)."""
    allowed = args.get(SERVER_ALLOWED)
    if allowed is None:
        return None
    try:
        seqs = json.loads(allowed)
        eos = int(args[SERVER_EOS])
    except (TypeError, ValueError, KeyError):
        raise ValueError(f"vllm_xargs.{SERVER_ALLOWED} must be a JSON list of token-id lists and "
                         f"vllm_xargs.{SERVER_EOS} an int") from None
    return {"trie": _Trie(seqs, f"vllm_xargs.{SERVER_ALLOWED}"), "log_z": {}, "ended": {}, "eos": eos}


def __getattr__(name: str) -> Any:
    # `vllm serve --logits-processors evolving_rl.policy.vllm_policy:TrieMask` loads it by name;
    # built lazily so that importing this module needs no vLLM
    if name == "TrieMask":
        return _trie_mask_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


@functools.cache
def _trie_mask_class() -> type:
    """The logits processor, built on first use so that importing this module needs no vLLM."""
    from vllm.v1.sample.logits_processor import BatchUpdate, LogitsProcessor, MoveDirectionality

    class _TrieMask(LogitsProcessor):
        """Rows whose request names a trie may only produce its continuations (see module doc).

        In-process a request names its trie by key (`_REQUESTS`, which also receives log Z); in a
        server it carries the trie in `vllm_xargs` and the client computes log Z itself from the
        raw log-probs of the trie's ids (vllm_server.py).
        """

        @classmethod
        def validate_params(cls, sampling_params: Any) -> None:
            _server_entry(sampling_params.extra_args or {})  # a malformed trie is an HTTP 400, not a dead engine

        def __init__(self, vllm_config: Any, device: torch.device, is_pin_memory: bool) -> None:
            # Both would silently break the log-prob definition, so a server refuses to start.
            if vllm_config.scheduler_config.async_scheduling:
                raise ValueError("evolving_rl TrieMask: the trie walk needs each request's final output ids; "
                                 "start vLLM with --no-async-scheduling")
            if vllm_config.model_config.logprobs_mode != "raw_logprobs":
                raise ValueError("evolving_rl TrieMask: log-probs must be the model's own, before temperature, "
                                 "top-p and the mask; start vLLM with --logprobs-mode raw_logprobs")
            self.rows: dict[int, tuple[dict[str, Any], list[int]]] = {}  # batch row -> (entry, live output ids)

        def is_argmax_invariant(self) -> bool:
            return False  # it changes which id is the most likely

        def update_state(self, batch_update: BatchUpdate | None) -> None:
            if batch_update is None:
                return
            for index in batch_update.removed:
                self.rows.pop(index, None)
            for index, params, _, output_ids in batch_update.added:
                args = (params.extra_args or {}) if params is not None else {}
                if _ARG in args:
                    with _LOCK:
                        entry = _REQUESTS.get(args[_ARG])
                else:
                    entry = _server_entry(args)
                if entry is None:
                    self.rows.pop(index, None)
                else:
                    self.rows[index] = (entry, output_ids)
            for a, b, direction in batch_update.moved:
                ra, rb = self.rows.pop(a, None), self.rows.pop(b, None)
                if ra is not None:
                    self.rows[b] = ra
                if direction == MoveDirectionality.SWAP and rb is not None:
                    self.rows[a] = rb

        def apply(self, logits: torch.Tensor) -> torch.Tensor:
            if not self.rows:
                return logits
            rows, cols, log_z_rows = [], [], []
            with _LOCK:
                for index, (entry, output_ids) in self.rows.items():
                    node = entry["trie"].root
                    for t in output_ids:
                        node = node.get(t) if node is not None else None
                    step = len(output_ids)
                    if node is None or None in node:
                        # the allowed sequence is complete (or left): end it with EOS, dropped later
                        choices = [entry["eos"]]
                        entry["ended"].setdefault(step, True)
                    else:
                        choices = _Trie.choices(node)
                    rows += [index] * len(choices)
                    cols += choices
                    log_z_rows.append((index, entry, step, choices))
            if not rows:
                return logits
            r = torch.tensor(rows, device=logits.device)
            c = torch.tensor(cols, device=logits.device)
            allowed = torch.zeros_like(logits, dtype=torch.bool)
            allowed[r, c] = True
            raw = logits.float()
            # log Z over the allowed ids, from the raw logits (before the mask): raw - log Z is
            # then log_softmax(logits + mask), `score`'s quantity.
            lse_all = torch.logsumexp(raw, dim=-1)
            with _LOCK:
                for index, entry, step, choices in log_z_rows:
                    allowed_lse = torch.logsumexp(raw[index, choices], dim=-1)
                    entry["log_z"][step] = float(allowed_lse - lse_all[index])
            masked_rows = torch.zeros(logits.shape[0], dtype=torch.bool, device=logits.device)
            masked_rows[r] = True
            logits[masked_rows] = logits[masked_rows].masked_fill(~allowed[masked_rows], float("-inf"))
            return logits

    return _TrieMask


class VLLMPolicy(HFPolicy):
    """`HFPolicy` whose `generate` runs on an in-process vLLM engine (see the module docstring).

    `engine_kwargs` go to `vllm.LLM` (e.g. `gpu_memory_utilization`, `kv_cache_memory_bytes`,
    `tensor_parallel_size`); on CPU vLLM reserves `gpu_memory_utilization` of host RAM for
    its KV cache unless `kv_cache_memory_bytes` is given, hence the small default.
    """

    def __init__(self, cfg: Any, device: str | torch.device = "cpu", *, engine_kwargs: dict | None = None, **kw: Any) -> None:
        vllm = _require_vllm()  # before loading anything: a missing vLLM fails at once
        lora_rank = _engine_lora_rank(cfg.lora.r) if cfg.lora.enabled else None
        super().__init__(cfg, device, **kw)
        kwargs: dict[str, Any] = {
            "dtype": {"float32": "float32", "bfloat16": "bfloat16", "float16": "float16"}.get(cfg.dtype, "auto"),
            "max_model_len": self.max_context_tokens,
            "seed": 0,
            "logprobs_mode": "raw_logprobs",  # our log-prob definition, before temperature/top-p
            "logits_processors": [_trie_mask_class()],
            "enable_prefix_caching": True,
            "enforce_eager": self.device.type == "cpu",
            # the trie walk reads each request's output ids: they must be final, not placeholders
            "async_scheduling": False,
        }
        if self.device.type == "cpu":
            kwargs.update(gpu_memory_utilization=0.05, kv_cache_memory_bytes=512 << 20)
        if lora_rank is not None:
            # one adapter live at a time (the current policy's); room for two while a sync swaps
            # them. vLLM holds the adapter in the base weights' dtype (float32 in the tests).
            kwargs.update(enable_lora=True, max_lora_rank=lora_rank, max_loras=1, max_cpu_loras=2)
        kwargs.update(engine_kwargs or {})
        self.engine = vllm.LLM(model=str(cfg.path), tokenizer=str(cfg.path), **kwargs)
        self._sampling_params = vllm.SamplingParams
        self._synced_versions = self._versions()
        self.weight_syncs = 0
        self.lora_request: Any = None  # the engine's current adapter (LoRA only)
        if lora_rank is not None:
            self._adapter_root = Path(tempfile.mkdtemp(prefix="evolving-rl-vllm-lora-"))
            weakref.finalize(self, shutil.rmtree, self._adapter_root, True)
            self._lora_ids = itertools.count(1)
            self.sync_weights()

    # ---- weights ------------------------------------------------------------------------

    def _versions(self) -> list[int]:
        return [p._version for p in self._base_model().parameters()]

    def sync_weights(self) -> None:
        """Load the transformers model's current weights (LoRA: its adapter) into the engine (no restart)."""
        if self.cfg.lora.enabled:
            self._sync_adapter()
        else:
            state = [(k, v.detach()) for k, v in self._base_model().state_dict().items()]
            # vLLM's in-place reload, not `model.load_weights`: after loading, vLLM repacks weights
            # into its kernels' layouts (oneDNN on CPU, fused qkv/gate_up everywhere), and the
            # reload path redoes that processing from checkpoint-format tensors.
            self.engine.collective_rpc("reload_weights", kwargs={"weights_iterator": iter(state), "is_checkpoint_format": True})
        self.engine.reset_prefix_cache()  # cached KV was computed by the old weights
        self._synced_versions = self._versions()
        self.weight_syncs += 1

    def _sync_adapter(self) -> None:
        from vllm.lora.request import LoRARequest

        lora_id = next(self._lora_ids)
        path = self._adapter_root / f"adapter-{lora_id}"
        self.model.save_pretrained(path)  # peft: the adapter only
        request = LoRARequest(lora_name=f"policy-{lora_id}", lora_int_id=lora_id, lora_path=str(path))
        try:
            # loaded now rather than with the next request, so a bad adapter fails here
            self.engine.llm_engine.add_lora(request)
        except Exception as e:  # vLLM raises ValueError/RuntimeError/KeyError for adapters it cannot apply
            shutil.rmtree(path, ignore_errors=True)
            raise ValueError(
                f"model.lora: vLLM could not load the adapter (target_modules={list(self.cfg.lora.target_modules)}, "
                f"r={self.cfg.lora.r}): {type(e).__name__}: {e}. Target modules vLLM supports for this model "
                "(Llama/Qwen: q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj), or use model.backend: hf"
            ) from None
        old, self.lora_request = self.lora_request, request
        if old is not None:
            self.engine.llm_engine.remove_lora(old.lora_int_id)
            shutil.rmtree(old.lora_path, ignore_errors=True)

    def _sync_if_stale(self) -> None:
        if self._adapters_disabled:
            return  # the LoRA reference view samples from the base weights, which never change
        if self._versions() != self._synced_versions:
            self.sync_weights()

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
        if not prompts:
            return []
        tries = self._generate_inputs(prompts, temperature, top_p, max_new_tokens, allowed)
        self._sync_if_stale()
        seeds = row_seeds(seed, len(prompts))
        keys: list[str | None] = []
        params = []
        for i, trie in enumerate(tries):
            key = None
            if trie is not None:
                key = f"t{next(_KEYS)}"
                with _LOCK:
                    _REQUESTS[key] = {"trie": trie, "log_z": {}, "ended": {}, "eos": self.eos_token_id}
            keys.append(key)
            params.append(
                self._sampling_params(
                    temperature=temperature,
                    top_p=top_p,
                    max_tokens=max_new_tokens + (trie is not None),  # room for the EOS that ends a trie
                    stop=[s for s in (stop or []) if s] or None,
                    include_stop_str_in_output=True,
                    stop_token_ids=sorted(self.eos_token_ids),
                    logprobs=0,  # the sampled id's log-prob only
                    seed=seeds[i] % (2**31),  # one stream per row: independent of batch-mates
                    skip_special_tokens=True,
                    extra_args={_ARG: key} if key else None,
                )
            )
        try:
            outputs = self.engine.generate(
                [{"prompt_token_ids": list(p)} for p in prompts], params, use_tqdm=False,
                lora_request=None if self._adapters_disabled else self.lora_request,
            )
            results = []
            for out, key in zip(outputs, keys):
                c = out.outputs[0]
                ids = list(c.token_ids)
                lps = [float(step[t].logprob) for step, t in zip(c.logprobs, ids)]
                ended_at = None
                if key is not None:
                    entry = _REQUESTS[key]
                    ended = sorted(entry["ended"])
                    ended_at = ended[0] if ended else None
                    lps = [lp - entry["log_z"][k] for k, lp in enumerate(lps[: ended_at])]
                results.append(_generation(self, ids, lps, ended_at, c.finish_reason, max_new_tokens))
            return results
        finally:
            with _LOCK:
                for key in keys:
                    if key is not None:
                        _REQUESTS.pop(key, None)


def _generation(policy: HFPolicy, ids: list[int], lps: list[float], ended_at: int | None, engine_reason: str | None,
                max_new_tokens: int) -> Generation:
    """One completion as `HFPolicy.generate` returns it, from what vLLM sampled (either engine).

    `ended_at`: the step where a trie sequence was complete, so the mask forced EOS there; that
    token (vLLM could not end the request itself) is dropped and the completion ends by "stop".
    """
    reason = "length"
    if ended_at is not None and ended_at < len(ids):
        ids, lps, reason = ids[:ended_at], lps[:ended_at], "stop"
    if reason != "stop":
        if ids and ids[-1] in policy.eos_token_ids:
            reason = "eos"
        elif engine_reason == "stop":
            reason = "stop"
    ids, lps = ids[:max_new_tokens], lps[:max_new_tokens]
    return Generation(token_ids=ids, logprobs=lps, text=policy.decode(ids), finish_reason=reason)


def _engine_lora_rank(r: int) -> int:
    """vLLM sizes its LoRA buffers for one of a few ranks: the smallest that holds `r`."""
    from vllm.config.lora import MaxLoRARanks

    ranks = sorted(typing.get_args(MaxLoRARanks))
    fits = [k for k in ranks if k >= r]
    if not fits:
        raise ValueError(f"model.lora.r={r}: vLLM serves LoRA ranks up to {ranks[-1]}; lower model.lora.r "
                         "or use model.backend: hf")
    return fits[0]
