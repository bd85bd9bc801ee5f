"""SFT warm start: behaviour cloning on expert demonstrations, loss on the reply tokens only.

The prompts are built by the very functions the rollout engine uses, so the cloned policy
sees in RL exactly what it saw here. For tiny from-scratch models only, the same stage also
teaches the two Evolving-RL roles their formats (issue 4): extraction (trajectory -> the
rule-based skill of `skills.skill.rule_skill_from_demo`) and skill use (a demo with a skill
card of the same task type in the system prompt). An instruct model needs none of this: it
starts from its own abilities, as in the paper.
"""

from __future__ import annotations

import json
import math
import random
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from evolving_rl import prompts
from evolving_rl.algorithms.grpo import trainable_parameters
from evolving_rl.config import RolloutConfig, SFTConfig
from evolving_rl.types import Episode, Segment, Task, Turn


@dataclass
class Example:
    prompt_ids: list[int]
    completion_ids: list[int]
    kind: str  # solver | solver_skill | extractor
    allowed: list[str] | None = None  # constrained decoding: the admissible actions the reply is one of


def load_demos(paths: list[str]) -> list[dict]:
    demos = []
    for path in paths:
        p = Path(path)
        if not p.is_file():
            raise FileNotFoundError(f"sft.demos: no such file {p} (make one with `evolving-rl games demos`)")
        for n, line in enumerate(p.read_text().splitlines(), 1):
            if not line.strip():
                continue
            try:
                d = json.loads(line)
                d["task"], d["steps"]
            except (json.JSONDecodeError, KeyError, TypeError):
                raise ValueError(f"{p}:{n}: not a demo record (expected JSON with 'task' and 'steps')") from None
            demos.append(d)
    return demos


def demo_turns(demo: dict) -> list[Turn]:
    return [Turn(s["observation"], s.get("admissible"), prompts.action_completion(s["action"]), s["action"], True) for s in demo["steps"]]


def demo_episode(demo: dict) -> Episode:
    """A demo as an Episode, so the extractor prompt is built exactly as in RL."""
    ep = Episode(task=Task.from_dict(demo["task"]), turns=demo_turns(demo), won=bool(demo.get("won")))
    ep.final_observation = demo.get("final_observation", "")
    ep.steps = len(ep.turns)
    return ep


def solver_examples(policy, demo: dict, rollout: RolloutConfig, max_steps: int, skill_card: str | None = None) -> Iterator[Example]:
    """One example per step. A DAgger record's history is what the clone did, its target the
    expert's label (`expert`); steps the expert could not label teach nothing."""
    if rollout.prompt_format != "per_step":
        raise ValueError("sft: rollout.prompt_format must be per_step for behaviour cloning of the tiny model")
    turns = demo_turns(demo)
    desc = demo["task"]["description"]
    env = demo["task"].get("env", "alfworld")
    for i, (t, s) in enumerate(zip(turns, demo["steps"])):
        target = s.get("expert", t.action)
        if not target or (t.admissible and target not in t.admissible):
            continue
        msgs = prompts.per_step_messages(
            desc, turns[:i], t.observation, t.admissible,
            skill_card=skill_card, env=env, history=rollout.history, use_state_line=rollout.state_line,
            reasoning=False, step=i + 1, max_steps=max_steps, list_admissible=rollout.list_admissible,
        )
        constrained = rollout.constrain_to_admissible and bool(t.admissible)
        # A constrained reply ends where its allowed sequence ends (the trie), an open one with eos.
        completion = policy.encode_text(prompts.action_completion(target)) + ([] if constrained else [policy.eos_token_id])
        yield Example(policy.encode_chat(msgs), completion, "solver_skill" if skill_card else "solver",
                      list(t.admissible) if constrained else None)


