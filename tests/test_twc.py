"""The twc skill-transfer benchmark on its real engine (issue 16): held-out object kinds never
reach training, the score's moves are visible, the evaluation budget ends an episode, and the
rule-based skill states what the trajectory proved."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

pytest.importorskip("textworld_express", reason="textworld-express not installed (pip install evolving-rl[envs])")

from evolving_rl.envs import twc  # noqa: E402
from evolving_rl.envs.base import EnvError  # noqa: E402

pytestmark = pytest.mark.slow
SMALL = {"train_games": 60, "dev_games": 40, "eval_games": 10, "pool_games": 80}


@pytest.fixture(scope="module")
def suite():
    s = twc.TWCSuite(SMALL)
    s.tasks("train")
    yield s
    s.close()


def _kinds(tasks):
    return {twc.task_object(t) for t in tasks}


def test_held_out_object_kinds_never_reach_training_or_its_retrieval_pool(suite, tmp_path):
    train, dev = suite.tasks("train"), suite.tasks("dev")
    unseen, pool = suite.tasks("eval_unseen"), suite.tasks("train_unseen")
    assert len(train) == 60 and len(dev) == 40 and len(unseen) == 10 and len(pool) == 80
    held_out = _kinds(unseen) | _kinds(pool)
    assert held_out and not held_out & (_kinds(train) | _kinds(dev))
    assert _kinds(unseen) <= _kinds(pool)  # every unseen task has experience to draw on
    assert _kinds(suite.tasks("eval_seen")) <= _kinds(train)
    # The one-shot pool (train_unseen) is never the training pool, and no evaluated game is in it.
    assert not {t.id for t in pool} & {t.id for t in unseen + train + dev}
    # Warm-start demos (straight and exploring) name no held-out object anywhere in their text.
    demos_path = tmp_path / "demos.jsonl"
    stats = twc.write_demos(train[:20] + dev[:10], demos_path, explore_fraction=0.5, seed=0)
    assert stats["won"] == 30 and 0 < stats["explored"] < 30
    demos = [json.loads(x) for x in demos_path.read_text().splitlines()]
    twc.check_kinds_disjoint(demos, unseen + pool, "demos")
    # ... and the check can fail: a demo that handled an unseen object is caught, by name.
    bad = json.loads(json.dumps(demos[0]))
    bad["steps"][0]["action"] = f"take {twc.task_object(unseen[0])}"
    with pytest.raises(ValueError, match="held-out object kinds occur in demos"):
        twc.check_kinds_disjoint([bad], unseen, "demos")


def test_a_receptacle_named_like_an_unseen_object_is_not_a_leak():
    held = [{"meta": {"object": "umbrella"}}]  # task dicts
    twc.check_kinds_disjoint([{"task": {"meta": {"object": "coat"}}, "steps": [{"observation": "You see a umbrella stand."}]}], held)
    with pytest.raises(ValueError, match="umbrella"):
        twc.check_kinds_disjoint([{"task": {"meta": {"object": "coat"}}, "steps": [{"action": "put umbrella in shoe cabinet"}]}], held)


def test_score_moves_are_observed_and_the_budget_ends_the_episode(suite):
    task = suite.tasks("eval_unseen")[0]
    obj, place = twc.task_object(task), dict(task.meta)["receptacle"]
    env = twc.TWCEnv({"max_steps": 12})
    try:
        r = env.reset(task)
        assert f"the {obj}." in task.description and not r.done
        r = env.step(f"take {obj}")
        assert r.observation.endswith(twc.SCORE_UP) and r.score == 0.5
        wrong = next(a for a in r.admissible if a.startswith("put ") and not a.endswith(f" in {place}"))
        r = env.step(wrong)
        assert r.observation.endswith(twc.SCORE_DOWN) and r.score == 0.0 and not r.done
        r = env.step(f"take {obj}")
        r = env.step("look around")
        r = env.step("inventory")  # the fifth action: the evaluation budget is spent
        assert r.done and not r.won and r.info["budget"] == 5
        # A pool game has no budget of its own: the rollout's max_steps ends it.
        pool_task = suite.tasks("train_unseen")[0]
        env.reset(pool_task)
        for _ in range(6):
            r = env.step("look around")
        assert not r.done and r.info["budget"] == 12
        with pytest.raises(EnvError, match="twc/fold/seed"):
            env.reset(type(task)(id="x", split="train", task_type="twc", description="", locator="coin/train/1", env="twc"))
    finally:
        env.close()


def test_rule_skill_states_what_the_score_proved_without_the_room():
    steps = [{"action": "take dirty blue jumper", "observation": "You see a bench."},
             {"action": "put dirty blue jumper in work table", "observation": "You take it. Your score went up."},
             {"action": "take dirty blue jumper", "observation": "You put it in the work table. Your score went down."},
             {"action": "put dirty blue jumper in laundry basket", "observation": "You take it. Your score went up."}]
    demo = {"steps": steps, "final_observation": "You put it in the laundry basket. Your score went up."}
    skill = twc.skill_from_demo(demo)
    assert skill["decision_rules"] == ["The dirty blue jumper does not go in the work table.",
                                       "The dirty blue jumper goes in the laundry basket."]
    failed = twc.skill_from_demo({"steps": steps[:2], "final_observation": "You put it in the work table. Your score went down."})
    assert failed["decision_rules"][0] == "The dirty blue jumper does not go in the work table."
    assert "try another place" in failed["decision_rules"][-1]
    assert "bench" not in json.dumps(skill) and "step" not in json.dumps(skill["decision_rules"])


def test_warm_start_examples_keep_dev_objects_card_only():
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    from skill_transfer import skill_use_pairs

    def demo(i, kind, place):
        return {"task": {"id": f"t{i}", "meta": {"object": kind}},
                "steps": [{"action": f"put {kind} in {place}", "observation": "x"}],
                "final_observation": "You put it. Your score went up."}

    straight = [demo(0, "apple", "fridge"), demo(1, "apple", "fridge"), demo(2, "shoe", "shoe cabinet")]
    pairs = skill_use_pairs(straight, [], seed=0)
    relevant = [(d["task"]["id"], c) for d, c, r in pairs if r]
    # Cards come from a DIFFERENT game of the same object; an object seen once gets none.
    assert sorted(i for i, _ in relevant) == ["t0", "t1"]
    assert all("The apple goes in the fridge." in c for _, c in relevant)
    assert all(("apple" in c) != (twc.task_object(d["task"]) == "apple") for d, c, r in pairs if not r)


def test_skill_transfer_table_smoke_budget(tmp_path):
    """The benchmark's smoke budget end to end on the shipped twc warm start: every method of the
    paper's table (and the random-skill ablation) trains one step and is evaluated; the results
    hold, per method and seed, {split: {protocol: [wins, n]}}."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import paper_table

    model = Path(__file__).resolve().parents[1] / "checkpoints" / "tiny-twc-sft"
    if not (model / "config.json").is_file():
        pytest.skip("the twc warm start is not in this checkout (benchmarks/skill_transfer.py warmstart builds it)")
    results = tmp_path / "results"
    rc = paper_table.main(["--budget", "twc_smoke", "--out", str(tmp_path / "runs"), "--results", str(results),
                           "--no-start-row", f"--model={model}", f"retrieval.cache_dir={tmp_path / 'emb'}"])
    assert rc == 0
    report = json.loads((results / "paper_table_twc_smoke.json").read_text())
    assert list(report["rows"]) == ["GRPO", "Evolving-RL", "solver only", "extractor only", "random skill"]
    assert report["columns"] == [f"{s}/{p}" for s in ("eval_seen", "eval_unseen") for p in ("no_skill", "one_shot", "library")]
    assert {row["episodes"] for row in report["rows"].values()} == {10}  # equal budget: 2*(1+2*2)
    for name, seeds in report["counts"].items():
        (c,) = seeds  # one seed
        for split in ("eval_seen", "eval_unseen"):
            for proto in ("no_skill", "one_shot", "library"):
                wins, n = c[split][proto]
                assert n == 4 and 0 <= wins <= n, (name, split, proto)
        assert report["rows"][name]["cells"]["eval_unseen/one_shot"]["wins"] == c["eval_unseen"]["one_shot"][0]


