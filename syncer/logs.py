"""Structured logs on standard error: JSON lines for machines, or key=value for people.

Libraries that log through the standard ``logging`` module (APScheduler, Alembic) are rendered
by the same processors, so the stream stays one format.
"""

from __future__ import annotations

import logging
import sys

import structlog


class LibraryTracebacksOnOneLine(logging.Filter):
    """A library's logged exception becomes one line: its message, the error's type and text.

    SQLAlchemy's pool logs at ERROR, with the traceback, a connection it could not reset after
    the database dropped it mid-statement; the syncer itself reports such an outage in one line
    and carries on. The traceback stays for DEBUG, where this filter is not installed.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and record.exc_info[1] is not None:
            error = record.exc_info[1]
            text = " ".join(str(error).split())[:300]
            record.msg = f"{record.getMessage()}: {type(error).__name__}: {text}"
            record.args = None
            record.exc_info = None
            record.exc_text = None
        return True


class _CurrentStderrHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """Writes to whatever ``sys.stderr`` is when a record is emitted, not when the handler was
    made: while a progress display is on screen, rich puts a proxy there that prints each line
    above the bars instead of into them."""

    def emit(self, record: logging.LogRecord) -> None:
        self.stream = sys.stderr
        super().emit(record)


def _print_logger(*_args: object) -> structlog.PrintLogger:
    # Made for each message (loggers are not cached): the current stderr, as above.
    return structlog.PrintLogger(file=sys.stderr)


def resolve_format(fmt: str | None) -> str:
    """The log format to use: as set, or, when unset, ``console`` for a person at a terminal
    and ``json`` for anything else (a file, a pipe, a log shipper)."""
    if fmt is not None:
        return fmt
    return "console" if sys.stderr.isatty() else "json"


def configure_logging(level: str = "INFO", fmt: str | None = None) -> None:
    """Set up structlog, and route the standard logging module through it. ``fmt``: "json",
    "console", or None for :func:`resolve_format`'s choice."""
    fmt = resolve_format(fmt)
    renderer: structlog.typing.Processor = (
        structlog.processors.JSONRenderer()
        if fmt == "json"
        else structlog.dev.ConsoleRenderer(colors=False)
    )
    shared: list[structlog.typing.Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    structlog.configure(
        processors=[*shared, structlog.processors.format_exc_info, renderer],
        wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelName(level)),
        logger_factory=_print_logger,
        cache_logger_on_first_use=False,
    )
    handler = _CurrentStderrHandler(sys.stderr)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            processors=[
                structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                structlog.processors.format_exc_info,
                renderer,
            ],
            foreign_pre_chain=[*shared, structlog.stdlib.add_logger_name],
        )
    )
    if logging.getLevelName(level) > logging.DEBUG:
        handler.addFilter(LibraryTracebacksOnOneLine())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    # Library chatter (APScheduler announces every job run) only from WARNING up.
    root.setLevel(max(logging.getLevelName(level), logging.WARNING))
