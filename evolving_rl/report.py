"""`evolving-rl report RUN_DIR`: one static HTML file a person can open offline (issue 5).

Why one self-contained file: a report gets mailed, attached to an issue or opened on a
machine with no network, so plots are embedded PNGs (also written to `plots/`), the CSS
and the few lines of sorting JS are inline, and nothing is fetched. Everything the model,
a skill or the environment wrote is untrusted text: it is escaped and length-bounded
before it reaches the page. A run killed early still gets a report that says what is
missing rather than a traceback.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
from collections import defaultdict
from pathlib import Path
from typing import Any, Callable

import yaml
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

MAX_CARD_CHARS = 3000
MAX_OBS_CHARS = 600
MAX_TURNS = 40
MAX_TRAJECTORIES = 6
PROTOCOL_ORDER = ("no_skill", "one_shot", "library")
STAGE_ORDER = tuple(f"time/{s}_s" for s in ("source", "extract", "retrieve", "downstream", "rewards", "collect", "update"))

_CSS = """
body{font-family:system-ui,sans-serif;margin:1.5em auto;max-width:1300px;color:#222;padding:0 1em}
h1{margin-bottom:.2em} h2{border-bottom:2px solid #ddd;padding-bottom:.2em;margin-top:1.6em}
table{border-collapse:collapse;margin:.6em 0;font-size:.9em} th,td{border:1px solid #ccc;padding:3px 7px;vertical-align:top}
th{background:#f2f2f2} table.sortable th{cursor:pointer} td.num{text-align:right;font-variant-numeric:tabular-nums}
.note{background:#fff6d6;border-left:4px solid #e0b000;padding:.4em .8em;margin:.5em 0}
.plots img{max-width:48%;margin:.3em;border:1px solid #eee}
pre{white-space:pre-wrap;word-break:break-word;background:#f7f7f7;padding:.4em;margin:.2em 0;font-size:.85em}
.pair{display:grid;grid-template-columns:1fr 1fr;gap:1em;margin-bottom:1.5em}
.pair>div{border:1px solid #ccc;padding:.5em;min-width:0} .won{color:#080;font-weight:bold} .lost{color:#b00;font-weight:bold}
.pos{color:#080} .neg{color:#b00} dl.kv dt{font-weight:bold;float:left;clear:left;width:14em} dl.kv dd{margin-left:15em}
"""

# Sorts a table.sortable by the clicked column: numbers numerically (data-v if set), text otherwise.
# The column is the header's cellIndex: an index over all pages' headers sorted the wrong column
# in every sortable table after the first.
# `report.html#sort=TABLE_ID:COLUMN[:desc]` clicks that header on load: a bookmarkable ordering,
# and the hook a headless browser uses to check that sorting works (it cannot click).
_JS = r"""
document.querySelectorAll('table.sortable th').forEach(function(th){var col=th.cellIndex;th.addEventListener('click',function(){
var tb=th.closest('table').tBodies[0],rows=Array.from(tb.rows),asc=th.dataset.asc!=='1';th.dataset.asc=asc?'1':'0';
function key(r){var c=r.cells[col],v=c.dataset.v!==undefined?c.dataset.v:c.textContent.trim(),n=parseFloat(v);return isNaN(n)?v.toLowerCase():n;}
rows.sort(function(a,b){var x=key(a),y=key(b);if(typeof x!==typeof y){x=String(x);y=String(y);}return (x<y?-1:x>y?1:0)*(asc?1:-1);});
rows.forEach(function(r){tb.appendChild(r);});});});
var m=/^#sort=([\w-]+):(\d+)(:desc)?$/.exec(location.hash),t=m&&document.getElementById(m[1]);
if(t){var h=t.tHead.rows[0].cells[+m[2]];if(h){h.click();if(m[3])h.click();}}
"""


def esc(text: Any, limit: int | None = None) -> str:
    """Escaped, and cut at `limit` chars with a note, so no model output can inject markup or swamp the page."""
    s = "" if text is None else str(text)
    if limit is not None and len(s) > limit:
        return html.escape(s[:limit]) + f"\n[... truncated: {len(s)} chars in all]"
    return html.escape(s)


def _num(v: Any) -> float:
    """A number from untrusted JSON, NaN (shown blank) when it is not one."""
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else math.nan


def _clip(text: Any, limit: int = 300) -> str:
    """A plain-string cell bounded in length (`_table` escapes it)."""
    s = str(text)
    return s if len(s) <= limit else s[:limit] + " [...]"


def _fmt(v: Any, digits: int = 3) -> str:
    if isinstance(v, float):
        return "" if math.isnan(v) else f"{v:.{digits}f}"
    return esc(v)


def _table(headers: list[str], rows: list[list[Any]], sortable: bool = False, table_id: str | None = None) -> str:
    """Cells are escaped unless given as ("raw", html) by code that escaped them itself;
    ("key", sort_key, text) shows `text` but sorts by the number `sort_key` (a time, an interval)."""
    head = "".join(f"<th>{esc(h)}</th>" for h in headers)
    body = []
    for row in rows:
        cells = []
        for c in row:
            if isinstance(c, tuple) and c[0] == "raw":
                cells.append(f"<td>{c[1]}</td>")
            elif isinstance(c, tuple) and c[0] == "key":
                cells.append(f'<td class="num" data-v="{_num(c[1])}">{esc(c[2])}</td>')
            elif isinstance(c, (int, float)) and not isinstance(c, bool):
                cells.append(f'<td class="num" data-v="{c}">{_fmt(c)}</td>')
            else:
                cells.append(f"<td>{esc(c)}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    cls = ' class="sortable"' if sortable else ""
    tid = f' id="{esc(table_id)}"' if table_id else ""
    return f"<table{tid}{cls}><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


# -- loading: every reader returns (data, notes) and never raises on a broken run dir -------


def _read_jsonl(path: Path, notes: list[str]) -> list[dict]:
    rows, bad = [], 0
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError as e:  # a directory in its place, no permission
        notes.append(f"{path.name}: not readable ({e.strerror or e})")
        return []
    for line in text.splitlines():
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            bad += 1
            continue
        if isinstance(row, dict):
            rows.append(row)
        else:
            bad += 1
    if bad:
        notes.append(f"{path.name}: skipped {bad} unreadable line(s) (a run killed mid-write leaves one)")
    return rows


def _load(run_dir: Path, lib: Path) -> dict:
    notes: list[str] = []
    data: dict[str, Any] = {"notes": notes, "config": {}, "metrics": [], "evals": [], "episodes": {}, "skills": None,
                            "service": None}
    cfg = run_dir / "config.yaml"
    if cfg.exists():
        try:
            loaded = yaml.safe_load(cfg.read_text(encoding="utf-8"))
            data["config"] = loaded if isinstance(loaded, dict) else {}
        except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
            notes.append(f"config.yaml: not readable YAML ({e.__class__.__name__})")
    else:
        notes.append("config.yaml is missing: run settings unknown")
    m = run_dir / "metrics.jsonl"
    if m.exists():
        data["metrics"] = _read_jsonl(m, notes)
    else:
        notes.append("metrics.jsonl is missing: no learning curves")
    eval_dir = run_dir / "eval"
    for p in sorted(eval_dir.glob("*.json")) if eval_dir.is_dir() else []:
        try:
            ev = json.loads(p.read_text(encoding="utf-8"))
            if not isinstance(ev, dict) or not isinstance(ev.get("results"), list):
                raise ValueError("no 'results' list")
        except (ValueError, OSError) as e:
            notes.append(f"eval/{p.name}: skipped, not an evaluation result ({e})")
            continue
        ev["tag"] = str(ev.get("tag") or p.stem)
        data["evals"].append(ev)
        ep = eval_dir / f"{p.stem}_episodes.jsonl"
        if ep.exists():
            data["episodes"][ev["tag"]] = _read_jsonl(ep, notes)
    if not data["evals"]:
        notes.append("eval/*.json is missing: no evaluation tables")
    if not data["episodes"]:
        notes.append("eval/*_episodes.jsonl is missing: no trajectories")
    if lib.exists():
        try:
            from evolving_rl.skills.library import SkillLibrary

            with SkillLibrary(lib, mode="read") as sl:  # a foreign file must stay as it was
                data["skills"] = sl.list(include_retired=True)
                data["service"] = _load_service(sl._db, _get(data["config"], "evolve.margin"), notes)
        except Exception as e:  # a corrupt or foreign file must not sink the whole report
            notes.append(f"{lib.name}: not readable as a skill library ({e})")
    else:
        notes.append(f"{lib.name} is absent: no skill library section")
    # Final first, then the latest evaluations: the reader wants the headline number on top.
    data["evals"].sort(key=lambda e: (e["tag"] != "final", -(e["step"] if isinstance(e.get("step"), int) else 0)))
    return data


MAX_SERVICE_ROWS = 500  # per service table: a long-lived deployment's audit log is unbounded
_SERVICE_TABLES = ("skill_lifecycle", "skill_audit_log", "library_versions", "arm_stats")


def _load_service(db: Any, margin: Any, notes: list[str]) -> dict | None:
    """The lifecycle tables `serve`/`evolve` keep in the library (serve/evolver.py), read with
    plain queries on the read-only connection: opening a SkillEvolver would write (schema,
    adoption, a first version) into a file the report must leave as it was. None when the
    library has never been served or evolved."""
    from evolving_rl.serve.guardrails import lift_posterior

    have = {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    if not set(_SERVICE_TABLES) <= have:
        return None
    margin = _num(margin)
    margin = 0.0 if math.isnan(margin) else margin  # the guardrail's default when the run's config does not say
    cap = MAX_SERVICE_ROWS
    skills = []
    for sid, status, uses, wins, cu, cw, reason, name, source in db.execute(
            "SELECT l.skill_id, l.status, l.uses, l.wins, l.ctrl_uses, l.ctrl_wins, l.reason, s.name, "
            "json_extract(s.provenance, '$.source_task_id') FROM skill_lifecycle l JOIN skills s ON s.id = l.skill_id "
            "ORDER BY l.skill_id LIMIT ?", (cap,)):
        try:
            lift = lift_posterior(wins, uses, cw, cu, margin)
        except (ValueError, TypeError):  # counts a hand-edited file made inconsistent: shown, not measured
            lift = None
        skills.append({"id": sid, "status": status, "uses": uses, "wins": wins, "ctrl_uses": cu, "ctrl_wins": cw,
                       "reason": reason, "name": name, "source": source, "lift": lift})
    totals = {t: db.execute(f"SELECT COUNT(*) FROM {t}").fetchone()[0] for t in _SERVICE_TABLES}
    versions = db.execute("SELECT version, at, actor, reason, skills FROM library_versions ORDER BY version DESC "
                          "LIMIT ?", (cap,)).fetchall()
    audit = db.execute("SELECT id, at, actor, action, skill_id, library_version, reason, detail FROM skill_audit_log "
                       "ORDER BY id DESC LIMIT ?", (cap,)).fetchall()
    arms = db.execute("SELECT arm, episodes, wins FROM arm_stats ORDER BY arm").fetchall()
    for table, shown in (("skill_lifecycle", skills), ("library_versions", versions), ("skill_audit_log", audit)):
        if totals[table] > len(shown):
            notes.append(f"{table}: {totals[table]} rows, the {len(shown)} {'first' if table == 'skill_lifecycle' else 'latest'} shown")
    return {"skills": skills, "versions": versions, "audit": audit, "arms": arms, "margin": margin}


# -- plots ----------------------------------------------------------------------------------


class _Plots:
    """Draws each figure once: a PNG in plots/ and the same bytes as a data URI in the page."""

    def __init__(self, out_dir: Path):
        self.out_dir = out_dir
        self.html: list[str] = []

    def add(self, name: str, title: str, draw: Callable[[Any], bool]) -> None:
        fig = Figure(figsize=(6.4, 3.6), dpi=100)
        FigureCanvasAgg(fig)
        ax = fig.add_subplot()
        if not draw(ax):
            return
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
        fig.tight_layout()
        buf = io.BytesIO()
        fig.savefig(buf, format="png")
        self.out_dir.mkdir(parents=True, exist_ok=True)
        (self.out_dir / f"{name}.png").write_bytes(buf.getvalue())
        uri = base64.b64encode(buf.getvalue()).decode("ascii")
        self.html.append(f'<img alt="{esc(title)}" src="data:image/png;base64,{uri}">')


def _series(rows: list[dict], key: str) -> tuple[list[int], list[float]]:
    pts = [(r["step"], r[key]) for r in rows if isinstance(r.get(key), (int, float)) and isinstance(r.get("step"), int)]
    return [p[0] for p in pts], [float(p[1]) for p in pts]


def _lines(rows: list[dict], keys: list[str]) -> Callable[[Any], bool]:
    def draw(ax: Any) -> bool:
        drawn = False
        for k in keys:
            xs, ys = _series(rows, k)
            if xs:
                ax.plot(xs, ys, marker="." if len(xs) < 30 else None, label=k)
                drawn = True
        return drawn

    return draw


def _eval_curves(rows: list[dict]) -> Callable[[Any], bool]:
    def draw(ax: Any) -> bool:
        curves: dict[tuple[str, str], list[tuple[int, float]]] = defaultdict(list)
        for r in rows:
            if isinstance(r.get("success"), (int, float)) and isinstance(r.get("step"), int):
                curves[(str(r.get("split")), str(r.get("protocol")))].append((r["step"], float(r["success"])))
        styles = {"no_skill": "--", "one_shot": "-", "library": ":"}
        colors = {s: f"C{i}" for i, s in enumerate(sorted({k[0] for k in curves}))}  # colour = split, line = protocol
        for (split, proto), pts in sorted(curves.items()):
            pts.sort()
            ax.plot([p[0] for p in pts], [p[1] for p in pts], styles.get(proto, "-."), color=colors[split], marker="o",
                    label=f"{split} {proto}")
        ax.set_ylim(-0.02, 1.02)
        return bool(curves)

    return draw


def _timings(rows: list[dict]) -> Callable[[Any], bool]:
    def draw(ax: Any) -> bool:
        found = {k for r in rows for k in r if k.startswith("time/") and k.endswith("_s")}
        keys = [k for k in STAGE_ORDER if k in found] + sorted(found - set(STAGE_ORDER))  # pipeline order
        if len(keys) > 2 and "time/collect_s" in keys:
            keys.remove("time/collect_s")  # the sum of the finer stages: stacking it counts them twice
        bottom: dict[int, float] = defaultdict(float)
        for k in keys:
            xs, ys = _series(rows, k)
            ax.bar(xs, ys, bottom=[bottom[x] for x in xs], label=k.removeprefix("time/").removesuffix("_s"))
            for x, y in zip(xs, ys):
                bottom[x] += y
        ax.set_ylabel("seconds")
        return bool(keys)

    return draw


def _plots_section(data: dict, out_dir: Path) -> str:
    train = [r for r in data["metrics"] if r.get("kind", "train") == "train"]
    evals = [r for r in data["metrics"] if r.get("kind") == "eval"]
    sft = [r for r in data["metrics"] if r.get("kind") == "sft"]
    p = _Plots(out_dir)
    p.add("train_reward", "Training success (solver)", _lines(train, ["solver/success", "solver/source_success",
                                                                       "solver/success_with_skill"]))
    p.add("eval_success", "Eval success: with skill (solid) vs without (dashed)", _eval_curves(evals))
    p.add("extractor", "Extractor: parse / valid rate, reward",
          _lines(train, ["extractor/parse_rate", "extractor/valid_skill_rate", "extractor/reward_mean"]))
    p.add("optimizer", "Loss, KL, clip fraction, entropy",
          _lines(train, ["loss/total", "loss/pg", "loss/approx_kl", "loss/kl", "loss/clip_frac", "loss/entropy"]))
    p.add("timings", "Stage timings per step", _timings(train))
    p.add("sft_loss", "SFT loss", _lines(sft, ["loss"]))
    if not p.html:
        return '<p class="note">No plottable metrics (metrics.jsonl missing or empty).</p>'
    return '<div class="plots">' + "".join(p.html) + "</div>"


# -- sections -------------------------------------------------------------------------------


def _get(cfg: dict, dotted: str) -> Any:
    node: Any = cfg
    for part in dotted.split("."):
        node = node.get(part) if isinstance(node, dict) else None
    return node


def _header(run_dir: Path, data: dict) -> str:
    cfg = data["config"]
    steps = [r["step"] for r in data["metrics"] if r.get("kind", "train") == "train" and isinstance(r.get("step"), int)]
    keys = ["algorithm", "model.path", "env.name", "seed", "train.steps", "env.max_steps", "grpo.group_size",
            "grpo.prompts_per_step", "grpo.lr", "evolving.sources_per_step", "evolving.num_skills",
            "evolving.num_downstream", "rollout.prompt_format", "eval.protocols", "eval.repeats", "eval.greedy"]
    items = [("steps done", max(steps) if steps else "none logged")]
    items += [(k, _get(cfg, k)) for k in keys if _get(cfg, k) is not None]
    dl = "".join(f"<dt>{esc(k)}</dt><dd>{esc(v, 300)}</dd>" for k, v in items)
    notes = "".join(f'<p class="note">{esc(n)}</p>' for n in data["notes"])
    return f"<h1>Run report: {esc(run_dir.resolve().name)}</h1><dl class='kv'>{dl}</dl><div style='clear:both'></div>{notes}"


def _delta_cell(d: float | None) -> Any:
    if d is None or math.isnan(d):
        return ""
    cls = "pos" if d > 0 else "neg" if d < 0 else ""
    return ("raw", f'<span class="{cls}">{d:+.3f}</span>')


def _eval_section(evals: list[dict]) -> str:
    out = []
    for ev in evals:
        res = [r for r in ev["results"] if isinstance(r, dict)]
        base = {r.get("split"): _num(r.get("success")) for r in res if r.get("protocol") == "no_skill"}
        rank = {p: i for i, p in enumerate(PROTOCOL_ORDER)}
        res.sort(key=lambda r: (str(r.get("split")), rank.get(r.get("protocol"), 9)))
        rows = []
        for r in res:
            ci = r.get("ci95") if isinstance(r.get("ci95"), list) and len(r["ci95"]) == 2 else [None, None]
            delta = None
            if r.get("protocol") != "no_skill" and r.get("split") in base:
                delta = _num(r.get("success")) - base[r.get("split")]
            ci_txt = f"[{_num(ci[0]):.3f}, {_num(ci[1]):.3f}]" if ci[0] is not None else ""
            rows.append([r.get("split"), r.get("protocol"), _num(r.get("success")), ci_txt, r.get("wins", ""),
                         r.get("n", ""), _num(r.get("mean_steps")), r.get("engine_failures", ""), _delta_cell(delta)])
        out.append(f"<h3>{esc(ev['tag'])} (step {esc(ev.get('step', '?'))})</h3>")
        out.append(_table(["split", "protocol", "success", "95% CI", "wins", "n", "mean steps", "engine failures",
                           "with skill − without"], rows))
        # Per task type: one column per protocol, so the skill's effect reads across a row.
        protos = [p for p in PROTOCOL_ORDER if any(r.get("protocol") == p for r in res)]
        by: dict[tuple[str, str], dict[str, dict]] = defaultdict(dict)
        for r in res:
            by_type = r.get("by_type") if isinstance(r.get("by_type"), dict) else {}
            for ttype, cell in by_type.items():
                if isinstance(cell, dict):
                    by[(str(r.get("split")), ttype)][r.get("protocol")] = cell
        trows = []
        for (split, ttype), cells in sorted(by.items()):
            row: list[Any] = [split, ttype]
            for p in protos:
                c = cells.get(p)
                row.append(f"{_num(c.get('success')):.3f} ({c.get('wins', '?')}/{c.get('n', '?')})" if c else "")
            b = cells.get("no_skill")
            for p in protos[1:]:
                c = cells.get(p)
                row.append(_delta_cell(_num(c.get("success")) - _num(b.get("success")) if c and b else None))
            trows.append(row)
        if trows:
            heads = ["split", "task type"] + [f"{p} success (wins/n)" for p in protos] + [f"{p} − no_skill" for p in protos[1:]]
            out.append(f"<details open><summary>Per task type</summary>{_table(heads, trows)}</details>")
    return "".join(out) or '<p class="note">No evaluation results in eval/.</p>'


def _skills_section(records: list | None) -> str:
    if records is None:
        return '<p class="note">No skill library (skills.sqlite) in this run.</p>'
    if not records:
        return '<p class="note">The skill library is empty.</p>'
    rows = []
    for r in records:
        prov = r.provenance or {}
        pos = prov.get("step") if prov.get("step") is not None else prov.get("stream_position")
        retired = _clip(f"yes: {r.retired_reason or ''}") if r.retired else "no"
        card = f"<details><summary>card ({len(r.card)} chars)</summary><pre>{esc(r.card, MAX_CARD_CHARS)}</pre></details>"
        rate = r.success_rate
        rows.append([r.id, _clip(r.name, 120), _clip(r.skill.get("description", "")), r.version, r.uses,
                     rate if rate is not None else "", _clip(prov.get("source_task_id") or "", 120), "" if pos is None else pos,
                     {True: "won", False: "lost"}.get(prov.get("success"), "?"), retired, ("raw", card)])
    heads = ["id", "name", "description", "version", "uses", "success when used", "source task", "step / stream pos",
             "source outcome", "retired", "card"]
    live = sum(not r.retired for r in records)
    return f"<p>{live} live, {len(records) - live} retired. Click a column header to sort.</p>" + _table(heads, rows, True)


def _when(t: Any) -> Any:
    """A UTC time that sorts by its epoch seconds."""
    import datetime as dt

    at = _num(t)
    if math.isnan(at):
        return ""
    return ("key", at, dt.datetime.fromtimestamp(at, dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC"))


def _rate(wins: Any, n: Any) -> Any:
    w, k = _num(wins), _num(n)
    return ("key", w / k, f"{w / k:.3f} ({w:g}/{k:g})") if k and k > 0 else ("key", math.nan, f"- (0/{k:g})")


def _service_section(svc: dict | None) -> str:
    """What a person running `evolving-rl serve` asks: which skills are in use, do they beat the
    no-skill control (the lift with its 95% interval, not a point estimate), what changed, who
    changed it and why, and which version to roll back to."""
    if svc is None:
        return '<p class="note">No service tables in the library: it has not been served or evolved.</p>'
    counts = defaultdict(int)
    for s in svc["skills"]:
        counts[s["status"]] += 1
    out = [f"<p>{counts['promoted']} promoted, {counts['quarantined']} quarantined, {counts['retired']} retired; "
           f"library version {esc(svc['versions'][0][0]) if svc['versions'] else '?'}. Lift = success with the skill "
           f"− success of its no-skill control episodes (posterior mean, 95% interval; margin {svc['margin']:g}). "
           "Click a column header to sort.</p>"]
    arm_rows = [[a, n, _rate(w, n)] for a, n, w in svc["arms"]]
    if arm_rows:
        out.append("<h3>Arms</h3>" + _table(["arm", "episodes", "success"], arm_rows, True, "service-arms"))
    rows = []
    for s in svc["skills"]:
        lift = s["lift"]
        cells: list[Any] = ["", "", ""] if lift is None else [
            ("raw", _delta_cell(lift.mean)[1]), ("key", lift.lo, f"[{lift.lo:+.3f}, {lift.hi:+.3f}]"), lift.p_better]
        rows.append([s["id"], _clip(s["name"], 120), s["status"], s["uses"], _rate(s["wins"], s["uses"]),
                     s["ctrl_uses"], _rate(s["ctrl_wins"], s["ctrl_uses"]), *cells, _clip(s["reason"]),
                     _clip(s["source"] or "", 120)])
    heads = ["id", "name", "status", "uses", "success", "control episodes", "control success", "lift", "lift 95% interval",
             "P(better)", "why (last change)", "source task"]
    out.append("<h3>Skills</h3>" + (_table(heads, rows, True, "service-skills") if rows else
                                    '<p class="note">No skill has entered the lifecycle yet.</p>'))
    vrows = [[v, _when(at), _clip(actor, 80), _clip(reason), n] for v, at, actor, reason, n in svc["versions"]]
    out.append("<h3>Library versions</h3><p>Each change is a new version; `rollback` restores any of them exactly.</p>"
               + _table(["version", "at", "actor", "reason", "skills"], vrows, True, "service-versions"))
    arows = [[i, _when(at), _clip(actor, 80), action, "" if sid is None else sid, "" if ver is None else ver,
              _clip(reason), _clip(detail)] for i, at, actor, action, sid, ver, reason, detail in svc["audit"]]
    out.append("<h3>Audit log</h3>" + (_table(["#", "at", "actor", "action", "skill", "version", "reason", "detail"],
                                              arows, True, "service-audit") if arows else
                                       '<p class="note">The audit log is empty.</p>'))
    return "".join(out)


def _episode_html(ep: dict, title: str) -> str:
    won = bool(ep.get("won"))
    parts = [f"<h4>{esc(title)}: <span class='{'won' if won else 'lost'}'>{'won' if won else 'lost'}</span> "
             f"in {esc(ep.get('steps', '?'))} steps</h4>"]
    meta = ep.get("skill_meta")
    if isinstance(meta, dict):
        keys = ("experience_task", "similarity", "experience_won", "skill_valid", "skill_reasons")
        shown = {k: meta[k] for k in keys if k in meta}
        parts.append(f"<p>skill: {esc(json.dumps(shown, default=str), 500)}</p>")
    if ep.get("skill_card"):
        card = esc(ep["skill_card"], MAX_CARD_CHARS)
        parts.append(f"<details open><summary>skill card used</summary><pre>{card}</pre></details>")
    turns = ep.get("turns") or []
    items = []
    for i, t in enumerate(turns[:MAX_TURNS]):
        t = t if isinstance(t, dict) else {}
        flag = "" if t.get("valid", True) else " <em>(not admissible)</em>"
        obs = esc(t.get("observation"), MAX_OBS_CHARS)
        items.append(f"<li><b>&gt; {esc(t.get('action'), 200)}</b>{flag}<pre>{obs}</pre></li>")
    more = f"<p>[... {len(turns) - MAX_TURNS} more turns not shown]</p>" if len(turns) > MAX_TURNS else ""
    final = f"<pre>{esc(ep.get('final_observation'), MAX_OBS_CHARS)}</pre>" if ep.get("final_observation") else ""
    return "".join(parts) + f"<ol>{''.join(items)}</ol>{more}{final}"


def _task(ep: dict) -> dict:
    return ep["task"] if isinstance(ep.get("task"), dict) else {}


def _trajectories_section(data: dict) -> str:
    """Pairs (split, task id, repeat) played with and without the one-shot skill; outcomes that
    differ first (skill helped, then skill hurt), since those are the ones worth reading."""
    for ev in data["evals"]:  # the same order as the tables: final first
        eps = [e for e in data["episodes"].get(ev["tag"]) or [] if isinstance(e, dict)]
        key = lambda e: (e.get("split"), _task(e).get("id"), e.get("repeat"))  # noqa: E731
        plain = {key(e): e for e in eps if e.get("protocol") == "no_skill"}
        pairs = [(e, plain[key(e)]) for e in eps if e.get("protocol") == "one_shot" and key(e) in plain]
        if pairs:
            break
    else:
        return '<p class="note">No task was played both with (one_shot) and without a skill: no side-by-side trajectories.</p>'
    helped = lambda p: bool(p[0].get("won")) and not p[1].get("won")  # noqa: E731
    hurt = lambda p: bool(p[1].get("won")) and not p[0].get("won")  # noqa: E731
    pairs.sort(key=lambda p: 0 if helped(p) else 1 if hurt(p) else 2)
    shown = min(len(pairs), MAX_TRAJECTORIES)
    out = [f"<p>From evaluation <b>{esc(ev['tag'])}</b>: {len(pairs)} paired episodes, {shown} shown.</p>"]
    for with_skill, without in pairs[:MAX_TRAJECTORIES]:
        task = _task(with_skill)
        out.append(f"<h3>{esc(task.get('id'), 200)} ({esc(with_skill.get('split'))}, {esc(task.get('task_type'))}, "
                   f"repeat {esc(with_skill.get('repeat'))})</h3><p>{esc(task.get('description'), 500)}</p>")
        out.append(f"<div class='pair'><div>{_episode_html(with_skill, 'with skill (one_shot)')}</div>"
                   f"<div>{_episode_html(without, 'without skill (no_skill)')}</div></div>")
    return "".join(out)


def _require_library(path: Path) -> None:
    from evolving_rl.skills.library import SkillLibrary

    try:
        with SkillLibrary(path, mode="read"):
            pass
    except Exception as e:  # not SQLite, not a library, unreadable: all the same answer
        raise ValueError(f"{path}: not a run directory nor a skill library file ({e}); give a run directory or the "
                         "served library's .sqlite file") from None


def write_report(run_dir: str | Path) -> Path:
    """Render RUN_DIR/report.html (self-contained) and RUN_DIR/plots/*.png; returns the HTML path.

    RUN_DIR may also be a served library's SQLite file (`evolving-rl serve --library X`): the
    report is then written next to it and shows that library, whatever its file name."""
    run_dir = Path(run_dir)
    lib = run_dir / "skills.sqlite"
    if run_dir.is_file():
        _require_library(run_dir)  # a mistyped argument gets an error, not a report about nothing
        run_dir, lib = run_dir.parent, run_dir
    elif not run_dir.is_dir():
        raise ValueError(f"run dir {run_dir}: not a directory (nor a served skill library file)")
    out, plots = run_dir / "report.html", run_dir / "plots"
    if out.is_dir():  # outputs are checked before anything is written
        raise ValueError(f"{out} is a directory; move it away so the report can be written there")
    if plots.exists() and not plots.is_dir():
        raise ValueError(f"{plots} is a file; move it away so the plots can be written there")
    data = _load(run_dir, lib)
    body = [
        _header(run_dir, data),
        "<h2>Learning curves</h2>", _plots_section(data, run_dir / "plots"),
        "<h2>Evaluation</h2>", _eval_section(data["evals"]),
        "<h2>Skill library</h2>", _skills_section(data["skills"]),
        *(["<h2>Service: lifecycle, lift over the control, versions, audit log</h2>", _service_section(data["service"])]
          if data["skills"] is not None else []),
        "<h2>Trajectories: with skill vs without</h2>", _trajectories_section(data),
    ]
    page = (f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>Report: {esc(run_dir.resolve().name)}"
            f"</title><style>{_CSS}</style></head><body>{''.join(body)}<script>{_JS}</script></body></html>")
    out.write_text(page, encoding="utf-8")
    return out
