"""`[engage] resend_on_identity_change`: a member whose email or anonymous_id changes upstream is
sent their identify again, under the new identity; off (the default), nothing is sent for it.

Real syncs to the local stand-in, on SQLite and PostgreSQL; the identity is changed the way an
upstream job would, by updating the membership row.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import update

from syncer.store import Store
from syncer.store.schema import audience_memberships
from syncer.testing.tray_standin import Reply, TrayStandin
from tests.conftest import Upstream, run_sync

AUDIENCE, KEY = "aud_1", "buyers"
PATH = "/wf"
RESEND = {"resend_on_identity_change": True}


def set_identity(
    upstream: Upstream, user_id: str, *, email: str | None, anonymous_id: str | None
) -> None:
    with upstream.engine.begin() as connection:
        connection.execute(
            update(audience_memberships)
            .where(
                audience_memberships.c.audience_id == AUDIENCE,
                audience_memberships.c.user_id == user_id,
            )
            .values(email=email, anonymous_id=anonymous_id)
        )


def identifies(standin: TrayStandin) -> list[dict[str, Any]]:
    """The identify calls received, oldest first."""
    return [r.message for r in standin.received(PATH) if r.message["type"] == "identify"]


def test_changed_identity_is_sent_again_only_when_asked(
    store: Store, upstream: Upstream, standin: TrayStandin
) -> None:
    upstream.add_audience(AUDIENCE, "Buyers")
    upstream.add(AUDIENCE, "u1", email="old@example.com", anonymous_id="anon-old")
    upstream.add(AUDIENCE, "u2", email="same@example.com")
    url = standin.url(PATH)
    assert run_sync(store, [url], engage=RESEND).fully_delivered
    first = {m["userId"]: m for m in identifies(standin)}
    assert set(first) == {"u1", "u2"}
    standin.clear()

    # Off: the URL keeps the identity it was told.
    set_identity(upstream, "u1", email="new@example.com", anonymous_id="anon-old")
    assert run_sync(store, [url]).fully_delivered
    assert identifies(standin) == []

    # On: u1 is sent again, under the new email, with a new messageId; u2 is not.
    report = run_sync(store, [url], engage=RESEND)
    assert report.fully_delivered
    (again,) = identifies(standin)
    assert again["userId"] == "u1"
    assert again["traits"] == {KEY: True, "email": "new@example.com"}
    assert again["anonymousId"] == "anon-old"
    assert again["messageId"] != first["u1"]["messageId"]
    assert again["timestamp"] > first["u1"]["timestamp"]
    standin.clear()

    # Told the new identity: nothing more to send.
    assert run_sync(store, [url], engage=RESEND).fully_delivered
    assert identifies(standin) == []

    # The anonymous_id counts too; an empty string is the same as none.
    set_identity(upstream, "u1", email="new@example.com", anonymous_id="anon-new")
    set_identity(upstream, "u2", email="same@example.com", anonymous_id="")
    assert run_sync(store, [url], engage=RESEND).fully_delivered
    (anonymous,) = identifies(standin)
    assert (anonymous["userId"], anonymous["anonymousId"]) == ("u1", "anon-new")


def test_a_queued_change_under_an_old_identity_is_replaced_not_sent(
    store: Store, upstream: Upstream, standin: TrayStandin
) -> None:
    upstream.add_audience(AUDIENCE, "Buyers")
    upstream.add(AUDIENCE, "u1", email="first@example.com")
    url = standin.url(PATH)
    assert run_sync(store, [url], engage=RESEND).fully_delivered
    standin.clear()

    # The URL is down while u1's new email is sent: the change stays queued (and may have been
    # processed: its answer was a 503).
    set_identity(upstream, "u1", email="second@example.com", anonymous_id=None)
    standin.respond(PATH, Reply(status=503))
    assert not run_sync(store, [url], engage=RESEND, max_attempts=1).fully_delivered
    assert [m["traits"]["email"] for m in identifies(standin)] == ["second@example.com"]
    standin.clear()

    # The email changes again before the URL is back: the queued change naming u1 by the
    # second email is replaced by one naming them by the third; the second is not sent again.
    set_identity(upstream, "u1", email="third@example.com", anonymous_id=None)
    standin.respond(PATH, Reply())
    assert run_sync(store, [url], engage=RESEND).fully_delivered
    (sent,) = identifies(standin)
    assert sent["traits"] == {KEY: True, "email": "third@example.com"}
    standin.clear()
    assert run_sync(store, [url], engage=RESEND).fully_delivered
    assert identifies(standin) == []
