"""One sync run: per configured URL, deliver owed deletes, then plan and deliver each audience.

Each workflow URL is served by its own task with its own HTTP client, so a URL that is slow or
down never holds up the others. Nothing here assumes anything from before the transaction that
acts on it: plans are single transactions, sends are decided by claims taken just before them,
and every outcome is written under the claim it was sent under.
"""

from __future__ import annotations

import asyncio
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable, Coroutine, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from functools import partial
from typing import TypeVar

import structlog
from sqlalchemy.engine import Connection

from syncer.core.states import Call, Kind, PairState, RunStatus
from syncer.core.traits import KeyProblem, Subject
from syncer.core.urls import canonical_url, configured_url
from syncer.delivery.sender import RetryPolicy, UrlSender
from syncer.delivery.transport import AiohttpTransport, Transport, verified_tls
from syncer.errors import ConfigError
from syncer.settings import Settings
from syncer.store import Store
from syncer.store.audiences import AudienceRow, named_row
from syncer.store.planning import PlanOutcome, PlanResult
from syncer.store.queries import QueryDefinition, QueryFailed
from syncer.store.sql import utcnow
from syncer.sync.context import NoProgress, Progress, RunContext, holder_is_dead
from syncer.sync.deletions import deliver_deletions
from syncer.sync.helper import helper_for
from syncer.sync.pairs import plan_pair, sync_pair
from syncer.sync.replay import ReplayReport, replay, resolve_replay
from syncer.sync.reports import DeletionReport, PairReport, SyncReport

log = structlog.get_logger("syncer.sync")

T = TypeVar("T")

# (url, key, user_id, value, call) of one change a dry run would send.
DryRunEmitter = Callable[[str, str, str, str, Call], None]


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


def run_event_loop(work: Coroutine[object, object, T]) -> T:
    """Run ``work`` to completion on a new event loop: uvloop's where it is installed (it takes
    a third off the cost of each request), asyncio's own otherwise."""
    try:
        import uvloop
    except ImportError:  # e.g. on Windows, where uvloop does not exist
        return asyncio.run(work)
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(work)


@dataclass(frozen=True)
class SyncOptions:
    """What one run is asked to do."""

    audience: str | None = None
    url: str | None = None  # one of the configured URLs, as configured; None: every one
    full: bool = False
    dry_run: bool = False
    trigger: str = "manual"

    def urls(self, configured: Sequence[str]) -> list[str]:
        """The configured URLs this run sends to."""
        if self.url is None:
            return list(configured)
        if self.url not in configured:
            raise ConfigError(f"--url: {self.url!r} is not one of tray.workflow_urls")
        return [self.url]


def select_audiences(
    rows: list[AudienceRow], keys: dict[Subject, str], wanted: str | None
) -> list[AudienceRow]:
    """The audiences and traits a run covers: all enabled ones, or the one named by id or key
    (a key first: an audience and a trait may share an id, never a key)."""
    if wanted is None:
        return [row for row in rows if row.enabled]
    row = named_row(rows, keys, wanted, "--audience")
    if row is not None:
        return [row]
    raise ConfigError(f"--audience: no audience or computed trait has the id or key {wanted!r}")


def query_defined(settings: Settings) -> list[AudienceRow]:
    """The audiences and computed traits the settings define by a query."""
    return [
        AudienceRow(
            entry.id,
            entry.name,
            entry.key,
            True,
            kind,
            query=entry.query,
            timeout_seconds=entry.timeout_seconds,
        )
        for kind, entries in ((Kind.AUDIENCE, settings.audiences), (Kind.TRAIT, settings.traits))
        for entry in entries
    ]


def _definition(row: AudienceRow) -> QueryDefinition:
    assert row.query is not None
    return QueryDefinition(row.subject, row.query, row.timeout_seconds)


def _table_defined(rows: list[tuple[AudienceRow, str]], kind: Kind) -> list[AudienceRow]:
    return [row for row, _ in rows if row.kind is kind and not row.from_query]


def _refresh_in(store: Store, definition: QueryDefinition, connection: Connection) -> None:
    store.queries.refresh_in(connection, definition)


def _emit_for(
    emit: DryRunEmitter, url: str, key: str, user_id: str, value: str, call: Call
) -> None:
    emit(url, key, user_id, value, call)


