"""What the server hands a trainer process, and what it hands back (plain picklable dataclasses, no torch)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from alignd.trainer.config import TrainerConfig

__all__ = ["RunJob", "RunResult"]


@dataclass
class RunJob:
    """Everything the trainer process needs to run, picklable (it crosses into a spawned process)."""

    run_id: str
    base_model: str
    """Base model folder (the demo model, or a local / cached Hugging Face model)."""
    database_url: str
    run_dir: str
    """The run's own folder: reward model, staged candidate, rollout adapters."""
    parent: int
    """The promoted version when the run started."""
    parent_adapter: str | None
    """Its adapter folder (None for the base)."""
    config: TrainerConfig = field(default_factory=TrainerConfig)
    previous_reward_model: str | None = None
    """The reward model of the latest run that trained one (its folder): this run's starts from it."""
    kl_coef: float | None = None
    """β where the previous run's KL controller left it (None: the configured initial β)."""
    threads: int = 1
    """torch CPU threads."""


@dataclass
class RunResult:
    """What the run hands back to the server."""

    staged_adapter: str
    passed: bool
    reason: str
    figures: dict[str, Any]
    """Gate figures, for the policy's row."""
    new_pair_ids: list[int]
    new_label_ids: list[int]
