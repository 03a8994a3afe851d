"""The trait planner (:mod:`syncer.store.trait_planning`) against the pure spec (``plan_user``
with a user's value for ``current`` and ``null`` for ``absent_value``), on SQLite and PostgreSQL.

Every combination of one user's rows is written straight into the tables at once: their row in
``computed_trait_values`` (none, SQL NULL, JSON null, a value, the same value spelled another
way, another value; on SQLite also text that is not JSON), what the URL was told (nothing, a
value in some spelling, null; sure or not), their queued change (none, a value or null; sent
before or not; forced; claimed by a dead sender), and whether they were deleted for privacy.
The spec decides on JSON equality, so it is given each text's equality key. Planning must then
do to every user what the spec says: a kept change keeps its id and its text; a new change has
the wanted value (stored text for a value); a dropped change is gone; a dropped change that may
have been processed leaves its doubt in ``syncer_state``. Planning again changes nothing.
"""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import pytest
from sqlalchemy import insert, select, text

from syncer.core.diff import NULL_VALUE, Presence, Queued, Told, plan_user
from syncer.core.guard import GuardLimits
from syncer.core.jsonvalues import equality_key
from syncer.core.states import ChangeStatus, Kind
from syncer.store import Store
from syncer.store.schema import computed_traits, deleted_users, outbox, pairs, state

TRAIT = "tr_spec"
URL = "http://127.0.0.1:9/trait-spec"
GUARD_OFF = GuardLimits(max_exit_share=1.0, min_audience_size=10**9)
LAST_PLANNED = datetime(2030, 1, 1, 12, 0, 0)
ABSENT, SQL_NULL, NOT_JSON = "absent", "sql-null", "{not json"
# Rows upstream may hold: "1.50" and "1.5" are one value, "2" another.
CURRENT = [ABSENT, SQL_NULL, "null", "1.50", "1.5", '{"a": [2]}']
TOLD: list[tuple[str | None, bool] | None] = [
    None,  # no state row
    ("1.5", False),
    ("1.500", True),
    ('{"a":[2.0]}', False),
    (NULL_VALUE, False),
    (None, True),  # doubt without an accepted value
]
QUEUED: list[tuple[str, bool, bool, str | None] | None] = [
    None,  # (value, attempted, forced, claim)
    ("1.5", False, False, None),
    ("1.50", True, False, None),
    ("1.5", False, True, None),
    ('{"a":[2]}', False, False, None),
    (NULL_VALUE, False, False, None),
    (NULL_VALUE, True, False, None),
    ("7", False, False, "expired"),
]


@dataclass(frozen=True)
class User:
    current: str
    told: tuple[str | None, bool] | None
    queued: tuple[str, bool, bool, str | None] | None
    suppressed: bool


def key(text_value: str | None) -> str | None:
    return None if text_value is None else equality_key(text_value)


def spec(user: User, full: bool) -> Any:
    if user.suppressed:
        presence = Presence.SUPPRESSED
    elif user.current == NOT_JSON:
        presence = Presence.INVALID
    elif user.current in (ABSENT, SQL_NULL) or key(user.current) == NULL_VALUE:
        presence = Presence.ABSENT
    else:
        presence = Presence.MEMBER
    told = Told() if user.told is None else Told(key(user.told[0]), user.told[1])
    queued = None
    if user.queued is not None:
        value, attempted, forced, claim = user.queued
        queued = Queued(str(key(value)), attempted=attempted or claim is not None, forced=forced)
    current = key(user.current) if presence is Presence.MEMBER else NULL_VALUE
    return plan_user(
        presence, told, queued, current=str(current), full=full, absent_value=NULL_VALUE
    )


