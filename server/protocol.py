"""Every wire type of the HTTP API, as msgspec Structs. Importable without torch or vLLM (the SDK uses it too).

Request structs validate what a schema can say (types, ranges) and own their translation to engine parameters
(``to_sampling()``); limits that depend on the running server (``n`` cap, context left) are checked by the service.
"""

from __future__ import annotations

import time
from datetime import datetime
from typing import Annotated, Any, Literal

import msgspec
from msgspec import Meta

Role = Literal["system", "developer", "user", "assistant"]


class ContentPart(msgspec.Struct, kw_only=True, forbid_unknown_fields=False):
    """One part of a message's content; only text parts are supported by a text model."""

    type: Literal["text"]
    text: str


class ChatMessage(msgspec.Struct, kw_only=True, omit_defaults=True):
    """A message of the conversation, as OpenAI's chat API sends it."""

    role: Role
    content: str | list[ContentPart] | None = None
    name: str | None = None

    def text(self) -> str:
        """The message's content as plain text."""
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class StreamOptions(msgspec.Struct, kw_only=True):
    include_usage: bool = False


Temperature = Annotated[float, Meta(ge=0.0, le=2.0)]
TopP = Annotated[float, Meta(gt=0.0, le=1.0)]
Penalty = Annotated[float, Meta(ge=-2.0, le=2.0)]
PositiveInt = Annotated[int, Meta(ge=1)]
# A policy version as the store keeps it (a 32-bit INTEGER column): a larger one is refused, not sent to the database.
PolicyVersion = Annotated[int, Meta(ge=0, le=2**31 - 1)]


class SamplingOptions(msgspec.Struct, kw_only=True, frozen=True):
    """Engine-neutral sampling parameters; the engine wrapper turns them into its own type."""

    n: int = 1
    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    min_tokens: int = 0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    stop: list[str] = []
    stop_token_ids: list[int] = []
    seed: int | None = None
    ignore_eos: bool = False


StopString = Annotated[str, Meta(min_length=1)]  # an empty stop string would end every choice at once: vLLM refuses it


class ChatCompletionRequest(msgspec.Struct, kw_only=True):
    """``POST /v1/chat/completions``: OpenAI's fields plus vLLM's common extra sampling fields."""

    model: str
    messages: Annotated[list[ChatMessage], Meta(min_length=1)]
    n: PositiveInt = 1
    temperature: Temperature | None = None
    top_p: TopP | None = None
    max_tokens: PositiveInt | None = None
    max_completion_tokens: PositiveInt | None = None
    stop: StopString | list[StopString] | None = None
    seed: int | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: Annotated[str, Meta(max_length=256)] | None = None
    metadata: dict[str, str] | None = None
    presence_penalty: Penalty | None = None
    frequency_penalty: Penalty | None = None
    # vLLM's extra sampling fields
    top_k: Annotated[int, Meta(ge=-1)] | None = None
    min_p: Annotated[float, Meta(ge=0.0, le=1.0)] | None = None
    repetition_penalty: Annotated[float, Meta(gt=0.0, le=2.0)] | None = None
    min_tokens: Annotated[int, Meta(ge=0)] | None = None
    ignore_eos: bool = False
    stop_token_ids: list[Annotated[int, Meta(ge=0)]] | None = None
    # Accepted so that they can be refused by name instead of silently ignored.
    logprobs: bool | None = None
    top_logprobs: int | None = None
    tools: list[dict[str, Any]] | None = None
    response_format: dict[str, Any] | None = None

    def unsupported_field(self) -> str | None:
        """The first field set that alignd does not implement, if any."""
        if self.logprobs or self.top_logprobs:
            return "logprobs" if self.logprobs else "top_logprobs"
        if self.tools:
            return "tools"
        if self.response_format and self.response_format.get("type") not in (None, "text"):
            return "response_format"
        return None

    @property
    def requested_max_tokens(self) -> int | None:
        """``max_completion_tokens`` (the newer name) or ``max_tokens``."""
        return self.max_completion_tokens or self.max_tokens

    def to_sampling(self, max_tokens: int) -> SamplingOptions:
        """Engine parameters, with ``max_tokens`` already resolved against the context left."""
        stop = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        return SamplingOptions(
            n=self.n,
            max_tokens=max_tokens,
            temperature=1.0 if self.temperature is None else self.temperature,
            top_p=1.0 if self.top_p is None else self.top_p,
            top_k=0 if self.top_k in (None, -1) else self.top_k,
            min_p=self.min_p or 0.0,
            min_tokens=self.min_tokens or 0,
            presence_penalty=self.presence_penalty or 0.0,
            frequency_penalty=self.frequency_penalty or 0.0,
            repetition_penalty=1.0 if self.repetition_penalty is None else self.repetition_penalty,
            stop=stop,
            stop_token_ids=list(self.stop_token_ids or []),
            seed=self.seed,
            ignore_eos=self.ignore_eos,
        )

    def params_record(self) -> dict[str, Any]:
        """The sampling fields the client set, as stored with the completion."""
        fields = ("n", "temperature", "top_p", "max_tokens", "max_completion_tokens", "stop", "seed", "stream",
                  "presence_penalty", "frequency_penalty", "top_k", "min_p", "repetition_penalty", "min_tokens",
                  "ignore_eos", "stop_token_ids")
        return {f: getattr(self, f) for f in fields if getattr(self, f) not in (None, False)}


