"""``syncer replay``: a run's deliveries sent again to another URL, byte for byte, as copies;
over real HTTP to local stand-ins, on SQLite and PostgreSQL, in process and as the command.
"""

from __future__ import annotations

from pathlib import Path

from sqlalchemy import select

from syncer.store import Store
from syncer.store.schema import state
from syncer.sync import SyncEngine
from syncer.sync.replay import ReplayReport
from syncer.testing.tray_standin import Reply, TrayStandin, tray_signature
from tests.conftest import SECRET, Upstream, make_settings, run_sync
from tests.integration.cli_helpers import cli, show, write_settings

AUDIENCE = "aud_vip"
OTHER_SECRET = "the-new-workflows-own-secret"


def bodies(standin: TrayStandin, path: str) -> list[bytes]:
    return sorted(received.body for received in standin.received(path))


def replayed(
    store: Store, urls: list[object], run_id: int, to: str, from_url: str | None = None
) -> ReplayReport:
    settings = make_settings(str(store.engine.url.render_as_string(False)), urls)
    engine = SyncEngine(settings, store)
    try:
        return engine.replay(run_id, to, from_url)
    finally:
        engine.close()


def test_a_replay_sends_the_runs_bodies_byte_for_byte_signed_for_the_target(
    store: Store, upstream: Upstream, standin: TrayStandin
) -> None:
    upstream.add_audience(AUDIENCE, "VIP Customers")
    upstream.add(AUDIENCE, "u1", anonymous_id="a-1", email="u1@example.com")
    upstream.add(AUDIENCE, "u2", "u3")
    upstream.add_trait("tr_ltv", "LTV", key="ltv")
    upstream.set_values("tr_ltv", {"u1": '{"b": 1.50, "a": [1, 2]}', "u2": "12345678901234567"})
    old, both = standin.url("/old"), standin.url("/both")
    urls: list[object] = [old, {"url": both, "send": "both"}]
    first = run_sync(store, urls)
    assert first.fully_delivered and first.run_id is not None
    first_bodies = bodies(standin, "/old")
    standin.clear()
    upstream.remove(AUDIENCE, "u3")
    second = run_sync(store, urls)
    assert second.run_id is not None

    with TrayStandin(secret=OTHER_SECRET) as target:
        new = target.url("/new")
        configured: list[object] = [*urls, {"url": new, "shared_secret": OTHER_SECRET}]
        report = replayed(store, configured, first.run_id, new)
        assert report.complete and report.from_url == old
        assert (report.payloads, report.accepted, report.skipped_deleted) == (5, 5, 0)
        assert bodies(target, "/new") == first_bodies
        assert all(r.signature_ok for r in target.received())
        # The second run's, from the URL told both ways: identify and track calls.
        target.clear()
        report = replayed(store, configured, second.run_id, new, from_url=both)
        assert (report.payloads, report.accepted) == (2, 2)
        assert bodies(target, "/new") == bodies(standin, "/both")
    # A copy: the target was not recorded as told anything.
    destination_ids = store.destinations.find([new])
    with store.engine.connect() as connection:
        told = connection.execute(
            select(state.c.user_id).where(state.c.destination_id.in_(destination_ids.values()))
        ).all()
    assert told == []


def test_users_deleted_since_are_skipped_and_counted_and_failures_are_reported(
    store: Store, upstream: Upstream, standin: TrayStandin
) -> None:
    upstream.add_audience(AUDIENCE, "VIP Customers")
    upstream.add(AUDIENCE, "u1", "u2", "u3")
    old, new = standin.url("/old"), standin.url("/new")
    first = run_sync(store, [old])
    assert first.run_id is not None
    settings = make_settings(str(store.engine.url.render_as_string(False)), [old])
    engine = SyncEngine(settings, store)
    try:
        engine.delete_users(["u2"])
    finally:
        engine.close()

    report = replayed(store, [old], first.run_id, new)
    assert (report.payloads, report.accepted, report.skipped_deleted) == (2, 2, 1)
    assert all(b'"u2"' not in body for body in bodies(standin, "/new"))
    assert report.complete

    standin.respond("/new", lambda _p, body: Reply(status=400 if b'"u1"' in body else 200))
    report = replayed(store, [old], first.run_id, new)
    assert not report.complete
    assert (report.accepted, report.not_accepted) == (1, {"rejected": 1})


def test_the_replay_command(
    tmp_path: Path, database_url: str, upstream: Upstream, standin: TrayStandin
) -> None:
    upstream.add_audience(AUDIENCE, "VIP Customers")
    upstream.add(AUDIENCE, "u1", "u2")
    old, new = standin.url("/old"), standin.url("/new")
    settings = write_settings(tmp_path / "settings.toml", database_url, [old])
    assert cli("sync", settings=settings).returncode == 0

    dry = cli("replay", "--run", "1", "--to", new, "--dry-run", settings=settings)
    assert dry.returncode == 0, show(dry)
    assert "run 1 delivered 2 payload(s)" in dry.stdout
    assert standin.received("/new") == []

    done = cli("replay", "--run", "1", "--to", new, settings=settings)
    assert done.returncode == 0, show(done)
    assert "2 of 2 payload(s) accepted" in done.stdout
    assert bodies(standin, "/new") == bodies(standin, "/old")
    sent = standin.received("/new")[0]
    assert sent.headers["X-Signature"] == tray_signature(sent.body, SECRET)

    standin.respond("/new", Reply(status=503))
    failed = cli("replay", "--run", "1", "--to", new, settings=settings)
    assert failed.returncode == 1, show(failed)
    assert "0 of 2 payload(s) accepted" in failed.stdout

    for args, message in (
        (["--run", "99", "--to", new], "no run 99"),
        (["--run", "1", "--to", "ftp://x"], "--to: 'ftp://x' is not an http"),
        (["--run", "1", "--to", new, "--from", new], "was never a workflow URL"),
    ):
        refused = cli("replay", *args, settings=settings)
        assert refused.returncode == 2, show(refused)
        assert message in refused.stderr, show(refused)
