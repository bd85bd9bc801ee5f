"""Agent Skills export/import (issue 19): every rule of the format checked on real extracted
skills and hostile ones, by our validator and by the format's reference validator
(skills-ref), and an export -> import round trip that loses no field."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from evolving_rl.skills.agent_skills import (
    BODY_MAX_LINES,
    fix_name,
    import_agent_skills,
    split_skill_md,
    valid_name,
    validate_folder,
    export_agent_skills,
)
from evolving_rl.skills.library import Provenance, SkillLibrary
from evolving_rl.skills.skill import Skill, audit, parse_skill, render_card

def cli(*args):
    return subprocess.run([sys.executable, "-m", "evolving_rl.cli", *map(str, args)], capture_output=True, text=True,
                          timeout=300)


FIX = Path(__file__).parent / "fixtures" / "extractor_outputs"
DIM = 384  # MiniLM's, so imported foreign skills (embedded for real) share the library
NAME = re.compile(r"^(?!-)(?!.*--)[a-z0-9-]{1,64}(?<!-)$")


def vec(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(DIM).astype(np.float32)


def real_skills() -> list[Skill]:
    """Every fixture the real parser reads (tiny-model outputs, hostile unicode ones included)."""
    out = [parse_skill(p.read_text(encoding="utf-8")) for p in sorted(FIX.glob("*.txt"))]
    return [r.skill for r in out if r.ok]


HOSTILE = [
    # (name, description)
    ("Heat & <script>alert(1)</script> Place!!", "Use it <b>when</b> heating: {a: [1, 2]} # not a comment"),
    ("ÉCLAIR — café ☕ über", "yes"),
    ("---", "null"),
    ("x" * 50 + " " + "y" * 50, "first line\nname: hijacked\n---\nmetadata: evil"),
    ("", "a skill with no name at all"),
    ("tab\tand\u202eRLO\u200bzero-width", "desc with \u202e bidi and \u200b zero width and \x07 bell"),
    ("heat-and-place-object", "z" * 3000),  # collides with a real fixture's name; over-long description
    ("-lead-and-trail-", "'quoted' \"double\" : colon & ampersand *star ?q |pipe >gt %pct @at `tick`"),
]


def build_library(path: Path) -> tuple[SkillLibrary, dict[str, int]]:
    lib = SkillLibrary(path)
    ids: dict[str, int] = {}
    skills = real_skills()
    for i, s in enumerate(skills):
        ids[f"real{i}"] = lib.add(s, render_card(s), vec(i),
                                  Provenance(source_task_id=f"game-{i}", model="tiny-llama", step=i, success=i % 2 == 0))
    for j, (name, desc) in enumerate(HOSTILE):
        s = {"name": name, "description": desc, "metadata": {"task_type": "pick_heat_then_place_in_recep"},
             "workflow": [{"goal": "g", "action": "a <img src=x onerror=alert(1)>"}]}
        ids[f"hostile{j}"] = lib.add(s, render_card(Skill.model_validate(s)), vec(100 + j), {"source_task_id": f"h{j}"})
    s = {"name": "invisible", "description": "\u200b\u202e\u2028"}
    ids["empty_desc"] = lib.add(s, "# Skill: invisible\n", vec(200))
    ids["long_card"] = lib.add({"name": "long", "description": "d"}, "line\n" * (BODY_MAX_LINES + 1), vec(201))
    ids["retired"] = lib.add({"name": "retired-one", "description": "d"}, "# Skill: retired\n", vec(202))
    lib.retire(ids["retired"], "hurt success")
    first = ids["real0"]
    lib.record_use(first, True)
    lib.record_use(first, False)
    lib.record_use(first, True)
    # A near-duplicate merges: version 2 with history, a field the round trip must keep.
    lib.add({"name": "heat-and-place-object", "description": "merged"}, "# merged card\n", vec(0) + 0.01 * vec(999),
            {"source_task_id": "game-merged", "model": "tiny-llama", "success": True})
    return lib, ids


def test_real_fixtures_give_real_collisions():
    names = [s.name for s in real_skills()]
    assert len(names) >= 10
    assert names.count("heat-and-place-object") >= 2 and names.count("find-and-place-object") >= 2


def test_export_obeys_every_rule_on_real_and_hostile_skills(tmp_path):
    skills_ref = pytest.importorskip("skills_ref", reason="the reference validator: pip install skills-ref (in [dev])")
    lib, ids = build_library(tmp_path / "lib.sqlite")
    out = tmp_path / "export"
    res = export_agent_skills(lib, out)

    assert sorted(res.skipped) == sorted([ids["empty_desc"], ids["long_card"]])
    assert any("description is empty" in m for m in res.messages) and any("lines" in m for m in res.messages)
    exported_ids = {i for i, _ in res.exported}
    assert ids["retired"] not in exported_ids
    assert exported_ids == {r.id for r in lib.list()} - set(res.skipped)
    folders = sorted(p for p in out.iterdir())
    assert [p.name for p in folders] == sorted(n for _, n in res.exported)

    for folder in folders:
        assert validate_folder(folder) == [], folder
        assert skills_ref.validate(folder) == [], folder  # the format's own validator agrees
        text = (folder / "SKILL.md").read_text(encoding="utf-8")
        front, body = split_skill_md(text, "x")
        assert set(front) <= {"name", "description", "metadata"}
        assert NAME.match(front["name"]) and front["name"] == folder.name
        assert 1 <= len(front["description"]) <= 1024 and "\n" not in front["description"]
        assert all(isinstance(k, str) and isinstance(v, str) for k, v in front.get("metadata", {}).items())
        assert len(body.splitlines()) < 500
        assert not re.search(r"[\x00-\x08\x0b-\x1f\u200b\u202e\u2028]", text.split("\n---\n", 1)[0])
        rec = lib.get(int(front["metadata"]["library-skill-id"]))
        assert body == rec.card  # the card travels unchanged as the body

    by_id = dict(res.exported)
    r = lambda key: by_id[ids[key]]  # noqa: E731
    assert r("hostile0") == "heat-script-alert-1-script-place"
    assert r("hostile1") == "eclair-cafe-uber"
    assert r("hostile2") == f"skill-{ids['hostile2']}" and r("hostile4") == f"skill-{ids['hostile4']}"
    assert r("hostile3") == ("x" * 50 + "-" + "y" * 13) and len(r("hostile3")) == 64
    assert r("hostile5") == "tab-and-rlo-zero-width"
    assert r("hostile7") == "lead-and-trail"
    # Collisions: the lowest id keeps the name, later ones get their id, deterministically.
    heat = sorted(i for i, n in res.exported if n.startswith("heat-and-place-object"))
    assert by_id[heat[0]] == "heat-and-place-object"
    assert [by_id[i] for i in heat[1:]] == [f"heat-and-place-object-{i}" for i in heat[1:]]

    def front_of(key):
        return split_skill_md((out / r(key) / "SKILL.md").read_text(encoding="utf-8"), "x")[0]

    f0 = front_of("hostile0")
    assert f0["metadata"]["original-name"] == HOSTILE[0][0]  # markup stays data, in quotes
    assert f0["description"] == HOSTILE[0][1]
    assert front_of("hostile1")["description"] == "yes" and front_of("hostile2")["description"] == "null"
    f3 = front_of("hostile3")
    assert f3["description"] == "first line name: hijacked -- metadata: evil" and set(f3) == {"name", "description", "metadata"}
    assert front_of("hostile5")["description"] == "desc with bidi and zero width and bell"
    assert len(front_of("hostile6")["description"]) == 1024 and front_of("hostile6")["description"].endswith("...")
    assert front_of("hostile7")["description"] == HOSTILE[7][1]
    meta = front_of("real0")["metadata"]
    assert meta["success-when-used"].startswith("2/3 = 0.667 (95% Wilson interval 0.20")
    assert meta["model"] == "tiny-llama" and meta["source-outcome"] == "success" and meta["source-task-id"] == "game-merged"
    # Exporting the same library again gives the same folders byte for byte.
    again = export_agent_skills(lib, tmp_path / "again")
    assert again.exported == res.exported
    for folder in folders:
        assert (folder / "SKILL.md").read_bytes() == (tmp_path / "again" / folder.name / "SKILL.md").read_bytes()
    with pytest.raises(ValueError, match="not an empty folder"):
        export_agent_skills(lib, out)


def test_round_trip_preserves_every_field(tmp_path):
    lib, ids = build_library(tmp_path / "a.sqlite")
    res = export_agent_skills(lib, tmp_path / "export")
    other = SkillLibrary(tmp_path / "b.sqlite")
    got = import_agent_skills(other, tmp_path / "export", embed=lambda texts: pytest.fail("exact restore embeds nothing"))
    assert got.messages == [] and got.added == []
    assert sorted(got.restored) == sorted(i for i, _ in res.exported)  # free ids are kept
    for sid, _ in res.exported:
        a, b = lib.get(sid).to_dict(), other.get(sid).to_dict()
        assert a == b, sid
    merged = other.get(ids["real0"])
    assert merged.version == 2 and len(merged.history) == 1 and (merged.uses, merged.successes) == (3, 2)
    # and the re-export of the imported library is the same bytes
    export_agent_skills(other, tmp_path / "again")
    for _, name in res.exported:
        for f in ("SKILL.md", "assets/evolving-rl-record.json"):
            assert (tmp_path / "export" / name / f).read_bytes() == (tmp_path / "again" / name / f).read_bytes()


def test_import_foreign_edited_and_invalid_folders(tmp_path):
    from evolving_rl.retrieval import Embedder

    embedder = Embedder.shared()  # the real all-MiniLM-L6-v2
    lib = SkillLibrary(tmp_path / "lib.sqlite")
    s = real_skills()[0]
    sid = lib.add(s, render_card(s), embedder.embed(["heat an egg and put it on the table"])[0])
    export_agent_skills(lib, tmp_path / "export")
    src = tmp_path / "export"
    (folder,) = list(src.iterdir())
    md = folder / "SKILL.md"
    md.write_text(md.read_text(encoding="utf-8").replace("## Workflow", "## Workflow (edited by a person)"), encoding="utf-8")

    foreign = src / "water-the-plants"
    foreign.mkdir()
    (foreign / "SKILL.md").write_text(
        "---\nname: water-the-plants\ndescription: Water every plant in the garden when the soil is dry.\n"
        "metadata:\n  author: another-agent\n---\n\n# Watering\n\n1. Go to each plant.\n2. Pour water until the soil is damp.\n",
        encoding="utf-8")
    windows = src / "sweep-the-floor"  # saved by a Windows editor: BOM and CRLF line ends
    windows.mkdir()
    (windows / "SKILL.md").write_bytes(
        "\ufeff---\r\nname: sweep-the-floor\r\ndescription: Sweep the floor of a room when it is dusty.\r\n---\r\n\r\n"
        "# Sweeping\r\n\r\n1. Take the broom.\r\n2. Sweep every corner of the room.\r\n".encode())
    bad = {
        "wrong-folder": "---\nname: other-name\ndescription: d\n---\nbody text\n",
        "no-front": "# just markdown\n",
        "dashes": "---\nname: dashes\ndescription: a --- b\n---\nbody\n",
        "bad-yaml": "---\nname: [unclosed\ndescription: d\n---\nbody\n",
        "bad-name": "---\nname: Bad_Name\ndescription: d\n---\nbody\n",
        "no-desc": "---\nname: no-desc\n---\nbody\n",
    }
    for name, text in bad.items():
        (src / name).mkdir()
        (src / name / "SKILL.md").write_text(text, encoding="utf-8")

    res = import_agent_skills(lib, src, embed=embedder.embed)
    assert res.restored == [] and len(res.added) == 3
    skipped = [m for m in res.messages if m.startswith("skipped")]
    assert len(skipped) == len(bad)
    for name in bad:
        assert sum(f"/{name}/SKILL.md" in m for m in skipped) == 1, name
    assert any("changed since export" in m for m in res.messages)
    edited = lib.get(res.added[0])
    assert "(edited by a person)" in edited.card and edited.skill["name"] == s.name and edited.uses == 0
    sweep = lib.get(res.added[1])
    assert sweep.name == "sweep-the-floor" and sweep.card.startswith("# Sweeping\n\n1. Take the broom.\n")
    water = lib.get(res.added[2])
    assert water.skill == {"name": "water-the-plants", "description": "Water every plant in the garden when the soil is dry.",
                           "metadata": {"author": "another-agent"}}
    assert water.provenance["extra"]["imported_from"] == "agent-skills"
    # Embedded by the same MiniLM as retrieval: a watering task finds it, a heating task does not.
    q = embedder.embed(["the garden plants need water"])[0]
    assert lib.retrieve(q, 1)[0].id == water.id
    assert lib.retrieve(embedder.embed(["heat an egg and put it on the table"])[0], 1)[0].id == sid
    with pytest.raises(ValueError, match="no such folder"):
        import_agent_skills(lib, tmp_path / "missing")


@given(st.text(max_size=200))
def test_fixed_names_are_valid_or_empty(raw):
    fixed = fix_name(raw)
    assert fixed == "" or valid_name(fixed)
    assert fix_name(raw) == fixed and (not valid_name(raw) or fixed == raw)


def test_cli_export_and_import_agent_skills(tmp_path):
    lib, ids = build_library(tmp_path / "lib.sqlite")
    n_live = len(lib)
    lib.close()
    r = cli("skills", "export", "--format", "agent-skills", tmp_path / "lib.sqlite", tmp_path / "out")
    assert r.returncode == 0, r.stdout + r.stderr
    assert f"{n_live - 2} skills" in r.stdout and "skipped" in r.stdout
    r = cli("skills", "import", "--format", "agent-skills", tmp_path / "new.sqlite", tmp_path / "out")
    assert r.returncode == 0, r.stdout + r.stderr
    assert len(SkillLibrary(tmp_path / "new.sqlite")) == n_live - 2
    r = cli("skills", "export", "--format", "agent-skills", tmp_path / "lib.sqlite", tmp_path / "out")
    assert r.returncode == 2 and "not an empty folder" in r.stdout + r.stderr and "Traceback" not in r.stderr
    r = cli("skills", "export", "--format", "nope", tmp_path / "lib.sqlite", tmp_path / "x")
    assert r.returncode == 2 and "agent-skills" in r.stdout + r.stderr


def test_with_the_service_lifecycle_only_promoted_skills_go_out(tmp_path):
    lib = SkillLibrary(tmp_path / "lib.sqlite")
    ids = [lib.add(s, render_card(s), vec(300 + i)) for i, s in enumerate(real_skills()[:3])]
    life = {ids[0]: {"status": "promoted", "lift": "+0.250 [+0.050, +0.450]"}, ids[1]: {"status": "quarantined"}}
    res = export_agent_skills(lib, tmp_path / "out", lifecycle=life)
    assert [i for i, _ in res.exported] == [ids[0]]  # ids[2] has no lifecycle row: new, so not promoted
    front, _ = split_skill_md((tmp_path / "out" / res.exported[0][1] / "SKILL.md").read_text(encoding="utf-8"), "x")
    assert front["metadata"]["lift-over-control"] == "+0.250 [+0.050, +0.450]"


def test_cli_exports_only_what_the_service_promoted(tmp_path):
    """On a library the deployment service has run on, `promoted` is its lifecycle's word."""
    from evolving_rl.config import load_config
    from evolving_rl.serve.evolver import SkillEvolver

    path = tmp_path / "served.sqlite"
    ev = SkillEvolver(path, load_config(None, []).evolve)
    skills = [s for s in real_skills() if audit(render_card(s)).ok][:3]  # the service admits only audited ones
    ids = [ev.admit(s, render_card(s), vec(400 + i), {"source_task_id": f"g{i}"}, actor="test", reason="seed")
           for i, s in enumerate(skills)]
    with ev.library._write() as db:  # as the guardrail does once a skill beats its control
        ev._set_status(db, ids[1], "promoted", "beats the no-skill control")
    ev.close()
    r = cli("skills", "export", "--format", "agent-skills", path, tmp_path / "out")
    assert r.returncode == 0, r.stdout + r.stderr
    (folder,) = list((tmp_path / "out").iterdir())
    front, _ = split_skill_md((folder / "SKILL.md").read_text(encoding="utf-8"), "x")
    assert front["metadata"]["library-skill-id"] == str(ids[1])
    assert re.match(r"[+-]0\.0\d\d \(95% interval -0\.7\d\d to \+0\.7\d\d;", front["metadata"]["lift-over-control"])
    assert "success 0/0 vs no-skill control 0/0" in front["metadata"]["lift-over-control"]
