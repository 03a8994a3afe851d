"""Routing per workflow URL, over real HTTP and a real database: each URL receives the audiences
its patterns match; widening gives it a first sync of what it newly receives, narrowing stops
sending and keeps what it was told, and widening again sends only the net changes. A URL with
a secret of its own has every request signed with it, deletes included."""

from __future__ import annotations

from typing import Any

from syncer.store import Store
from syncer.store.sql import utcnow
from syncer.testing.tray_standin import TrayStandin
from tests.conftest import SECRET, Upstream, run_sync, sent_values, told_values


def entries_of(standin: TrayStandin, path: str) -> list[tuple[str, str, Any]]:
    return sorted(sent_values(standin, path))


def test_routing_changes_mid_life_send_first_syncs_and_net_changes_only(
    store: Store, upstream: Upstream, standin: TrayStandin
) -> None:
    upstream.add_audience("aud_l", "Loyal Customers")
    upstream.add_audience("aud_c", "Churn Risk")
    upstream.add("aud_l", "u1", "u2")
    upstream.add("aud_c", "u3", "u4")
    routed, everything = standin.url("/routed"), standin.url("/all")

    # Loyal audiences only.
    run_sync(store, [{"url": routed, "audiences": ["loyal_*"]}, everything])
    assert entries_of(standin, "/routed") == [
        ("u1", "loyal_customers", True),
        ("u2", "loyal_customers", True),
    ]
    assert len(sent_values(standin, "/all")) == 4
    assert told_values(store, routed, "aud_c") == {}
    standin.clear()

    # Widened to everything: churn_risk's first sync; nothing new about loyal_customers.
    run_sync(store, [routed, everything])
    assert entries_of(standin, "/routed") == [
        ("u3", "churn_risk", True),
        ("u4", "churn_risk", True),
    ]
    assert sent_values(standin, "/all") == []
    standin.clear()

    # Narrowed to churn audiences while both change: loyal_customers is not sent, and what the
    # URL was told about it stays as it was.
    upstream.remove("aud_l", "u1")
    upstream.add("aud_l", "u5", "u6")
    upstream.remove("aud_c", "u3")
    run_sync(store, [{"url": routed, "audiences": ["churn_*"]}, everything])
    assert entries_of(standin, "/routed") == [("u3", "churn_risk", False)]
    assert told_values(store, routed, "aud_l") == {"u1": "true", "u2": "true"}
    assert ("u1", "loyal_customers", False) in sent_values(standin, "/all")
    standin.clear()

    # u1 comes back and u6 leaves while the URL does not receive loyal_customers; widened
    # again, it is told only the net change: u5 entered.
    upstream.add("aud_l", "u1")
    upstream.remove("aud_l", "u6")
    run_sync(store, [routed, everything])
    assert entries_of(standin, "/routed") == [("u5", "loyal_customers", True)]
    assert told_values(store, routed, "aud_l") == {"u1": "true", "u2": "true", "u5": "true"}


def test_a_url_that_names_only_traits_receives_no_audience(
    store: Store, upstream: Upstream, standin: TrayStandin
) -> None:
    upstream.add_audience("aud_l", "Loyal Customers")
    upstream.add("aud_l", "u1")
    report = run_sync(
        store, [{"url": standin.url("/traits"), "traits": ["ltv_*"]}, standin.url("/all")]
    )
    assert sent_values(standin, "/traits") == []
    assert sent_values(standin, "/all") == [("u1", "loyal_customers", True)]
    assert [pair.url for pair in report.pairs] == [standin.url("/all")]


def test_a_url_with_its_own_secret_has_every_request_signed_with_it(
    store: Store, upstream: Upstream
) -> None:
    upstream.add_audience("aud_l", "Loyal Customers")
    upstream.add("aud_l", "u1", "u2")
    with TrayStandin(secret="own-secret-of-this-url") as own, TrayStandin(secret=SECRET) as shared:
        urls: list[Any] = [
            {"url": own.url("/wf"), "shared_secret": "own-secret-of-this-url"},
            shared.url("/wf"),
        ]
        run_sync(store, urls)
        destination_ids = store.destinations.find([own.url("/wf"), shared.url("/wf")])
        store.deletions.suppress(["u1"], list(destination_ids.values()), utcnow())
        run_sync(store, urls)
        for standin in (own, shared):
            kinds = sorted(item.message["type"] for item in standin.received("/wf"))
            assert kinds == ["delete", "identify", "identify"]
            assert all(item.signature_ok for item in standin.received("/wf"))
