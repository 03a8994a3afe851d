"""Settings: one-line errors naming the key, environment overrides, URL normalisation."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from syncer.core.states import Call
from syncer.errors import ConfigError
from syncer.settings import DATABASE_URL_ENV, SECRET_ENV, select_problem, settings_from_mapping

SOURCE = "settings.toml"
BASE = Path("/tmp")
URL = "https://a.example/workflow"
SECRET = "hunter2-very-secret-value"


@pytest.fixture(autouse=True)
def _clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(SECRET_ENV, raising=False)
    monkeypatch.delenv(DATABASE_URL_ENV, raising=False)


def valid(**sections: dict[str, Any]) -> dict[str, Any]:
    """A valid settings mapping (with a secret), with sections replaced or added."""
    data: dict[str, Any] = {"tray": {"workflow_urls": [URL], "shared_secret": SECRET}}
    data.update(sections)
    return data


def tray(urls: list[Any]) -> dict[str, Any]:
    return {"workflow_urls": urls, "shared_secret": SECRET}


INVALID = [
    pytest.param({**valid(), "bogus": 1}, "bogus", "unknown key", id="unknown-top-level-key"),
    pytest.param(
        valid(delivery={"bogus": 1}), "delivery.bogus", "unknown key", id="unknown-delivery-key"
    ),
    pytest.param(
        valid(tray={"workflow_urls": [URL], "secret": SECRET}),
        "tray.secret",
        "unknown key",
        id="unknown-tray-key-holding-secret",
    ),
    pytest.param(valid(tray=tray([])), "tray.workflow_urls", "0 URLs", id="zero-urls"),
    pytest.param(
        valid(tray=tray([f"https://a.example/{i}" for i in range(11)])),
        "tray.workflow_urls",
        "11 URLs",
        id="eleven-urls",
    ),
    pytest.param(
        valid(tray=tray(["ftp://a.example/x"])), "tray.workflow_urls", "ftp://", id="ftp-url"
    ),
    pytest.param(
        valid(tray=tray(["not a url"])), "tray.workflow_urls", "not a url", id="not-a-url"
    ),
    pytest.param(
        valid(tray=tray([URL, "https://b.example/", URL])),
        "tray.workflow_urls",
        "same workflow",
        id="duplicate-url",
    ),
    pytest.param(
        valid(tray=tray(["https://b.example/hook", "HTTPS://B.example:443/hook/"])),
        "tray.workflow_urls",
        "same workflow",
        id="duplicate-url-by-case-port-and-slash",
    ),
    pytest.param(
        valid(tray=tray(["http://127.0.0.1:99999/a"])),
        "tray.workflow_urls",
        "invalid port",
        id="port-out-of-range",
    ),
    pytest.param(
        {"tray": {"shared_secret": SECRET}}, "tray.workflow_urls", "required", id="no-urls-key"
    ),
    pytest.param(
        valid(schedule={"interval": "5m", "cron": "*/5 * * * *"}),
        "schedule",
        "not both",
        id="interval-and-cron",
    ),
    pytest.param(valid(schedule={"interval": "5x"}), "schedule.interval", "5x", id="bad-interval"),
    pytest.param(valid(schedule={"cron": "* *"}), "schedule.cron", "* *", id="bad-cron"),
    pytest.param(
        valid(delivery={"concurrency": 0}),
        "delivery.concurrency",
        "greater than or equal to 1",
        id="concurrency-zero",
    ),
    pytest.param(
        valid(database={"url": "mysql://x"}), "database.url", "sqlite", id="mysql-database"
    ),
    pytest.param(
        valid(tray=tray([URL, {"url": "https://b.example/", "sends": "track"}])),
        "tray.workflow_urls[1].sends",
        "unknown key",
        id="unknown-key-in-a-url-table",
    ),
    pytest.param(
        valid(tray=tray([{"url": URL, "send": "Track"}])),
        "tray.workflow_urls[0].send",
        "'identify', 'track' or 'both'",
        id="send-is-case-sensitive",
    ),
    pytest.param(
        valid(tray=tray([{"audiences": ["a_*"]}])),
        "tray.workflow_urls[0].url",
        "required",
        id="url-table-without-url",
    ),
    pytest.param(
        valid(tray=tray([{"url": URL, "audiences": "loyal_*"}])),
        "tray.workflow_urls[0].audiences",
        "list",
        id="patterns-not-a-list",
    ),
    pytest.param(
        valid(tray=tray([{"url": URL, "traits": [""]}])),
        "tray.workflow_urls[0].traits[0]",
        "at least 1 character",
        id="empty-pattern",
    ),
    pytest.param(
        valid(tray=tray([URL, {"url": "HTTPS://A.example/workflow/"}])),
        "tray.workflow_urls",
        "same workflow",
        id="duplicate-url-as-table",
    ),
    pytest.param(
        valid(tray=tray([{"url": "ftp://a.example/x", "shared_secret": SECRET}])),
        "tray.workflow_urls",
        "ftp://",
        id="ftp-url-in-a-table-with-its-secret",
    ),
]


@pytest.mark.parametrize(("data", "key_path", "reason"), INVALID)
def test_invalid_settings(data: dict[str, Any], key_path: str, reason: str) -> None:
    with pytest.raises(ConfigError) as caught:
        settings_from_mapping(data, SOURCE, BASE)
    message = str(caught.value)
    assert "\n" not in message
    assert message.startswith(f"{SOURCE}: ")
    assert f": {key_path}: " in message
    assert reason in message
    assert SECRET not in message


@pytest.mark.parametrize(("data", "key_path", "reason"), INVALID)
def test_invalid_settings_never_show_env_secret(
    monkeypatch: pytest.MonkeyPatch, data: dict[str, Any], key_path: str, reason: str
) -> None:
    env_secret = "env-secret-that-must-not-leak"
    monkeypatch.setenv(SECRET_ENV, env_secret)
    with pytest.raises(ConfigError) as caught:
        settings_from_mapping(data, SOURCE, BASE)
    assert env_secret not in str(caught.value)
    assert key_path in str(caught.value)


def test_ten_urls_allowed() -> None:
    urls = [f"https://a.example/{i}" for i in range(10)]
    settings = settings_from_mapping(valid(tray=tray(urls)), SOURCE, BASE)
    assert settings.tray.urls == urls


def test_default_interval_is_fifteen_minutes() -> None:
    settings = settings_from_mapping(valid(), SOURCE, BASE)
    assert settings.schedule.interval_seconds == 900.0


@pytest.mark.parametrize(
    ("schedule", "seconds"),
    [({"interval": "90s"}, 90.0), ({"interval": "1h30m"}, 5400.0), ({"cron": "*/5 * * * *"}, None)],
)
def test_schedule(schedule: dict[str, str], seconds: float | None) -> None:
    settings = settings_from_mapping(valid(schedule=schedule), SOURCE, BASE)
    assert settings.schedule.interval_seconds == seconds


@pytest.mark.parametrize(
    "tray_section",
    [
        {"workflow_urls": [URL], "shared_secret": "from-file"},
        {"workflow_urls": [URL]},
    ],
)
def test_env_secret_overrides_file(
    monkeypatch: pytest.MonkeyPatch, tray_section: dict[str, Any]
) -> None:
    monkeypatch.setenv(SECRET_ENV, "from-env")
    settings = settings_from_mapping({"tray": tray_section}, SOURCE, BASE)
    assert settings.tray.secret == "from-env"


def test_env_secret_does_not_mutate_input(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(SECRET_ENV, "from-env")
    data = {"tray": {"workflow_urls": [URL], "shared_secret": "from-file"}}
    settings_from_mapping(data, SOURCE, BASE)
    assert data["tray"]["shared_secret"] == "from-file"


@pytest.mark.parametrize(("file_secret", "expected"), [("from-file", "from-file"), ("", None)])
def test_file_secret(file_secret: str, expected: str | None) -> None:
    data = {"tray": {"workflow_urls": [URL], "shared_secret": file_secret}}
    assert settings_from_mapping(data, SOURCE, BASE).tray.secret == expected


def test_no_secret() -> None:
    data = {"tray": {"workflow_urls": [URL]}}
    assert settings_from_mapping(data, SOURCE, BASE).tray.secret is None


@pytest.mark.parametrize(
    ("url", "base", "expected"),
    [
        (None, Path("/tmp"), "sqlite:////tmp/syncer.db"),
        ("sqlite:///data/x.db", Path("/tmp"), "sqlite:////tmp/data/x.db"),
        ("sqlite:///x.db", Path("/srv/syncer"), "sqlite:////srv/syncer/x.db"),
        ("sqlite:///../x.db", Path("/srv/syncer"), "sqlite:////srv/x.db"),
        ("sqlite+pysqlite:///x.db", Path("/tmp"), "sqlite+pysqlite:////tmp/x.db"),
        ("sqlite:////var/lib/x.db", Path("/tmp"), "sqlite:////var/lib/x.db"),
        ("sqlite:///:memory:", Path("/tmp"), "sqlite:///:memory:"),
        (
            "postgresql://user:pw@db.example/engage",
            Path("/tmp"),
            "postgresql+psycopg://user:pw@db.example/engage",
        ),
        (
            "postgresql+psycopg://user@db.example/engage",
            Path("/tmp"),
            "postgresql+psycopg://user@db.example/engage",
        ),
    ],
)
def test_database_url(url: str | None, base: Path, expected: str) -> None:
    data = valid(database={"url": url}) if url is not None else valid()
    assert settings_from_mapping(data, SOURCE, base).database.url == expected


def test_database_url_env_overrides_file(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(DATABASE_URL_ENV, "postgresql://env@db.example/engage")
    settings = settings_from_mapping(valid(database={"url": "sqlite:///x.db"}), SOURCE, BASE)
    assert settings.database.url == "postgresql+psycopg://env@db.example/engage"


@pytest.mark.parametrize("from_env", [False, True])
def test_secret_hidden_in_str_and_repr(monkeypatch: pytest.MonkeyPatch, from_env: bool) -> None:
    data = valid()
    if from_env:
        monkeypatch.setenv(SECRET_ENV, SECRET)
        data = {"tray": {"workflow_urls": [URL]}}
    settings = settings_from_mapping(data, SOURCE, BASE)
    assert settings.tray.secret == SECRET  # it is there ...
    for text in (str(settings), repr(settings), str(settings.tray), repr(settings.tray)):
        assert SECRET not in text  # ... but never shown
    assert URL in repr(settings)


def test_the_schema_revision_checked_at_start_is_the_head_of_the_migrations() -> None:
    # Commands check SCHEMA_REVISION without loading Alembic; `migrate` upgrades to the head.
    from syncer.store.database import SCHEMA_REVISION, head_revision

    assert head_revision() == SCHEMA_REVISION


# ---------------------------------------------------------------------------------------------
# workflow_urls entries as inline tables: routing and a secret of their own


def test_url_entries_may_be_tables_with_patterns_and_their_own_secret() -> None:
    own = "own-secret-of-b"
    settings = settings_from_mapping(
        valid(
            tray=tray(
                [URL, {"url": "https://b.example/", "audiences": ["loyal_*"], "shared_secret": own}]
            )
        ),
        SOURCE,
        BASE,
    )
    tray_settings = settings.tray
    assert tray_settings.urls == [URL, "https://b.example/"]
    assert tray_settings.secret_for(URL) == SECRET
    assert tray_settings.secret_for("https://b.example/") == own
    assert tray_settings.route(URL).takes_audience("churn_risk")
    assert tray_settings.route("https://b.example/").takes_audience("loyal_customers")
    assert not tray_settings.route("https://b.example/").takes_audience("churn_risk")
    for text in (str(settings), repr(settings)):
        assert own not in text and SECRET not in text


@pytest.mark.parametrize("entry_is_table", [False, True])
def test_env_overrides_the_secret_of_one_url_by_its_position(
    monkeypatch: pytest.MonkeyPatch, entry_is_table: bool
) -> None:
    second: Any = {"url": "https://b.example/", "shared_secret": "from-file"}
    if not entry_is_table:
        second = "https://b.example/"
    data = valid(tray=tray([URL, second]))
    monkeypatch.setenv(f"{SECRET_ENV}_2", "from-env-for-b")
    settings = settings_from_mapping(data, SOURCE, BASE)
    assert settings.tray.secret_for("https://b.example/") == "from-env-for-b"
    assert settings.tray.secret_for(URL) == SECRET
    assert data["tray"]["workflow_urls"][1] == second  # the input is left as it was


def test_an_empty_own_secret_means_unsigned() -> None:
    settings = settings_from_mapping(
        valid(tray=tray([{"url": URL, "shared_secret": ""}])), SOURCE, BASE
    )
    assert settings.tray.secret_for(URL) is None


@pytest.mark.parametrize("send", ["identify", "track", "both"])
def test_send_names_the_call(send: str) -> None:
    settings = settings_from_mapping(
        valid(tray=tray([URL, {"url": "https://b.example/", "send": send}])), SOURCE, BASE
    )
    assert settings.tray.workflow(URL).send is Call.IDENTIFY
    assert settings.tray.workflow("https://b.example/").send is Call(send)


@pytest.mark.parametrize(
    ("query", "dialect", "problem"),
    [
        ("SELECT user_id FROM orders", "sqlite", None),
        ("select user_id, email from orders where x > 1;", "postgres", None),
        ("SELECT user_id FROM orders; -- the last statement", "sqlite", None),
        ("WITH recent AS (SELECT * FROM orders) SELECT user_id FROM recent", "postgres", None),
        ("SELECT a AS user_id FROM t UNION SELECT b FROM u", "postgres", None),
        ("SELECT user_id FROM t WHERE ts > now() - interval '30 days'", "postgres", None),
        ("DELETE FROM orders", "sqlite", "must be a SELECT, not DELETE"),
        ("UPDATE orders SET x = 1", "postgres", "must be a SELECT, not UPDATE"),
        ("SELECT 1; SELECT 2", "sqlite", "must be one SELECT statement, not 2"),
        ("", "sqlite", "must be one SELECT statement, not 0"),
        ("WITH d AS (DELETE FROM t RETURNING *) SELECT * FROM d", "postgres", "contains DELETE"),
        ("SELECT * INTO copy FROM orders", "postgres", "SELECT ... INTO"),
        ("SELECT user_id FROM orders FOR UPDATE", "postgres", "locks rows"),
        ("SELECT (", "sqlite", "is not valid SQL"),
    ],
)
def test_select_problem(query: str, dialect: str, problem: str | None) -> None:
    found = select_problem(query, dialect)
    if problem is None:
        assert found is None
    else:
        assert found is not None and problem in found


def test_a_query_defined_audience_is_checked_in_the_dialect_of_the_database() -> None:
    entry = {"id": "a", "name": "A", "query": "SELECT user_id FROM t WHERE x::int > 1"}
    settings = settings_from_mapping(
        valid(database={"url": "postgresql://u@h/db"}, audiences=[entry]), SOURCE, BASE
    )
    assert [a.id for a in settings.audiences] == ["a"]
    with pytest.raises(ConfigError, match=r"audiences\[1\]\.id|id 'a' is defined twice"):
        settings_from_mapping(valid(audiences=[entry, entry]), SOURCE, BASE)
