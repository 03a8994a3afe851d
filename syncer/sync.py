"""One sync run: plan every (URL, audience) in SQL, then deliver each URL's outbox.

Each workflow URL is served by its own task, so a URL that is slow or down never holds up the
others; within a URL the audiences go one after the other, each under a lease in the database so
that two syncers never work on the same (URL, audience) at once.
"""

from __future__ import annotations

import asyncio
import os
import socket
import time
import uuid
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import timedelta
from functools import partial
from typing import Protocol, TypeVar

import structlog

from syncer.core.outcomes import OutcomeKind
from syncer.core.payload import (
    Computation,
    TraitChange,
    identify_body,
    message_id,
    user_input_problem,
)
from syncer.core.traits import AudienceIdentity, KeyProblem, resolve_keys
from syncer.delivery.sender import Attempted, Outgoing, RetryPolicy, UrlSender, pump
from syncer.delivery.transport import HttpxTransport, Transport
from syncer.errors import ConfigError
from syncer.settings import Settings
from syncer.store.repository import (
    AudienceRow,
    FailedChange,
    QueuedChange,
    Repository,
    RunCounts,
)

log = structlog.get_logger("syncer.sync")

LEASE_TTL = timedelta(minutes=2)
T = TypeVar("T")


@dataclass(frozen=True)
class SyncOptions:
    """What one run is asked to do."""

    audience: str | None = None
    full: bool = False
    dry_run: bool = False
    trigger: str = "manual"


@dataclass
class PairReport:
    """What one run did for one (URL, audience)."""

    url: str
    audience_id: str
    key: str
    entered: int = 0
    exited: int = 0
    delivered: int = 0
    pending: int = 0
    rejected: int = 0
    note: str = ""


@dataclass
class SyncReport:
    """What one run did, for the summary, the exit status and the runs table."""

    run_id: int | None
    pairs: list[PairReport] = field(default_factory=list)
    problems: list[KeyProblem] = field(default_factory=list)
    duration_seconds: float = 0.0

    @property
    def counts(self) -> RunCounts:
        """The run's totals, counted per workflow URL."""
        return RunCounts(
            audiences=len({pair.audience_id for pair in self.pairs}),
            entered=sum(pair.entered for pair in self.pairs),
            exited=sum(pair.exited for pair in self.pairs),
            delivered=sum(pair.delivered for pair in self.pairs),
            pending=sum(pair.pending for pair in self.pairs),
            rejected=sum(pair.rejected for pair in self.pairs),
        )

    @property
    def fully_delivered(self) -> bool:
        """True when no change was left pending or rejected."""
        counts = self.counts
        return (
            counts.pending == 0
            and counts.rejected == 0
            and not any(pair.note.startswith("busy") for pair in self.pairs)
        )


class Progress(Protocol):
    """Told how far a run has got, e.g. to draw a progress bar on a terminal."""

    def planned(self, url: str, changes: int) -> None:
        """``changes`` more changes are queued for ``url``."""

    def advanced(self, url: str, changes: int) -> None:
        """``changes`` more changes for ``url`` were answered, for better or worse."""


class _NoProgress:
    def planned(self, url: str, changes: int) -> None:
        pass

    def advanced(self, url: str, changes: int) -> None:
        pass


DryRunEmitter = Callable[[str, str, str, str], None]


def select_audiences(
    rows: list[AudienceRow], keys: dict[str, str], wanted: str | None
) -> list[AudienceRow]:
    """The audiences a run covers: all enabled ones, or the one named by id or key."""
    if wanted is None:
        return [row for row in rows if row.enabled]
    for row in rows:
        if wanted in (row.audience_id, keys.get(row.audience_id), row.key):
            return [row]
    raise ConfigError(f"--audience: no audience has the id or key {wanted!r}")


