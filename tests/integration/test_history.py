"""History: the change log, sizes per run, the run summary's monitor counts, a URL's failed
runs in a row, and `explain`, over real HTTP to the local stand-in, on SQLite and PostgreSQL.

The log's entries are checked against what the stand-in received (messageIds, values); a
delete-user removes the user's history; old runs' entries are pruned.
"""

from __future__ import annotations

from collections import Counter
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import select, update

from syncer.core.states import LogOutcome
from syncer.store import Store
from syncer.store.inspection import Inspection
from syncer.store.schema import change_log, destinations, runs, sizes
from syncer.store.sql import utcnow
from syncer.sync import SyncEngine, SyncOptions
from syncer.testing.tray_standin import Reply, TrayStandin
from tests.conftest import Upstream, make_settings, run_sync
from tests.integration.cli_helpers import cli, json_out, show, write_settings

AUDIENCE, KEY = "aud_vip", "vip_customers"


def log_rows(store: Store, **where: Any) -> list[Any]:
    statement = select(change_log).order_by(change_log.c.id)
    for name, value in where.items():
        statement = statement.where(change_log.c[name] == value)
    with store.engine.connect() as connection:
        return list(connection.execute(statement).all())


def test_every_delivery_is_logged_with_its_run_and_message_id(
    store: Store, upstream: Upstream, standin: TrayStandin
) -> None:
    upstream.add_audience(AUDIENCE, "VIP Customers")
    upstream.add(AUDIENCE, "u1", "u2", "u3")
    url = standin.url("/wf")
    first = run_sync(store, [url])
    upstream.remove(AUDIENCE, "u2")
    second = run_sync(store, [url])

    rows = log_rows(store)
    # In the order the URL's answers came in: within a run, any order.
    assert sorted((row.run_id, row.user_id, row.value) for row in rows) == [
        (first.run_id, "u1", "true"),
        (first.run_id, "u2", "true"),
        (first.run_id, "u3", "true"),
        (second.run_id, "u2", "false"),
    ]
    assert {row.outcome for row in rows} == {LogOutcome.DELIVERED.value}
    assert {row.attempts for row in rows} == {1}
    inspection = Inspection(store)
    logged_ids = {
        (event["message_id"], event["value"])
        for user in ("u1", "u2", "u3")
        for event in inspection.explain(user, [url])["events"]
        if event["event"] == "attempt"
    }
    received = {(r.message["messageId"], r.message["traits"][KEY]) for r in standin.received("/wf")}
    assert logged_ids == received


def test_failures_are_logged_with_status_and_parking(
    store: Store, upstream: Upstream, standin: TrayStandin
) -> None:
    upstream.add_audience(AUDIENCE, "VIP Customers")
    upstream.add(AUDIENCE, "bad", "slow")
    url = standin.url("/wf")
    standin.respond(
        "/wf",
        lambda _path, body: Reply(status=400 if b'"bad"' in body else 503),
    )
    for _ in range(2):
        run_sync(store, [url], max_attempts=1, max_rejections=2)

    outcomes = Counter((row.user_id, row.outcome, row.http_status) for row in log_rows(store))
    assert outcomes[("bad", LogOutcome.REJECTED.value, 400)] == 1
    assert outcomes[("bad", LogOutcome.PARKED.value, 400)] == 1
    assert outcomes[("slow", LogOutcome.RETRYABLE.value, 503)] >= 1
    assert all(row.outcome != LogOutcome.DELIVERED.value for row in log_rows(store))

    standin.respond("/wf", Reply(status=200))
    run_sync(store, [url])
    assert [row.outcome for row in log_rows(store, user_id="slow")][-1] == "delivered"
    timeline = Inspection(store).explain("slow", [url])["events"]
    assert timeline[0]["event"] == "detected"
    assert [event.get("http_status") for event in timeline if event["event"] == "attempt"][
        -1
    ] is None
    parked = Inspection(store).explain("bad", [url])["events"]
    assert parked[-1]["event"] == "pending" and parked[-1]["outcome"] == "parked"


def test_a_change_sent_both_ways_logs_each_call_accepted(
    store: Store, upstream: Upstream, standin: TrayStandin
) -> None:
    upstream.add_audience(AUDIENCE, "VIP Customers")
    upstream.add(AUDIENCE, "u1")
    url = standin.url("/wf")
    standin.respond(
        "/wf", lambda _path, body: Reply(status=503 if b'"type":"track"' in body else 200)
    )
    run_sync(store, [{"url": url, "send": "both"}], max_attempts=1)
    standin.respond("/wf", Reply(status=200))
    run_sync(store, [{"url": url, "send": "both"}])

    rows = log_rows(store, user_id="u1")
    assert [(row.outcome, row.call, row.part) for row in rows] == [
        ("delivered", "both", "identify"),
        ("retryable", "both", "track"),
        ("delivered", "both", "track"),
    ]
    events = Inspection(store).explain("u1", [url])["events"]
    sent = [(e["call"], e["outcome"], e["message_id"]) for e in events if e["event"] == "attempt"]
    received = {(r.message["type"], r.message["messageId"]) for r in standin.received("/wf")}
    assert {(call, mid) for call, outcome, mid in sent if outcome == "delivered"} <= received
    assert len({mid for _, _, mid in sent}) == 2  # the identify's and the track's own


