"""How much a worker holds claimed per URL: the duplicate bound a crash can cause.

A pipeline records and claims ``exchanged`` x ``concurrency`` items per exchange, started while
``ahead`` x ``concurrency`` are still to be sent, so a worker holds at most (exchanged + ahead) x
``concurrency``, and never more than ``chunk_size(concurrency)``, the bound the README states.
"""

from __future__ import annotations

import itertools

import pytest

from syncer.delivery.claims import MAX_AHEAD, MAX_EXCHANGED, PIPELINE, Pipeline, chunk_size


@pytest.mark.parametrize(
    ("concurrency", "pipeline", "expected"),
    [
        (1, Pipeline(exchanged=1, ahead=1), 2),
        (16, Pipeline(exchanged=3, ahead=1), 64),
        (16, PIPELINE, 192),  # the one used
        (4, None, 48),  # the default: the stated bound
        (256, Pipeline(exchanged=3, ahead=3), 1536),
    ],
)
def test_chunk_size_is_the_exchange_plus_what_is_kept_ahead(
    concurrency: int, pipeline: Pipeline | None, expected: int
) -> None:
    size = chunk_size(concurrency) if pipeline is None else chunk_size(concurrency, pipeline)
    assert size == expected


@pytest.mark.parametrize(
    ("exchanged", "ahead"),
    list(itertools.product(range(1, MAX_EXCHANGED + 1), range(1, MAX_AHEAD + 1))),
)
def test_no_pipeline_exceeds_the_stated_bound(exchanged: int, ahead: int) -> None:
    pipeline = Pipeline(exchanged=exchanged, ahead=ahead)
    for concurrency in (1, 4, 16, 256):
        assert exchanged * concurrency < chunk_size(concurrency, pipeline)
        assert chunk_size(concurrency, pipeline) <= chunk_size(concurrency)


@pytest.mark.parametrize(
    ("exchanged", "ahead", "refused"),
    [
        (0, 1, "exchanged"),
        (MAX_EXCHANGED + 1, 1, "exchanged"),
        (3, 0, "ahead"),
        (3, MAX_AHEAD + 1, "ahead"),
        (3, -1, "ahead"),
    ],
)
def test_a_pipeline_outside_the_bound_cannot_be_made(
    exchanged: int, ahead: int, refused: str
) -> None:
    with pytest.raises(ValueError, match=f"{refused} must be between 1 and"):
        Pipeline(exchanged=exchanged, ahead=ahead)