def build_examples(policy, demos: list[dict], rollout: RolloutConfig, max_steps: int, *, skills: bool, seed: int,
                   skill_use_fraction: float = 0.3, max_extractor_examples: int = 300,
                   extractor_repeats: int = 1, max_trajectory_chars: int = 6000) -> list[Example]:
    """Solver examples from every won demo; with `skills`, also skill-use and extraction examples."""
    rng = random.Random(seed)
    examples: list[Example] = []
    won = [d for d in demos if d.get("won")]
    cards: dict[str, list[str]] = {}
    skill_json: list[tuple[dict, str]] = []
    if skills:
        from evolving_rl.skills.skill import render_card, rule_skill_from_demo

        for d in won:
            sk = rule_skill_from_demo(d)
            cards.setdefault(d["task"]["task_type"], []).append(render_card(sk))
            skill_json.append((d, sk.to_json()))
    for d in won:
        examples.extend(solver_examples(policy, d, rollout, max_steps))
        if skills and rng.random() < skill_use_fraction:
            card = rng.choice(cards[d["task"]["task_type"]])
            examples.extend(solver_examples(policy, d, rollout, max_steps, skill_card=card))
    for d, js in rng.sample(skill_json, min(len(skill_json), max_extractor_examples)):  # all task types
        msgs = prompts.extractor_messages(demo_episode(d), max_trajectory_chars=max_trajectory_chars)
        examples += [Example(policy.encode_chat(msgs), policy.encode_text(js) + [policy.eos_token_id], "extractor")] * extractor_repeats
    return examples


def _batches(examples: list[Example], batch_size: int, rng: random.Random) -> Iterator[list[Example]]:
    idx = list(range(len(examples)))
    rng.shuffle(idx)
    # Sort within windows by length so padding stays small, then shuffle the batches.
    window = batch_size * 32
    batches = []
    for w in range(0, len(idx), window):
        chunk = sorted(idx[w : w + window], key=lambda i: len(examples[i].prompt_ids) + len(examples[i].completion_ids))
        batches += [chunk[b : b + batch_size] for b in range(0, len(chunk), batch_size)]
    rng.shuffle(batches)
    for b in batches:
        yield [examples[i] for i in b]


def sft_loss(policy, batch: list[Example], encode=None, prompt_weight: float = 0.0) -> tuple[torch.Tensor, int]:
    """Mean negative log-likelihood of the completion tokens, under the policy as it acts;
    plus, with `prompt_weight`, that weight times the language-model loss on the prompt tokens.

    The log-probs come from `policy.score`, the very function GRPO trains with: where the
    rollout constrains decoding to the admissible actions, the likelihood is the one with
    that mask applied, so cloning spends the model's capacity on choosing among admissible
    actions rather than on spelling them. Without `prompt_weight` the output layer runs on
    completion tokens only. `encode` is a `prompts.action_encoder`; pass one across batches.
    """
    encode = encode or prompts.action_encoder(policy)
    segments = []
    for e in batch:
        n_prompt, n = len(e.prompt_ids), len(e.completion_ids)
        segments.append(Segment(
            token_ids=e.prompt_ids + e.completion_ids,
            logprobs=[0.0] * (n_prompt + n),
            loss_mask=[0] * n_prompt + [1] * n,
            allowed=[encode(a) for a in e.allowed] if e.allowed else None,
        ))
    scored = policy.score(segments, loss_positions_only=not prompt_weight, max_tokens_per_chunk=1 << 30)
    tokens = sum(len(e.completion_ids) for e in batch)
    completion_lp = torch.stack([lp[len(e.prompt_ids):].sum() for (lp, _), e in zip(scored, batch)]).sum()
    loss = -completion_lp / max(1, tokens)
    if prompt_weight:  # position 0 has no prediction
        prompt_lp = torch.stack([lp[1 : len(e.prompt_ids)].sum() for (lp, _), e in zip(scored, batch)]).sum()
        loss = loss - prompt_weight * prompt_lp / max(1, sum(len(e.prompt_ids) - 1 for e in batch))
    return loss, tokens


