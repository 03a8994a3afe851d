"""Fixtures shared by every test: real databases, a real local HTTP stand-in for Tray."""

from __future__ import annotations

import concurrent.futures
import contextlib
import io
import logging
import os
import shutil
import subprocess
import sys
import threading
import uuid
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import pytest
import structlog
from hypothesis import settings
from sqlalchemy import create_engine, delete, insert, select, text, update
from sqlalchemy.engine import URL, Connection, Engine, make_url

from syncer.core.states import Kind
from syncer.settings import Settings, settings_from_mapping
from syncer.store import Store
from syncer.store.database import create_database_engine, migrate
from syncer.store.schema import (
    audience_memberships,
    audiences,
    computed_trait_values,
    computed_traits,
    state,
)
from syncer.sync import SyncEngine, SyncOptions, SyncReport
from syncer.testing.tray_standin import TrayStandin

# Property tests run many more examples in CI than in a quick local run: `@settings` in a test
# sets only what is specific to it (deadline, health checks); the example count comes from here.
settings.register_profile("dev", max_examples=25)
settings.register_profile("ci", max_examples=150)
settings.load_profile(
    os.environ.get("HYPOTHESIS_PROFILE") or ("ci" if os.environ.get("CI") else "dev")
)

POSTGRES_URL_ENV = "SYNCER_TEST_DATABASE_URL"
SECRET = "test-secret"
REPO_ROOT = Path(__file__).resolve().parents[1]


class _PostgresAdmin:
    """Creates test databases on the server named by SYNCER_TEST_DATABASE_URL, and drops them
    on a thread of its own: under load a DROP DATABASE took two thirds of a second, which no
    test needs to wait for. ``finish`` waits for the drops still queued."""

    def __init__(self) -> None:
        self._engine: Engine | None = None
        self._url: URL | None = None
        self._drops: concurrent.futures.ThreadPoolExecutor | None = None

    def _connect(self) -> tuple[URL, Engine]:
        if self._engine is None or self._url is None:
            base = os.environ.get(POSTGRES_URL_ENV)
            if not base:
                pytest.skip(f"{POSTGRES_URL_ENV} is not set: PostgreSQL tests skipped")
            self._url = make_url(base).set(drivername="postgresql+psycopg")
            self._engine = create_engine(self._url, isolation_level="AUTOCOMMIT")
        return self._url, self._engine

    def create(self, template: str | None = None) -> str:
        """A new database (empty, or a copy of ``template``); its URL."""
        url, engine = self._connect()
        name = f"syncer_test_{uuid.uuid4().hex[:12]}"
        clause = f' TEMPLATE "{template}"' if template else ""
        with engine.connect() as connection:
            connection.execute(text(f'CREATE DATABASE "{name}"{clause}'))
        return url.set(database=name).render_as_string(hide_password=False)

    def drop_later(self, database_url: str) -> None:
        """Drop the database (and end its connections) soon, on the dropping thread."""
        if self._drops is None:
            self._drops = concurrent.futures.ThreadPoolExecutor(1, "drop-database")
        self._drops.submit(self._drop, make_url(database_url).database)

    def _drop(self, name: str | None) -> None:
        _, engine = self._connect()
        with engine.connect() as connection:
            connection.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))

    def finish(self) -> None:
        if self._drops is not None:
            self._drops.shutdown(wait=True)
            self._drops = None
        if self._engine is not None:
            self._engine.dispose()
            self._engine = None


_POSTGRES = _PostgresAdmin()


@pytest.fixture(scope="session", autouse=True)
def _drop_postgres_databases_at_the_end() -> Iterator[None]:
    yield
    _POSTGRES.finish()


def _postgres_database(template: str | None = None) -> Iterator[str]:
    database_url = _POSTGRES.create(template)
    try:
        yield database_url
    finally:
        _POSTGRES.drop_later(database_url)


