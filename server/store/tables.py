"""The database schema, as SQLAlchemy Core tables: its one definition.

Queries are written against these tables. The Alembic revisions in :mod:`alignd.store.migrations` take a database
to this schema (they are history and never import the tables, only the column types below);
``tests/test_migrations.py`` fails when the latest revision and these tables disagree.
"""

from __future__ import annotations

from datetime import UTC, datetime

from sqlalchemy import (
    JSON,
    Boolean,
    Column,
    DateTime,
    Dialect,
    Float,
    ForeignKeyConstraint,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    PrimaryKeyConstraint,
    Table,
    Text,
    TypeDecorator,
    text,
)

__all__ = [
    "NULLABLE_JSON",
    "UTCDateTime",
    "adapter_blobs",
    "api_keys",
    "choices",
    "completions",
    "end_users",
    "feedback",
    "labels",
    "metadata",
    "policies",
    "preference_pairs",
    "quota_counters",
    "trainer_lease",
    "training_runs",
]


class UTCDateTime(TypeDecorator[datetime]):
    """A timezone-aware UTC timestamp on every backend.

    PostgreSQL stores ``timestamptz``; SQLite has no timezone support, so values
    are stored as naive UTC text (which keeps them sortable) and read back
    with ``tzinfo=UTC`` attached. Naive datetimes are refused rather than
    guessed at.
    """

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None or value.utcoffset() is None:
            raise ValueError(f"naive datetime {value!r}: store timestamps need a timezone (use UTC)")
        value = value.astimezone(UTC)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


#: JSON column type whose Python ``None`` is SQL NULL (the default would store the JSON text ``null``).
NULLABLE_JSON: JSON = JSON(none_as_null=True)

# Deterministic constraint names, so that later migrations can refer to them on both backends.
metadata = MetaData(
    naming_convention={
        "ix": "ix_%(table_name)s_%(column_0_name)s",
        "uq": "uq_%(table_name)s_%(column_0_name)s",
        "ck": "ck_%(table_name)s_%(constraint_name)s",
        "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
        "pk": "pk_%(table_name)s",
    }
)

#: One row per chat completion request that the server answered.
completions = Table(
    "completions",
    metadata,
    Column("id", Text, primary_key=True),  # "chatcmpl-…"
    Column("created", UTCDateTime, nullable=False),
    Column("model", Text, nullable=False),  # the model name as requested ("alignd", "alignd@3", …)
    Column("policy_version", Integer, nullable=False),  # the policy that actually generated it
    Column("messages", JSON, nullable=False),  # the request's messages, as sent
    Column("params", JSON, nullable=False),  # sampling parameters
    Column("user", Text, nullable=True),
    Column("metadata", NULLABLE_JSON, nullable=True),
    Column("prompt_tokens", Integer, nullable=False),
    Column("completion_tokens", Integer, nullable=False),
    Column("latency_ms", Float, nullable=False),
    Column("stream", Boolean, nullable=False),
    Column("principal", Text, nullable=True),  # the principal whose key made it (None: made without a key)
    Index(None, "created"),
    Index(None, "policy_version"),
    Index(None, "user"),  # per-user deletion
)

#: The generated choices of a completion (``n`` of them).
choices = Table(
    "choices",
    metadata,
    Column("completion_id", Text, nullable=False),
    Column("index", Integer, nullable=False, autoincrement=False),
    Column("text", Text, nullable=False),
    Column("token_ids", JSON, nullable=False),  # list[int], the generated token ids
    Column("finish_reason", Text, nullable=True),
    PrimaryKeyConstraint("completion_id", "index"),
    ForeignKeyConstraint(["completion_id"], ["completions.id"], ondelete="CASCADE"),
)

#: One row per accepted feedback event.
feedback = Table(
    "feedback",
    metadata,
    Column("id", Text, primary_key=True),  # "fb-…"
    Column("completion_id", Text, nullable=False),
    Column("kind", Text, nullable=False),
    Column("choice", Integer, nullable=True),  # the choice it is about, for one-choice kinds
    Column("payload", JSON, nullable=False),  # the kind's own fields
    Column("user", Text, nullable=True),
    Column("comment", Text, nullable=True),
    Column("tags", JSON, nullable=False),
    Column("idempotency_key", Text, nullable=True),
    Column("request_hash", Text, nullable=True),  # tells a retry from another request under the same key
    Column("policy_version", Integer, nullable=False),  # of the completion: which policy the feedback judges
    Column("pair_count", Integer, nullable=False),
    Column("label_count", Integer, nullable=False),
    Column("created", UTCDateTime, nullable=False),
    Column("principal", Text, nullable=True),  # the principal whose key sent it
    ForeignKeyConstraint(["completion_id"], ["completions.id"], ondelete="CASCADE"),
    Index(None, "completion_id", "kind"),
    Index(None, "created"),
    Index(None, "idempotency_key", unique=True),
    Index(None, "user"),  # per-user deletion
)

