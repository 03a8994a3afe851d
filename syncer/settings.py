"""The one typed settings object, read from TOML and validated once at start-up."""

from __future__ import annotations

import os
import tomllib
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError

from syncer.core.durations import parse_duration
from syncer.core.routing import Route
from syncer.core.states import Call
from syncer.core.urls import canonical_url
from syncer.errors import ConfigError

DEFAULT_SETTINGS_PATH = "settings.toml"
SETTINGS_PATH_ENV = "SYNCER_SETTINGS"
SECRET_ENV = "SYNCER_TRAY_SHARED_SECRET"
DATABASE_URL_ENV = "SYNCER_DATABASE_URL"
HTTP_PORT_ENV = "SYNCER_HTTP_PORT"
HTTP_TOKEN_ENV = "SYNCER_HTTP_TOKEN"
MAX_WORKFLOW_URLS = 10
# How claims are kept (syncer.sync.claiming): renewed every quarter of lease_seconds, and a
# request may start only if it ends CLAIM_SAFETY_SECONDS before the claim could run out. A lease
# of more than 1.5 x (timeout_seconds + CLAIM_SAFETY_SECONDS) leaves every request room between
# two renewals, with a twelfth of the lease to spare for a renewal's own round trip.
CLAIM_RENEWALS = 4
CLAIM_SAFETY_SECONDS = 1.0
MIN_LEASE_PER_REQUEST = 1.5


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class DatabaseSettings(_Section):
    """Where memberships live and the syncer keeps its records."""

    url: str = "sqlite:///syncer.db"

    @field_validator("url")
    @classmethod
    def _known_scheme(cls, url: str) -> str:
        return driver_url(url)


# PostgreSQL URLs naming another driver are served by psycopg 3 (the one installed): libpq
# takes the same connection parameters whichever Python driver passes them on.
_POSTGRESQL_DRIVERS = ("postgresql", "postgres", "postgresql+psycopg", "postgresql+psycopg2")


def driver_url(url: str) -> str:
    """The SQLAlchemy URL to connect with: SQLite as given, PostgreSQL through psycopg 3.

    Raises ValueError, with a message fit for the settings error, for anything else, or for a
    URL SQLAlchemy cannot read (e.g. a port that is not a number).
    """
    try:
        parsed = make_url(url)
        port = parsed.port
    except (ArgumentError, ValueError):
        raise ValueError(
            "is not a database URL like sqlite:///syncer.db or postgresql://user@host/db"
        ) from None
    if parsed.drivername in ("sqlite", "sqlite+pysqlite"):
        return url
    if parsed.drivername not in _POSTGRESQL_DRIVERS:
        raise ValueError(
            f"driver {parsed.drivername!r} is not supported: use sqlite:/// or postgresql://"
        )
    if port is not None and not 0 < port < 65536:
        raise ValueError(f"port {port} is out of range")
    return parsed.set(drivername="postgresql+psycopg").render_as_string(hide_password=False)


class WorkflowSettings(_Section):
    """One workflow URL, with what it receives and, if its own, the secret that signs it."""

    url: str
    # Which call tells it about a change; a change keeps the call it was planned with, so a
    # new value here applies to changes planned from then on.
    send: Call = Call.IDENTIFY
    audiences: list[Annotated[str, Field(min_length=1)]] | None = None
    traits: list[Annotated[str, Field(min_length=1)]] | None = None
    shared_secret: SecretStr | None = None

    @property
    def route(self) -> Route:
        """Which audiences and traits this URL receives."""
        return Route.of(self.audiences, self.traits)


