"""`evolving-rl`: games, model, sft, train, eval, skills, report, bench, quickstart.

Every command that runs something takes `--config FILE` plus `key=value` overrides, and
turns bad input into one clear message instead of a traceback.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing downloads at run time
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Spinning OpenMP threads on a shared 2-core machine made a 16-token decode take 8.8 s instead
# of 0.04 s; passive waiting must be set before torch is imported.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import typer
from rich.console import Console
from rich.text import Text

from evolving_rl.config import ConfigError, RunConfig, load_config

app = typer.Typer(add_completion=False, no_args_is_help=True, help=__doc__)
games_app = typer.Typer(no_args_is_help=True, help="ALFWorld games: offline generation and expert demonstrations.")
model_app = typer.Typer(no_args_is_help=True, help="Build models.")
skills_app = typer.Typer(no_args_is_help=True, help="Check raw extractor output; manage a skill library.")
config_app = typer.Typer(no_args_is_help=True, help="Show configs.")
bench_app = typer.Typer(no_args_is_help=True, help="Benchmarks that print side-by-side tables.")
app.add_typer(games_app, name="games")
app.add_typer(model_app, name="model")
app.add_typer(skills_app, name="skills")
app.add_typer(config_app, name="config")
app.add_typer(bench_app, name="bench")
# User text (paths, overrides, config values, skill names) is printed literally: with rich
# markup on, "[/x]" in an override crashed the error path and "[x]" silently vanished from it.
console = Console(markup=False, emoji=False, highlight=False, soft_wrap=True)

ConfigOpt = typer.Option(None, "--config", "-c", help="YAML config file.")
OverridesArg = typer.Argument(None, help="key=value overrides, e.g. train.steps=5 evolving.num_skills=4")


def _fail(msg: str) -> None:
    console.print(Text.assemble(("error:", "red"), " ", str(msg)))
    raise typer.Exit(2)


def _config(path: Path | None, overrides: list[str] | None) -> RunConfig:
    try:
        return load_config(path, overrides or [])
    except ConfigError as e:
        _fail(str(e))


def _model_files(path: str | Path, field: str) -> None:
    """Fail on an unloadable model directory before anything (run dir, eval output) is created."""
    from evolving_rl.policy.files import ModelFilesError, check_model_dir

    try:
        check_model_dir(path, field)
    except ModelFilesError as e:
        _fail(str(e))


def _progress(desc: str):
    """A rich progress bar driven by (done, total) callbacks."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    prog = Progress(TextColumn("{task.description}", markup=False), BarColumn(), MofNCompleteColumn(),
                    TimeElapsedColumn(), console=console, transient=False)
    task = prog.add_task(desc, total=None)

    def update(done: int, total: int) -> None:
        prog.update(task, completed=done, total=total)

    return prog, update


# -- games ---------------------------------------------------------------------------------


@games_app.command("generate")
def games_generate(
    out: Path = typer.Option(..., "--out", help="Output directory (created)."),
    seed: int = typer.Option(0, "--seed"),
    train: int = typer.Option(2000, "--train", help="Seen types, training floorplans (the RL pool)."),
    train_unseen: int = typer.Option(300, "--train-unseen", help="Held-out types, training floorplans (experience pool)."),
    eval_seen: int = typer.Option(140, "--eval-seen"),
    eval_unseen: int = typer.Option(134, "--eval-unseen"),
    max_expert_steps: int = typer.Option(50, "--max-expert-steps", min=1),
    workers: int = typer.Option(2, "--workers", min=1),
):
    """Generate ALFWorld games from the floorplans shipped in `alfworld`; keep only games the expert wins."""
    from evolving_rl.envs.alfworld_gen import generate_games

    sizes = {"train": train, "train_unseen": train_unseen, "eval_seen": eval_seen, "eval_unseen": eval_unseen}
    prog, update = _progress("generating games")
    try:
        with prog:
            manifest = generate_games(out, seed, sizes, max_expert_steps=max_expert_steps, workers=workers,
                                      progress=update)
    except ValueError as e:  # GenerationError: sizes, a non-empty or non-directory --out, floorplans
        _fail(str(e))
    _print_manifest(manifest, out)


