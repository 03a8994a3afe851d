"""Sending what is claimed, just in time: a bounded loop over a claim-and-record exchange.

The caller's ``exchange(results, want)`` records the outcomes handed to it and claims up to
``want`` more items, in one transaction. The loop keeps at most ``concurrency`` items claimed
at any moment (in flight, or answered and not yet recorded), and claims only when half of them
are free, so a send is decided just before it happens and a crash re-sends at most
``concurrency`` items per URL. It knows nothing of audiences.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Generic, TypeVar

from syncer.core.outcomes import Outcome, OutcomeKind
from syncer.delivery.sender import UrlSender

Ref = TypeVar("Ref")


@dataclass(frozen=True)
class Outgoing(Generic[Ref]):
    """A body to send, with the caller's reference to it."""

    ref: Ref
    body: bytes


Exchange = Callable[[list[tuple[Ref, Outcome]], int], Awaitable[list[Outgoing[Ref]]]]

_CANCELLED = Outcome(OutcomeKind.RETRYABLE, None, "cancelled in flight", 1)


async def deliver_claimed(sender: UrlSender, exchange: Exchange[Ref], *, concurrency: int) -> None:
    """Claim, send and record until nothing more is claimable or the URL is given up.

    On cancellation the answers already in, and the requests cut off in flight (as possibly
    processed), are still recorded, so their claims are released at once.
    """
    refill_at = max(1, concurrency // 2)
    in_flight: dict[asyncio.Task[Outcome], Ref] = {}
    answered: list[tuple[Ref, Outcome]] = []
    exhausted = False
    try:
        while True:
            free = concurrency - len(in_flight) - len(answered)
            can_claim = not exhausted and not sender.unavailable
            if (
                (can_claim and free >= refill_at)
                or (not in_flight and answered)
                or (not in_flight and can_claim)
            ):
                want = free if can_claim else 0
                handed, answered = answered, []
                batch = await exchange(handed, want)
                if want and len(batch) < want:
                    exhausted = True
                for item in batch:
                    task = asyncio.create_task(sender.deliver(item.body))
                    in_flight[task] = item.ref
                continue
            if not in_flight:
                return
            done, _ = await asyncio.wait(in_flight, return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                answered.append((in_flight.pop(task), task.result()))
    finally:
        for task in in_flight:
            task.cancel()
        leftovers = [(ref, _CANCELLED) for ref in in_flight.values()]
        if answered or leftovers:
            await asyncio.shield(exchange(answered + leftovers, 0))
