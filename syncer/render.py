"""Output for people (aligned tables) and for scripts (JSON), from the same records."""

from __future__ import annotations

import io
import json
import re
import shutil
import sys
from collections.abc import Sequence
from typing import Any

from rich.console import Console
from rich.table import Table

Column = tuple[str, str]  # (header, record key)
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def printable(value: Any, *, escape_controls: bool = False) -> Any:
    """``value`` with every string made safe to print: bytes that were not UTF-8 in the
    database (read as lone surrogates) are shown as ``\\xNN`` escapes instead of breaking output.
    """
    if isinstance(value, str):
        text = value.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
        if not escape_controls:
            return text
        # Control characters (a newline in a user id) would break a table's rows; JSON
        # escapes them itself.
        return _CONTROL.sub(lambda match: f"\\x{ord(match.group()):02x}", text)
    if isinstance(value, dict):
        return {printable(k): printable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [printable(item) for item in value]
    return value


def _cell(value: Any) -> str:
    value = printable(value, escape_controls=True)
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    return str(value)


def print_json(data: Any) -> None:
    """Write ``data`` as indented JSON to standard output."""
    sys.stdout.write(json.dumps(printable(data), indent=2, ensure_ascii=False, default=str) + "\n")


def print_table(rows: Sequence[dict[str, Any]], columns: Sequence[Column], title: str = "") -> None:
    """Write ``rows`` as an aligned table, one column per (header, key)."""
    table = Table(box=None, show_edge=False, pad_edge=False, title=title or None)
    for header, _ in columns:
        table.add_column(header, overflow="fold")
    for row in rows:
        table.add_row(*(_cell(row.get(key)) for _, key in columns))
    buffer = io.StringIO()
    console = Console(
        file=buffer,
        width=shutil.get_terminal_size((400, 24)).columns if sys.stdout.isatty() else 400,
        highlight=False,
        markup=False,
        emoji=False,
    )
    console.print(table)
    sys.stdout.write("\n".join(line.rstrip() for line in buffer.getvalue().splitlines()) + "\n")
