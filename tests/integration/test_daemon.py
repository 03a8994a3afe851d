"""``syncer daemon`` as a real child process: schedule, logs, signals, and a broken database.

The daemon runs with ``[schedule] interval = "1s"`` against a real database and the local Tray
stand-in; the tests change memberships the way upstream jobs do and watch what arrives.
"""

from __future__ import annotations

import json
import re
import signal
import subprocess
import time
from collections import Counter
from pathlib import Path
from typing import Any

from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url

from syncer.testing.tray_standin import Reply, TrayStandin
from tests.conftest import Upstream, sent_values
from tests.integration.cli_helpers import (
    cli,
    cli_command,
    cli_env,
    json_out,
    running_daemon,
    show,
    sqlite_upstream,
    wait_until,
    write_settings,
)

SUMMARY_KEYS = {
    "audiences",
    "entered",
    "exited",
    "delivered",
    "pending",
    "rejected",
    "duration_seconds",
}
EVERY_SECOND = {"interval": "1s"}


def received_values(standin: TrayStandin, path: str) -> set[tuple[str, Any]]:
    return {(user, value) for user, _key, value in sent_values(standin, path)}


def exercise_daemon(
    signum: int, database_url: str, upstream: Upstream, standin: TrayStandin, tmp_path: Path
) -> None:
    """First sync, a change picked up on schedule, then a stop signal: checked end to end."""
    upstream.add_audience("aud_1", "Buyers")
    upstream.add("aud_1", "u1", "u2")
    settings = write_settings(
        tmp_path / "settings.toml", database_url, [standin.url("/wf")], schedule=EVERY_SECOND
    )
    with running_daemon(settings, tmp_path / "daemon.log") as daemon:
        daemon.wait_for_event("sync_finished")
        assert received_values(standin, "/wf") == {("u1", True), ("u2", True)}
        upstream.add("aud_1", "u3")
        upstream.remove("aud_1", "u1")

        wait_until(
            lambda: {("u3", True), ("u1", False)} <= received_values(standin, "/wf"),
            timeout=15,
            what="the scheduled run to send the change",
        )
        code, seconds = daemon.stop(signum)

        assert code == 0, daemon.stderr()
        assert seconds < 10
        log = daemon.stderr()
    lines = [line for line in log.splitlines() if line.strip()]
    events = [json.loads(line) for line in lines]  # every line is JSON: logging.format = json
    finished = [e for e in events if e["event"] == "sync_finished"]
    for event in finished:
        assert event.keys() >= SUMMARY_KEYS, event
        assert event["trigger"] == "schedule"
    assert any(
        e["event"] == "daemon_stopping" and e.get("signal") == signal.Signals(signum).name
        for e in events
    ), log
    assert "Traceback" not in log
    runs = json_out(cli("inspect", "runs", "--format", "json", settings=settings))
    # One sync_finished line per run, and the runs table agrees with the log.
    assert sorted(e["run_id"] for e in finished) == sorted(r["id"] for r in runs), log
    assert len(runs) >= 2
    assert {r["trigger"] for r in runs} == {"schedule"}
    assert all(r["status"] in ("ok", "stopped") for r in runs), runs
    accepted = [r for r in standin.received("/wf") if 200 <= r.status < 300]
    assert sum(e["delivered"] for e in finished) == len(accepted) == 4
    assert sum(e["entered"] for e in finished) == 3
    assert sum(e["exited"] for e in finished) == 1


def test_daemon_syncs_on_schedule_logs_each_run_and_stops_on_sigterm(
    database_url: str, upstream: Upstream, standin: TrayStandin, tmp_path: Path
) -> None:
    exercise_daemon(signal.SIGTERM, database_url, upstream, standin, tmp_path)


def test_daemon_stops_on_sigint_the_same_way(standin: TrayStandin, tmp_path: Path) -> None:
    with sqlite_upstream(tmp_path / "syncer.db") as (url, upstream):
        exercise_daemon(signal.SIGINT, url, upstream, standin, tmp_path)


CONCURRENCY = 4
BATCH_SIZE = 100
MEMBERS = 1000


