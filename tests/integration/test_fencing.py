"""Claims are fences: who may send a queued change, for how long, and what happens after.

Against real databases (SQLite and PostgreSQL), the real stand-in and real ``syncer`` processes:

- renewal: a pair whose delivery lasts well beyond ``lease_seconds`` is delivered whole, once
  each, with no lost claim (without renewal the keeper's gate would close after
  ``lease - timeout - 1`` seconds and leave the rest pending);
- expiry: rows claimed by a worker on another host that then hangs are not sent while its claim
  lives, are taken over and sent (with the messageIds their ids imply) once it has run out, and
  the stuck worker's late outcome is refused and writes nothing;
- the clock: expiry is computed in SQL on the database's clock; the caller's clock (the ``now``
  handed to the store, and ``time.time``) and, on PostgreSQL, the session's time zone do not
  move it;
- a cut database (PostgreSQL, through a TCP proxy, refused or unanswered): the cut worker starts
  no request once its claim could run out, a second worker takes over after expiry, and in the
  end everyone is told, duplicates carry the same messageId and bytes, and at most
  ``concurrency`` users are told twice;
- fenced writes: every kind of outcome recorded under a claim that was taken over is refused and
  writes nothing, for queued changes and for owed deletes; the new holder's is accepted;
- a dead holder on this machine: deletes claimed by a killed ``syncer delete-user`` are released
  by the next run and sent at once (test_crash_recovery covers claimed changes); and
  ``syncer delete-user`` itself releases them, so a delete does not wait for a killed sync's
  claim on the user's change to run out.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine, func, select, text
from sqlalchemy.engine import make_url

from syncer.core.guard import GuardLimits
from syncer.core.outcomes import Outcome, OutcomeKind
from syncer.core.payload import message_id
from syncer.core.states import PairState
from syncer.delivery.claims import chunk_size
from syncer.settings import CLAIM_SAFETY_SECONDS
from syncer.store import Store
from syncer.store.claims import Claim
from syncer.store.database import create_database_engine
from syncer.store.deletions import OwedDeletion
from syncer.store.outbox import Exchanged, OutboxStore, QueuedChange
from syncer.store.schema import deletions, outbox, state
from syncer.store.sql import db_epoch, utcnow
from syncer.sync import SyncEngine, SyncOptions, SyncReport
from syncer.testing.tray_standin import Reply, TrayStandin
from tests.conftest import Upstream, make_settings, run_sync
from tests.integration.fault_support import (
    assert_no_crash,
    by_user,
    is_whole,
    log_events,
    query,
    show,
    start,
    stop_child,
    syncer,
    wait_until,
    write_settings,
)
from tests.integration.tcp_proxy import TcpProxy

PATH = "/wf"
AUDIENCE = "aud_fence"
LIMITS = GuardLimits(max_exit_share=0.5, min_audience_size=20)
DELIVERED = Outcome(OutcomeKind.DELIVERED, 200, "", 1)


# ---------------------------------------------------------------------------------------------
# Helpers


def plan_pair(store: Store, url: str, audience_id: str = AUDIENCE) -> int:
    """Register ``url`` and plan its pair with ``audience_id``; return the URL's id."""
    destination_id = store.destinations.ensure([url], utcnow())[url]
    store.planning.plan(destination_id, audience_id, full=False, now=utcnow(), limits=LIMITS)
    return destination_id


def exchange(
    store: Store,
    claim: Claim,
    destination_id: int,
    *,
    results: list[tuple[int, Outcome]] | None = None,
    want: int = 0,
    now: Any = None,
    audience: str = AUDIENCE,
    rate: float = 0.0,
) -> Exchanged:
    """One exchange of a worker holding ``claim``, as deliver_claimed makes it (``rate``: the
    URL's rate limit; any rate takes the statements sent from Python on PostgreSQL)."""
    return store.outbox.exchange(
        claim,
        destination_id,
        audience,
        results=results or [],
        want=want,
        after_id=0,
        now=now or utcnow(),
        max_rejections=5,
        rate_per_second=rate,
    )


def db_clock(engine: Engine) -> float:
    """The database's clock, in epoch seconds: what claims run out on."""
    with engine.connect() as connection:
        return float(connection.execute(select(db_epoch())).scalar_one())


