"""Trainer settings: one dataclass per stage, gathered in :class:`TrainerConfig`.

One source of truth: a field that operators set (the ``[trainer]`` section of :class:`alignd.config.Settings`, with
its flag and ``ALIGND_*`` variable) takes its default from that section, so the server, the benchmarks and the tests
build the same defaults; :func:`trainer_config` copies a server's settings and a run's overrides in. The other fields
are the algorithm's own constants. Defaults suit the demo model on a two-core machine. Importing this module imports
neither torch nor vLLM.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from alignd.config import TrainerSettings
from alignd.protocol import Objective, TrainingRunRequest

__all__ = [
    "AdapterConfig",
    "AttentionName",
    "CriticFreeConfig",
    "DTypeName",
    "DataConfig",
    "DeviceName",
    "GateConfig",
    "KTOConfig",
    "OnlineDPOConfig",
    "PPOConfig",
    "RewardConfig",
    "RolloutBackendName",
    "TrainerConfig",
    "check_trainer_settings",
    "scale_batches_to_model",
    "scale_to_model",
    "trainer_config",
]

RolloutBackendName = Literal["vllm", "hf"]
"""Who generates rollouts: the serving vLLM engine, or Hugging Face ``generate`` in the trainer (benchmark only)."""

DeviceName = str
"""Where the trainer runs: ``auto`` (CUDA when present), ``cpu``, ``cuda`` or ``cuda:N`` (one card of several)."""

DTypeName = Literal["auto", "bfloat16", "float32"]
"""Base-model dtype; ``auto`` is bfloat16 on a CUDA device that supports it, float32 otherwise."""

AttentionName = Literal["auto", "eager", "sdpa"]
"""The trainer's attention kernel; ``auto`` is ``eager`` on the CPU and ``sdpa`` elsewhere."""

_SETTINGS = TrainerSettings()
"""The operator-facing defaults, which the fields below that mirror a setting take as theirs."""


@dataclass
class AdapterConfig:
    """Shape of every LoRA adapter the trainer creates (policy, critic, reward model)."""

    r: int = _SETTINGS.lora_rank
    """LoRA rank; must not exceed the engine's ``max_lora_rank`` for policies to be servable."""
    alpha: int = _SETTINGS.lora_alpha
    """LoRA scaling numerator: updates are scaled by ``alpha / r``."""
    dropout: float = 0.0
    """LoRA dropout. Keep 0 for PPO: log-probs recomputed during the update must match the rollout's."""
    target_modules: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    """Linear layers that receive adapters (Llama-style names; vLLM supports all of them)."""


@dataclass
class RewardConfig:
    """Reward-model fitting: Bradley–Terry on pairs, binary cross-entropy on unpaired labels."""

    learning_rate: float = 2e-3
    """AdamW learning rate for the reward adapter and its scalar head, for models up to SmolLM2-135M's size; a run
    scales it down for larger ones (:func:`scale_to_model`)."""
    epochs: int = 2
    """Passes over the training pairs and labels."""
    batch_size: int = 16
    """Sequences scored per optimizer step (a ranking's pairs always share one batch, so it may run over)."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    max_grad_norm: float = 1.0
    """Gradient-norm clip."""
    label_coef: float = 1.0
    """Weight of the binary cross-entropy term for unpaired good/bad labels."""
    heldout_fraction: float = 0.1
    """Share of comparison groups held out for the reported pairwise accuracy (when no held-out set is given)."""
    max_prompt_tokens: int = 256
    """Prompts are cut to their last this many tokens."""
    max_reply_tokens: int = 256
    """Replies are cut to their first this many tokens (and then count as truncated: no end-of-turn token)."""
    normalization_samples: int = 64
    """Reference-policy replies scored to fit the reward's mean and standard deviation."""
    confidence: float = _SETTINGS.reward_model_confidence
    """Confidence of the interval on held-out accuracy that must lie above chance before PPO runs (0: no check)."""


