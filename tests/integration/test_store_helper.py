"""The store's helper process on SQLite: a large delivery's exchanges run there, every change is
sent once with the same bytes as without it, and a helper that dies, or gets a Ctrl-C meant for
its parent, loses nothing."""

from __future__ import annotations

import os
import signal
import threading
from collections import Counter
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path

import pytest

from syncer.core.payload import Computation, TraitChange, identify_body, message_id
from syncer.store import Store
from syncer.store.database import create_database_engine, migrate
from syncer.sync import SyncEngine, SyncOptions
from syncer.sync.helper import HELPER_MIN_CHANGES, StoreHelper
from syncer.testing.tray_standin import Reply, TrayStandin
from tests.conftest import Upstream, make_settings, told_values
from tests.integration.fault_support import (
    query,
    show,
    start,
    stop_child,
    syncer,
    wait_until,
    write_settings,
)

PATH = "/wf"
MEMBERS = HELPER_MIN_CHANGES + 400


@pytest.fixture
def sqlite_store(tmp_path: Path) -> Iterator[Store]:
    """A migrated SQLite file: the only database the helper serves."""
    engine = create_database_engine(f"sqlite:///{tmp_path / 'syncer.db'}")
    migrate(engine)
    yield Store.open(engine)
    engine.dispose()


def users(count: int) -> list[str]:
    return [f"user-{n:05d}" for n in range(count)]


def sync_engine(store: Store, standin: TrayStandin, **delivery: float) -> SyncEngine:
    url = store.engine.url.render_as_string(hide_password=False)
    settings = make_settings(url, [standin.url(PATH)], concurrency=8, **delivery)
    return SyncEngine(settings, store)


def helper_of(engine: SyncEngine) -> StoreHelper:
    helper = engine.context.helper
    assert helper is not None, "a SQLite file gets a helper"
    return helper


def once_helper_is_up(helper: StoreHelper) -> None:
    """Hold a reply until the helper is ready: on a loaded machine it may take longer to start
    than the whole delivery would, which would then never use it. (The sender must wait that
    long without timing out, or it would send the held requests again.)"""
    wait_until(lambda: helper.ready or helper.lost, 30, "the helper to start")


def test_a_large_delivery_runs_in_the_helper_and_sends_what_the_thread_would(
    sqlite_store: Store, standin: TrayStandin
) -> None:
    upstream = Upstream(sqlite_store)
    upstream.add_audience("aud_big", "Big Audience")
    upstream.add("aud_big", *users(MEMBERS), anonymous_id="anon-1", email="a@example.com")
    engine = sync_engine(sqlite_store, standin, timeout_seconds=40, lease_seconds=90)
    helper = helper_of(engine)

    def reply(_path: str, _body: bytes) -> Reply:
        once_helper_is_up(helper)
        return Reply()

    standin.respond(PATH, reply)
    try:
        report = engine.run(SyncOptions())
        helper_pid = helper.pid
        calls = helper.calls
    finally:
        engine.close()

    assert report.fully_delivered and report.counts.delivered == MEMBERS
    assert helper_pid is not None and helper_pid != os.getpid()
    # Until the helper was up, exchanges ran on the database thread; then in the helper.
    assert calls > 0
    received = standin.received(PATH)
    assert Counter(item.message["userId"] for item in received) == Counter(users(MEMBERS))
    assert all(item.signature_ok for item in received)
    # Byte for byte the bodies the payload builder makes, as on the database thread: a fresh
    # database numbers the changes of its first plan from 1.
    change_ids = {message_id(sqlite_store.namespace, n): n for n in range(1, MEMBERS + 1)}
    computation = Computation("audience", "aud_big", "big_audience", "spa_test")
    for item in received:
        message = item.message
        change = TraitChange(
            change_ids[message["messageId"]],
            message["userId"],
            "anon-1",
            "a@example.com",
            "true",
            datetime.strptime(message["timestamp"], "%Y-%m-%dT%H:%M:%S.%fZ"),
        )
        assert item.body == identify_body(computation, change, sqlite_store.namespace)
    assert told_values(sqlite_store, standin.url(PATH), "aud_big") == dict.fromkeys(
        users(MEMBERS), "true"
    )


def test_a_small_delivery_starts_no_helper(sqlite_store: Store, standin: TrayStandin) -> None:
    upstream = Upstream(sqlite_store)
    upstream.add_audience("aud_small", "Small Audience")
    upstream.add("aud_small", *users(50))
    engine = sync_engine(sqlite_store, standin)
    try:
        report = engine.run(SyncOptions())
        helper = helper_of(engine)
        assert not helper.started and helper.calls == 0
    finally:
        engine.close()
    assert report.counts.delivered == 50


