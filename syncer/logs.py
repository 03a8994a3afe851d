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


def configure_logging(level: str = "INFO", fmt: str = "json") -> None:
    """Set up structlog, and route the standard logging module through it."""
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
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=False,
    )
    handler = logging.StreamHandler(sys.stderr)
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
