"""The rollout engine and the GRPO updater use a policy only through the `Policy` protocol, so
another backend (vLLM generation, a served model) plugs in without touching either (issue 15).
Read from the source with `ast`, so a new reach into HFPolicy's internals fails here."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from evolving_rl.policy.base import Policy

ROOT = Path(__file__).resolve().parent.parent / "evolving_rl"
POLICY_NAMES = {"policy", "reference_policy"}  # as a local, a parameter or a `self.` attribute


def _protocol_members() -> set[str]:
    tree = ast.parse((ROOT / "policy" / "base.py").read_text())
    (cls,) = [n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "Policy"]
    names = {n.name for n in cls.body if isinstance(n, ast.FunctionDef)}
    names |= {n.target.id for n in cls.body if isinstance(n, ast.AnnAssign) and isinstance(n.target, ast.Name)}
    return names


def _policy_attributes(path: Path) -> set[str]:
    used = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if not isinstance(node, ast.Attribute):
            continue
        base = node.value
        if isinstance(base, ast.Name) and base.id in POLICY_NAMES:
            used.add(node.attr)
        elif (isinstance(base, ast.Attribute) and base.attr in POLICY_NAMES
              and isinstance(base.value, ast.Name) and base.value.id == "self"):
            used.add(node.attr)
    return used


def test_protocol_lists_what_the_backends_must_provide():
    members = _protocol_members()
    assert {"generate", "score", "encode_chat", "encode_next_turn", "encode_text", "decode", "parameters",
            "reference", "save", "max_context_tokens", "eos_token_id", "pad_token_id"} <= members
    assert Policy.__annotations__.keys() >= {"max_context_tokens", "eos_token_id", "pad_token_id"}


@pytest.mark.parametrize("module", ["rollout.py", "algorithms/grpo.py"])
def test_rollout_and_updater_use_only_the_protocol(module):
    used = _policy_attributes(ROOT / module)
    assert used, "the scan found no policy use: it is not looking at the right names"
    outside = used - _protocol_members()
    assert not outside, f"{module} uses {sorted(outside)} beyond the Policy protocol (policy/base.py)"
