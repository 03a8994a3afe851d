"""The SQL planner (:mod:`syncer.store.planning`) against the pure spec (``plan_user``).

States of one (URL, audience) pair are written straight into the tables: memberships (some
whose rows cannot be sent), users deleted for privacy, what the URL was told (a value or none,
and whether something later may have been processed), and queued changes (entry or exit, sent
before or not, forced, pending, rejected or parked, some claimed by a live or a dead sender).
Planning the pair must then do to every user exactly what ``plan_user`` says: a kept change
keeps its id (so its retries keep their messageId), stays parked if it was parked and is
pending again if it was rejected (when the plan re-arms rejections); a new change has the new
value, a never-used id, and a timestamp no older than the plan's and newer than the pair's last
plan; a dropped change is gone; a dropped change that may have been processed leaves its doubt
in ``syncer_state``; the counts the plan reports are those of the spec. Planning again with
nothing new changes nothing.

One test writes every combination of rows at once (deterministic, one pair of ~1,300 users);
a hypothesis property writes random ones (near-identical and unsendable user ids, the plan's
clock ahead of or behind the last plan). Further tests hold the mass-exit guard inside the plan
to its boundary and its approval, and check two states an upgraded database can be in.
"""

from __future__ import annotations

import dataclasses
import itertools
import time
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import delete, func, insert, select

from syncer.core.diff import FALSE, TRUE, Presence, Queued, Told, plan_user
from syncer.core.guard import GuardLimits
from syncer.core.payload import user_input_problem
from syncer.core.states import ChangeStatus
from syncer.core.traits import Subject
from syncer.store import Store
from syncer.store.planning import PlanOutcome, PlanResult
from syncer.store.schema import (
    audience_memberships,
    audiences,
    deleted_users,
    outbox,
    pairs,
    state,
)
from tests.conftest import Upstream

AUDIENCE = "aud_spec"
URL = "http://127.0.0.1:9/spec"
GUARD_OFF = GuardLimits(max_exit_share=1.0, min_audience_size=10**9)
# Near-identical ids first, so that a comparison that folds case or trims spaces shows up, and
# ids that can never be sent ("" and spaces only) whatever their row says; then plain ones.
USERS = ["u0", "U0", "u0 ", "", "  ", *(f"u{n}" for n in range(1, 16))]
LAST_PLANNED = datetime(2030, 1, 1, 12, 0, 0, 500_000)
PENDING, REJECTED, PARKED = ChangeStatus.PENDING, ChangeStatus.REJECTED, ChangeStatus.PARKED


@dataclass(frozen=True)
class StateRow:
    """What the URL was told about a user: the value it accepted, and the doubt since."""

    value: str | None
    unsure: bool


@dataclass(frozen=True)
class OutboxRow:
    """A queued change as an earlier plan (and sender) left it."""

    value: str
    attempted: bool
    forced: bool
    status: ChangeStatus
    claim: str | None  # None, "live" or "expired": a sender claimed it and never answered
    age_ms: int  # how long before the pair's last plan it was queued


@dataclass(frozen=True)
class UserRows:
    """Everything the tables hold about one user of the pair."""

    membership: str | None  # None, "valid" or "bad-email" (a control character in it)
    suppressed: bool
    told: StateRow | None
    queued: OutboxRow | None
    # The URL was told, and the change is queued, under the identity (anonymous_id, email) the
    # membership row has now; otherwise under older ones.
    told_as_member: bool = False
    queued_as_member: bool = False


@dataclass(frozen=True)
class PairState:
    """A random state of the pair, and how it is planned."""

    users: dict[str, UserRows]
    full: bool
    retry_rejected: bool  # the first plan of a run re-arms rejected changes; a second does not
    now_offset_ms: int  # the plan's clock against the pair's last plan (may be behind it)
    plan_again: bool  # check that planning again changes nothing
    resend_identity: bool = False  # [engage] resend_on_identity_change