class AssistantMessage(msgspec.Struct, kw_only=True):
    role: Literal["assistant"] = "assistant"
    content: str = ""


class Choice(msgspec.Struct, kw_only=True):
    index: int
    message: AssistantMessage
    finish_reason: str | None
    logprobs: None = None


class Usage(msgspec.Struct, kw_only=True):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class ChatCompletion(msgspec.Struct, kw_only=True):
    """The non-streaming response; ``system_fingerprint`` names the policy version that wrote it."""

    id: str
    choices: list[Choice]
    created: int
    model: str
    system_fingerprint: str
    usage: Usage
    object: Literal["chat.completion"] = "chat.completion"


class Delta(msgspec.Struct, kw_only=True, omit_defaults=True):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChunkChoice(msgspec.Struct, kw_only=True):
    index: int
    delta: Delta
    finish_reason: str | None = None
    logprobs: None = None


class ChatCompletionChunk(msgspec.Struct, kw_only=True):
    """One server-sent event of a streaming response."""

    id: str
    choices: list[ChunkChoice]
    created: int
    model: str
    system_fingerprint: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    usage: Usage | None = None


class ModelCard(msgspec.Struct, kw_only=True):
    id: str
    created: int = msgspec.field(default_factory=lambda: int(time.time()))
    owned_by: str = "alignd"
    object: Literal["model"] = "model"


class ModelList(msgspec.Struct, kw_only=True):
    data: list[ModelCard]
    object: Literal["list"] = "list"


class ErrorDetail(msgspec.Struct, kw_only=True):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(msgspec.Struct, kw_only=True):
    """OpenAI's error shape: ``{"error": {"message", "type", "param", "code"}}``."""

    error: ErrorDetail


class Health(msgspec.Struct, kw_only=True, omit_defaults=True):
    status: str
    policy_version: int | None = None
    detail: str | None = None


def fingerprint(policy_version: int) -> str:
    """The ``system_fingerprint`` that names a policy version."""
    return f"policy-{policy_version}"


# --- feedback ----------------------------------------------------------------------------------------------------

ChoiceIndex = Annotated[int, Meta(ge=0)]

#: Fields every feedback body may carry whatever its kind; a kind's payload may not reuse these names.
FEEDBACK_COMMON_FIELDS = frozenset({"completion_id", "kind", "comment", "tags", "user", "idempotency_key"})


