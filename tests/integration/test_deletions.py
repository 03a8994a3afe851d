"""``syncer delete-user``: privacy deletes forwarded, signed, to every URL, and never forgotten.

Real subprocesses, a real database and the local stand-in: the delete message itself, the
suppression of deleted users in every later sync, a URL that is down getting its delete later
with the same messageId, and deleting twice.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from syncer.testing.tray_standin import Received, Reply, TrayStandin
from tests.conftest import Upstream
from tests.integration.cli_helpers import cli, json_out, show, sync_in_process, write_settings

TIMESTAMP = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")


def deletes(standin: TrayStandin, path: str) -> list[Received]:
    return [r for r in standin.received(path) if r.message["type"] == "delete"]


def about(standin: TrayStandin, user_id: str) -> list[dict[str, Any]]:
    """Every message received, at any URL, that names ``user_id``."""
    return [r.message for r in standin.received() if r.message.get("userId") == user_id]


def identify_users(standin: TrayStandin, path: str) -> list[tuple[str, bool]]:
    found = []
    for received in standin.received(path):
        message = received.message
        if message["type"] == "identify":
            key = message["context"]["personas"]["computation_key"]
            found.append((message["userId"], message["traits"][key]))
    return sorted(found)


def test_delete_user_sends_signed_deletes_and_the_users_are_never_mentioned_again(
    database_url: str, upstream: Upstream, standin: TrayStandin, tmp_path: Path
) -> None:
    upstream.add_audience("aud_1", "Buyers")
    upstream.add_audience("aud_2", "Newsletter")
    upstream.add("aud_1", "u1", "u2", "u3")
    upstream.add("aud_2", "u1")
    urls = [standin.url("/a"), standin.url("/b")]
    settings = write_settings(tmp_path / "settings.toml", database_url, urls)
    assert sync_in_process(database_url, urls).fully_delivered
    assert len(standin.received("/a")) == len(standin.received("/b")) == 4
    standin.clear()

    deleted = cli("delete-user", "u1", "u2", settings=settings)

    assert deleted.returncode == 0, show(deleted)
    delete_ids: dict[tuple[str, str], str] = {}
    for path in ("/a", "/b"):
        received = deletes(standin, path)
        assert sorted(r.message["userId"] for r in received) == ["u1", "u2"]
        assert len(standin.received(path)) == 2  # nothing but the deletes
        for item in received:
            assert item.signature_ok is True
            assert item.headers["Content-Type"] == "application/json"
            assert set(item.message) == {"type", "userId", "timestamp", "messageId"}
            assert TIMESTAMP.match(item.message["timestamp"]), item.message
            delete_ids[(path, item.message["userId"])] = item.message["messageId"]
    assert len(set(delete_ids.values())) == 4  # one distinct delete per user and URL

    # Upstream still lists u2 (and u1 in aud_2) while u1 leaves aud_1; u3 leaves and u4
    # arrives, so exits and entries are really being sent.
    standin.clear()
    upstream.remove("aud_1", "u1", "u3")
    upstream.add("aud_1", "u4")
    after = cli("sync", settings=settings)
    assert after.returncode == 0, show(after)
    for path in ("/a", "/b"):
        assert identify_users(standin, path) == [("u3", False), ("u4", True)]
    assert about(standin, "u1") == [] and about(standin, "u2") == []

    # ... then comes back, to an old audience and a new one.
    standin.clear()
    upstream.add("aud_1", "u1")
    upstream.add_audience("aud_3", "Returning")
    upstream.add("aud_3", "u1", "u5")
    back = cli("sync", settings=settings)
    assert back.returncode == 0, show(back)
    assert identify_users(standin, "/a") == [("u5", True)]
    assert identify_users(standin, "/b") == [("u5", True)]
    assert about(standin, "u1") == [] and about(standin, "u2") == []

    record = json_out(cli("inspect", "user", "u1", "--format", "json", settings=settings))

    assert record["deleted"] is True and record["deletion_requested_at"]
    assert record["told"] == [] and record["pending"] == []
    deliveries = {d["url"]: d for d in record["deletion_deliveries"]}
    assert set(deliveries) == set(urls)
    for path, url in zip(("/a", "/b"), urls, strict=True):
        assert deliveries[url]["delivered_at"] is not None
        assert deliveries[url]["attempts"] == 1
        assert deliveries[url]["message_id"] == delete_ids[(path, "u1")]


def test_a_url_that_is_down_gets_the_delete_later_and_nobody_gets_it_twice(
    database_url: str, upstream: Upstream, standin: TrayStandin, tmp_path: Path
) -> None:
    upstream.add_audience("aud_1", "Buyers")
    upstream.add("aud_1", "u1", "u2")
    standin.respond("/down", Reply(status=503, body=b'{"error":"maintenance"}'))
    urls = [standin.url("/up"), standin.url("/down")]
    settings = write_settings(tmp_path / "settings.toml", database_url, urls)

    first = cli("delete-user", "u1", settings=settings)

    assert first.returncode == 1, show(first)
    assert "pending" in first.stdout, show(first)
    (accepted,) = deletes(standin, "/up")
    refused = deletes(standin, "/down")
    assert len(refused) >= 1 and all(r.status == 503 for r in refused)
    owed = {r.message["messageId"] for r in refused}
    assert len(owed) == 1  # retries of one delete keep its messageId
    assert owed != {accepted.message["messageId"]}
    record = json_out(cli("inspect", "user", "u1", "--format", "json", settings=settings))
    deliveries = {d["url"]: d for d in record["deletion_deliveries"]}
    assert deliveries[urls[0]]["delivered_at"] is not None
    assert deliveries[urls[1]]["delivered_at"] is None
    assert deliveries[urls[1]]["last_status"] == 503
    assert deliveries[urls[1]]["attempts"] == len(refused)
    assert {deliveries[urls[1]]["message_id"]} == owed

    # Deleting again while /down is still down: /up, which accepted, gets nothing more.
    again = cli("delete-user", "u1", settings=settings)

    assert again.returncode == 1, show(again)
    assert len(deletes(standin, "/up")) == 1
    assert {r.message["messageId"] for r in deletes(standin, "/down")} == owed

    # /down recovers: the next sync delivers the owed delete, same messageId, and still says
    # nothing about u1 while telling both URLs about u2.
    standin.respond("/down", Reply())
    synced = cli("sync", settings=settings)

    assert synced.returncode == 0, show(synced)
    delivered = [r for r in deletes(standin, "/down") if r.status == 200]
    assert [r.message["messageId"] for r in delivered] == list(owed)
    assert delivered[0].signature_ok is True
    assert len(deletes(standin, "/up")) == 1
    assert identify_users(standin, "/up") == identify_users(standin, "/down") == [("u2", True)]

    # Every URL has accepted: deleting once more sends nothing at all.
    before = len(standin.received())
    last = cli("delete-user", "u1", settings=settings)

    assert last.returncode == 0, show(last)
    assert len(standin.received()) == before
