"""What a person at a terminal sees of a sync: the real ``syncer sync`` in a pseudo-terminal,
its output played into a terminal emulator (pyte), and the screen read afterwards.

Per URL a bar that ends at 100% with done/total, a rate, the time left and the time taken; log
lines in the console format (the default at a terminal) above the bars, never inside one; and
JSON logs when standard error is not a terminal.
"""

from __future__ import annotations

import json
import os
import pty
import re
import select
import subprocess
import sys
import time
from pathlib import Path

import pyte

from syncer.store import Store
from syncer.testing.tray_standin import TrayStandin
from tests.conftest import Upstream, child_environment
from tests.integration.cli_helpers import cli, write_settings

MEMBERS = 3000
COLUMNS, LINES = 160, 50
TIMESTAMP = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d")


def run_in_terminal(args: list[str], timeout: float = 120) -> tuple[int, pyte.Screen]:
    """Run ``python -m syncer ARGS`` with a pseudo-terminal as its standard streams; return its
    exit status and the screen it left."""
    screen = pyte.Screen(COLUMNS, LINES)
    stream = pyte.ByteStream(screen)
    controller, terminal = pty.openpty()
    env = child_environment({"COLUMNS": str(COLUMNS), "LINES": str(LINES), "TERM": "xterm"})
    child = subprocess.Popen(
        [sys.executable, "-m", "syncer", *args],
        stdin=terminal,
        stdout=terminal,
        stderr=terminal,
        env=env,
        close_fds=True,
    )
    os.close(terminal)
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([controller], [], [], 0.2)
            if ready:
                try:
                    data = os.read(controller, 65536)
                except OSError:  # the child closed the terminal
                    break
                if not data:
                    break
                # A terminal turns each newline into a carriage return and a line feed.
                stream.feed(data)
            elif child.poll() is not None:
                break
        code = child.wait(timeout=max(1.0, deadline - time.monotonic()))
    finally:
        os.close(controller)
        if child.poll() is None:
            child.kill()
    return code, screen


def test_a_sync_at_a_terminal_shows_bars_with_rate_and_eta_and_logs_above_them(
    store: Store, upstream: Upstream, standin: TrayStandin, database_url: str, tmp_path: Path
) -> None:
    upstream.add_audience("aud_big", "Big Audience")
    upstream.add("aud_big", *(f"user-{n:05d}" for n in range(MEMBERS)))
    url = standin.url("/wf")
    settings = write_settings(tmp_path / "settings.toml", database_url, [url])
    text = settings.read_text().replace('format = "json"\n', "")  # the default, at a terminal
    settings.write_text(text)

    code, screen = run_in_terminal(["--settings", str(settings), "sync"])

    lines = [line.rstrip() for line in screen.display]
    shown = "\n".join(line for line in lines if line)
    assert code == 0, shown
    bars = [line for line in lines if line.startswith(url)]
    assert len(bars) == 1, f"one bar per URL, each line its own:\n{shown}"
    bar = bars[0]
    assert f"{MEMBERS}/{MEMBERS}" in bar, shown
    assert re.search(r"[\d,]+/s", bar) and "ETA" in bar and "elapsed" in bar, bar
    # Log lines start lines of their own, in the console format, and no bar shares them.
    logs = [line for line in lines if "sync_finished" in line]
    assert len(logs) == 1, shown
    assert TIMESTAMP.match(logs[0]) and "{" not in logs[0], logs[0]
    assert "━" not in logs[0]
    assert lines.index(logs[0]) < lines.index(bar)  # above the bar, which stays at the end
    assert any(line.startswith("run 1:") for line in lines), shown
    assert len(standin.received("/wf")) == MEMBERS


def test_logs_are_json_lines_when_standard_error_is_not_a_terminal(
    store: Store, upstream: Upstream, standin: TrayStandin, database_url: str, tmp_path: Path
) -> None:
    upstream.add_audience("aud_small", "Small Audience")
    upstream.add("aud_small", "u1")
    settings = write_settings(tmp_path / "settings.toml", database_url, [standin.url("/wf")])
    settings.write_text(settings.read_text().replace('format = "json"\n', ""))

    result = cli("sync", settings=settings)

    assert result.returncode == 0, result.stderr
    [finished] = [line for line in result.stderr.splitlines() if "sync_finished" in line]
    assert json.loads(finished)["event"] == "sync_finished"