#: Preference pairs derived from feedback (TRL's conversational format: prompt messages, two replies).
preference_pairs = Table(
    "preference_pairs",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("feedback_id", Text, nullable=False),
    Column("completion_id", Text, nullable=False),
    Column("kind", Text, nullable=False),
    Column("policy_version", Integer, nullable=False),
    Column("prompt", JSON, nullable=False),
    Column("chosen", Text, nullable=False),
    Column("rejected", Text, nullable=False),
    Column("chosen_choice", Integer, nullable=True),
    Column("rejected_choice", Integer, nullable=True),
    Column("margin", Float, nullable=False),
    Column("weight", Float, nullable=False),
    Column("used_in_run", Text, nullable=True),  # the training run that consumed it
    Column("created", UTCDateTime, nullable=False),
    ForeignKeyConstraint(["feedback_id"], ["feedback.id"], ondelete="CASCADE"),
    Index(None, "feedback_id"),
    Index(None, "created"),
)

#: Unpaired good/bad labels derived from feedback.
labels = Table(
    "labels",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("feedback_id", Text, nullable=False),
    Column("completion_id", Text, nullable=False),
    Column("kind", Text, nullable=False),
    Column("policy_version", Integer, nullable=False),
    Column("choice", Integer, nullable=True),
    Column("prompt", JSON, nullable=False),
    Column("reply", Text, nullable=False),
    Column("good", Boolean, nullable=False),
    Column("weight", Float, nullable=False),
    Column("used_in_run", Text, nullable=True),
    Column("created", UTCDateTime, nullable=False),
    ForeignKeyConstraint(["feedback_id"], ["feedback.id"], ondelete="CASCADE"),
    Index(None, "feedback_id"),
    Index(None, "created"),
)

#: Policy versions: the registry's source of truth (adapter folders on disk are named by it).
policies = Table(
    "policies",
    metadata,
    Column("version", Integer, primary_key=True, autoincrement=False),
    Column("status", Text, nullable=False),  # base | candidate | promoted | rejected | retired
    Column("parent", Integer, nullable=True),
    Column("run_id", Text, nullable=True),
    Column("adapter_path", Text, nullable=True),
    Column("metrics", JSON, nullable=False),
    Column("reason", Text, nullable=True),
    Column("created", UTCDateTime, nullable=False),
    Column("promoted_at", UTCDateTime, nullable=True),
    # {file name: SHA-256} of the adapter's files, each a row of adapter_blobs (None: an adapter registered before
    # the blobs, found in its folder only).
    Column("adapter_files", NULLABLE_JSON, nullable=True),
    Index(None, "status"),
    # At most one promoted version, whatever writes race (both backends have partial unique indexes).
    Index("uq_policies_promoted", "status", unique=True, sqlite_where=text("status = 'promoted'"),
          postgresql_where=text("status = 'promoted'")),
)

#: Each process's heartbeat: who it is, whether it is ready, which versions it has loaded and which it serves as the
#: served name. Live while ``last_seen`` is recent (see :mod:`alignd.policies.replicas`); dead rows are pruned later.
replicas = Table(
    "replicas",
    metadata,
    Column("instance_id", Text, primary_key=True),  # host-pid-random, per process
    Column("host", Text, nullable=False),
    Column("pid", Integer, nullable=False),
    Column("role", Text, nullable=False),  # all | serve | trainer (--trainer, alignd trainer)
    Column("started_at", UTCDateTime, nullable=False),
    Column("last_seen", UTCDateTime, nullable=False),
    Column("ready", Boolean, nullable=False),
    Column("loaded", JSON, nullable=False),  # [version, ...] this process's registry loaded (0, the base, always)
    Column("serving", Integer, nullable=True),  # the version it routes the served name to
    Column("error", Text, nullable=True),  # why its last load of a version failed (None once one succeeds)
    Index(None, "last_seen"),
)

