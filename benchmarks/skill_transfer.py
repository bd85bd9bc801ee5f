"""The twc skill-transfer warm start and its check (issue 16; the benchmark is evolving_rl/envs/twc.py).

    .venv/bin/python benchmarks/skill_transfer.py warmstart [--out checkpoints/tiny-twc-sft] [key=value ...]
    .venv/bin/python benchmarks/skill_transfer.py eval --model DIR [--out runs/twc_eval] [key=value ...]

`warmstart` plays the engine's expert on the training games (each game twice: straight, and
exploring: a wrong placement first, the score going down, the object taken back), builds a
tiny model whose byte-level tokenizer is trained on that text only (so the unseen objects'
words are spelt in byte pieces it has never read), and clones three formats:

- solver: the demos, no skill;
- solver with a skill: a straight demo with the card extracted from a DIFFERENT training game
  with the same object (the card states where it goes: a fact the state does not show, since
  nothing in the room says it), and a demo with the card of a game with ANOTHER object, which
  the solver must ignore;
- extractor: a demo's trajectory -> the skill it supports (`twc.skill_from_demo`: placements
  that moved the score, stated without the room or the step numbers);
- with `data --invented N`: N pairs of training games renamed to an invented object
  (`invented_examples`): the only formats where the names cannot be recalled, so the extractor
  learns to copy them from the trajectory and the solver to take the place from the card;
  without them a clone writes the train-fold names it knows and ignores cards (RESULTS.md).

No held-out object kind reaches any of it (`twc.check_kinds_disjoint` runs on the demos).
Then it evaluates greedily no-skill and one-shot on eval_seen and eval_unseen.
"""

from __future__ import annotations

import argparse
import json
import random
import re
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # common.py beside this file
from common import ROOT, quiet_hf, say  # noqa: E402

from evolving_rl import prompts  # noqa: E402
from evolving_rl.config import load_config, save_config  # noqa: E402
from evolving_rl.envs import twc  # noqa: E402
from evolving_rl.skills.skill import Skill, render_card  # noqa: E402

CONFIG = ROOT / "configs" / "evolving_twc_tiny.yaml"


def card_of(demo: dict) -> str:
    return render_card(Skill.model_validate(twc.skill_from_demo(demo)))


