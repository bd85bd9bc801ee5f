"""Options shared by every engine are parsed in one place (envs.base), so every engine
rejects a bad value with the same clear message when it is built."""

from __future__ import annotations

import importlib.util

import pytest

from evolving_rl.envs.base import make_env, max_steps_option


def test_max_steps_option_accepts_integers_and_names_bad_values():
    assert max_steps_option({}, "twx", 50) == 50
    assert max_steps_option({"max_steps": 7}, "twx", 50) == 7
    assert max_steps_option({"max_steps": " 12 "}, "twx", 50) == 12  # from a command line
    for bad in (0, -3, "0"):
        with pytest.raises(ValueError, match=r"twx option max_steps must be >= 1"):
            max_steps_option({"max_steps": bad}, "twx", 50)
    for bad in (2.5, "fifty", None, True):
        with pytest.raises(ValueError, match=r"scienceworld option max_steps must be an integer >= 1, got"):
            max_steps_option({"max_steps": bad}, "scienceworld", 100)


ENGINES = {"alfworld": "alfworld", "twx": "textworld_express", "scienceworld": "scienceworld",
           "textworld": "textworld", "mind2web": "json"}


@pytest.mark.parametrize("env", sorted(ENGINES))
def test_every_engine_uses_it(env, tmp_path):
    if importlib.util.find_spec(ENGINES[env]) is None:
        pytest.skip(f"{ENGINES[env]} not installed")
    with pytest.raises(ValueError, match=f"{env} option max_steps must be >= 1, got 0"):
        make_env(env, {"max_steps": 0, "cache_dir": str(tmp_path)})
    with pytest.raises(ValueError, match=f"{env} option max_steps must be an integer"):
        make_env(env, {"max_steps": "many", "cache_dir": str(tmp_path)})
