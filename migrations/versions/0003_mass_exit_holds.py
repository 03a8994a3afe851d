"""Holds placed by the mass-exit guard.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-29
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "syncer_holds",
        sa.Column("audience_id", sa.Text, primary_key=True),
        sa.Column("held_at", sa.DateTime, nullable=False),
        sa.Column("reason", sa.Text, nullable=False),
        sa.Column("approved_at", sa.DateTime, nullable=True),
    )


def downgrade() -> None:
    op.drop_table("syncer_holds")
