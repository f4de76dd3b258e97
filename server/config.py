"""Settings: one msgspec Struct tree, read from ``alignd.toml`` < ``ALIGND_*`` environment < command-line flags.

Every leaf field is one option. Its command-line flag is ``--<field name>`` with dashes (or the ``flag`` named in its
``Meta.extra``, for the repeatable list options), its environment twin is ``ALIGND_<FLAG>``, and in the TOML file it
sits under its section (``[engine] max_model_len = 512``). Field names are unique across sections so that flags stay
short and familiar (vLLM's own names where they exist). The ``Meta`` description is the ``--help`` text.
"""

from __future__ import annotations

import argparse
import os
import tomllib
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Annotated, Any, get_args, get_origin, get_type_hints

import msgspec
from msgspec import Meta

ENV_PREFIX = "ALIGND_"
DEFAULT_CONFIG_FILE = "alignd.toml"


class ConfigError(Exception):
    """The configuration could not be read or is invalid; the message names the key and the source."""


class EngineSettings(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """vLLM engine options (see vLLM's engine arguments of the same names)."""

    dtype: Annotated[str, Meta(description="Weights and activations dtype: auto, float32, bfloat16, float16.")] = "auto"
    max_model_len: Annotated[
        Annotated[int, Meta(ge=16)] | None,
        Meta(description="Context length (prompt + reply) in tokens; default: the model's."),
    ] = None
    gpu_memory_utilization: Annotated[
        Annotated[float, Meta(gt=0, le=1)] | None,
        Meta(description="Fraction of GPU memory for vLLM (on CPU: of one NUMA node, for the KV cache). "
             "Default 0.9 on GPU, 0.2 on CPU."),
    ] = None
    kv_cache_space_gib: Annotated[
        Annotated[int, Meta(ge=1)] | None,
        Meta(description="CPU only: KV-cache size in GiB (sets VLLM_CPU_KVCACHE_SPACE)."),
    ] = None
    max_loras: Annotated[int, Meta(ge=1, description="Policy adapters kept loaded at once (for instant rollback).")] = 4
    max_lora_rank: Annotated[int, Meta(ge=1, description="Largest LoRA rank a policy adapter may have.")] = 16
    max_num_seqs: Annotated[int, Meta(ge=1, description="Most sequences the engine schedules in one step.")] = 256
    enforce_eager: Annotated[
        bool | None, Meta(description="Disable CUDA graphs / compilation. Default: on for CPU, off for GPU.")
    ] = None
    tensor_parallel_size: Annotated[int, Meta(ge=1, description="GPUs to shard the model across.")] = 1
    seed: Annotated[int, Meta(description="Engine random seed.")] = 0


class ServerSettings(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """HTTP server, access and request limits."""

    host: Annotated[
        str, Meta(description="Address to bind. One other machines reach needs a client key (--api-key, or a user "
                  "or frontend --key) or --insecure-open.")
    ] = "127.0.0.1"
    port: Annotated[int, Meta(ge=0, le=65535, description="Port to bind (0: any free port).")] = 8000
    api_keys: Annotated[
        list[str],
        Meta(extra={"flag": "api-key"}, description="Key accepted for /v1/*, /metrics and /schema as "
             "'Authorization: Bearer KEY' (repeatable; in the environment, comma-separated): principal 'api', role "
             "frontend (it may name the end user, and judge the completions it made). No client key (this, or a "
             "user or frontend --key): they are open, which a non-loopback --host refuses without --insecure-open."),
    ] = msgspec.field(default_factory=list)
    admin_keys: Annotated[
        list[str],
        Meta(extra={"flag": "admin-key"}, description="Key for the operator endpoints (repeatable): principal "
             "'admin'. It is also accepted wherever an API key is. No admin key (this, an admin --key, or one added "
             "at run time): operator endpoints are refused."),
    ] = msgspec.field(default_factory=list)
    keys: Annotated[
        list[str],
        Meta(extra={"flag": "key"}, description="A named key, 'NAME:ROLE:KEY' (repeatable): principal NAME with ROLE "
             "user (its own completions and feedback only), frontend (a chat UI that names its end users) or admin. "
             "KEY may be 'sha256:<hex digest of the key>' to keep the key itself out of the configuration. More keys "
             "can be added at run time (POST /v1/admin/keys, `alignd keys add`); --api-key keys are principal 'api' "
             "(frontend), --admin-key keys principal 'admin' (admin)."),
    ] = msgspec.field(default_factory=list)
    metrics_keys: Annotated[
        list[str],
        Meta(extra={"flag": "metrics-key"}, description="Key that may read /metrics and nothing else (repeatable; "
             "'sha256:<hex>' as for --key), for a Prometheus scrape. Set: /metrics needs it (or an admin or "
             "frontend key) even on an open server."),
    ] = msgspec.field(default_factory=list)
    key_cache_s: Annotated[
        float, Meta(ge=0, description="Seconds a key added or revoked at run time may take to be seen by the other "
                    "replicas (each caches what the database says about a key this long; the replica that made the "
                    "change sees it at once). 0: read the database on every request.")
    ] = 1.0
    insecure_open: Annotated[
        bool, Meta(description="Serve /v1/* without API keys on a non-loopback --host: anyone who can reach the port "
                   "may chat, send feedback and fill the database. Without it, such a start is refused (exit 2).")
    ] = False
    allowed_hosts: Annotated[
        list[str],
        Meta(extra={"flag": "allowed-host"}, description="Host header accepted, without its port (repeatable; "
             "'*.example.com' for its subdomains, '*' for any); another is a 400, which stops DNS rebinding. None "
             "set: localhost, 127.0.0.1 and ::1 when --host is a loopback address, otherwise any."),
    ] = msgspec.field(default_factory=list)
    max_body_bytes: Annotated[
        int, Meta(ge=1024, description="Largest request body accepted on any route, plugin routes included "
                  "(else 413).")
    ] = 1 << 20
    chat_requests_per_minute: Annotated[
        int, Meta(ge=0, description="Chat requests one caller (an API key; with no keys, a client address) may start "
                  "per minute on average, in bursts of up to this many; beyond it 429 with Retry-After. 0: no limit.")
    ] = 600
    chat_max_concurrent: Annotated[
        int, Meta(ge=0, description="Chat requests one caller may have in flight at once (streams until their last "
                  "byte); beyond it 429 with Retry-After, never a queue. Keep it times --max-n below --max-num-seqs "
                  "so that one caller cannot fill the engine. 0: no limit.")
    ] = 8
    max_n: Annotated[int, Meta(ge=1, le=128, description="Largest 'n' (choices per chat request) accepted.")] = 16
    shutdown_grace_s: Annotated[
        float, Meta(ge=0, description="On SIGTERM, seconds in-flight requests get to finish before they are cut.")
    ] = 30.0
    log_level: Annotated[str, Meta(description="Log level: debug, info, warning, error.")] = "info"
    trainer: Annotated[
        str, Meta(pattern="^(on|off)$", description="alignd serve: on, this process also trains (one box); off, a "
                  "serving replica (chat, feedback, policy sync) that never trains: POST /v1/training/runs queues "
                  "the run for an `alignd trainer` process on the same PostgreSQL database (SQLite is refused). See "
                  "docs/deploy.md. alignd trainer ignores it.")
    ] = "on"


class StoreSettings(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """Where completions and feedback are kept."""

    database: Annotated[
        str | None,
        Meta(description="Database URL: sqlite:///path.db or postgresql://user:pass@host/db. "
             "Default: SQLite in the data dir."),
    ] = None
    batch_max: Annotated[int, Meta(ge=1, description="Most rows committed together in one group commit.")] = 256
    policy_sync_s: Annotated[
        float, Meta(ge=0, description="Seconds between polls of the database for promotions (the fallback on "
                    "PostgreSQL, where LISTEN/NOTIFY brings them at once). 0: never poll.")
    ] = 5.0
    heartbeat_s: Annotated[
        float, Meta(gt=0, description="Seconds between two heartbeats of this process into the database (ready, "
                    "loaded versions, served version); a replica is live while its last one is at most 3 periods old.")
    ] = 5.0
    promotion_timeout_s: Annotated[
        float, Meta(gt=0, description="Seconds a promotion waits for every live replica to load it before the served "
                    "name flips to it without the laggards, which then answer /ready 503 until they load it.")
    ] = 120.0
    retain_days: Annotated[
        Annotated[int, Meta(ge=1)] | None,
        Meta(description="Delete completions older than this many days, with their choices, the feedback on them "
             "and its preference pairs and labels (every --retention-interval-s, and on POST /v1/admin/retention). "
             "Policies and training runs stay. Unset: keep everything."),
    ] = None
    retention_interval_s: Annotated[
        float, Meta(gt=0, description="Seconds between two retention passes (with --retain-days set).")
    ] = 3600.0


class PluginSettings(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """Feedback plugins: which load, and the options of the built-in sinks and quota."""

    allow_plugins: Annotated[
        list[str],
        Meta(extra={"flag": "allow-plugin"}, description="Load only these plugins, by name (repeatable; "
             "`alignd plugins` lists the names). None set: every plugin not blocked."),
    ] = msgspec.field(default_factory=list)
    block_plugins: Annotated[
        list[str], Meta(extra={"flag": "block-plugin"}, description="Never load this plugin, by name (repeatable).")
    ] = msgspec.field(default_factory=list)
    plugin_modules: Annotated[
        list[str],
        Meta(extra={"flag": "plugin-module"}, description="Also load this module as a plugin: 'package.module' or "
             "'package.module:object' (repeatable). Its name is the object's or the module's last part."),
    ] = msgspec.field(default_factory=list)
    load_entry_points: Annotated[
        bool, Meta(description="Load the plugins installed packages declare (entry-point group 'alignd').")
    ] = True
    hook_timeout_s: Annotated[
        float, Meta(gt=0, description="Seconds the request-path plugin calls of one feedback event (prepare_feedback, "
                    "the kind's converter, filter_feedback, run off the event loop) may take together; past it the "
                    "event is refused with 503 (plugin_timeout) and nothing is stored.")
    ] = 5.0
    sink_timeout_s: Annotated[
        float, Meta(gt=0, description="Seconds one sink plugin call may take before it is abandoned (and counted).")
    ] = 10.0
    sink_queue_max: Annotated[
        int, Meta(ge=1, description="Events waiting for one sink plugin; beyond this that sink skips events "
                  "(counted; the events stay stored).")
    ] = 10_000
    jsonl_path: Annotated[
        str | None, Meta(description="jsonl_sink: file each accepted feedback event is appended to. Unset: off.")
    ] = None
    jsonl_max_bytes: Annotated[
        int, Meta(ge=1024, description="jsonl_sink: rotate the file when it would grow past this size.")
    ] = 100 << 20
    jsonl_backups: Annotated[
        int, Meta(ge=0, description="jsonl_sink: rotated files kept (FILE.1 is the newest).")
    ] = 5
    webhook_url: Annotated[
        str | None, Meta(description="webhook: URL each accepted feedback event is POSTed to. Unset: off.")
    ] = None
    webhook_secret: Annotated[
        str | None, Meta(description="webhook: secret of the 'X-Alignd-Signature-V1' header, the HMAC-SHA256 of "
                         "'<X-Alignd-Timestamp>.<body>' (alignd.clients.webhooks.verify checks it and rejects "
                         "replays). Unset: no signature.")
    ] = None
    webhook_legacy_signature: Annotated[
        bool, Meta(description="webhook: also send the old 'X-Alignd-Signature: sha256=<HMAC of the body>', "
                   "which has no timestamp (a captured request can be replayed), while receivers move to the new "
                   "header.")
    ] = False
    webhook_timeout_s: Annotated[float, Meta(gt=0, description="webhook: seconds one POST may take.")] = 5.0
    webhook_retries: Annotated[
        int, Meta(ge=0, description="webhook: retries of a failed POST, with exponential backoff.")
    ] = 5
    webhook_backoff_s: Annotated[
        float, Meta(gt=0, description="webhook: delay before the first retry; it doubles each time (max 60 s).")
    ] = 0.5
    webhook_queue_max: Annotated[
        int, Meta(ge=1, description="webhook: events waiting for delivery; beyond this new ones are dropped "
                  "(counted; they stay stored).")
    ] = 1000
    feedback_per_minute: Annotated[
        int, Meta(ge=0, description="quota: most feedback events one user may send per minute (429 beyond). "
                  "0: no quota.")
    ] = 0


class TrainerSettings(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """The embedded RLHF trainer: when runs start, their budget, the promotion gate and the adapters."""

    training_trigger: Annotated[
        str, Meta(pattern="^(auto|manual)$", description="auto: start a run when enough new feedback has arrived "
                  "(see --min-new-pairs, --min-new-labels, --min-interval-s); manual: only on request "
                  "(POST /v1/training/runs, `alignd train`).")
    ] = "auto"
    min_new_pairs: Annotated[
        int, Meta(ge=1, description="auto trigger: new preference pairs (not yet trained on) that start a run.")
    ] = 64
    min_new_labels: Annotated[
        int, Meta(ge=1, description="auto trigger: new unpaired labels (thumbs) that start a run.")
    ] = 128
    min_interval_s: Annotated[
        float, Meta(ge=0, description="auto trigger: seconds between the starts of two runs, at least.")
    ] = 300.0
    ppo_iterations: Annotated[int, Meta(ge=1, description="PPO iterations per run.")] = 8
    rollout_batch_size: Annotated[int, Meta(ge=1, description="Prompts (one reply each) per PPO iteration.")] = 32
    ppo_time_limit_s: Annotated[
        float | None, Meta(description="Stop PPO after the iteration that crosses this many seconds. "
                           "Unset: run every iteration.")
    ] = None
    run_timeout_s: Annotated[
        float, Meta(gt=0, description="Kill a run that takes longer than this (it is marked failed).")
    ] = 3600.0
    max_new_tokens: Annotated[
        int, Meta(ge=1, description="Upper bound of the reply length of rollouts and the gate; the length used is the "
                  "95th percentile of recently served replies' lengths, within it.")
    ] = 256
    gate_margin: Annotated[
        float, Meta(description="Promote only if the lower confidence bound (--gate-confidence) of the candidate's "
                    "paired gain over the current policy, in mean normalised judge score on held-out prompts, is "
                    "above this.")
    ] = 0.05
    gate_confidence: Annotated[
        float, Meta(gt=0.5, lt=1, description="Confidence of the gate's lower bound on the paired gain: a candidate "
                    "no better than the current policy is promoted at most 1 - this of the time.")
    ] = 0.95
    gate_samples_per_prompt: Annotated[
        int, Meta(ge=1, le=64, description="Replies each policy samples per held-out prompt at the gate, with the "
                  "same seeds for both.")
    ] = 2
    canary_share: Annotated[
        float, Meta(ge=0, lt=1, description="Share of the served name's users (sticky per user) a candidate that "
                    "passed the gate answers while it is tested live against the promoted policy; 0 promotes it at "
                    "once, without a live test.")
    ] = 0.1
    canary_side_by_side: Annotated[
        bool, Meta(description="While a canary runs, requests for several choices (the web chat's Compare mode, "
                   "n > 1) get half their choices from it and half from the promoted version, in random order: the "
                   "user's pick is the canary's win or loss.")
    ] = False
    canary_confidence: Annotated[
        float, Meta(gt=0.5, lt=1, description="1 - the live test's error rate: its always-valid bounds on the good, "
                    "win and error rates are at this confidence.")
    ] = 0.95
    canary_max_s: Annotated[
        float, Meta(gt=0, description="A canary without a significant result after this many seconds is rejected.")
    ] = 86400.0
    canary_max_requests: Annotated[
        int, Meta(ge=1, description="A canary without a significant result after answering this many requests is "
                  "rejected.")
    ] = 10000
    canary_check_s: Annotated[
        float, Meta(gt=0, description="Seconds between checks of the live test.")
    ] = 15.0
    canary_min_completions: Annotated[
        int, Meta(ge=1, description="Completions each side needs before error rates and latency are compared.")
    ] = 30
    canary_max_latency_ratio: Annotated[
        float, Meta(gt=1, description="A canary slower per generated token than this many times the promoted policy "
                    "is rejected.")
    ] = 1.5
    judge_fraction: Annotated[
        float, Meta(ge=0, lt=1, description="Share of prompts whose feedback trains the gate's judge, a reward model "
                    "cross-fitted apart from PPO's; 0 makes PPO's own reward model the judge (not independent).")
    ] = 0.3
    kl_budget: Annotated[
        float, Meta(gt=0, description="Promote only if the candidate's mean KL to the base (nats per reply) stays "
                    "within this.")
    ] = 8.0
    reward_model_confidence: Annotated[
        float, Meta(ge=0, lt=1, description="A run goes on to PPO only if the reward model's held-out accuracy is "
                    "above chance (0.5) with this confidence (its Wilson interval's lower end); 0 skips the check.")
    ] = 0.95
    target_kl: Annotated[
        float, Meta(gt=0, description="KL per reply (nats) the adaptive KL controller steers PPO towards.")
    ] = 2.0
    lora_rank: Annotated[
        int, Meta(ge=1, description="LoRA rank of the policy, critic and reward adapters (at most --max-lora-rank).")
    ] = 8
    lora_alpha: Annotated[int, Meta(ge=1, description="LoRA alpha (updates scale by alpha / rank).")] = 16
    trainer_device: Annotated[
        str, Meta(pattern="^(auto|cpu|cuda(:[0-9]+)?)$", description="Where the trainer runs: auto picks CUDA when "
                  "present; cuda:N one card of several.")
    ] = "auto"
    trainer_gradient_checkpointing: Annotated[
        bool, Meta(description="Recompute activations in the trainer's backward passes: less memory, more time.")
    ] = False
    trainer_dtype: Annotated[
        str, Meta(pattern="^(auto|bfloat16|float32)$", description="Trainer precision. auto: bfloat16 weights on a "
                  "CUDA device that supports them; float32 weights with bfloat16 compute (autocast) on a CPU with "
                  "bfloat16 instructions (AVX512-BF16, AMX); float32 elsewhere.")
    ] = "auto"
    trainer_threads: Annotated[
        int, Meta(ge=0, description="CPU threads of the trainer process; 0: half the CPUs (the engine needs the "
                  "rest).")
    ] = 0
    trainer_seed: Annotated[int, Meta(description="Seed of the trainer (adapter init, data order, sampling).")] = 0
    trainer_processes: Annotated[
        int, Meta(ge=1, le=64, description="Processes each training run runs as, data parallel: one per GPU (each "
                  "takes cuda:<rank> of the GPUs CUDA_VISIBLE_DEVICES shows it, NCCL), or several on the CPU "
                  "(gloo). Rank 0 talks to the server; gradients are summed over the ranks, so a step is the one a "
                  "single process would take. 1: one process, as before.")
    ] = 1
    trainer_distributed: Annotated[
        str, Meta(pattern="^(ddp|fsdp)$", description="How --trainer-processes share the model: ddp (each rank "
                  "holds the whole base and takes a share of the rows; gradients summed) or fsdp (FSDP2: the base "
                  "sharded over the ranks, about 1/N of it each, for a base that does not fit one GPU; every rank "
                  "takes every row, so it saves memory, not time). See docs/training.md.")
    ] = "ddp"
    objective: Annotated[
        str, Meta(pattern="^(ppo|grpo|rloo|online-dpo|kto)$", description="How runs optimise the policy: ppo (a "
                  "critic and GAE), grpo (group-normalised advantages over --samples-per-prompt replies per prompt, "
                  "KL as a loss term), rloo (leave-one-out baseline, KL in the reward), online-dpo (DPO on the "
                  "reward model's best and worst of --samples-per-prompt replies, plus users' pairs; refused without "
                  "any pair) or kto (users' thumbs and clear ratings as desirable/undesirable; refused without any "
                  "label); a run request's objective overrides it.")
    ] = "ppo"
    samples_per_prompt: Annotated[
        int, Meta(ge=2, le=64, description="grpo, rloo and online-dpo: replies sampled per prompt, each judged "
                  "against the others of its group (online-dpo: its best and worst are a pair; an iteration answers "
                  "rollout-batch-size / this many prompts).")
    ] = 4
    max_user_share: Annotated[
        float, Meta(gt=0, le=1, description="Most of a run's training weight one end user may hold: larger users' "
                    "pairs (and labels) weigh less, so that each holds at most this share (with fewer than "
                    "1/share users, all weigh the same). 1 turns the cap off.")
    ] = 0.1
    user_flag_p_value: Annotated[
        float, Meta(ge=0, lt=1, description="Flag and leave out of a run the users whose judgements agree with a "
                    "reward model fitted without them so rarely that a coin would do so with at most this "
                    "probability (one-sided binomial test against 0.5); 0 turns the check off.")
    ] = 0.01


class Settings(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """Everything alignd reads at start."""

    model: Annotated[
        str | None,
        Meta(description="Base model: a Hugging Face id or a local directory. Default: the built-in demo model, "
             "built into the data dir on first use."),
    ] = None
    served_name: Annotated[str, Meta(description="Model name clients use for the promoted policy.")] = "alignd"
    data_dir: Annotated[str, Meta(description="Where the database, policies and model cache live.")] = ".alignd"
    server: ServerSettings = msgspec.field(default_factory=ServerSettings)
    engine: EngineSettings = msgspec.field(default_factory=EngineSettings)
    store: StoreSettings = msgspec.field(default_factory=StoreSettings)
    plugins: PluginSettings = msgspec.field(default_factory=PluginSettings)
    trainer: TrainerSettings = msgspec.field(default_factory=TrainerSettings)

    @property
    def data_path(self) -> Path:
        """The data directory as an absolute path."""
        return Path(self.data_dir).expanduser().resolve()

    @property
    def database_url(self) -> str:
        """The configured database URL, or the embedded SQLite file in the data dir."""
        return self.store.database or f"sqlite:///{self.data_path / 'alignd.db'}"


# --- option table -----------------------------------------------------------------------------------------------


class Option(msgspec.Struct, frozen=True):
    """One leaf setting: where it sits in the tree, its flag, its type and its help."""

    path: tuple[str, ...]
    flag: str
    type: Any
    help: str
    default: Any

    @property
    def env(self) -> str:
        return ENV_PREFIX + self.flag.upper().replace("-", "_")

    @property
    def is_list(self) -> bool:
        return get_origin(self.type) is list

    @property
    def is_bool(self) -> bool:
        return self.type is bool or (get_origin(self.type) is not None and bool in get_args(self.type)
                                     and str not in get_args(self.type))


def _options(cls: type[msgspec.Struct] = Settings, prefix: tuple[str, ...] = ()) -> list[Option]:
    hints = get_type_hints(cls, include_extras=True)
    defaults = {f.name: f for f in msgspec.structs.fields(cls)}
    out: list[Option] = []
    for name, hint in hints.items():
        if name not in defaults:
            continue
        base, meta = hint, None
        if get_origin(hint) is Annotated:
            base, *extras = get_args(hint)
            meta = next((m for m in extras if isinstance(m, Meta)), None)
        if isinstance(base, type) and issubclass(base, msgspec.Struct):
            out.extend(_options(base, (*prefix, name)))
            continue
        field = defaults[name]
        default = field.default if field.default is not msgspec.NODEFAULT else field.default_factory()
        flag = (meta.extra or {}).get("flag", name.replace("_", "-")) if meta else name.replace("_", "-")
        out.append(Option((*prefix, name), flag, base, (meta.description or "") if meta else "", default))
    return out


OPTIONS: tuple[Option, ...] = tuple(_options())
assert len({o.flag for o in OPTIONS}) == len(OPTIONS), "setting names must be unique across sections"


# --- sources -----------------------------------------------------------------------------------------------------


def _set(tree: dict[str, Any], path: Sequence[str], value: Any) -> None:
    for key in path[:-1]:
        tree = tree.setdefault(key, {})
    tree[path[-1]] = value


def _merge(base: dict[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in over.items():
        out[key] = _merge(out[key], value) if isinstance(value, Mapping) and isinstance(out.get(key), dict) else value
    return out


def read_config_file(path: str | Path) -> dict[str, Any]:
    """The TOML file as a dict; a file that cannot be read or parsed is a ConfigError naming it."""
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except OSError as e:
        raise ConfigError(f"cannot read config file {path}: {e.strerror or e}") from e
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"config file {path} is not valid TOML: {e}") from e


def env_values(environ: Mapping[str, str]) -> dict[str, Any]:
    """The ``ALIGND_*`` variables that name an option, as a nested dict of strings (lists split on commas)."""
    out: dict[str, Any] = {}
    for opt in OPTIONS:
        if opt.env in environ:
            raw = environ[opt.env]
            value: Any = [v.strip() for v in raw.split(",") if v.strip()] if opt.is_list else raw
            if not opt.is_list and raw == "" and type(None) in get_args(opt.type):
                value = None
            _set(out, opt.path, value)
    return out


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add a flag for every option, grouped by section; unset flags stay out of the namespace."""
    parser.add_argument("--config", metavar="FILE", default=argparse.SUPPRESS,
                        help=f"TOML config file (env {ENV_PREFIX}CONFIG; default ./{DEFAULT_CONFIG_FILE} if present).")
    groups: dict[str, argparse._ArgumentGroup] = {}
    for opt in OPTIONS:
        section = opt.path[0] if len(opt.path) > 1 else "general"
        group = groups.get(section) or groups.setdefault(section, parser.add_argument_group(f"{section} options"))
        default = "" if opt.default in (None, []) else f" [default: {opt.default}]"
        help_text = f"{opt.help}{default} (env {opt.env})".replace("%", "%%")
        dest = ".".join(opt.path)
        if opt.is_list:
            group.add_argument(f"--{opt.flag}", dest=dest, action="append", metavar="VALUE",
                               default=argparse.SUPPRESS, help=help_text)
        elif opt.is_bool:
            group.add_argument(f"--{opt.flag}", dest=dest, action=argparse.BooleanOptionalAction,
                               default=argparse.SUPPRESS, help=help_text)
        else:
            group.add_argument(f"--{opt.flag}", dest=dest, metavar=opt.flag.upper().replace("-", "_"),
                               default=argparse.SUPPRESS, help=help_text)


def cli_values(namespace: argparse.Namespace) -> dict[str, Any]:
    """The flags given on the command line, as a nested dict."""
    out: dict[str, Any] = {}
    for dest, value in vars(namespace).items():
        if "." in dest or dest in {o.path[0] for o in OPTIONS if len(o.path) == 1}:
            _set(out, dest.split("."), value)
    return out


def load_settings(
    cli: Mapping[str, Any] | None = None,
    *,
    config_file: str | Path | None = None,
    environ: Mapping[str, str] | None = None,
) -> Settings:
    """Settings from the config file < environment < ``cli`` (a nested dict), validated.

    ``config_file`` defaults to ``ALIGND_CONFIG`` or ``./alignd.toml`` when that exists; a named file must exist.
    """
    environ = os.environ if environ is None else environ
    named = config_file or environ.get(f"{ENV_PREFIX}CONFIG")
    tree: dict[str, Any] = {}
    if named:
        tree = read_config_file(named)
    elif Path(DEFAULT_CONFIG_FILE).is_file():
        named = DEFAULT_CONFIG_FILE
        tree = read_config_file(named)
    tree = _merge(_merge(tree, env_values(environ)), cli or {})
    try:
        return msgspec.convert(tree, Settings, strict=False)
    except msgspec.ValidationError as e:
        where = f" (config file {named}, environment or flags)" if named else " (environment or flags)"
        raise ConfigError(f"invalid setting: {_humanize(str(e))}{where}") from e


def _humanize(message: str) -> str:
    # msgspec says "... - at `$.engine.max_loras`"; operators know the key as engine.max_loras / --max-loras.
    if message.startswith("Object contains unknown field"):
        text, _, path = message.partition(" - at `$.")
        section = f"[{path.rstrip('`')}] " if path else ""
        return f"{section}{text.replace('Object contains unknown field', 'unknown key')}"
    if " - at `$." in message:
        text, _, path = message.partition(" - at `$.")
        path = path.rstrip("`")
        key = path.split("[")[0]
        leaf = key.split(".")[-1]
        flag = next((o.flag for o in OPTIONS if o.path[-1] == leaf), leaf.replace("_", "-"))
        return f"{key} (--{flag}): {text}"
    return message
