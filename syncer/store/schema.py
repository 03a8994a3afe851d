"""The tables: the input contract upstream jobs write, and the syncer's own records.

Alembic migrations create these; this module is what the queries are written against.
"""

from __future__ import annotations

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    Column,
    DateTime,
    Double,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    PrimaryKeyConstraint,
    Table,
    Text,
    UniqueConstraint,
    false,
    or_,
    true,
)

metadata = MetaData()

# SQLite only makes INTEGER PRIMARY KEY a rowid alias (autoincrementing); elsewhere a BIGINT.
Id = BigInteger().with_variant(Integer(), "sqlite")

# --- The input contract: upstream jobs own these rows. ---

audiences = Table(
    "audiences",
    metadata,
    Column("id", Text, primary_key=True),
    Column("name", Text, nullable=False),
    Column("key", Text, nullable=True, unique=True),
    Column("enabled", Boolean, nullable=False, server_default=true()),
    Column("created_at", DateTime, nullable=True),
)

audience_memberships = Table(
    "audience_memberships",
    metadata,
    Column("audience_id", Text, ForeignKey("audiences.id"), nullable=False),
    Column("user_id", Text, nullable=False),
    Column("anonymous_id", Text, nullable=True),
    Column("email", Text, nullable=True),
    PrimaryKeyConstraint("audience_id", "user_id"),
)

computed_traits = Table(
    "computed_traits",
    metadata,
    Column("id", Text, primary_key=True),
    Column("name", Text, nullable=False),
    Column("key", Text, nullable=True, unique=True),
    Column("enabled", Boolean, nullable=False, server_default=true()),
    Column("created_at", DateTime, nullable=True),
)

# A JSON value per user: PostgreSQL's json keeps the text as written (sent exactly as stored);
# on SQLite it is TEXT holding JSON. The queries read it as text (syncer.store.sql.json_text).
computed_trait_values = Table(
    "computed_trait_values",
    metadata,
    Column("trait_id", Text, ForeignKey("computed_traits.id"), nullable=False),
    Column("user_id", Text, nullable=False),
    Column("value", JSON().with_variant(Text(), "sqlite"), nullable=True),
    PrimaryKeyConstraint("trait_id", "user_id"),
)

# --- The syncer's own records. ---

# Snapshots of the audiences and traits defined by a query in the settings: what each query
# returned at its last evaluation, in the shape of the input tables, so that they are planned
# and checked exactly as table-defined ones.
query_members = Table(
    "syncer_query_members",
    metadata,
    Column("audience_id", Text, nullable=False),
    Column("user_id", Text, nullable=False),
    Column("anonymous_id", Text, nullable=True),
    Column("email", Text, nullable=True),
    PrimaryKeyConstraint("audience_id", "user_id"),
)
query_values = Table(
    "syncer_query_values",
    metadata,
    Column("trait_id", Text, nullable=False),
    Column("user_id", Text, nullable=False),
    Column("value", Text, nullable=True),  # JSON text
    PrimaryKeyConstraint("trait_id", "user_id"),
)
# `audience_id` columns hold the id of an audience or of a computed trait; `kind`
# (syncer.core.states.Kind) tells which.

meta = Table(
    "syncer_meta",
    metadata,
    Column("name", Text, primary_key=True),
    Column("value", Text, nullable=False),
)

# One row per workflow, keyed by the canonical form of its URL (syncer.core.urls), so that a
# cosmetic edit of the setting (a trailing slash, the host's case) keeps the workflow's state.
destinations = Table(
    "syncer_destinations",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("url", Text, nullable=False),  # as last configured: requests go to this spelling
    Column("canonical", Text, nullable=False, unique=True),
    Column("first_seen_at", DateTime, nullable=False),
    # Set while the URL refuses everything (401/403/404/410); cleared by its next 2xx.
    Column("refused_status", Integer, nullable=True),
    Column("refused_at", DateTime, nullable=True),
    Column("refused_error", Text, nullable=True),
    # Pacing: the database-clock moment (epoch seconds) from which this URL's next request may
    # go; every worker advances it for the chunk it is about to send.
    Column("next_send_at", Double, nullable=True),
    # Runs in a row in which the URL was given up on (down or refusing); 0 after one that
    # reached it. And when a run last reached it.
    Column("failed_runs", Integer, nullable=False, server_default="0"),
    Column("last_success_at", DateTime, nullable=True),
)

