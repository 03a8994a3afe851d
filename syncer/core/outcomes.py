"""What a workflow's answer means, and how long to wait before asking again."""

from __future__ import annotations

import enum
import random
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime

from syncer.core.states import Call

# 408, 423 and 429 say "not now"; every 5xx says the server failed.
_RETRYABLE_4XX = frozenset({408, 423, 429})
# These say nothing about the change and everything about the URL: a rotated secret, a deleted
# or moved workflow. They are the URL's failure, not the change's.
_REFUSING_4XX = frozenset({401, 403, 404, 410})


class OutcomeKind(enum.Enum):
    """The fates of one body after the attempts a run allows."""

    DELIVERED = "delivered"  # 2xx: processed
    RETRYABLE = "retryable"  # timeout, connection lost, 408/423/429/5xx: may have been processed
    REJECTED = "rejected"  # another 4xx (or 3xx): this change was refused, for good
    REFUSED = "refused"  # 401/403/404/410: the URL refuses everything; the change waits
    NOT_SENT = "not_sent"  # never sent: the run stopped, the URL went down or the claim ran out


def classify_status(status: int) -> OutcomeKind:
    """Classify an HTTP status: 2xx delivered, 408/423/429/5xx retryable, 401/403/404/410
    the URL refusing, anything else a final rejection of the change."""
    if 200 <= status < 300:
        return OutcomeKind.DELIVERED
    if status in _RETRYABLE_4XX or 500 <= status < 600:
        return OutcomeKind.RETRYABLE
    if status in _REFUSING_4XX:
        return OutcomeKind.REFUSED
    return OutcomeKind.REJECTED


def parse_retry_after(value: str | None, now: datetime | None = None) -> float | None:
    """Seconds to wait that a ``Retry-After`` header asks for, or None when absent or unreadable.

    The header is either a number of seconds or an HTTP date; a date in the past means now.
    """
    if value is None:
        return None
    text = value.strip()
    if not text:
        return None
    if text.isascii() and text.isdigit():
        return float(text)
    try:
        when = parsedate_to_datetime(text)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    reference = now or datetime.now(UTC)
    return max(0.0, (when - reference).total_seconds())


def backoff_delay(
    attempt: int,
    *,
    base: float,
    cap: float,
    retry_after: float | None = None,
    retry_after_cap: float,
    rng: random.Random | None = None,
) -> float:
    """Seconds to wait before attempt ``attempt + 1`` (``attempt`` counts from 1).

    Exponential backoff with full jitter, so that many senders do not retry in step; a server's
    ``Retry-After`` is honoured when longer, but never beyond ``retry_after_cap``.
    """
    generator = rng or random
    ceiling = min(cap, base * (2 ** (attempt - 1)))
    delay = generator.uniform(ceiling / 2, ceiling)
    if retry_after is not None:
        delay = max(delay, min(retry_after, retry_after_cap))
    return delay


@dataclass(frozen=True)
class Outcome:
    """What became of one body (a change or a delete) after the attempts a run allows: the one
    shape in which every outcome is recorded."""

    kind: OutcomeKind
    status: int | None = None
    detail: str = ""
    attempts: int = 0


# Of a change sent both ways whose calls both failed, the outcome recorded: a rejection counts
# (the change may never be accepted), then an attempt (it may have been processed), then a
# refusal, then nothing sent.
_FAILURE_PRECEDENCE = (
    OutcomeKind.REJECTED,
    OutcomeKind.RETRYABLE,
    OutcomeKind.REFUSED,
    OutcomeKind.NOT_SENT,
)


def settle_calls(outcomes: Sequence[tuple[Call, Outcome]]) -> tuple[Outcome, Call | None]:
    """One change's outcome from those of its calls (a change sent both ways makes two), and
    the call the URL accepted if only one was.

    Delivered when every call was. Otherwise the most telling failure, with the attempts of
    all the calls; the accepted call, if any, is not sent again.
    """
    delivered = [call for call, outcome in outcomes if outcome.kind is OutcomeKind.DELIVERED]
    failed = [outcome for _, outcome in outcomes if outcome.kind is not OutcomeKind.DELIVERED]
    if not failed:
        return outcomes[0][1], None
    worst = min(failed, key=lambda outcome: _FAILURE_PRECEDENCE.index(outcome.kind))
    attempts = sum(outcome.attempts for _, outcome in outcomes)
    accepted = delivered[0] if delivered else None
    return Outcome(worst.kind, worst.status, worst.detail, attempts), accepted
