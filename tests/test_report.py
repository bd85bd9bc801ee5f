from __future__ import annotations

import json
import re
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
import yaml

from evolving_rl.report import MAX_OBS_CHARS, write_report
from evolving_rl.skills.library import Provenance, SkillLibrary

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
XSS = "<script>alert(1)</script>"


def _config(run_dir: Path) -> None:
    cfg = {"algorithm": "evolving", "model": {"path": "checkpoints/tiny-alfworld-sft"}, "env": {"name": "alfworld"},
           "train": {"steps": 4}, "grpo": {"group_size": 8}, "eval": {"protocols": ["no_skill", "one_shot"]}}
    (run_dir / "config.yaml").write_text(yaml.safe_dump(cfg))


def _metrics(run_dir: Path) -> None:
    rows = []
    for step in range(1, 5):
        rows.append({"step": step, "time": 1e9 + step, "kind": "train", "solver/success": 0.1 * step, "loss/total": 1.0 / step,
                     "loss/approx_kl": 0.01 * step, "loss/clip_frac": 0.05, "loss/entropy": 2.0 - 0.1 * step,
                     "extractor/parse_rate": 0.5 + 0.1 * step, "extractor/valid_skill_rate": 0.4 + 0.1 * step,
                     "extractor/reward_mean": 0.2 * step, "time/source_s": 3.0, "time/extract_s": 2.0,
                     "time/downstream_s": 4.0, "time/update_s": 1.5, "time/collect_s": 9.0})
    for step, tag in ((0, "initial"), (4, "final")):
        for split in ("eval_seen", "eval_unseen"):
            for proto, succ in (("no_skill", 0.2 + 0.05 * step), ("one_shot", 0.3 + 0.1 * step)):
                rows.append({"step": step, "time": 1e9, "kind": "eval", "tag": tag, "split": split, "protocol": proto,
                             "success": succ, "n": 10})
    text = "".join(json.dumps(r) + "\n" for r in rows) + '{"step": 5, "kind": "tr'  # a run killed mid-write
    (run_dir / "metrics.jsonl").write_text(text)


def _cell(success: float, n: int) -> dict:
    wins = round(success * n)
    return {"success": success, "ci95": [max(0.0, success - 0.2), min(1.0, success + 0.2)], "wins": wins, "n": n,
            "mean_steps": 12.5, "engine_failures": 0}


def _turns(prefix: str) -> list[dict]:
    return [{"observation": f"{prefix} You arrive at cabinet 1. <b>bold</b>", "action": "go to cabinet 1",
             "completion": "<action>go to cabinet 1</action>", "valid": True},
            {"observation": "x" * (MAX_OBS_CHARS * 3), "action": "take apple 1 from cabinet 1", "completion": "", "valid": False}]


def _evals(run_dir: Path) -> None:
    ev = run_dir / "eval"
    ev.mkdir()
    results = []
    for split, types in (("eval_seen", ["pick_and_place_simple"]), ("eval_unseen", ["pick_heat_then_place_in_recep"])):
        for proto, succ in (("no_skill", 0.25), ("one_shot", 0.75)):
            results.append({"split": split, "protocol": proto, **_cell(succ, 8), "by_type": {t: _cell(succ, 8) for t in types}})
    (ev / "final.json").write_text(json.dumps({"tag": "final", "step": 4, "results": results}))
    (ev / "initial.json").write_text(json.dumps({"tag": "initial", "step": 0, "results": results[:1]}))
    episodes = []
    for i, (won_skill, won_plain) in enumerate([(True, False), (False, False), (True, True)]):
        task = {"id": f"task-{i}", "split": "eval_seen", "task_type": "pick_and_place_simple",
                "description": f"put an apple in the fridge <i>{i}</i>"}
        card = f"# Skill: find-apple-{i}\n{XSS}\n<b>bold</b>\n" + "step\n" * 2000
        for proto, won, card_used in (("one_shot", won_skill, card), ("no_skill", won_plain, None)):
            episodes.append({"split": "eval_seen", "protocol": proto, "repeat": 0, "task": task, "won": won, "steps": 7,
                             "skill_card": card_used,
                             "skill_meta": {"experience_task": "train-9", "similarity": 0.91, "skill_valid": True,
                                            "skill_reasons": []} if card_used else None,
                             "turns": _turns(f"[{proto}-{i}]"), "final_observation": "The end."})
    (ev / "final_episodes.jsonl").write_text("".join(json.dumps(e) + "\n" for e in episodes))


def _library(run_dir: Path) -> list[str]:
    rng = np.random.default_rng(0)
    names = ["clean-and-place-object", "heat-and-place-object", "evil-skill"]
    with SkillLibrary(run_dir / "skills.sqlite") as lib:
        ids = []
        for i, name in enumerate(names):
            card = f"# Skill: {name}\nDo the thing." + (f"\n{XSS}" if name == "evil-skill" else "")
            ids.append(lib.add({"name": name, "description": f"how to {name}"}, card, rng.standard_normal(16),
                               Provenance(source_task_id=f"train-{i}", model="tiny", step=i + 1, success=i != 1)))
        lib.record_use(ids[0], True)
        lib.record_use(ids[0], False)
        lib.retire(ids[1], "auto: hurt success")
    return names