class SyncEngine:
    """Runs syncs against one database and one set of workflow URLs."""

    def __init__(
        self,
        settings: Settings,
        repository: Repository,
        transport_factory: Callable[[], Transport] | None = None,
    ) -> None:
        self.settings = settings
        self.repository = repository
        self._transport_factory = transport_factory or (
            lambda: HttpxTransport(
                timeout_seconds=settings.delivery.timeout_seconds,
                max_connections=settings.delivery.concurrency,
            )
        )
        self._holder = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        workers = 1 if repository.engine.dialect.name == "sqlite" else 4
        self._executor = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="syncer-db")

    def close(self) -> None:
        """Stop the database worker threads."""
        self._executor.shutdown(wait=True)

    async def _db(self, function: Callable[..., T], *args: object, **kwargs: object) -> T:
        # Database calls run on worker threads so that one URL's SQL never stalls another's HTTP.
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, partial(function, *args, **kwargs))

    def _resolve(self, options: SyncOptions) -> tuple[list[tuple[AudienceRow, str]], SyncReport]:
        rows = self.repository.load_audiences()
        resolution = resolve_keys(
            [AudienceIdentity(row.audience_id, row.name, row.key) for row in rows],
            self.repository.locked_keys(),
        )
        chosen = select_audiences(rows, resolution.keys, options.audience)
        chosen_ids = {row.audience_id for row in chosen}
        report = SyncReport(run_id=None)
        report.problems = [p for p in resolution.problems if p.audience_id in chosen_ids]
        if options.audience is not None and chosen and not chosen[0].enabled:
            report.problems.append(KeyProblem(chosen[0].audience_id, "audience is disabled"))
        syncable = [
            (row, resolution.keys[row.audience_id])
            for row in chosen
            if row.enabled and row.audience_id in resolution.keys
        ]
        for problem in report.problems:
            log.warning("audience_skipped", audience_id=problem.audience_id, reason=problem.reason)
        return syncable, report

    def run(
        self,
        options: SyncOptions,
        progress: Progress | None = None,
        emit: DryRunEmitter | None = None,
    ) -> SyncReport:
        """Run one sync to completion (or cancellation) and return what it did."""
        return asyncio.run(self.run_async(options, progress, emit))

    async def run_async(
        self,
        options: SyncOptions,
        progress: Progress | None = None,
        emit: DryRunEmitter | None = None,
    ) -> SyncReport:
        """The body of :meth:`run`, for callers that already have an event loop."""
        started = time.monotonic()
        syncable, report = await self._db(self._resolve, options)
        urls = self.settings.tray.workflow_urls
        if options.dry_run:
            await self._db(self._dry_run, syncable, urls, options, emit or (lambda *_: None))
            report.duration_seconds = time.monotonic() - started
            return report
        destination_ids = await self._db(self.repository.ensure_destinations, urls)
        locked: list[tuple[AudienceRow, str]] = []
        for row, key in syncable:
            if await self._db(self.repository.lock_key, row.audience_id, key):
                locked.append((row, key))
            else:
                report.problems.append(KeyProblem(row.audience_id, f"key {key!r} was just taken"))
        report.run_id = await self._db(self.repository.start_run, options.trigger)
        namespace = await self._db(self.repository.message_namespace)
        transport = self._transport_factory()
        status, error = "failed", None
        try:
            results = await asyncio.gather(
                *(
                    self._sync_url(
                        url,
                        destination_ids[url],
                        locked,
                        options,
                        namespace,
                        transport,
                        progress or _NoProgress(),
                    )
                    for url in urls
                )
            )
            report.pairs = [pair for url_pairs in results for pair in url_pairs]
            status = "ok" if report.fully_delivered else "partial"
        except BaseException as failure:
            error = f"{type(failure).__name__}: {failure}"[:500]
            status = "cancelled" if isinstance(failure, asyncio.CancelledError) else "failed"
            raise
        finally:
            await transport.aclose()
            report.duration_seconds = time.monotonic() - started
            await asyncio.shield(
                self._db(self.repository.finish_run, report.run_id, status, report.counts, error)
            )
        counts = report.counts
        log.info(
            "sync_finished",
            run_id=report.run_id,
            trigger=options.trigger,
            status=status,
            audiences=counts.audiences,
            entered=counts.entered,
            exited=counts.exited,
            delivered=counts.delivered,
            pending=counts.pending,
            rejected=counts.rejected,
            skipped_audiences=len(report.problems),
            duration_seconds=round(report.duration_seconds, 3),
        )
        return report

    def _dry_run(
        self,
        syncable: list[tuple[AudienceRow, str]],
        urls: list[str],
        options: SyncOptions,
        emit: DryRunEmitter,
    ) -> None:
        known = self.repository.find_destinations(urls)
        for url in urls:
            for row, key in syncable:
                for batch in self.repository.stream_desired(
                    known.get(url),
                    row.audience_id,
                    full=options.full,
                    batch_size=self.settings.delivery.batch_size,
                ):
                    for user_id, value in batch:
                        emit(url, key, user_id, value)

    async def _sync_url(
        self,
        url: str,
        destination_id: int,
        audiences: list[tuple[AudienceRow, str]],
        options: SyncOptions,
        namespace: uuid.UUID,
        transport: Transport,
        progress: Progress,
    ) -> list[PairReport]:
        delivery = self.settings.delivery
        sender = UrlSender(
            url,
            transport,
            RetryPolicy(
                max_attempts=delivery.max_attempts,
                backoff_base_seconds=delivery.backoff_base_seconds,
                backoff_max_seconds=delivery.backoff_max_seconds,
                retry_after_max_seconds=delivery.retry_after_max_seconds,
            ),
            self.settings.tray.secret,
        )
        reports = []
        for row, key in audiences:
            report = PairReport(url=url, audience_id=row.audience_id, key=key)
            reports.append(report)
            lease = f"pair:{destination_id}:{row.audience_id}"
            if not await self._db(self.repository.acquire_lease, lease, self._holder, LEASE_TTL):
                report.note = "busy: another syncer is working on it"
                log.warning("pair_busy", url=url, audience_id=row.audience_id)
                continue
            try:
                await self._sync_pair(
                    sender, destination_id, row, key, options, namespace, progress, report
                )
            finally:
                await asyncio.shield(self._db(self.repository.release_lease, lease, self._holder))
        return reports

    async def _sync_pair(
        self,
        sender: UrlSender,
        destination_id: int,
        row: AudienceRow,
        key: str,
        options: SyncOptions,
        namespace: uuid.UUID,
        progress: Progress,
        report: PairReport,
    ) -> None:
        repository = self.repository
        planned = await self._db(
            repository.plan, destination_id, row.audience_id, full=options.full
        )
        report.entered, report.exited = planned.entered, planned.exited
        progress.planned(sender.url, planned.entered + planned.exited)
        computation = Computation("audience", row.audience_id, key, self.settings.engage.space_id)
        lease = f"pair:{destination_id}:{row.audience_id}"

        async def record(results: list[tuple[QueuedChange, Attempted]]) -> None:
            accepted: list[tuple[QueuedChange, str]] = []
            retryable: list[FailedChange] = []
            rejected: list[FailedChange] = []
            for change, outcome in results:
                if outcome.kind is OutcomeKind.DELIVERED:
                    accepted.append((change, message_id(namespace, change.change_id)))
                    continue
                failure = FailedChange(change, outcome.attempts, outcome.status, outcome.detail)
                (retryable if outcome.kind is OutcomeKind.RETRYABLE else rejected).append(failure)
            await self._db(
                repository.record_outcomes,
                destination_id,
                row.audience_id,
                accepted=accepted,
                retryable=retryable,
                rejected=rejected,
            )
            report.delivered += len(accepted)
            progress.advanced(sender.url, len(results))

        async def outgoing() -> AsyncIterator[Outgoing[QueuedChange]]:
            after = 0
            while not sender.unavailable:
                batch = await self._db(
                    repository.queued_batch,
                    destination_id,
                    row.audience_id,
                    after_id=after,
                    limit=self.settings.delivery.batch_size,
                )
                if not batch:
                    return
                after = batch[-1].change_id
                invalid = []
                for change in batch:
                    problem = user_input_problem(change.user_id, change.anonymous_id, change.email)
                    if problem is not None:
                        invalid.append(FailedChange(change, 0, None, f"invalid input: {problem}"))
                        continue
                    body = identify_body(
                        computation,
                        TraitChange(
                            change.change_id,
                            change.user_id,
                            change.anonymous_id,
                            change.email,
                            change.value,
                            change.created_at,
                        ),
                        namespace,
                    )
                    yield Outgoing(change, body)
                if invalid:
                    log.warning(
                        "invalid_rows_skipped",
                        audience_id=row.audience_id,
                        count=len(invalid),
                        first=invalid[0].error,
                    )
                    await self._db(
                        repository.record_outcomes,
                        destination_id,
                        row.audience_id,
                        accepted=[],
                        retryable=[],
                        rejected=invalid,
                    )
                    progress.advanced(sender.url, len(invalid))
                # Renewing once a batch keeps the lease alive however long the pair takes.
                await self._db(repository.acquire_lease, lease, self._holder, LEASE_TTL)

        if not sender.unavailable:
            await pump(
                sender,
                outgoing(),
                concurrency=self.settings.delivery.concurrency,
                record=record,
            )
        remaining = await self._db(repository.queued_counts, destination_id, row.audience_id)
        report.rejected = await self._db(repository.rejected_count, destination_id, row.audience_id)
        report.pending = remaining.entered + remaining.exited - report.rejected
        if sender.unavailable:
            report.note = "URL unavailable this run; changes kept for the next run"
