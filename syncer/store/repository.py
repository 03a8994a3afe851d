"""All of the syncer's SQL, behind one interface that works on SQLite and PostgreSQL alike.

The diff is computed by the database: planning a (URL, audience) pair is a handful of set-based
statements, and every read that can grow with an audience is streamed or paged in batches.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import (
    Boolean,
    ColumnElement,
    DateTime,
    Engine,
    Integer,
    Text,
    and_,
    bindparam,
    case,
    delete,
    exists,
    func,
    insert,
    literal,
    not_,
    or_,
    select,
    union_all,
    update,
)
from sqlalchemy.engine import Connection

from syncer.core.diff import FALSE, TRUE
from syncer.core.traits import AudienceIdentity, KeyResolution, resolve_keys
from syncer.store.schema import (
    audience_keys,
    audience_memberships,
    audiences,
    deleted_users,
    deletions,
    delivered,
    destinations,
    holds,
    leases,
    meta,
    outbox,
    pair_state,
    runs,
)

STATUS_PENDING = "pending"
STATUS_REJECTED = "rejected"  # refused for good last time; tried again on the next run
STATUS_PARKED = "parked"  # refused on max_rejections runs, or invalid: waits for `syncer retry`


def utcnow() -> datetime:
    """The current time as the naive UTC datetime every table stores."""
    return datetime.now(UTC).replace(tzinfo=None)


@dataclass(frozen=True)
class AudienceRow:
    """One row of the ``audiences`` input table."""

    audience_id: str
    name: str
    key: str | None
    enabled: bool

    def is_named(self, wanted: str, keys: Mapping[str, str]) -> bool:
        """True when ``wanted`` is this audience's id, trait key, or ``audiences.key``."""
        return wanted in (self.audience_id, keys.get(self.audience_id), self.key)


@dataclass(frozen=True)
class QueuedChange:
    """One change in the outbox, waiting to be accepted by its workflow URL."""

    change_id: int
    user_id: str
    value: str
    anonymous_id: str | None
    email: str | None
    created_at: datetime


@dataclass(frozen=True)
class PendingDeletion:
    """A delete message one URL has not accepted yet."""

    deletion_id: int
    user_id: str
    requested_at: datetime


@dataclass(frozen=True)
class ChangeCounts:
    """How many entries (true) and exits (false) a (URL, audience) pair has queued, and how
    many of those a plan has just found (the rest were queued by earlier runs)."""

    entered: int
    exited: int
    new_entered: int = 0
    new_exited: int = 0


@dataclass(frozen=True)
class FailedChange:
    """A change the URL did not accept this time: why, and how often it was tried."""

    change: QueuedChange
    attempts: int
    status: int | None
    error: str


@dataclass(frozen=True)
class RunCounts:
    """The figures a run reports and records."""

    audiences: int = 0
    entered: int = 0
    exited: int = 0
    delivered: int = 0
    pending: int = 0
    rejected: int = 0
    parked: int = 0


def _dialect_insert(connection: Connection, table: Any) -> Any:
    # Both dialects' Insert offer on_conflict_*; the base Insert type does not declare them.
    if connection.dialect.name == "postgresql":
        from sqlalchemy.dialects.postgresql import insert as pg_insert

        return pg_insert(table)
    from sqlalchemy.dialects.sqlite import insert as sqlite_insert

    return sqlite_insert(table)


