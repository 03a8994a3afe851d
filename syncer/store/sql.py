"""What every store module shares: transactions, the database's clock, and dialect helpers.

Each dialect gets the same guarantees: a write transaction sees one consistent state for its
reads and writes (SQLite takes the write lock at BEGIN; PostgreSQL plans in REPEATABLE READ and
is retried on a serialization failure), and time that decides who holds a claim is read from
the database, so that clock skew between hosts cannot steal one.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import Any, TypeVar

from sqlalchemy import (
    Boolean,
    ColumnElement,
    Double,
    Engine,
    Text,
    and_,
    case,
    cast,
    false,
    func,
    literal,
    literal_column,
    or_,
)
from sqlalchemy.engine import Connection
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.compiler import compiles
from sqlalchemy.sql.expression import FunctionElement
from sqlalchemy.types import LargeBinary

from syncer.core.payload import MAX_EMAIL_LENGTH, MAX_USER_ID_LENGTH
from syncer.store.database import WRITE_OPTION

T = TypeVar("T")

# SQLSTATEs after which PostgreSQL asks for the transaction to be tried again.
_RETRY_SQLSTATES = frozenset({"40001", "40P01"})
SNAPSHOT_ATTEMPTS = 8


def utcnow() -> datetime:
    """The current time as the naive UTC datetime every table stores (read once, at the edge)."""
    return datetime.now(UTC).replace(tzinfo=None)


def dialect_insert(connection: Connection, table: Any) -> Any:
    """An INSERT with ``on_conflict_*``: both dialects have it, the base Insert does not."""
    if connection.dialect.name == "postgresql":
        from sqlalchemy.dialects.postgresql import insert as pg_insert

        return pg_insert(table)
    from sqlalchemy.dialects.sqlite import insert as sqlite_insert

    return sqlite_insert(table)


class db_epoch(FunctionElement[float]):
    """The database's clock, in seconds since the epoch: what claim expiry is measured on."""

    type = Double()
    inherit_cache = True


@compiles(db_epoch, "postgresql")
def _epoch_postgresql(_element: Any, _compiler: Any, **_kw: Any) -> str:
    return "EXTRACT(EPOCH FROM clock_timestamp())::double precision"


@compiles(db_epoch, "sqlite")
def _epoch_sqlite(_element: Any, _compiler: Any, **_kw: Any) -> str:
    return "((julianday('now') - 2440587.5) * 86400.0)"


class json_same(FunctionElement[bool]):
    """Whether two JSON texts hold equal values, by the rule of :mod:`syncer.core.jsonvalues`
    (PostgreSQL's jsonb equality; on SQLite, that module's key, registered on every connection).
    NULL when either is NULL, or on SQLite when either is not JSON."""

    type = Boolean()
    inherit_cache = True


@compiles(json_same, "postgresql")
def _json_same_postgresql(element: Any, compiler: Any, **kw: Any) -> str:
    one, other = (compiler.process(arg, **kw) for arg in element.clauses)
    return f"(CAST(CAST({one} AS text) AS jsonb) = CAST(CAST({other} AS text) AS jsonb))"


@compiles(json_same, "sqlite")
def _json_same_sqlite(element: Any, compiler: Any, **kw: Any) -> str:
    one, other = (compiler.process(arg, **kw) for arg in element.clauses)
    return f"(syncer_json_key({one}) = syncer_json_key({other}))"


def same_json(one: Any, other: Any) -> ColumnElement[bool]:
    """``one`` and ``other`` hold JSON-equal values (false, not NULL, when either is NULL or
    not JSON). Equal texts are equal values: only texts that differ are parsed and compared,
    which on SQLite means a call into Python."""
    return or_(one == other, func.coalesce(json_same(one, other), false()))


def is_json_null(value: Any) -> ColumnElement[bool]:
    """``value`` is JSON ``null`` (in any spacing). Only a text with "null" in it is parsed."""
    return and_(
        value.contains("null", autoescape=True),
        func.coalesce(json_same(value, literal("null", Text)), false()),
    )


class json_text(FunctionElement[str]):
    """A JSON column's value as the text it was written as (PostgreSQL's json keeps it)."""

    type = Text()
    inherit_cache = True


@compiles(json_text, "postgresql")
def _json_text_postgresql(element: Any, compiler: Any, **kw: Any) -> str:
    return f"CAST({compiler.process(element.clauses, **kw)} AS text)"


@compiles(json_text, "sqlite")
def _json_text_sqlite(element: Any, compiler: Any, **kw: Any) -> str:
    return str(compiler.process(element.clauses, **kw))


@contextmanager
def reading(engine: Engine) -> Iterator[Connection]:
    """A read-only transaction: one consistent view for all of its statements."""
    with engine.connect() as connection, connection.begin():
        yield connection


