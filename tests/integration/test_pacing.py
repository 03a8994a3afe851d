"""``[delivery] rate_limit_per_second``: each workflow URL gets no more requests a second than
that, however many workers send to it, on SQLite and PostgreSQL.

Every worker reserves its chunk's send slots from the URL's ``syncer_destinations.next_send_at``
(on the database's clock) in the transaction that claims the chunk, and sends item n no earlier
than its slot. Proven with real ``syncer`` processes against the local stand-in, whose answers
note when each request arrived (the stand-in records what arrives, not when: a responder that
takes the time is all it needs):

- one ``syncer sync``: the arrivals span at least (n - 1) / rate, everyone is told once, and the
  URL's schedule moved by at least n / rate past the database's clock before the run;
- two ``syncer sync`` started together on one database and URL: the union of their arrivals
  spans as much, everyone is told exactly once, both exit 0;
- ``syncer delete-user``: privacy deletes are paced the same way;
- rate 0 (the default): nothing is paced and ``next_send_at`` is never written;
- in the store: two workers that record outcomes and claim more at the same moment (their
  transactions overlapping on the URL's row, as they do under load on PostgreSQL) both succeed,
  and their slots do not overlap; changes and deletes to one URL share one schedule.

Only lower bounds on elapsed time are asserted: a loaded machine makes a paced sender slower,
never faster. The margin (5 %) is for the first request arriving later after its slot than
the last one does.
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor
from itertools import pairwise
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine, text
from sqlalchemy.engine import make_url

from syncer.core.guard import GuardLimits
from syncer.core.outcomes import Outcome, OutcomeKind
from syncer.core.pacing import Slots
from syncer.store import Store
from syncer.store.claims import Claim
from syncer.store.outbox import Exchanged
from syncer.store.sql import utcnow
from syncer.testing.tray_standin import Reply, TrayStandin
from tests.conftest import Upstream
from tests.integration.cli_helpers import Result
from tests.integration.fault_support import (
    assert_no_crash,
    by_user,
    is_whole,
    query,
    show,
    syncer,
    wait_until,
    write_settings,
)
from tests.integration.test_concurrent_syncers import delivered_count
from tests.integration.test_fencing import db_clock

PATH = "/wf"
AUDIENCE = "aud_paced"
# How much of the ideal span the arrivals must cover at least: the first request may reach the
# stand-in a little later after its slot than the last one.
MARGIN = 0.95
# Rounding on the database's clock (SQLite's julianday, PostgreSQL's double precision).
CLOCK_SLACK = 0.01
DELIVERED = Outcome(OutcomeKind.DELIVERED, 200, "", 1)


class Arrivals:
    """A workflow that answers 200 at once and notes, on this process's monotonic clock, when
    each request arrived (before the stand-in records it)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._times: list[float] = []

    def __call__(self, _path: str, _body: bytes) -> Reply:
        at = time.monotonic()
        with self._lock:
            self._times.append(at)
        return Reply()

    def times(self) -> list[float]:
        with self._lock:
            return sorted(self._times)


def assert_paced(times: list[float], rate: float, what: str) -> None:
    """``times`` (arrivals) span at least (n - 1) / rate, less the margin."""
    ideal = (len(times) - 1) / rate
    span = times[-1] - times[0]
    assert span >= ideal * MARGIN, (
        f"{what}: {len(times)} requests arrived within {span:.3f} s; at {rate:g} per second "
        f"they cannot take less than {ideal:.3f} s"
    )


def next_send_at(engine: Engine) -> list[float | None]:
    """Every URL's next free send slot (epoch seconds on the database's clock), or None."""
    return [row[0] for row in query(engine, "select next_send_at from syncer_destinations")]


def assert_each_told_once(standin: TrayStandin, users: list[str]) -> None:
    """Every user received exactly one signed identify call, each with its own messageId."""
    received = standin.received(PATH)
    assert all(is_whole(item) and item.signature_ok for item in received)
    message_ids = [item.message["messageId"] for item in received]
    assert len(message_ids) == len(set(message_ids)), "a messageId was delivered twice"
    grouped = by_user(received)
    assert sorted(grouped) == users
    assert all(len(copies) == 1 for copies in grouped.values())


def paced_settings(tmp_path: Path, database_url: str, url: str, rate: float) -> Path:
    return write_settings(
        tmp_path / "settings.toml",
        database_url,
        [url],
        delivery={"concurrency": 4, "rate_limit_per_second": rate},
    )


# ---------------------------------------------------------------------------------------------
# a. One sync


