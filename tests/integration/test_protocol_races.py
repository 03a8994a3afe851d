"""Regression tests for defects of the delivery protocol before it was rebuilt (commit 4396e92).

Every test drives the real ``syncer`` command in subprocesses, against a real database (SQLite,
and PostgreSQL when SYNCER_TEST_DATABASE_URL is set) and the local Tray stand-in, and uses only
what existed before the rebuild too (hence its own small fixtures instead of ``store`` and
``upstream``), so that the same file runs against the old implementation. They prove that:

1. a user deleted while a sync is sending is never told about again: a change not yet sent is
   not sent, and the delete waits for a change already in flight, so it always arrives last;
2. a change a URL may have processed without answering in time leaves the URL's value
   uncertain: when upstream reverses it, the reversal is sent as a newer change;
3. the mass-exit guard judges the exits a plan actually queues, even when upstream empties an
   audience while the run is busy with another one, and holds and releases per URL;
4. a URL refusing everything (401 or 404; all four statuses in the unit tests) is given up
   for the run after two refusals, nothing is rejected or parked, and it recovers by itself
   once it accepts again;
5. a member row that cannot be sent is reported and never queued, and is delivered with its
   fixed values once upstream fixes it;
6. a cosmetic edit of a workflow URL keeps what it was told and owes; a removed URL's owed
   deletes are reported by every run until ``forget-url --yes`` drops them;
7. a database URL naming another PostgreSQL driver works, and a malformed one is a settings
   error naming the key;
8. a claim lease too short for the request timeout is a settings error;
9. a dry run respects everything the real run would (deletions, the guard, rows that cannot be
   sent, parked changes) and writes nothing.
"""

from __future__ import annotations

import itertools
import json
import re
import subprocess
import threading
from collections.abc import Callable, Iterator, Sequence
from datetime import datetime
from functools import partial
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine, MetaData, delete, insert, select, update

from syncer.delivery.claims import chunk_size
from syncer.store.database import create_database_engine, migrate
from syncer.store.schema import audience_memberships, audiences
from syncer.testing.tray_standin import Received, Reply, TrayStandin
from tests.integration.cli_helpers import (
    Result,
    call_each,
    cli,
    db_rows,
    json_out,
    show,
    sync_in_process,
    wait_until,
    write_settings,
)
from tests.integration.fault_support import query, start, stop_child

POSTGRES_ONLY = pytest.mark.parametrize(
    "database_url", [pytest.param("postgresql", marks=pytest.mark.postgres)], indirect=True
)
# How long a test waits for something that must happen (a child process, a request).
PATIENCE_SECONDS = 60


# --- the scene: a migrated database, upstream rows, what the stand-in received ---


@pytest.fixture
def db(database_url: str) -> Iterator[Engine]:
    """The engine of a freshly migrated database (the input tables and the syncer's own)."""
    engine = create_database_engine(database_url)
    migrate(engine)
    yield engine
    engine.dispose()


