"""What every part of a run shares: settings, the store, who we are, and database calls that
never block the event loop."""

from __future__ import annotations

import asyncio
import os
import socket
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from typing import Protocol, TypeVar

from syncer.core.guard import GuardLimits
from syncer.settings import Settings
from syncer.store import Store
from syncer.store.claims import Claim
from syncer.sync.claiming import ClaimKeeper
from syncer.sync.exchanging import ExchangeReply, ExchangeRequest, exchange
from syncer.sync.helper import HELPER_MIN_CHANGES, StoreHelper

T = TypeVar("T")


def holder_is_dead(holder: str) -> bool:
    """True when a holder ("host:pid:nonce") ran on this machine and its process is gone."""
    host, _, rest = holder.partition(":")
    pid_text = rest.partition(":")[0]
    if host != socket.gethostname() or not pid_text.isdigit():
        return False
    try:
        os.kill(int(pid_text), 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


class Progress(Protocol):
    """Told how far a run has got, e.g. to draw a progress bar on a terminal."""

    def planned(self, url: str, changes: int) -> None:
        """``changes`` more changes are queued for ``url``."""

    def advanced(self, url: str, changes: int) -> None:
        """``changes`` more changes for ``url`` were answered, for better or worse."""


class NoProgress:
    """Progress that shows nothing."""

    def planned(self, url: str, changes: int) -> None:
        pass

    def advanced(self, url: str, changes: int) -> None:
        pass


@dataclass
class RunContext:
    """The settings, the store and the identity one process runs under."""

    settings: Settings
    store: Store
    holder: str
    executor: ThreadPoolExecutor
    helper: StoreHelper | None = None

    async def db(self, function: Callable[..., T], *args: object, **kwargs: object) -> T:
        """Run a store call on a worker thread, so that one URL's SQL never stalls another's
        HTTP."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self.executor, partial(function, *args, **kwargs))

    def expect_delivery(self, changes: int) -> None:
        """A pair with ``changes`` queued is about to be sent: start the helper if it pays."""
        if self.helper is not None and changes >= HELPER_MIN_CHANGES:
            self.helper.start()

    async def exchange(self, request: ExchangeRequest) -> ExchangeReply:
        """One exchange of a delivery: in the store's helper process when it is ready, else on
        a database thread."""
        if self.helper is not None:
            reply = await self.helper.call(exchange, request)
            if reply is not None:
                return reply
        return await self.db(exchange, self.store, request)

    def close(self) -> None:
        """Stop the database threads and the helper process."""
        self.executor.shutdown(wait=True)
        if self.helper is not None:
            self.helper.close()

    def claim_keeper(self) -> ClaimKeeper:
        """A new claim of this process, and the keeper that renews it while sending."""
        delivery = self.settings.delivery
        claim = Claim.new(self.holder, delivery.lease_seconds)
        return ClaimKeeper(
            claim,
            lambda: self.db(self.store.claims.renew, claim),
            request_timeout_seconds=delivery.timeout_seconds,
        )

    @property
    def guard_limits(self) -> GuardLimits:
        """``[guard]`` as the pure guard takes it."""
        guard = self.settings.guard
        return GuardLimits(guard.max_exit_share, guard.min_audience_size)
