"""The benchmark scripts: the paper table runs end to end at the smoke budget on real parts
(generated ALFWorld games on ALFWorld's engine, a tiny Llama, MiniLM retrieval) and yields a
table of measured cells under an equal episode budget; the speed benchmark's arithmetic."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))

import paper_table  # noqa: E402
from speed import fit_linear, grpo_matching, parse_sweep  # noqa: E402


def test_fit_linear_recovers_overhead_and_slope():
    xs = [12, 20, 20, 36]
    ys = [3.0 + 0.5 * x for x in xs]
    f = fit_linear(xs, ys)
    assert f["a"] == pytest.approx(3.0) and f["b"] == pytest.approx(0.5) and f["r2"] == pytest.approx(1.0)
    assert f["fixed_share_at_mean"] == pytest.approx(3.0 / (3.0 + 0.5 * 22))
    noisy = fit_linear([1, 2, 3, 4], [1.0, 3.0, 2.0, 4.0])
    assert 0 < noisy["r2"] < 1
    with pytest.raises(ValueError, match="distinct"):
        fit_linear([5, 5], [1.0, 2.0])


def test_grpo_matching_plays_the_same_episodes_as_an_evolving_step():
    assert grpo_matching(16 * (1 + 8 * 4), 8)[:2] == (8, 66)  # the paper's B, N, K
    assert grpo_matching(4 * (1 + 4 * 2), 4)[:2] == (4, 9)
    g, p, why = grpo_matching(2 * (1 + 3 * 1), 3)  # 8 episodes: group 3 does not divide, 2 does
    assert (g, p) == (2, 4) and "does not divide" in why
    with pytest.raises(ValueError, match="divides"):
        grpo_matching(7, 4)
    assert parse_sweep("2x1,4X2") == [(2, 1), (4, 2)]
    with pytest.raises(SystemExit, match="NxK"):
        parse_sweep("4by2")


def test_pooled_cells_add_seeds_and_gain_is_relative():
    seeds = [{"eval_seen/no_skill": {"wins": 1, "n": 4, "success": 0.25}},
             {"eval_seen/no_skill": {"wins": 3, "n": 4, "success": 0.75}}]
    cells = paper_table.pooled(seeds, paper_table.columns(paper_table.PROTOCOLS))
    c = cells["eval_seen/no_skill"]
    assert (c["wins"], c["n"], c["success"], c["per_seed"]) == (4, 8, 0.5, [0.25, 0.75])
    assert c["ci95"][0] < 0.5 < c["ci95"][1]
    assert cells["eval_unseen/one_shot"]["success"] is None  # never measured: not a number
    assert paper_table.relative_gain(0.886, 0.446) == pytest.approx(0.9865, abs=1e-3)
    assert paper_table.relative_gain(0.5, 0.0) is None


def test_methods_subset_keeps_the_two_the_gain_needs(capsys):
    assert paper_table.main(["--budget", "smoke", "--dry-run", "--methods", "solver only"]) == 0
    out = capsys.readouterr().out
    assert "GRPO: algorithm=grpo" in out and "Evolving-RL: algorithm=evolving" in out and "solver only:" in out
    assert "extractor only:" not in out
    with pytest.raises(SystemExit, match="--methods: unknown"):
        paper_table.main(["--budget", "smoke", "--dry-run", "--methods", "GRPO,PPO"])


def test_every_budgets_starting_checkpoint_is_in_the_repository():
    """A budget that names its start (twc: the stage-3 warm start) must find it in a fresh clone:
    a renamed or unshipped checkpoint would otherwise fail only after the first method's games."""
    root = Path(__file__).resolve().parent.parent
    named = {b: o.split("=", 1)[1] for b, spec in paper_table.BUDGETS.items() for o in spec["overrides"]
             if o.startswith("model.path=")}
    assert "twc" in named
    for budget, path in named.items():
        assert (root / path / "config.json").is_file() and (root / path / "model.safetensors").is_file(), budget


@pytest.mark.slow
def test_paper_table_smoke(games_dir, tiny_model, make_config, tmp_path):
    from evolving_rl.config import save_config

    base = tmp_path / "base.yaml"
    save_config(make_config(games_dir, tiny_model, tmp_path / "unused"), base)
    results = tmp_path / "results"
    rc = paper_table.main(["--budget", "smoke", "--config", str(base), "--out", str(tmp_path / "runs"),
                           "--results", str(results), "--no-start-row", f"retrieval.cache_dir={tmp_path / 'emb'}"])
    assert rc == 0
    report = json.loads((results / "paper_table_smoke.json").read_text())
    assert list(report["rows"]) == ["GRPO", "Evolving-RL", "solver only", "extractor only"]
    assert report["columns"] == ["eval_seen/no_skill", "eval_seen/one_shot", "eval_unseen/no_skill", "eval_unseen/one_shot"]
    for name, row in report["rows"].items():
        assert set(row["cells"]) == set(report["columns"]), name
        for col, cell in row["cells"].items():
            assert isinstance(cell["success"], float) and 0.0 <= cell["success"] <= 1.0, (name, col, cell)
            assert cell["n"] > 0 and 0 <= cell["wins"] <= cell["n"], (name, col, cell)
            lo, hi = cell["ci95"]
            assert 0.0 <= lo <= cell["success"] <= hi <= 1.0, (name, col, cell)
        assert row["wall_s"] > 0 and row["train_s"] > 0
    # Equal budget: one step of B*(1+N*K) = 2*(1+2*2) episodes for every method.
    assert {row["episodes"] for row in report["rows"].values()} == {10}
    # The table's cells are the runs' own final evaluations, not numbers made up on the way.
    final = json.loads((tmp_path / "runs" / "seed0" / "grpo" / "eval" / "final.json").read_text())
    got = {f"{r['split']}/{r['protocol']}": (r["wins"], r["n"]) for r in final["results"]}
    assert {k: (c["wins"], c["n"]) for k, c in report["rows"]["GRPO"]["cells"].items()} == got
    md = (results / "paper_table_smoke.md").read_text()
    assert "| method | seen, no skill | seen, with skill | unseen, no skill | unseen, with skill |" in md
    assert all(f"| {name} |" in md for name in report["rows"]) and "Relative gain of Evolving-RL over GRPO" in md
    png = results / "paper_table_smoke_curves.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and "(paper_table_smoke_curves.png)" in md
