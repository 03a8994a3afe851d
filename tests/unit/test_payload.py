"""The identify, track and delete bodies sent to workflows, and which user rows can be sent."""

from __future__ import annotations

import json
import uuid
from datetime import UTC, datetime, timedelta, timezone
from decimal import Decimal
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from syncer.core.payload import (
    Computation,
    TraitChange,
    delete_body,
    format_timestamp,
    identify_body,
    identify_message,
    message_id,
    track_body,
    track_message,
    user_input_problem,
)

NAMESPACE = uuid.UUID("12345678-1234-5678-1234-567812345678")
OTHER_NAMESPACE = uuid.UUID("87654321-4321-8765-4321-876543218765")
# uuid5(NAMESPACE, "change:42"), computed once: retries after an upgrade must keep their ids.
MESSAGE_ID_42 = "cb0ff351-a83f-5b10-92a2-1e5718553630"
CREATED = datetime(2026, 11, 28, 12, 0, 0, 123456)

COMPUTATION = Computation(
    computation_class="audience",
    computation_id="aud_1",
    computation_key="high_value_customers",
    space_id="spa_test",
)

PERSONAS = {
    "computation_class": "audience",
    "computation_id": "aud_1",
    "computation_key": "high_value_customers",
    "namespace": "spa_test",
    "space_id": "spa_test",
}


def change(
    *,
    change_id: int = 42,
    anonymous_id: str | None = None,
    email: str | None = None,
    value: str = "true",
    created_at: datetime = CREATED,
) -> TraitChange:
    return TraitChange(
        change_id=change_id,
        user_id="user-1",
        anonymous_id=anonymous_id,
        email=email,
        value=value,
        created_at=created_at,
    )


@pytest.mark.parametrize(
    ("the_change", "expected"),
    [
        pytest.param(
            change(),
            {
                "type": "identify",
                "userId": "user-1",
                "traits": {"high_value_customers": True},
                "context": {"personas": PERSONAS},
                "messageId": MESSAGE_ID_42,
                "timestamp": "2026-11-28T12:00:00.123Z",
            },
            id="bare",
        ),
        pytest.param(
            change(anonymous_id="anon-9", email="ana@example.com"),
            {
                "type": "identify",
                "userId": "user-1",
                "anonymousId": "anon-9",
                "traits": {"high_value_customers": True, "email": "ana@example.com"},
                "context": {"personas": PERSONAS},
                "messageId": MESSAGE_ID_42,
                "timestamp": "2026-11-28T12:00:00.123Z",
            },
            id="with-anonymous-id-and-email",
        ),
        pytest.param(
            change(email="ana@example.com"),
            {
                "type": "identify",
                "userId": "user-1",
                "traits": {"high_value_customers": True, "email": "ana@example.com"},
                "context": {"personas": PERSONAS},
                "messageId": MESSAGE_ID_42,
                "timestamp": "2026-11-28T12:00:00.123Z",
            },
            id="email-only",
        ),
        pytest.param(
            change(value="false"),
            {
                "type": "identify",
                "userId": "user-1",
                "traits": {"high_value_customers": False},
                "context": {"personas": PERSONAS},
                "messageId": MESSAGE_ID_42,
                "timestamp": "2026-11-28T12:00:00.123Z",
            },
            id="exit-false",
        ),
    ],
)
def test_identify_body(the_change: TraitChange, expected: dict[str, object]) -> None:
    body = identify_body(COMPUTATION, the_change, NAMESPACE)
    assert json.loads(body) == expected


TRAIT = Computation("trait", "tr_1", "total_revenue_180_days", "spa_test")
TRAIT_PERSONAS = {**PERSONAS, "computation_class": "trait", "computation_id": "tr_1",
                  "computation_key": "total_revenue_180_days"}  # fmt: skip
SECOND_CALL_ID_42 = message_id(NAMESPACE, 42, "track")


