"""Planning one (URL, computed trait): the diff of JSON values, in set-based SQL, in one
transaction.

The rules are :func:`syncer.core.diff.plan_user`'s, with a user's current value for
``current`` and ``null`` for ``absent_value``: a user whose row holds a value (anything but SQL
NULL or JSON null) is sent it when the URL does not certainly hold an equal one, and a user the
URL may believe has a value, whose row is gone or null, is sent ``null``. "Equal" is JSON
equality (:mod:`syncer.core.jsonvalues`: PostgreSQL's jsonb equality, the same on SQLite), and
the value sent is the text upstream stored, taken into the outbox by the database itself. The
mass-exit guard counts the nulls of values the URL holds, as it counts an audience's exits.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import (
    Boolean,
    Column,
    ColumnElement,
    Text,
    and_,
    case,
    exists,
    false,
    func,
    literal,
    not_,
    or_,
    select,
    true,
    update,
)
from sqlalchemy.engine import Connection

from syncer.core.diff import NULL_VALUE
from syncer.core.guard import GuardLimits, guard_verdict
from syncer.core.states import ChangeStatus, Kind
from syncer.store.planning import (
    Held,
    Pair,
    PlanOutcome,
    PlanResult,
    change_columns,
    count_invalid,
    filled,
    finish_plan,
    insert_changes,
    mark_dropped_as_doubtful,
    scratch_table,
    start_plan,
)
from syncer.store.schema import (
    OUTBOX_MAYBE_PROCESSED,
    computed_trait_values,
    computed_traits,
    deleted_users,
    destinations,
    outbox,
    pairs,
    state,
)
from syncer.store.sql import is_json_null, json_text, row_problem, same_json

NOT_JSON = "value is not JSON"


def trait_value_problem(connection: Connection, user_id: Any, value: Any) -> ColumnElement[Any]:
    """Why a trait row cannot be sent, or NULL: its user_id breaks the rules every row keeps
    (:func:`syncer.core.payload.user_input_problem`), or its value is not JSON (only SQLite can
    hold such a value: PostgreSQL's json type refuses it)."""
    nothing = literal(None, Text)
    user_problem = row_problem(connection, user_id, nothing, nothing)
    if connection.dialect.name != "sqlite":
        return user_problem
    return func.coalesce(
        user_problem, case((func.syncer_json_key(value).is_(None), literal(NOT_JSON)))
    )


def _holds_a_value(value: Any) -> ColumnElement[bool]:
    # SQL NULL and JSON null are no value; text that is not JSON is one (an invalid one).
    return and_(value.is_not(None), not_(is_json_null(value)))


def _told_a_value() -> ColumnElement[bool]:
    # What the syncer recorded is what it sent: a value, or exactly "null".
    return and_(state.c.value.is_not(None), state.c.value != NULL_VALUE)


class _Trait:
    """The SQL predicates of one (URL, trait) plan, about one user at a time."""

    def __init__(self, pair: Pair) -> None:
        self.pair = pair
        self.table = v = pair.values
        self.value = json_text(v.c.value)
        self.problem = trait_value_problem(pair.connection, v.c.user_id, v.c.value)

    def row(self, user: Any) -> ColumnElement[bool]:
        v = self.table
        return and_(v.c.trait_id == self.pair.audience_id, v.c.user_id == user)

    def has_value(self, user: Any) -> ColumnElement[bool]:
        """The user's row holds a value, sendable or not."""
        return exists().where(self.row(user), _holds_a_value(self.value))

    def has_invalid_value(self, user: Any) -> ColumnElement[bool]:
        return exists().where(self.row(user), _holds_a_value(self.value), self.problem.is_not(None))

    def holds(self, user: Any, value: Any) -> ColumnElement[bool]:
        """The user's row holds a sendable value equal to ``value``."""
        return exists().where(
            self.row(user),
            _holds_a_value(self.value),
            self.problem.is_(None),
            same_json(self.value, value),
        )

    def certainly_told(self, user: Any, value: Any) -> ColumnElement[bool]:
        """The URL certainly holds a value equal to ``value`` for the user."""
        return exists().where(
            self.pair.state_rows(),
            state.c.user_id == user,
            state.c.unsure == false(),
            same_json(state.c.value, value),
        )

    def may_hold_a_value(self, user: Any) -> ColumnElement[bool]:
        return exists().where(
            self.pair.state_rows(),
            state.c.user_id == user,
            or_(_told_a_value(), state.c.unsure == true()),
        )


# The values of one plan on SQLite that may be sent, or are queued (see plan_trait_in).
_trait_scratch = scratch_table(
    "syncer_plan_trait_candidates",
    Column("user_id", Text, nullable=False),
    Column("value", Text),
    Column("problem", Text),
    Column("enters", Boolean, nullable=False),  # not queued: a change may be planned
)

# Users whose stale forced change is replaced per statement: bounded, whatever the backlog.
_REPLACED_PER_ROUND = 1000


def _replace_stale_forced(
    pair: Pair, trait: _Trait, kept: ColumnElement[bool], now: datetime
) -> int:
    """Replace each forced change (queued by ``sync --full``) whose value is no longer the
    user's with a forced change of the current value: the URL is owed the current value even if
    it certainly holds it, as a full sync promised. Return how many were queued."""
    connection, o, v = pair.connection, outbox.c, trait.table
    stale = (
        select(o.user_id)
        .where(
            pair.outbox(),
            o.forced,
            not_(kept),
            not_(pair.suppressed(o.user_id)),
            exists().where(
                trait.row(o.user_id), _holds_a_value(trait.value), trait.problem.is_(None)
            ),
        )
        .limit(_REPLACED_PER_ROUND)
    )
    queued = 0
    while users := list(connection.execute(stale).scalars()):
        mark_dropped_as_doubtful(pair, o.user_id.in_(users))
        queued += insert_changes(
            connection,
            select(
                *change_columns(pair, user=v.c.user_id, value=trait.value, forced=True, now=now)
            ).where(v.c.trait_id == pair.audience_id, v.c.user_id.in_(users)),
        )
    return queued


def plan_trait_in(
    pair: Pair, *, full: bool, now: datetime, limits: GuardLimits, retry_rejected: bool = True
) -> PlanResult:
    """Plan one (URL, trait) inside the plan's transaction; raise :class:`Held` when the guard
    holds it."""
    connection = pair.connection
    now, held, approved = start_plan(pair, now, retry_rejected)
    trait = _Trait(pair)
    o, v = outbox.c, trait.table
    is_full = literal(full, Boolean)
    kept = and_(
        not_(pair.suppressed(o.user_id)),
        or_(
            # A row that cannot be sent is left exactly as it is.
            trait.has_invalid_value(o.user_id),
            and_(
                o.value != NULL_VALUE,
                trait.holds(o.user_id, o.value),
                or_(
                    OUTBOX_MAYBE_PROCESSED,
                    o.forced,
                    is_full,
                    not_(trait.certainly_told(o.user_id, o.value)),
                ),
            ),
            and_(
                o.value == NULL_VALUE,
                not_(trait.has_value(o.user_id)),
                or_(OUTBOX_MAYBE_PROCESSED, trait.may_hold_a_value(o.user_id)),
            ),
        ),
    )
    new_values = _replace_stale_forced(pair, trait, kept, now)
    mark_dropped_as_doubtful(pair, not_(kept))
    if full:
        connection.execute(
            update(outbox).where(pair.outbox(), o.value != NULL_VALUE).values(forced=True)
        )

    present = and_(
        v.c.trait_id == pair.audience_id,
        _holds_a_value(trait.value),
        not_(pair.suppressed(v.c.user_id)),
    )
    untold = or_(is_full, not_(trait.certainly_told(v.c.user_id, trait.value)))
    if connection.dialect.name == "sqlite":
        # On SQLite a value's problem is a call into Python (is it JSON?), which SQLite would
        # make for every present value, in the insert and again in the count: over half of a
        # run that found 1% of 200,000 values changed (py-spy), 16-18 s where it now takes
        # 4.5-5.3 s. Read once, with the problem checked only for the values that may be sent
        # (and the queued ones, which the count includes).
        in_outbox = pair.queued(v.c.user_id)
        rows = select(v.c.user_id, trait.value, trait.problem, not_(in_outbox)).where(
            present, or_(in_outbox, untold)
        )
        with filled(connection, _trait_scratch, rows) as found:
            f = found.c
            new_values += insert_changes(
                connection,
                select(
                    *change_columns(pair, user=f.user_id, value=f.value, forced=full, now=now)
                ).where(f.enters, f.problem.is_(None)),
            )
            invalid, example = count_invalid(connection, f.user_id, f.problem, true())
    else:
        new_values += insert_changes(
            connection,
            select(
                *change_columns(pair, user=v.c.user_id, value=trait.value, forced=full, now=now)
            ).where(present, not_(pair.queued(v.c.user_id)), untold, trait.problem.is_(None)),
        )
        invalid, example = count_invalid(connection, v.c.user_id, trait.problem, present)

    s = state.c
    gone = and_(
        pair.state_rows(),
        not_(trait.has_value(s.user_id)),
        not_(pair.queued(s.user_id)),
        not_(pair.suppressed(s.user_id)),
    )
    nulls = change_columns(pair, user=s.user_id, value=NULL_VALUE, forced=False, now=now)
    new_nulls = insert_changes(connection, select(*nulls).where(_told_a_value(), gone))
    told = int(
        connection.execute(
            select(func.count()).where(pair.state_rows(), _told_a_value())
        ).scalar_one()
    )
    verdict = guard_verdict(told=told, new_exits=new_nulls, limits=limits, of_trait=True)
    if verdict.hold and not approved:
        raise Held(verdict.reason)
    # Users the URL may have been told a value without ever accepting one: tell them null.
    new_nulls += insert_changes(
        connection,
        select(*nulls).where(s.unsure == true(), not_(_told_a_value()), gone),
    )

    queued = finish_plan(pair, now, held)
    return PlanResult(
        PlanOutcome.PLANNED,
        new_entered=new_values,
        new_exited=new_nulls,
        queued_entries=sum(n for value, n in queued.items() if value != NULL_VALUE),
        queued_exits=int(queued.get(NULL_VALUE, 0)),
        invalid=invalid,
        invalid_example=example,
        approved=approved and verdict.hold,
    )


def trait_pairs_with_work(
    connection: Connection, destination_ids: list[int], trait_ids: list[str]
) -> set[tuple[int, str]]:
    """The (URL, trait) pairs a run must plan, found in a few set-based statements over every
    pair at once: those with changes queued or rejected, those held, those with a value whose
    text is not the one the URL certainly holds, and those whose URL may hold a value the trait
    no longer has. Texts, not values, are compared: a value spelled anew is planned (and the
    plan, by JSON equality, sends nothing); every other pair has nothing to do."""
    if not destination_ids or not trait_ids:
        return set()
    o, s, d, v = outbox.c, state.c, destinations.c, computed_trait_values.c
    trait = Kind.TRAIT.value
    queued = (
        select(o.destination_id, o.audience_id)
        .where(
            o.destination_id.in_(destination_ids),
            o.audience_id.in_(trait_ids),
            o.kind == trait,
            o.status.in_([ChangeStatus.PENDING.value, ChangeStatus.REJECTED.value]),
        )
        .distinct()
    )
    held = select(pairs.c.destination_id, pairs.c.audience_id).where(
        pairs.c.destination_id.in_(destination_ids),
        pairs.c.audience_id.in_(trait_ids),
        pairs.c.kind == trait,
        pairs.c.held_at.is_not(None),
    )
    value = json_text(v.value)
    told = (
        exists()
        .where(
            s.destination_id == d.id,
            s.audience_id == v.trait_id,
            s.kind == trait,
            s.user_id == v.user_id,
            s.unsure == false(),
            s.value == value,
        )
        .correlate_except(state)
    )
    new_value = exists().where(
        v.trait_id == computed_traits.c.id,
        _holds_a_value(value),
        not_(told),
        not_(exists().where(deleted_users.c.user_id == v.user_id)),
    )
    current = computed_trait_values.alias("current")
    gone_value = exists().where(
        s.destination_id == d.id,
        s.audience_id == computed_traits.c.id,
        s.kind == trait,
        or_(_told_a_value(), s.unsure == true()),
        not_(
            exists().where(
                current.c.trait_id == s.audience_id,
                current.c.user_id == s.user_id,
                _holds_a_value(json_text(current.c.value)),
            )
        ),
    )
    every_pair = (
        select(d.id, computed_traits.c.id)
        .select_from(destinations.join(computed_traits, true()))
        .where(d.id.in_(destination_ids), computed_traits.c.id.in_(trait_ids))
    )
    found: set[tuple[int, str]] = set()
    for statement in (queued, held, every_pair.where(gone_value), every_pair.where(new_value)):
        found.update((int(row[0]), str(row[1])) for row in connection.execute(statement))
    return found
