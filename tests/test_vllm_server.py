"""`model.backend: vllm` with `model.base_url`: rollouts from a real `vllm serve` (issue 17, item 1).

One server per module, started exactly as USAGE documents (`serve_command`) on the tiny
checkpoint on CPU, in the vLLM venv (`.venv-vllm/bin/pytest -q tests/test_vllm_server.py`); in
the main venv the server tests skip and the error paths that need no server run.

Tolerance for "the server's log-prob == score()'s": 1e-4 nats, as in test_vllm_policy.py: both
are float32 log_softmax of the same weights' logits summed in another order; measured through
the server with a random non-zero adapter: 5.5e-6 unconstrained, 1.7e-6 constrained (without the
client's log Z correction the constrained gap is 17 nats). exp(1e-4) = 1.0001 is far inside
GRPO's clip range. The server without runtime LoRA updates is tested in test_openai_policy.py,
whose plain server is that case.

Several servers (`model.base_url` a list): a second server, started for the one test that needs
it (~31 s here) and stopped by it, beside the module's; measured: gaps to score() <= 2e-5 on
both servers before and after an update that moved the old samples' log-probs by 1.6-10 nats.
"""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import time
import urllib.request

import pytest
import torch

from evolving_rl.config import ModelConfig, load_config
from evolving_rl.policy.base import row_seeds
from evolving_rl.policy.openai_policy import OpenAIEndpointError
from evolving_rl.types import Segment
from vllm_serve import REPO, free_port, sampled_logprob_gaps, vllm_server

pytestmark = pytest.mark.slow
CHECKPOINT = REPO / "checkpoints" / "tiny-alfworld-sft"
SERVED = "tiny-alfworld"
TOL = 1e-4
ACTIONS = ["go to sinkbasin 1", "go to cabinet 1", "take mug 1 from countertop 1", "look", "open fridge 1"]


def server_cfg(url: str | list[str] | None, **kw) -> ModelConfig:
    return ModelConfig(path=str(CHECKPOINT), backend="vllm", base_url=url, served_model=SERVED,
                       lora={"enabled": True, "r": 8, "alpha": 16}, **kw)


# ---- no server needed ---------------------------------------------------------------------


def test_unreachable_server_error_names_base_url_and_the_command():
    from evolving_rl.policy.vllm_server import VLLMServerPolicy

    url = f"http://127.0.0.1:{free_port()}/v1"  # nothing listens there
    with pytest.raises(OpenAIEndpointError) as e:
        VLLMServerPolicy(server_cfg(url, max_retries=1, retry_backoff_s=0.01, request_timeout_s=2))
    msg = str(e.value)
    assert "model.base_url" in msg and url in msg and "2 attempt(s)" in msg
    assert "VLLM_ALLOW_RUNTIME_LORA_UPDATING=1 vllm serve" in msg and "--logits-processors" in msg


def test_full_weights_with_a_server_are_refused_at_load():
    with pytest.raises(ValueError, match="model.lora.enabled"):
        load_config(None, ["model.backend=vllm", "model.base_url=http://127.0.0.1:1/v1"])


# ---- a real vLLM server -------------------------------------------------------------------


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    if importlib.util.find_spec("vllm") is None:
        pytest.skip("vLLM runs in its own venv: bash scripts/vllm_venv.sh && .venv-vllm/bin/pytest -q "
                    "tests/test_vllm_server.py")
    from evolving_rl.policy.vllm_server import serve_command

    args = serve_command(server_cfg(None))
    args = args[2:]  # the helper names the model itself
    with vllm_server(CHECKPOINT, SERVED, tmp_path_factory.mktemp("vllm") / "server.log", args,
                     env={"VLLM_ALLOW_RUNTIME_LORA_UPDATING": "1"}) as srv:
        yield srv


@pytest.fixture(scope="module")
def policy(server, tmp_path_factory):
    from evolving_rl.policy.vllm_server import VLLMServerPolicy

    p = VLLMServerPolicy(server_cfg(server["url"], lora_sync_dir=str(tmp_path_factory.mktemp("adapters"))))
    torch.manual_seed(0)
    with torch.no_grad():  # a non-zero adapter, so the server's answers depend on it
        for n, w in p.model.named_parameters():
            if "lora_B" in n:
                w.normal_(0.0, 0.05)
    yield p
    p.close()


def _prompts(policy, n: int) -> list[list[int]]:
    tasks = ["put a mug in the sink", "heat an egg and put it in the fridge", "look at a book under the lamp"]
    return [policy.encode_chat([
        {"role": "system", "content": "You are a household agent acting in a text world."},
        {"role": "user", "content": f"Your task is to: {tasks[i % 3]}. You are in the middle of a room."},
    ]) for i in range(n)]


