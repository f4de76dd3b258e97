"""End users' trust states (set by operators) and agreement scores (written by training runs).

Revision ID: 0007_end_users
Revises: 0006_user_indexes
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from alignd.store.tables import UTCDateTime

revision = "0007_end_users"
down_revision = "0006_user_indexes"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "end_users",
        sa.Column("user", sa.Text(), nullable=False),
        sa.Column("trust", sa.Text(), nullable=False),
        sa.Column("note", sa.Text(), nullable=True),
        sa.Column("updated", UTCDateTime(), nullable=True),
        sa.Column("updated_by", sa.Text(), nullable=True),
        sa.Column("flagged", sa.Boolean(), nullable=False),
        sa.Column("agreement", sa.Float(), nullable=True),
        sa.Column("judgements", sa.Integer(), nullable=True),
        sa.Column("p_value", sa.Float(), nullable=True),
        sa.Column("scored_run", sa.Text(), nullable=True),
        sa.Column("scored", UTCDateTime(), nullable=True),
        sa.PrimaryKeyConstraint("user", name="pk_end_users"),
    )
    op.create_index("ix_end_users_flagged", "end_users", ["flagged"])


def downgrade() -> None:
    op.drop_table("end_users")