def _print_manifest(manifest: dict, out: Path) -> None:
    counts = manifest.get("counts", {})
    console.print(f"games in {out}: " + ", ".join(f"{k} {v if isinstance(v, int) else sum(v.values())}" for k, v in counts.items()))
    if "discarded" in manifest:
        console.print(f"discarded (expert could not win): {json.dumps(manifest['discarded'])}")


@games_app.command("demos")
def games_demos(
    games: Path = typer.Option(..., "--games", help="Games directory (generated or official)."),
    split: str = typer.Option("train", "--split"),
    out: Path = typer.Option(..., "--out", help="JSONL file to write."),
    max_tasks: int = typer.Option(None, "--max-tasks", min=1),
    workers: int = typer.Option(2, "--workers"),
):
    """The handcoded expert's ALFWorld trajectories of a split as JSONL: `evolving-rl demos` with
    the default ALFWorld config (50 steps, seed 0) on a games directory."""
    demos(None, split, out, max_tasks, [f"env.games_dir={games}", f"env.num_workers={workers}",
                                        "env.options.skip_bad_games=true"])


@app.command()
def demos(
    config: Path = ConfigOpt,
    split: str = typer.Option("train", "--split"),
    out: Path = typer.Option(..., "--out", help="JSONL file to write."),
    max_tasks: int = typer.Option(None, "--max-tasks", min=1, help="Only the first N tasks of the split."),
    overrides: list[str] = OverridesArg,
):
    """Expert demonstrations of any environment with an expert, as JSONL (for the SFT warm start)."""
    from evolving_rl.demos import write_demos
    from evolving_rl.envs.base import EnvError

    cfg = _config(config, overrides)
    prog, update = _progress(f"{cfg.env.name} demos")
    try:
        with prog:
            stats = write_demos(cfg, split, out, max_tasks=max_tasks, progress=update)
    except (ValueError, FileNotFoundError, EnvError) as e:
        _fail(str(e))
    if stats["failures"]:
        console.print(f"skipped {len(stats['failures'])} game(s) that could not be played:")
        for failure in stats["failures"]:
            console.print(f"  {failure}")
    rate = stats["episodes"] / max(stats["wall_s"], 1e-9)
    console.print(f"demos -> {out}: {stats['episodes']} episodes ({stats['won']} won, {stats['failed']} failed), "
                  f"{stats['steps']} steps in {stats['wall_s']:.1f} s ({rate:.2f} demos/s)")


# -- model and sft -------------------------------------------------------------------------


@model_app.command("tiny")
def model_tiny(
    demos: list[Path] = typer.Option(..., "--demos", help="Demo JSONL files: the tokenizer is trained on their text."),
    out: Path = typer.Option(..., "--out"),
    config: Path = ConfigOpt,
    overrides: list[str] = OverridesArg,
):
    """Build the tiny from-scratch model: a BPE tokenizer on the env's text and a small Llama."""
    from evolving_rl.policy.tiny import build_tiny
    from evolving_rl.sft import corpus_from_demos, load_demos

    cfg = _config(config, overrides)
    try:
        texts = corpus_from_demos(load_demos([str(d) for d in demos]), cfg)
        path = build_tiny(texts, cfg.tiny, out)
    except (ValueError, FileNotFoundError) as e:  # load_demos names the file and line
        _fail(str(e))
    console.print(f"tiny model -> {path}")


@app.command()
def sft(
    config: Path = ConfigOpt,
    out: Path = typer.Option(..., "--out", help="Where to save the warm-started model."),
    overrides: list[str] = OverridesArg,
    skills: bool = typer.Option(True, help="Also teach extraction and skill use (tiny models only)."),
    bf16: bool = typer.Option(False, help="bf16 autocast on CPU (faster where avx512_bf16 exists)."),
):
    """Behaviour cloning on expert demos, then a greedy no-skill evaluation."""
    from evolving_rl.sft import run_sft

    cfg = _config(config, overrides)
    _model_files(cfg.model.path, "model.path")
    try:
        run_sft(cfg, out, skills=skills, bf16=bf16, console=console)
    except (ValueError, FileNotFoundError) as e:  # demos, games, splits: each names its file or field
        _fail(str(e))


