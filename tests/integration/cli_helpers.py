"""Helpers for the tests that drive the real ``syncer`` command.

Settings files written as TOML, the command run to completion (in the test's process when it
can, see tests.conftest.runs_in_process), several at once or as a long-lived daemon (as child
processes), waiting for conditions, and reading databases back whole.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from datetime import datetime
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

from sqlalchemy import MetaData, select

from syncer.store import Store
from syncer.store.database import create_database_engine, migrate
from syncer.sync import SyncEngine, SyncOptions, SyncReport
from tests.conftest import (
    SECRET,
    Upstream,
    child_environment,
    make_settings,
    run_in_process,
    runs_in_process,
)

# The fast-retry delivery settings the in-process tests use (see conftest.make_settings).
FAST_DELIVERY: dict[str, Any] = {
    "concurrency": 4,
    "timeout_seconds": 5,
    "max_attempts": 3,
    "backoff_base_seconds": 0.01,
    "backoff_max_seconds": 0.05,
    "retry_after_max_seconds": 0.2,
}

CLI_TIMEOUT_SECONDS = 60
T = TypeVar("T")

Result = subprocess.CompletedProcess[str]


def toml_value(value: Any) -> str:
    """``value`` written as a TOML value (strings, numbers, booleans, and lists and inline
    tables of them)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)  # JSON string escapes are valid in TOML basic strings
    if isinstance(value, list | tuple):
        return "[" + ", ".join(toml_value(item) for item in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k} = {toml_value(v)}" for k, v in value.items()) + "}"
    raise TypeError(f"cannot write {value!r} as TOML")


def toml_text(sections: Mapping[str, Mapping[str, Any]]) -> str:
    """A TOML document of one table per section."""
    lines = []
    for name, values in sections.items():
        lines.append(f"[{name}]")
        lines.extend(f"{key} = {toml_value(value)}" for key, value in values.items())
        lines.append("")
    return "\n".join(lines)


def settings_sections(
    database_url: str,
    urls: Sequence[Any],
    *,
    secret: str | None = SECRET,
    delivery: Mapping[str, Any] | None = None,
    schedule: Mapping[str, Any] | None = None,
    guard: Mapping[str, Any] | None = None,
    log_level: str = "INFO",
    log_format: str = "json",
) -> dict[str, dict[str, Any]]:
    """The sections of a test settings file, as a mapping a test may still change."""
    tray: dict[str, Any] = {"workflow_urls": list(urls)}
    if secret is not None:
        tray["shared_secret"] = secret
    sections: dict[str, dict[str, Any]] = {
        "database": {"url": database_url},
        "tray": tray,
        "engage": {"space_id": "spa_test"},
        "delivery": {**FAST_DELIVERY, **(delivery or {})},
        "logging": {"level": log_level, "format": log_format},
    }
    if schedule:
        sections["schedule"] = dict(schedule)
    if guard:
        sections["guard"] = dict(guard)
    return sections


def write_settings(path: Path, database_url: str, urls: Sequence[Any], **options: Any) -> Path:
    """Write a settings file for a subprocess run; return its path."""
    path.write_text(toml_text(settings_sections(database_url, urls, **options)), encoding="utf-8")
    return path


