"""Rollouts and extraction from running `vllm serve`s on other GPUs, training kept here in
transformers (issue 17; `model.backend: vllm` with `model.base_url`: one API root or a list).

`VLLMServerPolicy` is a `VLLMPolicy` (same log-prob definition, same trie mask, same forced-EOS
and stop handling, see vllm_policy.py) whose engine is a server the user starts, e.g. on GPUs
the trainer does not use, with the command `serve_command` builds (USAGE, "Scaling out"):

    VLLM_ALLOW_RUNTIME_LORA_UPDATING=1 vllm serve <model.path> --served-model-name <name> \\
        --dtype float32 --enable-lora --max-lora-rank 16 --logprobs-mode raw_logprobs \\
        --logits-processors evolving_rl.policy.vllm_policy:TrieMask --no-async-scheduling

What crosses the wire, and why it is enough:

* Weights: LoRA only. After each optimizer step the adapter (a few MB at 7B) is saved to a
  fresh directory under `model.lora_sync_dir` (a path the server sees too: a shared disk, or the
  same machine) and loaded with POST /v1/load_lora_adapter under a fresh name; the old one is
  unloaded and its directory deleted. A fresh name also keeps the server's prefix cache from
  reusing KV computed under an older adapter (vLLM keys cached blocks by adapter). Full weights
  would mean shipping the whole model per step; `model.lora.enabled: false` is refused.
* The trie: each constrained request carries its allowed id sequences in `vllm_xargs`; the
  server's `TrieMask` (the colocated backend's processor, loaded by name) masks with it.
* log Z: in-process the processor hands back logsumexp over the allowed ids; a server cannot.
  Instead the request asks for the raw log-probs of every id in its trie (`logprob_token_ids`,
  raw = log_softmax of the model's logits before temperature, top-p and the mask), and the
  client walks the trie along the sampled ids: at each step log Z = logsumexp of the raw
  log-probs of that node's children, and the masked log-prob is raw - log Z, `score`'s quantity.

At start-up a probe compares the server with the local weights: the raw log-probs of a fixed
prompt (and of a few sampled tokens) against `score`, and a constrained request against its
trie. It tells a different model, a different dtype (bf16 log-probs are ~0.05 nats off
float32's) and a server without the mask apart, each with its fix, before any rollout.

Several servers (a list in `model.base_url`; the paper's code runs several SGLang engines on
8 GPUs): a 7B model fits one GPU, so one server per GPU adds throughput with no communication
between them (unlike tensor parallelism), and the trainer is the only place they meet.
Each server is checked and probed at start-up, and every sync loads the new adapter on all of
them before any request names it (the old one is unloaded from all): every row is sampled
from the same weights, whichever server it lands on, which is what keeps the ratio at 1.
A row's server is `row seed % number of servers`: a function of the row alone (its seed fixes
its sample too), never of thread timing or of its batch-mates, so the same seeds send the same
rows to the same servers in every run and on every training process; the seeds of a batch are
consecutive (row_seeds) or per-episode-and-turn (the rollout), so the load is round-robin.
A turn's prompt may then land on another server than the last turn's, which costs that
server's prefix cache the episode's history (recomputed: throughput, never correctness).
A server that fails mid-run gets `http_request`'s retries (connection errors, 429, 5xx, with
backoff); if it is still down the generation fails naming its URL, and so does the step. There
is no failover: moving its rows would make a row's server depend on timing again, and a run
quietly at a fraction of its capacity is worse than a stop; restart the server, or drop it from
the list, and resume from the last checkpoint.
"""

from __future__ import annotations

import json
import math
import shutil
import tempfile
import uuid
import weakref
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch

from evolving_rl.policy.base import Generation, row_seeds
from evolving_rl.policy.hf import HFPolicy, _Trie
from evolving_rl.policy.openai_policy import HTTPFailure, OpenAIEndpointError, http_request
from evolving_rl.policy.vllm_policy import SERVER_ALLOWED, SERVER_EOS, VLLMPolicy, _generation
from evolving_rl.types import Segment

# The probe's tolerance (nats). Float32 on both sides differs only in summation order: measured
# <= 2.1e-5 in-process and ~1e-5 through a CPU server; a bf16 server is ~5e-2 off. Above
# _OTHER_MODEL the server is not running these weights at all.
PROBE_TOL = 1e-3
_OTHER_MODEL = 0.5


