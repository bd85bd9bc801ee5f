"""Warm-start demos for every engine with an expert (issue 7): the generic loop plays real
TextWorld-Express and TextWorld games to success through EnvPool, and the SFT code accepts
what it writes; the loop's bookkeeping (order, step cap, given-up episodes) on a toy engine."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))  # spawned workers inherit sys.path
import _pool_env  # noqa: E402
from _pool_env import toy_task  # noqa: E402

from evolving_rl.config import load_config  # noqa: E402
from evolving_rl.demos import expert_episodes, write_demos  # noqa: E402
from evolving_rl.envs.workers import EnvPool  # noqa: E402

TOY = f"{_pool_env.__name__}:ToyEnv"


def _read(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


# -- the loop's bookkeeping ---------------------------------------------------------------


def test_records_come_in_task_order_and_stop_at_the_step_cap():
    # ToyEnv's expert: "left", "left", then "win" (3 steps). 5 tasks through 2 live slots.
    tasks = [toy_task(f"t{i}") for i in range(5)]
    with EnvPool(TOY, {}, num_workers=0) as pool:
        records = list(expert_episodes(pool, tasks, max_steps=3, live=2))
        capped = list(expert_episodes(pool, tasks[:1], max_steps=2, live=2))
        with pytest.raises(ValueError, match="live"):
            list(expert_episodes(pool, tasks, max_steps=3, live=0))
    assert [r["task"]["id"] for r in records] == [t.id for t in tasks]
    assert all(r["won"] and [s["action"] for s in r["steps"]] == ["left", "left", "win"] for r in records)
    first = records[0]["steps"]
    assert first[0]["observation"] == "t0: " and first[1]["observation"] == "t0: left"
    assert first[0]["admissible"] == _pool_env.ACTIONS and records[0]["final_observation"] == "t0: left left win"
    assert not capped[0]["won"] and len(capped[0]["steps"]) == 2


def test_an_episode_the_pool_gave_up_on_is_marked_not_kept():
    tasks = [toy_task("ok"), toy_task("crashes", crash_at=2), toy_task("ok2")]
    with EnvPool(TOY, {}, num_workers=1, step_timeout_s=30) as pool:
        records = list(expert_episodes(pool, tasks, max_steps=5, live=3))
    assert [r["task"]["id"] for r in records] == ["ok", "crashes", "ok2"]
    assert "error" in records[1] and not records[1]["won"]
    assert records[0]["won"] and records[2]["won"] and "error" not in records[0]


# -- real engines -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def twx_demos(tmp_path_factory):
    pytest.importorskip("textworld_express", reason="textworld-express not installed (pip install evolving-rl[envs])")
    cfg = load_config(None, ["env.name=twx", "env.num_workers=2", "env.max_steps=50",
                             "env.options={games: [coin, arithmetic], unseen_games: [], tasks_per_game: 2}"])
    out = tmp_path_factory.mktemp("twx") / "demos.jsonl"
    return cfg, write_demos(cfg, "train", out), out


@pytest.fixture(scope="module")
def tw_demos(tmp_path_factory):
    pytest.importorskip("textworld", reason="textworld not installed (pip install evolving-rl[envs])")
    from evolving_rl.envs.textworld_env import generate_tw_games

    games = tmp_path_factory.mktemp("twgames")
    generate_tw_games(games, seed=0, counts={"tw-cooking": {"train": 1}, "tw-coin_collector": {"train": 1}},
                      settings={"tw-coin_collector": {"level": 1}})
    cfg = load_config(None, ["env.name=textworld", f"env.games_dir={games}", "env.num_workers=2",
                             "env.options={unseen_challenges: []}"])
    out = games / "demos.jsonl"
    return cfg, write_demos(cfg, "train", out, max_tasks=2), out


@pytest.mark.slow
@pytest.mark.parametrize("which", ["twx_demos", "tw_demos"])
def test_real_engines_expert_demos_are_all_won(which, request):
    cfg, stats, out = request.getfixturevalue(which)
    from evolving_rl.envs.base import make_suite
    from evolving_rl.common import env_options

    records = _read(out)
    suite = make_suite(cfg.env.name, env_options(cfg))
    expected = [t.id for t in suite.tasks("train")]
    getattr(suite, "close", lambda: None)()
    assert [r["task"]["id"] for r in records] == expected and len(expected) >= 2
    assert stats["episodes"] == stats["won"] == len(records) and stats["failed"] == 0
    assert stats["steps"] == sum(len(r["steps"]) for r in records) and stats["wall_s"] > 0
    for r in records:
        assert r["won"] and r["steps"] and r["final_observation"] and r["task"]["env"] == cfg.env.name
        assert all(s["observation"] and s["action"] in s["admissible"] for s in r["steps"]), r["task"]["id"]


@pytest.mark.slow
def test_sft_reads_the_demos_of_both_engines(twx_demos, tw_demos, tmp_path):
    from evolving_rl import prompts
    from evolving_rl.policy.hf import HFPolicy
    from evolving_rl.policy.tiny import build_tiny
    from evolving_rl.sft import build_examples, corpus_from_demos, load_demos

    cfg = load_config(None, ["tiny.vocab_size=400", "tiny.hidden_size=32", "tiny.num_layers=1", "tiny.num_heads=2",
                             "tiny.intermediate_size=64", "rollout.constrain_to_admissible=true"])
    demos = load_demos([str(twx_demos[2]), str(tw_demos[2])])
    corpus = corpus_from_demos(demos, cfg)
    joined = "\n".join(corpus)
    assert prompts.agent_role("twx") in joined and prompts.agent_role("textworld") in joined
    assert prompts.agent_role("alfworld") not in joined  # no household framing for other engines
    model = build_tiny(corpus, cfg.tiny, tmp_path / "tiny")
    policy = HFPolicy(cfg.model.model_copy(update={"path": str(model)}))
    examples = build_examples(policy, demos, cfg.rollout, cfg.env.max_steps, skills=False, seed=0)
    assert len(examples) == sum(len(d["steps"]) for d in demos)  # every expert step teaches
    assert {e.kind for e in examples} == {"solver"} and all(e.prompt_ids and e.completion_ids for e in examples)


def test_bad_requests_are_named(tmp_path):
    cfg = load_config(None, ["env.name=mind2web", f"env.options={{data_dir: {tmp_path}}}"])
    with pytest.raises(ValueError, match="mind2web"):
        write_demos(cfg, "train", tmp_path / "d.jsonl")
    with pytest.raises(ValueError, match="max_tasks"):
        write_demos(load_config(), "train", tmp_path / "d.jsonl", max_tasks=0)
