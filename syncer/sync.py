"""One sync run: plan every (URL, audience) in SQL, then deliver each URL's outbox.

Each workflow URL is served by its own task, so a URL that is slow or down never holds up the
others. Within a URL, owed privacy deletes go first, then the audiences one after the other, each
under a lease in the database so that two syncers never work on the same (URL, audience) at once.
"""

from __future__ import annotations

import asyncio
import os
import socket
import ssl
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable, Coroutine, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import asdict, dataclass, field
from datetime import timedelta
from functools import partial
from typing import Protocol, TypeVar

import certifi
import structlog

from syncer.core.outcomes import OutcomeKind
from syncer.core.payload import (
    Computation,
    TraitChange,
    delete_body,
    identify_body,
    message_id,
    user_input_problem,
)
from syncer.core.traits import KeyProblem
from syncer.delivery.sender import Attempted, Outgoing, RetryPolicy, UrlSender, pump
from syncer.delivery.transport import HttpxTransport, Transport
from syncer.errors import ConfigError
from syncer.settings import Settings
from syncer.store.repository import (
    STATUS_PARKED,
    STATUS_PENDING,
    STATUS_REJECTED,
    AudienceRow,
    FailedChange,
    PendingDeletion,
    QueuedChange,
    Repository,
    RunCounts,
)

log = structlog.get_logger("syncer.sync")

T = TypeVar("T")


async def gather_or_cancel(coroutines: Sequence[Coroutine[object, object, T]]) -> list[T]:
    """Run the coroutines concurrently and return their results in order.

    If one raises, the others are cancelled (so that nothing goes on using clients about to be
    closed) and its exception is raised as it is, not wrapped in an ExceptionGroup.
    """
    try:
        async with asyncio.TaskGroup() as group:
            tasks = [group.create_task(coroutine) for coroutine in coroutines]
    except BaseExceptionGroup as failures:
        raise failures.exceptions[0] from None
    return [task.result() for task in tasks]


