"""Which process a run belongs to (so that a run whose process died can be marked crashed),
how many changes it left parked,
and an index that lets delivery page through one (URL, audience)'s outbox by id without sorting.

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-29
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("syncer_runs") as batch:
        batch.add_column(sa.Column("holder", sa.Text, nullable=True))
        batch.add_column(sa.Column("parked", sa.Integer, nullable=False, server_default="0"))
    op.create_index(
        "ix_syncer_outbox_pair_id", "syncer_outbox", ["destination_id", "audience_id", "id"]
    )


def downgrade() -> None:
    op.drop_index("ix_syncer_outbox_pair_id", "syncer_outbox")
    with op.batch_alter_table("syncer_runs") as batch:
        batch.drop_column("parked")
        batch.drop_column("holder")
