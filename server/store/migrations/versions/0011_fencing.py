"""Fencing tokens for the trainer lease: the lease's ``generation`` (one more at every takeover) and the generation
each run started under (``training_runs.lease_generation``). A trainer's registration, promotion and run-row writes
land only while the lease still has its holder and that generation, so a trainer that lost the lease while paused
changes nothing when it wakes.

A lease held now starts at generation 0; runs written before have none (their writes are not fenced: they were
started by an alignd that did not fence).

Revision ID: 0011_fencing
Revises: 0010_replicas
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0011_fencing"
down_revision = "0010_replicas"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("trainer_lease", sa.Column("generation", sa.Integer(), nullable=False, server_default=sa.text("0")))
    op.add_column("training_runs", sa.Column("lease_generation", sa.Integer(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("training_runs") as batch:
        batch.drop_column("lease_generation")
    with op.batch_alter_table("trainer_lease") as batch:
        batch.drop_column("generation")
