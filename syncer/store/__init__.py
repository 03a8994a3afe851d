"""All of the syncer's SQL, one module per concept, behind one :class:`Store`.

Everything works on SQLite and PostgreSQL alike; the diff runs in the database, and every read
that can grow with an audience is streamed or paged in batches.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass

from sqlalchemy import Engine, select

from syncer.store.audiences import AudienceStore
from syncer.store.claims import ClaimStore
from syncer.store.deletions import DeletionStore
from syncer.store.destinations import DestinationStore
from syncer.store.history import HistoryStore
from syncer.store.holds import HoldStore
from syncer.store.outbox import OutboxStore
from syncer.store.planning import PlanStore
from syncer.store.queries import QueryStore
from syncer.store.runs import RunStore
from syncer.store.schema import meta
from syncer.store.sql import reading, writing


def message_namespace(engine: Engine) -> uuid.UUID:
    """The random namespace the messageIds of this database are derived in."""
    with reading(engine) as connection:
        value = connection.execute(
            select(meta.c.value).where(meta.c.name == "message_namespace")
        ).scalar_one()
    return uuid.UUID(value)


@dataclass(frozen=True)
class Store:
    """The one gateway to the database, one attribute per concept."""

    engine: Engine
    namespace: uuid.UUID
    audiences: AudienceStore
    destinations: DestinationStore
    planning: PlanStore
    outbox: OutboxStore
    deletions: DeletionStore
    claims: ClaimStore
    holds: HoldStore
    runs: RunStore
    queries: QueryStore
    history: HistoryStore

    @classmethod
    def open(cls, engine: Engine) -> Store:
        """The store of a migrated database."""
        namespace = message_namespace(engine)
        return cls(
            engine=engine,
            namespace=namespace,
            audiences=AudienceStore(engine),
            destinations=DestinationStore(engine),
            planning=PlanStore(engine),
            outbox=OutboxStore(engine, namespace),
            deletions=DeletionStore(engine),
            claims=ClaimStore(engine),
            holds=HoldStore(engine),
            runs=RunStore(engine),
            queries=QueryStore(engine),
            history=HistoryStore(engine),
        )

    @property
    def writes_concurrently(self) -> bool:
        """Whether one transaction's writes leave others free to write meanwhile: PostgreSQL's
        row locks do, SQLite's single writer does not (a plan would stall every exchange)."""
        return self.engine.dialect.name == "postgresql"

    def refresh_statistics(self) -> None:
        """Let PostgreSQL's planner see the tables as they are now.

        Upstream bulk loads and a first sync change row counts by orders of magnitude between
        runs; with stale statistics PostgreSQL may pick a nested-loop anti-join for the diff that
        runs for minutes instead of a second. SQLite's planner needs no statistics here.
        """
        if self.engine.dialect.name != "postgresql":
            return
        with writing(self.engine) as connection:
            connection.exec_driver_sql(
                "ANALYZE audience_memberships, computed_trait_values, syncer_state, syncer_outbox"
            )