def test_bad_options_name_the_option():
    with pytest.raises(ValueError, match="unknown env.options \\['budgt'\\]") as e:
        twc.TWCSuite({"budgt": 3})
    assert all(o in str(e.value) for o in ("budget", "rl_invented", "prune_tried", "twc_params"))  # every option offered
    with pytest.raises(ValueError, match="twc option budget: expected an integer in 2..100, got 1"):
        twc.TWCSuite({"budget": 1})
    with pytest.raises(ValueError, match="unknown split 'eval'"):
        twc.TWCSuite({}).tasks("eval")


def test_rl_fold_dev_trains_on_objects_the_warm_start_never_placed():
    s = twc.TWCSuite({**SMALL, "rl_fold": "dev"})
    try:
        train = s.tasks("train")
        assert len(train) == 40 and all(t.id.startswith("twc/dev/") and t.split == "train" for t in train)
        assert not _kinds(train) & (_kinds(s.tasks("eval_unseen")) | _kinds(s.tasks("train_unseen")))
        assert _kinds(s.tasks("eval_seen")) <= _kinds(s.tasks("dev"))  # seen = placed in the warm start
    finally:
        s.close()
    with pytest.raises(ValueError, match="rl_fold: 'train' or 'dev', got 'test'"):
        twc.TWCSuite({"rl_fold": "test"})


