"""The sync engine end to end: real database, real HTTP to a local stand-in."""

from __future__ import annotations

from syncer.store import Store
from syncer.sync import SyncEngine, SyncOptions
from syncer.testing.tray_standin import Reply, TrayStandin, tray_signature
from tests.conftest import SECRET, Upstream, make_settings, run_sync, sent_values


def test_first_sync_sends_every_member_then_only_changes(
    store: Store, upstream: Upstream, standin: TrayStandin
) -> None:
    upstream.add_audience("aud_1", "Order Completed Last 30days")
    upstream.add("aud_1", "u1", "u2", "u3")
    url = standin.url("/wf")

    first = run_sync(store, [url])

    assert first.fully_delivered
    assert sorted(sent_values(standin, "/wf")) == [
        ("u1", "order_completed_last_30days", True),
        ("u2", "order_completed_last_30days", True),
        ("u3", "order_completed_last_30days", True),
    ]
    standin.clear()
    upstream.remove("aud_1", "u2")
    upstream.add("aud_1", "u4")

    second = run_sync(store, [url])

    assert sorted(sent_values(standin, "/wf")) == [
        ("u2", "order_completed_last_30days", False),
        ("u4", "order_completed_last_30days", True),
    ]
    assert (second.counts.entered, second.counts.exited, second.counts.delivered) == (1, 1, 2)
    standin.clear()
    run_sync(store, [url])
    assert standin.received() == []


def test_user_who_entered_and_left_between_syncs_gets_nothing(
    store: Store, upstream: Upstream, standin: TrayStandin
) -> None:
    upstream.add_audience("aud_1", "Buyers")
    upstream.add("aud_1", "u1")
    run_sync(store, [standin.url("/wf")])
    standin.clear()
    upstream.add("aud_1", "u2")
    upstream.remove("aud_1", "u2")

    run_sync(store, [standin.url("/wf")])

    assert standin.received() == []


def test_request_is_the_documented_identify_call_signed_over_exact_bytes(
    store: Store, upstream: Upstream, standin: TrayStandin
) -> None:
    upstream.add_audience("aud_9", "High-Value Customers")
    upstream.add("aud_9", "u1", anonymous_id="a1", email="u1@example.com")
    upstream.add("aud_9", "u2")

    run_sync(store, [standin.url("/wf")])

    by_user = {r.message["userId"]: r for r in standin.received("/wf")}
    full = by_user["u1"]
    assert full.headers["Content-Type"] == "application/json"
    assert full.headers["X-Signature"] == tray_signature(full.body, SECRET)
    assert full.signature_ok
    message = full.message
    assert message["type"] == "identify"
    assert message["anonymousId"] == "a1"
    assert message["traits"] == {"high_value_customers": True, "email": "u1@example.com"}
    assert message["context"] == {
        "personas": {
            "computation_class": "audience",
            "computation_id": "aud_9",
            "computation_key": "high_value_customers",
            "namespace": "spa_test",
            "space_id": "spa_test",
        }
    }
    assert message["timestamp"].endswith("Z")
    bare = by_user["u2"].message
    assert "anonymousId" not in bare
    assert bare["traits"] == {"high_value_customers": True}
    assert message["messageId"] != bare["messageId"]


def test_a_url_removed_when_a_user_was_deleted_gets_the_delete_when_it_comes_back(
    store: Store, upstream: Upstream, standin: TrayStandin
) -> None:
    upstream.add_audience("aud_1", "Buyers")
    upstream.add("aud_1", "u1", "u2")
    both = [standin.url("/a"), standin.url("/b")]
    run_sync(store, both)
    only_b = SyncEngine(make_settings(str(store.engine.url), [standin.url("/b")]), store)
    try:
        only_b.delete_users(["u1"])
    finally:
        only_b.close()
    assert [r.message["type"] for r in standin.received("/a")] == ["identify", "identify"]

    run_sync(store, both)

    deletes = [r.message for r in standin.received("/a") if r.message["type"] == "delete"]
    assert [m["userId"] for m in deletes] == ["u1"]
    assert len([r for r in standin.received("/b") if r.message["type"] == "delete"]) == 1


def test_a_full_sync_interrupted_by_a_failing_url_is_finished_by_later_runs(
    store: Store, upstream: Upstream, standin: TrayStandin
) -> None:
    upstream.add_audience("aud_1", "Buyers")
    upstream.add("aud_1", "u1", "u2", "u3")
    url = standin.url("/wf")
    run_sync(store, [url])
    standin.clear()
    standin.respond("/wf", Reply(status=503))

    interrupted = run_sync(store, [url], SyncOptions(full=True))

    assert not interrupted.fully_delivered
    standin.respond("/wf", Reply())
    standin.clear()
    finished = run_sync(store, [url])  # a normal run, not --full

    assert finished.fully_delivered
    assert sorted(sent_values(standin, "/wf")) == [
        ("u1", "buyers", True),
        ("u2", "buyers", True),
        ("u3", "buyers", True),
    ]
