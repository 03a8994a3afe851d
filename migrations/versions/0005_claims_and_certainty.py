"""The send/record protocol made right: what a URL may believe, claims, per-URL holds.

- ``syncer_delivered`` becomes ``syncer_state``: the last accepted value (now nullable) and
  ``unsure``, set while another value may have been processed.
- ``syncer_outbox`` and ``syncer_deletions`` gain claims (token, holder, expiry on the database's
  clock) and the outbox ``attempted`` (a change once handed to a sender may have been processed).
- ``syncer_destinations`` are keyed by the canonical form of their URL; rows whose URLs turn out
  to be the same workflow are merged, keeping the newest of what each was told and queued.
- ``syncer_pair_state`` and ``syncer_holds`` become ``syncer_pairs``, with a hold per URL.
- ``syncer_leases`` goes: plans are single transactions and sends are fenced by claims.
- Partial indexes so that exits, the guard, claims and owed deletes read only what they need.

Stop every syncer before migrating: a run in progress under the old version would not know
about claims.

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-29
"""

from __future__ import annotations

from collections import defaultdict

import sqlalchemy as sa
from alembic import op

from syncer.core.urls import canonical_url

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None

_ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def _partial(sqlite: str, postgresql: str) -> dict[str, object]:
    # The predicates are spelled as SQLAlchemy renders the queries' own, so planners match them.
    return {"sqlite_where": sa.text(sqlite), "postgresql_where": sa.text(postgresql)}


def _create_new_tables() -> None:
    op.create_table(
        "syncer_destinations_next",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("url", sa.Text, nullable=False),
        sa.Column("canonical", sa.Text, nullable=False),
        sa.Column("first_seen_at", sa.DateTime, nullable=False),
        sa.Column("refused_status", sa.Integer, nullable=True),
        sa.Column("refused_at", sa.DateTime, nullable=True),
        sa.Column("refused_error", sa.Text, nullable=True),
    )
    op.create_table(
        "syncer_state_next",
        sa.Column("destination_id", sa.Integer, nullable=False),
        sa.Column("audience_id", sa.Text, nullable=False),
        sa.Column("user_id", sa.Text, nullable=False),
        sa.Column("value", sa.Text, nullable=True),
        sa.Column("unsure", sa.Boolean, nullable=False, server_default=sa.false()),
        sa.Column("anonymous_id", sa.Text, nullable=True),
        sa.Column("email", sa.Text, nullable=True),
        sa.Column("message_id", sa.Text, nullable=True),
        sa.Column("told_at", sa.DateTime, nullable=True),
        sa.PrimaryKeyConstraint("destination_id", "audience_id", "user_id"),
    )
    op.create_table(
        "syncer_outbox_next",
        sa.Column("id", _ID, primary_key=True, autoincrement=True),
        sa.Column("destination_id", sa.Integer, nullable=False),
        sa.Column("audience_id", sa.Text, nullable=False),
        sa.Column("user_id", sa.Text, nullable=False),
        sa.Column("value", sa.Text, nullable=False),
        sa.Column("anonymous_id", sa.Text, nullable=True),
        sa.Column("email", sa.Text, nullable=True),
        sa.Column("forced", sa.Boolean, nullable=False),
        sa.Column("attempted", sa.Boolean, nullable=False, server_default=sa.false()),
        sa.Column("created_at", sa.DateTime, nullable=False),
        sa.Column("status", sa.Text, nullable=False),
        sa.Column("attempts", sa.Integer, nullable=False),
        sa.Column("rejections", sa.Integer, nullable=False),
        sa.Column("last_status", sa.Integer, nullable=True),
        sa.Column("last_error", sa.Text, nullable=True),
        sa.Column("last_attempt_at", sa.DateTime, nullable=True),
        sa.Column("claim_token", sa.Text, nullable=True),
        sa.Column("claimed_by", sa.Text, nullable=True),
        sa.Column("claimed_until", sa.Double, nullable=True),
        sqlite_autoincrement=True,
    )
    op.create_table(
        "syncer_deletions_next",
        sa.Column("id", _ID, primary_key=True, autoincrement=True),
        sa.Column("user_id", sa.Text, nullable=False),
        sa.Column("destination_id", sa.Integer, nullable=False),
        sa.Column("requested_at", sa.DateTime, nullable=False),
        sa.Column("delivered_at", sa.DateTime, nullable=True),
        sa.Column("attempts", sa.Integer, nullable=False),
        sa.Column("last_status", sa.Integer, nullable=True),
        sa.Column("last_error", sa.Text, nullable=True),
        sa.Column("last_attempt_at", sa.DateTime, nullable=True),
        sa.Column("claim_token", sa.Text, nullable=True),
        sa.Column("claimed_by", sa.Text, nullable=True),
        sa.Column("claimed_until", sa.Double, nullable=True),
        sqlite_autoincrement=True,
    )
    op.create_table(
        "syncer_pairs",
        sa.Column("destination_id", sa.Integer, nullable=False),
        sa.Column("audience_id", sa.Text, nullable=False),
        sa.Column("last_planned_at", sa.DateTime, nullable=True),
        sa.Column("last_run_id", _ID, nullable=True),
        sa.Column("last_attempt_at", sa.DateTime, nullable=True),
        sa.Column("last_success_at", sa.DateTime, nullable=True),
        sa.Column("held_at", sa.DateTime, nullable=True),
        sa.Column("hold_reason", sa.Text, nullable=True),
        sa.Column("approved_at", sa.DateTime, nullable=True),
        sa.PrimaryKeyConstraint("destination_id", "audience_id"),
    )