@pytest.mark.parametrize(
    ("computation", "the_change", "expected"),
    [
        pytest.param(
            COMPUTATION,
            change(anonymous_id="anon-1", email="ana@example.com"),
            {
                "type": "track",
                "event": "Audience Entered",
                "userId": "user-1",
                "anonymousId": "anon-1",
                "properties": {
                    "audience_key": "high_value_customers",
                    "high_value_customers": True,
                },
                "context": {"traits": {"email": "ana@example.com"}, "personas": PERSONAS},
                "messageId": MESSAGE_ID_42,
                "timestamp": "2026-11-28T12:00:00.123Z",
            },
            id="entered-with-email-and-anonymous-id",
        ),
        pytest.param(
            COMPUTATION,
            change(value="false"),
            {
                "type": "track",
                "event": "Audience Exited",
                "userId": "user-1",
                "properties": {
                    "audience_key": "high_value_customers",
                    "high_value_customers": False,
                },
                "context": {"personas": PERSONAS},
                "messageId": MESSAGE_ID_42,
                "timestamp": "2026-11-28T12:00:00.123Z",
            },
            id="exited",
        ),
        pytest.param(
            TRAIT,
            change(value='{"usd": 450, "since": "2026-06-01"}', email="ana@example.com"),
            {
                "type": "track",
                "event": "Trait Computed",
                "userId": "user-1",
                "properties": {
                    "trait_key": "total_revenue_180_days",
                    "total_revenue_180_days": {"usd": 450, "since": "2026-06-01"},
                },
                "context": {"traits": {"email": "ana@example.com"}, "personas": TRAIT_PERSONAS},
                "messageId": MESSAGE_ID_42,
                "timestamp": "2026-11-28T12:00:00.123Z",
            },
            id="trait-computed",
        ),
        pytest.param(
            TRAIT,
            change(value="null"),
            {
                "type": "track",
                "event": "Trait Computed",
                "userId": "user-1",
                "properties": {
                    "trait_key": "total_revenue_180_days",
                    "total_revenue_180_days": None,
                },
                "context": {"personas": TRAIT_PERSONAS},
                "messageId": MESSAGE_ID_42,
                "timestamp": "2026-11-28T12:00:00.123Z",
            },
            id="trait-gone-null",
        ),
    ],
)
def test_track_body(
    computation: Computation, the_change: TraitChange, expected: dict[str, object]
) -> None:
    assert json.loads(track_body(computation, the_change, NAMESPACE)) == expected


def test_a_track_call_as_a_second_call_has_a_message_id_of_its_own() -> None:
    the_change = change()
    identify = json.loads(identify_body(COMPUTATION, the_change, NAMESPACE))
    only_call = json.loads(track_body(COMPUTATION, the_change, NAMESPACE))
    second_call = json.loads(track_body(COMPUTATION, the_change, NAMESPACE, "track"))
    assert identify["messageId"] == only_call["messageId"] == MESSAGE_ID_42
    assert second_call["messageId"] == SECOND_CALL_ID_42 != MESSAGE_ID_42


def test_identify_body_is_compact_utf8() -> None:
    body = identify_body(COMPUTATION, change(email="jürgen@example.com"), NAMESPACE)
    assert "jürgen@example.com".encode() in body
    assert b": " not in body
    assert b", " not in body


def test_identify_body_same_bytes_on_retry() -> None:
    first = identify_body(COMPUTATION, change(email="a@example.com"), NAMESPACE)
    retry = identify_body(COMPUTATION, change(email="a@example.com"), NAMESPACE)
    assert first == retry


def _message_id(change_id: int, namespace: uuid.UUID) -> str:
    body = identify_body(COMPUTATION, change(change_id=change_id), namespace)
    return str(json.loads(body)["messageId"])


def test_message_id_pinned_vector() -> None:
    assert message_id(NAMESPACE, 42) == MESSAGE_ID_42
    assert uuid.UUID(MESSAGE_ID_42).version == 5


