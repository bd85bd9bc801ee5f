"""The report's service view (issue 18 item 4) on a real served library, and in a real browser.

The library is a real SQLite file driven by the real lifecycle engine (SkillEvolver): one skill
promoted over its control, one retired for doing worse, one still quarantined, an admin action,
a rollback. Skill names, cards and audit reasons carry markup, which must reach the page as
text. The browser checks use Debian's chromium (scripts/chromium_for_tests.sh installs it) and
skip, saying so, only when it is absent."""

from __future__ import annotations

import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest

from evolving_rl.common import snapshot_sqlite
from evolving_rl.config import load_config
from evolving_rl.report import write_report
from evolving_rl.serve.evolver import Decision, SkillEvolver
from evolving_rl.skills.library import Provenance, SkillLibrary

XSS = "<script>alert(1)</script>"
EVIL_NAME = f"evil{XSS}<b>name</b>"
EVIL_REASON = f"admin says <img src=x onerror=alert(2)> {XSS}"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
needs_chromium = pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed: run "
                                    "scripts/chromium_for_tests.sh (as root) for the headless-browser checks")


def _vec(i: int, dim: int = 8) -> np.ndarray:
    v = np.zeros(dim, dtype=np.float32)
    v[i] = 1.0
    return v


@pytest.fixture(scope="module")
def served(tmp_path_factory) -> Path:
    """A run dir whose skills.sqlite went through the service lifecycle; skill ids 1, 2, 3 are
    promoted (lift > 0), retired (lift < 0) and quarantined (no episodes), so id order differs
    from lift order."""
    run = tmp_path_factory.mktemp("served")
    names = ["find-objects", EVIL_NAME, "heat-then-place"]
    with SkillLibrary(run / "skills.sqlite") as lib:  # written as training would; the evolver adopts them
        for i, name in enumerate(names):
            card = f"# Skill: {name}\nGo to each likely place.\n{XSS}<i>card</i>"
            lib.add({"name": name, "description": f"how to {name}"}, card, _vec(i),
                    Provenance(source_task_id=f"task-<u>{i}</u>", model="tiny", step=1, success=True))
    cfg = load_config(None, ["evolve.min_uses=5", "evolve.confidence=0.9"])
    ev = SkillEvolver(run / "skills.sqlite", cfg.evolve)
    for _ in range(5):  # skill 1 wins where its control loses; skill 2 loses where its control wins
        ev.record(Decision("trial", 1), 1.0)
        ev.record(Decision("control", credited=[1]), 0.0)
        ev.record(Decision("trial", 2), 0.0)
        ev.record(Decision("control", credited=[2]), 1.0)
    assert ev.statuses([1, 2, 3]) == {1: "promoted", 2: "retired", 3: "quarantined"}
    before = ev.current_version()
    ev.retire(3, actor="<b>admin</b>", reason=EVIL_REASON)
    ev.rollback(before, actor="admin", reason="undo the retirement")
    assert ev.statuses([3]) == {3: "quarantined"}
    ev.close()
    return run


class _Dom(HTMLParser):
    """Rows (cell texts) of each table with an id, and every script element, as parsed HTML."""

    def __init__(self) -> None:
        super().__init__()
        self.tables: dict[str, list[list[str]]] = {}
        self.scripts = 0
        self.tags: list[str] = []
        self._table: str | None = None
        self._in_body = False
        self._cell: list[str] | None = None

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        self.tags.append(tag)
        if tag == "script":
            self.scripts += 1
        if tag == "table":
            self._table = a.get("id")
            if self._table:
                self.tables[self._table] = []
        elif tag == "tbody":
            self._in_body = True
        elif tag == "tr" and self._table and self._in_body:
            self.tables[self._table].append([])
        elif tag == "td" and self._table and self._in_body:
            self._cell = []

    def handle_endtag(self, tag):
        if tag == "td" and self._cell is not None:
            self.tables[self._table][-1].append("".join(self._cell).strip())
            self._cell = None
        elif tag == "tbody":
            self._in_body = False
        elif tag == "table":
            self._table = None

    def handle_data(self, data):
        if self._cell is not None:
            self._cell.append(data)


def _dom(text: str) -> _Dom:
    d = _Dom()
    d.feed(text)
    return d