def skill_use_pairs(straight: list[dict], explored: list[dict], seed: int) -> list[tuple[dict, str, bool]]:
    """(demo, card, relevant?): each straight demo with the card of another game of its object
    (when training has one), and a third of all demos with the card of a game of another object."""
    rng = random.Random(seed)
    every = straight + explored
    by_kind: dict[str, list[dict]] = {}
    for d in every:
        by_kind.setdefault(twc.task_object(d["task"]), []).append(d)
    pairs = []
    for d in straight:
        kind = twc.task_object(d["task"])
        others = [o for o in by_kind[kind] if o["task"]["id"] != d["task"]["id"]]
        if others:
            pairs.append((d, card_of(rng.choice(others)), True))
    for d in rng.sample(every, len(every) // 3):  # a third: enough to learn to ignore, not to drown the rest
        kind = twc.task_object(d["task"])
        other = rng.choice([o for o in every if twc.task_object(o["task"]) != kind])
        pairs.append((d, card_of(other), False))
    return pairs


def build_twc_examples(policy, straight: list[dict], explored: list[dict], cfg, seed: int, *, card_only: bool = False) -> list:
    """The three formats; `card_only` (the dev games): no example without a card and no
    irrelevant card, so these objects can be placed only by reading the card."""
    from evolving_rl.sft import solver_examples

    examples = []
    for d in [] if card_only else straight + explored:
        examples += list(solver_examples(policy, d, cfg.rollout, cfg.env.max_steps))
    for d, card, relevant in skill_use_pairs(straight, explored, seed):
        if relevant or not card_only:
            examples += list(solver_examples(policy, d, cfg.rollout, cfg.env.max_steps, skill_card=card))
    examples += [extraction_example(policy, d, cfg) for d in straight + explored]
    return examples


def extraction_example(policy, demo: dict, cfg):
    """The demo's trajectory -> the skill it supports, prompted exactly as in RL."""
    from evolving_rl.sft import Example, demo_episode

    msgs = prompts.extractor_messages(demo_episode(demo), max_trajectory_chars=cfg.evolving.max_trajectory_chars)
    target = json.dumps(twc.skill_from_demo(demo))
    return Example(policy.encode_chat(msgs), policy.encode_text(target) + [policy.eos_token_id], "extractor")


def invented_examples(policy, straight: list[dict], explored: list[dict], cfg, n: int, seed: int, avoid: set[str]) -> list:
    """`n` pairs of training games of one object kind and receptacle, both renamed to one
    invented object (`twc.invented_names`): the first game's trajectory -> its skill (an
    extraction example whose names can only be copied), the second game played with that
    skill's card (a solver example only the card can solve), a third of the pairs also with
    the card of another invented object (to be ignored) and, exploring, with no card."""
    from evolving_rl.sft import solver_examples

    rng = random.Random(seed)
    groups: dict[tuple[str, str], dict[str, list[dict]]] = {}
    for style, ds in (("straight", straight), ("explored", explored)):
        for d in ds:
            key = (twc.task_object(d["task"]), str(d["task"]["meta"].get("receptacle")))
            groups.setdefault(key, {"straight": [], "explored": []})[style].append(d)
    keys = sorted(k for k, g in groups.items() if g["straight"] and len({d["task"]["id"] for d in g["straight"] + g["explored"]}) >= 2)
    names = twc.invented_names(n, seed, avoid)
    examples, cards = [], []
    for name in names:
        g = groups[rng.choice(keys)]
        target = rng.choice(g["straight"])
        sources = [d for d in g["straight"] + g["explored"] if d["task"]["id"] != target["task"]["id"]]
        source, target = twc.rename_object(rng.choice(sources), name), twc.rename_object(target, name)
        examples.append(extraction_example(policy, source, cfg))
        card = card_of(source)
        examples += list(solver_examples(policy, target, cfg.rollout, cfg.env.max_steps, skill_card=card))
        if cards and rng.random() < 1 / 3:
            examples += list(solver_examples(policy, target, cfg.rollout, cfg.env.max_steps, skill_card=rng.choice(cards)))
            if g["explored"]:
                lost = twc.rename_object(rng.choice(g["explored"]), name)
                examples += list(solver_examples(policy, lost, cfg.rollout, cfg.env.max_steps))
        cards.append(card)
    return examples


def corpus(straight: list[dict], explored: list[dict], cfg) -> list[str]:
    """What the tiny tokenizer learns from: the prompts, replies, cards and skills the model reads and writes."""
    from evolving_rl.sft import demo_episode, demo_turns

    texts = [prompts.solver_system(None, False, "twc"), prompts.EXTRACTOR_SYSTEM.format(role=prompts.agent_role("twc")),
             prompts.SCHEMA_HINT, prompts.SKILL_PREAMBLE]
    for d in straight + explored:
        turns = demo_turns(d)
        for i, t in enumerate(turns):
            msgs = prompts.per_step_messages(d["task"]["description"], turns[:i], t.observation, t.admissible,
                                             skill_card=None, env="twc", history=cfg.rollout.history,
                                             use_state_line=cfg.rollout.state_line, reasoning=False, step=i + 1,
                                             max_steps=cfg.env.max_steps, list_admissible=cfg.rollout.list_admissible)
            texts += [msgs[1]["content"], t.completion]
        texts += [card_of(d), json.dumps(twc.skill_from_demo(d)),
                  prompts.extractor_messages(demo_episode(d), max_trajectory_chars=cfg.evolving.max_trajectory_chars)[1]["content"]]
    return texts


def make_data(args, cfg) -> Path:
    """Demos, the untrained tiny model (`<out>-init`) and the cloning examples (`<out>-init/examples.pt`)."""
    import torch

    from evolving_rl.policy.hf import HFPolicy
    from evolving_rl.policy.tiny import build_tiny
    from evolving_rl.sft import load_demos

    out, games = Path(args.out), Path(args.games)
    suite = twc.TWCSuite(cfg.env.options)
    held_out = suite.tasks("eval_unseen") + suite.tasks("train_unseen")
    t0 = time.perf_counter()
    demos, stats = {}, {}
    for split in ("train", "dev"):
        for style, share in (("straight", 0.0), ("explored", 1.0)):
            path = games / f"demos_{split}_{style}.jsonl"
            stats[f"{split}_{style}"] = twc.write_demos(suite.tasks(split), path, explore_fraction=share, seed=cfg.seed,
                                                        max_steps=cfg.env.max_steps, wrong_tries=args.wrong_tries,
                                                        tried=cfg.env.options.get("tried", False),
                                                        prune_tried=cfg.env.options.get("prune_tried", False))
            demos[split, style] = [d for d in load_demos([str(path)]) if d["won"]]
            twc.check_kinds_disjoint(demos[split, style], held_out, f"the warm-start demos ({path})")
    say(f"demos: {stats} in {time.perf_counter() - t0:.1f}s")
    init = Path(args.init or out.with_name(out.name + "-init"))
    if args.rebuild or not (init / "config.json").is_file():  # the tokenizer must stay the checkpoint's
        build_tiny(corpus(demos["train", "straight"], demos["train", "explored"], cfg), cfg.tiny, init)
    policy = HFPolicy(cfg.model.model_copy(update={"path": str(init)}))
    examples = {split: build_twc_examples(policy, demos[split, "straight"], demos[split, "explored"], cfg, cfg.seed,
                                          card_only=split == "dev") for split in ("train", "dev")}
    if args.invented:
        real = {twc.task_object(t) for split in suite.splits() for t in suite.tasks(split)}
        examples["invented"] = invented_examples(policy, demos["train", "straight"], demos["train", "explored"], cfg,
                                                 args.invented, cfg.seed, real)
    kinds = {f"{split}/{k}": sum(e.kind == k for e in ex) for split, ex in examples.items()
             for k in ("solver", "solver_skill", "extractor")}
    lens = sorted(len(e.prompt_ids) + len(e.completion_ids) for ex in examples.values() for e in ex)
    say(f"examples {kinds}; tokens per example median {lens[len(lens) // 2]}, max {lens[-1]}; vocab {len(policy.tokenizer)}")
    torch.save({"examples": {k: [vars(e) for e in ex] for k, ex in examples.items()}, "kinds": kinds, "demos": stats},
               init / "examples.pt")
    return init


def clone(args, cfg, init: Path) -> dict:
    """`train_sft` on the saved examples (constrained likelihood, as the rollout decodes), from
    `init` or, with --start, from a clone (then all dev examples and --train-sample train ones)."""
    import torch

    from evolving_rl.policy.hf import HFPolicy
    from evolving_rl.sft import Example, train_sft

    out = Path(args.out)
    data = torch.load(init / "examples.pt")
    rng = random.Random(cfg.seed)
    train, dev = data["examples"]["train"], data["examples"]["dev"]
    invented = data["examples"].get("invented", [])
    if args.start:  # a short CPU continuation: the card-only examples, a sample of the rest
        train = rng.sample(train, min(len(train), args.train_sample))
        extract = [e for e in dev if e["kind"] == "extractor"]
        dev = [e for e in dev if e["kind"] != "extractor"] + rng.sample(extract, min(len(extract), args.dev_extract))
        dev = rng.sample(dev, min(len(dev), args.dev_sample))
    examples = [Example(**e) for e in train + dev + invented]
    policy = HFPolicy(cfg.model.model_copy(update={"path": str(args.start or init)}))
    metrics = train_sft(policy, examples, cfg.sft, seed=cfg.seed, log=say)
    metrics.update(examples_by_kind=data["kinds"], demos=data["demos"])
    policy.save(out)
    save_config(cfg, out / "sft_config.yaml")
    (out / "sft_metrics.json").write_text(json.dumps(metrics, indent=2))
    say(f"saved {out}: {metrics['steps']} steps, loss {metrics['final_loss']:.3f}, {metrics['wall_s'] / 60:.1f} min")
    return metrics


def evaluate(model: str, cfg, out: Path) -> dict:
    from evolving_rl.evaluate import evaluate_checkpoint

    results = evaluate_checkpoint(cfg, model, out, tag="final", protocols=list(cfg.eval.protocols), console_print=say)
    return {f"{r.split}/{r.protocol}": [r.overall.wins, r.overall.n] for r in results}


def probe(model: str, cfg, n: int) -> dict:
    """Does the solver read its card? eval_unseen played greedily with no card, with a card that
    states the true place (the engine's gold path), and with one that names a wrong receptacle.
    A solver that reads wins more with the first and less with the second than with none."""
    from evolving_rl.builders import build_policy, build_pool, build_rollout, build_suite
    from evolving_rl.evaluate import eval_sampling
    from evolving_rl.rollout import Job

    cfg = cfg.model_copy(update={"model": cfg.model.model_copy(update={"path": model})})
    tasks = build_suite(cfg).tasks("eval_unseen")[:n]
    policy = build_policy(cfg)

    def card(obj: str, place: str) -> str:
        return render_card(Skill.model_validate(twc.facts_skill([(obj, place, True)])))

    facts = [dict(t.meta) for t in tasks]
    wrong = []
    env = twc.TWCEnv({"expert": False})
    try:
        for t, f in zip(tasks, facts):  # another receptacle of the same room, read off its first observation
            room = env.reset(t).observation
            places = [p for p in re.findall(r"(?:see|is also|also see) an? ([A-Za-z ]+?)(?:, that| that is)", room)
                      if p != f["receptacle"]]
            wrong.append(places[0] if places else "floor")
    finally:
        env.close()
    cards = {"no card": [None] * len(tasks), "true place": [card(f["object"], f["receptacle"]) for f in facts],
             "wrong place": [card(f["object"], w) for f, w in zip(facts, wrong)]}
    out = {}
    with build_pool(cfg) as pool:
        rollout = build_rollout(cfg, policy, pool)
        for name, cs in cards.items():
            eps = rollout.run([Job(t, c) for t, c in zip(tasks, cs)], eval_sampling(cfg.rollout.solver, greedy=True), seed=0)
            out[name] = [sum(e.won for e in eps), len(eps)]
            say(f"{name}: {out[name][0]}/{out[name][1]}")
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("stage", choices=["warmstart", "data", "clone", "eval", "probe"],
                    help="warmstart = data + clone + eval")
    ap.add_argument("--config", default=str(CONFIG))
    ap.add_argument("--out", default=str(ROOT / "checkpoints" / "tiny-twc-sft"))
    ap.add_argument("--games", default=str(ROOT / "games" / "twc"))
    ap.add_argument("--model", help="eval: the checkpoint to evaluate")
    ap.add_argument("--init", help="the untrained model and examples.pt (default: <out>-init)")
    ap.add_argument("--start", help="clone: continue from this checkpoint instead of the untrained model")
    ap.add_argument("--train-sample", type=int, default=2000, help="clone --start: train-game examples kept beside all dev ones")
    ap.add_argument("--dev-extract", type=int, default=400, help="clone --start: dev extraction examples kept")
    ap.add_argument("--wrong-tries", type=int, default=1,
                    help="data: an exploring demo makes 1..N different wrong placements before the right one")
    ap.add_argument("--invented", type=int, default=0,
                    help="data: pairs of training games renamed to an invented object (extraction + card-only solver examples)")
    ap.add_argument("--dev-sample", type=int, default=100000, help="clone --start: dev examples kept (after --dev-extract)")
    ap.add_argument("--rebuild", action="store_true", help="data: a new tokenizer and untrained model even if <out>-init exists")
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_intermixed_args(argv)
    quiet_hf()
    cfg = load_config(args.config, args.overrides)
    init = Path(args.init or Path(args.out).with_name(Path(args.out).name + "-init"))
    if args.stage in ("warmstart", "data"):
        make_data(args, cfg)
    if args.stage in ("warmstart", "clone"):
        clone(args, cfg, init)
    if args.stage in ("data", "clone"):
        return 0
    if args.stage == "probe":
        if not args.model:
            raise SystemExit("probe: pass --model DIR")
        say(json.dumps(probe(args.model, cfg, cfg.eval.max_tasks or 40)))
        return 0
    if args.stage == "warmstart":
        model, ev_out = args.out, Path(args.out) / "eval"
    else:
        if not args.model:
            raise SystemExit("eval: pass --model DIR")
        model, ev_out = args.model, Path(args.out)
    cells = evaluate(model, cfg, ev_out)
    say(json.dumps(cells))
    (Path(ev_out) / "cells.json").write_text(json.dumps(cells, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
