"""Skills other agents can load: the library as Agent Skills folders, and back (issue 19).

Coding and chat agents load a skill as a folder `<name>/SKILL.md`: YAML front matter
(`name`, `description`, optional `metadata`) and a Markdown body they read when the
description says the skill applies. The rules enforced here are the format's:

- `name`: 1-64 characters of a-z, 0-9 and single hyphens, no leading or trailing hyphen,
  equal to the folder name. Extractor names break this (capitals, spaces, markup, unicode);
  they are fixed deterministically (ASCII-folded, lowercased, runs of anything else -> one
  hyphen, cut to 64) and a name taken by an earlier skill (lower id) gets `-<id>`, so the
  same library always exports the same folders.
- `description`: 1-1024 characters. Model text goes through `_plain`: one line, no
  control/format characters, no `---` (the reference parser splits the file on the first
  `---` anywhere, so one inside the front matter would end it early). A skill whose
  description is empty after that is skipped with a message, never invented.
- `metadata`: string -> string; here the provenance an adopter needs to judge the skill
  (source task type, model, training step, success when used with a Wilson 95% interval,
  the measured lift over the no-skill control with its interval when the caller has the
  service's lifecycle, the library id it came from, its original name when it was fixed).
- body: the card the solver reads, under `BODY_MAX_LINES` lines (longer: skipped).

Front matter is written with `yaml.safe_dump`, so markup, quotes, `#`, `:`, `yes`/`null`
and unicode in model text stay data. Skills are untrusted text: nothing here executes
them, and a consumer that shows one in HTML must escape it.

Which skills: the promoted ones. The library itself has no lifecycle, so without one
"promoted" means live (not retired); a caller that has the deployment service's lifecycle
passes it (`lifecycle`: id -> {"status", "lift"}) and then only `status == "promoted"` is
exported (`exportable`); this module stays below the service and never reads its tables.

Exact round trip: the front matter is a cleaned view, so each folder also carries
`assets/evolving-rl-record.json`, the library record as `export_jsonl` writes it plus the
SHA-256 of the SKILL.md it was written with. Import restores that record exactly (through
`import_jsonl`, the one restore path) when SKILL.md is unchanged; a folder from another
tool, or one whose SKILL.md was edited, becomes a new skill built from SKILL.md alone,
embedded with the same MiniLM as retrieval and audited like an extracted skill.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
import unicodedata
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from evolving_rl.skills.skill import Skill, audit

NAME_MAX = 64
DESCRIPTION_MAX = 1024
METADATA_VALUE_MAX = 256
BODY_MAX_LINES = 500
BODY_MAX_CHARS = 20_000  # an imported card longer than this is not a card a solver prompt can hold
SKILL_MD_MAX_BYTES = 256 * 1024
RECORD_FILE = "assets/evolving-rl-record.json"
RECORD_FORMAT = "evolving-rl-record/1"
FRONT_MATTER_KEYS = frozenset(("name", "description", "license", "allowed-tools", "metadata", "compatibility"))

_NAME_RE = re.compile(r"[a-z0-9]+(?:-[a-z0-9]+)*")


def valid_name(name: Any) -> bool:
    return isinstance(name, str) and 1 <= len(name) <= NAME_MAX and _NAME_RE.fullmatch(name) is not None


def fix_name(raw: str) -> str:
    """The nearest valid name, or '' when nothing usable is left (the caller falls back)."""
    # Accents fold (é -> e) but any other non-ASCII character separates words like a space,
    # so a zero-width or bidi character cannot glue two words into one name.
    s = "".join(c if c.isascii() else "" if unicodedata.combining(c) else "-"
                for c in unicodedata.normalize("NFKD", str(raw).casefold()))
    s = re.sub(r"[^a-z0-9]+", "-", s.lower()).strip("-")
    return s[:NAME_MAX].rstrip("-")


def _plain(text: Any, limit: int) -> str:
    """Model text made safe for one front-matter value: one line, printable, no `---`, bounded."""
    s = unicodedata.normalize("NFKC", str(text))
    s = "".join(" " if unicodedata.category(c)[0] in "CZ" else c for c in s)  # controls, bidi, zero-width, line seps
    s = re.sub(r"-{3,}", "--", " ".join(s.split()))
    if len(s) > limit:
        s = s[: limit - 3].rstrip() + "..."
    return s


def exportable(rec: Any, lifecycle: Mapping[int, Mapping[str, Any]] | None = None) -> bool:
    """Promoted skills: with a lifecycle, `status == "promoted"` (a skill it has no row for is
    new, so quarantined); without one, every skill not retired."""
    if lifecycle is None:
        return not rec.retired
    return lifecycle.get(rec.id, {}).get("status") == "promoted" and not rec.retired


def _metadata(rec: Any, name: str, lift: Any = None) -> dict[str, str]:
    from evolving_rl import __version__
    from evolving_rl.common import wilson

    prov = rec.provenance if isinstance(rec.provenance, dict) else {}
    extra = prov.get("extra") if isinstance(prov.get("extra"), dict) else {}
    skill_meta = rec.skill.get("metadata") if isinstance(rec.skill.get("metadata"), dict) else {}
    outcome = {True: "success", False: "failure"}.get(prov.get("success"))
    fields = {
        "source-task-type": skill_meta.get("task_type") or extra.get("task_type"),
        "source-task-id": prov.get("source_task_id"),
        "source-outcome": outcome,
        "model": prov.get("model"),
        "training-step": prov.get("step"),
        "stream-position": prov.get("stream_position"),
        "library-skill-id": rec.id,
        "library-skill-version": rec.version,
        "exported-by": f"evolving-rl {__version__}",
    }
    if rec.uses:
        lo, hi = wilson(rec.successes, rec.uses)
        fields["success-when-used"] = (
            f"{rec.successes}/{rec.uses} = {rec.successes / rec.uses:.3f} (95% Wilson interval {lo:.3f}-{hi:.3f})"
        )
    if lift is not None:  # the service's measured lift over its no-skill control, as it words it
        fields["lift-over-control"] = lift if isinstance(lift, str) else json.dumps(lift, sort_keys=True)
    if rec.name != name:
        fields["original-name"] = rec.name
    out = {k: _plain(v, METADATA_VALUE_MAX) for k, v in fields.items() if v not in (None, "")}
    return {k: v for k, v in out.items() if v}


def skill_md(name: str, description: str, metadata: dict[str, str], body: str) -> str:
    front: dict[str, Any] = {"name": name, "description": description}
    if metadata:
        front["metadata"] = metadata
    dumped = yaml.safe_dump(front, sort_keys=False, allow_unicode=True, default_flow_style=False, width=10**9)
    return f"---\n{dumped}---\n\n{body}"


def split_skill_md(text: str, where: str) -> tuple[dict, str]:
    """(front matter, body) of one SKILL.md; ValueError naming `where` and the rule broken."""
    text = text.removeprefix("\ufeff").replace("\r\n", "\n")  # files saved by Windows editors
    if not text.startswith("---\n"):
        raise ValueError(f"{where}: must start with a '---' line opening the YAML front matter")
    end = text.find("\n---", 3)
    while end != -1 and text[end + 4 : end + 5] not in ("\n", ""):
        end = text.find("\n---", end + 4)
    if end == -1:
        raise ValueError(f"{where}: the YAML front matter is never closed by a '---' line")
    if "---" in text[4:end]:
        raise ValueError(f"{where}: the front matter contains '---', which other readers take as its end")
    try:
        front = yaml.safe_load(text[4:end])
    except yaml.YAMLError as e:
        raise ValueError(f"{where}: front matter is not valid YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(front, dict):
        raise ValueError(f"{where}: front matter must be a YAML mapping with name and description")
    return front, text[end + 4 :].lstrip("\n")


def front_matter_errors(front: dict, folder_name: str | None, body: str) -> list[str]:
    """Every Agent Skills rule the front matter and body break (empty: valid)."""
    errs = []
    unknown = sorted(str(k) for k in front if k not in FRONT_MATTER_KEYS)
    if unknown:
        errs.append(f"unknown front-matter fields {unknown}; allowed: {sorted(FRONT_MATTER_KEYS)}")
    name = front.get("name")
    if not valid_name(name):
        errs.append(f"name {name!r}: must be 1-{NAME_MAX} characters of a-z, 0-9 and single hyphens, "
                    "not starting or ending with a hyphen")
    elif folder_name is not None and name != folder_name:
        errs.append(f"name {name!r} differs from its folder name {folder_name!r}; they must be equal")
    desc = front.get("description")
    if not isinstance(desc, str) or not desc.strip() or len(desc) > DESCRIPTION_MAX:
        errs.append(f"description: must be a string of 1-{DESCRIPTION_MAX} characters")
    meta = front.get("metadata", {})
    if not isinstance(meta, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in meta.items()):
        errs.append("metadata: must map strings to strings")
    n_lines = body.count("\n") + (not body.endswith("\n"))
    if n_lines > BODY_MAX_LINES:
        errs.append(f"body: {n_lines} lines > {BODY_MAX_LINES}")
    return errs


def validate_folder(folder: str | Path) -> list[str]:
    """Every rule one exported folder breaks, each naming the file (empty: valid)."""
    folder = Path(folder)
    md = folder / "SKILL.md"
    try:
        if md.stat().st_size > SKILL_MD_MAX_BYTES:
            return [f"{md}: larger than {SKILL_MD_MAX_BYTES} bytes"]
        text = md.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        return [f"{md}: cannot read ({getattr(e, 'strerror', None) or e})"]
    try:
        front, body = split_skill_md(text, str(md))
    except ValueError as e:
        return [str(e)]
    return [f"{md}: {e}" for e in front_matter_errors(front, folder.name, body)]


# -- export ---------------------------------------------------------------------------------


@dataclass
class ExportResult:
    exported: list[tuple[int, str]] = field(default_factory=list)  # (library id, folder name)
    messages: list[str] = field(default_factory=list)  # one per renamed or skipped skill
    skipped: list[int] = field(default_factory=list)


def _unique(name: str, sid: int, taken: set[str]) -> str:
    if name not in taken:
        return name
    k = 0
    while True:
        suffix = f"-{sid}" + (f"-{k}" if k else "")
        cand = name[: NAME_MAX - len(suffix)].rstrip("-") + suffix
        if cand not in taken:
            return cand
        k += 1


def export_agent_skills(
    library: Any, out_dir: str | Path, lifecycle: Mapping[int, Mapping[str, Any]] | None = None
) -> ExportResult:
    """Write one Agent Skills folder per promoted skill (`exportable`) into a new or empty `out_dir`."""
    out = Path(out_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ValueError(f"{out}: exists and is not an empty folder; export into a new folder (an export never overwrites)")
    out.mkdir(parents=True, exist_ok=True)
    res = ExportResult()
    taken: set[str] = set()
    for rec in sorted(library.list(include_retired=True), key=lambda r: r.id):
        if not exportable(rec, lifecycle):
            continue
        description = _plain(rec.skill.get("description") or "", DESCRIPTION_MAX)
        if not description:
            res.skipped.append(rec.id)
            res.messages.append(f"skill {rec.id} ({rec.name!r}): skipped, its description is empty once control "
                                "characters are removed; give it a description and export again")
            continue
        body = rec.card if rec.card.endswith("\n") else rec.card + "\n"
        if body.count("\n") > BODY_MAX_LINES:
            res.skipped.append(rec.id)
            res.messages.append(f"skill {rec.id} ({rec.name!r}): skipped, its card has {body.count(chr(10))} lines "
                                f"> {BODY_MAX_LINES}")
            continue
        name = _unique(fix_name(rec.name) or f"skill-{rec.id}", rec.id, taken)
        if name != rec.name:
            res.messages.append(f"skill {rec.id}: name {rec.name!r} exported as {name!r} (Agent Skills names are "
                                "a-z, 0-9 and single hyphens, unique)")
        taken.add(name)
        lift = (lifecycle or {}).get(rec.id, {}).get("lift")
        text = skill_md(name, description, _metadata(rec, name, lift), body)
        folder = out / name
        (folder / RECORD_FILE).parent.mkdir(parents=True)
        (folder / "SKILL.md").write_text(text, encoding="utf-8")
        record = {"format": RECORD_FORMAT, "skill_md_sha256": hashlib.sha256(text.encode()).hexdigest(),
                  "record": rec.to_dict()}
        (folder / RECORD_FILE).write_text(json.dumps(record, ensure_ascii=False) + "\n", encoding="utf-8")
        errs = validate_folder(folder)
        if errs:  # a bug here, not bad data: every value above was made valid
            raise AssertionError(f"exported folder breaks the format: {errs}")
        res.exported.append((rec.id, name))
    return res


# -- import ---------------------------------------------------------------------------------


@dataclass
class ImportResult:
    restored: list[int] = field(default_factory=list)  # exact records from this project's exports
    added: list[int] = field(default_factory=list)  # skills built from SKILL.md alone
    messages: list[str] = field(default_factory=list)  # one per skipped folder or edited export


def _skill_folders(src: Path) -> list[Path]:
    if (src / "SKILL.md").is_file():
        return [src]
    if not src.is_dir():
        raise ValueError(f"{src}: no such folder; give a folder of Agent Skills folders (each with a SKILL.md)")
    folders = sorted(p for p in src.iterdir() if p.is_dir() and (p / "SKILL.md").is_file())
    if not folders:
        raise ValueError(f"{src}: holds no <name>/SKILL.md folders")
    return folders


def _exact_record(folder: Path, text: str) -> dict | None:
    path = folder / RECORD_FILE
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        return None
    if not isinstance(data, dict) or data.get("format") != RECORD_FORMAT:
        return None
    if data.get("skill_md_sha256") != hashlib.sha256(text.encode()).hexdigest():
        return None
    return data.get("record") if isinstance(data.get("record"), dict) else None


def import_agent_skills(
    library: Any,
    src: str | Path,
    embed: Callable[[Sequence[str]], np.ndarray] | None = None,
    min_chars: int = 40,
) -> ImportResult:
    """Load a folder of Agent Skills folders (or one folder) into `library`.

    Folders this project exported, unchanged, are restored exactly (ids when free, stats,
    provenance, history). Any other valid folder is added as a new skill: Skill from the
    front matter, card = body, embedding = MiniLM of the description (`embed`), provenance
    noting the folder; it must pass the audit like an extracted skill. Invalid folders are
    skipped, each with a message naming the file and the rule.
    """
    src = Path(src)
    res = ImportResult()
    exact: list[tuple[Path, dict]] = []
    fresh: list[tuple[Path, dict, str]] = []
    for folder in _skill_folders(src):
        errs = validate_folder(folder)
        if errs:
            res.messages.append("skipped: " + "; ".join(errs))
            continue
        text = (folder / "SKILL.md").read_text(encoding="utf-8")
        record = _exact_record(folder, text)
        if record is not None:
            exact.append((folder, record))
            continue
        if (folder / RECORD_FILE).is_file():
            res.messages.append(f"{folder / 'SKILL.md'}: changed since export (or its record is unreadable): "
                                "imported as a new skill from SKILL.md, without the record's statistics")
        front, body = split_skill_md(text, str(folder / "SKILL.md"))
        a = audit(body, min_chars=min_chars, max_chars=BODY_MAX_CHARS)
        if not a.ok:
            res.messages.append(f"skipped: {folder / 'SKILL.md'}: the body fails the skill audit ({'; '.join(a.details)})")
            continue
        fresh.append((folder, front, body))
    for folder, record in exact:
        # One record per restore, through the library's own restore path, so a bad record
        # is reported against its folder and the others still load.
        fd, tmp = tempfile.mkstemp(suffix=".jsonl", dir=str(folder))
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                f.write(json.dumps(record, ensure_ascii=False) + "\n")
            res.restored += library.import_jsonl(tmp)
        except ValueError as e:
            res.messages.append(f"skipped: {folder / RECORD_FILE}: {str(e).replace(tmp, 'record')}")
        finally:
            os.unlink(tmp)
    if fresh:
        if embed is None:
            from evolving_rl.retrieval import make_embedder

            embed = make_embedder().embed
        vecs = embed([front["description"] for _, front, _ in fresh])
        for (folder, front, body), v in zip(fresh, vecs):
            skill = Skill.model_validate({"name": front["name"], "description": front["description"],
                                          "metadata": front.get("metadata") or {}})
            prov = {"source_task_id": None, "model": None, "step": None, "stream_position": None,
                    "trajectory_ref": f"agent-skills:{folder.name}", "success": None,
                    "extra": {"imported_from": "agent-skills", "metadata": front.get("metadata") or {}}}
            res.added.append(library.add(skill, body, np.asarray(v), prov))
    return res
