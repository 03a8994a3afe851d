"""The bodies sent to workflows: Segment-style ``identify``, ``track`` and ``delete`` messages.

Every body is rebuilt from stored fields only (change id, value, timestamp, ...), so a retry of
the same change sends the same bytes with the same messageId.
"""

from __future__ import annotations

import functools
import hashlib
import json
import re
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from json.encoder import encode_basestring
from typing import Any

MAX_USER_ID_LENGTH = 512
MAX_EMAIL_LENGTH = 512
# Control characters, and the lone surrogates that undecodable (non-UTF-8) bytes are read as.
_CONTROL_CHARACTERS = re.compile(r"[\x00-\x1f\x7f-\x9f\ud800-\udfff]")


def format_timestamp(moment: datetime) -> str:
    """ISO 8601 in UTC with milliseconds and a Z, as Segment writes it."""
    if moment.tzinfo is not None:
        moment = moment.astimezone(UTC).replace(tzinfo=None)
    m = moment  # formatted by hand: strftime costs several times more, on every request
    return (
        f"{m.year:04d}-{m.month:02d}-{m.day:02d}T{m.hour:02d}:{m.minute:02d}:{m.second:02d}."
        f"{m.microsecond // 1000:03d}Z"
    )


def message_id(namespace: uuid.UUID, change_id: int, kind: str = "change") -> str:
    """The messageId of one message: stable for its retries, never shared by another message.

    Ids are never reused within a database and ``kind`` keeps identify changes apart from
    deletes; the namespace is drawn at random when the database is created, so two
    installations do not produce the same ids either. It is ``uuid5(namespace, f"{kind}:{id}")``
    (the tests hold it to :func:`uuid.uuid5`), computed without building UUID objects.
    """
    digest = bytearray(hashlib.sha1(namespace.bytes + f"{kind}:{change_id}".encode()).digest())
    digest[6] = (digest[6] & 0x0F) | 0x50  # version 5
    digest[8] = (digest[8] & 0x3F) | 0x80  # RFC 4122 variant
    h = digest[:16].hex()
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


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
    """The Engage computation a trait comes from: an audience or a computed trait
    (``computation_class`` "audience" or "trait")."""

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
    # JSON text: an audience's "true" or "false"; a computed trait's value exactly as upstream
    # stored it (the planner queues only JSON), or "null" once it is gone.
    value: str
    created_at: datetime


def _encode_text(message: Any) -> str:
    return json.dumps(message, ensure_ascii=False, separators=(",", ":"))


def _encode(message: dict[str, Any]) -> bytes:
    return _encode_text(message).encode("utf-8")


def _string(text: str) -> str:
    # What json.dumps(text, ensure_ascii=False) returns, without its per-call set-up.
    return encode_basestring(text)


def _context(computation: Computation) -> dict[str, Any]:
    """The ``context`` of every call about one computation."""
    return {
        "personas": {
            "computation_class": computation.computation_class,
            "computation_id": computation.computation_id,
            "computation_key": computation.computation_key,
            "namespace": computation.space_id,
            "space_id": computation.space_id,
        }
    }


@functools.lru_cache(maxsize=1024)
def _personas(computation: Computation) -> str:
    return _encode_text(_context(computation))


def identify_body(computation: Computation, change: TraitChange, namespace: uuid.UUID) -> bytes:
    """The exact bytes of the identify call that tells a workflow about one change.

    Assembled from pre-encoded parts (the context is the same for every change of a
    computation): the same bytes as :func:`identify_message` encoded, which the tests hold it
    to, at a fraction of the cost on the delivery hot path; but where the message's value was
    parsed, the body carries the value's text as stored.
    """
    if computation.computation_key == "email":  # the trait and the email share one key
        return _encode(identify_message(computation, change, namespace))
    # The value goes out as the text it was stored as: 0.1 stays 0.1, 12345678901234567 exact,
    # nesting and key order kept.
    value = change.value
    parts = ['{"type":"identify","userId":', _string(change.user_id)]
    if change.anonymous_id:
        parts += [',"anonymousId":', _string(change.anonymous_id)]
    parts += [',"traits":{', _string(computation.computation_key), ":", value]
    if change.email:
        parts += [',"email":', _string(change.email)]
    parts += [
        '},"context":',
        _personas(computation),
        ',"messageId":"',
        message_id(namespace, change.change_id),
        '","timestamp":"',
        format_timestamp(change.created_at),
        '"}',
    ]
    return "".join(parts).encode("utf-8")