class MigratedTemplates:
    """Per test process, a freshly migrated database of each kind, made on first use, which
    ``store`` copies: running the migrations for every test cost a second per PostgreSQL test
    on two shared cores; a copy costs a tenth (a SQLite file copy: a millisecond)."""

    def __init__(self, directory: Path) -> None:
        self._directory = directory
        self._made: dict[str, str] = {}
        self._cleanup = contextlib.ExitStack()

    def of(self, kind: str) -> str:
        """The template of ``kind``: a SQLite file's path, or a PostgreSQL database's name."""
        if kind not in self._made:
            if kind == "sqlite":
                path = self._directory / "template.db"
                location, made = f"sqlite:///{path}", str(path)
            else:
                template = contextlib.contextmanager(_postgres_database)()
                location = self._cleanup.enter_context(template)
                made = make_url(location).database or ""
            engine = create_database_engine(location)
            try:
                migrate(engine)
            finally:
                engine.dispose()  # a template must have no open connection to be copied
            self._made[kind] = made
        return self._made[kind]

    def close(self) -> None:
        self._cleanup.close()


@pytest.fixture(scope="session")
def migrated_templates(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MigratedTemplates]:
    """See MigratedTemplates."""
    templates = MigratedTemplates(tmp_path_factory.mktemp("templates"))
    try:
        yield templates
    finally:
        templates.close()


# The fixtures that want the database migrated: for them, ``database_url`` is a copy of a
# migrated template instead of an empty database (see MigratedTemplates).
MIGRATED_DATABASE_FIXTURES = frozenset({"store", "db"})


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def database_url(
    request: pytest.FixtureRequest, tmp_path: Path, migrated_templates: MigratedTemplates
) -> Iterator[str]:
    """A real database, a SQLite file or PostgreSQL if SYNCER_TEST_DATABASE_URL is set: freshly
    migrated when the test also uses ``store`` (or ``db``), else empty."""
    migrated = bool(MIGRATED_DATABASE_FIXTURES.intersection(request.fixturenames))
    if request.param == "sqlite":
        path = tmp_path / "syncer.db"
        if migrated:
            shutil.copyfile(migrated_templates.of("sqlite"), path)
        yield f"sqlite:///{path}"
    else:
        template = migrated_templates.of("postgresql") if migrated else None
        yield from _postgres_database(template)


@pytest.fixture
def store(database_url: str) -> Iterator[Store]:
    """The store of a freshly migrated database (``database_url``'s)."""
    engine = create_database_engine(database_url)
    yield Store.open(engine)
    engine.dispose()


@pytest.fixture
def standin() -> Iterator[TrayStandin]:
    """A running local stand-in for Tray workflows that checks signatures against SECRET."""
    with TrayStandin(secret=SECRET) as server:
        yield server


def make_settings(
    database_url: str,
    urls: Sequence[Any],
    *,
    engage: dict[str, Any] | None = None,
    defined: dict[str, list[dict[str, Any]]] | None = None,
    **delivery: Any,
) -> Settings:
    """Settings for a test: fast retries unless the test asks otherwise. ``urls``: the
    ``workflow_urls`` entries (URLs, or tables with routing and a secret of their own);
    ``engage``: keys of ``[engage]`` besides its space_id; ``defined``: ``audiences`` and
    ``traits`` defined by a query; the rest: keys of ``[delivery]``."""
    delivery_settings: dict[str, Any] = {
        "concurrency": 4,
        "timeout_seconds": 5,
        "max_attempts": 3,
        "backoff_base_seconds": 0.01,
        "backoff_max_seconds": 0.05,
        "retry_after_max_seconds": 0.2,
    }
    delivery_settings.update(delivery)
    return settings_from_mapping(
        {
            "database": {"url": database_url},
            "tray": {"workflow_urls": list(urls), "shared_secret": SECRET},
            "engage": {"space_id": "spa_test", **(engage or {})},
            "delivery": delivery_settings,
            **(defined or {}),
        },
        "test",
        Path("."),
    )


