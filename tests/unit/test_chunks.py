"""How much a worker holds claimed per URL: the duplicate bound a crash can cause.

Each exchange records and claims 3 x ``concurrency`` items; the loop starts it while ``ahead`` x
``concurrency`` are still to be sent (3 on PostgreSQL, 1 on SQLite), so a worker holds at most
(3 + ahead) x ``concurrency``, and never more than ``chunk_size(concurrency)``, the bound the
README states whatever the database.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from syncer.delivery.claims import EXCHANGED, MAX_AHEAD, chunk_size, deliver_claimed


@pytest.mark.parametrize(
    ("concurrency", "ahead", "expected"),
    [
        (1, 1, 4),
        (16, 1, 64),  # SQLite: as before the lookahead depended on the database
        (16, 3, 96),  # PostgreSQL
        (4, None, 24),  # the default: the bound for every database
        (256, 3, 1536),
    ],
)
def test_chunk_size_is_the_exchange_plus_what_is_kept_ahead(
    concurrency: int, ahead: int | None, expected: int
) -> None:
    size = chunk_size(concurrency) if ahead is None else chunk_size(concurrency, ahead)
    assert size == expected


@pytest.mark.parametrize("ahead", range(1, MAX_AHEAD + 1))
def test_no_lookahead_exceeds_the_stated_bound(ahead: int) -> None:
    for concurrency in (1, 4, 16, 256):
        assert EXCHANGED * concurrency < chunk_size(concurrency, ahead) <= chunk_size(concurrency)


@pytest.mark.parametrize("ahead", [0, MAX_AHEAD + 1, -1])
def test_a_lookahead_outside_the_bound_is_refused_before_anything_is_claimed(ahead: int) -> None:
    claimed: list[int] = []

    async def exchange(_results: list[Any], want: int) -> list[Any]:
        claimed.append(want)
        return []

    with pytest.raises(ValueError, match="ahead must be between 1 and"):
        asyncio.run(deliver_claimed(None, exchange, concurrency=4, ahead=ahead))  # type: ignore[arg-type]
    assert claimed == []
