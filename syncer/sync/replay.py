"""``syncer replay``: send a run's deliveries to one URL again, to another URL, as copies.

The bodies are rebuilt from the change log exactly as they were sent (same messageIds, same
timestamps, same bytes: :mod:`syncer.core.payload` builds them from stored fields only) and
signed for the target. Nothing about any URL's state changes: the target is not recorded as
told, so a replay can be repeated, and the next sync to the target (if it is configured)
still sends what it owes. Users deleted since the run are skipped, and counted.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field

import structlog

from syncer.core.outcomes import Outcome, OutcomeKind
from syncer.core.pacing import reserve
from syncer.core.payload import Computation
from syncer.core.signing import signature_headers
from syncer.delivery.claims import Outgoing, deliver_claimed
from syncer.delivery.sender import UrlSender
from syncer.errors import ConfigError
from syncer.settings import Settings
from syncer.store.history import LoggedChange
from syncer.store.outbox import QueuedChange
from syncer.sync.context import Progress, RunContext
from syncer.sync.exchanging import call_body

log = structlog.get_logger("syncer.replay")


@dataclass
class ReplayReport:
    """What a replay sent: payloads (requests) in the run's log for ``from_url``, how many the
    target accepted, how many it did not (by outcome), and the users deleted since."""

    run_id: int
    from_url: str
    to_url: str
    payloads: int = 0
    accepted: int = 0
    not_accepted: dict[str, int] = field(default_factory=dict)
    first_problem: str | None = None
    skipped_deleted: int = 0
    dry_run: bool = False
    duration_seconds: float = 0.0

    @property
    def complete(self) -> bool:
        """True when every payload was accepted (or, in a dry run, nothing failed to build)."""
        return not self.not_accepted and (self.dry_run or self.accepted == self.payloads)


def replayed_bodies(
    entries: list[LoggedChange], space_id: str, context: RunContext
) -> Iterator[tuple[LoggedChange, bytes]]:
    """Each call of each entry, rebuilt: the bytes the run sent."""
    for entry in entries:
        if entry.key is None:  # keys are never dropped once synced; a hand-edited database
            raise ConfigError(f"the key of {entry.kind.value} {entry.audience_id!r} is gone")
        computation = Computation(entry.kind.value, entry.audience_id, entry.key, space_id)
        change = QueuedChange(
            entry.change_id,
            entry.user_id,
            entry.value,
            entry.anonymous_id,
            entry.email,
            entry.created_at,
            entry.call,
        )
        for call in entry.calls:
            yield entry, call_body(computation, change, call, context.store.namespace)


def resolve_replay(context: RunContext, run_id: int, from_url: str | None) -> tuple[int, str]:
    """The destination (id, URL) whose deliveries in ``run_id`` are replayed: ``from_url``,
    else the run's first URL (the first of ``workflow_urls`` it delivered to; of URLs no
    longer configured, the first ever configured). A usage error when there is nothing to
    replay."""
    store = context.store
    if not store.runs.exists(run_id):
        raise ConfigError(f"--run: there is no run {run_id} (see `syncer inspect runs`)")
    delivered = store.history.destinations_of_run(run_id)
    if from_url is None:
        if not delivered:
            raise ConfigError(
                f"--run: run {run_id} delivered nothing within the history kept "
                "([history] keep_days)"
            )
        urls = context.settings.tray.urls
        configured = store.destinations.find(urls)
        order = {configured[url]: n for n, url in enumerate(urls) if url in configured}
        return min(delivered, key=lambda found: (order.get(found[0], len(order)), found[0]))
    found = store.destinations.find([from_url])
    if not found:
        raise ConfigError(f"--from: {from_url!r} was never a workflow URL of this database")
    destination_id = found[from_url]
    for known_id, url in delivered:
        if known_id == destination_id:
            return known_id, url
    raise ConfigError(f"--from: run {run_id} delivered nothing to {from_url!r}")


async def replay(
    context: RunContext,
    settings: Settings,
    sender: UrlSender,
    secret: str | None,
    run_id: int,
    source: tuple[int, str],
    *,
    dry_run: bool,
    progress: Progress,
) -> ReplayReport:
    """Send what run ``run_id`` delivered to ``source`` (id, URL) to ``sender``'s URL, paced
    at ``[delivery] rate_limit_per_second`` and signed with ``secret``."""
    started = time.monotonic()
    store = context.store
    destination_id, from_url = source
    report = ReplayReport(run_id, from_url, sender.url, dry_run=dry_run)
    report.skipped_deleted = await context.db(
        store.history.purged_deliveries, run_id, destination_id
    )
    pages = store.history.delivered_in(run_id, destination_id)
    ready: deque[tuple[LoggedChange, bytes]] = deque()
    delivery = settings.delivery
    rate = delivery.rate_limit_per_second
    loop = asyncio.get_running_loop()
    next_free: float | None = None

    async def refill(want: int) -> None:
        # A page at a time, checked against deletions just before its bodies are handed out.
        while len(ready) < want:
            page = await context.db(next, pages, None)
            if page is None:
                return
            deleted = await context.db(store.deletions.deleted_among, [e.user_id for e in page])
            kept = [entry for entry in page if entry.user_id not in deleted]
            report.skipped_deleted += len(page) - len(kept)
            bodies = list(replayed_bodies(kept, settings.engage.space_id, context))
            report.payloads += len(bodies)
            progress.planned(sender.url, len(bodies))
            ready.extend(bodies)

    async def exchange(
        answers: list[tuple[LoggedChange, Outcome]], want: int
    ) -> list[Outgoing[LoggedChange]]:
        nonlocal next_free
        for _, outcome in answers:
            if outcome.kind is OutcomeKind.DELIVERED:
                report.accepted += 1
            else:
                report.not_accepted[outcome.kind.value] = (
                    report.not_accepted.get(outcome.kind.value, 0) + 1
                )
                if report.first_problem is None:
                    report.first_problem = outcome.detail or str(outcome.status)
        progress.advanced(sender.url, len(answers))
        await refill(want)
        chosen = [ready.popleft() for _ in range(min(want, len(ready)))]
        items = []
        now = loop.time()
        slots = reserve(next_free, now, len(chosen), rate) if rate > 0 and chosen else None
        for n, (entry, body) in enumerate(chosen):
            not_before = 0.0 if slots is None else now + slots.delay + n * slots.interval
            items.append(Outgoing(entry, body, signature_headers(body, secret), not_before))
        if slots is not None:
            next_free = slots.next_free
        return items

    if dry_run:
        while True:
            before = len(ready)
            await refill(before + 1000)
            if len(ready) == before:
                break
            ready.clear()
    else:
        await deliver_claimed(sender, exchange, concurrency=delivery.concurrency)
    report.duration_seconds = time.monotonic() - started
    log.info(
        "replay_finished",
        run_id=run_id,
        from_url=from_url,
        to_url=sender.url,
        payloads=report.payloads,
        accepted=report.accepted,
        not_accepted=report.not_accepted,
        skipped_deleted=report.skipped_deleted,
        dry_run=dry_run,
        duration_seconds=round(report.duration_seconds, 3),
    )
    return report
