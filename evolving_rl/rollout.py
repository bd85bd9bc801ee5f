"""The rollout engine: many episodes at once, one batched policy call per turn.

Every live episode (different tasks, different skills, different prompts) contributes its
prompt to a single `policy.generate` call per turn; env steps for all of them go to the
worker pool in one call, which fans out to the engine processes. Finished episodes free
their slot for the next queued job, so the batch stays full.

What is trained is exactly what was sampled from. A prompt longer than the cap
(`rollout.max_prompt_tokens`, and the model's context less the reply) is never cut from the
left, which would drop the system prompt and skill card first and train the reply on a
context it was not sampled from. Instead a multi-turn episode drops its oldest turns, keeping
the system prompt, skill card, task and first observation (the "head"): the sequence so far
is closed as one segment, and the episode continues in a new one that starts from the head
and the turns kept (as context: their replies were trained in the closed segment). A
per-step prompt shows fewer past steps. When even that cannot fit, the episode ends there,
as at max_steps, and `stats["context_full"]` counts it.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from evolving_rl import prompts
from evolving_rl.config import RolloutConfig, SamplingConfig
from evolving_rl.envs.pool import Pool, answers_per_slot
from evolving_rl.policy.base import Generation, Policy, row_seeds
from evolving_rl.types import Episode, Segment, StepResult, Task, Turn


@dataclass
class Job:
    """One episode to play: a task, and the skill card to put in the solver's prompt (or None)."""

    task: Task
    skill_card: str | None = None
    tag: dict = field(default_factory=dict)  # caller's bookkeeping (source id, skill index, ...)


@dataclass
class _Live:
    job: Job
    slot: int
    episode: Episode
    last: StepResult
    ids: list[int] = field(default_factory=list)  # multi_turn: the growing sequence (current segment)
    logprobs: list[float] = field(default_factory=list)
    mask: list[int] = field(default_factory=list)
    head: int = 0  # multi_turn: ids[:head] is the first prompt (system, card, task, first observation)
    turn_starts: list[int] = field(default_factory=list)  # multi_turn: where each reply starts in ids
    closed: list[Segment] = field(default_factory=list)  # multi_turn: segments closed by dropping turns
    context_full: bool = False
    started: float = 0.0


