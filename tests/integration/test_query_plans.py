"""Costs that grow with the work, not with history: proven by query plans, not by timing.

Some tables only ever grow: every delete ever delivered stays in ``syncer_deletions``, every
user who ever left stays in ``syncer_state`` as a ``false`` row, parked changes stay in
``syncer_outbox``, and ``audience_memberships`` holds every audience. The store's hot statements
must reach those tables only through indexes that skip the history: the partial indexes
``ix_syncer_deletions_owed``, ``ix_syncer_state_told_true``, ``ix_syncer_state_unsure``,
``ix_syncer_outbox_pending`` and the two ``*_claimed`` ones, and a loose index scan (one probe per
distinct audience) for orphan memberships.

Each test fills a real database with thousands of rows of history, calls the real store method
while a ``before_cursor_execute`` listener records every statement it runs with its parameters,
and then has the database explain each recorded statement, with those parameters, on another
connection: SQLite with ``EXPLAIN QUERY PLAN``, PostgreSQL with ``EXPLAIN (FORMAT JSON)`` after
``ANALYZE`` and with ``SET LOCAL enable_seqscan = off`` in the same transaction, so that a plan
that still reads a table whole proves that no usable index exists.

The checks:

- no recorded statement reads a history table whole: no ``SCAN <table>`` (SQLite) or
  ``Seq Scan`` (PG), and no walk over a whole index either (an index used without a search
  condition), unless the index is partial, as a partial index holds only the rows its predicate
  selects;
- each named statement reaches its table only through the named indexes (and by id, for the
  rows it already chose), and does use one of them;
- where a claim checks each candidate row against another table (is the user still a member,
  is a change about the user in flight), it probes that table once per row, pinning the user:
  a claim of ten changes must not read the whole audience (PostgreSQL's hashed subplan does).

On SQLite, a plan finds its entry candidates and its exits by merging two sorted index scans
(``EXCEPT`` with an ``ORDER BY``), which a test checks in the plans too.

The PostgreSQL plan of a whole plan() is expected to fail (strict xfail, see ``CASES``): the
count of unsendable members may walk every queued change of every pair.

The last test runs the statements the old implementation (4396e92) ran through the same check,
to show that it catches what was wrong then: the owed-deletes query against a database migrated
only to revision 0004 reads every deletion after the cursor, delivered or not, and the old
orphan query walks every membership.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import pytest
from alembic import command
from sqlalchemy import DateTime, Engine, bindparam, event, inspect, text
from sqlalchemy.engine import Connection

from syncer.core.guard import GuardLimits
from syncer.core.outcomes import Outcome, OutcomeKind
from syncer.store import Store
from syncer.store.claims import Claim
from syncer.store.database import _alembic_config, create_database_engine, migrate
from syncer.store.sql import utcnow

# The tables whose rows pile up with history.
HISTORY_TABLES = frozenset(
    {"syncer_deletions", "syncer_state", "audience_memberships", "syncer_outbox"}
)
HISTORY = 2000  # rows of history in each of them
# In an expectation: the table's primary key (named differently by each dialect).
PRIMARY_KEY = "PRIMARY KEY"

URL_CONFIGURED = "http://tray.invalid/configured"
URL_REMOVED = "http://tray.invalid/removed"
AUDIENCE = "aud"
OTHER_AUDIENCE = "big"
GUARD = GuardLimits(max_exit_share=0.5, min_audience_size=20)

_DML = {"SELECT", "INSERT", "UPDATE", "DELETE", "WITH"}
_SQL_WORDS = {
    "AS", "ON", "SET", "WHERE", "JOIN", "INNER", "LEFT", "GROUP", "ORDER", "LIMIT", "VALUES",
    "USING", "UNION", "AND", "OR", "NOT", "FOR", "RETURNING", "DEFAULT", "SELECT", "FROM",
}  # fmt: skip


# --- What a plan says about each table it reads. ---


@dataclass(frozen=True)
class Access:
    """One way a plan reads one table: through ``index`` (None: the table itself), searching the
    index on its key (``searched``) or walking all of it."""

    table: str
    index: str | None
    searched: bool
    condition: str | None
    node: str


@dataclass(frozen=True)
class Catalog:
    """What the database says about its indexes: which are partial, and each table's primary
    key (``INTEGER PRIMARY KEY`` for a SQLite rowid table)."""

    partial: frozenset[str]
    primary: dict[str, str]

    def is_id_lookup(self, access: Access) -> bool:
        """A probe of one row by its id: how an UPDATE reaches the rows its subquery chose."""
        if access.index != self.primary.get(access.table) or access.condition is None:
            return False
        condition = access.condition
        return condition == "rowid=?" or re.fullmatch(r"\(id = [^<>]*\)", condition) is not None

    def reads_whole(self, access: Access) -> bool:
        """The access reads every row of the table, or every entry of a (non-partial) index."""
        if access.index is None:
            return True
        return not access.searched and access.index not in self.partial


@dataclass(frozen=True)
class Explained:
    """A statement the store ran, and what its plan reads."""

    statement: str
    accesses: list[Access]
    plan: str

    def show(self) -> str:
        return f"statement: {_one_line(self.statement)[:600]}\nplan:\n{self.plan}"


def _one_line(statement: str) -> str:
    return " ".join(statement.split())


def _aliases(statement: str) -> dict[str, str]:
    """alias -> table for the history tables a statement names under an alias."""
    names = "|".join(sorted(HISTORY_TABLES))
    found = {}
    for match in re.finditer(rf"\b({names})\s+(?:AS\s+)?([A-Za-z_]\w*)", statement):
        if match.group(2).upper() not in _SQL_WORDS:
            found[match.group(2)] = match.group(1)
    return found


_SQLITE_ACCESS = re.compile(
    r"^(?P<op>SCAN|SEARCH) (?P<name>\S+)(?: USING (?P<how>.*?))?(?: \((?P<cond>[^()]*)\))?"
    r"(?: LEFT-JOIN)?$"
)


def _sqlite_accesses(statement: str, details: list[str]) -> list[Access]:
    aliases = _aliases(statement)
    accesses = []
    for detail in details:
        match = _SQLITE_ACCESS.match(detail)
        if match is None:
            continue
        table = aliases.get(match["name"], match["name"])
        if table not in HISTORY_TABLES:
            continue
        how = match["how"] or ""
        if not how or "AUTOMATIC" in how:  # an automatic index is built by reading the table
            index = None
        elif how.endswith("PRIMARY KEY"):
            index = "INTEGER PRIMARY KEY"
        else:
            index = how.split()[-1]
        accesses.append(Access(table, index, match["op"] == "SEARCH", match["cond"], detail))
    return accesses


def _pg_accesses(node: dict[str, Any], into: list[Access]) -> None:
    relation, kind = node.get("Relation Name"), node["Node Type"]
    if relation in HISTORY_TABLES and kind != "ModifyTable":
        if kind in ("Index Scan", "Index Only Scan"):
            into.append(_pg_index_access(relation, node))
        elif kind == "Bitmap Heap Scan":
            into.extend(_pg_index_access(relation, scan) for scan in _bitmap_scans(node))
        else:  # Seq Scan, and anything else that is not an index
            into.append(Access(relation, None, False, None, f"{kind} on {relation}"))
    for child in node.get("Plans", []):
        _pg_accesses(child, into)


def _pg_index_access(relation: str, node: dict[str, Any]) -> Access:
    condition = node.get("Index Cond")
    line = f"{node['Node Type']} using {node['Index Name']} on {relation} ({condition})"
    return Access(relation, node["Index Name"], condition is not None, condition, line)


def _bitmap_scans(node: dict[str, Any]) -> Iterator[dict[str, Any]]:
    for child in node.get("Plans", []):
        if child["Node Type"] == "Bitmap Index Scan":
            yield child
        elif child["Node Type"] in ("BitmapOr", "BitmapAnd"):
            yield from _bitmap_scans(child)


def _pg_plan_text(node: dict[str, Any], depth: int = 0) -> str:
    parts = [f"[{node['Subplan Name']}]"] if "Subplan Name" in node else []
    parts.append(node["Node Type"])
    if "Index Name" in node:
        parts.append(f"using {node['Index Name']}")
    if "Relation Name" in node:
        parts.append(f"on {node['Relation Name']}")
    for key in ("Index Cond", "Recheck Cond", "Filter"):
        if key in node:
            parts.append(f"[{key}: {node[key][:160]}]")
    hashed = re.findall(r"hashed (SubPlan \d+)", node.get("Filter", ""))
    if hashed:  # each read whole once, into a hash table, by this node
        parts.append(f"[hashed: {', '.join(hashed)}]")
    lines = ["  " * depth + " ".join(parts)]
    lines.extend(_pg_plan_text(child, depth + 1) for child in node.get("Plans", []))
    return "\n".join(lines)


def catalog(connection: Connection) -> Catalog:
    """The partial indexes and primary keys of the history tables."""
    primary: dict[str, str] = {}
    if connection.dialect.name == "sqlite":
        partial = connection.exec_driver_sql(
            "SELECT name FROM sqlite_master WHERE type = 'index' AND sql LIKE '% WHERE %'"
        ).scalars()
        for table in HISTORY_TABLES:
            key = connection.exec_driver_sql(
                "SELECT name FROM pragma_index_list(?) WHERE origin = 'pk'", (table,)
            ).scalar()
            primary[table] = key or "INTEGER PRIMARY KEY"
        return Catalog(frozenset(partial), primary)
    partial = connection.exec_driver_sql(
        "SELECT indexrelid::regclass::text FROM pg_index WHERE indpred IS NOT NULL"
    ).scalars()
    for table, key in connection.execute(
        text(
            "SELECT conrelid::regclass::text, conindid::regclass::text FROM pg_constraint "
            "WHERE contype = 'p' AND conrelid::regclass::text IN :tables"
        ).bindparams(bindparam("tables", expanding=True)),
        {"tables": sorted(HISTORY_TABLES)},
    ):
        primary[table] = key
    return Catalog(frozenset(partial), primary)


@contextmanager
def explaining(engine: Engine) -> Iterator[Callable[..., Explained]]:
    """A function that explains one statement with its parameters, on a connection of its own
    (PostgreSQL: with sequential scans disabled for the transaction)."""
    with engine.connect() as connection, connection.begin():
        postgres = connection.dialect.name == "postgresql"
        if postgres:
            connection.exec_driver_sql("SET LOCAL enable_seqscan = off")

        def explain(statement: str, parameters: Any, *, driver_level: bool = True) -> Explained:
            prefix = "EXPLAIN (FORMAT JSON) " if postgres else "EXPLAIN QUERY PLAN "
            if driver_level:  # exactly as the driver received it
                rows = connection.exec_driver_sql(prefix + statement, parameters).all()
            else:
                rows = connection.execute(text(prefix + statement), parameters).all()
            if postgres:
                document = rows[0][0]
                root = (json.loads(document) if isinstance(document, str) else document)[0]
                accesses: list[Access] = []
                _pg_accesses(root["Plan"], accesses)
                return Explained(statement, accesses, _pg_plan_text(root["Plan"]))
            details = [row[3] for row in rows]
            plan = "\n".join(details)
            return Explained(statement, _sqlite_accesses(statement, details), plan)

        yield explain


@contextmanager
def recorded_statements(engine: Engine) -> Iterator[list[tuple[str, Any]]]:
    """Every SELECT/INSERT/UPDATE/DELETE the engine sends while the block runs, with the
    parameters the driver got (the first set, for an executemany)."""
    statements: list[tuple[str, Any]] = []

    def record(
        _connection: Any,
        _cursor: Any,
        statement: str,
        parameters: Any,
        _context: Any,
        executemany: bool,
    ) -> None:
        words = statement.split(None, 1)
        if words and words[0].upper() in _DML:
            statements.append((statement, parameters[0] if executemany else parameters))

    event.listen(engine, "before_cursor_execute", record)
    try:
        yield statements
    finally:
        event.remove(engine, "before_cursor_execute", record)


# --- What each statement may read. ---


@dataclass(frozen=True)
class Reaches:
    """Every statement matching ``statement`` (a regex over its one-line text) reads ``table``
    only through ``indexes`` (or by id, for rows it already chose), and uses one of them."""

    what: str
    statement: str
    table: str
    indexes: frozenset[str]
    # Columns every read must pin by equality: one probe per row of the outer statement, not a
    # read of many rows (e.g. a whole audience hashed for a claim of ten changes).
    pinned: tuple[str, ...] = ()
    # Only the reads through this index must pin them (None: every read).
    pinned_on: str | None = None
    # The dialects whose store runs the statement (None: all).
    dialects: frozenset[str] | None = None


def whole_reads(explained: list[Explained], known: Catalog) -> list[str]:
    """The statements that read a history table (or a whole non-partial index of one)."""
    return [
        f"reads {access.table} whole: {access.node}\n{item.show()}"
        for item in explained
        for access in item.accesses
        if known.reads_whole(access)
    ]


def unexpected_paths(explained: list[Explained], expected: Reaches, known: Catalog) -> list[str]:
    """How the statements of ``expected`` break it (nothing: they keep it)."""
    indexes = {known.primary[expected.table] if i == PRIMARY_KEY else i for i in expected.indexes}
    matching = [e for e in explained if re.search(expected.statement, _one_line(e.statement))]
    if not matching:
        return [f"{expected.what}: no statement ran that matches {expected.statement!r}"]
    problems = []
    for item in matching:
        reads = [a for a in item.accesses if a.table == expected.table]
        if not any(a.index in indexes for a in reads):
            problems.append(f"{expected.what}: never uses {sorted(indexes)}\n{item.show()}")
        for access in reads:
            if access.index not in indexes and not known.is_id_lookup(access):
                problems.append(
                    f"{expected.what}: reads {access.table} through {access.node}, "
                    f"not {sorted(indexes)}\n{item.show()}"
                )
            if expected.pinned_on is not None and access.index != (
                known.primary[expected.table]
                if expected.pinned_on == PRIMARY_KEY
                else expected.pinned_on
            ):
                continue
            loose = [c for c in expected.pinned if not _pins(access.condition, c)]
            if loose:
                problems.append(
                    f"{expected.what}: reads {access.table} without pinning {loose}, "
                    f"many rows at once instead of one probe per row: {access.node}\n{item.show()}"
                )
    return problems


def _pins(condition: str | None, column: str) -> bool:
    """The search condition fixes ``column`` to one value (SQLite ``c=?``, PG ``(c = ...)``)."""
    return condition is not None and re.search(rf"\b{column} ?= ?(?!=)", condition) is not None


# --- A database with history. ---


@dataclass
class History:
    """The ids of the database's two URLs, and a claim for the test's exchanges."""

    configured: int
    removed: int
    claim: Claim = field(default_factory=lambda: Claim.new("plans.test:1:nonce", 300.0))
    claimed_changes: list[int] = field(default_factory=list)
    claimed_deletes: list[int] = field(default_factory=list)


def _numbered(connection: Connection, count: int, sql: str, **values: Any) -> None:
    """Run ``sql`` with ``n(i)`` bound to the numbers 1..count (both dialects)."""
    statement = text(
        "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < :count) " + sql
    )
    if ":now" in sql:
        statement = statement.bindparams(bindparam("now", type_=DateTime()))
    connection.execute(statement, {"count": count, **values})


def analyze(engine: Engine) -> None:
    """PostgreSQL: statistics as autovacuum would have them (SQLite's planner needs none, and
    the syncer never gathers any there)."""
    if engine.dialect.name == "postgresql":
        with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as connection:
            connection.exec_driver_sql("ANALYZE")


def with_history(store: Store) -> History:
    """Thousands of delivered deletes, `false` rows of users who left, parked changes, another
    pair's queue and memberships of other (and of missing) audiences, around a little work."""
    now = utcnow()
    ids = store.destinations.ensure([URL_CONFIGURED, URL_REMOVED], now)
    history = History(ids[URL_CONFIGURED], ids[URL_REMOVED])
    values = {"now": now, "a": history.configured, "aud": AUDIENCE}
    outbox = (
        "INSERT INTO syncer_outbox (destination_id, audience_id, user_id, value, forced, "
        "attempted, created_at, status, attempts, rejections) "
    )
    with store.engine.begin() as connection:
        if connection.dialect.name == "postgresql":
            # Upstream may create its own tables without the foreign key: orphans exist then.
            connection.exec_driver_sql(
                "ALTER TABLE audience_memberships "
                "DROP CONSTRAINT IF EXISTS audience_memberships_audience_id_fkey"
            )
        connection.execute(
            text("INSERT INTO audiences (id, name) VALUES (:aud, 'Aud'), (:big, 'Big')"),
            {"aud": AUDIENCE, "big": OTHER_AUDIENCE},
        )
        member = "INSERT INTO audience_memberships (audience_id, user_id) "
        for prefix in ("m", "new"):  # told of, and entering
            _numbered(connection, 20, member + f"SELECT :aud, '{prefix}' || i FROM n", **values)
        _numbered(connection, HISTORY, member + "SELECT :aud, 'park' || i FROM n", **values)
        _numbered(connection, HISTORY, member + "SELECT 'big', 'b' || i FROM n")
        _numbered(connection, HISTORY, member + "SELECT 'ghost' || (i % 5), 'g' || i FROM n")

        told = (
            "INSERT INTO syncer_state (destination_id, audience_id, user_id, value, unsure) "
            "SELECT :a, :aud, "
        )
        _numbered(connection, HISTORY, told + "'left' || i, 'false', FALSE FROM n", **values)
        _numbered(connection, 20, told + "'m' || i, 'true', FALSE FROM n", **values)
        _numbered(connection, 5, told + "'x' || i, 'true', FALSE FROM n", **values)  # exits
        _numbered(connection, 3, told + "'q' || i, NULL, TRUE FROM n", **values)  # doubtful

        gone = "INSERT INTO syncer_deleted_users (user_id, requested_at) "
        _numbered(connection, HISTORY, gone + "SELECT 'del' || i, :now FROM n", **values)
        _numbered(connection, 30, gone + "SELECT 'owed' || i, :now FROM n", **values)
        deletion = (
            "INSERT INTO syncer_deletions (user_id, destination_id, requested_at, delivered_at, "
            "attempts) "
        )
        _numbered(
            connection, HISTORY, deletion + "SELECT 'del' || i, :a, :now, :now, 1 FROM n", **values
        )
        owed = deletion + "SELECT 'owed' || i, :owner, :now, NULL, 0 FROM n"
        _numbered(connection, 30, owed, **values, owner=history.configured)
        _numbered(connection, 7, owed, **values, owner=history.removed)

        _numbered(
            connection,
            HISTORY,
            outbox + "SELECT :a, :aud, 'park' || i, 'true', FALSE, TRUE, :now, 'parked', 3, 3 "
            "FROM n",
            **values,
        )
        _numbered(
            connection,
            20,
            outbox + "SELECT :a, :aud, 'new' || i, 'true', FALSE, FALSE, :now, 'pending', 0, 0 "
            "FROM n",
            **values,
        )
        _numbered(
            connection,
            HISTORY,
            outbox + "SELECT :a, 'big', 'b' || i, 'true', FALSE, FALSE, :now, 'pending', 0, 0 "
            "FROM n",
            **values,
        )
    analyze(store.engine)
    return history


