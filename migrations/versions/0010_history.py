"""History: the change log, audience sizes per run, and what a monitor needs of runs and URLs.

`syncer_change_log` keeps every outcome recorded for a change sent to a URL (delivered,
retryable, refused, rejected, parked), with what its body is rebuilt from, so that `explain`
and `replay` need nothing else; it is written in the transaction that records the outcome, on
PostgreSQL inside `syncer_exchange`, which therefore takes the run's id and the attempts of
each delivery. `syncer_sizes` keeps each audience's and trait's size at each run.
`syncer_change_log_purged` counts, per run and URL, the deliveries forgotten with deleted users
(a count, no identity), for `replay` to report.
`syncer_runs` gains the counts a monitor alerts on; `syncer_destinations` counts the runs in a
row in which a URL failed.

Revision ID: 0010
Revises: 0009
Create Date: 2026-11-30
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import sqlalchemy as sa
from alembic import op

revision = "0010"
down_revision = "0009"
branch_labels = None
depends_on = None

_SIGNATURE_0009 = (
    "syncer_exchange(integer, text, text, text, text, double precision, bigint[], text[],"
    " timestamp, integer, bigint, boolean)"
)


def _exchange_of_0009() -> str:
    # Migration 0009's function, built from its file beside this one, as 0009 built it from 0008.
    path = Path(__file__).with_name("0009_computed_traits.py")
    spec = importlib.util.spec_from_file_location("syncer_migration_0009", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return str(module._exchange())


# Kept in step with syncer/store/outbox.py and syncer/store/history.py: 0009's text and this
# one's. The accepted rows are logged in the statement that takes them; a user deleted
# meanwhile loses the log rows just written, as they lose the state.
_CHANGES = [
    (
        "    p_destination_id integer, p_audience_id text, p_kind text, p_claim_token text,"
        " p_claimed_by text,\n",
        "    p_destination_id integer, p_audience_id text, p_kind text, p_claim_token text,"
        " p_claimed_by text,\n    p_run_id bigint, p_attempts integer[],\n",
    ),
    (
        "            USING unnest(p_ids, p_message_ids) AS h(id, message_id)\n",
        "            USING unnest(p_ids, p_message_ids, p_attempts)\n"
        "                AS h(id, message_id, attempts)\n",
    ),
    (
        "            RETURNING o.audience_id, o.kind, o.user_id, o.value, o.anonymous_id,\n"
        "                      o.email, h.message_id\n",
        "            RETURNING o.id, o.audience_id, o.kind, o.user_id, o.value, o.anonymous_id,\n"
        "                      o.email, h.message_id, o.created_at, o.call, o.done_call,\n"
        "                      h.attempts\n",
    ),
    (
        "                message_id = excluded.message_id, told_at = excluded.told_at\n        )\n",
        "                message_id = excluded.message_id, told_at = excluded.told_at\n"
        "        ), logged AS (\n"
        "            INSERT INTO syncer_change_log (run_id, destination_id, kind, audience_id,\n"
        "                user_id, change_id, call, part, value, anonymous_id, email,\n"
        "                created_at, outcome, http_status, error, attempts, recorded_at)\n"
        "            SELECT p_run_id, p_destination_id, t.kind, t.audience_id, t.user_id, t.id,\n"
        "                   t.call,\n"
        "                   CASE t.done_call WHEN 'identify' THEN 'track'\n"
        "                                    WHEN 'track' THEN 'identify' END,\n"
        "                   t.value, t.anonymous_id, t.email, t.created_at, 'delivered', NULL,\n"
        "                   NULL, t.attempts, p_told_at\n"
        "            FROM taken t\n"
        "        )\n",
    ),
    (
        "                DELETE FROM syncer_state s\n"
        "                WHERE s.user_id = ANY(v_users) AND s.destination_id = p_destination_id;\n",
        "                DELETE FROM syncer_state s\n"
        "                WHERE s.user_id = ANY(v_users) AND s.destination_id = p_destination_id;\n"
        "                DELETE FROM syncer_change_log l WHERE l.user_id = ANY(v_users);\n",
    ),
]


def _exchange() -> str:
    text = _exchange_of_0009()
    for old, new in _CHANGES:
        if text.count(old) != 1:
            raise RuntimeError(f"migration 0009's function no longer reads {old!r}")
        text = text.replace(old, new)
    return text


def upgrade() -> None:
    connection = op.get_bind()
    op.create_table(
        "syncer_change_log",
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), primary_key=True),
        sa.Column("run_id", sa.BigInteger, nullable=True),
        sa.Column("destination_id", sa.Integer, nullable=False),
        sa.Column("kind", sa.Text, nullable=False),
        sa.Column("audience_id", sa.Text, nullable=False),
        sa.Column("user_id", sa.Text, nullable=False),
        sa.Column("change_id", sa.BigInteger, nullable=False),
        sa.Column("call", sa.Text, nullable=False),
        sa.Column("part", sa.Text, nullable=True),
        sa.Column("value", sa.Text, nullable=False),
        sa.Column("anonymous_id", sa.Text, nullable=True),
        sa.Column("email", sa.Text, nullable=True),
        sa.Column("created_at", sa.DateTime, nullable=False),
        sa.Column("outcome", sa.Text, nullable=False),
        sa.Column("http_status", sa.Integer, nullable=True),
        sa.Column("error", sa.Text, nullable=True),
        sa.Column("attempts", sa.Integer, nullable=True),
        sa.Column("recorded_at", sa.DateTime, nullable=False),
        sqlite_autoincrement=True,
    )
    op.create_index("ix_syncer_change_log_user", "syncer_change_log", ["user_id"])
    op.create_index(
        "ix_syncer_change_log_run", "syncer_change_log", ["run_id", "destination_id", "id"]
    )
    op.create_table(
        "syncer_change_log_purged",
        sa.Column("run_id", sa.BigInteger, nullable=False),
        sa.Column("destination_id", sa.Integer, nullable=False),
        sa.Column("delivered", sa.Integer, nullable=False),
        sa.PrimaryKeyConstraint("run_id", "destination_id"),
    )
    op.create_table(
        "syncer_sizes",
        sa.Column("run_id", sa.BigInteger, nullable=False),
        sa.Column("kind", sa.Text, nullable=False),
        sa.Column("audience_id", sa.Text, nullable=False),
        sa.Column("members", sa.Integer, nullable=False),
        sa.Column("measured_at", sa.DateTime, nullable=False),
        sa.PrimaryKeyConstraint("run_id", "kind", "audience_id"),
    )
    op.create_index("ix_syncer_sizes_subject", "syncer_sizes", ["kind", "audience_id", "run_id"])
    with op.batch_alter_table("syncer_runs") as batch:
        for name in ("held", "urls_down", "skipped", "invalid", "deletes_pending"):
            batch.add_column(sa.Column(name, sa.Integer, nullable=False, server_default="0"))
    with op.batch_alter_table("syncer_destinations") as batch:
        batch.add_column(sa.Column("failed_runs", sa.Integer, nullable=False, server_default="0"))
        batch.add_column(sa.Column("last_success_at", sa.DateTime, nullable=True))
    if connection.dialect.name == "postgresql":
        op.execute(f"DROP FUNCTION IF EXISTS {_SIGNATURE_0009}")
        op.execute(_exchange())


def downgrade() -> None:
    raise NotImplementedError(
        "0010 cannot be undone once history was kept: restore a backup taken before migrating"
    )
