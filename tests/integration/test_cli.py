"""The ``syncer`` command as operators run it: real subprocesses, databases and HTTP.

Exit statuses (0 delivered, 1 undelivered, 2 settings or usage, 3 database), settings errors
that stop everything before the database or the network is touched, where the settings file is
found, dry runs, the shared secret never shown or stored, and migrating from an installed wheel.
"""

from __future__ import annotations

import importlib.util
import re
import shutil
import socket
import subprocess
import sys
import zipfile
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import text

from syncer.store import Store
from syncer.store.database import create_database_engine, head_revision
from syncer.testing.tray_standin import Reply, TrayStandin
from tests.conftest import Upstream, sent_values
from tests.integration.cli_helpers import (
    call_each,
    cli,
    cli_env,
    cli_many,
    db_rows,
    dump_tables,
    json_out,
    settings_sections,
    show,
    sqlite_upstream,
    sync_in_process,
    toml_text,
    write_settings,
)

LEAK = "s3cr3t-DO-NOT-LEAK"


def free_port() -> int:
    """A port on 127.0.0.1 that nothing listens on."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def one_error_line(result: subprocess.CompletedProcess[str]) -> str:
    """The single line a failed command wrote on standard error."""
    lines = result.stderr.splitlines()
    assert len(lines) == 1, show(result)
    assert lines[0].startswith("syncer: error: "), show(result)
    return lines[0]


# --- migrate ---


def test_migrate_twice_is_idempotent_and_keeps_data(database_url: str, tmp_path: Path) -> None:
    settings = write_settings(tmp_path / "settings.toml", database_url, ["http://127.0.0.1:9/wf"])

    first = cli("migrate", settings=settings)

    assert first.returncode == 0, show(first)
    assert f"revision {head_revision()}" in first.stdout, show(first)
    engine = create_database_engine(database_url)
    try:
        Upstream(Store.open(engine)).add_audience("aud_1", "Buyers")
        Upstream(Store.open(engine)).add("aud_1", "u1")
    finally:
        engine.dispose()
    before = dump_tables(database_url)

    second = cli("migrate", settings=settings)

    assert second.returncode == 0, show(second)
    assert "already" in second.stdout and f"revision {head_revision()}" in second.stdout
    assert dump_tables(database_url) == before  # same rows, same message namespace
    assert "aud_1" in before


@pytest.mark.parametrize(
    ("revision", "says"),
    [
        ("9999", "migrated by a newer version of the syncer (revision 9999)"),
        ("0004", "is at revision 0004"),
    ],
)
def test_a_database_migrated_by_another_version_is_refused_with_exit_3(
    database_url: str, tmp_path: Path, revision: str, says: str
) -> None:
    # A rolling upgrade must not mix protocols: a worker refuses a schema it was not built for.
    settings = write_settings(tmp_path / "settings.toml", database_url, ["http://127.0.0.1:9/wf"])
    assert cli("migrate", settings=settings).returncode == 0
    engine = create_database_engine(database_url)
    try:
        with engine.begin() as connection:
            connection.execute(text("UPDATE alembic_version SET version_num = :r"), {"r": revision})
    finally:
        engine.dispose()

    refused = cli("sync", settings=settings)

    assert refused.returncode == 3, show(refused)
    (line,) = refused.stderr.strip().splitlines()
    assert says in line and "this version needs" in line, line


def test_commands_on_an_unmigrated_database_exit_3_and_say_run_migrate(
    database_url: str, tmp_path: Path
) -> None:
    settings = write_settings(tmp_path / "settings.toml", database_url, ["http://127.0.0.1:9/wf"])

    results = cli_many(["sync"], ["delete-user", "u1"], settings=settings)

    for result in results:
        assert result.returncode == 3, show(result)
        assert "syncer migrate" in one_error_line(result)
        assert result.stdout == "", show(result)


# --- invalid settings ---

Sections = dict[str, dict[str, Any]]


def _unknown_key(sections: Sections, _urls: list[str]) -> None:
    sections["delivery"]["concurency"] = 8


def _no_urls(sections: Sections, _urls: list[str]) -> None:
    sections["tray"]["workflow_urls"] = []


def _eleven_urls(sections: Sections, urls: list[str]) -> None:
    sections["tray"]["workflow_urls"] = [f"{urls[0]}{i}" for i in range(11)]


def _ftp_url(sections: Sections, urls: list[str]) -> None:
    sections["tray"]["workflow_urls"] = [*urls, "ftp://127.0.0.1/wf"]


def _interval_and_cron(sections: Sections, _urls: list[str]) -> None:
    sections["schedule"] = {"interval": "5m", "cron": "*/5 * * * *"}


def _bad_interval(sections: Sections, _urls: list[str]) -> None:
    sections["schedule"] = {"interval": "5x"}


INVALID_SETTINGS: list[tuple[str, Callable[[Sections, list[str]], None] | str, list[str]]] = [
    ("unknown-key", _unknown_key, ["delivery.concurency", "unknown key"]),
    ("no-urls", _no_urls, ["tray.workflow_urls", "0 URLs"]),
    ("eleven-urls", _eleven_urls, ["tray.workflow_urls", "11 URLs"]),
    ("ftp-url", _ftp_url, ["tray.workflow_urls", "ftp://127.0.0.1/wf"]),
    ("interval-and-cron", _interval_and_cron, ["schedule", "interval", "cron"]),
    ("bad-interval", _bad_interval, ["schedule.interval", "5x"]),
    ("missing-file", "missing", ["nowhere.toml", "not found"]),
    ("invalid-toml", "invalid-toml", ["settings.toml", "TOML"]),
]


@pytest.fixture(scope="module")
def populated_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A migrated SQLite database with members nobody was told of yet, to copy per test."""
    path = tmp_path_factory.mktemp("template") / "populated.db"
    with sqlite_upstream(path) as (_url, upstream):
        upstream.add_audience("aud_1", "Buyers")
        upstream.add("aud_1", "u1", "u2", "u3")
    return path