class Repository:
    """The one gateway to the database used by the sync engine, the CLI and the daemon."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    # --- meta ---

    def message_namespace(self) -> uuid.UUID:
        """The random namespace messageIds of this database are derived in."""
        with self.engine.connect() as connection:
            value = connection.execute(
                select(meta.c.value).where(meta.c.name == "message_namespace")
            ).scalar_one()
        return uuid.UUID(value)

    def refresh_statistics(self) -> None:
        """Let PostgreSQL's planner see the tables as they are now.

        Upstream bulk loads and a first sync change row counts by orders of magnitude between
        runs; with stale statistics PostgreSQL may pick a nested-loop anti-join for the diff that
        runs for minutes instead of a second. SQLite's planner needs no statistics here.
        """
        if self.engine.dialect.name != "postgresql":
            return
        with self.engine.begin() as connection:
            connection.exec_driver_sql(
                "ANALYZE audience_memberships, syncer_delivered, syncer_outbox"
            )

    # --- audiences and keys ---

    def load_audiences(self) -> list[AudienceRow]:
        """Every audience (a few hundred rows at most: memberships are never loaded whole)."""
        with self.engine.connect() as connection:
            rows = connection.execute(
                select(
                    audiences.c.id, audiences.c.name, audiences.c.key, audiences.c.enabled
                ).order_by(audiences.c.id)
            ).all()
        return [AudienceRow(row.id, row.name, row.key, bool(row.enabled)) for row in rows]

    def audiences_with_keys(self) -> tuple[list[AudienceRow], KeyResolution]:
        """Every audience, and the key each syncs under (or why it cannot be synced)."""
        rows = self.load_audiences()
        resolution = resolve_keys(
            [AudienceIdentity(row.audience_id, row.name, row.key) for row in rows],
            self.locked_keys(),
        )
        return rows, resolution

    def locked_keys(self) -> dict[str, str]:
        """Audience id -> the key it was first synced under."""
        with self.engine.connect() as connection:
            rows = connection.execute(select(audience_keys.c.audience_id, audience_keys.c.key))
            return {row.audience_id: row.key for row in rows}

    def lock_key(self, audience_id: str, key: str) -> bool:
        """Record that ``audience_id`` syncs under ``key`` from now on; False if it is taken."""
        with self.engine.begin() as connection:
            statement = (
                _dialect_insert(connection, audience_keys)
                .values(audience_id=audience_id, key=key, locked_at=utcnow())
                .on_conflict_do_nothing()
            )
            connection.execute(statement)
            locked = connection.execute(
                select(audience_keys.c.key).where(audience_keys.c.audience_id == audience_id)
            ).scalar_one_or_none()
        return locked == key

    # --- destinations ---

    def find_destinations(self, urls: Sequence[str]) -> dict[str, int]:
        """URL -> id for the URLs the database already knows."""
        with self.engine.connect() as connection:
            rows = connection.execute(
                select(destinations.c.url, destinations.c.id).where(destinations.c.url.in_(urls))
            )
            return {row.url: row.id for row in rows}

    def ensure_destinations(self, urls: Sequence[str]) -> dict[str, int]:
        """URL -> id, registering URLs seen for the first time."""
        with self.engine.begin() as connection:
            statement = _dialect_insert(connection, destinations).on_conflict_do_nothing()
            now = utcnow()
            connection.execute(statement, [{"url": url, "first_seen_at": now} for url in urls])
        return self.find_destinations(urls)

    # --- planning: the diff, in SQL ---

    @staticmethod
    def _is_member(audience_id: str, user_id: Any) -> ColumnElement[bool]:
        return exists().where(
            audience_memberships.c.audience_id == audience_id,
            audience_memberships.c.user_id == user_id,
        )

    @staticmethod
    def _delivered_true(destination_id: int, audience_id: str, user_id: Any) -> ColumnElement[bool]:
        return exists().where(
            delivered.c.destination_id == destination_id,
            delivered.c.audience_id == audience_id,
            delivered.c.user_id == user_id,
            delivered.c.value == TRUE,
        )

    @staticmethod
    def _suppressed(user_id: Any) -> ColumnElement[bool]:
        return exists().where(deleted_users.c.user_id == user_id)

    @staticmethod
    def _queued(destination_id: int, audience_id: str, user_id: Any) -> ColumnElement[bool]:
        return exists().where(
            outbox.c.destination_id == destination_id,
            outbox.c.audience_id == audience_id,
            outbox.c.user_id == user_id,
        )

    def plan(self, destination_id: int, audience_id: str, *, full: bool) -> ChangeCounts:
        """Make the outbox of one (URL, audience) hold exactly the changes the URL must be told.

        Follows :func:`syncer.core.diff.reconcile_outbox`: queued changes still wanted are kept
        (their retries keep their messageId), the rest are dropped, and new ones are added.
        """
        now = utcnow()
        in_pair = and_(
            outbox.c.destination_id == destination_id, outbox.c.audience_id == audience_id
        )
        member = self._is_member(audience_id, outbox.c.user_id)
        told_true = self._delivered_true(destination_id, audience_id, outbox.c.user_id)
        keep_entry = and_(outbox.c.value == TRUE, member, not_(self._suppressed(outbox.c.user_id)))
        if not full:
            keep_entry = and_(keep_entry, or_(outbox.c.forced, not_(told_true)))
        keep_exit = and_(outbox.c.value == FALSE, not_(member), told_true)
        columns = [
            "destination_id", "audience_id", "user_id", "value", "anonymous_id", "email",
            "forced", "created_at", "status", "attempts", "rejections",
        ]  # fmt: skip
        m = audience_memberships
        entries = select(
            literal(destination_id, Integer),
            literal(audience_id, Text),
            m.c.user_id,
            literal(TRUE, Text),
            m.c.anonymous_id,
            m.c.email,
            literal(full, Boolean),
            literal(now, DateTime),
            literal(STATUS_PENDING, Text),
            literal(0, Integer),
            literal(0, Integer),
        ).where(
            m.c.audience_id == audience_id,
            not_(self._queued(destination_id, audience_id, m.c.user_id)),
            not_(self._suppressed(m.c.user_id)),
        )
        if not full:
            entries = entries.where(
                not_(self._delivered_true(destination_id, audience_id, m.c.user_id))
            )
        exits = select(
            literal(destination_id, Integer),
            literal(audience_id, Text),
            delivered.c.user_id,
            literal(FALSE, Text),
            delivered.c.anonymous_id,
            delivered.c.email,
            literal(False, Boolean),
            literal(now, DateTime),
            literal(STATUS_PENDING, Text),
            literal(0, Integer),
            literal(0, Integer),
        ).where(
            delivered.c.destination_id == destination_id,
            delivered.c.audience_id == audience_id,
            delivered.c.value == TRUE,
            not_(self._is_member(audience_id, delivered.c.user_id)),
            not_(self._queued(destination_id, audience_id, delivered.c.user_id)),
        )
        with self.engine.begin() as connection:
            connection.execute(delete(outbox).where(in_pair, not_(or_(keep_entry, keep_exit))))
            if full:
                connection.execute(
                    update(outbox).where(in_pair, outbox.c.value == TRUE).values(forced=True)
                )
            # Row counts of INSERT ... SELECT are only kept when asked for (SQLAlchemy 2.1).
            counted = connection.execution_options(preserve_rowcount=True)
            new_entered = counted.execute(insert(outbox).from_select(columns, entries)).rowcount
            new_exited = counted.execute(insert(outbox).from_select(columns, exits)).rowcount
            queued = self._counts(connection, destination_id, audience_id)
            return replace(queued, new_entered=new_entered, new_exited=new_exited)

    def _counts(
        self, connection: Connection, destination_id: int, audience_id: str
    ) -> ChangeCounts:
        rows = connection.execute(
            select(outbox.c.value, func.count())
            .where(outbox.c.destination_id == destination_id, outbox.c.audience_id == audience_id)
            .group_by(outbox.c.value)
        )
        by_value = {row[0]: row[1] for row in rows}
        return ChangeCounts(entered=by_value.get(TRUE, 0), exited=by_value.get(FALSE, 0))

    def status_counts(self, destination_id: int, audience_id: str) -> dict[str, int]:
        """How many queued changes of one (URL, audience) are pending, rejected or parked."""
        with self.engine.connect() as connection:
            rows = connection.execute(
                select(outbox.c.status, func.count())
                .where(
                    outbox.c.destination_id == destination_id,
                    outbox.c.audience_id == audience_id,
                )
                .group_by(outbox.c.status)
            )
            return {row[0]: row[1] for row in rows}

    def exit_pressure(self, destination_id: int, audience_id: str) -> tuple[int, int]:
        """(members the URL was told of, how many of them have left): the guard's inputs."""
        gone = not_(self._is_member(audience_id, delivered.c.user_id))
        with self.engine.connect() as connection:
            told, exits = connection.execute(
                select(func.count(), func.coalesce(func.sum(case((gone, 1), else_=0)), 0)).where(
                    delivered.c.destination_id == destination_id,
                    delivered.c.audience_id == audience_id,
                    delivered.c.value == TRUE,
                )
            ).one()
        return int(told), int(exits)

    def orphan_memberships(self, limit: int = 20) -> list[tuple[str, int]]:
        """(audience id, rows) for memberships whose audience does not exist."""
        m = audience_memberships
        with self.engine.connect() as connection:
            rows = connection.execute(
                select(m.c.audience_id, func.count())
                .where(not_(exists().where(audiences.c.id == m.c.audience_id)))
                .group_by(m.c.audience_id)
                .order_by(m.c.audience_id)
                .limit(limit)
            )
            return [(row[0], row[1]) for row in rows]

    def requeue(self, destination_ids: Sequence[int] | None, audience_id: str | None) -> int:
        """Put rejected and parked changes back in line; return how many."""
        statement = update(outbox).where(outbox.c.status.in_([STATUS_REJECTED, STATUS_PARKED]))
        if destination_ids is not None:
            statement = statement.where(outbox.c.destination_id.in_(destination_ids))
        if audience_id is not None:
            statement = statement.where(outbox.c.audience_id == audience_id)
        with self.engine.begin() as connection:
            return int(
                connection.execute(statement.values(status=STATUS_PENDING, rejections=0)).rowcount
            )

    # --- mass-exit holds ---

    def holds(self) -> dict[str, tuple[str, bool]]:
        """Audience id -> (reason, approved) for every held audience."""
        with self.engine.connect() as connection:
            rows = connection.execute(select(holds))
            return {row.audience_id: (row.reason, row.approved_at is not None) for row in rows}

    def place_hold(self, audience_id: str, reason: str) -> None:
        """Hold an audience (or refresh the reason of an unapproved hold)."""
        with self.engine.begin() as connection:
            statement = _dialect_insert(connection, holds).values(
                audience_id=audience_id, held_at=utcnow(), reason=reason
            )
            connection.execute(
                statement.on_conflict_do_update(
                    index_elements=["audience_id"], set_={"reason": reason}
                )
            )

    def approve_hold(self, audience_id: str) -> bool:
        """Let the held exits of an audience go out on the next run; False if it is not held."""
        with self.engine.begin() as connection:
            return (
                connection.execute(
                    update(holds)
                    .where(holds.c.audience_id == audience_id)
                    .values(approved_at=utcnow())
                ).rowcount
                == 1
            )

    def release_hold(self, audience_id: str) -> None:
        """Forget the hold of an audience whose approved exits were planned."""
        with self.engine.begin() as connection:
            connection.execute(delete(holds).where(holds.c.audience_id == audience_id))

    def stream_desired(
        self, destination_id: int | None, audience_id: str, *, full: bool, batch_size: int
    ) -> Iterator[list[tuple[str, str]]]:
        """Stream, in batches, the (user, value) changes a plan would queue; writes nothing.

        ``destination_id`` None stands for a URL the database has never seen: it would be told
        every member and no exits.
        """
        m = audience_memberships
        entries = select(m.c.user_id, literal(TRUE, Text).label("value")).where(
            m.c.audience_id == audience_id, not_(self._suppressed(m.c.user_id))
        )
        if destination_id is None:
            statement: Any = entries.order_by(m.c.user_id)
        else:
            if not full:
                entries = entries.where(
                    not_(self._delivered_true(destination_id, audience_id, m.c.user_id))
                )
            exits = select(delivered.c.user_id, literal(FALSE, Text).label("value")).where(
                delivered.c.destination_id == destination_id,
                delivered.c.audience_id == audience_id,
                delivered.c.value == TRUE,
                not_(self._is_member(audience_id, delivered.c.user_id)),
            )
            statement = union_all(entries, exits)
        with self.engine.connect() as connection:
            result = connection.execution_options(
                stream_results=True, yield_per=batch_size
            ).execute(statement)
            for partition in result.partitions(batch_size):
                yield [(row[0], row[1]) for row in partition]

    # --- sending ---

    def queued_batch(
        self, destination_id: int, audience_id: str, *, after_id: int, limit: int
    ) -> list[QueuedChange]:
        """The next ``limit`` queued changes of one (URL, audience) after ``after_id``, by id."""
        with self.engine.connect() as connection:
            rows = connection.execute(
                select(
                    outbox.c.id,
                    outbox.c.user_id,
                    outbox.c.value,
                    outbox.c.anonymous_id,
                    outbox.c.email,
                    outbox.c.created_at,
                )
                .where(
                    outbox.c.destination_id == destination_id,
                    outbox.c.audience_id == audience_id,
                    outbox.c.id > after_id,
                    outbox.c.status != STATUS_PARKED,
                )
                .order_by(outbox.c.id)
                .limit(limit)
            ).all()
        return [QueuedChange(*row) for row in rows]

    def record_outcomes(
        self,
        destination_id: int,
        audience_id: str,
        *,
        accepted: Sequence[tuple[QueuedChange, str]],
        retryable: Sequence[FailedChange],
        rejected: Sequence[FailedChange],
        parked: Sequence[FailedChange] = (),
        max_rejections: int = 5,
    ) -> None:
        """Record what one URL did with a batch of changes, in one transaction.

        Only an accepted change moves into the record of what the URL was told; every other
        change stays queued, with its attempts and last error, so nothing is ever lost.
        """
        now = utcnow()
        with self.engine.begin() as connection:
            if accepted:
                upsert = _dialect_insert(connection, delivered)
                upsert = upsert.on_conflict_do_update(
                    index_elements=["destination_id", "audience_id", "user_id"],
                    set_={
                        name: upsert.excluded[name]
                        for name in ("value", "anonymous_id", "email", "message_id", "delivered_at")
                    },
                )
                connection.execute(
                    upsert,
                    [
                        {
                            "destination_id": destination_id,
                            "audience_id": audience_id,
                            "user_id": change.user_id,
                            "value": change.value,
                            "anonymous_id": change.anonymous_id,
                            "email": change.email,
                            "message_id": message_id,
                            "delivered_at": now,
                        }
                        for change, message_id in accepted
                    ],
                )
                connection.execute(
                    delete(outbox).where(
                        outbox.c.id.in_([change.change_id for change, _ in accepted])
                    )
                )
            park_when_rejected = case(
                (outbox.c.rejections + 1 >= max_rejections, STATUS_PARKED),
                else_=STATUS_REJECTED,
            )
            for failures, status, rejection in (
                (retryable, literal(STATUS_PENDING, Text), 0),
                (rejected, park_when_rejected, 1),
                (parked, literal(STATUS_PARKED, Text), 1),
            ):
                if not failures:
                    continue
                connection.execute(
                    update(outbox)
                    .where(outbox.c.id == bindparam("change_id"))
                    .values(
                        status=status,
                        attempts=outbox.c.attempts + bindparam("tries", type_=Integer),
                        rejections=outbox.c.rejections + rejection,
                        last_status=bindparam("http_status", type_=Integer),
                        last_error=bindparam("error", type_=Text),
                        last_attempt_at=now,
                    ),
                    [
                        {
                            "change_id": failure.change.change_id,
                            "tries": failure.attempts,
                            "http_status": failure.status,
                            "error": failure.error,
                        }
                        for failure in failures
                    ],
                )

    def record_pair_result(
        self, destination_id: int, audience_id: str, run_id: int, *, complete: bool
    ) -> None:
        """Note that a run worked on a (URL, audience), and whether it left nothing queued."""
        now = utcnow()
        with self.engine.begin() as connection:
            statement = _dialect_insert(connection, pair_state).values(
                destination_id=destination_id,
                audience_id=audience_id,
                last_run_id=run_id,
                last_attempt_at=now,
                last_success_at=now if complete else None,
            )
            updates: dict[str, Any] = {"last_run_id": run_id, "last_attempt_at": now}
            if complete:
                updates["last_success_at"] = now
            connection.execute(
                statement.on_conflict_do_update(
                    index_elements=["destination_id", "audience_id"], set_=updates
                )
            )

    # --- privacy deletions ---

    def suppress_users(self, user_ids: Sequence[str], destination_ids: Sequence[int]) -> None:
        """Record deletions: suppress the users, owe each URL a delete, forget what was told.

        Idempotent: deleting a user twice owes no URL a second delete message.
        """
        now = utcnow()
        with self.engine.begin() as connection:
            connection.execute(
                _dialect_insert(connection, deleted_users).on_conflict_do_nothing(),
                [{"user_id": user_id, "requested_at": now} for user_id in user_ids],
            )
            # Every URL configured now, and every URL ever told about the user even if it is
            # not configured now: should it come back, its delete is waiting for it.
            owed = {(user, destination) for user in user_ids for destination in destination_ids}
            for table in (delivered, outbox):
                owed |= {
                    (row[0], row[1])
                    for row in connection.execute(
                        select(table.c.user_id, table.c.destination_id)
                        .where(table.c.user_id.in_(user_ids))
                        .distinct()
                    )
                }
            connection.execute(
                _dialect_insert(connection, deletions).on_conflict_do_nothing(),
                [
                    {
                        "user_id": user_id,
                        "destination_id": destination_id,
                        "requested_at": now,
                        "attempts": 0,
                    }
                    for user_id, destination_id in sorted(owed)
                ],
            )
            connection.execute(delete(delivered).where(delivered.c.user_id.in_(user_ids)))
            connection.execute(delete(outbox).where(outbox.c.user_id.in_(user_ids)))

    def pending_deletions(
        self, destination_id: int, *, after_id: int, limit: int
    ) -> list[PendingDeletion]:
        """The next deletes one URL has not accepted yet, by id."""
        with self.engine.connect() as connection:
            rows = connection.execute(
                select(deletions.c.id, deletions.c.user_id, deletions.c.requested_at)
                .where(
                    deletions.c.destination_id == destination_id,
                    deletions.c.delivered_at.is_(None),
                    deletions.c.id > after_id,
                )
                .order_by(deletions.c.id)
                .limit(limit)
            ).all()
        return [PendingDeletion(*row) for row in rows]

    def count_pending_deletions(self, destination_id: int) -> int:
        """How many deletes one URL still has to accept."""
        with self.engine.connect() as connection:
            return int(
                connection.execute(
                    select(func.count()).where(
                        deletions.c.destination_id == destination_id,
                        deletions.c.delivered_at.is_(None),
                    )
                ).scalar_one()
            )

    def record_deletion_outcomes(
        self, accepted: Sequence[int], failed: Sequence[tuple[int, int, int | None, str]]
    ) -> None:
        """Mark deletes accepted, or note the attempts, status and error of those that were not."""
        now = utcnow()
        with self.engine.begin() as connection:
            if accepted:
                connection.execute(
                    update(deletions)
                    .where(deletions.c.id.in_(accepted))
                    .values(
                        delivered_at=now,
                        last_attempt_at=now,
                        attempts=deletions.c.attempts + 1,
                        last_status=None,
                        last_error=None,
                    )
                )
            if failed:
                connection.execute(
                    update(deletions)
                    .where(deletions.c.id == bindparam("deletion_id"))
                    .values(
                        attempts=deletions.c.attempts + bindparam("tries", type_=Integer),
                        last_status=bindparam("http_status", type_=Integer),
                        last_error=bindparam("error", type_=Text),
                        last_attempt_at=now,
                    ),
                    [
                        {"deletion_id": i, "tries": t, "http_status": st, "error": e}
                        for i, t, st, e in failed
                    ],
                )

    # --- leases ---

    def acquire_lease(self, name: str, holder: str, ttl: timedelta) -> bool:
        """Take or renew the lease ``name`` for ``holder``; False while another holds it.

        A lease runs out ``ttl`` after it was last taken, so a crashed holder cannot keep it.
        """
        now = utcnow()
        with self.engine.begin() as connection:
            taken = connection.execute(
                _dialect_insert(connection, leases)
                .values(name=name, holder=holder, expires_at=now + ttl)
                .on_conflict_do_nothing()
            ).rowcount
            if taken == 1:
                return True
            renewed = connection.execute(
                update(leases)
                .where(
                    leases.c.name == name, or_(leases.c.holder == holder, leases.c.expires_at < now)
                )
                .values(holder=holder, expires_at=now + ttl)
            ).rowcount
            return renewed == 1

    def lease_holder(self, name: str) -> str | None:
        """Who holds the lease ``name`` (expired or not), if anyone."""
        with self.engine.connect() as connection:
            holder: str | None = connection.execute(
                select(leases.c.holder).where(leases.c.name == name)
            ).scalar_one_or_none()
            return holder

    def take_lease_from(self, name: str, old_holder: str, holder: str, ttl: timedelta) -> bool:
        """Take the lease ``name`` from ``old_holder``, known to be dead; False if it moved on."""
        with self.engine.begin() as connection:
            return (
                connection.execute(
                    update(leases)
                    .where(leases.c.name == name, leases.c.holder == old_holder)
                    .values(holder=holder, expires_at=utcnow() + ttl)
                ).rowcount
                == 1
            )

    def release_lease(self, name: str, holder: str) -> None:
        """Give the lease back, if ``holder`` still holds it."""
        with self.engine.begin() as connection:
            connection.execute(
                delete(leases).where(leases.c.name == name, leases.c.holder == holder)
            )

    # --- runs ---

    def mark_crashed_runs(self, is_dead: Callable[[str], bool]) -> int:
        """Mark as crashed the runs still "running" whose process ``is_dead`` says is gone."""
        with self.engine.begin() as connection:
            running = connection.execute(
                select(runs.c.id, runs.c.holder).where(
                    runs.c.status == "running", runs.c.holder.is_not(None)
                )
            ).all()
            dead = [row.id for row in running if is_dead(row.holder)]
            if dead:
                connection.execute(
                    update(runs)
                    .where(runs.c.id.in_(dead), runs.c.status == "running")
                    .values(status="crashed", error="the process running it died")
                )
        return len(dead)

    def start_run(self, trigger: str, holder: str | None = None) -> int:
        """Record the start of a run; return its id."""
        with self.engine.begin() as connection:
            return int(
                connection.execute(
                    insert(runs)
                    .values(
                        trigger=trigger,
                        started_at=utcnow(),
                        status="running",
                        holder=holder,
                        **asdict(RunCounts()),
                    )
                    .returning(runs.c.id)
                ).scalar_one()
            )

    def finish_run(
        self, run_id: int, status: str, counts: RunCounts, error: str | None = None
    ) -> None:
        """Record how a run ended."""
        with self.engine.begin() as connection:
            connection.execute(
                update(runs)
                .where(runs.c.id == run_id)
                .values(finished_at=utcnow(), status=status, error=error, **asdict(counts))
            )

    # --- membership reads, for tests and inspection ---

    def delivered_values(self, destination_id: int, audience_id: str) -> dict[str, str]:
        """User -> last value one URL accepted for one audience (small audiences only)."""
        with self.engine.connect() as connection:
            rows = connection.execute(
                select(delivered.c.user_id, delivered.c.value).where(
                    delivered.c.destination_id == destination_id,
                    delivered.c.audience_id == audience_id,
                )
            )
            return {row.user_id: row.value for row in rows}
