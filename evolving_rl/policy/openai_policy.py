"""Any served model as solver and/or extractor: OpenAI-compatible chat completions (issue 18;
`model.backend: openai` for both roles, `extractor_model.backend: openai` for the extractor
alone, builders.build_extractor). vLLM, SGLang, llama.cpp and Ollama servers all speak this API.

Inference only: the weights live on the server, so there is nothing to step and `score`
cannot re-score ids under the policy; training refuses this backend (`refuse_training`).

The rollout, the extractor and the service speak token ids (the `Policy` protocol). The ids
are made here with the served model's own tokenizer (`model.path`, a local copy of it), and
`encode_chat` remembers which messages produced which ids, so `generate` sends the
*messages* to /chat/completions and the server applies its chat template. A prompt that is
not a remembered `encode_chat` result (a multi-turn continuation, a prompt cut to the service's
cap) goes to /completions as decoded text, since no messages exist for it.

What comes back: the reply text; its token ids and per-token log-probs when the server returns
them (vLLM does, with `return_tokens_as_token_ids`), else empty lists. These log-probs are the
server's, not the masked temperature-1 quantity `HFPolicy` defines, so they are for reading
(uncertainty, logging), never for a GRPO ratio.

Admissible actions (`allowed`): each allowed id sequence is decoded to its text (e.g.
"<action>look</action>") and sent as a constrained choice (vLLM's `structured_outputs.choice`,
and the older `guided_choice`). Servers that ignore both still answer; the reply is then checked
against the choices and, when it is none of them, replaced by the closest choice by action text
(`finish_reason` stays what the server said) so the env always gets an admissible action; the
count of such repairs is `self.repaired`.
"""

from __future__ import annotations

import json
import math
import os
import random
import threading
import time
from collections import OrderedDict
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch

from evolving_rl.policy.base import Generation, row_seeds


class OpenAIEndpointError(RuntimeError):
    """The server could not be reached or answered badly; the message names base_url.
    `transient`: the last try failed on the connection, a timeout, a 429 or a 5xx, so the same
    request may succeed later (the service keeps such an episode queued instead of failing it)."""

    def __init__(self, message: str, *, transient: bool = False) -> None:
        super().__init__(message)
        self.transient = transient


def refuse_training(cfg: Any) -> None:
    """Training needs local weights; a served model has none here."""
    if getattr(cfg.model, "backend", None) == "openai":
        raise ValueError(
            "model.backend: openai is inference only (the weights are on the server): train with "
            "model.backend: hf or vllm, then serve the checkpoint and evaluate/serve/evolve with openai"
        )


