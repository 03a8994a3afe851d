"""The daemon's HTTP server in this process, on a port the system picks, against a real
database (SQLite, and PostgreSQL when configured) and the local Tray stand-in: /metrics after
real runs, /healthz turning 503 for real reasons, the token, escaping, and read-only methods.

The server and the engine are wired as the daemon wires them (one holder): each run is the
engine's, and the server is told of it as the daemon tells it (``record_run``).
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from datetime import datetime, timedelta
from typing import Any

import httpx
from prometheus_client.parser import text_string_to_metric_families

from syncer.core.states import RunStatus
from syncer.settings import HttpSettings, Settings
from syncer.store import Store
from syncer.store.runs import RunCounts
from syncer.store.sql import utcnow
from syncer.sync import SyncEngine, SyncOptions, SyncReport, query_defined
from syncer.testing.tray_standin import Reply, TrayStandin
from syncer.web import StatusServer
from tests.conftest import Upstream, make_settings

TOKEN = "token-for-the-status-page-0123"

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


class Clock:
    """The server's clock: the real one, moved ahead by ``ahead`` (to age a backlog without
    waiting for it)."""

    def __init__(self) -> None:
        self.ahead = timedelta(0)

    def __call__(self) -> datetime:
        return utcnow() + self.ahead


class Served:
    """A sync engine and the HTTP server beside it, as ``syncer daemon`` runs them."""

    def __init__(self, settings: Settings, store: Store, clock: Clock) -> None:
        self.settings = settings
        self.clock = clock
        self.engine = SyncEngine(settings, store)
        self.server = StatusServer(
            settings, store, self.engine.context.holder, query_defined(settings), clock
        )
        self.port = self.server.start()
        self.client = httpx.Client(base_url=f"http://127.0.0.1:{self.port}", timeout=10)

    def sync(self) -> SyncReport:
        """One scheduled run, then the metrics told of it (what Daemon.run_once does)."""
        report = self.engine.run(SyncOptions(trigger="schedule"))
        self.server.record_run(report)
        return report

    def get(self, path: str, **kwargs: Any) -> httpx.Response:
        return self.client.get(path, **kwargs)

    def metrics(self, **kwargs: Any) -> Samples:
        response = self.get("/metrics", **kwargs)
        assert response.status_code == 200, response.text
        assert response.headers["content-type"].startswith("text/plain")
        return parse_metrics(response.text)

    def close(self) -> None:
        self.client.close()
        self.server.stop()
        self.engine.close()


def parse_metrics(text: str) -> Samples:
    """(sample name, sorted labels) -> value, of a Prometheus text page."""
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float | None:
    return samples.get((name, tuple(sorted(labels.items()))))


def http_settings(
    database_url: str, urls: Sequence[Any], *, token: str | None = None, **http: Any
) -> Settings:
    """Test settings (conftest.make_settings) with an [http] section on port 0."""
    settings = make_settings(database_url, urls)
    return settings.model_copy(update={"http": HttpSettings(port=0, token=token, **http)})


@contextmanager
def serving(
    store: Store, urls: Sequence[Any], *, token: str | None = None, **http: Any
) -> Iterator[Served]:
    """The server and an engine over ``store``'s database, stopped however the test ends."""
    url = store.engine.url.render_as_string(hide_password=False)
    served = Served(http_settings(url, urls, token=token, **http), store, Clock())
    try:
        yield served
    finally:
        served.close()