def _allowed(policy) -> list[list[int]]:
    return [policy.encode_text(f"{a}</action>") for a in ACTIONS]


def _gap(policy, prompt, gen, allowed) -> float:
    seg = Segment(token_ids=prompt + gen.token_ids, logprobs=[0.0] * len(prompt) + gen.logprobs,
                  loss_mask=[0] * len(prompt) + [1] * len(gen.token_ids), allowed=allowed)
    with torch.no_grad():
        lp, _ = policy.score([seg])[0]
    return float((lp[len(prompt):] - torch.tensor(gen.logprobs)).abs().max())


def test_logprobs_agree_with_score_and_the_trie_mask_holds(policy):
    prompts = _prompts(policy, 8)
    allowed = [_allowed(policy) if i % 2 else None for i in range(8)]
    syncs = policy.weight_syncs
    gens = policy.generate(prompts, temperature=1.0, top_p=0.9, max_new_tokens=24, stop=["</action>"],
                           allowed=allowed, seed=11)
    assert policy.weight_syncs == syncs + 1  # the adapter changed after start-up: synced before generating
    gaps = [_gap(policy, p, g, a) for p, g, a in zip(prompts, gens, allowed)]
    assert max(gaps) < TOL, gaps
    assert all(len(g.token_ids) == len(g.logprobs) > 0 for g in gens)
    again = policy.generate(prompts, temperature=1.0, top_p=0.9, max_new_tokens=24, stop=["</action>"],
                            allowed=allowed, seed=11)
    assert [g.token_ids for g in again] == [g.token_ids for g in gens]  # per-row seeds honoured
    # the mask: temperature 1.5 spreads the samples; no stop string, so the trie's end alone ends them
    many = _prompts(policy, 16)
    acts = _allowed(policy)
    gens = policy.generate(many, temperature=1.5, top_p=1.0, max_new_tokens=24, allowed=[acts] * 16, seed=5)
    assert all(g.token_ids in acts and g.finish_reason == "stop" for g in gens), [g.text for g in gens]
    assert len({tuple(g.token_ids) for g in gens}) >= 2, "every sample chose the same action"
    assert max(_gap(policy, p, g, acts) for p, g in zip(many, gens)) < TOL


