"""Benchmark: first sync, a 1% change, and memory, against a local receiver in another process.

    .venv/bin/python bench/bench_sync.py --members 100000 [--database-url URL] [--urls 1]

Prints, for the chosen audience size: the time to plan the first sync in SQL, deliveries per
second, the time of a sync after 1% of the members changed, the time of a no-change sync, and
the peak resident memory of the syncer process, next to the same figure for a 10x smaller
audience run first in the same process (memory must not grow with the audience).
"""

from __future__ import annotations

import argparse
import random
import resource
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from sqlalchemy import delete, insert, text

from syncer.core.guard import GuardLimits
from syncer.settings import settings_from_mapping
from syncer.store import Store
from syncer.store.database import create_database_engine, migrate
from syncer.store.schema import audience_memberships, audiences
from syncer.store.sql import utcnow
from syncer.sync import SyncEngine, SyncOptions


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def start_receiver(port: int) -> subprocess.Popen[bytes]:
    receiver = subprocess.Popen(
        [sys.executable, "-m", "syncer.testing.tray_standin", "--port", str(port), "--quiet"],
        stdout=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return receiver
        except OSError:
            time.sleep(0.05)
    raise SystemExit("receiver did not start")


def load_members(store: Store, audience_id: str, count: int) -> None:
    with store.engine.begin() as connection:
        connection.execute(insert(audiences).values(id=audience_id, name=f"Bench {audience_id}"))
        batch = []
        for n in range(count):
            batch.append(
                {
                    "audience_id": audience_id,
                    "user_id": f"user_{n:09d}",
                    "anonymous_id": None,
                    "email": f"user{n}@example.com",
                }
            )
            if len(batch) == 10_000:
                connection.execute(insert(audience_memberships), batch)
                batch = []
        if batch:
            connection.execute(insert(audience_memberships), batch)


def churn(store: Store, audience_id: str, count: int, share: float) -> int:
    """Remove ``share`` of the members and add as many new ones; return the change count."""
    changed = int(count * share / 2)
    rng = random.Random(7)
    leaving = [f"user_{n:09d}" for n in rng.sample(range(count), changed)]
    with store.engine.begin() as connection:
        connection.execute(
            delete(audience_memberships).where(
                audience_memberships.c.audience_id == audience_id,
                audience_memberships.c.user_id.in_(leaving),
            )
        )
        connection.execute(
            insert(audience_memberships),
            [{"audience_id": audience_id, "user_id": f"new_{n:09d}"} for n in range(changed)],
        )
    return changed * 2


def timed_sync(engine: SyncEngine, audience_id: str) -> tuple[float, int]:
    started = time.perf_counter()
    report = engine.run(SyncOptions(audience=audience_id))
    if not report.fully_delivered:
        raise SystemExit(f"benchmark sync left changes undelivered: {report.counts}")
    return time.perf_counter() - started, report.counts.delivered


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--members", type=int, default=100_000)
    parser.add_argument("--database-url", default=None, help="default: a temporary SQLite file")
    parser.add_argument("--urls", type=int, default=1)
    parser.add_argument("--concurrency", type=int, default=16)
    arguments = parser.parse_args()

    workdir = Path(tempfile.mkdtemp(prefix="syncer-bench-"))
    url = arguments.database_url or f"sqlite:///{workdir / 'bench.db'}"
    database = create_database_engine(url)
    if database.dialect.name == "postgresql":
        with database.begin() as connection:
            connection.execute(text("DROP SCHEMA public CASCADE; CREATE SCHEMA public"))
    migrate(database)
    store = Store.open(database)
    port = free_port()
    receiver = start_receiver(port)
    settings = settings_from_mapping(
        {
            "database": {"url": url},
            "tray": {
                "workflow_urls": [f"http://127.0.0.1:{port}/wf{n}" for n in range(arguments.urls)],
                "shared_secret": "bench-secret",
            },
            "delivery": {"concurrency": arguments.concurrency},
            "logging": {"level": "WARNING"},
        },
        "bench",
        workdir,
    )
    engine = SyncEngine(settings, store)
    small = max(arguments.members // 10, 1)
    try:
        print(f"database: {database.dialect.name}; URLs: {arguments.urls}; "
              f"concurrency: {arguments.concurrency}")  # fmt: skip
        load_members(store, "small", small)
        seconds, delivered = timed_sync(engine, "small")
        rss_small = peak_rss_mib()
        rate = delivered / seconds
        print(f"first sync, {small:>9,} members: {seconds:7.2f} s, "
              f"{rate:8,.0f} deliveries/s, peak RSS {rss_small:6.1f} MiB")  # fmt: skip

        started = time.perf_counter()
        load_members(store, "large", arguments.members)
        print(f"loaded {arguments.members:,} members in {time.perf_counter() - started:.1f} s")
        destination_id = next(iter(store.destinations.find(settings.tray.workflow_urls).values()))
        started = time.perf_counter()
        store.refresh_statistics()  # as every run does first
        store.planning.plan(
            destination_id, "large", full=False, now=utcnow(), limits=GuardLimits(1.0, 10**9)
        )
        plan_seconds = time.perf_counter() - started
        seconds, delivered = timed_sync(engine, "large")
        rss_large = peak_rss_mib()
        print(f"first sync, {arguments.members:>9,} members: {seconds + plan_seconds:7.2f} s "
              f"(SQL plan {plan_seconds:.2f} s), {delivered / seconds:8,.0f} deliveries/s, "
              f"peak RSS {rss_large:6.1f} MiB")  # fmt: skip

        changes = churn(store, "large", arguments.members, 0.01)
        seconds, delivered = timed_sync(engine, "large")
        print(f"1% change ({changes:,} changes): {seconds:7.2f} s, {delivered:,} delivered")
        seconds, delivered = timed_sync(engine, "large")
        print(f"no change: {seconds:7.2f} s, {delivered:,} delivered")
        growth = rss_large - rss_small
        print(f"memory: peak RSS {rss_small:.1f} MiB after {small:,} members, "
              f"{rss_large:.1f} MiB after {arguments.members:,} "
              f"(+{growth:.1f} MiB for {arguments.members / small:.0f}x the audience)")  # fmt: skip
    finally:
        engine.close()
        receiver.terminate()
        receiver.wait()


if __name__ == "__main__":
    main()
