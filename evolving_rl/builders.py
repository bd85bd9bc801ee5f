"""One place that turns a config into the run's parts: task suite, policy, reference policy,
env pool and rollout (torchtune's component builders).

Training, evaluation, SFT, demos and the benchmarks all build through here, so a new backend
(a vLLM policy, a Ray env pool) is wired in once.
"""

from __future__ import annotations

from pathlib import Path

from evolving_rl.common import env_options


def build_suite(cfg):
    """The configured engine's task suite (splits and tasks)."""
    from evolving_rl.envs.base import make_suite

    return make_suite(cfg.env.name, env_options(cfg))


def build_policy(cfg, *, path: str | None = None, device=None, generation: bool = True, training: bool = False):
    """The trainable policy from `model` (or from `path`, e.g. a checkpoint's model directory).
    `generation=False`: a policy that only scores (a reference), never a second vLLM engine.
    `training=True` (train, SFT): refuses `model.backend: openai`, whose weights are on a server,
    and a separate `extractor_model`: Evolving-RL trains one policy in both roles."""
    if training and cfg.extractor_model is not None:
        raise ValueError("extractor_model: training co-trains one policy as solver and extractor (the paper); "
                         "set extractor_model: null to train, and use it in eval, serve and evolve")
    model = cfg.model if path is None else cfg.model.model_copy(update={"path": str(path)})
    if model.backend == "openai" and training:
        from evolving_rl.policy.openai_policy import refuse_training

        refuse_training(cfg)
    return _policy(model, "model", device=device, generation=generation)


def build_extractor(cfg, solver):
    """The policy that writes skills: `solver` itself (the paper's one policy in both roles)
    unless `extractor_model` names another model, e.g. a served one beside local solver weights.
    Inference only, so eval, serve and evolve call it; training never does."""
    m = cfg.extractor_model
    if m is None or m == cfg.model:
        return solver
    if not Path(m.path).is_dir():
        raise ValueError(f"extractor_model.path: no directory at {m.path}; name the extractor's model directory "
                         "(backend openai: a local copy of the served model's tokenizer)")
    return _policy(m, "extractor_model", device=None, generation=True)


def extractor_name(cfg) -> str:
    """Who wrote a skill, for its provenance: the extractor's model (skill transfer reads it)."""
    return (cfg.extractor_model or cfg.model).path


def _policy(model, section: str, *, device, generation: bool):
    """One policy from one model section (`section` names it in errors)."""
    from evolving_rl.policy.hf import HFPolicy

    if model.backend == "openai":
        from evolving_rl.policy.openai_policy import OpenAIPolicy

        return OpenAIPolicy(model, section=section)
    cls = HFPolicy
    if model.backend == "vllm" and generation:
        from evolving_rl.policy.vllm_policy import VLLMPolicy

        cls = VLLMPolicy
        if model.base_url:  # a vLLM server on other GPUs; its errors name this section
            from functools import partial

            from evolving_rl.policy.vllm_server import VLLMServerPolicy

            cls = partial(VLLMServerPolicy, section=section)
    return cls(model) if device is None else cls(model, device=device)


def build_reference(cfg, policy, *, resumed: bool, device=None):
    """The frozen KL anchor: the *initial* policy (`model.path`), also after a resume, when
    `policy` holds trained weights and cannot serve as its own reference."""
    if not resumed:
        return policy.reference()
    return build_policy(cfg, device=device, generation=False).reference()


def build_pool(cfg, *, options: dict | None = None):
    """The env pool the rollout plays through (`env.num_workers` engine processes)."""
    from evolving_rl.envs.workers import EnvPool

    if cfg.env.pool == "ray":
        from evolving_rl.envs.ray_pool import RayEnvPool

        return RayEnvPool(cfg.env.name, options if options is not None else env_options(cfg), max(1, cfg.env.num_workers),
                          cfg.env.step_timeout_s, cpus_per_worker=cfg.env.ray_cpus_per_worker)
    return EnvPool(cfg.env.name, options if options is not None else env_options(cfg), cfg.env.num_workers,
                   cfg.env.step_timeout_s)


def build_rollout(cfg, policy, pool, *, label_expert: bool = False):
    """The rollout engine with the run's prompt settings and episode budget."""
    from evolving_rl.rollout import Rollout

    return Rollout(policy, pool, cfg.rollout, cfg.env.max_steps, label_expert=label_expert)
