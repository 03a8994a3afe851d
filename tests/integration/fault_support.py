"""Helpers for the fault-injection tests: real ``syncer`` child processes and database reads.

Settings files written as TOML, the command run to completion or started in the background
(to be killed or stopped by its own pid), waiting on conditions, and plain SQL reads of the
syncer's tables.
"""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, text

from syncer.testing.tray_standin import Received
from tests.integration import cli_helpers as helpers
from tests.integration.cli_helpers import Result, cli, cli_command, cli_env
from tests.integration.cli_helpers import show as show
from tests.integration.cli_helpers import write_settings as write_settings


def child_env() -> dict[str, str]:
    """Our environment without any SYNCER_* variable, so only the settings file counts."""
    return cli_env()


def command(settings: Path, *args: str) -> list[str]:
    """The argv of ``python -m syncer --settings SETTINGS ARGS``."""
    return cli_command(*args, settings=settings)


def syncer(settings: Path, *args: str, timeout: float = 60) -> Result:
    """Run the real ``syncer`` command to completion."""
    return cli(*args, settings=settings, timeout=timeout)


def start(settings: Path, *args: str, log: Path | None = None) -> subprocess.Popen[bytes]:
    """Start ``syncer ARGS`` in the background; standard output and error go to ``log``."""
    sink = log.open("wb") if log is not None else subprocess.DEVNULL
    try:
        return subprocess.Popen(
            command(settings, *args),
            stdin=subprocess.DEVNULL,
            stdout=sink,
            stderr=sink,
            env=child_env(),
        )
    finally:
        if log is not None and not isinstance(sink, int):
            sink.close()


def assert_no_crash(output: str, what: str = "") -> None:
    """No internal error and no traceback in a child's output."""
    assert "internal error" not in output, f"{what}\n{output[-6000:]}"
    assert "internal_error" not in output, f"{what}\n{output[-6000:]}"
    assert "Traceback" not in output, f"{what}\n{output[-6000:]}"


def log_events(output: str) -> list[dict[str, Any]]:
    """The JSON log lines in a child's output."""
    events = []
    for line in output.splitlines():
        try:
            parsed = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(parsed, dict):
            events.append(parsed)
    return events


def wait_until(condition: Callable[[], Any], timeout: float, what: str) -> Any:
    """Poll ``condition`` often (kills must land near a given moment) until it is truthy."""
    return helpers.wait_until(condition, timeout, what, interval=0.005)


def settle(count: Callable[[], int], quiet_seconds: float = 0.3, timeout: float = 10) -> int:
    """Wait until ``count()`` has not changed for ``quiet_seconds``; return it."""
    deadline = time.monotonic() + timeout
    last, since = count(), time.monotonic()
    while time.monotonic() < deadline:
        time.sleep(0.02)
        now = count()
        if now != last:
            last, since = now, time.monotonic()
        elif time.monotonic() - since >= quiet_seconds:
            return now
    raise AssertionError(f"still changing after {timeout}s")


def stop_child(process: subprocess.Popen[bytes]) -> None:
    """Kill a child we started (by its own pid) if it is still running, and reap it."""
    if process.poll() is None:
        process.kill()
    process.wait(timeout=30)


def query(engine: Engine, sql: str, **params: Any) -> list[tuple[Any, ...]]:
    """The rows of one SQL query, as tuples."""
    with engine.connect() as connection:
        return [tuple(row) for row in connection.execute(text(sql), params)]


def delivered_values(engine: Engine) -> dict[tuple[str, str, str], str]:
    """(URL, audience, user) -> the value the record says the URL accepted (users it may
    have heard of without accepting anything yet are left out)."""
    rows = query(
        engine,
        "select d.url, t.audience_id, t.user_id, t.value from syncer_state t "
        "join syncer_destinations d on d.id = t.destination_id where t.value is not null",
    )
    return {(url, audience, user): value for url, audience, user, value in rows}


def outbox_rows(engine: Engine) -> list[dict[str, Any]]:
    """Every queued change, with its URL."""
    with engine.connect() as connection:
        result = connection.execute(
            text(
                "select d.url, o.* from syncer_outbox o "
                "join syncer_destinations d on d.id = o.destination_id order by o.id"
            )
        )
        return [dict(row._mapping) for row in result]


def is_whole(item: Received) -> bool:
    """False for a request cut short (a sender killed mid-request leaves a truncated body)."""
    try:
        json.loads(item.body)
    except ValueError:
        return False
    return True


def by_user(received: Sequence[Received]) -> dict[str, list[Received]]:
    """Whole requests grouped by userId, in arrival order."""
    grouped: dict[str, list[Received]] = {}
    for item in received:
        if is_whole(item):
            grouped.setdefault(item.message["userId"], []).append(item)
    return grouped


def trait_value(item: Received) -> Any:
    """The audience trait an identify call carries (True or False)."""
    message = item.message
    key = message["context"]["personas"]["computation_key"]
    return message["traits"][key]
