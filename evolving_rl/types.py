"""The four small types the whole algorithm speaks: Task, Episode, Skill (in skills/), Sample.

If a module needs to know more than these about another module, the seam is in the
wrong place (DESIGN.md).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, Literal

Role = Literal["solver", "extractor"]


@dataclass(frozen=True)
class Task:
    """One playable task. Plain data so it can cross process boundaries and be hashed.

    `locator` is engine-specific (a game file for ALFWorld, a seed for TextWorld-Express);
    nothing outside the engine's adapter interprets it.
    """

    id: str
    split: str
    task_type: str
    description: str
    locator: str
    env: str = "alfworld"
    meta: tuple[tuple[str, Any], ...] = ()

    def to_dict(self) -> dict:
        return {
            "id": self.id,
            "split": self.split,
            "task_type": self.task_type,
            "description": self.description,
            "locator": self.locator,
            "env": self.env,
            "meta": dict(self.meta),
        }

    def as_experience(self) -> Task:
        """The task as an experience episode plays it (an Evolving-RL source, the one-shot pool's
        episode): without the evaluated step budget (meta `budget`, which engines such as twc
        set), to the rollout's max_steps. A skill is distilled from the agent's unhurried past
        play, where exploring is what reveals the facts; the test task is then held to its
        budget. Training's sources play as evaluation's experience does, so the extractor is
        rewarded for the trajectories it will be given."""
        meta = tuple((k, v) for k, v in self.meta if k != "budget")
        return self if meta == self.meta else replace(self, meta=meta)

    @classmethod
    def from_dict(cls, d: dict) -> Task:
        meta = d.get("meta") or {}
        return cls(
            id=d["id"],
            split=d["split"],
            task_type=d["task_type"],
            description=d["description"],
            locator=d["locator"],
            env=d.get("env", "alfworld"),
            meta=tuple(sorted(meta.items())),
        )


@dataclass
class StepResult:
    """What an environment returns from reset() and step().

    `admissible` is None when the engine cannot enumerate valid actions.
    `won` is the engine's own success flag; `score` its (possibly partial) score in [0, 1].
    """

    observation: str
    admissible: list[str] | None
    done: bool = False
    won: bool = False
    score: float = 0.0
    info: dict[str, Any] = field(default_factory=dict)


@dataclass
class Segment:
    """One trained sequence: prompt tokens followed by model-generated tokens.

    `logprobs[i]` is the sampling log-prob of `token_ids[i]` where `loss_mask[i]` is 1 and
    0.0 elsewhere. The ids are the *sampled* ids, never a re-tokenisation of the text,
    so the trained tokens are exactly the generated ones (SPEC, Update).
    In the paper's multi-turn format an episode is one segment whose observations are
    masked out; in the per-step format each turn is its own segment.
    """

    token_ids: list[int]
    logprobs: list[float]
    loss_mask: list[int]
    # Constrained decoding: the only completions that were allowed (token sequences after the
    # prompt). Scoring re-applies the same trie mask so sampling and training agree.
    allowed: list[list[int]] | None = None

    def __post_init__(self) -> None:
        if not (len(self.token_ids) == len(self.logprobs) == len(self.loss_mask)):
            raise ValueError(
                f"Segment lengths differ: ids={len(self.token_ids)} "
                f"logprobs={len(self.logprobs)} mask={len(self.loss_mask)}"
            )

    @property
    def num_generated(self) -> int:
        return int(sum(self.loss_mask))


@dataclass
class Turn:
    """One agent step as text, for transcripts, reports and extractor prompts."""

    observation: str  # what the agent saw before acting (turn 0: the initial observation)
    admissible: list[str] | None
    completion: str  # the model's raw text for this turn
    action: str  # the action actually sent to the environment
    valid: bool  # whether the action was admissible (True when unknown)
    expert: str | None = None  # DAgger: what the env's expert would have done here


@dataclass
class Episode:
    task: Task
    role: Role = "solver"
    skill_card: str | None = None  # the card in the solver's system prompt, if any
    turns: list[Turn] = field(default_factory=list)
    segments: list[Segment] = field(default_factory=list)
    won: bool = False
    score: float = 0.0
    steps: int = 0
    failed: bool = False  # the engine failed twice; excluded from training and scoring
    error: str | None = None
    final_observation: str = ""  # what the engine said after the last action
    info: dict[str, Any] = field(default_factory=dict)  # the engine's last info (e.g. Mind2Web metrics)
    timing: dict[str, float] = field(default_factory=dict)

    def transcript(self) -> str:
        """The trajectory as the extractor reads it (observations and actions only)."""
        lines = []
        for i, t in enumerate(self.turns, 1):
            lines.append(t.observation.strip())
            lines.append(f"[step {i}] > {t.action}")
        lines.append(self.final_observation.strip())
        return "\n".join(x for x in lines if x)


@dataclass
class Sample:
    """One unit of the GRPO loss: a segment with its role, group and advantage."""

    segment: Segment
    role: Role
    group: str
    reward: float
    advantage: float = 0.0
    # Which episode the segment came from: in the per-step format an episode yields one
    # sample per turn, and group statistics must still count each episode once.
    episode: str | None = None