def holder_is_dead(holder: str) -> bool:
    """True when a lease holder ("host:pid:nonce") ran on this machine and its process is gone."""
    host, _, rest = holder.partition(":")
    pid_text = rest.partition(":")[0]
    if host != socket.gethostname() or not pid_text.isdigit():
        return False
    try:
        os.kill(int(pid_text), 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


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
    rejected: int = 0  # refused for good this time; tried again next run
    parked: int = 0  # rejected too often, or invalid input: waits for `syncer retry`
    note: str = ""

    @property
    def untouched(self) -> bool:
        """True when this run left the pair alone: another syncer had it, or the guard held it."""
        return self.note.startswith(("busy", "held"))


@dataclass
class DeletionReport:
    """What one run did with the privacy deletes owed to one URL."""

    url: str
    delivered: int = 0
    pending: int = 0


@dataclass
class SyncReport:
    """What one run did, for the summary, the exit status and the runs table."""

    run_id: int | None
    pairs: list[PairReport] = field(default_factory=list)
    deletions: list[DeletionReport] = field(default_factory=list)
    problems: list[KeyProblem] = field(default_factory=list)
    held: dict[str, str] = field(default_factory=dict)
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
            parked=sum(pair.parked for pair in self.pairs),
        )

    @property
    def fully_delivered(self) -> bool:
        """True when no change or delete was left pending or rejected.

        Parked changes do not count: they are reported, and wait for `syncer retry`, but no
        later run would deliver them by itself, so they must not make every run a failure.
        """
        counts = self.counts
        return (
            counts.pending == 0
            and counts.rejected == 0
            and not any(pair.untouched for pair in self.pairs)
            and not self.held
            and not any(report.pending for report in self.deletions)
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
        if row.is_named(wanted, keys):
            return [row]
    raise ConfigError(f"--audience: no audience has the id or key {wanted!r}")


class SyncEngine:
    """Runs syncs and privacy deletes against one database and one set of workflow URLs."""

    def __init__(
        self,
        settings: Settings,
        repository: Repository,
        transport_factory: Callable[[], Transport] | None = None,
    ) -> None:
        self.settings = settings
        self.repository = repository
        self._transport_factory = transport_factory or self._default_transport
        self._tls: ssl.SSLContext | None = None
        self._holder = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        workers = 1 if repository.engine.dialect.name == "sqlite" else 4
        self._executor = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="syncer-db")
        self._lease_ttl = timedelta(seconds=settings.delivery.lease_seconds)
        self._senders: list[UrlSender] = []
        self._stopping = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._task: asyncio.Task[object] | None = None

    def _default_transport(self) -> Transport:
        # Building a TLS context costs tens of milliseconds: one serves every URL and run.
        if self._tls is None:
            self._tls = ssl.create_default_context(cafile=certifi.where())
        return HttpxTransport(
            timeout_seconds=self.settings.delivery.timeout_seconds,
            max_connections=self.settings.delivery.concurrency,
            tls=self._tls,
        )

    def close(self) -> None:
        """Stop the database worker threads."""
        self._executor.shutdown(wait=True)

    def request_stop(self, grace_seconds: float | None = None) -> None:
        """Ask a run in progress (from any thread) to send nothing new and settle what is in flight.

        Requests already sent are awaited and recorded; changes not yet sent stay queued. With
        ``grace_seconds``, a run still busy after that long is cancelled: what was answered is
        recorded, and what was not is sent again, with the same messageId, on the next run.
        """
        self._stopping.set()
        for sender in list(self._senders):
            sender.stop()
        loop, task = self._loop, self._task
        if grace_seconds is not None and loop is not None and task is not None:
            timer = threading.Timer(grace_seconds, lambda: loop.call_soon_threadsafe(task.cancel))
            timer.daemon = True
            timer.start()

    async def _db(self, function: Callable[..., T], *args: object, **kwargs: object) -> T:
        # Database calls run on worker threads so that one URL's SQL never stalls another's HTTP.
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, partial(function, *args, **kwargs))

    def _take_lease(self, name: str) -> bool:
        repository = self.repository
        if repository.acquire_lease(name, self._holder, self._lease_ttl):
            return True
        # A holder on this machine whose process is gone cannot renew: take over at once
        # rather than wait for its lease to run out.
        holder = repository.lease_holder(name)
        if holder is not None and holder_is_dead(holder):
            log.warning("lease_taken_from_dead_holder", lease=name, holder=holder)
            return repository.take_lease_from(name, holder, self._holder, self._lease_ttl)
        return False

    @asynccontextmanager
    async def _leased(self, name: str, sender: UrlSender) -> AsyncIterator[bool]:
        """Hold the lease ``name`` for the block, renewing it; yields False if another has it."""
        if not await self._db(self._take_lease, name):
            yield False
            return

        async def renew() -> None:
            while True:
                await asyncio.sleep(self._lease_ttl.total_seconds() / 4)
                if not await self._db(
                    self.repository.acquire_lease, name, self._holder, self._lease_ttl
                ):
                    log.error("lease_lost", lease=name)
                    sender.stop()
                    return

        renewer = asyncio.create_task(renew())
        try:
            yield True
        finally:
            renewer.cancel()
            await asyncio.shield(self._db(self.repository.release_lease, name, self._holder))

    def _sender(self, url: str, transport: Transport) -> UrlSender:
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
        if self._stopping.is_set():
            sender.stop()
        self._senders.append(sender)
        return sender

    def _resolve(self, options: SyncOptions) -> tuple[list[tuple[AudienceRow, str]], SyncReport]:
        rows, resolution = self.repository.audiences_with_keys()
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
        for audience_id, count in self.repository.orphan_memberships():
            report.problems.append(
                KeyProblem(audience_id, f"{count} membership row(s) name no existing audience")
            )
        for problem in report.problems:
            log.warning("audience_skipped", audience_id=problem.audience_id, reason=problem.reason)
        return syncable, report

    def run(
        self,
        options: SyncOptions,
        progress: Progress | None = None,
        emit: DryRunEmitter | None = None,
    ) -> SyncReport:
        """Run one sync to completion (or until stopped) and return what it did."""
        return asyncio.run(self._tracked(self.run_async(options, progress, emit)))

    async def _tracked(self, work: Coroutine[object, object, T]) -> T:
        # Remember the loop and task, so that request_stop can cancel from another thread.
        self._loop = asyncio.get_running_loop()
        self._task = asyncio.current_task()
        try:
            return await work
        finally:
            self._loop = self._task = None

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
            known = await self._db(self.repository.find_destinations, urls)
            held, _ = await self._db(self._guard, syncable, known, False)
            report.held = held
            allowed = [(row, key) for row, key in syncable if row.audience_id not in held]
            await self._db(self._dry_run, allowed, urls, options, emit or (lambda *_: None))
            report.duration_seconds = time.monotonic() - started
            return report
        destination_ids = await self._db(self.repository.ensure_destinations, urls)
        locked: list[tuple[AudienceRow, str]] = []
        for row, key in syncable:
            if await self._db(self.repository.lock_key, row.audience_id, key):
                locked.append((row, key))
            else:
                report.problems.append(KeyProblem(row.audience_id, f"key {key!r} was just taken"))
        held, approved = await self._db(self._guard, locked, destination_ids, True)
        report.held = held
        await self._db(self.repository.refresh_statistics)
        await self._db(self.repository.mark_crashed_runs, holder_is_dead)
        report.run_id = await self._db(self.repository.start_run, options.trigger, self._holder)
        namespace = await self._db(self.repository.message_namespace)
        # One client per URL: a slow URL must not hold connections another URL needs.
        transports = {url: self._transport_factory() for url in urls}
        status, error = "failed", None
        try:
            results = await gather_or_cancel(
                [
                    self._sync_url(
                        self._sender(url, transports[url]),
                        destination_ids[url],
                        report.run_id,
                        locked,
                        held,
                        options,
                        namespace,
                        progress or _NoProgress(),
                    )
                    for url in urls
                ]
            )
            for deletion_report, pair_reports in results:
                report.deletions.append(deletion_report)
                report.pairs.extend(pair_reports)
            for audience_id in approved:
                # The approved exits are planned now; the next surge needs a new approval.
                await self._db(self.repository.release_hold, audience_id)
            if self._stopping.is_set():
                status = "stopped"
            else:
                status = "ok" if report.fully_delivered else "partial"
        except BaseException as failure:
            error = f"{type(failure).__name__}: {failure}"[:500]
            status = "cancelled" if isinstance(failure, asyncio.CancelledError) else "failed"
            raise
        finally:
            self._senders.clear()
            for transport in transports.values():
                await transport.aclose()
            report.duration_seconds = time.monotonic() - started
            await asyncio.shield(
                self._db(self.repository.finish_run, report.run_id, status, report.counts, error)
            )
        self._log_summary(report, options, status)
        return report

    @staticmethod
    def _log_summary(report: SyncReport, options: SyncOptions, status: str) -> None:
        log.info(
            "sync_finished",
            run_id=report.run_id,
            trigger=options.trigger,
            status=status,
            **asdict(report.counts),
            deletes_pending=sum(d.pending for d in report.deletions),
            skipped_audiences=len(report.problems),
            duration_seconds=round(report.duration_seconds, 3),
        )

    def _guard(
        self,
        audiences: list[tuple[AudienceRow, str]],
        destination_ids: dict[str, int],
        record: bool,
    ) -> tuple[dict[str, str], list[str]]:
        """The mass-exit guard: which audiences to hold (id -> why), and which were approved.

        An audience is held when, for any URL that was told of at least ``min_audience_size``
        members, more than ``max_exit_share`` of them would now be told they left: far more
        likely a broken upstream job than a real exodus. Nothing is sent for it until
        ``syncer approve`` releases it; a hold whose exits went away by themselves is lifted.
        """
        guard = self.settings.guard
        existing = self.repository.holds()
        held: dict[str, str] = {}
        approved: list[str] = []
        for row, key in audiences:
            hold = existing.get(row.audience_id)
            if hold is not None and hold[1]:
                approved.append(row.audience_id)
                continue
            reason = None
            for url, destination_id in destination_ids.items():
                told, exits = self.repository.exit_pressure(destination_id, row.audience_id)
                if told >= max(guard.min_audience_size, 1) and exits > guard.max_exit_share * told:
                    reason = (
                        f"{exits} of the {told} members {url} was told of would exit "
                        f"(over {guard.max_exit_share:.0%}); check upstream, then "
                        f"`syncer approve {key}` to send the exits"
                    )
                    break
            if reason is not None:
                held[row.audience_id] = reason
                log.warning("audience_held", audience_id=row.audience_id, reason=reason)
                if record:
                    self.repository.place_hold(row.audience_id, reason)
            elif hold is not None and record:
                self.repository.release_hold(row.audience_id)
        return held, approved

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
        sender: UrlSender,
        destination_id: int,
        run_id: int,
        audiences: list[tuple[AudienceRow, str]],
        held: dict[str, str],
        options: SyncOptions,
        namespace: uuid.UUID,
        progress: Progress,
    ) -> tuple[DeletionReport, list[PairReport]]:
        deletion_report = await self._deliver_deletions(sender, destination_id, namespace)
        reports = []
        for row, key in audiences:
            report = PairReport(url=sender.url, audience_id=row.audience_id, key=key)
            reports.append(report)
            if row.audience_id in held:
                report.note = f"held: {held[row.audience_id]}"
                continue
            async with self._leased(f"pair:{destination_id}:{row.audience_id}", sender) as leased:
                if not leased:
                    report.note = "busy: another syncer is working on it"
                    log.warning("pair_busy", url=sender.url, audience_id=row.audience_id)
                    continue
                await self._sync_pair(
                    sender, destination_id, row, key, options, namespace, progress, report
                )
                await self._db(
                    self.repository.record_pair_result,
                    destination_id,
                    row.audience_id,
                    run_id,
                    complete=report.pending == 0 and report.rejected == 0,
                )
        return deletion_report, reports

    async def _deliver_deletions(
        self, sender: UrlSender, destination_id: int, namespace: uuid.UUID
    ) -> DeletionReport:
        repository = self.repository
        report = DeletionReport(url=sender.url)

        async def outgoing() -> AsyncIterator[Outgoing[PendingDeletion]]:
            after = 0
            while not sender.unavailable:
                batch = await self._db(
                    repository.pending_deletions,
                    destination_id,
                    after_id=after,
                    limit=self.settings.delivery.batch_size,
                )
                if not batch:
                    return
                after = batch[-1].deletion_id
                for deletion in batch:
                    body = delete_body(
                        deletion.user_id, deletion.deletion_id, deletion.requested_at, namespace
                    )
                    yield Outgoing(deletion, body)

        async def record(results: list[tuple[PendingDeletion, Attempted]]) -> None:
            accepted = [d.deletion_id for d, o in results if o.kind is OutcomeKind.DELIVERED]
            failed = [
                (d.deletion_id, o.attempts, o.status, o.detail)
                for d, o in results
                if o.kind is not OutcomeKind.DELIVERED
            ]
            await self._db(repository.record_deletion_outcomes, accepted, failed)
            report.delivered += len(accepted)

        async with self._leased(f"deletions:{destination_id}", sender) as leased:
            if leased and not sender.unavailable:
                await pump(
                    sender,
                    outgoing(),
                    concurrency=self.settings.delivery.concurrency,
                    record=record,
                )
            report.pending = await self._db(repository.count_pending_deletions, destination_id)
        return report

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
        report.entered, report.exited = planned.new_entered, planned.new_exited
        progress.planned(sender.url, planned.entered + planned.exited)
        computation = Computation("audience", row.audience_id, key, self.settings.engage.space_id)

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
                max_rejections=self.settings.delivery.max_rejections,
            )
            report.delivered += len(accepted)
            progress.advanced(sender.url, len(results))

        async def skip_invalid(invalid: Sequence[FailedChange]) -> None:
            log.warning(
                "invalid_rows_skipped",
                url=sender.url,
                audience_id=row.audience_id,
                count=len(invalid),
                first_user_id=repr(invalid[0].change.user_id)[:80],
                first_problem=invalid[0].error,
            )
            await self._db(
                repository.record_outcomes,
                destination_id,
                row.audience_id,
                accepted=[],
                retryable=[],
                rejected=[],
                parked=invalid,
            )
            progress.advanced(sender.url, len(invalid))

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
                    trait_change = TraitChange(
                        change.change_id,
                        change.user_id,
                        change.anonymous_id,
                        change.email,
                        change.value,
                        change.created_at,
                    )
                    yield Outgoing(change, identify_body(computation, trait_change, namespace))
                if invalid:
                    await skip_invalid(invalid)

        if not sender.unavailable:
            await pump(
                sender,
                outgoing(),
                concurrency=self.settings.delivery.concurrency,
                record=record,
            )
        statuses = await self._db(repository.status_counts, destination_id, row.audience_id)
        report.pending = statuses.get(STATUS_PENDING, 0)
        report.parked = statuses.get(STATUS_PARKED, 0)
        report.rejected = statuses.get(STATUS_REJECTED, 0)
        if sender.down:
            report.note = "URL unavailable this run; changes kept for the next run"
        elif sender.stopped and report.pending:
            report.note = "stopped before sending; changes kept for the next run"

    def delete_users(self, user_ids: Sequence[str]) -> SyncReport:
        """Record privacy deletions, then deliver the deletes to every URL now.

        A URL that does not accept its delete now gets it on a later run: the debt is in the
        database, so a deletion is never lost.
        """
        return asyncio.run(self._tracked(self._delete_users(user_ids)))

    async def _delete_users(self, user_ids: Sequence[str]) -> SyncReport:
        started = time.monotonic()
        urls = self.settings.tray.workflow_urls
        destination_ids = await self._db(self.repository.ensure_destinations, urls)
        await self._db(
            self.repository.suppress_users, list(user_ids), list(destination_ids.values())
        )
        log.info("users_deleted", count=len(user_ids))
        namespace = await self._db(self.repository.message_namespace)
        transports = {url: self._transport_factory() for url in urls}
        try:
            deletion_reports = await gather_or_cancel(
                [
                    self._deliver_deletions(
                        self._sender(url, transports[url]), destination_ids[url], namespace
                    )
                    for url in urls
                ]
            )
        finally:
            self._senders.clear()
            for transport in transports.values():
                await transport.aclose()
        return SyncReport(
            run_id=None,
            deletions=list(deletion_reports),
            duration_seconds=time.monotonic() - started,
        )