# --- The statements under test: each calls the real store method and checks what it did. ---

DELIVERED = Outcome(OutcomeKind.DELIVERED, 200, attempts=1)
TIMED_OUT = Outcome(OutcomeKind.RETRYABLE, None, "timed out", attempts=3)


def _claim_deletes(store: Store, history: History, results: list[tuple[int, Outcome]]) -> list[str]:
    after = max((i for i, _ in results), default=0)
    claimed, lost, _ = store.deletions.exchange(
        history.claim, history.configured, results=results, want=10, after_id=after, now=utcnow()
    )
    assert lost == 0
    history.claimed_deletes = [d.deletion_id for d in claimed]
    return [d.user_id for d in claimed]


def _claim_changes(store: Store, history: History, results: list[tuple[int, Outcome]]) -> list[str]:
    exchanged = store.outbox.exchange(
        history.claim,
        history.configured,
        AUDIENCE,
        results=results,
        want=10,
        after_id=max((i for i, _ in results), default=0),
        now=utcnow(),
        max_rejections=3,
    )
    assert exchanged.lost == 0
    history.claimed_changes = [c.change_id for c in exchanged.claimed]
    return [c.user_id for c in exchanged.claimed]


def claim_first_deletes(store: Store, history: History) -> None:
    assert _claim_deletes(store, history, []) == [f"owed{i}" for i in range(1, 11)]


