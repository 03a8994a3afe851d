"""The HTTP edge, behind a small interface so that the transport can change.

Deliveries go through aiohttp: on this project's benchmark it sends about ten times what
``httpx.AsyncClient`` does at the same concurrency (README, "Why aiohttp, not httpx"), and the
rules of a delivery (no redirects, TLS verified, bounded reads and time) are all its options.
"""

from __future__ import annotations

import functools
import ssl
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Protocol

import aiohttp
import certifi

EXCERPT_BYTES = 512
# What is read of a response at most: enough for an excerpt, never a whole huge body.
MAX_RESPONSE_BYTES = 64 * 1024
USER_AGENT = "engage-audience-syncer"


@dataclass(frozen=True)
class Response:
    """What came back from one POST: a status, or the reason there was none."""

    status: int | None
    retry_after: str | None = None
    excerpt: str = ""
    error: str | None = None


class Transport(Protocol):
    """Sends one POST and reports what came back; never raises for network trouble."""

    async def post(self, url: str, body: bytes, headers: Mapping[str, str]) -> Response:
        """POST ``body`` to ``url``."""
        ...

    async def aclose(self) -> None:
        """Release connections."""
        ...


def _excerpt(raw: bytes) -> str:
    text = raw[:EXCERPT_BYTES].decode("utf-8", "replace")
    return " ".join(text.split())


@functools.cache
def verified_tls() -> ssl.SSLContext:
    """The process's TLS context: certificates verified against certifi's CAs.

    Building one parses the CA file, tens of milliseconds, which every run (and every test)
    would pay again: the process's transports all share this one, as a context may be.
    """
    return ssl.create_default_context(cafile=certifi.where())


class AiohttpTransport:
    """A keep-alive aiohttp session: redirects not followed, TLS verified, time and size bounded.

    The session is made on first use, inside the event loop that sends.
    """

    def __init__(
        self, *, timeout_seconds: float, max_connections: int, tls: ssl.SSLContext | None = None
    ) -> None:
        self._timeout_seconds = timeout_seconds
        self._max_connections = max_connections
        self._tls: ssl.SSLContext | bool = tls if tls is not None else True
        self._session: aiohttp.ClientSession | None = None

    def _open(self) -> aiohttp.ClientSession:
        if self._session is None:
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(
                    limit=self._max_connections,
                    limit_per_host=self._max_connections,
                    ssl=self._tls,
                ),
                timeout=aiohttp.ClientTimeout(total=self._timeout_seconds),
                headers={"User-Agent": USER_AGENT},
                # Proxies and .netrc from the environment are not ours to pick up silently.
                trust_env=False,
            )
        return self._session

    async def post(self, url: str, body: bytes, headers: Mapping[str, str]) -> Response:
        """POST once; the whole exchange, slow-dripping servers included, is bounded in time."""
        session = self._open()
        try:
            # The session's total timeout covers the whole exchange, reading the reply included.
            async with session.post(
                url, data=body, headers=headers, allow_redirects=False
            ) as reply:
                received = bytearray()
                while len(received) < MAX_RESPONSE_BYTES:
                    chunk = await reply.content.read(MAX_RESPONSE_BYTES - len(received))
                    if not chunk:
                        break
                    received.extend(chunk)
                # A body not read to its end closes the connection on release (aiohttp never
                # reuses a half-read one), so a huge reply costs one connection, not a stall.
                return Response(
                    status=reply.status,
                    retry_after=reply.headers.get("Retry-After"),
                    excerpt=_excerpt(bytes(received)),
                )
        except TimeoutError:
            return Response(status=None, error=f"timed out after {self._timeout_seconds:g}s")
        except (aiohttp.ClientError, OSError, ValueError, OverflowError) as error:
            # Whatever goes wrong with one URL is that URL's failure, never the run's. The
            # message names the host and reason; it never holds headers, so no secret.
            return Response(status=None, error=f"{type(error).__name__}: {error}"[:300])

    async def aclose(self) -> None:
        """Close the connection pool."""
        if self._session is not None:
            await self._session.close()
            self._session = None
