"""The trainer on the real ALFWorld engine with a tiny model: GRPO steps, checkpoints, and
resume after kill -9 with the step counter, optimizer state and curves continuous."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

pytestmark = pytest.mark.slow


def _train_rows(run_dir):
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x.strip()]
    return [r for r in rows if r["kind"] == "train"]


def test_grpo_step_trains_and_checkpoints(games_dir, tiny_model, tmp_path, make_config):
    from evolving_rl.train import Trainer

    cfg = make_config(games_dir, tiny_model, tmp_path / "run", "train.steps=1", "eval.splits=[eval_seen]")
    trainer = Trainer(cfg)
    try:
        before = [p.detach().clone() for p in trainer.policy.model.parameters()]
        trainer.fit()
    finally:
        trainer.close()
    rows = _train_rows(tmp_path / "run")
    assert len(rows) == 1 and rows[0]["rollout/episodes"] == 4 and rows[0]["loss/solver/samples"] > 0
    assert rows[0]["loss/optimizer_stepped"] == 1
    changed = any(not torch.equal(a, b) for a, b in zip(before, trainer.policy.model.parameters()))
    assert changed or rows[0]["loss/zero_adv_group_share"] == 1.0  # all-equal groups leave only KL (0 at step 0)
    ckpt = tmp_path / "run" / "checkpoints"
    assert (ckpt / "latest").read_text() == "step_000001"
    assert (ckpt / "step_000001" / "model" / "config.json").exists()
    assert (tmp_path / "run" / "config.yaml").exists() and (tmp_path / "run" / "eval" / "final.json").exists()
    with pytest.raises(FileExistsError, match="--resume"):
        Trainer(cfg)


def test_resume_after_kill_9(games_dir, tiny_model, tmp_path, make_config):
    from evolving_rl.config import save_config
    from evolving_rl.train import Trainer

    run = tmp_path / "run"
    cfg = make_config(games_dir, tiny_model, run, "train.steps=3", "eval.splits=[eval_seen]")
    save_config(cfg, tmp_path / "cfg.yaml")
    cmd = [sys.executable, "-m", "evolving_rl.cli", "train", "--config", str(tmp_path / "cfg.yaml")]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    deadline = time.time() + 300
    try:
        while not (run / "checkpoints" / "step_000001" / "state.json").exists():
            assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
            assert time.time() < deadline, "no checkpoint within 300 s"
            time.sleep(0.2)
        time.sleep(1.0)  # now in the middle of step 2
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the trainer and its engine workers: only what we started
        proc.wait()
    latest = (run / "checkpoints" / "latest").read_text()
    saved_step = int(latest.split("_")[1])
    assert saved_step in (1, 2)
    saved = torch.load(run / "checkpoints" / latest / "trainer.pt", weights_only=False)

    trainer = Trainer(cfg, resume=True)
    try:
        assert trainer.step == saved_step
        opt = trainer.updater.optimizer.state_dict()
        assert opt["state"].keys() == saved["optimizer"]["state"].keys()
        for k, st in opt["state"].items():
            for name, v in st.items():
                assert torch.equal(torch.as_tensor(v), torch.as_tensor(saved["optimizer"]["state"][k][name])), (k, name)
        assert [r["step"] for r in _train_rows(run)] == list(range(1, saved_step + 1))
        trainer.fit()
    finally:
        trainer.close()
    assert [r["step"] for r in _train_rows(run)] == [1, 2, 3]  # continuous curves, no duplicate step
    assert (run / "checkpoints" / "latest").read_text() == "step_000003"


def test_sft_recipe_still_trains(games_dir, demos_path, tiny_model, tmp_path, make_config):
    """The warm-start recipe (configs/sft_tiny.yaml at test size): all three example kinds are
    built and a few epochs lower the loss on the expert's actions."""
    from evolving_rl.policy.hf import HFPolicy
    from evolving_rl.sft import Example, build_examples, load_demos, sft_loss, train_sft

    cfg = make_config(games_dir, tiny_model, tmp_path, "sft.epochs=3", "sft.lr=3e-3", "sft.batch_size=16",
                      "sft.warmup_steps=2", "sft.max_extractor_examples=4")
    policy = HFPolicy(cfg.model)
    examples = build_examples(policy, load_demos([str(demos_path)]), cfg.rollout, cfg.env.max_steps, skills=True,
                              seed=0, skill_use_fraction=0.5, max_extractor_examples=4)
    kinds = {e.kind for e in examples}
    assert kinds == {"solver", "solver_skill", "extractor"}
    repeated = build_examples(policy, load_demos([str(demos_path)]), cfg.rollout, cfg.env.max_steps, skills=True,
                              seed=0, skill_use_fraction=0.5, max_extractor_examples=4, extractor_repeats=3)
    count = lambda xs, k: sum(e.kind == k for e in xs)  # noqa: E731
    assert count(repeated, "extractor") == 3 * count(examples, "extractor") > 0
    assert count(repeated, "solver") == count(examples, "solver")
    solver = [e for e in examples if e.kind == "solver"][:32]
    extractor = [e for e in examples if e.kind == "extractor"]
    with torch.no_grad():
        before = [sft_loss(policy, solver)[0].item(), sft_loss(policy, extractor)[0].item()]
    metrics = train_sft(policy, examples, cfg.sft, seed=0)
    with torch.no_grad():
        after = [sft_loss(policy, solver)[0].item(), sft_loss(policy, extractor)[0].item()]
    assert metrics["steps"] > 0 and after[0] < 0.7 * before[0] and after[1] < 0.9 * before[1], (before, after)
    # constrained decoding is on: a solver reply is one admissible "<action>...</action>", and its
    # likelihood is the masked one the policy acts with (so it is never lower than the open one)
    e = solver[0]
    text = policy.decode(e.completion_ids)
    assert text.startswith("<action>") and text.endswith("</action>") and text[8:-9] in e.allowed
    open_loss = sft_loss(policy, [Example(e.prompt_ids, e.completion_ids, e.kind)])[0].item()
    assert sft_loss(policy, [e])[0].item() <= open_loss + 1e-6