def exchange_deletes(store: Store, history: History) -> None:
    """A worker's exchange: the outcomes of the deletes it sent, and a claim of the next ones."""
    results = [(i, DELIVERED) for i in history.claimed_deletes]
    assert _claim_deletes(store, history, results) == [f"owed{i}" for i in range(11, 21)]
    assert store.deletions.owed_count(history.configured) == 30 - 10


def claim_first_changes(store: Store, history: History) -> None:
    assert sorted(_claim_changes(store, history, [])) == sorted(f"new{i}" for i in range(1, 11))


def exchange_changes(store: Store, history: History) -> None:
    """A worker's exchange: half its changes accepted, half timed out, and the next claimed."""
    sent = history.claimed_changes
    results = [(i, DELIVERED) for i in sent[:5]] + [(i, TIMED_OUT) for i in sent[5:]]
    claimed = _claim_changes(store, history, results)
    assert sorted(claimed) == sorted(f"new{i}" for i in range(11, 21))


def plan_exits(store: Store, history: History) -> None:
    result = store.planning.plan(
        history.configured, AUDIENCE, full=False, now=utcnow(), limits=GUARD
    )
    assert result.hold_reason is None
    assert result.new_exited == 5 + 3  # x1..x5 told `true`, and q1..q3 in doubt