class Upstream:
    """Plays the upstream jobs: writes the input tables the syncer reads."""

    def __init__(self, store: Store) -> None:
        self.engine = store.engine

    def add_audience(
        self, audience_id: str, name: str, key: str | None = None, enabled: bool = True
    ) -> None:
        with self.engine.begin() as connection:
            connection.execute(
                insert(audiences).values(id=audience_id, name=name, key=key, enabled=enabled)
            )

    def update_audience(self, audience_id: str, **values: Any) -> None:
        with self.engine.begin() as connection:
            connection.execute(
                update(audiences).where(audiences.c.id == audience_id).values(**values)
            )

    def add(
        self,
        audience_id: str,
        *user_ids: str,
        anonymous_id: str | None = None,
        email: str | None = None,
    ) -> None:
        with self.engine.begin() as connection:
            connection.execute(
                insert(audience_memberships),
                [
                    {
                        "audience_id": audience_id,
                        "user_id": user_id,
                        "anonymous_id": anonymous_id,
                        "email": email,
                    }
                    for user_id in user_ids
                ],
            )

    def remove(self, audience_id: str, *user_ids: str) -> None:
        with self.engine.begin() as connection:
            connection.execute(
                delete(audience_memberships).where(
                    audience_memberships.c.audience_id == audience_id,
                    audience_memberships.c.user_id.in_(user_ids),
                )
            )

    def set_members(self, audience_id: str, user_ids: set[str]) -> None:
        with self.engine.begin() as connection:
            connection.execute(
                delete(audience_memberships).where(
                    audience_memberships.c.audience_id == audience_id
                )
            )
            if user_ids:
                connection.execute(
                    insert(audience_memberships),
                    [{"audience_id": audience_id, "user_id": u} for u in sorted(user_ids)],
                )

    def add_trait(
        self, trait_id: str, name: str, key: str | None = None, enabled: bool = True
    ) -> None:
        with self.engine.begin() as connection:
            connection.execute(
                insert(computed_traits).values(id=trait_id, name=name, key=key, enabled=enabled)
            )

    def disable_trait(self, trait_id: str) -> None:
        with self.engine.begin() as connection:
            connection.execute(
                update(computed_traits)
                .where(computed_traits.c.id == trait_id)
                .values(enabled=False)
            )

    def set_values(self, trait_id: str, values: Mapping[str, str | None]) -> None:
        """Write each user's value as JSON text exactly as given (None: SQL NULL), replacing
        what the user had."""
        json_value = (
            "CAST(:value AS json)" if self.engine.dialect.name == "postgresql" else ":value"
        )
        with self.engine.begin() as connection:
            self._delete_values(connection, trait_id, list(values))
            if not values:
                return
            connection.execute(
                text(
                    "INSERT INTO computed_trait_values (trait_id, user_id, value) "
                    f"VALUES (:trait_id, :user_id, {json_value})"
                ),
                [{"trait_id": trait_id, "user_id": u, "value": v} for u, v in values.items()],
            )

    def remove_values(self, trait_id: str, *user_ids: str) -> None:
        with self.engine.begin() as connection:
            self._delete_values(connection, trait_id, list(user_ids))

    @staticmethod
    def _delete_values(connection: Connection, trait_id: str, user_ids: list[str]) -> None:
        connection.execute(
            delete(computed_trait_values).where(
                computed_trait_values.c.trait_id == trait_id,
                computed_trait_values.c.user_id.in_(user_ids),
            )
        )


@pytest.fixture
def upstream(store: Store) -> Upstream:
    """Writes audiences and memberships the way upstream jobs do."""
    return Upstream(store)


def told_values(
    store: Store, url: str, audience_id: str, kind: Kind = Kind.AUDIENCE
) -> dict[str, str]:
    """User -> the value ``url`` last accepted for one audience or trait (small ones only)."""
    destination_id = store.destinations.find([url])[url]
    with store.engine.connect() as connection:
        rows = connection.execute(
            select(state.c.user_id, state.c.value).where(
                state.c.destination_id == destination_id,
                state.c.audience_id == audience_id,
                state.c.kind == kind.value,
                state.c.value.is_not(None),
            )
        )
        return {row.user_id: row.value for row in rows}


