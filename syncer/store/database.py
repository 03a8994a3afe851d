"""Connections and schema migrations, for SQLite and PostgreSQL alike."""

from __future__ import annotations

import time
from functools import partial
from importlib import resources
from pathlib import Path
from typing import Any

from sqlalchemy import Connection, Engine, create_engine, event, inspect, text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import DisconnectionError, OperationalError, SQLAlchemyError

from syncer.core.jsonvalues import equality_key
from syncer.core.payload import user_input_problem
from syncer.errors import DatabaseUnavailable

SQLITE_BUSY_TIMEOUT_MS = 30_000
# The schema revision this version of the syncer reads and writes: the head of migrations/
# (a test holds the two together). Every command but `migrate` checks it without loading
# Alembic, which would cost every process start a fifth of a second.
SCHEMA_REVISION = "0010"
# The execution option that makes a SQLite transaction take the write lock at BEGIN.
WRITE_OPTION = "syncer_write"
# A pooled connection given back more recently than this is used without a ping first.
PING_AFTER_IDLE_SECONDS = 1.0
_LAST_CHECKIN = "syncer_last_checkin"


def safe_url(url: str) -> str:
    """The database URL as it may be shown: with any password masked."""
    return make_url(url).render_as_string(hide_password=True)


def _row_problem(
    user_id: bytes | None, anonymous_id: bytes | None, email: bytes | None
) -> str | None:
    # Called by SQLite with the raw bytes (the SQL casts to BLOB): text that is not UTF-8 would
    # make sqlite3 fail the whole statement before the function could say what is wrong.
    def text(raw: bytes | None) -> str | None:
        return None if raw is None else bytes(raw).decode("utf-8", "surrogateescape")

    return user_input_problem(text(user_id) or "", text(anonymous_id), text(email))


def _json_key(value: str | None) -> str | None:
    # Not JSON: NULL, which equals nothing; planning reports such a value as a bad row.
    if value is None:
        return None
    try:
        key = equality_key(value)
        key.encode("utf-8")  # text that was not UTF-8 (read with surrogates) is no JSON either
        return key
    except (ValueError, RecursionError):
        return None


def _configure_sqlite(dbapi_connection: Any, _record: Any) -> None:
    # Bytes that are not UTF-8 are read as lone surrogates instead of failing the whole query;
    # the row is then reported as invalid rather than crashing a run.
    dbapi_connection.text_factory = lambda raw: raw.decode("utf-8", "surrogateescape")
    # The driver's own transaction handling would start transactions late (at the first write,
    # after the reads a decision rests on); SQLAlchemy's begin event starts them instead.
    dbapi_connection.isolation_level = None
    dbapi_connection.create_function("syncer_row_problem", 3, _row_problem, deterministic=True)
    dbapi_connection.create_function("syncer_json_key", 1, _json_key, deterministic=True)
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
    cursor.close()


def _begin_sqlite(connection: Connection) -> None:
    # A transaction that will write takes the write lock at once, so the reads it decides on
    # cannot go stale before it writes (and two writers never deadlock upgrading their locks).
    immediate = connection.get_execution_options().get(WRITE_OPTION, False)
    connection.exec_driver_sql("BEGIN IMMEDIATE" if immediate else "BEGIN")


def _note_checkin(_dbapi_connection: Any, record: Any) -> None:
    record.info[_LAST_CHECKIN] = time.monotonic()


def _ping_if_idle(dialect: Any, dbapi_connection: Any, record: Any, _proxy: Any) -> None:
    # SQLAlchemy's pool_pre_ping pings at every checkout: on PostgreSQL under load that round
    # trip cost the delivery loop a fifth of its rate (one per exchange). A connection given
    # back less than a second ago is taken as alive; any other is pinged, and a dead one is
    # replaced by the pool (which retries the checkout on DisconnectionError).
    last = record.info.get(_LAST_CHECKIN)
    if last is not None and time.monotonic() - last < PING_AFTER_IDLE_SECONDS:
        return
    try:
        dialect.do_ping(dbapi_connection)  # the dialect's own ping, as pool_pre_ping uses
    except Exception as error:
        raise DisconnectionError(f"connection found dead at checkout: {error}") from error


def create_database_engine(url: str) -> Engine:
    """An engine set up for the syncer: WAL, a busy timeout and real transactions on SQLite;
    connections idle for a second or more pinged before use."""
    engine = create_engine(url)
    event.listen(engine, "checkin", _note_checkin)
    event.listen(engine, "checkout", partial(_ping_if_idle, engine.dialect))
    if engine.dialect.name == "sqlite":
        event.listen(engine, "connect", _configure_sqlite)
        event.listen(engine, "begin", _begin_sqlite)
    return engine


def migrations_path() -> Path:
    """Where the Alembic scripts are: inside the installed package, or beside it in a checkout."""
    packaged = Path(str(resources.files("syncer"))) / "_migrations"
    if packaged.is_dir():
        return packaged
    return Path(__file__).resolve().parents[2] / "migrations"


def _alembic_config() -> Any:
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", str(migrations_path()))
    return config


def head_revision() -> str | None:
    """The head of the migration scripts (what `migrate` upgrades to)."""
    from alembic.script import ScriptDirectory

    head: str | None = ScriptDirectory.from_config(_alembic_config()).get_current_head()
    return head


def migrate(engine: Engine) -> tuple[str | None, str | None]:
    """Create or upgrade the whole schema; return the revisions before and after."""
    from alembic import command
    from alembic.runtime.migration import MigrationContext

    config = _alembic_config()
    try:
        with engine.begin() as connection:
            before = MigrationContext.configure(connection).get_current_revision()
            config.attributes["connection"] = connection
            command.upgrade(config, "head")
            after = MigrationContext.configure(connection).get_current_revision()
    except OperationalError as error:
        reason = " ".join(str(error.orig).split())
        raise DatabaseUnavailable(f"cannot migrate {safe_url(str(engine.url))}: {reason}") from None
    return before, after


def check_schema(engine: Engine) -> None:
    """Fail with a clear message unless the database is reachable and fully migrated."""
    database = engine.url.database
    sqlite_file = engine.dialect.name == "sqlite" and database and database != ":memory:"
    if sqlite_file and not Path(str(database)).exists():
        # Connecting would create an empty file: say what is wrong instead.
        raise DatabaseUnavailable(f"no database at {database}: run `syncer migrate` to create it")
    try:
        with engine.connect() as connection:
            current = _current_revision(connection)
    except SQLAlchemyError as error:
        reason = " ".join(str(getattr(error, "orig", None) or error).split())
        raise DatabaseUnavailable(
            f"cannot reach database {safe_url(str(engine.url))}: {reason}"
        ) from None
    if current != SCHEMA_REVISION:
        if current is None:
            state, advice = "has no syncer schema", "run `syncer migrate`"
        elif current > SCHEMA_REVISION:
            state = f"was migrated by a newer version of the syncer (revision {current})"
            advice = "run that version, or upgrade this one"
        else:
            state, advice = f"is at revision {current}", "run `syncer migrate`"
        raise DatabaseUnavailable(
            f"database {safe_url(str(engine.url))} {state}; this version needs "
            f"{SCHEMA_REVISION}: {advice}"
        )


def _current_revision(connection: Connection) -> str | None:
    if not inspect(connection).has_table("alembic_version"):
        return None
    revision: str | None = connection.execute(
        text("SELECT version_num FROM alembic_version")
    ).scalar_one_or_none()
    return revision
