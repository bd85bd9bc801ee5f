"""Mind2Web as offline replay, the way the Evolving-RL paper plays it.

There is no live website: each task is the recorded sequence of pages a crowdworker went
through. At step t the agent sees the task, the actions recorded before t and a compact
list of elements of the recorded page t, and answers `CLICK [ref]`, `TYPE [ref] text` or
`SELECT [ref] option`. A correct action (a positive candidate element, the recorded
operation and, for TYPE/SELECT, the recorded value up to case and spacing) moves to
page t+1; a wrong one ends the episode. So the episode's score is the fraction of steps
done right before the first error: the paper's "action accuracy".

Literature numbers (MindAct and successors) are instead computed per step with teacher
forcing: the agent always sees the gold history, and a wrong step costs only that step.
`teacher_forcing: true` plays that protocol (a wrong action moves on to the next recorded
page) so `mind2web_metrics` can report element accuracy, operation F1, step success and
task success over every step, as the Mind2Web evaluation script computes them.

Data: the public osunlp/Mind2Web layout, `data/train/train_*.json` and the test zip's
`data/test_{task,website,domain}/*.json`, each a JSON list of tasks. It cannot be
downloaded here (the test split is password-protected against crawling): put it under a
directory and pass it as `data_dir`. The splits are the paper's generalisation levels:
test_task = seen websites (cross-task), test_website = unseen websites of seen domains,
test_domain = unseen domains; `task_type` (domain by default) groups tasks within them.

The element list is drawn from the step's recorded candidates (positives + negatives): a
seeded sample of at most `max_elements`, always holding the positives, in a seeded
order, so the answer is never a fixed position. References are `e<backend_node_id>`:
stable across resets and runs, and meaningless to a model that would look for patterns.
Note this is a uniform sample of negatives, not the DeBERTa ranker's top-50 of MindAct,
so the list is easier than MindAct's (say so when comparing).
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import string
from collections import OrderedDict
from dataclasses import asdict, dataclass
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

from evolving_rl.envs.base import EnvError, max_steps_option, register
from evolving_rl.types import StepResult, Task

ENV_NAME = "mind2web"
SPLITS = ("train", "test_task", "test_website", "test_domain")
OPS = ("CLICK", "TYPE", "SELECT")
TASK_TYPE_FIELDS = ("domain", "website", "subdomain")
DATA_HELP = (
    "the Mind2Web data cannot be downloaded here: fetch the train split from "
    "https://huggingface.co/datasets/osunlp/Mind2Web and the test zip linked from "
    "https://github.com/OSU-NLP-Group/Mind2Web, then lay them out as "
    "DATA_DIR/data/train/train_*.json and DATA_DIR/data/test_task|test_website|test_domain/*.json "
    "and set env.options.data_dir (or $MIND2WEB_DATA) to DATA_DIR"
)
# Attributes worth showing, most telling first (names as in the dataset's attribute dicts).
_SHOWN_ATTRS = ("aria_label", "placeholder", "title", "alt", "value", "input_value", "name", "type", "role")
_VOID_TAGS = frozenset(
    "area base br col embed hr img input link meta param source track wbr".split()
)
_ACTION_RE = re.compile(r"^\s*(CLICK|TYPE|SELECT)\b\s*\[?\s*([^\]\s]+?)\s*\]?(?:\s+(.*))?$", re.I | re.S)


# ---------------------------------------------------------------------------------------
# Reading and checking the public format


def data_root(data_dir: str | Path) -> Path:
    """The folder holding the split folders: DATA_DIR/data if it exists, else DATA_DIR."""
    d = Path(data_dir).expanduser()
    return d / "data" if (d / "data").is_dir() else d


def _natural_key(path: Path) -> list:
    # train_2.json before train_10.json, as the files were numbered.
    return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", path.name)]


def split_files(root: Path, split: str) -> list[Path]:
    d = root / split
    return sorted(d.glob("*.json"), key=_natural_key) if d.is_dir() else []


def _candidate_attrs(cand: dict, where: str) -> dict:
    """The candidate's attribute dict; the dataset stores it as a JSON string."""
    raw = cand.get("attributes", "{}")
    if isinstance(raw, dict):
        return raw
    if not isinstance(raw, str):
        raise ValueError(f"{where}.attributes: expected a JSON string, got {type(raw).__name__}")
    try:
        attrs = json.loads(raw) if raw.strip() else {}
    except json.JSONDecodeError as e:
        raise ValueError(f"{where}.attributes is not valid JSON: {e}") from None
    if not isinstance(attrs, dict):
        raise ValueError(f"{where}.attributes: expected a JSON object, got {type(attrs).__name__}")
    return attrs