@app.command()
def train(
    config: Path = ConfigOpt,
    overrides: list[str] = OverridesArg,
    resume: bool = typer.Option(False, "--resume", help="Continue the run in run_dir from its last checkpoint."),
):
    """RL training (algorithm: grpo | evolving), with periodic evaluation and checkpoints."""
    from evolving_rl.train import Trainer

    cfg = _config(config, overrides)
    _model_files(cfg.model.path, "model.path")
    try:
        trainer = Trainer(cfg, resume=resume, console=console)
    except (ValueError, FileExistsError, FileNotFoundError) as e:
        _fail(str(e))
    try:
        trainer.fit()
    finally:
        trainer.close()
    from evolving_rl import distributed

    distributed.leave()  # several processes (torchrun): shut the process group down before exit
    console.print(f"run -> {cfg.run_dir}")


@app.command("eval")
def eval_cmd(
    config: Path = ConfigOpt,
    checkpoint: str = typer.Option(..., "--checkpoint", help="Any Hugging Face causal-LM directory."),
    overrides: list[str] = OverridesArg,
    out: Path = typer.Option(None, "--out", help="Where eval/<tag>.json goes (default: run_dir)."),
    tag: str = typer.Option("eval", "--tag"),
    protocol: list[str] = typer.Option(None, "--protocol", help="no_skill | one_shot | library (repeatable)."),
    skills: str = typer.Option(None, "--skills", help="A skill library built by another policy (transfer): a file "
                               "or postgresql://..."),
    learn: bool = typer.Option(None, "--learn/--no-learn", help="library: keep adding skills (default: only without --skills)."),
):
    """Evaluate a checkpoint on fixed splits, seeds and repeats; JSON + a printed table."""
    from evolving_rl.evaluate import evaluate_checkpoint

    cfg = _config(config, overrides)
    for p in protocol or []:
        if p not in ("no_skill", "one_shot", "library"):
            _fail(f"--protocol: unknown protocol {p!r}; allowed: no_skill, one_shot, library")
    if tag in ("", ".", "..") or "/" in tag or "\\" in tag:  # it names eval/<tag>.json: no path may escape
        _fail(f"--tag: {tag!r} must be a plain name (it names eval/<tag>.json), without / or \\")
    _model_files(checkpoint, "--checkpoint")
    from evolving_rl.policy.openai_policy import OpenAIEndpointError

    try:
        evaluate_checkpoint(cfg, checkpoint, out or cfg.run_dir, tag=tag, protocols=protocol or None,
                            skills=str(skills) if skills else None, learn=learn, console_print=console.print)
    except (ValueError, FileNotFoundError, OpenAIEndpointError) as e:  # the last names the server's base_url
        _fail(str(e))


@app.command()
def report(run_dir: Path = typer.Argument(..., help="A run directory (train or eval output), or a served skill "
                                         "library's .sqlite file (the report is written next to it).")):
    """Write one self-contained HTML report (plots embedded, all model text escaped)."""
    from evolving_rl.report import write_report

    if not (run_dir.is_dir() or run_dir.is_file()):
        _fail(f"no run directory or skill library file at {run_dir}")
    try:
        console.print(f"report -> {write_report(run_dir)}")
    except (ValueError, OSError) as e:  # an output path taken by a directory or file; a read-only run dir
        _fail(str(e))


# -- deployment: serve and evolve ----------------------------------------------------------


