"""Logging: a library's logged exception is one line unless the level is DEBUG."""

from __future__ import annotations

import json
import logging

import pytest
import structlog

from syncer.logs import configure_logging


def _log_a_library_error() -> None:
    try:
        raise ConnectionError("connection socket closed\nwhile sending")
    except ConnectionError:
        logging.getLogger("sqlalchemy.pool.impl.QueuePool").error(
            "Exception during reset or similar", exc_info=True
        )


@pytest.mark.parametrize(
    ("level", "one_line"),
    [("INFO", True), ("WARNING", True), ("DEBUG", False)],
)
def test_library_exceptions_are_one_line_unless_debugging(
    level: str, one_line: bool, capsys: pytest.CaptureFixture[str]
) -> None:
    root = logging.getLogger()
    saved_handlers, saved_level = root.handlers[:], root.level
    saved_structlog = structlog.get_config()
    try:
        configure_logging(level, "json")
        _log_a_library_error()
    finally:
        root.handlers[:] = saved_handlers
        root.setLevel(saved_level)
        structlog.configure(**saved_structlog)
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1
    record = json.loads(lines[0])
    assert record["level"] == "error"
    assert record["logger"] == "sqlalchemy.pool.impl.QueuePool"
    if one_line:
        assert record["event"] == (
            "Exception during reset or similar: ConnectionError: connection socket closed "
            "while sending"
        )
        assert "exception" not in record
    else:
        assert "Traceback" in record["exception"]