@dataclass
class PPOConfig:
    """PPO on the policy adapter; critic = its own adapter plus a value head, initialised from the reward model."""

    iterations: int = _SETTINGS.ppo_iterations
    """Rollout-then-update iterations."""
    rollout_batch_size: int = _SETTINGS.rollout_batch_size
    """Prompts (one reply each) per iteration."""
    max_prompt_tokens: int = 256
    """Prompts are cut to their last this many tokens (prompt + reply must fit the engine's ``max_model_len``)."""
    max_new_tokens: int = _SETTINGS.max_new_tokens
    """Upper bound of the rollouts' reply length (a run uses the 95th percentile of served lengths within it); a
    reply cut there is scored as truncated, with no penalty."""
    temperature: float = 1.0
    """Sampling temperature; log-probs are recomputed with the same temperature (logits / T)."""
    epochs: int = 2
    """Passes over each iteration's experience."""
    minibatch_size: int = 8
    """Sequences per gradient step."""
    forward_batch_size: int = 16
    """Sequences per no-grad forward pass when building experience (bounds memory, not results)."""
    learning_rate: float = 3e-4
    """AdamW learning rate for the policy adapter, up to SmolLM2-135M's size (scaled like the reward model's)."""
    critic_learning_rate: float = 1e-3
    """AdamW learning rate for the critic adapter and value head (scaled like the others)."""
    clip_eps: float = 0.2
    """Policy ratio clip ε."""
    value_clip: float = 0.2
    """Value predictions may move at most this far from the rollout's values per update (clipped value loss)."""
    vf_coef: float = 0.5
    """Weight of the value loss in the summed loss (it shares the gradient-norm clip with the policy loss)."""
    gamma: float = 1.0
    """Discount."""
    lam: float = 0.95
    """GAE λ. Tried at 1 (so a reward at the end of a long reply reaches its first tokens without the critic): the
    short PPO test on the demo model then gained +0.16 instead of +0.84, and the SmolLM2 run with it moved the trait
    by +4.7 points, within noise (docs/benchmarks.md); 0.95 stays."""
    init_kl_coef: float = 0.2
    """Initial β of the per-token KL penalty ``-β (log π - log π_ref)`` (a run continues from where the previous
    run's controller left β; this is the first run's)."""
    target_kl: float | None = _SETTINGS.target_kl
    """Sequence KL (nats) the adaptive controller steers towards; None keeps β fixed."""
    kl_gain: float = 0.6
    """How hard the adaptive controller reacts: KL at twice the target multiplies β by 2^gain per iteration."""
    max_grad_norm: float = 1.0
    """Gradient-norm clip of the policy (the critic's gradients, on another scale, are clipped on their own)."""
    critic_max_grad_norm: float = 1.0
    """Gradient-norm clip of the critic."""
    micro_batch_size: int | None = None
    """Sequences per forward and backward pass; a minibatch's gradients are accumulated over its micro-batches
    before one optimizer step (bounds memory, not results). None: the whole minibatch at once."""
    time_limit_s: float | None = _SETTINGS.ppo_time_limit_s
    """Stop after the iteration that crosses this wall time; None runs every iteration."""
    rollout_backend: RolloutBackendName = "vllm"
    """Rollout generator. ``hf`` exists for the benchmark that shows what generating in vLLM buys."""


@dataclass
class CriticFreeConfig:
    """GRPO and RLOO (:mod:`alignd.trainer.critic_free`): no critic; each prompt is answered ``samples_per_prompt``
    times and each reply's advantage is its score against its group's. Everything else they share with PPO and read
    from :class:`PPOConfig`: learning rate, epochs, minibatches, clip ε, temperature, lengths, the KL target and the
    time limit; ``rollout_batch_size`` counts replies, so an iteration costs what a PPO iteration does."""

    samples_per_prompt: int = _SETTINGS.samples_per_prompt
    """k, replies per prompt (at least 2: the group is the baseline); an iteration answers ``rollout_batch_size / k``
    prompts (at least one)."""
    init_kl_coef: float = 0.05
    """Initial β of the KL term (GRPO: the k3 estimate of KL(π || π_ref) per token in the loss; RLOO: the summed
    per-token log-ratio subtracted from each reply's score); steered towards ``PPOConfig.target_kl`` like PPO's β,
    but not carried over between runs (its scale differs from PPO's)."""
    std_eps: float = 1e-4
    """GRPO: added to a group's standard deviation before dividing, so a group whose replies scored alike gets
    advantages of 0, not noise blown up."""