def test_message_id_stable_for_same_change_and_namespace() -> None:
    assert _message_id(7, NAMESPACE) == _message_id(7, NAMESPACE)
    assert message_id(NAMESPACE, 7) == _message_id(7, NAMESPACE)


@pytest.mark.parametrize(
    ("left", "right"),
    [
        ((1, NAMESPACE), (2, NAMESPACE)),
        ((42, NAMESPACE), (43, NAMESPACE)),
        ((1, NAMESPACE), (10, NAMESPACE)),
        ((1, NAMESPACE), (1, OTHER_NAMESPACE)),
        ((42, NAMESPACE), (42, OTHER_NAMESPACE)),
    ],
)
def test_message_id_differs(left: tuple[int, uuid.UUID], right: tuple[int, uuid.UUID]) -> None:
    assert _message_id(*left) != _message_id(*right)


def test_message_ids_unique_over_many_changes() -> None:
    ids = {message_id(NAMESPACE, change_id) for change_id in range(1, 2001)}
    assert len(ids) == 2000


@pytest.mark.parametrize(
    ("moment", "expected"),
    [
        (datetime(2026, 11, 28, 12, 0, 0), "2026-11-28T12:00:00.000Z"),
        (datetime(2026, 11, 28, 12, 0, 0, 999999), "2026-11-28T12:00:00.999Z"),  # truncated
        (datetime(2026, 11, 28, 12, 0, 0, 1999), "2026-11-28T12:00:00.001Z"),
        (datetime(2026, 11, 28, 12, 0, 0, 999), "2026-11-28T12:00:00.000Z"),
        (datetime(2026, 1, 2, 3, 4, 5, 60000), "2026-01-02T03:04:05.060Z"),
        (datetime(2026, 11, 28, 12, 0, 0, tzinfo=UTC), "2026-11-28T12:00:00.000Z"),
        (
            datetime(2026, 11, 28, 14, 0, 0, 250000, tzinfo=timezone(timedelta(hours=2))),
            "2026-11-28T12:00:00.250Z",
        ),
        (
            datetime(2026, 11, 27, 21, 30, 0, tzinfo=timezone(timedelta(hours=-14, minutes=-30))),
            "2026-11-28T12:00:00.000Z",
        ),
        (
            datetime(2026, 1, 1, 0, 30, 0, tzinfo=timezone(timedelta(hours=1))),
            "2025-12-31T23:30:00.000Z",
        ),
    ],
)
def test_format_timestamp(moment: datetime, expected: str) -> None:
    assert format_timestamp(moment) == expected


def test_delete_body() -> None:
    body = delete_body("user-1", 42, datetime(2026, 11, 28, 12, 0, 0, 5000), NAMESPACE)
    message = json.loads(body)
    assert set(message) == {"type", "userId", "timestamp", "messageId"}
    assert message["type"] == "delete"
    assert message["userId"] == "user-1"
    assert message["timestamp"] == "2026-11-28T12:00:00.005Z"
    assert uuid.UUID(message["messageId"]).version == 5
    # Deletes are numbered apart from identify changes: the same number must not share an id.
    assert message["messageId"] != MESSAGE_ID_42


def test_delete_body_same_bytes_on_retry() -> None:
    first = delete_body("user-1", 42, CREATED, NAMESPACE)
    assert delete_body("user-1", 42, CREATED, NAMESPACE) == first


def test_delete_body_message_id_depends_on_change_and_namespace() -> None:
    base = json.loads(delete_body("u", 1, CREATED, NAMESPACE))["messageId"]
    assert json.loads(delete_body("u", 2, CREATED, NAMESPACE))["messageId"] != base
    assert json.loads(delete_body("u", 1, CREATED, OTHER_NAMESPACE))["messageId"] != base