#: The served name's two-phase promotion (one row, name "policy"): ``desired`` is what was promoted, ``served`` what
#: the served name means; the flip (served := desired) is one conditional UPDATE of this row.
promotion = Table(
    "promotion",
    metadata,
    Column("name", Text, primary_key=True),
    Column("desired", Integer, nullable=False),
    Column("served", Integer, nullable=False),
    Column("desired_at", UTCDateTime, nullable=True),
    Column("served_at", UTCDateTime, nullable=True),
    Column("reason", Text, nullable=True),
    Column("flipped_by", Text, nullable=True),  # the instance id that performed the last flip
    Column("laggards", JSON, nullable=False),  # {instance id: why} of live replicas the last flip went ahead without
)

#: Adapter files by content (SHA-256 of the bytes): every replica fetches a version's adapter from here.
adapter_blobs = Table(
    "adapter_blobs",
    metadata,
    Column("sha256", Text, primary_key=True),
    Column("data", LargeBinary, nullable=False),  # bytea on PostgreSQL, BLOB on SQLite
    Column("size", Integer, nullable=False),
    Column("created", UTCDateTime, nullable=False),
)

#: The trainer lease: the one process allowed to run training holds this row until ``expires_at``.
trainer_lease = Table(
    "trainer_lease",
    metadata,
    Column("name", Text, primary_key=True),  # "trainer"
    Column("holder", Text, nullable=False),  # the process's instance id
    Column("expires_at", UTCDateTime, nullable=False),
    Column("acquired", UTCDateTime, nullable=False),
    # The fencing token: one more at every takeover, so a holder that lost the lease cannot write as its holder.
    Column("generation", Integer, nullable=False, server_default=text("0")),
)

#: Feedback quota counters shared by replicas: events per user (``key``) per fixed window (its start, epoch seconds).
quota_counters = Table(
    "quota_counters",
    metadata,
    Column("key", Text, nullable=False),
    Column("window", Integer, nullable=False, autoincrement=False),
    Column("count", Integer, nullable=False),
    PrimaryKeyConstraint("key", "window"),
    Index(None, "window"),
)

#: Training runs: phase and progress as the trainer reports them, figures, outcome.
training_runs = Table(
    "training_runs",
    metadata,
    Column("id", Text, primary_key=True),
    Column("status", Text, nullable=False),  # running | succeeded | failed | cancelled
    Column("phase", Text, nullable=False),
    Column("progress", Float, nullable=False),
    Column("trigger", Text, nullable=False),
    Column("parent", Integer, nullable=False),
    Column("candidate", Integer, nullable=True),
    Column("promoted", Boolean, nullable=False),
    Column("config", JSON, nullable=False),
    Column("metrics", JSON, nullable=False),
    Column("error", Text, nullable=True),
    Column("created", UTCDateTime, nullable=False),
    Column("finished", UTCDateTime, nullable=True),
    Column("holder", Text, nullable=True),  # the instance id of the process running it (its lease holder)
    Column("heartbeat", UTCDateTime, nullable=True),  # the holder's last heartbeat during the run
    Column("lease_generation", Integer, nullable=True),  # the trainer lease's generation the run started under
    Index(None, "status"),
    Index(None, "created"),
)

#: API keys added at run time (keys of the configuration are not stored). Only a hash of each key is kept.
api_keys = Table(
    "api_keys",
    metadata,
    Column("id", Text, primary_key=True),  # also part of the key itself, which is how a key finds its row
    Column("name", Text, nullable=False),  # the principal
    Column("role", Text, nullable=False),  # user | frontend | admin
    Column("key_hash", Text, nullable=False),  # SHA-256 of the key, hex
    Column("created", UTCDateTime, nullable=False),
    Column("created_by", Text, nullable=True),
    Column("revoked", UTCDateTime, nullable=True),
    Column("revoked_by", Text, nullable=True),
    Index(None, "name"),
)

#: End users an operator set a trust state for, or a training run scored (see :mod:`alignd.trainer.safeguards`).
end_users = Table(
    "end_users",
    metadata,
    Column("user", Text, primary_key=True),  # the end-user id of completions and feedback
    Column("trust", Text, nullable=False),  # default | trusted | blocked
    Column("note", Text, nullable=True),  # the operator's reason
    Column("updated", UTCDateTime, nullable=True),  # when an operator last set the trust state
    Column("updated_by", Text, nullable=True),  # the principal that set it
    Column("flagged", Boolean, nullable=False),  # the last run that scored the user found it far from consensus
    Column("agreement", Float, nullable=True),  # that run's share of the user's judgements the consensus shares
    Column("judgements", Integer, nullable=True),
    Column("p_value", Float, nullable=True),  # P(agreement this low or lower | a coin's 0.5)
    Column("scored_run", Text, nullable=True),
    Column("scored", UTCDateTime, nullable=True),
    Index(None, "flagged"),
)
