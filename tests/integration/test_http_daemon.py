"""``syncer daemon`` with its HTTP server, as a real child process: the port from
SYNCER_HTTP_PORT (0: the system picks one, logged in ``http_listening``), the token, the
metrics of its runs, a clean stop; and the settings errors that keep it from starting."""

from __future__ import annotations

import signal
import socket
from pathlib import Path
from typing import Any

import httpx

from syncer.testing.tray_standin import TrayStandin
from tests.integration.cli_helpers import (
    cli,
    running_daemon,
    settings_sections,
    show,
    sqlite_upstream,
    toml_text,
    wait_until,
)
from tests.integration.test_http_server import parse_metrics, value

TOKEN = "daemon-token-0123456789abcdef"


def write_http_settings(path: Path, database_url: str, urls: list[str], **http: Any) -> Path:
    sections = settings_sections(database_url, urls, schedule={"interval": "1h"})
    sections["http"] = http
    path.write_text(toml_text(sections), encoding="utf-8")
    return path


def test_daemon_serves_metrics_and_health_beside_the_schedule_and_stops_on_sigterm(
    standin: TrayStandin, tmp_path: Path
) -> None:
    with sqlite_upstream(tmp_path / "syncer.db") as (database_url, upstream):
        upstream.add_audience("aud_1", "Buyers")
        upstream.add("aud_1", "u1", "u2")
    url = standin.url("/wf")
    settings = write_http_settings(
        tmp_path / "settings.toml", database_url, [url], host="127.0.0.1", token=TOKEN
    )
    env = {"SYNCER_HTTP_PORT": "0"}  # overrides the file, which sets no port at all
    with running_daemon(settings, tmp_path / "daemon.log", env) as daemon:
        (listening,) = daemon.wait_for_event("http_listening")
        assert listening["host"] == "127.0.0.1" and listening["port"] > 0
        assert listening["token_required"] is True
        daemon.wait_for_event("sync_finished")
        with httpx.Client(base_url=f"http://127.0.0.1:{listening['port']}", timeout=10) as client:
            assert client.get("/healthz").text == "ok\n"
            assert client.get("/metrics").status_code == 401
            bearer = {"Authorization": f"Bearer {TOKEN}"}

            def delivered() -> float | None:
                samples = parse_metrics(client.get("/metrics", headers=bearer).text)
                return value(samples, "syncer_changes_total", url=url, outcome="delivered")

            # The run is counted just after it logs sync_finished.
            assert wait_until(delivered, timeout=10, what="the run in /metrics") == 2
            page = client.get("/", headers=bearer)
            assert page.status_code == 200 and "Buyers" in page.text

        code, seconds = daemon.stop(signal.SIGTERM)

        assert code == 0, daemon.stderr()
        assert seconds < 10
        log = daemon.stderr()
    assert daemon.named("http_stopped"), log
    assert "Traceback" not in log
    assert TOKEN not in log


def test_a_host_off_loopback_without_a_token_is_a_settings_error(tmp_path: Path) -> None:
    settings = write_http_settings(
        tmp_path / "settings.toml",
        f"sqlite:///{tmp_path / 'syncer.db'}",
        ["https://example.trayapp.io/wf"],
        host="0.0.0.0",
        port=0,
    )
    result = cli("daemon", settings=settings)
    assert result.returncode == 2, show(result)
    assert "http: token: required when host is '0.0.0.0'" in result.stderr, show(result)
    assert not (tmp_path / "syncer.db").exists()  # refused before the database was touched


def test_a_port_in_use_stops_the_daemon_before_its_first_run(
    standin: TrayStandin, tmp_path: Path
) -> None:
    with sqlite_upstream(tmp_path / "syncer.db") as (database_url, upstream):
        upstream.add_audience("aud_1", "Buyers")
        upstream.add("aud_1", "u1")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        settings = write_http_settings(
            tmp_path / "settings.toml", database_url, [standin.url("/wf")], port=port
        )
        result = cli("daemon", settings=settings)
    assert result.returncode == 2, show(result)
    assert f"cannot listen on 127.0.0.1:{port}" in result.stderr, show(result)
    assert standin.received() == []
