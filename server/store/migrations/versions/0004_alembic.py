"""Alembic keeps the schema's version from here on: drop the hand-written runner's ``schema_migrations``.

Revision ID: 0004_alembic
Revises: 0003_policies_and_runs

A database an earlier alignd migrated has the table (and was stamped at the revision matching its last version);
a database Alembic created from the start never had it.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004_alembic"
down_revision = "0003_policies_and_runs"
branch_labels = None
depends_on = None


def upgrade() -> None:
    if sa.inspect(op.get_bind()).has_table("schema_migrations"):
        op.drop_table("schema_migrations")


def downgrade() -> None:
    pass  # the old runner's bookkeeping is not recreated