def user_situations(status_and_claim: list[tuple[ChangeStatus, str | None]]) -> list[UserRows]:
    """Every combination of rows one user can have, simplest first.

    ``status_and_claim``: the (status, claim) pairs a queued change is combined with.
    """
    told_rows = [None] + [StateRow(v, u) for v in (TRUE, FALSE, None) for u in (False, True)]
    queued_rows: list[OutboxRow | None] = [None]
    for value, attempted, forced, (status, claim) in itertools.product(
        (TRUE, FALSE), (False, True), (False, True), status_and_claim
    ):
        if forced and value == FALSE:
            continue  # only entries are ever forced: --full re-sends members, not exits
        queued_rows.append(OutboxRow(value, attempted, forced, status, claim, age_ms=0))
    combinations = itertools.product(
        (None, "valid", "bad-email"), (False, True), told_rows, queued_rows
    )
    return [
        UserRows(
            membership,
            suppressed,
            told,
            None if queued is None else dataclasses.replace(queued, age_ms=n * 7 % 5_000),
        )
        for n, (membership, suppressed, told, queued) in enumerate(combinations)
    ]


STATUSES = [PENDING, REJECTED, PARKED]
CLAIMS = [None, "live", "expired"]
# The property draws each user's rows from every combination (which shrinks towards the
# simplest): far cheaper to generate than field by field, and as likely to meet each one.
ALL_SITUATIONS = user_situations(list(itertools.product(STATUSES, CLAIMS)))
situations = st.builds(
    dataclasses.replace,
    st.sampled_from(ALL_SITUATIONS),
    told_as_member=st.booleans(),
    queued_as_member=st.booleans(),
)
pair_states = st.builds(
    PairState,
    # A plan costs about the same for 1 user as for 20: many users per example.
    st.lists(situations, min_size=len(USERS) // 2, max_size=len(USERS)).map(
        lambda rows: dict(zip(USERS[: len(rows)], rows, strict=True))
    ),
    st.booleans(),
    st.booleans(),
    st.integers(min_value=-2_000, max_value=2_000),
    st.just(False),  # planning again is checked on every situation at once (below): it is slow
    st.booleans(),
)


def membership_values(user: str, kind: str) -> dict[str, Any]:
    email = f"{user}\x01@m.example" if kind == "bad-email" else f"{user}@m.example"
    return {
        "audience_id": AUDIENCE,
        "user_id": user,
        "anonymous_id": f"anon-{user}-m",
        "email": email,
    }


def told_identity(user: str, rows: UserRows) -> tuple[str, str]:
    if rows.told_as_member and rows.membership is not None:
        member = membership_values(user, rows.membership)
        return member["anonymous_id"], member["email"]
    return f"anon-{user}-s", f"{user}@s.example"


def queued_identity(user: str, rows: UserRows) -> tuple[str, str]:
    if rows.queued_as_member and rows.membership is not None:
        member = membership_values(user, rows.membership)
        return member["anonymous_id"], member["email"]
    return f"anon-{user}-o", f"{user}@o.example"


def identity_changed(user: str, rows: UserRows, pair: PairState) -> bool:
    """The spec's ``identity_changed``: identities matter, and the URL was told of this member
    under another identity than their row's."""
    return pair.resend_identity and rows.membership is not None and not rows.told_as_member


def presence_of(user: str, rows: UserRows) -> Presence:
    if rows.suppressed:
        return Presence.SUPPRESSED
    if rows.membership is None:
        return Presence.ABSENT
    values = membership_values(user, rows.membership)
    if user_input_problem(user, values["anonymous_id"], values["email"]) is not None:
        return Presence.INVALID
    return Presence.MEMBER


def told_of(rows: UserRows) -> Told:
    return Told() if rows.told is None else Told(rows.told.value, rows.told.unsure)


def queued_of(rows: UserRows) -> Queued | None:
    q = rows.queued
    if q is None:
        return None
    # A claimed change may have been sent whatever was recorded: the spec's "attempted".
    return Queued(q.value, attempted=q.attempted or q.claim is not None, forced=q.forced)


