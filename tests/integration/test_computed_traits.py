"""Computed traits end to end, over real HTTP to the local stand-in, on SQLite and PostgreSQL:
the identify and track calls checked field by field, values sent exactly as stored, changes
decided by JSON equality, removals sent as null, the guard, suppression, routing, and one key
namespace shared with audiences.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from syncer.core.states import Kind, PairState
from syncer.core.traits import Subject
from syncer.errors import ConfigError
from syncer.store import Store
from syncer.store.sql import utcnow
from syncer.sync import SyncEngine, SyncOptions
from syncer.testing.tray_standin import Reply, TrayStandin
from tests.conftest import Upstream, make_settings, run_sync, told_values
from tests.integration.cli_helpers import cli, json_out, write_settings

TRAIT, KEY = "tr_ltv", "lifetime_value"


def personas(trait_id: str = TRAIT, key: str = KEY) -> dict[str, str]:
    return {
        "computation_class": "trait",
        "computation_id": trait_id,
        "computation_key": key,
        "namespace": "spa_test",
        "space_id": "spa_test",
    }


def identify_values(standin: TrayStandin, path: str, key: str = KEY) -> dict[str, Any]:
    return {r.message["userId"]: r.message["traits"][key] for r in standin.received(path)}


def test_first_sync_sends_every_value_exactly_as_stored_and_skips_nulls(
    store: Store, upstream: Upstream, standin: TrayStandin
) -> None:
    upstream.add_trait(TRAIT, "Lifetime Value")
    stored = {
        "u_decimal": "0.1",
        "u_big": "12345678901234567",
        "u_zeros": "450.00",
        "u_object": '{"tier": "gold", "orders": [3, 1.50], "a": null}',
        "u_text": '"caf\\u00e9"',
        "u_false": "false",
    }
    upstream.set_values(TRAIT, {**stored, "u_sql_null": None, "u_json_null": "null"})
    url = standin.url("/wf")

    report = run_sync(store, [url])

    assert report.fully_delivered
    [pair] = report.pairs
    assert (pair.kind, pair.key, pair.entered, pair.exited) == (Kind.TRAIT, KEY, len(stored), 0)
    received = standin.received("/wf")
    assert all(r.signature_ok for r in received)
    assert sorted(r.message["userId"] for r in received) == sorted(stored)
    message = next(r.message for r in received if r.message["userId"] == "u_object")
    assert set(message) == {"type", "userId", "traits", "context", "messageId", "timestamp"}
    assert message["type"] == "identify"
    assert message["traits"] == {KEY: {"tier": "gold", "orders": [3, 1.5], "a": None}}
    assert message["context"] == {"personas": personas()}
    # Byte for byte as upstream wrote them (PostgreSQL's json keeps the text as written).
    sent = {r.message["userId"]: r.body.decode() for r in received}
    for user, text in stored.items():
        assert f'"traits":{{"{KEY}":{text}}}' in sent[user], (user, sent[user])


def test_later_syncs_send_changed_values_and_null_for_removed_ones(
    store: Store, upstream: Upstream, standin: TrayStandin
) -> None:
    upstream.add_trait(TRAIT, "Lifetime Value")
    upstream.set_values(
        TRAIT,
        {
            "same": "1",
            "respelled": '{"a": 1, "b": [1, 2]}',
            "changed": "10",
            "removed": '"x"',
            "to_sql_null": "true",
            "to_json_null": "[1]",
            "typed": "1",
        },
    )
    url = standin.url("/wf")
    assert run_sync(store, [url]).fully_delivered
    standin.clear()

    # JSON-equal values (number spelling, key order, spacing) are not changes.
    upstream.set_values(
        TRAIT,
        {
            "same": "1.0",
            "respelled": '{"b":[1,2.0],"a":1}',
            "changed": "11",
            "to_sql_null": None,
            "to_json_null": "null",
            "typed": '"1"',  # a string is not the number
            "new": "{}",
        },
    )
    upstream.remove_values(TRAIT, "removed")
    report = run_sync(store, [url])

    assert report.fully_delivered
    assert identify_values(standin, "/wf") == {
        "changed": 11,
        "typed": "1",
        "new": {},
        "removed": None,
        "to_sql_null": None,
        "to_json_null": None,
    }
    [pair] = report.pairs
    assert (pair.entered, pair.exited) == (3, 3)
    told = told_values(store, url, TRAIT, Kind.TRAIT)
    assert told["removed"] == "null" and told["changed"] == "11" and told["same"] == "1"
    standin.clear()

    # Nothing changed: nothing is sent.
    assert run_sync(store, [url]).fully_delivered
    assert standin.received("/wf") == []


def test_a_track_url_is_told_trait_computed_events(
    store: Store, upstream: Upstream, standin: TrayStandin
) -> None:
    upstream.add_trait(TRAIT, "Lifetime Value")
    upstream.set_values(TRAIT, {"u1": "450.00"})
    track = standin.url("/track")
    assert run_sync(store, [{"url": track, "send": "track"}]).fully_delivered
    [received] = standin.received("/track")
    event = received.message
    assert set(event) == {
        "type", "event", "userId", "properties", "context", "messageId", "timestamp",
    }  # fmt: skip
    assert (event["type"], event["event"], event["userId"]) == ("track", "Trait Computed", "u1")
    assert event["properties"] == {"trait_key": KEY, KEY: 450}
    assert f'"properties":{{"trait_key":"{KEY}","{KEY}":450.00}}' in received.body.decode()
    assert event["context"] == {"personas": personas()}
    standin.clear()

    upstream.remove_values(TRAIT, "u1")
    assert run_sync(store, [{"url": track, "send": "track"}]).fully_delivered
    [removed] = standin.received("/track")
    assert removed.message["event"] == "Trait Computed"
    assert removed.message["properties"] == {"trait_key": KEY, KEY: None}


def test_audiences_and_traits_share_one_key_namespace_and_may_share_an_id(
    store: Store, upstream: Upstream, standin: TrayStandin
) -> None:
    # Same id for an audience and a trait: two things, each with its own key and state.
    upstream.add_audience("shared", "Big Spenders")
    upstream.add("shared", "u1")
    upstream.add_trait("shared", "Order Count")
    upstream.set_values("shared", {"u1": "3"})
    # Keys that collide across the kinds: both refused, with the reason.
    upstream.add_audience("aud_vip", "VIP")
    upstream.add("aud_vip", "u2")
    upstream.add_trait("tr_vip", "vip")
    upstream.set_values("tr_vip", {"u2": "1"})
    url = standin.url("/wf")

    report = run_sync(store, [url])

    reasons = {problem.subject: problem.reason for problem in report.problems}
    assert set(reasons) == {Subject.audience("aud_vip"), Subject.trait("tr_vip")}
    assert "collides with trait 'tr_vip'" in reasons[Subject.audience("aud_vip")]
    assert "collides with audience 'aud_vip'" in reasons[Subject.trait("tr_vip")]
    assert {(m["userId"], k, v) for m in (r.message for r in standin.received("/wf"))
            for k, v in m["traits"].items()} == {("u1", "big_spenders", True),
                                                  ("u1", "order_count", 3)}  # fmt: skip
    assert told_values(store, url, "shared") == {"u1": "true"}
    assert told_values(store, url, "shared", Kind.TRAIT) == {"u1": "3"}
    standin.clear()

    # The audience's exit does not touch the trait of the same id.
    upstream.remove("shared", "u1")
    assert run_sync(store, [url]).pairs
    assert identify_values(standin, "/wf", "big_spenders") == {"u1": False}
    assert told_values(store, url, "shared", Kind.TRAIT) == {"u1": "3"}


def test_the_guard_holds_a_run_that_would_null_most_values_until_approved(
    store: Store, upstream: Upstream, standin: TrayStandin
) -> None:
    upstream.add_trait(TRAIT, "Lifetime Value")
    users = [f"u{n:02d}" for n in range(30)]
    upstream.set_values(TRAIT, {user: str(n) for n, user in enumerate(users)})
    url = standin.url("/wf")
    assert run_sync(store, [url]).fully_delivered
    standin.clear()

    upstream.remove_values(TRAIT, *users[:20])  # two thirds: over the default half
    report = run_sync(store, [url])

    [pair] = report.pairs
    assert pair.state is PairState.HELD
    assert "20 of the 30 values the URL was told of would become null" in pair.note
    assert standin.received("/wf") == []
    assert store.holds.approve(Subject.trait(TRAIT), None, utcnow()) == 1
    assert run_sync(store, [url]).fully_delivered
    assert identify_values(standin, "/wf") == dict.fromkeys(users[:20])


def test_a_deleted_user_is_never_sent_a_trait_again(
    store: Store, upstream: Upstream, standin: TrayStandin, database_url: str
) -> None:
    upstream.add_trait(TRAIT, "Lifetime Value")
    upstream.set_values(TRAIT, {"u1": "1", "u2": "2"})
    url = standin.url("/wf")
    assert run_sync(store, [url]).fully_delivered
    standin.clear()

    engine = SyncEngine(make_settings(database_url, [url]), store)
    try:
        assert engine.delete_users(["u1"]).fully_delivered
    finally:
        engine.close()
    upstream.set_values(TRAIT, {"u1": "100", "u2": "200"})
    assert run_sync(store, [url]).fully_delivered
    messages = [r.message for r in standin.received("/wf")]
    assert [(m["type"], m["userId"]) for m in messages] == [("delete", "u1"), ("identify", "u2")]


def test_routing_sends_a_url_only_the_traits_its_patterns_name(
    store: Store, upstream: Upstream, standin: TrayStandin
) -> None:
    upstream.add_audience("aud_vip", "VIP")
    upstream.add("aud_vip", "u1")
    upstream.add_trait(TRAIT, "Lifetime Value")
    upstream.add_trait("tr_orders", "Order Count")
    upstream.set_values(TRAIT, {"u1": "5"})
    upstream.set_values("tr_orders", {"u1": "2"})
    traits_only = {"url": standin.url("/ltv"), "traits": ["lifetime_*"]}
    audiences_only = {"url": standin.url("/aud"), "audiences": ["*"]}
    everything = standin.url("/all")

    assert run_sync(store, [traits_only, audiences_only, everything]).fully_delivered

    def keys(path: str) -> set[str]:
        return {k for r in standin.received(path) for k in r.message["traits"]}

    assert keys("/ltv") == {KEY}
    assert keys("/aud") == {"vip"}
    assert keys("/all") == {KEY, "order_count", "vip"}


def test_sync_of_one_trait_by_key_and_a_full_resync(
    store: Store, upstream: Upstream, standin: TrayStandin
) -> None:
    upstream.add_trait(TRAIT, "Lifetime Value")
    upstream.add_trait("tr_orders", "Order Count")
    upstream.set_values(TRAIT, {"u1": "5", "u2": "null"})
    upstream.set_values("tr_orders", {"u1": "2"})
    url = standin.url("/wf")

    report = run_sync(store, [url], SyncOptions(audience=KEY))
    assert [pair.audience_id for pair in report.pairs] == [TRAIT]
    assert identify_values(standin, "/wf") == {"u1": 5}
    standin.clear()

    # --full sends the current values again (never the nulls of users who have none).
    assert run_sync(store, [url], SyncOptions(full=True)).fully_delivered
    assert sorted(
        (r.message["userId"], *r.message["traits"].items()) for r in standin.received("/wf")
    ) == [("u1", (KEY, 5)), ("u1", ("order_count", 2))]


@pytest.mark.parametrize("bad", ["not json", "{", "01"])
def test_a_value_that_is_not_json_is_reported_and_skipped(
    store: Store, upstream: Upstream, standin: TrayStandin, bad: str
) -> None:
    if store.engine.dialect.name != "sqlite":
        pytest.skip("PostgreSQL's json type refuses such a value on insert")
    upstream.add_trait(TRAIT, "Lifetime Value")
    upstream.set_values(TRAIT, {"u_bad": bad, "u_good": "1"})
    url = standin.url("/wf")

    report = run_sync(store, [url])

    [pair] = report.pairs
    assert (pair.invalid, pair.invalid_example) == (1, "'u_bad': value is not JSON")
    assert identify_values(standin, "/wf") == {"u_good": 1}
    standin.clear()
    # Fixed upstream: sent on the next run like any value.
    upstream.set_values(TRAIT, {"u_bad": "2"})
    assert run_sync(store, [url]).fully_delivered
    assert identify_values(standin, "/wf") == {"u_bad": 2}


def test_inspect_shows_traits_their_values_and_what_each_url_holds(
    store: Store, upstream: Upstream, standin: TrayStandin, database_url: str, tmp_path: Path
) -> None:
    upstream.add_trait(TRAIT, "Lifetime Value")
    upstream.add_trait("tr_orders", "Order Count")
    upstream.set_values(TRAIT, {"u1": "1250.50", "u2": '{"tier": "gold"}', "u3": "null"})
    upstream.set_values("tr_orders", {"u1": "3"})
    upstream.add_audience("aud_vip", "VIP")
    upstream.add("aud_vip", "u1")
    urls = [standin.url("/a"), {"url": standin.url("/b"), "traits": ["order_*"]}]
    settings = write_settings(tmp_path / "settings.toml", database_url, urls)
    assert cli("sync", settings=settings).returncode == 0
    upstream.set_values(TRAIT, {"u2": '{"tier": "platinum"}'})
    standin.respond("/a", Reply(status=400))
    assert cli("sync", settings=settings).returncode == 1

    traits = {
        r["id"]: r
        for r in json_out(cli("inspect", "traits", "--format", "json", settings=settings))
    }
    ltv = traits[TRAIT]
    assert (ltv["key"], ltv["values"], ltv["invalid_values"], ltv["defined_by"]) == (
        KEY,
        2,
        0,
        "table",
    )
    per_url = {entry["url"]: entry for entry in ltv["urls"]}
    assert (per_url[standin.url("/a")]["told_values"], per_url[standin.url("/a")]["rejected"]) == (
        2,
        1,
    )
    assert per_url[standin.url("/b")]["told_values"] == 0  # routed away: never told
    audiences = json_out(cli("inspect", "audiences", "--format", "json", settings=settings))
    assert [a["id"] for a in audiences] == ["aud_vip"]  # traits are not audiences

    user = json_out(cli("inspect", "user", "u1", "--format", "json", settings=settings))
    assert {t["key"]: t["value"] for t in user["traits"]} == {KEY: "1250.50", "order_count": "3"}
    told = {(t["url"], t["key"]): t["value"] for t in user["told"]}
    assert told[standin.url("/a"), KEY] == "1250.50"  # the text sent, digit for digit
    assert told[standin.url("/a"), "vip"] is True
    failures = json_out(cli("inspect", "failures", "--format", "json", settings=settings))
    assert [(f["kind"], f["user_id"], f["value"]) for f in failures] == [
        ("trait", "u2", '{"tier": "platinum"}')
    ]
    table = cli("inspect", "traits", settings=settings)
    assert (
        table.returncode == 0
        and "lifetime_value" in table.stdout
        and "PENDING NULL" in table.stdout
    )


def test_values_of_a_trait_that_does_not_exist_are_reported(
    store: Store, upstream: Upstream, standin: TrayStandin
) -> None:
    if store.engine.dialect.name != "sqlite":
        pytest.skip("PostgreSQL enforces the foreign key: such rows cannot exist")
    upstream.add_trait(TRAIT, "Lifetime Value")
    upstream.set_values(TRAIT, {"u1": "1"})
    upstream.set_values("tr_gone", {"u1": "2", "u2": "3"})

    report = run_sync(store, [standin.url("/wf")])

    reasons = {problem.subject: problem.reason for problem in report.problems}
    assert reasons == {
        Subject.trait("tr_gone"): "2 computed_trait_values row(s) name no existing trait"
    }
    assert identify_values(standin, "/wf") == {"u1": 1}


def test_an_id_shared_by_an_audience_and_a_trait_must_be_given_as_a_key(
    store: Store, upstream: Upstream, standin: TrayStandin
) -> None:
    upstream.add_audience("shared", "Big Spenders")
    upstream.add("shared", "u1")
    upstream.add_trait("shared", "Order Count")
    upstream.set_values("shared", {"u1": "3"})
    url = standin.url("/wf")

    with pytest.raises(ConfigError) as refused:
        run_sync(store, [url], SyncOptions(audience="shared"))
    assert str(refused.value) == (
        "--audience: 'shared' names audience 'shared' and trait 'shared': give its key instead"
    )
    with pytest.raises(ConfigError, match=r"^AUDIENCE: 'shared' names"):
        store.audiences.find("shared")
    assert store.audiences.find("order_count") == Subject.trait("shared")

    report = run_sync(store, [url], SyncOptions(audience="order_count"))
    assert [(pair.kind, pair.audience_id) for pair in report.pairs] == [(Kind.TRAIT, "shared")]
    assert identify_values(standin, "/wf", "order_count") == {"u1": 3}
