"""Delivering bodies to one URL: retries within a run, and a bounded concurrent pump."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Generic, TypeVar

from tenacity import AsyncRetrying, RetryCallState, retry_if_result

from syncer.core.outcomes import OutcomeKind, backoff_delay, classify_status, parse_retry_after
from syncer.core.signing import signature_headers
from syncer.delivery.transport import Response, Transport


@dataclass(frozen=True)
class RetryPolicy:
    """How often, and how patiently, one change is retried within a run."""

    max_attempts: int = 4
    backoff_base_seconds: float = 0.5
    backoff_max_seconds: float = 30.0
    retry_after_max_seconds: float = 60.0


@dataclass(frozen=True)
class Attempted:
    """What became of one body after all the attempts a run allows."""

    kind: OutcomeKind
    status: int | None
    detail: str
    attempts: int


def _attempted(response: Response, attempts: int) -> Attempted:
    if response.status is None:
        return Attempted(OutcomeKind.RETRYABLE, None, response.error or "no response", attempts)
    return Attempted(classify_status(response.status), response.status, response.excerpt, attempts)


class UrlSender:
    """Sends signed bodies to one workflow URL, retrying what may succeed later.

    Once one body has used up its attempts on retryable failures, the URL counts as unavailable
    for the rest of the run: what is still queued for it waits in the database for the next run,
    instead of every change waiting out its own backoff against a URL that is down.
    """

    def __init__(
        self, url: str, transport: Transport, policy: RetryPolicy, secret: str | None
    ) -> None:
        self.url = url
        self.down = False
        self.stopped = False
        self._transport = transport
        self._policy = policy
        self._secret = secret

    def _wait(self, state: RetryCallState) -> float:
        last = state.outcome.result() if state.outcome is not None else None
        retry_after = parse_retry_after(last.retry_after) if isinstance(last, Response) else None
        return backoff_delay(
            state.attempt_number,
            base=self._policy.backoff_base_seconds,
            cap=self._policy.backoff_max_seconds,
            retry_after=retry_after,
            retry_after_cap=self._policy.retry_after_max_seconds,
        )

    @property
    def unavailable(self) -> bool:
        """True once the URL is down for this run, or the run is stopping: send nothing new."""
        return self.down or self.stopped

    def stop(self) -> None:
        """Take no new work and make no further retries; requests in flight finish."""
        self.stopped = True

    def _stop(self, state: RetryCallState) -> bool:
        return self.unavailable or state.attempt_number >= self._policy.max_attempts

    @staticmethod
    def _should_retry(response: Response) -> bool:
        return response.status is None or classify_status(response.status) is OutcomeKind.RETRYABLE

    async def deliver(self, body: bytes) -> Attempted | None:
        """Send one body, retrying within policy; None if the URL was already unavailable."""
        if self.unavailable:
            return None
        headers = signature_headers(body, self._secret)
        attempts = 0

        async def attempt() -> Response:
            nonlocal attempts
            attempts += 1
            return await self._transport.post(self.url, body, headers)

        retrying = AsyncRetrying(
            stop=self._stop,
            wait=self._wait,
            retry=retry_if_result(self._should_retry),
            retry_error_callback=lambda state: state.outcome.result() if state.outcome else None,
        )
        response: Response = await retrying(attempt)
        outcome = _attempted(response, attempts)
        if outcome.kind is OutcomeKind.RETRYABLE and not self.stopped:
            self.down = True
        return outcome


Ref = TypeVar("Ref")


@dataclass(frozen=True)
class Outgoing(Generic[Ref]):
    """A body to send, with the caller's reference to it."""

    ref: Ref
    body: bytes


Recorder = Callable[[list[tuple[Ref, Attempted]]], Awaitable[None]]


async def pump(
    sender: UrlSender,
    outgoing: AsyncIterator[Outgoing[Ref]],
    *,
    concurrency: int,
    record: Recorder[Ref],
    flush_size: int | None = None,
) -> None:
    """Send everything ``outgoing`` yields with at most ``concurrency`` requests in flight.

    Results are handed to ``record`` in small batches as they come (every ``flush_size``,
    default ``concurrency``, answers), so that after a crash only the requests in flight and the
    answers not yet recorded are sent again: fewer than 4 x ``concurrency`` (a batch being
    recorded, answers that arrived meanwhile, requests in flight). Stops taking new work once the
    URL is unavailable. On cancellation, what was already answered is still recorded.
    """
    flush_at = flush_size or concurrency
    queue: asyncio.Queue[Outgoing[Ref] | None] = asyncio.Queue(maxsize=concurrency)
    answered: list[tuple[Ref, Attempted]] = []
    flushing = asyncio.Lock()

    async def flush() -> None:
        async with flushing:
            if answered:
                batch = answered.copy()
                answered.clear()
                await record(batch)

    async def work() -> None:
        while (item := await queue.get()) is not None:
            result = await sender.deliver(item.body)
            if result is not None:
                answered.append((item.ref, result))
            if len(answered) >= flush_at:
                await flush()

    async def produce() -> None:
        async for item in outgoing:
            if sender.unavailable:
                break
            await queue.put(item)
        # Only on a normal end: when cancelled, the workers are cancelled too, and waiting to
        # put into a full queue nobody reads any more would hang the whole run.
        for _ in range(concurrency):
            await queue.put(None)

    try:
        async with asyncio.TaskGroup() as group:
            group.create_task(produce())
            for _ in range(concurrency):
                group.create_task(work())
    finally:
        await asyncio.shield(flush())