def test_sigterm_in_the_middle_of_a_large_sync_exits_promptly_and_loses_nothing(
    standin: TrayStandin, tmp_path: Path
) -> None:
    user_ids = [f"user-{n:05d}" for n in range(MEMBERS)]
    with sqlite_upstream(tmp_path / "syncer.db") as (url, upstream):
        upstream.add_audience("aud_big", "Big Audience")
        upstream.add("aud_big", *user_ids)
    standin.respond("/big", Reply(delay_seconds=0.02))
    delivery = {"concurrency": CONCURRENCY, "batch_size": BATCH_SIZE}
    urls = [standin.url("/big")]
    settings = write_settings(
        tmp_path / "daemon.toml", url, urls, delivery=delivery, schedule={"interval": "1h"}
    )
    with running_daemon(settings, tmp_path / "daemon.log") as daemon:
        wait_until(lambda: len(standin.received("/big")) >= 150, timeout=30, what="150 requests")
        code, seconds = daemon.stop(signal.SIGTERM)

        assert code == 0, daemon.stderr()
        assert seconds < 10, daemon.stderr()
        during_daemon = len(standin.received("/big"))
        assert during_daemon < MEMBERS, "the sync was not interrupted: make it larger or slower"
        log = daemon.stderr()
    assert "Traceback" not in log
    (stopped_run,) = json_out(cli("inspect", "runs", "--format", "json", settings=settings))
    assert stopped_run["status"] in ("stopped", "cancelled"), stopped_run
    assert stopped_run["delivered"] <= during_daemon

    # The rest is delivered by a later manual run, against a URL that now answers at once.
    standin.respond("/big", Reply())
    catch_up = cli(
        "sync",
        settings=write_settings(
            tmp_path / "sync.toml", url, urls, delivery={**delivery, "concurrency": 16}
        ),
    )

    assert catch_up.returncode == 0, show(catch_up)
    received = [r.message for r in standin.received("/big")]
    assert {m["userId"] for m in received} == set(user_ids)
    repeats = Counter(m["messageId"] for m in received)
    duplicates = sum(count - 1 for count in repeats.values())
    # At the signal, at most CONCURRENCY requests are in flight and fewer than CONCURRENCY
    # answers wait to be recorded (the pump records every CONCURRENCY answers); should the grace
    # period run out, both may be sent again on the next run: 2 x CONCURRENCY. The margin of 2
    # is for httpx retrying a request on a kept-alive connection the server side dropped: the
    # stand-in counts a request before it replies, so such a retry shows as a repeat. A batch of
    # answers not recorded (BATCH_SIZE = 100) would far exceed this.
    assert duplicates <= 2 * CONCURRENCY + 2, duplicates
    # Repeats carry the messageId of the first try: one messageId per member, never a new one.
    assert len(repeats) == MEMBERS
    # The later run sent exactly what the stopped run had not recorded as accepted.
    summary = re.search(r"(\d+) delivered", catch_up.stdout)
    assert summary, show(catch_up)
    assert int(summary.group(1)) == MEMBERS - stopped_run["delivered"], show(catch_up)


def _set_postgres_connections(database_url: str, allowed: bool) -> None:
    """Let the database accept connections or not; when not, end every open one."""
    url = make_url(database_url)
    engine = create_engine(url.set(database="postgres"), isolation_level="AUTOCOMMIT")
    try:
        with engine.connect() as connection:
            allow = "true" if allowed else "false"
            connection.execute(text(f'ALTER DATABASE "{url.database}" ALLOW_CONNECTIONS {allow}'))
            if not allowed:
                connection.execute(
                    text(
                        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                        "WHERE datname = :name AND pid <> pg_backend_pid()"
                    ),
                    {"name": url.database},
                )
    finally:
        engine.dispose()