@dataclass
class OnlineDPOConfig:
    """Online DPO (:mod:`alignd.trainer.online_dpo`): each iteration the policy answers each of
    ``rollout_batch_size / samples_per_prompt`` prompts ``samples_per_prompt`` times, the reward model's best and
    worst reply make a pair, and a minibatch of the users' own pairs joins them; DPO's loss against the base. Epochs,
    minibatches, learning rate, temperature, lengths and the time limit come from :class:`PPOConfig`."""

    beta: float = 0.1
    """DPO's β: the strength of the implicit KL to the base (larger keeps the policy closer; the implicit reward is
    ``β · (log π − log π_ref)`` summed over a reply)."""
    samples_per_prompt: int = _SETTINGS.samples_per_prompt
    """k, replies sampled per prompt (at least 2): the reward model's best and worst of them are the pair."""
    user_pairs: int = 8
    """Users' pairs added to each iteration's sampled pairs, drawn in proportion to their weight (0: none)."""
    min_score_gap: float = 0.05
    """A prompt's best and worst replies whose normalised scores differ by less are no pair: the reward model does
    not tell them apart, and DPO would push on noise."""


@dataclass
class KTOConfig:
    """KTO (:mod:`alignd.trainer.kto`): the users' thumbs and clear ratings as desirable or undesirable replies,
    judged against a reference point, no pairs needed. Epochs, minibatches, learning rate and the time limit come
    from :class:`PPOConfig`; an iteration also samples ``kl_samples`` replies to measure KL and reward."""

    beta: float = 0.1
    """KTO's β: the scale of the implicit reward ``β · (log π − log π_ref)`` inside the sigmoid."""
    labels_per_iteration: int = 32
    """Labelled replies each iteration trains on, drawn in proportion to their weight."""
    desirable_weight: float | None = None
    """λ_D; None: balanced against λ_U so that ``λ_D · n_D = λ_U · n_U`` over the run's labels (the paper's advice:
    that ratio within [1, 4/3])."""
    undesirable_weight: float | None = None
    """λ_U; None: balanced as above (the larger class's weight is the one below 1)."""
    kl_samples: int = 16
    """Replies the current policy samples each iteration to report KL to the base and reward (and stop at the KL
    budget) as PPO does; KTO itself does not train on them."""


@dataclass
class GateConfig:
    """Promotion gate: the candidate must beat the current policy significantly, by the judge, and stay close to the
    base (see :mod:`alignd.trainer.gate`)."""

    margin: float = _SETTINGS.gate_margin
    """The lower confidence bound of the paired gain in mean normalised judge score must be above this."""
    kl_budget: float = _SETTINGS.kl_budget
    """Largest allowed mean sequence KL (nats) of the candidate to the base model."""
    confidence: float = _SETTINGS.gate_confidence
    """Confidence of the one-sided lower bound on the paired gain (a candidate no better than the current policy
    passes at most ``1 - confidence`` of the time)."""
    n_prompts: int = 64
    """Most distinct held-out prompts both policies answer (fewer when fewer are held out): the test's sample size."""
    min_prompts: int = 16
    """With fewer held-out prompts than this, PPO's own prompts top the gate's up to it (the decision says how many
    were held out): below about five, no bound at 95% exists at all."""
    samples_per_prompt: int = _SETTINGS.gate_samples_per_prompt
    """Replies each policy samples per prompt, with the same seeds for both: more average out sampling noise within
    a prompt (the test's unit stays the prompt)."""
    max_new_tokens: int = _SETTINGS.max_new_tokens
    """Reply length limit while evaluating."""
    temperature: float = 1.0
    """Sampling temperature while evaluating (KL is measured at this temperature)."""


