"""``syncer daemon``: a sync at start, then on the schedule, until SIGTERM or SIGINT.

A thin APScheduler 3 wrapper around :class:`syncer.sync.SyncEngine`: the scheduler only decides
when; every run is the same tested function a manual ``syncer sync`` calls. With ``[http] port``
set, the status page, ``/metrics`` and ``/healthz`` are served beside it (:mod:`syncer.web`).
"""

from __future__ import annotations

import os
import signal
import threading
from datetime import UTC, datetime
from types import FrameType
from typing import TYPE_CHECKING

import structlog
from apscheduler.schedulers.blocking import BlockingScheduler
from apscheduler.triggers.cron import CronTrigger
from apscheduler.triggers.interval import IntervalTrigger

from syncer.settings import Settings
from syncer.sync import SyncEngine, SyncOptions, SyncReport, query_defined

if TYPE_CHECKING:
    from syncer.web import StatusServer

log = structlog.get_logger("syncer.daemon")

# On a stop signal, requests in flight get this long to be answered and recorded before the
# run is cancelled; what is then unanswered is sent again (same messageId) on the next run.
STOP_GRACE_SECONDS = 6.0
STOP_DEADLINE_SECONDS = 9.5


def make_trigger(settings: Settings) -> IntervalTrigger | CronTrigger:
    """The APScheduler trigger for ``[schedule]``: an interval, or a cron expression in UTC."""
    if settings.schedule.cron is not None:
        return CronTrigger.from_crontab(settings.schedule.cron, timezone=UTC)
    seconds = settings.schedule.interval_seconds or 900.0
    return IntervalTrigger(seconds=seconds, timezone=UTC)


class Daemon:
    """Runs syncs on a schedule, never two at once, and stops cleanly on a signal."""

    def __init__(self, settings: Settings, engine: SyncEngine) -> None:
        self.settings = settings
        self.engine = engine
        self.stopping = threading.Event()
        self.idle = threading.Event()
        self.idle.set()
        self.scheduler = BlockingScheduler(
            timezone=UTC,
            job_defaults={"coalesce": True, "max_instances": 1, "misfire_grace_time": None},
        )
        # The status page, /metrics and /healthz, when [http] port is set.
        self.web: StatusServer | None = None

    def run_once(self) -> None:
        """One scheduled run; a failure is logged and the schedule goes on."""
        if self.stopping.is_set():
            return
        self.idle.clear()
        report: SyncReport | None = None
        try:
            report = self.engine.run(SyncOptions(trigger="schedule"))
        except BaseException as error:  # a failed or cancelled run must never stop the daemon
            if self.stopping.is_set():
                log.info("sync_stopped", reason=f"{type(error).__name__}")
            else:
                log.error("sync_failed", error=f"{type(error).__name__}: {error}"[:500])
        finally:
            self.idle.set()
        if self.web is not None and not self.stopping.is_set():
            self.web.record_run(report)

    def _on_signal(self, signum: int, _frame: FrameType | None) -> None:
        if self.stopping.is_set():
            return
        log.info("daemon_stopping", signal=signal.Signals(signum).name)
        self.stopping.set()
        self.engine.request_stop(grace_seconds=STOP_GRACE_SECONDS)
        self.scheduler.shutdown(wait=False)

    def serve(self) -> int:
        """Block until stopped by SIGTERM or SIGINT; return the exit status (0)."""
        if self.settings.http.port is not None:
            # Loaded only when serving (Jinja2, prometheus_client). Listening comes first: an
            # address in use is a settings error, before any run starts.
            from syncer.web import StatusServer

            self.web = StatusServer(
                self.settings,
                self.engine.store,
                self.engine.context.holder,
                query_defined(self.settings),
            )
            self.web.start()
        signal.signal(signal.SIGTERM, self._on_signal)
        signal.signal(signal.SIGINT, self._on_signal)
        trigger = make_trigger(self.settings)
        self.scheduler.add_job(
            self.run_once, trigger, id="sync", name="sync", next_run_time=datetime.now(UTC)
        )
        log.info(
            "daemon_started",
            cron=self.settings.schedule.cron,
            interval_seconds=self.settings.schedule.interval_seconds,
            urls=len(self.settings.tray.urls),
        )
        self.scheduler.start()
        if self.web is not None:
            self.web.stop()
        if not self.idle.wait(STOP_DEADLINE_SECONDS):
            # Whatever is still running was cancelled and cannot be waited for any longer;
            # nothing is lost: unrecorded requests are sent again, same messageId, next run.
            log.warning("daemon_stop_deadline_passed")
            log.info("daemon_stopped")
            os._exit(0)
        log.info("daemon_stopped")
        return 0
