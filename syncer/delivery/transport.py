"""The HTTP edge, behind a small interface so that the transport can change."""

from __future__ import annotations

import asyncio
import socket
import ssl
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Protocol

import httpx

EXCERPT_BYTES = 512
# What is read of a response at most: enough for an excerpt, never a whole huge body.
MAX_RESPONSE_BYTES = 64 * 1024


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


class HttpxTransport:
    """A keep-alive httpx client: redirects not followed, TLS verified, time and size bounded."""

    def __init__(
        self, *, timeout_seconds: float, max_connections: int, tls: ssl.SSLContext | None = None
    ) -> None:
        self._timeout_seconds = timeout_seconds
        limits = httpx.Limits(
            max_connections=max_connections, max_keepalive_connections=max_connections
        )
        self._client = httpx.AsyncClient(
            follow_redirects=False,
            timeout=httpx.Timeout(timeout_seconds),
            headers={"User-Agent": "engage-audience-syncer"},
            transport=httpx.AsyncHTTPTransport(
                verify=tls if tls is not None else True,
                limits=limits,
                # Small request/response exchanges on keep-alive connections: never let Nagle's
                # algorithm hold a write back waiting for an ACK.
                socket_options=[(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)],
            ),
        )

    async def post(self, url: str, body: bytes, headers: Mapping[str, str]) -> Response:
        """POST once; the whole exchange, slow-dripping servers included, is bounded in time."""
        try:
            async with asyncio.timeout(self._timeout_seconds):
                async with self._client.stream("POST", url, content=body, headers=headers) as reply:
                    received = bytearray()
                    async for chunk in reply.aiter_bytes():
                        received.extend(chunk)
                        if len(received) >= MAX_RESPONSE_BYTES:
                            break
                    return Response(
                        status=reply.status_code,
                        retry_after=reply.headers.get("Retry-After"),
                        excerpt=_excerpt(bytes(received)),
                    )
        except TimeoutError:
            return Response(status=None, error=f"timed out after {self._timeout_seconds:g}s")
        except httpx.TimeoutException as error:
            return Response(status=None, error=f"timed out ({type(error).__name__})")
        except (httpx.HTTPError, httpx.InvalidURL, OSError, ValueError, OverflowError) as error:
            # Whatever goes wrong with one URL is that URL's failure, never the run's. The
            # message names the host and reason; it never holds headers, so no secret.
            return Response(status=None, error=f"{type(error).__name__}: {error}"[:300])

    async def aclose(self) -> None:
        """Close the connection pool."""
        await self._client.aclose()