def serve_command(cfg: Any, served_model: str | None = None) -> list[str]:
    """The `vllm serve` arguments this backend needs (after VLLM_ALLOW_RUNTIME_LORA_UPDATING=1)."""
    rank = max(8, 1 << (cfg.lora.r - 1).bit_length())  # vLLM sizes LoRA buffers for powers of two
    dtype = cfg.dtype if cfg.dtype != "auto" else "float32"
    return ["--served-model-name", served_model or cfg.served_model or str(cfg.path), "--dtype", dtype,
            "--enable-lora", "--max-lora-rank", str(rank), "--logprobs-mode", "raw_logprobs",
            "--logits-processors", "evolving_rl.policy.vllm_policy:TrieMask", "--no-async-scheduling"]


def server_urls(cfg: Any) -> list[str]:
    """`cfg.base_url` as a list of API roots without a trailing slash (one URL: a list of one)."""
    urls = [cfg.base_url] if isinstance(cfg.base_url, str) else list(cfg.base_url or [])
    return [u.rstrip("/") for u in urls if u]


class VLLMServerPolicy(VLLMPolicy):
    """`VLLMPolicy` generating on the vLLM server(s) at `cfg.base_url` (see the module docstring)."""

    def __init__(self, cfg: Any, device: str | torch.device = "cpu", *, section: str = "model", **kw: Any) -> None:
        urls = server_urls(cfg)
        if not urls:
            raise ValueError(f"{section}.base_url: missing; give the vLLM server's API root, e.g. http://host:8000/v1")
        if not cfg.lora.enabled:
            raise ValueError(
                f"{section}.lora.enabled: a vLLM server ({section}.base_url) receives weight updates as LoRA "
                f"adapters; set {section}.lora.enabled: true, or drop {section}.base_url for the in-process engine"
            )
        HFPolicy.__init__(self, cfg, device, **kw)  # the trainer's weights; no engine here
        self.section = section
        self.base_urls = urls
        self.served_model = cfg.served_model or str(cfg.path)
        self._pool = ThreadPoolExecutor(max_workers=cfg.max_concurrency, thread_name_prefix="vllm-server")
        root = Path(cfg.lora_sync_dir) if cfg.lora_sync_dir else None
        if root is not None:
            root.mkdir(parents=True, exist_ok=True)
        self._adapter_root = Path(tempfile.mkdtemp(prefix="evolving-rl-adapters-", dir=root))
        self._run = uuid.uuid4().hex[:8]  # adapter names unique across trainers sharing one server
        self._syncs = 0
        self.lora_name: str | None = None
        self._finalizer = weakref.finalize(self, _cleanup, self._adapter_root, self._pool)
        self.weight_syncs = 0
        for url in self.base_urls:  # every server answers before any adapter is written
            self._check_served_model(url)
        self.sync_weights()  # the first adapter (zero at start: the base model's distribution)
        for url in self.base_urls:
            self._probe(url)

    # ---- HTTP ---------------------------------------------------------------------------

    def _http(self, url: str, route: str, body: dict | None, *, as_json: bool = True,
              retry_server_errors: bool = True) -> Any:
        return http_request(f"{url}{route}", body, self.cfg, as_json=as_json, retry_server_errors=retry_server_errors)

    def _named(self, url: str) -> str:
        """How errors name one server: its URL, and with several, which of them."""
        n = len(self.base_urls)
        return f"{self.section}.base_url={url!r}" + ("" if n == 1 else f" (server {self.base_urls.index(url) + 1} of {n})")

    def _unreachable(self, url: str, route: str, e: HTTPFailure) -> OpenAIEndpointError:
        return OpenAIEndpointError(
            f"{self._named(url)}: {route} failed after {e.attempts} attempt(s): {e}. Start that "
            f"server (`{self._command()}`) or fix {self.section}.base_url", transient=e.transient)

    def _command(self) -> str:
        return f"VLLM_ALLOW_RUNTIME_LORA_UPDATING=1 vllm serve {self.cfg.path} " + " ".join(serve_command(self.cfg))

    def _check_served_model(self, url: str) -> None:
        try:
            served = [m.get("id") for m in self._http(url, "/models", None).get("data", [])]
        except HTTPFailure as e:
            raise self._unreachable(url, "GET /models", e) from None
        if self.served_model not in served:
            raise ValueError(f"{self.section}.served_model={self.served_model!r}: the server at {url} serves "
                             f"{served}; set {self.section}.served_model to the base model's name there (every "
                             f"server in {self.section}.base_url serves it under the same name)")

    # ---- weights ------------------------------------------------------------------------

    def sync_weights(self) -> None:
        """Hand every server the trainer's current adapter under a fresh name; unload the old one.
        The new name is used only once all servers hold it, so no row samples older weights."""
        self._syncs += 1
        name = f"policy-{self._run}-{self._syncs}"
        path = self._adapter_root / name
        self.model.save_pretrained(path)  # peft: the adapter only
        for k, url in enumerate(self.base_urls):
            try:
                self._http(url, "/load_lora_adapter", {"lora_name": name, "lora_path": str(path.resolve())},
                           as_json=False, retry_server_errors=False)
            except HTTPFailure as e:
                for loaded in self.base_urls[:k]:  # the old adapter stays everyone's current one
                    self._unload(loaded, name)
                shutil.rmtree(path, ignore_errors=True)
                if e.code is None:
                    raise self._unreachable(url, "POST /load_lora_adapter", e) from None
                hint = (
                    "the server does not allow runtime LoRA updates: restart it with VLLM_ALLOW_RUNTIME_LORA_UPDATING=1"
                    if e.code in (404, 405) else
                    f"start it with --enable-lora and --max-lora-rank >= {self.cfg.lora.r}, and make "
                    f"{self.section}.lora_sync_dir a directory the server sees at the same path"
                )
                raise ValueError(f"{self._named(url)}: loading the adapter failed ({e}); {hint}. "
                                 f"The full command: `{self._command()}`") from None
        old, self.lora_name = self.lora_name, name
        if old is not None:
            for url in self.base_urls:
                self._unload(url, old)
            shutil.rmtree(self._adapter_root / old, ignore_errors=True)
        self._synced_versions = self._versions()
        self.weight_syncs += 1

    def _unload(self, url: str, name: str) -> None:
        try:
            self._http(url, "/unload_lora_adapter", {"lora_name": name}, as_json=False, retry_server_errors=False)
        except HTTPFailure:
            pass  # a leftover adapter only costs the server memory; requests name the current one

    def _complete(self, url: str, body: dict[str, Any]) -> dict[str, Any]:
        """One /completions request's only choice; a server that fails it is named with its fix."""
        try:
            return self._http(url, "/completions", body)["choices"][0]
        except HTTPFailure as e:
            raise self._unreachable(url, "POST /completions", e) from None

    # ---- the start-up probe -------------------------------------------------------------

    def _probe(self, url: str) -> None:
        prompt = self.encode_chat([{"role": "user", "content": "Your task is to: put a clean mug in the coffeemachine."}])
        body = {"model": self.lora_name, "prompt": prompt, "max_tokens": 4, "temperature": 1.0, "seed": 0,
                "logprobs": 0, "prompt_logprobs": 0, "return_tokens_as_token_ids": True, "ignore_eos": True}
        c = self._complete(url, body)
        ids, lps, _ = _parse_logprobs(c.get("logprobs"), self, url)
        served = [float(next(iter(d.values()))["logprob"]) for d in c["prompt_logprobs"][1:]]
        vocab = self._base_model().get_input_embeddings().weight.shape[0]
        if any(t >= vocab for t in ids):  # ids our vocabulary does not have
            local, gap = [], math.inf
        else:
            seg = Segment(token_ids=prompt + ids, logprobs=[0.0] * (len(prompt) + len(ids)),
                          loss_mask=[0] * len(prompt) + [1] * len(ids))
            with torch.no_grad():
                local = self.score([seg])[0][0][1:].tolist()  # position i: log p(token i | tokens < i)
            gap = max(abs(a - b) for a, b in zip(local, served + lps))
        if gap > _OTHER_MODEL:
            raise ValueError(
                f"{self._named(url)}: the server's log-probs differ from {self.section}.path's "
                f"by up to {gap:.2f} nats: it serves another model; start it on {self.cfg.path} (the trainer's weights)")
        if gap > PROBE_TOL:
            raise ValueError(
                f"{self._named(url)}: the server's log-probs differ from score() by up to "
                f"{gap:.2g} nats (> {PROBE_TOL}): its dtype differs from {self.section}.dtype={self.cfg.dtype}; "
                f"restart it with --dtype {self.cfg.dtype} (the full command: `{self._command()}`)")
        # a constrained request must follow its trie: without the server-side mask it would not
        rare = [[int(t)] for t in _least_likely(self, prompt, 2)]
        g = self._one(url, self.lora_name, prompt, _Trie(rare, "probe"), rare, 1.0, 1.0, 2, None, 0)
        if g.token_ids not in rare:
            raise ValueError(
                f"{self._named(url)}: the server ignored the admissible-action mask (sampled "
                f"{g.token_ids}, allowed {rare}); restart it with --logits-processors "
                f"evolving_rl.policy.vllm_policy:TrieMask (the full command: `{self._command()}`)")

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
        model = self.served_model if self._adapters_disabled else self.lora_name
        seeds = row_seeds(seed, len(prompts))
        rows = allowed or [None] * len(prompts)
        urls = self.base_urls
        futures = [  # a row's server: its seed's, see the module docstring
            self._pool.submit(self._one, urls[seeds[i] % len(urls)], model, list(p), trie, a, temperature, top_p,
                              max_new_tokens, stop, seeds[i])
            for i, (p, trie, a) in enumerate(zip(prompts, tries, rows))
        ]
        return [f.result() for f in futures]

    def _one(self, url: str, model: str, prompt: list[int], trie: _Trie | None, allowed: list[list[int]] | None,
             temperature: float, top_p: float, max_new_tokens: int, stop: list[str] | None, seed: int) -> Generation:
        body: dict[str, Any] = {
            "model": model, "prompt": prompt, "temperature": temperature, "top_p": top_p,
            "max_tokens": max_new_tokens + (trie is not None),  # room for the EOS that ends a trie
            "stop_token_ids": sorted(self.eos_token_ids), "skip_special_tokens": True,
            "logprobs": 0, "return_tokens_as_token_ids": True,  # the sampled id and its raw log-prob
            "seed": seed % (2**31),  # one stream per row: independent of batch-mates
        }
        stops = [s for s in (stop or []) if s]
        if stops:
            body.update(stop=stops, include_stop_str_in_output=True)
        if trie is not None:
            body["vllm_xargs"] = {SERVER_ALLOWED: json.dumps([[int(t) for t in s] for s in allowed]),
                                  SERVER_EOS: int(self.eos_token_id)}
            body["logprob_token_ids"] = sorted({int(t) for s in allowed for t in s})  # log Z's terms
        c = self._complete(url, body)
        ids, lps, top = _parse_logprobs(c.get("logprobs"), self, url)
        ended_at = None
        if trie is not None:
            node: dict | None = trie.root
            for k, t in enumerate(ids):
                if None in node:  # a complete sequence: the mask forced EOS here (dropped)
                    ended_at = k
                    break
                children = _Trie.choices(node)
                if t not in children:
                    raise ValueError(f"{self._named(url)}: the server sampled id {t} outside the "
                                     "admissible actions; start it with --logits-processors "
                                     "evolving_rl.policy.vllm_policy:TrieMask")
                lps[k] -= _logsumexp([top[k][u] for u in children])  # raw - log Z: the masked log-prob
                node = node[t]
        return _generation(self, ids, lps, ended_at, c.get("finish_reason"), max_new_tokens)

    def close(self) -> None:
        self._finalizer()


