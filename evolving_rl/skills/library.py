"""The persistent skill library: skills that outlive a run, with where they came from and
how well they did when used (issue 5).

SQLite (stdlib) in WAL mode, so readers never block and several writer processes (eval
workers, a trainer) can share one file: every write is one short transaction, and
read-modify-write operations (`add` with merging) take the write lock up
front with `BEGIN IMMEDIATE` so two processes cannot both decide to merge into, or create,
the same skill. A connection is opened per process (a forked child reconnects).

Near-duplicate merging: a new skill whose embedding has cosine similarity >= the
threshold with a live (non-retired) skill is merged into it instead of stored twice.
The merged record keeps its id, embedding and usage statistics, its version goes up by
one, and its card/JSON/provenance become the newcomer's, unless the old card came from a
successful run and the new one from a failed run (then the old card stays). Every merged
provenance is appended to the record's history, so nothing is lost for audit.

Opening: `mode="create"` (writers) makes a missing or empty file a new library; "write" and
"read" (the CLI's list/show/export, the report) need an existing skill library, and "read"
opens it read-only. Any existing non-empty file must already be a skill library: a foreign
SQLite file is refused before anything is written to it (no tables added, no switch to WAL).

Retirement is the guardrail: a skill whose success when used falls below the baseline
is retired, kept with its reason for audit, and never retrieved again. Retired skills are
not merge targets: a new near-duplicate starts a fresh record with fresh statistics.
"""

from __future__ import annotations

import json
import os
import sqlite3
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from evolving_rl.skills.skill import MAX_PARSE_CHARS

SCHEMA_VERSION = 1
_MAX_ID = 2**63 - 1  # SQLite INTEGER; a larger id would overflow in the driver

_SCHEMA = """
CREATE TABLE IF NOT EXISTS skills (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    name TEXT NOT NULL,
    card TEXT NOT NULL,
    json TEXT NOT NULL,
    embedding BLOB NOT NULL,
    provenance TEXT NOT NULL,
    history TEXT NOT NULL DEFAULT '[]',
    version INTEGER NOT NULL DEFAULT 1,
    uses INTEGER NOT NULL DEFAULT 0,
    successes INTEGER NOT NULL DEFAULT 0,
    created_at REAL NOT NULL,
    updated_at REAL NOT NULL,
    retired INTEGER NOT NULL DEFAULT 0,
    retired_reason TEXT
);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
"""

_COLUMNS = (
    "id, name, card, json, embedding, provenance, history, version, uses, successes, "
    "created_at, updated_at, retired, retired_reason"
)


@dataclass
class Provenance:
    """Where a skill came from. `step` is the training step; `stream_position` the index in
    an evaluation task stream (the library protocol); `trajectory_ref` points at the
    episode the skill was extracted from (a run-relative file and line, say)."""

    source_task_id: str | None = None
    model: str | None = None
    step: int | None = None
    stream_position: int | None = None
    trajectory_ref: str | None = None
    success: bool | None = None
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class SkillRecord:
    id: int
    name: str
    card: str
    skill: dict
    embedding: np.ndarray
    provenance: dict
    history: list[dict]
    version: int
    uses: int
    successes: int
    created_at: float
    updated_at: float
    retired: bool
    retired_reason: str | None
    similarity: float | None = None  # set by retrieve()

    @property
    def success_rate(self) -> float | None:
        return self.successes / self.uses if self.uses else None

    def to_dict(self) -> dict:
        d = asdict(self)
        d["embedding"] = [float(x) for x in self.embedding]  # float32 -> float64 is exact
        d.pop("similarity")
        return d


def _provenance_dict(p: Provenance | dict | None) -> dict:
    if p is None:
        return asdict(Provenance())
    if isinstance(p, Provenance):
        return asdict(p)
    if isinstance(p, dict):
        return dict(p)
    raise TypeError(f"provenance: expected Provenance or dict, got {type(p).__name__}")


def _skill_dict(skill: Any) -> dict:
    if hasattr(skill, "to_dict"):
        return skill.to_dict()
    if isinstance(skill, dict):
        return skill
    raise TypeError(f"skill: expected Skill or dict, got {type(skill).__name__}")