class Rollout:
    """Plays jobs with a policy through an EnvPool. Holds no state between `run` calls."""

    def __init__(self, policy: Policy, pool: Pool, cfg: RolloutConfig, max_steps: int, *, label_expert: bool = False):
        self.policy = policy
        self.label_expert = label_expert  # DAgger: record the expert's action for every state visited
        self.pool = pool
        self.cfg = cfg
        self.max_steps = max_steps
        self._action_ids = prompts.action_encoder(policy)
        self.stats: dict[str, float] = {
            "policy_s": 0.0, "env_s": 0.0, "generated_tokens": 0, "prompt_tokens": 0, "context_full": 0,
            "dropped_turns": 0,
        }
        context = policy.max_context_tokens
        if cfg.max_prompt_tokens > context:
            raise ValueError(
                f"rollout.max_prompt_tokens={cfg.max_prompt_tokens} is above the model's context "
                f"(max_position_embeddings={context}); set rollout.max_prompt_tokens to at most {context}"
            )
        if cfg.constrain_to_admissible and cfg.prompt_format == "multi_turn":
            raise ValueError(
                "rollout.constrain_to_admissible: true works only with rollout.prompt_format: per_step "
                "(a multi_turn segment holds many constrained replies; scoring re-masks one)"
            )
        self._cap = cfg.max_prompt_tokens  # set per run from the reply length (see `run`)

    # -- prompts --------------------------------------------------------------------------

    def _prompt(self, live: _Live) -> list[int] | None:
        """The ids to sample this turn from (all within the cap), or None when the context is full."""
        ep, last = live.episode, live.last
        if self.cfg.prompt_format == "per_step":
            for history in range(self.cfg.history, -1, -1):  # fewer past steps until it fits
                msgs = prompts.per_step_messages(
                    ep.task.description,
                    ep.turns,
                    last.observation,
                    last.admissible,
                    skill_card=live.job.skill_card,
                    env=ep.task.env,
                    history=history,
                    use_state_line=self.cfg.state_line,
                    reasoning=self.cfg.reasoning,
                    step=len(ep.turns) + 1,
                    max_steps=self.max_steps,
                    list_admissible=self.cfg.list_admissible,
                )
                ids = self.policy.encode_chat(msgs)
                if len(ids) <= self._cap:
                    return ids
            return None
        if not live.ids:
            msgs = prompts.multi_turn_first_messages(
                ep.task.description, last.observation, last.admissible,
                skill_card=live.job.skill_card, reasoning=self.cfg.reasoning, env=ep.task.env,
            )
            live.ids = self.policy.encode_chat(msgs)
            live.logprobs = [0.0] * len(live.ids)
            live.mask = [0] * len(live.ids)
            live.head = len(live.ids)
        if len(live.ids) > self._cap and not self._drop_oldest_turns(live):
            return None
        return live.ids

    def _drop_oldest_turns(self, lv: _Live) -> bool:
        """multi_turn: close the sequence so far as a segment and continue from the head plus the
        most recent turns that fit under the cap; False when not even the last turn fits."""
        keep_from = next(
            (k for k, start in enumerate(lv.turn_starts) if lv.head + len(lv.ids) - start <= self._cap), None
        )
        if keep_from is None or keep_from == 0:  # keep_from 0 would mean it already fitted
            return False
        if any(lv.mask):
            lv.closed.append(_sampled_part(lv))
        start = lv.turn_starts[keep_from]
        tail = lv.ids[start:]
        lv.ids = lv.ids[: lv.head] + tail
        # Context only: the kept replies were trained, with their own context, in the closed segment.
        lv.logprobs = [0.0] * len(lv.ids)
        lv.mask = [0] * len(lv.ids)
        lv.turn_starts = [lv.head + t - start for t in lv.turn_starts[keep_from:]]
        self.stats["dropped_turns"] += keep_from
        return True

    def _allowed(self, live: _Live) -> list[list[int]] | None:
        adm = live.last.admissible
        if not self.cfg.constrain_to_admissible or not adm:
            return None
        return [self._action_ids(a) for a in adm]

    def _env_turn_ids(self, live: _Live, step: int) -> list[int]:
        """multi_turn: the tokens that close the assistant turn and open the next user turn."""
        return self.policy.encode_next_turn(
            [prompts.multi_turn_env_message(step, live.last.observation, live.last.admissible)]
        )

    # -- the loop -------------------------------------------------------------------------

    def run(self, jobs: list[Job], sampling: SamplingConfig, seed: int | list[int] | None = None,
            progress=None) -> list[Episode]:
        """Play every job to the end; returns episodes in the order of `jobs`.

        Each episode samples from its own stream (`seed` as `policy.base.row_seeds` reads it: an
        int, or one seed per job), seeded again at each of its turns, so an episode does not
        depend on which other episodes share the run: a process that plays a shard of a step's
        jobs, with their seeds, plays exactly the episodes one process plays."""
        episode_seeds = None if seed is None else row_seeds(seed, len(jobs))
        results: list[Episode | None] = [None] * len(jobs)
        queue = list(range(len(jobs)))
        live: dict[int, _Live] = {}  # job index -> live episode
        free_slots = list(range(min(self.cfg.batch_size, len(jobs))))[::-1]
        # prompt + reply must fit the model's context
        self._cap = min(self.cfg.max_prompt_tokens, self.policy.max_context_tokens - sampling.max_new_tokens)
        if self._cap < 1:
            raise ValueError(
                f"max_new_tokens={sampling.max_new_tokens} leaves no room for a prompt in the model's context "
                f"({self.policy.max_context_tokens} tokens); lower rollout.solver.max_new_tokens"
            )
        while queue or live:
            self._start(jobs, queue, live, free_slots, results)
            if not live:
                continue
            t0 = time.perf_counter()
            built = {j: self._prompt(live[j]) for j in list(live)}
            for j, ids in built.items():
                if ids is None:  # the context is full: the episode ends here, as at max_steps
                    lv = live.pop(j)
                    lv.context_full = True
                    self.stats["context_full"] += 1
                    self._finish(lv, results, j, free_slots)
            order = list(live)
            if not order:
                continue
            prompt_ids = [built[j] for j in order]
            allowed = [self._allowed(live[j]) for j in order]
            gens = self.policy.generate(
                prompt_ids,
                temperature=sampling.temperature,
                top_p=sampling.top_p,
                max_new_tokens=sampling.max_new_tokens,
                stop=[prompts.ACTION_STOP],
                allowed=allowed if any(a is not None for a in allowed) else None,
                seed=None if episode_seeds is None else [episode_seeds[j] * 100_003 + len(live[j].episode.turns)
                                                         for j in order],
            )
            self.stats["policy_s"] += time.perf_counter() - t0
            actions = {}
            for j, p, a, g in zip(order, prompt_ids, allowed, gens):
                actions[j] = self._record_generation(live[j], p, a, g)
            if self.label_expert:
                labels = self.pool.expert_action([live[j].slot for j in order])
                for j in order:
                    live[j].episode.turns[-1].expert = labels.get(live[j].slot)
            t0 = time.perf_counter()
            replies = self._call(self.pool.step, [(live[j].slot, actions[j]) for j in order])
            self.stats["env_s"] += time.perf_counter() - t0
            for j in order:
                self._record_reply(live[j], replies[live[j].slot])
                ep = live[j].episode
                if ep.failed or live[j].last.done or len(ep.turns) >= self.max_steps:
                    self._finish(live.pop(j), results, j, free_slots)
            if progress:
                progress(sum(r is not None for r in results), len(jobs))
        return [r for r in results if r is not None]

    def _start(self, jobs, queue, live, free_slots, results) -> None:
        starting = []
        while queue and free_slots:
            j = queue.pop(0)
            starting.append((j, free_slots.pop()))
        if not starting:
            return
        t0 = time.perf_counter()
        firsts = self._call(self.pool.reset, [(slot, jobs[j].task) for j, slot in starting])
        self.stats["env_s"] += time.perf_counter() - t0
        for j, slot in starting:
            first = firsts[slot]
            ep = Episode(task=jobs[j].task, skill_card=jobs[j].skill_card)
            lv = _Live(job=jobs[j], slot=slot, episode=ep, last=first, started=time.perf_counter())
            if first.info.get("error"):
                ep.failed, ep.error = True, str(first.info["error"])
                self._finish(lv, results, j, free_slots)
                continue
            live[j] = lv

    @staticmethod
    def _call(fn, requests: list) -> dict[int, StepResult]:
        """A task the engine cannot play (corrupt game) fails its episode, not the whole batch."""
        return answers_per_slot(fn, requests)

    def _record_generation(self, lv: _Live, prompt_ids: list[int], allowed, g: Generation) -> str:
        action, well_formed = prompts.parse_action(g.text)
        adm = lv.last.admissible
        valid = adm is None or action in adm
        lv.episode.turns.append(Turn(lv.last.observation, adm, g.text, action, valid))
        self.stats["generated_tokens"] += len(g.token_ids)
        self.stats["prompt_tokens"] += len(prompt_ids)
        if self.cfg.prompt_format == "per_step":
            lv.episode.segments.append(
                Segment(
                    token_ids=list(prompt_ids) + g.token_ids,
                    logprobs=[0.0] * len(prompt_ids) + g.logprobs,
                    loss_mask=[0] * len(prompt_ids) + [1] * len(g.token_ids),
                    allowed=allowed,
                )
            )
        else:
            lv.turn_starts.append(len(lv.ids))
            lv.ids += g.token_ids
            lv.logprobs += g.logprobs
            lv.mask += [1] * len(g.token_ids)
        return action

    def _record_reply(self, lv: _Live, reply: StepResult) -> None:
        ep = lv.episode
        ep.steps = len(ep.turns)
        if reply.info.get("error"):
            ep.failed, ep.error = True, str(reply.info["error"])
            return
        lv.last = reply
        ep.won = ep.won or reply.won
        ep.score = max(ep.score, reply.score)
        if self.cfg.prompt_format == "multi_turn" and not reply.done and ep.steps < self.max_steps:
            env_ids = self._env_turn_ids(lv, ep.steps + 1)
            lv.ids += env_ids
            lv.logprobs += [0.0] * len(env_ids)
            lv.mask += [0] * len(env_ids)

    def _finish(self, lv: _Live, results, j: int, free_slots: list[int]) -> None:
        ep = lv.episode
        ep.final_observation = lv.last.observation
        ep.info = dict(lv.last.info)
        if lv.context_full:
            ep.info["context_full"] = True
        if self.cfg.prompt_format == "multi_turn" and lv.ids:
            ep.segments = [*lv.closed, *([_sampled_part(lv)] if any(lv.mask) else [])]
        ep.timing["wall_s"] = time.perf_counter() - lv.started
        self.pool.release([lv.slot])
        free_slots.append(lv.slot)
        results[j] = ep


def _sampled_part(lv: _Live) -> Segment:
    """multi_turn: the sequence up to its last reply; the env turn after it was never sampled from."""
    end = len(lv.mask) - lv.mask[::-1].index(1)
    return Segment(lv.ids[:end], lv.logprobs[:end], lv.mask[:end])
