"""The rollout engine on the real engine with a tiny model: both prompt formats, loss masks
that cover exactly the generated tokens, constrained actions, and one policy call per turn."""

from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.slow


def _rollout(games_dir, tiny_model, make_config, tmp_path, *extra):
    from evolving_rl.envs.base import make_suite
    from evolving_rl.envs.workers import EnvPool
    from evolving_rl.policy.hf import HFPolicy
    from evolving_rl.rollout import Rollout
    from evolving_rl.common import env_options

    cfg = make_config(games_dir, tiny_model, tmp_path, "env.max_steps=4", *extra)
    policy = HFPolicy(cfg.model)
    pool = EnvPool(cfg.env.name, env_options(cfg), cfg.env.num_workers, cfg.env.step_timeout_s)
    suite = make_suite(cfg.env.name, env_options(cfg))
    return cfg, policy, pool, Rollout(policy, pool, cfg.rollout, cfg.env.max_steps), suite.tasks("train")[:3]


class CountingPolicy:
    """Wraps the real policy to count generate calls and their batch sizes."""

    def __init__(self, inner):
        self.inner, self.calls = inner, []

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def generate(self, prompts, **kw):
        self.calls.append(len(prompts))
        return self.inner.generate(prompts, **kw)


def test_per_step_episodes_batched_and_masked(games_dir, tiny_model, make_config, tmp_path):
    from evolving_rl.rollout import Job

    cfg, policy, pool, rollout, tasks = _rollout(games_dir, tiny_model, make_config, tmp_path)
    counting = CountingPolicy(policy)
    rollout.policy = counting
    try:
        eps = rollout.run([Job(t) for t in tasks] + [Job(tasks[0], "# A skill\n1. look around")], cfg.rollout.solver, seed=1)
    finally:
        pool.close()
    assert len(eps) == 4 and [e.task.id for e in eps] == [t.id for t in tasks] + [tasks[0].id]
    assert counting.calls[0] == 4 and len(counting.calls) == max(e.steps for e in eps)  # one call per turn, all live
    for ep in eps:
        assert not ep.failed and 1 <= ep.steps <= 4 and len(ep.segments) == ep.steps
        for turn in ep.turns:
            assert turn.action in turn.admissible  # constrained decoding
        for seg in ep.segments:
            n_gen = sum(seg.loss_mask)
            assert n_gen > 0 and seg.loss_mask == [0] * (len(seg.token_ids) - n_gen) + [1] * n_gen
            assert all(lp == 0.0 for lp, m in zip(seg.logprobs, seg.loss_mask) if not m)
            assert seg.allowed is not None
    assert "# A skill" in policy.decode(eps[3].segments[0].token_ids)
    assert "# A skill" not in policy.decode(eps[0].segments[0].token_ids)
    # sampling-time log-probs equal a fresh forward pass on the same ids (constraint re-applied)
    seg = eps[0].segments[0]
    with torch.no_grad():
        lp, _ = policy.score([seg])[0]
    gen = torch.tensor(seg.loss_mask, dtype=torch.bool)
    assert torch.allclose(lp[gen], torch.tensor(seg.logprobs)[gen], atol=1e-4)


def test_multi_turn_masks_observations(games_dir, tiny_model, make_config, tmp_path):
    from evolving_rl.rollout import Job

    cfg, policy, pool, rollout, tasks = _rollout(games_dir, tiny_model, make_config, tmp_path,
                                                 "rollout.prompt_format=multi_turn", "rollout.constrain_to_admissible=false",
                                                 "rollout.solver.max_new_tokens=8")
    try:
        eps = rollout.run([Job(t) for t in tasks[:2]], cfg.rollout.solver, seed=2)
    finally:
        pool.close()
    for ep in eps:
        assert len(ep.segments) == 1  # the whole episode is one growing sequence
        seg = ep.segments[0]
        runs, prev = [], 0
        for m in seg.loss_mask:  # generated spans alternate with masked env turns
            if m and not prev:
                runs.append(0)
            if m:
                runs[-1] += 1
            prev = m
        assert len(runs) == ep.steps
        text_masked = policy.decode([t for t, m in zip(seg.token_ids, seg.loss_mask) if not m])
        assert "Observation" in text_masked and "Admissible actions" in text_masked
        with torch.no_grad():
            lp, _ = policy.score([seg])[0]
        gen = torch.tensor(seg.loss_mask, dtype=torch.bool)
        assert torch.allclose(lp[gen], torch.tensor(seg.logprobs)[gen], atol=1e-4)


