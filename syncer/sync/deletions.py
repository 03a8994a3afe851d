"""Delivering the privacy deletes owed to one URL, claimed like changes."""

from __future__ import annotations

import asyncio

from syncer.core.outcomes import Outcome, OutcomeKind
from syncer.core.payload import delete_body
from syncer.core.signing import signature_headers
from syncer.delivery.claims import Outgoing, paced
from syncer.delivery.sender import UrlSender
from syncer.store.deletions import OwedDeletion
from syncer.store.sql import utcnow
from syncer.sync.claiming import send_under
from syncer.sync.context import RunContext
from syncer.sync.reports import DeletionReport


async def deliver_deletions(
    context: RunContext, sender: UrlSender, destination_id: int
) -> DeletionReport:
    """Send every delete owed to the URL that can go now; report what was delivered and owed."""
    store, delivery = context.store, context.settings.delivery
    report = DeletionReport(url=sender.url)
    keeper = context.claim_keeper()
    claim = keeper.claim
    cursor = 0

    async def exchange(
        results: list[tuple[OwedDeletion, Outcome]], want: int
    ) -> list[Outgoing[OwedDeletion]]:
        nonlocal cursor
        if want:
            keeper.starting()
        claimed, lost, slots = await context.db(
            store.deletions.exchange,
            claim,
            destination_id,
            results=[(deletion.deletion_id, outcome) for deletion, outcome in results],
            want=want,
            after_id=cursor,
            now=utcnow(),
            rate_per_second=delivery.rate_limit_per_second,
        )
        if lost:
            keeper.mark_lost()
            report.note = "stopped: our claim on some deletes was taken over"
        report.delivered += sum(1 for _, o in results if o.kind is OutcomeKind.DELIVERED)
        if claimed:
            cursor = claimed[-1].deletion_id
        secret = context.settings.tray.secret_for(sender.url)
        signed = []
        for deletion in claimed:
            body = delete_body(
                deletion.user_id, deletion.deletion_id, deletion.requested_at, store.namespace
            )
            signed.append((deletion, body, signature_headers(body, secret)))
        return paced(signed, slots, asyncio.get_running_loop().time())

    await send_under(keeper, sender, exchange, concurrency=delivery.concurrency)
    report.pending = await context.db(store.deletions.owed_count, destination_id)
    return report
