"""Track mode (`send = "track"` on a workflow URL's entry), over real HTTP to the local stand-in,
on SQLite and PostgreSQL: the calls are Engage's track calls, checked field by field; a URL
whose `send` changes keeps sending its queued changes as they were planned (same bytes, same
messageId), and sends new ones with the new call.
"""

from __future__ import annotations

import json
from typing import Any

from syncer.core.states import Call
from syncer.store import Store
from syncer.sync import SyncEngine, SyncOptions
from syncer.testing.tray_standin import Reply, TrayStandin
from tests.conftest import Upstream, make_settings, run_sync

AUDIENCE, KEY = "aud_vip", "vip_customers"


def messages(standin: TrayStandin, path: str) -> list[dict[str, Any]]:
    return [received.message for received in standin.received(path)]


def personas(space_id: str = "spa_test") -> dict[str, str]:
    return {
        "computation_class": "audience",
        "computation_id": AUDIENCE,
        "computation_key": KEY,
        "namespace": space_id,
        "space_id": space_id,
    }


def test_a_track_url_is_told_entries_and_exits_as_track_events(
    store: Store, upstream: Upstream, standin: TrayStandin
) -> None:
    upstream.add_audience(AUDIENCE, "VIP Customers")
    upstream.add(AUDIENCE, "u1", anonymous_id="anon-1", email="u1@example.com")
    upstream.add(AUDIENCE, "u2")
    track, identify = standin.url("/track"), standin.url("/identify")

    report = run_sync(store, [{"url": track, "send": "track"}, identify])

    assert report.fully_delivered
    assert all(received.signature_ok for received in standin.received())
    entered = {m["userId"]: m for m in messages(standin, "/track")}
    assert set(entered) == {"u1", "u2"}
    u1 = entered["u1"]
    assert set(u1) == {
        "type", "event", "userId", "anonymousId", "properties", "context", "messageId",
        "timestamp",
    }  # fmt: skip
    assert (u1["type"], u1["event"], u1["anonymousId"]) == ("track", "Audience Entered", "anon-1")
    assert u1["properties"] == {"audience_key": KEY, KEY: True}
    assert u1["context"] == {"traits": {"email": "u1@example.com"}, "personas": personas()}
    u2 = entered["u2"]
    assert "anonymousId" not in u2 and u2["context"] == {"personas": personas()}
    # The identify URL beside it is told the same changes as identify calls.
    assert {m["type"] for m in messages(standin, "/identify")} == {"identify"}
    standin.clear()

    upstream.remove(AUDIENCE, "u1")
    assert run_sync(store, [{"url": track, "send": "track"}, identify]).fully_delivered
    (exited,) = messages(standin, "/track")
    assert (exited["userId"], exited["event"]) == ("u1", "Audience Exited")
    assert exited["properties"] == {"audience_key": KEY, KEY: False}
    assert exited["context"]["traits"] == {"email": "u1@example.com"}


def test_changing_send_applies_to_new_changes_and_queued_ones_keep_their_bytes(
    store: Store, upstream: Upstream, standin: TrayStandin
) -> None:
    upstream.add_audience(AUDIENCE, "VIP Customers")
    upstream.add(AUDIENCE, "u1", email="u1@example.com")
    url = standin.url("/wf")
    # The URL is down: u1's entry is queued as an identify call.
    standin.respond("/wf", Reply(status=503))
    assert not run_sync(store, [url], max_attempts=1).fully_delivered
    (first_attempt,) = standin.received("/wf")
    assert first_attempt.message["type"] == "identify"
    standin.clear()

    # Switched to track while the change waits; u2 joins meanwhile.
    upstream.add(AUDIENCE, "u2")
    standin.respond("/wf", Reply())
    as_track = {"url": url, "send": "track"}
    settings = make_settings(store.engine.url.render_as_string(False), [as_track])
    planned: list[tuple[str, Call]] = []
    engine = SyncEngine(settings, store)
    try:
        engine.run(
            SyncOptions(dry_run=True),
            emit=lambda _url, _key, user, _value, call: planned.append((user, call)),
        )
    finally:
        engine.close()
    assert sorted(planned) == [("u1", Call.IDENTIFY), ("u2", Call.TRACK)]

    assert run_sync(store, [as_track]).fully_delivered
    sent = {r.message["userId"]: r for r in standin.received("/wf")}
    assert sent["u1"].body == first_attempt.body  # the same identify, byte for byte
    assert sent["u2"].message["type"] == "track"
    assert sent["u2"].message["event"] == "Audience Entered"
    standin.clear()

    # New changes of u1 go as track calls now.
    upstream.remove(AUDIENCE, "u1")
    assert run_sync(store, [as_track]).fully_delivered
    (exit_,) = messages(standin, "/wf")
    assert (exit_["userId"], exit_["type"], exit_["event"]) == ("u1", "track", "Audience Exited")


