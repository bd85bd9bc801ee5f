"""The scale-out switches in a config reach the builders (issue 17): `env.pool: ray` builds the
Ray-actor pool, `model.backend: vllm` the vLLM policy, or says how to get vLLM when it is missing."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
import _pool_env  # noqa: E402
from _pool_env import toy_task  # noqa: E402

from evolving_rl.builders import build_policy, build_pool  # noqa: E402
from evolving_rl.config import load_config  # noqa: E402

CHECKPOINT = Path(__file__).parent.parent / "checkpoints" / "tiny-alfworld-sft"


def test_env_pool_ray_builds_the_ray_pool_with_the_configured_actors():
    ray = pytest.importorskip("ray", reason="ray not installed (pip install torch==2.13.0 -e '.[ray]')")
    from evolving_rl.envs.ray_pool import RayEnvPool

    cfg = load_config(None, [f"env.name={_pool_env.__name__}:ToyEnv", "env.pool=ray", "env.num_workers=2",
                             "env.ray_cpus_per_worker=0.5", "env.step_timeout_s=30"])
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        with build_pool(cfg, options={}) as pool:
            assert isinstance(pool, RayEnvPool) and len(pool.worker_pids) == 2
            assert pool.reset([(0, toy_task("a"))])[0].observation == "a: "
            assert pool.step([(0, "win")])[0].won
    finally:
        ray.shutdown()


def test_unknown_pool_and_backend_names_are_refused():
    with pytest.raises(Exception, match="env.pool: given 'slurm'; allowed: 'process' or 'ray'"):
        load_config(None, ["env.pool=slurm"])
    with pytest.raises(Exception, match="model.backend: given 'sglang'; allowed: 'hf', 'vllm' or 'openai'"):
        load_config(None, ["model.backend=sglang"])


@pytest.mark.skipif(importlib.util.find_spec("vllm") is not None, reason="vLLM is installed here")
def test_backend_vllm_without_vllm_says_how_to_get_it():
    cfg = load_config(None, [f"model.path={CHECKPOINT}", "model.backend=vllm"])
    with pytest.raises(ImportError, match="scripts/vllm_venv.sh"):
        build_policy(cfg)
    assert type(build_policy(cfg, generation=False)).__name__ == "HFPolicy"  # a reference never needs vLLM
