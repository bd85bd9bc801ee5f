"""Hostile input, run through the real command line: every case must exit non-zero with one
message that names the field or file at fault, never a traceback, and must leave behind no
output it did not finish (no empty run directory, no fresh library file).

Each row is (id, setup, argv, names, leftovers): `setup(tmp)` writes the bad input and returns
substitutions for the argv; `names` must all appear in the output (whitespace-normalised);
`leftovers` are paths that must not exist afterwards. The cases are the fault classes of
issue 15 (found by fault injection), plus their neighbours.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from evolving_rl.cli import app

runner = CliRunner()
DIM = 4


def invoke(*args) -> tuple[int, str, BaseException | None]:
    r = runner.invoke(app, [str(a) for a in args])
    return r.exit_code, " ".join(r.output.split()), r.exception


def assert_handled(code: int, out: str, exc: BaseException | None, names: list[str]) -> None:
    # CliRunner catches what would have been a traceback into `exception`: that counts as a crash.
    assert exc is None or isinstance(exc, SystemExit), f"crashed with {type(exc).__name__}: {exc}\n{out}"
    assert code != 0, f"accepted: {out}"
    assert "Traceback" not in out, out
    for name in names:
        assert name in out, f"{name!r} not named in: {out}"


# -- builders of bad input ----------------------------------------------------------------


def _write(name: str, data: bytes | str) -> Callable[[Path], dict]:
    def setup(tmp: Path) -> dict:
        p = tmp / name
        p.write_bytes(data if isinstance(data, bytes) else data.encode())
        return {"FILE": p}
    return setup


def _library(tmp: Path, n: int = 1) -> Path:
    from evolving_rl.skills.library import SkillLibrary

    p = tmp / "lib.sqlite"
    with SkillLibrary(p) as lib:
        for i in range(n):
            lib.add({"name": f"skill-{i}", "description": "d"}, f"# skill-{i}", np.eye(DIM)[i % DIM])
    return p


def _record(**change) -> dict:
    rec = {"id": 1, "name": "heat-then-place", "card": "# heat-then-place\nHeat it, then place it.",
           "skill": {"name": "heat-then-place", "description": "d"}, "embedding": [1.0, 0.0, 0.0, 0.0],
           "provenance": {"source_task_id": "train/x"}, "history": [], "version": 1, "uses": 0, "successes": 0,
           "created_at": 1.0, "updated_at": 1.0, "retired": False, "retired_reason": None}
    rec.update(change)
    return rec


def _import(*records: dict, into_library: bool = True) -> Callable[[Path], dict]:
    def setup(tmp: Path) -> dict:
        src = tmp / "in.jsonl"
        src.write_text("".join(json.dumps(r) + "\n" for r in records))
        return {"LIB": _library(tmp) if into_library else tmp / "new.sqlite", "SRC": src}
    return setup


def _foreign_sqlite(tmp: Path) -> dict:
    p = tmp / "foreign.sqlite"
    with sqlite3.connect(p) as db:
        db.execute("CREATE TABLE people (name TEXT)")
    return {"FILE": p}


_PRISTINE: list[Path] = []  # one real tiny model per session, copied for each breakage


@pytest.fixture(autouse=True, scope="module")
def _pristine_model(tmp_path_factory):
    from evolving_rl.config import TinyModelConfig
    from evolving_rl.policy.tiny import build_tiny

    out = tmp_path_factory.mktemp("pristine") / "model"
    cfg = TinyModelConfig(vocab_size=300, hidden_size=32, num_layers=1, num_heads=2, intermediate_size=32,
                          max_position_embeddings=128)
    build_tiny(["go to the fridge 1", "take the apple 1 from the table 1", "heat the apple 1"] * 20, cfg, out)
    _PRISTINE[:] = [out]
    yield


def _model(tmp: Path, breakage: str) -> Path:
    import shutil

    out = tmp / "model"
    shutil.copytree(_PRISTINE[0], out)
    if breakage == "config":
        (out / "config.json").write_text('{"model_type": "llama", "hidden_size": ')
    elif breakage == "tokenizer":
        (out / "tokenizer.json").unlink()
    elif breakage == "weights":
        data = (out / "model.safetensors").read_bytes()
        (out / "model.safetensors").write_bytes(data[: len(data) // 2])
    return out


def _model_case(breakage: str) -> Callable[[Path], dict]:
    def setup(tmp: Path) -> dict:
        return {"MODEL": _model(tmp, breakage)}
    return setup


def _none(tmp: Path) -> dict:
    return {}


def _pg_down(tmp: Path) -> dict:
    """A postgresql:// library on a localhost port nothing listens on (a server that is down)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return {"PGURL": f"postgresql://postgres:hunter2secret@127.0.0.1:{port}/skills"}