def check_task(raw: Any, where: str) -> None:
    """Raise ValueError naming the field if `raw` is not a task in the public format."""
    if not isinstance(raw, dict):
        raise ValueError(f"{where}: expected a task object, got {type(raw).__name__}")
    for key in ("annotation_id", "confirmed_task", "website", "domain"):
        if not isinstance(raw.get(key), str) or not raw[key].strip():
            raise ValueError(f"{where}: missing or empty string field {key!r}")
    where = f"{where} (annotation_id {raw['annotation_id']!r})"
    actions = raw.get("actions")
    if not isinstance(actions, list) or not actions:
        raise ValueError(f"{where}: 'actions' must be a non-empty list")
    reprs = raw.get("action_reprs")
    if not isinstance(reprs, list) or len(reprs) != len(actions) or not all(isinstance(r, str) for r in reprs):
        raise ValueError(f"{where}: 'action_reprs' must be a list of {len(actions)} strings, one per action")
    for i, step in enumerate(actions):
        at = f"{where}: actions[{i}]"
        if not isinstance(step, dict):
            raise ValueError(f"{at}: expected an object, got {type(step).__name__}")
        if not isinstance(step.get("action_uid"), str):
            raise ValueError(f"{at}: missing string field 'action_uid'")
        if not isinstance(step.get("cleaned_html", ""), str):
            raise ValueError(f"{at}.cleaned_html: expected a string")
        op = step.get("operation")
        if not isinstance(op, dict) or op.get("op") not in OPS:
            got = op.get("op") if isinstance(op, dict) else op
            raise ValueError(f"{at}.operation.op is {got!r}; expected one of {', '.join(OPS)}")
        if not isinstance(op.get("value", ""), str):
            raise ValueError(f"{at}.operation.value: expected a string")
        for kind in ("pos_candidates", "neg_candidates"):
            cands = step.get(kind)
            if not isinstance(cands, list):
                raise ValueError(f"{at}: '{kind}' must be a list")
            for j, c in enumerate(cands):
                cw = f"{at}.{kind}[{j}]"
                if not isinstance(c, dict) or not isinstance(c.get("tag"), str):
                    raise ValueError(f"{cw}: expected an object with a string 'tag'")
                if not isinstance(c.get("backend_node_id"), (str, int)) or str(c["backend_node_id"]) == "":
                    raise ValueError(f"{cw}: missing 'backend_node_id'")
                _candidate_attrs(c, cw)


