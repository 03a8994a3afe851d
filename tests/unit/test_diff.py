"""Diff semantics: what each URL must be told, and how the outbox follows it."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from syncer.core.diff import FALSE, TRUE, apply_received, desired_changes, reconcile_outbox

T, F = TRUE, FALSE


@pytest.mark.parametrize(
    ("current", "delivered", "full", "expected"),
    [
        pytest.param({}, {}, False, {}, id="nothing-at-all"),
        pytest.param({"a": T, "b": T}, {}, False, {"a": T, "b": T}, id="first-sync"),
        pytest.param({"a": T, "b": T}, {"a": T}, False, {"b": T}, id="entry"),
        pytest.param({"a": T}, {"a": T, "b": T}, False, {"b": F}, id="exit"),
        pytest.param({"a": T, "b": T}, {"a": T, "b": T}, False, {}, id="unchanged"),
        pytest.param({"b": T}, {"b": F}, False, {"b": T}, id="re-entry-after-exit"),
        pytest.param({}, {"b": F}, False, {}, id="ex-member-already-told"),
        pytest.param({}, {"a": T, "b": T}, False, {"a": F, "b": F}, id="everyone-left"),
        pytest.param(
            {"a": T, "c": T},
            {"a": T, "b": T, "d": F},
            False,
            {"b": F, "c": T},
            id="entries-and-exits",
        ),
        pytest.param({"a": T, "b": T}, {"a": T}, True, {"a": T, "b": T}, id="full-resends-all"),
        pytest.param({"a": T}, {"a": T, "c": T}, True, {"a": T, "c": F}, id="full-with-exit"),
        pytest.param({"a": T}, {"a": T, "c": F}, True, {"a": T}, id="full-skips-told-ex-member"),
        pytest.param({}, {}, True, {}, id="full-on-empty"),
    ],
)
def test_desired_changes(
    current: dict[str, str], delivered: dict[str, str], full: bool, expected: dict[str, str]
) -> None:
    assert desired_changes(current, delivered, full=full) == expected


def test_desired_changes_absent_value_for_traits() -> None:
    current = {"a": "5", "b": "7"}
    delivered = {"a": "5", "b": "6", "c": "9", "d": "null"}
    assert desired_changes(current, delivered, absent_value="null") == {"b": "7", "c": "null"}


@pytest.mark.parametrize("full", [False, True])
def test_absent_users_never_told(full: bool) -> None:
    # "z" is neither a member nor known to the URL: it must never appear in what is sent.
    changes = desired_changes({"a": T}, {"b": T, "c": F}, full=full)
    assert "z" not in changes
    assert "c" not in changes
    assert set(changes) <= {"a", "b"}


@pytest.mark.parametrize(
    ("outbox", "desired", "keep", "drop", "add"),
    [
        pytest.param({}, {}, {}, set(), {}, id="empty"),
        pytest.param({}, {"a": T, "b": F}, {}, set(), {"a": T, "b": F}, id="empty-outbox"),
        pytest.param({"a": T}, {"a": T}, {"a": T}, set(), {}, id="queued-still-wanted"),
        pytest.param({"b": F}, {}, {}, {"b"}, {}, id="came-back-before-delivery"),
        pytest.param({"b": F}, {"b": T}, {}, {"b"}, {"b": T}, id="value-changed"),
        pytest.param(
            {"a": T, "b": F, "c": T},
            {"a": T, "b": T, "d": F},
            {"a": T},
            {"b", "c"},
            {"b": T, "d": F},
            id="mixed",
        ),
    ],
)
def test_reconcile_outbox(
    outbox: dict[str, str],
    desired: dict[str, str],
    keep: dict[str, str],
    drop: set[str],
    add: dict[str, str],
) -> None:
    plan = reconcile_outbox(outbox, desired)
    assert plan.keep == keep
    assert plan.drop == drop
    assert plan.add == add


@pytest.mark.parametrize(
    ("state", "received", "expected"),
    [
        ({}, [], {}),
        ({}, [("a", T)], {"a": T}),
        ({"a": T}, [("a", F)], {"a": F}),
        ({"a": T}, [("a", F), ("a", T)], {"a": T}),  # later messages win
        ({"a": T}, [("b", T)], {"a": T, "b": T}),
    ],
)
def test_apply_received(
    state: dict[str, str], received: list[tuple[str, str]], expected: dict[str, str]
) -> None:
    assert apply_received(dict(state), received) == expected


# --- properties ----------------------------------------------------------------------------

USERS = st.sampled_from([f"u{i}" for i in range(12)])
MEMBERS = st.sets(USERS)
DELIVERED = st.dictionaries(USERS, st.sampled_from([TRUE, FALSE]))
TRAIT_VALUES = st.sampled_from(['"gold"', '"silver"', "3", "null"])


@settings(max_examples=200)
@given(members=MEMBERS, delivered=DELIVERED, full=st.booleans())
def test_replica_equals_membership_after_applying_changes(
    members: set[str], delivered: dict[str, str], full: bool
) -> None:
    current = {user: TRUE for user in members}
    changes = desired_changes(current, delivered, full=full)
    replica = apply_received(dict(delivered), changes.items())
    expected = dict(current)
    expected.update({user: FALSE for user in delivered if user not in current})
    assert replica == expected


@settings(max_examples=200)
@given(
    current=st.dictionaries(USERS, TRAIT_VALUES),
    delivered=st.dictionaries(USERS, TRAIT_VALUES),
)
def test_replica_equals_current_for_trait_values(
    current: dict[str, str], delivered: dict[str, str]
) -> None:
    changes = desired_changes(current, delivered, absent_value="null")
    replica = apply_received(dict(delivered), changes.items())
    expected = dict(current)
    expected.update({user: "null" for user in delivered if user not in current})
    assert replica == expected


@settings(max_examples=200)
@given(members=MEMBERS, ex_members=MEMBERS)
def test_no_changes_when_delivered_already_matches(members: set[str], ex_members: set[str]) -> None:
    ex_members = ex_members - members
    current = {user: TRUE for user in members}
    delivered = {**current, **{user: FALSE for user in ex_members}}
    assert desired_changes(current, delivered) == {}


@settings(max_examples=200)
@given(outbox=DELIVERED, desired=DELIVERED)
def test_reconcile_outbox_properties(outbox: dict[str, str], desired: dict[str, str]) -> None:
    plan = reconcile_outbox(outbox, desired)
    assert {**plan.keep, **plan.add} == desired
    assert not set(plan.keep) & set(plan.add)
    assert not set(plan.keep) & plan.drop
    assert plan.keep.items() <= outbox.items()
    assert set(plan.keep) | plan.drop == set(outbox)
