"""Two syncers on one database at once: every change is delivered once, never twice.

Two ``syncer sync`` processes started together, and two ``syncer daemon`` processes running side
by side while upstream changes the memberships, on SQLite and PostgreSQL. Plans of a pair never
overlap, and each change is claimed by one of them at a time, so they share the work.
"""

from __future__ import annotations

import re
import signal
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from syncer.store import Store
from syncer.testing.tray_standin import Reply, TrayStandin
from tests.conftest import Upstream
from tests.integration.fault_support import (
    Result,
    assert_no_crash,
    by_user,
    is_whole,
    log_events,
    query,
    settle,
    show,
    start,
    stop_child,
    syncer,
    trait_value,
    wait_until,
    write_settings,
)

PATH = "/wf"
SUMMARY = re.compile(r"^run \d+: .* (\d+) delivered, (\d+) pending, (\d+) rejected", re.M)


def delivered_count(result: Result) -> int:
    """The number of changes a ``syncer sync`` says it delivered."""
    found = SUMMARY.search(result.stdout)
    assert found is not None, show(result)
    return int(found.group(1))


def test_two_syncs_started_together_deliver_each_change_exactly_once(
    store: Store,
    upstream: Upstream,
    standin: TrayStandin,
    database_url: str,
    tmp_path: Path,
) -> None:
    engine = store.engine
    users = [f"user-{n:04d}" for n in range(1500)]
    upstream.add_audience("aud_1", "Frequent Buyers")
    upstream.add("aud_1", *users)
    standin.respond(PATH, Reply(delay_seconds=0.002))
    settings = write_settings(
        tmp_path / "settings.toml", database_url, [standin.url(PATH)], delivery={"concurrency": 8}
    )

    with ThreadPoolExecutor(max_workers=2) as pool:
        results = list(pool.map(lambda _: syncer(settings, "sync", timeout=90), range(2)))

    for result in results:
        assert result.returncode == 0, show(result)
        assert_no_crash(result.stdout + result.stderr, show(result))
    counts = [delivered_count(result) for result in results]
    # Between them they delivered every change once: each claimed what the other had not.
    assert sum(counts) == len(users), "\n".join(map(show, results))

    received = standin.received(PATH)
    assert all(is_whole(item) and item.signature_ok for item in received)
    message_ids = [item.message["messageId"] for item in received]
    assert len(message_ids) == len(set(message_ids)), "a messageId was delivered twice"
    sent = by_user(received)
    assert sorted(sent) == users
    assert all(len(copies) == 1 and trait_value(copies[0]) is True for copies in sent.values())
    # The record is what was accepted: every user, with the messageId the URL received.
    recorded = {
        user: (value, mid)
        for user, value, mid in query(engine, "select user_id, value, message_id from syncer_state")
    }
    assert recorded == {
        user: ("true", copies[0].message["messageId"]) for user, copies in sent.items()
    }
    assert query(engine, "select count(*) from syncer_outbox") == [(0,)]
    assert query(engine, "select count(*) from syncer_outbox where claim_token is not null") == [
        (0,)
    ]
    statuses = sorted(status for (status,) in query(engine, "select status from syncer_runs"))
    assert statuses == ["ok", "ok"], statuses