@app.command()
def serve(
    config: Path = ConfigOpt,
    overrides: list[str] = OverridesArg,
    host: str = typer.Option(None, "--host", help="Listen address (default serve.host: 127.0.0.1, localhost only)."),
    port: int = typer.Option(None, "--port", min=0, max=65535, help="Port (default serve.port)."),
    library: str = typer.Option(None, "--library", help="Skill library: a SQLite file, or postgresql://... shared "
                                "by several replicas (default serve.library)."),
):
    """Serve a self-evolving agent over HTTP: callers start episodes, ask for actions, end them with
    the outcome; ended episodes become quarantined skills that are promoted or retired against a
    no-skill control (thresholds: the evolve: config section). Library changes need the admin token
    in $EVOLVING_RL_ADMIN_TOKEN. Endpoints: USAGE.md, "Serving a self-evolving agent"."""
    try:
        from evolving_rl.serve.app import serve as run_server
    except ImportError as e:
        _fail(str(e))
    over = list(overrides or [])
    over += [f"serve.host={host}"] if host else []
    over += [f"serve.port={port}"] if port is not None else []
    over += [f"serve.library={library}"] if library else []
    cfg = _config(config, over)
    if not Path(cfg.model.path).is_dir():
        _fail(f"model.path: no model directory at {cfg.model.path}")
    _open_library(cfg.serve.library, "create", "serve.library").close()  # before minutes of model loading
    try:
        run_server(cfg, say=console.print)
    except (ValueError, ImportError) as e:
        _fail(str(e))


@app.command()
def evolve(
    config: Path = ConfigOpt,
    overrides: list[str] = OverridesArg,
    split: str = typer.Option("eval_unseen", "--split", help="The task stream: a split of env.name's suite."),
    library: str = typer.Option(None, "--library", help="Skill library: a file or postgresql://... "
                                "(default <run_dir>/skills.sqlite)."),
    max_tasks: int = typer.Option(None, "--max-tasks", min=1, help="Only the first N tasks of the split."),
    learn: bool = typer.Option(True, "--learn/--no-learn", help="--no-learn: a frozen library (skill transfer)."),
    export: Path = typer.Option(None, "--export", help="Write the library to this JSON file afterwards."),
    import_: Path = typer.Option(None, "--import", help="Admit the skills of an export first (each quarantined)."),
):
    """Test-time self-evolution over a task stream on any registered env, with the service's guardrails:
    quarantine, a no-skill control share, promotion/retirement with confidence, audit log, versions."""
    from evolving_rl.policy.openai_policy import OpenAIEndpointError
    from evolving_rl.serve.evolver import SkillEvolver, run_evolve

    cfg = _config(config, overrides)
    lib = library or str(Path(cfg.run_dir) / "skills.sqlite")
    if not Path(cfg.model.path).is_dir():
        _fail(f"model.path: no model directory at {cfg.model.path}")
    _open_library(lib, "create", "--library").close()
    try:
        if import_ is not None:
            if not import_.is_file():
                _fail(f"--import: no file at {import_}")
            ids, rejected = SkillEvolver(lib, cfg.evolve).import_(import_, actor="cli", reason=f"import {import_.name}")
            console.print(f"imported {len(ids)} skills (quarantined)" + "".join(f"\n  rejected {r}" for r in rejected))
        summary = run_evolve(cfg, split, library=lib, max_tasks=max_tasks, learn=learn, out=cfg.run_dir,
                             say=console.print)
        if export is not None:
            console.print(f"{SkillEvolver(lib, cfg.evolve).export(export)} skills -> {export}")
    except (ValueError, FileNotFoundError, ImportError, OpenAIEndpointError) as e:
        _fail(str(e))
    for arm, a in sorted(summary["arms"].items()):
        console.print(f"{arm:<10} {a['wins']}/{a['episodes']} won")
    console.print(f"skills: " + ", ".join(f"{n} {k}" for k, n in summary["counts"].items()) +
                  f"; library version {summary['library_version']}; {summary['episodes']} episodes in "
                  f"{summary['wall_s']} s -> {summary.get('written')}")


# -- skills --------------------------------------------------------------------------------


