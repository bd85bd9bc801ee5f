"""The skill lifecycle of a deployed self-evolving agent: one engine for `evolving-rl serve`,
`evolving-rl evolve` and the `library` evaluation protocol.

A new skill (extracted from an ended episode, submitted by an admin, or imported) passes the
audit (unicode, language, repetition, length) and a markup check, then enters **quarantined**.
For each episode the evolver retrieves the live skills that match the task and assigns an arm
at random:

- `control` (share `control_share`): no skill. The episode is credited to the control of each
  skill that could have been chosen, so every skill has its own no-skill comparison on the
  same kind of task.
- `trial`: the best-matching quarantined skill (share `trial_share` of the rest).
- `promoted`: the best-matching promoted skill.

After each outcome the guardrail (`guardrails.decide`) promotes a quarantined skill that beats
its control with confidence and retires any skill that does worse with confidence. Every
change (add, promote, retire, restore, rollback, import) is one row of an append-only
audit log (who, why, the numbers) and one new library **version** holding a full snapshot, so a
rollback restores any earlier version exactly (as a new version: history is never rewritten).

Everything lives in the skill library's own database, in tables created here, so the library
is the deployment's whole state: ended episodes wait in a durable queue there until the
extractor has turned them into skills (a kill -9 loses nothing; the worker picks them up
after a restart).

On SQLite that is one file for one `serve` process. On PostgreSQL (`open_library` on a
`postgresql://` URL) several replicas share it: every change is one transaction under the
library's writers' lock, so versions are numbered without gaps or duplicates in commit order
and no counted outcome or audit row is lost; an extraction worker holds a session-level
advisory lock on the queued episode it works on, so replicas never extract one episode twice
and a replica killed mid-extraction frees it for the others at once; admission (near-duplicate
check, capacity, insert) holds one more, so two replicas cannot both store the same skill.
The lifecycle tables there are versioned migrations (`LIFECYCLE_MIGRATIONS`).
"""

from __future__ import annotations

import json
import random
import time
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from evolving_rl.serve.guardrails import decide, hostile_markup, lift_posterior
from evolving_rl.skills.library import _COLUMNS, SkillLibrary
from evolving_rl.skills.pg_library import PgSkillLibrary, is_postgres, open_library

