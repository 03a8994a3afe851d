"""The input contract and the syncer's records.

Revision ID: 0001
Revises:
Create Date: 2026-11-29
"""

from __future__ import annotations

import uuid

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

_ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    existing = set(sa.inspect(op.get_bind()).get_table_names())
    # Upstream jobs may have created the input tables before the syncer was installed.
    if "audiences" not in existing:
        op.create_table(
            "audiences",
            sa.Column("id", sa.Text, primary_key=True),
            sa.Column("name", sa.Text, nullable=False),
            sa.Column("key", sa.Text, nullable=True, unique=True),
            sa.Column("enabled", sa.Boolean, nullable=False, server_default=sa.true()),
            sa.Column("created_at", sa.DateTime, nullable=True),
        )
    if "audience_memberships" not in existing:
        op.create_table(
            "audience_memberships",
            sa.Column("audience_id", sa.Text, sa.ForeignKey("audiences.id"), nullable=False),
            sa.Column("user_id", sa.Text, nullable=False),
            sa.Column("anonymous_id", sa.Text, nullable=True),
            sa.Column("email", sa.Text, nullable=True),
            sa.PrimaryKeyConstraint("audience_id", "user_id"),
        )
    op.create_table(
        "syncer_meta",
        sa.Column("name", sa.Text, primary_key=True),
        sa.Column("value", sa.Text, nullable=False),
    )
    op.bulk_insert(
        sa.table("syncer_meta", sa.column("name", sa.Text), sa.column("value", sa.Text)),
        [{"name": "message_namespace", "value": str(uuid.uuid4())}],
    )
    op.create_table(
        "syncer_destinations",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("url", sa.Text, nullable=False, unique=True),
        sa.Column("first_seen_at", sa.DateTime, nullable=False),
    )
    op.create_table(
        "syncer_audience_keys",
        sa.Column("audience_id", sa.Text, primary_key=True),
        sa.Column("key", sa.Text, nullable=False, unique=True),
        sa.Column("locked_at", sa.DateTime, nullable=False),
    )
    op.create_table(
        "syncer_delivered",
        sa.Column(
            "destination_id", sa.Integer, sa.ForeignKey("syncer_destinations.id"), nullable=False
        ),
        sa.Column("audience_id", sa.Text, nullable=False),
        sa.Column("user_id", sa.Text, nullable=False),
        sa.Column("value", sa.Text, nullable=False),
        sa.Column("anonymous_id", sa.Text, nullable=True),
        sa.Column("email", sa.Text, nullable=True),
        sa.Column("message_id", sa.Text, nullable=False),
        sa.Column("delivered_at", sa.DateTime, nullable=False),
        sa.PrimaryKeyConstraint("destination_id", "audience_id", "user_id"),
    )
    op.create_index("ix_syncer_delivered_user", "syncer_delivered", ["user_id"])
    op.create_table(
        "syncer_outbox",
        sa.Column("id", _ID, primary_key=True, autoincrement=True),
        sa.Column(
            "destination_id", sa.Integer, sa.ForeignKey("syncer_destinations.id"), nullable=False
        ),
        sa.Column("audience_id", sa.Text, nullable=False),
        sa.Column("user_id", sa.Text, nullable=False),
        sa.Column("value", sa.Text, nullable=False),
        sa.Column("anonymous_id", sa.Text, nullable=True),
        sa.Column("email", sa.Text, nullable=True),
        sa.Column("forced", sa.Boolean, nullable=False),
        sa.Column("created_at", sa.DateTime, nullable=False),
        sa.Column("status", sa.Text, nullable=False),
        sa.Column("attempts", sa.Integer, nullable=False),
        sa.Column("rejections", sa.Integer, nullable=False),
        sa.Column("last_status", sa.Integer, nullable=True),
        sa.Column("last_error", sa.Text, nullable=True),
        sa.Column("last_attempt_at", sa.DateTime, nullable=True),
        sa.UniqueConstraint(
            "destination_id", "audience_id", "user_id", name="uq_syncer_outbox_change"
        ),
        sqlite_autoincrement=True,
    )
    op.create_index("ix_syncer_outbox_user", "syncer_outbox", ["user_id"])
    op.create_table(
        "syncer_runs",
        sa.Column("id", _ID, primary_key=True, autoincrement=True),
        sa.Column("trigger", sa.Text, nullable=False),
        sa.Column("started_at", sa.DateTime, nullable=False),
        sa.Column("finished_at", sa.DateTime, nullable=True),
        sa.Column("status", sa.Text, nullable=False),
        sa.Column("audiences", sa.Integer, nullable=False),
        sa.Column("entered", sa.Integer, nullable=False),
        sa.Column("exited", sa.Integer, nullable=False),
        sa.Column("delivered", sa.Integer, nullable=False),
        sa.Column("pending", sa.Integer, nullable=False),
        sa.Column("rejected", sa.Integer, nullable=False),
        sa.Column("error", sa.Text, nullable=True),
        sqlite_autoincrement=True,
    )
    op.create_table(
        "syncer_leases",
        sa.Column("name", sa.Text, primary_key=True),
        sa.Column("holder", sa.Text, nullable=False),
        sa.Column("expires_at", sa.DateTime, nullable=False),
    )


def downgrade() -> None:
    for table in (
        "syncer_leases",
        "syncer_runs",
        "syncer_outbox",
        "syncer_delivered",
        "syncer_audience_keys",
        "syncer_destinations",
        "syncer_meta",
    ):
        op.drop_table(table)
