"""Joined workers: a ``syncer sync`` that finds another worker sending the same (URL, audience)
stays on it until the pair's outbox is empty, and exits 0, on SQLite and PostgreSQL.

Planning is one worker at a time; delivery claims chunks (FOR UPDATE SKIP LOCKED). A worker that
runs out of changes it can claim while another still holds some polls (JOIN_POLL_SECONDS) and
takes over what is released or whose claim runs out; it reports only what it delivered itself.
Real ``syncer`` processes against the local stand-in, each step waited for as an event (a claim
in the database, a line in a log), never a fixed sleep:

- a worker joining while the first holds every change claimed: it waits, exits 0 and counts
  nothing it did not send;
- a worker joining while the first holds one chunk: it sends the rest, stays while the first
  still sends, exits 0; each counts exactly its own;
- a worker whose claims die with it (kill -9) on another host, which nobody here can see is
  dead: a worker joining then takes its rows over once the claims run out, in the same run,
  re-sending with the same messageIds, and exits 0.

test_crash_recovery covers a killed worker's claims released at once on its own host (by the
next run); test_fencing covers expiry on the database's clock and fenced writes of the old
holder; this file covers the joining worker's part in both.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from sqlalchemy import Engine

from syncer.delivery.claims import chunk_size
from syncer.store import Store
from syncer.testing.tray_standin import Reply, TrayStandin
from tests.conftest import REPO_ROOT, Upstream
from tests.integration.fault_support import (
    assert_no_crash,
    by_user,
    child_env,
    is_whole,
    log_events,
    query,
    settle,
    start,
    stop_child,
    wait_until,
    write_settings,
)
from tests.integration.test_concurrent_syncers import SUMMARY

PATH = "/wf"
AUDIENCE = "aud_joined"
CHILD_TIMEOUT = 60


class Worker:
    """A ``syncer sync`` started in the background, its output (stdout and stderr) in a log."""

    def __init__(self, process: subprocess.Popen[bytes], log: Path) -> None:
        self.process = process
        self.log = log

    @property
    def pid(self) -> int:
        return self.process.pid

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def finish(self) -> int:
        """Wait for the worker to exit (it must, on its own); its exit status."""
        try:
            return self.process.wait(timeout=CHILD_TIMEOUT)
        except subprocess.TimeoutExpired:
            raise AssertionError(
                f"worker {self.pid} still runs after {CHILD_TIMEOUT}s:\n{self.output()}"
            ) from None

    def delivered(self) -> int:
        """How many changes the worker says it delivered (its summary line)."""
        found = SUMMARY.search(self.output())
        assert found is not None, self.output()
        return int(found.group(1))

    def events(self, name: str) -> list[dict[str, object]]:
        return [e for e in log_events(self.output()) if e.get("event") == name]


def start_worker(settings: Path, log: Path) -> Worker:
    return Worker(start(settings, "sync", log=log), log)


# A worker on another machine: the same ``syncer sync``, with the host name it puts in its claims
# (and checks others' against) changed in the child only. A process on another host cannot be
# seen to have died, so its claims are released only by running out.
OTHER_HOST = "another-host.invalid"
_ON_ANOTHER_HOST = (
    f"import socket; socket.gethostname = lambda: {OTHER_HOST!r}; from syncer.cli import run; run()"
)


def start_worker_on_another_host(settings: Path, log: Path) -> Worker:
    with log.open("wb") as sink:
        process = subprocess.Popen(
            [sys.executable, "-c", _ON_ANOTHER_HOST, "--settings", str(settings), "sync"],
            stdin=subprocess.DEVNULL,
            stdout=sink,
            stderr=sink,
            env=child_env(),
            cwd=REPO_ROOT,
        )
    return Worker(process, log)


def claims_by(engine: Engine) -> dict[str, int]:
    """Pid -> how many queued changes a claim of that process holds (live or run out)."""
    held: dict[str, int] = {}
    for (holder,) in query(
        engine, "select claimed_by from syncer_outbox where claim_token is not null"
    ):
        pid = holder.split(":")[1]
        held[pid] = held.get(pid, 0) + 1
    return held


def alive_holding(worker: Worker, engine: Engine) -> int:
    """How many changes ``worker`` holds claimed; fails at once if it has exited."""
    if worker.process.poll() is not None:
        raise AssertionError(f"worker {worker.pid} exited early:\n{worker.output()}")
    return claims_by(engine).get(str(worker.pid), 0)


def claimed_users(engine: Engine, worker: Worker) -> set[str]:
    """The users whose changes ``worker`` holds claimed."""
    rows = query(
        engine, "select claimed_by, user_id from syncer_outbox where claim_token is not null"
    )
    return {user for holder, user in rows if holder.split(":")[1] == str(worker.pid)}


def assert_everyone_told_once(standin: TrayStandin, users: list[str]) -> None:
    received = standin.received(PATH)
    assert all(is_whole(item) and item.signature_ok for item in received)
    message_ids = [item.message["messageId"] for item in received]
    assert len(message_ids) == len(set(message_ids)), "a messageId was delivered twice"
    grouped = by_user(received)
    assert sorted(grouped) == users
    assert all(len(copies) == 1 for copies in grouped.values())


def assert_all_recorded(engine: Engine, users: list[str]) -> None:
    assert sorted(query(engine, "select user_id, value from syncer_state")) == [
        (user, "true") for user in users
    ]
    assert query(engine, "select count(*) from syncer_outbox") == [(0,)]


# ---------------------------------------------------------------------------------------------
# a. Joining while the first worker holds claims: the joiner stays, and counts only its own


JOIN_CONCURRENCY = 4


# What A claims first, and holds until B waits: a whole chunk.
FIRST_CHUNK = chunk_size(JOIN_CONCURRENCY)


# A's requests are held until B is waiting on the pair: far longer than B takes to start.
JOIN_TIMEOUT = 20.0  # (lease: 120 s by default, well over 1.5 x (20 + 1))
HOLD_CAP = 30.0  # no request is held longer than this, whatever becomes of the test


@pytest.mark.parametrize("left_for_b", [0, 40], ids=["nothing-left", "some-left"])
def test_a_joining_worker_stays_while_another_holds_claims_and_counts_only_its_own(
    store: Store,
    upstream: Upstream,
    standin: TrayStandin,
    database_url: str,
    tmp_path: Path,
    left_for_b: int,
) -> None:
    """A claims its first chunk; B starts once it has. The workflow holds A's requests until B
    has sent everything else (``left_for_b``: none, or 40 users, over several exchanges) and is
    waiting on the pair (its ``pair_shared`` line); then A's requests are answered. B must stay
    until A is done, exit 0, and count only what it delivered itself; A and B together deliver
    everyone exactly once and leave the outbox empty.

    A syncer whose joining worker ends its pair as soon as it runs out of claimable changes fails
    here: B's delivery loop ends while A still holds its chunk, the pair's outbox then still
    holds A's changes as pending (claimed is not delivered), so B reports them pending, its run
    is not fully delivered, and it exits 1 (without ever logging ``pair_shared``) while A is
    still sending.
    """
    engine = store.engine
    join_chunk = FIRST_CHUNK
    members = join_chunk + left_for_b
    users = [f"user-{n:03d}" for n in range(members)]
    upstream.add_audience(AUDIENCE, "Joined")
    upstream.add(AUDIENCE, *users)
    a_known = threading.Event()  # A's claimed users are known to the workflow
    b_waiting = threading.Event()  # B has run out of changes and waits on the pair
    a_users: set[str] = set()

    def workflow(_path: str, body: bytes) -> Reply:
        a_known.wait(HOLD_CAP)
        if json.loads(body)["userId"] in a_users:
            b_waiting.wait(HOLD_CAP)
        return Reply()

    standin.respond(PATH, workflow)
    settings = write_settings(
        tmp_path / "settings.toml",
        database_url,
        [standin.url(PATH)],
        delivery={"concurrency": JOIN_CONCURRENCY, "timeout_seconds": JOIN_TIMEOUT},
    )

    a = start_worker(settings, tmp_path / "a.log")
    b: Worker | None = None
    try:
        # A claims its chunk in one transaction: once any claim of A's shows, all of it does;
        # it claims no more before some of its requests are answered.
        wait_until(lambda: alive_holding(a, engine), 30, "A to claim its first chunk")
        a_users.update(claimed_users(engine, a))
        assert len(a_users) == join_chunk, claims_by(engine)
        a_known.set()
        b = start_worker(settings, tmp_path / "b.log")
        joined = b
        wait_until(
            lambda: joined.events("pair_shared") or joined.process.poll() is not None,
            JOIN_TIMEOUT - 5,  # A's first requests are held meanwhile: within their timeout
            "B to run out of changes and wait for A",
        )
        b_stayed = b.process.poll() is None
        b_waiting.set()
        codes = (a.finish(), b.finish())
    finally:
        a_known.set()
        b_waiting.set()
        stop_child(a.process)
        if b is not None:
            stop_child(b.process)

    outputs = f"--- A ---\n{a.output()}\n--- B ---\n{b.output()}"
    assert b_stayed, f"B ended its pair while A still held {join_chunk} changes\n{outputs}"
    assert codes == (0, 0), outputs
    for worker in (a, b):
        assert_no_crash(worker.output(), worker.output())
    # A could send nothing before B was waiting, so it never claimed again: it delivered its
    # chunk, B everything else. A summary counting the other's deliveries would show more.
    assert (a.delivered(), b.delivered()) == (join_chunk, left_for_b), outputs
    assert_everyone_told_once(standin, users)
    assert_all_recorded(engine, users)
    statuses = sorted(status for (status,) in query(engine, "select status from syncer_runs"))
    assert statuses == ["ok", "ok"], statuses


# ---------------------------------------------------------------------------------------------
# b. Taking over, in the same run, from a worker killed on another host


TAKEOVER_MEMBERS = 40
TAKEOVER_CONCURRENCY = 2
TAKEOVER_TIMEOUT = 1.0
TAKEOVER_LEASE = 4.0  # the shortest the validator allows with a 1 s timeout is just over 3
TAKEOVER_REPLY_SECONDS = 0.3  # A sends for about 6 s; it is killed after the first few
SENT_BEFORE_KILL = 6


def test_a_joining_worker_takes_over_a_killed_workers_claims_once_they_run_out(
    store: Store, upstream: Upstream, standin: TrayStandin, database_url: str, tmp_path: Path
) -> None:
    """A, on another host, claims the outbox, sends a few changes and is killed (kill -9).
    B, here, cannot see that A is dead (another host): it finds A's claims live, waits on the
    pair, takes them over once they run out, sends them and exits 0. Everyone is told; a user
    told twice (by A, then by B) gets the same messageId and bytes both times; no more than
    one chunk is told twice."""
    engine = store.engine
    users = [f"user-{n:03d}" for n in range(TAKEOVER_MEMBERS)]
    upstream.add_audience(AUDIENCE, "Taken Over")
    upstream.add(AUDIENCE, *users)
    standin.respond(PATH, Reply(delay_seconds=TAKEOVER_REPLY_SECONDS))
    settings = write_settings(
        tmp_path / "settings.toml",
        database_url,
        [standin.url(PATH)],
        delivery={
            "concurrency": TAKEOVER_CONCURRENCY,
            "timeout_seconds": TAKEOVER_TIMEOUT,
            "lease_seconds": TAKEOVER_LEASE,
        },
    )

    a = start_worker_on_another_host(settings, tmp_path / "a.log")
    b = None
    try:
        wait_until(
            lambda: len(standin.received(PATH)) >= SENT_BEFORE_KILL or a.process.poll() is not None,
            30,
            f"A to send {SENT_BEFORE_KILL} changes",
        )
        assert alive_holding(a, engine) > 0, claims_by(engine)
        os.kill(a.pid, signal.SIGKILL)
        assert a.process.wait(timeout=30) == -signal.SIGKILL
        held_by_a = claims_by(engine).get(str(a.pid), 0)
        assert held_by_a > 0, claims_by(engine)
        recorded_by_a = {user for (user,) in query(engine, "select user_id from syncer_state")}
        # A's requests in flight at the stand-in are recorded when they arrived; wait until
        # nothing more arrives from A, then answer B quickly.
        settle(lambda: len(standin.received(PATH)))
        sent_by_a = by_user(standin.received(PATH))
        standin.respond(PATH, Reply(delay_seconds=0.01))
        b = start_worker(settings, tmp_path / "b.log")
        code = b.finish()
    finally:
        stop_child(a.process)
        if b is not None:
            stop_child(b.process)

    assert code == 0, b.output()
    assert_no_crash(b.output(), b.output())
    # B could not see A was dead: nothing was released early; A's rows were taken over as its
    # claims ran out (if B started before they did, it joined the pair and waited for them).
    assert not b.events("claims_of_dead_processes_released"), b.output()
    assert b.delivered() == TAKEOVER_MEMBERS - len(recorded_by_a), b.output()
    assert held_by_a <= chunk_size(TAKEOVER_CONCURRENCY)

    received = standin.received(PATH)
    whole = [item for item in received if is_whole(item)]
    assert all(item.signature_ok for item in whole)
    everyone = by_user(whole)
    assert sorted(everyone) == users
    for user, copies in everyone.items():
        assert len({item.message["messageId"] for item in copies}) == 1, (
            f"{user} was sent again under another messageId"
        )
        assert len({item.body for item in copies}) == 1, f"{user} was sent again other bytes"
    twice = sorted(user for user, copies in everyone.items() if len(copies) > 1)
    assert all(len(copies) <= 2 for copies in everyone.values())
    # Only what A sent and did not record was sent again, and no more than one chunk of it.
    assert set(twice) <= set(sent_by_a) - recorded_by_a
    assert len(twice) <= chunk_size(TAKEOVER_CONCURRENCY), twice
    assert_all_recorded(engine, users)
    recorded_ids = dict(query(engine, "select user_id, message_id from syncer_state"))
    assert all(recorded_ids[u] == copies[0].message["messageId"] for u, copies in everyone.items())
