"""What a workflow's answer means, and how long to wait before asking again."""

from __future__ import annotations

import random
from datetime import UTC, datetime, timedelta, timezone

import pytest

from syncer.core.outcomes import (
    Outcome,
    OutcomeKind,
    backoff_delay,
    classify_status,
    parse_retry_after,
    settle_calls,
)
from syncer.core.states import Call

NOW = datetime(2026, 11, 28, 12, 0, 0, tzinfo=UTC)


@pytest.mark.parametrize(
    ("status", "kind"),
    [
        *((status, OutcomeKind.DELIVERED) for status in (200, 201, 204, 299)),
        *((status, OutcomeKind.RETRYABLE) for status in (408, 423, 429, 500, 501, 502, 503, 599)),
        *((status, OutcomeKind.REFUSED) for status in (401, 403, 404, 410)),
        *(
            (status, OutcomeKind.REJECTED)
            for status in (100, 199, 300, 301, 302, 400, 402, 405, 409, 413, 422, 600)
        ),
    ],
)
def test_classify_status(status: int, kind: OutcomeKind) -> None:
    assert classify_status(status) is kind


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        pytest.param("5", 5.0, id="seconds"),
        pytest.param("0", 0.0, id="zero"),
        pytest.param("120", 120.0, id="two-minutes"),
        pytest.param(" 7 ", 7.0, id="padded"),
        pytest.param("", None, id="empty"),
        pytest.param("   ", None, id="blank"),
        pytest.param(None, None, id="absent"),
        pytest.param("soon", None, id="garbage-word"),
        pytest.param("5 seconds", None, id="garbage-with-unit"),
        pytest.param("-5", None, id="negative"),
        pytest.param("abc, 99 Zzz 9999", None, id="garbage-date"),
        pytest.param("\u00b2", None, id="garbage-superscript-two"),  # latin-1 byte 0xB2
        pytest.param("Sat, 28 Nov 2026 12:00:30 GMT", 30.0, id="date-in-future"),
        pytest.param("Sat, 28 Nov 2026 12:05:00 GMT", 300.0, id="date-five-minutes-on"),
        pytest.param("Sat, 28 Nov 2026 13:00:30 +0100", 30.0, id="date-with-offset"),
        pytest.param("Sat, 28 Nov 2026 12:00:00 GMT", 0.0, id="date-now"),
        pytest.param("Fri, 27 Nov 2026 12:00:00 GMT", 0.0, id="date-in-past"),
        pytest.param("Thu, 01 Jan 1970 00:00:00 GMT", 0.0, id="date-long-past"),
    ],
)
def test_parse_retry_after(value: str | None, expected: float | None) -> None:
    assert parse_retry_after(value, now=NOW) == expected


def test_parse_retry_after_now_in_other_zone() -> None:
    now = NOW.astimezone(timezone(timedelta(hours=-5)))
    assert parse_retry_after("Sat, 28 Nov 2026 12:00:10 GMT", now=now) == 10.0


BASE = 0.5
CAP = 30.0
RETRY_AFTER_CAP = 60.0


def _ceiling(attempt: int) -> float:
    return min(CAP, BASE * 2 ** (attempt - 1))


@pytest.mark.parametrize(
    ("attempt", "ceiling"),
    [(1, 0.5), (2, 1.0), (3, 2.0), (4, 4.0), (6, 16.0), (7, 30.0), (10, 30.0), (30, 30.0)],
)
def test_backoff_delay_within_jittered_ceiling(attempt: int, ceiling: float) -> None:
    assert _ceiling(attempt) == ceiling
    rng = random.Random(1234)
    delays = [
        backoff_delay(attempt, base=BASE, cap=CAP, retry_after_cap=RETRY_AFTER_CAP, rng=rng)
        for _ in range(300)
    ]
    assert all(ceiling / 2 <= delay <= ceiling for delay in delays)
    assert len(set(delays)) > 1  # jittered, not fixed
    assert max(delays) - min(delays) > ceiling / 4  # spread across the range


def test_backoff_delay_uses_given_rng() -> None:
    def run(seed: int) -> list[float]:
        rng = random.Random(seed)
        return [
            backoff_delay(a, base=BASE, cap=CAP, retry_after_cap=RETRY_AFTER_CAP, rng=rng)
            for a in range(1, 9)
        ]

    random.seed(1)
    first = run(99)
    random.seed(2)
    second = run(99)
    assert first == second
    assert run(99) != run(100)