# The key each audience and computed trait syncs under: one namespace for both kinds.
audience_keys = Table(
    "syncer_audience_keys",
    metadata,
    Column("audience_id", Text, primary_key=True),
    Column("kind", Text, primary_key=True, server_default="audience"),
    Column("key", Text, nullable=False, unique=True),
    Column("locked_at", DateTime, nullable=False),
)

# What each URL may believe, per (URL, audience, user): the last value it accepted (NULL: none
# yet) and whether another value may have been processed since (an attempt whose outcome is
# unknown was dropped). A row exists for everyone the URL was ever told or may have been told.
state = Table(
    "syncer_state",
    metadata,
    Column("destination_id", Integer, ForeignKey("syncer_destinations.id"), nullable=False),
    Column("audience_id", Text, nullable=False),
    Column("user_id", Text, nullable=False),
    Column("value", Text, nullable=True),
    Column("unsure", Boolean, nullable=False, server_default=false()),
    Column("anonymous_id", Text, nullable=True),
    Column("email", Text, nullable=True),
    Column("message_id", Text, nullable=True),
    Column("told_at", DateTime, nullable=True),
    Column("kind", Text, nullable=False, server_default="audience"),
    PrimaryKeyConstraint("destination_id", "audience_id", "kind", "user_id"),
    Index("ix_syncer_state_user", "user_id"),
)
# Exits and the guard look only at members a URL was told of, and at doubtful rows: partial
# indexes keep them from reading the `false` rows of everyone who ever left. The queries use
# these same expressions, so that each dialect's planner matches them to the index.
STATE_TOLD_TRUE = state.c.value == "true"
STATE_UNSURE = state.c.unsure == true()
Index(
    "ix_syncer_state_told_true",
    state.c.destination_id,
    state.c.audience_id,
    state.c.kind,
    state.c.user_id,
    sqlite_where=STATE_TOLD_TRUE,
    postgresql_where=STATE_TOLD_TRUE,
)
Index(
    "ix_syncer_state_unsure",
    state.c.destination_id,
    state.c.audience_id,
    state.c.kind,
    state.c.user_id,
    sqlite_where=STATE_UNSURE,
    postgresql_where=STATE_UNSURE,
)

