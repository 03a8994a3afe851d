"""Migration 0005 on a database at revision 0004 that holds realistic data, on both dialects.

The 0004 database is built with Alembic and filled with SQL the way the old version left it:
two spellings of one workflow URL registered as two destinations (ids 1 and 2) beside another
workflow (id 3), what each was told (``syncer_delivered``) and has queued (``syncer_outbox``)
overlapping per user, privacy deletes owed and delivered to both, per-pair run state, a
mass-exit hold, leases, and id sequences whose high-water mark is above the highest id left (rows
were inserted and deleted). After ``migrate``:

- the two spellings are one destination, keyed by the canonical URL, first seen when the first
  was, requests going to the most recently registered spelling;
- per user, the newest of what the two were told wins; the queued change with the higher id
  wins, and is ``attempted`` if a dropped one had been tried; a delivered delete wins over an
  owed one, and of two owed deletes the older is kept (ids, hence messageIds, are kept);
- ``syncer_pairs`` merges the pairs' run state and puts the old per-audience hold on every URL
  that knows the audience; the leases and the old tables are gone;
- the next outbox and deletion ids are above every id ever handed out, since messageIds derive
  from them and a URL may have seen those;
- a real sync against the stand-in then sends exactly what is owed: the kept changes with their
  old messageIds, new changes with messageIds never used before, each owed delete once, nothing
  about deleted users, and nothing for the held audience.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from alembic import command
from sqlalchemy import Engine, MetaData, insert, inspect, select
from sqlalchemy.engine import Connection

from syncer.core.payload import message_id
from syncer.core.urls import canonical_url
from syncer.store import Store
from syncer.store.database import (
    SCHEMA_REVISION,
    _alembic_config,
    check_schema,
    create_database_engine,
    migrate,
)
from syncer.store.schema import deletions, destinations, outbox, pairs, state
from syncer.testing.tray_standin import TrayStandin
from tests.conftest import run_sync

T0 = datetime(2026, 3, 1, 9, 0, 0)
T1 = datetime(2026, 3, 2, 9, 0, 0)
T2 = datetime(2026, 3, 3, 9, 0, 0)
T3 = datetime(2026, 3, 4, 9, 0, 0)
HOLD_REASON = "20 of the 24 members the URL was told of would exit (over 50%)"
HELD_USERS = [f"h{i}" for i in range(1, 25)]  # told of by both workflows; 20 of them left


@dataclass(frozen=True)
class Urls:
    """The workflow registered under two spellings (ids 1, 2), and another workflow (id 3)."""

    first_spelling: str
    second_spelling: str
    other: str


@dataclass(frozen=True)
class Old:
    """Ids the 0004 database handed out, by name, and the highest each sequence ever gave."""

    outbox: dict[str, int]
    deletions: dict[str, int]
    runs: list[int]
    outbox_high_water: int
    deletions_high_water: int


def at_revision(url: str, revision: str) -> Engine:
    """An engine on a database migrated to ``revision`` with Alembic."""
    engine = create_database_engine(url)
    config = _alembic_config()
    with engine.begin() as connection:
        config.attributes["connection"] = connection
        command.upgrade(config, revision)
    return engine


def _inserted(connection: Connection, table: Any, **values: Any) -> int:
    return int(
        connection.execute(insert(table).values(**values).returning(table.c.id)).scalar_one()
    )


def fill_0004(engine: Engine, urls: Urls) -> Old:
    """Rows in the 0004 tables, as the old version wrote them."""
    meta = MetaData()
    with engine.begin() as connection:
        meta.reflect(connection)
        t = meta.tables
        connection.execute(
            insert(t["audiences"]),
            [{"id": "aud", "name": "Buyers"}, {"id": "aud2", "name": "Big spenders"}],
        )
        connection.execute(
            insert(t["syncer_audience_keys"]),
            [
                {"audience_id": "aud", "key": "buyers", "locked_at": T0},
                {"audience_id": "aud2", "key": "big_spenders", "locked_at": T0},
            ],
        )
        members = [("aud", u) for u in ("u1", "u3", "u5", "gone2")]
        members += [("aud2", u) for u in HELD_USERS[:4]]
        connection.execute(
            insert(t["audience_memberships"]),
            [{"audience_id": a, "user_id": u} for a, u in members],
        )
        connection.execute(
            insert(t["syncer_destinations"]),
            [
                {"id": 1, "url": urls.first_spelling, "first_seen_at": T0},
                {"id": 2, "url": urls.second_spelling, "first_seen_at": T1},
                {"id": 3, "url": urls.other, "first_seen_at": T0},
            ],
        )
        told = [
            (1, "aud", "u1", "true", T1),
            (2, "aud", "u1", "false", T2),  # newer: wins
            (1, "aud", "u2", "false", T3),  # newer: wins
            (2, "aud", "u2", "true", T1),
            (1, "aud", "u3", "true", T1),
            (2, "aud", "u4", "true", T1),
            (3, "aud", "u1", "true", T1),
        ]
        told += [(d, "aud2", u, "true", T1) for d in (1, 3) for u in HELD_USERS]
        connection.execute(
            insert(t["syncer_delivered"]),
            [
                {
                    "destination_id": d,
                    "audience_id": a,
                    "user_id": u,
                    "value": v,
                    "message_id": f"old-{d}-{a}-{u}",
                    "delivered_at": at,
                }
                for d, a, u, v, at in told
            ],
        )
        runs = [
            _inserted(
                connection,
                t["syncer_runs"],
                trigger="schedule",
                started_at=T0,
                finished_at=T0,
                status="ok",
                audiences=2,
                entered=0,
                exited=0,
                delivered=0,
                pending=0,
                rejected=0,
            )
            for _ in range(7)
        ]

        def change(destination: int, user: str, attempts: int = 0) -> int:
            return _inserted(
                connection,
                t["syncer_outbox"],
                destination_id=destination,
                audience_id="aud",
                user_id=user,
                value="true",
                forced=False,
                created_at=T2,
                status="pending",
                attempts=attempts,
                rejections=0,
                last_status=503 if attempts else None,
            )

        changes = {
            "u1 tried, dropped": change(1, "u1", attempts=2),
            "u1 kept": change(2, "u1"),
            "u5 dropped": change(2, "u5"),
            "u5 kept": change(1, "u5"),
            "u3 to other": change(3, "u3"),
        }
        gone_changes = [change(3, f"sent{i}") for i in range(5)]

        def owed(user: str, destination: int, delivered_at: datetime | None = None) -> int:
            return _inserted(
                connection,
                t["syncer_deletions"],
                user_id=user,
                destination_id=destination,
                requested_at=T1,
                delivered_at=delivered_at,
                attempts=1 if delivered_at else 0,
            )

        deletes = {
            "gone1 delivered": owed("gone1", 1, T2),
            "gone1 owed, dropped": owed("gone1", 2),
            "gone2 owed, kept": owed("gone2", 2),
            "gone2 owed, dropped": owed("gone2", 1),
            "gone1 to other": owed("gone1", 3),
        }
        gone_deletes = [owed(f"sent{i}", 3, T2) for i in range(3)]
        connection.execute(
            insert(t["syncer_deleted_users"]),
            [{"user_id": u, "requested_at": T1} for u in ("gone1", "gone2")],
        )
        # Delivered and deleted since: their ids were handed out and must never come back.
        outbox_table, deletions_table = t["syncer_outbox"], t["syncer_deletions"]
        connection.execute(outbox_table.delete().where(outbox_table.c.id.in_(gone_changes)))
        connection.execute(deletions_table.delete().where(deletions_table.c.id.in_(gone_deletes)))

        pair = t["syncer_pair_state"]
        connection.execute(
            insert(pair),
            [
                {"destination_id": d, "audience_id": a, "last_run_id": runs[r],
                 "last_attempt_at": at, "last_success_at": ok}
                for d, a, r, at, ok in [
                    (1, "aud", 4, T1, T1),
                    (2, "aud", 6, T2, T2),
                    (3, "aud", 6, T2, T2),
                    (1, "aud2", 6, T2, None),
                ]
            ],
        )  # fmt: skip
        connection.execute(
            insert(t["syncer_holds"]).values(
                audience_id="aud2", held_at=T2, reason=HOLD_REASON, approved_at=None
            )
        )
        connection.execute(
            insert(t["syncer_leases"]),
            [
                {"name": "sync", "holder": "old-host:4242:abc", "expires_at": T3},
                {"name": f"url:{urls.other}", "holder": "old-host:4242:abc", "expires_at": T3},
            ],
        )
    return Old(changes, deletes, runs, max(gone_changes), max(gone_deletes))


def test_0004_data_is_merged_per_workflow_and_ids_continue_above_every_id_used(
    database_url: str,
) -> None:
    urls = Urls("http://h/wf", "HTTP://H:80/wf/", "http://h/other")
    engine = at_revision(database_url, "0004")
    try:
        old = fill_0004(engine, urls)
        before, after = migrate(engine)
        assert (before, after) == ("0004", SCHEMA_REVISION)
        check_schema(engine)
        store = Store.open(engine)
        with engine.connect() as connection:
            tables = set(inspect(connection).get_table_names())
            rows = _read_back(connection)
    finally:
        engine.dispose()

    gone = {"syncer_leases", "syncer_holds", "syncer_pair_state", "syncer_delivered"}
    assert not tables & (gone | {"syncer_destination_map"})
    assert not {name for name in tables if name.endswith("_next")}

    assert rows["destinations"] == [
        (1, urls.second_spelling, "http://h/wf", T0),
        (3, urls.other, "http://h/other", T0),
    ]
    assert canonical_url(urls.first_spelling) == canonical_url(urls.second_spelling)

    told = {key: value for key, value in rows["state"].items() if key[1] == "aud"}
    assert told == {
        (1, "aud", "u1"): ("false", False, "old-2-aud-u1", T2),
        (1, "aud", "u2"): ("false", False, "old-1-aud-u2", T3),
        (1, "aud", "u3"): ("true", False, "old-1-aud-u3", T1),
        (1, "aud", "u4"): ("true", False, "old-2-aud-u4", T1),
        (3, "aud", "u1"): ("true", False, "old-3-aud-u1", T1),
    }
    assert {key for key in rows["state"] if key[1] == "aud2"} == {
        (d, "aud2", u) for d in (1, 3) for u in HELD_USERS
    }

    assert rows["outbox"] == {
        old.outbox["u1 kept"]: (1, "aud", "u1", "true", True),  # a dropped one was tried
        old.outbox["u5 kept"]: (1, "aud", "u5", "true", False),
        old.outbox["u3 to other"]: (3, "aud", "u3", "true", False),
    }
    assert rows["deletions"] == {
        old.deletions["gone1 delivered"]: ("gone1", 1, T2),
        old.deletions["gone2 owed, kept"]: ("gone2", 1, None),
        old.deletions["gone1 to other"]: ("gone1", 3, None),
    }

    last = old.runs[6]
    assert rows["pairs"] == {
        (1, "aud"): (last, T2, T2, None, None, None),
        (3, "aud"): (last, T2, T2, None, None, None),
        (1, "aud2"): (last, T2, None, T2, HOLD_REASON, None),
        (3, "aud2"): (None, None, None, T2, HOLD_REASON, None),  # knew the audience: held too
    }

    # The ids handed out next are above every id handed out before, even those deleted since.
    assert old.outbox_high_water > max(old.outbox.values())
    assert old.deletions_high_water > max(old.deletions.values())
    with store.engine.begin() as connection:
        next_change = _inserted(
            connection,
            outbox,
            destination_id=1,
            audience_id="aud",
            user_id="newcomer",
            value="true",
            forced=False,
            created_at=T3,
            status="pending",
            attempts=0,
            rejections=0,
        )
        next_delete = _inserted(
            connection,
            deletions,
            user_id="newcomer",
            destination_id=1,
            requested_at=T3,
            attempts=0,
        )
    store.engine.dispose()
    assert next_change > old.outbox_high_water
    assert next_delete > old.deletions_high_water


def _read_back(connection: Connection) -> dict[str, Any]:
    """The migrated tables, in plain values."""
    d, s, o, x, p = destinations.c, state.c, outbox.c, deletions.c, pairs.c
    return {
        "destinations": [
            tuple(row)
            for row in connection.execute(
                select(d.id, d.url, d.canonical, d.first_seen_at).order_by(d.id)
            )
        ],
        "state": {
            (row[0], row[1], row[2]): (row[3], bool(row[4]), row[5], row[6])
            for row in connection.execute(
                select(
                    s.destination_id,
                    s.audience_id,
                    s.user_id,
                    s.value,
                    s.unsure,
                    s.message_id,
                    s.told_at,
                )
            )
        },
        "outbox": {
            row[0]: (row[1], row[2], row[3], row[4], bool(row[5]))
            for row in connection.execute(
                select(o.id, o.destination_id, o.audience_id, o.user_id, o.value, o.attempted)
            )
        },
        "deletions": {
            row[0]: (row[1], row[2], row[3])
            for row in connection.execute(select(x.id, x.user_id, x.destination_id, x.delivered_at))
        },
        "pairs": {
            (row[0], row[1]): tuple(row[2:])
            for row in connection.execute(
                select(
                    p.destination_id,
                    p.audience_id,
                    p.last_run_id,
                    p.last_attempt_at,
                    p.last_success_at,
                    p.held_at,
                    p.hold_reason,
                    p.approved_at,
                )
            )
        },
    }


def _messages(standin: TrayStandin, path: str) -> list[tuple[str, str, bool | None, str]]:
    """(type, userId, trait value or None, messageId) of every request to ``path``."""
    found = []
    for received in standin.received(path):
        assert received.signature_ok, received.body
        message = received.message
        value = None
        if message["type"] == "identify":
            value = message["traits"][message["context"]["personas"]["computation_key"]]
        found.append((message["type"], message["userId"], value, message["messageId"]))
    return sorted(found)


def test_migrated_database_syncs_end_to_end_and_sends_only_what_is_owed(
    database_url: str, standin: TrayStandin
) -> None:
    wf, other = standin.url("/wf"), standin.url("/other")
    urls = Urls(wf, wf.replace("http://", "HTTP://") + "/", other)
    engine = at_revision(database_url, "0004")
    try:
        old = fill_0004(engine, urls)
        migrate(engine)
        store = Store.open(engine)
        report = run_sync(store, [wf, other])
    finally:
        engine.dispose()

    namespace = store.namespace
    high_water = max(old.outbox_high_water, old.deletions_high_water)
    used_before = {
        message_id(namespace, i, kind)
        for kind in ("change", "delete")
        for i in range(1, high_water + 1)
    }
    received = {path: _messages(standin, path) for path in ("/wf", "/wf/", "/other")}
    new_ids = {
        path: [m[3] for m in messages if m[3] not in used_before]
        for path, messages in received.items()
    }
    assert [len(new_ids["/wf"]), len(new_ids["/other"])] == [1, 1], (
        f"one new change per URL, with a messageId never handed out before: {received}"
    )
    assert received == {
        "/wf": sorted(
            [
                ("identify", "u1", True, message_id(namespace, old.outbox["u1 kept"])),
                ("identify", "u5", True, message_id(namespace, old.outbox["u5 kept"])),
                ("identify", "u4", False, new_ids["/wf"][0]),  # left: a new change, a new id
                (
                    "delete",
                    "gone2",
                    None,
                    message_id(namespace, old.deletions["gone2 owed, kept"], "delete"),
                ),
            ]
        ),
        "/wf/": [],  # the other spelling: requests go to the URL as configured now
        "/other": sorted(
            [
                ("identify", "u3", True, message_id(namespace, old.outbox["u3 to other"])),
                ("identify", "u5", True, new_ids["/other"][0]),  # never told: enters
                (
                    "delete",
                    "gone1",
                    None,
                    message_id(namespace, old.deletions["gone1 to other"], "delete"),
                ),
            ]
        ),
    }
    # The old hold still holds: nothing about the 20 who left (or anyone else of aud2) went out.
    assert sorted((p.url, p.audience_id) for p in report.held) == [(other, "aud2"), (wf, "aud2")]
    assert not report.fully_delivered