class OpenAIPolicy:
    """A `Policy` whose `generate` calls an OpenAI-compatible server (see the module docstring)."""

    # generate may run from several threads at once (requests go through its own bounded pool and
    # the server batches them), so the service does not hold actions back while it extracts
    thread_safe = True
    # inference only: score() never runs under FSDP here
    one_forward_per_score = False

    def __init__(self, cfg: Any, *, tokenizer: Any = None, section: str = "model") -> None:
        # `section`: the config section `cfg` came from (model, extractor_model), named in errors
        if not cfg.base_url:
            raise ValueError(f"{section}.backend: openai needs {section}.base_url (e.g. http://127.0.0.1:8000/v1)")
        if isinstance(cfg.base_url, list):  # inference only: spreading it is a load balancer's job
            raise ValueError(f"{section}.base_url: a list of servers works with {section}.backend: vllm only; backend "
                             "openai takes one API root: give one URL, or a load balancer's in front of the servers")
        self.cfg = cfg
        self.section = section
        self.base_url = cfg.base_url.rstrip("/")
        self.served_model = cfg.served_model or str(cfg.path)
        self.api_key = None
        if cfg.api_key_env:
            self.api_key = os.environ.get(cfg.api_key_env)
            if not self.api_key:
                raise ValueError(
                    f"{section}.api_key_env={cfg.api_key_env!r}: that environment variable is unset or empty; "
                    "export it (the key never goes in the config file)"
                )
        if tokenizer is None:
            from transformers import AutoTokenizer

            path = Path(cfg.path)
            if not (path / "tokenizer_config.json").is_file() and not (path / "tokenizer.json").is_file():
                raise ValueError(
                    f"{section}.path={cfg.path!r}: backend openai needs a local copy of the served model's "
                    "tokenizer there (tokenizer.json / tokenizer_config.json) to count and encode prompts"
                )
            tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        self.tokenizer = tokenizer
        eos = tokenizer.eos_token_id
        if eos is None:
            raise ValueError(f"{section}.path={cfg.path!r}: the tokenizer defines no eos_token")
        self.eos_token_id = int(eos)
        self.eos_token_ids = {self.eos_token_id}
        pad = tokenizer.pad_token_id
        self.pad_token_id = int(pad if pad is not None else eos)
        self.max_context_tokens = cfg.max_context_tokens or _context_size(Path(cfg.path), tokenizer)
        # ids -> messages of recent `encode_chat` calls; bounded (a long run makes millions)
        self._messages: OrderedDict[tuple[int, ...], list[dict[str, str]]] = OrderedDict()
        self._lock = threading.Lock()
        self._pool = ThreadPoolExecutor(max_workers=cfg.max_concurrency, thread_name_prefix="openai-policy")
        self.repaired = 0
        self.requests = 0

    # ---- text <-> ids -------------------------------------------------------------------

    def encode_chat(self, messages: list[dict[str, str]], add_generation_prompt: bool = True) -> list[int]:
        from evolving_rl.policy.hf import HFPolicy

        # the same ids HFPolicy makes (its template logic needs only self.tokenizer), so a prompt
        # cap or a context check means the same on either backend
        ids = HFPolicy.encode_chat(self, messages, add_generation_prompt)
        if add_generation_prompt:
            with self._lock:
                self._messages[tuple(ids)] = [dict(m) for m in messages]
                while len(self._messages) > 4096:
                    self._messages.popitem(last=False)
        return ids

    def encode_next_turn(self, messages: list[dict[str, str]]) -> list[int]:
        from evolving_rl.policy.hf import HFPolicy

        return HFPolicy.encode_next_turn(self, messages)  # template-only: needs just self.tokenizer

    def encode_text(self, text: str) -> list[int]:
        return list(self.tokenizer.encode(text, add_special_tokens=False))

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    # ---- HTTP ---------------------------------------------------------------------------

    def _post(self, route: str, body: dict) -> dict:
        """POST with a timeout and retries with exponential backoff on connection errors, 429
        and 5xx; a 4xx other than 429 is the request's fault and fails at once."""
        try:
            out = http_request(f"{self.base_url}{route}", body, self.cfg, api_key=self.api_key)
        except HTTPFailure as e:
            raise OpenAIEndpointError(
                f"{self.section}.base_url={self.base_url!r}: POST {route} failed after {e.attempts} attempt(s): {e}. "
                f"Check that the server is up, that {self.section}.served_model names a model it serves, and the API key",
                transient=e.transient,
            ) from None
        self.requests += 1
        return out

    # ---- generation ---------------------------------------------------------------------

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
        if allowed is not None and len(allowed) != len(prompts):
            raise ValueError(f"generate: {len(allowed)} allowed lists for {len(prompts)} prompts")
        rows = allowed or [None] * len(prompts)
        seeds = [None] * len(prompts) if seed is None else [s % (2**31) for s in row_seeds(seed, len(prompts))]
        futures = [
            self._pool.submit(self._one, list(p), a, temperature, top_p, max_new_tokens, stop, seeds[i])
            for i, (p, a) in enumerate(zip(prompts, rows))
        ]
        return [f.result() for f in futures]

    def _one(self, prompt: list[int], allowed: list[list[int]] | None, temperature: float, top_p: float,
             max_new_tokens: int, stop: list[str] | None, seed: int | None) -> Generation:
        with self._lock:
            messages = self._messages.get(tuple(prompt))
        choices = [self.decode(s) for s in allowed] if allowed else None
        body: dict[str, Any] = {
            "model": self.served_model,
            "temperature": temperature,
            "top_p": top_p,
            "max_tokens": max_new_tokens,
            "logprobs": True if messages is not None else 0,
            # vLLM: tokens as "token_id:N", so ids come back exactly (other servers ignore it)
            "return_tokens_as_token_ids": True,
            "skip_special_tokens": True,
        }
        stops = [s for s in (stop or []) if s]
        if stops:
            body["stop"] = stops
            body["include_stop_str_in_output"] = True  # vLLM; the rollout parses "</action>"
        if seed is not None:
            body["seed"] = seed
        if choices:
            body["structured_outputs"] = {"choice": choices}
            body["guided_choice"] = choices
        if messages is not None:
            body["messages"] = messages
            body["top_logprobs"] = 0
            out = self._post("/chat/completions", body)
        else:
            body["prompt"] = self.decode(prompt)
            out = self._post("/completions", body)
        return self._parse(out, choices, stop=stops, chat=messages is not None)

    def _parse(self, out: dict, choices: list[str] | None, *, stop: list[str], chat: bool) -> Generation:
        try:
            c = out["choices"][0]
            text = (c["message"]["content"] if chat else c["text"]) or ""
            reason = c.get("finish_reason") or "stop"
        except (KeyError, IndexError, TypeError):
            raise OpenAIEndpointError(
                f"{self.section}.base_url={self.base_url!r}: the reply has no choices[0] text: {json.dumps(out)[:300]}"
            ) from None
        matched = c.get("stop_reason")  # vLLM/SGLang: the stop string that ended it (None for EOS)
        if isinstance(matched, str) and matched in stop and not text.endswith(matched):
            text += matched  # a server that drops the matched stop string: the parser expects it
        ids, lps = _token_logprobs(c.get("logprobs"), chat)
        if choices and text not in choices:
            text = _closest(text, choices)
            ids, lps = [], []
            self.repaired += 1
        if ids and any(lp is None or not math.isfinite(lp) for lp in lps):
            ids, lps = [], []
        finish = "length" if reason == "length" else ("eos" if ids and ids[-1] in self.eos_token_ids else "stop")
        return Generation(token_ids=ids, logprobs=lps, text=text, finish_reason=finish)

    # ---- what training would need: refused -------------------------------------------------

    def score(self, segments, *, with_entropy: bool = False, loss_positions_only: bool = False):
        raise NotImplementedError("model.backend: openai cannot score ids (inference only); train with hf or vllm")

    def parameters(self) -> Iterable[torch.nn.Parameter]:
        return iter(())

    def reference(self) -> OpenAIPolicy:
        raise NotImplementedError("model.backend: openai has no frozen reference (inference only)")

    def save(self, out_dir: str | Path) -> Path:
        raise NotImplementedError("model.backend: openai has no local weights to save")

    def close(self) -> None:
        self._pool.shutdown(wait=False)