def find_orphans(store: Store, _history: History) -> None:
    orphans = store.audiences.orphan_memberships()
    assert orphans == [(f"ghost{i}", HISTORY // 5) for i in range(5)]


def find_removed_debts(store: Store, history: History) -> None:
    removed = store.destinations.removed_with_debts([history.configured])
    assert [(r.destination_id, r.url, r.owed_deletes) for r in removed] == [
        (history.removed, URL_REMOVED, 7)
    ]


def claim_first_of_both(store: Store, history: History) -> None:
    claim_first_changes(store, history)
    claim_first_deletes(store, history)


def renew_claims(store: Store, history: History) -> None:
    assert store.claims.renew(history.claim) == 20


@dataclass(frozen=True)
class Case:
    """One store call, what it must reach through which index, and what to do before it."""

    name: str
    act: Callable[[Store, History], None]
    expectations: tuple[Reaches, ...]
    prepare: Callable[[Store, History], None] | None = None
    # False: only the statements the expectations name must not read a table whole.
    every_statement: bool = True
    # Dialect -> why the test is expected to fail there (a finding the lead decides on).
    xfail_on: tuple[tuple[str, str], ...] = ()
    # SQL the database runs inside a recorded statement but PostgreSQL's EXPLAIN does not show
    # (the scalar subquery of a recursive CTE's step): (what, SQL, outer reference), explained
    # on its own with the outer reference bound as a parameter.
    hidden_steps: tuple[tuple[str, str, str], ...] = ()


OWED = frozenset({"ix_syncer_deletions_owed"})
# The claims: the SELECT that chooses the rows to claim (then updated by id), not the
# statements that record outcomes.
CLAIM_OF_CHANGES = r"^SELECT syncer_outbox\.id FROM syncer_outbox LEFT OUTER JOIN "
CLAIM_OF_DELETES = r"^SELECT syncer_deletions\.id FROM syncer_deletions WHERE "
MEMBER_PROBE = frozenset({PRIMARY_KEY})
# An INSERT ... SELECT whose outer FROM (the first: its select list has no subquery) is ...
FIRST_FROM = r"^INSERT INTO syncer_outbox (?:(?! FROM ).)* FROM "
CASES = [
    Case(
        "owed deletes of one URL",
        exchange_deletes,
        (
            Reaches(
                "the claim of owed deletes",
                CLAIM_OF_DELETES,
                "syncer_deletions",
                OWED,
            ),
            Reaches(
                "the check for a change in flight about each claimed delete's user",
                CLAIM_OF_DELETES,
                "syncer_outbox",
                frozenset({"ix_syncer_outbox_user", "uq_syncer_outbox_change"}),
                pinned=("user_id",),
            ),
            Reaches(
                "the count of owed deletes",
                r"^SELECT count\(\*\) AS \w+ FROM syncer_deletions WHERE",
                "syncer_deletions",
                OWED,
            ),
        ),
        prepare=claim_first_deletes,
    ),
    Case(
        "exits and the guard's told count",
        plan_exits,
        (
            Reaches(
                "the exits of members the URL was told of",
                FIRST_FROM + r"syncer_state WHERE syncer_state\.value = ",
                "syncer_state",
                frozenset({"ix_syncer_state_told_true"}),
                dialects=frozenset({"postgresql"}),
            ),
            Reaches(
                "the exits of members the URL was told of: those told, except the members, "
                "then each one's row",
                FIRST_FROM + r"\(SELECT syncer_state\.user_id AS user_id FROM syncer_state "
                r"WHERE syncer_state\.value = ",
                "syncer_state",
                frozenset({"ix_syncer_state_told_true", PRIMARY_KEY}),
                pinned=("user_id",),
                pinned_on=PRIMARY_KEY,
                dialects=frozenset({"sqlite"}),
            ),
            Reaches(
                "the guard's count of members the URL was told of",
                r"^SELECT count\(\*\) AS \w+ FROM syncer_state WHERE",
                "syncer_state",
                frozenset({"ix_syncer_state_told_true"}),
            ),
            Reaches(
                "the exits of users the URL may have been told of",
                FIRST_FROM + r"syncer_state WHERE syncer_state\.unsure = ",
                "syncer_state",
                frozenset({"ix_syncer_state_unsure"}),
            ),
        ),
        every_statement=False,
    ),
    Case(
        "every statement of a plan",
        plan_exits,
        (),
        xfail_on=(
            (
                "postgresql",
                "PostgreSQL plans the count of unsendable members (PlanResult.invalid) as a merge "
                "anti-join that walks all of ix_syncer_outbox_user, every queued change of every "
                "pair, when the pair holds a large share of the outbox; run only while the "
                "audience has unsendable members",
            ),
        ),
    ),
    Case(
        "claim of queued changes",
        exchange_changes,
        (
            Reaches(
                "the claim of pending changes",
                CLAIM_OF_CHANGES,
                "syncer_outbox",
                frozenset({"ix_syncer_outbox_pending"}),
            ),
            Reaches(
                "the membership check of each claimed change",
                CLAIM_OF_CHANGES,
                "audience_memberships",
                MEMBER_PROBE,
                pinned=("audience_id", "user_id"),
            ),
        ),
        prepare=claim_first_changes,
    ),
    Case(
        "orphan memberships",
        find_orphans,
        (
            Reaches(
                "the distinct audiences of the memberships",
                r"WITH RECURSIVE ids",
                "audience_memberships",
                frozenset({PRIMARY_KEY}),
            ),
            Reaches(
                "the size of each orphan audience",
                r"^SELECT count\(\*\) AS \w+ FROM audience_memberships WHERE",
                "audience_memberships",
                frozenset({PRIMARY_KEY}),
            ),
        ),
        hidden_steps=(
            (
                "the step of the loose index scan",
                "SELECT min(t.audience_id) FROM audience_memberships t "
                "WHERE t.audience_id > ids.id",
                "ids.id",
            ),
        ),
    ),
    Case(
        "removed URLs still owed deletes",
        find_removed_debts,
        (
            Reaches(
                "the owed deletes of URLs not configured",
                r"^SELECT syncer_deletions\.destination_id",
                "syncer_deletions",
                OWED,
            ),
        ),
    ),
    Case(
        "claim renewal",
        renew_claims,
        (
            Reaches(
                "the renewal of claimed changes",
                r"^UPDATE syncer_outbox SET claimed_until",
                "syncer_outbox",
                frozenset({"ix_syncer_outbox_claimed"}),
            ),
            Reaches(
                "the renewal of claimed deletes",
                r"^UPDATE syncer_deletions SET claimed_until",
                "syncer_deletions",
                frozenset({"ix_syncer_deletions_claimed"}),
            ),
        ),
        prepare=claim_first_of_both,
    ),
]


@pytest.mark.parametrize("case", CASES, ids=lambda case: case.name)
def test_store_reaches_history_tables_only_through_indexes(
    store: Store, case: Case, request: pytest.FixtureRequest
) -> None:
    for dialect, reason in case.xfail_on:
        if store.engine.dialect.name == dialect:
            request.applymarker(pytest.mark.xfail(strict=True, reason=reason))
    history = with_history(store)
    if case.prepare is not None:
        case.prepare(store, history)
    with recorded_statements(store.engine) as statements:
        case.act(store, history)
    assert statements, "the store ran no statement"

    with explaining(store.engine) as explain:
        explained = [explain(statement, parameters) for statement, parameters in statements]
        for what, step, outer in case.hidden_steps:
            assert any(step in _one_line(s) for s, _ in statements), f"{what} did not run"
            hidden = explain(step.replace(outer, ":outer"), {"outer": ""}, driver_level=False)
            explained.append(hidden)
            assert hidden.accesses and all(a.searched for a in hidden.accesses), hidden.show()
    with store.engine.connect() as connection:
        known = catalog(connection)

    named = [
        item
        for item in explained
        if any(re.search(e.statement, _one_line(item.statement)) for e in case.expectations)
    ]
    problems = whole_reads(explained if case.every_statement else named, known)
    for expected in case.expectations:
        if expected.dialects is None or store.engine.dialect.name in expected.dialects:
            problems += unexpected_paths(explained, expected, known)
    assert not problems, "\n\n".join(problems)


def test_sqlite_finds_entries_and_exits_by_merging_sorted_index_scans(store: Store) -> None:
    """SQLite finds who is untold (entries) and who left (exits) in one merge of the members'
    and the state's sorted indexes, not one index probe per member: five times faster at
    100,000 members. It merges a compound SELECT only while the ORDER BY is kept."""
    if store.engine.dialect.name != "sqlite":
        pytest.skip("PostgreSQL plans its anti-joins itself (hash or merge)")
    history = with_history(store)
    with recorded_statements(store.engine) as statements:
        plan_exits(store, history)
    with explaining(store.engine) as explain:
        explained = [explain(statement, parameters) for statement, parameters in statements]
    merged = {
        what: [e for e in explained if re.search(pattern, _one_line(e.statement))]
        for what, pattern in (
            ("entry candidates", r"^INSERT INTO syncer_plan_candidates "),
            ("exits of the told", FIRST_FROM + r"\(SELECT syncer_state\.user_id AS user_id "),
        )
    }
    for what, items in merged.items():
        assert items, f"no statement of the {what} ran"
        for item in items:
            assert "MERGE (EXCEPT)" in item.plan, f"{what}: no merge\n{item.show()}"


# --- The same check against what the old implementation ran. ---

# syncer/store/repository.py at 4396e92: Repository.pending_deletions and orphan_memberships.
OLD_OWED_DELETES = (
    "SELECT syncer_deletions.id, syncer_deletions.user_id, syncer_deletions.requested_at "
    "FROM syncer_deletions WHERE syncer_deletions.destination_id = :destination "
    "AND syncer_deletions.delivered_at IS NULL AND syncer_deletions.id > :after "
    "ORDER BY syncer_deletions.id LIMIT :limit"
)
OLD_ORPHANS = (
    "SELECT audience_memberships.audience_id, count(*) FROM audience_memberships "
    "WHERE NOT (EXISTS (SELECT * FROM audiences "
    "WHERE audiences.id = audience_memberships.audience_id)) "
    "GROUP BY audience_memberships.audience_id ORDER BY audience_memberships.audience_id "
    "LIMIT :limit"
)


def migrated_to(url: str, revision: str) -> Engine:
    """An engine on a database migrated to ``revision`` (Alembic, as ``syncer migrate`` does)."""
    engine = create_database_engine(url)
    if revision == "head":
        migrate(engine)
        return engine
    config = _alembic_config()
    with engine.begin() as connection:
        config.attributes["connection"] = connection
        command.upgrade(config, revision)
    return engine


def old_history(engine: Engine) -> None:
    """Delivered deletes and memberships, in the columns every revision since 0002 has."""
    now = utcnow()
    with engine.begin() as connection:
        if "canonical" in _columns(connection, "syncer_destinations"):
            connection.execute(
                text(
                    "INSERT INTO syncer_destinations (id, url, canonical, first_seen_at) "
                    "VALUES (1, :url, :url, :now)"
                ).bindparams(bindparam("now", type_=DateTime())),
                {"url": URL_CONFIGURED, "now": now},
            )
        else:
            connection.execute(
                text(
                    "INSERT INTO syncer_destinations (id, url, first_seen_at) "
                    "VALUES (1, :url, :now)"
                ).bindparams(bindparam("now", type_=DateTime())),
                {"url": URL_CONFIGURED, "now": now},
            )
        deletion = (
            "INSERT INTO syncer_deletions (user_id, destination_id, requested_at, delivered_at, "
            "attempts) "
        )
        _numbered(
            connection, HISTORY, deletion + "SELECT 'del' || i, 1, :now, :now, 1 FROM n", now=now
        )
        _numbered(connection, 30, deletion + "SELECT 'owed' || i, 1, :now, NULL, 0 FROM n", now=now)
        connection.execute(text("INSERT INTO audiences (id, name) VALUES ('big', 'Big')"))
        _numbered(
            connection,
            HISTORY,
            "INSERT INTO audience_memberships (audience_id, user_id) SELECT 'big', 'b' || i FROM n",
        )
    analyze(engine)


def _columns(connection: Connection, table: str) -> set[str]:
    return {column["name"] for column in inspect(connection).get_columns(table)}


@pytest.mark.parametrize(
    ("revision", "statement", "parameters", "expected", "caught"),
    [
        pytest.param(
            "0004",
            OLD_OWED_DELETES,
            {"destination": 1, "after": 0, "limit": 100},
            Reaches("owed deletes", r"FROM syncer_deletions", "syncer_deletions", OWED),
            True,
            id="old owed-deletes query at revision 0004: every deletion after the cursor",
        ),
        pytest.param(
            "head",
            OLD_OWED_DELETES,
            {"destination": 1, "after": 0, "limit": 100},
            Reaches("owed deletes", r"FROM syncer_deletions", "syncer_deletions", OWED),
            False,
            id="the same query at head: the partial index serves it",
        ),
        pytest.param(
            "head",
            OLD_ORPHANS,
            {"limit": 20},
            Reaches(
                "orphans",
                r"FROM audience_memberships",
                "audience_memberships",
                frozenset({PRIMARY_KEY}),
            ),
            True,
            id="old orphan query: every membership",
        ),
    ],
)
def test_the_check_catches_what_the_old_implementation_ran(
    database_url: str,
    revision: str,
    statement: str,
    parameters: dict[str, Any],
    expected: Reaches,
    caught: bool,
) -> None:
    engine = migrated_to(database_url, revision)
    try:
        old_history(engine)
        with explaining(engine) as explain:
            explained = [explain(statement, parameters, driver_level=False)]
        with engine.connect() as connection:
            known = catalog(connection)
    finally:
        engine.dispose()
    problems = whole_reads(explained, known) + unexpected_paths(explained, expected, known)
    if caught:
        assert problems, f"the check passed what it should catch:\n{explained[0].show()}"
    else:
        assert not problems, "\n\n".join(problems)