def test_delete_user_forgets_their_history_and_explain_shows_only_the_deletion(
    store: Store, upstream: Upstream, standin: TrayStandin
) -> None:
    upstream.add_audience(AUDIENCE, "VIP Customers")
    upstream.add(AUDIENCE, "u1", "u2")
    url = standin.url("/wf")
    settings = make_settings(str(store.engine.url.render_as_string(False)), [url])
    engine = SyncEngine(settings, store)
    try:
        engine.run(SyncOptions())
        assert log_rows(store, user_id="u1")
        engine.delete_users(["u1"])
    finally:
        engine.close()

    assert log_rows(store, user_id="u1") == []
    assert len(log_rows(store, user_id="u2")) == 1
    record = Inspection(store).explain("u1", [url])
    assert record["deleted"]
    assert [event["event"] for event in record["events"]] == [
        "deletion_requested",
        "deletion_delivered",
    ]
    assert record["events"][1]["url"] == url


def test_old_runs_history_is_pruned_and_sizes_are_recorded_per_run(
    store: Store, upstream: Upstream, standin: TrayStandin
) -> None:
    upstream.add_audience(AUDIENCE, "VIP Customers")
    upstream.add(AUDIENCE, "u1", "u2", "u3")
    upstream.add_trait("tr_ltv", "LTV", key="ltv")
    upstream.set_values("tr_ltv", {"u1": "10", "u2": None})
    url = standin.url("/wf")
    first = run_sync(store, [url])
    upstream.remove(AUDIENCE, "u3")
    second = run_sync(store, [url])

    with store.engine.connect() as connection:
        measured = {
            (row.run_id, row.kind, row.audience_id): row.members
            for row in connection.execute(select(sizes))
        }
    assert measured == {
        (first.run_id, "audience", AUDIENCE): 3,
        (first.run_id, "trait", "tr_ltv"): 1,
        (second.run_id, "audience", AUDIENCE): 2,
        (second.run_id, "trait", "tr_ltv"): 1,
    }
    # The first run started 100 days ago: the next run forgets what it wrote.
    with store.engine.begin() as connection:
        connection.execute(
            update(runs)
            .where(runs.c.id == first.run_id)
            .values(started_at=utcnow() - timedelta(days=100))
        )
    third = run_sync(store, [url])
    assert {row.run_id for row in log_rows(store)} == {second.run_id}
    with store.engine.connect() as connection:
        kept = {row.run_id for row in connection.execute(select(sizes))}
    assert kept == {second.run_id, third.run_id}


def test_the_run_summary_counts_and_a_urls_failed_runs_in_a_row(
    store: Store, upstream: Upstream, standin: TrayStandin
) -> None:
    upstream.add_audience(AUDIENCE, "VIP Customers")
    upstream.add(AUDIENCE, "u1", "u2")
    url = standin.url("/wf")
    standin.respond("/wf", Reply(status=503))

    def failed_runs() -> tuple[int, datetime | None]:
        with store.engine.connect() as connection:
            row = connection.execute(
                select(destinations.c.failed_runs, destinations.c.last_success_at)
            ).one()
        return row.failed_runs, row.last_success_at

    for expected in (1, 2, 3):
        report = run_sync(store, [url], max_attempts=1)
        assert report.down_urls == [url]
        assert failed_runs() == (expected, None)
    with store.engine.connect() as connection:
        last = connection.execute(select(runs).order_by(runs.c.id.desc())).first()
    assert last is not None
    assert (last.status, last.urls_down, last.pending, last.held) == ("partial", 1, 2, 0)

    standin.respond("/wf", Reply(status=200))
    assert run_sync(store, [url]).fully_delivered
    count, success = failed_runs()
    assert count == 0 and success is not None
    # A run with nothing to send leaves the count and the last success as they were.
    run_sync(store, [url])
    assert failed_runs() == (0, success)


def test_the_explain_command(
    tmp_path: Path, database_url: str, upstream: Upstream, standin: TrayStandin
) -> None:
    upstream.add_audience(AUDIENCE, "VIP Customers", key=KEY)
    upstream.add(AUDIENCE, "u1")
    url = standin.url("/wf")
    settings = write_settings(tmp_path / "settings.toml", database_url, [url])
    assert cli("sync", settings=settings).returncode == 0
    upstream.remove(AUDIENCE, "u1")
    standin.respond("/wf", Reply(status=503))
    assert cli("sync", settings=settings).returncode == 1

    table = cli("explain", "u1", settings=settings)
    assert table.returncode == 0, show(table)
    lines = table.stdout.splitlines()
    assert "in audiences now: none" in lines
    assert any("change detected" in line and " yes " in line for line in lines), show(table)
    assert any("sent" in line and "delivered" in line for line in lines), show(table)
    assert any("sent" in line and "retryable 503" in line for line in lines), show(table)
    assert any("queued" in line and "pending 503" in line for line in lines), show(table)
    record = json_out(cli("explain", "u1", "--format", "json", settings=settings))
    assert [event["event"] for event in record["events"]] == [
        "detected",
        "attempt",
        "detected",
        "attempt",
        "pending",
    ]
    assert record["events"][1]["run_id"] == 1 and record["events"][3]["run_id"] == 2
    assert cli("explain", "nobody", settings=settings).stdout.splitlines()[-1] == (
        "nothing was sent about this user (within the history kept)"
    )


def test_a_delivery_that_took_retries_is_logged_with_its_attempts(
    store: Store, upstream: Upstream, standin: TrayStandin
) -> None:
    upstream.add_audience(AUDIENCE, "VIP Customers")
    upstream.add(AUDIENCE, "u1", "u2", "u3")
    url = standin.url("/wf")
    seen: Counter[bytes] = Counter()

    def second_time_lucky(_path: str, body: bytes) -> Reply:
        seen[body] += 1
        return Reply(status=200 if b'"u2"' not in body or seen[body] > 2 else 503)

    standin.respond("/wf", second_time_lucky)
    assert run_sync(store, [url], max_attempts=4).fully_delivered
    assert sorted((row.user_id, row.attempts) for row in log_rows(store)) == [
        ("u1", 1),
        ("u2", 3),
        ("u3", 1),
    ]
