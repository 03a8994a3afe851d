"""Pacing a workflow URL: the send slots a chunk of requests takes, shared by every worker."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Slots:
    """Where a chunk's requests go in a URL's schedule: the first may be sent ``delay`` seconds
    from now, each next one ``interval`` later; the URL's next free slot is then ``next_free``."""

    delay: float
    interval: float
    next_free: float


def reserve(next_free: float | None, now: float, count: int, rate_per_second: float) -> Slots:
    """Take ``count`` consecutive slots at ``rate_per_second`` from the first free one.

    ``next_free`` and ``now`` are on one clock (the database's). Slots left unused by a worker
    that stopped are never handed out again: the URL gets less than its rate for that gap,
    never more.
    """
    interval = 1.0 / rate_per_second
    start = now if next_free is None or next_free < now else next_free
    return Slots(delay=start - now, interval=interval, next_free=start + count * interval)