class SyncEngine:
    """Runs syncs and privacy deletes against one database and one set of workflow URLs."""

    def __init__(
        self,
        settings: Settings,
        store: Store,
        transport_factory: Callable[[], Transport] | None = None,
    ) -> None:
        self.settings = settings
        self.store = store
        self._transport_factory = transport_factory or self._default_transport
        workers = 1 if store.engine.dialect.name == "sqlite" else 4
        self.context = RunContext(
            settings=settings,
            store=store,
            holder=f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}",
            executor=ThreadPoolExecutor(max_workers=workers, thread_name_prefix="syncer-db"),
            helper=helper_for(store.engine),
        )
        self._senders: list[UrlSender] = []
        self._stopping = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._task: asyncio.Task[object] | None = None

    def _default_transport(self) -> Transport:
        return AiohttpTransport(
            timeout_seconds=self.settings.delivery.timeout_seconds,
            max_connections=self.settings.delivery.concurrency,
            tls=verified_tls(),
        )

    def close(self) -> None:
        """Stop the database worker threads and the store's helper process."""
        self.context.close()

    def request_stop(self, grace_seconds: float | None = None) -> None:
        """Ask a run in progress (from any thread) to send nothing new and settle what is in flight.

        Requests already sent are awaited and recorded; changes not yet claimed stay queued.
        With ``grace_seconds``, a run still busy after that long is cancelled: what was answered
        is recorded, and what was cut off is sent again, with the same messageId, later.
        """
        self._stopping.set()
        for sender in list(self._senders):
            sender.stop()
        loop, task = self._loop, self._task
        if grace_seconds is not None and loop is not None and task is not None:
            timer = threading.Timer(grace_seconds, lambda: loop.call_soon_threadsafe(task.cancel))
            timer.daemon = True
            timer.start()

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
        )
        if self._stopping.is_set():
            sender.stop()
        self._senders.append(sender)
        return sender

    def _resolve(self, options: SyncOptions) -> tuple[list[tuple[AudienceRow, str]], SyncReport]:
        rows, resolution = self.store.audiences.with_keys(query_defined(self.settings))
        chosen = select_audiences(rows, resolution.keys, options.audience)
        chosen_subjects = {row.subject for row in chosen}
        report = SyncReport(run_id=None)
        report.problems = [p for p in resolution.problems if p.subject in chosen_subjects]
        if options.audience is not None and chosen and not chosen[0].enabled:
            report.problems.append(KeyProblem(chosen[0].subject, f"{chosen[0].kind} is disabled"))
        syncable = [
            (row, resolution.keys[row.subject])
            for row in chosen
            if row.enabled and row.subject in resolution.keys
        ]
        if options.audience is None:
            # Only a run over every audience looks for rows of missing audiences and traits.
            for audience_id, count in self.store.audiences.orphan_memberships():
                report.problems.append(
                    KeyProblem(
                        Subject.audience(audience_id),
                        f"{count} membership row(s) name no existing audience",
                    )
                )
            for trait_id, count in self.store.audiences.orphan_values():
                report.problems.append(
                    KeyProblem(
                        Subject.trait(trait_id),
                        f"{count} computed_trait_values row(s) name no existing trait",
                    )
                )
        for problem in report.problems:
            log.warning(
                "audience_skipped",
                audience_id=problem.audience_id,
                kind=problem.subject.kind.value,
                reason=problem.reason,
            )
        return syncable, report

    def run(
        self,
        options: SyncOptions,
        progress: Progress | None = None,
        emit: DryRunEmitter | None = None,
    ) -> SyncReport:
        """Run one sync to completion (or until stopped) and return what it did."""
        if options.dry_run:
            return self.dry_run(options, emit or (lambda *_: None))
        return run_event_loop(self._tracked(self.run_async(options, progress)))

    async def _tracked(self, work: Coroutine[object, object, T]) -> T:
        # Remember the loop and task, so that request_stop can cancel from another thread.
        self._loop = asyncio.get_running_loop()
        self._task = asyncio.current_task()
        try:
            return await work
        finally:
            self._loop = self._task = None

    def replay(
        self,
        run_id: int,
        to_url: str,
        from_url: str | None = None,
        *,
        dry_run: bool = False,
        progress: Progress | None = None,
    ) -> ReplayReport:
        """Send what run ``run_id`` delivered to ``from_url`` (default: its first URL) to
        ``to_url`` again, byte for byte, signed for ``to_url``; change no URL's state.

        ``to_url`` is signed with its own secret when it is configured, else with ``[tray]
        shared_secret``.
        """
        tray = self.settings.tray
        known = configured_url(tray.urls, to_url)
        secret = tray.secret_for(known) if known is not None else tray.secret
        source = resolve_replay(self.context, run_id, from_url)

        async def work() -> ReplayReport:
            transport = self._transport_factory()
            try:
                return await replay(
                    self.context,
                    self.settings,
                    self._sender(known or to_url, transport),
                    secret,
                    run_id,
                    source,
                    dry_run=dry_run,
                    progress=progress or NoProgress(),
                )
            finally:
                self._senders.clear()
                await transport.aclose()

        return run_event_loop(self._tracked(work()))

    def dry_run(self, options: SyncOptions, emit: DryRunEmitter) -> SyncReport:
        """Plan every pair exactly as a run would, hand each change it would send to ``emit``,
        and write nothing: every plan is rolled back."""
        started = time.monotonic()
        syncable, report = self._resolve(options)
        failed: set[Subject] = set()
        for url in options.urls(self.settings.tray.urls):
            route = self.settings.tray.route(url)
            for row, key in syncable:
                if not route.takes(row.kind, key) or row.subject in failed:
                    continue
                pair = PairReport(url=url, audience_id=row.audience_id, key=key, kind=row.kind)
                prepare = None
                if row.from_query:
                    prepare = partial(_refresh_in, self.store, _definition(row))
                try:
                    result = self._dry_run_pair(url, row, key, prepare, options, emit)
                except QueryFailed as error:
                    failed.add(row.subject)
                    report.problems.append(KeyProblem(row.subject, f"query failed: {error}"))
                    continue
                if result.outcome is PlanOutcome.HELD:
                    pair.state, pair.note = PairState.HELD, f"held: {result.hold_reason}"
                pair.invalid, pair.invalid_example = result.invalid, result.invalid_example
                pair.entered, pair.exited = result.queued_entries, result.queued_exits
                report.pairs.append(pair)
        report.duration_seconds = time.monotonic() - started
        return report

    def _dry_run_pair(
        self,
        url: str,
        row: AudienceRow,
        key: str,
        prepare: Callable[[Connection], None] | None,
        options: SyncOptions,
        emit: DryRunEmitter,
    ) -> PlanResult:
        delivery = self.settings.delivery
        return self.store.planning.dry_run(
            url,
            canonical_url(url),
            row.audience_id,
            full=options.full,
            now=utcnow(),
            limits=self.context.guard_limits,
            batch_size=delivery.batch_size,
            emit=partial(_emit_for, emit, url, key),
            resend_on_identity_change=self.settings.engage.resend_on_identity_change,
            call=self.settings.tray.workflow(url).send,
            kind=row.kind,
            prepare=prepare,
        )

    async def run_async(self, options: SyncOptions, progress: Progress | None = None) -> SyncReport:
        """The body of :meth:`run`, for callers that already have an event loop."""
        context, store = self.context, self.store
        started = time.monotonic()
        syncable, report = await context.db(self._resolve, options)
        configured = self.settings.tray.urls
        urls = options.urls(configured)
        # Every configured URL, even with --url: the others are not removed.
        destination_ids = await context.db(store.destinations.ensure, configured, utcnow())
        keys = {row.subject: key for row, key in syncable}
        ours = await context.db(store.audiences.lock_keys, keys, utcnow())
        locked: list[tuple[AudienceRow, str]] = []
        for row, key in syncable:
            if row.subject in ours:
                locked.append((row, key))
            else:
                report.problems.append(KeyProblem(row.subject, f"key {key!r} was just taken"))
        locked = await self._evaluate_queries(locked, report)
        await context.db(store.refresh_statistics)
        await context.db(store.runs.mark_crashed, holder_is_dead)
        released = await context.db(store.claims.release_dead, holder_is_dead)
        if released:
            log.warning("claims_of_dead_processes_released", rows=released)
        report.removed_urls = await context.db(
            store.destinations.removed_with_debts, list(destination_ids.values())
        )
        for removed in report.removed_urls:
            log.warning(
                "removed_url_owed_deletes",
                url=removed.url,
                owed_deletes=removed.owed_deletes,
                hint="configure the URL again, or `syncer forget-url URL --yes`",
            )
        # Only pairs with something to do are planned and sent: found for every pair at once.
        with_work: set[tuple[int, Subject]] | None = None
        if not options.full:
            wanted = [destination_ids[url] for url in urls]
            audience_work = await context.db(
                partial(
                    store.planning.pairs_with_work,
                    resend_on_identity_change=self.settings.engage.resend_on_identity_change,
                ),
                wanted,
                [row.audience_id for row in _table_defined(locked, Kind.AUDIENCE)],
            )
            trait_work = await context.db(
                store.planning.trait_pairs_with_work,
                wanted,
                [row.audience_id for row in _table_defined(locked, Kind.TRAIT)],
            )
            with_work = {(d, Subject.audience(a)) for d, a in audience_work}
            with_work |= {(d, Subject.trait(t)) for d, t in trait_work}
        run_id = await context.db(store.runs.start, options.trigger, context.holder, utcnow())
        report.run_id = run_id
        transports = {url: self._transport_factory() for url in urls}
        status, error = RunStatus.FAILED, None
        senders = [self._sender(url, transports[url]) for url in urls]
        try:
            await self._keep_history(run_id, locked)
            results = await gather_or_cancel(
                [
                    self._sync_url(
                        sender,
                        destination_ids[url],
                        run_id,
                        locked,
                        options,
                        progress or NoProgress(),
                        with_work,
                    )
                    for url, sender in zip(urls, senders, strict=True)
                ]
            )
            report.down_urls = [sender.url for sender in senders if sender.failed]
            for deletion_report, pair_reports in results:
                report.deletions.append(deletion_report)
                report.pairs.extend(pair_reports)
            if self._stopping.is_set():
                status = RunStatus.STOPPED
            else:
                status = RunStatus.OK if report.fully_delivered else RunStatus.PARTIAL
        except BaseException as failure:
            error = f"{type(failure).__name__}: {failure}"[:500]
            cancelled = isinstance(failure, asyncio.CancelledError)
            status = RunStatus.CANCELLED if cancelled else RunStatus.FAILED
            raise
        finally:
            self._senders.clear()
            for transport in transports.values():
                await transport.aclose()
            report.duration_seconds = time.monotonic() - started
            await asyncio.shield(
                context.db(store.runs.finish, run_id, status, report.counts, utcnow(), error)
            )
        self._log_summary(report, options, status)
        return report

    async def _keep_history(self, run_id: int, locked: list[tuple[AudienceRow, str]]) -> None:
        """Record the size of each audience and trait this run syncs, measured from what it
        plans from (a query's fresh snapshot), and forget history older than keep_days."""
        store, keep_days = self.store, self.settings.history.keep_days
        subjects = [(row.subject, row.from_query) for row, _ in locked]
        await self.context.db(store.history.record_sizes, run_id, subjects, utcnow())
        pruned = await self.context.db(store.history.prune, utcnow(), keep_days)
        if pruned:
            log.info("history_pruned", entries=pruned, keep_days=keep_days)

    async def _evaluate_queries(
        self, rows: list[tuple[AudienceRow, str]], report: SyncReport
    ) -> list[tuple[AudienceRow, str]]:
        """Take the rows of each audience and trait defined by a query into its snapshot; one
        whose query fails is skipped for the run, with the database's message."""
        kept = []
        for row, key in rows:
            if row.from_query:
                try:
                    snapshot = await self.context.db(self.store.queries.refresh, _definition(row))
                except QueryFailed as error:
                    problem = KeyProblem(row.subject, f"query failed: {error}")
                    report.problems.append(problem)
                    log.warning(
                        "query_failed",
                        audience_id=row.audience_id,
                        kind=row.kind.value,
                        error=str(error),
                    )
                    continue
                log.info(
                    "query_evaluated",
                    audience_id=row.audience_id,
                    kind=row.kind.value,
                    rows=snapshot.rows,
                    skipped=snapshot.skipped,
                )
                if snapshot.skipped:
                    log.warning(
                        "query_rows_skipped",
                        audience_id=row.audience_id,
                        kind=row.kind.value,
                        count=snapshot.skipped,
                        reason="no user_id, or a user_id returned more than once",
                    )
            kept.append((row, key))
        return kept

    @staticmethod
    def _log_summary(report: SyncReport, options: SyncOptions, status: RunStatus) -> None:
        log.info(
            "sync_finished",
            run_id=report.run_id,
            trigger=options.trigger,
            status=status.value,
            **asdict(report.counts),
            down_urls=report.down_urls,
            duration_seconds=round(report.duration_seconds, 3),
        )

    async def _sync_url(
        self,
        sender: UrlSender,
        destination_id: int,
        run_id: int,
        audiences: list[tuple[AudienceRow, str]],
        options: SyncOptions,
        progress: Progress,
        with_work: set[tuple[int, Subject]] | None,
    ) -> tuple[DeletionReport, list[PairReport]]:
        context, store = self.context, self.store
        deletion_report = await deliver_deletions(context, sender, destination_id)
        reports = []
        idle: list[Subject] = []
        busy: list[tuple[AudienceRow, str]] = []
        # An audience the URL does not receive is left as it is: what the URL was told stays
        # recorded, so that receiving it again later sends only the net changes.
        route = self.settings.tray.route(sender.url)
        for row, key in audiences:
            if not route.takes(row.kind, key):
                continue
            # Table-defined audiences and traits are looked over for work first; one defined by
            # a query is planned every run (its snapshot was just taken).
            if (
                with_work is not None
                and not row.from_query
                and (destination_id, row.subject) not in with_work
            ):
                reports.append(
                    PairReport(url=sender.url, audience_id=row.audience_id, key=key, kind=row.kind)
                )
                idle.append(row.subject)
            else:
                busy.append((row, key))
        # Where writers do not block each other, the next pair is planned while this one is
        # sent: its plan then costs no sending time. What it queues is still checked when
        # claimed (deleted? still wanted?), so planning a few seconds early decides nothing.
        plans: dict[int, asyncio.Task[PlanResult]] = {}

        def plan_after(index: int) -> None:
            if not store.writes_concurrently or index + 1 >= len(busy) or self._stopping.is_set():
                return
            plans[index + 1] = asyncio.create_task(
                plan_pair(
                    context,
                    sender.url,
                    destination_id,
                    busy[index + 1][0].subject,
                    full=options.full,
                    first_round=True,
                    from_query=busy[index + 1][0].from_query,
                )
            )

        try:
            for index, (row, key) in enumerate(busy):
                report = await sync_pair(
                    context,
                    sender,
                    destination_id,
                    row.subject,
                    key,
                    from_query=row.from_query,
                    run_id=run_id,
                    full=options.full,
                    progress=progress,
                    first_plan=plans.pop(index, None),
                    planned=partial(plan_after, index),
                )
                reports.append(report)
                await context.db(
                    store.runs.record_pair,
                    destination_id,
                    row.subject,
                    run_id,
                    complete=report.state is PairState.DONE,
                    now=utcnow(),
                )
        finally:
            # A plan still under way when this URL stops (stopped, failed, cancelled) is let
            # finish: its transaction runs on a database thread, and what it queues keeps.
            await asyncio.gather(*plans.values(), return_exceptions=True)
        await context.db(
            store.runs.record_pairs, destination_id, idle, run_id, complete=True, now=utcnow()
        )
        if sender.failed or sender.reached:
            await context.db(
                store.destinations.record_run_result,
                destination_id,
                failed=sender.failed,
                now=utcnow(),
            )
        if sender.refused is not None:
            log.error("url_refused", url=sender.url, status=sender.refused.status)
            await context.db(
                store.destinations.record_refusal,
                destination_id,
                sender.refused.status,
                sender.refused.detail,
                utcnow(),
            )
        return deletion_report, reports

    def delete_users(self, user_ids: Sequence[str]) -> SyncReport:
        """Record privacy deletions, then deliver the deletes to every URL now.

        A URL that does not accept its delete now gets it on a later run: the debt is in the
        database, so a deletion is never lost.
        """
        return run_event_loop(self._tracked(self._delete_users(user_ids)))

    async def _delete_users(self, user_ids: Sequence[str]) -> SyncReport:
        context, store = self.context, self.store
        started = time.monotonic()
        urls = self.settings.tray.urls
        destination_ids = await context.db(store.destinations.ensure, urls, utcnow())
        await context.db(
            store.deletions.suppress, list(user_ids), list(destination_ids.values()), utcnow()
        )
        # A change of a killed process must not hold the deletes back for a claim's lifetime.
        await context.db(store.claims.release_dead, holder_is_dead)
        log.info("users_deleted", count=len(user_ids))
        transports = {url: self._transport_factory() for url in urls}
        try:
            deletion_reports = await gather_or_cancel(
                [
                    self._deliver_deletions_patiently(
                        self._sender(url, transports[url]), destination_ids[url]
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

    async def _deliver_deletions_patiently(
        self, sender: UrlSender, destination_id: int
    ) -> DeletionReport:
        # A delete waits while a change about the same user is in flight to the URL (so it
        # always arrives last); give such changes up to a claim's lifetime to be answered.
        context = self.context
        deadline = time.monotonic() + self.settings.delivery.lease_seconds
        delivered = 0
        last_pass = False
        while True:
            report = await deliver_deletions(context, sender, destination_id)
            delivered += report.delivered
            report.delivered = delivered
            done = not report.pending or sender.unavailable or time.monotonic() >= deadline
            if done or last_pass:
                return report
            waiting = await context.db(self.store.deletions.waiting_count, destination_id)
            # With nothing left waiting, the change it waited for may have been recorded just
            # after that pass: one more pass sends what can go now.
            last_pass = not waiting
            if waiting:
                await asyncio.sleep(0.1)
