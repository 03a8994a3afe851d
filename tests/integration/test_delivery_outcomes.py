"""What each kind of answer from a workflow URL does to a run, end to end.

Real database, real HTTP to the local stand-in: retries within a run and across runs, final
refusals, redirects, timeouts, slow and failing URLs beside healthy ones, URLs added later, and
the run options (full, one audience, dry run), audience keys and invalid input rows.
"""

from __future__ import annotations

import itertools
import json
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
from sqlalchemy import MetaData, select

from syncer.core.states import Call
from syncer.store import Store
from syncer.sync import SyncEngine, SyncOptions
from syncer.testing.tray_standin import Received, Reply, TrayStandin
from tests.conftest import SECRET, Upstream, make_settings, run_sync, sent_values, told_values

RETRYABLE_STATUSES = [500, 502, 503, 429, 408, 423]
FINAL_STATUSES = [400, 409, 422]


@dataclass
class Arrival:
    """One request as a responder function saw it, the moment it arrived."""

    at: float
    path: str
    user_id: str
    message_id: str
    body: bytes


# How long the stand-in holds a slow URL's answer while waiting for something that must happen
# first: only a failing test waits that long.
HOLD_SECONDS = 15


@dataclass
class Script:
    """A responder function that records arrivals and answers with ``decide(arrival, n)``.

    ``n`` counts the requests this script has seen at the arrival's path, from 1.
    """

    decide: Callable[[Arrival, int], Reply] = field(default=lambda _arrival, _n: Reply())
    arrivals: list[Arrival] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def __call__(self, path: str, body: bytes) -> Reply:
        message = json.loads(body)
        arrival = Arrival(time.monotonic(), path, message["userId"], message["messageId"], body)
        with self._lock:
            self.arrivals.append(arrival)
            seen = sum(1 for a in self.arrivals if a.path == path)
        return self.decide(arrival, seen)

    def at(self, path: str) -> list[Arrival]:
        with self._lock:
            return [a for a in self.arrivals if a.path == path]


@pytest.fixture
def standin() -> Iterator[TrayStandin]:
    """The conftest stand-in, but stopped in the background.

    Stopping waits for the server's 0.5 s poll; each test has a server (and port) of its own, so
    nothing needs to wait for that, and two dozen tests are 12 s quicker.
    """
    server = TrayStandin(secret=SECRET).start()
    yield server
    threading.Thread(target=server.stop, daemon=True).start()