def write(store: Store, destination_id: int, users: dict[str, User]) -> dict[str, int]:
    """Write every user's rows; return user -> the id of their queued change."""
    postgresql = store.engine.dialect.name == "postgresql"
    epoch = time.time()
    with store.engine.begin() as connection:
        connection.execute(insert(computed_traits).values(id=TRAIT, name="Spec"))
        connection.execute(
            insert(pairs).values(
                destination_id=destination_id,
                audience_id=TRAIT,
                kind=Kind.TRAIT.value,
                last_planned_at=LAST_PLANNED,
            )
        )
        values = [
            {"u": u, "v": None if r.current == SQL_NULL else r.current}
            for u, r in users.items()
            if r.current != ABSENT
        ]
        cast = "CAST(:v AS json)" if postgresql else ":v"
        connection.execute(
            text(
                "INSERT INTO computed_trait_values (trait_id, user_id, value) "
                f"VALUES ('{TRAIT}', :u, {cast})"
            ),
            values,
        )
        suppressed = [{"user_id": u, "requested_at": LAST_PLANNED} for u, r in users.items()]
        connection.execute(
            insert(deleted_users),
            [row for row in suppressed if users[row["user_id"]].suppressed],
        )
        told = [
            {
                "destination_id": destination_id,
                "audience_id": TRAIT,
                "kind": Kind.TRAIT.value,
                "user_id": u,
                "value": r.told[0],
                "unsure": r.told[1],
            }
            for u, r in users.items()
            if r.told is not None
        ]
        connection.execute(insert(state), told)
        queued = [
            {
                "destination_id": destination_id,
                "audience_id": TRAIT,
                "kind": Kind.TRAIT.value,
                "user_id": u,
                "value": q[0],
                "forced": q[2],
                "attempted": q[1],
                "created_at": LAST_PLANNED - timedelta(seconds=1),
                "status": ChangeStatus.PENDING.value,
                "attempts": int(q[1]),
                "rejections": 0,
                "claim_token": None if q[3] is None else f"token-{u}",
                "claimed_by": None if q[3] is None else "elsewhere:1:x",
                "claimed_until": None if q[3] is None else epoch - 600,
            }
            for u, r in users.items()
            if (q := r.queued) is not None
        ]
        connection.execute(insert(outbox), queued)
        rows = connection.execute(
            select(outbox.c.user_id, outbox.c.id).where(outbox.c.audience_id == TRAIT)
        ).all()
    return {row.user_id: row.id for row in rows}


def snapshot(store: Store) -> tuple[dict[str, Any], dict[str, Any]]:
    with store.engine.connect() as connection:
        queued = connection.execute(select(outbox).where(outbox.c.audience_id == TRAIT)).all()
        told = connection.execute(
            select(state.c.user_id, state.c.value, state.c.unsure).where(
                state.c.audience_id == TRAIT
            )
        ).all()
    return {row.user_id: row for row in queued}, {row.user_id: row for row in told}


@pytest.mark.parametrize("full", [False, True], ids=["plan", "full"])
def test_every_situation_of_a_trait_follows_the_spec(store: Store, full: bool) -> None:
    currents = [*CURRENT, NOT_JSON] if store.engine.dialect.name == "sqlite" else CURRENT
    situations = itertools.product(currents, TOLD, QUEUED, [False, True])
    users = {f"u{n:04d}": User(*situation) for n, situation in enumerate(situations)}
    destination_id = store.destinations.ensure([URL], LAST_PLANNED)[URL]
    ids_before = write(store, destination_id, users)

    result = store.planning.plan(
        destination_id,
        TRAIT,
        full=full,
        now=LAST_PLANNED + timedelta(seconds=1),
        limits=GUARD_OFF,
        kind=Kind.TRAIT,
    )

    queued, told = snapshot(store)
    added = {"values": 0, "nulls": 0}
    for user_id, user in users.items():
        plan = spec(user, full)
        row = queued.get(user_id)
        where = (user_id, user, plan)
        if plan.keep:
            assert row is not None and row.id == ids_before[user_id], where
            assert row.value == user.queued[0], where  # type: ignore[index]
        elif plan.add is not None:
            assert row is not None and row.id not in ids_before.values(), where
            assert equality_key(row.value) == plan.add, where
            if plan.add != NULL_VALUE:
                assert row.value == user.current, where  # the text as stored
            added["nulls" if plan.add == NULL_VALUE else "values"] += 1
        else:
            assert row is None, where
        if plan.mark_unsure:
            assert told[user_id].unsure, where
    assert (result.new_entered, result.new_exited) == (added["values"], added["nulls"])

    # Planned again at once: nothing to change.
    again = store.planning.plan(
        destination_id,
        TRAIT,
        full=False,
        now=LAST_PLANNED + timedelta(seconds=2),
        limits=GUARD_OFF,
        kind=Kind.TRAIT,
    )
    assert (again.new_entered, again.new_exited) == (0, 0)
    assert {u: r.id for u, r in snapshot(store)[0].items()} == {u: r.id for u, r in queued.items()}