def test_metrics_count_what_each_run_sent_planned_and_left_owed(
    store: Store, upstream: Upstream, standin: TrayStandin
) -> None:
    upstream.add_audience("aud_1", "Buyers")
    upstream.add("aud_1", "u1", "u2", "u3")
    a, b = standin.url("/a"), standin.url("/b")
    standin.respond("/b", Reply(status=500))
    with serving(store, [a, b]) as served:
        before = served.metrics()
        assert value(before, "syncer_changes_total", url=a, outcome="delivered") == 0
        assert value(before, "syncer_runs", status="ok") is None
        assert value(before, "syncer_last_successful_run_timestamp_seconds") is None
        assert value(before, "syncer_database_up") == 1

        served.sync()  # /a takes all three, /b is down
        first = served.metrics()

        assert value(first, "syncer_changes_total", url=a, outcome="delivered") == 3
        assert value(first, "syncer_changes_total", url=b, outcome="delivered") == 0
        assert (value(first, "syncer_changes_total", url=b, outcome="retryable") or 0) >= 3
        for url in (a, b):
            assert value(first, "syncer_planned_entries_total", url=url, kind="audience") == 3
            assert value(first, "syncer_planned_exits_total", url=url, kind="audience") == 0
        assert value(first, "syncer_backlog_changes", url=a, status="pending") == 0
        assert value(first, "syncer_backlog_changes", url=b, status="pending") == 3
        assert value(first, "syncer_backlog_changes", url=b, status="parked") == 0
        assert (value(first, "syncer_oldest_pending_change_age_seconds", url=b) or 0) >= 0
        assert value(first, "syncer_url_failed_runs", url=b) == 1
        assert value(first, "syncer_url_failed_runs", url=a) == 0
        assert value(first, "syncer_url_last_success_timestamp_seconds", url=b) is None
        assert value(first, "syncer_runs", status="partial") == 1
        assert value(first, "syncer_last_successful_run_timestamp_seconds") is None
        assert value(first, "syncer_members", kind="audience", id="aud_1") == 3
        assert value(first, "syncer_run_duration_seconds_count") == 1

        standin.respond("/b", Reply())
        upstream.remove("aud_1", "u1")
        started = utcnow().timestamp()
        served.sync()  # /b catches up with the three entries, and both are told u1 left
        second = served.metrics()

    assert value(second, "syncer_changes_total", url=a, outcome="delivered") == 4
    # /b may have processed u1's entry (tried, answered 500): its exit replaces it, so /b is
    # told u2, u3 and that u1 is out.
    assert value(second, "syncer_changes_total", url=b, outcome="delivered") == 3
    for url in (a, b):
        assert value(second, "syncer_planned_entries_total", url=url, kind="audience") == 3
        assert value(second, "syncer_planned_exits_total", url=url, kind="audience") == 1
        assert value(second, "syncer_backlog_changes", url=url, status="pending") == 0
        assert value(second, "syncer_oldest_pending_change_age_seconds", url=url) == 0
        assert value(second, "syncer_url_failed_runs", url=url) == 0
        last_success = value(second, "syncer_url_last_success_timestamp_seconds", url=url)
        assert last_success is not None and last_success >= int(started)
    assert value(second, "syncer_runs", status="ok") == 1
    assert value(second, "syncer_runs", status="partial") == 1
    last_ok = value(second, "syncer_last_successful_run_timestamp_seconds")
    assert last_ok is not None and last_ok >= int(started)
    assert value(second, "syncer_members", kind="audience", id="aud_1") == 2
    assert value(second, "syncer_run_duration_seconds_count") == 2
    assert (value(second, "syncer_last_run_duration_seconds") or -1) >= 0


def health(served: Served, json_body: bool = False) -> tuple[int, str]:
    headers = {"Accept": "application/json"} if json_body else {}
    response = served.get("/healthz", headers=headers)
    return response.status_code, response.text


def test_healthz_is_ok_then_fails_for_a_url_down_three_runs_in_a_row_and_an_old_backlog(
    store: Store, upstream: Upstream, standin: TrayStandin
) -> None:
    upstream.add_audience("aud_1", "Buyers")
    upstream.add("aud_1", "u1")
    good, broken = standin.url("/good"), standin.url("/broken")
    with serving(store, [good, broken], max_backlog_age="1h") as served:
        assert health(served) == (200, "ok\n")  # before any run: nothing wrong yet
        served.sync()
        assert health(served) == (200, "ok\n")

        standin.respond("/broken", Reply(status=500))
        upstream.add("aud_1", "u2")
        served.sync()
        served.sync()
        assert health(served) == (200, "ok\n")  # two runs in a row: not yet
        served.sync()
        status, text = health(served)
        assert status == 503
        assert text == f"{broken}: down or refusing for 3 runs in a row\n"

        # The change to /broken has waited since the second run: past max_backlog_age two
        # hours on.
        served.clock.ahead = timedelta(hours=2)
        status, body = health(served, json_body=True)
        assert status == 503
        answer = json.loads(body)
        assert answer["status"] == "failing"
        assert answer["reasons"][0].startswith(f"{broken}: the oldest pending change has waited 2h")
        assert answer["reasons"][1] == f"{broken}: down or refusing for 3 runs in a row"

        standin.respond("/broken", Reply())
        served.sync()
        assert health(served) == (200, "ok\n")
        assert health(served, json_body=True) == (200, '{"status": "ok", "reasons": []}')


def test_healthz_fails_while_the_last_finished_run_failed(
    store: Store, upstream: Upstream, standin: TrayStandin
) -> None:
    upstream.add_audience("aud_1", "Buyers")
    with serving(store, [standin.url("/wf")]) as served:
        served.sync()
        # A run that failed, as the engine records one (another worker's, say).
        failed = store.runs.start("manual", "elsewhere:1:x", utcnow())
        store.runs.finish(failed, RunStatus.FAILED, RunCounts(), utcnow(), "RuntimeError: boom")
        assert health(served) == (503, f"the last run (#{failed}) failed: RuntimeError: boom\n")
        # A run still going is not finished: the failed one stays the last finished.
        store.runs.start("manual", "elsewhere:2:y", utcnow())
        assert health(served)[0] == 503

        served.sync()
        assert health(served) == (200, "ok\n")