ONE_SYNC_MEMBERS = 120
ONE_SYNC_RATE = 40.0  # at least 2.975 s between the first and the last request


def test_one_sync_sends_no_faster_than_the_rate(
    store: Store, upstream: Upstream, standin: TrayStandin, database_url: str, tmp_path: Path
) -> None:
    engine = store.engine
    users = [f"user-{n:03d}" for n in range(ONE_SYNC_MEMBERS)]
    upstream.add_audience(AUDIENCE, "Paced")
    upstream.add(AUDIENCE, *users)
    arrivals = Arrivals()
    standin.respond(PATH, arrivals)
    settings = paced_settings(tmp_path, database_url, standin.url(PATH), ONE_SYNC_RATE)
    before = db_clock(engine)

    result = syncer(settings, "sync")

    assert result.returncode == 0, show(result)
    assert_no_crash(result.stdout + result.stderr, show(result))
    assert delivered_count(result) == ONE_SYNC_MEMBERS, show(result)
    assert_each_told_once(standin, users)
    times = arrivals.times()
    assert len(times) == ONE_SYNC_MEMBERS
    assert_paced(times, ONE_SYNC_RATE, "one sync")
    # Every slot taken starts no earlier than the database's clock before the run, and slots
    # never overlap: the schedule moved at least n / rate past it.
    [after] = next_send_at(engine)
    assert after is not None
    assert after - before >= ONE_SYNC_MEMBERS / ONE_SYNC_RATE - CLOCK_SLACK, (before, after)
    assert query(engine, "select count(*) from syncer_outbox") == [(0,)]


# ---------------------------------------------------------------------------------------------
# b. Two syncs started together share the URL's rate


TWO_SYNCS_MEMBERS = 240  # many chunks (4 x concurrency each): both workers claim and reserve
TWO_SYNCS_RATE = 60.0  # at least 3.98 s between the first and the last request


def test_two_syncs_started_together_share_the_rate_and_tell_everyone_once(
    store: Store, upstream: Upstream, standin: TrayStandin, database_url: str, tmp_path: Path
) -> None:
    engine = store.engine
    users = [f"user-{n:03d}" for n in range(TWO_SYNCS_MEMBERS)]
    upstream.add_audience(AUDIENCE, "Paced Twice")
    upstream.add(AUDIENCE, *users)
    arrivals = Arrivals()
    standin.respond(PATH, arrivals)
    settings = paced_settings(tmp_path, database_url, standin.url(PATH), TWO_SYNCS_RATE)
    before = db_clock(engine)

    with ThreadPoolExecutor(max_workers=2) as pool:
        results: list[Result] = list(pool.map(lambda _: syncer(settings, "sync"), range(2)))

    for result in results:
        assert result.returncode == 0, show(result)
        assert_no_crash(result.stdout + result.stderr, show(result))
    # Each counts only what it delivered itself: between them, everyone once.
    assert sum(delivered_count(result) for result in results) == TWO_SYNCS_MEMBERS, "\n".join(
        map(show, results)
    )
    assert_each_told_once(standin, users)
    times = arrivals.times()
    assert len(times) == TWO_SYNCS_MEMBERS
    assert_paced(times, TWO_SYNCS_RATE, "two syncs, together")
    [after] = next_send_at(engine)
    assert after is not None
    assert after - before >= TWO_SYNCS_MEMBERS / TWO_SYNCS_RATE - CLOCK_SLACK, (before, after)
    assert query(engine, "select count(*) from syncer_outbox") == [(0,)]
    statuses = sorted(status for (status,) in query(engine, "select status from syncer_runs"))
    assert statuses == ["ok", "ok"], statuses


# ---------------------------------------------------------------------------------------------
# c. Privacy deletes are paced too


DELETED_USERS = 30
DELETE_RATE = 20.0  # at least 1.45 s between the first and the last delete


def test_privacy_deletes_are_paced(
    store: Store, standin: TrayStandin, database_url: str, tmp_path: Path
) -> None:
    engine = store.engine
    arrivals = Arrivals()
    standin.respond(PATH, arrivals)
    settings = paced_settings(tmp_path, database_url, standin.url(PATH), DELETE_RATE)
    deleted = [f"gone-{n:02d}" for n in range(DELETED_USERS)]
    before = db_clock(engine)

    result = syncer(settings, "delete-user", *deleted)

    assert result.returncode == 0, show(result)
    assert_no_crash(result.stdout + result.stderr, show(result))
    assert f"{DELETED_USERS} delete(s) delivered, all delivered" in result.stdout, show(result)
    received = standin.received(PATH)
    assert all(item.message["type"] == "delete" and item.signature_ok for item in received)
    assert sorted(item.message["userId"] for item in received) == deleted  # each once
    times = arrivals.times()
    assert len(times) == DELETED_USERS
    assert_paced(times, DELETE_RATE, "deletes")
    [after] = next_send_at(engine)
    assert after is not None
    assert after - before >= DELETED_USERS / DELETE_RATE - CLOCK_SLACK, (before, after)


