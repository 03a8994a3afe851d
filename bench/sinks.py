"""A recording HTTP sink for bench/bench.py, run as a process of its own.

    .venv/bin/python bench/sinks.py --port PORT [--delay SECONDS]

Answers every POST with 200 {"ok":true}, ``--delay`` seconds after it arrived (0: at once), and
records for each request its arrival time (the loop's monotonic clock) and the JSON body's
messageId and userId. GET /stats returns the summary as JSON; DELETE /stats forgets what was
recorded. Runs on uvloop when it is installed; stops on SIGTERM or SIGINT.
"""

from __future__ import annotations

import argparse
import asyncio
import json

from aiohttp import web

try:
    import uvloop
except ImportError:  # pragma: no cover - uvloop is installed in the project's venv
    uvloop = None  # type: ignore[assignment]

OK_BODY = '{"ok":true}'


class Recorder:
    """What arrived: one arrival time per request, and the ids its body carried."""

    def __init__(self) -> None:
        self.clear()

    def clear(self) -> None:
        self.arrivals: list[float] = []
        self.message_ids: list[str] = []
        self.user_ids: set[str] = set()
        self.unreadable = 0

    def record(self, arrived: float, body: bytes) -> None:
        self.arrivals.append(arrived)
        try:
            event = json.loads(body)
            self.message_ids.append(str(event["messageId"]))
            self.user_ids.add(str(event["userId"]))
        except (ValueError, KeyError, TypeError):
            self.unreadable += 1

    def summary(self) -> dict[str, object]:
        count = len(self.arrivals)
        distinct = len(set(self.message_ids))
        first = min(self.arrivals) if self.arrivals else None
        last = max(self.arrivals) if self.arrivals else None
        rate = None
        if first is not None and last is not None and count > 1 and last > first:
            rate = (count - 1) / (last - first)
        return {
            "count": count,
            "distinct_message_ids": distinct,
            "duplicates": len(self.message_ids) - distinct,
            "distinct_user_ids": len(self.user_ids),
            "unreadable": self.unreadable,
            "first": first,
            "last": last,
            "rate": rate,
        }


def make_app(delay: float) -> web.Application:
    recorder = Recorder()

    async def receive(request: web.Request) -> web.Response:
        arrived = asyncio.get_running_loop().time()
        recorder.record(arrived, await request.read())
        if delay > 0:
            await asyncio.sleep(delay)
        return web.Response(text=OK_BODY, content_type="application/json")

    async def stats(_request: web.Request) -> web.Response:
        return web.json_response(recorder.summary())

    async def reset(_request: web.Request) -> web.Response:
        recorder.clear()
        return web.json_response({"reset": True})

    app = web.Application()
    app.router.add_get("/stats", stats)
    app.router.add_delete("/stats", reset)
    app.router.add_post("/{tail:.*}", receive)
    return app


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--delay", type=float, default=0.0, help="seconds before each answer")
    arguments = parser.parse_args()
    loop = uvloop.new_event_loop() if uvloop is not None else asyncio.new_event_loop()
    web.run_app(
        make_app(arguments.delay),
        host="127.0.0.1",
        port=arguments.port,
        print=None,
        access_log=None,
        backlog=1024,
        loop=loop,
    )


if __name__ == "__main__":
    main()
