"""What a training algorithm's step is given and what it must provide.

A step receives its parts (config, policy, rollout, task cursor, training pool, run
directory), never the trainer, so it can be built and tested on its own and a new variant
does not depend on how the trainer is put together.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from evolving_rl.types import Sample, Task


@dataclass
class StepParts:
    cfg: Any  # RunConfig
    policy: Any  # Policy
    rollout: Any  # Rollout
    cursor: Any  # TaskCursor
    train_tasks: list[Task]
    run_dir: Path


class AlgorithmStep(Protocol):
    name: str

    @classmethod
    def roles(cls, cfg) -> dict:
        """role -> RoleConfig: the sample roles this algorithm trains (advantage weight, KL, entropy)."""
        ...

    @classmethod
    def check(cls, cfg, train_tasks: list[Task]) -> None:
        """Raise ValueError naming the setting when the config cannot work on this pool (start-up)."""
        ...

    @classmethod
    def setup(cls, parts: StepParts) -> AlgorithmStep: ...

    def collect(self, step: int) -> tuple[list[Sample], dict]:
        """Play one step's episodes: the samples to train on and the step's namespaced metrics."""
        ...

    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...