def test_postgresql_gets_no_helper(store: Store, standin: TrayStandin) -> None:
    if store.engine.dialect.name != "postgresql":
        pytest.skip("PostgreSQL only")
    engine = sync_engine(store, standin)
    try:
        assert engine.context.helper is None
    finally:
        engine.close()


@pytest.mark.parametrize("signum", [signal.SIGKILL, signal.SIGINT])
def test_a_helper_killed_or_interrupted_mid_delivery_loses_nothing(
    sqlite_store: Store, standin: TrayStandin, signum: int
) -> None:
    """SIGKILL: the exchanges go back to the database thread and the run completes; SIGINT
    (a Ctrl-C reaches the whole process group): the helper ignores it and goes on."""
    upstream = Upstream(sqlite_store)
    upstream.add_audience("aud_big", "Big Audience")
    upstream.add("aud_big", *users(MEMBERS))
    # A short lease: what a killed helper claimed and never handed back is free again soon.
    engine = sync_engine(sqlite_store, standin, timeout_seconds=5, lease_seconds=10)
    helper = helper_of(engine)
    # Up before the run: this test is about a helper that dies or is interrupted, not about
    # one that starts late (see the test above).
    helper.start()
    wait_until(lambda: helper.ready, 30, "the helper to start")
    signalled = threading.Event()
    calls_before: list[int] = []

    def reply(_path: str, _body: bytes) -> Reply:
        # Once the helper has run a few exchanges, signal it from the stand-in's thread.
        if not signalled.is_set() and helper.calls >= 3 and helper.pid is not None:
            signalled.set()
            calls_before.append(helper.calls)
            os.kill(helper.pid, signum)
        return Reply()

    standin.respond(PATH, reply)
    try:
        report = engine.run(SyncOptions())
        lost, calls_after = helper.lost, helper.calls
    finally:
        engine.close()

    assert signalled.is_set(), "the helper never ran an exchange"
    assert report.fully_delivered, report
    assert report.counts.delivered == MEMBERS
    assert set(told_values(sqlite_store, standin.url(PATH), "aud_big")) == set(users(MEMBERS))
    sent = Counter(item.message["userId"] for item in standin.received(PATH))
    assert set(sent) == set(users(MEMBERS))
    if signum == signal.SIGKILL:
        assert lost
        # Only what the dead helper had claimed and not handed back may be sent twice.
        assert sum(sent.values()) - MEMBERS <= 2 * 6 * 8
    else:
        assert not lost and calls_after > calls_before[0]
        assert max(sent.values()) == 1


def test_the_helper_ends_when_its_parent_is_killed(
    tmp_path: Path, sqlite_store: Store, standin: TrayStandin
) -> None:
    upstream = Upstream(sqlite_store)
    upstream.add_audience("aud_big", "Big Audience")
    upstream.add("aud_big", *users(MEMBERS))
    standin.respond(PATH, Reply(delay_seconds=0.005))
    url = sqlite_store.engine.url.render_as_string(hide_password=False)
    settings = write_settings(tmp_path / "settings.toml", url, [standin.url(PATH)])
    parent = start(settings, "sync", log=tmp_path / "sync.log")
    try:
        # The helper, and multiprocessing's resource tracker.
        # Halfway through: the helper has been up for a while.
        wait_until(lambda: len(standin.received(PATH)) >= MEMBERS // 2, 60, "half the audience")
        children = wait_until(lambda: _children_of(parent.pid), 30, "the helper process")
        assert parent.poll() is None, (tmp_path / "sync.log").read_text()
        os.kill(parent.pid, signal.SIGKILL)
        parent.wait(timeout=30)
    finally:
        stop_child(parent)
    for pid in children:
        wait_until(lambda pid=pid: not _alive(pid), 30, f"child {pid} of the killed run to end")
    # What the helper claimed, it claimed for its parent: the next run frees it at once.
    holders = query(
        sqlite_store.engine,
        "select distinct claimed_by from syncer_outbox where claim_token is not null",
    )
    assert holders and all(holder.split(":")[1] == str(parent.pid) for (holder,) in holders)
    standin.respond(PATH, Reply())
    resumed = syncer(settings, "sync")
    assert resumed.returncode == 0, show(resumed)
    assert set(told_values(sqlite_store, standin.url(PATH), "aud_big")) == set(users(MEMBERS))


def _children_of(parent: int) -> list[int]:
    children = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (FileNotFoundError, ProcessLookupError):
            continue
        if int(fields[1]) == parent and fields[0] != "Z":
            children.append(int(stat.parent.name))
    return children


def _alive(pid: int) -> bool:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except FileNotFoundError:
        return False
    return fields[0] != "Z"