class FeedbackRequest(msgspec.Struct, kw_only=True):
    """``POST /v1/feedback``: the fields every kind shares. The kind's own fields (``choice``, ``value``,
    ``ranking``, …) sit beside them in the same JSON object and are decoded into the kind's payload Struct."""

    completion_id: Annotated[str, Meta(min_length=1, max_length=256)]
    kind: Annotated[str, Meta(min_length=1, max_length=64)]
    comment: Annotated[str, Meta(max_length=10_000)] | None = None
    tags: Annotated[list[Annotated[str, Meta(min_length=1, max_length=64)]], Meta(max_length=32)] = []
    user: Annotated[str, Meta(max_length=256)] | None = None
    idempotency_key: Annotated[str, Meta(min_length=1, max_length=256)] | None = None


class ThumbsFeedback(msgspec.Struct, kw_only=True):
    """Kind ``thumbs``: up or down on one choice."""

    value: Literal["up", "down"]
    choice: ChoiceIndex = 0


class RankingFeedback(msgspec.Struct, kw_only=True):
    """Kind ``ranking``: choice indices, best first; a prefix of the full order is a partial ranking."""

    ranking: Annotated[list[ChoiceIndex], Meta(min_length=1, max_length=128)]


class PairwiseFeedback(msgspec.Struct, kw_only=True):
    """Kind ``pairwise``: which of two choices is better (a choice index), or ``tie`` / ``both_bad``."""

    winner: ChoiceIndex | Literal["tie", "both_bad"]
    choices: Annotated[list[ChoiceIndex], Meta(min_length=2, max_length=2)] = msgspec.field(
        default_factory=lambda: [0, 1])


class RatingFeedback(msgspec.Struct, kw_only=True):
    """Kind ``rating``: a 1–10 score of one choice."""

    score: Annotated[int, Meta(ge=1, le=10)]
    choice: ChoiceIndex = 0


class EditFeedback(msgspec.Struct, kw_only=True):
    """Kind ``edit``: the user's corrected reply for one choice."""

    text: Annotated[str, Meta(min_length=1, max_length=100_000)]
    choice: ChoiceIndex = 0


class FeedbackCreated(msgspec.Struct, kw_only=True):
    """``201`` answer to ``POST /v1/feedback``: the stored event and how much training signal it produced."""

    id: str
    completion_id: str
    kind: str
    created: str
    pairs: int
    labels: int
    object: Literal["feedback"] = "feedback"


class FeedbackEvent(msgspec.Struct, kw_only=True):
    """A stored feedback event: an item of ``GET /v1/feedback``, a line of the ``events`` export, and what the
    built-in sinks write. ``prompt`` and ``choices`` (the choices' texts) make it self-contained."""

    id: str
    created: str
    completion_id: str
    kind: str
    choice: int | None
    policy_version: int
    payload: dict[str, Any]
    user: str | None
    comment: str | None
    tags: list[str]
    pairs: int
    labels: int
    prompt: list[dict[str, Any]]
    choices: list[str]
    principal: str | None = None
    """The principal whose key sent it (None: sent without a key, on an open server)."""
    object: Literal["feedback"] = "feedback"


class FeedbackList(msgspec.Struct, kw_only=True):
    """``GET /v1/feedback``: oldest first; pass ``last_id`` as ``after`` for the next page."""

    data: list[FeedbackEvent]
    has_more: bool
    first_id: str | None
    last_id: str | None
    object: Literal["list"] = "list"


