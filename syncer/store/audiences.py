"""Audiences, computed traits and their keys: the input tables, and the keys locked at first
sync (one namespace for both kinds)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import Engine, exists, func, literal_column, not_, select, text

from syncer.core.states import Kind
from syncer.core.traits import AudienceIdentity, KeyProblem, KeyResolution, Subject, resolve_keys
from syncer.errors import ConfigError
from syncer.store.schema import (
    audience_keys,
    audience_memberships,
    audiences,
    computed_trait_values,
    computed_traits,
)
from syncer.store.sql import dialect_insert, reading, writing


@dataclass(frozen=True)
class AudienceRow:
    """One row of the ``audiences`` or the ``computed_traits`` input table."""

    audience_id: str
    name: str
    key: str | None
    enabled: bool
    kind: Kind = Kind.AUDIENCE
    # Of one defined in the settings: its query, evaluated at each run, and its time limit.
    query: str | None = None
    timeout_seconds: float = 60.0

    @property
    def from_query(self) -> bool:
        """Defined by a query in the settings, not by a row of an input table."""
        return self.query is not None

    @property
    def subject(self) -> Subject:
        """What this row defines: an audience or a computed trait."""
        return Subject(self.kind, self.audience_id)

    def is_named(self, wanted: str, keys: Mapping[Subject, str]) -> bool:
        """True when ``wanted`` is this row's id, trait key, or ``key`` column."""
        return wanted in (self.audience_id, keys.get(self.subject), self.key)


def _distinct_ids(table: str, column: str) -> Any:
    """The distinct values of an indexed id column, one index probe each (a "loose index
    scan"), so that finding rows of missing audiences or traits never reads every row."""
    return text(
        f"""
        WITH RECURSIVE ids(id) AS (
            SELECT min({column}) FROM {table}
            UNION ALL
            SELECT (SELECT min(t.{column}) FROM {table} t WHERE t.{column} > ids.id)
            FROM ids WHERE ids.id IS NOT NULL
        )
        SELECT id FROM ids WHERE id IS NOT NULL
        """
    ).columns(literal_column("id"))


def named_row(
    rows: Sequence[AudienceRow], keys: Mapping[Subject, str], wanted: str, option: str
) -> AudienceRow | None:
    """The audience or trait whose id, trait key or ``key`` column is ``wanted``, or None. A key
    comes first: an audience and a trait may share an id, never a key. Raises ConfigError,
    naming ``option`` (the argument that gave ``wanted``), when ``wanted`` is only the id of
    both an audience and a trait."""
    named: dict[Subject, AudienceRow] = {}
    for row in rows:
        if row.is_named(wanted, keys):
            named.setdefault(row.subject, row)
    by_key = [row for subject, row in named.items() if keys.get(subject) == wanted]
    if len(by_key) == 1:
        return by_key[0]
    if len(named) > 1:
        both = " and ".join(str(subject) for subject in sorted(named))
        raise ConfigError(f"{option}: {wanted!r} names {both}: give its key instead")
    return next(iter(named.values()), None)


class AudienceStore:
    """Reads the audiences upstream defines, and locks the key each is synced under."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def load(self) -> list[AudienceRow]:
        """Every audience, then every computed trait (a few hundred rows at most: memberships
        and values are never loaded whole)."""
        rows: list[AudienceRow] = []
        with reading(self.engine) as connection:
            for table, kind in ((audiences, Kind.AUDIENCE), (computed_traits, Kind.TRAIT)):
                found = connection.execute(
                    select(table.c.id, table.c.name, table.c.key, table.c.enabled).order_by(
                        table.c.id
                    )
                ).all()
                rows += [
                    AudienceRow(row.id, row.name, row.key, bool(row.enabled), kind) for row in found
                ]
        return rows

    def locked_keys(self) -> dict[Subject, str]:
        """Each audience and trait -> the key it was first synced under."""
        k = audience_keys.c
        with reading(self.engine) as connection:
            rows = connection.execute(select(k.kind, k.audience_id, k.key))
            return {Subject(Kind(row.kind), row.audience_id): row.key for row in rows}

    def with_keys(
        self, defined: Sequence[AudienceRow] = ()
    ) -> tuple[list[AudienceRow], KeyResolution]:
        """Every audience and trait, of the input tables and ``defined`` in the settings, and
        the key each syncs under (or why it cannot be). An id both defined in the settings and
        found in an input table (of the same kind) is refused in both places."""
        from_tables = self.load()
        twice = {row.subject for row in from_tables} & {row.subject for row in defined}
        rows = from_tables + list(defined)
        resolution = resolve_keys(
            [
                AudienceIdentity(row.subject, row.name, row.key)
                for row in rows
                if row.subject not in twice
            ],
            self.locked_keys(),
        )
        for subject in sorted(twice):
            table = "audiences" if subject.kind is Kind.AUDIENCE else "computed_traits"
            resolution.problems.append(
                KeyProblem(
                    subject,
                    f"id {subject.id!r} is both defined in the settings and a row of the "
                    f"{table} table: both are skipped until one is removed",
                )
            )
        return rows, resolution

    def find(
        self, wanted: str, defined: Sequence[AudienceRow] = (), option: str = "AUDIENCE"
    ) -> Subject | None:
        """The audience or trait named ``wanted`` (:func:`named_row`), of the input tables and
        ``defined`` in the settings."""
        rows, resolution = self.with_keys(defined)
        row = named_row(rows, resolution.keys, wanted, option)
        return None if row is None else row.subject

    def lock_keys(self, keys: dict[Subject, str], now: datetime) -> set[Subject]:
        """Record that each audience or trait syncs under its key from now on, in one
        transaction; return those whose key is theirs (a key already taken by another is not)."""
        if not keys:
            return set()
        k = audience_keys.c
        with writing(self.engine) as connection:
            connection.execute(
                dialect_insert(connection, audience_keys).on_conflict_do_nothing(),
                [
                    {
                        "audience_id": subject.id,
                        "kind": subject.kind.value,
                        "key": key,
                        "locked_at": now,
                    }
                    for subject, key in keys.items()
                ],
            )
            locked = connection.execute(
                select(k.kind, k.audience_id, k.key).where(
                    k.audience_id.in_(sorted({subject.id for subject in keys}))
                )
            ).all()
        ours = {Subject(Kind(row.kind), row.audience_id): row.key for row in locked}
        return {subject for subject, key in keys.items() if ours.get(subject) == key}

    def orphan_memberships(self, limit: int = 20) -> list[tuple[str, int]]:
        """(audience id, rows) for memberships whose audience does not exist."""
        return self._orphans(audiences, audience_memberships.c.audience_id, limit)

    def orphan_values(self, limit: int = 20) -> list[tuple[str, int]]:
        """(trait id, rows) for computed trait values whose trait does not exist."""
        return self._orphans(computed_traits, computed_trait_values.c.trait_id, limit)

    def _orphans(self, owners: Any, column: Any, limit: int) -> list[tuple[str, int]]:
        ids = _distinct_ids(column.table.name, column.name).subquery("owner_ids")
        with reading(self.engine) as connection:
            orphans = (
                connection.execute(
                    select(ids.c.id)
                    .where(not_(exists().where(owners.c.id == ids.c.id)))
                    .order_by(ids.c.id)
                    .limit(limit)
                )
                .scalars()
                .all()
            )
            return [
                (
                    str(owner_id),
                    int(
                        connection.execute(
                            select(func.count()).where(column == owner_id)
                        ).scalar_one()
                    ),
                )
                for owner_id in orphans
            ]
