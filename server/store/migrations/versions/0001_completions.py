"""Completions and their choices.

Revision ID: 0001_completions
Revises:
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from alignd.store.tables import NULLABLE_JSON, UTCDateTime

revision = "0001_completions"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "completions",
        sa.Column("id", sa.Text(), nullable=False),
        sa.Column("created", UTCDateTime(), nullable=False),
        sa.Column("model", sa.Text(), nullable=False),
        sa.Column("policy_version", sa.Integer(), nullable=False),
        sa.Column("messages", sa.JSON(), nullable=False),
        sa.Column("params", sa.JSON(), nullable=False),
        sa.Column("user", sa.Text(), nullable=True),
        sa.Column("metadata", NULLABLE_JSON, nullable=True),
        sa.Column("prompt_tokens", sa.Integer(), nullable=False),
        sa.Column("completion_tokens", sa.Integer(), nullable=False),
        sa.Column("latency_ms", sa.Float(), nullable=False),
        sa.Column("stream", sa.Boolean(), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_completions"),
    )
    op.create_index("ix_completions_created", "completions", ["created"])
    op.create_index("ix_completions_policy_version", "completions", ["policy_version"])
    op.create_table(
        "choices",
        sa.Column("completion_id", sa.Text(), nullable=False),
        sa.Column("index", sa.Integer(), nullable=False, autoincrement=False),
        sa.Column("text", sa.Text(), nullable=False),
        sa.Column("token_ids", sa.JSON(), nullable=False),
        sa.Column("finish_reason", sa.Text(), nullable=True),
        sa.PrimaryKeyConstraint("completion_id", "index", name="pk_choices"),
        sa.ForeignKeyConstraint(["completion_id"], ["completions.id"], ondelete="CASCADE",
                                name="fk_choices_completion_id_completions"),
    )


def downgrade() -> None:
    op.drop_table("choices")
    op.drop_table("completions")