def read_split_file(path: Path) -> list[dict]:
    """A split file's tasks, checked (ValueError naming the file, task and field)."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"mind2web file {path}: not readable as JSON: {e}") from None
    if not isinstance(data, list):
        raise ValueError(f"mind2web file {path}: expected a JSON list of tasks, got {type(data).__name__}")
    for i, raw in enumerate(data):
        check_task(raw, f"mind2web file {path}: task {i}")
    return data


# ---------------------------------------------------------------------------------------
# The on-disk cache
#
# The public files are huge (each train_*.json is hundreds of MB, mostly HTML): parsing one
# takes seconds and compiling its pages a minute. Compiled tasks (a few KB each) and each
# split's task index are written once under `cache_dir` and shared by every process and
# run; an entry is keyed by the source file's size and mtime, so an edited file is re-read.


def cache_dir(options: dict[str, Any]) -> Path | None:
    """`cache_dir` option; "" or false disables; default ~/.cache/evolving_rl/mind2web."""
    opt = options.get("cache_dir")
    if opt is not None and not opt:
        return None
    if opt:
        return Path(str(opt)).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "evolving_rl" / "mind2web"


_CACHE_VERSION = 1  # bump when the compiled form or the index changes


def file_signature(path: Path) -> str:
    st = path.stat()
    return f"{st.st_size}-{st.st_mtime_ns}"


def _cache_key(*parts: Any) -> str:
    return hashlib.sha256("\0".join(map(str, parts)).encode()).hexdigest()[:24]


def _read_cache(path: Path | None) -> Any:
    if path is None or not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None  # a torn or foreign entry is rebuilt


def _write_cache(path: Path | None, value: Any) -> None:
    """Atomic (write then rename), so concurrent workers never read half an entry; a
    read-only cache only costs speed."""
    if path is None:
        return
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(value), encoding="utf-8")
        os.replace(tmp, path)
    except OSError:
        pass


# ---------------------------------------------------------------------------------------
# The task suite


class Mind2WebSuite:
    """Mind2Web tasks by split, read from the public layout under `data_dir`.

    options: data_dir (or $MIND2WEB_DATA), task_type ("domain" | "website" | "subdomain"),
    cache_dir (see `cache_dir`). Only splits whose folder exists are offered. Locators are
    "<split>/<file>#<index>", relative to the data root, so a run directory survives moving
    the data.
    """

    env_name = ENV_NAME

    def __init__(self, options: dict[str, Any] | None = None) -> None:
        options = dict(options or {})
        data_dir = options.get("data_dir") or os.environ.get("MIND2WEB_DATA")
        if not data_dir:
            raise ValueError(f"mind2web: no data directory given; {DATA_HELP}")
        if not Path(data_dir).expanduser().is_dir():
            raise ValueError(f"mind2web: data directory {data_dir} not found; {DATA_HELP}")
        self.root = data_root(data_dir).resolve()
        self.task_type = str(options.get("task_type", "domain"))
        if self.task_type not in TASK_TYPE_FIELDS:
            raise ValueError(f"mind2web option task_type: {self.task_type!r}; allowed: {', '.join(TASK_TYPE_FIELDS)}")
        self.cache = cache_dir(options)
        self._splits = [s for s in SPLITS if split_files(self.root, s)]
        if not self._splits:
            raise ValueError(f"mind2web: no split folder with .json files under {self.root}; {DATA_HELP}")
        self._tasks: dict[str, list[Task]] = {}

    def splits(self) -> list[str]:
        return list(self._splits)

    def tasks(self, split: str) -> list[Task]:
        if split not in self._splits:
            missing = f" ({split!r} has no files under {self.root})" if split in SPLITS else ""
            raise ValueError(f"mind2web: unknown split {split!r}{missing}; allowed: {', '.join(self._splits)}")
        if split not in self._tasks:
            self._tasks[split] = self._load(split)
        return list(self._tasks[split])

    def _load(self, split: str) -> list[Task]:
        files = split_files(self.root, split)
        signature = {p.name: file_signature(p) for p in files}
        entry = None if self.cache is None else self.cache / "index" / f"{_cache_key(self.root, split)}.json"
        cached = _read_cache(entry)
        if isinstance(cached, dict) and cached.get("version") == _CACHE_VERSION and cached.get("files") == signature:
            records = cached["tasks"]
        else:
            records = self._index(split, files)
            _write_cache(entry, {"version": _CACHE_VERSION, "files": signature, "tasks": records})
        return [
            Task(
                id=r["annotation_id"],
                split=split,
                task_type=str(r.get(self.task_type) or r["domain"]),
                description=r["description"],
                locator=r["locator"],
                env=ENV_NAME,
                meta=tuple(sorted((k, r[k]) for k in ("website", "domain", "subdomain", "num_steps", "reachable"))),
            )
            for r in records
        ]

    @staticmethod
    def _index(split: str, files: list[Path]) -> list[dict]:
        records: list[dict] = []
        seen: dict[str, str] = {}
        for path in files:
            for i, raw in enumerate(read_split_file(path)):
                locator = f"{split}/{path.name}#{i}"
                aid = raw["annotation_id"]
                if aid in seen:
                    raise ValueError(f"mind2web split {split!r}: annotation_id {aid!r} appears at {seen[aid]} and {locator}")
                seen[aid] = locator
                records.append(
                    {
                        "annotation_id": aid,
                        "locator": locator,
                        "description": raw["confirmed_task"].strip(),
                        "website": raw["website"],
                        "domain": raw["domain"],
                        "subdomain": raw.get("subdomain") or "",
                        "num_steps": len(raw["actions"]),
                        # a step whose target was lost in the dump cannot be done right
                        "reachable": all(s["pos_candidates"] for s in raw["actions"]),
                    }
                )
        return records


# ---------------------------------------------------------------------------------------
# Compact pages


class _ElementTexts(HTMLParser):
    """Visible text under each wanted element of a cleaned_html page (bounded per element)."""

    def __init__(self, wanted: set[str], limit: int) -> None:
        super().__init__(convert_charrefs=True)
        self.wanted, self.limit = wanted, limit
        self.stack: list[tuple[str, str | None]] = []
        self.open: list[str] = []  # wanted ids currently open
        self.texts: dict[str, list[str]] = {}
        self.sizes: dict[str, int] = {}

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag in _VOID_TAGS:
            return
        bid = dict(attrs).get("backend_node_id")
        bid = bid if bid in self.wanted else None
        self.stack.append((tag, bid))
        if bid is not None:
            self.open.append(bid)

    def handle_endtag(self, tag: str) -> None:
        # Unclosed children are closed with their parent, as browsers do; stray end tags are ignored.
        for k in range(len(self.stack) - 1, -1, -1):
            if self.stack[k][0] == tag:
                for _, bid in self.stack[k:]:
                    if bid is not None:
                        self.open.remove(bid)
                del self.stack[k:]
                return

    def handle_data(self, data: str) -> None:
        text = " ".join(data.split())
        if not text:
            return
        for bid in self.open:
            if self.sizes.get(bid, 0) < self.limit:
                self.texts.setdefault(bid, []).append(text)
                self.sizes[bid] = self.sizes.get(bid, 0) + len(text) + 1

    def text(self, bid: str) -> str:
        return " ".join(self.texts.get(bid, []))


def _clip(text: str, n: int) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= n else text[: max(0, n - 3)].rstrip() + "..."


def element_line(ref: str, tag: str, text: str, attrs: dict, max_chars: int) -> str:
    """One line per element: tag, its visible text, then the attributes that say what it is."""
    parts = [f"[{ref}] {tag}"]
    if text:
        parts.append(f'"{_clip(text, max(12, max_chars // 2))}"')
    for key in _SHOWN_ATTRS:
        val = attrs.get(key)
        if val is None or str(val).strip() == "" or str(val).strip() == text:
            continue
        parts.append(f'{key}="{_clip(val, 40)}"')
    if len(parts) == 1 and attrs.get("id"):
        parts.append(f'id="{_clip(attrs["id"], 30)}"')
    return _clip(" ".join(parts), max_chars)


def ref_of(backend_node_id: Any) -> str:
    return f"e{backend_node_id}"


@dataclass(frozen=True)
class _Step:
    action_uid: str
    op: str
    value: str
    gold_refs: tuple[str, ...]  # every positive candidate counts, as in Mind2Web's metric
    expert_ref: str | None  # the original target when marked, else the first positive
    elements: tuple[tuple[str, str], ...]  # (ref, line) in display order
    repr: str  # the recorded action, shown as history to later steps


@dataclass(frozen=True)
class _Replay:
    annotation_id: str
    website: str
    domain: str
    description: str
    steps: tuple[_Step, ...]


def _replay_to_json(rp: _Replay) -> dict:
    return asdict(rp)


def _replay_from_json(d: dict) -> _Replay:
    steps = tuple(
        _Step(
            action_uid=s["action_uid"],
            op=s["op"],
            value=s["value"],
            gold_refs=tuple(s["gold_refs"]),
            expert_ref=s["expert_ref"],
            elements=tuple((ref, line) for ref, line in s["elements"]),
            repr=s["repr"],
        )
        for s in d["steps"]
    )
    return _Replay(d["annotation_id"], d["website"], d["domain"], d["description"], steps)


def _seeded_rng(*parts: Any) -> random.Random:
    h = hashlib.sha256("\0".join(map(str, parts)).encode()).digest()
    return random.Random(int.from_bytes(h[:8], "little"))


def compile_task(raw: dict, max_elements: int, element_seed: int, max_chars: int) -> _Replay:
    steps = []
    for i, s in enumerate(raw["actions"]):
        pos = sorted(s["pos_candidates"], key=lambda c: not c.get("is_original_target"))
        pos_ids = list(dict.fromkeys(str(c["backend_node_id"]) for c in pos))
        rng = _seeded_rng(element_seed, raw["annotation_id"], s["action_uid"], i)
        by_id: dict[str, dict] = {}
        for c in pos + s["neg_candidates"]:
            by_id.setdefault(str(c["backend_node_id"]), c)
        negs = [b for b in by_id if b not in pos_ids]
        shown_pos = pos_ids[:max_elements]
        shown = shown_pos + rng.sample(negs, min(len(negs), max_elements - len(shown_pos)))
        rng.shuffle(shown)
        parser = _ElementTexts(set(shown), limit=2 * max_chars)
        try:
            parser.feed(s.get("cleaned_html") or "")
            parser.close()
        except Exception:  # html.parser is lenient; if a page still defeats it, show attributes only
            parser.texts.clear()
        elements = []
        for bid in shown:
            c = by_id[bid]
            attrs = _candidate_attrs(c, f"task {raw['annotation_id']!r} step {i} candidate {bid}")
            elements.append((ref_of(bid), element_line(ref_of(bid), c["tag"], parser.text(bid), attrs, max_chars)))
        op = s["operation"]
        steps.append(
            _Step(
                action_uid=s["action_uid"],
                op=op["op"],
                value=op.get("value", "") or "",
                gold_refs=tuple(ref_of(b) for b in pos_ids),
                expert_ref=ref_of(pos_ids[0]) if pos_ids else None,
                elements=tuple(elements),
                repr=" ".join(raw["action_reprs"][i].split()),
            )
        )
    return _Replay(raw["annotation_id"], raw["website"], raw["domain"], raw["confirmed_task"].strip(), tuple(steps))


# ---------------------------------------------------------------------------------------
# Actions and their scoring


def parse_action(action: str) -> tuple[str, str, str] | None:
    """(OP, ref, value) from `CLICK [e12]` / `TYPE [e12] text` / `SELECT [e12] option`, else None.

    Lenient where a model is likely to slip: any case, brackets optional, a bare number
    taken as its `e` ref, one pair of quotes around the value dropped.
    """
    m = _ACTION_RE.match(str(action))
    if not m:
        return None
    op, ref, value = m.group(1).upper(), m.group(2).lower().rstrip(".,;:"), (m.group(3) or "").strip()
    if ref.isdigit():
        ref = "e" + ref
    if len(value) >= 2 and value[0] == value[-1] and value[0] in "\"'":
        value = value[1:-1].strip()
    return op, ref, value


def normalise_value(value: str) -> str:
    return " ".join(str(value).split()).casefold()


def operation_string(op: str, value: str) -> str:
    """The string Mind2Web's operation F1 compares: "CLICK", or "TYPE value" / "SELECT value"."""
    return op if op == "CLICK" else f"{op} {value}".strip()