class TraySettings(_Section):
    """The workflows to tell, and the secret that signs what they are told.

    Each ``workflow_urls`` entry is a URL, or an inline table ``{url = "…", audiences = […],
    traits = […], shared_secret = "…"}``.
    """

    workflow_urls: list[WorkflowSettings]
    shared_secret: SecretStr | None = None

    @field_validator("workflow_urls", mode="before")
    @classmethod
    def _entries(cls, entries: Any) -> Any:
        # A plain URL is an entry that receives everything and signs with [tray] shared_secret.
        if isinstance(entries, list):
            return [{"url": entry} if isinstance(entry, str) else entry for entry in entries]
        return entries

    @field_validator("workflow_urls")
    @classmethod
    def _valid_urls(cls, entries: list[WorkflowSettings]) -> list[WorkflowSettings]:
        if not 1 <= len(entries) <= MAX_WORKFLOW_URLS:
            raise ValueError(f"{len(entries)} URLs given; 1 to {MAX_WORKFLOW_URLS} are allowed")
        seen: dict[str, str] = {}
        for entry in entries:
            url = entry.url
            if url != url.strip():
                raise ValueError(f"{url!r} is not an http:// or https:// URL")
            # The same workflow written twice (case, default port, trailing slash) would be told
            # everything twice under different messageIds.
            same = canonical_url(url)
            if same in seen:
                raise ValueError(f"{url!r} is the same workflow as {seen[same]!r}")
            seen[same] = url
        return entries

    @property
    def urls(self) -> list[str]:
        """The workflow URLs, as configured, in order."""
        return [entry.url for entry in self.workflow_urls]

    def workflow(self, url: str) -> WorkflowSettings:
        """The entry of a configured URL (spelled as configured)."""
        for entry in self.workflow_urls:
            if entry.url == url:
                return entry
        raise KeyError(url)

    def route(self, url: str) -> Route:
        """Which audiences and traits a configured URL receives."""
        return self.workflow(url).route

    @property
    def secret(self) -> str | None:
        """The shared secret as text, or None when requests go unsigned."""
        return _text(self.shared_secret)

    def secret_for(self, url: str) -> str | None:
        """What signs the requests to a configured URL: its own secret, else ``secret``."""
        own = self.workflow(url).shared_secret
        return _text(own) if own is not None else self.secret


def _text(secret: SecretStr | None) -> str | None:
    if secret is None:
        return None
    return secret.get_secret_value() or None


class EngageSettings(_Section):
    """The Engage space the computations are said to come from."""

    space_id: Annotated[str, Field(min_length=1)] = "spa_syncer"
    # A member whose email or anonymous_id changes upstream is sent their identify again (so a
    # workflow keyed by email follows); off, a URL keeps the identity it was first told.
    resend_on_identity_change: bool = False


class ScheduleSettings(_Section):
    """When the daemon syncs: every ``interval``, or on a ``cron`` expression."""

    interval: str | None = None
    cron: str | None = None

    @field_validator("interval")
    @classmethod
    def _valid_interval(cls, interval: str | None) -> str | None:
        if interval is not None:
            parse_duration(interval)
        return interval

    @field_validator("cron")
    @classmethod
    def _valid_cron(cls, cron: str | None) -> str | None:
        if cron is not None:
            from apscheduler.triggers.cron import CronTrigger

            try:
                CronTrigger.from_crontab(cron)
            except ValueError as error:
                raise ValueError(
                    f"{cron!r} is not a five-field cron expression ({error})"
                ) from None
        return cron

    @model_validator(mode="after")
    def _one_of(self) -> ScheduleSettings:
        if self.interval is not None and self.cron is not None:
            raise ValueError("set interval or cron, not both")
        return self

    @property
    def interval_seconds(self) -> float | None:
        """The interval in seconds; the default of 15 minutes when neither field is set."""
        if self.cron is not None:
            return None
        return parse_duration(self.interval or "15m")