@dataclass
class DataConfig:
    """What one run trains on: the accumulated feedback, newest weighing most, a held-out split, and prompts."""

    max_pairs: int = 4096
    """Most preference pairs one run takes: every new one (up to this), then the most recent older ones."""
    max_labels: int = 4096
    """Most unpaired labels one run takes, chosen the same way."""
    recency_half_life: int = 1024
    """Signal this many rows older than the newest weighs half as much (recency weighting of accumulated
    feedback: users' taste may drift, but a run never forgets what it learned from a small new batch)."""
    judge_fraction: float = _SETTINGS.judge_fraction
    """Share of prompts, chosen by a stable salted hash, whose feedback trains the gate's judge instead of PPO's
    reward model (cross-fitting, :mod:`alignd.trainer.judge`); 0 makes PPO's reward model the judge."""
    heldout_fraction: float = 0.1
    """Share of completions, chosen by a stable hash of their id, whose feedback never trains: the reward model's
    held-out accuracy is measured on their pairs, and no reply is on both sides. Prompts are split the same way:
    held-out ones are the gate's."""
    max_prompts: int = 512
    """Most distinct recent user prompts drawn for PPO and the gate."""
    served_lengths: int = 512
    """Recent served replies whose token counts set the rollout length cap (their 95th percentile)."""
    max_user_share: float = _SETTINGS.max_user_share
    """Most of a run's training weight (pairs, and labels on their own) one user may hold; larger contributors'
    weights are scaled down to it (:mod:`alignd.trainer.safeguards`)."""
    flag_p_value: float = _SETTINGS.user_flag_p_value
    """A user whose judgements agree with the reward model fitted without them less often than a coin would with
    this probability or less is flagged and left out of the run (0: no agreement check)."""
    agreement_folds: int = 2
    """Folds of users for the agreement check: each fold's users are judged by a reward model fitted on the other
    folds' (each fold one extra reward-model fit on (k-1)/k of the data)."""


@dataclass
class TrainerConfig:
    """Everything one training run needs to know, besides its data."""

    lora: AdapterConfig = field(default_factory=AdapterConfig)
    """Adapter shape for every role."""
    reward: RewardConfig = field(default_factory=RewardConfig)
    """Reward-model fitting."""
    objective: Objective = _SETTINGS.objective  # type: ignore[assignment]
    """How the policy is optimised: ``ppo``, critic-free ``grpo`` / ``rloo``, ``online-dpo`` or ``kto``."""
    ppo: PPOConfig = field(default_factory=PPOConfig)
    """Policy optimisation (PPO's, and the settings every objective shares)."""
    critic_free: CriticFreeConfig = field(default_factory=CriticFreeConfig)
    """GRPO's and RLOO's own settings."""
    online_dpo: OnlineDPOConfig = field(default_factory=OnlineDPOConfig)
    """Online DPO's own settings."""
    kto: KTOConfig = field(default_factory=KTOConfig)
    """KTO's own settings."""
    gate: GateConfig = field(default_factory=GateConfig)
    """Promotion gate."""
    data: DataConfig = field(default_factory=DataConfig)
    """Training data selection."""
    device: DeviceName = _SETTINGS.trainer_device  # type: ignore[assignment]
    """Where to train."""
    dtype: DTypeName = _SETTINGS.trainer_dtype  # type: ignore[assignment]
    """Base-model dtype (adapters and heads always train in float32)."""
    attention: AttentionName = "auto"
    """Attention kernel of the trainer's passes. On the CPU ``auto`` picks ``eager`` (plain matmuls and a float32
    softmax): with SmolLM2-135M, 8 replies and 111 positions its forward and backward pass is about 20% faster than
    PyTorch's fused CPU kernel (``sdpa``), whose backward alone took a quarter of the pass. Eager keeps a
    (heads, L, L) score tensor per layer for the backward pass, which grows with the square of the length: for very
    long prompts and replies on a CPU, ``sdpa`` uses less memory."""
    gradient_checkpointing: bool = _SETTINGS.trainer_gradient_checkpointing
    """Recompute activations in the backward pass instead of keeping them: less memory (larger models or batches on
    one GPU) for about a third more time."""
    seed: int = _SETTINGS.trainer_seed
    """Seed for adapter initialisation, data order, prompt sampling and trainer-side generation."""
    processes: int = _SETTINGS.trainer_processes
    """Processes the run runs as (data parallel, :mod:`alignd.trainer.distributed`); 1: one process."""
    distributed: str = _SETTINGS.trainer_distributed
    """How several processes share the model: ``ddp`` (each holds the whole base, each takes a share of the rows) or
    ``fsdp`` (the base sharded over them, every one takes every row: :mod:`alignd.trainer.distributed`)."""


