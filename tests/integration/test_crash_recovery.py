"""``kill -9`` of a real ``syncer sync`` in the middle of a large run, then a run to completion.

Nothing answered 2xx and recorded is sent again; what was sent but not recorded when the process
died is sent again with the same messageId and the same bytes; nobody is left out; the killed
run's claims are released at once because their holder is dead, instead of waiting for them to
run out.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest

from syncer.delivery.claims import chunk_size
from syncer.store import Store
from syncer.testing.tray_standin import Reply, TrayStandin
from tests.conftest import Upstream
from tests.integration.fault_support import (
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

MEMBERS = 1000
CONCURRENCY = 8
# Each request takes a few milliseconds at the stand-in, so that the run lasts a couple of
# seconds and the kill lands in the middle of sending, not before or after it.
DELAY_SECONDS = 0.002
PATH = "/wf"

# How many users may be sent twice. A worker keeps at most one chunk of changes claimed per URL
# at any moment (waiting, in flight, or answered and not yet recorded: syncer.delivery.claims),
# and the next run sends again only what the killed process had claimed, sent and not recorded.
RESENT_BOUND = chunk_size(CONCURRENCY)


@pytest.mark.parametrize("fraction", [0.1, 0.5, 0.9])
def test_kill_9_mid_sync_then_next_run_completes_resending_only_the_unrecorded(
    store: Store,
    upstream: Upstream,
    standin: TrayStandin,
    database_url: str,
    tmp_path: Path,
    fraction: float,
) -> None:
    engine = store.engine
    upstream.add_audience("aud_big", "Big Audience")
    users = [f"user-{n:05d}" for n in range(MEMBERS)]
    upstream.add("aud_big", *users)
    standin.respond(PATH, Reply(delay_seconds=DELAY_SECONDS))
    url = standin.url(PATH)
    settings = write_settings(
        tmp_path / "settings.toml",
        database_url,
        [url],
        delivery={"concurrency": CONCURRENCY, "batch_size": 500},
    )

    doomed = start(settings, "sync", log=tmp_path / "killed.log")
    try:
        target = int(MEMBERS * fraction)
        wait_until(
            lambda: len(standin.received(PATH)) >= target or doomed.poll() is not None,
            60,
            f"{target} requests",
        )
        assert doomed.poll() is None, "the run ended before it could be killed:\n" + (
            tmp_path / "killed.log"
        ).read_text(errors="replace")
        os.kill(doomed.pid, signal.SIGKILL)
        assert doomed.wait(timeout=30) == -signal.SIGKILL
    finally:
        stop_child(doomed)
    killed_pid = doomed.pid
    # Requests in flight at the stand-in finish (and are recorded by it) after the kill.
    settle(lambda: len(standin.received(PATH)))
    # A request the kill cut short arrives truncated; the next run sends it again whole.
    cut_short = [item for item in standin.received(PATH) if not is_whole(item)]
    assert len(cut_short) <= CONCURRENCY
    first_received = by_user(standin.received(PATH))

    # The run died mid-way: part of the audience was told, and the record says no more than that.
    assert 0 < len(first_received) < MEMBERS
    told_before = query(engine, "select user_id, value from syncer_state")
    assert {user for user, _ in told_before} <= set(first_received)
    # Its claims are still there, held by a process that no longer exists.
    claims = query(engine, "select claimed_by from syncer_outbox where claim_token is not null")
    assert 0 < len(claims) <= RESENT_BOUND, claims
    assert all(holder.split(":")[1] == str(killed_pid) for (holder,) in claims), claims

    resumed = syncer(settings, "sync")

    assert resumed.returncode == 0, show(resumed)
    assert_no_crash(resumed.stdout + resumed.stderr, show(resumed))
    assert "busy" not in resumed.stdout, show(resumed)
    released = [
        e
        for e in log_events(resumed.stderr)
        if e.get("event") == "claims_of_dead_processes_released"
    ]
    assert released and released[0]["rows"] == len(claims), show(resumed)

    received = [item for item in standin.received(PATH) if is_whole(item)]
    assert len(received) == len(standin.received(PATH)) - len(cut_short)
    everyone = by_user(received)
    assert set(everyone) == set(users)
    assert all(item.signature_ok for item in received)
    for user, copies in everyone.items():
        assert all(trait_value(item) is True for item in copies), user
        assert len({item.message["messageId"] for item in copies}) == 1, (
            f"{user} was sent again under another messageId"
        )
        assert len({item.body for item in copies}) == 1, f"{user} was sent again other bytes"
    twice = sorted(user for user, copies in everyone.items() if len(copies) > 1)
    assert all(len(copies) <= 2 for copies in everyone.values())
    assert len(twice) <= RESENT_BOUND, f"{len(twice)} users sent twice: {twice[:40]}"
    # What was recorded before the kill was never sent again.
    assert not set(twice) & {user for user, _ in told_before}

    assert sorted(query(engine, "select user_id, value from syncer_state")) == [
        (user, "true") for user in users
    ]
    assert query(engine, "select count(*) from syncer_outbox") == [(0,)]
    # Messages ids recorded are the ones that were received.
    recorded_ids = dict(query(engine, "select user_id, message_id from syncer_state"))
    assert all(recorded_ids[u] == c[0].message["messageId"] for u, c in everyone.items())
    # The killed run is not left "running" forever: the next run marked it crashed.
    statuses = query(engine, "select status from syncer_runs order by id")
    assert statuses == [("crashed",), ("ok",)], statuses
