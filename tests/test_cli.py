"""The command line: bad input gives one clear message and a non-zero exit, never a traceback."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

FIX = Path(__file__).parent / "fixtures" / "extractor_outputs"


def cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "evolving_rl.cli", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd, timeout=300)


def test_invalid_config_names_the_field():
    r = cli("config", "show", "grpo.clip_high=-0.5", "rollout.prompt_format=chat")
    assert r.returncode == 2 and "Traceback" not in r.stderr + r.stdout
    out = " ".join((r.stdout + r.stderr).split())
    assert "grpo.clip_high" in out and "rollout.prompt_format" in out and "'chat'" in out


def test_skills_check_is_a_linter():
    ok = cli("skills", "check", FIX / "valid_pure.txt", FIX / "fenced_json.txt")
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert "heat-and-place-object" in ok.stdout
    bad = cli("skills", "check", FIX / "valid_pure.txt", FIX / "truncated.txt", FIX / "non_english.txt")
    assert bad.returncode == 1
    assert "truncated" in bad.stdout and "non_english" in bad.stdout
    missing = cli("skills", "check", FIX / "nope.txt")
    assert missing.returncode == 2 and "nope.txt" in missing.stdout + missing.stderr


def test_skill_library_commands_round_trip(tmp_path):
    import numpy as np

    from evolving_rl.skills.library import SkillLibrary
    from evolving_rl.skills.skill import parse_skill, render_card

    lib_path = tmp_path / "skills.sqlite"
    lib = SkillLibrary(lib_path)
    sk = parse_skill((FIX / "valid_pure.txt").read_text()).skill
    sid = lib.add(sk, render_card(sk), np.ones(4, dtype=np.float32), {"source_task_id": "train/x"})
    lib.close()
    listed = cli("skills", "list", lib_path)
    assert listed.returncode == 0 and "heat-and-place-object" in listed.stdout
    shown = cli("skills", "show", lib_path, sid)
    assert shown.returncode == 0 and "train/x" in shown.stdout
    assert cli("skills", "show", lib_path, 999).returncode == 2
    assert cli("skills", "export", lib_path, tmp_path / "s.jsonl").returncode == 0
    assert cli("skills", "import", tmp_path / "copy.sqlite", tmp_path / "s.jsonl").returncode == 0
    assert cli("skills", "retire", lib_path, sid, "--reason", "hurts success").returncode == 0
    assert "heat-and-place-object" not in cli("skills", "list", lib_path).stdout
    assert "hurts success" in cli("skills", "list", lib_path, "--all").stdout
    assert "heat-and-place-object" in cli("skills", "list", tmp_path / "copy.sqlite").stdout
    assert cli("skills", "list", tmp_path / "missing.sqlite").returncode == 2


def test_missing_inputs_are_named(tmp_path):
    r = cli("train", "--config", tmp_path / "nope.yaml")
    assert r.returncode == 2 and "nope.yaml" in r.stdout + r.stderr
    r = cli("report", tmp_path / "no_run")
    assert r.returncode == 2 and "no_run" in r.stdout + r.stderr
    r = cli("eval", "--checkpoint", tmp_path / "no_model")
    assert r.returncode == 2 and "no_model" in r.stdout + r.stderr


def test_demos_command_names_bad_input(tmp_path):
    r = cli("demos", "--out", tmp_path / "d.jsonl", "env.name=mind2web", f"env.options={{data_dir: {tmp_path}}}")
    out = " ".join((r.stdout + r.stderr).split())
    assert r.returncode == 2 and "Traceback" not in out and "mind2web" in out and "data_dir" in out, out
    r = cli("demos", "--out", tmp_path / "d.jsonl", "--split", "nope", "env.name=textworld", f"env.games_dir={tmp_path}")
    out = " ".join((r.stdout + r.stderr).split())
    assert r.returncode == 2 and "Traceback" not in out and "manifest.json" in out, out
    r = cli("demos", "--out", tmp_path / "d.jsonl", "--split", "nope", "env.name=twx")
    out = " ".join((r.stdout + r.stderr).split())
    assert r.returncode == 2 and "Traceback" not in out and "unknown split 'nope'" in out, out
