"""Privacy deletions, suppressed users, and per-(URL, audience) sync state.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-29
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

_ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    op.create_table(
        "syncer_deleted_users",
        sa.Column("user_id", sa.Text, primary_key=True),
        sa.Column("requested_at", sa.DateTime, nullable=False),
    )
    op.create_table(
        "syncer_deletions",
        sa.Column("id", _ID, primary_key=True, autoincrement=True),
        sa.Column("user_id", sa.Text, nullable=False),
        sa.Column(
            "destination_id", sa.Integer, sa.ForeignKey("syncer_destinations.id"), nullable=False
        ),
        sa.Column("requested_at", sa.DateTime, nullable=False),
        sa.Column("delivered_at", sa.DateTime, nullable=True),
        sa.Column("attempts", sa.Integer, nullable=False),
        sa.Column("last_status", sa.Integer, nullable=True),
        sa.Column("last_error", sa.Text, nullable=True),
        sa.Column("last_attempt_at", sa.DateTime, nullable=True),
        sa.UniqueConstraint(
            "user_id", "destination_id", name="uq_syncer_deletions_user_destination"
        ),
        sqlite_autoincrement=True,
    )
    op.create_table(
        "syncer_pair_state",
        sa.Column(
            "destination_id", sa.Integer, sa.ForeignKey("syncer_destinations.id"), nullable=False
        ),
        sa.Column("audience_id", sa.Text, nullable=False),
        sa.Column("last_run_id", _ID, nullable=True),
        sa.Column("last_attempt_at", sa.DateTime, nullable=True),
        sa.Column("last_success_at", sa.DateTime, nullable=True),
        sa.PrimaryKeyConstraint("destination_id", "audience_id"),
    )


def downgrade() -> None:
    op.drop_table("syncer_pair_state")
    op.drop_table("syncer_deletions")
    op.drop_table("syncer_deleted_users")