@pytest.mark.parametrize(
    ("user_id", "anonymous_id", "email", "problem_mentions"),
    [
        pytest.param("", None, None, "user_id", id="empty"),
        pytest.param("   ", None, None, "user_id", id="spaces"),
        pytest.param("\t\n", None, None, "user_id", id="whitespace"),
        pytest.param("u" * 513, None, None, "user_id", id="too-long"),
        pytest.param("user\x00id", None, None, "user_id", id="nul"),
        pytest.param("user\nid", None, None, "user_id", id="newline"),
        pytest.param("user\x1bid", None, None, "user_id", id="escape"),
        pytest.param("user\x7fid", None, None, "user_id", id="del"),
        pytest.param("user\x85id", None, None, "user_id", id="c1-control"),
        pytest.param(
            b"user\xff".decode("utf-8", "surrogateescape"),
            None,
            None,
            "user_id",
            id="non-utf8-surrogate",
        ),
        pytest.param("user\udcff", None, None, "user_id", id="lone-surrogate"),
        pytest.param("user-1", "a" * 513, None, "anonymous_id", id="anonymous-id-too-long"),
        pytest.param("user-1", "anon\r", None, "anonymous_id", id="anonymous-id-control"),
        pytest.param("user-1", "anon\udcff", None, "anonymous_id", id="anonymous-id-surrogate"),
        pytest.param("user-1", None, "a\n@example.com", "email", id="email-control"),
        pytest.param("user-1", None, "a" * 503 + "@example.com", "email", id="email-too-long"),
        pytest.param("user-1", None, "a\udcff@example.com", "email", id="email-surrogate"),
    ],
)
def test_user_input_problem_found(
    user_id: str, anonymous_id: str | None, email: str | None, problem_mentions: str
) -> None:
    problem = user_input_problem(user_id, anonymous_id, email)
    assert problem is not None
    assert problem_mentions in problem


@pytest.mark.parametrize(
    ("user_id", "anonymous_id", "email"),
    [
        ("user-1", None, None),
        ("u", None, None),
        ("u" * 512, None, None),  # exactly at the limit
        (" padded ", None, None),
        ("user with spaces", None, None),
        ("Jürgen-日本-✨", None, None),
        ("user-1", "anon-1", "ana@example.com"),
        ("user-1", "a" * 512, "b" * 500 + "@example.com"),
        ("user-1", None, "jürgen@exämple.com"),
    ],
)
def test_user_input_problem_none_for_fine_ids(
    user_id: str, anonymous_id: str | None, email: str | None
) -> None:
    assert user_input_problem(user_id, anonymous_id, email) is None


# --- the hot-path encoders, held to their plain references ---------------------------------

_texts = st.text(alphabet=st.characters(codec="utf-8"), max_size=40)
_json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | _texts,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(_texts, inner, max_size=3),
    max_leaves=6,
)


def _compact(value: object) -> str:
    """A value's JSON text as the reference encoder writes it (compact, UTF-8)."""
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))


@given(
    key=st.sampled_from(["order_completed_last_30days", "email", "ünïcode_key", 'q"uote']),
    user_id=_texts,
    anonymous_id=st.none() | _texts,
    email=st.none() | _texts,
    value=_json_values,
    change_id=st.integers(min_value=1, max_value=2**62),
    moment=st.datetimes(min_value=datetime(2000, 1, 1), max_value=datetime(2100, 1, 1)),
)
def test_identify_body_is_the_message_encoded(
    key: str,
    user_id: str,
    anonymous_id: str | None,
    email: str | None,
    value: object,
    change_id: int,
    moment: datetime,
) -> None:
    computation = Computation("audience", "aud_1", key, "spa_x")
    change = TraitChange(change_id, user_id, anonymous_id, email, _compact(value), moment)
    namespace = uuid.UUID(int=change_id % 2**128)
    expected = json.dumps(
        identify_message(computation, change, namespace), ensure_ascii=False, separators=(",", ":")
    ).encode("utf-8")
    assert identify_body(computation, change, namespace) == expected


