"""A run plans only the (URL, audience) pairs that have something to do, found for every pair
at once (`PlanStore.pairs_with_work`). Skipping a pair must never skip work: whenever a plan of
it would queue, report or hold anything, the pair is found; when nothing changed, it is not."""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime

import pytest
from sqlalchemy import select, update

from syncer.core.guard import GuardLimits
from syncer.core.urls import canonical_url
from syncer.store import Store
from syncer.store.planning import PlanOutcome, PlanResult
from syncer.store.schema import pairs, state
from syncer.store.sql import utcnow
from syncer.sync import SyncEngine
from syncer.testing.tray_standin import Reply, TrayStandin
from tests.conftest import Upstream, make_settings, run_sync

AUDIENCE, QUIET = "aud_busy", "aud_quiet"
MEMBERS = [f"u{n}" for n in range(6)]
LIMITS = GuardLimits(max_exit_share=0.5, min_audience_size=4)


def dry_plan(store: Store, url: str, audience_id: str) -> PlanResult:
    """What a plan of the pair would do now (undone afterwards)."""
    return store.planning.dry_run(
        url,
        canonical_url(url),
        audience_id,
        full=False,
        now=utcnow(),
        limits=LIMITS,
        batch_size=100,
        emit=lambda _user, _value, _call: None,
    )


def has_work(result: PlanResult) -> bool:
    return (
        result.outcome is PlanOutcome.HELD
        or bool(result.queued_entries or result.queued_exits)
        or bool(result.invalid)
    )


def with_work(store: Store, url: str) -> set[str]:
    destination_id = store.destinations.find([url])[url]
    found = store.planning.pairs_with_work([destination_id], [AUDIENCE, QUIET])
    assert {d for d, _ in found} <= {destination_id}
    return {audience for _, audience in found}


def delete_user(store: Store, url: str, user_id: str) -> None:
    settings = make_settings(str(store.engine.url.render_as_string(False)), [url])
    engine = SyncEngine(settings, store)
    try:
        engine.delete_users([user_id])
    finally:
        engine.close()


def make_unsure(store: Store, user_id: str) -> None:
    with store.engine.begin() as connection:
        connection.execute(
            update(state)
            .where(state.c.audience_id == AUDIENCE, state.c.user_id == user_id)
            .values(unsure=True)
        )


def hold(store: Store) -> None:
    with store.engine.begin() as connection:
        connection.execute(
            update(pairs)
            .where(pairs.c.audience_id == AUDIENCE)
            .values(held_at=datetime(2026, 1, 1), hold_reason="test")
        )


Mutation = Callable[[Store, Upstream, str], None]

MUTATIONS: dict[str, tuple[Mutation, bool]] = {
    # name: (what happens upstream or in the syncer's records, whether the pair has work)
    "nothing": (lambda s, u, url: None, False),
    "a member enters": (lambda s, u, url: u.add(AUDIENCE, "new"), True),
    "a member leaves": (lambda s, u, url: u.remove(AUDIENCE, "u1"), True),
    "an unsendable row appears": (lambda s, u, url: u.add(AUDIENCE, "bad\x01id"), True),
    "a member is deleted (still upstream)": (lambda s, u, url: delete_user(s, url, "u2"), False),
    "the URL may have processed an unknown value": (lambda s, u, url: make_unsure(s, "u3"), True),
    "the pair is held": (lambda s, u, url: hold(s), True),
    "the other audience changes": (lambda s, u, url: u.add(QUIET, "q_new"), False),
}


def synced_busy_and_quiet(store: Store, upstream: Upstream, standin: TrayStandin) -> str:
    """Two audiences (busy, quiet) told in full to one URL; the URL."""
    upstream.add_audience(AUDIENCE, "Busy")
    upstream.add_audience(QUIET, "Quiet")
    upstream.add(AUDIENCE, *MEMBERS)
    upstream.add(QUIET, "q1")
    url = standin.url("/wf")
    assert run_sync(store, [url]).fully_delivered
    return url