class DeliverySettings(_Section):
    """How requests are sent and retried."""

    concurrency: Annotated[int, Field(ge=1, le=256)] = 16
    timeout_seconds: Annotated[float, Field(gt=0, le=300)] = 10.0
    max_attempts: Annotated[int, Field(ge=1, le=20)] = 4
    backoff_base_seconds: Annotated[float, Field(ge=0, le=60)] = 0.5
    backoff_max_seconds: Annotated[float, Field(ge=0, le=600)] = 30.0
    retry_after_max_seconds: Annotated[float, Field(ge=0, le=3600)] = 60.0
    batch_size: Annotated[int, Field(ge=1, le=10000)] = 500
    max_rejections: Annotated[int, Field(ge=1, le=1000)] = 5
    lease_seconds: Annotated[float, Field(ge=1, le=3600)] = 120.0
    # Requests per second per workflow URL, shared by every worker; 0 means no limit.
    rate_limit_per_second: Annotated[float, Field(ge=0, le=100000)] = 0.0

    @field_validator("lease_seconds")
    @classmethod
    def _claims_outlive_requests(cls, lease_seconds: float, info: ValidationInfo) -> float:
        # A worker that cannot renew its claim must be able to stop sending before the claim
        # runs out: a request must fit between the last renewal and the expiry, with a margin.
        timeout = info.data.get("timeout_seconds")
        if timeout is None:  # timeout_seconds itself was invalid: that error is reported
            return lease_seconds
        shortest = (timeout + CLAIM_SAFETY_SECONDS) * MIN_LEASE_PER_REQUEST
        if lease_seconds <= shortest:
            raise ValueError(
                f"must be more than {MIN_LEASE_PER_REQUEST:g} x (timeout_seconds + "
                f"{CLAIM_SAFETY_SECONDS:g} s), so that a request fits between two renewals of a "
                f"claim: more than {shortest:g} with timeout_seconds = {timeout:g}"
            )
        return lease_seconds


class GuardSettings(_Section):
    """The mass-exit guard: hold an audience whose exits look like a broken upstream job."""

    max_exit_share: Annotated[float, Field(gt=0, le=1)] = 0.5
    min_audience_size: Annotated[int, Field(ge=0)] = 20


class LoggingSettings(_Section):
    """How the syncer writes its logs (to standard error)."""

    level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    # Unset: "console" when standard error is a terminal, "json" otherwise.
    format: Literal["json", "console"] | None = None


class HistorySettings(_Section):
    """How long the change log (what was sent where, and what came of it) is kept."""

    keep_days: Annotated[int, Field(ge=1, le=3650)] = 90


_LOOPBACK_HOSTS = frozenset({"127.0.0.1", "::1", "localhost"})


class HttpSettings(_Section):
    """The daemon's HTTP server: the status page, ``/metrics`` and ``/healthz``."""

    host: Annotated[str, Field(min_length=1)] = "127.0.0.1"
    # Unset: no server. SYNCER_HTTP_PORT overrides it.
    port: Annotated[int, Field(ge=0, le=65535)] | None = None
    # Asked of every request but /healthz; required when host is not a loopback address.
    token: SecretStr | None = None
    # /healthz fails while a change has waited longer than this to be accepted.
    max_backlog_age: str = "1h"

    @field_validator("max_backlog_age")
    @classmethod
    def _valid_age(cls, age: str) -> str:
        parse_duration(age)
        return age

    @field_validator("token")
    @classmethod
    def _long_enough(cls, token: SecretStr | None) -> SecretStr | None:
        if token is not None and len(token.get_secret_value()) < 16:
            raise ValueError("must be at least 16 characters")
        return token

    @model_validator(mode="after")
    def _token_off_loopback(self) -> HttpSettings:
        if self.port is not None and self.token is None and not self.loopback:
            raise ValueError(
                f"token: required when host is {self.host!r} (not a loopback address): "
                f"set [http] token or {HTTP_TOKEN_ENV}"
            )
        return self

    @property
    def loopback(self) -> bool:
        """Whether the server listens on this machine only."""
        return self.host in _LOOPBACK_HOSTS or self.host.startswith("127.")

    @property
    def max_backlog_age_seconds(self) -> float:
        """``max_backlog_age`` in seconds."""
        return parse_duration(self.max_backlog_age)

    @property
    def token_text(self) -> str | None:
        """The token, for comparing with what a request presents (never logged)."""
        return _text(self.token)


