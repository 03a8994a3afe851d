"""A URL's next free send slot, advanced by each worker for the chunk it is about to send."""

from __future__ import annotations

from sqlalchemy import bindparam, select, update
from sqlalchemy.engine import Connection

from syncer.core.pacing import Slots, reserve
from syncer.store.schema import destinations
from syncer.store.sql import db_epoch

_d = destinations.c
_NEXT_FREE = (
    select(_d.next_send_at, db_epoch())
    .where(_d.id == bindparam("destination_id"))
    # FOR NO KEY UPDATE: recording a delivery in the same transaction inserts state rows whose
    # foreign key share-locks this row; FOR UPDATE would then deadlock two such workers.
    .with_for_update(key_share=True)
)
_ADVANCE = (
    update(destinations)
    .where(_d.id == bindparam("destination_id"))
    .values(next_send_at=bindparam("next_free"))
)


def reserve_slots(
    connection: Connection, destination_id: int, count: int, rate_per_second: float
) -> Slots:
    """Reserve ``count`` slots of the URL's schedule, inside the caller's transaction (the one
    that claims what will fill them), on the database's clock."""
    row = connection.execute(_NEXT_FREE, {"destination_id": destination_id}).one()
    slots = reserve(row[0], float(row[1]), count, rate_per_second)
    connection.execute(_ADVANCE, {"destination_id": destination_id, "next_free": slots.next_free})
    return slots