@contextmanager
def writing(engine: Engine, *, snapshot: bool = False) -> Iterator[Connection]:
    """A write transaction. ``snapshot``: on PostgreSQL, REPEATABLE READ, so that every
    statement sees the same upstream state (SQLite's write lock gives that already); wrap the
    caller in :func:`retrying_serialization`."""
    with engine.connect() as connection:
        connection.execution_options(**{WRITE_OPTION: True})
        if snapshot and connection.dialect.name == "postgresql":
            connection.execution_options(isolation_level="REPEATABLE READ")
        with connection.begin():
            yield connection


@contextmanager
def rolled_back(engine: Engine) -> Iterator[Connection]:
    """A write transaction that is always rolled back: a dry run of real statements."""
    with engine.connect() as connection:
        connection.execution_options(**{WRITE_OPTION: True})
        if connection.dialect.name == "postgresql":
            connection.execution_options(isolation_level="REPEATABLE READ")
        transaction = connection.begin()
        try:
            yield connection
        finally:
            transaction.rollback()


def is_serialization_failure(error: BaseException) -> bool:
    """True for PostgreSQL's "try the transaction again" errors."""
    orig = getattr(error, "orig", None)
    return isinstance(error, DBAPIError) and getattr(orig, "sqlstate", None) in _RETRY_SQLSTATES


def retrying_serialization(work: Callable[[], T], attempts: int = SNAPSHOT_ATTEMPTS) -> T:
    """Run a snapshot transaction again when PostgreSQL reports a concurrent update."""
    for attempt in range(1, attempts + 1):
        try:
            return work()
        except DBAPIError as error:
            if attempt == attempts or not is_serialization_failure(error):
                raise
            time.sleep(0.01 * attempt)
    raise AssertionError("unreachable")


def _printable_ascii(value: ColumnElement[Any]) -> ColumnElement[bool]:
    """SQLite: ``value`` holds only characters from space to tilde. Its length in bytes equals
    its length in characters only without NUL (where SQLite's text functions stop) and without
    multi-byte or broken UTF-8; GLOB then rules out what lies outside the printable range."""
    return and_(
        func.length(cast(value, LargeBinary)) == func.length(value),
        value.op("NOT GLOB")(literal_column("'*[^ -~]*'", Text)),
    )


def row_problem(
    connection: Connection,
    user_id: ColumnElement[Any],
    anonymous_id: ColumnElement[Any],
    email: ColumnElement[Any],
) -> ColumnElement[Any]:
    """SQL for :func:`syncer.core.payload.user_input_problem`: the reason, or NULL if sendable.

    SQLite calls the Python function itself (registered on every connection); PostgreSQL,
    whose text is always valid UTF-8 and never holds NUL, checks the same rules with a regular
    expression. The tests hold both to the Python function on a table of awkward values.
    """
    if connection.dialect.name == "sqlite":
        # Calling into Python for every row was a sixth of a run that found 1% churn in a
        # million memberships. Printable ASCII within the limits is sendable, and SQLite can
        # see that itself: only the other rows go to the Python function, for the reason.
        return case(
            (
                and_(
                    _printable_ascii(user_id),
                    func.length(user_id) <= MAX_USER_ID_LENGTH,
                    func.trim(user_id, " ") != "",
                    or_(
                        anonymous_id.is_(None),
                        and_(
                            _printable_ascii(anonymous_id),
                            func.length(anonymous_id) <= MAX_USER_ID_LENGTH,
                        ),
                    ),
                    or_(
                        email.is_(None),
                        and_(_printable_ascii(email), func.length(email) <= MAX_EMAIL_LENGTH),
                    ),
                ),
                literal_column("NULL", Text),
            ),
            else_=func.syncer_row_problem(
                cast(user_id, LargeBinary),
                cast(anonymous_id, LargeBinary),
                cast(email, LargeBinary),
            ),
        )
    control = literal_column("'[\\x01-\\x1f\\x7f-\\x9f]'", Text)

    return case(
        (func.btrim(user_id, " ") == "", "user_id is empty"),
        (
            func.length(user_id) > MAX_USER_ID_LENGTH,
            f"user_id is longer than {MAX_USER_ID_LENGTH} characters",
        ),
        (
            user_id.op("~")(control),
            "user_id contains control characters or is not valid UTF-8",
        ),
        (
            (func.length(anonymous_id) > MAX_USER_ID_LENGTH) | anonymous_id.op("~")(control),
            "anonymous_id is over-long, contains control characters or is not valid UTF-8",
        ),
        (
            (func.length(email) > MAX_EMAIL_LENGTH) | email.op("~")(control),
            "email is over-long, contains control characters or is not valid UTF-8",
        ),
        else_=None,
    )