def test_an_optimizer_step_reaches_the_server_as_a_new_adapter(policy, server):
    prompt = _prompts(policy, 1)[0]
    allowed = _allowed(policy)
    greedy = policy.generate([prompt], temperature=0.0, top_p=1.0, max_new_tokens=24, allowed=[allowed], seed=0)[0]
    target = next(a for a in allowed if a != greedy.token_ids)  # an action the model does not prefer
    seg = Segment(token_ids=prompt + target, logprobs=[0.0] * (len(prompt) + len(target)),
                  loss_mask=[0] * len(prompt) + [1] * len(target), allowed=allowed)
    old_name, syncs = policy.lora_name, policy.weight_syncs
    opt = torch.optim.Adam([p for p in policy.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(10):  # push the target action up until it is the greedy choice
        opt.zero_grad()
        (-policy.score([seg])[0][0][len(prompt):].sum()).backward()
        opt.step()
    with torch.no_grad():
        assert float(policy.score([seg])[0][0][len(prompt):].sum().exp()) > 0.9
    after = policy.generate([prompt], temperature=0.0, top_p=1.0, max_new_tokens=24, allowed=[allowed], seed=0)[0]
    assert policy.weight_syncs == syncs + 1 and policy.lora_name != old_name
    assert after.token_ids == target and greedy.token_ids != target
    assert _gap(policy, prompt, after, allowed) < TOL  # the server holds exactly the trained adapter
    log = server["log"].read_text()
    assert f"Removed LoRA adapter: name '{old_name}'" in log  # the old one was unloaded
    assert not (policy._adapter_root / old_name).exists()
    # the reference view samples the base weights: the server's base model, no adapter
    ref = policy.reference()
    base = ref.generate([prompt], temperature=1.0, top_p=1.0, max_new_tokens=8, seed=1)[0]
    assert _gap(ref, prompt, base, None) < TOL and _gap(policy, prompt, base, None) > 1e-2


def test_a_dtype_or_model_mismatch_is_refused_with_the_fix(server, tmp_path):
    from evolving_rl.policy.vllm_server import VLLMServerPolicy

    with pytest.raises(ValueError, match="--dtype bfloat16") as e:
        VLLMServerPolicy(server_cfg(server["url"], dtype="bfloat16", lora_sync_dir=str(tmp_path)))
    gap = float(str(e.value).split("up to ")[1].split(" nats")[0])
    assert 1e-3 < gap < 0.5, e.value  # bf16 rounding, not another model
    other = ModelConfig(path=str(REPO / "checkpoints" / "tiny-twc-sft"), backend="vllm", base_url=server["url"],
                        served_model=SERVED, lora={"enabled": True, "r": 8, "alpha": 16}, lora_sync_dir=str(tmp_path))
    with pytest.raises(ValueError, match="serves another model"):
        VLLMServerPolicy(other)


def test_one_evolving_rl_step_runs_on_server_rollouts(server, games_dir, tmp_path, make_config):
    """The trainer built from config (model.base_url): rollouts and extraction on the server,
    the update here, the next rollouts on the updated adapter, all on-policy."""
    from evolving_rl.policy.vllm_server import VLLMServerPolicy
    from evolving_rl.train import Trainer

    cfg = make_config(games_dir, CHECKPOINT, tmp_path / "run", "algorithm=evolving", "train.steps=1",
                      "model.backend=vllm", f"model.base_url={server['url']}", f"model.served_model={SERVED}",
                      "model.lora.enabled=true", "model.lora.r=8", f"model.lora_sync_dir={tmp_path / 'adapters'}",
                      "eval.splits=[eval_seen]", "eval.max_tasks=1",
                      "rollout.solver.max_new_tokens=24", "rollout.extractor.max_new_tokens=64",
                      "evolving.max_trajectory_chars=3000")
    trainer = Trainer(cfg)
    try:
        policy = trainer.policy
        assert isinstance(policy, VLLMServerPolicy)


        samples, _ = trainer.algorithm.collect(0)
        before_gaps = sampled_logprob_gaps(policy, samples)
        stats = trainer.updater.update(samples)
        first = policy.lora_name
        after, _ = trainer.algorithm.collect(1)  # on the updated adapter
        after_gaps = sampled_logprob_gaps(policy, after)
        moved = max(float(p.detach().abs().max()) for n, p in policy.model.named_parameters() if "lora_B" in n)
    finally:
        trainer.close()
    assert {s.role for s in samples} == {"solver", "extractor"}
    assert stats["loss/optimizer_stepped"] == 1
    assert abs(stats["loss/approx_kl"]) < 1e-6  # on-policy: the server's log-probs are the trainer's
    assert moved > 0, "the update left the adapter at zero: the after-update check would test the base model"
    assert policy.lora_name != first  # the updated adapter went to the server
    assert max(before_gaps) < TOL and max(after_gaps) < TOL, (before_gaps, after_gaps)


# ---- several servers (model.base_url: a list) -----------------------------------------------


def _adapters(url: str, policy=None) -> set[str]:
    """The LoRA adapters the server has loaded (GET /v1/models lists them beside the base model);
    with `policy`: only that trainer's (the module's `policy` keeps its own on the first server)."""
    with urllib.request.urlopen(f"{url}/models", timeout=10) as r:
        names = {m["id"] for m in json.load(r)["data"]} - {SERVED}
    return names if policy is None else {n for n in names if n.startswith(f"policy-{policy._run}-")}


def _finished(url: str) -> float:
    """Requests the server has finished, from its Prometheus counter."""
    with urllib.request.urlopen(f"{url.removesuffix('/v1')}/metrics", timeout=10) as r:
        text = r.read().decode()
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith("vllm:request_success_total"))


def _finished_since(urls: list[str], before: list[float], expect: list[int]) -> list[float]:
    deadline = time.time() + 10  # the counter is bumped by the server's stats loop, just after the reply
    while True:
        got = [_finished(u) - b for u, b in zip(urls, before)]
        if got == expect or time.time() > deadline:
            return got
        time.sleep(0.2)


@pytest.fixture
def second_server(server, tmp_path):
    """A second server of the same checkpoint (`server` has checked that vLLM imports); the one
    test that uses it stops it."""
    from evolving_rl.policy.vllm_server import serve_command

    with vllm_server(CHECKPOINT, SERVED, tmp_path / "server2.log", serve_command(server_cfg(None))[2:],
                     env={"VLLM_ALLOW_RUNTIME_LORA_UPDATING": "1"}) as srv:
        yield srv


def test_rows_spread_over_two_servers_and_every_sync_reaches_both(server, second_server, tmp_path):
    from evolving_rl.policy.vllm_server import VLLMServerPolicy

    urls = [server["url"], second_server["url"]]
    p = VLLMServerPolicy(server_cfg(urls, lora_sync_dir=str(tmp_path / "adapters"), max_retries=1,
                                    retry_backoff_s=0.01, request_timeout_s=60))
    try:
        assert _adapters(urls[0], p) == _adapters(urls[1], p) == {p.lora_name}  # both synced and probed at start-up
        torch.manual_seed(1)
        with torch.no_grad():  # a non-zero adapter: both servers' answers depend on it
            for n, w in p.model.named_parameters():
                if "lora_B" in n:
                    w.normal_(0.0, 0.05)
        prompts = _prompts(p, 8)
        allowed = [_allowed(p) if i % 2 else None for i in range(8)]
        on = [s % 2 for s in row_seeds(11, 8)]  # each row's server: its seed's
        assert sorted(on) == [0] * 4 + [1] * 4
        before = [_finished(u) for u in urls]
        gens = p.generate(prompts, temperature=1.0, top_p=0.9, max_new_tokens=24, stop=["</action>"],
                          allowed=allowed, seed=11)
        assert _finished_since(urls, before, [4, 4]) == [4, 4]  # each server answered its 4 rows, no more
        gaps = [_gap(p, q, g, a) for q, g, a in zip(prompts, gens, allowed)]
        assert max(g for g, k in zip(gaps, on) if k == 0) < TOL and max(g for g, k in zip(gaps, on) if k == 1) < TOL
        # an optimizer step: the new adapter goes to both, the old one leaves both
        old = p.lora_name
        target = Segment(token_ids=prompts[1] + _allowed(p)[2], logprobs=[0.0] * (len(prompts[1]) + len(_allowed(p)[2])),
                         loss_mask=[0] * len(prompts[1]) + [1] * len(_allowed(p)[2]), allowed=_allowed(p))
        opt = torch.optim.Adam([w for w in p.parameters() if w.requires_grad], lr=1e-2)
        for _ in range(3):
            opt.zero_grad()
            (-p.score([target])[0][0][len(prompts[1]):].sum()).backward()
            opt.step()
        stale = [_gap(p, q, g, a) for q, g, a in zip(prompts, gens, allowed)]  # the old samples, new weights
        assert min(max(g for g, k in zip(stale, on) if k == j) for j in (0, 1)) > 1e-2  # a stale server would show
        again = p.generate(prompts, temperature=1.0, top_p=0.9, max_new_tokens=24, stop=["</action>"],
                           allowed=allowed, seed=11)
        assert p.lora_name != old and _adapters(urls[0], p) == _adapters(urls[1], p) == {p.lora_name}
        gaps = [_gap(p, q, g, a) for q, g, a in zip(prompts, again, allowed)]
        assert max(g for g, k in zip(gaps, on) if k == 0) < TOL and max(g for g, k in zip(gaps, on) if k == 1) < TOL
        # the second server goes away (stopped by its pid): the next sync names it, and the first
        # server is left serving the current adapter alone, not a half-synced new one
        os.kill(second_server["pid"], signal.SIGTERM)
        deadline = time.time() + 60
        while time.time() < deadline:
            try:
                _adapters(urls[1])
            except OSError:
                break
            time.sleep(0.5)
        current = p.lora_name
        opt.zero_grad()
        (-p.score([target])[0][0][len(prompts[1]):].sum()).backward()
        opt.step()
        with pytest.raises(OpenAIEndpointError) as e:
            p.generate(prompts[:2], temperature=1.0, top_p=1.0, max_new_tokens=8, seed=3)
        msg = str(e.value)
        assert f"model.base_url={urls[1]!r} (server 2 of 2): POST /load_lora_adapter failed" in msg, msg
        assert "vllm serve" in msg and urls[0] not in msg
        assert p.lora_name == current and _adapters(urls[0], p) == {current}
        # mid-run, with nothing to sync (the reference view): the rows on the stopped server fail naming it
        with pytest.raises(OpenAIEndpointError, match=r"\(server 2 of 2\): POST /completions failed after 2 attempt"):
            p.reference().generate(prompts[:2], temperature=1.0, top_p=1.0, max_new_tokens=8, seed=3)
    finally:
        p.close()


def test_an_unreachable_server_in_the_list_is_refused_at_start_up_naming_it(server, tmp_path):
    from evolving_rl.policy.vllm_server import VLLMServerPolicy

    dead = f"http://127.0.0.1:{free_port()}/v1"  # nothing listens there
    loaded = _adapters(server["url"])
    with pytest.raises(OpenAIEndpointError) as e:
        VLLMServerPolicy(server_cfg([server["url"], dead], lora_sync_dir=str(tmp_path), max_retries=1,
                                    retry_backoff_s=0.01, request_timeout_s=5))
    msg = str(e.value)
    assert f"model.base_url={dead!r} (server 2 of 2): GET /models failed after 2 attempt(s)" in msg, msg
    assert "VLLM_ALLOW_RUNTIME_LORA_UPDATING=1 vllm serve" in msg and server["url"] not in msg
    assert _adapters(server["url"]) == loaded  # refused before any adapter was written to the live one