def test_service_view_tables_and_escaping(served):
    page = write_report(served).read_text(encoding="utf-8")
    dom = _dom(page)
    assert dom.scripts == 1  # only the report's own sorting script
    assert XSS not in page and "<img" not in page and "<b>name</b>" not in page and "<b>admin</b>" not in page
    assert "evil&lt;script&gt;alert(1)&lt;/script&gt;&lt;b&gt;name&lt;/b&gt;" in page
    assert "&lt;img src=x onerror=alert(2)&gt;" in page and "&lt;b&gt;admin&lt;/b&gt;" in page
    assert {"service-arms", "service-skills", "service-versions", "service-audit"} <= set(dom.tables)

    skills = {int(r[0]): r for r in dom.tables["service-skills"]}
    assert sorted(skills) == [1, 2, 3]
    assert [skills[i][2] for i in (1, 2, 3)] == ["promoted", "retired", "quarantined"]
    assert skills[1][3] == "5" and skills[1][4] == "1.000 (5/5)" and skills[1][6] == "0.000 (0/5)"
    assert skills[2][4] == "0.000 (0/5)" and skills[2][6] == "1.000 (5/5)"
    lift1, lift2, lift3 = (float(skills[i][7]) for i in (1, 2, 3))
    assert lift1 > 0.5 and lift2 < -0.5 and abs(lift3) < 0.05  # Beta(6,1) - Beta(1,6): mean 0.714
    lo, hi = (float(x) for x in skills[1][8].strip("[]").split(","))
    assert 0 < lo < lift1 < hi <= 1  # the interval excludes 0: why it was promoted
    assert float(skills[1][9]) > 0.9 and float(skills[2][9]) < 0.1
    assert skills[3][10].startswith("adopted") and skills[1][11] == "task-<u>0</u>"  # text, not markup

    # The audit log: every change, newest first, with who and why; the versions table matches it.
    audit = dom.tables["service-audit"]
    actions = [r[3] for r in audit]
    assert actions[:2] == ["rollback", "retire"] and actions.count("promote") == 1 and actions.count("retire") == 2
    assert audit[1][2] == "<b>admin</b>" and audit[1][6] == EVIL_REASON and audit[1][4] == "3"
    versions = dom.tables["service-versions"]
    assert [int(r[0]) for r in versions] == list(range(len(versions), 0, -1))  # 1 initial + 4 changes
    assert len(versions) == 5 and versions[0][3].startswith("rollback")
    assert int(audit[0][5]) == int(versions[0][0])  # each audit row names the version it made
    arms = {r[0]: r for r in dom.tables["service-arms"]}
    assert arms["control"][1] == "10" and arms["trial"][2] == "0.500 (5/10)"


def test_report_on_a_served_library_file(served, tmp_path):
    """`evolving-rl report served.sqlite`: any file name, the report next to it, the file untouched."""
    lib = tmp_path / "deploy.sqlite"
    snapshot_sqlite(served / "skills.sqlite", lib)  # a plain copy can miss pages still in the -wal file
    before = lib.read_bytes()
    out = write_report(lib)
    assert out == tmp_path / "report.html" and lib.read_bytes() == before
    dom = _dom(out.read_text(encoding="utf-8"))
    assert len(dom.tables["service-skills"]) == 3


def test_training_library_has_no_service_view(tmp_path):
    with SkillLibrary(tmp_path / "skills.sqlite") as lib:
        lib.add({"name": "a"}, "# Skill: a\nGo.", _vec(0), Provenance(source_task_id="t", model="m", step=1))
    page = write_report(tmp_path).read_text(encoding="utf-8")
    assert "it has not been served or evolved" in page and "service-skills" not in page


def _chromium(args: list[str], tmp_path: Path) -> subprocess.CompletedProcess:
    profile = tmp_path / "chromium-profile"
    cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
           "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage", f"--user-data-dir={profile}",
           *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=180)


@needs_chromium
def test_browser_renders_and_sorts(served, tmp_path):
    url = write_report(served).resolve().as_uri()

    shot = tmp_path / "report.png"
    r = _chromium(["--window-size=1300,2400", f"--screenshot={shot}", url], tmp_path)
    assert shot.exists(), f"chromium wrote no screenshot: {r.stderr[-2000:]}"
    from PIL import Image

    img = np.asarray(Image.open(shot).convert("RGB"))
    assert img.shape[:2] == (2400, 1300)
    ink = (img.min(axis=2) < 200).mean()  # share of pixels that are not (near) white
    assert 0.01 < ink < 0.6, f"the page looks blank or broken: {ink:.4f} of pixels drawn"
    assert len(np.unique(img.reshape(-1, 3), axis=0)) > 50  # text, tables, plots: many colours

    def order(fragment: str, table: str = "service-skills") -> list[int]:
        r = _chromium(["--dump-dom", url + fragment], tmp_path)
        dom = _dom(r.stdout)
        assert table in dom.tables, f"no table {table} in chromium's DOM: {r.stderr[-2000:]}"
        assert dom.scripts == 1 and "img" not in dom.tags  # the browser, too, made no element from skill text
        return [int(row[0]) for row in dom.tables[table]]

    assert order("") == [1, 2, 3]  # as written: by id
    assert order("#sort=service-skills:7") == [2, 3, 1]  # lift ascending: retired, quarantined, promoted
    assert order("#sort=service-skills:7:desc") == [1, 3, 2]
    assert order("#sort=service-skills:2") == [1, 3, 2]  # status as text: promoted, quarantined, retired
    assert order("#sort=service-audit:0", "service-audit") == sorted(order("", "service-audit"))


def test_a_file_that_is_not_a_library_is_refused(tmp_path):
    (tmp_path / "notes.sqlite").write_text("not sqlite")
    with pytest.raises(ValueError, match="notes.sqlite: not a run directory nor a skill library file"):
        write_report(tmp_path / "notes.sqlite")
    assert not (tmp_path / "report.html").exists() and (tmp_path / "notes.sqlite").read_text() == "not sqlite"