@skills_app.command("check")
def skills_check(files: list[Path] = typer.Argument(..., help="Files of raw extractor output."),
                 config: Path = ConfigOpt):
    """Lint raw extractor output: parses? passes the audit? prints the card. Non-zero exit on any failure."""
    from evolving_rl.skills.skill import check_files

    cfg = _config(config, [])
    missing = [str(f) for f in files if not f.is_file()]
    if missing:
        _fail("no such file: " + ", ".join(missing))
    text, ok = check_files([str(f) for f in files], cfg.evolving.min_skill_chars, cfg.evolving.max_skill_chars)
    console.print(text, highlight=False, markup=False)
    raise typer.Exit(0 if ok else 1)


LIB_HELP = "A skill library: a SQLite file, or a postgresql://user@host:port/db URL."


def _open_library(location: str | Path, mode: str, what: str | None = None):
    """The library at a file path or a postgresql:// URL (`open_library`); a bad URL, a server
    that is down or a missing driver is one line (naming `what`), never a traceback."""
    from evolving_rl.skills.pg_library import open_library

    try:
        return open_library(location, mode=mode)
    except (ValueError, ImportError) as e:
        _fail(f"{what}: {e}" if what else str(e))


def _library(location: str | Path, mode: str = "read"):
    """An existing library; list/show/export open it read-only, so a wrong file is never changed."""
    from evolving_rl.skills.pg_library import is_postgres

    if not is_postgres(str(location)) and not Path(location).is_file():
        _fail(f"no skill library at {location}" + (" (that is a directory)" if Path(location).is_dir() else ""))
    return _open_library(location, mode)


@skills_app.command("list")
def skills_list(library: str = typer.Argument(..., help=LIB_HELP), all: bool = typer.Option(False, "--all", help="Include retired.")):
    """One line per skill: id, version, uses, success when used, name."""
    from rich.table import Table

    table = Table("id", "v", "uses", "success", "retired", "name", "source task")
    try:
        records = _library(library).list(include_retired=all)
    except ValueError as e:
        _fail(str(e))
    for r in records:
        rate = r.success_rate
        table.add_row(str(r.id), str(r.version), str(r.uses), "-" if rate is None else f"{rate:.0%}",
                      r.retired_reason or ("yes" if r.retired else ""), r.name, str(r.provenance.get("source_task_id", "")))
    console.print(table)


@skills_app.command("show")
def skills_show(library: str = typer.Argument(..., help=LIB_HELP), skill_id: int = typer.Argument(...)):
    """The card and provenance of one skill."""
    try:
        r = _library(library).get(skill_id)
    except KeyError as e:
        _fail(e.args[0])
    console.print(r.card, highlight=False, markup=False)
    console.print(json.dumps({k: v for k, v in r.to_dict().items() if k not in ("card", "embedding", "json")}, indent=1),
                  highlight=False, markup=False)


SKILL_FORMATS = ("jsonl", "agent-skills")
FormatOpt = typer.Option("jsonl", "--format", help="jsonl: this project's exact records; agent-skills: one "
                         "<name>/SKILL.md folder per promoted skill, the format other agents load.")


def _format(fmt: str) -> str:
    if fmt not in SKILL_FORMATS:
        _fail(f"--format: unknown format {fmt!r}; allowed: {', '.join(SKILL_FORMATS)}")
    return fmt


def _service_evolver(library: str | Path):
    """The deployment service's lifecycle engine on a library it has run on (`serve`, `evolve`),
    so only its promoted skills leave the library and retirements go through its audit log;
    None for a library without one (then every live skill counts as promoted)."""
    from evolving_rl.serve.evolver import SkillEvolver, has_lifecycle

    lib = _library(library)
    has = has_lifecycle(lib)
    lib.close()
    if not has:
        return None
    try:
        return SkillEvolver(_library(library, mode="write"), _config(None, []).evolve)
    except ValueError as e:
        _fail(str(e))


def _lifecycle(evolver) -> dict[int, dict]:
    """{id: {"status", "lift"}} as agent_skills.exportable and the MCP server read it."""
    out = {}
    for s in evolver.skills():
        lo, hi = s["lift"]["ci95"]
        out[s["id"]] = {"status": s["status"], "lift": (
            f"{s['lift']['mean']:+.3f} (95% interval {lo:+.3f} to {hi:+.3f}; success {s['wins']:g}/{s['uses']} "
            f"vs no-skill control {s['ctrl_wins']:g}/{s['ctrl_uses']})")}
    return out


