"""How much a worker holds claimed per URL: the duplicate bound a crash can cause.

Each exchange records and claims ``EXCHANGED`` x ``concurrency`` items, started while ``AHEAD`` x
``concurrency`` are still to be sent, so a worker holds at most (EXCHANGED + AHEAD) x
``concurrency``: ``chunk_size(concurrency)``, the bound the README states (12 x).
"""

from __future__ import annotations

import pytest

from syncer.delivery.claims import AHEAD, EXCHANGED, chunk_size


@pytest.mark.parametrize(("concurrency", "expected"), [(1, 12), (4, 48), (16, 192), (256, 3072)])
def test_chunk_size_is_the_exchange_plus_what_is_kept_ahead(
    concurrency: int, expected: int
) -> None:
    assert chunk_size(concurrency) == expected
    assert EXCHANGED * concurrency < chunk_size(concurrency)
    assert chunk_size(concurrency) == (EXCHANGED + AHEAD) * concurrency
