"""The SQL planner against the pure specification in :mod:`syncer.core.diff`.

For random states of (current members, values each user was last told, changes already queued),
planning a (URL, audience) pair must leave exactly ``desired_changes(...)`` in its outbox, keep
the queued changes ``reconcile_outbox`` keeps under their old ids (so their retries carry the
same messageId), and give every new change an id never used before.
"""

from __future__ import annotations

import itertools

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import func, insert, select

from syncer.core.diff import FALSE, TRUE, desired_changes, reconcile_outbox
from syncer.store import Store
from syncer.store.schema import delivered, outbox
from syncer.store.sql import utcnow
from tests.conftest import Upstream

# Near-identical ids too, so that a comparison that folds case or trims spaces shows up.
USERS = ["u0", "u1", "u2", "u3", "u4", "U0", "u0 "]
VALUES = st.sampled_from([TRUE, FALSE])
STATUSES = st.sampled_from(["pending", "rejected"])

_examples = itertools.count()


def _outbox_rows(store: Store, destination_id: int, audience_id: str) -> dict:
    """user -> (id, value) of one pair's outbox."""
    with store.engine.connect() as connection:
        rows = connection.execute(
            select(outbox.c.user_id, outbox.c.id, outbox.c.value).where(
                outbox.c.destination_id == destination_id, outbox.c.audience_id == audience_id
            )
        ).all()
    users = [row.user_id for row in rows]
    assert len(users) == len(set(users)), f"two queued changes for one user: {rows}"
    return {row.user_id: (row.id, row.value) for row in rows}


def _highest_outbox_id(store: Store) -> int:
    with store.engine.connect() as connection:
        return int(connection.execute(select(func.max(outbox.c.id))).scalar_one() or 0)


@settings(
    max_examples=25,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(
    current=st.frozensets(st.sampled_from(USERS)),
    told=st.dictionaries(st.sampled_from(USERS), VALUES),
    queued=st.dictionaries(st.sampled_from(USERS), st.tuples(VALUES, STATUSES)),
    full=st.booleans(),
)
def test_plan_leaves_exactly_the_specified_changes_and_keeps_kept_ids(
    store: Store,
    upstream: Upstream,
    current: frozenset[str],
    told: dict[str, str],
    queued: dict[str, tuple[str, str]],
    full: bool,
) -> None:
    n = next(_examples)
    audience_id = f"spec_{n}"
    upstream.add_audience(audience_id, f"Spec {n}")
    if current:
        upstream.add(audience_id, *sorted(current))
    url = f"http://127.0.0.1:9/spec/{n}"
    destination_id = store.ensure_destinations([url])[url]
    now = utcnow()
    with store.engine.begin() as connection:
        if told:
            connection.execute(
                insert(delivered),
                [
                    {
                        "destination_id": destination_id,
                        "audience_id": audience_id,
                        "user_id": user,
                        "value": value,
                        "anonymous_id": None,
                        "email": None,
                        "message_id": f"earlier-{n}-{user}",
                        "delivered_at": now,
                    }
                    for user, value in told.items()
                ],
            )
        if queued:
            connection.execute(
                insert(outbox),
                [
                    {
                        "destination_id": destination_id,
                        "audience_id": audience_id,
                        "user_id": user,
                        "value": value,
                        "anonymous_id": None,
                        "email": None,
                        "forced": False,
                        "created_at": now,
                        "status": status,
                        "attempts": 1,
                        "rejections": int(status == "rejected"),
                    }
                    for user, (value, status) in queued.items()
                ],
            )
    members = {user: TRUE for user in current}
    desired = desired_changes(members, told, full=full)
    before = _outbox_rows(store, destination_id, audience_id)
    highest_before = _highest_outbox_id(store)

    # What a dry run would show: the desired changes, whatever is queued.
    streamed = [
        change
        for batch in store.stream_desired(destination_id, audience_id, full=full, batch_size=3)
        for change in batch
    ]
    assert len(streamed) == len({user for user, _ in streamed})
    assert dict(streamed) == desired

    counts = store.plan(destination_id, audience_id, full=full)

    after = _outbox_rows(store, destination_id, audience_id)
    assert {user: value for user, (_id, value) in after.items()} == desired
    assert (counts.entered, counts.exited) == (
        sum(1 for value in desired.values() if value == TRUE),
        sum(1 for value in desired.values() if value == FALSE),
    )
    expected = reconcile_outbox({user: value for user, (_id, value) in before.items()}, desired)
    assert (counts.new_entered, counts.new_exited) == (
        sum(1 for value in expected.add.values() if value == TRUE),
        sum(1 for value in expected.add.values() if value == FALSE),
    )
    for user in expected.keep:
        assert after[user][0] == before[user][0], f"{user}'s queued change lost its id"
    for user in expected.add:
        assert after[user][0] > highest_before, f"{user}'s new change reuses an old id"

    # Planning again with nothing changed moves nothing.
    store.plan(destination_id, audience_id, full=full)
    assert _outbox_rows(store, destination_id, audience_id) == after
