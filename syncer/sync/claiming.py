"""Keeping a claim alive while sending, and knowing when it can no longer be trusted.

A claim runs out on the database's clock ``ttl`` after it was taken or last renewed. The keeper
renews it every quarter of that; it measures, on this machine's monotonic clock, from just before
each successful renewal, when the claim could run out at the earliest, and closes the gate to
new requests while one started now could still be in flight then. So a worker that cannot
renew (the database is unreachable) stops sending before anyone else may take its rows over,
and requests in flight are the only duplicates a takeover can cause.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager

import structlog

from syncer.delivery.claims import Exchange, Ref, deliver_claimed
from syncer.delivery.sender import UrlSender
from syncer.settings import CLAIM_RENEWALS, CLAIM_SAFETY_SECONDS
from syncer.store.claims import Claim

log = structlog.get_logger("syncer.claims")

# Room left between the end of the last request we may start and the claim's earliest expiry:
# for the database round trip that measured it and for clock-rate differences. Settings
# validation holds lease_seconds to these (syncer.settings).
SAFETY_SECONDS = CLAIM_SAFETY_SECONDS
RENEWALS_PER_TTL = CLAIM_RENEWALS


def renewal_interval(ttl_seconds: float) -> float:
    """How often a claim is renewed."""
    return ttl_seconds / RENEWALS_PER_TTL


class ClaimKeeper:
    """Renews one claim in the background and gates each request on its remaining life."""

    def __init__(
        self,
        claim: Claim,
        renew: Callable[[], Awaitable[int]],
        *,
        request_timeout_seconds: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.claim = claim
        self.lost = False
        self._renew = renew
        self._timeout = request_timeout_seconds
        self._clock = clock
        self._valid_until = -math.inf

    def gate(self) -> bool:
        """May a request start now? Only if it ends before the claim could run out.

        Once the claim may have run out, it is never trusted again: another worker may hold
        its rows by now.
        """
        if self._valid_until == -math.inf:
            return False  # nothing claimed yet: nothing may be sent
        now = self._clock()
        if now + SAFETY_SECONDS >= self._valid_until:
            self.lost = True
        if self.lost:
            return False
        return now + self._timeout + SAFETY_SECONDS < self._valid_until

    def mark_lost(self) -> None:
        """The database refused an outcome under this claim: send nothing more under it."""
        self.lost = True

    def starting(self) -> None:
        """Note the moment just before the first claim statement: every row claimed from now on
        lives at least ``ttl`` from now, until a renewal extends them all."""
        if self._valid_until == -math.inf:
            self._valid_until = self._clock() + self.claim.ttl_seconds

    async def _renew_forever(self) -> None:
        interval = renewal_interval(self.claim.ttl_seconds)
        while True:
            await asyncio.sleep(interval)
            started = self._clock()
            try:
                await self._renew()
            except Exception as error:  # the gate closes by itself if this goes on
                log.warning(
                    "claim_renewal_failed",
                    error=f"{type(error).__name__}: {error}"[:300],
                    seconds_left=round(self._valid_until - self._clock(), 1),
                )
                continue
            # Only a renewal that finished before the claim could run out renewed every row;
            # one that finished later may have found some already expired (and taken).
            if not self.lost and self._clock() < self._valid_until:
                self._valid_until = started + self.claim.ttl_seconds

    @asynccontextmanager
    async def renewing(self) -> AsyncIterator[ClaimKeeper]:
        """Renew the claim for the duration of the block."""
        task = asyncio.create_task(self._renew_forever())
        try:
            yield self
        finally:
            task.cancel()


async def send_under(
    keeper: ClaimKeeper,
    sender: UrlSender,
    exchange: Exchange[Ref],
    *,
    concurrency: int,
) -> None:
    """Send what ``exchange`` claims, each request gated on ``keeper``'s claim, renewing it
    meanwhile; nothing at all when the URL was already given up for the run."""
    sender.reopen_gate(keeper.gate)
    if sender.unavailable:
        return
    async with keeper.renewing():
        await deliver_claimed(sender, exchange, concurrency=concurrency)
