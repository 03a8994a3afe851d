"""Computed traits: their input tables, and the kind of every pair the syncer keeps; and the
calls of a change sent both ways.

Upstream jobs write `computed_traits` and `computed_trait_values` (created here when missing,
as the audience tables were by 0001). The syncer's tables keep, beside each audience id, its
`kind` ('audience' or 'trait'), in their keys: an audience and a trait may share an id. Rows
from before this migration are audiences'. On PostgreSQL `syncer_exchange` takes the kind of
the pair it claims for, returns it with each recorded change, and checks a trait's change
against the trait's current value (by jsonb equality) where an audience's is checked against
membership. `syncer_query_members` and `syncer_query_values` keep what the queries of audiences
and traits defined in the settings returned at their last evaluation. A change a URL is sent
both ways (identify and track) records the call the URL has accepted (`done_call`) until it has
accepted both; `syncer_exchange` returns it.

Revision ID: 0009
Revises: 0008
Create Date: 2026-11-30
"""

from __future__ import annotations

import importlib.util
import warnings
from pathlib import Path

import sqlalchemy as sa
from alembic import op

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None

_SIGNATURE_0008 = (
    "syncer_exchange(integer, text, text, text, double precision, bigint[], text[], timestamp,"
    " integer, bigint, boolean)"
)
_SIGNATURE = (
    "syncer_exchange(integer, text, text, text, text, double precision, bigint[], text[],"
    " timestamp, integer, bigint, boolean)"
)
_KIND = "kind"


