"""``/metrics``: the syncer in the Prometheus text format, on a registry of its own.

Two kinds of figures. Counters of what this daemon's runs did (changes sent per URL and
outcome, from the change log of each run; entries and exits planned, from the run's report; run
durations) are kept in the process, and start from zero at each start, as Prometheus counters
do. Gauges of what the database holds now (backlogs, the oldest pending change, the last
successful run, runs by status, sizes, URLs failing) are read at each scrape by a collector, so
they are right whichever process did the work.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from datetime import UTC, datetime
from threading import Lock
from typing import TYPE_CHECKING

import structlog
from prometheus_client import CollectorRegistry, Counter, Histogram, disable_created_metrics
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.metrics_core import GaugeMetricFamily, Metric
from sqlalchemy.exc import SQLAlchemyError

from syncer.core.states import ChangeStatus, Kind, LogOutcome
from syncer.store.status import StatusStore
from syncer.web.urls import ConfiguredUrls

if TYPE_CHECKING:
    from syncer.sync.reports import SyncReport

log = structlog.get_logger("syncer.web")

CONTENT_TYPE = CONTENT_TYPE_LATEST
# Runs take from under a second (nothing changed) to an hour (a first sync of millions).
DURATION_BUCKETS = (0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, 3600)


def unix_seconds(moment: datetime) -> float:
    """A naive UTC datetime, as the tables store them, in seconds since the epoch."""
    return moment.replace(tzinfo=UTC).timestamp()


class DatabaseCollector:
    """The gauges read from the database at each scrape (see the module's docstring)."""

    def __init__(
        self, status: StatusStore, urls: ConfiguredUrls, clock: Callable[[], datetime]
    ) -> None:
        self.status = status
        self.urls = urls
        self.clock = clock

    def collect(self) -> Iterable[Metric]:
        """The gauges, or ``syncer_database_up 0`` alone when the database cannot be read."""
        up = GaugeMetricFamily(
            "syncer_database_up", "1 when the database answered this scrape, else 0"
        )
        try:
            overview = self.status.overview()
        except SQLAlchemyError as error:
            # A scrape must answer: the failure is the figure (and the reason is logged).
            log.warning("metrics_database_error", error=type(error).__name__)
            up.add_metric([], 0)
            yield up
            return
        up.add_metric([], 1)
        yield up
        now = self.clock()
        backlog = GaugeMetricFamily(
            "syncer_backlog_changes",
            "Changes owed to a URL (syncer_outbox), by status",
            labels=["url", "status"],
        )
        oldest = GaugeMetricFamily(
            "syncer_oldest_pending_change_age_seconds",
            "How long the oldest pending change to a URL has waited (0: none pending)",
            labels=["url"],
        )
        failed_runs = GaugeMetricFamily(
            "syncer_url_failed_runs",
            "Runs in a row that gave up on a URL (down or refusing everything)",
            labels=["url"],
        )
        refusing = GaugeMetricFamily(
            "syncer_url_refusing",
            "1 while a URL refuses everything (401/403/404/410), else 0",
            labels=["url"],
        )
        url_success = GaugeMetricFamily(
            "syncer_url_last_success_timestamp_seconds",
            "When a run last reached a URL (unix seconds)",
            labels=["url"],
        )
        held = GaugeMetricFamily(
            "syncer_held_pairs",
            "Audiences and traits the mass-exit guard holds for a URL, awaiting approval",
            labels=["url"],
        )
        held_by_destination: dict[int, int] = {}
        for pair in overview.held:
            held_by_destination[pair.destination_id] = (
                held_by_destination.get(pair.destination_id, 0) + 1
            )
        for url, row in self.urls.rows(overview.destinations).items():
            owed = overview.backlog_of(row.id) if row is not None else None
            for status in ChangeStatus:
                backlog.add_metric([url, status.value], getattr(owed, status.value, 0))
            age = owed.oldest_pending_age(now) if owed is not None else None
            oldest.add_metric([url], age or 0.0)
            failed_runs.add_metric([url], row.failed_runs if row is not None else 0)
            refusing.add_metric([url], int(row is not None and row.refused_status is not None))
            held.add_metric([url], held_by_destination.get(row.id, 0) if row is not None else 0)
            if row is not None and row.last_success_at is not None:
                url_success.add_metric([url], unix_seconds(row.last_success_at))
        yield from (backlog, oldest, failed_runs, refusing, url_success, held)

        last_ok = GaugeMetricFamily(
            "syncer_last_successful_run_timestamp_seconds",
            "When the last run that left nothing owed finished (unix seconds)",
        )
        if overview.last_ok_at is not None:
            last_ok.add_metric([], unix_seconds(overview.last_ok_at))
        yield last_ok
        last_duration = GaugeMetricFamily(
            "syncer_last_run_duration_seconds", "How long the last finished run took"
        )
        finished = overview.last_finished_run
        if finished is not None and finished.duration_seconds is not None:
            last_duration.add_metric([], finished.duration_seconds)
        yield last_duration
        runs = GaugeMetricFamily(
            "syncer_runs", "Runs recorded in syncer_runs, by status", labels=["status"]
        )
        for run_status, count in sorted(overview.runs_by_status.items()):
            runs.add_metric([run_status], count)
        yield runs
        members = GaugeMetricFamily(
            "syncer_members",
            "Members of an audience (users with a value, of a trait) at the last run that "
            "synced it",
            labels=["kind", "id"],
        )
        for (kind, subject_id), point in sorted(overview.latest_sizes.items()):
            members.add_metric([kind, subject_id], point.members)
        yield members


class SyncerMetrics:
    """The daemon's metrics: counters it keeps, and the database's gauges."""

    def __init__(
        self,
        status: StatusStore,
        urls: ConfiguredUrls,
        holder: str,
        clock: Callable[[], datetime],
    ) -> None:
        # Prometheus derives the start from the process's own metrics; a _created series per
        # label set would only double the page.
        disable_created_metrics()  # type: ignore[no-untyped-call]
        self.status = status
        self.urls = urls
        self.holder = holder
        self.registry = CollectorRegistry(auto_describe=False)
        self.changes = Counter(
            "syncer_changes",
            "Outcomes recorded for changes sent to a URL by this daemon's runs (change log)",
            ["url", "outcome"],
            registry=self.registry,
        )
        self.entries = Counter(
            "syncer_planned_entries",
            "Entries (traits: new values) this daemon's runs planned, per URL",
            ["url", "kind"],
            registry=self.registry,
        )
        self.exits = Counter(
            "syncer_planned_exits",
            "Exits (traits: values gone) this daemon's runs planned, per URL",
            ["url", "kind"],
            registry=self.registry,
        )
        self.durations = Histogram(
            "syncer_run_duration_seconds",
            "How long this daemon's runs took",
            buckets=DURATION_BUCKETS,
            registry=self.registry,
        )
        # Every series exists from the start at 0, so that rate() sees its first increase.
        for url in urls.urls:
            for outcome in LogOutcome:
                self.changes.labels(url, outcome.value)
            for kind in Kind:
                self.entries.labels(url, kind.value)
                self.exits.labels(url, kind.value)
        self.registry.register(DatabaseCollector(status, urls, clock))
        # The holder is new with each process: none of its runs can predate these counters.
        self._counted_up_to = 0
        self._lock = Lock()

    def record_run(self, report: SyncReport | None) -> None:
        """Count what the runs this daemon finished since the last call did: the change log
        of each, and the entries and exits ``report`` (of the run just done; None when it
        failed) planned."""
        with self._lock:
            finished = self.status.finished_runs_of(self.holder, self._counted_up_to)
            names = self.urls.names(self.status.destinations()) if finished else {}
            for run in finished:
                for destination_id, outcome, count in self.status.outcomes_of_run(run.id):
                    url = names.get(destination_id)
                    if url is not None:
                        self.changes.labels(url, outcome).inc(count)
                if run.duration_seconds is not None:
                    self.durations.observe(run.duration_seconds)
                self._counted_up_to = run.id
            if report is not None:
                for pair in report.pairs:
                    if pair.url in self.urls.canonical:
                        self.entries.labels(pair.url, pair.kind.value).inc(pair.entered)
                        self.exits.labels(pair.url, pair.kind.value).inc(pair.exited)

    def exposition(self) -> bytes:
        """The metrics in the Prometheus text format (CONTENT_TYPE)."""
        return generate_latest(self.registry)