@skills_app.command("export")
def skills_export(library: str = typer.Argument(..., help=LIB_HELP),
                  out: Path = typer.Argument(..., help="JSONL file, or a new folder for --format agent-skills."),
                  fmt: str = FormatOpt):
    if _format(fmt) == "agent-skills":
        from evolving_rl.skills.agent_skills import export_agent_skills

        try:
            evolver = _service_evolver(library)
            res = export_agent_skills(_library(library), out, lifecycle=evolver and _lifecycle(evolver))
        except (ValueError, OSError) as e:
            _fail(str(e))
        for m in res.messages:
            console.print(m)
        console.print(f"{len(res.exported)} skills -> {out} ({len(res.skipped)} skipped)")
        return
    try:
        n = _library(library).export_jsonl(out)
    except ValueError as e:
        _fail(str(e))
    console.print(f"{n} skills -> {out}")


@skills_app.command("import")
def skills_import(library: str = typer.Argument(..., help="Library file (created if missing) or postgresql://..."),
                  src: Path = typer.Argument(..., help="JSONL from `skills export`, or a folder of Agent Skills."),
                  fmt: str = FormatOpt):
    from evolving_rl.skills.library import read_export

    if _format(fmt) == "agent-skills":
        from evolving_rl.skills.agent_skills import import_agent_skills

        try:
            res = import_agent_skills(_open_library(library, "create"), src)
        except (ValueError, OSError) as e:
            _fail(str(e))
        for m in res.messages:
            console.print(m)
        console.print(f"{len(res.restored)} skills restored exactly and {len(res.added)} added into {library}")
        raise typer.Exit(1 if any(m.startswith("skipped") for m in res.messages) else 0)
    try:
        records = read_export(src)  # checked before the library is opened: a bad file creates none
        ids = _open_library(library, "create").import_records(records, str(src))
    except ValueError as e:
        _fail(str(e))
    console.print(f"{len(ids)} skills imported into {library}")


@skills_app.command("mcp")
def skills_mcp(library: str = typer.Argument(..., help="The skill library to serve: a file, or postgresql://..."),
               transport: str = typer.Option("stdio", "--transport", help="stdio (launched by an agent) or http."),
               host: str = typer.Option("127.0.0.1", "--host", help="http: listen address (localhost only by default)."),
               port: int = typer.Option(8765, "--port", min=1, max=65535, help="http: port; the endpoint is /mcp.")):
    """Serve the library's promoted skills over MCP (list, search by task text, read one). Read-only
    unless $EVOLVING_RL_ADMIN_TOKEN is set, which adds an admin `retire_skill` tool needing it."""
    from evolving_rl.skills.mcp_server import serve as serve_mcp

    if transport not in ("stdio", "http"):
        _fail(f"--transport: unknown transport {transport!r}; allowed: stdio, http")
    _library(library).close()  # a missing or foreign library fails here, before the protocol starts
    evolver = _service_evolver(library)
    try:
        serve_mcp(library, transport=transport, host=host, port=port,
                  lifecycle=evolver and (lambda: _lifecycle(evolver)),
                  retire=evolver and (lambda sid, reason: evolver.retire(sid, actor="mcp admin", reason=reason)))
    except (ImportError, ValueError) as e:
        _fail(str(e))


@skills_app.command("retire")
def skills_retire(library: str = typer.Argument(..., help=LIB_HELP), skill_id: int = typer.Argument(...),
                  reason: str = typer.Option(..., "--reason")):
    """Stop retrieving a skill; it stays in the library for audit. On a served library the
    service's lifecycle retires it (its status, a new version and an audit-log row)."""
    evolver = _service_evolver(library)
    try:
        if evolver is not None:
            evolver.retire(skill_id, actor="cli", reason=reason)
        else:
            _library(library, mode="write").retire(skill_id, reason)
    except KeyError as e:
        _fail(e.args[0])
    except ValueError as e:
        _fail(str(e))
    console.print(f"retired {skill_id}")