@pytest.mark.parametrize("kind", ["change", "delete"])
@pytest.mark.parametrize("change_id", [0, 1, 42, 10**6, 2**63 - 1])
@pytest.mark.parametrize("namespace", [uuid.UUID(int=0), uuid.UUID(int=2**128 - 1), NAMESPACE])
def test_message_id_is_uuid5(kind: str, change_id: int, namespace: uuid.UUID) -> None:
    assert message_id(namespace, change_id, kind) == str(
        uuid.uuid5(namespace, f"{kind}:{change_id}")
    )


@given(st.datetimes(min_value=datetime(1000, 1, 1), max_value=datetime(9999, 12, 31)))
def test_format_timestamp_is_strftime_with_milliseconds(moment: datetime) -> None:
    expected = moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z"
    assert format_timestamp(moment) == expected


@given(
    computation_class=st.sampled_from(["audience", "trait"]),
    message_kind=st.sampled_from(["change", "track"]),
    key=st.sampled_from(
        ["order_completed_last_30days", "audience_key", "trait_key", "ünïcode_key", 'q"uote']
    ),
    user_id=_texts,
    anonymous_id=st.none() | _texts,
    email=st.none() | _texts,
    value=_json_values,
    change_id=st.integers(min_value=1, max_value=2**62),
    moment=st.datetimes(min_value=datetime(2000, 1, 1), max_value=datetime(2100, 1, 1)),
)
def test_track_body_is_the_message_encoded(
    computation_class: str,
    message_kind: str,
    key: str,
    user_id: str,
    anonymous_id: str | None,
    email: str | None,
    value: object,
    change_id: int,
    moment: datetime,
) -> None:
    computation = Computation(computation_class, "c_1", key, "spa_x")
    change = TraitChange(change_id, user_id, anonymous_id, email, _compact(value), moment)
    namespace = uuid.UUID(int=change_id % 2**128)
    message = track_message(computation, change, namespace, message_kind)
    expected = json.dumps(message, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
    assert track_body(computation, change, namespace, message_kind) == expected


@pytest.mark.parametrize(
    "stored",
    [
        "0.1",
        "12345678901234567",
        "450.00",
        "1e400",  # beyond a float: still sent as written
        "-0",
        '{"b": 1, "a": [1.50, {"z": null, "y": "\\u00e9"}]}',  # key order and spacing kept
        r'"caf\u00e9 \ud83d\ude00"',  # escapes stay escapes
        " [ 1 ,\n 2 ] ",
    ],
)
@pytest.mark.parametrize("build", [identify_body, track_body])
def test_a_trait_value_is_sent_exactly_as_stored(stored: str, build: Any) -> None:
    computation = Computation("trait", "t_1", "lifetime_value", "spa_x")
    change = TraitChange(7, "u1", None, None, stored, datetime(2026, 11, 30))
    body = build(computation, change, NAMESPACE).decode("utf-8")
    assert f'"lifetime_value":{stored}' in body
    # The body is JSON, and its value is the stored one, digit for digit.
    decoded = json.loads(body, parse_float=Decimal, parse_int=Decimal)
    container = decoded["traits"] if build is identify_body else decoded["properties"]
    expected = json.loads(stored, parse_float=Decimal, parse_int=Decimal)
    assert container["lifetime_value"] == expected


@given(value=_json_values, spacing=st.sampled_from([None, 1, "\t"]))
def test_a_trait_value_in_any_spelling_is_sent_as_written(value: object, spacing: Any) -> None:
    stored = json.dumps(value, indent=spacing, ensure_ascii=spacing is None)
    computation = Computation("trait", "t_1", "ltv", "spa_x")
    change = TraitChange(7, "u1", "anon", "a@example.com", stored, datetime(2026, 11, 30))
    message = identify_message(computation, change, NAMESPACE)
    body = identify_body(computation, change, NAMESPACE)
    assert f'"ltv":{stored}'.encode() in body
    assert json.loads(body) == message