def test_a_both_url_is_told_each_change_by_an_identify_and_a_track_call(
    store: Store, upstream: Upstream, standin: TrayStandin
) -> None:
    upstream.add_audience(AUDIENCE, "VIP Customers")
    upstream.add(AUDIENCE, "u1", anonymous_id="anon-1", email="u1@example.com")
    upstream.add(AUDIENCE, "u2")
    both = {"url": standin.url("/both"), "send": "both"}

    report = run_sync(store, [both])

    assert report.fully_delivered
    [pair] = report.pairs
    assert pair.delivered == 2  # changes, each told both ways
    received = standin.received("/both")
    assert all(r.signature_ok for r in received)
    by_call = {(r.message["userId"], r.message["type"]): r.message for r in received}
    assert set(by_call) == {(u, t) for u in ("u1", "u2") for t in ("identify", "track")}
    identify, track = by_call["u1", "identify"], by_call["u1", "track"]
    assert identify["traits"] == {KEY: True, "email": "u1@example.com"}
    assert (track["event"], track["properties"]) == (
        "Audience Entered",
        {"audience_key": KEY, KEY: True},
    )
    # Each its own messageId: the identify the change's, the track one of its own kind.
    assert identify["messageId"] != track["messageId"]
    assert identify["timestamp"] == track["timestamp"]
    assert len({r.message["messageId"] for r in received}) == 4


def test_each_call_of_a_both_change_is_retried_on_its_own(
    store: Store, upstream: Upstream, standin: TrayStandin
) -> None:
    upstream.add_audience(AUDIENCE, "VIP Customers")
    upstream.add(AUDIENCE, "u1", "u2", "u3")
    path = "/both"
    both = {"url": standin.url(path), "send": "both"}
    # u1's track call and u2's identify call are refused (this run), u3's calls go through.
    failing = {("u1", "track"): Reply(status=422), ("u2", "identify"): Reply(status=400)}
    standin.respond(path, lambda _p, body: failing.get(call_of(body), Reply()))

    report = run_sync(store, [both], max_attempts=1)

    assert not report.fully_delivered
    [pair] = report.pairs
    assert (pair.delivered, pair.pending, pair.rejected) == (1, 0, 2)
    first = {call_of(r.body): r for r in standin.received(path)}
    assert set(first) == {(u, t) for u in ("u1", "u2", "u3") for t in ("identify", "track")}
    standin.clear()

    standin.respond(path, Reply())
    assert run_sync(store, [both]).fully_delivered
    again = {call_of(r.body): r for r in standin.received(path)}
    # Only the calls not accepted are sent again, byte for byte (same messageId).
    assert set(again) == {("u1", "track"), ("u2", "identify")}
    for call in again:
        assert again[call].body == first[call].body
    standin.clear()
    assert run_sync(store, [both]).fully_delivered
    assert standin.received(path) == []


def call_of(body: bytes) -> tuple[str, str]:
    message = json.loads(body)
    return message["userId"], message["type"]
