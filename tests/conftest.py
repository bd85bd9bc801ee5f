"""Session fixtures on real parts: ALFWorld games generated and expert-verified on ALFWorld's
own engine, the expert's demos, and a tiny Llama with a tokenizer trained on their text."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # see evolving_rl/cli.py

import pytest  # noqa: E402

from evolving_rl.config import load_config  # noqa: E402

SIZES = {"train": 8, "train_unseen": 4, "eval_seen": 4, "eval_unseen": 4}


@pytest.fixture(scope="session")
def games_dir(tmp_path_factory):
    from evolving_rl.envs.alfworld_gen import generate_games

    out = tmp_path_factory.mktemp("games") / "alfworld"
    generate_games(out, seed=0, sizes=SIZES, workers=2)
    return out


@pytest.fixture(scope="session")
def demos_path(games_dir):
    from evolving_rl.demos import write_demos

    out = games_dir / "demos_train.jsonl"
    write_demos(load_config(None, [f"env.games_dir={games_dir}", "env.num_workers=2"]), "train", out)
    return out


def tiny_config(games_dir, model_path, run_dir, *extra):
    """A config small enough for tests: 2-layer model, short episodes, 2 engine workers."""
    return load_config(None, [
        f"env.games_dir={games_dir}", f"model.path={model_path}", f"run_dir={run_dir}",
        "env.max_steps=6", "env.num_workers=2",
        "tiny.vocab_size=600", "tiny.hidden_size=64", "tiny.num_layers=2", "tiny.num_heads=4",
        "tiny.intermediate_size=128",
        "rollout.batch_size=16", "rollout.solver.max_new_tokens=16", "rollout.extractor.max_new_tokens=48",
        "rollout.constrain_to_admissible=true",
        "eval.max_tasks=2", "eval.repeats=1", "train.eval_every=0", "train.eval_initial=false",
        "evolving.sources_per_step=2", "evolving.num_skills=2", "evolving.num_downstream=2",
        "grpo.group_size=2", "grpo.prompts_per_step=2", "grpo.lr=1e-3",
        *extra,
    ])


@pytest.fixture(scope="session")
def tiny_model(games_dir, demos_path, tmp_path_factory):
    from evolving_rl.policy.tiny import build_tiny
    from evolving_rl.sft import corpus_from_demos, load_demos

    cfg = tiny_config(games_dir, "unused", "unused")
    out = tmp_path_factory.mktemp("models") / "tiny"
    build_tiny(corpus_from_demos(load_demos([str(demos_path)]), cfg), cfg.tiny, out)
    return out


@pytest.fixture(scope="session")
def make_config():
    return tiny_config
