"""What goes wrong around a sync, driven through the real ``syncer`` command.

A workflow URL down for several runs, a change refused for good until it is parked and then
re-queued, the mass-exit guard, input rows that cannot be sent, and servers that answer with a
huge body, hang, drip, speak something that is not HTTP, hang up mid-answer, ask to be retried
at an HTTP date, or present a certificate nobody vouches for.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import socketserver
import sqlite3
import ssl
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from email.utils import formatdate
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest

from syncer.store import Store
from syncer.testing.tray_standin import Reply, TrayStandin
from tests.conftest import Upstream
from tests.integration.fault_support import (
    Result,
    assert_no_crash,
    by_user,
    child_env,
    command,
    delivered_values,
    log_events,
    outbox_rows,
    query,
    show,
    syncer,
    trait_value,
    write_settings,
)

SQLITE_ONLY = pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)


def values_at(standin: TrayStandin, path: str) -> dict[str, list[Any]]:
    """userId -> every trait value received at ``path``, in arrival order."""
    return {
        user: [trait_value(item) for item in copies]
        for user, copies in by_user(standin.received(path)).items()
    }


def sync(settings: Path, *args: str, expect: int | tuple[int, ...] = (0, 1)) -> Result:
    """``syncer sync ARGS``, checked to exit with ``expect`` and not to crash."""
    result = syncer(settings, "sync", *args)
    allowed = (expect,) if isinstance(expect, int) else expect
    assert result.returncode in allowed, show(result)
    assert_no_crash(result.stdout + result.stderr, show(result))
    return result


def json_of(settings: Path, *args: str) -> Any:
    """The JSON a ``syncer ... --format json`` command prints, checked to be UTF-8 JSON."""
    raw = subprocess.run(
        command(settings, *args, "--format", "json"),
        capture_output=True,
        env=child_env(),
        timeout=60,
        stdin=subprocess.DEVNULL,
    )
    result = Result(
        raw.args,
        raw.returncode,
        raw.stdout.decode("utf-8", "backslashreplace"),
        raw.stderr.decode("utf-8", "backslashreplace"),
    )
    assert result.returncode == 0, show(result)
    assert_no_crash(result.stderr, show(result))
    try:
        text = raw.stdout.decode("utf-8")
    except UnicodeDecodeError as error:
        raise AssertionError(f"the JSON printed is not UTF-8 ({error}):\n{show(result)}") from None
    return json.loads(text)


# --- a URL down for several runs ---


@SQLITE_ONLY
def test_url_down_for_several_runs_keeps_its_backlog_and_then_gets_the_net_changes(
    store: Store,
    upstream: Upstream,
    standin: TrayStandin,
    database_url: str,
    tmp_path: Path,
) -> None:
    engine = store.engine
    upstream.add_audience("aud_1", "Buyers")
    upstream.add("aud_1", "u1", "u2", "u3", "u4", "u5")
    up, down = standin.url("/up"), standin.url("/down")
    # One request at a time: only the first change of each run reaches /down (and gets a 503,
    # so /down may have processed it); the others are certainly unsent.
    settings = write_settings(
        tmp_path / "settings.toml",
        database_url,
        [up, down],
        delivery={"max_attempts": 2, "concurrency": 1},
    )
    sync(settings, expect=0)
    standin.clear()
    standin.respond("/down", Reply(status=503, body=b'{"error":"maintenance"}'))
    first_attempt: dict[tuple[str, Any], str] = {}

    # Three runs while /down answers 503, with memberships changing between them.
    for step, (enter, leave) in enumerate(
        [
            (["u6", "u7"], ["u1", "u3"]),  # u1, u3 told true before, now leave
            # u6 entered and left while /down was down; its entry reached /down (503)
            (["u8"], ["u6", "u2"]),
            (["u3"], []),  # u3 comes back, its exit never sent: for /down, nothing changed
        ]
    ):
        if enter:
            upstream.add("aud_1", *enter)
        if leave:
            upstream.remove("aud_1", *leave)
        before = len(standin.received("/up"))

        result = sync(settings, expect=1)

        assert "URL unavailable" in result.stdout, show(result)
        # The healthy URL goes on, getting this run's changes and nothing else.
        got = {
            item.message["userId"]: trait_value(item) for item in standin.received("/up")[before:]
        }
        assert got == {**dict.fromkeys(enter, True), **dict.fromkeys(leave, False)}, step
        for item in standin.received("/down"):
            first_attempt.setdefault(
                (item.message["userId"], trait_value(item)), item.message["messageId"]
            )
        # /down's backlog waits in the outbox, pending, and was never recorded as told.
        backlog = {
            row["user_id"]: (row["value"], row["status"])
            for row in outbox_rows(engine)
            if row["url"] == down
        }
        expected_backlog = {
            0: {"u1": "false", "u3": "false", "u6": "true", "u7": "true"},
            1: {
                "u1": "false",
                "u2": "false",
                "u3": "false",
                "u6": "false",
                "u7": "true",
                "u8": "true",
            },
            2: {"u1": "false", "u2": "false", "u6": "false", "u7": "true", "u8": "true"},
        }[step]
        assert backlog == {u: (v, "pending") for u, v in expected_backlog.items()}, step
        assert not [row for row in outbox_rows(engine) if row["url"] == up]
        told_down = {u: v for (url, _, u), v in delivered_values(engine).items() if url == down}
        assert told_down == dict.fromkeys(["u1", "u2", "u3", "u4", "u5"], "true")

    standin.clear()
    standin.respond("/down", Reply(status=200))

    back = sync(settings, expect=0)

    assert standin.received("/up") == [], show(back)
    # Only the net changes: u3 (out and back in, never sent) hears nothing; u1 and u2, told
    # true before, get exactly one false each. u6's entry may have been processed by /down, so
    # it is told u6 is out rather than left believing u6 may be in.
    assert values_at(standin, "/down") == {
        "u1": [False],
        "u2": [False],
        "u6": [False],
        "u7": [True],
        "u8": [True],
    }
    # A change queued while the URL was down keeps its messageId until it is accepted.
    for item in standin.received("/down"):
        change = (item.message["userId"], trait_value(item))
        if change in first_attempt:
            assert item.message["messageId"] == first_attempt[change], change
    told = delivered_values(engine)
    expected = {"u1": "false", "u2": "false", "u3": "true", "u4": "true", "u5": "true"}
    expected |= {"u6": "false", "u7": "true", "u8": "true"}
    assert {u: v for (url, _, u), v in told.items() if url == down} == expected
    assert {u: v for (url, _, u), v in told.items() if url == up} == expected
    assert outbox_rows(engine) == []


# --- final rejections, parking and `syncer retry` ---


def test_rejected_change_is_retried_then_parked_then_requeued_by_syncer_retry(
    store: Store,
    upstream: Upstream,
    standin: TrayStandin,
    database_url: str,
    tmp_path: Path,
) -> None:
    engine = store.engine
    upstream.add_audience("aud_1", "Repeat Buyers")
    upstream.add("aud_1", "good1", "bad", "good2", "good3")
    refusing = {"/a": True, "/b": True}

    def refuse_bad(path: str, body: bytes) -> Reply:
        if refusing[path] and json.loads(body)["userId"] == "bad":
            return Reply(status=400, body=b'{"error":"trait repeat_buyers: schema mismatch"}')
        return Reply()

    standin.respond("/a", refuse_bad)
    standin.respond("/b", refuse_bad)
    url_a, url_b = standin.url("/a"), standin.url("/b")
    settings = write_settings(
        tmp_path / "settings.toml",
        database_url,
        [url_a, url_b],
        delivery={"max_attempts": 3, "max_rejections": 2},
    )

    def sent_to(path: str, user: str) -> int:
        return len(by_user(standin.received(path)).get(user, []))

    first = sync(settings, expect=1)
    # Refused on the second run too: now parked, which is reported but is not a failure.
    second = sync(settings, expect=0)

    for path in ("/a", "/b"):
        # A final status is not retried within a run, but is tried again on the next run...
        assert sent_to(path, "bad") == 2, (show(first), show(second))
        assert all(sent_to(path, user) == 1 for user in ("good1", "good2", "good3"))
    assert "parked" in second.stdout, show(second)

    third = sync(settings, expect=0)

    # ...until it was refused on max_rejections runs: then it is parked and no longer sent.
    assert sent_to("/a", "bad") == 2 and sent_to("/b", "bad") == 2, show(third)
    assert "parked" in third.stdout, show(third)
    failures = json_of(settings, "inspect", "failures")
    assert sorted(f["url"] for f in failures) == sorted([url_a, url_b]), failures
    for failure in failures:
        assert failure["user_id"] == "bad"
        assert failure["state"] == "parked"
        assert failure["last_status"] == 400
        assert "schema mismatch" in failure["last_error"]
        assert failure["key"] == "repeat_buyers"
    first_id = by_user(standin.received("/b"))["bad"][0].message["messageId"]

    wrong = syncer(settings, "retry", "--url", "not-configured")
    assert wrong.returncode == 2, show(wrong)
    assert_no_crash(wrong.stdout + wrong.stderr)

    refusing["/b"] = False
    only_b = syncer(settings, "retry", "--url", url_b)
    assert only_b.returncode == 0, show(only_b)
    assert "1 change(s) re-queued" in only_b.stdout, show(only_b)
    fourth = sync(settings, expect=0)

    assert sent_to("/b", "bad") == 3 and sent_to("/a", "bad") == 2, show(fourth)
    assert by_user(standin.received("/b"))["bad"][-1].message["messageId"] == first_id
    assert [(row["url"], row["status"]) for row in outbox_rows(engine)] == [(url_a, "parked")]

    refusing["/a"] = False
    by_audience = syncer(settings, "retry", "--audience", "repeat_buyers")
    assert by_audience.returncode == 0, show(by_audience)
    assert "1 change(s) re-queued" in by_audience.stdout, show(by_audience)
    fifth = sync(settings, expect=0)

    assert sent_to("/a", "bad") == 3 and sent_to("/b", "bad") == 3, show(fifth)
    told = delivered_values(engine)
    assert all(told[(url, "aud_1", "bad")] == "true" for url in (url_a, url_b))
    assert outbox_rows(engine) == []


# --- the mass-exit guard ---


def test_mass_exit_is_held_until_approved_while_other_audiences_sync(
    store: Store,
    upstream: Upstream,
    standin: TrayStandin,
    database_url: str,
    tmp_path: Path,
) -> None:
    engine = store.engine
    audiences = {
        "aud_big": ("Loyal Customers", [f"big-{n:02d}" for n in range(40)]),
        "aud_quarter": ("Window Shoppers", [f"qtr-{n:02d}" for n in range(40)]),
        "aud_small": ("Beta Testers", [f"small-{n}" for n in range(5)]),
        "aud_other": ("Newsletter", [f"news-{n:02d}" for n in range(12)]),
    }
    for audience_id, (name, members) in audiences.items():
        upstream.add_audience(audience_id, name)
        upstream.add(audience_id, *members)
    settings = write_settings(
        tmp_path / "settings.toml",
        database_url,
        [standin.url("/wf")],
        guard={"max_exit_share": 0.5, "min_audience_size": 10},
    )
    sync(settings, expect=0)
    standin.clear()

    dropped = audiences["aud_big"][1][:30]
    upstream.remove("aud_big", *dropped)  # 30 of 40 leave: 75% > 50%, held
    upstream.remove("aud_quarter", *audiences["aud_quarter"][1][:10])  # 25%: not held
    upstream.remove("aud_small", *audiences["aud_small"][1])  # all 5, but below the floor
    upstream.add("aud_other", "news-new")

    dry = sync(settings, "--dry-run", expect=0)

    url = standin.url("/wf")
    assert f"would HOLD {url} loyal_customers" in dry.stdout, show(dry)
    assert "30 of the 40" in dry.stdout, show(dry)
    assert "big-" not in dry.stdout.replace("would HOLD", ""), show(dry)
    assert "window_shoppers:" not in dry.stdout and "beta_testers:" not in dry.stdout
    assert standin.received() == []

    held = sync(settings, expect=1)

    assert f"HELD {url} loyal_customers" in held.stdout, show(held)
    assert "30 of the 40" in held.stdout and "syncer approve loyal_customers" in held.stdout
    assert "HELD" not in held.stdout.replace(f"HELD {url} loyal_customers", "")
    sent = values_at(standin, "/wf")
    assert not [user for user in sent if user.startswith("big-")]
    assert sent == {
        **{user: [False] for user in audiences["aud_quarter"][1][:10]},
        **{user: [False] for user in audiences["aud_small"][1]},
        "news-new": [True],
    }
    state = {record["id"]: record for record in json_of(settings, "inspect", "audiences")}
    assert state["aud_big"]["held_for"] == [url]
    assert "30 of the 40" in state["aud_big"]["urls"][0]["hold_reason"]
    assert [state[a]["held_for"] for a in ("aud_quarter", "aud_small", "aud_other")] == [[]] * 3
    # Held, but still held on the next run: nothing goes out until someone approves.
    again = sync(settings, expect=1)
    assert f"HELD {url} loyal_customers" in again.stdout
    assert values_at(standin, "/wf") == sent

    approved = syncer(settings, "approve", "loyal_customers")
    assert approved.returncode == 0, show(approved)
    standin.clear()

    released = sync(settings, expect=0)

    assert "HELD" not in released.stdout, show(released)
    assert values_at(standin, "/wf") == {user: [False] for user in dropped}
    # The hold is gone, and the ten members left are not a new surge.
    assert query(engine, "select count(*) from syncer_pairs where held_at is not null") == [(0,)]
    told = delivered_values(engine)
    assert sum(1 for (_, a, _), v in told.items() if a == "aud_big" and v == "true") == 10
    twice = syncer(settings, "approve", "loyal_customers")
    assert twice.returncode == 2, show(twice)


# --- input rows that cannot be sent ---


@SQLITE_ONLY
def test_bad_input_rows_are_reported_not_queued_while_good_rows_are_delivered(
    store: Store,
    upstream: Upstream,
    standin: TrayStandin,
    database_url: str,
    tmp_path: Path,
) -> None:
    engine = store.engine
    upstream.add_audience("aud_1", "Buyers")
    upstream.add("aud_1", "good1", "good2", email="good@example.com")
    upstream.add("aud_1", "no-email")  # a NULL email is allowed: sent without one
    upstream.add("aud_1", "", "bad\x01id", "x" * 600)
    database_path = database_url.removeprefix("sqlite:///")
    with sqlite3.connect(database_path) as raw:
        # Bytes that are not UTF-8, stored as TEXT, as a careless upstream job could write them.
        raw.execute(
            "insert into audience_memberships values (?, CAST(? AS TEXT), NULL, NULL)",
            ("aud_1", b"\xff\xfe-user"),
        )
        # Memberships of an audience that does not exist (the syncer does not enforce keys).
        raw.executemany(
            "insert into audience_memberships values (?, ?, NULL, NULL)",
            [("aud_ghost", "ghost1"), ("aud_ghost", "ghost2")],
        )
    assert query(
        engine,
        "select typeof(user_id) from audience_memberships where user_id like :pattern",
        pattern="%-user",
    ) == [("text",)]
    settings = write_settings(tmp_path / "settings.toml", database_url, [standin.url("/wf")])

    first = sync(settings, expect=0)

    sent = values_at(standin, "/wf")
    assert sent == {"good1": [True], "good2": [True], "no-email": [True]}, show(first)
    bare = by_user(standin.received("/wf"))["no-email"][0].message
    assert "email" not in bare["traits"]
    output = first.stdout + first.stderr
    assert "aud_ghost" in first.stdout and "2 membership row(s)" in first.stdout, show(first)
    assert "4 member row(s) cannot be sent and were not queued" in first.stdout, show(first)
    skipped = [e for e in log_events(first.stderr) if e.get("event") == "invalid_rows_skipped"]
    assert sum(e["count"] for e in skipped) == 4, output
    assert "ghost" not in "".join(json.dumps(i.message) for i in standin.received())

    # Not queued, so not failures: what cannot be sent is counted where the audience is shown.
    assert json_of(settings, "inspect", "failures") == []
    audiences = {a["id"]: a for a in json_of(settings, "inspect", "audiences")}
    assert audiences["aud_1"]["invalid_members"] == 4
    assert query(engine, "select count(*) from syncer_outbox") == [(0,)]
    told = delivered_values(engine)
    assert sorted(u for (_, _, u) in told) == ["good1", "good2", "no-email"]

    # Later runs neither crash nor send the bad rows, and still report them and the orphans.
    standin.clear()
    second = sync(settings, expect=0)
    assert standin.received() == []
    assert "aud_ghost" in second.stdout, show(second)
    assert "4 member row(s) cannot be sent" in second.stdout, show(second)


# --- what a server may answer ---


class RawServer:
    """A TCP server on 127.0.0.1 that reads each HTTP request and then runs ``behave`` on it.

    ``behave(connection)`` writes whatever it likes (or nothing) and returns; the connection is
    closed afterwards.
    """

    def __init__(self, behave: Callable[[socket.socket], None]) -> None:
        self.behave = behave
        self.requests = 0
        self.bytes_sent = 0
        self._lock = threading.Lock()
        outer = self

        class Handler(socketserver.BaseRequestHandler):
            def handle(self) -> None:
                connection: socket.socket = self.request
                connection.settimeout(30)
                if not outer._read_request(connection):
                    return
                with outer._lock:
                    outer.requests += 1
                with contextlib.suppress(OSError):
                    outer.behave(connection)

        self._server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @staticmethod
    def _read_request(connection: socket.socket) -> bool:
        data = b""
        try:
            while b"\r\n\r\n" not in data:
                chunk = connection.recv(65536)
                if not chunk:
                    return False
                data += chunk
            head, _, body = data.partition(b"\r\n\r\n")
            length = 0
            for line in head.split(b"\r\n")[1:]:
                name, _, value = line.partition(b":")
                if name.strip().lower() == b"content-length":
                    length = int(value)
            while len(body) < length:
                chunk = connection.recv(65536)
                if not chunk:
                    return False
                body += chunk
        except OSError:
            return False
        return True

    def send(self, connection: socket.socket, data: bytes) -> None:
        connection.sendall(data)
        with self._lock:
            self.bytes_sent += len(data)

    def url(self, path: str = "/wf", scheme: str = "http") -> str:
        return f"{scheme}://127.0.0.1:{self._server.server_address[1]}{path}"

    def __enter__(self) -> RawServer:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._server.shutdown()
        self._server.server_close()


def run_seconds(result: Result) -> float:
    """How long the run itself took, as it reports: the figure the delivery rules bound. The
    process around it may take seconds more to start on a loaded machine."""
    finished = [e for e in log_events(result.stderr) if e.get("event") == "sync_finished"]
    assert finished, show(result)
    return float(finished[-1]["duration_seconds"])


def _peak_rss_kb(pid: int) -> int:
    """The high-water mark of ``pid``'s resident memory since it exec'd (VmHWM), 0 once gone.

    Not wait4's ru_maxrss: that one keeps the memory of the image the child was forked from
    (this test process, hundreds of MB late in a run), not only the syncer's own.
    """
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return 0
    for line in status.splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    return 0  # a zombie has no memory left to report


def timed_sync(settings: Path, timeout: float = 60) -> tuple[Result, float, int]:
    """``syncer sync`` with its wall time and its peak memory (VmHWM, in kilobytes, read every
    20 ms while it runs: a high-water mark, so no peak between two reads is missed)."""
    started = time.monotonic()
    with (
        open(settings.parent / "out.txt", "w+b") as out,
        open(settings.parent / "err.txt", "w+b") as err,
    ):
        child = subprocess.Popen(
            command(settings, "sync"), stdin=subprocess.DEVNULL, stdout=out, stderr=err,
            env=child_env(),
        )  # fmt: skip
        deadline = started + timeout
        peak_kb = 0
        while True:
            peak_kb = max(peak_kb, _peak_rss_kb(child.pid))
            pid, status, _usage = os.wait4(child.pid, os.WNOHANG)
            if pid:
                break
            if time.monotonic() > deadline:
                child.kill()
                child.wait()
                raise AssertionError(f"syncer sync still running after {timeout}s")
            time.sleep(0.02)
        elapsed = time.monotonic() - started
        child.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        result = Result(
            child.args,
            child.returncode,
            out.read().decode(errors="replace"),
            err.read().decode(errors="replace"),
        )
    assert_no_crash(result.stdout + result.stderr, show(result))
    return result, elapsed, peak_kb


def assert_left_pending(
    engine: Any, result: Result, users: list[str], error: str = "", status: int | None = None
) -> None:
    """Nothing was recorded as told; every change waits, pending, with the error noted."""
    assert result.returncode == 1, show(result)
    assert delivered_values(engine) == {}
    rows = outbox_rows(engine)
    assert sorted(row["user_id"] for row in rows) == sorted(users)
    assert all(row["status"] == "pending" for row in rows), rows
    assert all(row["last_status"] == status for row in rows if row["attempts"]), rows
    tried = [row for row in rows if row["attempts"] > 0]
    assert tried, rows
    assert all(row["last_error"] and error.lower() in row["last_error"].lower() for row in tried)


@SQLITE_ONLY
@pytest.mark.parametrize("status", [200, 500])
def test_huge_response_body_is_read_only_in_part(
    store: Store,
    upstream: Upstream,
    standin: TrayStandin,
    database_url: str,
    tmp_path: Path,
    status: int,
) -> None:
    upstream.add_audience("aud_1", "Buyers")
    users = [f"u{n}" for n in range(6)]
    upstream.add("aud_1", *users)
    standin.respond("/wf", Reply(status=status, body=b"x" * 5_000_000))
    settings = write_settings(tmp_path / "settings.toml", database_url, [standin.url("/wf")])

    result, _, _ = timed_sync(settings, timeout=60)

    assert run_seconds(result) < 15, show(result)
    if status == 200:
        assert result.returncode == 0, show(result)
        assert sorted(u for (_, _, u) in delivered_values(store.engine)) == users
    else:
        assert_left_pending(store.engine, result, users, status=500)
        # What is kept of the answer is a short excerpt, not the 5 MB.
        errors = [row["last_error"] for row in outbox_rows(store.engine) if row["attempts"]]
        assert all(0 < len(error) <= 1024 and set(error) == {"x"} for error in errors), errors


@SQLITE_ONLY
def test_endless_200_response_is_delivered_in_bounded_time_and_memory(
    store: Store, upstream: Upstream, database_url: str, tmp_path: Path
) -> None:
    upstream.add_audience("aud_1", "Buyers")
    upstream.add("aud_1", "u1", "u2")
    total = 300 * 1024 * 1024
    chunk = b"x" * 65536

    def endless(connection: socket.socket) -> None:
        server.send(connection, b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % total)
        for _ in range(total // len(chunk)):
            server.send(connection, chunk)

    with RawServer(endless) as server:
        settings = write_settings(
            tmp_path / "settings.toml",
            database_url,
            [server.url()],
            delivery={"timeout_seconds": 5},
        )
        result, _, max_rss_kb = timed_sync(settings, timeout=60)

        assert result.returncode == 0, show(result)
        assert sorted(u for (_, _, u) in delivered_values(store.engine)) == ["u1", "u2"]
        assert run_seconds(result) < 10, show(result)
        # The sender stops reading after a small prefix: a 300 MB answer is never held whole.
        assert max_rss_kb < 200 * 1024, max_rss_kb
        time.sleep(0.2)
        assert server.bytes_sent < 64 * 1024 * 1024, server.bytes_sent


def hang(connection: socket.socket) -> None:
    """Never answer: wait until the client gives up and closes the connection."""
    while connection.recv(1024):
        pass


def drip(connection: socket.socket) -> None:
    """Answer 200 and then a byte every 50 ms, forever: each read succeeds, none ends."""
    connection.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 1000000\r\n\r\n")
    while True:
        connection.sendall(b"x")
        time.sleep(0.05)


def garbage(connection: socket.socket) -> None:
    """Answer with bytes that are not HTTP at all, then hang up."""
    connection.sendall(b"\x00\xff\xfeSSH-2.0-OpenSSH_9.6 not HTTP at all\r\n\r\n\x07\x08")


def cut_in_status_line(connection: socket.socket) -> None:
    """Hang up in the middle of the status line."""
    connection.sendall(b"HTTP/1.1 20")


def cut_in_body(connection: socket.socket) -> None:
    """Say 200 with a 4 KB body, send ten bytes of it, and hang up."""
    connection.sendall(b'HTTP/1.1 200 OK\r\nContent-Length: 4096\r\n\r\n{"ok":tru')


def hang_up(connection: socket.socket) -> None:
    """Read the request and close without a word."""


@SQLITE_ONLY
@pytest.mark.parametrize(
    ("behave", "error"),
    [
        (hang, "timed out"),
        (drip, "timed out"),
        (garbage, ""),
        (cut_in_status_line, ""),
        (cut_in_body, ""),
        (hang_up, ""),
    ],
    ids=["hang", "drip", "garbage", "cut-status-line", "cut-body", "hang-up"],
)
def test_broken_server_is_retryable_and_the_run_ends_in_bounded_time(
    store: Store,
    upstream: Upstream,
    database_url: str,
    tmp_path: Path,
    behave: Callable[[socket.socket], None],
    error: str,
) -> None:
    upstream.add_audience("aud_1", "Buyers")
    upstream.add("aud_1", "u1", "u2")

    with RawServer(behave) as server:
        settings = write_settings(
            tmp_path / "settings.toml",
            database_url,
            [server.url()],
            delivery={"timeout_seconds": 0.5, "max_attempts": 2},
        )
        result, _, _ = timed_sync(settings, timeout=60)

        # Two attempts of 0.5 s at most for the first change, then the URL counts as down.
        assert run_seconds(result) < 8, show(result)
        assert server.requests >= 2, show(result)
        assert_left_pending(store.engine, result, ["u1", "u2"], error)
        assert "URL unavailable" in result.stdout, show(result)


@SQLITE_ONLY
def test_retry_after_given_as_an_http_date_is_honoured(
    store: Store,
    upstream: Upstream,
    standin: TrayStandin,
    database_url: str,
    tmp_path: Path,
) -> None:
    upstream.add_audience("aud_1", "Buyers")
    upstream.add("aud_1", "u1")
    arrivals: list[float] = []

    def busy_then_fine(_path: str, _body: bytes) -> Reply:
        arrivals.append(time.monotonic())
        if len(arrivals) == 1:
            return Reply(
                status=503, headers={"Retry-After": formatdate(time.time() + 2, usegmt=True)}
            )
        return Reply()

    standin.respond("/wf", busy_then_fine)
    settings = write_settings(
        tmp_path / "settings.toml",
        database_url,
        [standin.url("/wf")],
        delivery={"retry_after_max_seconds": 10, "max_attempts": 3},
    )

    result = sync(settings, expect=0)

    assert len(arrivals) == 2, show(result)
    # The date is two seconds ahead, to the second: at least one second is waited, not the
    # hundredths of a second the backoff alone would give.
    assert 0.9 <= arrivals[1] - arrivals[0] < 4, arrivals
    assert delivered_values(store.engine) == {(standin.url("/wf"), "aud_1", "u1"): "true"}


# --- TLS ---


@SQLITE_ONLY
def test_https_url_to_a_plain_http_port_fails_and_stays_pending(
    store: Store,
    upstream: Upstream,
    standin: TrayStandin,
    database_url: str,
    tmp_path: Path,
) -> None:
    upstream.add_audience("aud_1", "Buyers")
    upstream.add("aud_1", "u1")
    url = standin.url("/wf").replace("http://", "https://")
    settings = write_settings(tmp_path / "settings.toml", database_url, [url])

    result = sync(settings, expect=1)

    assert standin.received() == []
    assert_left_pending(store.engine, result, ["u1"], "SSL")


@pytest.fixture
def self_signed(tmp_path: Path) -> Iterator[tuple[str, Path, list[bytes]]]:
    """An HTTPS server on 127.0.0.1 with a self-signed certificate: (URL, cert file, bodies)."""
    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.skip("openssl is not installed: cannot make a self-signed certificate")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        [openssl, "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
         "-nodes", "-keyout", str(key), "-out", str(cert), "-days", "2",
         "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1"],
        check=True, capture_output=True, timeout=30,
    )  # fmt: skip
    bodies: list[bytes] = []

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: Any) -> None:
            pass

        def do_POST(self) -> None:
            bodies.append(self.rfile.read(int(self.headers.get("Content-Length", "0"))))
            self.send_response(200)
            self.send_header("Content-Length", "2")
            self.end_headers()
            self.wfile.write(b"{}")

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    server.socket = context.wrap_socket(server.socket, server_side=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"https://127.0.0.1:{server.server_address[1]}/wf", cert, bodies
    finally:
        server.shutdown()
        server.server_close()


@SQLITE_ONLY
def test_self_signed_certificate_is_refused_so_verification_is_on(
    store: Store,
    upstream: Upstream,
    database_url: str,
    tmp_path: Path,
    self_signed: tuple[str, Path, list[bytes]],
) -> None:
    url, cert, bodies = self_signed
    # The server works for a client that trusts its certificate...
    assert httpx.post(url, content=b"{}", verify=ssl.create_default_context(cafile=cert)).is_success
    assert len(bodies) == 1
    upstream.add_audience("aud_1", "Buyers")
    upstream.add("aud_1", "u1")
    settings = write_settings(tmp_path / "settings.toml", database_url, [url])

    # ...but the syncer, which verifies certificates, never gets as far as sending.
    result = sync(settings, expect=1)

    assert len(bodies) == 1, show(result)
    assert_left_pending(store.engine, result, ["u1"], "certificate verify failed")