@pytest.mark.parametrize(
    ("attempt", "retry_after", "low", "high"),
    [
        pytest.param(1, 45.0, 45.0, 45.0, id="longer-retry-after-honoured"),
        pytest.param(1, 60.0, 60.0, 60.0, id="retry-after-at-cap"),
        pytest.param(1, 600.0, 60.0, 60.0, id="retry-after-capped"),
        pytest.param(10, 3600.0, 60.0, 60.0, id="retry-after-capped-late-attempt"),
        pytest.param(10, 1.0, 15.0, 30.0, id="shorter-retry-after-keeps-backoff"),
        pytest.param(1, 0.0, 0.25, 0.5, id="zero-retry-after-keeps-backoff"),
    ],
)
def test_backoff_delay_honours_retry_after(
    attempt: int, retry_after: float, low: float, high: float
) -> None:
    rng = random.Random(7)
    for _ in range(50):
        delay = backoff_delay(
            attempt,
            base=BASE,
            cap=CAP,
            retry_after=retry_after,
            retry_after_cap=RETRY_AFTER_CAP,
            rng=rng,
        )
        assert low <= delay <= high


def test_backoff_delay_cap_applies_to_ceiling() -> None:
    rng = random.Random(3)
    delays = [
        backoff_delay(20, base=2.0, cap=5.0, retry_after_cap=RETRY_AFTER_CAP, rng=rng)
        for _ in range(200)
    ]
    assert all(2.5 <= delay <= 5.0 for delay in delays)


# --- a change sent both ways: its calls' outcomes settle into one -------------------------

_OK = Outcome(OutcomeKind.DELIVERED, 200, "", 1)
_DOWN = Outcome(OutcomeKind.RETRYABLE, 503, "down", 2)
_BAD = Outcome(OutcomeKind.REJECTED, 400, "bad", 1)
_GONE = Outcome(OutcomeKind.REFUSED, 404, "gone", 1)
_UNSENT = Outcome(OutcomeKind.NOT_SENT, None, "not sent", 0)


@pytest.mark.parametrize(
    ("outcomes", "kind", "attempts", "accepted"),
    [
        ([(Call.IDENTIFY, _OK)], OutcomeKind.DELIVERED, 1, None),
        ([(Call.IDENTIFY, _OK), (Call.TRACK, _OK)], OutcomeKind.DELIVERED, 1, None),
        ([(Call.IDENTIFY, _OK), (Call.TRACK, _DOWN)], OutcomeKind.RETRYABLE, 3, Call.IDENTIFY),
        ([(Call.IDENTIFY, _BAD), (Call.TRACK, _OK)], OutcomeKind.REJECTED, 2, Call.TRACK),
        ([(Call.IDENTIFY, _DOWN), (Call.TRACK, _BAD)], OutcomeKind.REJECTED, 3, None),
        ([(Call.IDENTIFY, _UNSENT), (Call.TRACK, _DOWN)], OutcomeKind.RETRYABLE, 2, None),
        ([(Call.IDENTIFY, _GONE), (Call.TRACK, _UNSENT)], OutcomeKind.REFUSED, 1, None),
        ([(Call.TRACK, _UNSENT)], OutcomeKind.NOT_SENT, 0, None),
    ],
)
def test_settle_calls(
    outcomes: list[tuple[Call, Outcome]],
    kind: OutcomeKind,
    attempts: int,
    accepted: Call | None,
) -> None:
    settled, done = settle_calls(outcomes)
    assert (settled.kind, done) == (kind, accepted)
    if kind is not OutcomeKind.DELIVERED:
        assert settled.attempts == attempts


@pytest.mark.parametrize(
    ("send", "done", "owed"),
    [
        (Call.IDENTIFY, None, (Call.IDENTIFY,)),
        (Call.TRACK, None, (Call.TRACK,)),
        (Call.BOTH, None, (Call.IDENTIFY, Call.TRACK)),
        (Call.BOTH, Call.IDENTIFY, (Call.TRACK,)),
        (Call.BOTH, Call.TRACK, (Call.IDENTIFY,)),
    ],
)
def test_calls_owed(send: Call, done: Call | None, owed: tuple[Call, ...]) -> None:
    assert send.owed(done) == owed
