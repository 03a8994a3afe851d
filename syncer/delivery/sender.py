"""Delivering bodies to one URL: retries within a run, refusals, and a gate on every attempt."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

from tenacity import AsyncRetrying, RetryCallState, retry_if_result

from syncer.core.outcomes import (
    Outcome,
    OutcomeKind,
    backoff_delay,
    classify_status,
    parse_retry_after,
)
from syncer.delivery.transport import Response, Transport

# Two refusals in a row (401/403/404/410) and the URL is given up for the run.
REFUSALS_TO_STOP = 2


@dataclass(frozen=True)
class RetryPolicy:
    """How often, and how patiently, one body is retried within a run."""

    max_attempts: int = 4
    backoff_base_seconds: float = 0.5
    backoff_max_seconds: float = 30.0
    retry_after_max_seconds: float = 60.0


def _outcome(response: Response, attempts: int) -> Outcome:
    if response.status is None:
        return Outcome(OutcomeKind.RETRYABLE, None, response.error or "no response", attempts)
    kind = classify_status(response.status)
    detail = response.excerpt
    if kind is OutcomeKind.REFUSED:
        detail = f"URL refused: {response.status}" + (f" {detail}" if detail else "")
    return Outcome(kind, response.status, detail, attempts)


class UrlSender:
    """Sends signed bodies to one workflow URL, retrying what may succeed later.

    The URL is given up for the rest of the run once one body has used up its attempts on
    retryable failures (``down``), or after two refusals in a row (``refused``); what is still
    queued waits in the database for the next run. ``gate`` is asked before every attempt
    (e.g. "will our claim on this body outlive the request?"); once it says no, nothing more is
    sent.
    """

    def __init__(self, url: str, transport: Transport, policy: RetryPolicy) -> None:
        self.url = url
        self.down = False
        self.stopped = False
        self.refused: Outcome | None = None
        self.gate_closed = False
        # Whether a delivery in this run has already cleared a refusal recorded for the URL.
        self.refusal_cleared = False
        # Whether the URL answered a request in this run with a 2xx, or with a 4xx about the
        # change: it is up, whatever else happened.
        self.reached = False
        self.gate: Callable[[], bool] = lambda: True
        self._refusals_in_a_row = 0
        self._transport = transport
        self._policy = policy

    @property
    def unavailable(self) -> bool:
        """True once nothing new may be sent to this URL in this run."""
        return self.down or self.stopped or self.refused is not None or self.gate_closed

    def stop(self) -> None:
        """Take no new work and make no further retries; requests in flight finish."""
        self.stopped = True

    def reopen_gate(self, gate: Callable[[], bool]) -> None:
        """Send under a new gate (a new claim), after an earlier one closed."""
        self.gate = gate
        self.gate_closed = False

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

    def _stop(self, state: RetryCallState) -> bool:
        return self.unavailable or state.attempt_number >= self._policy.max_attempts

    @staticmethod
    def _should_retry(response: Response) -> bool:
        return response.status is None or classify_status(response.status) is OutcomeKind.RETRYABLE

    async def deliver(self, body: bytes, headers: Mapping[str, str]) -> Outcome:
        """Send one body with its (signed) headers, retrying within policy, and say what
        became of it."""
        if self.unavailable:
            return Outcome(OutcomeKind.NOT_SENT, detail="not sent: URL given up for this run")
        if not self.gate():
            self.gate_closed = True
            return Outcome(OutcomeKind.NOT_SENT, detail="not sent: claim about to run out")
        # The first attempt goes straight out; the retry machinery is for failures only.
        response = await self._transport.post(self.url, body, headers)
        sent = 1
        if self._should_retry(response) and self._policy.max_attempts > 1:
            response, sent = await self._retry(body, headers, response)
        outcome = _outcome(response, sent)
        self._note(outcome)
        return outcome

    async def _retry(
        self, body: bytes, headers: Mapping[str, str], first: Response
    ) -> tuple[Response, int]:
        """Retry after a first retryable answer; return the last answer and the requests sent."""
        sent = 1
        answered: Response | None = first

        async def attempt() -> Response:
            nonlocal sent, answered
            if answered is not None:  # tenacity's first attempt is the one already made
                response, answered = answered, None
                return response
            if not self.gate():
                self.gate_closed = True
                return Response(status=None, error="not sent: claim about to run out")
            sent += 1
            return await self._transport.post(self.url, body, headers)

        retrying = AsyncRetrying(
            stop=self._stop,
            wait=self._wait,
            retry=retry_if_result(self._should_retry),
            retry_error_callback=lambda state: state.outcome.result() if state.outcome else None,
        )
        last: Response = await retrying(attempt)
        return last, sent

    @property
    def failed(self) -> bool:
        """True when this run gave up on the URL: down, or refusing everything."""
        return self.down or self.refused is not None

    def _note(self, outcome: Outcome) -> None:
        if outcome.kind in (OutcomeKind.DELIVERED, OutcomeKind.REJECTED):
            self.reached = True
        if outcome.kind is OutcomeKind.REFUSED:
            self._refusals_in_a_row += 1
            if self._refusals_in_a_row >= REFUSALS_TO_STOP and self.refused is None:
                self.refused = outcome
            return
        self._refusals_in_a_row = 0
        if outcome.kind is OutcomeKind.RETRYABLE and not (self.stopped or self.gate_closed):
            self.down = True
