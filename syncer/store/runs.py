"""Runs: one row per sync, and per (URL, audience) the last run's result."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import Engine, insert, select, update

from syncer.core.states import RunStatus
from syncer.core.traits import Subject
from syncer.store.schema import pairs, runs
from syncer.store.sql import dialect_insert, reading, writing


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
    held: int = 0  # (URL, audience) pairs the mass-exit guard holds
    urls_down: int = 0  # URLs given up on: down, or refusing everything
    skipped: int = 0  # audiences and traits not synced (key conflicts, failed queries)
    invalid: int = 0  # rows skipped as unsendable
    deletes_pending: int = 0  # privacy deletes left owed


class RunStore:
    """Records runs, and marks those whose process died."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def start(self, trigger: str, holder: str, now: datetime) -> int:
        """Record the start of a run; return its id."""
        with writing(self.engine) as connection:
            return int(
                connection.execute(
                    insert(runs)
                    .values(
                        trigger=trigger,
                        started_at=now,
                        status=RunStatus.RUNNING.value,
                        holder=holder,
                        **asdict(RunCounts()),
                    )
                    .returning(runs.c.id)
                ).scalar_one()
            )

    def finish(
        self,
        run_id: int,
        status: RunStatus,
        counts: RunCounts,
        now: datetime,
        error: str | None = None,
    ) -> None:
        """Record how a run ended."""
        with writing(self.engine) as connection:
            connection.execute(
                update(runs)
                .where(runs.c.id == run_id)
                .values(finished_at=now, status=status.value, error=error, **asdict(counts))
            )

    def exists(self, run_id: int) -> bool:
        """Whether a run of this id was ever recorded."""
        with reading(self.engine) as connection:
            found = connection.execute(select(runs.c.id).where(runs.c.id == run_id)).first()
        return found is not None

    def mark_crashed(self, is_dead: Callable[[str], bool]) -> int:
        """Mark as crashed the runs still running whose process ``is_dead`` says is gone."""
        with reading(self.engine) as connection:
            running = connection.execute(
                select(runs.c.id, runs.c.holder).where(
                    runs.c.status == RunStatus.RUNNING.value, runs.c.holder.is_not(None)
                )
            ).all()
        dead = [row.id for row in running if is_dead(row.holder)]
        if dead:
            with writing(self.engine) as connection:
                connection.execute(
                    update(runs)
                    .where(runs.c.id.in_(dead), runs.c.status == RunStatus.RUNNING.value)
                    .values(status=RunStatus.CRASHED.value, error="the process running it died")
                )
        return len(dead)

    def record_pair(
        self, destination_id: int, subject: Subject, run_id: int, *, complete: bool, now: datetime
    ) -> None:
        """Note that a run worked on a (URL, audience or trait), and whether it left nothing
        owed."""
        self.record_pairs(destination_id, [subject], run_id, complete=complete, now=now)

    def record_pairs(
        self,
        destination_id: int,
        subjects: list[Subject],
        run_id: int,
        *,
        complete: bool,
        now: datetime,
    ) -> None:
        """:meth:`record_pair` for many audiences and traits of one URL, in one statement."""
        if not subjects:
            return
        with writing(self.engine) as connection:
            values: dict[str, Any] = {"last_run_id": run_id, "last_attempt_at": now}
            if complete:
                values["last_success_at"] = now
            statement = dialect_insert(connection, pairs)
            connection.execute(
                statement.on_conflict_do_update(
                    index_elements=["destination_id", "audience_id", "kind"],
                    set_={name: statement.excluded[name] for name in values},
                ),
                [
                    {
                        "destination_id": destination_id,
                        "audience_id": subject.id,
                        "kind": subject.kind.value,
                        **values,
                    }
                    for subject in subjects
                ],
            )