class _Collect(HTMLParser):
    """The real tags and attributes of the page, as a browser's parser sees them."""

    def __init__(self) -> None:
        super().__init__()
        self.tags: list[tuple[str, dict]] = []
        self.script_bodies: list[str] = []
        self._in_script = False

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))
        self._in_script = tag == "script"

    def handle_endtag(self, tag):
        self._in_script = False

    def handle_data(self, data):
        if self._in_script:
            self.script_bodies.append(data)


@pytest.fixture
def full_run(tmp_path) -> tuple[Path, list[str]]:
    run = tmp_path / "run-full"
    run.mkdir()
    _config(run)
    _metrics(run)
    _evals(run)
    return run, _library(run)


def test_full_report(full_run):
    run, names = full_run
    out = write_report(run)
    assert out == run / "report.html"
    page = out.read_text(encoding="utf-8")
    parser = _Collect()
    parser.feed(page)

    # Untrusted text is escaped: only our own sorting script is a script, and no <b> from a model became a tag.
    assert "<script>alert" not in page and "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert "&lt;b&gt;bold&lt;/b&gt;" in page and "&lt;i&gt;0&lt;/i&gt;" in page
    assert len(parser.script_bodies) == 1 and "alert" not in parser.script_bodies[0]
    assert "<b>bold</b>" not in page and "<i>0</i>" not in page
    assert "truncated" in page  # the 10k-char card and the long observation are cut

    # Self-contained: images inline, no external resources.
    imgs = [a["src"] for t, a in parser.tags if t == "img"]
    assert len(imgs) >= 5 and all(s.startswith("data:image/png;base64,") for s in imgs)
    for t, a in parser.tags:
        for attr in ("src", "href"):
            assert not str(a.get(attr, "")).startswith(("http:", "https:", "//")), (t, a)
    assert not re.search(r"""(src|href)\s*=\s*["']?https?:""", page) and "@import" not in page

    # Plots on disk are real PNGs, and the same ones are embedded.
    pngs = sorted((run / "plots").glob("*.png"))
    assert {p.stem for p in pngs} >= {"train_reward", "eval_success", "extractor", "optimizer", "timings"}
    assert all(p.read_bytes().startswith(PNG_MAGIC) and p.stat().st_size > 1000 for p in pngs)
    assert len(imgs) == len(pngs)

    # Header and evaluation table: both protocols, the delta 0.75 - 0.25, per-type breakdown, final first.
    assert "evolving" in page and "checkpoints/tiny-alfworld-sft" in page
    assert "one_shot" in page and "no_skill" in page and "+0.500" in page
    assert "pick_heat_then_place_in_recep" in page
    assert page.index(">final (step 4)<") < page.index(">initial (step 0)<")
    assert "skipped 1 unreadable line" in page

    # Skill library: a sortable table with every skill, the retired one with its reason.
    tables = [a for t, a in parser.tags if t == "table"]
    assert any(a.get("class") == "sortable" for a in tables)
    for name in names:
        assert name in page
    assert "yes: auto: hurt success" in page and "1 retired" in page

    # Trajectories side by side; the pair where the skill changed the outcome comes first.
    assert page.count("class='pair'") == 3
    traj = page[page.index("Trajectories"):]
    assert traj.index("task-0") < traj.index("task-1") < traj.index("task-2")
    assert "[one_shot-0] You arrive" in traj and "[no_skill-0] You arrive" in traj
    assert "not admissible" in traj


def test_partial_run_renders_with_notes(tmp_path):
    run = tmp_path / "run-partial"
    run.mkdir()
    _config(run)
    _metrics(run)
    page = write_report(run).read_text(encoding="utf-8")
    assert "eval/*.json is missing" in page and "skills.sqlite is absent" in page
    assert "no side-by-side trajectories" in page
    assert "data:image/png;base64," in page and (run / "plots" / "train_reward.png").exists()


def test_empty_run_dir_and_bad_path(tmp_path):
    page = write_report(tmp_path).read_text(encoding="utf-8")
    assert "config.yaml is missing" in page and "metrics.jsonl is missing" in page
    assert "No plottable metrics" in page
    with pytest.raises(ValueError, match="not a directory"):
        write_report(tmp_path / "nope")


def test_broken_eval_file_is_named(tmp_path):
    _config(tmp_path)
    (tmp_path / "eval").mkdir()
    (tmp_path / "eval" / "final.json").write_text("{not json")
    bad_values = {"tag": "step2", "step": "two", "results": [
        {"split": "eval_seen", "protocol": "no_skill", "success": "high", "ci95": "x", "by_type": ["not", "a", "dict"]},
        {"split": "eval_seen", "protocol": "one_shot", "success": 0.5, "ci95": [0.1, 0.9], "n": 4,
         "by_type": {"t": {"success": 0.5}, "u": "junk"}}]}
    (tmp_path / "eval" / "step2.json").write_text(json.dumps(bad_values))
    (tmp_path / "eval" / "step2_episodes.jsonl").write_text('{"protocol": "one_shot", "task": "not a dict"}\n[1, 2]\n')
    page = write_report(tmp_path).read_text(encoding="utf-8")
    assert "eval/final.json: skipped" in page
    assert "step2 (step two)" in page and "[0.100, 0.900]" in page  # the readable parts still show
    assert "skipped 1 unreadable line" in page