def op_f1(pred: str, gold: str) -> float:
    """Token-set F1 of two operation strings, as Mind2Web's evaluation computes it:
    whitespace tokens, lone punctuation tokens dropped, case kept."""
    p = {t for t in pred.split() if t not in string.punctuation}
    g = {t for t in gold.split() if t not in string.punctuation}
    if not p and not g:
        return 1.0
    tp = len(p & g)
    if tp == 0:
        return 0.0
    precision, recall = tp / len(p), tp / len(g)
    return 2 * precision * recall / (precision + recall)


# ---------------------------------------------------------------------------------------
# The environment


class Mind2WebEnv:
    """Replays one recorded Mind2Web task at a time (see the module docstring).

    options: data_dir (or $MIND2WEB_DATA; resolves relative locators), max_steps (50),
    max_elements (50, >= 1), element_seed (0: the element sample and order; independent
    of the run seed so every run sees the same pages), element_chars (100: bound on one
    element's line), teacher_forcing (False), admissible ("none": the element list is in
    the observation and TYPE/SELECT values are free text, so nothing is enumerated;
    "click": one `CLICK [ref]` per listed element, which makes TYPE/SELECT look
    inadmissible to constrained decoding), cache_dir (compiled tasks on disk, see
    `cache_dir`), file_cache (1: raw split files kept parsed in memory; each is ~1 GB of
    Python objects, needed only to compile a task missing from the disk cache).
    """

    def __init__(self, options: dict[str, Any] | None = None) -> None:
        options = dict(options or {})
        self.max_steps = max_steps_option(options, "mind2web", 50)
        self.max_elements = int(options.get("max_elements", 50))
        self.element_seed = int(options.get("element_seed", 0))
        self.element_chars = int(options.get("element_chars", 100))
        self.teacher_forcing = options.get("teacher_forcing", False)
        if not isinstance(self.teacher_forcing, bool):  # "false" from a shell would read as True
            raise ValueError(f"mind2web option teacher_forcing must be true or false, got {self.teacher_forcing!r}")
        self.admissible_mode = str(options.get("admissible", "none"))
        self.file_cache = int(options.get("file_cache", 1))
        self.cache = cache_dir(options)
        for name, val, low in (("max_elements", self.max_elements, 1),
                               ("element_chars", self.element_chars, 20), ("file_cache", self.file_cache, 1)):
            if val < low:
                raise ValueError(f"mind2web option {name} must be >= {low}, got {val}")
        if self.admissible_mode not in ("none", "click"):
            raise ValueError(f"mind2web option admissible: {self.admissible_mode!r}; allowed: none, click")
        data_dir = options.get("data_dir") or os.environ.get("MIND2WEB_DATA")
        self.root = data_root(data_dir) if data_dir else None
        self._files: OrderedDict[tuple[str, str], list[dict]] = OrderedDict()
        self._replays: OrderedDict[tuple[str, str, int], _Replay] = OrderedDict()
        self._replay: _Replay | None = None
        self._t = 0  # index of the recorded step shown now
        self._taken = 0
        self._records: list[dict] = []
        self._done = False
        self._last: StepResult | None = None

    # -- loading ---------------------------------------------------------------------------

    def _resolve(self, locator: str) -> tuple[Path, int]:
        path_part, sep, index = str(locator).rpartition("#")
        if not sep or not index.isdigit():
            raise EnvError(f"mind2web locator {locator!r}: expected '<file>#<index>'")
        path = Path(path_part)
        if not path.is_absolute():
            if self.root is None:
                raise EnvError(f"mind2web locator {locator!r} is relative and no data_dir is set; {DATA_HELP}")
            path = self.root / path
        return path, int(index)

    def _load(self, path: Path, index: int) -> _Replay:
        try:
            sig = file_signature(path)
        except OSError:
            raise EnvError(f"mind2web file not found: {path}; {DATA_HELP}") from None
        key = (str(path.resolve()), sig, index)
        if key in self._replays:
            self._replays.move_to_end(key)
            return self._replays[key]
        settings = (self.max_elements, self.element_seed, self.element_chars)
        entry = None if self.cache is None else self.cache / "tasks" / f"{_cache_key(_CACHE_VERSION, *key, *settings)}.json"
        cached = _read_cache(entry)
        try:
            replay = _replay_from_json(cached) if cached else None
        except (KeyError, TypeError, ValueError):
            replay = None
        if replay is None:
            raws = self._raw_file(path, sig)
            if index >= len(raws):
                raise EnvError(f"mind2web locator: {path} holds {len(raws)} tasks, no index {index}")
            try:
                replay = compile_task(raws[index], *settings)
            except ValueError as e:
                raise EnvError(f"mind2web file {path}: {e}") from None
            _write_cache(entry, _replay_to_json(replay))
        self._replays[key] = replay
        while len(self._replays) > 256:
            self._replays.popitem(last=False)
        return replay

    def _raw_file(self, path: Path, sig: str) -> list[dict]:
        key = (str(path.resolve()), sig)
        if key not in self._files:
            try:
                raws = read_split_file(path)
            except ValueError as e:
                raise EnvError(str(e)) from None
            for raw in raws:  # the replay never shows raw_html; free it at once
                for step in raw["actions"]:
                    step.pop("raw_html", None)
            self._files[key] = raws
            while len(self._files) > self.file_cache:
                self._files.popitem(last=False)
        self._files.move_to_end(key)
        return self._files[key]

    # -- the protocol ----------------------------------------------------------------------

    def reset(self, task: Task | str) -> StepResult:
        path, index = self._resolve(task.locator if isinstance(task, Task) else str(task))
        self._replay = self._load(path, index)
        self._t = self._taken = 0
        self._records = []
        self._done = False
        self._last = self._result(self._observation(""), done=False)
        return self._last

    def step(self, action: str) -> StepResult:
        if self._replay is None or self._last is None:
            raise EnvError("Mind2WebEnv.step called before reset")
        if self._done:
            return self._result("The episode is over.", done=True)
        gold = self._replay.steps[self._t]
        record = self._judge(str(action), gold)
        self._records.append(record)
        self._taken += 1
        n = len(self._replay.steps)
        if record["correct"] or self.teacher_forcing:
            self._t += 1
        ended = (not record["correct"] and not self.teacher_forcing) or self._t >= n
        if self._taken >= self.max_steps and not ended:
            ended = True
        self._done = ended
        if record["correct"]:
            feedback = "Correct."
        else:
            feedback = f"Wrong action ({record['why']})."
        if not ended:
            if not record["correct"]:
                feedback += " Continuing from the recorded page."
            obs = self._observation(feedback)
        elif self._t >= n and all(r["correct"] for r in self._records):
            obs = f"{feedback} All {n} recorded steps done correctly. Task complete."
        else:
            obs = f"{feedback} The episode ends: {self._prefix()} of {n} steps were correct before the first error."
        self._last = self._result(obs, done=ended)
        return self._last

    def expert_action(self) -> str | None:
        if self._replay is None or self._done:
            return None
        gold = self._replay.steps[self._t]
        if gold.expert_ref is None:
            return None
        return f"CLICK [{gold.expert_ref}]" if gold.op == "CLICK" else f"{gold.op} [{gold.expert_ref}] {gold.value}"

    def close(self) -> None:
        self._files.clear()
        self._replays.clear()
        self._replay = self._last = None

    # -- internals -------------------------------------------------------------------------

    def _judge(self, action: str, gold: _Step) -> dict:
        parsed = parse_action(action)
        op, ref, value = parsed if parsed else ("", "", "")
        element_ok = parsed is not None and ref in gold.gold_refs
        op_ok = parsed is not None and op == gold.op and (
            op == "CLICK" or normalise_value(value) == normalise_value(gold.value)
        )
        if parsed is None:
            why = "not of the form CLICK [ref], TYPE [ref] text or SELECT [ref] option"
        elif not element_ok:
            why = "wrong element"
        elif op != gold.op:
            why = "wrong operation"
        elif not op_ok:
            why = "wrong value"
        else:
            why = ""
        return {
            "step": self._t,
            "action_uid": gold.action_uid,
            "action": action,
            "parsed": parsed is not None,
            "pred_ref": ref,
            "pred_op": operation_string(op, value) if parsed else "",
            "gold_refs": list(gold.gold_refs),
            "gold_op": operation_string(gold.op, gold.value),
            "element_correct": element_ok,
            "op_correct": op_ok,
            "correct": element_ok and op_ok,
            "why": why,
        }

    def _prefix(self) -> int:
        k = 0
        for r in self._records:
            if not r["correct"]:
                break
            k += 1
        return k

    def _observation(self, feedback: str) -> str:
        rp, t = self._replay, self._t
        assert rp is not None
        step = rp.steps[t]
        history = "; ".join(f"{i + 1}. {s.repr}" for i, s in enumerate(rp.steps[:t])) or "none"
        lines = [feedback] if feedback else []
        lines += [
            f"Task: {rp.description}",
            f"Website: {rp.website}",
            f"Previous actions: {history}",
            f"Step {t + 1} of {len(rp.steps)}. Elements on the page:",
            *(line for _, line in step.elements),
            "Act with CLICK [ref], TYPE [ref] text or SELECT [ref] option.",
        ]
        return "\n".join(lines)

    def _result(self, observation: str, done: bool) -> StepResult:
        rp = self._replay
        assert rp is not None
        n = len(rp.steps)
        prefix = self._prefix()
        won = prefix == n
        admissible = None
        if self.admissible_mode == "click" and not done:
            admissible = [f"CLICK [{ref}]" for ref, _ in rp.steps[self._t].elements]
        info = {
            "annotation_id": rp.annotation_id,
            "website": rp.website,
            "domain": rp.domain,
            "num_steps": n,
            "step": self._t,
            "teacher_forcing": self.teacher_forcing,
            "correct_prefix": prefix,
            "predictions": [dict(r) for r in self._records],
        }
        return StepResult(observation, admissible, done, won, prefix / n, info)