_GAMES: list[Path] = []  # the session's real generated ALFWorld games (conftest), copied per case


@pytest.fixture(autouse=True, scope="module")
def _pristine_games(games_dir):
    _GAMES[:] = [games_dir]
    yield


def _games(tmp: Path, breakage: str = "none") -> Path:
    """A copy of the pristine games; `breakage` spoils the first train game or the manifest."""
    import shutil

    out = tmp / "games"
    shutil.copytree(_GAMES[0], out, ignore=shutil.ignore_patterns("*.jsonl"))
    manifest = json.loads((out / "manifest.json").read_text())
    first = out / manifest["splits"]["train"][0]["path"]
    if breakage == "empty-game":
        first.write_bytes(b"")
    elif breakage == "bad-pddl":  # valid JSON, but the engine cannot load it
        data = json.loads(first.read_text())
        data["pddl_problem"] = "(define (problem broken) (:domain alfred) (:objects"
        first.write_text(json.dumps(data))
    elif breakage == "unknown-type":
        manifest["splits"]["train"][1]["task_type"] = "juggle_three_apples"
        (out / "manifest.json").write_text(json.dumps(manifest))
    elif breakage == "path-not-string":
        manifest["splits"]["train"][1]["path"] = 5
        (out / "manifest.json").write_text(json.dumps(manifest))
    elif breakage == "manifest-latin1":
        (out / "manifest.json").write_bytes(b'{"splits": {"train": [{"description": "caf\xe9"}]}}')
    return out


def _games_case(breakage: str) -> Callable[[Path], dict]:
    def setup(tmp: Path) -> dict:
        out = _games(tmp, breakage)
        first = json.loads((_GAMES[0] / "manifest.json").read_text())["splits"]["train"][0]["path"]
        return {"GAMES": out, "FIRST": out / first}
    return setup


def _sft_case(tmp: Path) -> dict:
    (tmp / "d.jsonl").write_text('{"task": 1}\n')
    return {"FILE": tmp / "d.jsonl", "GAMES": _games(tmp), "MODEL": _model(tmp, "none")}