def test_tried_option_lists_this_episodes_placements_and_exploring_demos_try_several_places(suite, tmp_path):
    # Without the memory a greedy solver, seeing two turns back, repeated its first wrong try.
    task = suite.tasks("eval_unseen")[0]
    obj, place = twc.task_object(task), dict(task.meta)["receptacle"]
    for tried in (False, True):
        env = twc.TWCEnv({"max_steps": 12, "tried": tried})
        try:
            env.reset(task)
            r = env.step(f"take {obj}")
            assert "Tried:" not in r.observation
            wrong = next(a for a in r.admissible if a.startswith("put ") and not a.endswith(f" in {place}"))
            env.step(wrong)
            r = env.step(f"take {obj}")
            memory = f"Tried: {wrong} (score went down)."
            assert r.observation.endswith(memory) if tried else "Tried:" not in r.observation
        finally:
            env.close()
    with pytest.raises(ValueError, match="twc option tried: expected true or false, got 'yes'"):
        twc.TWCEnv({"tried": "yes"})
    env = twc.TWCEnv({"max_steps": 12, "prune_tried": True})  # the other memory: a proven-wrong place is no longer offered
    try:
        env.reset(task)
        r = env.step(f"take {obj}")
        env.step(wrong)
        r = env.step(f"take {obj}")
        assert wrong not in r.admissible and f"put {obj} in {place}" in r.admissible and "Tried:" not in r.observation
    finally:
        env.close()
    path = tmp_path / "demos.jsonl"
    stats = twc.write_demos(suite.tasks("train")[:12], path, explore_fraction=1.0, wrong_tries=3, tried=True)
    demos = [json.loads(line) for line in path.read_text().splitlines()]
    assert stats["won"] == 12 and stats["explored"] == 12
    wrong_puts = [[a for a in (s["action"] for s in d["steps"]) if a.startswith("put ")][:-1] for d in demos]
    assert all(len(set(w)) == len(w) >= 1 for w in wrong_puts)  # never the same wrong place twice
    assert max(map(len, wrong_puts)) >= 2  # several tries, not only one
    last = demos[0]["steps"][-1]["observation"]
    assert last.count("(score went down)") == len(wrong_puts[0])


