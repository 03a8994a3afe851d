"""Helpers for the fault-injection tests: real ``syncer`` child processes and database reads.

Settings files written as TOML, the command run to completion or started in the background
(to be killed or stopped by its own pid), waiting on conditions, and plain SQL reads of the
syncer's tables.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, text

from syncer.testing.tray_standin import Received
from tests.conftest import SECRET

Result = subprocess.CompletedProcess[str]

# Fast retries, as in conftest.make_settings, unless a test asks otherwise.
FAST_DELIVERY: dict[str, Any] = {
    "concurrency": 4,
    "timeout_seconds": 5,
    "max_attempts": 3,
    "backoff_base_seconds": 0.01,
    "backoff_max_seconds": 0.05,
    "retry_after_max_seconds": 0.2,
}


def _toml(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)  # JSON string escapes are valid TOML basic-string escapes
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_toml(item) for item in value) + "]"
    raise TypeError(f"cannot write {value!r} as TOML")


def write_settings(
    path: Path,
    database_url: str,
    urls: Sequence[str],
    *,
    delivery: Mapping[str, Any] | None = None,
    guard: Mapping[str, Any] | None = None,
    schedule: Mapping[str, Any] | None = None,
) -> Path:
    """Write a settings file for child processes; return its path."""
    sections: dict[str, Mapping[str, Any]] = {
        "database": {"url": database_url},
        "tray": {"workflow_urls": list(urls), "shared_secret": SECRET},
        "engage": {"space_id": "spa_test"},
        "delivery": {**FAST_DELIVERY, **(delivery or {})},
        "logging": {"level": "INFO", "format": "json"},
    }
    if guard:
        sections["guard"] = guard
    if schedule:
        sections["schedule"] = schedule
    lines = []
    for name, values in sections.items():
        lines.append(f"[{name}]")
        lines.extend(f"{key} = {_toml(value)}" for key, value in values.items())
        lines.append("")
    path.write_text("\n".join(lines), encoding="utf-8")
    return path


def child_env() -> dict[str, str]:
    """Our environment without any SYNCER_* variable, so only the settings file counts."""
    return {k: v for k, v in os.environ.items() if not k.startswith("SYNCER_")}


def command(settings: Path, *args: str) -> list[str]:
    """The argv of ``python -m syncer --settings SETTINGS ARGS``."""
    return [sys.executable, "-m", "syncer", "--settings", str(settings), *args]


def syncer(settings: Path, *args: str, timeout: float = 60) -> Result:
    """Run the real ``syncer`` command to completion."""
    return subprocess.run(
        command(settings, *args),
        capture_output=True,
        text=True,
        errors="backslashreplace",  # undecodable output is shown, not a crash of the test
        env=child_env(),
        timeout=timeout,
        stdin=subprocess.DEVNULL,
    )


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


def show(result: Result) -> str:
    """A failed assertion's explanation: the command, its status and its output."""
    return (
        f"$ {' '.join(map(str, result.args[2:]))}\nexit status {result.returncode}\n"
        f"--- stdout ---\n{result.stdout}\n--- stderr ---\n{result.stderr[-6000:]}"
    )


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
    """Poll ``condition`` until it is truthy and return it; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.005)


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
    """(URL, audience, user) -> the value the record says the URL was told."""
    rows = query(
        engine,
        "select d.url, t.audience_id, t.user_id, t.value from syncer_delivered t "
        "join syncer_destinations d on d.id = t.destination_id",
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
