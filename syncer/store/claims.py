"""Claims: which worker may send which queued change or owed delete, for how long.

A worker claims a few rows just before sending them, under a token of its own; the claim runs
out on the database's clock unless renewed. Every write of an outcome is conditional on the
token still owning the row, so a worker whose claim ran out and was taken over can no longer
write anything, and learns that it must stop.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import ColumnElement, Double, Engine, Table, and_, bindparam, or_, select, update
from sqlalchemy.engine import Connection

from syncer.store.schema import deletions, outbox
from syncer.store.sql import db_epoch, reading, writing

_CLAIMED_TABLES: tuple[Table, ...] = (outbox, deletions)


@dataclass(frozen=True)
class Claim:
    """One worker's claim on the rows it sends to one URL: its token, who it is, how long a
    claim lasts without renewal, and the run it belongs to."""

    token: str
    holder: str
    ttl_seconds: float

    @classmethod
    def new(cls, holder: str, ttl_seconds: float) -> Claim:
        """A claim with a token never used before."""
        return cls(uuid.uuid4().hex, holder, ttl_seconds)


def unclaimed(table: Table) -> ColumnElement[bool]:
    """Rows no live claim holds: never claimed, released, or run out on the database's clock."""
    return or_(table.c.claimed_until.is_(None), table.c.claimed_until < db_epoch())


def claim_values(claim: Claim) -> dict[str, Any]:
    """The columns a claim sets."""
    return {
        "claim_token": claim.token,
        "claimed_by": claim.holder,
        "claimed_until": db_epoch() + claim.ttl_seconds,
    }


RELEASED: dict[str, Any] = {"claim_token": None, "claimed_by": None, "claimed_until": None}


@dataclass(frozen=True)
class Ownership:
    """Of the rows a worker reports on: those its claim still owns (locked until the
    transaction ends, so no takeover slips in before the write that relies on it), and how many
    another claim has taken over. Rows that no longer exist were superseded (a plan replaced
    them, or their user was deleted): neither ours nor lost."""

    mine: set[int]
    taken_over: int


def claim_parameters(claim: Claim) -> dict[str, Any]:
    """The values of :data:`CLAIM_SET`'s parameters for ``claim``."""
    return {"claim_token_": claim.token, "claimed_by_": claim.holder, "ttl_": claim.ttl_seconds}


# The columns a claim sets, as parameters of a statement built once (see claim_parameters).
CLAIM_SET: dict[str, Any] = {
    "claim_token": bindparam("claim_token_"),
    "claimed_by": bindparam("claimed_by_"),
    "claimed_until": db_epoch() + bindparam("ttl_", type_=Double()),
}

# Statements of the hot path are built once: building them costs more than running them.
_OWNED = {
    table.name: select(table.c.id, table.c.claim_token)
    .where(table.c.id.in_(bindparam("ids", expanding=True)))
    .with_for_update()
    for table in _CLAIMED_TABLES
}


def owned(connection: Connection, table: Table, ids: Sequence[int], claim: Claim) -> Ownership:
    """Which of ``ids`` ``claim`` still owns, and how many were taken over by another claim."""
    if not ids:
        return Ownership(set(), 0)
    rows = connection.execute(_OWNED[table.name], {"ids": list(ids)}).all()
    mine = {row.id for row in rows if row.claim_token == claim.token}
    return Ownership(mine, len(rows) - len(mine))


class ClaimStore:
    """Renews a worker's claims, and frees those of workers known to be dead."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def renew(self, claim: Claim) -> int:
        """Extend every live claim under ``claim``'s token; return how many rows it holds.

        A claim that already ran out is not revived: another worker may have taken the row.
        """
        renewed = 0
        with writing(self.engine) as connection:
            counted = connection.execution_options(preserve_rowcount=True)
            for table in _CLAIMED_TABLES:
                renewed += counted.execute(
                    update(table)
                    .where(
                        table.c.claim_token == claim.token,
                        table.c.claimed_until >= db_epoch(),
                    )
                    .values(claimed_until=db_epoch() + claim.ttl_seconds)
                ).rowcount
        return int(renewed)

    def release_dead(self, is_dead: Callable[[str], bool]) -> int:
        """Free the claims of holders ``is_dead`` says are gone (e.g. a killed process on this
        machine), so their rows are sent again at once instead of when the claims run out."""
        with reading(self.engine) as connection:
            holders: set[str] = set()
            for table in _CLAIMED_TABLES:
                holders.update(
                    connection.execute(
                        select(table.c.claimed_by)
                        .where(table.c.claim_token.is_not(None), table.c.claimed_by.is_not(None))
                        .distinct()
                    ).scalars()
                )
        dead = sorted(holder for holder in holders if is_dead(holder))
        if not dead:
            return 0
        released = 0
        with writing(self.engine) as connection:
            counted = connection.execution_options(preserve_rowcount=True)
            for table in _CLAIMED_TABLES:
                # A dead claimer may have sent what it claimed: the change stays doubtful.
                sent = {"attempted": True} if table is outbox else {}
                released += counted.execute(
                    update(table)
                    .where(and_(table.c.claim_token.is_not(None), table.c.claimed_by.in_(dead)))
                    .values(**RELEASED, **sent)
                ).rowcount
        return int(released)