@pytest.mark.parametrize(
    ("change", "expected"),
    [pytest.param(change, expected, id=name) for name, change, expected in INVALID_SETTINGS],
)
def test_invalid_settings_exit_2_with_one_line_and_touch_nothing(
    change: Callable[[Sections, list[str]], None] | str,
    expected: list[str],
    tmp_path: Path,
    standin: TrayStandin,
    populated_template: Path,
) -> None:
    # Each case runs twice: `sync` against a database with members to send (so a syncer that
    # ignored the error would send and record a run), and `migrate` against a database file
    # that does not exist yet (so a syncer that went on would create it).
    populated = tmp_path / "populated.db"
    shutil.copy(populated_template, populated)
    fresh = tmp_path / "fresh" / "never.db"
    fresh.parent.mkdir()
    urls = [standin.url("/wf")]
    paths = []
    for database, folder in ((populated, "a"), (fresh, "b")):
        (tmp_path / folder).mkdir()
        path = tmp_path / folder / "settings.toml"
        sections = settings_sections(f"sqlite:///{database}", urls)
        if change == "missing":
            path = tmp_path / folder / "nowhere.toml"
        elif change == "invalid-toml":
            path.write_text(toml_text(sections) + "[tray\nworkflow_urls = \n", encoding="utf-8")
        else:
            assert callable(change)
            change(sections, urls)
            path.write_text(toml_text(sections), encoding="utf-8")
        paths.append(path)
    populated_before = populated.read_bytes()

    sync, migrate = call_each(
        partial(cli, "sync", settings=paths[0], cwd=tmp_path / "a"),
        partial(cli, "migrate", settings=paths[1], cwd=tmp_path / "b"),
    )

    for result in (sync, migrate):
        assert result.returncode == 2, show(result)
        line = one_error_line(result)
        for fragment in expected:
            assert fragment in line, show(result)
        assert result.stdout == "", show(result)
    assert standin.received() == []
    assert populated.read_bytes() == populated_before
    assert db_rows(f"sqlite:///{populated}", "syncer_runs") == []
    assert sorted(p.name for p in fresh.parent.iterdir()) == []
    assert not (tmp_path / "a" / "syncer.db").exists()
    assert not (tmp_path / "b" / "syncer.db").exists()


# --- where the settings come from ---


