"""Audiences and their trait keys: the input table, and the keys locked at first sync."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import Engine, exists, func, literal_column, not_, select, text

from syncer.core.traits import AudienceIdentity, KeyResolution, resolve_keys
from syncer.store.schema import audience_keys, audience_memberships, audiences
from syncer.store.sql import dialect_insert, reading, writing


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


# The distinct audience ids of the memberships, one index probe each (a "loose index scan"),
# so that finding memberships of missing audiences never reads every membership row.
_MEMBERSHIP_AUDIENCES = text(
    """
    WITH RECURSIVE ids(audience_id) AS (
        SELECT min(audience_id) FROM audience_memberships
        UNION ALL
        SELECT (SELECT min(m.audience_id) FROM audience_memberships m
                WHERE m.audience_id > ids.audience_id)
        FROM ids WHERE ids.audience_id IS NOT NULL
    )
    SELECT audience_id FROM ids WHERE audience_id IS NOT NULL
    """
).columns(literal_column("audience_id"))


class AudienceStore:
    """Reads the audiences upstream defines, and locks the key each is synced under."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def load(self) -> list[AudienceRow]:
        """Every audience (a few hundred rows at most: memberships are never loaded whole)."""
        with reading(self.engine) as connection:
            rows = connection.execute(
                select(
                    audiences.c.id, audiences.c.name, audiences.c.key, audiences.c.enabled
                ).order_by(audiences.c.id)
            ).all()
        return [AudienceRow(row.id, row.name, row.key, bool(row.enabled)) for row in rows]

    def locked_keys(self) -> dict[str, str]:
        """Audience id -> the key it was first synced under."""
        with reading(self.engine) as connection:
            rows = connection.execute(select(audience_keys.c.audience_id, audience_keys.c.key))
            return {row.audience_id: row.key for row in rows}

    def with_keys(self) -> tuple[list[AudienceRow], KeyResolution]:
        """Every audience, and the key each syncs under (or why it cannot be synced)."""
        rows = self.load()
        resolution = resolve_keys(
            [AudienceIdentity(row.audience_id, row.name, row.key) for row in rows],
            self.locked_keys(),
        )
        return rows, resolution

    def find(self, wanted: str) -> str | None:
        """The id of the audience whose id, locked key or ``audiences.key`` is ``wanted``."""
        rows, resolution = self.with_keys()
        for row in rows:
            if row.is_named(wanted, resolution.keys):
                return row.audience_id
        return None

    def lock_keys(self, keys: dict[str, str], now: datetime) -> set[str]:
        """Record that each audience (id -> key) syncs under its key from now on, in one
        transaction; return the ids whose key is theirs (a key already taken by another audience
        is not)."""
        if not keys:
            return set()
        with writing(self.engine) as connection:
            connection.execute(
                dialect_insert(connection, audience_keys).on_conflict_do_nothing(),
                [
                    {"audience_id": audience_id, "key": key, "locked_at": now}
                    for audience_id, key in keys.items()
                ],
            )
            locked = connection.execute(
                select(audience_keys.c.audience_id, audience_keys.c.key).where(
                    audience_keys.c.audience_id.in_(list(keys))
                )
            ).all()
        return {audience_id for audience_id, key in locked if keys.get(audience_id) == key}

    def orphan_memberships(self, limit: int = 20) -> list[tuple[str, int]]:
        """(audience id, rows) for memberships whose audience does not exist."""
        ids = _MEMBERSHIP_AUDIENCES.subquery("membership_audiences")
        with reading(self.engine) as connection:
            orphans = (
                connection.execute(
                    select(ids.c.audience_id)
                    .where(not_(exists().where(audiences.c.id == ids.c.audience_id)))
                    .order_by(ids.c.audience_id)
                    .limit(limit)
                )
                .scalars()
                .all()
            )
            counts = []
            for audience_id in orphans:
                rows = connection.execute(
                    select(func.count()).where(audience_memberships.c.audience_id == audience_id)
                ).scalar_one()
                counts.append((str(audience_id), int(rows)))
            return counts
