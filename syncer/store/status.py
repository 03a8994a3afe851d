"""Read-only queries behind the daemon's HTTP server: the status page, ``/metrics`` and
``/healthz``.

Every answer is a plain dataclass read in one transaction (one consistent view). Nothing here
reads the clock: ages are measured against the ``now`` a caller passes in. Nothing returns a
secret: URLs are shown as configured, as ``syncer inspect`` shows them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from sqlalchemy import Engine, func, or_, select
from sqlalchemy.engine import Connection

from syncer.core.states import ChangeStatus, RunStatus
from syncer.store.schema import change_log, destinations, outbox, pairs, runs, sizes
from syncer.store.sql import reading

# The counts a run records (syncer_runs), in the order the status page shows them.
RUN_COUNTS = (
    "entered",
    "exited",
    "delivered",
    "pending",
    "rejected",
    "parked",
    "held",
    "urls_down",
    "skipped",
    "invalid",
    "deletes_pending",
)


@dataclass(frozen=True)
class DestinationRow:
    """One workflow URL the database knows (``syncer_destinations``)."""

    id: int
    url: str  # as last configured
    canonical: str
    refused_status: int | None
    refused_at: datetime | None
    failed_runs: int
    last_success_at: datetime | None


@dataclass(frozen=True)
class Backlog:
    """The changes owed to one URL (``syncer_outbox``), by status, and the oldest pending."""

    pending: int = 0
    rejected: int = 0
    parked: int = 0
    oldest_pending_at: datetime | None = None

    def oldest_pending_age(self, now: datetime) -> float | None:
        """Seconds the oldest pending change has waited at ``now`` (None: nothing pending)."""
        if self.oldest_pending_at is None:
            return None
        return max(0.0, (now - self.oldest_pending_at).total_seconds())


@dataclass(frozen=True)
class HeldPair:
    """An audience or trait the mass-exit guard holds for one URL, not approved yet."""

    destination_id: int
    kind: str
    audience_id: str
    held_at: datetime
    hold_reason: str | None


@dataclass(frozen=True)
class RunRow:
    """One run (``syncer_runs``) with its counts (keys of :data:`RUN_COUNTS`)."""

    id: int
    trigger: str
    started_at: datetime
    finished_at: datetime | None
    status: str
    error: str | None
    counts: dict[str, int]

    @property
    def duration_seconds(self) -> float | None:
        """How long it ran, once finished."""
        if self.finished_at is None:
            return None
        return max(0.0, (self.finished_at - self.started_at).total_seconds())


@dataclass(frozen=True)
class SizePoint:
    """An audience's member count (a trait's count of values) at one run."""

    run_id: int
    measured_at: datetime
    members: int


@dataclass(frozen=True)
class Overview:
    """What ``/metrics`` and ``/healthz`` read at each request."""

    destinations: list[DestinationRow]
    backlog: dict[int, Backlog]  # by destination id; a URL owed nothing is absent
    held: list[HeldPair]
    last_finished_run: RunRow | None  # finished, or crashed (a crashed run never finishes)
    last_ok_at: datetime | None  # when the last run that delivered everything finished
    runs_by_status: dict[str, int]
    latest_sizes: dict[tuple[str, str], SizePoint] = field(default_factory=dict)

    def backlog_of(self, destination_id: int) -> Backlog:
        """The backlog of one URL (empty when it is owed nothing)."""
        return self.backlog.get(destination_id, Backlog())


def _run(row: Any) -> RunRow:
    return RunRow(
        id=int(row.id),
        trigger=row.trigger,
        started_at=row.started_at,
        finished_at=row.finished_at,
        status=row.status,
        error=row.error,
        counts={name: int(getattr(row, name) or 0) for name in RUN_COUNTS},
    )


class StatusStore:
    """The reads of the status page, the metrics and the health check."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def overview(self) -> Overview:
        """Destinations, backlogs, holds, the last finished and last successful runs, runs by
        status, and the latest size of each audience and trait: in one transaction."""
        with reading(self.engine) as connection:
            return Overview(
                destinations=self._destinations(connection),
                backlog=self._backlog(connection),
                held=self._held(connection),
                last_finished_run=self._last_finished_run(connection),
                last_ok_at=connection.execute(
                    select(func.max(runs.c.finished_at)).where(runs.c.status == RunStatus.OK.value)
                ).scalar_one_or_none(),
                runs_by_status={
                    str(row[0]): int(row[1])
                    for row in connection.execute(
                        select(runs.c.status, func.count()).group_by(runs.c.status)
                    )
                },
                latest_sizes={
                    key: points[-1] for key, points in self._sizes(connection, 1).items()
                },
            )

    def destinations(self) -> list[DestinationRow]:
        """Every workflow URL the database knows."""
        with reading(self.engine) as connection:
            return self._destinations(connection)

    def recent_runs(self, limit: int) -> list[RunRow]:
        """The most recent runs, newest first."""
        with reading(self.engine) as connection:
            rows = connection.execute(select(runs).order_by(runs.c.id.desc()).limit(limit)).all()
        return [_run(row) for row in rows]

    def size_history(self, last_runs: int) -> dict[tuple[str, str], list[SizePoint]]:
        """(kind, id) -> its sizes at the last ``last_runs`` runs that measured any, oldest
        first."""
        with reading(self.engine) as connection:
            return self._sizes(connection, last_runs)

    def finished_runs_of(self, holder: str, after_id: int) -> list[RunRow]:
        """The runs one process (``holder``) finished with an id above ``after_id``, oldest
        first."""
        with reading(self.engine) as connection:
            rows = connection.execute(
                select(runs)
                .where(
                    runs.c.holder == holder,
                    runs.c.id > after_id,
                    runs.c.finished_at.is_not(None),
                )
                .order_by(runs.c.id)
            ).all()
        return [_run(row) for row in rows]

    def outcomes_of_run(self, run_id: int) -> list[tuple[int, str, int]]:
        """(destination id, outcome, entries) of the change log of one run."""
        with reading(self.engine) as connection:
            rows = connection.execute(
                select(change_log.c.destination_id, change_log.c.outcome, func.count())
                .where(change_log.c.run_id == run_id)
                .group_by(change_log.c.destination_id, change_log.c.outcome)
            ).all()
        return [(int(row[0]), str(row[1]), int(row[2])) for row in rows]

    @staticmethod
    def _destinations(connection: Connection) -> list[DestinationRow]:
        d = destinations.c
        return [
            DestinationRow(
                id=int(row.id),
                url=row.url,
                canonical=row.canonical,
                refused_status=row.refused_status,
                refused_at=row.refused_at,
                failed_runs=int(row.failed_runs or 0),
                last_success_at=row.last_success_at,
            )
            for row in connection.execute(
                select(
                    d.id,
                    d.url,
                    d.canonical,
                    d.refused_status,
                    d.refused_at,
                    d.failed_runs,
                    d.last_success_at,
                ).order_by(d.id)
            )
        ]

    @staticmethod
    def _backlog(connection: Connection) -> dict[int, Backlog]:
        o = outbox.c
        counts: dict[int, dict[str, Any]] = {}
        for row in connection.execute(
            select(o.destination_id, o.status, func.count(), func.min(o.created_at)).group_by(
                o.destination_id, o.status
            )
        ):
            found = counts.setdefault(int(row[0]), {})
            status = str(row[1])
            if status in (ChangeStatus.PENDING, ChangeStatus.REJECTED, ChangeStatus.PARKED):
                found[status] = int(row[2])
            if status == ChangeStatus.PENDING:
                found["oldest_pending_at"] = row[3]
        return {destination_id: Backlog(**found) for destination_id, found in counts.items()}

    @staticmethod
    def _held(connection: Connection) -> list[HeldPair]:
        p = pairs.c
        return [
            HeldPair(
                destination_id=int(row.destination_id),
                kind=row.kind,
                audience_id=row.audience_id,
                held_at=row.held_at,
                hold_reason=row.hold_reason,
            )
            for row in connection.execute(
                select(p.destination_id, p.kind, p.audience_id, p.held_at, p.hold_reason)
                .where(p.held_at.is_not(None), p.approved_at.is_(None))
                .order_by(p.destination_id, p.kind, p.audience_id)
            )
        ]

    @staticmethod
    def _last_finished_run(connection: Connection) -> RunRow | None:
        row = connection.execute(
            select(runs)
            .where(or_(runs.c.finished_at.is_not(None), runs.c.status == RunStatus.CRASHED.value))
            .order_by(runs.c.id.desc())
            .limit(1)
        ).first()
        return None if row is None else _run(row)

    @staticmethod
    def _sizes(connection: Connection, last_runs: int) -> dict[tuple[str, str], list[SizePoint]]:
        # The last runs that measured sizes, found by the (run_id, ...) primary key; then their
        # rows: at most last_runs per audience or trait, whatever the history kept.
        run_ids = (
            select(sizes.c.run_id).distinct().order_by(sizes.c.run_id.desc()).limit(last_runs)
        ).subquery()
        first = connection.execute(select(func.min(run_ids.c.run_id))).scalar_one_or_none()
        found: dict[tuple[str, str], list[SizePoint]] = {}
        if first is None:
            return found
        s = sizes.c
        for row in connection.execute(
            select(s.kind, s.audience_id, s.run_id, s.measured_at, s.members)
            .where(s.run_id >= first)
            .order_by(s.kind, s.audience_id, s.run_id)
        ):
            found.setdefault((row.kind, row.audience_id), []).append(
                SizePoint(int(row.run_id), row.measured_at, int(row.members))
            )
        return found