# ---------------------------------------------------------------------------------------
# Metrics


def _mean(xs: list[float]) -> float:
    return sum(xs) / len(xs) if xs else 0.0


def mind2web_metrics(episodes_info: list[dict]) -> dict[str, Any]:
    """The paper's metric and the standard Mind2Web ones, from each episode's final `info`.

    Paper: action_accuracy = mean over tasks of (correct steps before the first error) /
    steps; correct_prefix_steps is the same count unnormalised; paper_success = all steps.
    Standard (Mind2Web's evaluation): per recorded step, element_acc (a positive element),
    op_f1 (token F1 of the operation strings), step_sr (element right and op_f1 == 1);
    micro over all steps and macro_* over tasks (the paper's tables use macro); task_success
    = every step a step success. Steps never reached (after an early stop, or past
    max_steps) count as wrong, so outside teacher forcing these are lower bounds:
    `teacher_forced` says whether every episode was played with teacher forcing.
    """
    elem, f1, sr, m_elem, m_f1, m_sr, task_ok, prefix_frac, prefixes = ([] for _ in range(9))
    for k, info in enumerate(episodes_info):
        try:
            n = int(info["num_steps"])
            preds = list(info["predictions"])
        except (KeyError, TypeError, ValueError):
            raise ValueError(f"mind2web_metrics: episode {k}: info lacks 'num_steps' / 'predictions'") from None
        if n < 1 or len(preds) > n:
            raise ValueError(f"mind2web_metrics: episode {k}: {len(preds)} predictions for {n} steps")
        by_step = {int(p["step"]): p for p in preds}
        e_i, f_i, s_i = [], [], []
        for t in range(n):
            p = by_step.get(t)
            e = float(bool(p and p["element_correct"]))
            f = op_f1(p["pred_op"], p["gold_op"]) if p and p["parsed"] else 0.0
            e_i.append(e)
            f_i.append(f)
            s_i.append(float(e == 1.0 and f == 1.0))
        elem += e_i
        f1 += f_i
        sr += s_i
        m_elem.append(_mean(e_i))
        m_f1.append(_mean(f_i))
        m_sr.append(_mean(s_i))
        task_ok.append(float(all(s_i)))
        prefix = 0
        for t in range(n):
            p = by_step.get(t)
            if not (p and p["correct"]):
                break
            prefix += 1
        prefixes.append(float(prefix))
        prefix_frac.append(prefix / n)
    return {
        "episodes": len(episodes_info),
        "steps": len(elem),
        "teacher_forced": bool(episodes_info) and all(i.get("teacher_forcing") for i in episodes_info),
        "action_accuracy": _mean(prefix_frac),
        "correct_prefix_steps": _mean(prefixes),
        "paper_success": _mean([float(x == 1.0) for x in prefix_frac]),
        "element_acc": _mean(elem),
        "op_f1": _mean(f1),
        "step_sr": _mean(sr),
        "macro_element_acc": _mean(m_elem),
        "macro_op_f1": _mean(m_f1),
        "macro_step_sr": _mean(m_sr),
        "task_success": _mean(task_ok),
    }


def replay_info(env: Mind2WebEnv, task: Task, actions: list[str]) -> dict:
    """The final info of playing `actions` on `task`: scores episodes kept without their info."""
    result = env.reset(task)
    for a in actions:
        if result.done:
            break
        result = env.step(a)
    return result.info


register(ENV_NAME, Mind2WebEnv, Mind2WebSuite)