class Feed:
    """Plays the upstream jobs: writes the two input tables, each call one transaction."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def audience(self, audience_id: str, name: str) -> None:
        with self.engine.begin() as connection:
            connection.execute(insert(audiences).values(id=audience_id, name=name, enabled=True))

    def add(self, audience_id: str, *user_ids: str, email: str | None = None) -> None:
        with self.engine.begin() as connection:
            connection.execute(
                insert(audience_memberships),
                [{"audience_id": audience_id, "user_id": u, "email": email} for u in user_ids],
            )

    def remove(self, audience_id: str, *user_ids: str) -> None:
        with self.engine.begin() as connection:
            connection.execute(
                delete(audience_memberships).where(
                    audience_memberships.c.audience_id == audience_id,
                    audience_memberships.c.user_id.in_(user_ids),
                )
            )

    def empty(self, audience_id: str) -> None:
        """What a broken reload does: every member gone at once."""
        with self.engine.begin() as connection:
            connection.execute(
                delete(audience_memberships).where(
                    audience_memberships.c.audience_id == audience_id
                )
            )

    def set_email(self, audience_id: str, user_id: str, email: str) -> None:
        with self.engine.begin() as connection:
            connection.execute(
                update(audience_memberships)
                .where(
                    audience_memberships.c.audience_id == audience_id,
                    audience_memberships.c.user_id == user_id,
                )
                .values(email=email)
            )


def is_identify(item: Received) -> bool:
    return is_identify_message(item.message)


def is_identify_message(message: Any) -> bool:
    return bool(message["type"] == "identify")


def is_delete(item: Received) -> bool:
    return bool(item.message["type"] == "delete")


def user_of(item: Received) -> str:
    return str(item.message["userId"])


def trait_of(item: Received) -> Any:
    """The audience trait an identify call carries (True or False)."""
    message = item.message
    return message["traits"][message["context"]["personas"]["computation_key"]]


def audience_of(item: Received) -> str:
    return str(item.message["context"]["personas"]["computation_id"])


def about(received: Sequence[Received], user_id: str) -> list[Received]:
    """The requests, in arrival order, that name ``user_id``."""
    return [item for item in received if user_of(item) == user_id]


def received_at_least(standin: TrayStandin, path: str, count: int) -> bool:
    return len(standin.received(path)) >= count


def timestamp_of(item: Received) -> datetime:
    return datetime.fromisoformat(str(item.message["timestamp"]).replace("Z", "+00:00"))


def user_told(standin: TrayStandin, path: str, audience_id: str, value: bool) -> set[str]:
    """Users ``path`` accepted (2xx) ``value`` for, in one audience."""
    return {
        user_of(item)
        for item in standin.received(path)
        if is_identify(item)
        and audience_of(item) == audience_id
        and trait_of(item) is value
        and 200 <= item.status < 300
    }


# --- the command ---


def syncer(settings: Path, *args: str, expect: int) -> Result:
    """``syncer ARGS``, checked to exit with ``expect`` and not to crash."""
    result = cli(*args, settings=settings)
    assert result.returncode == expect, show(result)
    assert "Traceback" not in result.stderr and "internal error" not in result.stderr, show(result)
    return result


def inspect(settings: Path, *what: str) -> Any:
    """What ``syncer inspect WHAT --format json`` prints."""
    return json_out(cli("inspect", *what, "--format", "json", settings=settings))


def inspect_all(settings: Path, *questions: tuple[str, ...]) -> list[Any]:
    """Several read-only inspections (see call_each)."""

    def asker(question: tuple[str, ...]) -> Callable[[], Any]:
        return lambda: inspect(settings, *question)

    return call_each(*(asker(question) for question in questions))


def finish(process: subprocess.Popen[bytes], log: Path) -> tuple[int, str]:
    """Wait for a background ``syncer`` child; its exit status and output."""
    try:
        code = int(process.wait(timeout=PATIENCE_SECONDS))
    finally:
        stop_child(process)
    return code, log.read_text(encoding="utf-8", errors="replace")


def one_at_a_time(tmp_path: Path, database_url: str, standin: TrayStandin) -> Path:
    """Settings for one URL at ``/wf``, sent one request at a time."""
    return write_settings(
        tmp_path / "settings.toml",
        database_url,
        [standin.url("/wf")],
        delivery={"concurrency": 1, "timeout_seconds": 20},
    )


def count(engine: Engine, sql: str, **params: Any) -> int:
    return int(query(engine, sql, **params)[0][0])


# --- 1. a deleted user is never told again ---

DELETED = "u-deleted"


def test_user_deleted_before_their_change_is_sent_is_never_told_again(
    db: Engine, database_url: str, standin: TrayStandin, tmp_path: Path
) -> None:
    feed = Feed(db)
    feed.audience("aud_1", "Buyers")
    # More members than one worker ever holds claimed at concurrency 1, whatever the database.
    others = [f"m{n:02d}" for n in range(1, chunk_size(1) + 2)]
    feed.add("aud_1", *others)
    # Last by insertion and by id, so planned (and, one at a time, claimed and sent) last.
    feed.add("aud_1", DELETED, email="deleted@example.com")
    # One request at a time, the first ones answered after 0.25 s; the fourth identify is
    # answered only once the delete has arrived, so the run is certainly still sending when
    # delete-user runs and has certainly not claimed the deleted user's change yet.
    delete_arrived = threading.Event()
    identifies_seen = itertools.count(1)

    def respond(_path: str, body: bytes) -> Reply:
        message = json.loads(body)
        if message["type"] == "delete":
            delete_arrived.set()
        elif (seen := next(identifies_seen)) == 4:
            delete_arrived.wait(timeout=PATIENCE_SECONDS)
        elif seen > 4:
            return Reply()
        return Reply(delay_seconds=0.25)

    standin.respond("/wf", respond)
    settings = one_at_a_time(tmp_path, database_url, standin)
    log = tmp_path / "sync.log"
    sync = start(settings, "sync", log=log)
    try:
        wait_until(
            lambda: len(standin.received("/wf")) >= 3, PATIENCE_SECONDS, "the first identifies"
        )
        assert not about(standin.received("/wf"), DELETED), "planned last, but sent early"
        syncer(settings, "delete-user", DELETED, expect=0)
    finally:
        code, output = finish(sync, log)

    assert code == 0, output
    received = standin.received("/wf")
    deletes = [item for item in received if is_delete(item)]
    assert [user_of(item) for item in deletes] == [DELETED]
    after_delete = received[received.index(deletes[0]) + 1 :]
    assert not about(after_delete, DELETED), "the deleted user was told about after the delete"
    assert not [item for item in about(received, DELETED) if is_identify(item)]
    assert user_told(standin, "/wf", "aud_1", True) == set(others)
    told = count(db, "select count(*) from syncer_state where user_id = :u", u=DELETED)
    assert told == 0, "the run wrote back what it told the URL about a deleted user"

    # Upstream drops the user at last: nobody is told anything about them.
    feed.remove("aud_1", DELETED)
    standin.clear()
    syncer(settings, "sync", expect=0)
    assert not about(standin.received(), DELETED)


def test_delete_of_a_user_whose_change_is_in_flight_arrives_after_it(
    db: Engine, database_url: str, standin: TrayStandin, tmp_path: Path
) -> None:
    feed = Feed(db)
    feed.audience("aud_1", "Buyers")
    feed.add("aud_1", "m01", "m02")
    feed.add("aud_1", DELETED, email="deleted@example.com")
    feed.add("aud_1", "m03", "m04")
    change_in_flight = threading.Event()  # the deleted user's identify has arrived
    released = threading.Event()  # ... and may be answered now
    delete_arrived = threading.Event()

    def respond(_path: str, body: bytes) -> Reply:
        message = json.loads(body)
        if message["type"] == "delete":
            delete_arrived.set()
        elif message["userId"] == DELETED and not change_in_flight.is_set():
            change_in_flight.set()
            released.wait(timeout=PATIENCE_SECONDS)  # in flight until the test lets it go
        return Reply(delay_seconds=0.25)

    standin.respond("/wf", respond)
    settings = one_at_a_time(tmp_path, database_url, standin)
    sync_log, delete_log = tmp_path / "sync.log", tmp_path / "delete.log"
    sync = start(settings, "sync", log=sync_log)
    deleting = None
    try:
        wait_until(change_in_flight.is_set, PATIENCE_SECONDS, "the change about the user")
        deleting = start(settings, "delete-user", DELETED, log=delete_log)
        wait_until(
            lambda: count(
                db, "select count(*) from syncer_deleted_users where user_id = :u", u=DELETED
            ),
            PATIENCE_SECONDS,
            "delete-user to record the deletion",
        )
        # A delete sent without waiting would arrive within this window; the rebuilt protocol
        # never sends it while the change is in flight, whatever the window.
        delete_arrived.wait(timeout=1.5)
        released.set()
        delete_code, delete_output = finish(deleting, delete_log)
    finally:
        released.set()
        if deleting is not None:
            stop_child(deleting)
        sync_code, sync_output = finish(sync, sync_log)

    assert delete_code == 0, delete_output
    assert sync_code == 0, sync_output
    received = about(standin.received("/wf"), DELETED)
    assert [item.message["type"] for item in received] == ["identify", "delete"], (
        "the delete must arrive after the change that was in flight, and nothing after it"
    )
    told = count(db, "select count(*) from syncer_state where user_id = :u", u=DELETED)
    assert told == 0, "the run wrote back what it told the URL about a deleted user"

    feed.remove("aud_1", DELETED)
    standin.clear()
    syncer(settings, "sync", expect=0)
    assert not about(standin.received(), DELETED)


@POSTGRES_ONLY
def test_pair_planned_while_another_is_sent_checks_deletions_when_claimed(
    db: Engine, database_url: str, standin: TrayStandin, tmp_path: Path
) -> None:
    # On PostgreSQL the next pair is planned while this one is sent. Planning early decides
    # nothing: a user deleted between that plan and the claim is never told.
    feed = Feed(db)
    feed.audience("aud_1", "Buyers")
    feed.add("aud_1", "b1", "b2")
    feed.audience("aud_2", "Sellers")
    feed.add("aud_2", "s1", DELETED)
    first_in_flight = threading.Event()
    released = threading.Event()

    def respond(_path: str, body: bytes) -> Reply:
        message = json.loads(body)
        if is_identify_message(message) and not first_in_flight.is_set():
            first_in_flight.set()
            released.wait(timeout=PATIENCE_SECONDS)  # aud_1's first change stays in flight
        return Reply()

    standin.respond("/wf", respond)
    settings = one_at_a_time(tmp_path, database_url, standin)
    log = tmp_path / "sync.log"
    sync = start(settings, "sync", log=log)
    try:
        wait_until(first_in_flight.is_set, PATIENCE_SECONDS, "aud_1's first change")
        queued = "select count(*) from syncer_outbox where audience_id = 'aud_2'"
        wait_until(lambda: count(db, queued) == 2, PATIENCE_SECONDS, "aud_2 planned meanwhile")
        syncer(settings, "delete-user", DELETED, expect=0)
    finally:
        released.set()
        code, output = finish(sync, log)

    assert code == 0, output
    received = standin.received("/wf")
    assert [user_of(item) for item in received if is_delete(item)] == [DELETED]
    assert not [item for item in about(received, DELETED) if is_identify(item)]
    assert user_told(standin, "/wf", "aud_1", True) == {"b1", "b2"}
    assert user_told(standin, "/wf", "aud_2", True) == {"s1"}
    told = count(db, "select count(*) from syncer_state where user_id = :u", u=DELETED)
    assert told == 0


# --- 2. a change processed but never answered ---

AMBIGUOUS = "u-ambiguous"


@pytest.mark.parametrize("reversed_change", ["entry", "exit"])
def test_change_processed_but_never_answered_is_compensated_when_upstream_reverses_it(
    reversed_change: str, db: Engine, database_url: str, standin: TrayStandin, tmp_path: Path
) -> None:
    feed = Feed(db)
    feed.audience("aud_1", "Buyers")
    feed.add("aud_1", "bystander")
    feed.add("aud_1", AMBIGUOUS, email="ambiguous@example.com")
    url = standin.url("/wf")
    settings = write_settings(
        tmp_path / "settings.toml",
        database_url,
        [url],
        delivery={"timeout_seconds": 1, "max_attempts": 2},
    )
    if reversed_change == "exit":
        assert sync_in_process(database_url, [url]).fully_delivered  # told true, for certain
        feed.remove("aud_1", AMBIGUOUS)
    standin.clear()
    slow = threading.Event()
    slow.set()

    def respond(_path: str, body: bytes) -> Reply:
        if slow.is_set() and json.loads(body).get("userId") == AMBIGUOUS:
            # The workflow acts on the request, but answers after the sender gave up.
            return Reply(delay_seconds=2.5)
        return Reply()

    standin.respond("/wf", respond)
    syncer(settings, "sync", expect=1)
    sent_value = reversed_change == "entry"
    wait_until(
        lambda: len(about(standin.received("/wf"), AMBIGUOUS)) >= 2,
        PATIENCE_SECONDS,
        "both unanswered attempts to arrive",
    )
    ambiguous = about(standin.received("/wf"), AMBIGUOUS)
    assert {trait_of(item) for item in ambiguous} == {sent_value}
    assert len({item.message["messageId"] for item in ambiguous}) == 1

    # Upstream reverses the change; the URL answers in time again.
    slow.clear()
    if reversed_change == "entry":
        feed.remove("aud_1", AMBIGUOUS)
    else:
        feed.add("aud_1", AMBIGUOUS, email="ambiguous@example.com")
    before = len(standin.received("/wf"))
    syncer(settings, "sync", expect=0)

    compensating = about(standin.received("/wf")[before:], AMBIGUOUS)
    assert [trait_of(item) for item in compensating] == [not sent_value], (
        "the URL may hold the unanswered value: the reversal must be sent"
    )
    assert compensating[0].status == 200
    assert compensating[0].message["messageId"] != ambiguous[0].message["messageId"]
    assert timestamp_of(compensating[0]) > timestamp_of(ambiguous[-1])
    assert compensating[0].message["traits"].get("email") == "ambiguous@example.com"


# --- 3. the mass-exit guard races a reload ---

GROWING, RELOADED = "aud_a", "aud_b"  # synced in id order: the reload lands while A is sent
RELOADED_KEY = "bulk_buyers"


@pytest.mark.parametrize("url_count", [1, 2])
def test_mass_exit_guard_holds_exits_of_a_reload_that_lands_during_the_run(
    url_count: int, db: Engine, database_url: str, standin: TrayStandin, tmp_path: Path
) -> None:
    feed = Feed(db)
    feed.audience(GROWING, "Growing")
    feed.audience(RELOADED, "Bulk Buyers")
    reloaded_members = {f"b{n:02d}" for n in range(30)}
    feed.add(RELOADED, *sorted(reloaded_members))
    paths = ["/one", "/two"][:url_count]
    urls = [standin.url(path) for path in paths]
    assert sync_in_process(database_url, urls).fully_delivered  # B told everywhere
    standin.clear()
    feed.add(GROWING, *(f"a{n:02d}" for n in range(20)))
    # B has work too when the run starts (a run plans only the pairs that have some), so it is
    # planned after A is sent: after the reload.
    feed.add(RELOADED, "b_new")
    # Each URL answers A's requests after 0.15 s, and from its fourth request on only once B
    # has been reloaded: the reload certainly lands while the run is still sending A.
    reloaded = threading.Event()
    arrivals = {path: itertools.count(1) for path in paths}

    def respond(path: str, _body: bytes) -> Reply:
        if next(arrivals[path]) > 3:
            reloaded.wait(timeout=PATIENCE_SECONDS)
        return Reply(delay_seconds=0.15)

    for path in paths:
        standin.respond(path, respond)
    settings = write_settings(
        tmp_path / "settings.toml",
        database_url,
        urls,
        delivery={"concurrency": 2, "timeout_seconds": 20},
        guard={"max_exit_share": 0.5, "min_audience_size": 20},
    )

    log = tmp_path / "sync.log"
    sync = start(settings, "sync", log=log)
    try:
        for path in paths:
            wait_until(
                partial(received_at_least, standin, path, 3),
                PATIENCE_SECONDS,
                f"the first requests for {GROWING} at {path}",
            )
        feed.empty(RELOADED)  # a broken reload, in one transaction, while A is being sent
    finally:
        reloaded.set()
        code, output = finish(sync, log)

    assert code == 1, output
    for url, path in zip(urls, paths, strict=True):
        assert f"HELD {url} {RELOADED_KEY}" in output, output
        assert user_told(standin, path, GROWING, True) == {f"a{n:02d}" for n in range(20)}
        assert not [i for i in standin.received(path) if audience_of(i) == RELOADED], output
    shown = {record["id"]: record for record in inspect(settings, "audiences")}
    assert shown[RELOADED]["held_for"] == urls
    assert shown[GROWING]["held_for"] == []

    if url_count == 2:
        # Released for the first URL only: the second keeps holding.
        syncer(settings, "approve", RELOADED_KEY, "--url", urls[0], expect=0)
        syncer(settings, "sync", expect=1)
        assert user_told(standin, paths[0], RELOADED, False) == reloaded_members
        assert not [i for i in standin.received(paths[1]) if audience_of(i) == RELOADED]
        shown = {record["id"]: record for record in inspect(settings, "audiences")}
        assert shown[RELOADED]["held_for"] == [urls[1]]

    syncer(settings, "approve", RELOADED_KEY, expect=0)
    syncer(settings, "sync", expect=0)
    for path in paths:
        assert user_told(standin, path, RELOADED, False) == reloaded_members
        exits = [i for i in standin.received(path) if audience_of(i) == RELOADED]
        assert len(exits) == len(reloaded_members)  # each exit sent once


# --- 4. a URL refusing everything ---


@pytest.mark.parametrize(
    ("status", "database_url"),
    [
        # Every refusing status is classified alike (tests/unit/test_outcomes.py); end to end,
        # one on each database.
        (401, "sqlite"),
        pytest.param(404, "postgresql", marks=pytest.mark.postgres),
    ],
    indirect=["database_url"],
)
def test_url_refusing_everything_is_given_up_for_the_run_and_nothing_is_rejected(
    status: int, db: Engine, database_url: str, standin: TrayStandin, tmp_path: Path
) -> None:
    feed = Feed(db)
    feed.audience("aud_1", "Buyers")
    members = {f"m{n:02d}" for n in range(10)}
    feed.add("aud_1", *sorted(members))
    standin.respond("/wf", Reply(status=status, body=b'{"error":"no"}'))
    settings = write_settings(
        tmp_path / "settings.toml",
        database_url,
        [standin.url("/wf")],
        delivery={"concurrency": 1, "max_rejections": 3},
    )

    refused = syncer(settings, "sync", expect=1)

    assert len(standin.received("/wf")) == 2, "two refusals in a row stop the URL for the run"
    assert f"URL refused: {status}" in refused.stdout, show(refused)
    failures, shown, runs = inspect_all(settings, ("failures",), ("audiences",), ("runs",))
    assert failures and {f["state"] for f in failures} == {"retrying"}, failures
    assert shown[0]["urls"][0]["url_refused"] is not None, shown
    assert str(status) in shown[0]["urls"][0]["url_refused"]
    assert runs[0]["status"] == "partial", runs
    statuses = query(db, "select status, count(*) from syncer_outbox group by status")
    assert statuses == [("pending", 10)]

    for _ in range(3):
        before = len(standin.received("/wf"))
        syncer(settings, "sync", expect=1)
        assert len(standin.received("/wf")) - before <= 2
    statuses = query(db, "select status, count(*) from syncer_outbox group by status")
    assert statuses == [("pending", 10)], "a refusing URL must not get changes parked"

    standin.respond("/wf", Reply())
    syncer(settings, "sync", expect=0)
    assert user_told(standin, "/wf", "aud_1", True) == members
    assert count(db, "select count(*) from syncer_outbox") == 0
    shown = inspect(settings, "audiences")
    assert shown[0]["urls"][0]["url_refused"] is None, shown


# --- 5. a bad row fixed upstream ---


def test_row_that_cannot_be_sent_is_not_queued_and_is_delivered_once_fixed(
    db: Engine, database_url: str, standin: TrayStandin, tmp_path: Path
) -> None:
    feed = Feed(db)
    feed.audience("aud_1", "Buyers")
    feed.add("aud_1", "good1", "good2", email="good@example.com")
    feed.add("aud_1", "broken", email="bro\x01ken@example.com")
    settings = write_settings(tmp_path / "settings.toml", database_url, [standin.url("/wf")])

    first = syncer(settings, "sync", expect=0)

    assert user_told(standin, "/wf", "aud_1", True) == {"good1", "good2"}
    queued = count(db, "select count(*) from syncer_outbox where user_id = 'broken'")
    assert queued == 0, f"a row that cannot be sent must not be queued (nor parked)\n{show(first)}"
    assert "cannot be sent" in first.stdout and "broken" in first.stdout, show(first)

    feed.set_email("aud_1", "broken", "fixed@example.com")
    standin.clear()
    second = syncer(settings, "sync", expect=0)

    sent = [item.message for item in standin.received("/wf")]
    assert [(m["userId"], m["traits"].get("email")) for m in sent] == [
        ("broken", "fixed@example.com")
    ], show(second)
    assert "cannot be sent" not in second.stdout, show(second)


# --- 6. a cosmetic URL edit, and a removed URL that is still owed deletes ---


def test_url_edit_keeps_its_debts_and_a_removed_url_is_reported_until_forgotten(
    db: Engine, database_url: str, standin: TrayStandin, tmp_path: Path
) -> None:
    feed = Feed(db)
    feed.audience("aud_1", "Buyers")
    feed.add("aud_1", "leaver", "deleted", "stayer")
    path = tmp_path / "settings.toml"
    plain, slashed, other = standin.url("/wf"), standin.url("/wf/"), standin.url("/other")
    assert sync_in_process(database_url, [plain]).fully_delivered
    standin.respond("/wf", Reply(status=503))
    settings = write_settings(path, database_url, [plain])
    feed.remove("aud_1", "leaver")
    assert not sync_in_process(database_url, [plain]).fully_delivered  # the exit is owed
    syncer(settings, "delete-user", "deleted", expect=1)
    failed = {
        (item.message["type"], user_of(item)): item.message["messageId"]
        for item in standin.received("/wf")
        if item.status == 503
    }
    assert set(failed) == {("identify", "leaver"), ("delete", "deleted")}

    # The same workflow, written with a trailing slash, and accepting again.
    write_settings(path, database_url, [slashed])
    syncer(settings, "sync", expect=0)

    delivered = {
        (item.message["type"], user_of(item)): item.message["messageId"]
        for item in standin.received("/wf/")
    }
    assert delivered == failed, "the edited URL must get its debts, same messageIds, and no more"

    # It owes one more delete when it is removed from the settings.
    standin.respond("/wf/", Reply(status=503))
    syncer(settings, "delete-user", "stayer", expect=1)
    feed.add("aud_1", "newcomer")
    write_settings(path, database_url, [other])
    for _ in range(2):
        run = syncer(settings, "sync", expect=0)
        assert slashed in run.stdout and "forget-url" in run.stdout, show(run)
    assert user_told(standin, "/other", "aud_1", True) == {"newcomer"}
    failures = inspect(settings, "failures")
    assert [(f["type"], f["user_id"]) for f in failures if slashed in f["url"]] == [
        ("delete", "stayer")
    ], failures

    unconfirmed, configured = call_each(
        lambda: cli("forget-url", slashed, settings=settings),
        lambda: cli("forget-url", other, "--yes", settings=settings),
    )
    assert unconfirmed.returncode == 2, show(unconfirmed)
    assert configured.returncode == 2, show(configured)
    logged = {row["destination_id"] for row in db_rows(database_url, "syncer_change_log")}
    syncer(settings, "forget-url", slashed, "--yes", expect=0)
    # Its history goes with it (another URL may be given its id later); the others' stays.
    kept = {row["destination_id"] for row in db_rows(database_url, "syncer_change_log")}
    assert len(logged) == 2 and len(kept) == 1 and kept < logged
    after = syncer(settings, "sync", expect=0)
    assert "/wf" not in after.stdout and "forget-url" not in after.stdout, show(after)


# --- 7. database URLs ---


@POSTGRES_ONLY
def test_postgresql_url_naming_the_psycopg2_driver_works(
    database_url: str, standin: TrayStandin, tmp_path: Path
) -> None:
    # The fixture's URL names psycopg (3); an operator's may name psycopg2, not installed.
    psycopg2_url = database_url.replace("postgresql+psycopg://", "postgresql+psycopg2://", 1)
    assert psycopg2_url.startswith("postgresql+psycopg2://")
    settings = write_settings(tmp_path / "settings.toml", psycopg2_url, [standin.url("/wf")])
    syncer(settings, "migrate", expect=0)
    engine = create_database_engine(database_url)
    try:
        feed = Feed(engine)
        feed.audience("aud_1", "Buyers")
        feed.add("aud_1", "u1")
        syncer(settings, "sync", expect=0)
    finally:
        engine.dispose()
    assert user_told(standin, "/wf", "aud_1", True) == {"u1"}


BAD_DATABASE_URLS = [
    "postgresql://u@host:abc/db",  # a port that is not a number
    "mysql://u@host/db",  # a database the syncer does not support
    "postgresql+pg8000://u@host/db",  # a PostgreSQL driver that is not installed
]


def test_malformed_database_url_is_a_settings_error_naming_where_it_came_from(
    tmp_path: Path,
) -> None:
    good = f"sqlite:///{tmp_path / 'syncer.db'}"
    runs: list[tuple[str, str, Callable[[], Result]]] = []
    for number, url in enumerate(BAD_DATABASE_URLS):
        in_file = write_settings(tmp_path / f"file{number}.toml", url, ["http://127.0.0.1:9/wf"])
        in_env = write_settings(tmp_path / f"env{number}.toml", good, ["http://127.0.0.1:9/wf"])
        runs.append((url, "database.url", partial(cli, "migrate", settings=in_file)))
        from_env = partial(cli, "migrate", settings=in_env, env={"SYNCER_DATABASE_URL": url})
        runs.append((url, "SYNCER_DATABASE_URL", from_env))
    results = call_each(*(run for _, _, run in runs))
    wrong = [
        f"{url} via {named}\n{show(result)}"
        for (url, named, _), result in zip(runs, results, strict=True)
        if result.returncode != 2
        or len(result.stderr.strip().splitlines()) != 1
        or named not in result.stderr
        or "database.url" not in result.stderr
    ]
    assert not wrong, "\n".join(wrong)
    assert not (tmp_path / "syncer.db").exists()


# --- 8. a lease too short for the request timeout ---


@pytest.mark.parametrize(
    ("lease_seconds", "timeout_seconds", "accepted"),
    [(5, 10, False), (16, 10, False), (17, 10, True)],  # the bound: (10 + 1) * 3 / 2 = 16.5
)
def test_lease_too_short_for_the_request_timeout_is_a_settings_error(
    lease_seconds: float, timeout_seconds: float, accepted: bool, tmp_path: Path
) -> None:
    settings = write_settings(
        tmp_path / "settings.toml",
        f"sqlite:///{tmp_path / 'syncer.db'}",
        ["http://127.0.0.1:9/wf"],
        delivery={"lease_seconds": lease_seconds, "timeout_seconds": timeout_seconds},
    )
    result = cli("migrate", settings=settings)
    if accepted:
        assert result.returncode == 0, show(result)
        return
    assert result.returncode == 2, show(result)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "delivery.lease_seconds" in lines[0], show(result)
    assert not (tmp_path / "syncer.db").exists()


# --- 9. a dry run ---

DRY_RUN_LINE = re.compile(r"^  identify '([^']*)' (\w+)=(true|false)$", re.MULTILINE)


def syncer_tables(engine: Engine) -> dict[str, list[str]]:
    """Every row of every syncer_* table, sorted: what a dry run must leave as it was."""
    metadata = MetaData()
    metadata.reflect(engine)
    with engine.connect() as connection:
        return {
            name: sorted(repr(tuple(row)) for row in connection.execute(select(table)))
            for name, table in metadata.tables.items()
            if name.startswith("syncer_")
        }


def test_dry_run_respects_what_the_real_run_would_and_writes_nothing(
    db: Engine, database_url: str, standin: TrayStandin, tmp_path: Path
) -> None:
    feed = Feed(db)
    feed.audience("aud_1", "Buyers")
    feed.audience("aud_2", "Loyal Customers")
    feed.add("aud_1", "kept", "deleted", "parked")
    loyal = [f"l{n:02d}" for n in range(30)]
    feed.add("aud_2", *loyal)

    def refuse_parked(_path: str, body: bytes) -> Reply:
        refused = json.loads(body).get("userId") == "parked"
        return Reply(status=400 if refused else 200)

    standin.respond("/wf", refuse_parked)
    settings = write_settings(
        tmp_path / "settings.toml",
        database_url,
        [standin.url("/wf")],
        delivery={"max_rejections": 1},
        guard={"max_exit_share": 0.5, "min_audience_size": 20},
    )
    syncer(settings, "sync", expect=0)  # everyone told, but `parked`, refused once: parked
    syncer(settings, "delete-user", "deleted", expect=0)  # still listed upstream
    assert count(db, "select count(*) from syncer_outbox where status = 'parked'") == 1
    feed.remove("aud_2", *loyal[:20])  # 20 of 30 would exit: the guard holds aud_2
    feed.add("aud_1", "newcomer")
    feed.add("aud_1", "broken", email="bro\x01ken@example.com")
    standin.clear()
    before = syncer_tables(db)

    dry = syncer(settings, "sync", "--dry-run", expect=0)

    assert syncer_tables(db) == before, "a dry run must write nothing"
    assert standin.received() == []
    held = [line for line in dry.stdout.splitlines() if "would HOLD" in line]
    assert len(held) == 1 and "loyal_customers" in held[0], show(dry)
    would_send = DRY_RUN_LINE.findall(dry.stdout)
    for unsendable in ("deleted", "broken", "parked", *loyal):
        assert unsendable not in {user for user, _, _ in would_send}, f"{unsendable}\n{show(dry)}"
    assert would_send == [("newcomer", "buyers", "true")], show(dry)

    # The real run sends exactly what the dry run listed, and holds what it said it would.
    real = syncer(settings, "sync", expect=1)
    assert "HELD" in real.stdout and "loyal_customers" in real.stdout, show(real)
    sent = [(user_of(i), audience_of(i), trait_of(i)) for i in standin.received("/wf")]
    assert sent == [("newcomer", "aud_1", True)], show(real)