class QueryDefinedSettings(_Section):
    """An audience (``[[audiences]]``) or computed trait (``[[traits]]``) defined by a query,
    evaluated at each sync and diffed like one upstream writes to the input tables."""

    id: Annotated[str, Field(min_length=1)]
    name: Annotated[str, Field(min_length=1)]
    key: str | None = None
    query: str
    timeout_seconds: Annotated[float, Field(gt=0)] = 60.0

    @field_validator("query")
    @classmethod
    def _one_select(cls, query: str, info: ValidationInfo) -> str:
        dialect = (info.context or {}).get(QUERY_DIALECT, "sqlite")
        problem = select_problem(query, dialect)
        if problem is not None:
            raise ValueError(problem)
        return query


# The validation context's key for the SQL dialect queries are parsed in (from database.url).
QUERY_DIALECT = "query_dialect"


def select_problem(query: str, dialect: str) -> str | None:
    """Why ``query`` is not one read-only SELECT in ``dialect`` ("sqlite" or "postgres"), or
    None. Parsed with a real SQL parser (sqlglot), imported only when a query is configured."""
    import sqlglot
    from sqlglot import exp
    from sqlglot.errors import SqlglotError

    try:
        # A comment after the final semicolon comes back as an empty statement of its own.
        statements = [
            s
            for s in sqlglot.parse(query, read=dialect)
            if s is not None and not isinstance(s, exp.Semicolon)
        ]
    except SqlglotError as error:
        first_line = str(error).splitlines()[0] if str(error) else type(error).__name__
        return f"is not valid SQL: {first_line}"
    if len(statements) != 1:
        return f"must be one SELECT statement, not {len(statements)}"
    statement = statements[0]
    if not isinstance(statement, exp.Query):
        return f"must be a SELECT, not {statement.key.upper()}"
    writes = (exp.Insert, exp.Update, exp.Delete, exp.Merge, exp.Create, exp.Drop, exp.Alter)
    for node in statement.walk():
        if isinstance(node, writes):
            return f"must only read: it contains {node.key.upper()}"
        if isinstance(node, exp.Into):
            return "must only read: SELECT ... INTO creates a table"
        if isinstance(node, exp.Lock):
            return "must only read: it locks rows (FOR UPDATE / FOR SHARE)"
        if isinstance(node, exp.Command):
            return f"must be one SELECT: {node.this!r} cannot be checked"
    return None


class Settings(_Section):
    """Everything the syncer is told, validated as a whole."""

    database: DatabaseSettings = DatabaseSettings()
    tray: TraySettings
    engage: EngageSettings = EngageSettings()
    schedule: ScheduleSettings = ScheduleSettings()
    delivery: DeliverySettings = DeliverySettings()
    guard: GuardSettings = GuardSettings()
    logging: LoggingSettings = LoggingSettings()
    history: HistorySettings = HistorySettings()
    http: HttpSettings = HttpSettings()
    audiences: list[QueryDefinedSettings] = []
    traits: list[QueryDefinedSettings] = []

    @field_validator("audiences", "traits")
    @classmethod
    def _ids_once(cls, entries: list[QueryDefinedSettings]) -> list[QueryDefinedSettings]:
        seen: set[str] = set()
        for entry in entries:
            if entry.id in seen:
                raise ValueError(f"id {entry.id!r} is defined twice")
            seen.add(entry.id)
        return entries


def resolve_settings_path(explicit: str | None) -> Path:
    """The settings file named by --settings, else SYNCER_SETTINGS, else ./settings.toml."""
    return Path(explicit or os.environ.get(SETTINGS_PATH_ENV) or DEFAULT_SETTINGS_PATH)


