"""Holds placed by the mass-exit guard, per (URL, audience), and their approval."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import Engine, select, update

from syncer.core.traits import Subject
from syncer.store.schema import destinations, pairs
from syncer.store.sql import reading, writing


@dataclass(frozen=True)
class Hold:
    """One held (URL, audience)."""

    destination_id: int
    url: str
    audience_id: str
    reason: str
    held_at: datetime
    approved: bool


class HoldStore:
    """Lists and approves holds (the planner places and lifts them)."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def holds(self, audience_id: str | None = None) -> list[Hold]:
        """Every held pair (of one audience), approved or not."""
        statement = (
            select(
                pairs.c.destination_id,
                destinations.c.url,
                pairs.c.audience_id,
                pairs.c.hold_reason,
                pairs.c.held_at,
                pairs.c.approved_at,
            )
            .join(destinations, destinations.c.id == pairs.c.destination_id)
            .where(pairs.c.held_at.is_not(None))
            .order_by(pairs.c.audience_id, destinations.c.url)
        )
        if audience_id is not None:
            statement = statement.where(pairs.c.audience_id == audience_id)
        with reading(self.engine) as connection:
            rows = connection.execute(statement).all()
        return [
            Hold(row[0], row[1], row[2], row[3] or "", row[4], row[5] is not None) for row in rows
        ]

    def approve(
        self, subject: Subject, destination_ids: Sequence[int] | None, now: datetime
    ) -> int:
        """Let the held exits of an audience (or the held nulls of a trait), for the given URLs
        or all, go out on the next run; return how many held pairs were approved."""
        statement = update(pairs).where(
            pairs.c.audience_id == subject.id,
            pairs.c.kind == subject.kind.value,
            pairs.c.held_at.is_not(None),
        )
        if destination_ids is not None:
            statement = statement.where(pairs.c.destination_id.in_(list(destination_ids)))
        with writing(self.engine) as connection:
            counted = connection.execution_options(preserve_rowcount=True)
            return int(counted.execute(statement.values(approved_at=now)).rowcount)
