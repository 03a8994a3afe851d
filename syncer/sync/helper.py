"""The store's helper process, on SQLite: where the exchanges of a large delivery run.

On SQLite the database engine runs inside the syncer's own process, so every exchange's SQL,
and the Python around it, competes with the sender for the one interpreter: on this project's
benchmark the sending thread then had the interpreter for about five sixths of a first sync
(README, "Benchmarks"). A helper process with its own connection to the same file takes
that work, and the building of the bodies, to the machine's other core: a first sync of
200,000 memberships ran in 83 s instead of 109 s (interleaved runs, same sink). On PostgreSQL
the SQL already runs in the server, and a helper measured no faster: none is started there.

It is started in the background when a pair with many changes is about to be sent; until it
is ready, exchanges go on running on the database thread, so nothing waits for it. Should it
die, they go back to the thread for the rest of the engine's life: an exchange it was running
when it died either committed or rolled back, and recording the same outcomes again is
harmless (see :meth:`syncer.store.outbox.OutboxStore.exchange`).
"""

from __future__ import annotations

import asyncio
import gc
import multiprocessing
import os
import signal
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import Any, TypeVar

import structlog
from sqlalchemy import Engine

from syncer.store import Store
from syncer.store.database import create_database_engine

log = structlog.get_logger("syncer.helper")

T = TypeVar("T")

# A pair with fewer changes than this is sent without the helper: starting one costs half a
# second to a second and a half of the other core (the child imports SQLAlchemy and the
# store), which a delivery this small would not win back.
HELPER_MIN_CHANGES = 2_000

# How often the helper checks that its parent is still alive.
ORPHAN_CHECK_SECONDS = 0.5

_store: Store | None = None  # the helper process's own store


def _open_store(database_url: str, parent: int) -> None:
    # The parent says when the helper stops. Ctrl-C and a service manager's SIGTERM reach the
    # whole process group, and the helper must still record what the parent hands it then.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    threading.Thread(target=_exit_when_orphaned, args=(parent,), daemon=True).start()
    global _store
    _store = Store.open(create_database_engine(database_url))
    # What the helper imported lives until it exits; frozen, the final garbage collection
    # skips it, and the parent's close() waits a few hundredths of a second instead of a
    # quarter (see syncer.cli.console).
    gc.freeze()


def _exit_when_orphaned(parent: int) -> None:
    # A parent killed outright never says stop, and the helper holds both ends of the pipe it
    # reads its work from, so it would never see the end of it: it watches for itself. A
    # transaction cut short by the exit is rolled back by SQLite.
    while os.getppid() == parent:
        time.sleep(ORPHAN_CHECK_SECONDS)
    os._exit(0)


def _pid() -> int:
    return os.getpid()


def _call(function: Callable[..., T], args: tuple[Any, ...]) -> T:
    if _store is None:  # pragma: no cover - the initializer always runs first
        raise RuntimeError("the helper's store is not open")
    return function(_store, *args)


def helper_for(engine: Engine) -> StoreHelper | None:
    """A helper for ``engine``'s database if it is a SQLite file, else None."""
    url = engine.url
    if url.get_backend_name() != "sqlite" or url.database in (None, "", ":memory:"):
        return None
    return StoreHelper(url.render_as_string(hide_password=False))


class StoreHelper:
    """One helper process with its own store on the same database, started on first need."""

    def __init__(self, database_url: str) -> None:
        self._database_url = database_url
        self._pool: ProcessPoolExecutor | None = None
        self._started: Future[int] | None = None
        self.lost = False
        self.calls = 0  # calls the helper answered

    def start(self) -> None:
        """Start the process in the background, unless it was started (or lost) already."""
        if self._pool is not None or self.lost:
            return
        self._pool = ProcessPoolExecutor(
            max_workers=1,
            # Not fork: the parent has threads (database workers, the event loop's executor).
            mp_context=multiprocessing.get_context("spawn"),
            initializer=_open_store,
            initargs=(self._database_url, os.getpid()),
        )
        self._started = self._pool.submit(_pid)
        self._started.add_done_callback(self._check_started)

    def _check_started(self, started: Future[int]) -> None:
        if started.cancelled() or started.exception() is not None:
            error = None if started.cancelled() else started.exception()
            self._give_up(f"{type(error).__name__}: {error}"[:300] if error else "cancelled")

    def _give_up(self, reason: str) -> None:
        if not self.lost:
            self.lost = True
            log.warning("helper_lost", reason=reason, fallback="database thread")

    @property
    def started(self) -> bool:
        """Whether the process was ever asked to start."""
        return self._pool is not None

    @property
    def ready(self) -> bool:
        """True once the process is up, with its store open, and not lost since."""
        started = self._started
        return not self.lost and started is not None and started.done() and not started.cancelled()

    @property
    def pid(self) -> int | None:
        """The helper's process id, once it is ready."""
        return self._started.result() if self._started is not None and self.ready else None

    async def call(self, function: Callable[..., T], *args: Any) -> T | None:
        """``function(store, *args)`` in the helper, with the helper's store; None if the
        helper is (or just became) lost, and the caller should run it itself."""
        if self._pool is None or not self.ready:
            return None
        loop = asyncio.get_running_loop()
        try:
            result = await loop.run_in_executor(self._pool, _call, function, args)
        except BrokenProcessPool as error:
            self._give_up(f"the helper process died: {error}"[:300])
            return None
        self.calls += 1
        return result

    def close(self) -> None:
        """Stop the process, once what was handed to it is done."""
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