REFERENCE_PARAMETERS = 135_000_000
"""The largest size the default learning rates hold at: the demo model (3.8M) and SmolLM2-135M-Instruct. Measured on
SmolLM2 with the rates scaled down to ×0.42: the policy's updates stayed at an approximate KL of 0.001 per token
(clip fraction 0.2%) and the reward model's training loss at 0.68 (chance is 0.69): both too timid to learn."""


def scale_to_model(config: TrainerConfig, parameters: int) -> float:
    """Scale the learning rates to a model of ``parameters`` base parameters; returns the factor. LoRA updates of a
    larger model move more of it per step: above 135M the rates fall with the fourth root of the size (×0.61 at 1B,
    ×0.37 at 7B), never above the defaults."""
    factor = min(1.0, (REFERENCE_PARAMETERS / max(parameters, 1)) ** 0.25)
    config.reward.learning_rate *= factor
    config.ppo.learning_rate *= factor
    config.ppo.critic_learning_rate *= factor
    return factor


PASS_PARAMETER_SEQUENCES = 2_000_000_000
"""Base parameters × sequences one training pass (forward and backward) may hold: activation memory grows with both.
The demo model and SmolLM2-135M train a whole minibatch (8) at once; a 1B model passes 2 sequences at a time and a
7B model one, accumulating gradients up to the same minibatch."""


def scale_batches_to_model(config: TrainerConfig, parameters: int) -> dict[str, int]:
    """Fit the sequences per pass to a model of ``parameters`` base parameters: the PPO update's micro-batches (when
    not set) hold ``PASS_PARAMETER_SEQUENCES / parameters`` sequences, and no-grad experience passes three times as
    many (they keep no activations for a backward pass), never more than the defaults. Results do not change, only
    memory and time: gradients are accumulated up to the same minibatch. Returns the sizes used."""
    per_pass = max(1, PASS_PARAMETER_SEQUENCES // max(parameters, 1))
    ppo = config.ppo
    if ppo.micro_batch_size is None:
        ppo.micro_batch_size = min(ppo.minibatch_size, per_pass)
    ppo.forward_batch_size = max(1, min(ppo.forward_batch_size, 3 * per_pass))
    return {"micro_batch_size": ppo.micro_batch_size, "forward_batch_size": ppo.forward_batch_size}


def check_trainer_settings(settings: TrainerSettings) -> None:
    """Refuse trainer settings no run could use, before anything starts (a ConfigError: one line, exit status 2).
    Nothing is refused at present (``--trainer-distributed fsdp`` was until it was built); alignd serve, alignd trainer
    and the app's assembly keep calling it, the one place for such a check."""


def trainer_config(settings: TrainerSettings, request: TrainingRunRequest | None = None) -> TrainerConfig:
    """The run's config: the server's ``[trainer]`` settings, then the run request's overrides."""
    request = request or TrainingRunRequest()
    config = TrainerConfig(
        lora=AdapterConfig(r=settings.lora_rank, alpha=settings.lora_alpha),
        device=settings.trainer_device,  # type: ignore[arg-type]
        dtype=settings.trainer_dtype,  # type: ignore[arg-type]
        gradient_checkpointing=settings.trainer_gradient_checkpointing,
        seed=settings.trainer_seed,
        processes=settings.trainer_processes,
        distributed=settings.trainer_distributed,
    )
    config.objective = request.objective or settings.objective  # type: ignore[assignment]
    config.critic_free.samples_per_prompt = settings.samples_per_prompt
    config.online_dpo.samples_per_prompt = settings.samples_per_prompt
    ppo = config.ppo
    ppo.iterations = request.iterations or settings.ppo_iterations
    ppo.rollout_batch_size = request.rollout_batch_size or settings.rollout_batch_size
    ppo.time_limit_s = request.time_limit_s or settings.ppo_time_limit_s
    ppo.max_new_tokens = settings.max_new_tokens
    ppo.target_kl = settings.target_kl
    config.gate.margin, config.gate.kl_budget = settings.gate_margin, settings.kl_budget
    config.gate.confidence, config.gate.samples_per_prompt = settings.gate_confidence, settings.gate_samples_per_prompt
    config.data.judge_fraction = settings.judge_fraction
    config.reward.confidence = settings.reward_model_confidence
    config.data.max_user_share, config.data.flag_p_value = settings.max_user_share, settings.user_flag_p_value
    config.gate.max_new_tokens = settings.max_new_tokens
    return config