def test_syncer_settings_names_the_file_and_settings_option_wins(
    tmp_path: Path, standin: TrayStandin
) -> None:
    with sqlite_upstream(tmp_path / "syncer.db") as (url, upstream):
        upstream.add_audience("aud_1", "Buyers")
        upstream.add("aud_1", "u1", "u2")
    from_env = write_settings(tmp_path / "from-env.toml", url, [standin.url("/env")])
    from_option = write_settings(tmp_path / "from-option.toml", url, [standin.url("/option")])
    broken = tmp_path / "broken.toml"
    broken.write_text("this is [not toml\n", encoding="utf-8")
    workdir = tmp_path / "elsewhere"
    workdir.mkdir()

    by_env = cli("sync", env={"SYNCER_SETTINGS": str(from_env)}, cwd=workdir)

    assert by_env.returncode == 0, show(by_env)
    assert sorted(u for u, _, _ in sent_values(standin, "/env")) == ["u1", "u2"]
    assert standin.received("/option") == []

    # The environment names a file that cannot even be read as TOML: --settings is used instead.
    by_option = cli("sync", settings=from_option, env={"SYNCER_SETTINGS": str(broken)}, cwd=workdir)

    assert by_option.returncode == 0, show(by_option)
    assert sorted(u for u, _, _ in sent_values(standin, "/option")) == ["u1", "u2"]
    assert len(standin.received("/env")) == 2
    assert list(workdir.iterdir()) == []


# --- sync exit statuses ---


def test_sync_exit_status_says_whether_everything_was_delivered(
    tmp_path: Path, standin: TrayStandin
) -> None:
    with sqlite_upstream(tmp_path / "syncer.db") as (url, upstream):
        upstream.add_audience("aud_1", "Buyers")
        upstream.add("aud_1", "u1", "u2")
    standin.respond("/down", Reply(status=503, body=b'{"error":"maintenance"}'))
    healthy = write_settings(tmp_path / "healthy.toml", url, [standin.url("/ok")])
    with_down = write_settings(
        tmp_path / "down.toml", url, [standin.url("/ok"), standin.url("/down")]
    )

    delivered = cli("sync", settings=healthy)

    assert delivered.returncode == 0, show(delivered)
    assert "2 delivered, 0 pending, 0 rejected" in delivered.stdout, show(delivered)
    assert len(sent_values(standin, "/ok")) == 2

    undelivered = cli("sync", settings=with_down)

    assert undelivered.returncode == 1, show(undelivered)
    down_lines = [line for line in undelivered.stdout.splitlines() if "/down" in line]
    assert down_lines and "2 pending" in down_lines[0], show(undelivered)
    assert re.search(r"stay (queued|pending)", undelivered.stdout), show(undelivered)
    assert len(standin.received("/down")) >= 1
    assert len(standin.received("/ok")) == 2  # nothing new for the URL that has everything
    before = len(standin.received())

    unknown = cli("sync", "--audience", "nope", settings=with_down)

    assert unknown.returncode == 2, show(unknown)
    line = one_error_line(unknown)
    assert "--audience" in line and "nope" in line
    assert len(standin.received()) == before


def test_sync_url_sends_to_that_url_only_and_full_resends_it_the_current_state(
    database_url: str, upstream: Upstream, standin: TrayStandin, tmp_path: Path
) -> None:
    upstream.add_audience("aud_1", "Buyers")
    upstream.add("aud_1", "u1", "u2")
    a, b = standin.url("/a"), standin.url("/b")
    settings = write_settings(tmp_path / "settings.toml", database_url, [a, b])
    assert cli("sync", settings=settings).returncode == 0
    upstream.add("aud_1", "u3")
    upstream.remove("aud_1", "u1")
    standin.clear()

    # Another spelling of the same workflow URL names it too.
    only_b = cli("sync", "--url", b.replace("http://", "HTTP://") + "/", settings=settings)

    assert only_b.returncode == 0, show(only_b)
    assert sorted(sent_values(standin, "/b")) == [("u1", "buyers", False), ("u3", "buyers", True)]
    assert standin.received("/a") == []
    assert "no longer configured" not in only_b.stdout, show(only_b)
    standin.clear()

    rebuilt = cli("sync", "--url", b, "--full", settings=settings)

    assert rebuilt.returncode == 0, show(rebuilt)
    assert sorted(sent_values(standin, "/b")) == [("u2", "buyers", True), ("u3", "buyers", True)]
    assert standin.received("/a") == []
    standin.clear()

    rest = cli("sync", settings=settings)  # /a still gets its own changes, once

    assert rest.returncode == 0, show(rest)
    assert sorted(sent_values(standin, "/a")) == [("u1", "buyers", False), ("u3", "buyers", True)]
    assert standin.received("/b") == []

    unknown = cli("sync", "--url", standin.url("/c"), settings=settings)

    assert unknown.returncode == 2, show(unknown)
    line = one_error_line(unknown)
    assert "--url" in line and "/c" in line
    assert standin.received("/c") == []