def _map_destinations(connection: sa.Connection) -> dict[int, int]:
    """Old destination id -> the id of the row its workflow is kept under from now on."""
    rows = connection.execute(
        sa.text("SELECT id, url, first_seen_at FROM syncer_destinations ORDER BY id")
    ).all()
    groups: dict[str, list[sa.Row[tuple[int, str, object]]]] = defaultdict(list)
    for row in rows:
        try:
            canonical = canonical_url(row.url)
        except ValueError:
            canonical = row.url  # never valid as a setting; kept apart, as it was
        groups[canonical].append(row)
    mapping: dict[int, int] = {}
    for canonical, members in groups.items():
        survivor = members[0]
        connection.execute(
            sa.text(
                "INSERT INTO syncer_destinations_next (id, url, canonical, first_seen_at) "
                "VALUES (:id, :url, :canonical, :first_seen_at)"
            ),
            {
                "id": survivor.id,
                "url": members[-1].url,  # the spelling configured most recently
                "canonical": canonical,
                "first_seen_at": min(member.first_seen_at for member in members),
            },
        )
        for member in members:
            mapping[member.id] = survivor.id
    op.create_table(
        "syncer_destination_map",
        sa.Column("old_id", sa.Integer, primary_key=True),
        sa.Column("new_id", sa.Integer, nullable=False),
    )
    if mapping:
        connection.execute(
            sa.text("INSERT INTO syncer_destination_map (old_id, new_id) VALUES (:old, :new)"),
            [{"old": old, "new": new} for old, new in mapping.items()],
        )
    return mapping


