"""`extractor_model`: the extractor on another model or backend than the solver (issue 18), in
eval, serve and evolve, built in one place (builders.build_extractor).

Here the solver is the shipped tiny checkpoint on local weights and the extractor is an
OpenAI-compatible endpoint where nothing listens: the episodes play, and the first extraction
fails naming `extractor_model.base_url`, which shows each command routes extraction to the
extractor and not to the solver (the service keeps the episode queued for when it is back).
The working end to end (a real vLLM server as extractor and as solver) runs in the vLLM venv:
tests/test_openai_policy.py.
"""

from __future__ import annotations

import re
import socket
import time
from pathlib import Path

import pytest

from evolving_rl.builders import build_extractor, build_policy, extractor_name
from evolving_rl.config import ConfigError, load_config

REPO = Path(__file__).resolve().parents[1]
CHECKPOINT = REPO / "checkpoints" / "tiny-alfworld-sft"


def _dead_url() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}/v1"  # closed again: nothing listens there


def _cfg(games_dir, tmp_path, url: str, *more: str):
    return load_config(REPO / "configs" / "quickstart.yaml", [
        f"env.games_dir={games_dir}", "env.num_workers=0", "env.max_steps=3", f"model.path={CHECKPOINT}",
        "extractor_model.backend=openai", f"extractor_model.base_url={url}", f"extractor_model.path={CHECKPOINT}",
        "extractor_model.max_retries=0", f"retrieval.cache_dir={tmp_path / 'emb'}", *more])


def test_a_missing_field_is_named():
    with pytest.raises(ConfigError, match=r"extractor_model\.path: missing"):
        load_config(None, ["extractor_model.backend=hf"])
    with pytest.raises(ConfigError, match=r"extractor_model\.base_url: missing"):
        load_config(None, [f"extractor_model.path={CHECKPOINT}", "extractor_model.backend=openai"])
    with pytest.raises(ConfigError, match=r"model\.base_url: missing"):
        load_config(None, ["model.backend=openai"])
    with pytest.raises(ConfigError, match=r"extractor_model\.bas_url: unknown key"):
        load_config(None, [f"extractor_model.path={CHECKPOINT}", "extractor_model.bas_url=http://x/v1"])


def test_one_policy_in_both_roles_unless_named_and_training_refuses_two():
    from evolving_rl.policy.openai_policy import OpenAIPolicy

    cfg = load_config(None, [f"model.path={CHECKPOINT}"])
    solver = build_policy(cfg)
    assert build_extractor(cfg, solver) is solver and extractor_name(cfg) == str(CHECKPOINT)
    url = _dead_url()
    cfg = load_config(None, [f"model.path={CHECKPOINT}", "extractor_model.backend=openai",
                             f"extractor_model.base_url={url}", "extractor_model.served_model=tiny",
                             f"extractor_model.path={CHECKPOINT}"])
    ex = build_extractor(cfg, solver)
    assert isinstance(ex, OpenAIPolicy) and ex.base_url == url and ex.served_model == "tiny" and ex.section == "extractor_model"
    with pytest.raises(ValueError, match="extractor_model: training co-trains one policy"):
        build_policy(cfg, training=True)
    cfg = load_config(None, [f"model.path={CHECKPOINT}", "extractor_model.backend=openai",
                             "extractor_model.base_url=http://127.0.0.1:1/v1", f"extractor_model.path={CHECKPOINT}",
                             "extractor_model.api_key_env=EVOLVING_RL_UNSET_KEY_FOR_TEST"])
    with pytest.raises(ValueError, match=r"extractor_model\.api_key_env='EVOLVING_RL_UNSET_KEY_FOR_TEST'"):
        build_extractor(cfg, solver)


def test_serve_holds_actions_back_for_extraction_only_behind_one_local_model(tmp_path):
    pytest.importorskip("fastapi")
    from evolving_rl.serve.app import Service

    common = [f"model.path={CHECKPOINT}", "serve.extract=false", f"serve.library={tmp_path / 'skills.sqlite'}"]
    served = ["model.backend=openai", f"model.base_url={_dead_url()}"]
    for over, shared in (([], True), (served, False)):
        service = Service(load_config(None, common + over))
        try:
            assert service.extractor is service.policy  # one policy in both roles
            assert (service.extractor_lock is service.policy_lock) == shared
        finally:
            service.close()