@app.command()
def quickstart(
    config: Path = typer.Option(Path("configs/quickstart_twc.yaml"), "--config", "-c",
                                help="configs/quickstart_twc.yaml (skill transfer on TextWorld Commonsense) or "
                                     "configs/quickstart.yaml (ALFWorld)"),
    overrides: list[str] = OverridesArg,
):
    """Run Evolving-RL from the shipped warm start, evaluate with and without skills before
    and after, and write the HTML report (ALFWorld: generates its games on the first run)."""
    import time

    from evolving_rl.envs.alfworld_gen import generate_games
    from evolving_rl.report import write_report
    from evolving_rl.train import Trainer

    cfg = _config(config, overrides)
    if not Path(cfg.model.path).is_dir():  # checked before the games are generated: a failed start makes nothing
        _fail(f"model.path: no model at {cfg.model.path}; build it with the recipe in configs/sft_tiny.yaml")
    _model_files(cfg.model.path, "model.path")
    t0 = time.perf_counter()
    games = Path(cfg.env.games_dir)
    if cfg.env.name != "alfworld":  # the other engines generate their games from seeds
        console.print(f"[1/3] {cfg.env.name}: games come from the engine's own generator")
    elif not (games / "manifest.json").exists():
        g = cfg.games
        sizes = {"train": g.train, "train_unseen": g.train_unseen, "eval_seen": g.eval_seen, "eval_unseen": g.eval_unseen}
        console.print(f"[1/3] generating ALFWorld games into {games} (expert-verified on ALFWorld's engine)")
        prog, update = _progress("games")
        try:
            with prog:
                manifest = generate_games(games, g.seed, sizes, max_expert_steps=g.max_expert_steps,
                                          workers=max(1, cfg.env.num_workers), progress=update)
        except ValueError as e:
            _fail(str(e))
        _print_manifest(manifest, games)
    else:
        console.print(f"[1/3] using the games in {games}")
    run_dir = Path(cfg.run_dir)
    n = 2
    while (run_dir / "metrics.jsonl").exists():  # never overwrite an earlier run
        run_dir = Path(f"{cfg.run_dir}-{n}")
        n += 1
    cfg = cfg.model_copy(update={"run_dir": str(run_dir)})
    console.print(f"[2/3] Evolving-RL from {cfg.model.path} -> {run_dir}")
    try:
        trainer = Trainer(cfg, console=console)
    except (ValueError, FileExistsError, FileNotFoundError) as e:
        _fail(str(e))
    try:
        trainer.fit()
    finally:
        trainer.close()
    console.print(f"[3/3] report -> {write_report(run_dir)}")
    console.print(f"quickstart done in {(time.perf_counter() - t0) / 60:.1f} min")


def _bench(name: str, args: list[str] | None) -> None:
    """Benchmarks live in the source checkout's benchmarks/ (they print tables, not tests)."""
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "benchmarks" / f"{name}.py"
    if not path.is_file():
        _fail(f"benchmarks/{name}.py not found: benchmarks ship with the source checkout (pip install -e .)")
    spec = importlib.util.spec_from_file_location(f"benchmarks_{name}", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    raise typer.Exit(mod.main(list(args or [])) or 0)


@bench_app.command("speed", context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def bench_speed(ctx: typer.Context):
    """Where the time goes: stages, tokens/s vs ceilings, env steps/s, N x K scaling."""
    _bench("speed", ctx.args)


@bench_app.command("paper", context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def bench_paper(ctx: typer.Context):
    """The paper's comparison in miniature: GRPO vs Evolving-RL vs ablations, same episode budget."""
    _bench("paper_table", ctx.args)


@config_app.command("show")
def config_show(config: Path = ConfigOpt, overrides: list[str] = OverridesArg):
    """Print the resolved config (every default filled in)."""
    import yaml

    cfg = _config(config, overrides)
    console.print(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False), highlight=False)


if __name__ == "__main__":  # `python -m evolving_rl.cli`; spawned workers re-import this module
    app()