# --- dry run ---

IDENTIFY_LINE = re.compile(r"^\s+identify\s+'?([^'\s]+)'?\s+(\w+)=(true|false)\s*$")
URL_LINE = re.compile(r"^would send to (\S+):\s*$")


def parse_dry_run(stdout: str) -> dict[str, set[tuple[str, str, str]]]:
    """URL -> {(user id, key, value)} from the per-URL listing of ``sync --dry-run``."""
    found: dict[str, set[tuple[str, str, str]]] = {}
    url = None
    for line in stdout.splitlines():
        if match := URL_LINE.match(line):
            url = match.group(1)
            found.setdefault(url, set())
        elif match := IDENTIFY_LINE.match(line):
            assert url is not None, stdout
            found[url].add((match.group(1), match.group(2), match.group(3)))
    return found


def test_dry_run_prints_per_url_what_would_be_sent_and_sends_and_changes_nothing(
    database_url: str, upstream: Upstream, standin: TrayStandin, tmp_path: Path
) -> None:
    upstream.add_audience("aud_1", "Buyers")
    upstream.add("aud_1", "u1", "u2", "u3")
    a, b = standin.url("/a"), standin.url("/b")
    assert sync_in_process(database_url, [a]).fully_delivered
    standin.clear()
    upstream.remove("aud_1", "u2")
    upstream.add("aud_1", "u4")
    settings = write_settings(tmp_path / "two.toml", database_url, [a, b])
    before = dump_tables(database_url)

    dry = cli("sync", "--dry-run", settings=settings)

    assert dry.returncode == 0, show(dry)
    assert parse_dry_run(dry.stdout) == {
        a: {("u2", "buyers", "false"), ("u4", "buyers", "true")},
        b: {("u1", "buyers", "true"), ("u3", "buyers", "true"), ("u4", "buyers", "true")},
    }, show(dry)
    assert standin.received() == []
    assert dump_tables(database_url) == before  # no run, no URL registered, nothing queued

    real = cli("sync", settings=settings)

    assert real.returncode == 0, show(real)
    assert sorted(sent_values(standin, "/a")) == [("u2", "buyers", False), ("u4", "buyers", True)]
    assert sorted(sent_values(standin, "/b")) == [
        ("u1", "buyers", True),
        ("u3", "buyers", True),
        ("u4", "buyers", True),
    ]
    assert all(r.signature_ok for r in standin.received())


# --- the shared secret ---


def test_shared_secret_is_never_printed_logged_or_stored(tmp_path: Path) -> None:
    # SQLite only: what is written where does not depend on the database.
    with sqlite_upstream(tmp_path / "syncer.db") as (database_url, upstream):
        upstream.add_audience("aud_1", "Buyers")
        upstream.add("aud_1", "u1", "u2", email="someone@example.com")
        upstream.add("aud_1", "u3")
        check_secret_is_never_shown_or_stored(database_url, upstream, tmp_path)