def _copy(connection: sa.Connection) -> None:
    # For destinations merged into one, the newest row of each kind wins (latest delivery,
    # highest outbox id, a delivered delete); a dropped outbox row that was tried leaves its
    # doubt on the one kept.
    connection.execute(
        sa.text(
            """
            INSERT INTO syncer_state_next (destination_id, audience_id, user_id, value, unsure,
                anonymous_id, email, message_id, told_at)
            SELECT m.new_id, d.audience_id, d.user_id, d.value, FALSE, d.anonymous_id, d.email,
                d.message_id, d.delivered_at
            FROM syncer_delivered d JOIN syncer_destination_map m ON m.old_id = d.destination_id
            WHERE NOT EXISTS (
                SELECT 1 FROM syncer_delivered d2
                JOIN syncer_destination_map m2 ON m2.old_id = d2.destination_id
                WHERE m2.new_id = m.new_id AND m2.old_id <> m.old_id
                  AND d2.audience_id = d.audience_id AND d2.user_id = d.user_id
                  AND (d2.delivered_at > d.delivered_at
                       OR (d2.delivered_at = d.delivered_at
                           AND d2.destination_id > d.destination_id))
            )
            """
        )
    )
    connection.execute(
        sa.text(
            """
            INSERT INTO syncer_outbox_next (id, destination_id, audience_id, user_id, value,
                anonymous_id, email, forced, attempted, created_at, status, attempts, rejections,
                last_status, last_error, last_attempt_at)
            SELECT o.id, m.new_id, o.audience_id, o.user_id, o.value, o.anonymous_id, o.email,
                o.forced,
                CASE WHEN EXISTS (
                    SELECT 1 FROM syncer_outbox o2
                    JOIN syncer_destination_map m2 ON m2.old_id = o2.destination_id
                    WHERE m2.new_id = m.new_id AND o2.audience_id = o.audience_id
                      AND o2.user_id = o.user_id AND o2.attempts > 0
                ) THEN TRUE ELSE FALSE END,
                o.created_at, o.status, o.attempts, o.rejections, o.last_status, o.last_error,
                o.last_attempt_at
            FROM syncer_outbox o JOIN syncer_destination_map m ON m.old_id = o.destination_id
            WHERE NOT EXISTS (
                SELECT 1 FROM syncer_outbox o2
                JOIN syncer_destination_map m2 ON m2.old_id = o2.destination_id
                WHERE m2.new_id = m.new_id AND o2.audience_id = o.audience_id
                  AND o2.user_id = o.user_id AND o2.id > o.id
            )
            """
        )
    )
    connection.execute(
        sa.text(
            """
            INSERT INTO syncer_deletions_next (id, user_id, destination_id, requested_at,
                delivered_at, attempts, last_status, last_error, last_attempt_at)
            SELECT x.id, x.user_id, m.new_id, x.requested_at, x.delivered_at, x.attempts,
                x.last_status, x.last_error, x.last_attempt_at
            FROM syncer_deletions x JOIN syncer_destination_map m ON m.old_id = x.destination_id
            WHERE NOT EXISTS (
                SELECT 1 FROM syncer_deletions x2
                JOIN syncer_destination_map m2 ON m2.old_id = x2.destination_id
                WHERE m2.new_id = m.new_id AND x2.user_id = x.user_id AND x2.id <> x.id
                  AND ((x2.delivered_at IS NOT NULL AND x.delivered_at IS NULL)
                       OR ((x2.delivered_at IS NULL) = (x.delivered_at IS NULL) AND x2.id < x.id))
            )
            """
        )
    )
    connection.execute(
        sa.text(
            """
            INSERT INTO syncer_pairs (destination_id, audience_id, last_run_id, last_attempt_at,
                last_success_at)
            SELECT m.new_id, p.audience_id, max(p.last_run_id), max(p.last_attempt_at),
                max(p.last_success_at)
            FROM syncer_pair_state p JOIN syncer_destination_map m ON m.old_id = p.destination_id
            GROUP BY m.new_id, p.audience_id
            """
        )
    )
    # Every pair with something told or queued gets its row, and its changes' timestamps go on
    # from the newest queued one: a change planned later must be newer, whatever the clock of
    # the host that queued the old one said.
    for table in ("syncer_state_next", "syncer_outbox_next"):
        connection.execute(
            sa.text(
                f"""
                INSERT INTO syncer_pairs (destination_id, audience_id)
                SELECT DISTINCT t.destination_id, t.audience_id FROM {table} t
                WHERE NOT EXISTS (
                    SELECT 1 FROM syncer_pairs p
                    WHERE p.destination_id = t.destination_id AND p.audience_id = t.audience_id
                )
                """
            )
        )
    connection.execute(
        sa.text(
            """
            UPDATE syncer_pairs SET last_planned_at = (
                SELECT max(o.created_at) FROM syncer_outbox_next o
                WHERE o.destination_id = syncer_pairs.destination_id
                  AND o.audience_id = syncer_pairs.audience_id
            )
            """
        )
    )
    # A hold was per audience: it now holds the audience for every URL that knows of it.
    connection.execute(
        sa.text(
            """
            INSERT INTO syncer_pairs (destination_id, audience_id)
            SELECT DISTINCT s.destination_id, h.audience_id
            FROM syncer_holds h JOIN syncer_state_next s ON s.audience_id = h.audience_id
            WHERE NOT EXISTS (
                SELECT 1 FROM syncer_pairs p
                WHERE p.destination_id = s.destination_id AND p.audience_id = h.audience_id
            )
            """
        )
    )
    connection.execute(
        sa.text(
            """
            UPDATE syncer_pairs SET
                held_at = (SELECT h.held_at FROM syncer_holds h
                           WHERE h.audience_id = syncer_pairs.audience_id),
                hold_reason = (SELECT h.reason FROM syncer_holds h
                               WHERE h.audience_id = syncer_pairs.audience_id),
                approved_at = (SELECT h.approved_at FROM syncer_holds h
                               WHERE h.audience_id = syncer_pairs.audience_id)
            WHERE EXISTS (SELECT 1 FROM syncer_holds h
                          WHERE h.audience_id = syncer_pairs.audience_id)
            """
        )
    )


