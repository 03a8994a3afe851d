"""Diff semantics: what each workflow URL must be told so that it matches the current state.

Values are canonical JSON texts (``"true"``, ``"false"``; later any trait value), so the same
rules serve audiences and computed traits. The store implements these rules in set-based SQL;
the functions here are their specification, which the tests hold the SQL to.

The rules are about what a URL **may have processed**, not only what it acknowledged: a request
that timed out, lost its connection or got a 5xx may still have been processed, and so may one
that was handed to a sender whose answer was never recorded. While that is possible, the URL's
value is uncertain, and a queued change is never dropped as a "net no-op": the current value is
sent instead (a new change, with a newer timestamp, so the receiver can tell which came last).
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

TRUE = "true"
FALSE = "false"
NULL_VALUE = "null"  # a computed trait's value once its row is gone or holds null


class Presence(enum.Enum):
    """How a user stands in the audience now, as the planner sees it."""

    MEMBER = "member"  # a valid membership row
    INVALID = "invalid"  # a membership row that cannot be sent (reported; left alone)
    ABSENT = "absent"  # no membership row
    SUPPRESSED = "suppressed"  # deleted for privacy: nothing is ever sent about them


@dataclass(frozen=True)
class Told:
    """What one URL may believe about one user: the last accepted value, and whether another
    value may have been processed since (an attempt whose outcome is unknown)."""

    value: str | None = None
    unsure: bool = False


@dataclass(frozen=True)
class Queued:
    """A change in the outbox: its value, whether it was ever handed to a sender (and so may
    have been processed), and whether ``sync --full`` queued it."""

    value: str
    attempted: bool = False
    forced: bool = False
    # Of a member: it names them by an email or anonymousId other than their row's now (set
    # only with `resend_on_identity_change`).
    stale_identity: bool = False


def wanted_value(
    presence: Presence, told: Told, *, current: str = TRUE, absent_value: str = FALSE
) -> str | None:
    """The value the URL must end up with, or None when it needs to hear nothing.

    ``current`` is a member's value now (``true`` for audiences).
    """
    if presence is Presence.MEMBER:
        return current
    if presence is Presence.ABSENT and (told.unsure or told.value not in (None, absent_value)):
        return absent_value
    return None


@dataclass(frozen=True)
class UserPlan:
    """What the planner does for one user of one (URL, audience)."""

    keep: bool = False  # the queued change stays, with its id and so its messageId
    add: str | None = None  # a new change with this value (and a new messageId)
    mark_unsure: bool = False  # a possibly processed change is dropped: remember the doubt


def plan_user(
    presence: Presence,
    told: Told,
    queued: Queued | None,
    *,
    current: str = TRUE,
    full: bool = False,
    absent_value: str = FALSE,
    identity_changed: bool = False,
) -> UserPlan:
    """Plan one user: keep, replace, drop or add their queued change.

    A user who is invalid is left exactly as they are (nothing added, nothing dropped). A
    suppressed user's queued change is dropped and nothing is added. Otherwise the URL is sent
    the wanted value when it is not certainly what the URL holds (or ``full`` re-sends a
    member); a queued change with that value is kept, any other is replaced.

    ``identity_changed`` (given only with `resend_on_identity_change`): the member's email or
    anonymousId is not the one the URL was last told with, so their value is sent again; and a
    queued change naming them the old way (``Queued.stale_identity``) is replaced.
    """
    if presence is Presence.INVALID:
        return UserPlan(keep=queued is not None)
    uncertain = told.unsure or (queued is not None and queued.attempted)
    wanted = None
    if presence is not Presence.SUPPRESSED:
        wanted = wanted_value(
            presence, Told(told.value, uncertain), current=current, absent_value=absent_value
        )
    # A forced change replaced for its stale identity is not forced again: the new one is
    # needed only if the URL does not certainly hold the value under the identity it has now.
    forced = full or (queued is not None and queued.forced and not queued.stale_identity)
    needed = wanted is not None and (
        uncertain
        or told.value != wanted
        or (presence is Presence.MEMBER and (forced or identity_changed))
    )
    if queued is not None and needed and queued.value == wanted and not queued.stale_identity:
        return UserPlan(keep=True)
    mark = queued is not None and queued.attempted and presence is not Presence.SUPPRESSED
    return UserPlan(add=wanted if needed else None, mark_unsure=mark)


def desired_changes(
    current: Mapping[str, str],
    delivered: Mapping[str, str],
    *,
    absent_value: str = FALSE,
    full: bool = False,
) -> dict[str, str]:
    """User -> value for every user the URL must be told, when every value is certain.

    ``current`` holds each present user's value now, ``delivered`` the value the URL last
    accepted. A user missing from ``current`` has ``absent_value``; one the URL never heard of
    and who is absent needs no message. ``full`` re-sends every present user's value.
    """
    changes: dict[str, str] = {}
    for user in set(current) | set(delivered):
        presence = Presence.MEMBER if user in current else Presence.ABSENT
        told = Told(delivered.get(user))
        plan = plan_user(
            presence,
            told,
            None,
            current=current.get(user, TRUE),
            full=full,
            absent_value=absent_value,
        )
        if plan.add is not None:
            changes[user] = plan.add
    return changes


def apply_received(state: dict[str, str], received: Iterable[tuple[str, str]]) -> dict[str, str]:
    """Replay (user, value) messages in order onto a receiver's view of the world.

    This is how a workflow would build its replica from what it processed (ordered by each
    message's timestamp); the tests use it to check that every URL's replica equals the current
    membership after every healthy sync.
    """
    for user, value in received:
        state[user] = value
    return state
