"""The trainer: reward model, PPO with rollouts from the serving engine, and the promotion gate.

Modules: ``config`` (settings), ``losses`` (pure functions), ``models`` (one base, named LoRA adapters),
``reward_model``, ``rollout``, ``ppo``, ``gate``. Importing this package imports neither torch nor vLLM; the
submodules that need torch import it themselves, and vLLM is only ever reached through the engine object a caller
hands to :class:`alignd.trainer.rollout.VLLMRollouts`.
"""

from alignd.trainer.config import (
    AdapterConfig,
    GateConfig,
    PPOConfig,
    RewardConfig,
    RolloutBackendName,
    TrainerConfig,
)

__all__ = ["AdapterConfig", "GateConfig", "PPOConfig", "RewardConfig", "RolloutBackendName", "TrainerConfig"]