def _vec(embedding: Any) -> np.ndarray:
    v = np.asarray(embedding, dtype=np.float32).reshape(-1)
    n = float(np.linalg.norm(v))
    if v.size == 0 or not np.isfinite(n) or n == 0:
        raise ValueError("embedding: must be a non-empty, finite, non-zero vector")
    return v


def _ro_uri(path: Path) -> str:
    return path.resolve().as_uri() + "?mode=ro"


def _is_library_file(path: Path) -> bool:
    """True for a skill library of this schema, False for an SQLite file without any table (a
    library another process is creating looks like that for a moment); ValueError for anything
    else. Reads only."""
    try:
        with sqlite3.connect(_ro_uri(path), uri=True) as conn:
            tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
            if not tables:
                return False
            if not {"skills", "meta"} <= tables:
                held = ", ".join(sorted(t for t in tables if not t.startswith("sqlite_"))) or "none"
                raise ValueError(f"{path}: not a skill library (an SQLite file whose tables are: {held}); "
                                 "give a library written by evolving-rl, or a new path")
            row = conn.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()
    except sqlite3.DatabaseError as e:
        raise ValueError(f"{path}: not a skill library ({e}); give a library written by evolving-rl, or a new path") from e
    if row is None or str(row[0]) != str(SCHEMA_VERSION):
        raise ValueError(f"{path}: skill library schema version {row[0] if row else 'missing'}, this code reads "
                         f"{SCHEMA_VERSION}")
    return True


