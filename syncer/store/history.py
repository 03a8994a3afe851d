"""History: the change log (every outcome recorded for a change sent to a URL) and the size of
each audience and trait at each run; pruned by the runs, purged of a deleted user.

The log is written by :mod:`syncer.store.outbox` in the transaction that records the outcomes
(on PostgreSQL's common path inside ``syncer_exchange``, migration 0010); this module holds the
rest: writing sizes, pruning, and the reads of ``explain`` and ``replay``.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import (
    Engine,
    and_,
    delete,
    func,
    insert,
    literal,
    select,
    union_all,
)
from sqlalchemy.engine import Connection

from syncer.core.states import Call, Kind, LogOutcome
from syncer.core.traits import Subject
from syncer.store.schema import (
    audience_keys,
    audience_memberships,
    change_log,
    change_log_purged,
    computed_trait_values,
    destinations,
    query_members,
    query_values,
    runs,
    sizes,
)
from syncer.store.sql import dialect_insert, reading, writing

_l = change_log.c


def other_call(done: str | None) -> str | None:
    """Of a change sent both ways, the call still owed once ``done`` was accepted."""
    if done is None:
        return None
    return Call.TRACK.value if Call(done) is Call.IDENTIFY else Call.IDENTIFY.value


def log_entries(connection: Connection, entries: Sequence[dict[str, Any]]) -> None:
    """Append entries to the change log (columns of ``syncer_change_log`` but id)."""
    if entries:
        connection.execute(insert(change_log), list(entries))


def forget_history(connection: Connection, user_ids: Sequence[str]) -> None:
    """Delete the users' change-log entries, counting the deliveries forgotten per run and
    URL in ``syncer_change_log_purged``."""
    counts = connection.execute(
        select(_l.run_id, _l.destination_id, func.count().label("n"))
        .where(
            _l.user_id.in_(list(user_ids)),
            _l.outcome == LogOutcome.DELIVERED.value,
            _l.run_id.is_not(None),
        )
        .group_by(_l.run_id, _l.destination_id)
    ).all()
    if counts:
        statement = dialect_insert(connection, change_log_purged)
        connection.execute(
            statement.on_conflict_do_update(
                index_elements=["run_id", "destination_id"],
                set_={"delivered": change_log_purged.c.delivered + statement.excluded.delivered},
            ),
            [
                {"run_id": row.run_id, "destination_id": row.destination_id, "delivered": row.n}
                for row in counts
            ],
        )
    connection.execute(delete(change_log).where(_l.user_id.in_(list(user_ids))))


@dataclass(frozen=True)
class LoggedChange:
    """One change-log entry: an outcome recorded for a change sent to a URL."""

    id: int
    run_id: int | None
    destination_id: int
    kind: Kind
    audience_id: str
    user_id: str
    change_id: int
    call: Call
    part: Call | None
    value: str
    anonymous_id: str | None
    email: str | None
    created_at: datetime
    outcome: LogOutcome
    http_status: int | None
    error: str | None
    attempts: int | None
    recorded_at: datetime
    key: str | None

    @property
    def calls(self) -> tuple[Call, ...]:
        """The calls this entry is about: one, or both of a change sent both ways."""
        return (self.part,) if self.part is not None else self.call.owed()


def _logged(row: Any) -> LoggedChange:
    entry = row._mapping
    return LoggedChange(
        **{
            **entry,
            "kind": Kind(entry["kind"]),
            "call": Call(entry["call"]),
            "part": None if entry["part"] is None else Call(entry["part"]),
            "outcome": LogOutcome(entry["outcome"]),
        }
    )


_WITH_KEY = (
    select(*change_log.c, audience_keys.c.key)
    .select_from(
        change_log.outerjoin(
            audience_keys,
            and_(audience_keys.c.audience_id == _l.audience_id, audience_keys.c.kind == _l.kind),
        )
    )
    .order_by(_l.id)
)


class HistoryStore:
    """The change log and the sizes: pruned and purged here, read by explain and replay."""

    # Entries read per query when a run is replayed: memory stays flat whatever the run's size.
    PAGE = 2000

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def prune(self, now: datetime, keep_days: int) -> int:
        """Forget entries and sizes of runs that started more than ``keep_days`` ago (and
        entries older than that which no run wrote); return how many entries went."""
        cutoff = now - timedelta(days=keep_days)
        with writing(self.engine) as connection:
            # By run: the run index serves it, and ids only grow with time.
            first_kept = connection.execute(
                select(func.min(runs.c.id)).where(runs.c.started_at >= cutoff)
            ).scalar_one_or_none()
            counted = connection.execution_options(preserve_rowcount=True)
            gone = 0
            if first_kept is None:
                first_kept = (
                    connection.execute(select(func.max(runs.c.id))).scalar_one_or_none() or 0
                ) + 1
            gone += counted.execute(delete(change_log).where(_l.run_id < first_kept)).rowcount
            connection.execute(delete(sizes).where(sizes.c.run_id < first_kept))
            connection.execute(
                delete(change_log_purged).where(change_log_purged.c.run_id < first_kept)
            )
            return int(gone)

    def record_sizes(
        self, run_id: int, subjects: Sequence[tuple[Subject, bool]], now: datetime
    ) -> None:
        """Record the size of each audience (members) and trait (users with a value) a run
        syncs; ``subjects`` pairs each with whether it is defined by a query (its snapshot is
        counted)."""
        if not subjects:
            return
        parts = []
        for kind, from_query in ((k, q) for k in Kind for q in (False, True)):
            ids = [s.id for s, q in subjects if s.kind is kind and q is from_query]
            if not ids:
                continue
            if kind is Kind.AUDIENCE:
                table = query_members if from_query else audience_memberships
                id_column, counted = table.c.audience_id, func.count()
            else:
                table = query_values if from_query else computed_trait_values
                id_column = table.c.trait_id
                counted = func.count(table.c.value)  # a NULL value is no value
            parts.append(
                select(literal(kind.value).label("kind"), id_column.label("id"), counted.label("n"))
                .where(id_column.in_(ids))
                .group_by(id_column)
            )
        with writing(self.engine) as connection:
            counts = {
                (row.kind, row.id): int(row.n) for row in connection.execute(union_all(*parts))
            }
            connection.execute(
                insert(sizes),
                [
                    {
                        "run_id": run_id,
                        "kind": subject.kind.value,
                        "audience_id": subject.id,
                        "members": counts.get((subject.kind.value, subject.id), 0),
                        "measured_at": now,
                    }
                    for subject in dict.fromkeys(s for s, _ in subjects)
                ],
            )

    def of_user(self, user_id: str) -> list[LoggedChange]:
        """Every entry about one user, oldest first."""
        with reading(self.engine) as connection:
            rows = connection.execute(_WITH_KEY.where(_l.user_id == user_id)).all()
        return [_logged(row) for row in rows]

    def delivered_in(self, run_id: int, destination_id: int) -> Iterator[list[LoggedChange]]:
        """The deliveries a run recorded for one URL, oldest first, a page at a time."""
        after = 0
        while True:
            with reading(self.engine) as connection:
                rows = connection.execute(
                    _WITH_KEY.where(
                        _l.run_id == run_id,
                        _l.destination_id == destination_id,
                        _l.outcome == LogOutcome.DELIVERED.value,
                        _l.id > after,
                    ).limit(self.PAGE)
                ).all()
            if not rows:
                return
            yield [_logged(row) for row in rows]
            after = rows[-1].id

    def purged_deliveries(self, run_id: int, destination_id: int) -> int:
        """How many deliveries of a run to a URL were forgotten with deleted users."""
        with reading(self.engine) as connection:
            found = connection.execute(
                select(change_log_purged.c.delivered).where(
                    change_log_purged.c.run_id == run_id,
                    change_log_purged.c.destination_id == destination_id,
                )
            ).scalar_one_or_none()
        return int(found or 0)

    def destinations_of_run(self, run_id: int) -> list[tuple[int, str]]:
        """The URLs (id, URL as last configured) a run recorded deliveries for, in the order
        they were first configured."""
        with reading(self.engine) as connection:
            delivered = (
                select(_l.destination_id)
                .where(_l.run_id == run_id, _l.outcome == LogOutcome.DELIVERED.value)
                .distinct()
                .subquery()
            )
            rows = connection.execute(
                select(destinations.c.id, destinations.c.url)
                .join(delivered, delivered.c.destination_id == destinations.c.id)
                .order_by(destinations.c.id)
            ).all()
        return [(int(row.id), str(row.url)) for row in rows]