def _break_database(database_url: str) -> None:
    """Make the database unusable under the daemon, which is still running."""
    if database_url.startswith("sqlite"):
        # Garbage over the database and its WAL files, in place: the daemon's open connections
        # see it too (a replaced file would leave them working on the old inode).
        database = Path(database_url.removeprefix("sqlite:///"))
        for path in database.parent.glob(database.name + "*"):
            size = path.stat().st_size
            with path.open("r+b") as handle:
                handle.write(b"not a database! " * (size // 16 + 1))
    else:
        _set_postgres_connections(database_url, allowed=False)


def test_daemon_keeps_running_when_the_database_becomes_unusable(
    database_url: str, upstream: Upstream, standin: TrayStandin, tmp_path: Path
) -> None:
    upstream.add_audience("aud_1", "Buyers")
    upstream.add("aud_1", "u1")
    upstream.engine.dispose()
    settings = write_settings(
        tmp_path / "settings.toml", database_url, [standin.url("/wf")], schedule=EVERY_SECOND
    )
    with running_daemon(settings, tmp_path / "daemon.log") as daemon:
        daemon.wait_for_event("sync_finished")
        assert received_values(standin, "/wf") == {("u1", True)}

        _break_database(database_url)
        try:
            daemon.wait_for_event("sync_failed", timeout=15)

            time.sleep(2.5)  # two intervals and a half

            assert daemon.alive, daemon.stderr()
            assert len(daemon.named("sync_failed")) >= 2, daemon.stderr()
            code, seconds = daemon.stop(signal.SIGTERM)
        finally:
            if not database_url.startswith("sqlite"):
                _set_postgres_connections(database_url, allowed=True)

        assert code == 0, daemon.stderr()
        assert seconds < 10
        failure = daemon.named("sync_failed")[0]
        assert failure["level"] == "error" and failure["error"], failure


def hanging_responder(standin: TrayStandin, path: str) -> list[str]:
    """Make ``path`` answer only after 15 s; return a list that fills as requests arrive."""
    arrived: list[str] = []

    def respond(_path: str, body: bytes) -> Reply:
        arrived.append(json.loads(body)["userId"])
        return Reply(delay_seconds=15)

    standin.respond(path, respond)
    return arrived


def test_sigterm_while_every_request_hangs_still_exits_within_ten_seconds(
    standin: TrayStandin, tmp_path: Path
) -> None:
    """Requests that would take 15 s each: the stop must not wait for them, nor hang."""
    user_ids = [f"user-{n:04d}" for n in range(200)]
    with sqlite_upstream(tmp_path / "syncer.db") as (url, upstream):
        upstream.add_audience("aud_slow", "Slow")
        upstream.add("aud_slow", *user_ids)
    arrived = hanging_responder(standin, "/slow")
    settings = write_settings(
        tmp_path / "daemon.toml",
        url,
        [standin.url("/slow")],
        delivery={"concurrency": 4, "timeout_seconds": 20, "batch_size": 50},
        schedule={"interval": "1h"},
    )
    with running_daemon(settings, tmp_path / "daemon.log") as daemon:
        wait_until(lambda: arrived or None, 30, "a first request")
        code, seconds = daemon.stop(signal.SIGTERM)
        assert code == 0, daemon.stderr()
        assert seconds < 10, daemon.stderr()
    (run,) = json_out(cli("inspect", "runs", "--format", "json", settings=settings))
    assert run["status"] in ("stopped", "cancelled"), run
    assert run["delivered"] == 0
    # Nothing was lost: every member is still owed to the URL.
    standin.respond("/slow", Reply())
    catch_up = cli("sync", settings=settings)
    assert catch_up.returncode == 0, show(catch_up)
    assert {user for user, _key, _value in sent_values(standin, "/slow")} == set(user_ids)


def test_interrupting_a_manual_sync_with_hanging_requests_exits_promptly(
    standin: TrayStandin, tmp_path: Path
) -> None:
    with sqlite_upstream(tmp_path / "syncer.db") as (url, upstream):
        upstream.add_audience("aud_slow", "Slow")
        upstream.add("aud_slow", *(f"user-{n:04d}" for n in range(100)))
    arrived = hanging_responder(standin, "/slow")
    settings = write_settings(
        tmp_path / "sync.toml",
        url,
        [standin.url("/slow")],
        delivery={"concurrency": 4, "timeout_seconds": 20, "batch_size": 50},
    )
    process = subprocess.Popen(
        cli_command("sync", settings=settings),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=cli_env(),
        text=True,
    )
    try:
        wait_until(lambda: arrived or None, 30, "a first request")
        started = time.monotonic()
        process.send_signal(signal.SIGINT)
        _out, err = process.communicate(timeout=10)
        assert time.monotonic() - started < 10
        assert process.returncode == 130, err
        assert "interrupted" in err and "Traceback" not in err, err
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
