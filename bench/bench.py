"""The syncer's benchmark: every figure next to its target, all measured in one run.

    .venv/bin/python bench/bench.py [--quick] [--only NAME[,NAME]] [--postgres-url URL]
                                    [--concurrency N] [--timeout SECONDS]

It builds its own data (SQLite files in a temporary directory; on PostgreSQL, a clean `public`
schema per scenario: it DROPS that schema of the database named by --postgres-url), starts its
own sinks (nginx for the fast one when installed, else bench/sinks.py; bench/sinks.py for the
50 ms and the recording sinks), measures a raw aiohttp client against the fast sink
(bench/raw_client.py) at the start, and again just before and just after each first sync (the
ratio is taken against the mean of those two: this machine's speed drifts by a third within
minutes), runs the real `syncer` CLI as subprocesses, and prints one markdown
table: figure, target, ratio and pass/FAIL. Progress goes to stderr, the table to stdout. Exit
status 1 when a target is missed or a scenario failed, else 0.

Scenarios, in the order they run (names for --only; churn_1pct and rss_growth need
first_sync_sqlite, which then runs too):

  first_sync_sqlite     1M memberships over 10 audiences, one URL (fast sink): events/s of the
                        whole `syncer sync` process >= 0.5 x raw client req/s; its peak RSS.
  churn_1pct            then 0.5% of the memberships leave and as many new ones join:
                        sync wall time <= 5% of the first sync's.
  rss_growth            a first sync of 100k memberships (1 audience, fresh database): peak RSS
                        of the 1M sync <= 1.3 x that, and < 200 MB.
  first_sync_postgres   200k memberships over 10 audiences on PostgreSQL: >= 0.5 x raw.
  slow_sink             20,000 members to a sink answering after 50 ms: events/s of the whole
                        process >= 0.9 x concurrency/0.05; also shown: the rate at the sink
                        from its first request to its last, and the raw client's against it.
  two_workers_postgres  8,000 members, 50 ms sink, PostgreSQL: two processes together
                        >= 1.6 x one alone; every member received, no messageId twice.
  pacing                rate_limit_per_second = 150: one process on SQLite (3,000 members), two
                        together on PostgreSQL (3,000): rate at the receiver 150/s +-5%.
  no_change_pairs       a no-change sync of 500 audiences x 2 URLs (10 members each) <= 2 x one
                        of 1 audience x 2 URLs (5,000 members); medians of 3.

--quick divides the sizes by 10 (the 50 ms and pacing scenarios use 2,000 and 1,500 members).
"""

from __future__ import annotations

import argparse
import ctypes
import hashlib
import itertools
import json
import os
import platform
import random
import re
import shlex
import shutil
import signal
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import urllib.request
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

import psycopg

BENCH_DIR = Path(__file__).resolve().parent
ROOT = BENCH_DIR.parent
DEFAULT_POSTGRES_URL = "postgresql://postgres@127.0.0.1:5432/test"
SECRET = "bench-secret"
SLOW_DELAY = 0.05
# The 50 ms sink's scenario measures a sustained rate: about 70 s of sending, so that the
# process's own start (1-1.7 s of imports on this 2-core machine) weighs 2%, not 5%.
SLOW_MEMBERS = 20_000
PACING_RATE = 150
MB = 1_000_000
NO_CHANGE_RUNS = 3


def log(message: str) -> None:
    """A progress line, on stderr."""
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


class NotAvailable(Exception):
    """The syncer does not offer what the scenario needs (e.g. a setting it rejects)."""


class ScenarioError(Exception):
    """The scenario could not be measured."""


# ---------------------------------------------------------------------------------------------
# Child processes: every one is tracked and stopped on exit, and dies with the bench.

_CHILDREN: list[subprocess.Popen[bytes]] = []
_LIBC = ctypes.CDLL(None) if sys.platform.startswith("linux") else None
_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    """Run in the child before exec: SIGTERM when the bench dies, even by SIGKILL."""
    if _LIBC is not None:
        _LIBC.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


def _child_environment() -> dict[str, str]:
    # The syncer's environment overrides would replace what the settings file says.
    return {key: value for key, value in os.environ.items() if not key.startswith("SYNCER_")}


def spawn(command: list[str], log_stem: Path) -> subprocess.Popen[bytes]:
    """Start a process in its own session; its stdout and stderr go to log_stem.out/.err."""
    with (
        log_stem.with_suffix(".out").open("wb") as out,
        log_stem.with_suffix(".err").open("wb") as err,
    ):
        child = subprocess.Popen(
            command,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=err,
            env=_child_environment(),
            start_new_session=True,
            preexec_fn=_die_with_parent,
        )
    _CHILDREN.append(child)
    return child


def stop(child: subprocess.Popen[bytes]) -> None:
    """SIGTERM, then SIGKILL after 5 s."""
    if child.poll() is None:
        child.terminate()
        try:
            child.wait(5)
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait()
    if child in _CHILDREN:
        _CHILDREN.remove(child)


def stop_all() -> None:
    for child in reversed(list(_CHILDREN)):
        stop(child)


def read_log(log_stem: Path, suffix: str) -> str:
    return log_stem.with_suffix(suffix).read_text(errors="replace")


def tail(text: str, lines: int = 5) -> str:
    return " | ".join(text.strip().splitlines()[-lines:])


def run_child(command: list[str], log_stem: Path, timeout: float) -> tuple[int, str, str]:
    """Run a command to its end: exit status, stdout, stderr."""
    child = spawn(command, log_stem)
    try:
        code = child.wait(timeout)
    except subprocess.TimeoutExpired:
        stop(child)
        raise ScenarioError(f"{log_stem.name} timed out after {timeout:.0f} s") from None
    _CHILDREN.remove(child)
    return code, read_log(log_stem, ".out"), read_log(log_stem, ".err")


# ---------------------------------------------------------------------------------------------
# The syncer CLI.