def train_sft(policy, examples: list[Example], cfg: SFTConfig, *, seed: int, log=None, bf16: bool = False) -> dict:
    """Plain AdamW with linear warmup and cosine decay; stops at `epochs` or `max_minutes`."""
    torch.manual_seed(seed)
    rng = random.Random(seed)
    model = policy.model
    model.train()
    device = next(model.parameters()).device
    opt = torch.optim.AdamW(trainable_parameters(policy), lr=cfg.lr, weight_decay=cfg.weight_decay)  # float32 only
    steps_per_epoch = math.ceil(len(examples) / cfg.batch_size)
    total = max(1, int(steps_per_epoch * cfg.epochs))
    t0 = time.perf_counter()

    def lr_factor(s: int) -> float:
        # Cosine over whichever budget runs out first, steps or minutes, so a run stopped
        # by `max_minutes` still ends annealed instead of at a high learning rate.
        progress = s / total
        if cfg.max_minutes:
            progress = max(progress, (time.perf_counter() - t0) / (cfg.max_minutes * 60))
        return min(1.0, (s + 1) / max(1, cfg.warmup_steps)) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_factor)
    encode = prompts.action_encoder(policy)
    step, tokens, losses = 0, 0, []
    stopped = "epochs"
    while step < total:
        for batch in _batches(examples, cfg.batch_size, rng):
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16 and device.type == "cpu"):
                loss, n = sft_loss(policy, batch, encode, cfg.prompt_loss_weight)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            step += 1
            tokens += n
            losses.append(loss.item())
            if log and (step % 20 == 0 or step == total):
                log({"sft_step": step, "loss": sum(losses[-20:]) / len(losses[-20:]), "lr": sched.get_last_lr()[0],
                     "elapsed_s": time.perf_counter() - t0})
            if step >= total:
                break
            if cfg.max_minutes and time.perf_counter() - t0 > cfg.max_minutes * 60:
                stopped = "max_minutes"
                total = step
                break
    model.eval()
    wall = time.perf_counter() - t0
    return {"steps": step, "examples": len(examples), "final_loss": sum(losses[-20:]) / max(1, len(losses[-20:])),
            "train_tokens": tokens, "wall_s": wall, "target_tok_per_s": tokens / max(wall, 1e-9), "stopped_by": stopped}


def corpus_from_demos(demos: list[dict], cfg, max_demos: int = 400) -> list[str]:
    """The text the tiny tokenizer is trained on: the prompts, replies, skill cards and
    extractor prompts the model will actually read and write (a small vocabulary suffices)."""
    from evolving_rl.skills.skill import render_card, rule_skill_from_demo

    envs = sorted({d["task"].get("env", "alfworld") for d in demos} or {cfg.env.name})  # each env frames its own role
    texts = []
    for env in envs:
        texts += [prompts.solver_system(None, False, env), prompts.solver_system("x", True, env),
                  prompts.EXTRACTOR_SYSTEM.format(role=prompts.agent_role(env))]
    texts.append(prompts.SCHEMA_HINT)
    for d in demos[:max_demos]:
        turns = demo_turns(d)
        for i, t in enumerate(turns):
            msgs = prompts.per_step_messages(
                d["task"]["description"], turns[:i], t.observation, t.admissible, skill_card=None,
                history=cfg.rollout.history, use_state_line=cfg.rollout.state_line, reasoning=False,
                step=i + 1, max_steps=cfg.env.max_steps, list_admissible=cfg.rollout.list_admissible,
            )
            texts.append(msgs[1]["content"])
            texts.append(t.completion)
        if d.get("won"):
            sk = rule_skill_from_demo(d)
            texts.append(render_card(sk))
            texts.append(sk.to_json())
            texts.append(prompts.extractor_messages(demo_episode(d), max_trajectory_chars=cfg.evolving.max_trajectory_chars)[1]["content"])
    return texts


def dagger_record(ep: Episode) -> dict:
    """A clone's episode as a demo whose history is the clone's and whose targets are the expert's."""
    steps = [{"observation": t.observation, "admissible": t.admissible, "action": t.action, "expert": t.expert} for t in ep.turns]
    return {"task": ep.task.to_dict(), "won": ep.won, "steps": steps}