def live_claims(engine: Engine) -> int:
    """Rows (changes and deletes) a claim still holds on the database's clock."""
    now = db_clock(engine)
    with engine.connect() as connection:
        return sum(
            int(
                connection.execute(
                    select(func.count()).select_from(table).where(table.c.claimed_until >= now)
                ).scalar_one()
            )
            for table in (outbox, deletions)
        )


def rows_of(engine: Engine, table: Any) -> list[tuple[Any, ...]]:
    """Every row of ``table``, in a stable order: to show a refused write wrote nothing."""
    with engine.connect() as connection:
        return sorted(
            (tuple(row) for row in connection.execute(select(table))),
            key=repr,
        )


def snapshot(engine: Engine) -> dict[str, list[tuple[Any, ...]]]:
    return {table.name: rows_of(engine, table) for table in (outbox, state, deletions)}


def json_field(body: bytes, name: str) -> Any:
    """A field of a request's JSON body; None for a body a killed sender cut short."""
    try:
        return json.loads(body).get(name)
    except ValueError:
        return None


def take_over_when_expired(
    what: str, attempt: Callable[[], list[Any]], count: int, timeout: float = 15
) -> list[Any]:
    """Call ``attempt()`` (a claim by another worker) until it has taken ``count`` rows."""
    taken: list[Any] = []

    def enough() -> bool:
        taken.extend(attempt())
        return len(taken) >= count

    wait_until(enough, timeout, what)
    return taken


class SyncInThread:
    """A second worker: a real sync run on the database directly, in a thread of this process
    (no process start-up, so it is sending as soon as it may)."""

    def __init__(self, database_url: str, urls: list[str], delivery: dict[str, Any]) -> None:
        self.report: SyncReport | None = None
        self.error: BaseException | None = None
        self._thread = threading.Thread(
            target=self._run, args=(database_url, urls, delivery), daemon=True
        )
        self._thread.start()

    def _run(self, database_url: str, urls: list[str], delivery: dict[str, Any]) -> None:
        engine = create_database_engine(database_url)
        sync = SyncEngine(make_settings(database_url, urls, **delivery), Store.open(engine))
        try:
            self.report = sync.run(SyncOptions())
        except BaseException as error:
            self.error = error
        finally:
            sync.close()
            engine.dispose()

    def wait(self, timeout: float) -> SyncReport:
        self._thread.join(timeout)
        assert not self._thread.is_alive(), f"the second worker still runs after {timeout}s"
        assert self.error is None, repr(self.error)
        assert self.report is not None
        return self.report


# ---------------------------------------------------------------------------------------------
# a. Renewal keeps a long delivery going

RENEWAL_MEMBERS = 60
RENEWAL_CONCURRENCY = 2
RENEWAL_REPLY_SECONDS = 0.2  # 60 members, two at a time: about 6 s of sending
RENEWAL_TIMEOUT = 0.8
# The validator wants more than (0.8 + 1) * 3 / 2 = 2.7. Without renewal the gate would close
# 4 - 0.8 - 1 = 2.2 s after the first claim and the rest would stay pending (CLAIM_LOST); with
# renewals every 4/3 s it stays open as long as each renewal takes under ~0.4 s.
RENEWAL_LEASE = 4.0


def test_claims_are_renewed_while_a_delivery_outlasts_the_lease(
    store: Store, upstream: Upstream, standin: TrayStandin
) -> None:
    """A delivery of ~6 s under a 4 s lease completes, each member once, no CLAIM_LOST: the
    keeper renewed. Without renewal the gate closes at 2.2 s and the rest stays pending."""
    upstream.add_audience(AUDIENCE, "Slow Workflow")
    users = [f"user-{n:03d}" for n in range(RENEWAL_MEMBERS)]
    upstream.add(AUDIENCE, *users)
    standin.respond(PATH, Reply(delay_seconds=RENEWAL_REPLY_SECONDS))

    report = run_sync(
        store,
        [standin.url(PATH)],
        concurrency=RENEWAL_CONCURRENCY,
        timeout_seconds=RENEWAL_TIMEOUT,
        lease_seconds=RENEWAL_LEASE,
    )

    # Sending took well over one lease: one claim lifetime could not have covered it.
    assert report.duration_seconds > RENEWAL_LEASE + 1, report.duration_seconds
    [pair] = report.pairs
    assert pair.state is PairState.DONE, (pair.state, pair.note)
    assert (pair.delivered, pair.pending) == (RENEWAL_MEMBERS, 0)
    assert report.fully_delivered
    received = standin.received(PATH)
    assert sorted(item.message["userId"] for item in received) == users  # each exactly once
    assert live_claims(store.engine) == 0
    assert query(store.engine, "select count(*) from syncer_outbox") == [(0,)]