def syncer_command() -> list[str]:
    script = Path(sys.executable).with_name("syncer")
    return [str(script)] if script.exists() else [sys.executable, "-m", "syncer"]


@dataclass
class Exit:
    """How one syncer process ended."""

    code: int
    seconds: float
    peak_rss_kib: int
    stdout: str
    stderr: str
    timed_out: bool = False

    @property
    def peak_rss_mb(self) -> float:
        return self.peak_rss_kib * 1024 / MB

    def problem(self) -> str | None:
        if self.timed_out:
            return f"killed after {self.seconds:.0f} s"
        if self.code != 0:
            return f"exit {self.code}"
        return None


def problems_of(exits: Iterable[Exit]) -> list[str]:
    return [problem for problem in (e.problem() for e in exits) if problem]


@dataclass
class Context:
    """What the scenarios share: options, the working directory, the fast sink, results."""

    quick: bool
    concurrency: int
    timeout: float
    postgres_url: str | None
    workdir: Path
    fast: Sink | None = None
    fast_kind: str = "none"
    raw_rate: float | None = None
    load_at_start: float = field(default_factory=lambda: os.getloadavg()[0])
    first_sqlite: FirstSync | None = None
    rows: list[Row] = field(default_factory=list)
    _names: Iterator[int] = field(default_factory=itertools.count)

    def size(self, full: int) -> int:
        return full // 10 if self.quick else full

    def pick(self, full: int, quick: int) -> int:
        return quick if self.quick else full

    def log_stem(self, name: str) -> Path:
        return self.workdir / f"{next(self._names):03d}-{name}"

    def need_fast(self) -> Sink:
        if self.fast is None:
            raise ScenarioError("no fast sink")
        return self.fast

    def need_postgres(self) -> str:
        if self.postgres_url is None:
            raise ScenarioError("PostgreSQL unreachable")
        return self.postgres_url