# Changes planned but not yet accepted, one per (URL, audience, user). Ids are never reused, as
# the messageId is derived from them. A worker claims a few rows at a time (claim_token, and
# claimed_until on the database's clock, in epoch seconds) just before sending them.
outbox = Table(
    "syncer_outbox",
    metadata,
    Column("id", Id, primary_key=True, autoincrement=True),
    Column("destination_id", Integer, ForeignKey("syncer_destinations.id"), nullable=False),
    Column("audience_id", Text, nullable=False),
    Column("user_id", Text, nullable=False),
    Column("value", Text, nullable=False),
    Column("anonymous_id", Text, nullable=True),
    Column("email", Text, nullable=True),
    Column("forced", Boolean, nullable=False),
    # Sent at least once (its outcome recorded): the URL may have processed it.
    Column("attempted", Boolean, nullable=False, server_default=false()),
    Column("created_at", DateTime, nullable=False),
    Column("status", Text, nullable=False),
    Column("attempts", Integer, nullable=False),
    Column("rejections", Integer, nullable=False),
    Column("last_status", Integer, nullable=True),
    Column("last_error", Text, nullable=True),
    Column("last_attempt_at", DateTime, nullable=True),
    Column("claim_token", Text, nullable=True),
    Column("claimed_by", Text, nullable=True),
    Column("claimed_until", Double, nullable=True),
    # The call that tells the URL (syncer.core.states.Call), fixed when the change is planned.
    Column("call", Text, nullable=False, server_default="identify"),
    Column("kind", Text, nullable=False, server_default="audience"),
    # Of a change sent both ways: the call the URL has accepted so far (NULL: neither yet).
    Column("done_call", Text, nullable=True),
    UniqueConstraint(
        "destination_id", "audience_id", "kind", "user_id", name="uq_syncer_outbox_change"
    ),
    Index("ix_syncer_outbox_user", "user_id"),
    sqlite_autoincrement=True,
)
OUTBOX_PENDING = outbox.c.status == "pending"
OUTBOX_CLAIMED = outbox.c.claim_token.is_not(None)
# A change sent at least once, or claimed (in flight, or its claimer died): the URL may have
# processed it, whatever was recorded.
OUTBOX_MAYBE_PROCESSED = or_(outbox.c.attempted == true(), OUTBOX_CLAIMED)
Index(
    "ix_syncer_outbox_pending",
    outbox.c.destination_id,
    outbox.c.audience_id,
    outbox.c.id,
    sqlite_where=OUTBOX_PENDING,
    postgresql_where=OUTBOX_PENDING,
)
Index(
    "ix_syncer_outbox_claimed",
    outbox.c.claim_token,
    sqlite_where=OUTBOX_CLAIMED,
    postgresql_where=OUTBOX_CLAIMED,
)

runs = Table(
    "syncer_runs",
    metadata,
    Column("id", Id, primary_key=True, autoincrement=True),
    Column("trigger", Text, nullable=False),
    Column("started_at", DateTime, nullable=False),
    Column("finished_at", DateTime, nullable=True),
    Column("status", Text, nullable=False),
    Column("audiences", Integer, nullable=False),
    Column("entered", Integer, nullable=False),
    Column("exited", Integer, nullable=False),
    Column("delivered", Integer, nullable=False),
    Column("pending", Integer, nullable=False),
    Column("rejected", Integer, nullable=False),
    Column("error", Text, nullable=True),
    Column("holder", Text, nullable=True),  # "host:pid:nonce" of the process running it
    Column("parked", Integer, nullable=False, server_default="0"),
    # What a monitor alerts on (migration 0010): pairs held, URLs given up on (down or
    # refusing), audiences skipped, rows skipped as invalid, deletes left owed.
    Column("held", Integer, nullable=False, server_default="0"),
    Column("urls_down", Integer, nullable=False, server_default="0"),
    Column("skipped", Integer, nullable=False, server_default="0"),
    Column("invalid", Integer, nullable=False, server_default="0"),
    Column("deletes_pending", Integer, nullable=False, server_default="0"),
    sqlite_autoincrement=True,
)

# Users deleted for privacy: nothing more is ever sent about them, whatever upstream still says.
deleted_users = Table(
    "syncer_deleted_users",
    metadata,
    Column("user_id", Text, primary_key=True),
    Column("requested_at", DateTime, nullable=False),
)

# The delete message owed to each URL for each deleted user, and whether the URL accepted it.
deletions = Table(
    "syncer_deletions",
    metadata,
    Column("id", Id, primary_key=True, autoincrement=True),
    Column("user_id", Text, nullable=False),
    Column("destination_id", Integer, ForeignKey("syncer_destinations.id"), nullable=False),
    Column("requested_at", DateTime, nullable=False),
    Column("delivered_at", DateTime, nullable=True),
    Column("attempts", Integer, nullable=False),
    Column("last_status", Integer, nullable=True),
    Column("last_error", Text, nullable=True),
    Column("last_attempt_at", DateTime, nullable=True),
    Column("claim_token", Text, nullable=True),
    Column("claimed_by", Text, nullable=True),
    Column("claimed_until", Double, nullable=True),
    UniqueConstraint("user_id", "destination_id", name="uq_syncer_deletions_user_destination"),
    sqlite_autoincrement=True,
)
DELETION_OWED = deletions.c.delivered_at.is_(None)
DELETION_CLAIMED = deletions.c.claim_token.is_not(None)
Index(
    "ix_syncer_deletions_owed",
    deletions.c.destination_id,
    deletions.c.id,
    sqlite_where=DELETION_OWED,
    postgresql_where=DELETION_OWED,
)
Index(
    "ix_syncer_deletions_claimed",
    deletions.c.claim_token,
    sqlite_where=DELETION_CLAIMED,
    postgresql_where=DELETION_CLAIMED,
)

