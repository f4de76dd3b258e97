"""Feedback events, and the preference pairs and unpaired labels derived from them.

Revision ID: 0002_feedback
Revises: 0001_completions
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from alignd.store.tables import UTCDateTime

revision = "0002_feedback"
down_revision = "0001_completions"
branch_labels = None
depends_on = None


def _provenance() -> list[sa.Column]:
    return [sa.Column("id", sa.Integer(), nullable=False, autoincrement=True),
            sa.Column("feedback_id", sa.Text(), nullable=False),
            sa.Column("completion_id", sa.Text(), nullable=False),
            sa.Column("kind", sa.Text(), nullable=False),
            sa.Column("policy_version", sa.Integer(), nullable=False)]


def upgrade() -> None:
    op.create_table(
        "feedback",
        sa.Column("id", sa.Text(), nullable=False),
        sa.Column("completion_id", sa.Text(), nullable=False),
        sa.Column("kind", sa.Text(), nullable=False),
        sa.Column("choice", sa.Integer(), nullable=True),
        sa.Column("payload", sa.JSON(), nullable=False),
        sa.Column("user", sa.Text(), nullable=True),
        sa.Column("comment", sa.Text(), nullable=True),
        sa.Column("tags", sa.JSON(), nullable=False),
        sa.Column("idempotency_key", sa.Text(), nullable=True),
        sa.Column("request_hash", sa.Text(), nullable=True),
        sa.Column("policy_version", sa.Integer(), nullable=False),
        sa.Column("pair_count", sa.Integer(), nullable=False),
        sa.Column("label_count", sa.Integer(), nullable=False),
        sa.Column("created", UTCDateTime(), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_feedback"),
        sa.ForeignKeyConstraint(["completion_id"], ["completions.id"], ondelete="CASCADE",
                                name="fk_feedback_completion_id_completions"),
    )
    op.create_index("ix_feedback_completion_id", "feedback", ["completion_id", "kind"])
    op.create_index("ix_feedback_created", "feedback", ["created"])
    op.create_index("ix_feedback_idempotency_key", "feedback", ["idempotency_key"], unique=True)
    op.create_table(
        "preference_pairs",
        *_provenance(),
        sa.Column("prompt", sa.JSON(), nullable=False),
        sa.Column("chosen", sa.Text(), nullable=False),
        sa.Column("rejected", sa.Text(), nullable=False),
        sa.Column("chosen_choice", sa.Integer(), nullable=True),
        sa.Column("rejected_choice", sa.Integer(), nullable=True),
        sa.Column("margin", sa.Float(), nullable=False),
        sa.Column("weight", sa.Float(), nullable=False),
        sa.Column("used_in_run", sa.Text(), nullable=True),
        sa.Column("created", UTCDateTime(), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_preference_pairs"),
        sa.ForeignKeyConstraint(["feedback_id"], ["feedback.id"], ondelete="CASCADE",
                                name="fk_preference_pairs_feedback_id_feedback"),
    )
    op.create_index("ix_preference_pairs_feedback_id", "preference_pairs", ["feedback_id"])
    op.create_index("ix_preference_pairs_created", "preference_pairs", ["created"])
    op.create_table(
        "labels",
        *_provenance(),
        sa.Column("choice", sa.Integer(), nullable=True),
        sa.Column("prompt", sa.JSON(), nullable=False),
        sa.Column("reply", sa.Text(), nullable=False),
        sa.Column("good", sa.Boolean(), nullable=False),
        sa.Column("weight", sa.Float(), nullable=False),
        sa.Column("used_in_run", sa.Text(), nullable=True),
        sa.Column("created", UTCDateTime(), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_labels"),
        sa.ForeignKeyConstraint(["feedback_id"], ["feedback.id"], ondelete="CASCADE",
                                name="fk_labels_feedback_id_feedback"),
    )
    op.create_index("ix_labels_feedback_id", "labels", ["feedback_id"])
    op.create_index("ix_labels_created", "labels", ["created"])


def downgrade() -> None:
    op.drop_table("labels")
    op.drop_table("preference_pairs")
    op.drop_table("feedback")