def peak_rss_kib(pid: int) -> int:
    """VmHWM of ``pid``, in KiB; 0 when it is gone (or without /proc)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return 0
    for line in status.splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    return 0


def children_of(pid: int) -> list[int]:
    """The live child processes of ``pid`` (Linux), [] elsewhere."""
    try:
        return [
            int(child) for child in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
        ]
    except OSError:
        return []


def run_syncers(ctx: Context, settings: Path, count: int = 1) -> tuple[float, list[Exit]]:
    """Start ``count`` `syncer sync` processes at once; wall time until the last one exited.

    Each process's peak RSS is the high-water mark of its memory since it started (VmHWM),
    plus those of its children (the store's helper process), read every 50 ms: not wait4's
    ru_maxrss, which would count the image of this bench, which the child was forked from.
    A process still running after --timeout seconds is killed.
    """
    stems = [ctx.log_stem("sync") for _ in range(count)]
    command = [*syncer_command(), "--settings", str(settings), "sync"]
    started = time.perf_counter()
    children = [spawn(command, stem) for stem in stems]
    ended: dict[int, tuple[float, int, int]] = {}

    def reap(pid: int) -> None:
        peaks: dict[int, int] = {}
        while True:
            for process in (pid, *children_of(pid)):
                peaks[process] = max(peaks.get(process, 0), peak_rss_kib(process))
            try:
                reaped, status, usage = os.wait4(pid, os.WNOHANG)
            except ChildProcessError:  # reaped by stop() when the bench is interrupted
                return
            if reaped:
                break
            time.sleep(0.05)
        # Without /proc, wait4's figure: it also counts the bench's own image, forked from.
        ended[pid] = (time.perf_counter(), status, sum(peaks.values()) or usage.ru_maxrss)

    threads = [threading.Thread(target=reap, args=(c.pid,), daemon=True) for c in children]
    for thread in threads:
        thread.start()
    killed: set[int] = set()
    for child, thread in zip(children, threads, strict=True):
        thread.join(max(0.0, started + ctx.timeout - time.perf_counter()))
        if thread.is_alive():
            log(f"syncer pid {child.pid} still running after {ctx.timeout:.0f} s: killing it")
            os.kill(child.pid, signal.SIGKILL)
            killed.add(child.pid)
            thread.join()
    exits = []
    for child, stem in zip(children, stems, strict=True):
        end, status, peak_kib = ended[child.pid]
        child.returncode = os.waitstatus_to_exitcode(status)
        _CHILDREN.remove(child)
        finished = Exit(
            code=child.returncode,
            seconds=end - started,
            peak_rss_kib=peak_kib,
            stdout=read_log(stem, ".out"),
            stderr=read_log(stem, ".err"),
            timed_out=child.pid in killed,
        )
        if finished.problem():
            log(f"  syncer {finished.problem()}: {tail(finished.stdout + finished.stderr)}")
        exits.append(finished)
    return max(e.seconds for e in exits), exits


def migrate(ctx: Context, settings: Path) -> None:
    """`syncer migrate`, which also validates the settings file."""
    command = [*syncer_command(), "--settings", str(settings), "migrate"]
    code, out, err = run_child(command, ctx.log_stem("migrate"), ctx.timeout)
    if code == 2 and "rate_limit_per_second" in err:
        reason = re.sub(r"\S+\.toml: ", "", tail(err, 1))  # without the temporary path
        raise NotAvailable(f"the syncer rejects the setting: {reason}")
    if code != 0:
        raise ScenarioError(f"syncer migrate exited {code}: {tail(out + err, 2)}")


def toml_string(value: str) -> str:
    return json.dumps(value)  # a JSON string is a TOML basic string (ASCII, simple escapes)


def write_settings(
    ctx: Context, name: str, database_url: str, urls: list[str], rate_limit: int | None = None
) -> Path:
    delivery = [f"concurrency = {ctx.concurrency}"]
    if rate_limit is not None:
        delivery.append(f"rate_limit_per_second = {rate_limit}")
    text = "\n".join(
        [
            "[database]",
            f"url = {toml_string(database_url)}",
            "",
            "[tray]",
            f"workflow_urls = [{', '.join(toml_string(url) for url in urls)}]",
            f"shared_secret = {toml_string(SECRET)}",
            "",
            "[delivery]",
            *delivery,
            "",
            "[guard]",
            "max_exit_share = 1.0",
            "min_audience_size = 1000000000",
            "",
            "[logging]",
            'level = "WARNING"',
            "",
        ]
    )
    path = ctx.workdir / f"{name}.toml"
    path.write_text(text)
    return path


# ---------------------------------------------------------------------------------------------
# Data.


@dataclass(frozen=True)
class Layout:
    """``audiences`` audiences of ``per_audience`` members each, no user in two of them."""

    audiences: int
    per_audience: int

    @property
    def memberships(self) -> int:
        return self.audiences * self.per_audience

    def describe(self) -> str:
        return f"{self.memberships:,} memberships over {self.audiences} audience(s)"


def audience_id(index: int) -> str:
    return f"aud{index:03d}"


def user_id(n: int) -> str:
    return f"u{n:08d}"


def email(n: int) -> str:
    return f"u{n}@example.com"


def audience_rows(layout: Layout) -> list[tuple[str, str]]:
    return [(audience_id(a), f"Bench Audience {a}") for a in range(layout.audiences)]


def membership_rows(layout: Layout) -> Iterator[tuple[str, str, str]]:
    for n in range(layout.memberships):
        yield audience_id(n // layout.per_audience), user_id(n), email(n)


def postgres_dsn(url: str) -> str:
    """The URL as libpq reads it (SQLAlchemy's postgresql+driver:// prefix removed)."""
    return re.sub(r"^postgres(ql)?(\+\w+)?://", "postgresql://", url)


def postgres_reachable(url: str) -> str | None:
    """None when PostgreSQL answers, else why not."""
    try:
        with psycopg.connect(postgres_dsn(url), connect_timeout=3) as connection:
            connection.execute("SELECT 1")
    except psycopg.Error as error:
        return str(error).strip().splitlines()[0]
    return None


def reset_postgres(url: str) -> None:
    with psycopg.connect(postgres_dsn(url), autocommit=True) as connection:
        connection.execute("DROP SCHEMA IF EXISTS public CASCADE")
        connection.execute("CREATE SCHEMA public")


def load_sqlite(path: Path, layout: Layout) -> None:
    connection = sqlite3.connect(path)
    try:
        with connection:
            connection.executemany(
                "INSERT INTO audiences (id, name) VALUES (?, ?)", audience_rows(layout)
            )
            connection.executemany(
                "INSERT INTO audience_memberships (audience_id, user_id, email) VALUES (?, ?, ?)",
                membership_rows(layout),
            )
    finally:
        connection.close()


def load_postgres(url: str, layout: Layout) -> None:
    with psycopg.connect(postgres_dsn(url)) as connection, connection.cursor() as cursor:
        cursor.executemany(
            "INSERT INTO audiences (id, name) VALUES (%s, %s)", audience_rows(layout)
        )
        statement = "COPY audience_memberships (audience_id, user_id, email) FROM STDIN"
        with cursor.copy(statement) as copy:
            for row in membership_rows(layout):
                copy.write_row(row)


def prepare(
    ctx: Context,
    name: str,
    kind: str,
    layout: Layout,
    urls: list[str],
    rate_limit: int | None = None,
) -> tuple[Path, Path | None]:
    """A fresh database (SQLite file, or a clean PostgreSQL schema), migrated and loaded.

    Returns the settings file and, for SQLite, the database file.
    """
    sqlite_path: Path | None = None
    if kind == "sqlite":
        sqlite_path = ctx.workdir / f"{name}.db"
        database_url = f"sqlite:///{sqlite_path}"
    else:
        database_url = ctx.need_postgres()
        reset_postgres(database_url)
    settings = write_settings(ctx, name, database_url, urls, rate_limit)
    migrate(ctx, settings)
    started = time.perf_counter()
    if sqlite_path is not None:
        load_sqlite(sqlite_path, layout)
    else:
        load_postgres(database_url, layout)
    log(f"  {name}: loaded {layout.describe()} in {time.perf_counter() - started:.1f} s ({kind})")
    return settings, sqlite_path


def churn_sqlite(path: Path, layout: Layout, share: float) -> int:
    """Remove share/2 of the memberships at random, add as many new users; return the count."""
    half = int(layout.memberships * share / 2)
    leaving = random.Random(7).sample(range(layout.memberships), half)
    removed = [(audience_id(n // layout.per_audience), user_id(n)) for n in leaving]
    joining = [
        (
            audience_id(i % layout.audiences),
            user_id(layout.memberships + i),
            email(layout.memberships + i),
        )
        for i in range(half)
    ]
    connection = sqlite3.connect(path)
    try:
        with connection:
            connection.executemany(
                "DELETE FROM audience_memberships WHERE audience_id = ? AND user_id = ?", removed
            )
            connection.executemany(
                "INSERT INTO audience_memberships (audience_id, user_id, email) VALUES (?, ?, ?)",
                joining,
            )
    finally:
        connection.close()
    return 2 * half


# ---------------------------------------------------------------------------------------------
# Sinks.


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def wait_for_port(port: int, child: subprocess.Popen[bytes], name: str) -> None:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if child.poll() is not None:
            raise ScenarioError(f"{name} exited with status {child.returncode}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        except OSError:
            time.sleep(0.05)
    raise ScenarioError(f"{name} did not listen on port {port} within 10 s")


def http(url: str, method: str = "GET") -> str:
    with urllib.request.urlopen(urllib.request.Request(url, method=method), timeout=10) as reply:
        return str(reply.read().decode())


@dataclass
class Sink:
    """An HTTP server in a process of its own: nginx, or bench/sinks.py."""

    kind: str  # "nginx" or "python"
    port: int
    process: subprocess.Popen[bytes]
    status_requests: int = 0

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def request_count(self) -> int:
        """Requests received so far (other than the bench's own status requests)."""
        if self.kind == "nginx":
            self.status_requests += 1
            # "Active connections: 1\nserver accepts handled requests\n 2 2 2\n..."
            total = int(http(self.url("/status")).splitlines()[2].split()[2])
            return total - self.status_requests
        return int(self.stats()["count"])

    def stats(self) -> dict[str, Any]:
        """The recording sink's summary (see bench/sinks.py)."""
        result: dict[str, Any] = json.loads(http(self.url("/stats")))
        return result

    def reset(self) -> None:
        http(self.url("/stats"), method="DELETE")


def nginx_binary() -> str | None:
    if Path("/usr/sbin/nginx").exists():
        return "/usr/sbin/nginx"
    return shutil.which("nginx")


def start_nginx(ctx: Context, binary: str) -> Sink:
    prefix = ctx.workdir / "nginx"
    prefix.mkdir()
    port = free_port()
    template = (BENCH_DIR / "nginx.conf.template").read_text()
    config = prefix / "nginx.conf"
    config.write_text(template.replace("@PREFIX@", str(prefix)).replace("@PORT@", str(port)))
    command = [binary, "-e", str(prefix / "error.log"), "-p", str(prefix), "-c", str(config)]
    child = spawn(command, prefix / "nginx")
    try:
        wait_for_port(port, child, "nginx")
    except ScenarioError as error:
        stop(child)
        raise ScenarioError(f"{error}: {tail(read_log(prefix / 'error', '.log'), 2)}") from None
    sink = Sink("nginx", port, child)
    if http(sink.url("/wf0"), method="POST") != '{"ok":true}':
        stop(child)
        raise ScenarioError("nginx does not answer POST with 200 {'ok':true}")
    return sink


def start_python_sink(ctx: Context, name: str, delay: float) -> Sink:
    port = free_port()
    command = [sys.executable, str(BENCH_DIR / "sinks.py"), "--port", str(port)]
    child = spawn([*command, "--delay", str(delay)], ctx.log_stem(name))
    wait_for_port(port, child, name)
    return Sink("python", port, child)


@contextmanager
def python_sink(ctx: Context, name: str, delay: float) -> Iterator[Sink]:
    sink = start_python_sink(ctx, name, delay)
    try:
        yield sink
    finally:
        stop(sink.process)


def start_fast_sink(ctx: Context) -> None:
    binary = nginx_binary()
    if binary is not None:
        try:
            ctx.fast = start_nginx(ctx, binary)
            version = subprocess.run([binary, "-v"], capture_output=True, text=True).stderr
            ctx.fast_kind = f"nginx {version.strip().rpartition('/')[2]} ({binary})"
        except (ScenarioError, OSError) as error:
            log(f"nginx failed to start ({error}); falling back to the Python sink")
    if ctx.fast is None:
        ctx.fast = start_python_sink(ctx, "fast-sink", 0.0)
        ctx.fast_kind = "bench/sinks.py (aiohttp on uvloop; nginx not available)"
    log(f"fast sink: {ctx.fast_kind} on port {ctx.fast.port}")


def raw_client_rate(
    ctx: Context, requests: int, label: str, sink: Sink | None = None
) -> float | None:
    """One run of the raw client against ``sink`` (default: the fast sink): its req/s, or None
    if it failed."""
    sink = sink or ctx.need_fast()
    command = [sys.executable, str(BENCH_DIR / "raw_client.py"), "--url", sink.url("/raw")]
    command += ["--requests", str(requests), "--concurrency", str(ctx.concurrency)]
    log(f"raw client {label}: {requests:,} requests, concurrency {ctx.concurrency}")
    code, out, err = run_child(command, ctx.log_stem("raw-client"), ctx.timeout)
    if code != 0:
        log(f"raw client failed (exit {code}): {tail(err)}")
        return None
    result = json.loads(out)
    if result["errors"]:
        log(f"raw client: {result['errors']} answers were not 200")
    rate = float(result["rate"])
    log(f"raw client {label}: {rate:,.0f} req/s ({result['body_bytes']}-byte bodies)")
    return rate


def measure_raw_baseline(ctx: Context) -> None:
    ctx.raw_rate = raw_client_rate(ctx, ctx.pick(100_000, 20_000), "baseline")


def bracketing_raw_rate(ctx: Context, before: float | None, after: float | None) -> float | None:
    """The raw client's rate around a measurement: the mean of the runs just before and just
    after it (this machine's speed drifts by a third within minutes), else the run-wide one."""
    rates = [rate for rate in (before, after) if rate is not None]
    return sum(rates) / len(rates) if rates else ctx.raw_rate


# ---------------------------------------------------------------------------------------------
# Results.


@dataclass
class Row:
    scenario: str
    measured: str
    target: str
    ratio: str
    result: str


def verdict(ok: bool, problems: list[str]) -> str:
    if problems:
        return "FAIL (" + "; ".join(problems) + ")"
    return "pass" if ok else "FAIL"


@dataclass
class FirstSync:
    """A first sync of a fresh database to the fast sink."""

    settings: Path
    database: Path | None
    layout: Layout
    wall: float
    received: int
    exit: Exit
    raw_rate: float | None  # the raw client's, measured just before and just after

    @property
    def rate(self) -> float:
        return self.received / self.wall

    def problems(self) -> list[str]:
        problems = problems_of([self.exit])
        if self.received != self.layout.memberships:
            problems.append(f"sink got {self.received:,} of {self.layout.memberships:,}")
        return problems


def measure_first_sync(ctx: Context, name: str, kind: str, layout: Layout) -> FirstSync:
    sink = ctx.need_fast()
    settings, database = prepare(ctx, name, kind, layout, [sink.url("/wf0")])
    bracket = ctx.pick(50_000, 10_000)
    raw_before = raw_client_rate(ctx, bracket, f"just before {name}")
    before = sink.request_count()
    wall, (finished,) = run_syncers(ctx, settings)
    received = sink.request_count() - before
    raw_after = raw_client_rate(ctx, bracket, f"just after {name}")
    raw = bracketing_raw_rate(ctx, raw_before, raw_after)
    result = FirstSync(settings, database, layout, wall, received, finished, raw)
    log(
        f"  {name}: {received:,} events in {wall:.1f} s = {result.rate:,.0f}/s, "
        f"peak RSS {finished.peak_rss_mb:.0f} MB, exit {finished.code}"
    )
    return result


def first_sync_row(ctx: Context, name: str, first: FirstSync) -> Row:
    measured = (
        f"{first.rate:,.0f} ev/s ({first.received:,} events in {first.wall:.1f} s, "
        f"peak RSS {first.exit.peak_rss_mb:.0f} MB)"
    )
    if first.raw_rate is None:
        return Row(name, measured, ">= 0.50 x raw", "-", "n/a (no raw baseline)")
    ratio = first.rate / first.raw_rate
    target = f">= 0.50 x raw around it ({0.5 * first.raw_rate:,.0f} ev/s)"
    return Row(name, measured, target, f"{ratio:.2f}", verdict(ratio >= 0.5, first.problems()))


# ---------------------------------------------------------------------------------------------
# Scenarios: each appends its rows to ctx.rows.


def first_sync_sqlite(ctx: Context) -> None:
    layout = Layout(10, ctx.size(100_000))
    ctx.first_sqlite = measure_first_sync(ctx, "first-sqlite", "sqlite", layout)
    ctx.rows.append(first_sync_row(ctx, "first_sync_sqlite", ctx.first_sqlite))


def first_sync_postgres(ctx: Context) -> None:
    layout = Layout(10, ctx.size(20_000))
    first = measure_first_sync(ctx, "first-postgres", "postgres", layout)
    ctx.rows.append(first_sync_row(ctx, "first_sync_postgres", first))


def churn_1pct(ctx: Context) -> None:
    first = ctx.first_sqlite
    if first is None or first.database is None:
        raise ScenarioError("needs first_sync_sqlite, which did not complete")
    sink = ctx.need_fast()
    changes = churn_sqlite(first.database, first.layout, 0.01)
    migrate(ctx, first.settings)  # untimed: the syncer may have gained a migration meanwhile
    before = sink.request_count()
    wall, exits = run_syncers(ctx, first.settings)
    received = sink.request_count() - before
    log(f"  churn: {received:,} events in {wall:.2f} s")
    problems = problems_of(exits)
    if received != changes:
        problems.append(f"sink got {received:,} of {changes:,} changes")
    ratio = wall / first.wall
    measured = f"{wall:.2f} s ({received:,} changes; first sync {first.wall:.1f} s)"
    ctx.rows.append(
        Row(
            "churn_1pct",
            measured,
            "<= 0.05 x first sync",
            f"{ratio:.3f}",
            verdict(ratio <= 0.05, problems),
        )
    )


def rss_growth(ctx: Context) -> None:
    large = ctx.first_sqlite
    if large is None:
        raise ScenarioError("needs first_sync_sqlite, which did not complete")
    small = measure_first_sync(ctx, "rss-small", "sqlite", Layout(1, ctx.size(100_000)))
    large_mb, small_mb = large.exit.peak_rss_mb, small.exit.peak_rss_mb
    growth = large_mb / small_mb
    measured = (
        f"{large_mb:.0f} MB at {large.layout.memberships:,} vs "
        f"{small_mb:.0f} MB at {small.layout.memberships:,} memberships"
    )
    problems = problems_of([large.exit]) + small.problems()
    ctx.rows.append(
        Row("rss_growth", measured, "<= 1.3 x", f"{growth:.2f}", verdict(growth <= 1.3, problems))
    )
    ctx.rows.append(
        Row(
            "rss_peak",
            f"{large_mb:.0f} MB at {large.layout.memberships:,} memberships",
            "< 200 MB",
            f"{large_mb / 200:.2f}",
            verdict(large_mb < 200, problems_of([large.exit])),
        )
    )


def slow_sink(ctx: Context) -> None:
    members = ctx.pick(SLOW_MEMBERS, 2_000)
    with python_sink(ctx, "slow-sink", SLOW_DELAY) as sink:
        # What a single-threaded client can get from this sink on this machine: the answers
        # of one round come back together and are handled one after another, on both sides.
        raw = raw_client_rate(ctx, ctx.pick(4_000, 1_000), "against the 50 ms sink", sink)
        sink.reset()
        settings, _ = prepare(ctx, "slow-sink", "sqlite", Layout(1, members), [sink.url("/wf0")])
        wall, exits = run_syncers(ctx, settings)
        stats = sink.stats()
    rate = stats["count"] / wall
    ideal = ctx.concurrency / SLOW_DELAY
    log(f"  slow sink: {stats['count']:,} events in {wall:.1f} s = {rate:,.0f}/s")
    problems = problems_of(exits)
    if stats["distinct_user_ids"] != members:
        problems.append(f"sink got {stats['distinct_user_ids']:,} of {members:,} users")
    received = f"{stats['rate']:,.0f}/s" if stats["rate"] else "n/a"
    raw_text = f"{raw:,.0f}/s" if raw is not None else "failed"
    measured = (
        f"{rate:,.0f} ev/s ({stats['count']:,} events in {wall:.1f} s, whole process; "
        f"first to last request at the sink {received}; raw client {raw_text})"
    )
    target = f">= 0.90 x {ctx.concurrency}/{SLOW_DELAY:g} s ({0.9 * ideal:,.0f} ev/s)"
    ratio = rate / ideal
    ctx.rows.append(
        Row("slow_sink", measured, target, f"{ratio:.2f}", verdict(ratio >= 0.9, problems))
    )


def two_workers_postgres(ctx: Context) -> None:
    layout = Layout(1, ctx.pick(8_000, 2_000))
    with python_sink(ctx, "two-workers-sink", SLOW_DELAY) as sink:
        urls = [sink.url("/wf0")]
        settings, _ = prepare(ctx, "two-workers-one", "postgres", layout, urls)
        wall_one, exits_one = run_syncers(ctx, settings, 1)
        one = sink.stats()
        sink.reset()
        settings, _ = prepare(ctx, "two-workers-two", "postgres", layout, urls)
        wall_two, exits_two = run_syncers(ctx, settings, 2)
        two = sink.stats()
    if not one["count"]:
        raise ScenarioError(f"one process delivered nothing ({', '.join(problems_of(exits_one))})")
    rate_one, rate_two = one["count"] / wall_one, two["count"] / wall_two
    one_text = f"one: {rate_one:,.0f} ev/s ({wall_one:.1f} s)"
    two_text = f"two: {rate_two:,.0f} ev/s ({wall_two:.1f} s)"
    log(f"  {one_text}; {two_text}")
    problems = problems_of(exits_one + exits_two)
    if one["distinct_user_ids"] != layout.memberships:
        problems.append(f"one process: sink got {one['distinct_user_ids']:,} users")
    ratio = rate_two / rate_one
    measured = f"{two_text}; {one_text}"
    ctx.rows.append(
        Row(
            "two_workers_postgres",
            measured,
            "two >= 1.6 x one",
            f"{ratio:.2f}",
            verdict(ratio >= 1.6, problems),
        )
    )
    users, duplicates = two["distinct_user_ids"], two["duplicates"]
    codes = ", ".join(str(e.code) for e in exits_two)
    complete = users == layout.memberships and duplicates == 0
    ctx.rows.append(
        Row(
            "two_workers_postgres_exactly_once",
            f"{users:,}/{layout.memberships:,} users, {duplicates} duplicate messageIds, "
            f"exits {codes}",
            "all users, 0 duplicates, exits 0",
            "-",
            verdict(complete, problems_of(exits_two)),
        )
    )


def pacing_row(name: str, members: int, stats: dict[str, Any], exits: list[Exit]) -> Row:
    problems = problems_of(exits)
    if stats["distinct_user_ids"] != members:
        problems.append(f"sink got {stats['distinct_user_ids']:,} of {members:,} users")
    rate = stats["rate"]
    if rate is None:
        return Row(
            name, f"{stats['count']} events", f"{PACING_RATE}/s +-5%", "-", verdict(False, problems)
        )
    ratio = rate / PACING_RATE
    measured = f"{rate:,.1f} ev/s at the sink ({stats['count']:,} events)"
    ok = 0.95 <= ratio <= 1.05
    return Row(name, measured, f"{PACING_RATE}/s +-5%", f"{ratio:.3f}", verdict(ok, problems))


def pacing(ctx: Context) -> None:
    members = ctx.pick(3_000, 1_500)
    layout = Layout(1, members)
    with python_sink(ctx, "pacing-sink", 0.0) as sink:
        urls = [sink.url("/wf0")]
        settings, _ = prepare(ctx, "pacing-sqlite", "sqlite", layout, urls, PACING_RATE)
        _, exits = run_syncers(ctx, settings, 1)
        stats = sink.stats()
        log(f"  pacing, one process on SQLite: {stats['rate'] or 0:,.1f}/s")
        ctx.rows.append(pacing_row("pacing_sqlite", members, stats, exits))
        if ctx.postgres_url is None:
            ctx.rows.append(
                Row("pacing_postgres_two", "-", "-", "-", "skipped: PostgreSQL unreachable")
            )
            return
        sink.reset()
        settings, _ = prepare(ctx, "pacing-postgres", "postgres", layout, urls, PACING_RATE)
        _, exits = run_syncers(ctx, settings, 2)
        stats = sink.stats()
        log(f"  pacing, two processes on PostgreSQL: {stats['rate'] or 0:,.1f}/s")
        ctx.rows.append(pacing_row("pacing_postgres_two", members, stats, exits))


def no_change_wall(ctx: Context, name: str, layout: Layout) -> tuple[float, list[str]]:
    """Median wall time of no-change syncs after a first sync, and what went wrong."""
    sink = ctx.need_fast()
    urls = [sink.url("/wf0"), sink.url("/wf1")]
    settings, _ = prepare(ctx, name, "sqlite", layout, urls)
    _, first = run_syncers(ctx, settings)
    problems = [f"first sync {p}" for p in problems_of(first)]
    walls = []
    before = sink.request_count()
    for _ in range(NO_CHANGE_RUNS):
        migrate(ctx, settings)  # untimed: the syncer may have gained a migration meanwhile
        wall, exits = run_syncers(ctx, settings)
        walls.append(wall)
        problems += problems_of(exits)
    sent = sink.request_count() - before
    if sent:
        problems.append(f"{sent} requests sent by no-change syncs")
    median = statistics.median(walls)
    log(f"  {name}: no-change syncs {', '.join(f'{w:.2f}' for w in walls)} s")
    return median, problems


def no_change_pairs(ctx: Context) -> None:
    single_layout = Layout(1, ctx.size(5_000))
    many_layout = Layout(ctx.size(500), 10)
    single, problems = no_change_wall(ctx, "no-change-single", single_layout)
    many, more_problems = no_change_wall(ctx, "no-change-many", many_layout)
    ratio = many / single
    measured = (
        f"{many:.2f} s ({many_layout.audiences} audiences x 2 URLs) vs "
        f"{single:.2f} s (1 x 2, {single_layout.memberships:,} members); "
        f"medians of {NO_CHANGE_RUNS}"
    )
    ctx.rows.append(
        Row(
            "no_change_pairs",
            measured,
            "<= 2 x",
            f"{ratio:.2f}",
            verdict(ratio <= 2, problems + more_problems),
        )
    )


TRAITS = 2


def trait_value(n: int, version: int = 0) -> str:
    """A JSON value as upstream might store it: numbers with cents, and small objects."""
    if n % 2:
        return f"{(n * 37 + version) % 100_000}.{n % 100:02d}"
    return f'{{"tier": "t{(n + version) % 5}", "orders": [{n % 7}, {version}]}}'


def load_traits(path: Path, per_trait: int) -> None:
    connection = sqlite3.connect(path)
    try:
        with connection:
            connection.executemany(
                "INSERT INTO computed_traits (id, name) VALUES (?, ?)",
                [(f"tr{t}", f"Trait {t}") for t in range(TRAITS)],
            )
            connection.executemany(
                "INSERT INTO computed_trait_values (trait_id, user_id, value) VALUES (?, ?, ?)",
                (
                    (f"tr{t}", user_id(n), trait_value(n))
                    for t in range(TRAITS)
                    for n in range(per_trait)
                ),
            )
    finally:
        connection.close()


def change_traits(path: Path, per_trait: int, share: float) -> int:
    """Give ``share`` of the values a new value, and rewrite as many in another spelling of the
    same value (no change by JSON equality); return how many changed."""
    step = round(1 / share)
    connection = sqlite3.connect(path)
    try:
        with connection:
            changed = connection.executemany(
                "UPDATE computed_trait_values SET value = ? WHERE trait_id = ? AND user_id = ?",
                (
                    (trait_value(n, version=1), f"tr{t}", user_id(n))
                    for t in range(TRAITS)
                    for n in range(0, per_trait, step)
                ),
            ).rowcount
            connection.executemany(
                "UPDATE computed_trait_values SET value = ? WHERE trait_id = ? AND user_id = ?",
                (
                    (trait_value(n).replace(", ", ",") + " ", f"tr{t}", user_id(n))
                    for t in range(TRAITS)
                    for n in range(2, per_trait, step)
                ),
            )
    finally:
        connection.close()
    return changed


def traits_sqlite(ctx: Context) -> None:
    """Computed traits on SQLite: a first sync against the raw client, then a run with
    nothing changed, then one with 1% of the values changed (and as many respelled)."""
    sink = ctx.need_fast()
    per_trait = ctx.size(100_000)
    settings, database = prepare(ctx, "traits", "sqlite", Layout(0, 0), [sink.url("/wf0")])
    assert database is not None
    load_traits(database, per_trait)
    total = TRAITS * per_trait
    log(f"  traits: loaded {total:,} values over {TRAITS} traits")
    bracket = ctx.pick(50_000, 10_000)
    raw_before = raw_client_rate(ctx, bracket, "just before traits")
    before = sink.request_count()
    wall, (first,) = run_syncers(ctx, settings)
    received = sink.request_count() - before
    raw = bracketing_raw_rate(ctx, raw_before, raw_client_rate(ctx, bracket, "just after traits"))
    problems = problems_of([first])
    if received != total:
        problems.append(f"sink got {received:,} of {total:,}")
    before = sink.request_count()
    idle_wall, idle = run_syncers(ctx, settings)
    idle_received = sink.request_count() - before
    if idle_received:
        problems.append(f"a run with nothing changed sent {idle_received:,}")
    changes = change_traits(database, per_trait, 0.01)
    before = sink.request_count()
    churn_wall, churn = run_syncers(ctx, settings)
    churn_received = sink.request_count() - before
    if churn_received != changes:
        problems.append(f"sink got {churn_received:,} of {changes:,} changed values")
    problems += problems_of(idle + churn)
    rate = received / wall
    log(
        f"  traits: first {received:,} in {wall:.1f} s = {rate:,.0f}/s, peak RSS "
        f"{first.peak_rss_mb:.0f} MB; no change {idle_wall:.2f} s; 1% changed "
        f"({churn_received:,} sent) {churn_wall:.2f} s"
    )
    measured = (
        f"{rate:,.0f} ev/s ({received:,} values in {wall:.1f} s, peak RSS "
        f"{first.peak_rss_mb:.0f} MB); no change {idle_wall:.2f} s; 1% changed "
        f"{churn_wall:.2f} s ({churn_received:,} sent)"
    )
    if raw is None:
        ctx.rows.append(Row("traits_sqlite", measured, ">= 0.50 x raw", "-", "n/a (no raw)"))
        return
    ratio = rate / raw
    ctx.rows.append(
        Row(
            "traits_sqlite",
            measured,
            f">= 0.50 x raw around it ({0.5 * raw:,.0f} ev/s)",
            f"{ratio:.2f}",
            verdict(ratio >= 0.5, problems),
        )
    )


SCENARIOS: dict[str, Callable[[Context], None]] = {
    "first_sync_sqlite": first_sync_sqlite,
    "churn_1pct": churn_1pct,
    "rss_growth": rss_growth,
    "first_sync_postgres": first_sync_postgres,
    "slow_sink": slow_sink,
    "two_workers_postgres": two_workers_postgres,
    "pacing": pacing,
    "no_change_pairs": no_change_pairs,
    "traits_sqlite": traits_sqlite,
}
NEED_FIRST_SQLITE = {"churn_1pct", "rss_growth"}
NEED_POSTGRES = {"first_sync_postgres", "two_workers_postgres"}
NEED_FAST_SINK = {
    "first_sync_sqlite",
    "churn_1pct",
    "rss_growth",
    "first_sync_postgres",
    "no_change_pairs",
    "traits_sqlite",
}
NEED_RAW = {"first_sync_sqlite", "first_sync_postgres", "traits_sqlite"}


def run_scenario(ctx: Context, name: str) -> None:
    if name in NEED_POSTGRES and ctx.postgres_url is None:
        log(f"== {name}: skipped, PostgreSQL unreachable")
        ctx.rows.append(Row(name, "-", "-", "-", "skipped: PostgreSQL unreachable"))
        return
    log(f"== {name}")
    started = time.perf_counter()
    try:
        SCENARIOS[name](ctx)
    except NotAvailable as error:
        log(f"  not available: {error}")
        ctx.rows.append(Row(name, "-", "-", "-", f"not available: {error}"))
    except ScenarioError as error:
        log(f"  ERROR: {error}")
        ctx.rows.append(Row(name, "-", "-", "-", f"ERROR: {error}"))
    except Exception as error:
        log(traceback.format_exc().rstrip())
        ctx.rows.append(Row(name, "-", "-", "-", f"ERROR: {type(error).__name__}: {error}"))
    log(f"== {name}: {time.perf_counter() - started:.1f} s")


# ---------------------------------------------------------------------------------------------
# The report.


def syncer_revision() -> str:
    def git(*arguments: str) -> str:
        return subprocess.run(
            ["git", "-C", str(ROOT), *arguments], capture_output=True, text=True, check=True
        ).stdout.strip()

    try:
        commit = git("rev-parse", "--short", "HEAD")
        dirty = git("status", "--porcelain", "--", "syncer", "migrations")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return commit + (" + uncommitted changes in syncer/" if dirty else "")


def source_fingerprint() -> str:
    """A hash of the syncer's code and migrations, to notice edits made during the run."""
    digest = hashlib.sha1()
    for path in sorted([*ROOT.glob("syncer/**/*.py"), *ROOT.glob("migrations/**/*.py")]):
        digest.update(str(path.relative_to(ROOT)).encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()[:12]


def cell(text: str) -> str:
    return text.replace("|", "\\|")


def source_note(at_start: str) -> str:
    at_end = source_fingerprint()
    if at_end == at_start:
        return ""
    return f" -> {at_end}: THE SYNCER'S CODE CHANGED DURING THE RUN, figures may mix versions"


def print_report(ctx: Context, seconds: float, interrupted: bool, source_at_start: str) -> None:
    raw = f"{ctx.raw_rate:,.0f} req/s" if ctx.raw_rate is not None else "not measured"
    lines = [
        f"machine: {os.cpu_count()} cores (nproc {len(os.sched_getaffinity(0))}), "
        f"load average {ctx.load_at_start:.1f} at start, "
        f"Python {platform.python_version()}, fast sink: {ctx.fast_kind}, "
        f"raw baseline (aiohttp, asyncio, concurrency {ctx.concurrency}): {raw}",
        f"syncer: {syncer_revision()}, source {source_at_start}{source_note(source_at_start)}",
        f"command: {shlex.join([sys.executable, *sys.argv])}",
        "",
        "| scenario | measured | target | ratio | result |",
        "| --- | --- | --- | --- | --- |",
    ]
    for row in ctx.rows:
        fields = (row.scenario, row.measured, row.target, row.ratio, row.result)
        lines.append("| " + " | ".join(cell(text) for text in fields) + " |")
    lines.append("")
    lines.append(
        f"total bench wall time: {seconds:.1f} s" + (" (INTERRUPTED)" if interrupted else "")
    )
    print("\n".join(lines), flush=True)


def parse_arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="sizes divided by ~10")
    parser.add_argument("--only", default=None, help="comma-separated scenario names")
    parser.add_argument("--postgres-url", default=DEFAULT_POSTGRES_URL)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument(
        "--timeout", type=float, default=3600.0, help="seconds each process may take (3600)"
    )
    arguments = parser.parse_args()
    if arguments.only is not None:
        names = [name.strip() for name in arguments.only.split(",") if name.strip()]
        unknown = [name for name in names if name not in SCENARIOS]
        if unknown or not names:
            parser.error(f"unknown scenario {unknown}; choose from {', '.join(SCENARIOS)}")
        arguments.only = names
    return arguments


def selected_scenarios(only: list[str] | None) -> list[str]:
    chosen = set(only or SCENARIOS)
    if chosen & NEED_FIRST_SQLITE and "first_sync_sqlite" not in chosen:
        log("churn_1pct and rss_growth need first_sync_sqlite: running it too")
        chosen.add("first_sync_sqlite")
    return [name for name in SCENARIOS if name in chosen]


def _interrupt(_signum: int, _frame: FrameType | None) -> None:
    raise KeyboardInterrupt


def main() -> int:
    arguments = parse_arguments()
    started = time.perf_counter()
    source_at_start = source_fingerprint()
    signal.signal(signal.SIGTERM, _interrupt)
    names = selected_scenarios(arguments.only)
    workdir = Path(tempfile.mkdtemp(prefix="syncer-bench-"))
    ctx = Context(
        quick=arguments.quick,
        concurrency=arguments.concurrency,
        timeout=arguments.timeout,
        postgres_url=arguments.postgres_url,
        workdir=workdir,
    )
    interrupted = False
    try:
        if set(names) & (NEED_POSTGRES | {"pacing"}):
            problem = postgres_reachable(arguments.postgres_url)
            if problem is not None:
                log(f"PostgreSQL unreachable ({problem}): its scenarios are skipped")
                ctx.postgres_url = None
        try:
            if set(names) & NEED_FAST_SINK:
                start_fast_sink(ctx)
            if set(names) & NEED_RAW:
                measure_raw_baseline(ctx)
        except ScenarioError as error:
            log(f"fast sink or raw baseline failed: {error}")
        for name in names:
            run_scenario(ctx, name)
    except KeyboardInterrupt:
        interrupted = True
        log("interrupted: stopping every process the bench started")
    finally:
        stop_all()
        shutil.rmtree(workdir, ignore_errors=True)
    print_report(ctx, time.perf_counter() - started, interrupted, source_at_start)
    failed = any(row.result.startswith(("FAIL", "ERROR")) for row in ctx.rows)
    return 130 if interrupted else int(failed)


if __name__ == "__main__":
    sys.exit(main())
