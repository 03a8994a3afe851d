"""Workflow URLs: one row per workflow, keyed by the canonical form of its URL."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import Engine, delete, func, select, update

from syncer.core.urls import canonical_url
from syncer.store.schema import (
    DELETION_OWED,
    change_log,
    change_log_purged,
    deletions,
    destinations,
    outbox,
    pairs,
    state,
)
from syncer.store.sql import dialect_insert, reading, writing


@dataclass(frozen=True)
class RemovedDestination:
    """A URL no longer configured that is still owed privacy deletes."""

    destination_id: int
    url: str
    owed_deletes: int


@dataclass(frozen=True)
class Forgotten:
    """What ``forget-url`` dropped."""

    url: str
    state_rows: int
    queued_changes: int
    owed_deletes: int


class DestinationStore:
    """Registers configured URLs and keeps per-URL facts (refusals), and forgets removed URLs."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def ensure(self, urls: Sequence[str], now: datetime) -> dict[str, int]:
        """URL -> id, registering workflows seen for the first time.

        A URL whose canonical form is known keeps its row (and so everything it was told and
        owes); the row then remembers the spelling configured now, which requests go to.
        """
        with writing(self.engine) as connection:
            statement = dialect_insert(connection, destinations)
            statement = statement.on_conflict_do_update(
                index_elements=["canonical"], set_={"url": statement.excluded.url}
            )
            connection.execute(
                statement,
                [
                    {"url": url, "canonical": canonical_url(url), "first_seen_at": now}
                    for url in urls
                ],
            )
        return self.find(urls)

    def find(self, urls: Sequence[str]) -> dict[str, int]:
        """URL -> id for the configured URLs the database already knows."""
        by_canonical = {canonical_url(url): url for url in urls}
        with reading(self.engine) as connection:
            rows = connection.execute(
                select(destinations.c.canonical, destinations.c.id).where(
                    destinations.c.canonical.in_(list(by_canonical))
                )
            )
            return {by_canonical[row.canonical]: row.id for row in rows}

    def record_refusal(
        self, destination_id: int, status: int | None, error: str, now: datetime
    ) -> None:
        """Remember that the URL refused everything (shown by inspect until it accepts again)."""
        with writing(self.engine) as connection:
            connection.execute(
                update(destinations)
                .where(destinations.c.id == destination_id)
                .values(refused_status=status, refused_at=now, refused_error=error[:500])
            )

    def record_run_result(self, destination_id: int, *, failed: bool, now: datetime) -> None:
        """Count the runs in a row that gave up on the URL (``failed``); a run that reached it
        resets the count and is its last success."""
        values: dict[str, Any] = (
            {"failed_runs": destinations.c.failed_runs + 1}
            if failed
            else {"failed_runs": 0, "last_success_at": now}
        )
        with writing(self.engine) as connection:
            connection.execute(
                update(destinations).where(destinations.c.id == destination_id).values(**values)
            )

    def removed_with_debts(self, configured_ids: Sequence[int]) -> list[RemovedDestination]:
        """URLs not configured now that are still owed deletes (nothing can deliver them)."""
        with reading(self.engine) as connection:
            rows = connection.execute(
                select(deletions.c.destination_id, destinations.c.url, func.count())
                .join(destinations, destinations.c.id == deletions.c.destination_id)
                .where(DELETION_OWED, deletions.c.destination_id.not_in(list(configured_ids)))
                .group_by(deletions.c.destination_id, destinations.c.url)
                .order_by(destinations.c.url)
            ).all()
        return [RemovedDestination(row[0], row[1], int(row[2])) for row in rows]

    def forget(self, url: str) -> Forgotten | None:
        """Drop a URL's state, queued changes and owed deletes for good; None if unknown."""
        canonical = canonical_url(url)
        with writing(self.engine) as connection:
            found = connection.execute(
                select(destinations.c.id, destinations.c.url).where(
                    destinations.c.canonical == canonical
                )
            ).one_or_none()
            if found is None:
                return None
            destination_id = found.id
            counted = connection.execution_options(preserve_rowcount=True)
            told = counted.execute(
                delete(state).where(state.c.destination_id == destination_id)
            ).rowcount
            queued = counted.execute(
                delete(outbox).where(outbox.c.destination_id == destination_id)
            ).rowcount
            owed = counted.execute(
                delete(deletions).where(deletions.c.destination_id == destination_id, DELETION_OWED)
            ).rowcount
            connection.execute(
                delete(deletions).where(deletions.c.destination_id == destination_id)
            )
            connection.execute(delete(pairs).where(pairs.c.destination_id == destination_id))
            # Its history goes too: a URL configured later may be given the same id.
            for table in (change_log, change_log_purged):
                connection.execute(delete(table).where(table.c.destination_id == destination_id))
            connection.execute(delete(destinations).where(destinations.c.id == destination_id))
        return Forgotten(found.url, told, queued, owed)
