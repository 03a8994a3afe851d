"""Audiences and traits defined by a query in the settings: each run evaluates the query,
read-only and within its time limit, and takes its rows into the syncer's snapshot
(``syncer_query_members`` / ``syncer_query_values``), which the planner then reads exactly as
it reads the input tables.

The query runs on a connection of its own that cannot write: a READ ONLY transaction on
PostgreSQL, a connection opened read-only on SQLite. Its rows are streamed into the snapshot in
batches, inside one write transaction that first empties the snapshot of that audience or
trait: a plan sees the previous rows or the new ones, never a mix.
"""

from __future__ import annotations

import sqlite3
import time
import urllib.parse
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Engine, delete, func, select, text
from sqlalchemy.engine import Connection
from sqlalchemy.exc import DBAPIError

from syncer.core.states import Kind
from syncer.core.traits import Subject
from syncer.store.schema import query_members, query_values
from syncer.store.sql import dialect_insert, writing

BATCH_ROWS = 1000
# SQLite calls the time-limit check every this many virtual machine instructions.
_PROGRESS_STEPS = 10_000


class QueryFailed(Exception):
    """The query could not be evaluated: the database's message, or the columns it lacks."""


@dataclass(frozen=True)
class QueryDefinition:
    """An audience or trait defined in the settings by a query."""

    subject: Subject
    query: str
    timeout_seconds: float


@dataclass(frozen=True)
class Snapshot:
    """What one evaluation took: rows kept, and rows skipped (no user_id, or a user_id the
    query returned more than once: the first row of each user is kept)."""

    rows: int
    skipped: int


def _first_line(error: BaseException) -> str:
    original = getattr(error, "orig", None) or error
    text = str(original).strip()
    return text.splitlines()[0] if text else type(original).__name__


