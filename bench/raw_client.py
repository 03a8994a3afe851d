"""The raw-client baseline of bench/bench.py: how fast plain aiohttp POSTs to a sink.

    .venv/bin/python bench/raw_client.py --url URL [--requests N] [--concurrency N] [--warmup N]

One ClientSession with TCPConnector(limit=concurrency), and ``concurrency`` workers POSTing
the same ~600-byte Segment identify body, signed with an X-Signature header, each reading its
response. Plain asyncio, not uvloop. After ``--warmup`` requests (same session, not timed) it
times ``--requests`` more and prints one JSON line: requests, seconds, rate, errors, body_bytes.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import hmac
import json
import time
import uuid

import aiohttp

SECRET = b"bench-secret"


def identify_body() -> bytes:
    """A body shaped like the syncer's: an identify with one trait, an email and personas."""
    event = {
        "type": "identify",
        "userId": "u00012345",
        "anonymousId": "anon-00012345-5f0c2a8e-2b1d-4c55-9a57-0d6c3f7e1a42",
        "traits": {"bench_audience_3": True, "email": "u12345@example.com"},
        "context": {
            "personas": {
                "computation_class": "audience",
                "computation_id": "aud003",
                "computation_key": "bench_audience_3",
                "namespace": "spa_syncer",
                "space_id": "spa_syncer",
            },
            "library": {"name": "engage-audience-syncer", "version": "0.1.0"},
        },
        "messageId": str(uuid.UUID(int=12345)),
        "timestamp": "2026-11-29T12:00:00.000Z",
        "integrations": {"All": False, "Tray": True},
    }
    return json.dumps(event, separators=(",", ":")).encode()


async def post_many(
    session: aiohttp.ClientSession, url: str, count: int, concurrency: int, body: bytes
) -> int:
    """POST ``count`` requests with ``concurrency`` workers; return how many were not 200."""
    signature = hmac.new(SECRET, body, hashlib.sha1).hexdigest()
    headers = {"Content-Type": "application/json", "X-Signature": signature}
    remaining = count
    errors = 0

    async def worker() -> None:
        nonlocal remaining, errors
        while remaining > 0:
            remaining -= 1
            async with session.post(url, data=body, headers=headers) as response:
                await response.read()
                if response.status != 200:
                    errors += 1

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return errors


async def measure(url: str, requests: int, concurrency: int, warmup: int) -> dict[str, float]:
    body = identify_body()
    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector) as session:
        await post_many(session, url, warmup, concurrency, body)
        started = time.perf_counter()
        errors = await post_many(session, url, requests, concurrency, body)
        seconds = time.perf_counter() - started
    return {
        "requests": requests,
        "seconds": seconds,
        "rate": requests / seconds,
        "errors": errors,
        "body_bytes": len(body),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--url", required=True)
    parser.add_argument("--requests", type=int, default=100_000)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--warmup", type=int, default=2_000)
    arguments = parser.parse_args()
    result = asyncio.run(
        measure(arguments.url, arguments.requests, arguments.concurrency, arguments.warmup)
    )
    print(json.dumps(result))


if __name__ == "__main__":
    main()
