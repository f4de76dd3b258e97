"""Prometheus collectors of alignd. vLLM registers its own ``vllm:*`` collectors in the default registry; ours live
in a registry per app (several apps may share a process in tests) and ``/metrics`` serves both."""

from __future__ import annotations

from prometheus_client import REGISTRY as DEFAULT_REGISTRY
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)


class Metrics:
    """The collectors, created per instance in their own registry."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter("alignd_requests", "HTTP requests by route and status.", ["route", "method", "status"],
                                registry=r)
        self.request_latency = Histogram("alignd_request_latency_seconds", "Time to the response's last byte.",
                                         ["route"], buckets=LATENCY_BUCKETS, registry=r)
        self.time_to_first_token = Histogram("alignd_time_to_first_token_seconds",
                                             "Chat: time from request to the first generated token.",
                                             buckets=LATENCY_BUCKETS, registry=r)
        self.prompt_tokens = Counter("alignd_prompt_tokens", "Prompt tokens of chat requests.", registry=r)
        self.completion_tokens = Counter("alignd_completion_tokens", "Generated tokens of chat requests.",
                                         registry=r)
        self.in_flight = Gauge("alignd_requests_in_flight", "HTTP requests being served now.", registry=r)
        self.promoted_version = Gauge("alignd_promoted_policy_version", "Policy version that serves the model name.",
                                      registry=r)
        self.canary_version = Gauge("alignd_canary_policy_version", "Policy version on canary (0: none).", registry=r)
        self.canary_share = Gauge("alignd_canary_share", "Share of users the canary answers (0: none).", registry=r)
        self.version_requests = Counter("alignd_policy_requests", "Chat requests for the served name by the policy "
                                        "version that answered and outcome (ok, error).", ["version", "outcome"],
                                        registry=r)
        self.version_feedback = Gauge("alignd_canary_feedback", "The running experiment's users' labels (thumbs, "
                                      "ratings) and side-by-side picks by version: good, bad, wins, losses.",
                                      ["version", "signal"], registry=r)
        self.canary_rate = Gauge("alignd_canary_rate", "The running experiment's rates by version with their "
                                 "always-valid bounds: good_rate, win_rate (and _low, _high).", ["version", "figure"],
                                 registry=r)
        self.engine_requests = Counter("alignd_engine_requests", "Chat requests handed to the engine.", registry=r)
        self.completions_stored = Counter("alignd_completions_stored", "Completions committed to the store.",
                                          registry=r)
        self.store_errors = Counter("alignd_store_errors", "Completions that could not be stored.", registry=r)
        self.database_errors = Counter("alignd_database_errors", "Requests answered 503 because the database "
                                       "failed, by reason (unavailable, timeout, full).", ["reason"], registry=r)
        self.database_up = Gauge("alignd_database_up", "1 when the last readiness probe (/ready) found the database "
                                 "usable, 0 when not.", registry=r)
        self.client_disconnects = Counter("alignd_client_disconnects",
                                          "Chat requests aborted because the client went away.", registry=r)
        self.feedback_events = Counter("alignd_feedback_events", "Feedback events stored, by kind.", ["kind"],
                                       registry=r)
        self.feedback_pairs = Counter("alignd_feedback_pairs", "Preference pairs derived from stored feedback.",
                                      ["kind"], registry=r)
        self.feedback_labels = Counter("alignd_feedback_labels", "Unpaired labels derived from stored feedback.",
                                       ["kind"], registry=r)
        self.feedback_rejected = Counter("alignd_feedback_rejected",
                                         "Feedback refused before storage, by reason (a filter plugin's code, "
                                         "or invalid_feedback).", ["reason"], registry=r)
        self.sink_failures = Counter("alignd_sink_failures", "Sink (on_feedback) calls that raised, by plugin.",
                                     ["plugin"], registry=r)
        self.sink_timeouts = Counter("alignd_sink_timeouts", "Sink (on_feedback) calls abandoned after "
                                     "sink_timeout_s, by plugin.", ["plugin"], registry=r)
        self.sink_dropped = Counter("alignd_sink_dropped", "Stored feedback events a sink skipped because its "
                                    "queue was full, by plugin.", ["plugin"], registry=r)

        self.policy_swaps = Counter("alignd_policy_swaps", "Promotions and rollbacks that took effect.", registry=r)
        self.policy_swap_seconds = Histogram("alignd_policy_swap_seconds", "Time from a promote call to routing "
                                             "new requests to the version (adapter load included).",
                                             buckets=LATENCY_BUCKETS, registry=r)
        self.policy_load_failures = Counter("alignd_policy_load_failures", "Adapters refused at load.", registry=r)
        self.training_runs = Counter("alignd_training_runs", "Finished training runs, by status.", ["status"],
                                     registry=r)
        self.training_running = Gauge("alignd_training_running", "1 while a training run is in progress.",
                                      registry=r)
        self.training_progress = Gauge("alignd_training_progress", "Progress (0 to 1) of the current run.",
                                       registry=r)
        self.training_figure = Gauge("alignd_training_figure", "The latest figures the trainer reported (PPO mean "
                                     "reward and KL, reward-model held-out accuracy, …).", ["name"], registry=r)
        self.rollout_requests = Counter("alignd_rollout_requests", "Trainer rollouts generated by the engine.",
                                        registry=r)
        self.deleted_rows = Counter("alignd_deleted_rows", "Stored rows deleted, by table and reason (retention, "
                                    "user: a per-user deletion).", ["table", "reason"], registry=r)
        self.retention_failures = Counter("alignd_retention_failures", "Periodic retention passes that failed "
                                          "(retried at the next interval).", registry=r)
        self.retention_last_success = Gauge("alignd_retention_last_success_timestamp_seconds",
                                            "Unix time the last retention pass finished.", registry=r)

    def render(self) -> bytes:
        """Our collectors, then the process-wide registry (vLLM's ``vllm:*`` and process metrics)."""
        return generate_latest(self.registry) + generate_latest(DEFAULT_REGISTRY)