@pytest.mark.parametrize("name", list(MUTATIONS))
def test_a_pair_has_work_exactly_when_a_plan_would_do_something(
    name: str, store: Store, upstream: Upstream, standin: TrayStandin
) -> None:
    mutate, expected = MUTATIONS[name]
    url = synced_busy_and_quiet(store, upstream, standin)
    assert with_work(store, url) == set()

    mutate(store, upstream, url)

    assert (AUDIENCE in with_work(store, url)) is expected
    if name == "the pair is held":
        # With no exits left to hold, the plan's work is lifting the hold: a run does it.
        assert not has_work(dry_plan(store, url, AUDIENCE))
        run_sync(store, [url])
        with store.engine.connect() as connection:
            held = connection.execute(
                select(pairs.c.held_at).where(pairs.c.audience_id == AUDIENCE)
            ).scalar_one()
        assert held is None
        assert with_work(store, url) == set()
    else:
        assert has_work(dry_plan(store, url, AUDIENCE)) is expected


@pytest.mark.parametrize("told_url", [0, 1])
def test_each_url_is_judged_by_what_it_was_told(
    told_url: int, store: Store, upstream: Upstream, standin: TrayStandin
) -> None:
    # One URL was told a member that the other was not (it was down): only the other has work.
    upstream.add_audience(AUDIENCE, "Busy")
    upstream.add(AUDIENCE, *MEMBERS)
    urls = [standin.url("/wf-a"), standin.url("/wf-b")]
    assert run_sync(store, urls).fully_delivered
    upstream.add(AUDIENCE, "new")
    standin.respond(urls[1 - told_url].removeprefix(standin.url("")), Reply(status=503))
    assert not run_sync(store, urls, max_attempts=1).fully_delivered
    with store.engine.begin() as connection:  # only the entry counts: nothing left queued
        connection.exec_driver_sql("DELETE FROM syncer_outbox")
    ids = store.destinations.find(urls)

    found = store.planning.pairs_with_work(list(ids.values()), [AUDIENCE])

    assert found == {(ids[urls[1 - told_url]], AUDIENCE)}
    assert has_work(dry_plan(store, urls[1 - told_url], AUDIENCE))
    assert not has_work(dry_plan(store, urls[told_url], AUDIENCE))


def test_changes_left_queued_by_a_failed_run_are_work(
    store: Store, upstream: Upstream, standin: TrayStandin
) -> None:
    upstream.add_audience(AUDIENCE, "Busy")
    upstream.add(AUDIENCE, *MEMBERS)
    url = standin.url("/wf")
    standin.respond("/wf", Reply(status=503))
    assert not run_sync(store, [url], max_attempts=1).fully_delivered
    assert with_work(store, url) == {AUDIENCE}
    standin.respond("/wf", Reply())
    assert run_sync(store, [url]).fully_delivered
    assert with_work(store, url) == set()


def test_a_run_plans_only_the_pairs_with_work(
    store: Store, upstream: Upstream, standin: TrayStandin
) -> None:
    url = synced_busy_and_quiet(store, upstream, standin)

    def planned_at() -> dict[str, object]:
        with store.engine.connect() as connection:
            rows = connection.execute(select(pairs.c.audience_id, pairs.c.last_planned_at))
            return {row.audience_id: row.last_planned_at for row in rows}

    before = planned_at()
    upstream.add(AUDIENCE, "new")
    report = run_sync(store, [url])

    after = planned_at()
    assert after[QUIET] == before[QUIET], "a pair with nothing to do was planned"
    assert after[AUDIENCE] != before[AUDIENCE]
    assert report.fully_delivered and report.counts.delivered == 1
    # Both pairs are reported, and both recorded as served by this run.
    assert sorted(pair.audience_id for pair in report.pairs) == sorted([AUDIENCE, QUIET])
    with store.engine.connect() as connection:
        runs = dict(connection.execute(select(pairs.c.audience_id, pairs.c.last_run_id)).all())
    assert runs == {AUDIENCE: report.run_id, QUIET: report.run_id}
