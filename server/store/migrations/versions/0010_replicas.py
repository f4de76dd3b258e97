"""Consistent promotion across replicas: each process's heartbeat (``replicas``) and the served name's two-phase
promotion (``promotion``: the *desired* version an operator or the trainer promoted, and the *served* one that
``alignd`` means now, which becomes the desired one once every live replica has loaded it, or after a timeout).

The one ``promotion`` row starts with both at the version promoted before (the base if none).

Revision ID: 0010_replicas
Revises: 0008_shared_state
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from alignd.store.tables import UTCDateTime

revision = "0010_replicas"
down_revision = "0008_shared_state"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "replicas",
        sa.Column("instance_id", sa.Text(), nullable=False),
        sa.Column("host", sa.Text(), nullable=False),
        sa.Column("pid", sa.Integer(), nullable=False),
        sa.Column("role", sa.Text(), nullable=False),
        sa.Column("started_at", UTCDateTime(), nullable=False),
        sa.Column("last_seen", UTCDateTime(), nullable=False),
        sa.Column("ready", sa.Boolean(), nullable=False),
        sa.Column("loaded", sa.JSON(), nullable=False),
        sa.Column("serving", sa.Integer(), nullable=True),
        sa.Column("error", sa.Text(), nullable=True),
        sa.PrimaryKeyConstraint("instance_id", name="pk_replicas"),
    )
    op.create_index("ix_replicas_last_seen", "replicas", ["last_seen"])
    op.create_table(
        "promotion",
        sa.Column("name", sa.Text(), nullable=False),
        sa.Column("desired", sa.Integer(), nullable=False),
        sa.Column("served", sa.Integer(), nullable=False),
        sa.Column("desired_at", UTCDateTime(), nullable=True),
        sa.Column("served_at", UTCDateTime(), nullable=True),
        sa.Column("reason", sa.Text(), nullable=True),
        sa.Column("flipped_by", sa.Text(), nullable=True),
        sa.Column("laggards", sa.JSON(), nullable=False),  # {instance id: why}
        sa.PrimaryKeyConstraint("name", name="pk_promotion"),
    )
    op.execute("""
        INSERT INTO promotion (name, desired, served, laggards)
        SELECT 'policy', v, v, '{}' FROM (
            SELECT COALESCE((SELECT version FROM policies WHERE status = 'promoted'), 0) AS v) AS current
    """)


def downgrade() -> None:
    op.drop_table("promotion")
    op.drop_index("ix_replicas_last_seen", "replicas")
    op.drop_table("replicas")