class SkillLibrary:
    """A skill bank in one SQLite file; safe to share between processes."""

    def __init__(self, path: str | Path, dedup_threshold: float = 0.95, timeout_s: float = 60.0,
                 mode: Literal["create", "write", "read"] = "create"):
        if not 0 < dedup_threshold <= 1:
            raise ValueError(f"dedup_threshold: must be in (0, 1], got {dedup_threshold}")
        if mode not in ("create", "write", "read"):
            raise ValueError(f"mode: expected create, write or read, got {mode!r}")
        self.path = Path(path)
        self.dedup_threshold = dedup_threshold
        self.timeout_s = timeout_s
        self.readonly = mode == "read"
        self._conn: sqlite3.Connection | None = None
        self._pid = -1
        if self.path.is_dir():
            raise ValueError(f"{self.path} is a directory; give the skill library's file path")
        fresh = not self.path.exists() or self.path.stat().st_size == 0 or not _is_library_file(self.path)
        if fresh and mode != "create":
            state = "does not exist" if not self.path.exists() else "is empty"
            raise ValueError(f"{self.path} {state}, not a skill library; give a library written by evolving-rl")
        if self.readonly:
            return
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise ValueError(f"{self.path}: cannot create its folder ({e.strerror or e})") from None
        with self._write():
            for stmt in filter(str.strip, _SCHEMA.split(";")):
                self._db.execute(stmt)
            row = self._db.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()
            if row is None:
                self._db.execute("INSERT INTO meta VALUES ('schema_version', ?)", (str(SCHEMA_VERSION),))

    # -- connection -------------------------------------------------------------------

    @property
    def _db(self) -> sqlite3.Connection:
        if self._conn is None or self._pid != os.getpid():
            try:
                if self.readonly:  # never writes: no WAL switch, no schema, a foreign file stays as it was
                    conn = sqlite3.connect(_ro_uri(self.path), uri=True, timeout=self.timeout_s, isolation_level=None)
                else:
                    conn = sqlite3.connect(self.path, timeout=self.timeout_s, isolation_level=None)
                conn.execute(f"PRAGMA busy_timeout={int(self.timeout_s * 1000)}")
                if not self.readonly:
                    self._enable_wal(conn)
                    conn.execute("PRAGMA synchronous=NORMAL")
            except sqlite3.DatabaseError as e:
                raise ValueError(f"{self.path}: not a readable skill library ({e})") from e
            self._conn, self._pid = conn, os.getpid()
        return self._conn

    def _enable_wal(self, conn: sqlite3.Connection) -> None:
        """Switching a fresh file to WAL needs an exclusive lock, and SQLite answers "database
        is locked" at once there instead of calling the busy handler: several processes opening
        a new library together must retry (seen in the concurrent-writers test)."""
        deadline = time.monotonic() + self.timeout_s
        while True:
            try:
                conn.execute("PRAGMA journal_mode=WAL")
                return
            except sqlite3.OperationalError as e:
                if "locked" not in str(e) or time.monotonic() > deadline:
                    raise
                time.sleep(0.02)

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        """One short write transaction holding the lock from its first statement."""
        db = self._db
        db.execute("BEGIN IMMEDIATE")
        try:
            yield db
        except BaseException:
            db.execute("ROLLBACK")
            raise
        db.execute("COMMIT")

    def close(self) -> None:
        if self._conn is not None and self._pid == os.getpid():
            self._conn.close()
        self._conn = None

    def __enter__(self) -> SkillLibrary:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- rows -------------------------------------------------------------------------

    @staticmethod
    def _record(row: tuple) -> SkillRecord:
        (id_, name, card, js, emb, prov, hist, version, uses, succ, created, updated, retired, reason) = row
        return SkillRecord(
            id=id_,
            name=name,
            card=card,
            skill=json.loads(js),
            embedding=np.frombuffer(emb, dtype=np.float32).copy(),
            provenance=json.loads(prov),
            history=json.loads(hist),
            version=version,
            uses=uses,
            successes=succ,
            created_at=created,
            updated_at=updated,
            retired=bool(retired),
            retired_reason=reason,
        )

    def _live_embeddings(self, db: sqlite3.Connection) -> tuple[list[int], np.ndarray | None]:
        rows = db.execute("SELECT id, embedding FROM skills WHERE retired=0 ORDER BY id").fetchall()
        if not rows:
            return [], None
        return [r[0] for r in rows], np.stack([np.frombuffer(r[1], dtype=np.float32) for r in rows])

    @staticmethod
    def _cosines(matrix: np.ndarray, q: np.ndarray) -> np.ndarray:
        if matrix.shape[1] != q.shape[0]:
            raise ValueError(f"embedding: dimension {q.shape[0]} but the library holds dimension {matrix.shape[1]}")
        norms = np.linalg.norm(matrix, axis=1) * np.linalg.norm(q)
        return (matrix @ q) / np.maximum(norms, 1e-12)

    # -- API --------------------------------------------------------------------------

    def add(
        self,
        skill: Any,
        card: str,
        embedding: Any,
        provenance: Provenance | dict | None = None,
        merge: bool = True,
    ) -> int:
        """Store a skill (or merge it into a near-duplicate); returns the id that holds it."""
        sk, v, prov = _skill_dict(skill), _vec(embedding), _provenance_dict(provenance)
        if not isinstance(card, str):
            raise TypeError(f"card: expected the rendered Markdown card (str), got {type(card).__name__}")
        name = str(sk.get("name", ""))
        now = time.time()
        with self._write() as db:
            ids, matrix = self._live_embeddings(db)
            if matrix is not None:
                sims = self._cosines(matrix, v)
                best = int(np.argmax(sims))
                if merge and sims[best] >= self.dedup_threshold:
                    return self._merge(db, ids[best], sk, card, prov, now)
            cur = db.execute(
                "INSERT INTO skills (name, card, json, embedding, provenance, created_at, updated_at) "
                "VALUES (?, ?, ?, ?, ?, ?, ?)",
                (name, card, json.dumps(sk, ensure_ascii=False), v.tobytes(), json.dumps(prov), now, now),
            )
            return int(cur.lastrowid)

    def _merge(self, db: sqlite3.Connection, sid: int, sk: dict, card: str, prov: dict, now: float) -> int:
        old_prov, hist = db.execute("SELECT provenance, history FROM skills WHERE id=?", (sid,)).fetchone()
        old_prov, hist = json.loads(old_prov), json.loads(hist)
        keep_old = old_prov.get("success") is True and prov.get("success") is False
        hist.append(prov if keep_old else old_prov)
        if keep_old:
            db.execute(
                "UPDATE skills SET version=version+1, history=?, updated_at=? WHERE id=?", (json.dumps(hist), now, sid)
            )
        else:
            db.execute(
                "UPDATE skills SET name=?, card=?, json=?, provenance=?, history=?, version=version+1, updated_at=? "
                "WHERE id=?",
                (str(sk.get("name", "")), card, json.dumps(sk, ensure_ascii=False), json.dumps(prov), json.dumps(hist), now, sid),
            )
        return sid

    def retrieve(self, query_embedding: Any, m: int = 1) -> list[SkillRecord]:
        """The m live skills most similar to the query, best first (`similarity` set)."""
        q = _vec(query_embedding)
        ids, matrix = self._live_embeddings(self._db)
        if matrix is None or m <= 0:
            return []
        sims = self._cosines(matrix, q)
        top = np.argsort(-sims, kind="stable")[:m]
        out = []
        for i in top:
            rec = self.get(ids[i])
            rec.similarity = float(sims[i])
            out.append(rec)
        return out

    def _id(self, skill_id: int) -> int:
        """An id SQLite can hold; any other is simply not in the library (2**70 overflowed the driver)."""
        sid = int(skill_id)
        if not -_MAX_ID - 1 <= sid <= _MAX_ID:
            raise KeyError(f"skill {sid} is not in the library {self.path}")
        return sid

    def get(self, skill_id: int) -> SkillRecord:
        row = self._db.execute(f"SELECT {_COLUMNS} FROM skills WHERE id=?", (self._id(skill_id),)).fetchone()
        if row is None:
            raise KeyError(f"skill {skill_id} is not in the library {self.path}")
        return self._record(row)

    def list(self, include_retired: bool = False) -> list[SkillRecord]:
        where = "" if include_retired else "WHERE retired=0"
        return [self._record(r) for r in self._db.execute(f"SELECT {_COLUMNS} FROM skills {where} ORDER BY id")]

    def __len__(self) -> int:
        """Live (non-retired) skills."""
        return int(self._db.execute("SELECT COUNT(*) FROM skills WHERE retired=0").fetchone()[0])

    def record_use(self, skill_id: int, success: bool) -> None:
        """Count one episode played with this skill in the prompt, and whether it was won."""
        with self._write() as db:
            cur = db.execute(
                "UPDATE skills SET uses=uses+1, successes=successes+?, updated_at=? WHERE id=?",
                (int(bool(success)), time.time(), self._id(skill_id)),
            )
            if cur.rowcount == 0:
                raise KeyError(f"skill {skill_id} is not in the library {self.path}")

    def retire(self, skill_id: int, reason: str) -> None:
        with self._write() as db:
            cur = db.execute(
                "UPDATE skills SET retired=1, retired_reason=?, updated_at=? WHERE id=?",
                (str(reason), time.time(), self._id(skill_id)),
            )
            if cur.rowcount == 0:
                raise KeyError(f"skill {skill_id} is not in the library {self.path}")

    # -- JSONL ------------------------------------------------------------------------

    def export_jsonl(self, path: str | Path) -> int:
        """Every record, retired ones included, one JSON object a line; returns the count.
        Written to a temp file and moved into place, so a failed export leaves nothing behind."""
        path = Path(path)
        if path.is_dir():
            raise ValueError(f"{path} is a directory; give the JSONL file to write, e.g. {path / 'skills.jsonl'}")
        recs = self.list(include_retired=True)
        tmp = path.with_name(path.name + f".{os.getpid()}.tmp")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            with tmp.open("w", encoding="utf-8") as f:
                for r in recs:
                    f.write(json.dumps(r.to_dict(), ensure_ascii=False) + "\n")
            os.replace(tmp, path)
        except OSError as e:
            if tmp.exists():
                tmp.unlink()
            raise ValueError(f"{path}: cannot write the export ({e.strerror or e})") from None
        return len(recs)

    def _dimension(self) -> int | None:
        row = self._db.execute("SELECT embedding FROM skills ORDER BY id LIMIT 1").fetchone()
        return len(row[0]) // 4 if row else None

    def import_jsonl(self, path: str | Path) -> list[int]:
        """Load records exported by `export_jsonl`, exactly (ids, stats, times, retirement).
        A record whose id is taken gets a new id. No merging: an import is a restore."""
        return self.import_records(read_export(path), str(path))

    def import_records(self, records: list[tuple[int, tuple]], source: str = "import") -> list[int]:
        """Store (line, row) pairs from `read_export` in one transaction (all or none)."""
        dim = self._dimension()
        for n, rec in records:
            got = len(rec[4]) // 4
            if dim is not None and got != dim:
                raise ValueError(f"{source}:{n}: bad record (field 'embedding': dimension {got}, but the library "
                                 f"{self.path} holds dimension {dim}; import into a library of the same embedder)")
        ids = []
        with self._write() as db:
            for _, rec in records:
                taken = db.execute("SELECT 1 FROM skills WHERE id=?", (rec[0],)).fetchone()
                cols = _COLUMNS if not taken else _COLUMNS.removeprefix("id, ")
                vals = rec if not taken else rec[1:]
                cur = db.execute(f"INSERT INTO skills ({cols}) VALUES ({', '.join('?' * len(vals))})", vals)
                ids.append(int(cur.lastrowid))
        return ids