def test_with_a_token_everything_but_healthz_asks_for_it_bearer_or_login_cookie(
    store: Store, upstream: Upstream, standin: TrayStandin
) -> None:
    upstream.add_audience("aud_1", "Buyers")
    with serving(store, [standin.url("/wf")], token=TOKEN) as served:
        served.sync()
        bearer = {"Authorization": f"Bearer {TOKEN}"}

        assert served.get("/healthz").status_code == 200
        refused = served.get("/metrics")
        assert refused.status_code == 401
        assert refused.headers["www-authenticate"].startswith("Bearer")
        for wrong_header in (f"Bearer {TOKEN}x", TOKEN, f"Basic {TOKEN}"):
            refused_too = served.get("/metrics", headers={"Authorization": wrong_header})
            assert refused_too.status_code == 401, wrong_header
        assert value(served.metrics(headers=bearer), "syncer_database_up") == 1
        assert served.get("/", headers=bearer).status_code == 200
        assert served.get("/user?user=u1", headers=bearer).status_code == 200

        # A browser is sent to the login form, which sends it back where it was going.
        to_login = served.get("/user?user=u1")
        assert to_login.status_code == 303
        assert to_login.headers["location"] == "/login?next=%2Fuser%3Fuser%3Du1"
        form = served.get(to_login.headers["location"])
        assert form.status_code == 200 and 'name="token"' in form.text
        assert 'value="/user?user=u1"' in form.text

        wrong = served.client.post("/login", data={"token": "nope", "next": "/user?user=u1"})
        assert wrong.status_code == 401 and "not the token" in wrong.text
        assert "set-cookie" not in wrong.headers

        login = served.client.post("/login", data={"token": TOKEN, "next": "/user?user=u1"})
        assert login.status_code == 303
        assert login.headers["location"] == "/user?user=u1"
        cookie = login.headers["set-cookie"]
        assert "HttpOnly" in cookie and "SameSite=Strict" in cookie
        assert TOKEN not in cookie
        # httpx keeps the cookie, as a browser would: the pages open without the header.
        assert served.get("/user?user=u1").status_code == 200
        assert served.get("/").status_code == 200
        assert served.get("/metrics").status_code == 200

        served.client.cookies.clear()
        served.client.cookies.set("syncer_session", "9999999999.forged")
        assert served.get("/metrics").status_code == 401

        # Nothing answered ever shows the token.
        for response in (refused, to_login, form, wrong, login):
            assert TOKEN not in response.text
            assert all(TOKEN not in v for v in response.headers.values())


def test_the_server_is_read_only_get_and_head_only_post_only_to_login(
    store: Store, standin: TrayStandin
) -> None:
    with serving(store, [standin.url("/wf")]) as served:
        for path in ("/", "/metrics", "/healthz", "/user"):
            for method in ("POST", "PUT", "DELETE", "PATCH"):
                response = served.client.request(method, path)
                assert response.status_code == 405, (method, path)
                assert response.headers["allow"] == "GET, HEAD"
        page = served.get("/")
        head = served.client.head("/")
        assert head.status_code == 200 and head.content == b""
        assert head.headers["content-length"] == str(len(page.content))
        assert served.get("/nowhere").status_code == 404
        # No token configured: the login form has nothing to do and sends the browser on.
        assert served.get("/login").status_code == 303


XSS_USER = '<script>alert("user")</script>'
XSS_NAME = "<img src=x onerror=alert(1)> & <b>Buyers</b>"


def test_upstream_data_is_escaped_on_every_page(
    store: Store, upstream: Upstream, standin: TrayStandin
) -> None:
    upstream.add_audience("aud_<x>", XSS_NAME)
    upstream.add("aud_<x>", XSS_USER, "u1")
    with serving(store, [standin.url("/wf")]) as served:
        served.sync()
        page = served.get("/")
        timeline = served.get("/user", params={"user": XSS_USER})

    for response in (page, timeline):
        assert response.status_code == 200
        assert response.headers["content-type"] == "text/html; charset=utf-8"
        policy = response.headers["content-security-policy"]
        assert "default-src 'none'" in policy and "script-src" not in policy
        assert "<script" not in response.text
        assert "<img" not in response.text
        assert "<b>" not in response.text
    assert "&lt;img src=x onerror=alert(1)&gt; &amp; &lt;b&gt;Buyers&lt;/b&gt;" in page.text
    assert "&lt;script&gt;alert(&#34;user&#34;)&lt;/script&gt;" in timeline.text
    # The lookup found the user: what they were sent, and that it was delivered.
    assert 'data-event="detected"' in timeline.text
    assert 'data-event="attempt"' in timeline.text
