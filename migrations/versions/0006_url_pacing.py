"""Pacing per workflow URL: the next free send slot, shared by every worker.

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-29
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("syncer_destinations") as batch:
        batch.add_column(sa.Column("next_send_at", sa.Double, nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("syncer_destinations") as batch:
        batch.drop_column("next_send_at")
