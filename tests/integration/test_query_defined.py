"""Audiences and computed traits defined by a query in the settings, on SQLite and PostgreSQL,
over real HTTP: evaluated at each sync and diffed like table-defined ones (a time window's
members drift out as time passes), read-only and within a time limit, skipped for the run with
the database's message when the query fails, refused at start-up (exit 2, nothing changed) when
it is not one SELECT, and refused in both places when their id is also an input table's.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import text

from syncer.core.states import Kind
from syncer.core.traits import Subject
from syncer.store import Store
from syncer.store.queries import QueryDefinition, QueryFailed
from syncer.sync import SyncEngine, SyncOptions, SyncReport, query_defined
from syncer.testing.tray_standin import TrayStandin
from tests.conftest import Upstream, make_settings
from tests.integration.cli_helpers import cli, settings_sections, toml_text, wait_until

KEY = "order_completed_last_30days"
# The window is the database's own clock: members drift out as time passes, with no upstream job.
WINDOW = {
    "sqlite": "datetime('now', '-30 days')",
    "postgresql": "now() - interval '30 days'",
}
# Never ends unless stopped: the time limit must stop it.
ENDLESS = (
    "WITH RECURSIVE n(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM n) "
    "SELECT CAST(x AS TEXT) AS user_id FROM n"
)


def dialect(store: Store) -> str:
    return store.engine.dialect.name


def make_orders(store: Store) -> None:
    amount = "NUMERIC(10, 2)" if dialect(store) == "postgresql" else "REAL"
    moment = "TIMESTAMP" if dialect(store) == "postgresql" else "TEXT"
    with store.engine.begin() as connection:
        connection.execute(
            text(
                f"CREATE TABLE orders (id INTEGER PRIMARY KEY, user_id TEXT, email TEXT, "
                f"amount {amount}, completed_at {moment})"
            )
        )


def add_order(store: Store, order_id: int, user: str, amount: str, days_ago: float) -> None:
    ago = (
        f"now() - interval '{days_ago} days'"
        if dialect(store) == "postgresql"
        else f"datetime('now', '-{days_ago} days')"
    )
    with store.engine.begin() as connection:
        connection.execute(
            text(
                "INSERT INTO orders (id, user_id, email, amount, completed_at) "
                f"VALUES (:id, :user, :email, :amount, {ago})"
            ),
            {"id": order_id, "user": user, "email": f"{user}@example.com", "amount": amount},
        )


def recent_buyers(store: Store) -> str:
    # As people write queries in a settings file: over lines, a comment last, a semicolon.
    return (
        "SELECT user_id, max(email) AS email FROM orders\n"
        f"WHERE completed_at >= {WINDOW[dialect(store)]}\n"
        "GROUP BY user_id;  -- the last 30 days, on the database's clock\n"
    )


def sync(
    store: Store, urls: list[Any], defined: dict[str, list[dict[str, Any]]], **options: Any
) -> SyncReport:
    database_url = store.engine.url.render_as_string(False)
    engine = SyncEngine(make_settings(database_url, urls, defined=defined), store)
    try:
        return engine.run(SyncOptions(**options))
    finally:
        engine.close()


def audience(store: Store, query: str | None = None, **extra: Any) -> dict[str, Any]:
    return {
        "id": "sql_recent_buyers",
        "name": "Order Completed Last 30 Days",
        "key": KEY,
        "query": query or recent_buyers(store),
        **extra,
    }


def told(standin: TrayStandin, path: str, key: str) -> dict[str, Any]:
    return {
        r.message["userId"]: r.message["traits"][key]
        for r in standin.received(path)
        if key in r.message["traits"]
    }


def test_a_time_window_audience_is_evaluated_each_sync_and_its_members_drift_out(
    store: Store, standin: TrayStandin
) -> None:
    make_orders(store)
    add_order(store, 1, "u1", "10.00", days_ago=1)
    add_order(store, 2, "u2", "20.00", days_ago=29.9)
    add_order(store, 3, "u3", "30.00", days_ago=45)
    url = standin.url("/wf")
    defined = {"audiences": [audience(store)]}

    report = sync(store, [url], defined)

    assert report.fully_delivered, report.problems
    assert told(standin, "/wf", KEY) == {"u1": True, "u2": True}
    message = standin.received("/wf")[0].message
    assert message["context"]["personas"]["computation_class"] == "audience"
    assert message["context"]["personas"]["computation_id"] == "sql_recent_buyers"
    assert message["traits"]["email"] == f"{message['userId']}@example.com"
    standin.clear()

    # Time passes: u2's order leaves the window; nothing upstream changed.
    with store.engine.begin() as connection:
        shift = "- interval '1 day'" if dialect(store) == "postgresql" else ""
        moved = f"completed_at {shift}" if shift else "datetime(completed_at, '-1 day')"
        connection.execute(text(f"UPDATE orders SET completed_at = {moved} WHERE id = 2"))
    assert sync(store, [url], defined).fully_delivered
    assert told(standin, "/wf", KEY) == {"u2": False}
    standin.clear()

    assert sync(store, [url], defined).fully_delivered
    assert standin.received("/wf") == []


def test_a_trait_defined_by_a_query_sends_the_values_it_computes(
    store: Store, standin: TrayStandin
) -> None:
    make_orders(store)
    add_order(store, 1, "u1", "400.00", days_ago=1)
    add_order(store, 2, "u1", "50.00", days_ago=2)
    add_order(store, 3, "u2", "0.10", days_ago=3)
    url = standin.url("/wf")
    defined = {
        "traits": [
            {
                "id": "sql_ltv",
                "name": "Lifetime Value",
                "query": "SELECT user_id, sum(amount) AS value FROM orders GROUP BY user_id",
            }
        ]
    }

    assert sync(store, [url], defined).fully_delivered
    bodies = {r.message["userId"]: r.body.decode() for r in standin.received("/wf")}
    assert told(standin, "/wf", "lifetime_value") == {"u1": 450, "u2": 0.1}
    if dialect(store) == "postgresql":  # numeric keeps its digits
        assert '"lifetime_value":450.00' in bodies["u1"]
    personas = standin.received("/wf")[0].message["context"]["personas"]
    assert personas["computation_class"] == "trait"
    standin.clear()

    with store.engine.begin() as connection:
        connection.execute(text("DELETE FROM orders WHERE user_id = 'u2'"))
    assert sync(store, [url], defined).fully_delivered
    assert told(standin, "/wf", "lifetime_value") == {"u2": None}


@pytest.mark.parametrize(
    ("query", "message"),
    [
        ("SELECT user_id FROM no_such_table", "no_such_table"),
        ("SELECT id FROM orders", "returns no user_id column (it returns: id)"),
        (ENDLESS, "ran longer than its time limit (0.5 s)"),
        ("SELECT 'x' AS user_id FROM (SELECT pg_sleep(5)) AS slow", "time limit (0.5 s)"),
    ],
    ids=["missing-table", "missing-column", "endless", "slow"],
)
def test_a_failing_query_skips_its_audience_for_the_run_with_the_reason(
    store: Store, upstream: Upstream, standin: TrayStandin, query: str, message: str
) -> None:
    if "pg_sleep" in query and dialect(store) != "postgresql":
        pytest.skip("SQLite has no sleep; the endless query stands for a slow one")
    make_orders(store)
    upstream.add_audience("aud_table", "From A Table")
    upstream.add("aud_table", "t1")
    url = standin.url("/wf")
    failing = audience(store, query, timeout_seconds=0.5)

    report = sync(store, [url], {"audiences": [failing]})

    [problem] = report.problems
    assert problem.subject == Subject.audience("sql_recent_buyers")
    assert problem.reason.startswith("query failed: ")
    assert message in problem.reason
    # The other audiences are synced as ever.
    assert told(standin, "/wf", "from_a_table") == {"t1": True}


def test_the_query_runs_read_only(store: Store) -> None:
    queries = store.queries
    if dialect(store) == "postgresql":
        with store.engine.begin() as connection:
            connection.execute(text("CREATE SEQUENCE numbers"))
        writes = "SELECT CAST(nextval('numbers') AS TEXT) AS user_id"
        definition = QueryDefinition(Subject.audience("w"), writes, 5)
        with pytest.raises(QueryFailed, match="read-only transaction"):
            queries.refresh(definition)
        return
    # SQLite cannot write from a SELECT: the connection the query runs on refuses any write.
    with queries._reader(5) as read, pytest.raises(Exception, match="readonly"):
        read("CREATE TABLE t (x)", None)


def test_an_id_both_in_the_settings_and_an_input_table_skips_both(
    store: Store, upstream: Upstream, standin: TrayStandin
) -> None:
    make_orders(store)
    add_order(store, 1, "u1", "1", days_ago=1)
    upstream.add_audience("sql_recent_buyers", "Recent Buyers From A Table")
    upstream.add("sql_recent_buyers", "u9")
    url = standin.url("/wf")

    report = sync(store, [url], {"audiences": [audience(store)]})

    assert [problem.subject for problem in report.problems] == [
        Subject.audience("sql_recent_buyers")
    ]
    assert "both defined in the settings and a row of the audiences table" in (
        report.problems[0].reason
    )
    assert standin.received("/wf") == []


def test_a_dry_run_evaluates_the_query_and_changes_nothing(
    store: Store, standin: TrayStandin
) -> None:
    make_orders(store)
    add_order(store, 1, "u1", "1", days_ago=1)
    url = standin.url("/wf")
    planned: list[tuple[str, str]] = []
    database_url = store.engine.url.render_as_string(False)
    settings = make_settings(database_url, [url], defined={"audiences": [audience(store)]})
    engine = SyncEngine(settings, store)
    try:
        engine.run(
            SyncOptions(dry_run=True),
            emit=lambda _url, _key, user, value, _call: planned.append((user, value)),
        )
    finally:
        engine.close()
    assert planned == [("u1", "true")]
    with store.engine.connect() as connection:
        assert connection.execute(text("SELECT count(*) FROM syncer_query_members")).scalar() == 0
    assert standin.received() == []


@pytest.mark.parametrize(
    ("query", "reason"),
    [
        ("DELETE FROM orders", "must be a SELECT, not DELETE"),
        ("SELECT 1 AS user_id; SELECT 2 AS user_id", "must be one SELECT statement, not 2"),
        ("SELECT user_id FROM orders FOR UPDATE", "must only read"),
    ],
)
def test_a_query_that_is_not_one_select_exits_2_naming_the_key_before_the_database_is_touched(
    tmp_path: Path, query: str, reason: str
) -> None:
    database = tmp_path / "never.db"
    sections = settings_sections(f"sqlite:///{database}", ["http://127.0.0.1:9/wf"])
    entry = {"id": "a", "name": "A", "query": query}
    body = "\n".join(f"{k} = {value!r}".replace("'", '"') for k, value in entry.items())
    settings = tmp_path / "settings.toml"
    settings.write_text(toml_text(sections) + f"\n[[traits]]\n{body}\n", encoding="utf-8")

    result = cli("sync", settings=settings)

    assert result.returncode == 2, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "traits[0].query" in lines[0] and reason in lines[0], lines
    assert not database.exists()


def test_the_engine_reads_settings_defined_traits_and_audiences(store: Store) -> None:
    database_url = store.engine.url.render_as_string(False)
    settings = make_settings(
        database_url,
        ["http://127.0.0.1:9/wf"],
        defined={"audiences": [audience(store)], "traits": [audience(store, id="t")]},
    )
    rows = query_defined(settings)
    assert [(row.kind, row.audience_id, row.from_query) for row in rows] == [
        (Kind.AUDIENCE, "sql_recent_buyers", True),
        (Kind.TRAIT, "t", True),
    ]


def test_two_workers_refreshing_one_snapshot_take_turns(store: Store) -> None:
    if dialect(store) != "postgresql":
        pytest.skip("SQLite's single writer already serializes the refreshes")
    subject = Subject.audience("sql_shared")
    slow = QueryDefinition(
        subject,
        "WITH pause AS (SELECT pg_sleep(1.5)) "
        "SELECT 'u' || g AS user_id FROM generate_series(1, 2) AS g, pause",
        30,
    )
    later = QueryDefinition(subject, "SELECT 'u3' AS user_id", 30)
    first = threading.Thread(target=store.queries.refresh, args=(slow,))
    first.start()
    # Once the first worker's query is running, the second one evaluates its own.
    wait_until(lambda: sleeping(store), 10, "the first query to start")
    store.queries.refresh(later)
    first.join(30)
    with store.engine.connect() as connection:
        users = connection.execute(
            text("SELECT user_id FROM syncer_query_members WHERE audience_id = 'sql_shared'")
        ).scalars()
        # The second replaced the first's rows whole: not a union of the two evaluations.
        assert sorted(users) == ["u3"]


def sleeping(store: Store) -> bool:
    with store.engine.connect() as connection:
        return bool(
            connection.execute(
                text(
                    "SELECT count(*) FROM pg_stat_activity "
                    "WHERE wait_event = 'PgSleep' AND datname = current_database()"
                )
            ).scalar()
        )