# ---------------------------------------------------------------------------------------------
# b. A stuck claimer on another host is taken over only once its claim has run out

# Long enough that no machine is too slow for it: the test runs the claim out itself, once it
# has seen the run leave the claimed rows alone.
STUCK_TTL = 600.0
STUCK_ROWS = 3


def run_out(engine: Engine, claim: Claim) -> None:
    """Let ``claim`` run out now, on the database's clock, as if its holder had hung that long."""
    with engine.begin() as connection:
        for table in (outbox, deletions):
            connection.execute(
                table.update()
                .where(table.c.claim_token == claim.token)
                .values(claimed_until=db_epoch() - 1)
            )


def test_a_stuck_claimers_rows_are_sent_only_after_its_claim_runs_out(
    store: Store,
    upstream: Upstream,
    standin: TrayStandin,
    database_url: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    engine = store.engine
    upstream.add_audience(AUDIENCE, "Stuck Claimer")
    users = [f"user-{n:02d}" for n in range(12)]
    upstream.add(AUDIENCE, *users)
    url = standin.url(PATH)
    destination_id = plan_pair(store, url)
    # A worker on another machine (alive, as far as anyone here can tell) claims three rows
    # and then hangs.
    stuck = Claim.new("otherhost:1:stuck", STUCK_TTL)
    held: list[QueuedChange] = exchange(store, stuck, destination_id, want=STUCK_ROWS).claimed
    assert len(held) == STUCK_ROWS
    held_users = sorted(change.user_id for change in held)

    # The workflow holds its answers to the taken-over rows until the stuck worker has woken.
    stuck_worker_done = threading.Event()
    in_flight: list[bytes] = []
    held_set = set(held_users)

    def workflow(_path: str, body: bytes) -> Reply:
        if json.loads(body)["userId"] in held_set:
            in_flight.append(body)  # the stand-in records a request once this returns
            stuck_worker_done.wait(timeout=4)
        return Reply()

    standin.respond(PATH, workflow)
    # Set when the run, done with the rest, has seen rows held by another claim and stays.
    staying = threading.Event()
    claimed_elsewhere = OutboxStore.claimed_elsewhere

    def watched(self: OutboxStore, *args: Any) -> int:
        others = claimed_elsewhere(self, *args)
        if others:
            staying.set()
        return others

    monkeypatch.setattr(OutboxStore, "claimed_elsewhere", watched)
    # A run finds the stuck rows claimed: it sends the rest, then stays on the pair, and takes
    # the stuck rows over only once their claim has run out on the database's clock.
    after_expiry = SyncInThread(database_url, [url], {})
    others = sorted(set(users) - held_set)
    wait_until(lambda: sorted(by_user(standin.received(PATH))) == others, 15, "the unclaimed rows")
    # Once the run has recorded the rest, only the stuck claim is left.
    wait_until(lambda: live_claims(engine) <= STUCK_ROWS, 15, "the rest to be recorded")
    assert live_claims(engine) == STUCK_ROWS
    assert not in_flight
    assert staying.wait(timeout=15), "the run did not stay on the pair"
    assert not in_flight
    run_out(engine, stuck)
    wait_until(lambda: len(in_flight) == STUCK_ROWS, 30, "the rows to be sent again")
    # They went out under a claim of the run's own: the stuck one no longer holds them.
    tokens = query(engine, "select claim_token from syncer_outbox where claim_token is not null")
    assert len(tokens) == STUCK_ROWS and stuck.token not in {token for (token,) in tokens}

    # The stuck worker wakes up while the new holder is sending, and records what it thinks it
    # delivered: refused (the rows are another claim's now), and nothing is written.
    while_taken = snapshot(engine)
    late = exchange(
        store,
        stuck,
        destination_id,
        results=[(change.change_id, DELIVERED) for change in held],
        want=STUCK_ROWS,
    )
    # Compared before the workflow answers: then the new holder records its deliveries.
    unchanged = snapshot(engine) == while_taken
    stuck_worker_done.set()

    assert late.lost == STUCK_ROWS
    assert late.claimed == []
    assert unchanged
    report = after_expiry.wait(timeout=30)
    assert report.fully_delivered
    [pair] = report.pairs
    assert (pair.delivered, pair.pending, pair.joined) == (len(users), 0, True)
    received = [item for item in standin.received(PATH) if item.message["userId"] in held_set]
    assert sorted(item.message["userId"] for item in received) == held_users
    # The same messageIds the stuck worker would have sent: a URL that got its requests too
    # drops these as duplicates.
    assert {item.message["userId"]: item.message["messageId"] for item in received} == {
        change.user_id: message_id(store.namespace, change.change_id) for change in held
    }
    told = snapshot(engine)
    assert sorted(user for (user,) in query(engine, "select user_id from syncer_state")) == users

    # Once the rows are delivered and gone, an even later report about them changes nothing.
    exchange(
        store,
        stuck,
        destination_id,
        results=[(change.change_id, Outcome(OutcomeKind.RETRYABLE, 503, "", 1)) for change in held],
    )
    assert snapshot(engine) == told


# ---------------------------------------------------------------------------------------------
# c. Expiry is on the database's clock

LONG_TTL = 600.0
SKEW = timedelta(days=1)  # callers whose clocks are a day off


def claim_expiry_left(engine: Engine, claim: Claim) -> list[float]:
    """Seconds each row of ``claim`` has left, measured in SQL on the database's clock."""
    with engine.connect() as connection:
        return [
            float(seconds)
            for (seconds,) in connection.execute(
                select(outbox.c.claimed_until - db_epoch()).where(
                    outbox.c.claim_token == claim.token
                )
            )
        ]


@contextmanager
def session_in_time_zone(database_url: str, zone: str) -> Iterator[Store]:
    """A store whose PostgreSQL sessions run in time zone ``zone``."""
    url = make_url(database_url).update_query_dict({"options": f"-c TimeZone={zone}"})
    engine = create_database_engine(url.render_as_string(hide_password=False))
    try:
        with engine.connect() as connection:
            assert connection.execute(text("SHOW TimeZone")).scalar_one() == zone
        yield Store.open(engine)
    finally:
        engine.dispose()


def test_claim_expiry_is_measured_on_the_database_clock(
    store: Store,
    upstream: Upstream,
    standin: TrayStandin,
    database_url: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Structural, not a real clock skew: a claim's life, measured in SQL, is its ttl whatever
    the caller's ``now`` and ``time.time`` say, another claimer with a skewed ``now`` cannot
    take it, and on PostgreSQL neither can a session in another time zone. It would catch
    expiry computed from the caller's clock, or from a session-local timestamp; it cannot
    show what happens when the database host's own clock jumps."""
    engine = store.engine
    upstream.add_audience(AUDIENCE, "Clocks")
    upstream.add(AUDIENCE, *[f"user-{n:02d}" for n in range(10)])
    destination_id = plan_pair(store, standin.url(PATH))
    # This process's clocks run a day ahead: the `now` it hands the store and time.time().
    real_time = time.time
    monkeypatch.setattr(time, "time", lambda: real_time() + SKEW.total_seconds())
    ahead = utcnow() + SKEW

    first = Claim.new("host-a:1:a", LONG_TTL)
    taken = exchange(store, first, destination_id, want=4, now=ahead).claimed
    assert len(taken) == 4

    left = claim_expiry_left(engine, first)
    assert len(left) == 4
    assert all(LONG_TTL - 30 < seconds <= LONG_TTL for seconds in left), left

    # Another worker whose clock is a day behind, or ahead, takes none of those rows.
    for caller_now in (utcnow() - SKEW, ahead):
        second = Claim.new("host-b:2:b", LONG_TTL)
        others = exchange(store, second, destination_id, want=10, now=caller_now).claimed
        assert not {c.change_id for c in others} & {c.change_id for c in taken}
        exchange(
            store,
            second,
            destination_id,
            results=[(c.change_id, Outcome(OutcomeKind.NOT_SENT)) for c in others],
        )
    monkeypatch.undo()

    if engine.dialect.name != "postgresql":
        return
    # On PostgreSQL, a session's time zone changes how timestamps are shown, never the epoch
    # the claim is computed and compared in: a claim taken from UTC+14 lasts its ttl, and a
    # session at UTC-12 cannot take it early.
    with session_in_time_zone(database_url, "Pacific/Kiritimati") as far_east:
        east = Claim.new("host-east:3:e", LONG_TTL)
        east_rows = exchange(far_east, east, destination_id, want=3).claimed
    assert len(east_rows) == 3
    assert all(LONG_TTL - 30 < s <= LONG_TTL for s in claim_expiry_left(engine, east))
    with session_in_time_zone(database_url, "Etc/GMT+12") as far_west:
        west = Claim.new("host-west:4:w", LONG_TTL)
        west_rows = exchange(far_west, west, destination_id, want=10).claimed
    held_ids = {c.change_id for c in taken} | {c.change_id for c in east_rows}
    assert not {c.change_id for c in west_rows} & held_ids


# ---------------------------------------------------------------------------------------------
# e. Outcomes recorded under a claim that was taken over are refused


OUTCOMES = {
    "delivered": DELIVERED,
    "retryable": Outcome(OutcomeKind.RETRYABLE, 503, "busy", 3),
    "rejected": Outcome(OutcomeKind.REJECTED, 400, "bad", 1),
    "refused": Outcome(OutcomeKind.REFUSED, 401, "URL refused: 401", 1),
    "not_sent": Outcome(OutcomeKind.NOT_SENT, None, "not sent", 0),
}
TINY_TTL = 0.3


@pytest.mark.parametrize("late_outcome", list(OUTCOMES), ids=list(OUTCOMES))
def test_an_outcome_under_a_claim_taken_over_is_refused_and_writes_nothing(
    store: Store, upstream: Upstream, standin: TrayStandin, late_outcome: str
) -> None:
    engine = store.engine
    upstream.add_audience(AUDIENCE, "Fenced")
    upstream.add(AUDIENCE, "user-1", "user-2", "user-3")
    destination_id = plan_pair(store, standin.url(PATH))
    worker_a = Claim.new("host-a:1:a", TINY_TTL)
    worker_b = Claim.new("host-b:2:b", 60.0)
    claimed_by_a = exchange(store, worker_a, destination_id, want=3).claimed
    assert len(claimed_by_a) == 3
    ids = sorted(change.change_id for change in claimed_by_a)

    claimed_by_b = take_over_when_expired(
        "worker B to take over once A's claim ran out on the database clock",
        lambda: exchange(store, worker_b, destination_id, want=3).claimed,
        3,
    )
    assert sorted(change.change_id for change in claimed_by_b) == ids
    before = snapshot(engine)
    b_claims = query(engine, "select id, claim_token, claimed_until from syncer_outbox order by id")
    assert {token for _, token, _ in b_claims} == {worker_b.token}

    late = exchange(
        store, worker_a, destination_id, results=[(i, OUTCOMES[late_outcome]) for i in ids]
    )

    assert late.lost == 3
    assert snapshot(engine) == before  # no state, no status, B's claim intact

    accepted = exchange(store, worker_b, destination_id, results=[(i, DELIVERED) for i in ids])

    assert accepted.lost == 0
    told = query(engine, "select user_id, value, message_id from syncer_state order by user_id")
    assert told == [
        (change.user_id, "true", message_id(store.namespace, change.change_id))
        for change in sorted(claimed_by_b, key=lambda c: c.user_id)
    ]
    assert query(engine, "select count(*) from syncer_outbox") == [(0,)]


@pytest.mark.parametrize("late_outcome", ["delivered", "retryable", "not_sent"])
def test_a_delete_outcome_under_a_claim_taken_over_is_refused(
    store: Store, standin: TrayStandin, late_outcome: str
) -> None:
    engine = store.engine
    url = standin.url(PATH)
    destination_id = store.destinations.ensure([url], utcnow())[url]
    store.deletions.suppress(["gone-1", "gone-2"], [destination_id], utcnow())
    worker_a = Claim.new("host-a:1:a", TINY_TTL)
    worker_b = Claim.new("host-b:2:b", 60.0)

    def claim_deletes(claim: Claim, want: int) -> list[OwedDeletion]:
        claimed, _, _ = store.deletions.exchange(
            claim, destination_id, results=[], want=want, after_id=0, now=utcnow()
        )
        return claimed

    claimed_by_a = claim_deletes(worker_a, 2)
    assert len(claimed_by_a) == 2
    ids = sorted(d.deletion_id for d in claimed_by_a)
    take_over_when_expired(
        "worker B to take over the deletes", lambda: claim_deletes(worker_b, 2), 2
    )
    before = snapshot(engine)

    _, lost, _ = store.deletions.exchange(
        worker_a,
        destination_id,
        results=[(i, OUTCOMES[late_outcome]) for i in ids],
        want=0,
        after_id=0,
        now=utcnow(),
    )

    assert lost == 2
    assert snapshot(engine) == before
    assert store.deletions.owed_count(destination_id) == 2
    _, lost, _ = store.deletions.exchange(
        worker_b,
        destination_id,
        results=[(i, DELIVERED) for i in ids],
        want=0,
        after_id=0,
        now=utcnow(),
    )
    assert lost == 0
    assert store.deletions.owed_count(destination_id) == 0


# ---------------------------------------------------------------------------------------------
# d. A worker cut off from the database stops sending before its claim can run out

CUT_MEMBERS = 40
CUT_CONCURRENCY = 4
CUT_TIMEOUT = 1.0
CUT_LEASE = 4.0
CUT_SECONDS = 6.0
CUT_REPLY_SECONDS = 0.1
CUT_DELIVERY: dict[str, Any] = {
    "concurrency": CUT_CONCURRENCY,
    "timeout_seconds": CUT_TIMEOUT,
    "lease_seconds": CUT_LEASE,
    "max_attempts": 20,
    "backoff_base_seconds": 0.25,
    "backoff_max_seconds": 0.5,
}
# The user in flight when the database goes away: the stand-in answers 503 (not processed) to
# every request about them until the database is back, so the cut worker keeps retrying it
# during the cut; only its gate can stop those retries.
STRAGGLER = "user-006"
# The last request the cut worker may start begins before (last renewal + lease - timeout -
# SAFETY); its last renewal began before the cut. The slack is for the request to arrive.
ARRIVAL_SLACK = 0.5
LAST_START_AFTER_CUT = CUT_LEASE - CUT_TIMEOUT - CLAIM_SAFETY_SECONDS


@dataclass(frozen=True)
class Arrival:
    at: float  # time.monotonic() in this process
    user: str | None
    status: int


class TimedWorkflow:
    """Answers the stand-in's requests (0.1 s, 200; 503 for the straggler until the database
    is back) and notes when each arrived."""

    def __init__(self) -> None:
        self.healed = threading.Event()
        self._lock = threading.Lock()
        self.arrivals: list[Arrival] = []

    def __call__(self, _path: str, body: bytes) -> Reply:
        user = json_field(body, "userId")
        if user == STRAGGLER and not self.healed.is_set():
            reply = Reply(status=503, delay_seconds=CUT_REPLY_SECONDS, processed=False)
        else:
            reply = Reply(delay_seconds=CUT_REPLY_SECONDS)
        with self._lock:
            self.arrivals.append(Arrival(time.monotonic(), user, reply.status))
        return reply

    def between(self, start: float, end: float) -> list[Arrival]:
        with self._lock:
            return [a for a in self.arrivals if start < a.at < end]

    def of(self, user: str) -> list[Arrival]:
        with self._lock:
            return [a for a in self.arrivals if a.user == user]


@pytest.mark.postgres
@pytest.mark.parametrize("fault", ["refused", "unanswered"])
def test_a_worker_cut_off_from_the_database_stops_before_its_claim_can_run_out(
    store: Store,
    upstream: Upstream,
    standin: TrayStandin,
    database_url: str,
    tmp_path: Path,
    fault: str,
) -> None:
    """``refused``: the proxy resets every connection; ``unanswered``: it stalls them (a
    partition that heals after CUT_SECONDS). Either way the cut worker, which keeps retrying
    the straggler, starts no request once its claim could run out; a second worker takes its
    rows over during the cut; in the end everyone is told, the same bytes each time."""
    if make_url(database_url).get_backend_name() != "postgresql":
        pytest.skip("the database is cut through a TCP proxy: PostgreSQL only")
    engine = upstream.engine
    users = [f"user-{n:03d}" for n in range(CUT_MEMBERS)]
    upstream.add_audience(AUDIENCE, "Cut Off")
    upstream.add(AUDIENCE, *users)
    workflow = TimedWorkflow()
    standin.respond(PATH, workflow)
    url = standin.url(PATH)

    with TcpProxy(target_port=make_url(database_url).port or 5432) as proxy:
        settings = write_settings(
            tmp_path / "cut.toml", proxy.url_for(database_url), [url], delivery=CUT_DELIVERY
        )
        log = tmp_path / "cut.log"
        cut_worker = start(settings, "sync", log=log)
        try:
            wait_until(
                lambda: workflow.of(STRAGGLER) or cut_worker.poll() is not None,
                30,
                "the cut worker to send the straggler",
            )
            assert cut_worker.poll() is None, log.read_text(errors="replace")
            cut_at = time.monotonic()
            if fault == "refused":
                proxy.cut()
            else:
                proxy.stall()
            claimed_at_cut = {
                user
                for (user,) in query(
                    engine, "select user_id from syncer_outbox where claim_token is not null"
                )
            }
            # A second worker starts once the cut worker's claims have run out: on the
            # database's clock, and surely (its last renewal began before the cut).
            wait_until(
                lambda: live_claims(engine) == 0,
                CUT_LEASE + 10,
                "the cut worker's claims to run out",
            )
            time.sleep(max(0.0, cut_at + CUT_LEASE - time.monotonic()))
            second_started = time.monotonic()
            second = SyncInThread(database_url, [url], CUT_DELIVERY)
            # The cut lasts CUT_SECONDS, and until the second worker has sent a row the cut
            # worker held: under CI's load its start alone took longer than the 2 s left.
            wait_until(
                lambda: (
                    {a.user for a in workflow.between(second_started, time.monotonic())}
                    & claimed_at_cut
                ),
                60,
                "the second worker to send a row the cut worker held",
            )
            time.sleep(max(0.0, cut_at + CUT_SECONDS - time.monotonic()))
            restored_at = time.monotonic()
            proxy.restore()
            workflow.healed.set()
            cut_code = cut_worker.wait(timeout=30)
            second_report = second.wait(timeout=30)
        finally:
            stop_child(cut_worker)
    output = log.read_text(errors="replace")
    last = run_sync(store, [url])

    # The cut worker started nothing once its claim could have run out.
    gate_shut = cut_at + LAST_START_AFTER_CUT + ARRIVAL_SLACK
    assert second_started > gate_shut
    late = workflow.between(gate_shut, second_started)
    assert late == [], f"requests after the cut worker's gate had to close: {late}\n{output}"
    # It went on retrying the straggler during the cut: its gate is what stopped it.
    assert any(a.user == STRAGGLER for a in workflow.between(cut_at, gate_shut)), output
    # The second worker took over what the cut worker held and sent it while the cut worker
    # was still cut off (its claims ran out, or its holder died: `refused` ends the process).
    assert STRAGGLER in claimed_at_cut
    taken_over = {a.user for a in workflow.between(second_started, restored_at)} & claimed_at_cut
    assert taken_over, f"the second worker sent none of {claimed_at_cut} during the cut"

    # The cut worker ended without a traceback, and said why it stopped.
    assert_no_crash(output, output)
    if fault == "refused":
        # Its claim could no longer be renewed, then the database was gone for good.
        assert cut_code == 3, output
        assert "claim_renewal_failed" in output and "database error" in output, output
    else:
        # Its gate closed; the database came back and it recorded what it had.
        assert cut_code == 1, output
        assert "could not renew our claim" in output or "claim_lost" in output, output
    assert second_report.run_id is not None
    assert last.fully_delivered, last.pairs

    # Everyone was told; repeats are the same message; few users were told twice.
    received = standin.received(PATH)
    assert all(is_whole(item) and item.signature_ok for item in received)
    grouped = by_user(received)
    assert sorted(grouped) == users
    for user, copies in grouped.items():
        assert len({item.message["messageId"] for item in copies}) == 1, user
        assert len({item.body for item in copies}) == 1, user
        assert any(item.processed and item.status == 200 for item in copies), user
    twice = sorted(
        user for user, copies in grouped.items() if sum(item.processed for item in copies) > 1
    )
    # At most what it held claimed: one chunk.
    assert len(twice) <= chunk_size(CUT_CONCURRENCY), twice
    assert query(engine, "select count(*) from syncer_outbox") == [(0,)]
    assert sorted(query(engine, "select user_id, value from syncer_state")) == [
        (user, "true") for user in users
    ]


# ---------------------------------------------------------------------------------------------
# f. Deletes claimed by a process that was killed are released by the next run


def test_deletes_claimed_by_a_killed_process_are_released_by_the_next_run(
    store: Store, standin: TrayStandin, database_url: str, tmp_path: Path
) -> None:
    engine = store.engine
    deleted = ["gone-1", "gone-2"]
    answered_once = threading.Event()

    def workflow(_path: str, _body: bytes) -> Reply:
        # The first delete hangs until the process that sent it is killed.
        if not answered_once.is_set():
            answered_once.set()
            return Reply(delay_seconds=30)
        return Reply()

    standin.respond(PATH, workflow)
    # The default lease (120 s): only the release of a dead holder's claims lets the next run
    # send these deletes now.
    settings = write_settings(tmp_path / "settings.toml", database_url, [standin.url(PATH)])

    doomed = start(settings, "delete-user", *deleted, log=tmp_path / "killed.log")
    try:
        wait_until(
            lambda: standin.received(PATH) or doomed.poll() is not None, 30, "the first delete"
        )
        assert doomed.poll() is None, (tmp_path / "killed.log").read_text(errors="replace")
        os.kill(doomed.pid, signal.SIGKILL)
        assert doomed.wait(timeout=30) == -signal.SIGKILL
    finally:
        stop_child(doomed)
    claims = query(engine, "select claimed_by from syncer_deletions where claim_token is not null")
    assert claims, "the killed process held no claim on a delete"
    assert all(holder.split(":")[1] == str(doomed.pid) for (holder,) in claims), claims
    # A request the kill cut short arrives truncated: only whole ones are compared.
    first_bodies = {
        item.message["userId"]: item.body for item in standin.received(PATH) if is_whole(item)
    }

    resumed = syncer(settings, "sync")

    assert resumed.returncode == 0, show(resumed)
    assert_no_crash(resumed.stdout + resumed.stderr, show(resumed))
    released = [
        event
        for event in log_events(resumed.stderr)
        if event.get("event") == "claims_of_dead_processes_released"
    ]
    assert released and released[0]["rows"] == len(claims), show(resumed)
    deletes = [
        item
        for item in standin.received(PATH)
        if is_whole(item) and item.message["type"] == "delete"
    ]
    assert sorted({item.message["userId"] for item in deletes}) == deleted
    for item in deletes:
        # A delete sent again is the same message, byte for byte.
        if item.message["userId"] in first_bodies:
            assert item.body == first_bodies[item.message["userId"]]
    assert query(engine, "select count(*) from syncer_deletions where delivered_at is null") == [
        (0,)
    ]
    assert query(engine, "select count(*) from syncer_deletions where claim_token is not null") == [
        (0,)
    ]


DEAD_CLAIM_LEASE = 10.0


def test_delete_user_does_not_wait_for_a_killed_process_claim_on_the_users_change(
    store: Store, upstream: Upstream, standin: TrayStandin, database_url: str, tmp_path: Path
) -> None:
    if make_url(database_url).get_backend_name() != "sqlite":
        pytest.skip("the same on every database: run once")
    engine = store.engine
    upstream.add_audience(AUDIENCE, "Deleted While Claimed")
    upstream.add(AUDIENCE, "user-1", "user-2")
    first = threading.Event()
    delete_arrived: list[float] = []

    def workflow(_path: str, body: bytes) -> Reply:
        if json_field(body, "type") == "delete":
            delete_arrived.append(time.time())
        if not first.is_set():
            first.set()
            return Reply(delay_seconds=60)  # until the sender is killed
        return Reply()

    standin.respond(PATH, workflow)
    settings = write_settings(
        tmp_path / "settings.toml",
        database_url,
        [standin.url(PATH)],
        delivery={"timeout_seconds": 1, "lease_seconds": DEAD_CLAIM_LEASE},
    )
    doomed = start(settings, "sync", log=tmp_path / "killed.log")
    try:
        wait_until(lambda: standin.received(PATH) or doomed.poll() is not None, 30, "a request")
        assert doomed.poll() is None, (tmp_path / "killed.log").read_text(errors="replace")
        os.kill(doomed.pid, signal.SIGKILL)
        assert doomed.wait(timeout=30) == -signal.SIGKILL
    finally:
        stop_child(doomed)
    victim = standin.received(PATH)[0].message["userId"]
    [(claimed_until,)] = query(
        engine, "select claimed_until from syncer_outbox where user_id = :u", u=victim
    )

    deleted = syncer(settings, "delete-user", victim)

    assert deleted.returncode == 0, show(deleted)
    assert delete_arrived, show(deleted)
    # The claim's holder is dead: nothing can still be in flight under it.
    assert delete_arrived[0] < claimed_until - 1, (
        f"the delete went out {delete_arrived[0] - claimed_until:+.1f}s after the dead "
        "process's claim ran out"
    )
