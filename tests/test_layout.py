"""The package's import graph points down: no module reaches, even inside a function, a module
that (transitively) imports it back. Parsed with `ast`, so nothing is imported to check it."""

from __future__ import annotations

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / "evolving_rl"


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PKG.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """Module -> the evolving_rl modules it imports anywhere (top level or in a function)."""
    files = {module_name(p): p for p in PKG.rglob("*.py")}
    graph: dict[str, set[str]] = {m: set() for m in files}
    for mod, path in files.items():
        is_pkg = path.name == "__init__.py"
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            names: list[str] = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:  # relative import
                    anchor = mod.split(".") if is_pkg else mod.split(".")[:-1]
                    anchor = anchor[: len(anchor) - (node.level - 1)]
                    base = ".".join(anchor + ([base] if base else []))
                names = [base] + [f"{base}.{a.name}" for a in node.names]
            for n in names:
                # `from evolving_rl import prompts` names a module; `from x import func` names x
                while n and n not in files:
                    n = n.rpartition(".")[0]
                if n and n != mod and n != "evolving_rl":
                    graph[mod].add(n)
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> list[str] | None:
        state[m] = 1
        stack.append(m)
        for n in sorted(graph[m]):
            if state.get(n) == 1:
                return stack[stack.index(n):] + [n]
            if n not in state and (c := visit(n)):
                return c
        stack.pop()
        state[m] = 2
        return None

    for m in sorted(graph):
        if m not in state and (c := visit(m)):
            return c
    return None


def test_no_import_cycle_in_package():
    graph = import_graph()
    assert len(graph) > 30 and "evolving_rl.train" in graph["evolving_rl.cli"]  # the parser sees function-level imports
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_cycle_finder_finds_a_planted_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_lower_layers_never_import_the_recipes():
    """Training, evaluation, SFT and the CLI are the top: nothing they build on may import them."""
    graph = import_graph()
    recipes = {"evolving_rl.train", "evolving_rl.evaluate", "evolving_rl.sft", "evolving_rl.cli"}
    lower = [m for m in graph if m.startswith("evolving_rl.algorithms") or m in
             {"evolving_rl.common", "evolving_rl.builders", "evolving_rl.extraction", "evolving_rl.rollout",
              "evolving_rl.retrieval", "evolving_rl.prompts", "evolving_rl.types", "evolving_rl.config"}
             or m.startswith(("evolving_rl.envs", "evolving_rl.policy", "evolving_rl.skills"))]
    upward = {m: sorted(graph[m] & recipes) for m in lower if graph[m] & recipes}
    assert not upward, f"upward imports: {upward}"


def test_every_config_knob_is_documented_where_it_is_defined():
    """TRL's rule: each setting says what it does (and the paper's value) at its definition."""
    from pydantic import BaseModel

    from evolving_rl import config

    sections = {f for f, info in config.RunConfig.model_fields.items()
                if isinstance(info.annotation, type) and issubclass(info.annotation, BaseModel)}
    missing = []
    for name, model in vars(config).items():
        if isinstance(model, type) and issubclass(model, config._Strict) and model is not config._Strict:
            if not (model.__doc__ or "").strip():
                missing.append(f"{name} (docstring)")
            for field, info in model.model_fields.items():
                if not info.description and not (model is config.RunConfig and field in sections):
                    missing.append(f"{name}.{field}")
    assert not missing, f"undocumented config knobs: {missing}"