def identify_message(
    computation: Computation, change: TraitChange, namespace: uuid.UUID
) -> dict[str, Any]:
    """The identify call that tells a workflow about one change, as a JSON object."""
    traits: dict[str, Any] = {computation.computation_key: json.loads(change.value)}
    if change.email:  # a null or empty email is not a trait worth sending
        traits["email"] = change.email
    message: dict[str, Any] = {"type": "identify", "userId": change.user_id}
    if change.anonymous_id:
        message["anonymousId"] = change.anonymous_id
    message["traits"] = traits
    message["context"] = _context(computation)
    message["messageId"] = message_id(namespace, change.change_id)
    message["timestamp"] = format_timestamp(change.created_at)
    return message


# The event a track call names, by computation class and value (an audience's value is
# true on entry, false on exit; a computed trait's is its value).
AUDIENCE_ENTERED, AUDIENCE_EXITED, TRAIT_COMPUTED = (
    "Audience Entered",
    "Audience Exited",
    "Trait Computed",
)


def _track_event(computation: Computation, value: str) -> tuple[str, str]:
    """The event name and the property naming the key, as Engage's track mode has them."""
    if computation.computation_class == "audience":
        return (AUDIENCE_ENTERED if value == "true" else AUDIENCE_EXITED), "audience_key"
    return TRAIT_COMPUTED, "trait_key"


def track_message(
    computation: Computation,
    change: TraitChange,
    namespace: uuid.UUID,
    message_kind: str = "change",
) -> dict[str, Any]:
    """The track call that tells a workflow about one change, as a JSON object.

    ``properties`` names the key and carries the value; the email is not a property but
    ``context.traits.email``; ``anonymousId`` stays at the top level. The messageId is the
    change's (kind ``change``) when the track call is the change's only call; the second call
    of a change sent both ways takes kind ``track``, so that the two differ.
    """
    event, key_property = _track_event(computation, change.value)
    key = computation.computation_key
    message: dict[str, Any] = {"type": "track", "event": event, "userId": change.user_id}
    if change.anonymous_id:
        message["anonymousId"] = change.anonymous_id
    message["properties"] = {key_property: key, key: json.loads(change.value)}
    context = _context(computation)
    if change.email:
        context = {"traits": {"email": change.email}, **context}
    message["context"] = context
    message["messageId"] = message_id(namespace, change.change_id, message_kind)
    message["timestamp"] = format_timestamp(change.created_at)
    return message


@functools.lru_cache(maxsize=1024)
def _personas_only(computation: Computation) -> str:
    # The context's "personas" member, without its braces, to follow "traits" in one object.
    return _personas(computation)[1:-1]


def track_body(
    computation: Computation,
    change: TraitChange,
    namespace: uuid.UUID,
    message_kind: str = "change",
) -> bytes:
    """The exact bytes of :func:`track_message`, assembled from pre-encoded parts as
    :func:`identify_body` is (the tests hold the two to each other)."""
    event, key_property = _track_event(computation, change.value)
    key = computation.computation_key
    if key == key_property:  # the key and the property naming it share one name
        return _encode(track_message(computation, change, namespace, message_kind))
    value = change.value  # as stored, as in identify_body
    parts = ['{"type":"track","event":', _string(event), ',"userId":', _string(change.user_id)]
    if change.anonymous_id:
        parts += [',"anonymousId":', _string(change.anonymous_id)]
    parts += [',"properties":{', _string(key_property), ":", _string(key), ","]
    parts += [_string(key), ":", value, '},"context":']
    if change.email:
        parts += ['{"traits":{"email":', _string(change.email), "},", _personas_only(computation)]
        parts.append("}")
    else:
        parts.append(_personas(computation))
    parts += [
        ',"messageId":"',
        message_id(namespace, change.change_id, message_kind),
        '","timestamp":"',
        format_timestamp(change.created_at),
        '"}',
    ]
    return "".join(parts).encode("utf-8")


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
