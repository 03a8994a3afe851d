"""Diff semantics: what each workflow URL must be told so that it matches the current state.

Values are canonical JSON texts (``"true"``, ``"false"``; later any trait value), so the same
rules serve audiences and computed traits. The store implements these rules in set-based SQL;
the functions here are their specification, which the tests hold the SQL to.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

TRUE = "true"
FALSE = "false"


def desired_changes(
    current: Mapping[str, str],
    delivered: Mapping[str, str],
    *,
    absent_value: str = FALSE,
    full: bool = False,
) -> dict[str, str]:
    """Return user -> value for every user whose value the URL must be told.

    ``current`` holds each present user's value now, ``delivered`` the value the URL last accepted.
    A user missing from ``current`` has ``absent_value`` (for audiences: not a member, so false); a
    user the URL never heard of and who is absent needs no message. ``full`` re-sends every present
    user's value whatever was delivered, as an initial full sync does.
    """
    changes: dict[str, str] = {}
    for user, value in current.items():
        if full or delivered.get(user) != value:
            changes[user] = value
    for user, value in delivered.items():
        if user not in current and value != absent_value:
            changes[user] = absent_value
    return changes


@dataclass(frozen=True)
class OutboxPlan:
    """How to bring the outbox of one (URL, audience) in line with the desired changes."""

    keep: dict[str, str]
    drop: set[str]
    add: dict[str, str]


def reconcile_outbox(outbox: Mapping[str, str], desired: Mapping[str, str]) -> OutboxPlan:
    """Plan the outbox so that it holds exactly the desired changes.

    A queued change whose value is still wanted is kept, so a retry carries its original
    messageId. A queued change no longer wanted (the user came back before it was delivered) or
    wanting another value is dropped; a new value is a new change and gets a new messageId.
    """
    keep = {user: value for user, value in outbox.items() if desired.get(user) == value}
    drop = {user for user in outbox if user not in keep}
    add = {user: value for user, value in desired.items() if user not in keep}
    return OutboxPlan(keep=keep, drop=drop, add=add)


def apply_received(state: dict[str, str], received: Iterable[tuple[str, str]]) -> dict[str, str]:
    """Replay (user, value) messages in order onto a receiver's view of the world.

    This is how a workflow would build its replica from what it was sent; the tests use it to
    check that every URL's replica equals the current membership after every sync.
    """
    for user, value in received:
        state[user] = value
    return state
