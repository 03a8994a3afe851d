"""An operator's walk-through, end to end, with the real `syncer daemon` (a child process, on a
1-second schedule, serving HTTP), the real CLI, a real SQLite file and the local Tray stand-in:

1. the daemon syncs; the page, /metrics and /healthz say all is well;
2. the workflow URL breaks (503) while a user joins: /healthz turns 503 after 3 failed runs in a
   row, /metrics shows the backlog and the retryable outcomes, the page shows the URL down;
3. the URL comes back: health, backlog and page recover on the next run;
4. `syncer explain` tells that user's story: detected, each failed attempt, the delivery;
5. `syncer replay` sends the first run into a fresh URL: the bodies are the first run's, byte
   for byte.
"""

from __future__ import annotations

import re
import signal
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx

from syncer.testing.tray_standin import Reply, TrayStandin
from tests.integration.cli_helpers import (
    cli,
    json_out,
    running_daemon,
    settings_sections,
    show,
    sqlite_upstream,
    toml_text,
    wait_until,
)
from tests.integration.test_http_server import parse_metrics, value

TOKEN = "walkthrough-token-0123456789"
BEARER = {"Authorization": f"Bearer {TOKEN}"}
PATIENCE = 30  # seconds: runs come every second; CI shares two cores with everything


def test_break_a_url_watch_the_page_metrics_and_health_then_explain_and_replay(
    standin: TrayStandin, tmp_path: Path
) -> None:
    with sqlite_upstream(tmp_path / "syncer.db") as (database_url, upstream):
        upstream.add_audience("aud_vip", "VIP Customers", key="vip_customers")
        upstream.add("aud_vip", "u1", "u2", "u3")
    url = standin.url("/wf")
    sections = settings_sections(
        database_url, [url], schedule={"interval": "1s"}, delivery={"max_attempts": 1}
    )
    sections["http"] = {"token": TOKEN, "max_backlog_age": "1h"}
    settings = tmp_path / "settings.toml"
    settings.write_text(toml_text(sections), encoding="utf-8")

    with running_daemon(settings, tmp_path / "daemon.log", {"SYNCER_HTTP_PORT": "0"}) as daemon:
        (listening,) = daemon.wait_for_event("http_listening")
        client = httpx.Client(base_url=f"http://127.0.0.1:{listening['port']}", timeout=10)

        def metric(name: str, **labels: str) -> float | None:
            text = client.get("/metrics", headers=BEARER).text
            return value(parse_metrics(text), name, **labels)

        def eventually(check: Callable[[], Any], what: str) -> Any:
            return wait_until(check, timeout=PATIENCE, what=what)

        # 1. All is well.
        eventually(lambda: metric("syncer_changes_total", url=url, outcome="delivered") == 3,
                   "the first run's three deliveries in /metrics")  # fmt: skip
        assert client.get("/healthz").text == "ok\n"
        page = client.get("/", headers=BEARER).text
        assert "VIP Customers" in page and "vip_customers" in page
        first_bodies = sorted(r.body for r in standin.received("/wf"))
        assert len(first_bodies) == 3

        # 2. The URL breaks while a user joins.
        standin.respond("/wf", Reply(status=503))
        with sqlite_upstream(tmp_path / "syncer.db") as (_, upstream):
            upstream.add("aud_vip", "u4")
        unhealthy = eventually(
            lambda: (r := client.get("/healthz")).status_code == 503 and r.text,
            "/healthz to fail for the URL down 3 runs in a row",
        )
        assert f"{url}: down or refusing for " in unhealthy
        assert metric("syncer_backlog_changes", url=url, status="pending") == 1
        # Counted once each failed run has finished (/healthz sees the third one before).
        eventually(lambda: (metric("syncer_changes_total", url=url, outcome="retryable") or 0) >= 3,
                   "three retryable outcomes counted in /metrics")  # fmt: skip
        assert metric("syncer_url_failed_runs", url=url) >= 3  # type: ignore[operator]
        page = client.get("/", headers=BEARER).text
        assert re.search(r">\s*down\s*<", page), "the page shows the URL down"

        # 3. It comes back.
        standin.respond("/wf", Reply(status=200))
        eventually(lambda: client.get("/healthz").text == "ok\n", "/healthz to recover")
        eventually(lambda: metric("syncer_backlog_changes", url=url, status="pending") == 0,
                   "the backlog to drain")  # fmt: skip
        # Counted once the run that delivered it has finished (the backlog drains before).
        eventually(lambda: metric("syncer_changes_total", url=url, outcome="delivered") == 4,
                   "the delivery counted in /metrics")  # fmt: skip
        assert metric("syncer_url_failed_runs", url=url) == 0
        client.close()
        code, _ = daemon.stop(signal.SIGTERM)
        assert code == 0, daemon.stderr()

    # 4. Why did the workflow get what it got about u4?
    record = json_out(cli("explain", "u4", "--format", "json", settings=settings))
    story = [(e["event"], e.get("outcome"), e.get("http_status")) for e in record["events"]]
    assert story[0] == ("detected", None, None)
    failed = [s for s in story if s == ("attempt", "retryable", 503)]
    assert len(failed) >= 3, story
    assert story[-1] == ("attempt", "delivered", None), story
    accepted = [r for r in standin.received("/wf") if r.status == 200 and b'"u4"' in r.body]
    assert [record["events"][-1]["message_id"]] == [r.message["messageId"] for r in accepted]

    # 5. Replay the first run into a fresh workflow.
    fresh = standin.url("/fresh")
    replay = cli("replay", "--run", "1", "--to", fresh, settings=settings)
    assert replay.returncode == 0, show(replay)
    assert "3 of 3 payload(s) accepted" in replay.stdout, show(replay)
    assert sorted(r.body for r in standin.received("/fresh")) == first_bodies
    assert all(r.signature_ok for r in standin.received("/fresh"))
