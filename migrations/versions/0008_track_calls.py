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

# Kept in step with syncer/store/outbox.py, as migration 0007's function was; this one differs
# from it by the claimed changes' call, and by the claim's cursor, a row value that only the
# pair's index serves (_CALL_ADDED: 0007's text, this one's).
EXCHANGE = """
CREATE OR REPLACE FUNCTION syncer_exchange(
    p_destination_id integer, p_audience_id text, p_claim_token text, p_claimed_by text,
    p_ttl double precision, p_ids bigint[], p_message_ids text[], p_told_at timestamp,
    p_want integer, p_after_id bigint, p_clear_refusal boolean)
RETURNS TABLE (accepted integer, lost integer, held boolean, change_id bigint, user_id text,
               value text, anonymous_id text, email text, created_at timestamp, call text)
LANGUAGE plpgsql VOLATILE AS $fn$
#variable_conflict use_column
DECLARE
    v_accepted integer := 0;
    v_lost integer := 0;
    v_held boolean := false;
    v_users text[];
BEGIN
    IF cardinality(p_ids) > 0 THEN
        -- Take the rows this claim still owns, and record what the URL was told.
        WITH taken AS (
            DELETE FROM syncer_outbox o
            USING unnest(p_ids, p_message_ids) AS h(id, message_id)
            WHERE o.id = h.id AND o.claim_token = p_claim_token
            RETURNING o.audience_id, o.user_id, o.value, o.anonymous_id, o.email, h.message_id
        ), told AS (
            INSERT INTO syncer_state (destination_id, audience_id, user_id, value, unsure,
                                      anonymous_id, email, message_id, told_at)
            SELECT p_destination_id, t.audience_id, t.user_id, t.value, false,
                   t.anonymous_id, t.email, t.message_id, p_told_at
            FROM taken t
            ON CONFLICT (destination_id, audience_id, user_id) DO UPDATE SET
                value = excluded.value, unsure = excluded.unsure,
                anonymous_id = excluded.anonymous_id, email = excluded.email,
                message_id = excluded.message_id, told_at = excluded.told_at
        )
        SELECT count(*), array_agg(t.user_id) INTO v_accepted, v_users FROM taken t;
        IF v_accepted > 0 THEN
            -- A new statement, so a new snapshot: a delete-user that committed while the
            -- DELETE above waited for its lock on a row is seen here, and what was just
            -- written about its users is removed (one still running waits for this
            -- transaction, then removes it itself).
            SELECT array_agg(d.user_id) INTO v_users FROM syncer_deleted_users d
            WHERE d.user_id = ANY(v_users);
            IF v_users IS NOT NULL THEN
                DELETE FROM syncer_state s
                WHERE s.user_id = ANY(v_users) AND s.destination_id = p_destination_id;
            END IF;
        END IF;
        IF v_accepted < cardinality(p_ids) THEN
            -- Rows gone were superseded; rows still there belong to another claim now.
            SELECT count(*) INTO v_lost FROM syncer_outbox o WHERE o.id = ANY(p_ids);
        END IF;
        IF p_clear_refusal THEN
            UPDATE syncer_destinations
            SET refused_status = NULL, refused_at = NULL, refused_error = NULL
            WHERE id = p_destination_id AND refused_status IS NOT NULL;
        END IF;
    END IF;
    IF p_want > 0 THEN
        SELECT p.held_at IS NOT NULL AND p.approved_at IS NULL INTO v_held
        FROM syncer_pairs p
        WHERE p.destination_id = p_destination_id AND p.audience_id = p_audience_id;
        v_held := coalesce(v_held, false);
    END IF;
    -- The first row says what was recorded; the claimed changes follow, in id order.
    RETURN QUERY SELECT v_accepted, v_lost, v_held, NULL::bigint, NULL::text, NULL::text,
        NULL::text, NULL::text, NULL::timestamp, NULL::text;
    IF v_held OR p_want <= 0 THEN
        RETURN;
    END IF;
    RETURN QUERY
    WITH picked AS MATERIALIZED (
        SELECT o.id FROM syncer_outbox o
        LEFT JOIN audience_memberships m
            ON m.audience_id = p_audience_id AND m.user_id = o.user_id
        LEFT JOIN syncer_deleted_users d ON d.user_id = o.user_id
        WHERE o.destination_id = p_destination_id AND o.audience_id = p_audience_id
          AND o.status = 'pending'
          AND (o.destination_id, o.audience_id, o.id)
              > (p_destination_id, p_audience_id, p_after_id)
          AND (o.claimed_until IS NULL
               OR o.claimed_until < EXTRACT(EPOCH FROM clock_timestamp())::double precision)
          AND d.user_id IS NULL
          AND ((o.value = 'true' AND m.user_id IS NOT NULL)
               OR (o.value = 'false' AND m.user_id IS NULL))
        ORDER BY o.id
        LIMIT p_want
        FOR UPDATE OF o SKIP LOCKED
    ), claimed AS (
        -- A run-out claim being taken over may have been sent by its dead claimer.
        UPDATE syncer_outbox o
        SET attempted = (o.attempted OR o.claim_token IS NOT NULL),
            claim_token = p_claim_token, claimed_by = p_claimed_by,
            claimed_until = EXTRACT(EPOCH FROM clock_timestamp())::double precision + p_ttl
        WHERE o.id = ANY(ARRAY(SELECT id FROM picked))
        RETURNING o.id, o.user_id, o.value, o.anonymous_id, o.email, o.created_at, o.call
    )
    SELECT v_accepted, v_lost, v_held, c.id, c.user_id, c.value, c.anonymous_id, c.email,
           c.created_at, c.call
    FROM claimed c
    ORDER BY c.id;
END
$fn$
"""
_CALL_ADDED = [
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


def _exchange_of_0007() -> str:
    text = EXCHANGE
    for old, new in _CALL_ADDED:
        text = text.replace(new, old)
    return text


def upgrade() -> None:
    with op.batch_alter_table("syncer_outbox") as batch:
        batch.add_column(sa.Column("call", sa.Text, nullable=False, server_default="identify"))
    if op.get_bind().dialect.name == "postgresql":
        op.execute(f"DROP FUNCTION IF EXISTS {_SIGNATURE}")
        op.execute(EXCHANGE)


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute(f"DROP FUNCTION IF EXISTS {_SIGNATURE}")
        op.execute(_exchange_of_0007())
    with op.batch_alter_table("syncer_outbox") as batch:
        batch.drop_column("call")
