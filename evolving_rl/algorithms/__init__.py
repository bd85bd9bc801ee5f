"""Training algorithms, found by name (the config's `algorithm:`).

A variant is one new file in this package whose step class is decorated with
`@register("name")`; `available()` finds the names by parsing the package's files (no
import, so validating a config stays cheap) and `lookup(name)` imports the one file.
"""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

_REGISTRY: dict[str, type] = {}


def register(name: str):
    """Class decorator: make a step class selectable as `algorithm: <name>`."""

    def deco(cls: type) -> type:
        _REGISTRY[name] = cls
        cls.name = name
        return cls

    return deco


def _declared() -> dict[str, str]:
    """name -> module for every `@register("name")` in this package's files."""
    out: dict[str, str] = {}
    for path in sorted(Path(__file__).parent.glob("*.py")):
        tree = ast.parse(path.read_text(), str(path))
        for node in tree.body:
            if not isinstance(node, ast.ClassDef):
                continue
            for d in node.decorator_list:
                if (isinstance(d, ast.Call) and getattr(d.func, "id", None) == "register" and d.args
                        and isinstance(d.args[0], ast.Constant) and isinstance(d.args[0].value, str)):
                    out[d.args[0].value] = f"{__name__}.{path.stem}"
    return out


def available() -> list[str]:
    return sorted(_declared())


def lookup(name: str) -> type:
    module = _declared().get(name)
    if module is None:
        raise ValueError(f"algorithm: unknown {name!r}; available: {', '.join(available())}")
    importlib.import_module(module)
    return _REGISTRY[name]
