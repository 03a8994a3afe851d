"""The tables: the input contract upstream jobs write, and the syncer's own records.

Alembic migrations create these; this module is what the queries are written against.
"""

from __future__ import annotations

from sqlalchemy import (
    BigInteger,
    Boolean,
    Column,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    PrimaryKeyConstraint,
    Table,
    Text,
    UniqueConstraint,
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

# --- The syncer's own records. ---

meta = Table(
    "syncer_meta",
    metadata,
    Column("name", Text, primary_key=True),
    Column("value", Text, nullable=False),
)

destinations = Table(
    "syncer_destinations",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("url", Text, nullable=False, unique=True),
    Column("first_seen_at", DateTime, nullable=False),
)

audience_keys = Table(
    "syncer_audience_keys",
    metadata,
    Column("audience_id", Text, primary_key=True),
    Column("key", Text, nullable=False, unique=True),
    Column("locked_at", DateTime, nullable=False),
)

# What each workflow URL has accepted, per (URL, audience, user): the last value, and when.
delivered = Table(
    "syncer_delivered",
    metadata,
    Column("destination_id", Integer, ForeignKey("syncer_destinations.id"), nullable=False),
    Column("audience_id", Text, nullable=False),
    Column("user_id", Text, nullable=False),
    Column("value", Text, nullable=False),
    Column("anonymous_id", Text, nullable=True),
    Column("email", Text, nullable=True),
    Column("message_id", Text, nullable=False),
    Column("delivered_at", DateTime, nullable=False),
    PrimaryKeyConstraint("destination_id", "audience_id", "user_id"),
    Index("ix_syncer_delivered_user", "user_id"),
)

# Changes planned but not yet accepted, one per (URL, audience, user). Ids are never reused, as
# the messageId is derived from them.
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
    Column("created_at", DateTime, nullable=False),
    Column("status", Text, nullable=False),
    Column("attempts", Integer, nullable=False),
    Column("rejections", Integer, nullable=False),
    Column("last_status", Integer, nullable=True),
    Column("last_error", Text, nullable=True),
    Column("last_attempt_at", DateTime, nullable=True),
    UniqueConstraint("destination_id", "audience_id", "user_id", name="uq_syncer_outbox_change"),
    Index("ix_syncer_outbox_user", "user_id"),
    Index("ix_syncer_outbox_pair_id", "destination_id", "audience_id", "id"),
    sqlite_autoincrement=True,
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
    sqlite_autoincrement=True,
)

# One holder at a time per name (e.g. one run per URL and audience); expired leases are free.
leases = Table(
    "syncer_leases",
    metadata,
    Column("name", Text, primary_key=True),
    Column("holder", Text, nullable=False),
    Column("expires_at", DateTime, nullable=False),
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
    UniqueConstraint("user_id", "destination_id", name="uq_syncer_deletions_user_destination"),
    sqlite_autoincrement=True,
)

# Per (URL, audience): when a run last left nothing queued for it.
pair_state = Table(
    "syncer_pair_state",
    metadata,
    Column("destination_id", Integer, ForeignKey("syncer_destinations.id"), nullable=False),
    Column("audience_id", Text, nullable=False),
    Column("last_run_id", BigInteger().with_variant(Integer(), "sqlite"), nullable=True),
    Column("last_attempt_at", DateTime, nullable=True),
    Column("last_success_at", DateTime, nullable=True),
    PrimaryKeyConstraint("destination_id", "audience_id"),
)

# Audiences held by the mass-exit guard, until someone approves the exits.
holds = Table(
    "syncer_holds",
    metadata,
    Column("audience_id", Text, primary_key=True),
    Column("held_at", DateTime, nullable=False),
    Column("reason", Text, nullable=False),
    Column("approved_at", DateTime, nullable=True),
)