class FeedbackQuery(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """Query parameters of ``GET /v1/feedback``."""

    completion_id: str | None = None
    kind: str | None = None
    user: str | None = None
    since: datetime | None = None
    after: str | None = None
    limit: Annotated[int, Meta(ge=1, le=1000)] = 100


class ExportQuery(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """Query parameters of ``GET /v1/feedback/export``."""

    format: Literal["preferences", "events", "kto"] = "preferences"
    since: datetime | None = None
    policy: PolicyVersion | None = None


class PreferenceLine(msgspec.Struct, kw_only=True):
    """A line of the ``preferences`` export: TRL's conversational preference format (explicit prompt) with a margin,
    a weight and provenance. TRL's RewardTrainer and DPOTrainer read ``prompt``, ``chosen``, ``rejected``
    (and the reward trainer ``margin``)."""

    prompt: list[dict[str, Any]]
    chosen: list[dict[str, Any]]
    rejected: list[dict[str, Any]]
    margin: float
    weight: float
    completion_id: str
    feedback_id: str
    kind: str
    policy_version: int
    chosen_choice: int | None
    rejected_choice: int | None
    created: str


class KTOLine(msgspec.Struct, kw_only=True):
    """A line of the ``kto`` export: TRL's conversational unpaired preference format, with provenance."""

    prompt: list[dict[str, Any]]
    completion: list[dict[str, Any]]
    label: bool
    weight: float
    completion_id: str
    feedback_id: str
    kind: str
    policy_version: int
    choice: int | None
    created: str


# --- policies and training runs (operators) ----------------------------------------------------------------------

PolicyStatus = Literal["candidate", "canary", "promoted", "rejected", "retired"]
"""Version 0 is the frozen base model (promoted until a trained version is). ``candidate``: passed the gate and
awaits promotion. ``canary``: answers a share of users while it is tested live against the promoted policy (at
most one). ``promoted``: the one ``alignd`` serves (exactly one). ``rejected``: failed the gate or the live test
(kept with its figures and reason; may still be promoted by hand). ``retired``: was promoted before."""


class Policy(msgspec.Struct, kw_only=True):
    """A policy version: item of ``GET /v1/policies``, answer of promote and rollback."""

    version: int
    status: PolicyStatus
    parent: int | None
    """The version the run started from."""
    run_id: str | None
    """The training run that produced it (None for the base)."""
    created: str
    promoted_at: str | None
    """When it was last promoted."""
    loaded: bool
    """Whether the engine holds it now (pinnable as ``alignd@<version>``)."""
    metrics: dict[str, Any]
    """Gate figures: ``reward``, ``kl`` and the current policy's ones it was compared with."""
    reason: str | None
    """Why the gate rejected it, or why it was promoted by hand."""
    loaded_on: list[str] | None = None
    """Instance ids of the live replicas that have it loaded (see ``PolicyList.replicas``)."""
    object: Literal["policy"] = "policy"


class Replica(msgspec.Struct, kw_only=True):
    """A live replica (a serving process on the database), as its last heartbeat reported it."""

    instance_id: str
    """host-pid-random, per process."""
    host: str
    pid: int
    role: str
    ready: bool
    """Whether it answers ``/ready`` with 200 (false while starting, or as a laggard of a promotion)."""
    loaded: list[int]
    """Versions it has loaded (0, the base, always)."""
    serving: int | None
    """The version its served name routes to."""
    error: str | None
    """Why its last load of the promoted version failed, if it did."""
    started_at: str
    last_seen: str
    this: bool = False
    """Whether it is the replica that answered this request."""


class Promotion(msgspec.Struct, kw_only=True):
    """The served name's two-phase promotion: ``desired`` (what was promoted) becomes ``served`` (what the served name
    means) once every live, ready replica has loaded it, or after ``--promotion-timeout-s`` without the laggards."""

    desired: int
    served: int
    pending: bool
    """``desired`` is not served yet."""
    desired_at: str | None
    served_at: str | None
    """When the last flip happened."""
    deadline: str | None
    """While pending: when it flips without the replicas still loading it."""
    loaded_on: list[str]
    """Live replicas that have ``desired`` loaded."""
    waiting_for: list[str]
    """While pending: live, ready replicas that have not loaded ``desired`` yet."""
    laggards: dict[str, str]
    """Replicas the last flip went ahead without, and why (they are not ready until they load it)."""
    flipped_by: str | None
    reason: str | None


class PolicyList(msgspec.Struct, kw_only=True):
    """``GET /v1/policies``: newest first, with the promotion's state and the live replicas."""

    data: list[Policy]
    promoted: int
    """The version this replica serves as the served name."""
    promotion: Promotion | None = None
    replicas: list[Replica] = msgspec.field(default_factory=list)
    object: Literal["list"] = "list"


CanaryShare = Annotated[float, Meta(gt=0, lt=1, description="Share of the served name's users, in (0, 1).")]


class CanaryRequest(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """Body of ``POST /v1/policies/{version}/canary`` (optional): put a candidate on canary, or change the running
    canary's share."""

    share: CanaryShare | None = None
    """Default: ``--canary-share``."""
    side_by_side: bool | None = None
    """Requests for several choices (the web chat's Compare mode, ``n`` > 1) get half their choices from the canary
    and half from the promoted version, in random order; the user's pick is the canary's win or loss. Default:
    ``--canary-side-by-side``."""


class PolicyEvaluation(msgspec.Struct, kw_only=True):
    """``GET /v1/policies/{version}/evaluation``: the offline gate's figures and the live test's, with their
    intervals."""

    version: int
    status: PolicyStatus
    offline: dict[str, Any] | None
    """The gate's decision: paired gain by the judge with its one-sided bounds, confidence, prompts and samples per
    prompt, the judge, PPO's reward-model gain, the implicit-reward check, KL (None for the base)."""
    live: dict[str, Any] | None
    """The live test (canary): share, both versions' good, win and error rates with their always-valid bounds,
    the verdict so far or the decision, and the figures over time (None if it was never on canary)."""
    object: Literal["policy.evaluation"] = "policy.evaluation"


class RollbackRequest(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """Body of ``POST /v1/policies/rollback`` (optional): without ``version``, the previously promoted one."""

    version: PolicyVersion | None = None


RunStatus = Literal["queued", "running", "succeeded", "failed", "cancelled"]
"""``queued``: requested on a serving replica (``--trainer off``), waiting for the ``alignd trainer`` process."""
Objective = Literal["ppo", "grpo", "rloo", "online-dpo", "kto"]
"""How a run optimises the policy (``alignd.trainer.run.OPTIMIZERS``): ``ppo`` (critic and GAE), ``grpo`` or
``rloo`` (critic-free: several replies per prompt, each judged against its group), ``online-dpo`` (DPO on the
policy's own replies ranked by the reward model, plus users' pairs) or ``kto`` (users' good/bad labels, no pairs)."""
RunPhase = Literal["starting", "data", "reward_model", "normalize", "ppo", "gate", "register", "done"]


class TrainingRunRequest(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """Body of ``POST /v1/training/runs`` (optional): per-run overrides of the configured budget."""

    iterations: Annotated[int, Meta(ge=1, le=10_000)] | None = None
    """PPO iterations."""
    rollout_batch_size: Annotated[int, Meta(ge=1, le=4096)] | None = None
    """Prompts per PPO iteration."""
    time_limit_s: Annotated[float, Meta(gt=0)] | None = None
    """Wall-time budget of the PPO phase."""
    promote: bool = True
    """Promote the candidate when it passes the gate (False: keep it as a candidate)."""
    objective: Objective | None = None
    """The training objective of this run (default: the server's ``--objective``)."""


class TrainingRun(msgspec.Struct, kw_only=True):
    """A training run: answer of ``POST /v1/training/runs`` and ``GET /v1/training/runs/{id}``.

    ``metrics`` holds ``data`` (counts), ``reward_model`` (held-out accuracy, loss), ``ppo`` (one dict per
    iteration: reward, kl, entropy, approx_kl, clip_fraction, explained_variance, tokens_per_s, …), ``gate`` and
    ``seconds`` (per phase)."""

    id: str
    status: RunStatus
    phase: RunPhase
    progress: float
    """0 to 1 over the whole run."""
    trigger: Literal["manual", "auto"]
    parent: int
    """The policy version the run started from."""
    candidate: int | None
    """The version it registered, once it has."""
    promoted: bool
    created: str
    finished: str | None
    config: dict[str, Any]
    metrics: dict[str, Any]
    error: str | None
    object: Literal["training.run"] = "training.run"


class TrainingRunList(msgspec.Struct, kw_only=True):
    """``GET /v1/training/runs``: newest first."""

    data: list[TrainingRun]
    object: Literal["list"] = "list"


# --- operator dashboard: feedback volume and plugins -------------------------------------------------------------

StatsBucket = Literal["hour", "day"]


class FeedbackStatsQuery(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """Query parameters of ``GET /v1/feedback/stats``."""

    bucket: StatsBucket = "hour"
    since: datetime | None = None
    """Count events from here on (default: the last 48 hours by hour, the last 30 days by day)."""


class FeedbackBucket(msgspec.Struct, kw_only=True):
    """Feedback events in one time bucket, by kind."""

    start: str
    """The bucket's first instant (UTC, ISO 8601)."""
    counts: dict[str, int]
    total: int


class FeedbackStats(msgspec.Struct, kw_only=True):
    """``GET /v1/feedback/stats``: feedback volume by kind over time. Buckets without feedback are left out."""

    bucket: StatsBucket
    since: str
    """The first bucket's start (``since`` rounded down to the bucket)."""
    kinds: list[str]
    """Every kind counted, sorted."""
    totals: dict[str, int]
    data: list[FeedbackBucket]
    """Oldest first."""
    object: Literal["feedback.stats"] = "feedback.stats"


class PluginCard(msgspec.Struct, kw_only=True):
    """A plugin found at start (item of ``GET /v1/plugins``), as ``alignd plugins`` lists it."""

    name: str
    origin: str
    """``built-in``, an entry point of a package, ``plugin_modules``, or ``registered at run time``."""
    status: str
    """``loaded``, or why it was not (``blocked``, ``not in allow_plugins``)."""
    hooks: list[str]
    kinds: list[str]
    """The feedback kinds it registers."""
    object: Literal["plugin"] = "plugin"


class PluginList(msgspec.Struct, kw_only=True):
    """``GET /v1/plugins``: loaded plugins first, in load order."""

    data: list[PluginCard]
    object: Literal["list"] = "list"


# --- API keys and principals (operators) -------------------------------------------------------------------------

PrincipalRole = Literal["user", "frontend", "admin"]
"""``user``: one end user; its completions and feedback are its own, and the principal's name is its ``user``.
``frontend``: a chat UI that authenticates its own users; it may name the end user (``user``) and judge the
completions made through it. ``admin``: everything, the operator endpoints included."""

PRINCIPAL_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._@+-]*$"
PrincipalName = Annotated[str, Meta(min_length=1, max_length=128, pattern=PRINCIPAL_NAME_PATTERN)]


class ApiKeyRequest(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """Body of ``POST /v1/admin/keys``: a new key for principal ``name`` with ``role``. Several keys may share a
    principal (to rotate one); a name keeps the role it was first given."""

    name: PrincipalName
    role: PrincipalRole


class ApiKey(msgspec.Struct, kw_only=True):
    """A key as ``GET /v1/admin/keys`` lists it: never the key itself, which is shown once, at creation."""

    id: str
    """``config-…`` for a key of the configuration (revoked by removing it there), else the stored key's id."""
    name: str
    """The principal the key stands for."""
    role: PrincipalRole
    source: Literal["config", "database"]
    created: str | None
    created_by: str | None
    """The admin principal that added it (None: configured at start)."""
    revoked: str | None = None
    revoked_by: str | None = None
    object: Literal["api_key"] = "api_key"


class ApiKeyCreated(ApiKey, kw_only=True):
    """``201`` answer to ``POST /v1/admin/keys``: the key, the only time it is shown (the server keeps a hash)."""

    key: str


class ApiKeyList(msgspec.Struct, kw_only=True):
    """``GET /v1/admin/keys``: the configured keys, then the stored ones oldest first, revoked ones included."""

    data: list[ApiKey]
    object: Literal["list"] = "list"


# --- privacy: per-user deletion and retention (operators) ------------------------------------------------------


class RowCounts(msgspec.Struct, kw_only=True):
    """Stored rows per table: those a deletion removed, or would remove."""

    completions: int
    choices: int
    feedback: int
    preference_pairs: int
    labels: int


class UserQuery(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """Query parameters of ``GET`` and ``DELETE /v1/admin/users/{user}``."""

    principal: PrincipalName | None = None
    """Only the rows made with this principal's keys (two frontends may each have a user of the same name)."""


TrustState = Literal["default", "trusted", "blocked"]
"""An operator's trust in an end user's feedback. ``trusted``: never flagged by the agreement check (still under the
share cap); ``blocked``: their feedback is stored but no run trains on it; ``default``: neither."""


class UserTrustUpdate(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """Body of ``PATCH /v1/admin/users/{user}``."""

    trust: TrustState
    note: Annotated[str, Meta(max_length=1000)] | None = None
    """Why (kept with the state, shown with it)."""


class UserTrust(msgspec.Struct, kw_only=True):
    """An end user's trust state and what the latest training run that scored them measured."""

    user: str
    trust: TrustState = "default"
    note: str | None = None
    updated: str | None = None
    """When an operator last set ``trust`` (ISO 8601)."""
    updated_by: str | None = None
    """The principal that set it."""
    flagged: bool = False
    """The latest run that scored the user found their judgements far from everyone else's and left them out."""
    agreement: float | None = None
    """Share of their judgements a reward model fitted without them agreed with (that run)."""
    judgements: int | None = None
    p_value: float | None = None
    """How likely a coin agrees that rarely or less (one-sided binomial test against 0.5)."""
    scored_run: str | None = None
    scored: str | None = None
    object: Literal["user.trust"] = "user.trust"


class UserTrustList(msgspec.Struct, kw_only=True):
    """``GET /v1/admin/users``: users with a trust state or a score, flagged ones first."""

    data: list[UserTrust]
    object: Literal["list"] = "list"


class UserListQuery(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """Query parameters of ``GET /v1/admin/users``."""

    flagged: bool | None = None
    trust: TrustState | None = None
    limit: Annotated[int, Meta(ge=1, le=1000)] = 100


class UserData(msgspec.Struct, kw_only=True):
    """``GET /v1/admin/users/{user}``: what the store holds of an end user, which deleting it would remove, and
    their trust state."""

    user: str
    principal: str | None
    rows: RowCounts
    trust: UserTrust | None = None
    """The operator's trust state and the latest agreement score (``default`` and unscored without a row)."""
    object: Literal["user.data"] = "user.data"


class UserDeletion(msgspec.Struct, kw_only=True):
    """``DELETE /v1/admin/users/{user}``: what was removed (all zeros when nothing was left: deleting is
    idempotent)."""

    user: str
    principal: str | None
    deleted: RowCounts
    object: Literal["user.deletion"] = "user.deletion"


class RetentionRequest(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """Body of ``POST /v1/admin/retention`` (may be empty)."""

    older_than_days: Annotated[int, Meta(ge=1, le=100_000)] | None = None  # a cutoff before year 1 is no date
    """Delete completions older than this many days; default: the configured ``--retain-days``."""


class RetentionRun(msgspec.Struct, kw_only=True):
    """A retention pass: what was older than ``cutoff`` and removed."""

    older_than_days: int
    cutoff: str
    """ISO 8601: completions created before it were removed, with everything derived from them."""
    deleted: RowCounts
    object: Literal["retention.run"] = "retention.run"
