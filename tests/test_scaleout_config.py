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


def test_the_8gpu_config_and_its_accelerate_launch_config_fit_together():
    """The shipped multi-GPU launch files are ones accelerate itself reads (unknown keys are its
    error), and the 8-GPU run config is the paper's step, fully fine-tuned, in equal blocks."""
    from accelerate.commands.config.config_args import ClusterConfig

    root = Path(__file__).parent.parent / "configs"
    launch = {p.name: ClusterConfig.from_yaml_file(str(p)) for p in sorted((root / "accelerate").glob("*.yaml"))}
    assert launch, "no accelerate config shipped"
    for name, c in launch.items():
        # the trainer refuses FSDP / DeepSpeed; compute dtype is the run config's model.autocast
        assert c.distributed_type.value in ("MULTI_GPU", "MULTI_CPU"), name
        assert c.mixed_precision == "no", name
    procs = launch["multi_gpu_8.yaml"].num_processes
    cfg = load_config(root / "evolving_qwen2.5-7b_8gpu.yaml")
    ev = cfg.evolving
    assert (ev.sources_per_step, ev.num_skills, ev.num_downstream) == (16, 8, 4)
    assert procs == 8 and ev.sources_per_step % procs == 0
    assert not cfg.model.lora.enabled and (cfg.model.dtype, cfg.model.autocast) == ("float32", "bfloat16")
    per_process = ev.sources_per_step // procs * (1 + ev.num_skills * ev.num_downstream)
    assert cfg.rollout.batch_size >= per_process - ev.sources_per_step // procs  # a process's downstream episodes at once