def _field(d: dict, key: str, types: type | tuple, what: str, default: Any = ...) -> Any:
    if key not in d:
        if default is ...:
            raise KeyError(key)
        return default
    v = d[key]
    if isinstance(v, bool) and bool not in (types if isinstance(types, tuple) else (types,)):
        raise ValueError(f"field {key!r}: expected {what}, got {v!r}")
    if not isinstance(v, types):
        raise ValueError(f"field {key!r}: expected {what}, got {type(v).__name__} {json.dumps(v)[:60]}")
    return v


def _row(d: Any) -> tuple:
    """One exported record as a skills-table row, every field checked: an odd type would be
    stored as its text ("None" as a card) or crash later in the library's readers."""
    if not isinstance(d, dict):
        raise ValueError(f"expected a JSON object, got {type(d).__name__}")
    sid = _field(d, "id", int, "an integer id")
    if not 1 <= sid <= _MAX_ID:
        raise ValueError(f"field 'id': {sid} is outside 1..2**63-1")
    name, card = _field(d, "name", str, "a string"), _field(d, "card", str, "the Markdown card (a string)")
    for key, text in (("name", name), ("card", card)):  # untrusted text: bounded like raw extractor output
        if len(text) > MAX_PARSE_CHARS:
            raise ValueError(f"field {key!r}: {len(text)} chars, more than any extracted skill ({MAX_PARSE_CHARS})")
    skill, prov = _field(d, "skill", dict, "a JSON object"), _field(d, "provenance", dict, "a JSON object")
    history = _field(d, "history", list, "a list", default=[])
    emb = _field(d, "embedding", list, "a list of numbers")
    if not all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in emb):
        raise ValueError("field 'embedding': expected a list of numbers")
    try:
        vec = _vec(emb)
    except ValueError as e:
        raise ValueError(f"field {e}") from None
    counts = {k: _field(d, k, int, "a non-negative integer") for k in ("version", "uses", "successes")}
    for k, v in counts.items():
        if v < (1 if k == "version" else 0) or v > _MAX_ID:
            raise ValueError(f"field {k!r}: {v} is out of range")
    if counts["successes"] > counts["uses"]:
        raise ValueError(f"field 'successes': {counts['successes']} is more than uses ({counts['uses']})")
    times = {k: float(_field(d, k, (int, float), "a number (seconds since the epoch)")) for k in ("created_at", "updated_at")}
    for k, v in times.items():
        if not np.isfinite(v):
            raise ValueError(f"field {k!r}: expected a finite number, got {v}")
    retired = _field(d, "retired", bool, "true or false")
    reason = _field(d, "retired_reason", (str, type(None)), "a string or null", default=None)
    return (sid, name, card, json.dumps(skill, ensure_ascii=False), vec.tobytes(), json.dumps(prov), json.dumps(history),
            counts["version"], counts["uses"], counts["successes"], times["created_at"], times["updated_at"],
            int(retired), reason)


def read_export(path: str | Path) -> list[tuple[int, tuple]]:
    """Read and check a `skills export` JSONL file before any library is opened, so a bad file
    creates no library: (line number, row) pairs; ValueError names the file, the line and the field."""
    path = Path(path)
    try:
        text = path.read_bytes().decode("utf-8")
    except OSError as e:
        raise ValueError(f"{path}: cannot read ({e.strerror or e})") from None
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text (byte {e.start}); give a JSONL file from `skills export`") from None
    records, dim = [], None
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = _row(json.loads(line))
        except KeyError as e:
            raise ValueError(f"{path}:{n}: missing field {e.args[0]!r}") from None
        except (ValueError, TypeError, RecursionError) as e:
            raise ValueError(f"{path}:{n}: bad record ({e})") from None
        got = len(rec[4]) // 4
        if dim is not None and got != dim:
            raise ValueError(f"{path}:{n}: bad record (field 'embedding': dimension {got}, earlier records have {dim})")
        dim = got
        records.append((n, rec))
    return records