def _describe(error: ValidationError, source: str) -> str:
    first = error.errors()[0]
    location = ""
    for part in first["loc"]:
        location += (
            f"[{part}]" if isinstance(part, int) else (f".{part}" if location else str(part))
        )
    if first["type"] == "extra_forbidden":
        problem = "unknown key"
    elif first["type"] == "missing":
        problem = "is required"
    else:
        problem = str(first["msg"]).removeprefix("Value error, ")
    return f"{source}: {location or 'settings'}: {problem}"


def _absolute_sqlite_url(url: str, base: Path) -> str:
    prefix, separator, path = url.partition(":///")
    if not separator or not prefix.startswith("sqlite") or not path or path.startswith(":memory:"):
        return url
    if Path(path).is_absolute():
        return url
    return f"{prefix}:///{(base / path).resolve()}"


def _own_secrets_from_environment(tray: Any) -> None:
    # SYNCER_TRAY_SHARED_SECRET_<n> is the shared_secret of the n-th workflow_urls entry.
    if not isinstance(tray, dict) or not isinstance(tray.get("workflow_urls"), list):
        return
    entries = list(tray["workflow_urls"])
    for number, entry in enumerate(entries, start=1):
        own = os.environ.get(f"{SECRET_ENV}_{number}")
        if own is None:
            continue
        if isinstance(entry, str):
            entries[number - 1] = {"url": entry, "shared_secret": own}
        elif isinstance(entry, dict):
            entries[number - 1] = {**entry, "shared_secret": own}
    tray["workflow_urls"] = entries


def _http_from_environment(data: dict[str, Any]) -> None:
    # SYNCER_HTTP_PORT lets several daemons on one machine share a settings file.
    port, token = os.environ.get(HTTP_PORT_ENV), os.environ.get(HTTP_TOKEN_ENV)
    if port is None and token is None:
        return
    http = data.setdefault("http", {})
    if not isinstance(http, dict):
        return
    if port is not None:
        if not port.strip().isdigit():
            raise ConfigError(f"{HTTP_PORT_ENV}: {port!r} is not a port number")
        http["port"] = int(port)
    if token is not None:
        http["token"] = token


def settings_from_mapping(data: dict[str, Any], source: str, base: Path) -> Settings:
    """Validate settings given as a mapping, applying environment overrides."""
    data = {key: dict(value) if isinstance(value, dict) else value for key, value in data.items()}
    secret = os.environ.get(SECRET_ENV)
    if secret is not None:
        tray = data.setdefault("tray", {})
        if isinstance(tray, dict):
            tray["shared_secret"] = secret
    _own_secrets_from_environment(data.get("tray"))
    _http_from_environment(data)
    database_url = os.environ.get(DATABASE_URL_ENV)
    if database_url:
        database = data.setdefault("database", {})
        if isinstance(database, dict):
            database["url"] = database_url
    raw_url = (
        data.get("database", {}).get("url", "") if isinstance(data.get("database"), dict) else ""
    )
    dialect = "postgres" if str(raw_url).startswith("postgres") else "sqlite"
    try:
        settings = Settings.model_validate(data, context={QUERY_DIALECT: dialect})
    except ValidationError as error:
        if database_url and tuple(error.errors()[0]["loc"][:2]) == ("database", "url"):
            source = DATABASE_URL_ENV
        raise ConfigError(_describe(error, source)) from None
    url = _absolute_sqlite_url(settings.database.url, base)
    return settings.model_copy(update={"database": DatabaseSettings(url=url)})


def load_settings(path: Path) -> Settings:
    """Read and validate the settings file; raise ConfigError with one line naming the key.

    A relative SQLite path is taken relative to the settings file, so the daemon finds the same
    database whatever directory it is started from.
    """
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise ConfigError(
            f"{path}: settings file not found (use --settings or SYNCER_SETTINGS)"
        ) from None
    except OSError as error:
        raise ConfigError(f"{path}: cannot read settings file: {error.strerror}") from None
    try:
        data = tomllib.loads(raw.decode("utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as error:
        raise ConfigError(f"{path}: not valid TOML: {error}") from None
    return settings_from_mapping(data, str(path), path.resolve().parent)