CASES: list[tuple[str, Callable[[Path], dict], list[str], list[str], list[str]]] = [
    # brackets in user text are printed, not read as rich markup
    ("markup-closing-tag", _write("c.yaml", "train:\n  steps: 3\n"), ["config", "show", "-c", "FILE", "train.steps=[/x]"],
     ["train.steps", "[/x]"], []),
    ("markup-vanishing-brackets", _none, ["config", "show", "eval.splits=[x]"], ["eval.splits", "eval.splits=[x]"], []),
    ("markup-in-config-path", _none, ["config", "show", "-c", "TMP/[bold]c[/bold].yaml"], ["[bold]c[/bold].yaml"], []),
    ("markup-in-skill-file", _none, ["skills", "check", "TMP/[red]x[/].txt"], ["[red]x[/].txt"], []),
    # config files that are not YAML text
    ("config-binary", _write("c.yaml", b"\x00\x01\xff\xfe\x80binary"), ["config", "show", "-c", "FILE"],
     ["c.yaml", "UTF-8"], []),
    ("config-latin1", _write("c.yaml", "train:\n  steps: 3  # caf\xe9\n".encode("latin-1")),
     ["config", "show", "-c", "FILE"], ["c.yaml", "UTF-8"], []),
    ("config-nul", _write("c.yaml", b"train:\n  steps: 3\x00\n"), ["config", "show", "-c", "FILE"], ["c.yaml"], []),
    ("config-is-directory", _none, ["config", "show", "-c", "TMP"], ["directory"], []),
    ("config-top-level-list", _write("c.yaml", "- a\n- b\n"), ["config", "show", "-c", "FILE"], ["c.yaml", "mapping"], []),
    ("config-section-is-scalar", _write("c.yaml", "train: 5\n"), ["config", "show", "-c", "FILE"], ["train"], []),
    ("override-empty-key-part", _none, ["config", "show", "train..steps=1"], ["train..steps"], []),
    ("override-no-equals", _none, ["config", "show", "train.steps"], ["train.steps", "key=value"], []),
    ("override-value-into-scalar", _none, ["config", "show", "train.steps=1", "train.steps.x=2"], ["train.steps"], []),
    # model directories transformers cannot load: name the file before any output is created
    ("model-corrupt-config-json", _model_case("config"), ["eval", "--checkpoint", "MODEL", "--out", "TMP/out"],
     ["config.json", "not valid JSON"], ["TMP/out"]),
    ("model-missing-tokenizer", _model_case("tokenizer"), ["eval", "--checkpoint", "MODEL", "--out", "TMP/out"],
     ["tokenizer"], ["TMP/out"]),
    ("model-truncated-safetensors", _model_case("weights"), ["eval", "--checkpoint", "MODEL", "--out", "TMP/out"],
     ["model.safetensors", "truncated"], ["TMP/out"]),
    ("train-model-truncated", _model_case("weights"), ["train", "model.path=MODEL", "run_dir=TMP/run"],
     ["model.safetensors"], ["TMP/run"]),
    # skills import: records that would make the library unusable or lie about their content
    ("import-wrong-dimension", _import(_record(embedding=[1.0, 0.0, 0.0])), ["skills", "import", "LIB", "SRC"],
     ["in.jsonl:1", "embedding", "dimension"], []),
    ("import-mixed-dimensions", _import(_record(), _record(id=2, embedding=[1.0, 0.0])),
     ["skills", "import", "TMP/new.sqlite", "SRC"], ["in.jsonl:2", "embedding"], ["TMP/new.sqlite"]),
    ("import-retired-reason-object", _import(_record(retired_reason={})), ["skills", "import", "LIB", "SRC"],
     ["in.jsonl:1", "retired_reason"], []),
    ("import-huge-id", _import(_record(id=2**70)), ["skills", "import", "LIB", "SRC"], ["in.jsonl:1", "id"], []),
    ("import-card-null", _import(_record(card=None)), ["skills", "import", "LIB", "SRC"], ["in.jsonl:1", "card"], []),
    ("import-name-list", _import(_record(name=["a"])), ["skills", "import", "LIB", "SRC"], ["in.jsonl:1", "name"], []),
    ("import-retired-string", _import(_record(retired="no")), ["skills", "import", "LIB", "SRC"],
     ["in.jsonl:1", "retired"], []),
    ("import-uses-fraction", _import(_record(uses=1.5)), ["skills", "import", "LIB", "SRC"], ["in.jsonl:1", "uses"], []),
    ("import-successes-above-uses", _import(_record(uses=1, successes=3)), ["skills", "import", "LIB", "SRC"],
     ["in.jsonl:1", "successes"], []),
    ("import-provenance-list", _import(_record(provenance=[1])), ["skills", "import", "LIB", "SRC"],
     ["in.jsonl:1", "provenance"], []),
    ("import-created-nan", _import(_record(created_at="nan")), ["skills", "import", "LIB", "SRC"],
     ["in.jsonl:1", "created_at"], []),
    ("import-card-huge", _import(_record(card="x" * 300_000)), ["skills", "import", "LIB", "SRC"],
     ["in.jsonl:1", "card"], []),
    ("import-history-object", _import(_record(history={})), ["skills", "import", "LIB", "SRC"],
     ["in.jsonl:1", "history"], []),
    ("import-embedding-strings", _import(_record(embedding=["1", "0", "0", "0"])), ["skills", "import", "LIB", "SRC"],
     ["in.jsonl:1", "embedding"], []),
    ("import-embedding-zero", _import(_record(embedding=[0, 0, 0, 0])), ["skills", "import", "LIB", "SRC"],
     ["in.jsonl:1", "embedding"], []),
    ("import-id-bool", _import(_record(id=True)), ["skills", "import", "LIB", "SRC"], ["in.jsonl:1", "id"], []),
    ("import-deep-nesting", _write("in.jsonl", '{"id": 1, "skill": ' + "[" * 100_000 + "]" * 100_000 + "}\n"),
     ["skills", "import", "TMP/new.sqlite", "FILE"], ["in.jsonl:1"], ["TMP/new.sqlite"]),
    ("import-line-not-object", _import(_record(), into_library=False), ["skills", "import", "LIB", "TMP/list.jsonl"],
     ["list.jsonl"], ["TMP/new.sqlite"]),
    ("import-non-utf8", _write("in.jsonl", b'{"id": 1, "name": "\xff"}\n'),
     ["skills", "import", "TMP/new.sqlite", "FILE"], ["in.jsonl", "UTF-8"], ["TMP/new.sqlite"]),
    ("import-missing-source", _none, ["skills", "import", "TMP/new.sqlite", "TMP/nope.jsonl"], ["nope.jsonl"],
     ["TMP/new.sqlite"]),
    ("import-into-text-file", _import(_record()), ["skills", "import", "SRC", "SRC"], ["in.jsonl"], []),
    ("import-into-directory", _import(_record()), ["skills", "import", "TMP", "SRC"], ["directory"], []),
    # skill library commands on files that are not libraries
    ("list-text-file", _write("notes.sqlite", "just some notes\n" * 50), ["skills", "list", "FILE"],
     ["notes.sqlite", "skill library"], []),
    ("list-foreign-sqlite", _foreign_sqlite, ["skills", "list", "FILE"], ["foreign.sqlite", "skill library"], []),
    ("list-empty-file", _write("empty.sqlite", b""), ["skills", "list", "FILE"], ["empty.sqlite", "empty"], []),
    ("export-empty-file", _write("empty.sqlite", b""), ["skills", "export", "FILE", "TMP/out.jsonl"],
     ["empty.sqlite"], ["TMP/out.jsonl"]),
    ("export-foreign-sqlite", _foreign_sqlite, ["skills", "export", "FILE", "TMP/out.jsonl"], ["foreign.sqlite"],
     ["TMP/out.jsonl"]),
    ("export-to-directory", lambda t: {"LIB": _library(t)}, ["skills", "export", "LIB", "TMP"], ["directory"], []),
    ("export-under-a-file", lambda t: {"LIB": _library(t)}, ["skills", "export", "LIB", "LIB/out.jsonl"],
     ["lib.sqlite"], []),
    ("show-huge-id", lambda t: {"LIB": _library(t)}, ["skills", "show", "LIB", str(2**70)], ["skill", str(2**70)], []),
    ("show-on-foreign-sqlite", _foreign_sqlite, ["skills", "show", "FILE", "1"], ["foreign.sqlite"], []),
    ("retire-huge-id", lambda t: {"LIB": _library(t)}, ["skills", "retire", "LIB", str(2**70), "--reason", "x"],
     [str(2**70)], []),
    # a postgresql:// library whose server is down or whose URL is malformed: named, password hidden
    *[(f"{'-'.join(argv[:2])}-postgres-down",
       (lambda t: {**_pg_down(t), "MODEL": _model(t, "none")}) if "model.path=MODEL" in argv else _pg_down, argv,
       ["postgresql://postgres:***@127.0.0.1"], [])
      for argv in (["skills", "list", "PGURL"], ["skills", "show", "PGURL", "1"],
                   ["skills", "export", "PGURL", "TMP/out.jsonl"], ["skills", "retire", "PGURL", "1", "--reason", "x"],
                   ["skills", "export", "--format", "agent-skills", "PGURL", "TMP/out"],
                   ["skills", "mcp", "PGURL"], ["evolve", "--library", "PGURL", "model.path=MODEL"],
                   ["serve", "--library", "PGURL", "model.path=MODEL"])],
    ("skills-import-postgres-down", lambda t: {**_import(_record())(t), **_pg_down(t)}, ["skills", "import", "PGURL", "SRC"],
     ["postgresql://postgres:***@127.0.0.1"], []),
    ("eval-skills-postgres-down", lambda t: {**_games_case("none")(t), **_pg_down(t)},
     ["eval", "--checkpoint", "MODEL", "--out", "TMP/out", "--skills", "PGURL", "env.games_dir=GAMES",
      "eval.splits=[eval_seen]", "env.num_workers=0", "rollout.max_prompt_tokens=128"],
     ["postgresql://postgres:***@127.0.0.1", "cannot connect"], ["TMP/out"]),
    ("train-library-path-postgres", _none, ["train", "library.path=postgresql://u@127.0.0.1/skills"],
     ["library.path", "SQLite file", "skills import"], []),
    ("skills-list-postgres-bad-port", _none, ["skills", "list", "postgresql://u@127.0.0.1:notaport/db"],
     ["postgresql://u@127.0.0.1:notaport/db", "port"], []),
    ("skills-check-directory", _none, ["skills", "check", "TMP"], ["no such file"], []),
    ("skills-check-binary", _write("raw.txt", b"\xff\xfe\x00garbage"), ["skills", "check", "FILE"], ["raw.txt"], []),
    # games: a game that cannot be read is named (evaluation refuses it unless told to skip it)
    ("eval-empty-game", _games_case("empty-game"),
     ["eval", "--checkpoint", "MODEL", "--out", "TMP/out", "env.games_dir=GAMES", "eval.splits=[train]",
      "env.num_workers=0", "env.max_steps=2", "eval.repeats=1", "rollout.max_prompt_tokens=128"],
     ["FIRST", "skip_bad_games"], ["TMP/out"]),
    ("demos-unknown-task-type", _games_case("unknown-type"), ["games", "demos", "--games", "GAMES", "--out",
     "TMP/d.jsonl"], ["manifest.json", "juggle_three_apples", "splits.train[1]"], ["TMP/d.jsonl"]),
    ("demos-manifest-path-not-string", _games_case("path-not-string"), ["games", "demos", "--games", "GAMES", "--out",
     "TMP/d.jsonl"], ["manifest.json", "splits.train[1]", "path"], ["TMP/d.jsonl"]),
    ("demos-manifest-latin1", _games_case("manifest-latin1"), ["games", "demos", "--games", "GAMES", "--out",
     "TMP/d.jsonl"], ["manifest.json", "UTF-8"], ["TMP/d.jsonl"]),
    ("demos-games-dir-missing", _none, ["games", "demos", "--games", "TMP/nope", "--out", "TMP/d.jsonl"],
     ["nope"], ["TMP/d.jsonl"]),
    # building games and models: inputs are checked before the output directory is made
    ("games-generate-negative-size", _none, ["games", "generate", "--out", "TMP/g", "--train", "-1"],
     ["'train'", "-1"], ["TMP/g"]),
    ("games-generate-zero-expert-steps", _none, ["games", "generate", "--out", "TMP/g", "--max-expert-steps", "0"],
     ["--max-expert-steps"], ["TMP/g"]),
    ("games-generate-negative-workers", _none, ["games", "generate", "--out", "TMP/g", "--workers", "-3"],
     ["--workers"], ["TMP/g"]),
    ("games-generate-out-is-a-file", _write("g", "x"), ["games", "generate", "--out", "FILE", "--train", "1",
     "--train-unseen", "0", "--eval-seen", "0", "--eval-unseen", "0"], ["FILE", "is a file"], []),
    ("model-tiny-bad-demos", _write("d.jsonl", '{"task": 1}\n'), ["model", "tiny", "--demos", "FILE", "--out",
     "TMP/m"], ["d.jsonl:1"], ["TMP/m"]),
    ("model-tiny-missing-demos", _none, ["model", "tiny", "--demos", "TMP/nope.jsonl", "--out", "TMP/m"],
     ["nope.jsonl"], ["TMP/m"]),
    ("sft-bad-demos", _sft_case, ["sft", "--out", "TMP/s", "sft.demos=[FILE]", "model.path=MODEL",
     "env.games_dir=GAMES", "rollout.max_prompt_tokens=128"], ["d.jsonl:1"], ["TMP/s"]),
    ("sft-model-missing", _none, ["sft", "--out", "TMP/s", "model.path=TMP/nowhere"], ["model.path", "nowhere"],
     ["TMP/s"]),
    ("eval-tag-with-slash", _games_case("none"), ["eval", "--checkpoint", "MODEL", "--out", "TMP/out", "--tag", "a/b",
     "env.games_dir=GAMES"], ["--tag", "a/b"], ["TMP/out"]),
    ("eval-tag-escapes", _games_case("none"), ["eval", "--checkpoint", "MODEL", "--out", "TMP/out", "--tag", "..",
     "env.games_dir=GAMES"], ["--tag", "'..'"], ["TMP/out"]),
    ("demos-out-is-a-directory", _games_case("none"), ["games", "demos", "--games", "GAMES", "--out", "TMP",
     "--max-tasks", "1"], ["is a directory"], ["TMP.partial"]),
    # report
    ("report-on-a-file", _write("run.txt", "x"), ["report", "FILE"], ["run.txt"], []),
    ("report-html-taken-by-a-dir", lambda t: (t / "report.html").mkdir() or {}, ["report", "TMP"],
     ["report.html", "is a directory"], ["TMP/plots"]),
    ("report-plots-taken-by-a-file", _write("plots", "x"), ["report", "TMP"], ["plots", "is a file"],
     ["TMP/report.html"]),
]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_hostile_input_is_named_not_a_traceback(case, tmp_path):
    _, setup, argv, names, leftovers = case
    subs = {"TMP": str(tmp_path), **{k: str(v) for k, v in setup(tmp_path).items()}}
    if "MODEL" in argv and "MODEL" not in subs:
        subs["MODEL"] = str(_model(tmp_path, "none"))
    if "TMP/list.jsonl" in argv:
        (tmp_path / "list.jsonl").write_text("[1, 2]\n")

    def sub(text: str) -> str:
        for key in sorted(subs, key=len, reverse=True):  # MODEL before ..., FILE before ...
            text = text.replace(key, subs[key])
        return text

    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    code, out, exc = invoke(*map(sub, argv))
    assert_handled(code, out, exc, [sub(n) for n in names])
    assert "hunter2secret" not in out  # a library URL's password is never printed
    for left in leftovers:
        assert not Path(sub(left)).exists(), f"left behind: {sub(left)}"
    # a failed command changes no input file (a foreign SQLite file stays as it was, an empty file stays empty)
    changed = [str(p) for p, data in before.items() if not p.exists() or p.read_bytes() != data]
    assert not changed, f"changed: {changed}"