STATUSES = ("quarantined", "promoted", "retired")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS skill_lifecycle (
    skill_id INTEGER PRIMARY KEY,
    status TEXT NOT NULL,
    uses INTEGER NOT NULL DEFAULT 0,
    wins REAL NOT NULL DEFAULT 0,
    ctrl_uses INTEGER NOT NULL DEFAULT 0,
    ctrl_wins REAL NOT NULL DEFAULT 0,
    reason TEXT NOT NULL DEFAULT '',
    updated_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS skill_audit_log (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    at REAL NOT NULL,
    actor TEXT NOT NULL,
    action TEXT NOT NULL,
    skill_id INTEGER,
    library_version INTEGER,
    reason TEXT NOT NULL,
    detail TEXT NOT NULL DEFAULT '{}'
);
CREATE TRIGGER IF NOT EXISTS skill_audit_log_no_update BEFORE UPDATE ON skill_audit_log
BEGIN SELECT RAISE(ABORT, 'skill_audit_log is append-only'); END;
CREATE TRIGGER IF NOT EXISTS skill_audit_log_no_delete BEFORE DELETE ON skill_audit_log
BEGIN SELECT RAISE(ABORT, 'skill_audit_log is append-only'); END;
CREATE TABLE IF NOT EXISTS library_versions (
    version INTEGER PRIMARY KEY,
    at REAL NOT NULL,
    actor TEXT NOT NULL,
    reason TEXT NOT NULL,
    skills INTEGER NOT NULL,
    snapshot BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS arm_stats (arm TEXT PRIMARY KEY, episodes INTEGER NOT NULL, wins REAL NOT NULL);
CREATE TABLE IF NOT EXISTS episode_queue (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    created_at REAL NOT NULL,
    payload TEXT NOT NULL,
    state TEXT NOT NULL DEFAULT 'pending',
    attempts INTEGER NOT NULL DEFAULT 0,
    result TEXT,
    done_at REAL
);
CREATE INDEX IF NOT EXISTS episode_queue_state ON episode_queue(state, id);
"""

# The same tables on PostgreSQL: 64-bit counts, double-precision wins and times (its REAL is
# 32-bit), identity ids, and the append-only rule as a trigger function. LIFECYCLE_MIGRATIONS[v]
# takes the tables from version v-1 to v (meta key `lifecycle_schema_version`).
LIFECYCLE_MIGRATIONS: dict[int, list[str]] = {
    1: [
        """CREATE TABLE skill_lifecycle (
            skill_id BIGINT PRIMARY KEY,
            status TEXT NOT NULL,
            uses BIGINT NOT NULL DEFAULT 0,
            wins DOUBLE PRECISION NOT NULL DEFAULT 0,
            ctrl_uses BIGINT NOT NULL DEFAULT 0,
            ctrl_wins DOUBLE PRECISION NOT NULL DEFAULT 0,
            reason TEXT NOT NULL DEFAULT '',
            updated_at DOUBLE PRECISION NOT NULL
        )""",
        """CREATE TABLE skill_audit_log (
            id BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
            at DOUBLE PRECISION NOT NULL,
            actor TEXT NOT NULL,
            action TEXT NOT NULL,
            skill_id BIGINT,
            library_version BIGINT,
            reason TEXT NOT NULL,
            detail TEXT NOT NULL DEFAULT '{}'
        )""",
        """CREATE FUNCTION skill_audit_log_append_only() RETURNS trigger LANGUAGE plpgsql AS $$
           BEGIN RAISE EXCEPTION 'skill_audit_log is append-only'; END $$""",
        """CREATE TRIGGER skill_audit_log_no_change BEFORE UPDATE OR DELETE ON skill_audit_log
           FOR EACH ROW EXECUTE FUNCTION skill_audit_log_append_only()""",
        """CREATE TRIGGER skill_audit_log_no_truncate BEFORE TRUNCATE ON skill_audit_log
           FOR EACH STATEMENT EXECUTE FUNCTION skill_audit_log_append_only()""",
        """CREATE TABLE library_versions (
            version BIGINT PRIMARY KEY,
            at DOUBLE PRECISION NOT NULL,
            actor TEXT NOT NULL,
            reason TEXT NOT NULL,
            skills BIGINT NOT NULL,
            snapshot BYTEA NOT NULL
        )""",
        "CREATE TABLE arm_stats (arm TEXT PRIMARY KEY, episodes BIGINT NOT NULL, wins DOUBLE PRECISION NOT NULL)",
        """CREATE TABLE episode_queue (
            id BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
            created_at DOUBLE PRECISION NOT NULL,
            payload TEXT NOT NULL,
            state TEXT NOT NULL DEFAULT 'pending',
            attempts BIGINT NOT NULL DEFAULT 0,
            result TEXT,
            done_at DOUBLE PRECISION
        )""",
        "CREATE INDEX episode_queue_state ON episode_queue (state, id)",
    ],
}
# Advisory-lock keys (class, object) on PostgreSQL: one queued episode's extraction; admission.
_QUEUE_LOCK = 0x5E1F
_ADMIT_LOCK = (0x5E20, 0)

_LIFE_COLS = "skill_id, status, uses, wins, ctrl_uses, ctrl_wins, reason, updated_at"


def has_lifecycle(library: SkillLibrary) -> bool:
    """Whether a service (`serve`, `evolve`) has run on this library: its lifecycle tables are there."""
    if isinstance(library, PgSkillLibrary):
        return library._db.execute("SELECT to_regclass('skill_lifecycle')").fetchone()[0] is not None
    return library._db.execute(
        "SELECT 1 FROM sqlite_master WHERE type='table' AND name='skill_lifecycle'").fetchone() is not None


class SkillRejected(ValueError):
    """A skill that may not enter the library; the message says why (audit reasons, markup, capacity)."""


@dataclass
class Decision:
    """Which arm an episode plays, and the skill it uses (None for control or no match)."""

    arm: str  # trial | promoted | control | none (no live skill matches the task)
    skill_id: int | None = None
    skill_name: str | None = None
    status: str | None = None
    card: str | None = None
    similarity: float | None = None
    credited: list[int] = field(default_factory=list)  # control episodes: the skills it is the control of

    def to_dict(self) -> dict:
        return {"arm": self.arm, "skill_id": self.skill_id, "skill_name": self.skill_name, "status": self.status,
                "similarity": self.similarity, "credited": list(self.credited)}

    @classmethod
    def from_dict(cls, d: dict) -> Decision:
        return cls(arm=d["arm"], skill_id=d.get("skill_id"), skill_name=d.get("skill_name"), status=d.get("status"),
                   similarity=d.get("similarity"), credited=list(d.get("credited") or []))


class SkillEvolver:
    """Lifecycle, guardrails, audit log, versions and the episode queue on one SkillLibrary.

    `cfg` is the `evolve:` config section (EvolveConfig); `min_chars`/`max_chars` the audit's
    length bounds (the `evolving:` section's, so training and deployment audit alike).
    """

    def __init__(self, library: SkillLibrary | str | Path, cfg, *, min_chars: int = 40, max_chars: int = 4000):
        self.library = library if isinstance(library, SkillLibrary) else open_library(library)
        self.cfg = cfg
        self.min_chars, self.max_chars = min_chars, max_chars
        self.rng = random.Random(cfg.seed)
        self.pg = isinstance(self.library, PgSkillLibrary)
        self._held: set[int] = set()  # queued episodes this worker holds (claim .. finish_queued)
        if self.pg:
            self.library.migrate("lifecycle_schema_version", LIFECYCLE_MIGRATIONS)
        with self.library._write() as db:
            if not self.pg:
                _create_sqlite_tables(db)
            self._adopt(db)
            if db.execute("SELECT COUNT(*) FROM library_versions").fetchone()[0] == 0:
                self._new_version(db, "system", "initial library")

    # -- storage helpers ------------------------------------------------------------------

    @property
    def path(self) -> Path | str:
        """The library's file, or its PostgreSQL URL without the password."""
        return self.library.path

    def _adopt(self, db) -> None:
        """Skills without a lifecycle row (a library built by training or an older run, or a
        crash between storing a skill and its row) start quarantined, or retired if they are."""
        now = time.time()
        db.execute(
            "INSERT INTO skill_lifecycle (skill_id, status, reason, updated_at) "
            "SELECT id, CASE retired WHEN 1 THEN 'retired' ELSE 'quarantined' END, 'adopted from the library', ? "
            "FROM skills WHERE id NOT IN (SELECT skill_id FROM skill_lifecycle)", (now,))

    def _snapshot(self, db) -> tuple[bytes, int]:
        skills = [list(r) for r in db.execute(f"SELECT {_COLUMNS} FROM skills ORDER BY id")]
        for r in skills:
            r[4] = r[4].hex()  # the embedding BLOB, exactly
        life = [list(r) for r in db.execute(f"SELECT {_LIFE_COLS} FROM skill_lifecycle ORDER BY skill_id")]
        return zlib.compress(json.dumps({"skills": skills, "lifecycle": life}).encode()), len(skills)

    def _new_version(self, db, actor: str, reason: str) -> int:
        """The next version number, taken under the writers' lock: replicas writing at once get
        consecutive numbers in commit order, never one twice (an identity column would leave
        gaps behind failed transactions)."""
        blob, n = self._snapshot(db)
        return int(db.execute(
            "INSERT INTO library_versions (version, at, actor, reason, skills, snapshot) "
            "VALUES ((SELECT COALESCE(MAX(version), 0) + 1 FROM library_versions), ?, ?, ?, ?, ?) RETURNING version",
            (time.time(), actor, reason, n, blob)).fetchone()[0])

    def _log(self, db, actor: str, action: str, skill_id: int | None, version: int | None, reason: str,
             detail: dict | None = None) -> None:
        db.execute("INSERT INTO skill_audit_log (at, actor, action, skill_id, library_version, reason, detail) "
                   "VALUES (?, ?, ?, ?, ?, ?, ?)",
                   (time.time(), actor, action, skill_id, version, reason, json.dumps(detail or {})))

    def _change(self, db, actor: str, action: str, skill_id: int | None, reason: str, detail: dict | None = None) -> int:
        """Every library change: a new version, then its audit-log row naming that version."""
        v = self._new_version(db, actor, f"{action}{f' skill {skill_id}' if skill_id is not None else ''}: {reason}")
        self._log(db, actor, action, skill_id, v, reason, detail)
        return v

    def _life(self, db, skill_id: int) -> dict | None:
        row = db.execute(f"SELECT {_LIFE_COLS} FROM skill_lifecycle WHERE skill_id=?", (int(skill_id),)).fetchone()
        return None if row is None else dict(zip(_LIFE_COLS.split(", "), row))

    def _set_status(self, db, skill_id: int, status: str, reason: str) -> None:
        db.execute("UPDATE skill_lifecycle SET status=?, reason=?, updated_at=? WHERE skill_id=?",
                   (status, reason, time.time(), skill_id))
        db.execute("UPDATE skills SET retired=?, retired_reason=?, updated_at=? WHERE id=?",
                   (int(status == "retired"), reason if status == "retired" else None, time.time(), skill_id))

    # -- admission ------------------------------------------------------------------------

    def check(self, card: str) -> list[str]:
        """Why a card may not enter (empty when it may): the audit's reasons, then markup."""
        from evolving_rl.skills.skill import audit

        reasons = [f"audit {d}" for d in audit(card, min_chars=self.min_chars, max_chars=self.max_chars).details]
        if (bad := hostile_markup(card)) is not None:
            reasons.append(f"markup: active HTML {bad[:40]!r} is never stored (skills are untrusted text)")
        return reasons

    def admit(self, skill: Any, card: str, embedding: Any, provenance: dict | None, *, actor: str, reason: str) -> int:
        """Store a skill, quarantined; returns its id.

        A newcomer whose task embedding is a near-duplicate (library.dedup_threshold) of a live
        skill's is not stored and the live skill's id is returned: that skill's text is the one
        being measured against its control, and replacing it on every episode of a frequent task
        would restart the measurement forever."""
        reasons = self.check(card)
        if reasons:
            raise SkillRejected("; ".join(reasons))
        with self._admitting():
            near = self.library.retrieve(embedding, 1)
            if near and near[0].similarity is not None and near[0].similarity >= self.library.dedup_threshold:
                return near[0].id
            if len(self.library) >= self.cfg.max_skills:
                raise SkillRejected(f"the library holds evolve.max_skills={self.cfg.max_skills} live skills; "
                                    "retire some first")
            sid = self.library.add(skill, card, embedding, provenance or {}, merge=False)
            with self.library._write() as db:
                # another process's _adopt may have given the new skill a row between the two transactions
                db.execute(f"INSERT INTO skill_lifecycle ({_LIFE_COLS}) VALUES (?, 'quarantined', 0, 0, 0, 0, ?, ?) "
                           "ON CONFLICT (skill_id) DO UPDATE SET status=excluded.status, uses=0, wins=0, ctrl_uses=0, "
                           "ctrl_wins=0, reason=excluded.reason, updated_at=excluded.updated_at",
                           (sid, "new: quarantined until it beats its no-skill control", time.time()))
                self._change(db, actor, "add", sid, reason, {"provenance": provenance or {}})
        return sid

    @contextmanager
    def _admitting(self) -> Iterator[None]:
        """The near-duplicate check, the capacity check and the insert as one step across
        replicas: without it two replicas extracting the same kind of task at once would both
        find no near-duplicate and store two. (A SQLite library has one serve process.)"""
        if not self.pg:
            yield
            return
        with self.library.held(_ADMIT_LOCK):
            yield

    # -- the arms -------------------------------------------------------------------------

    def choose(self, embedding: Any) -> Decision:
        """The arm and skill for one episode of a task with this description embedding."""
        cands = [r for r in self.library.retrieve(embedding, self.cfg.candidates)
                 if r.similarity is not None and r.similarity >= self.cfg.min_similarity]
        status = self.statuses([r.id for r in cands])
        q = next((r for r in cands if status.get(r.id) == "quarantined"), None)
        p = next((r for r in cands if status.get(r.id) == "promoted"), None)
        if q is None and p is None:
            return Decision("none")
        if self.rng.random() < self.cfg.control_share:
            return Decision("control", credited=[r.id for r in (q, p) if r is not None])
        if q is not None and (p is None or self.rng.random() < self.cfg.trial_share):
            pick, arm = q, "trial"
        elif p is not None:
            pick, arm = p, "promoted"
        else:  # pragma: no cover - q or p is set
            return Decision("none")
        return Decision(arm, pick.id, pick.name, status[pick.id], pick.card, pick.similarity)

    def statuses(self, ids: list[int]) -> dict[int, str]:
        if not ids:
            return {}
        rows = self.library._db.execute(
            f"SELECT skill_id, status FROM skill_lifecycle WHERE skill_id IN ({','.join('?' * len(ids))})", ids)
        return {int(i): s for i, s in rows}

    def record(self, decision: Decision, outcome: float, *, actor: str = "guardrail",
               queue_payload: dict | None = None) -> tuple[list[dict], int | None]:
        """Count one finished episode (outcome: 1 won, 0 lost, or a score in [0, 1]) and apply
        the guardrail to the skills it measured. With `queue_payload` the ended episode joins the
        extraction queue in the same transaction, so an outcome is never counted without its
        episode being queued or the reverse. Returns the status changes and the queue id."""
        if not 0.0 <= outcome <= 1.0:
            raise ValueError(f"outcome: {outcome} is not in [0, 1]")
        changes: list[dict] = []
        qid = None
        with self.library._write() as db:
            db.execute("INSERT INTO arm_stats VALUES (?, 1, ?) ON CONFLICT(arm) DO UPDATE SET "
                       "episodes=arm_stats.episodes+1, wins=arm_stats.wins+excluded.wins", (decision.arm, outcome))
            touched = []
            if decision.skill_id is not None and self._life(db, decision.skill_id) is not None:
                db.execute("UPDATE skill_lifecycle SET uses=uses+1, wins=wins+?, updated_at=? WHERE skill_id=?",
                           (outcome, time.time(), decision.skill_id))
                db.execute("UPDATE skills SET uses=uses+1, successes=successes+?, updated_at=? WHERE id=?",
                           (int(outcome >= 1.0), time.time(), decision.skill_id))
                touched.append(decision.skill_id)
            for sid in decision.credited:
                if self._life(db, sid) is not None:
                    db.execute("UPDATE skill_lifecycle SET ctrl_uses=ctrl_uses+1, ctrl_wins=ctrl_wins+? WHERE skill_id=?",
                               (outcome, sid))
                    touched.append(sid)
            for sid in touched:
                life = self._life(db, sid)
                if life["status"] == "retired":
                    continue
                verdict, why = decide(life["status"], life["wins"], life["uses"], life["ctrl_wins"], life["ctrl_uses"],
                                      min_uses=self.cfg.min_uses, confidence=self.cfg.confidence, margin=self.cfg.margin)
                if verdict is not None:
                    self._set_status(db, sid, verdict, why)
                    v = self._change(db, actor, "promote" if verdict == "promoted" else "retire", sid, why,
                                     {k: life[k] for k in ("uses", "wins", "ctrl_uses", "ctrl_wins")})
                    changes.append({"skill_id": sid, "status": verdict, "reason": why, "version": v})
            if queue_payload is not None:
                qid = int(db.execute("INSERT INTO episode_queue (created_at, payload) VALUES (?, ?) RETURNING id",
                                     (time.time(), json.dumps(queue_payload))).fetchone()[0])
        return changes, qid

    # -- admin ----------------------------------------------------------------------------

    def retire(self, skill_id: int, *, actor: str, reason: str) -> int:
        with self.library._write() as db:
            life = self._require(db, skill_id)
            if life["status"] == "retired":
                raise ValueError(f"skill {skill_id} is already retired")
            self._set_status(db, skill_id, "retired", reason)
            return self._change(db, actor, "retire", skill_id, reason)

    def restore(self, skill_id: int, *, actor: str, reason: str) -> int:
        """Bring a retired skill back, quarantined: it proves itself again against its control."""
        with self.library._write() as db:
            life = self._require(db, skill_id)
            if life["status"] != "retired":
                raise ValueError(f"skill {skill_id} is {life['status']}, not retired")
            self._set_status(db, skill_id, "quarantined", f"restored: {reason}")
            return self._change(db, actor, "restore", skill_id, reason)

    def _require(self, db, skill_id: int) -> dict:
        life = self._life(db, skill_id)
        if life is None:
            raise KeyError(f"skill {skill_id} is not in the library {self.path}")
        return life

    def rollback(self, version: int, *, actor: str, reason: str) -> int:
        """Make the library exactly what it was at `version` (skills, cards, statistics,
        statuses); recorded as a new version, the audit log kept whole.

        The usage and outcome counts go back too: each status in a version was decided on that
        version's counts, so restoring the statuses beside later counts would let the next outcome
        re-take the very decisions a rollback undoes. The counts it replaces (outcomes since
        `version`, some never in any version) stay on record in the rollback's audit row
        (`counts_set_aside`); the per-arm traffic totals (`arm_stats`) are not library state."""
        with self.library._write() as db:
            row = db.execute("SELECT snapshot FROM library_versions WHERE version=?", (int(version),)).fetchone()
            if row is None:
                raise KeyError(f"library version {version} does not exist")
            snap = json.loads(zlib.decompress(row[0]))
            counts = "uses, wins, ctrl_uses, ctrl_wins"
            restored = {int(r[0]): list(r[2:6]) for r in snap["lifecycle"]}
            set_aside = {str(sid): dict(zip(counts.split(", "), now)) for sid, *now in
                         db.execute(f"SELECT skill_id, {counts} FROM skill_lifecycle ORDER BY skill_id")
                         if list(now) != restored.get(int(sid))}
            db.execute("DELETE FROM skills")
            db.execute("DELETE FROM skill_lifecycle")
            _insert_rows(db, [[*r[:4], bytes.fromhex(r[4]), *r[5:]] for r in snap["skills"]], snap["lifecycle"])
            return self._change(db, actor, "rollback", None, reason,
                                {"to_version": int(version), "counts_set_aside": set_aside})

    def snapshot(self, version: int | None = None) -> dict:
        """A version's content (the current one by default): skill rows and lifecycle rows."""
        db = self.library._db
        if version is None:
            blob, _ = self._snapshot(db)
        else:
            row = db.execute("SELECT snapshot FROM library_versions WHERE version=?", (int(version),)).fetchone()
            if row is None:
                raise KeyError(f"library version {version} does not exist")
            blob = row[0]
        return json.loads(zlib.decompress(blob))

    def versions(self, limit: int = 100) -> list[dict]:
        rows = self.library._db.execute(
            "SELECT version, at, actor, reason, skills FROM library_versions ORDER BY version DESC LIMIT ?", (int(limit),))
        return [dict(zip(("version", "at", "actor", "reason", "skills"), r)) for r in rows]

    def current_version(self) -> int:
        return int(self.library._db.execute("SELECT MAX(version) FROM library_versions").fetchone()[0])

    def audit_log(self, skill_id: int | None = None, limit: int = 200) -> list[dict]:
        where, args = ("WHERE skill_id=?", [int(skill_id)]) if skill_id is not None else ("", [])
        rows = self.library._db.execute(
            f"SELECT id, at, actor, action, skill_id, library_version, reason, detail FROM skill_audit_log {where} "
            f"ORDER BY id DESC LIMIT ?", [*args, int(limit)])
        keys = ("id", "at", "actor", "action", "skill_id", "library_version", "reason", "detail")
        return [{**dict(zip(keys, r)), "detail": json.loads(r[7])} for r in rows]

    def skills(self, include_retired: bool = True, status: str | None = None, offset: int = 0,
               limit: int | None = None) -> list[dict]:
        """Skills (by id, a page of them) with their lifecycle, counts and measured lift over their
        control; paged because each lift is a posterior computed on the spot."""
        recs = {r.id: r for r in self.library.list(include_retired=include_retired)}
        where, args = ("WHERE status=?", [status]) if status else ("", [])
        rows = self.library._db.execute(  # no limit: 2**62 rows (PostgreSQL refuses SQLite's LIMIT -1)
            f"SELECT {_LIFE_COLS} FROM skill_lifecycle {where} ORDER BY skill_id LIMIT ? OFFSET ?",
            [*args, 2**62 if limit is None else int(limit), int(offset)]).fetchall()
        out = []
        for row in rows:
            life = dict(zip(_LIFE_COLS.split(", "), row))
            if life["skill_id"] in recs:
                out.append(self._row(life, recs[life["skill_id"]]))
        return out

    def _row(self, life: dict, rec) -> dict:
        lift = lift_posterior(life["wins"], life["uses"], life["ctrl_wins"], life["ctrl_uses"], self.cfg.margin)
        return {"id": rec.id, "name": rec.name, "version": rec.version,
                **{k: life[k] for k in life if k != "skill_id"}, "lift": lift.to_dict(),
                "source_task_id": rec.provenance.get("source_task_id"), "created_at": rec.created_at}

    def skill(self, skill_id: int) -> dict:
        rec = self.library.get(skill_id)
        life = self._life(self.library._db, rec.id)
        return {**(self._row(life, rec) if life else {}), "card": rec.card, "skill": rec.skill,
                "provenance": rec.provenance, "merge_history": rec.history}

    def arm_stats(self) -> dict[str, dict]:
        rows = self.library._db.execute("SELECT arm, episodes, wins FROM arm_stats ORDER BY arm")
        return {a: {"episodes": n, "wins": w} for a, n, w in rows}

    def counts(self) -> dict[str, int]:
        rows = self.library._db.execute("SELECT status, COUNT(*) FROM skill_lifecycle GROUP BY status")
        return {**dict.fromkeys(STATUSES, 0), **dict(rows)}

    # -- export / import ------------------------------------------------------------------

    def export(self, path: str | Path) -> int:
        """The current library (skills, lifecycle) as one JSON file; returns the skill count."""
        snap = self.snapshot()
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"format": "evolving-rl-skills/1", **snap}))
        return len(snap["skills"])

    def import_(self, path: str | Path, *, actor: str, reason: str) -> tuple[list[int], list[str]]:
        """Admit every live skill of an export, each quarantined whatever its status was where it
        came from (a skill proves itself against this deployment's control). Returns the ids
        stored and one line per skill rejected."""
        path = Path(path)
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            skills = data["skills"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise ValueError(f"{path}: not a skill export from `evolving-rl evolve --export` ({e})") from None
        cols = _COLUMNS.split(", ")
        ids, rejected = [], []
        for n, r in enumerate(skills, 1):
            try:
                d = dict(zip(cols, r))
                if d["retired"]:
                    continue
                emb = np.frombuffer(bytes.fromhex(d["embedding"]), dtype=np.float32)
                prov = {**json.loads(d["provenance"]), "extra": {"imported_from": str(path.name), "original_id": d["id"]}}
                ids.append(self.admit(json.loads(d["json"]), d["card"], emb, prov, actor=actor, reason=reason))
            except SkillRejected as e:
                rejected.append(f"skill {n}: {e}")
            except (ValueError, KeyError, TypeError) as e:
                raise ValueError(f"{path}: skill {n} is malformed ({e})") from None
        return ids, rejected

    # -- the episode queue ----------------------------------------------------------------

    def pending(self, limit: int = 8) -> list[tuple[int, dict]]:
        rows = self.library._db.execute(
            "SELECT id, payload FROM episode_queue WHERE state='pending' ORDER BY id LIMIT ?", (int(limit),))
        return [(int(i), json.loads(p)) for i, p in rows]

    def claim(self) -> tuple[int, dict] | None:
        """The oldest pending episode no other extraction worker holds, now held by this one
        until `finish_queued` (on PostgreSQL; a SQLite library has one worker). The hold is the
        database session's, so a replica killed mid-extraction frees the episode for the others
        at once, and it stays `pending` in the table until its skill is stored."""
        for qid, payload in self.pending(16):
            if not self.pg:
                return qid, payload
            key = (_QUEUE_LOCK, qid % 2**31)
            if qid in self._held or not self.library.try_hold(key):  # a session's advisory locks stack: skip its own
                continue
            if self.queued(qid)["state"] == "pending":  # not finished by another worker since pending() read it
                self._held.add(qid)
                return qid, payload
            self.library.release(key)
        return None

    def finish_queued(self, qid: int, result: dict, *, failed: bool = False) -> None:
        with self.library._write() as db:
            db.execute("UPDATE episode_queue SET state=?, result=?, done_at=?, attempts=attempts+1 WHERE id=?",
                       ("failed" if failed else "done", json.dumps(result), time.time(), qid))
        if qid in self._held:
            self._held.discard(qid)
            self.library.release((_QUEUE_LOCK, qid % 2**31))

    def queue_counts(self) -> dict[str, int]:
        rows = self.library._db.execute("SELECT state, COUNT(*) FROM episode_queue GROUP BY state")
        return {"pending": 0, "done": 0, "failed": 0, **dict(rows)}

    def queued(self, qid: int) -> dict:
        row = self.library._db.execute("SELECT state, attempts, result FROM episode_queue WHERE id=?", (qid,)).fetchone()
        if row is None:
            raise KeyError(f"queued episode {qid} does not exist")
        return {"id": qid, "state": row[0], "attempts": row[1], "result": json.loads(row[2]) if row[2] else None}

    def close(self) -> None:
        self.library.close()


def _create_sqlite_tables(db) -> None:
    for stmt in _SCHEMA.split(";\n"):
        if stmt.strip():
            db.execute(stmt)


def _insert_rows(db, skills: list, lifecycle: list) -> None:
    """Skill rows (`_COLUMNS`, the embedding as bytes) and lifecycle rows (`_LIFE_COLS`), ids kept."""
    for r in skills:
        db.execute(f"INSERT INTO skills ({_COLUMNS}) VALUES ({', '.join('?' * len(r))})", list(r))
    for r in lifecycle:
        db.execute(f"INSERT INTO skill_lifecycle ({_LIFE_COLS}) VALUES ({', '.join('?' * len(r))})", list(r))


def copy_library(src: str | Path, dst: str | Path) -> None:
    """A library (a file or a postgresql:// URL) as a new SQLite file `dst`, for work that must
    never touch the original (an evaluation plays on its own copy of a skill bank). A file is
    copied whole with SQLite's backup API; from PostgreSQL every skill row is copied exactly and,
    where a service ran on it, each skill's lifecycle (status, counts), so a promoted skill
    stays promoted (versions and the audit log stay with the original)."""
    from evolving_rl.common import snapshot_sqlite

    if not is_postgres(str(src)):
        snapshot_sqlite(src, dst)
        return
    with open_library(str(src), mode="read") as lib:
        skills = [[*r[:4], bytes(r[4]), *r[5:]] for r in lib._db.execute(f"SELECT {_COLUMNS} FROM skills ORDER BY id")]
        life = (lib._db.execute(f"SELECT {_LIFE_COLS} FROM skill_lifecycle ORDER BY skill_id").fetchall()
                if has_lifecycle(lib) else [])
    for suffix in ("", "-wal", "-shm"):
        Path(str(dst) + suffix).unlink(missing_ok=True)
    with SkillLibrary(dst) as out, out._write() as db:
        if life:
            _create_sqlite_tables(db)
        _insert_rows(db, skills, life)


def extract_into(evolver: SkillEvolver, policy, episodes, embeddings, provenances: list[dict], sampling, *,
                 max_trajectory_chars: int, seed: int | None, actor: str = "extractor") -> list[dict]:
    """One skill per episode from the extractor, each admitted (or rejected, with the reasons).
    Engine-failed episodes teach nothing and are skipped."""
    from evolving_rl.extraction import extract_skills

    keep = [i for i, ep in enumerate(episodes) if not ep.failed]
    cands = extract_skills(policy, [episodes[i] for i in keep], 1, sampling, min_chars=evolver.min_chars,
                           max_chars=evolver.max_chars, seed=seed, max_trajectory_chars=max_trajectory_chars)
    results: list[dict] = [{"skill_id": None, "rejected": ["engine failure: not extracted"]} for _ in episodes]
    for i, c in zip(keep, cands):
        if not c.valid:
            results[i] = {"skill_id": None, "rejected": list(c.reasons)}
            continue
        try:
            before = evolver.current_version()
            sid = evolver.admit(c.skill, c.card, embeddings[i], provenances[i], actor=actor,
                                reason=f"extracted from {'a won' if episodes[i].won else 'a lost'} episode of "
                                       f"{episodes[i].task.id}")
            results[i] = {"skill_id": sid, "rejected": [], "duplicate": evolver.current_version() == before}
        except SkillRejected as e:
            results[i] = {"skill_id": None, "rejected": [str(e)]}
    return results


def evolve_stream(evolver: SkillEvolver, rollout, policy, embedder, tasks, sampling, extract_sampling, *, wave: int,
                  seed: int, model_name: str, max_trajectory_chars: int, learn: bool = True, progress=None):
    """Test-time self-evolution over a seeded task stream, on the evolver.

    Waves of `wave` tasks are one batched rollout each; a task sees every skill admitted and
    every guardrail decision from earlier waves. `learn=False` freezes the library (skill
    transfer): skills are chosen and counted, nothing is extracted. The rollout's policy is the
    solver; `policy` writes the skills (the extractor: the same one unless `extractor_model`).
    Returns the episodes in stream order and one log row per episode."""
    from evolving_rl.rollout import Job

    order = list(range(len(tasks)))
    random.Random(seed).shuffle(order)
    stream = [tasks[i] for i in order]
    vecs = embedder.embed([t.description for t in stream]) if stream else np.zeros((0, 1))
    episodes, log = [], []
    for start in range(0, len(stream), wave):
        chunk = stream[start:start + wave]
        decisions = [evolver.choose(vecs[start + i]) for i in range(len(chunk))]
        eps = rollout.run([Job(t, d.card) for t, d in zip(chunk, decisions)], sampling, seed=seed * 43 + start)
        changes: list[list[dict]] = []
        for d, ep in zip(decisions, eps):
            changes.append([] if ep.failed else evolver.record(d, float(ep.won))[0])
        added: list[dict] = [{"skill_id": None, "rejected": []} for _ in chunk]
        if learn:
            provs = [{"source_task_id": t.id, "model": model_name, "stream_position": start + i, "success": bool(ep.won)}
                     for i, (t, ep) in enumerate(zip(chunk, eps))]
            added = extract_into(evolver, policy, eps, [vecs[start + i] for i in range(len(chunk))], provs,
                                 extract_sampling, max_trajectory_chars=max_trajectory_chars, seed=seed * 47 + start)
        for i, (t, d, ep) in enumerate(zip(chunk, decisions, eps)):
            episodes.append(ep)
            log.append({"position": start + i, "task": t.id, "won": ep.won, "failed": ep.failed, **d.to_dict(),
                        "skills_used": [d.skill_id] if d.skill_id is not None else [],
                        "skill_added": added[i]["skill_id"], "rejected": added[i]["rejected"],
                        "status_changes": changes[i]})
        if progress:
            progress(min(start + wave, len(stream)), len(stream))
    return episodes, log


def run_evolve(cfg, split: str, *, library: str | Path, max_tasks: int | None = None, learn: bool = True,
               out: str | Path | None = None, say=print) -> dict:
    """`evolving-rl evolve`: test-time self-evolution over one split of any registered env.

    Writes `<out>/evolve_<split>.json` (per-episode log, per-arm success, the library's skills
    with their lift) and returns the same summary."""
    from evolving_rl.builders import build_extractor, build_policy, build_pool, build_rollout, build_suite, extractor_name
    from evolving_rl.retrieval import make_embedder

    suite = build_suite(cfg)
    if split not in suite.splits():
        raise ValueError(f"--split: {cfg.env.name} has no split {split!r}; it has {', '.join(suite.splits())}")
    tasks = suite.tasks(split)[:max_tasks] if max_tasks else suite.tasks(split)
    if not tasks:
        raise ValueError(f"--split {split}: no tasks")
    policy = build_policy(cfg)
    extractor = build_extractor(cfg, policy)  # the solver itself unless extractor_model names another model
    ev = cfg.evolving
    evolver = SkillEvolver(open_library(library, dedup_threshold=cfg.library.dedup_threshold), cfg.evolve,
                           min_chars=ev.min_skill_chars, max_chars=ev.max_skill_chars)
    greedy = {"temperature": 0.0} if cfg.eval.greedy else {}
    t0 = time.perf_counter()
    with build_pool(cfg) as pool:
        rollout = build_rollout(cfg, policy, pool)
        episodes, log = evolve_stream(
            evolver, rollout, extractor, make_embedder(cfg.retrieval.embedder), tasks,
            cfg.rollout.solver.model_copy(update=greedy), cfg.rollout.extractor.model_copy(update=greedy),
            wave=cfg.evolve.wave, seed=cfg.evolve.seed, model_name=extractor_name(cfg),
            max_trajectory_chars=ev.max_trajectory_chars, learn=learn)
    arms: dict[str, dict] = {}
    for row in log:
        if not row["failed"]:
            a = arms.setdefault(row["arm"], {"episodes": 0, "wins": 0})
            a["episodes"] += 1
            a["wins"] += int(row["won"])
    summary = {"split": split, "env": cfg.env.name, "model": cfg.model.path, "extractor": extractor_name(cfg),
               "library": str(evolver.path),
               "episodes": len(log), "wall_s": round(time.perf_counter() - t0, 1), "arms": arms,
               "skills": evolver.skills(), "counts": evolver.counts(), "library_version": evolver.current_version(),
               "log": log}
    if out is not None:
        path = Path(out) / f"evolve_{split}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(summary, indent=1))
        summary["written"] = str(path)
    evolver.close()
    return summary