# One row per (URL, audience): planning locks it, so plans of one pair never overlap; it keeps
# the last plan's time (timestamps of a pair's changes only ever grow), the last results, and
# the mass-exit guard's hold, which is per URL: each URL's exit share is its own.
pairs = Table(
    "syncer_pairs",
    metadata,
    Column("destination_id", Integer, ForeignKey("syncer_destinations.id"), nullable=False),
    Column("audience_id", Text, nullable=False),
    Column("last_planned_at", DateTime, nullable=True),
    Column("last_run_id", BigInteger().with_variant(Integer(), "sqlite"), nullable=True),
    Column("last_attempt_at", DateTime, nullable=True),
    Column("last_success_at", DateTime, nullable=True),
    Column("held_at", DateTime, nullable=True),
    Column("hold_reason", Text, nullable=True),
    Column("approved_at", DateTime, nullable=True),
    Column("kind", Text, nullable=False, server_default="audience"),
    PrimaryKeyConstraint("destination_id", "audience_id", "kind"),
)

# Every outcome recorded for a change sent to a URL, with what its body is rebuilt from (the
# messageId from change_id, the timestamp from created_at; the key from syncer_audience_keys),
# written in the transaction that records the outcome. `part`: of a change sent both ways, the
# one call this outcome is about (NULL: every call of `call`). Kept `[history] keep_days`.
change_log = Table(
    "syncer_change_log",
    metadata,
    Column("id", Id, primary_key=True, autoincrement=True),
    Column("run_id", BigInteger, nullable=True),
    Column("destination_id", Integer, nullable=False),
    Column("kind", Text, nullable=False),
    Column("audience_id", Text, nullable=False),
    Column("user_id", Text, nullable=False),
    Column("change_id", BigInteger, nullable=False),
    Column("call", Text, nullable=False),
    Column("part", Text, nullable=True),
    Column("value", Text, nullable=False),
    Column("anonymous_id", Text, nullable=True),
    Column("email", Text, nullable=True),
    Column("created_at", DateTime, nullable=False),
    Column("outcome", Text, nullable=False),  # syncer.core.states.LogOutcome
    Column("http_status", Integer, nullable=True),
    Column("error", Text, nullable=True),
    Column("attempts", Integer, nullable=True),
    Column("recorded_at", DateTime, nullable=False),
    Index("ix_syncer_change_log_user", "user_id"),
    Index("ix_syncer_change_log_run", "run_id", "destination_id", "id"),
    sqlite_autoincrement=True,
)

# Per run and URL, how many delivered entries were forgotten with deleted users: a count
# without identity, so that a replay can say how many it skipped.
change_log_purged = Table(
    "syncer_change_log_purged",
    metadata,
    Column("run_id", BigInteger, nullable=False),
    Column("destination_id", Integer, nullable=False),
    Column("delivered", Integer, nullable=False),
    PrimaryKeyConstraint("run_id", "destination_id"),
)

# Each audience's member count and each trait's count of values, at each run that synced it.
sizes = Table(
    "syncer_sizes",
    metadata,
    Column("run_id", BigInteger, nullable=False),
    Column("kind", Text, nullable=False),
    Column("audience_id", Text, nullable=False),
    Column("members", Integer, nullable=False),
    Column("measured_at", DateTime, nullable=False),
    PrimaryKeyConstraint("run_id", "kind", "audience_id"),
    Index("ix_syncer_sizes_subject", "kind", "audience_id", "run_id"),
)