# ---------------------------------------------------------------------------------------------
# d. Rate 0: no pacing


def test_rate_zero_paces_nothing_and_never_writes_the_schedule(
    store: Store, upstream: Upstream, standin: TrayStandin, database_url: str, tmp_path: Path
) -> None:
    engine = store.engine
    users = [f"user-{n:03d}" for n in range(40)]
    upstream.add_audience(AUDIENCE, "Unpaced")
    upstream.add(AUDIENCE, *users)
    standin.respond(PATH, Reply())
    settings = paced_settings(tmp_path, database_url, standin.url(PATH), 0)

    synced = syncer(settings, "sync")
    deleted = syncer(settings, "delete-user", "gone-1", "gone-2")

    for result in (synced, deleted):
        assert result.returncode == 0, show(result)
        assert_no_crash(result.stdout + result.stderr, show(result))
    assert delivered_count(synced) == len(users)
    assert sorted(by_user(standin.received(PATH))) == sorted([*users, "gone-1", "gone-2"])
    assert next_send_at(engine) == [None]


# ---------------------------------------------------------------------------------------------
# e. In the store: overlapping exchanges of two workers on one URL


STORE_RATE = 10.0
CHUNK = 5
# A slot every 100 s: a schedule that stays in the future however slow the machine is.
SLOW_RATE = 0.01


def plan_pair(store: Store, url: str) -> int:
    destination_id = store.destinations.ensure([url], utcnow())[url]
    store.planning.plan(
        destination_id, AUDIENCE, full=False, now=utcnow(), limits=GuardLimits(0.5, 20)
    )
    return destination_id


def exchange(
    store: Store,
    claim: Claim,
    destination_id: int,
    results: list[tuple[int, Outcome]],
    want: int,
    rate: float = STORE_RATE,
) -> Exchanged:
    """One exchange of a paced worker, as its delivery loop makes it."""
    return store.outbox.exchange(
        claim,
        destination_id,
        AUDIENCE,
        results=results,
        want=want,
        after_id=0,
        now=utcnow(),
        max_rejections=5,
        rate_per_second=rate,
    )


def slot_moments(slots: Slots, count: int) -> list[float]:
    """A reservation's slots on the database's clock: the last ends where next_free begins."""
    return [slots.next_free - (count - n) * slots.interval for n in range(count)]


def sessions_waiting_on_a_lock(engine: Engine) -> int:
    """PostgreSQL sessions of this database waiting for a lock (row or transaction)."""
    with engine.connect() as connection:
        return int(
            connection.execute(
                text(
                    "select count(*) from pg_stat_activity where datname = current_database() "
                    "and wait_event_type = 'Lock' and pid <> pg_backend_pid()"
                )
            ).scalar_one()
        )


class ExchangeInThread:
    """One worker's exchange, run in a thread of this process."""

    def __init__(self, call: Any) -> None:
        self.result: Exchanged | None = None
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, args=(call,), daemon=True)
        self._thread.start()

    def _run(self, call: Any) -> None:
        try:
            self.result = call()
        except BaseException as error:
            self.error = error

    @property
    def done(self) -> bool:
        return not self._thread.is_alive()

    def wait(self, timeout: float) -> Exchanged:
        self._thread.join(timeout)
        assert not self._thread.is_alive(), f"an exchange still runs after {timeout}s"
        assert self.error is None, f"{type(self.error).__name__}: {self.error}"
        assert self.result is not None
        return self.result


