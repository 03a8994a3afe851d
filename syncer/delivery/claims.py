"""Sending what is claimed, just in time: a pipelined loop over a claim-and-record exchange.

The caller's ``exchange(results, want)`` records the outcomes handed to it and claims up to
``want`` more items, in one transaction. Each exchange records and claims ``EXCHANGED`` x
``concurrency`` items, and the loop starts it while it still holds ``AHEAD`` x ``concurrency``
items to send (waiting or in flight), so that the connections keep working while the database
does. 6 and 6 measured best on both databases:
with 3 and 3 on PostgreSQL the sender had free connections and nothing to send for a sixth of a
first sync, with 6 and 6 for a twentieth; on SQLite, with the exchange in the sending process
(measured before the store's helper process took it elsewhere), 3 and 1 left it so for a
third, 6 and 6 for a fifth, and the first sync was about 6% faster (five interleaved runs
each). A worker thus holds at most ``chunk_size(concurrency)`` items claimed (waiting, in
flight, or answered and not yet recorded): a crash re-sends at most that many per URL and
worker. It knows nothing of audiences.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
from collections import deque
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Generic, TypeVar

from syncer.core.outcomes import Outcome, OutcomeKind
from syncer.core.pacing import Slots
from syncer.delivery.sender import UrlSender

Ref = TypeVar("Ref")


@dataclass(frozen=True)
class Outgoing(Generic[Ref]):
    """A body to send with its headers (signed already), the caller's reference to it, and the
    moment (on the event loop's clock) before which it must not be sent, for pacing."""

    ref: Ref
    body: bytes
    headers: Mapping[str, str]
    not_before: float = 0.0


Exchange = Callable[[list[tuple[Ref, Outcome]], int], Awaitable[list[Outgoing[Ref]]]]

EXCHANGE_RETRY_SECONDS = 0.5
MAX_FAILED_EXCHANGES = 5

_CANCELLED = Outcome(OutcomeKind.RETRYABLE, None, "cancelled in flight", 1)
_UNSENT = Outcome(OutcomeKind.NOT_SENT, detail="not sent: URL given up for this run")


def paced(
    items: Sequence[tuple[Ref, bytes, Mapping[str, str]]], slots: Slots | None, now: float
) -> list[Outgoing[Ref]]:
    """The items (reference, body, headers) as outgoing, each not before its slot (``now`` on
    the event loop's clock)."""
    if slots is None:
        return [Outgoing(ref, body, headers) for ref, body, headers in items]
    start = now + slots.delay
    return [
        Outgoing(ref, body, headers, start + n * slots.interval)
        for n, (ref, body, headers) in enumerate(items)
    ]


# Items recorded and claimed per exchange, and still to be sent when it starts, in multiples
# of ``concurrency``.
EXCHANGED = 6
AHEAD = 6


def chunk_size(concurrency: int) -> int:
    """How many items one worker holds claimed per URL at most: the crash's duplicate bound."""
    return (EXCHANGED + AHEAD) * concurrency


async def deliver_claimed(sender: UrlSender, exchange: Exchange[Ref], *, concurrency: int) -> None:
    """Claim, send and record until nothing more is claimable or the URL is given up, starting
    each exchange of ``EXCHANGED`` x ``concurrency`` items while ``AHEAD`` x ``concurrency``
    are still to be sent.

    On cancellation the answers already in, and the requests cut off in flight (as possibly
    processed), are still recorded, and what was claimed but not sent is released.
    """
    loop = asyncio.get_running_loop()
    chunk = chunk_size(concurrency)
    due = EXCHANGED * concurrency  # free places that start an exchange
    waiting: deque[Outgoing[Ref]] = deque()
    in_flight: dict[asyncio.Task[Outcome], Ref] = {}
    answered: list[tuple[Ref, Outcome]] = []
    exchanging: asyncio.Future[list[Outgoing[Ref]]] | None = None
    claimed: list[Outgoing[Ref]] | None = None
    handed: list[tuple[Ref, Outcome]] = []
    failures: list[BaseException] = []
    # A failed exchange (the database blipped) is retried, recording only, while what is in
    # flight finishes under the claim's gate; given up once nothing can be sent any more.
    exchange_error: BaseException | None = None
    failed_exchanges = 0
    retry_at = 0.0
    wakeup = asyncio.Event()
    wanted = 0
    exhausted = False

    # Completions are handed over by callbacks, not by asyncio.wait over every task in flight:
    # that would register and remove a callback on each of them for every single answer.
    def answer_in(task: asyncio.Task[Outcome]) -> None:
        ref = in_flight.pop(task, None)
        if ref is None or task.cancelled():
            return  # cut off in flight: the finally clause below accounts for it
        if (error := task.exception()) is not None:
            failures.append(error)
        else:
            answered.append((ref, task.result()))
        wakeup.set()

    def claims_in(future: asyncio.Future[list[Outgoing[Ref]]]) -> None:
        nonlocal claimed, exchanging, exchange_error, failed_exchanges, retry_at, answered
        if future.cancelled():
            return
        if (error := future.exception()) is not None:
            exchange_error, exchanging = error, None
            failed_exchanges += 1
            retry_at = loop.time() + EXCHANGE_RETRY_SECONDS
            answered = handed + answered
        else:
            claimed, exchange_error, failed_exchanges = future.result(), None, 0
        wakeup.set()

    try:
        while True:
            if failures:
                raise failures[0]
            if claimed is not None:
                exhausted = exhausted or (wanted > 0 and len(claimed) < wanted)
                waiting.extend(claimed)
                claimed, exchanging = None, None
            wake_at = None
            if exchange_error is not None:
                if not in_flight and (
                    sender.unavailable or failed_exchanges >= MAX_FAILED_EXCHANGES
                ):
                    raise exchange_error
                if loop.time() >= retry_at:
                    exchange_error = None  # try again, below
                else:
                    wake_at = retry_at
            if sender.unavailable and waiting:
                answered.extend((item.ref, _UNSENT) for item in waiting)
                waiting.clear()
            while waiting and len(in_flight) < concurrency:
                if waiting[0].not_before > loop.time():
                    wake_at = min(wake_at or math.inf, waiting[0].not_before)
                    break
                item = waiting.popleft()
                task = asyncio.create_task(sender.deliver(item.body, item.headers))
                in_flight[task] = item.ref
                task.add_done_callback(answer_in)
            if exchanging is None and exchange_error is None:
                held = len(waiting) + len(in_flight)
                can_claim = not exhausted and not sender.unavailable
                if (
                    (can_claim and chunk - held >= due)
                    or (not held and answered)
                    or len(answered) >= chunk
                ):
                    wanted = chunk - held if can_claim else 0
                    handed, answered = answered, []
                    exchanging = asyncio.ensure_future(exchange(handed, wanted))
                    exchanging.add_done_callback(claims_in)
                elif not held:
                    return
            wakeup.clear()
            if wake_at is None:
                await wakeup.wait()
            else:  # paced: wake up when the next item is due, or earlier on news
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(wakeup.wait(), max(0.0, wake_at - loop.time()))
    finally:
        cut_off = list(in_flight.items())
        in_flight.clear()
        for task, _ in cut_off:
            task.cancel()
        if exchanging is not None and claimed is None:
            # We are leaving on an error or a cancellation already: that is what is raised.
            with contextlib.suppress(Exception):
                claimed = await asyncio.shield(exchanging)
        waiting.extend(claimed or [])
        leftovers: list[tuple[Ref, Outcome]] = []
        for task, ref in cut_off:
            finished = task.done() and not task.cancelled() and task.exception() is None
            leftovers.append((ref, task.result() if finished else _CANCELLED))
        leftovers += [(item.ref, _UNSENT) for item in waiting]
        if answered or leftovers:
            await asyncio.shield(exchange(answered + leftovers, 0))