def _exchange_of_0008() -> str:
    # Migration 0008's function, built from its file beside this one, as 0008 built it from 0007.
    path = Path(__file__).with_name("0008_track_calls.py")
    spec = importlib.util.spec_from_file_location("syncer_migration_0008", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return str(module._exchange())


# Kept in step with syncer/store/outbox.py (_CLAIMABLE, _ACCEPT_MINE, _UPSERT_TOLD_POSTGRESQL,
# _HOLD): 0008's text and this one's.
_CHANGES = [
    (
        "value text, anonymous_id text, email text, created_at timestamp, call text)",
        "value text, anonymous_id text, email text, created_at timestamp, call text,\n"
        "               done_call text)",
    ),
    (
        "        NULL::text, NULL::text, NULL::timestamp, NULL::text;",
        "        NULL::text, NULL::text, NULL::timestamp, NULL::text, NULL::text;",
    ),
    (
        "o.anonymous_id, o.email, o.created_at, o.call\n",
        "o.anonymous_id, o.email, o.created_at, o.call,\n                  o.done_call\n",
    ),
    (
        "           c.created_at, c.call\n    FROM claimed c",
        "           c.created_at, c.call, c.done_call\n    FROM claimed c",
    ),
    (
        "    p_destination_id integer, p_audience_id text, p_claim_token text,",
        "    p_destination_id integer, p_audience_id text, p_kind text, p_claim_token text,",
    ),
    (
        "            RETURNING o.audience_id, o.user_id, o.value, o.anonymous_id, o.email,"
        " h.message_id",
        "            RETURNING o.audience_id, o.kind, o.user_id, o.value, o.anonymous_id,\n"
        "                      o.email, h.message_id",
    ),
    (
        "            INSERT INTO syncer_state (destination_id, audience_id, user_id, value,"
        " unsure,\n"
        "                                      anonymous_id, email, message_id, told_at)\n"
        "            SELECT p_destination_id, t.audience_id, t.user_id, t.value, false,",
        "            INSERT INTO syncer_state (destination_id, audience_id, kind, user_id, value,\n"
        "                                      unsure, anonymous_id, email, message_id, told_at)\n"
        "            SELECT p_destination_id, t.audience_id, t.kind, t.user_id, t.value, false,",
    ),
    (
        "            ON CONFLICT (destination_id, audience_id, user_id) DO UPDATE SET",
        "            ON CONFLICT (destination_id, audience_id, kind, user_id) DO UPDATE SET",
    ),
    (
        "        WHERE p.destination_id = p_destination_id AND p.audience_id = p_audience_id;",
        "        WHERE p.destination_id = p_destination_id AND p.audience_id = p_audience_id\n"
        "          AND p.kind = p_kind;",
    ),
    (
        "            ON m.audience_id = p_audience_id AND m.user_id = o.user_id\n",
        "            ON p_kind = 'audience' AND m.audience_id = p_audience_id\n"
        "               AND m.user_id = o.user_id\n"
        "        LEFT JOIN computed_trait_values v\n"
        "            ON p_kind = 'trait' AND v.trait_id = p_audience_id\n"
        "               AND v.user_id = o.user_id\n",
    ),
    (
        "        WHERE o.destination_id = p_destination_id AND o.audience_id = p_audience_id\n",
        "        WHERE o.destination_id = p_destination_id AND o.audience_id = p_audience_id\n"
        "          AND o.kind = p_kind\n",
    ),
    (
        "          AND ((o.value = 'true' AND m.user_id IS NOT NULL)\n"
        "               OR (o.value = 'false' AND m.user_id IS NULL))\n",
        "          AND CASE WHEN p_kind = 'audience' THEN\n"
        "                  (o.value = 'true' AND m.user_id IS NOT NULL)\n"
        "                  OR (o.value = 'false' AND m.user_id IS NULL)\n"
        "              ELSE CAST(o.value AS jsonb)\n"
        "                  = coalesce(CAST(CAST(v.value AS text) AS jsonb), 'null'::jsonb)\n"
        "              END\n",
    ),
]


def _exchange() -> str:
    text = _exchange_of_0008()
    for old, new in _CHANGES:
        if text.count(old) != 1:
            raise RuntimeError(f"migration 0008's function no longer reads {old!r}")
        text = text.replace(old, new)
    return text


def _kind_column() -> sa.Column[str]:
    return sa.Column(_KIND, sa.Text, nullable=False, server_default="audience")


def _partial(where: str) -> dict[str, object]:
    return {"sqlite_where": sa.text(where), "postgresql_where": sa.text(where)}


def _state_indexes(dialect: str, columns: list[str]) -> None:
    true_ = "1" if dialect == "sqlite" else "true"
    op.create_index(
        "ix_syncer_state_told_true", "syncer_state", columns, **_partial("value = 'true'")
    )
    op.create_index(
        "ix_syncer_state_unsure", "syncer_state", columns, **_partial(f"unsure = {true_}")
    )


def _primary_key(connection: sa.Connection, table: str, columns: list[str]) -> None:
    """Make ``columns`` the table's primary key (the kind column added first)."""
    if connection.dialect.name == "postgresql":
        op.add_column(table, _kind_column())
        name = connection.execute(
            sa.text(
                "SELECT conname FROM pg_constraint "
                "WHERE conrelid = CAST(:table AS regclass) AND contype = 'p'"
            ),
            {"table": table},
        ).scalar_one()
        op.execute(f'ALTER TABLE {table} DROP CONSTRAINT "{name}"')
        op.create_primary_key(f"{table}_pkey", table, columns)
        return
    # SQLite cannot alter a primary key: the table is copied into one made with the new key.
    # SQLAlchemy warns that the copy's key differs from the reflected table's: that is the point.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "Table '_alembic_tmp_", sa.exc.SAWarning)
        with op.batch_alter_table(table, recreate="always") as batch:
            batch.add_column(_kind_column())
            batch.create_primary_key(f"{table}_pkey", columns)


def upgrade() -> None:
    connection = op.get_bind()
    dialect = connection.dialect.name
    existing = set(sa.inspect(connection).get_table_names())
    if "computed_traits" not in existing:
        op.create_table(
            "computed_traits",
            sa.Column("id", sa.Text, primary_key=True),
            sa.Column("name", sa.Text, nullable=False),
            sa.Column("key", sa.Text, nullable=True, unique=True),
            sa.Column("enabled", sa.Boolean, nullable=False, server_default=sa.true()),
            sa.Column("created_at", sa.DateTime, nullable=True),
        )
    if "computed_trait_values" not in existing:
        op.create_table(
            "computed_trait_values",
            sa.Column("trait_id", sa.Text, sa.ForeignKey("computed_traits.id"), nullable=False),
            sa.Column("user_id", sa.Text, nullable=False),
            sa.Column("value", sa.JSON().with_variant(sa.Text(), "sqlite"), nullable=True),
            sa.PrimaryKeyConstraint("trait_id", "user_id"),
        )
    # What the queries of audiences and traits defined in the settings returned at their last
    # evaluation: the members and values such an audience or trait is diffed against.
    op.create_table(
        "syncer_query_members",
        sa.Column("audience_id", sa.Text, nullable=False),
        sa.Column("user_id", sa.Text, nullable=False),
        sa.Column("anonymous_id", sa.Text, nullable=True),
        sa.Column("email", sa.Text, nullable=True),
        sa.PrimaryKeyConstraint("audience_id", "user_id"),
    )
    op.create_table(
        "syncer_query_values",
        sa.Column("trait_id", sa.Text, nullable=False),
        sa.Column("user_id", sa.Text, nullable=False),
        sa.Column("value", sa.Text, nullable=True),
        sa.PrimaryKeyConstraint("trait_id", "user_id"),
    )
    for name in ("ix_syncer_state_told_true", "ix_syncer_state_unsure"):
        op.drop_index(name, table_name="syncer_state")
    _primary_key(connection, "syncer_audience_keys", ["audience_id", _KIND])
    _primary_key(connection, "syncer_state", ["destination_id", "audience_id", _KIND, "user_id"])
    _primary_key(connection, "syncer_pairs", ["destination_id", "audience_id", _KIND])
    _state_indexes(dialect, ["destination_id", "audience_id", _KIND, "user_id"])
    with op.batch_alter_table("syncer_outbox") as batch:
        batch.add_column(_kind_column())
        batch.add_column(sa.Column("done_call", sa.Text, nullable=True))
    op.drop_index("uq_syncer_outbox_change", table_name="syncer_outbox")
    op.create_index(
        "uq_syncer_outbox_change",
        "syncer_outbox",
        ["destination_id", "audience_id", _KIND, "user_id"],
        unique=True,
    )
    if dialect == "postgresql":
        op.execute(f"DROP FUNCTION IF EXISTS {_SIGNATURE_0008}")
        op.execute(_exchange())


def downgrade() -> None:
    raise NotImplementedError(
        "0009 cannot be undone once traits were synced: restore a backup taken before migrating"
    )
