"""The diff specification (:mod:`syncer.core.diff`): what one URL must be told about one user.

``plan_user`` is held to a hand-written table of every class of situation: each row names a
class (presence x what the URL was told x whether it may have processed something since x what
is queued, whether it was ever sent and whether it is forced x ``--full``) and what the planner
must do with it; the rows together cover every combination exactly once. Properties then prove
what the table is for: whatever the URL processed of the changes whose outcome is unknown,
delivering the plan leaves the URL's replica equal to the membership; a change is never dropped
as a no-op while the URL's value is uncertain; nothing is ever sent about a suppressed user; an
invalid row is left exactly as it is; and planning again with nothing new changes nothing.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
from hypothesis import given
from hypothesis import strategies as st

from syncer.core.diff import (
    FALSE,
    TRUE,
    Presence,
    Queued,
    Told,
    UserPlan,
    apply_received,
    desired_changes,
    plan_user,
)

T, F = TRUE, FALSE
MEMBER, INVALID = Presence.MEMBER, Presence.INVALID
ABSENT, SUPPRESSED = Presence.ABSENT, Presence.SUPPRESSED
TOLD_VALUES: tuple[str | None, ...] = (None, T, F)
QUEUED_VALUES: tuple[str | None, ...] = (None, T, F)
BOTH = (False, True)

NOTHING = UserPlan()  # nothing queued stays, nothing is added, no doubt recorded
KEEP = UserPlan(keep=True)


def add(value: str, *, doubt: bool = False) -> UserPlan:
    """A new change with ``value``; ``doubt``: a possibly processed change was dropped."""
    return UserPlan(add=value, mark_unsure=doubt)


Situation = tuple[Presence, Told, Queued | None, bool]


@dataclass(frozen=True)
class PlanClass:
    """A class of situations (every combination of the listed values) and its plan.

    ``attempted`` and ``forced`` only apply when something is queued.
    """

    presence: Presence
    expect: UserPlan
    told: tuple[str | None, ...] = TOLD_VALUES
    unsure: tuple[bool, ...] = BOTH
    queued: tuple[str | None, ...] = (None,)
    attempted: tuple[bool, ...] = BOTH
    forced: tuple[bool, ...] = BOTH
    full: tuple[bool, ...] = BOTH

    def situations(self) -> Iterator[Situation]:
        for value, unsure, queued, full in itertools.product(
            self.told, self.unsure, self.queued, self.full
        ):
            told = Told(value, unsure)
            if queued is None:
                yield self.presence, told, None, full
                continue
            for attempted, forced in itertools.product(self.attempted, self.forced):
                yield self.presence, told, Queued(queued, attempted, forced), full


def every_situation() -> Iterator[Situation]:
    """The whole space the table must cover."""
    for presence, value, unsure, queued, full in itertools.product(
        Presence, TOLD_VALUES, BOTH, QUEUED_VALUES, BOTH
    ):
        told = Told(value, unsure)
        if queued is None:
            yield presence, told, None, full
            continue
        for attempted, forced in itertools.product(BOTH, BOTH):
            yield presence, told, Queued(queued, attempted, forced), full


# "certain" = the URL may not have processed anything after the value it last accepted;
# "unsure" = it may have; "unsent" = queued, never handed to a sender; "maybe-processed" =
# queued and sent (or claimed) with no answer recorded.
PLAN_CLASSES = {
    # --- a member whose row cannot be sent: left exactly as it is ---
    "invalid-row-nothing-queued -> nothing": PlanClass(INVALID, NOTHING),
    "invalid-row-with-a-queued-change -> kept as it is, whatever it says": PlanClass(
        INVALID, KEEP, queued=(T, F)
    ),
    # --- deleted for privacy: nothing more is ever sent ---
    "suppressed-nothing-queued -> nothing": PlanClass(SUPPRESSED, NOTHING),
    "suppressed-with-a-queued-change -> dropped, no doubt recorded, nothing added": PlanClass(
        SUPPRESSED, NOTHING, queued=(T, F)
    ),
    # --- a member, nothing queued ---
    "member-certainly-told-true -> nothing": PlanClass(
        MEMBER, NOTHING, told=(T,), unsure=(False,), full=(False,)
    ),
    "member-certainly-told-true-with-full -> true resent": PlanClass(
        MEMBER, add(T), told=(T,), unsure=(False,), full=(True,)
    ),
    "member-told-true-but-unsure -> true resent": PlanClass(
        MEMBER, add(T), told=(T,), unsure=(True,)
    ),
    "member-never-told -> entry": PlanClass(MEMBER, add(T), told=(None,)),
    "member-told-false -> entry": PlanClass(MEMBER, add(T), told=(F,)),
    # --- a member with an entry queued ---
    "unsent-entry-for-member-certainly-told-true -> dropped as a no-op": PlanClass(
        MEMBER,
        NOTHING,
        told=(T,),
        unsure=(False,),
        queued=(T,),
        attempted=(False,),
        forced=(False,),
        full=(False,),
    ),
    "unsent-forced-entry-for-member-certainly-told-true -> kept (the full resend stays)": PlanClass(
        MEMBER,
        KEEP,
        told=(T,),
        unsure=(False,),
        queued=(T,),
        attempted=(False,),
        forced=(True,),
    ),
    "unsent-entry-for-member-certainly-told-true-with-full -> kept": PlanClass(
        MEMBER,
        KEEP,
        told=(T,),
        unsure=(False,),
        queued=(T,),
        attempted=(False,),
        forced=(False,),
        full=(True,),
    ),
    "maybe-processed-entry-for-member-told-true -> kept, never a no-op while uncertain": PlanClass(
        MEMBER, KEEP, told=(T,), unsure=(False,), queued=(T,), attempted=(True,)
    ),
    "queued-entry-for-member-told-true-but-unsure -> kept": PlanClass(
        MEMBER, KEEP, told=(T,), unsure=(True,), queued=(T,)
    ),
    "queued-entry-for-member-not-told-true -> kept": PlanClass(
        MEMBER, KEEP, told=(None, F), queued=(T,)
    ),
    # --- a member with an exit queued (they came back) ---
    "unsent-exit-for-member-who-came-back-url-certainly-true -> dropped as a net no-op": PlanClass(
        MEMBER,
        NOTHING,
        told=(T,),
        unsure=(False,),
        queued=(F,),
        attempted=(False,),
        forced=(False,),
        full=(False,),
    ),
    "unsent-exit-for-member-back-url-certainly-true-with-full -> replaced by true": PlanClass(
        MEMBER,
        add(T),
        told=(T,),
        unsure=(False,),
        queued=(F,),
        attempted=(False,),
        forced=(False,),
        full=(True,),
    ),
    "unsent-exit-flagged-forced-for-member-certainly-told-true -> replaced by true": PlanClass(
        MEMBER,
        add(T),
        told=(T,),
        unsure=(False,),
        queued=(F,),
        attempted=(False,),
        forced=(True,),
    ),
    "unsent-exit-for-member-who-came-back-url-unsure -> replaced by true": PlanClass(
        MEMBER, add(T), told=(T,), unsure=(True,), queued=(F,), attempted=(False,)
    ),
    "unsent-exit-for-member-not-told-true -> replaced by true": PlanClass(
        MEMBER, add(T), told=(None, F), queued=(F,), attempted=(False,)
    ),
    "maybe-processed-exit-then-came-back -> compensating true, doubt recorded": PlanClass(
        MEMBER, add(T, doubt=True), queued=(F,), attempted=(True,)
    ),
    # --- not a member, nothing queued ---
    "left-after-url-told-true -> exit": PlanClass(ABSENT, add(F), told=(T,)),
    "not-a-member-but-an-entry-may-have-been-processed -> compensating false": PlanClass(
        ABSENT, add(F), told=(None, F), unsure=(True,)
    ),
    "not-a-member-url-never-told-or-certainly-false -> nothing": PlanClass(
        ABSENT, NOTHING, told=(None, F), unsure=(False,)
    ),
    # --- not a member with an exit queued ---
    "queued-exit-after-url-told-true -> kept": PlanClass(ABSENT, KEEP, told=(T,), queued=(F,)),
    "queued-exit-url-unsure -> kept": PlanClass(
        ABSENT, KEEP, told=(None, F), unsure=(True,), queued=(F,)
    ),
    "maybe-processed-exit-url-never-accepted-true -> kept, not a no-op while uncertain": PlanClass(
        ABSENT, KEEP, told=(None, F), unsure=(False,), queued=(F,), attempted=(True,)
    ),
    "unsent-exit-url-certainly-never-held-true -> dropped as a no-op": PlanClass(
        ABSENT, NOTHING, told=(None, F), unsure=(False,), queued=(F,), attempted=(False,)
    ),
    # --- not a member with an entry queued (they left before it was accepted) ---
    "processed-but-unanswered-entry-then-left -> compensating false, doubt recorded": PlanClass(
        ABSENT, add(F, doubt=True), queued=(T,), attempted=(True,)
    ),
    "unsent-entry-then-left-after-url-told-true -> replaced by exit": PlanClass(
        ABSENT, add(F), told=(T,), queued=(T,), attempted=(False,)
    ),
    "unsent-entry-then-left-url-unsure -> replaced by exit": PlanClass(
        ABSENT, add(F), told=(None, F), unsure=(True,), queued=(T,), attempted=(False,)
    ),
    "unsent-entry-then-left-url-certainly-never-held-true -> dropped": PlanClass(
        ABSENT, NOTHING, told=(None, F), unsure=(False,), queued=(T,), attempted=(False,)
    ),
}


def test_plan_classes_cover_every_situation_exactly_once() -> None:
    covered = [s for plan_class in PLAN_CLASSES.values() for s in plan_class.situations()]
    assert len(covered) == len(set(covered)), "a situation is in two rows"
    assert set(covered) == set(every_situation())
    assert len(covered) == 432


@pytest.mark.parametrize("plan_class", list(PLAN_CLASSES.values()), ids=list(PLAN_CLASSES))
def test_plan_user(plan_class: PlanClass) -> None:
    for presence, told, queued, full in plan_class.situations():
        plan = plan_user(presence, told, queued, full=full)
        assert plan == plan_class.expect, (presence, told, queued, full)


@pytest.mark.parametrize(
    ("presence", "told", "queued", "expect"),
    [
        pytest.param(MEMBER, Told('"gold"'), None, NOTHING, id="trait-unchanged -> nothing"),
        pytest.param(MEMBER, Told('"silver"'), None, add('"gold"'), id="trait-changed -> new"),
        pytest.param(
            MEMBER, Told('"gold"', unsure=True), None, add('"gold"'), id="trait-unsure -> resent"
        ),
        pytest.param(
            MEMBER,
            Told('"silver"'),
            Queued('"bronze"'),
            add('"gold"'),
            id="queued-stale-trait -> replaced",
        ),
        pytest.param(
            MEMBER, Told('"silver"'), Queued('"gold"'), KEEP, id="queued-current-trait -> kept"
        ),
        pytest.param(ABSENT, Told('"gold"'), None, add("null"), id="trait-gone -> absent value"),
        pytest.param(ABSENT, Told("null"), None, NOTHING, id="trait-gone-url-told-null -> nothing"),
        pytest.param(
            ABSENT,
            Told("null"),
            Queued('"gold"', attempted=True),
            add("null", doubt=True),
            id="maybe-processed-trait-then-gone -> compensating null",
        ),
    ],
)
def test_plan_user_for_trait_values(
    presence: Presence, told: Told, queued: Queued | None, expect: UserPlan
) -> None:
    assert plan_user(presence, told, queued, current='"gold"', absent_value="null") == expect


# With `resend_on_identity_change`: ``identity_changed`` is the member's identity against the
# one the URL was told with; ``stale_identity`` a queued change's against the member's now.
@pytest.mark.parametrize(
    ("presence", "told", "queued", "identity_changed", "expect"),
    [
        pytest.param(MEMBER, Told(TRUE), None, True, add(TRUE), id="told-old-identity -> resent"),
        pytest.param(MEMBER, Told(TRUE), None, False, NOTHING, id="told-this-identity -> nothing"),
        pytest.param(
            MEMBER,
            Told(TRUE),
            Queued(TRUE, stale_identity=True),
            True,
            add(TRUE),
            id="queued-under-old-identity -> replaced",
        ),
        pytest.param(
            MEMBER,
            Told(TRUE),
            Queued(TRUE, attempted=True, stale_identity=True),
            True,
            add(TRUE, doubt=True),
            id="maybe-processed-under-old-identity -> replaced, doubt kept",
        ),
        pytest.param(
            MEMBER, Told(TRUE), Queued(TRUE), True, KEEP, id="queued-under-new-identity -> kept"
        ),
        pytest.param(
            MEMBER,
            Told(TRUE),
            Queued(TRUE, forced=True, stale_identity=True),
            False,
            UserPlan(),
            id="forced-under-old-identity-url-told-new -> dropped",
        ),
        pytest.param(INVALID, Told(TRUE), None, True, NOTHING, id="invalid-row -> left as it is"),
        pytest.param(ABSENT, Told(TRUE), None, False, add(FALSE), id="gone -> exit as before"),
    ],
)
def test_plan_user_when_identities_matter(
    presence: Presence, told: Told, queued: Queued | None, identity_changed: bool, expect: UserPlan
) -> None:
    assert plan_user(presence, told, queued, identity_changed=identity_changed) == expect


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


@pytest.mark.parametrize(
    ("state", "received", "expected"),
    [
        pytest.param({}, [], {}, id="nothing-received"),
        pytest.param({}, [("a", T)], {"a": T}, id="entry"),
        pytest.param({"a": T}, [("a", F)], {"a": F}, id="exit"),
        pytest.param({"a": T}, [("a", F), ("a", T)], {"a": T}, id="later-message-wins"),
        pytest.param({"a": T}, [("b", T)], {"a": T, "b": T}, id="other-users-untouched"),
    ],
)
def test_apply_received(
    state: dict[str, str], received: list[tuple[str, str]], expected: dict[str, str]
) -> None:
    assert apply_received(dict(state), received) == expected


# --- properties ----------------------------------------------------------------------------

USERS = [f"u{i}" for i in range(8)]
VALUE = st.sampled_from([T, F])
told_strategy = st.builds(Told, st.sampled_from(TOLD_VALUES), st.booleans())
queued_strategy = st.none() | st.builds(Queued, VALUE, st.booleans(), st.booleans())
situation_strategy = st.tuples(st.sampled_from(list(Presence)), told_strategy, queued_strategy)
# The planner only ever marks entries forced (``--full`` re-sends members, never exits).
planner_queued_strategy = st.none() | st.builds(
    lambda value, attempted, forced: Queued(value, attempted, forced and value == T),
    VALUE,
    st.booleans(),
    st.booleans(),
)


def uncertain(told: Told, queued: Queued | None) -> bool:
    """The URL may have processed a value after the one it last accepted."""
    return told.unsure or (queued is not None and queued.attempted)


@given(
    situations=st.dictionaries(st.sampled_from(USERS), situation_strategy),
    full=st.booleans(),
    data=st.data(),
)
def test_replica_equals_membership_whatever_was_processed_of_ambiguous_changes(
    situations: dict[str, tuple[Presence, Told, Queued | None]], full: bool, data: st.DataObject
) -> None:
    replica: dict[str, str] = {}
    ambiguous: list[tuple[str, str]] = []  # older than anything planned now
    planned: list[tuple[str, str]] = []
    for user, (presence, told, queued) in situations.items():
        # What the URL holds now: the last value it accepted, or, while unsure, any value an
        # unanswered change since may have set.
        possible = [told.value, T, F] if told.unsure else [told.value]
        start = data.draw(st.sampled_from(possible), label=f"{user} holds")
        if start is not None:
            replica[user] = start
        plan = plan_user(presence, told, queued, full=full)
        dropped_maybe_processed = queued is not None and queued.attempted and not plan.keep
        if dropped_maybe_processed and data.draw(st.booleans(), label=f"{user} processed it"):
            assert queued is not None
            ambiguous.append((user, queued.value))
        if plan.keep:
            assert queued is not None
            planned.append((user, queued.value))
        if plan.add is not None:
            planned.append((user, plan.add))
    apply_received(replica, ambiguous + planned)

    for user, (presence, told, queued) in situations.items():
        if presence is MEMBER:
            assert replica.get(user) == T, user
        elif presence is ABSENT:
            assert replica.get(user) in (None, F), user
            if told.value is None and not uncertain(told, queued):
                assert user not in replica, f"{user} was told about without ever being a member"


@given(situation=situation_strategy, full=st.booleans())
def test_never_dropped_as_a_no_op_while_uncertain(
    situation: tuple[Presence, Told, Queued | None], full: bool
) -> None:
    presence, told, queued = situation
    plan = plan_user(presence, told, queued, full=full)
    if uncertain(told, queued) and presence in (MEMBER, ABSENT):
        assert plan.keep or plan.add is not None
    if queued is not None and queued.attempted and presence in (MEMBER, ABSENT):
        # A maybe-processed change is either kept or replaced and its doubt remembered.
        assert plan.keep or (plan.add is not None and plan.mark_unsure)


@given(told=told_strategy, queued=queued_strategy, full=st.booleans())
def test_nothing_is_ever_added_for_a_suppressed_user(
    told: Told, queued: Queued | None, full: bool
) -> None:
    assert plan_user(SUPPRESSED, told, queued, full=full) == NOTHING


@given(told=told_strategy, queued=queued_strategy, full=st.booleans())
def test_invalid_users_are_left_exactly_as_they_are(
    told: Told, queued: Queued | None, full: bool
) -> None:
    assert plan_user(INVALID, told, queued, full=full) == UserPlan(keep=queued is not None)


@given(
    presence=st.sampled_from(list(Presence)),
    told=told_strategy,
    queued=planner_queued_strategy,
    full=st.booleans(),
    later_full=st.booleans(),
)
def test_planning_again_with_nothing_new_changes_nothing(
    presence: Presence, told: Told, queued: Queued | None, full: bool, later_full: bool
) -> None:
    later_full = later_full and full  # a later ordinary run, or the same --full again
    plan = plan_user(presence, told, queued, full=full)
    # What the planner leaves: the doubt remembered, and the one change it queued or kept
    # (a full plan marks every queued entry forced, so a later ordinary run keeps it).
    told_after = Told(told.value, told.unsure or plan.mark_unsure)
    queued_after: Queued | None = None
    if plan.keep:
        assert queued is not None
        queued_after = Queued(
            queued.value, queued.attempted, queued.forced or (full and queued.value == T)
        )
    elif plan.add is not None:
        queued_after = Queued(plan.add, attempted=False, forced=full and plan.add == T)
    again = plan_user(presence, told_after, queued_after, full=later_full)
    assert again == UserPlan(keep=queued_after is not None)


TRAIT_VALUES = st.sampled_from(['"gold"', '"silver"', "3", "null"])


@given(
    current=st.dictionaries(st.sampled_from(USERS), TRAIT_VALUES),
    delivered=st.dictionaries(st.sampled_from(USERS), TRAIT_VALUES),
    full=st.booleans(),
)
def test_replica_equals_current_for_trait_values(
    current: dict[str, str], delivered: dict[str, str], full: bool
) -> None:
    changes = desired_changes(current, delivered, absent_value="null", full=full)
    replica = apply_received(dict(delivered), changes.items())
    expected = dict(current)
    expected.update({user: "null" for user in delivered if user not in current})
    assert replica == expected


@given(
    members=st.sets(st.sampled_from(USERS)),
    ex_members=st.sets(st.sampled_from(USERS)),
)
def test_no_changes_when_delivered_already_matches(members: set[str], ex_members: set[str]) -> None:
    current = {user: T for user in members}
    delivered = {**current, **{user: F for user in ex_members - members}}
    assert desired_changes(current, delivered) == {}