def queued_in(user: str, rows: UserRows, pair: PairState) -> Queued | None:
    """The spec's view of the queued change, its identity looked at when identities matter."""
    queued = queued_of(rows)
    if queued is None or not pair.resend_identity or rows.membership is None:
        return queued
    return dataclasses.replace(queued, stale_identity=not rows.queued_as_member)


# --- the tables -----------------------------------------------------------------------------------


class SpecPair:
    """The pair every example writes its state into (URL and AUDIENCE exist throughout)."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self.destination_id = store.destinations.ensure([URL], LAST_PLANNED)[URL]
        with store.engine.begin() as connection:
            connection.execute(insert(audiences).values(id=AUDIENCE, name="Spec", enabled=True))
        self.highest_id_ever = 0  # of any outbox row any example wrote or planned

    def write(self, pair: PairState) -> None:
        """Delete every row the previous example wrote (or planned), then write ``pair``."""
        destination_id, users = self.destination_id, pair.users
        epoch = time.time()
        claimed_until = {"live": epoch + 600, "expired": epoch - 600}
        with self.store.engine.begin() as connection:
            connection.execute(delete(outbox).where(outbox.c.destination_id == destination_id))
            connection.execute(delete(state).where(state.c.destination_id == destination_id))
            connection.execute(delete(pairs).where(pairs.c.destination_id == destination_id))
            connection.execute(
                delete(audience_memberships).where(audience_memberships.c.audience_id == AUDIENCE)
            )
            connection.execute(delete(deleted_users))
            connection.execute(
                insert(pairs).values(
                    destination_id=destination_id,
                    audience_id=AUDIENCE,
                    last_planned_at=LAST_PLANNED,
                )
            )
            members = [membership_values(u, r.membership) for u, r in users.items() if r.membership]
            if members:
                connection.execute(insert(audience_memberships), members)
            suppressed = [
                {"user_id": u, "requested_at": LAST_PLANNED}
                for u, r in users.items()
                if r.suppressed
            ]
            if suppressed:
                connection.execute(insert(deleted_users), suppressed)
            told = [
                {
                    "destination_id": destination_id,
                    "audience_id": AUDIENCE,
                    "user_id": u,
                    "value": r.told.value,
                    "unsure": r.told.unsure,
                    "anonymous_id": told_identity(u, r)[0],
                    "email": told_identity(u, r)[1],
                }
                for u, r in users.items()
                if r.told is not None
            ]
            if told:
                connection.execute(insert(state), told)
            queued = [
                {
                    "destination_id": destination_id,
                    "audience_id": AUDIENCE,
                    "user_id": u,
                    "value": q.value,
                    "anonymous_id": queued_identity(u, r)[0],
                    "email": queued_identity(u, r)[1],
                    "forced": q.forced,
                    "attempted": q.attempted,
                    "created_at": LAST_PLANNED - timedelta(milliseconds=q.age_ms),
                    "status": q.status.value,
                    "attempts": int(q.attempted) + int(q.status is not PENDING),
                    "rejections": int(q.status is not PENDING),
                    "claim_token": None if q.claim is None else f"token-{u}",
                    "claimed_by": None if q.claim is None else "elsewhere:1:x",
                    "claimed_until": None if q.claim is None else claimed_until[q.claim],
                }
                for u, r in users.items()
                if (q := r.queued) is not None
            ]
            if queued:
                connection.execute(insert(outbox), queued)
            highest = connection.execute(select(func.max(outbox.c.id))).scalar_one() or 0
            self.highest_id_ever = max(self.highest_id_ever, int(highest))

    def snapshot(self) -> tuple[dict[str, Any], dict[str, tuple[Any, ...]]]:
        """user -> outbox row, and user -> (value, unsure, anonymous_id, email) of the state."""
        s = state.c
        with self.store.engine.connect() as connection:
            queued = connection.execute(
                select(outbox).where(outbox.c.destination_id == self.destination_id)
            ).all()
            told = connection.execute(
                select(s.user_id, s.value, s.unsure, s.anonymous_id, s.email).where(
                    s.destination_id == self.destination_id
                )
            ).all()
        assert len({row.user_id for row in queued}) == len(queued), "two changes for one user"
        return (
            {row.user_id: row for row in queued},
            {
                row.user_id: (row.value, bool(row.unsure), row.anonymous_id, row.email)
                for row in told
            },
        )

    def plan(self, pair: PairState, now: datetime) -> PlanResult:
        return self.store.planning.plan(
            self.destination_id,
            AUDIENCE,
            full=pair.full,
            now=now,
            limits=GUARD_OFF,
            retry_rejected=pair.retry_rejected,
            resend_on_identity_change=pair.resend_identity,
        )


@pytest.fixture
def spec_pair(store: Store) -> SpecPair:
    """The pair the spec tests write into; on PostgreSQL, commits of this throwaway database
    skip the wait for the disk (the examples commit many small transactions; nothing else
    changes)."""
    if store.engine.dialect.name == "postgresql":
        with store.engine.connect() as connection:
            name = connection.execute(select(func.current_database())).scalar_one()
            connection.exec_driver_sql(f'ALTER DATABASE "{name}" SET synchronous_commit = off')
            connection.commit()
        store.engine.dispose()
    return SpecPair(store)


# --- the check ------------------------------------------------------------------------------------


def assert_plan_follows_spec(spec_pair: SpecPair, pair: PairState, analyze: bool = False) -> None:
    """Write ``pair``, plan it, and check every user against ``plan_user``.

    ``analyze``: refresh PostgreSQL's statistics first, as a run does before it plans (a pair
    of thousands of users written at once would be planned on stale ones).
    """
    spec_pair.write(pair)
    if analyze:
        spec_pair.store.refresh_statistics()
    before, state_before = spec_pair.snapshot()
    now = LAST_PLANNED + timedelta(milliseconds=pair.now_offset_ms)

    result = spec_pair.plan(pair, now)

    after, state_after = spec_pair.snapshot()
    assert result.outcome is PlanOutcome.PLANNED
    assert set(after) <= set(pair.users), "a change for a user the pair knows nothing of"
    plans = {}
    expected_state = dict(state_before)
    added_at = set()
    for user, rows in pair.users.items():
        presence, told, queued = presence_of(user, rows), told_of(rows), queued_in(user, rows, pair)
        changed = identity_changed(user, rows, pair)
        plan = plan_user(presence, told, queued, full=pair.full, identity_changed=changed)
        plans[user] = plan
        where = (
            f"{user!r}: {presence.name} {told} {queued} {rows.queued} full={pair.full} "
            f"identity_changed={changed}"
        )
        if plan.mark_unsure:
            old = state_before.get(user)
            expected_state[user] = (
                (old[0], True, old[2], old[3])
                if old
                else (None, True, *queued_identity(user, rows))
            )
        if plan.keep:
            old_row, new_row = before[user], after.get(user)
            assert new_row is not None, f"kept change dropped: {where}"
            assert new_row.id == old_row.id, f"kept change lost its id: {where}"
            assert new_row.value == old_row.value, where
            rearmed = old_row.status == REJECTED.value and pair.retry_rejected
            assert new_row.status == (PENDING.value if rearmed else old_row.status), where
            forced = old_row.forced or (pair.full and old_row.value == TRUE)
            assert new_row.forced == forced, f"--full marks queued entries forced: {where}"
            unchanged = ["attempted", "attempts", "rejections", "created_at", "anonymous_id",
                         "email", "claim_token", "claimed_by", "claimed_until"]  # fmt: skip
            assert [new_row._mapping[c] for c in unchanged] == [
                old_row._mapping[c] for c in unchanged
            ], where
        elif plan.add is not None:
            new_row = after.get(user)
            assert new_row is not None, f"no change added: {where}"
            assert new_row.id > spec_pair.highest_id_ever, f"new change reuses an id: {where}"
            assert new_row.value == plan.add, where
            assert new_row.status == PENDING.value, where
            assert not new_row.attempted and new_row.claim_token is None, where
            assert (new_row.attempts, new_row.rejections) == (0, 0), where
            assert new_row.forced == (pair.full and plan.add == TRUE), where
            assert new_row.created_at >= now, where
            assert new_row.created_at > LAST_PLANNED, f"not newer than the last plan: {where}"
            if plan.add == TRUE:
                member = membership_values(user, rows.membership or "valid")
                assert (new_row.anonymous_id, new_row.email) == (
                    member["anonymous_id"],
                    member["email"],
                ), where
            else:
                assert (new_row.anonymous_id, new_row.email) == expected_state[user][2:], where
            added_at.add(new_row.created_at)
        else:
            assert user not in after, f"change not dropped: {where}"
    assert len(added_at) <= 1, "the changes of one plan have one timestamp"
    assert state_after == expected_state

    adds = [plan.add for plan in plans.values() if plan.add is not None]
    sendable = [row.value for row in after.values() if row.status != PARKED.value]
    invalid = [
        user
        for user, rows in pair.users.items()
        if presence_of(user, rows) is Presence.INVALID
        and user not in after
        and plan_user(
            Presence.MEMBER,
            told_of(rows),
            None,
            full=pair.full,
            identity_changed=identity_changed(user, rows, pair),
        ).add
        is not None
    ]
    assert result == PlanResult(
        PlanOutcome.PLANNED,
        new_entered=adds.count(TRUE),
        new_exited=adds.count(FALSE),
        queued_entries=sendable.count(TRUE),
        queued_exits=sendable.count(FALSE),
        invalid=len(invalid),
        invalid_example=result.invalid_example,
        approved=False,
    )
    assert (result.invalid_example is None) == (not invalid)

    if not pair.plan_again:
        return
    # Planning again with nothing new changes nothing.
    again = spec_pair.plan(pair, now)
    assert (again.new_entered, again.new_exited) == (0, 0)
    outbox_again, state_again = spec_pair.snapshot()
    assert {u: (r.id, r.value, r.status) for u, r in outbox_again.items()} == {
        u: (r.id, r.value, r.status) for u, r in after.items()
    }
    assert state_again == state_after


# --- the tests ------------------------------------------------------------------------------------


# How a queued change's status and claim are combined when every situation is planned at once:
# each status unclaimed, and a live and an expired claim (the planner treats a claim like an
# attempt); the property draws from all nine.
STATUS_AND_CLAIM = [(PENDING, None), (REJECTED, None), (PARKED, None), (PENDING, "live"),
                    (REJECTED, "expired")]  # fmt: skip


def every_user_situation() -> dict[str, UserRows]:
    """One user in each situation (named after it), each status with and without a claim."""
    situations = user_situations(STATUS_AND_CLAIM)
    return {
        f"{n}:{rows.membership},{'suppressed' if rows.suppressed else '-'},{rows.told},"
        f"{rows.queued}": rows
        for n, rows in enumerate(situations)
    }


def test_every_situation_at_once_follows_the_spec(spec_pair: SpecPair) -> None:
    # Every combination of rows, in one pair: each plan checks them all against the spec.
    users = every_user_situation()
    assert len(users) == 3 * 2 * 7 * (1 + 2 * 2 * 5 + 2 * 5)
    ordinary = PairState(users, full=False, retry_rejected=True, now_offset_ms=0, plan_again=True)
    assert_plan_follows_spec(spec_pair, ordinary, analyze=True)
    full_again = PairState(
        users, full=True, retry_rejected=False, now_offset_ms=-1_500, plan_again=False
    )
    assert_plan_follows_spec(spec_pair, full_again, analyze=True)
    # With resend_on_identity_change: each situation told, and queued, under the member's
    # identity now or under an older one (in turn).
    with_identities = {
        user: dataclasses.replace(rows, told_as_member=n % 2 == 0, queued_as_member=n % 4 < 2)
        for n, (user, rows) in enumerate(users.items())
    }
    identities = PairState(
        with_identities,
        full=False,
        retry_rejected=True,
        now_offset_ms=0,
        plan_again=True,
        resend_identity=True,
    )
    assert_plan_follows_spec(spec_pair, identities, analyze=True)


@settings(deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(pair=pair_states)
def test_plan_does_to_every_user_what_the_spec_says(spec_pair: SpecPair, pair: PairState) -> None:
    assert_plan_follows_spec(spec_pair, pair)


# --- the guard inside the plan --------------------------------------------------------------------

HALF_OF_FIVE = GuardLimits(max_exit_share=0.5, min_audience_size=5)
GUARDED = "aud_guarded"
TOLD_TRUE = [f"t{n}" for n in range(10)]
EARLIER_PLAN = LAST_PLANNED - timedelta(hours=1)


@dataclass(frozen=True)
class GuardedPair:
    """A URL told true of ten members of GUARDED, and maybe of one more ("maybe": unsure)."""

    store: Store
    destination_id: int

    def outbox(self) -> dict[str, str]:
        with self.store.engine.connect() as connection:
            rows = connection.execute(
                select(outbox.c.user_id, outbox.c.value).where(
                    outbox.c.destination_id == self.destination_id
                )
            )
            return {user: value for user, value in rows}

    def pair_row(self) -> Any:
        with self.store.engine.connect() as connection:
            return connection.execute(
                select(pairs).where(
                    pairs.c.destination_id == self.destination_id, pairs.c.audience_id == GUARDED
                )
            ).one_or_none()

    def plan(self, now: datetime) -> PlanResult:
        return self.store.planning.plan(
            self.destination_id, GUARDED, full=False, now=now, limits=HALF_OF_FIVE
        )


def told_ten(store: Store, upstream: Upstream, *, planned_before: bool) -> GuardedPair:
    """The pair as earlier runs left it (``planned_before``: with the pair's row, as a plan
    leaves it; without: as a database upgraded from before there were pair rows)."""
    destination_id = store.destinations.ensure([URL], EARLIER_PLAN)[URL]
    upstream.add_audience(GUARDED, "Guarded")
    told = [{"user_id": user, "value": TRUE, "unsure": False} for user in TOLD_TRUE]
    told.append({"user_id": "maybe", "value": None, "unsure": True})
    with store.engine.begin() as connection:
        connection.execute(
            insert(state),
            [{"destination_id": destination_id, "audience_id": GUARDED, **row} for row in told],
        )
        if planned_before:
            connection.execute(
                insert(pairs).values(
                    destination_id=destination_id,
                    audience_id=GUARDED,
                    last_planned_at=EARLIER_PLAN,
                )
            )
    return GuardedPair(store, destination_id)


def test_guard_lets_exactly_the_share_of_exits_through(store: Store, upstream: Upstream) -> None:
    guarded = told_ten(store, upstream, planned_before=True)
    # Five of the ten told true leave: exactly the share. "maybe" is not a member the URL was
    # told of, so its compensating exit does not count.
    upstream.add(GUARDED, *TOLD_TRUE[:5], "newcomer")

    result = guarded.plan(LAST_PLANNED)

    assert (result.outcome, result.new_entered, result.new_exited) == (PlanOutcome.PLANNED, 1, 6)
    assert guarded.outbox() == {
        **{user: FALSE for user in [*TOLD_TRUE[5:], "maybe"]},
        "newcomer": TRUE,
    }
    assert guarded.pair_row().held_at is None


def test_guard_holds_more_than_the_share_until_approved(store: Store, upstream: Upstream) -> None:
    guarded = told_ten(store, upstream, planned_before=True)
    upstream.add(GUARDED, *TOLD_TRUE[:4], "newcomer")  # six of the ten leave

    held = guarded.plan(LAST_PLANNED)

    assert held.outcome is PlanOutcome.HELD
    assert held.hold_reason is not None and "6 of the 10 members" in held.hold_reason
    assert guarded.outbox() == {}, "a held plan queues nothing, not even its entries"
    row = guarded.pair_row()
    assert (row.held_at, row.hold_reason, row.approved_at) == (LAST_PLANNED, held.hold_reason, None)
    assert row.last_planned_at == EARLIER_PLAN, "the held plan was undone"
    # Planning again does not lift the hold (nor move when it began).
    assert guarded.plan(LAST_PLANNED + timedelta(minutes=1)).outcome is PlanOutcome.HELD
    assert guarded.pair_row().held_at == LAST_PLANNED
    assert guarded.outbox() == {}

    assert (
        store.holds.approve(Subject.audience(GUARDED), [guarded.destination_id], LAST_PLANNED) == 1
    )
    released_at = LAST_PLANNED + timedelta(minutes=2)
    released = guarded.plan(released_at)

    assert (released.outcome, released.approved) == (PlanOutcome.PLANNED, True)
    assert (released.new_entered, released.new_exited) == (1, 7)
    assert guarded.outbox() == {
        **{user: FALSE for user in [*TOLD_TRUE[4:], "maybe"]},
        "newcomer": TRUE,
    }
    row = guarded.pair_row()
    assert (row.held_at, row.hold_reason, row.approved_at) == (None, None, None)
    assert row.last_planned_at == released_at
    # The approval was for that surge: the next plan has nothing new to hold or to queue.
    after = guarded.plan(released_at + timedelta(minutes=1))
    assert (after.outcome, after.new_entered, after.new_exited, after.approved) == (
        PlanOutcome.PLANNED,
        0,
        0,
        False,
    )


def test_guard_records_the_hold_of_a_pair_without_a_row_yet(
    store: Store, upstream: Upstream
) -> None:
    # A database upgraded from one whose pairs had no row: the first plan that holds the pair
    # must still record the hold, or `syncer approve` (which looks for it) cannot release it.
    guarded = told_ten(store, upstream, planned_before=False)
    upstream.add(GUARDED, *TOLD_TRUE[:4])

    held = guarded.plan(LAST_PLANNED)

    assert held.outcome is PlanOutcome.HELD
    row = guarded.pair_row()
    assert row is not None and row.held_at == LAST_PLANNED, "the hold was not recorded"
    assert (
        store.holds.approve(Subject.audience(GUARDED), [guarded.destination_id], LAST_PLANNED) == 1
    )


# --- a pair as the upgrade to 0005 leaves it ------------------------------------------------------


def test_a_compensating_change_is_newer_than_the_change_it_corrects_after_an_upgrade(
    store: Store, upstream: Upstream
) -> None:
    # The upgrade keeps queued changes (their timestamps, whether they were sent) but records no
    # last plan for the pair (a NULL last_planned_at, or no row at all). A change queued by a
    # host whose clock is ahead, sent with no answer, is then corrected by a host whose clock is
    # behind: the correction must still carry the newer timestamp, or a workflow that orders by
    # timestamp keeps the stale value.
    destination_id = store.destinations.ensure([URL], EARLIER_PLAN)[URL]
    queued_at = LAST_PLANNED + timedelta(seconds=5)  # the other host's clock
    for audience_id, pair_row in [("aud_null_plan", True), ("aud_no_pair_row", False)]:
        upstream.add_audience(audience_id, audience_id)
        with store.engine.begin() as connection:
            if pair_row:
                connection.execute(
                    insert(pairs).values(destination_id=destination_id, audience_id=audience_id)
                )
            # "gone" was sent an entry (no answer) and has left since.
            connection.execute(
                insert(outbox).values(
                    destination_id=destination_id,
                    audience_id=audience_id,
                    user_id="gone",
                    value=TRUE,
                    forced=False,
                    attempted=True,
                    created_at=queued_at,
                    status=PENDING.value,
                    attempts=1,
                    rejections=0,
                )
            )

        store.planning.plan(
            destination_id, audience_id, full=False, now=LAST_PLANNED, limits=GUARD_OFF
        )

        with store.engine.connect() as connection:
            value, created_at = connection.execute(
                select(outbox.c.value, outbox.c.created_at).where(
                    outbox.c.destination_id == destination_id,
                    outbox.c.audience_id == audience_id,
                )
            ).one()
        assert value == FALSE
        assert created_at > queued_at, f"{audience_id}: the correction is older than the entry"
