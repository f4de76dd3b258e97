"""Indexes on the end user of completions and feedback events, so that deleting one user's rows reads only theirs.

Revision ID: 0006_user_indexes
Revises: 0005_principals
"""

from __future__ import annotations

from alembic import op

revision = "0006_user_indexes"
down_revision = "0005_principals"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_index("ix_completions_user", "completions", ["user"])
    op.create_index("ix_feedback_user", "feedback", ["user"])


def downgrade() -> None:
    op.drop_index("ix_feedback_user", table_name="feedback")
    op.drop_index("ix_completions_user", table_name="completions")