class QueryStore:
    """Evaluates the queries of audiences and traits defined in the settings."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._dialect = "postgres" if engine.dialect.name == "postgresql" else "sqlite"

    def refresh(self, definition: QueryDefinition) -> Snapshot:
        """Evaluate the query and replace the snapshot of its audience or trait with its rows,
        in one transaction. Raises QueryFailed (the snapshot is left as it was)."""
        with writing(self.engine) as connection:
            return self.refresh_in(connection, definition)

    def refresh_in(self, connection: Connection, definition: QueryDefinition) -> Snapshot:
        """:meth:`refresh` inside the caller's write transaction (a dry run's, rolled back)."""
        subject = definition.subject
        table = query_members if subject.kind is Kind.AUDIENCE else query_values
        owner = table.c.audience_id if subject.kind is Kind.AUDIENCE else table.c.trait_id
        too_long = QueryFailed(
            f"the query ran longer than its time limit ({definition.timeout_seconds:g} s)"
        )
        deadline = time.monotonic() + definition.timeout_seconds
        try:
            with self._reader(definition.timeout_seconds) as read:
                if connection.dialect.name == "postgresql":
                    # Two workers refreshing one snapshot take turns: each replaces the other's
                    # rows whole, instead of each keeping the rows the other inserted.
                    connection.execute(
                        text("SELECT pg_advisory_xact_lock(hashtext(:owner))"),
                        {"owner": f"syncer_query:{subject.kind.value}:{subject.id}"},
                    )
                inner = _inner(definition, self._dialect)
                columns = read(f"SELECT * FROM ({inner}) AS q LIMIT 0", None)
                rows = read(self._selection(definition, columns), BATCH_ROWS)
                connection.execute(delete(table).where(owner == subject.id))
                insert = dialect_insert(connection, table).on_conflict_do_nothing()
                read_rows = 0
                batch: list[dict[str, Any]] = []
                for row in rows:
                    read_rows += 1
                    if row[0] is None:
                        continue
                    batch.append(self._row(subject, row))
                    if len(batch) >= BATCH_ROWS:
                        connection.execute(insert, batch)
                        batch = []
                        # The limit is on the whole evaluation: rows fetched a batch at a time
                        # are separate statements, each under the database's own limit.
                        if time.monotonic() > deadline:
                            raise too_long
                if batch:
                    connection.execute(insert, batch)
        except (DBAPIError, sqlite3.Error) as error:
            interrupted = (
                isinstance(error, sqlite3.OperationalError) and str(error) == "interrupted"
            )
            # PostgreSQL's statement_timeout cancels with SQLSTATE 57014.
            cancelled = getattr(getattr(error, "orig", None), "sqlstate", None) == "57014"
            if interrupted or cancelled:
                raise too_long from None
            raise QueryFailed(_first_line(error)) from None
        kept_rows = int(
            connection.execute(select(func.count()).where(owner == subject.id)).scalar_one()
        )
        return Snapshot(rows=kept_rows, skipped=read_rows - kept_rows)

    @staticmethod
    def _row(subject: Subject, row: Any) -> dict[str, Any]:
        if subject.kind is Kind.AUDIENCE:
            return {
                "audience_id": subject.id,
                "user_id": row[0],
                "anonymous_id": row[1],
                "email": row[2],
            }
        return {"trait_id": subject.id, "user_id": row[0], "value": row[1]}

    def _selection(self, definition: QueryDefinition, columns: Any) -> str:
        """The statement that reads the query's rows in the snapshot's shape, as text."""
        names = {str(name).lower() for name in columns}
        wanted = ["user_id"] if definition.subject.kind is Kind.AUDIENCE else ["user_id", "value"]
        missing = [name for name in wanted if name not in names]
        if missing:
            raise QueryFailed(
                f"the query returns no {' or '.join(missing)} column "
                f"(it returns: {', '.join(sorted(names)) or 'nothing'})"
            )
        postgresql = self.engine.dialect.name == "postgresql"
        picked = ["CAST(q.user_id AS TEXT)"]
        if definition.subject.kind is Kind.AUDIENCE:
            for name in ("anonymous_id", "email"):
                picked.append(f"CAST(q.{name} AS TEXT)" if name in names else "NULL")
        elif postgresql:
            # to_json keeps a number's digits (numeric 450.00 stays 450.00) and json as it is.
            picked.append("CAST(to_json(q.value) AS TEXT)")
        else:
            picked.append("CASE WHEN q.value IS NULL THEN NULL ELSE json_quote(q.value) END")
        return f"SELECT {', '.join(picked)} FROM ({_inner(definition, self._dialect)}) AS q"

    @contextmanager
    def _reader(self, timeout_seconds: float) -> Iterator[Any]:
        """A read-only connection with the time limit, as ``read(sql, batch)``: column names
        when ``batch`` is None, else an iterator over the rows, fetched ``batch`` at a time."""
        if self.engine.dialect.name == "postgresql":
            with self.engine.connect() as connection, connection.begin():
                connection.exec_driver_sql("SET TRANSACTION READ ONLY")
                milliseconds = max(1, int(timeout_seconds * 1000))
                connection.exec_driver_sql(f"SET LOCAL statement_timeout = {milliseconds}")

                def read_postgresql(sql: str, batch: int | None) -> Any:
                    if batch is None:
                        return list(connection.exec_driver_sql(sql).keys())
                    streamed = connection.execution_options(stream_results=True, yield_per=batch)
                    return iter(streamed.exec_driver_sql(sql))

                yield read_postgresql
            return
        database = self.engine.url.database or ""
        uri = f"file:{urllib.parse.quote(database)}?mode=ro"
        reader = sqlite3.connect(uri, uri=True, check_same_thread=False)
        reader.text_factory = lambda raw: raw.decode("utf-8", "surrogateescape")
        deadline = time.monotonic() + timeout_seconds
        reader.set_progress_handler(lambda: int(time.monotonic() > deadline), _PROGRESS_STEPS)

        def read_sqlite(sql: str, batch: int | None) -> Any:
            cursor = reader.execute(sql)
            if batch is None:
                return [column[0] for column in cursor.description or ()]
            return _fetched(cursor, batch)

        try:
            yield read_sqlite
        finally:
            reader.close()


def _inner(definition: QueryDefinition, dialect: str) -> str:
    """The query as a subquery's body: cut after its last token (without the semicolon and
    comments it may end with, which would swallow the closing parenthesis), on lines of its
    own. Tokenized by the parser that validated it at start-up."""
    import sqlglot
    from sqlglot import TokenType

    tokens = [
        token
        for token in sqlglot.tokenize(definition.query, read=dialect)
        if token.token_type is not TokenType.SEMICOLON
    ]
    body = definition.query[: tokens[-1].end + 1] if tokens else definition.query
    return "\n" + body + "\n"


def _fetched(cursor: sqlite3.Cursor, batch: int) -> Iterator[Any]:
    while rows := cursor.fetchmany(batch):
        yield from rows