def test_eval_one_shot_extracts_with_the_extractor(games_dir, tmp_path):
    from evolving_rl.evaluate import evaluate_checkpoint
    from evolving_rl.policy.openai_policy import OpenAIEndpointError

    url = _dead_url()
    twc = REPO / "checkpoints" / "tiny-twc-sft"  # cloned without the state line this config shows
    cfg = _cfg(games_dir, tmp_path, url, "eval.splits=[eval_seen]", "eval.max_tasks=1", f"extractor_model.path={twc}")
    said: list[str] = []
    with pytest.raises(OpenAIEndpointError, match=rf"extractor_model\.base_url='{url}'"):
        evaluate_checkpoint(cfg, str(CHECKPOINT), tmp_path, protocols=["one_shot"], console_print=said.append)
    assert said == [f"warning: {twc} was cloned on other prompts (rollout.state_line: cloned with False, this run True)"]


def test_evolve_extracts_with_the_extractor(games_dir, tmp_path):
    """Through the CLI: an unreachable extractor or a missing extractor directory is one line
    naming the field, never a traceback."""
    from typer.testing import CliRunner

    from evolving_rl.cli import app

    url = _dead_url()
    base = ["evolve", "-c", str(REPO / "configs" / "quickstart.yaml"), "--split", "eval_seen", "--max-tasks", "1",
            "--library", str(tmp_path / "skills.sqlite"), f"env.games_dir={games_dir}", "env.num_workers=0",
            "env.max_steps=3", f"model.path={CHECKPOINT}", "evolve.wave=1", f"run_dir={tmp_path}",
            f"retrieval.cache_dir={tmp_path / 'emb'}", "extractor_model.backend=openai",
            f"extractor_model.base_url={url}", "extractor_model.max_retries=0"]
    for path, named in ((CHECKPOINT, f"extractor_model.base_url='{url}'"),
                        (tmp_path / "nowhere", "extractor_model.path: no directory")):
        r = CliRunner().invoke(app, [*base, f"extractor_model.path={path}"])
        out = " ".join(r.output.split())
        assert r.exit_code == 2 and isinstance(r.exception, SystemExit | None), (r.exception, out)
        assert named in out and "Traceback" not in out, out


def test_serve_extracts_with_the_extractor(tmp_path):
    pytest.importorskip("fastapi")
    httpx = pytest.importorskip("httpx")
    from test_serve import Server  # the real `evolving-rl serve` subprocess

    url = _dead_url()
    srv = Server(tmp_path, "extractor_model.backend=openai", f"extractor_model.base_url={url}",
                 f"extractor_model.path={CHECKPOINT}", "extractor_model.max_retries=0")
    srv.start()
    try:
        c = httpx.Client(base_url=srv.url, timeout=60)
        assert c.get("/healthz").json()["extractor"] == str(CHECKPOINT)
        eid = c.post("/v1/episodes", json={"task": "put a clean mug in coffeemachine.", "env": "alfworld"}).json()["episode_id"]
        a = c.post(f"/v1/episodes/{eid}/act", json={"observation": "You are in the middle of a room.",
                                                    "admissible": ["go to sinkbasin 1", "look"]})
        assert a.status_code == 200 and a.json()["action"] in ("go to sinkbasin 1", "look")  # the local solver
        qid = c.post(f"/v1/episodes/{eid}/end", json={"success": True}).json()["queued"]
        deadline = time.time() + 60
        while (h := c.get("/healthz").json())["extractor_error"] is None and time.time() < deadline:
            time.sleep(0.2)
        assert f"extractor_model.base_url='{url}'" in (h["extractor_error"] or ""), h
        # a served extractor that is down loses no episode: it stays queued (retried), never failed
        time.sleep(2.5)  # past the first retry
        assert c.get(f"/v1/queue/{qid}").json()["state"] == "pending"
        assert c.get("/healthz").json()["queue"] == {"pending": 1, "done": 0, "failed": 0}
        tries = re.search(r'evolving_rl_extractions_total\{result="extractor_unavailable"\} (\d+)', c.get("/metrics").text)
        assert tries and int(tries[1]) >= 2
    finally:
        srv.stop()
