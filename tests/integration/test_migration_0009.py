"""Migration 0009 on a database at revision 0008 that holds data, on both dialects: every row
the syncer kept becomes an audience's (``kind = 'audience'``), with its keys, ids and holds as
they were; and a real sync afterwards sends exactly what was owed, under the messageId it had,
and nothing to the members each URL was already told of.
"""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import select, text

from syncer.core.payload import message_id
from syncer.core.states import Kind, PairState
from syncer.store import Store
from syncer.store.database import migrate
from syncer.store.schema import audience_keys, outbox, pairs, state
from syncer.testing.tray_standin import TrayStandin
from tests.conftest import run_sync
from tests.integration.test_migration_0005 import at_revision

T0 = datetime(2026, 11, 1, 9, 0, 0)
QUEUED_ID = 41  # a change queued before the upgrade: its messageId must not change
HIGH_WATER = 57  # ids handed out before (the outbox rows above 41 were delivered and removed)


def test_0008_data_becomes_audiences_and_syncs_on(database_url: str, standin: TrayStandin) -> None:
    url, held_url = standin.url("/wf"), standin.url("/held")
    engine = at_revision(database_url, "0008")
    with engine.begin() as connection:
        run = connection.execute
        run(
            text("INSERT INTO audiences (id, name, enabled) VALUES ('aud_1', 'Loyal', :t)"),
            {"t": True},
        )
        run(
            text(
                "INSERT INTO audience_memberships (audience_id, user_id) "
                "VALUES ('aud_1', 'u1'), ('aud_1', 'u2'), ('aud_1', 'u3')"
            )
        )
        for destination_id, where in ((1, url), (2, held_url)):
            run(
                text(
                    "INSERT INTO syncer_destinations (id, url, canonical, first_seen_at) "
                    "VALUES (:id, :url, :url, :t)"
                ),
                {"id": destination_id, "url": where, "t": T0},
            )
        run(
            text(
                "INSERT INTO syncer_audience_keys (audience_id, key, locked_at) "
                "VALUES ('aud_1', 'loyal_old', :t)"
            ),
            {"t": T0},
        )
        for destination_id in (1, 2):
            for user in ("u1", "u2"):
                run(
                    text(
                        "INSERT INTO syncer_state (destination_id, audience_id, user_id, value, "
                        "unsure, told_at) VALUES (:d, 'aud_1', :u, 'true', :f, :t)"
                    ),
                    {"d": destination_id, "u": user, "f": False, "t": T0},
                )
        run(
            text(
                "INSERT INTO syncer_outbox (id, destination_id, audience_id, user_id, value, "
                "forced, attempted, created_at, status, attempts, rejections, call) VALUES "
                "(:id, 1, 'aud_1', 'u3', 'true', :f, :a, :t, 'pending', 1, 0, 'identify')"
            ),
            {"id": QUEUED_ID, "f": False, "a": True, "t": T0},
        )
        run(
            text(
                "INSERT INTO syncer_pairs (destination_id, audience_id, last_planned_at, "
                "held_at, hold_reason) VALUES (1, 'aud_1', :t, NULL, NULL), "
                "(2, 'aud_1', :t, :t, 'held before the upgrade')"
            ),
            {"t": T0},
        )
        if engine.dialect.name == "sqlite":
            run(
                text("UPDATE sqlite_sequence SET seq = :s WHERE name = 'syncer_outbox'"),
                {"s": HIGH_WATER},
            )
        else:
            run(
                text("SELECT setval(pg_get_serial_sequence('syncer_outbox', 'id'), :s)"),
                {"s": HIGH_WATER},
            )

    migrate(engine)

    with engine.connect() as connection:
        assert {row.kind for row in connection.execute(select(state))} == {Kind.AUDIENCE.value}
        assert connection.execute(select(audience_keys.c.kind, audience_keys.c.key)).all() == [
            ("audience", "loyal_old")
        ]
        [queued] = connection.execute(select(outbox)).all()
        assert (queued.id, queued.kind, queued.call, queued.done_call) == (
            QUEUED_ID, "audience", "identify", None,
        )  # fmt: skip
        held = {row.destination_id: row.hold_reason for row in connection.execute(select(pairs))}
        assert held == {1: None, 2: "held before the upgrade"}
    store = Store.open(engine)

    report = run_sync(store, [url, held_url])

    # The queued change goes out under the messageId it was queued with; u1 and u2 were told.
    [sent] = standin.received("/wf")
    assert sent.message["userId"] == "u3"
    assert sent.message["messageId"] == message_id(store.namespace, QUEUED_ID)
    assert sent.message["traits"] == {"loyal_old": True}
    # The other URL's pair was held for exits; none are due now, so its plan lifts the hold
    # (as 0008's would have) and it is sent the new member only.
    assert [r.message["userId"] for r in standin.received("/held")] == ["u3"]
    assert all(pair.state is PairState.DONE for pair in report.pairs)
    # New ids continue above every id handed out before the upgrade.
    with engine.begin() as connection:
        connection.execute(
            text(
                "INSERT INTO syncer_outbox (destination_id, audience_id, user_id, value, forced, "
                "created_at, status, attempts, rejections) "
                "VALUES (1, 'aud_1', 'u9', 'true', :f, :t, 'pending', 0, 0)"
            ),
            {"f": False, "t": T0},
        )
        assert (
            connection.execute(select(outbox.c.id).where(outbox.c.user_id == "u9")).scalar_one()
            > HIGH_WATER
        )
    engine.dispose()