def dagger(policy, cfg, train_tasks: list[Task], examples: list[Example], *, bf16: bool, say) -> list[dict]:
    """DAgger (Ross et al., 2011): the clone has never seen its own mistakes, so it loops once
    it leaves the expert's path. Each round plays the clone greedily on training games, asks
    the env's expert what it would do in every state the clone reached, and trains on the
    demos plus all labels so far."""
    from evolving_rl.builders import build_pool, build_rollout
    from evolving_rl.evaluate import eval_sampling
    from evolving_rl.rollout import Job

    labelled: list[Example] = []
    rounds = []
    for r in range(cfg.sft.dagger_rounds):
        tasks = random.Random(cfg.seed * 7919 + r).sample(train_tasks, min(cfg.sft.dagger_games, len(train_tasks)))
        t0 = time.perf_counter()
        with build_pool(cfg) as pool:
            rollout = build_rollout(cfg, policy, pool, label_expert=True)
            episodes = [e for e in rollout.run([Job(t) for t in tasks], eval_sampling(cfg.rollout.solver, greedy=True)) if not e.failed]
        turns = [t for e in episodes for t in e.turns]
        new = [x for e in episodes for x in solver_examples(policy, dagger_record(e), cfg.rollout, cfg.env.max_steps)]
        labelled += new
        info = {"round": r + 1, "games": len(tasks), "played": len(episodes), "won": sum(e.won for e in episodes),
                "states": len(turns), "labels": len(new),
                "agreed_with_expert": sum(t.action == t.expert for t in turns) / max(1, len(turns)),
                "rollout_s": time.perf_counter() - t0}
        say(info)
        round_cfg = cfg.sft.model_copy(update={"max_minutes": cfg.sft.dagger_minutes, "warmup_steps": 0})
        info["train"] = train_sft(policy, examples + labelled, round_cfg, seed=cfg.seed + r + 1, bf16=bf16, log=say)
        rounds.append(info)
    return rounds


def run_sft(cfg, out: Path, *, skills: bool, bf16: bool, console=None) -> dict:
    """The documented warm-start recipe: clone the expert, save, then evaluate greedily."""
    from evolving_rl.builders import build_policy, build_pool, build_rollout, build_suite
    from evolving_rl.common import check_no_overlap
    from evolving_rl.config import save_config
    from evolving_rl.evaluate import cap_tasks, eval_sampling, format_table, run_no_skill

    say = (lambda x: console.print(x, soft_wrap=True, highlight=False, markup=False)) if console is not None else print
    out = Path(out)
    demos = load_demos(cfg.sft.demos)
    suite = build_suite(cfg)
    eval_tasks = {s: cap_tasks(suite.tasks(s), cfg.eval.max_tasks) for s in cfg.eval.splits}
    demo_tasks = [Task.from_dict(d["task"]) for d in demos]
    check_no_overlap(demo_tasks, eval_tasks, "SFT demonstrations")
    policy = build_policy(cfg, training=True)
    examples = build_examples(policy, demos, cfg.rollout, cfg.env.max_steps, skills=skills, seed=cfg.seed,
                              skill_use_fraction=cfg.sft.skill_use_fraction,
                              max_extractor_examples=cfg.sft.max_extractor_examples,
                              extractor_repeats=cfg.sft.extractor_repeats,
                              max_trajectory_chars=cfg.evolving.max_trajectory_chars)
    kinds = {k: sum(e.kind == k for e in examples) for k in ("solver", "solver_skill", "extractor")}
    say(f"sft: {len(demos)} demos -> {len(examples)} examples {kinds}")
    metrics = train_sft(policy, examples, cfg.sft, seed=cfg.seed, bf16=bf16, log=lambda r: say(r))
    metrics["examples_by_kind"] = kinds
    if cfg.sft.dagger_rounds:
        metrics["dagger"] = dagger(policy, cfg, suite.tasks("train"), examples, bf16=bf16, say=say)
    policy.save(out)
    save_config(cfg, out / "sft_config.yaml")
    with build_pool(cfg) as pool:
        rollout = build_rollout(cfg, policy, pool)
        sampling = eval_sampling(cfg.rollout.solver, greedy=True)
        results = [run_no_skill(rollout, s, t, sampling, 1, cfg.eval.seed) for s, t in eval_tasks.items()]
    say(format_table(results, "After SFT (greedy, no skill)"))
    metrics["eval"] = [r.to_dict() for r in results]
    (out / "sft_metrics.json").write_text(json.dumps(metrics, indent=2))
    return metrics