def check_secret_is_never_shown_or_stored(
    database_url: str, upstream: Upstream, tmp_path: Path
) -> None:
    outputs: list[subprocess.CompletedProcess[str]] = []
    with TrayStandin(secret=LEAK) as standin:
        standin.respond("/err", Reply(status=500, body=b'{"error":"internal, try later"}'))
        refused = f"http://127.0.0.1:{free_port()}/wf"
        ok = standin.url("/ok")
        options: dict[str, Any] = {"secret": LEAK, "log_level": "DEBUG"}
        healthy = write_settings(tmp_path / "ok.toml", database_url, [ok], **options)
        failing = write_settings(
            tmp_path / "failing.toml", database_url, [ok, standin.url("/err"), refused], **options
        )

        outputs.append(cli("sync", settings=healthy))
        assert outputs[-1].returncode == 0, show(outputs[-1])
        upstream.add("aud_1", "u4")
        outputs.append(cli("sync", settings=failing))
        assert outputs[-1].returncode == 1, show(outputs[-1])
        outputs.append(cli("sync", "--dry-run", settings=failing))
        assert outputs[-1].returncode == 0, show(outputs[-1])
        outputs.append(cli("delete-user", "u2", settings=failing))
        assert outputs[-1].returncode == 1, show(outputs[-1])

        # The secret was really in use: everything that arrived was signed with it.
        assert standin.received("/ok") and standin.received("/err")
        assert all(r.signature_ok for r in standin.received())

    inspections = [["audiences"], ["members", "aud_1"], ["user", "u2"], ["runs"], ["failures"]]
    outputs += cli_many(
        *(
            ["inspect", *command, "--format", output_format]
            for command in inspections
            for output_format in ("table", "json")
        ),
        settings=failing,
    )
    assert all(r.returncode == 0 for r in outputs[-10:]), [show(r) for r in outputs[-10:]]
    failures = json_out(outputs[-1])
    assert {f["url"] for f in failures} >= {standin.url("/err"), refused}

    # Settings errors next to the secret: the secret of the wrong type (error messages that
    # quote the value would show it), a line the TOML parser cannot read, and the secret given
    # in the environment beside a bad value.
    base = settings_sections(database_url, [ok], secret=LEAK)
    wrong_type = {**base, "tray": {**base["tray"], "shared_secret": [LEAK]}}
    bad_interval = {**base, "schedule": {"interval": "5x"}}
    bad_interval["tray"] = {k: v for k, v in base["tray"].items() if k != "shared_secret"}
    invalid = {
        "wrong-type.toml": toml_text(wrong_type),
        "unterminated.toml": toml_text(base).replace(f'"{LEAK}"', f'"{LEAK}'),
        "bad-interval.toml": toml_text(bad_interval),
    }
    for name, content in invalid.items():
        (tmp_path / name).write_text(content, encoding="utf-8")
    errors = call_each(
        partial(cli, "sync", settings=tmp_path / "wrong-type.toml"),
        partial(cli, "sync", settings=tmp_path / "unterminated.toml"),
        partial(
            cli,
            "sync",
            settings=tmp_path / "bad-interval.toml",
            env={"SYNCER_TRAY_SHARED_SECRET": LEAK},
        ),
    )
    assert all(r.returncode == 2 for r in errors), [show(r) for r in errors]
    outputs += errors

    for result in outputs:
        assert LEAK not in result.stdout + result.stderr, show(result)
    stored = dump_tables(database_url)
    assert "aud_1" in stored and "u1" in stored
    assert LEAK not in stored
    if database_url.startswith("sqlite"):
        database_file = Path(database_url.removeprefix("sqlite:///"))
        for path in database_file.parent.glob(database_file.name + "*"):
            assert LEAK.encode() not in path.read_bytes(), path


# --- an installed wheel ---


def test_migrate_works_from_an_installed_wheel(tmp_path: Path) -> None:
    if importlib.util.find_spec("hatchling") is None:
        pytest.skip("hatchling is not installed in the venv: cannot build the wheel offline")
    dist = tmp_path / "dist"
    build = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
         "-w", str(dist), str(Path(__file__).resolve().parents[2])],
        capture_output=True, text=True, timeout=120, env=cli_env(),
    )  # fmt: skip
    assert build.returncode == 0, build.stdout + build.stderr
    (wheel,) = dist.glob("*.whl")
    site = tmp_path / "site"
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
        archive.extractall(site)
    assert any(n.startswith("syncer/_migrations/versions/") and n.endswith(".py") for n in names)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    settings = write_settings(
        run_dir / "settings.toml", f"sqlite:///{run_dir / 'wheel.db'}", ["http://127.0.0.1:9/"]
    )
    env = {"PYTHONPATH": str(site)}

    where = subprocess.run(
        [sys.executable, "-c", "import syncer; print(syncer.__file__)"],
        capture_output=True, text=True, cwd=run_dir, env=cli_env(env), timeout=60,
    )  # fmt: skip
    migrated = cli("migrate", settings=settings, env=env, cwd=run_dir)

    assert Path(where.stdout.strip()).is_relative_to(site), where.stdout + where.stderr
    assert migrated.returncode == 0, show(migrated)
    assert f"revision {head_revision()}" in migrated.stdout
    engine = create_database_engine(f"sqlite:///{run_dir / 'wheel.db'}")
    try:
        with engine.connect() as connection:
            version = connection.execute(text("SELECT version_num FROM alembic_version"))
            assert version.scalar_one() == head_revision()
    finally:
        engine.dispose()