def cli_env(env: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment of a child: ours without any SYNCER_* variable, plus ``env``."""
    return child_environment(dict(env or {}))


def cli_command(*args: str, settings: Path | None = None) -> list[str]:
    """The argv of ``python -m syncer [--settings S] ARGS``."""
    command = [sys.executable, "-m", "syncer"]
    if settings is not None:
        command += ["--settings", str(settings)]
    return command + list(args)


def cli(
    *args: str,
    settings: Path | None = None,
    env: Mapping[str, str] | None = None,
    cwd: Path | None = None,
    timeout: float = CLI_TIMEOUT_SECONDS,
) -> Result:
    """Run the real ``syncer`` command to completion (in this process when it can: see
    tests.conftest.runs_in_process)."""
    argv = cli_command(*args, settings=settings)[3:]
    if runs_in_process(argv):
        return run_in_process(argv, cli_env(env), cwd)
    return subprocess.run(
        cli_command(*args, settings=settings),
        capture_output=True,
        text=True,
        errors="backslashreplace",  # undecodable output is shown, not a crash of the test
        env=cli_env(env),
        cwd=cwd,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
    )


def call_each(*calls: Callable[[], T]) -> list[T]:
    """Call independent functions one after another, on this thread; their results in order.

    On this thread, a command runs in this process (see tests.conftest.runs_in_process): a few
    hundredths of a second, where threads would start a child each, a second of imports on two
    shared cores.
    """
    return [call() for call in calls]


def cli_many(*commands: Sequence[str], settings: Path | None = None, **kwargs: Any) -> list[Result]:
    """Run several independent commands, with the same settings (see call_each)."""
    return call_each(*(partial(cli, *args, settings=settings, **kwargs) for args in commands))


def show(result: Result) -> str:
    """A failed assertion's explanation: the command, its status and its output."""
    return (
        f"$ {' '.join(map(str, result.args))}\nexit status {result.returncode}\n"
        f"--- stdout ---\n{result.stdout}\n--- stderr ---\n{result.stderr}"
    )


def json_out(result: Result) -> Any:
    """The JSON a successful ``--format json`` command printed."""
    assert result.returncode == 0, show(result)
    return json.loads(result.stdout)


def wait_until(
    condition: Callable[[], Any], timeout: float, what: str, interval: float = 0.05
) -> Any:
    """Poll ``condition`` until it is truthy (and return it); fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


def _log_time(event: Mapping[str, Any]) -> float:
    """The moment a JSON log line was written, in seconds since the epoch."""
    return datetime.fromisoformat(str(event["timestamp"]).replace("Z", "+00:00")).timestamp()


class DaemonProcess:
    """``syncer daemon`` as a real child process, its standard error logged to a file."""

    def __init__(self, settings: Path, log_path: Path, env: Mapping[str, str] | None = None):
        self.log_path = log_path
        self._log = log_path.open("wb")
        self.process = subprocess.Popen(
            cli_command("daemon", settings=settings),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=self._log,
            env=cli_env(env),
        )

    def stderr(self) -> str:
        return self.log_path.read_text(encoding="utf-8", errors="replace")

    def events(self) -> list[dict[str, Any]]:
        """Every JSON log line written so far (a line being written is skipped)."""
        found = []
        for line in self.stderr().splitlines():
            try:
                parsed = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(parsed, dict):
                found.append(parsed)
        return found

    def named(self, event: str) -> list[dict[str, Any]]:
        return [e for e in self.events() if e.get("event") == event]

    def wait_for_event(self, event: str, count: int = 1, timeout: float = 15) -> list[Any]:
        def enough() -> list[dict[str, Any]] | None:
            if self.process.poll() is not None:
                raise AssertionError(
                    f"daemon exited with {self.process.returncode} before {count} {event}:\n"
                    + self.stderr()
                )
            found = self.named(event)
            return found if len(found) >= count else None

        result: list[Any] = wait_until(enough, timeout, f"{count} {event} line(s)")
        return result

    @property
    def alive(self) -> bool:
        return self.process.poll() is None

    def stop(self, signum: int = signal.SIGTERM, timeout: float = 30) -> tuple[int, float]:
        """Send ``signum``; return the exit status and the seconds the daemon took to stop,
        measured by its own log (from ``daemon_stopping`` to ``daemon_stopped``).

        Measured inside the process, the figure is the daemon's own deadline at work, not the
        time a loaded machine takes to schedule a process's exit; ``timeout`` only catches a
        daemon that hangs.
        """
        self.process.send_signal(signum)
        try:
            code = self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(
                f"daemon still running {timeout}s after {signal.Signals(signum).name}:\n"
                + self.stderr()
            ) from None
        stopping, stopped = self.named("daemon_stopping"), self.named("daemon_stopped")
        assert stopping and stopped, self.stderr()
        return code, _log_time(stopped[-1]) - _log_time(stopping[0])

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=10)
        self._log.close()


@contextmanager
def running_daemon(
    settings: Path, log_path: Path, env: Mapping[str, str] | None = None
) -> Iterator[DaemonProcess]:
    """A daemon that is killed (by its own pid) however the test ends."""
    daemon = DaemonProcess(settings, log_path, env)
    try:
        yield daemon
    finally:
        daemon.kill()


@contextmanager
def sqlite_upstream(path: Path) -> Iterator[tuple[str, Upstream]]:
    """A migrated SQLite database at ``path`` and an upstream writer for it."""
    url = f"sqlite:///{path}"
    engine = create_database_engine(url)
    migrate(engine)
    try:
        yield url, Upstream(Store.open(engine))
    finally:
        engine.dispose()


def sync_in_process(database_url: str, urls: Sequence[str]) -> SyncReport:
    """A real sync run in this process: for setting the scene quicker than a process start."""
    engine = create_database_engine(database_url)
    sync = SyncEngine(make_settings(database_url, list(urls), **FAST_DELIVERY), Store.open(engine))
    try:
        return sync.run(SyncOptions())
    finally:
        sync.close()
        engine.dispose()


def dump_tables(database_url: str) -> str:
    """Every row of every table, as text: for looking for what must never be stored."""
    engine = create_database_engine(database_url)
    try:
        metadata = MetaData()
        metadata.reflect(engine)
        parts = []
        with engine.connect() as connection:
            for table in metadata.sorted_tables:
                rows = connection.execute(select(table)).all()
                parts.append(f"## {table.name}\n" + "\n".join(repr(tuple(r)) for r in rows))
        return "\n".join(parts)
    finally:
        engine.dispose()


def db_rows(database_url: str, table: str) -> list[dict[str, Any]]:
    """Every row of one table, as dicts."""
    engine = create_database_engine(database_url)
    try:
        metadata = MetaData()
        metadata.reflect(engine, only=[table])
        with engine.connect() as connection:
            return [dict(r._mapping) for r in connection.execute(select(metadata.tables[table]))]
    finally:
        engine.dispose()
