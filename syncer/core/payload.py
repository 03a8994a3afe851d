"""The bodies sent to workflows: Segment-style ``identify`` and ``delete`` messages.

Every body is rebuilt from stored fields only (change id, value, timestamp, ...), so a retry of
the same change sends the same bytes with the same messageId.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

MAX_USER_ID_LENGTH = 512
MAX_EMAIL_LENGTH = 512
# Control characters, and the lone surrogates that undecodable (non-UTF-8) bytes are read as.
_CONTROL_CHARACTERS = re.compile(r"[\x00-\x1f\x7f-\x9f\ud800-\udfff]")


def format_timestamp(moment: datetime) -> str:
    """ISO 8601 in UTC with milliseconds and a Z, as Segment writes it."""
    if moment.tzinfo is not None:
        moment = moment.astimezone(UTC).replace(tzinfo=None)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z"


def message_id(namespace: uuid.UUID, change_id: int, kind: str = "change") -> str:
    """The messageId of one message: stable for its retries, never shared by another message.

    Ids are never reused within a database and ``kind`` keeps identify changes apart from
    deletes; the namespace is drawn at random when the database is created, so two
    installations do not produce the same ids either.
    """
    return str(uuid.uuid5(namespace, f"{kind}:{change_id}"))


def user_input_problem(user_id: str, anonymous_id: str | None, email: str | None) -> str | None:
    """Why a membership row cannot be sent as it stands, or None when it can.

    The store applies the same rules in SQL when it plans (and the tests hold the two to each
    other): a row that cannot be sent is never queued, and is planned like any other once
    upstream fixes it.
    """
    if not user_id.strip(" "):
        return "user_id is empty"
    if len(user_id) > MAX_USER_ID_LENGTH:
        return f"user_id is longer than {MAX_USER_ID_LENGTH} characters"
    if _CONTROL_CHARACTERS.search(user_id):
        return "user_id contains control characters or is not valid UTF-8"
    if anonymous_id is not None and (
        len(anonymous_id) > MAX_USER_ID_LENGTH or _CONTROL_CHARACTERS.search(anonymous_id)
    ):
        return "anonymous_id is over-long, contains control characters or is not valid UTF-8"
    if email is not None and (len(email) > MAX_EMAIL_LENGTH or _CONTROL_CHARACTERS.search(email)):
        return "email is over-long, contains control characters or is not valid UTF-8"
    return None


@dataclass(frozen=True)
class Computation:
    """The Engage computation a trait comes from: an audience (later, a computed trait)."""

    computation_class: str
    computation_id: str
    computation_key: str
    space_id: str


@dataclass(frozen=True)
class TraitChange:
    """One user's new value for one computation, as queued for one workflow URL."""

    change_id: int
    user_id: str
    anonymous_id: str | None
    email: str | None
    value: str  # canonical JSON text
    created_at: datetime


def _encode(message: dict[str, Any]) -> bytes:
    return json.dumps(message, ensure_ascii=False, separators=(",", ":")).encode("utf-8")


def identify_body(computation: Computation, change: TraitChange, namespace: uuid.UUID) -> bytes:
    """The exact bytes of the identify call that tells a workflow about one change."""
    traits: dict[str, Any] = {computation.computation_key: json.loads(change.value)}
    if change.email:  # a null or empty email is not a trait worth sending
        traits["email"] = change.email
    message: dict[str, Any] = {"type": "identify", "userId": change.user_id}
    if change.anonymous_id:
        message["anonymousId"] = change.anonymous_id
    message["traits"] = traits
    message["context"] = {
        "personas": {
            "computation_class": computation.computation_class,
            "computation_id": computation.computation_id,
            "computation_key": computation.computation_key,
            "namespace": computation.space_id,
            "space_id": computation.space_id,
        }
    }
    message["messageId"] = message_id(namespace, change.change_id)
    message["timestamp"] = format_timestamp(change.created_at)
    return _encode(message)


def delete_body(user_id: str, change_id: int, created_at: datetime, namespace: uuid.UUID) -> bytes:
    """The exact bytes of the privacy deletion forwarded to a workflow."""
    return _encode(
        {
            "type": "delete",
            "userId": user_id,
            "timestamp": format_timestamp(created_at),
            "messageId": message_id(namespace, change_id, "delete"),
        }
    )
