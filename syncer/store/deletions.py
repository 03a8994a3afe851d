"""Privacy deletions: suppressing users, and the delete messages owed to each URL."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import (
    ColumnElement,
    Engine,
    Integer,
    Text,
    bindparam,
    delete,
    exists,
    func,
    not_,
    select,
    update,
)
from sqlalchemy.engine import Connection

from syncer.core.outcomes import Outcome, OutcomeKind
from syncer.core.pacing import Slots
from syncer.store.claims import RELEASED, Claim, claim_values, owned, unclaimed
from syncer.store.history import forget_history
from syncer.store.pacing import reserve_slots
from syncer.store.schema import (
    DELETION_OWED,
    deleted_users,
    deletions,
    outbox,
    state,
)
from syncer.store.sql import db_epoch, dialect_insert, reading, writing


def _change_in_flight() -> ColumnElement[bool]:
    """A change about the deleted user is claimed for the same URL right now."""
    return exists().where(
        outbox.c.destination_id == deletions.c.destination_id,
        outbox.c.user_id == deletions.c.user_id,
        outbox.c.claimed_until >= db_epoch(),
    )


@dataclass(frozen=True)
class OwedDeletion:
    """A claimed delete message for one URL."""

    deletion_id: int
    user_id: str
    requested_at: datetime


class DeletionStore:
    """Records deletions and hands out the delete messages each URL is owed."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def suppress(
        self, user_ids: Sequence[str], destination_ids: Sequence[int], now: datetime
    ) -> None:
        """Record deletions: suppress the users, owe each URL a delete, forget what was told.

        The users' queued changes are locked first, so that a worker recording the outcome of
        one of them (in flight now) either finishes before this transaction (and what it wrote
        is removed here) or sees the suppression and writes nothing. Changes in flight keep
        their row until their outcome is recorded: the delete to that URL waits for them, so
        it always arrives after anything sent about the user. Idempotent: deleting a user twice
        owes no URL a second delete.
        """
        users = list(user_ids)
        with writing(self.engine) as connection:
            connection.execute(
                select(outbox.c.id).where(outbox.c.user_id.in_(users)).with_for_update()
            ).all()
            connection.execute(
                dialect_insert(connection, deleted_users).on_conflict_do_nothing(),
                [{"user_id": user_id, "requested_at": now} for user_id in users],
            )
            # Every URL configured now, and every URL ever told about the user even if it is
            # not configured now: should it come back, its delete is waiting for it.
            owed = {(user, destination) for user in users for destination in destination_ids}
            for table in (state, outbox):
                owed |= {
                    (row[0], row[1])
                    for row in connection.execute(
                        select(table.c.user_id, table.c.destination_id)
                        .where(table.c.user_id.in_(users))
                        .distinct()
                    )
                }
            if owed:
                connection.execute(
                    dialect_insert(connection, deletions).on_conflict_do_nothing(),
                    [
                        {
                            "user_id": user,
                            "destination_id": destination,
                            "requested_at": now,
                            "attempts": 0,
                        }
                        for user, destination in sorted(owed)
                    ],
                )
            connection.execute(delete(state).where(state.c.user_id.in_(users)))
            # Privacy wins over history: what was sent about them is forgotten too, but for
            # how many deliveries of each run went (replay reports them as skipped).
            forget_history(connection, users)
            connection.execute(delete(outbox).where(outbox.c.user_id.in_(users), unclaimed(outbox)))

    def exchange(
        self,
        claim: Claim,
        destination_id: int,
        *,
        results: Sequence[tuple[int, Outcome]],
        want: int,
        after_id: int,
        now: datetime,
        rate_per_second: float = 0.0,
    ) -> tuple[list[OwedDeletion], int, Slots | None]:
        """Record ``results`` and claim up to ``want`` owed deletes after ``after_id``, in one
        transaction; return the claimed deletes, how many outcomes were refused (lost claim),
        and, with ``rate_per_second``, where the deletes go in the URL's paced schedule.

        A delete is not claimed while a change about the same user is claimed for the same URL:
        it goes out once that change's outcome is in.
        """
        with writing(self.engine) as connection:
            lost = self._record(connection, claim, results, now)
            if want <= 0:
                return [], lost, None
            x = deletions.c
            chosen = (
                select(x.id)
                .where(
                    x.destination_id == destination_id,
                    DELETION_OWED,
                    x.id > after_id,
                    unclaimed(deletions),
                    not_(_change_in_flight()),
                )
                .order_by(x.id)
                .limit(want)
                .with_for_update(skip_locked=True)
            )
            # Chosen first, then updated by id (see OutboxStore._claim).
            ids = connection.execute(chosen).scalars().all()
            if not ids:
                return [], lost, None
            rows = connection.execute(
                update(deletions)
                .where(x.id.in_(ids))
                .values(**claim_values(claim))
                .returning(x.id, x.user_id, x.requested_at)
            ).all()
            slots = None
            if rows and rate_per_second > 0:
                slots = reserve_slots(connection, destination_id, len(rows), rate_per_second)
        claimed = sorted((OwedDeletion(*row) for row in rows), key=lambda d: d.deletion_id)
        return claimed, lost, slots

    @staticmethod
    def _record(
        connection: Connection, claim: Claim, results: Sequence[tuple[int, Outcome]], now: datetime
    ) -> int:
        if not results:
            return 0
        ownership = owned(connection, deletions, [i for i, _ in results], claim)
        mine = ownership.mine
        recorded = [(i, o) for i, o in results if i in mine and o.kind is not OutcomeKind.NOT_SENT]
        if recorded:
            connection.execute(
                update(deletions)
                .where(deletions.c.id == bindparam("deletion_id"))
                .values(
                    delivered_at=bindparam("delivered_at"),
                    attempts=deletions.c.attempts + bindparam("tries", type_=Integer),
                    last_status=bindparam("http_status", type_=Integer),
                    last_error=bindparam("error", type_=Text),
                    last_attempt_at=now,
                    **RELEASED,
                ),
                [
                    {
                        "deletion_id": i,
                        "delivered_at": now if o.kind is OutcomeKind.DELIVERED else None,
                        "tries": o.attempts,
                        "http_status": None if o.kind is OutcomeKind.DELIVERED else o.status,
                        "error": None if o.kind is OutcomeKind.DELIVERED else o.detail,
                    }
                    for i, o in recorded
                ],
            )
        unsent = [i for i, o in results if i in mine and o.kind is OutcomeKind.NOT_SENT]
        if unsent:
            connection.execute(
                update(deletions).where(deletions.c.id.in_(unsent)).values(**RELEASED)
            )
        return ownership.taken_over

    def deleted_among(self, user_ids: Sequence[str]) -> set[str]:
        """Which of these users were deleted."""
        if not user_ids:
            return set()
        with reading(self.engine) as connection:
            return set(
                connection.execute(
                    select(deleted_users.c.user_id).where(
                        deleted_users.c.user_id.in_(sorted(set(user_ids)))
                    )
                ).scalars()
            )

    def owed_count(self, destination_id: int) -> int:
        """How many deletes one URL still has to accept."""
        with reading(self.engine) as connection:
            return int(
                connection.execute(
                    select(func.count()).where(
                        deletions.c.destination_id == destination_id, DELETION_OWED
                    )
                ).scalar_one()
            )

    def waiting_count(self, destination_id: int) -> int:
        """How many deletes owed to one URL wait for a change about their user in flight."""
        with reading(self.engine) as connection:
            return int(
                connection.execute(
                    select(func.count()).where(
                        deletions.c.destination_id == destination_id,
                        DELETION_OWED,
                        _change_in_flight(),
                    )
                ).scalar_one()
            )