def free_port() -> int:
    """A port on 127.0.0.1 nothing listens on (bound, read, and closed again)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def by_user(received: list[Received]) -> dict[str, list[Received]]:
    """Requests grouped by userId, in arrival order."""
    grouped: dict[str, list[Received]] = {}
    for item in received:
        grouped.setdefault(item.message["userId"], []).append(item)
    return grouped


def values(standin: TrayStandin, path: str) -> dict[str, Any]:
    """userId -> trait value of the identify calls at ``path`` (each user expected once)."""
    sent = sent_values(standin, path)
    users = [user for user, _key, _value in sent]
    assert len(users) == len(set(users)), f"a user was sent twice: {sent}"
    return {user: value for user, _key, value in sent}


def destination_id(store: Store, url: str) -> int:
    return store.destinations.find([url])[url]


def snapshot(store: Store) -> dict[str, list[tuple[Any, ...]]]:
    """Every row of every table in the database, for before/after comparisons."""
    reflected = MetaData()
    reflected.reflect(bind=store.engine)
    with store.engine.connect() as connection:
        return {
            name: sorted((tuple(row) for row in connection.execute(select(table))), key=repr)
            for name, table in reflected.tables.items()
            if name != "alembic_version"
        }


# --- retryable answers ---


@pytest.mark.parametrize("status", RETRYABLE_STATUSES)
def test_retryable_status_is_retried_then_left_pending_and_delivered_later_unchanged(
    store: Store, upstream: Upstream, standin: TrayStandin, status: int
) -> None:
    upstream.add_audience("aud_1", "Buyers")
    upstream.add("aud_1", "u1", "u2")
    url = standin.url("/wf")
    standin.respond("/wf", Reply(status=status))

    failed = run_sync(store, [url], max_attempts=3, concurrency=1)

    attempts = standin.received("/wf")
    # The first change uses up its three attempts; the URL then counts as down for this run.
    assert len(attempts) == 3
    assert len({item.body for item in attempts}) == 1
    assert all(item.status == status for item in attempts)
    assert not failed.fully_delivered
    assert failed.counts.pending == 2
    assert failed.counts.delivered == 0
    assert failed.counts.rejected == 0
    assert told_values(store, url, "aud_1") == {}
    first_body = attempts[0].body
    first_user = attempts[0].message["userId"]

    standin.clear()
    standin.respond("/wf", Reply(status=200))
    recovered = run_sync(store, [url], max_attempts=3, concurrency=1)

    assert recovered.fully_delivered
    assert recovered.counts.pending == 0
    assert recovered.counts.delivered == 2
    later = by_user(standin.received("/wf"))
    assert sorted(later) == ["u1", "u2"]
    assert [item.body for item in later[first_user]] == [first_body]
    assert later[first_user][0].message["messageId"] == attempts[0].message["messageId"]
    assert all(item.signature_ok for items in later.values() for item in items)
    assert told_values(store, url, "aud_1") == {
        "u1": "true",
        "u2": "true",
    }


def test_retried_exit_keeps_its_message_id_across_failing_runs(
    store: Store, upstream: Upstream, standin: TrayStandin
) -> None:
    upstream.add_audience("aud_1", "Buyers")
    upstream.add("aud_1", "u1", "u2")
    url = standin.url("/wf")
    run_sync(store, [url])
    upstream.remove("aud_1", "u1")
    standin.clear()
    standin.respond("/wf", Reply(status=503))

    run_sync(store, [url], max_attempts=2)
    run_sync(store, [url], max_attempts=2)

    failing = standin.received("/wf")
    assert len(failing) == 4
    assert {item.body for item in failing} == {failing[0].body}
    assert failing[0].message["traits"] == {"buyers": False}
    standin.clear()
    standin.respond("/wf", Reply(status=200))
    run_sync(store, [url])
    assert [item.body for item in standin.received("/wf")] == [failing[0].body]


def test_connection_refused_is_retryable_and_delivered_once_the_url_listens(
    store: Store, upstream: Upstream
) -> None:
    upstream.add_audience("aud_1", "Buyers")
    upstream.add("aud_1", "u1", "u2", "u3")
    port = free_port()
    url = f"http://127.0.0.1:{port}/wf"

    failed = run_sync(store, [url], max_attempts=3)

    # Given up promptly: the run's own duration, not the test's clock with the engine's start.
    assert failed.duration_seconds < 5, failed.duration_seconds
    assert not failed.fully_delivered
    assert failed.counts.pending == 3
    assert failed.counts.rejected == 0
    assert failed.counts.delivered == 0
    assert failed.pairs and failed.pairs[0].note.startswith("URL unavailable")

    with TrayStandin(secret=SECRET, port=port) as late:
        recovered = run_sync(store, [url])
        assert recovered.fully_delivered
        assert values(late, "/wf") == {"u1": True, "u2": True, "u3": True}
        assert all(item.signature_ok for item in late.received())


# --- Retry-After ---


def test_retry_after_is_honoured_when_the_cap_allows(
    store: Store, upstream: Upstream, standin: TrayStandin
) -> None:
    upstream.add_audience("aud_1", "Buyers")
    upstream.add("aud_1", "u1")
    script = Script(
        lambda _a, n: Reply(status=429, headers={"Retry-After": "1"}) if n == 1 else Reply()
    )
    standin.respond("/wf", script)

    report = run_sync(
        store,
        [standin.url("/wf")],
        max_attempts=3,
        backoff_base_seconds=0.01,
        backoff_max_seconds=0.02,
        retry_after_max_seconds=5,
    )

    assert report.fully_delivered
    first, second = script.at("/wf")
    assert second.at - first.at >= 0.9
    assert second.body == first.body


def test_retry_after_is_capped_by_retry_after_max_seconds(
    store: Store, upstream: Upstream, standin: TrayStandin
) -> None:
    upstream.add_audience("aud_1", "Buyers")
    upstream.add("aud_1", "u1")
    script = Script(lambda _a, _n: Reply(status=429, headers={"Retry-After": "30"}))
    standin.respond("/wf", script)

    started = time.monotonic()
    report = run_sync(
        store,
        [standin.url("/wf")],
        max_attempts=3,
        backoff_base_seconds=0.01,
        backoff_max_seconds=0.02,
        retry_after_max_seconds=0.2,
    )

    assert time.monotonic() - started < 5
    assert report.counts.pending == 1
    arrivals = script.at("/wf")
    assert len(arrivals) == 3
    gaps = [later.at - earlier.at for earlier, later in itertools.pairwise(arrivals)]
    # The server's wish is followed up to the cap (0.2 s, far above the 0.02 s backoff)...
    assert all(gap >= 0.18 for gap in gaps), gaps
    # ...and no further.
    assert all(gap < 2 for gap in gaps), gaps


# --- final answers ---


@pytest.mark.parametrize("status", FINAL_STATUSES)
def test_final_status_is_not_retried_not_recorded_as_told_and_resent_next_run(
    store: Store, upstream: Upstream, standin: TrayStandin, status: int
) -> None:
    upstream.add_audience("aud_1", "Buyers")
    upstream.add("aud_1", "bad", "good1", "good2")
    url = standin.url("/wf")
    standin.respond(
        "/wf", Script(lambda a, _n: Reply(status=status) if a.user_id == "bad" else Reply())
    )

    first = run_sync(store, [url], max_attempts=3)

    sent = by_user(standin.received("/wf"))
    assert len(sent["bad"]) == 1
    assert sent["bad"][0].status == status
    assert [len(sent["good1"]), len(sent["good2"])] == [1, 1]
    assert first.counts.rejected == 1
    assert first.counts.delivered == 2
    assert not first.fully_delivered
    assert told_values(store, url, "aud_1") == {
        "good1": "true",
        "good2": "true",
    }

    standin.clear()
    standin.respond("/wf", Reply(status=200))
    second = run_sync(store, [url], max_attempts=3)

    again = standin.received("/wf")
    assert [item.message["userId"] for item in again] == ["bad"]
    assert again[0].body == sent["bad"][0].body
    assert again[0].message["messageId"] == sent["bad"][0].message["messageId"]
    assert second.fully_delivered
    assert second.counts.rejected == 0


def test_redirect_is_not_followed_and_counts_as_rejected(
    store: Store, upstream: Upstream, standin: TrayStandin
) -> None:
    upstream.add_audience("aud_1", "Buyers")
    upstream.add("aud_1", "u1")
    standin.respond("/wf", Reply(status=302, headers={"Location": standin.url("/elsewhere")}))

    report = run_sync(store, [standin.url("/wf")], max_attempts=3)

    assert len(standin.received("/wf")) == 1
    assert standin.received("/elsewhere") == []
    assert report.counts.rejected == 1
    assert report.counts.delivered == 0
    assert not report.fully_delivered


# --- several URLs ---


def test_failing_url_does_not_hold_back_a_healthy_one_and_later_gets_the_net_change(
    store: Store, upstream: Upstream, standin: TrayStandin
) -> None:
    upstream.add_audience("aud_1", "Buyers")
    upstream.add("aud_1", "u1", "u2", "u3")
    healthy, failing = standin.url("/ok"), standin.url("/down")
    run_sync(store, [healthy, failing])
    standin.clear()
    standin.respond("/down", Reply(status=503))

    upstream.add("aud_1", "u4", "u5")
    upstream.remove("aud_1", "u1")
    during = run_sync(store, [healthy, failing], max_attempts=2)

    assert values(standin, "/ok") == {"u1": False, "u4": True, "u5": True}
    assert not during.fully_delivered
    assert sum(pair.delivered for pair in during.pairs if pair.url == healthy) == 3
    assert sum(pair.pending for pair in during.pairs if pair.url == failing) == 3
    standin.clear()

    upstream.remove("aud_1", "u4", "u2")
    run_sync(store, [healthy, failing], max_attempts=2)

    assert values(standin, "/ok") == {"u2": False, "u4": False}
    standin.clear()
    standin.respond("/down", Reply(status=200))

    after = run_sync(store, [healthy, failing])

    assert after.fully_delivered
    assert values(standin, "/ok") == {}
    # u4 entered and left while the URL was down: it hears nothing of u4.
    # u4 entered and left while /down answered 503: that 503 may have come after the entry was
    # processed, so /down is told u4 is out rather than left believing it may be in.
    assert values(standin, "/down") == {"u1": False, "u2": False, "u4": False, "u5": True}
    assert told_values(store, failing, "aud_1") == {
        "u1": "false",
        "u2": "false",
        "u3": "true",
        "u4": "false",
        "u5": "true",
    }


def test_url_added_later_gets_the_current_membership_and_no_exits(
    store: Store, upstream: Upstream, standin: TrayStandin
) -> None:
    upstream.add_audience("aud_1", "Buyers")
    upstream.add("aud_1", "u1", "u2", "u3")
    old, new = standin.url("/old"), standin.url("/new")
    run_sync(store, [old])
    standin.clear()
    upstream.remove("aud_1", "u1")
    upstream.add("aud_1", "u4")

    report = run_sync(store, [old, new])

    assert report.fully_delivered
    assert values(standin, "/old") == {"u1": False, "u4": True}
    assert values(standin, "/new") == {"u2": True, "u3": True, "u4": True}


def test_timeout_is_retryable_and_the_run_finishes_promptly(
    store: Store, upstream: Upstream, standin: TrayStandin
) -> None:
    upstream.add_audience("aud_1", "Buyers")
    upstream.add("aud_1", "u1")
    url = standin.url("/slow")
    script = Script(lambda _a, _n: Reply(delay_seconds=4))
    standin.respond("/slow", script)

    report = run_sync(store, [url], max_attempts=2, timeout_seconds=0.5)

    # Two attempts cut off after 0.5 s each take about 1.1 s; a run that waited for even one
    # answer could not end before its 4 s delay. The run's own duration (not the test's clock,
    # which also counts the engine's start-up: 3.02 s once, under CI's load) is held to that.
    assert report.duration_seconds < 4.0, report.duration_seconds
    assert len(script.at("/slow")) == 2
    assert report.counts.pending == 1
    assert report.counts.rejected == 0
    assert not report.fully_delivered
    first_body = script.at("/slow")[0].body

    script.decide = lambda _a, _n: Reply()
    recovered = run_sync(store, [url], max_attempts=2, timeout_seconds=0.5)

    assert recovered.fully_delivered
    assert script.at("/slow")[-1].body == first_body


def test_slow_url_does_not_delay_a_fast_one(
    store: Store, upstream: Upstream, standin: TrayStandin
) -> None:
    upstream.add_audience("aud_1", "Buyers")
    members = [f"u{n}" for n in range(8)]
    upstream.add("aud_1", *members)
    # "Not delayed": the fast URL waits for no connection, worker or anything else the slow URL
    # holds. So the slow URL answers nothing until the fast one has received everything; were
    # the fast URL waiting on the slow one, that would never happen, and each slow answer gives
    # up waiting after HOLD_SECONDS, which the test then sees.
    fast_has_all = threading.Event()
    slow_waited_for_fast: list[bool] = []

    def decide(arrival: Arrival, n: int) -> Reply:
        if arrival.path == "/fast":
            if n == len(members):
                fast_has_all.set()
            return Reply()
        slow_waited_for_fast.append(fast_has_all.wait(HOLD_SECONDS))
        return Reply()

    script = Script(decide)
    standin.respond("/slow", script)
    # The fast workflow lives on a server of its own, so that neither server's listen backlog
    # (five on the stand-in) can be what holds anything up.
    with TrayStandin(secret=SECRET) as other:
        other.respond("/fast", script)

        report = run_sync(
            store,
            [standin.url("/slow"), other.url("/fast")],
            concurrency=4,
            timeout_seconds=HOLD_SECONDS * 2,
        )

    assert report.fully_delivered
    assert len(script.at("/slow")) == len(script.at("/fast")) == len(members)
    assert slow_waited_for_fast and all(slow_waited_for_fast), (
        f"the fast URL did not get its {len(members)} changes while the slow URL held its "
        f"answers: held {len(slow_waited_for_fast)}, gave up on {slow_waited_for_fast.count(False)}"
    )


# --- audiences: enabled, keys ---


def test_disabled_audience_is_skipped_and_keeps_its_state(
    store: Store, upstream: Upstream, standin: TrayStandin
) -> None:
    upstream.add_audience("aud_1", "Buyers")
    upstream.add_audience("aud_2", "Browsers")
    upstream.add("aud_1", "u1", "u2")
    upstream.add("aud_2", "b1")
    url = standin.url("/wf")
    run_sync(store, [url])
    standin.clear()

    upstream.update_audience("aud_1", enabled=False)
    upstream.remove("aud_1", "u1")
    upstream.add("aud_1", "u3")
    upstream.add("aud_2", "b2")
    skipped = run_sync(store, [url])

    assert sent_values(standin, "/wf") == [("b2", "browsers", True)]
    assert {pair.audience_id for pair in skipped.pairs} == {"aud_2"}
    assert told_values(store, url, "aud_1") == {
        "u1": "true",
        "u2": "true",
    }
    standin.clear()

    upstream.update_audience("aud_1", enabled=True)
    run_sync(store, [url])

    assert sorted(sent_values(standin, "/wf")) == [
        ("u1", "buyers", False),
        ("u3", "buyers", True),
    ]


def test_renamed_audience_keeps_its_key(
    store: Store, upstream: Upstream, standin: TrayStandin
) -> None:
    upstream.add_audience("aud_1", "Buyers")
    upstream.add("aud_1", "u1")
    url = standin.url("/wf")
    run_sync(store, [url])
    standin.clear()

    upstream.update_audience("aud_1", name="Big Spenders")
    upstream.add("aud_1", "u2")
    report = run_sync(store, [url])

    assert report.problems == []
    assert sent_values(standin, "/wf") == [("u2", "buyers", True)]
    standin.clear()

    # A new audience whose name gives the key still held by aud_1 must not take it over.
    upstream.add_audience("aud_2", "Buyers")
    upstream.add("aud_2", "x1")
    upstream.add("aud_1", "u3")
    report = run_sync(store, [url])

    assert sent_values(standin, "/wf") == [("u3", "buyers", True)]
    assert [problem.audience_id for problem in report.problems] == ["aud_2"]


def test_audiences_with_colliding_keys_are_not_synced_and_named_in_problems(
    store: Store, upstream: Upstream, standin: TrayStandin
) -> None:
    upstream.add_audience("aud_a", "VIP's")
    upstream.add_audience("aud_b", "vips")
    upstream.add_audience("aud_c", "Buyers")
    upstream.add("aud_a", "a1")
    upstream.add("aud_b", "b1")
    upstream.add("aud_c", "c1")

    report = run_sync(store, [standin.url("/wf")])

    assert sent_values(standin, "/wf") == [("c1", "buyers", True)]
    assert {problem.audience_id for problem in report.problems} == {"aud_a", "aud_b"}
    assert all("vips" in problem.reason for problem in report.problems)
    assert {pair.audience_id for pair in report.pairs} == {"aud_c"}


# --- run options ---


def test_full_sync_resends_every_member_and_pending_exits(
    store: Store, upstream: Upstream, standin: TrayStandin
) -> None:
    upstream.add_audience("aud_1", "Buyers")
    upstream.add("aud_1", "u1", "u2", "u3", "u4")
    url = standin.url("/wf")
    run_sync(store, [url])
    upstream.remove("aud_1", "u4")
    run_sync(store, [url])
    upstream.remove("aud_1", "u3")
    standin.respond("/wf", Reply(status=503))
    run_sync(store, [url], max_attempts=1)
    standin.clear()
    standin.respond("/wf", Reply(status=200))

    report = run_sync(store, [url], SyncOptions(full=True))

    assert report.fully_delivered
    # u4's exit was delivered before: a full sync does not repeat it.
    assert values(standin, "/wf") == {"u1": True, "u2": True, "u3": False}
    standin.clear()
    run_sync(store, [url])
    assert standin.received() == []


def test_audience_option_syncs_only_that_audience_by_id_or_key(
    store: Store, upstream: Upstream, standin: TrayStandin
) -> None:
    upstream.add_audience("aud_1", "Buyers")
    upstream.add_audience("aud_2", "Browsers")
    upstream.add("aud_1", "u1")
    upstream.add("aud_2", "b1")
    url = standin.url("/wf")

    by_id = run_sync(store, [url], SyncOptions(audience="aud_2"))

    assert sent_values(standin, "/wf") == [("b1", "browsers", True)]
    assert {pair.audience_id for pair in by_id.pairs} == {"aud_2"}
    standin.clear()
    upstream.add("aud_2", "b2")

    by_key = run_sync(store, [url], SyncOptions(audience="buyers"))

    assert sent_values(standin, "/wf") == [("u1", "buyers", True)]
    assert {pair.audience_id for pair in by_key.pairs} == {"aud_1"}
    standin.clear()
    run_sync(store, [url])
    assert sent_values(standin, "/wf") == [("b2", "browsers", True)]


def test_dry_run_sends_nothing_and_changes_nothing(
    store: Store, upstream: Upstream, standin: TrayStandin
) -> None:
    upstream.add_audience("aud_1", "Buyers")
    upstream.add("aud_1", "u1", "u2")
    url = standin.url("/wf")
    settings = make_settings(str(store.engine.url.render_as_string(False)), [url])
    emitted: list[tuple[str, str, str, str, Call]] = []
    before = snapshot(store)

    engine = SyncEngine(settings, store)
    try:
        engine.run(SyncOptions(dry_run=True), emit=lambda *change: emitted.append(change))
    finally:
        engine.close()

    assert standin.received() == []
    assert snapshot(store) == before
    assert sorted(emitted) == [
        (url, "buyers", "u1", "true", Call.IDENTIFY),
        (url, "buyers", "u2", "true", Call.IDENTIFY),
    ]

    report = run_sync(store, [url])

    assert report.fully_delivered
    assert values(standin, "/wf") == {"u1": True, "u2": True}
    standin.clear()
    upstream.remove("aud_1", "u1")
    upstream.add("aud_1", "u3")
    before = snapshot(store)
    run_sync(store, [url], SyncOptions(dry_run=True))
    assert standin.received() == []
    assert snapshot(store) == before
    run_sync(store, [url])
    assert values(standin, "/wf") == {"u1": False, "u3": True}


# --- invalid input ---


def test_invalid_rows_are_reported_and_skipped_while_the_rest_is_delivered(
    store: Store, upstream: Upstream, standin: TrayStandin
) -> None:
    upstream.add_audience("aud_1", "Buyers")
    upstream.add("aud_1", "", "bad\x01id", "x" * 600, "good1", "good2")
    url = standin.url("/wf")

    report = run_sync(store, [url])

    assert values(standin, "/wf") == {"good1": True, "good2": True}
    # Invalid rows are not queued at all: reported by the plan, never sent, and not counted
    # as undelivered (nothing could deliver them until upstream fixes them).
    assert [(pair.invalid, pair.invalid_example) for pair in report.pairs] == [
        (3, "'': user_id is empty")
    ]
    assert report.counts.parked == 0
    assert report.counts.pending == 0
    assert report.counts.rejected == 0
    assert report.counts.delivered == 2
    assert report.fully_delivered
    assert told_values(store, url, "aud_1") == {
        "good1": "true",
        "good2": "true",
    }