def test_two_daemons_on_one_database_send_each_genuine_change_once(
    store: Store,
    upstream: Upstream,
    standin: TrayStandin,
    database_url: str,
    tmp_path: Path,
) -> None:
    engine = store.engine
    upstream.add_audience("aud_1", "Cart Abandoners")
    upstream.add_audience("aud_2", "Newsletter Readers")
    # Each user enters at most once and leaves at most once: any (user, value) received twice
    # is a duplicate, never a genuine second change.
    members = {
        "aud_1": [f"a-{n:04d}" for n in range(150)],
        "aud_2": [f"b-{n:04d}" for n in range(50)],
    }
    for audience, ids in members.items():
        upstream.add(audience, *ids)
    left: dict[str, set[str]] = {"aud_1": set(), "aud_2": set()}
    standin.respond(PATH, Reply(delay_seconds=0.001))
    settings = write_settings(
        tmp_path / "settings.toml",
        database_url,
        [standin.url(PATH)],
        delivery={"concurrency": 4},
        schedule={"interval": "1s"},
        # Upstream churns a fifth of aud_2 every 0.35 s: a run that lags three steps behind
        # would see over half of what it told exit, and the mass-exit guard would rightly hold
        # it. The guard is not what this test is about.
        guard={"max_exit_share": 1.0, "min_audience_size": 1_000_000},
    )

    logs = [tmp_path / f"daemon{n}.log" for n in range(2)]
    daemons = [start(settings, "daemon", log=log) for log in logs]
    try:
        for log in logs:
            wait_until(lambda log=log: "daemon_started" in log.read_text(), 30, "daemon start")
        started = time.monotonic()
        step = 0
        while time.monotonic() - started < 4:
            time.sleep(0.35)
            step += 1
            for audience, prefix in (("aud_1", "a"), ("aud_2", "b")):
                new = [f"{prefix}-new-{step:02d}-{n:02d}" for n in range(20)]
                upstream.add(audience, *new)
                current = [u for u in members[audience] if u not in left[audience]]
                going = current[step * 7 % len(current) :][:10]
                upstream.remove(audience, *going)
                left[audience].update(going)
                members[audience].extend(new)
        # Both daemons keep syncing on schedule while upstream changes: wait (for an event, not
        # a clock) until each has finished at least two runs.
        for log in logs:
            wait_until(
                lambda log=log: log.read_text(errors="replace").count('"sync_finished"') >= 2,
                90,
                "two runs of each daemon",
            )
        assert all(daemon.poll() is None for daemon in daemons)
        for daemon in daemons:
            daemon.send_signal(signal.SIGTERM)
        codes = [daemon.wait(timeout=20) for daemon in daemons]
    finally:
        for daemon in daemons:
            stop_child(daemon)
    outputs = [log.read_text(errors="replace") for log in logs]
    assert codes == [0, 0], "\n".join(outputs)
    for output in outputs:
        assert_no_crash(output)
        failed = [e for e in log_events(output) if e.get("event") == "sync_failed"]
        assert failed == [], failed
    runs = [
        sum(1 for e in log_events(output) if e.get("event") == "sync_finished")
        for output in outputs
    ]
    assert all(count >= 2 for count in runs), runs
    settle(lambda: len(standin.received(PATH)))

    # Whatever the stop left queued goes out on one more run; nothing goes out twice.
    final = syncer(settings, "sync")
    assert final.returncode == 0, show(final)

    received = standin.received(PATH)
    assert all(is_whole(item) and item.signature_ok for item in received)
    message_ids = [item.message["messageId"] for item in received]
    assert len(message_ids) == len(set(message_ids)), "a messageId was delivered twice"
    told: dict[tuple[str, str], list[bool]] = {}
    for item in received:
        audience = item.message["context"]["personas"]["computation_id"]
        told.setdefault((audience, item.message["userId"]), []).append(trait_value(item))
    for (audience, user), values in told.items():
        # At most one entry and one exit, in that order: exactly the changes that happened.
        assert values in ([True], [True, False]), (audience, user, values)
        if values == [True, False]:
            assert user in left[audience]
    for audience, ids in members.items():
        now = set(ids) - left[audience]
        # Every current member was told true and nobody else was told true and not false.
        told_in = {u for (a, u), values in told.items() if a == audience and values == [True]}
        assert told_in == now
    record = query(engine, "select audience_id, user_id, value from syncer_state")
    expected = {(a, u): ("false" if v[-1] is False else "true") for (a, u), v in told.items()}
    assert {(a, u): value for a, u, value in record} == expected
    assert query(engine, "select count(*) from syncer_outbox") == [(0,)]