def test_report_reads_a_foreign_sqlite_file_without_changing_it(tmp_path):
    """`report` opens skills.sqlite read-only: a foreign file gets no tables and no switch to WAL."""
    _foreign_sqlite(tmp_path)
    (tmp_path / "foreign.sqlite").rename(tmp_path / "skills.sqlite")
    before = (tmp_path / "skills.sqlite").read_bytes()
    code, out, exc = invoke("report", tmp_path)
    assert code == 0 and exc is None, out
    assert (tmp_path / "skills.sqlite").read_bytes() == before
    assert not (tmp_path / "skills.sqlite-wal").exists()
    with sqlite3.connect(tmp_path / "skills.sqlite") as db:
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "delete"
        assert [r[0] for r in db.execute("SELECT name FROM sqlite_master")] == ["people"]
    page = (tmp_path / "report.html").read_text(encoding="utf-8")
    assert "skills.sqlite: not readable as a skill library" in page and "people" in page


def test_model_files_are_checked_where_the_policy_loads(tmp_path):
    """HFPolicy itself names the broken file (the CLI's early check is a second line, not the only one)."""
    from evolving_rl.config import ModelConfig
    from evolving_rl.policy.files import ModelFilesError, check_model_dir
    from evolving_rl.policy.hf import HFPolicy

    good = _model(tmp_path / "good", "none")
    check_model_dir(good)  # a loadable directory passes
    assert HFPolicy(ModelConfig(path=str(good))).vocab_size > 0
    for breakage, name in (("config", "config.json"), ("tokenizer", "tokenizer"), ("weights", "model.safetensors")):
        broken = _model(tmp_path / breakage, breakage)
        with pytest.raises(ModelFilesError, match=f"model.path=.*{name}"):
            HFPolicy(ModelConfig(path=str(broken)))
    # sharded weights: a missing shard is named
    sharded = _model(tmp_path / "sharded", "none")
    (sharded / "model.safetensors").rename(sharded / "model-00001-of-00002.safetensors")
    (sharded / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {
        "a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}}))
    with pytest.raises(ModelFilesError, match="model-00002-of-00002.safetensors"):
        check_model_dir(sharded)
    with pytest.raises(FileNotFoundError, match="no model directory"):  # still a FileNotFoundError for old callers
        check_model_dir(tmp_path / "nowhere")


@pytest.mark.parametrize("breakage", ["empty-game", "bad-pddl"])
def test_one_corrupt_game_does_not_abort_games_demos(breakage, tmp_path):
    """The corrupt game is skipped, named and counted; the other games' demos are written."""
    setup = _games_case(breakage)(tmp_path)
    code, out, exc = invoke("games", "demos", "--games", setup["GAMES"], "--out", tmp_path / "d.jsonl", "--workers", "1",
                            "--max-tasks", "3")
    assert exc is None and code == 0, out
    assert str(setup["FIRST"]) in out and "skipped 1" in out, out
    demos = [json.loads(line) for line in (tmp_path / "d.jsonl").read_text().splitlines()]
    # an unreadable game is left out when the split is listed, so it is not one of the first 3 tasks;
    # an unplayable one is, and costs its slot
    assert len(demos) == (3 if breakage == "empty-game" else 2) and all(d["won"] for d in demos)
    assert str(setup["FIRST"]) not in {d["task"]["locator"] for d in demos}


def test_a_game_that_cannot_be_read_is_an_error_or_a_named_warning(tmp_path):
    from evolving_rl.envs.alfworld import AlfworldSuite, BadGameWarning

    setup = _games_case("empty-game")(tmp_path)
    with pytest.raises(ValueError, match=f"{setup['FIRST']}.*skip_bad_games"):
        AlfworldSuite({"games_dir": str(setup["GAMES"])}).tasks("train")
    suite = AlfworldSuite({"games_dir": str(setup["GAMES"]), "skip_bad_games": True})
    with pytest.warns(BadGameWarning, match=str(setup["FIRST"])):
        tasks = suite.tasks("train")
    whole = AlfworldSuite({"games_dir": str(_GAMES[0])})
    assert len(tasks) == len(whole.tasks("train")) - 1 and [p for p, _ in suite.skipped] == [str(setup["FIRST"])]
    assert len(suite.tasks("eval_seen")) == len(whole.tasks("eval_seen"))  # other splits unaffected


def test_report_notes_unreadable_inputs_instead_of_crashing(tmp_path):
    """A run dir's inputs may be anything (a crash mid-write, a stray directory): each is a note on the page."""
    (tmp_path / "config.yaml").write_bytes(b"\xff\xfe\x00binary")
    (tmp_path / "metrics.jsonl").mkdir()
    (tmp_path / "eval").mkdir()
    (tmp_path / "eval" / "final.json").mkdir()
    code, out, exc = invoke("report", tmp_path)
    assert code == 0 and exc is None, out
    page = (tmp_path / "report.html").read_text(encoding="utf-8")
    assert "config.yaml: not readable" in page and "metrics.jsonl: not readable" in page
    assert "eval/final.json: skipped" in page


def test_generate_games_checks_its_numbers_before_making_the_directory(tmp_path):
    from evolving_rl.envs.alfworld_gen import GenerationError, generate_games

    for kwargs, name in (({"max_expert_steps": 0}, "max_expert_steps"), ({"workers": -3}, "workers")):
        with pytest.raises(GenerationError, match=name):
            generate_games(tmp_path / "g", seed=0, sizes={"train": 1}, **kwargs)
        assert not (tmp_path / "g").exists()