def _last_ids(connection: sa.Connection) -> dict[str, int]:
    """The highest id each id sequence ever handed out: messageIds derive from outbox and
    deletion ids, so the rebuilt tables must never hand out one of them again."""
    tables = ("syncer_destinations", "syncer_outbox", "syncer_deletions")
    last: dict[str, int] = {}
    for table in tables:
        last[table] = connection.execute(
            sa.text(f"SELECT coalesce(max(id), 0) FROM {table}")
        ).scalar_one()
    if connection.dialect.name == "sqlite":
        for name, seq in connection.execute(
            sa.text(
                "SELECT name, seq FROM sqlite_sequence "
                "WHERE name IN ('syncer_outbox', 'syncer_deletions')"
            )
        ):
            last[name] = max(last[name], int(seq))
    else:
        for table in tables:
            sequence = connection.execute(
                sa.text(f"SELECT pg_get_serial_sequence('{table}', 'id')")
            ).scalar_one()
            value = connection.execute(
                sa.text(f"SELECT CASE WHEN is_called THEN last_value ELSE 0 END FROM {sequence}")
            ).scalar_one()
            last[table] = max(last[table], int(value))
    return last


def _continue_ids(connection: sa.Connection, last: dict[str, int]) -> None:
    for table, value in last.items():
        if connection.dialect.name == "sqlite":
            if table == "syncer_destinations":
                continue  # a plain rowid: SQLite continues after the highest id by itself
            connection.execute(sa.text("DELETE FROM sqlite_sequence WHERE name = :t"), {"t": table})
            connection.execute(
                sa.text("INSERT INTO sqlite_sequence (name, seq) VALUES (:t, :v)"),
                {"t": table, "v": value},
            )
        else:
            connection.execute(
                sa.text(f"SELECT setval(pg_get_serial_sequence('{table}', 'id'), :v, :called)"),
                {"v": max(value, 1), "called": value > 0},
            )


def _create_indexes(dialect: str) -> None:
    op.create_index(
        "uq_syncer_destinations_canonical", "syncer_destinations", ["canonical"], unique=True
    )
    op.create_index("ix_syncer_state_user", "syncer_state", ["user_id"])
    true_ = "1" if dialect == "sqlite" else "true"
    op.create_index(
        "ix_syncer_state_told_true",
        "syncer_state",
        ["destination_id", "audience_id", "user_id"],
        **_partial("value = 'true'", "value = 'true'"),
    )
    op.create_index(
        "ix_syncer_state_unsure",
        "syncer_state",
        ["destination_id", "audience_id", "user_id"],
        **_partial(f"unsure = {true_}", f"unsure = {true_}"),
    )
    op.create_index(
        "uq_syncer_outbox_change",
        "syncer_outbox",
        ["destination_id", "audience_id", "user_id"],
        unique=True,
    )
    op.create_index("ix_syncer_outbox_user", "syncer_outbox", ["user_id"])
    op.create_index(
        "ix_syncer_outbox_pending",
        "syncer_outbox",
        ["destination_id", "audience_id", "id"],
        **_partial("status = 'pending'", "status = 'pending'"),
    )
    op.create_index(
        "ix_syncer_outbox_claimed",
        "syncer_outbox",
        ["claim_token"],
        **_partial("claim_token IS NOT NULL", "claim_token IS NOT NULL"),
    )
    op.create_index(
        "uq_syncer_deletions_user_destination",
        "syncer_deletions",
        ["user_id", "destination_id"],
        unique=True,
    )
    op.create_index(
        "ix_syncer_deletions_owed",
        "syncer_deletions",
        ["destination_id", "id"],
        **_partial("delivered_at IS NULL", "delivered_at IS NULL"),
    )
    op.create_index(
        "ix_syncer_deletions_claimed",
        "syncer_deletions",
        ["claim_token"],
        **_partial("claim_token IS NOT NULL", "claim_token IS NOT NULL"),
    )
    if dialect == "postgresql":  # SQLite does not enforce foreign keys unless asked
        for table in ("syncer_state", "syncer_outbox", "syncer_deletions", "syncer_pairs"):
            op.create_foreign_key(
                f"fk_{table}_destination", table, "syncer_destinations", ["destination_id"], ["id"]
            )


def upgrade() -> None:
    connection = op.get_bind()
    dialect = connection.dialect.name
    _create_new_tables()
    _map_destinations(connection)
    _copy(connection)
    last_ids = _last_ids(connection)
    for table in (
        "syncer_leases",
        "syncer_holds",
        "syncer_pair_state",
        "syncer_deletions",
        "syncer_outbox",
        "syncer_delivered",
        "syncer_destinations",
        "syncer_destination_map",
    ):
        op.drop_table(table)
    for name in ("destinations", "state", "outbox", "deletions"):
        op.rename_table(f"syncer_{name}_next", f"syncer_{name}")
    _continue_ids(connection, last_ids)
    _create_indexes(dialect)


def downgrade() -> None:
    raise NotImplementedError("0005 cannot be undone: restore a backup taken before migrating")