def _parse_logprobs(lp: Any, policy: VLLMServerPolicy, url: str) -> tuple[list[int], list[float], list[dict[int, float]]]:
    """(sampled ids, their raw log-probs, per step {id: raw log-prob} of the requested ids)."""
    try:
        ids = [int(t.split(":", 1)[1]) for t in lp["tokens"]]
        lps = [float(v) for v in lp["token_logprobs"]]
        top = [{int(k.split(":", 1)[1]): float(v) for k, v in (d or {}).items()} for d in lp.get("top_logprobs") or []]
    except (TypeError, KeyError, IndexError, ValueError):
        raise OpenAIEndpointError(f"{policy._named(url)}: the reply has no token-id log-probs "
                                  f"(is it a vLLM server?): {json.dumps(lp)[:300]}") from None
    return ids, lps, top


def _logsumexp(values: list[float]) -> float:
    m = max(values)
    return m + math.log(sum(math.exp(v - m) for v in values))


def _least_likely(policy: HFPolicy, prompt: list[int], n: int) -> list[int]:
    """The `n` ids the model is least likely to say next: only a working mask makes the server say them."""
    with torch.no_grad():
        logits = policy._base_model()(torch.tensor([prompt], device=policy.device)).logits[0, -1]
    banned = set(policy.eos_token_ids) | set(getattr(policy.tokenizer, "all_special_ids", []))
    order = [int(t) for t in torch.argsort(logits.float()).tolist() if int(t) not in banned]
    return order[:n]


def _cleanup(root: Path, pool: ThreadPoolExecutor) -> None:
    pool.shutdown(wait=False)
    shutil.rmtree(root, ignore_errors=True)
