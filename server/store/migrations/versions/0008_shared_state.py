"""State replicas share through the database: adapter files as content-addressed blobs, the trainer lease, runs'
holder and heartbeat, at most one promoted version, and the feedback quota's counters.

Rows written before keep working: a version without ``adapter_files`` is read from its folder, a run without a
holder is failed as an orphan like before.

Revision ID: 0008_shared_state
Revises: 0007_end_users
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from alignd.store.tables import UTCDateTime

revision = "0008_shared_state"
down_revision = "0007_end_users"
branch_labels = None
depends_on = None

_PROMOTED = sa.text("status = 'promoted'")


def upgrade() -> None:
    op.create_table(
        "adapter_blobs",
        sa.Column("sha256", sa.Text(), nullable=False),
        sa.Column("data", sa.LargeBinary(), nullable=False),
        sa.Column("size", sa.Integer(), nullable=False),
        sa.Column("created", UTCDateTime(), nullable=False),
        sa.PrimaryKeyConstraint("sha256", name="pk_adapter_blobs"),
    )
    op.create_table(
        "trainer_lease",
        sa.Column("name", sa.Text(), nullable=False),
        sa.Column("holder", sa.Text(), nullable=False),
        sa.Column("expires_at", UTCDateTime(), nullable=False),
        sa.Column("acquired", UTCDateTime(), nullable=False),
        sa.PrimaryKeyConstraint("name", name="pk_trainer_lease"),
    )
    op.create_table(
        "quota_counters",
        sa.Column("key", sa.Text(), nullable=False),
        sa.Column("window", sa.Integer(), autoincrement=False, nullable=False),
        sa.Column("count", sa.Integer(), nullable=False),
        sa.PrimaryKeyConstraint("key", "window", name="pk_quota_counters"),
    )
    op.create_index("ix_quota_counters_window", "quota_counters", ["window"])
    op.add_column("policies", sa.Column("adapter_files", sa.JSON(none_as_null=True), nullable=True))
    op.add_column("training_runs", sa.Column("holder", sa.Text(), nullable=True))
    op.add_column("training_runs", sa.Column("heartbeat", UTCDateTime(), nullable=True))
    # Two concurrent promotions could leave two promoted rows before: keep the most recently promoted one.
    op.execute("""
        UPDATE policies SET status = 'retired'
        WHERE status = 'promoted' AND version <> (
            SELECT version FROM policies WHERE status = 'promoted'
            ORDER BY promoted_at DESC, version DESC LIMIT 1)
    """)
    op.create_index("uq_policies_promoted", "policies", ["status"], unique=True, sqlite_where=_PROMOTED,
                    postgresql_where=_PROMOTED)


def downgrade() -> None:
    op.drop_index("uq_policies_promoted", "policies")
    with op.batch_alter_table("training_runs") as batch:
        batch.drop_column("heartbeat")
        batch.drop_column("holder")
    with op.batch_alter_table("policies") as batch:
        batch.drop_column("adapter_files")
    op.drop_table("quota_counters")
    op.drop_table("trainer_lease")
    op.drop_table("adapter_blobs")
