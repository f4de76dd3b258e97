"""Principals: API keys added at run time (hashed), and the principal that made each completion and feedback event.

Revision ID: 0005_principals
Revises: 0004_alembic

Rows from before have no principal: their completions stay open to admins' feedback only, once keys are in use.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from alignd.store.tables import UTCDateTime

revision = "0005_principals"
down_revision = "0004_alembic"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("completions", sa.Column("principal", sa.Text(), nullable=True))
    op.add_column("feedback", sa.Column("principal", sa.Text(), nullable=True))
    op.create_table(
        "api_keys",
        sa.Column("id", sa.Text(), nullable=False),
        sa.Column("name", sa.Text(), nullable=False),
        sa.Column("role", sa.Text(), nullable=False),
        sa.Column("key_hash", sa.Text(), nullable=False),
        sa.Column("created", UTCDateTime(), nullable=False),
        sa.Column("created_by", sa.Text(), nullable=True),
        sa.Column("revoked", UTCDateTime(), nullable=True),
        sa.Column("revoked_by", sa.Text(), nullable=True),
        sa.PrimaryKeyConstraint("id", name="pk_api_keys"),
    )
    op.create_index("ix_api_keys_name", "api_keys", ["name"])


def downgrade() -> None:
    op.drop_table("api_keys")
    with op.batch_alter_table("feedback") as batch:
        batch.drop_column("principal")
    with op.batch_alter_table("completions") as batch:
        batch.drop_column("principal")
