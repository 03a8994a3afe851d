"""The quick start: a real sync of sample data to a local stand-in for two Tray workflows.

Run by scripts/quickstart.sh. Uses ./settings.toml (SQLite in ./syncer.db), starts the stand-in
on 127.0.0.1:8765 (it checks every X-Signature and prints what it receives), syncs, changes some
memberships, shows a dry run, and syncs again so that only the changes go out.
"""

from __future__ import annotations

import socket
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

from syncer.settings import load_settings

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
SETTINGS = ROOT / "settings.toml"


def step(title: str) -> None:
    print(f"\n=== {title}", flush=True)


def syncer(*args: str) -> int:
    command = [sys.executable, "-m", "syncer", "--settings", str(SETTINGS), *args]
    print("$ syncer " + " ".join(args), flush=True)
    code = subprocess.call(command, cwd=ROOT)
    time.sleep(0.3)  # let the stand-in finish printing what it received
    return code


def wait_for_port(port: int) -> None:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        except OSError:
            time.sleep(0.1)
    raise SystemExit(f"the stand-in did not start on port {port}")


def main() -> int:
    settings = load_settings(SETTINGS)
    url = settings.database.url
    if not url.startswith("sqlite:///"):
        raise SystemExit("the quick start only runs on the SQLite database of ./settings.toml")
    database = Path(url.removeprefix("sqlite:///"))
    for leftover in (database, Path(f"{database}-wal"), Path(f"{database}-shm")):
        leftover.unlink(missing_ok=True)
    step(f"fresh demo database {database.name}; stand-in Tray workflows on 127.0.0.1:8765")
    standin = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "syncer.testing.tray_standin",
            "--port",
            "8765",
            "--secret",
            settings.tray.secret or "",
        ]
    )
    try:
        wait_for_port(8765)
        step("create the schema")
        syncer("migrate")
        step(
            "load sample audiences, memberships, a computed trait and orders "
            "(examples/sample_data.sql)"
        )
        with sqlite3.connect(database) as connection:
            connection.executescript((EXAMPLES / "sample_data.sql").read_text())
        step(
            "first sync: every member of every audience, and every trait value, goes to both "
            "workflows (the orders audience is settings.toml's query)"
        )
        first = syncer("sync")
        step("upstream changes memberships, trait values and orders (examples/changes.sql)")
        with sqlite3.connect(database) as connection:
            connection.executescript((EXAMPLES / "changes.sql").read_text())
        step("a dry run shows what would be sent, and sends nothing")
        syncer("sync", "--dry-run")
        step("second sync: only the changes go out")
        second = syncer("sync")
        step("why did the workflows get what they got about user_003? (`syncer explain`)")
        syncer("explain", "user_003")
        step(
            "replay the first run's deliveries to workflow-a into a fresh workflow "
            "(`syncer replay`: same bytes, same messageIds; a copy, no state changes)"
        )
        replayed = syncer("replay", "--run", "1", "--to", "http://127.0.0.1:8765/workflow-new")
        step("done: run `syncer --help` for every command; README.md explains the rest")
        return first or second or replayed
    finally:
        standin.terminate()
        standin.wait(timeout=10)


if __name__ == "__main__":
    sys.exit(main())