def run_sync(
    store: Store, urls: Sequence[Any], options: SyncOptions | None = None, **delivery: Any
) -> SyncReport:
    """One real sync run against real URLs."""
    settings = make_settings(str(store.engine.url.render_as_string(False)), urls, **delivery)
    engine = SyncEngine(settings, store)
    try:
        return engine.run(options or SyncOptions())
    finally:
        engine.close()


def sent_values(standin: TrayStandin, path: str) -> list[tuple[str, str, Any]]:
    """(userId, trait key, value) of every identify call received at ``path``, in order."""
    result = []
    for received in standin.received(path):
        message = received.message
        if message["type"] != "identify":
            continue
        key = message["context"]["personas"]["computation_key"]
        result.append((message["userId"], key, message["traits"][key]))
    return result


# The real command runs in this process when it can: a child spends most of a second importing
# what this interpreter has loaded already, and the suite runs hundreds of commands. The daemon
# (signal handlers, runs until stopped) and commands started from another thread (they would
# share this process's streams and environment) run in a child, as does every command when
# SYNCER_TEST_CLI=subprocess.
CHILD_ONLY_COMMANDS = frozenset({"daemon"})


def child_environment(env: dict[str, str] | None = None) -> dict[str, str]:
    """The environment of a command: ours without any SYNCER_* variable, plus ``env``."""
    full = {k: v for k, v in os.environ.items() if not k.startswith("SYNCER_")}
    full.update(env or {})
    return full


def runs_in_process(args: list[str]) -> bool:
    """Whether ``syncer ARGS`` may run in this process (see CHILD_ONLY_COMMANDS)."""
    return (
        os.environ.get("SYNCER_TEST_CLI") != "subprocess"
        and threading.current_thread() is threading.main_thread()
        and not CHILD_ONLY_COMMANDS.intersection(args)
    )


def run_in_process(
    args: list[str], env: dict[str, str], cwd: Path | None = None
) -> subprocess.CompletedProcess[str]:
    """``syncer ARGS`` through its real entry point (``syncer.cli.run``), in this process, with
    ``env`` as the whole environment and its output captured; what it changes of the process
    (environment, directory, logging) is put back afterwards."""
    from syncer.cli import run

    saved_env, saved_cwd = dict(os.environ), os.getcwd()
    root = logging.getLogger()
    saved_handlers, saved_level = root.handlers[:], root.level
    saved_structlog = structlog.get_config()
    out, err = io.StringIO(), io.StringIO()
    code = 0
    try:
        os.environ.clear()
        os.environ.update(env)
        if cwd is not None:
            os.chdir(cwd)
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                run(list(args))
            except SystemExit as exit_:
                code = exit_.code if isinstance(exit_.code, int) else int(exit_.code is not None)
    finally:
        os.chdir(saved_cwd)
        os.environ.clear()
        os.environ.update(saved_env)
        root.handlers[:] = saved_handlers
        root.setLevel(saved_level)
        structlog.configure(**saved_structlog)
    return subprocess.CompletedProcess(["syncer", *args], code, out.getvalue(), err.getvalue())


def run_cli(
    *args: str,
    settings: Path | None = None,
    env: dict[str, str] | None = None,
    cwd: Path | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run the real ``syncer`` command (in this process when it can, see runs_in_process)."""
    argv = (["--settings", str(settings)] if settings is not None else []) + list(args)
    if runs_in_process(argv):
        return run_in_process(argv, child_environment(env), cwd)
    return subprocess.run(
        [sys.executable, "-m", "syncer", *argv],
        capture_output=True,
        text=True,
        env=child_environment(env),
        cwd=cwd,
        timeout=120,
        stdin=subprocess.DEVNULL,
    )