def test_multi_turn_over_the_cap_trains_on_exactly_the_sampled_context(games_dir, tiny_model, make_config, tmp_path):
    """Issue 15, defect 2: the prompt was cut from the left for sampling (dropping the system
    prompt and skill card first) while the full sequence was stored and trained, 3.45 nats off.
    Now the oldest turns are dropped, the head kept, and each segment is what was sampled from."""
    from evolving_rl import prompts
    from evolving_rl.rollout import Job

    card = "# Skill: find then take\n1. go to each receptacle in turn\n2. take the object"
    cfg, policy, pool, rollout, tasks = _rollout(
        games_dir, tiny_model, make_config, tmp_path, "env.max_steps=8",
        "rollout.prompt_format=multi_turn", "rollout.constrain_to_admissible=false", "rollout.solver.max_new_tokens=12",
    )
    try:
        firsts = pool.reset([(0, tasks[0]), (1, tasks[1])])
        pool.release([0, 1])
        heads = [len(policy.encode_chat(prompts.multi_turn_first_messages(
            t.description, firsts[k].observation, firsts[k].admissible, skill_card=card, reasoning=False)))
            for k, t in enumerate(tasks[:2])]
        cap = max(heads) + 60  # the head and a turn or so, never eight turns
        rollout.cfg = cfg.rollout.model_copy(update={"max_prompt_tokens": cap})
        eps = rollout.run([Job(t, card) for t in tasks[:2]], cfg.rollout.solver, seed=3)
    finally:
        pool.close()
    assert rollout.stats["dropped_turns"] > 0 and max(len(ep.segments) for ep in eps) > 1, (rollout.stats, heads)
    worst = 0.0
    for ep in eps:
        assert sum(s.num_generated for s in ep.segments) > 0
        for seg in ep.segments:
            assert len(seg.token_ids) <= cap + cfg.rollout.solver.max_new_tokens
            assert "find then take" in policy.decode(seg.token_ids)  # the card is never dropped
            with torch.no_grad():
                lp, _ = policy.score([seg])[0]
            gen = torch.tensor(seg.loss_mask, dtype=torch.bool)
            worst = max(worst, float((lp[gen] - torch.tensor(seg.logprobs)[gen]).abs().max()))
    print(f"max |score - sampling log-prob| under a {cap}-token cap: {worst:.2e} nats; {rollout.stats}")
    assert worst < 1e-4


def test_prompt_cap_above_the_model_context_is_refused(games_dir, tiny_model, make_config, tmp_path):
    with pytest.raises(ValueError, match=r"rollout\.max_prompt_tokens=4096.*max_position_embeddings=2048"):
        _rollout(games_dir, tiny_model, make_config, tmp_path, "rollout.max_prompt_tokens=4096")


def test_per_step_over_the_cap_shows_fewer_steps_and_a_full_context_ends_the_episode(
        games_dir, tiny_model, make_config, tmp_path):
    """A per-step prompt over the cap was cut from the left, dropping the system prompt and skill
    card first; now it shows fewer past steps, and an episode that cannot fit ends, counted."""
    from evolving_rl.rollout import Job, _Live
    from evolving_rl.types import Episode, StepResult, Turn

    card = "# Skill: find then take\n1. go to each receptacle in turn\n2. take the object"
    cfg, policy, pool, rollout, tasks = _rollout(games_dir, tiny_model, make_config, tmp_path, "rollout.history=3")
    adm = ["go to cabinet 1", "go to cabinet 2", "look"]
    ep = Episode(task=tasks[0], skill_card=card)
    ep.turns = [Turn(f"You arrive at cabinet {i}. On the cabinet {i}, you see a mug {i}, a plate {i}.", adm, "",
                     f"go to cabinet {i}", True) for i in range(1, 4)]
    live = _Live(job=Job(tasks[0], card), slot=0, episode=ep, last=StepResult("You arrive at cabinet 4.", adm))
    rollout._cap = 10_000
    whole = rollout._prompt(live)
    rollout._cap = len(whole) - 1
    cut = rollout._prompt(live)
    assert len(cut) <= rollout._cap and "find then take" in policy.decode(cut)  # the card stays
    assert policy.decode(whole).count("\n> ") == 3 and policy.decode(cut).count("\n> ") < 3
    rollout._cap = 20
    assert rollout._prompt(live) is None  # not even the system prompt fits

    rollout.cfg = cfg.rollout.model_copy(update={"max_prompt_tokens": 64})
    try:
        (full,) = rollout.run([Job(tasks[0], card)], cfg.rollout.solver, seed=4)
    finally:
        pool.close()
    assert full.steps == 0 and not full.segments and full.info.get("context_full")
    assert rollout.stats["context_full"] == 1