def test_invented_objects_are_no_real_kind_and_renaming_leaves_no_trace(suite, tmp_path):
    """The warm start's card-only and copy examples rename training objects: an invented name
    must be no object kind of any split (else it would teach where a held-out object goes), and
    the old name must be gone from every text of the renamed demo (else the card is not needed)."""
    real = {twc.task_object(t) for split in suite.splits() for t in suite.tasks(split)}
    names = twc.invented_names(300, seed=0, avoid=real)
    assert len(set(names)) == 300 and not set(names) & real
    assert not any(twc.object_re(k).search(f"the {n}.") for n in names for k in real)  # nor one that names a kind inside
    path = tmp_path / "demos.jsonl"
    twc.write_demos(suite.tasks("train")[:12], path, explore_fraction=1.0, seed=0, wrong_tries=3)
    demos = [json.loads(x) for x in path.read_text().splitlines()]
    for d, name in zip(demos, names):
        r = twc.rename_object(d, name)
        text = json.dumps(r)
        assert not twc.object_re(twc.task_object(d["task"])).search(text)
        assert twc.task_object(r["task"]) == name and r["task"]["description"].endswith(f"the {name}.")
        assert [s["action"] for s in r["steps"]][0] == f"take {name}"
        rules = twc.skill_from_demo(r)["decision_rules"]
        assert f"The {name} goes in the {d['task']['meta']['receptacle']}." in rules  # the fact, under the new name
    twc.check_kinds_disjoint([twc.rename_object(d, n) for d, n in zip(demos, names)],
                             suite.tasks("eval_unseen") + suite.tasks("train_unseen"), "renamed demos")
    umbrella = {"task": {"id": "x", "description": "The object to put away: the umbrella.", "meta": {"object": "umbrella"}},
                "steps": [{"observation": "You see a umbrella stand and an umbrella.", "action": "put umbrella in umbrella stand"}]}
    r = twc.rename_object(umbrella, "bofa")  # a receptacle that starts with the old name keeps it
    assert r["steps"][0] == {"observation": "You see a umbrella stand and an bofa.", "action": "put bofa in umbrella stand"}


def test_rl_invented_renames_training_objects_in_every_text_and_the_engine_still_scores_them():
    """RL on invented names (rl_invented=G): the real kind must reach the agent nowhere (task,
    observations, admissible actions, expert), an action naming the invented object must act on
    the real one, each name must stay within one kind and at most G games (else a name could be
    learnt by heart), and held-out kinds stay out of training as before."""
    s = twc.TWCSuite({**SMALL, "rl_fold": "dev", "rl_invented": 2, "budget": 3})
    try:
        train, held_out = s.tasks("train"), s.tasks("eval_unseen") + s.tasks("train_unseen")
        real = {twc.task_object(t) for split in ("dev", "eval_seen") for t in s.tasks(split)} | _kinds(held_out)
        by_name: dict[str, set] = {}
        for t in train:
            by_name.setdefault(twc.task_object(t), set()).add((dict(t.meta)["kind"], t.id))
        assert len(by_name) > len({dict(t.meta)["kind"] for t in train}) and not set(by_name) & real
        assert all(len({k for k, _ in v}) == 1 and 1 <= len(v) <= 3 for v in by_name.values())  # 3: 2 + a joined single
        twc.check_kinds_disjoint(train, held_out)
        task = train[0]
        kind, name = dict(task.meta)["kind"], twc.task_object(task)
        assert task.description.endswith(f"the {name}.") and not twc.object_re(kind).search(task.description)
        env = twc.TWCEnv({"max_steps": 12})
        try:
            r, texts = env.reset(task), []
            while not r.done:
                texts += [r.observation, *r.admissible]
                action = env.expert_action()
                texts.append(action)
                r = env.step(action)
            texts.append(r.observation)
            assert r.won and r.score == 1.0 and f"take {name}" in texts
            assert not any(twc.object_re(kind).search(x) for x in texts)
        finally:
            env.close()
    finally:
        s.close()
    with pytest.raises(ValueError, match="rl_invented"):
        twc.TWCSuite({"rl_invented": -1})