def test_dagger_round_labels_the_clones_own_states(games_dir, demos_path, tiny_model, tmp_path, make_config):
    """A DAgger round on the real engine: the expert labels every state the (untrained) clone
    reached, the examples keep the clone's history but target the expert's action, and the
    round trains on demos + labels."""
    from evolving_rl.envs.base import make_suite
    from evolving_rl.policy.hf import HFPolicy
    from evolving_rl.sft import build_examples, dagger, load_demos
    from evolving_rl.common import env_options

    cfg = make_config(games_dir, tiny_model, tmp_path, "env.max_steps=5", "sft.dagger_rounds=1", "sft.dagger_games=3",
                      "sft.dagger_minutes=0.05", "sft.batch_size=8")
    policy = HFPolicy(cfg.model)
    demos = build_examples(policy, load_demos([str(demos_path)])[:2], cfg.rollout, cfg.env.max_steps, skills=False, seed=0)
    said = []
    rounds = dagger(policy, cfg, make_suite(cfg.env.name, env_options(cfg)).tasks("train"), demos, bf16=False, say=said.append)
    (r,) = rounds
    assert r["played"] == 3 and r["states"] >= 3 and 0 < r["labels"] <= r["states"]
    assert r["train"]["examples"] == len(demos) + r["labels"] and r["train"]["steps"] >= 1
    assert 0.0 <= r["agreed_with_expert"] <= 1.0 and said[0]["round"] == 1


def test_dagger_examples_target_the_expert_and_skip_unlabelled_states(tiny_model, make_config, games_dir, tmp_path):
    from evolving_rl.policy.hf import HFPolicy
    from evolving_rl.sft import solver_examples

    cfg = make_config(games_dir, tiny_model, tmp_path)
    policy = HFPolicy(cfg.model)
    adm = ["go to desk 1", "go to bed 1", "look"]
    rec = {"task": {"id": "t", "description": "put a pen in desk"}, "won": False, "steps": [
        {"observation": "You are in a room.", "admissible": adm, "action": "look", "expert": "go to desk 1"},
        {"observation": "You see nothing.", "admissible": adm, "action": "go to bed 1", "expert": None},
        {"observation": "You arrive at bed 1.", "admissible": adm, "action": "look", "expert": "go to desk 1"},
    ]}
    exs = list(solver_examples(policy, rec, cfg.rollout, 10))
    assert len(exs) == 2  # the unlabelled state teaches nothing
    assert all(policy.decode(e.completion_ids).strip().startswith("<action>go to desk 1</action>") for e in exs)
    # the history in the last prompt is what the clone did, not what the expert said
    assert "> go to bed 1" in policy.decode(exs[1].prompt_ids)


def test_lora_resume_restores_the_trained_adapters(games_dir, tiny_model, tmp_path, make_config):
    """A LoRA run resumes from the base weights plus the saved adapters, so the resumed policy
    is the one that was checkpointed (fresh adapters on merged weights would not match the
    optimizer's moments)."""
    from peft import get_peft_model_state_dict

    from evolving_rl.train import Trainer

    cfg = make_config(games_dir, tiny_model, tmp_path / "run", "train.steps=1", "eval.splits=[eval_seen]",
                      "model.lora.enabled=true", "model.lora.r=4", "model.lora.alpha=8")
    ids = torch.tensor([[1, 2, 3, 4, 5, 6]])
    trainer = Trainer(cfg)
    try:
        with torch.no_grad():  # stand in for an update: the adapters move away from their init
            for name, p in trainer.policy.model.named_parameters():
                if "lora_" in name:
                    p.add_(0.05 * torch.randn_like(p))
            trainer.step = 1
            trainer.save()
            saved = {k: v.clone() for k, v in get_peft_model_state_dict(trainer.policy.model).items()}
            before = trainer.policy.model(input_ids=ids).logits
    finally:
        trainer.close()
    resumed = Trainer(cfg, resume=True)
    try:
        state = get_peft_model_state_dict(resumed.policy.model)
        assert state.keys() == saved.keys() and all(torch.equal(state[k], saved[k]) for k in saved)
        with torch.no_grad():
            assert torch.allclose(resumed.policy.model(input_ids=ids).logits, before, atol=1e-5)
    finally:
        resumed.close()
