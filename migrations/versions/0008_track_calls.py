"""Track mode: the call (identify or track) that tells a URL about each queued change.

A change keeps the call it was planned with, so that its retries send the same bytes under the
same messageId whatever the URL's `send` says meanwhile; changes planned before this migration
are identify calls, as everything was. On PostgreSQL `syncer_exchange` also returns the call of
each change it claims (its result type changes, so it is dropped and created again).

Revision ID: 0008
Revises: 0007
Create Date: 2026-11-30
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import sqlalchemy as sa
from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None

_SIGNATURE = (
    "syncer_exchange(integer, text, text, text, double precision, bigint[], text[], timestamp,"
    " integer, bigint, boolean)"
)


def _exchange_of_0007() -> str:
    # Migration 0007's function, read from its file beside this one (the migrations ship
    # together, in the repository and in the wheel), so that this one is written as its changes.
    path = Path(__file__).with_name("0007_postgresql_exchange.py")
    spec = importlib.util.spec_from_file_location("syncer_migration_0007", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return str(module.EXCHANGE)


# Kept in step with syncer/store/outbox.py, as migration 0007's function was. This one differs
# from it by the claimed changes' call, and by the claim's cursor, a row value that only the
# pair's index serves: (0007's text, this one's).
_CHANGES = [
    (
        "          AND o.status = 'pending' AND o.id > p_after_id",
        "          AND o.status = 'pending'\n"
        "          AND (o.destination_id, o.audience_id, o.id)\n"
        "              > (p_destination_id, p_audience_id, p_after_id)",
    ),
    (
        "value text, anonymous_id text, email text, created_at timestamp)",
        "value text, anonymous_id text, email text, created_at timestamp, call text)",
    ),
    (
        "        NULL::text, NULL::text, NULL::timestamp;",
        "        NULL::text, NULL::text, NULL::timestamp, NULL::text;",
    ),
    (
        "o.anonymous_id, o.email, o.created_at\n",
        "o.anonymous_id, o.email, o.created_at, o.call\n",
    ),
    (
        "           c.created_at\n    FROM claimed c",
        "           c.created_at, c.call\n    FROM claimed c",
    ),
]


def _exchange() -> str:
    text = _exchange_of_0007()
    for old, new in _CHANGES:
        if text.count(old) != 1:
            raise RuntimeError(f"migration 0007's function no longer reads {old!r}")
        text = text.replace(old, new)
    return text


def upgrade() -> None:
    with op.batch_alter_table("syncer_outbox") as batch:
        batch.add_column(sa.Column("call", sa.Text, nullable=False, server_default="identify"))
    if op.get_bind().dialect.name == "postgresql":
        op.execute(f"DROP FUNCTION IF EXISTS {_SIGNATURE}")
        op.execute(_exchange())


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute(f"DROP FUNCTION IF EXISTS {_SIGNATURE}")
        op.execute(_exchange_of_0007())
    with op.batch_alter_table("syncer_outbox") as batch:
        batch.drop_column("call")