def test_two_workers_recording_and_claiming_at_once_both_succeed_with_disjoint_slots(
    store: Store, upstream: Upstream, database_url: str
) -> None:
    """Each worker records what its first chunk delivered (the first time these users are told:
    new ``syncer_state`` rows, whose foreign key takes a KEY SHARE lock on the URL's row on
    PostgreSQL) and claims its next chunk, which reserves slots under the URL's row lock.

    On PostgreSQL the two transactions are made to overlap, as they do by chance under load: a
    third transaction holds KEY SHARE on the URL's row (as any transaction does that inserts a
    row referencing the URL: a plan queuing changes, another worker recording a first delivery)
    until both workers are in. Neither may fail: a worker whose exchange fails ends its run with
    a database error, and what it claimed waits for its lease to run out.
    """
    engine = store.engine
    postgres = make_url(database_url).get_backend_name() == "postgresql"
    upstream.add_audience(AUDIENCE, "Paced In Store")
    upstream.add(AUDIENCE, *[f"user-{n:03d}" for n in range(40)])
    destination_id = plan_pair(store, "http://127.0.0.1:9/wf")
    claims = [Claim.new("host-a:101:a", 60), Claim.new("host-b:202:b", 60)]
    first = [exchange(store, claim, destination_id, [], CHUNK) for claim in claims]
    assert [len(chunk.claimed) for chunk in first] == [CHUNK, CHUNK]

    def second_exchange(n: int) -> Any:
        results = [(change.change_id, DELIVERED) for change in first[n].claimed]
        return lambda: exchange(store, claims[n], destination_id, results, CHUNK)

    blocker = engine.connect() if postgres else None
    try:
        if blocker is not None:
            blocker.begin()
            blocker.execute(
                text("select id from syncer_destinations where id = :id for key share"),
                {"id": destination_id},
            )
        workers = [ExchangeInThread(second_exchange(0))]
        if postgres:
            wait_until(
                lambda: workers[0].done or sessions_waiting_on_a_lock(engine) >= 1,
                15,
                "the first worker's exchange to finish or to wait for the URL's row",
            )
        workers.append(ExchangeInThread(second_exchange(1)))
        if postgres:
            wait_until(
                lambda: sum(w.done for w in workers) + sessions_waiting_on_a_lock(engine) >= 2,
                15,
                "both workers' exchanges to finish or to wait",
            )
    finally:
        if blocker is not None:
            blocker.rollback()
            blocker.close()
    second = [worker.wait(timeout=30) for worker in workers]

    for chunk in second:
        assert chunk.lost == 0
        assert len(chunk.claimed) == CHUNK
        assert chunk.slots is not None
    claimed = [c.change_id for chunk in first + second for c in chunk.claimed]
    assert len(claimed) == len(set(claimed)) == 4 * CHUNK
    # Everything the first chunks delivered is recorded.
    assert query(engine, "select count(*) from syncer_state where value = 'true'") == [(2 * CHUNK,)]
    # The four reservations are disjoint and never closer than one interval.
    moments = sorted(
        moment
        for chunk in first + second
        if chunk.slots is not None
        for moment in slot_moments(chunk.slots, len(chunk.claimed))
    )
    gaps = [b - a for a, b in pairwise(moments)]
    assert min(gaps) >= 1 / STORE_RATE - 1e-6, gaps
    [after] = next_send_at(engine)
    assert after == pytest.approx(moments[-1] + 1 / STORE_RATE, abs=1e-6)


def test_changes_and_deletes_to_one_url_share_one_schedule(
    store: Store, upstream: Upstream
) -> None:
    """A chunk of deletes claimed after a chunk of changes (and changes after deletes) takes
    the URL's next slots: one schedule per URL, whatever is sent."""
    upstream.add_audience(AUDIENCE, "Paced Kinds")
    upstream.add(AUDIENCE, *[f"user-{n:03d}" for n in range(20)])
    destination_id = plan_pair(store, "http://127.0.0.1:9/wf")
    store.deletions.suppress(["gone-1", "gone-2", "gone-3"], [destination_id], utcnow())
    claim = Claim.new("host-a:101:a", 60)

    changes = exchange(store, claim, destination_id, [], CHUNK, SLOW_RATE)
    deletes, lost, delete_slots = store.deletions.exchange(
        claim,
        destination_id,
        results=[],
        want=CHUNK,
        after_id=0,
        now=utcnow(),
        rate_per_second=SLOW_RATE,
    )
    more_changes = exchange(store, claim, destination_id, [], CHUNK, SLOW_RATE)

    assert (len(changes.claimed), len(deletes), lost, len(more_changes.claimed)) == (
        CHUNK,
        3,
        0,
        CHUNK,
    )
    assert changes.slots is not None and delete_slots is not None
    assert more_changes.slots is not None
    # Each reservation starts where the last one ended (hundreds of seconds ahead).
    assert delete_slots.delay > 0 and more_changes.slots.delay > 0
    assert delete_slots.next_free == pytest.approx(changes.slots.next_free + 3 / SLOW_RATE)
    assert more_changes.slots.next_free == pytest.approx(delete_slots.next_free + CHUNK / SLOW_RATE)
    [after] = next_send_at(store.engine)
    assert after == pytest.approx(more_changes.slots.next_free)