class HTTPFailure(Exception):
    """The last try's failure; `code` is the HTTP status (None: no answer)."""

    def __init__(self, message: str, *, code: int | None, transient: bool, attempts: int) -> None:
        super().__init__(message)
        self.code, self.transient, self.attempts = code, transient, attempts


def http_request(url: str, body: dict | None, cfg: Any, *, api_key: str | None = None, as_json: bool = True,
                 retry_server_errors: bool = True) -> Any:
    """POST `body` (GET when None) with cfg.request_timeout_s, retrying with exponential backoff
    (cfg.max_retries, cfg.retry_backoff_s) on connection errors, 429 and 5xx (unless
    `retry_server_errors` is off: a 5xx that is the request's fault); any other 4xx fails at once.
    Shared by the OpenAI backend and the vLLM-server backend (vllm_server.py)."""
    import urllib.error
    import urllib.request

    headers = {"Content-Type": "application/json"}
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    data = None if body is None else json.dumps(body).encode()
    last, code, transient = "", None, False
    for attempt in range(cfg.max_retries + 1):
        if attempt:
            time.sleep(min(30.0, cfg.retry_backoff_s * 2 ** (attempt - 1)) * (0.5 + random.random() / 2))
        try:
            req = urllib.request.Request(url, data=data, headers=headers, method="GET" if body is None else "POST")
            with urllib.request.urlopen(req, timeout=cfg.request_timeout_s) as resp:
                raw = resp.read()
            return json.loads(raw) if as_json else raw.decode(errors="replace")
        except urllib.error.HTTPError as e:
            detail = e.read()[:500].decode(errors="replace")
            last, code = f"HTTP {e.code}: {detail}", e.code
            transient = e.code == 429 or (e.code >= 500 and retry_server_errors)
            if not transient:
                break
        except (urllib.error.URLError, TimeoutError, ConnectionError, OSError) as e:
            last, code, transient = f"{type(e).__name__}: {getattr(e, 'reason', e)}", None, True
        except json.JSONDecodeError:
            last, code, transient = "the reply is not JSON", None, False
            break
    raise HTTPFailure(last, code=code, transient=transient, attempts=attempt + 1)


def _context_size(path: Path, tokenizer: Any) -> int:
    """The model's own max_position_embeddings when its config.json is there, else the
    tokenizer's model_max_length (transformers stores a huge sentinel when unknown), else 4096."""
    try:
        n = json.loads((path / "config.json").read_text()).get("max_position_embeddings")
        if isinstance(n, int) and n > 0:
            return n
    except (OSError, ValueError):
        pass
    n = getattr(tokenizer, "model_max_length", 0) or 0
    return int(n) if 0 < n < 1 << 24 else 4096


def _token_logprobs(lp: Any, chat: bool) -> tuple[list[int], list[float]]:
    """(ids, log-probs) from either API's logprobs block, when every token is an id ("token_id:N")."""
    if not lp:
        return [], []
    if chat:
        entries = lp.get("content") or []
        tokens = [e.get("token", "") for e in entries]
        values = [e.get("logprob") for e in entries]
    else:
        tokens = lp.get("tokens") or []
        values = lp.get("token_logprobs") or []
    ids = []
    for t in tokens:
        if not isinstance(t, str) or not t.startswith("token_id:"):
            return [], []
        try:
            ids.append(int(t.split(":", 1)[1]))
        except ValueError:
            return [], []
    return ids, [float(v) if v is not None else math.nan for v in values]


def _closest(text: str, choices: list[str]) -> str:
    """The choice whose action text the reply names (exact, then contained, then most shared words)."""
    from evolving_rl.prompts import parse_action

    said, _ = parse_action(text)
    said = said.strip().lower()
    actions = [parse_action(c)[0].strip().lower() for c in choices]
    for a, c in zip(actions, choices):
        if a == said:
            return c
    for a, c in zip(actions, choices):
        if said and (said in a or a in said):
            return c
    words = set(said.split())
    return max(zip(actions, choices), key=lambda ac: len(words & set(ac[0].split())))[1]
