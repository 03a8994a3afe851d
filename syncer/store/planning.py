"""Planning one (URL, audience): the diff, in set-based SQL, in one transaction.

The plan makes the outbox hold exactly what the URL must be told (the rules of
:func:`syncer.core.diff.plan_user`, which the tests hold this SQL to), and applies the mass-exit
guard to the exits it would queue, in the same transaction: what the guard counted is what is
queued, whatever upstream does meanwhile. The pair's row is locked for the transaction, so plans
of one pair never overlap; on PostgreSQL every statement reads one snapshot (REPEATABLE READ,
retried on a serialization failure), on SQLite the write lock taken at BEGIN gives the same.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, Protocol

from sqlalchemy import (
    Boolean,
    Column,
    ColumnElement,
    DateTime,
    Engine,
    Integer,
    MetaData,
    Table,
    Text,
    and_,
    delete,
    except_,
    exists,
    false,
    func,
    insert,
    literal,
    not_,
    or_,
    select,
    true,
    update,
)
from sqlalchemy.engine import Connection
from sqlalchemy.sql import Select, Subquery

from syncer.core.diff import FALSE, TRUE
from syncer.core.guard import GuardLimits, guard_verdict
from syncer.core.states import Call, ChangeStatus, Kind
from syncer.store.schema import (
    OUTBOX_MAYBE_PROCESSED,
    STATE_TOLD_TRUE,
    STATE_UNSURE,
    audience_memberships,
    audiences,
    computed_trait_values,
    deleted_users,
    destinations,
    outbox,
    pairs,
    query_members,
    query_values,
    state,
)
from syncer.store.sql import (
    dialect_insert,
    reading,
    retrying_serialization,
    rolled_back,
    row_problem,
    writing,
)

# Two plans of one pair are never less than this apart in their changes' timestamps, so a
# compensating change is always newer than the one it corrects, whatever the hosts' clocks say.
TIMESTAMP_STEP = timedelta(milliseconds=1)
# A plan that queued at least this many changes refreshes the outbox's statistics.
ANALYZE_AFTER_QUEUED = 1000
_m = audience_memberships


class PlanOutcome(enum.Enum):
    """Whether a plan queued its changes or the guard held the pair."""

    PLANNED = "planned"
    HELD = "held"


@dataclass(frozen=True)
class PlanResult:
    """What one plan did."""

    outcome: PlanOutcome
    new_entered: int = 0
    new_exited: int = 0
    queued_entries: int = 0  # all queued, sendable entries (new and from earlier runs)
    queued_exits: int = 0
    invalid: int = 0  # members that cannot be sent (not queued; planned once fixed upstream)
    invalid_example: str | None = None  # "user_id: problem" of one of them
    hold_reason: str | None = None
    approved: bool = False  # the guard would have held, but the hold was approved


class Held(Exception):
    """Raised inside the plan's transaction to undo it: the guard holds the pair."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def _same(one: Any, other: Any) -> ColumnElement[bool]:
    # An empty string is sent as absent (syncer.core.payload), so it is the same as NULL.
    return func.nullif(one, "").is_not_distinct_from(func.nullif(other, ""))


def same_identity(one: Any, other: Any) -> ColumnElement[bool]:
    """Two rows' columns name a user the same way: the same anonymous_id and email."""
    return and_(_same(one.anonymous_id, other.anonymous_id), _same(one.email, other.email))


@dataclass(frozen=True)
class Pair:
    """The SQL predicates of one (URL, audience), for the statements of a plan."""

    connection: Connection
    destination_id: int
    audience_id: str
    # `resend_on_identity_change`: a member told under another email or anonymousId than their
    # row's now is not certainly told.
    resend_identity: bool = False
    # The call the URL is sent new changes with (its `send`); queued changes keep theirs.
    call: Call = Call.IDENTIFY
    kind: Kind = Kind.AUDIENCE
    # Defined by a query in the settings: its members (or values) are the query's snapshot.
    from_query: bool = False

    @property
    def members(self) -> Any:
        """The table holding the audience's members now."""
        return query_members if self.from_query else audience_memberships

    @property
    def values(self) -> Any:
        """The table holding the trait's values now."""
        return query_values if self.from_query else computed_trait_values

    def outbox(self) -> ColumnElement[bool]:
        return and_(
            outbox.c.destination_id == self.destination_id,
            outbox.c.audience_id == self.audience_id,
            outbox.c.kind == self.kind.value,
        )

    def pair_row(self) -> ColumnElement[bool]:
        return and_(
            pairs.c.destination_id == self.destination_id,
            pairs.c.audience_id == self.audience_id,
            pairs.c.kind == self.kind.value,
        )

    def state_rows(self) -> ColumnElement[bool]:
        return and_(
            state.c.destination_id == self.destination_id,
            state.c.audience_id == self.audience_id,
            state.c.kind == self.kind.value,
        )

    def member(self, user: Any) -> ColumnElement[bool]:
        return exists().where(
            self.members.c.audience_id == self.audience_id, self.members.c.user_id == user
        )

    def valid_member(self, user: Any) -> ColumnElement[bool]:
        problem = row_problem(
            self.connection,
            self.members.c.user_id,
            self.members.c.anonymous_id,
            self.members.c.email,
        )
        return exists().where(
            self.members.c.audience_id == self.audience_id,
            self.members.c.user_id == user,
            problem.is_(None),
        )

    @staticmethod
    def suppressed(user: Any) -> ColumnElement[bool]:
        return exists().where(deleted_users.c.user_id == user)

    def _state(self, user: Any) -> ColumnElement[bool]:
        return and_(self.state_rows(), state.c.user_id == user)

    def certainly_true_rows(self) -> ColumnElement[bool]:
        """The pair's state rows of members the URL certainly holds ``true`` for."""
        return and_(self.state_rows(), STATE_TOLD_TRUE, state.c.unsure == false())

    def certainly_true(self, user: Any) -> ColumnElement[bool]:
        return exists().where(self.certainly_true_rows(), state.c.user_id == user)

    def certainly_told_as_member(self, user: Any) -> ColumnElement[bool]:
        """The URL certainly holds ``true`` for this member, under the identity they have now
        when identities matter (``resend_identity``)."""
        if not self.resend_identity:
            return self.certainly_true(user)
        member = self.members.alias("member_now")
        return exists().where(
            self._state(user),
            state.c.value == TRUE,
            state.c.unsure == false(),
            member.c.audience_id == self.audience_id,
            member.c.user_id == user,
            same_identity(state.c, member.c),
        )

    def names_member_as_now(self, anonymous_id: Any, email: Any, user: Any) -> ColumnElement[bool]:
        """A change naming ``user`` this way still names them as their row does (always true
        unless identities matter)."""
        if not self.resend_identity:
            return true()
        member = self.members.alias("member_now")
        return exists().where(
            member.c.audience_id == self.audience_id,
            member.c.user_id == user,
            _same(member.c.anonymous_id, anonymous_id),
            _same(member.c.email, email),
        )

    def may_hold_a_value(self, user: Any) -> ColumnElement[bool]:
        return exists().where(
            self._state(user), or_(state.c.value == TRUE, state.c.unsure == true())
        )

    def queued(self, user: Any) -> ColumnElement[bool]:
        return exists().where(self.outbox(), outbox.c.user_id == user)


_OUTBOX_COLUMNS = [
    "destination_id", "audience_id", "user_id", "value", "anonymous_id", "email", "forced",
    "attempted", "created_at", "status", "attempts", "rejections", "call", "kind",
]  # fmt: skip


def change_columns(
    pair: Pair,
    *,
    user: Any,
    value: Any,
    forced: bool,
    now: datetime,
    anonymous_id: Any = None,
    email: Any = None,
) -> list[Any]:
    """The columns of a new change of the pair, in the outbox's order (``insert_changes``):
    ``user``, ``anonymous_id`` and ``email`` are columns of the rows the change is made from
    (no identity: NULL); ``value`` is a column, or a text taken as it is."""
    return [
        literal(pair.destination_id, Integer),
        literal(pair.audience_id, Text),
        user,
        literal(value, Text) if isinstance(value, str) else value,
        literal(None, Text) if anonymous_id is None else anonymous_id,
        literal(None, Text) if email is None else email,
        literal(forced, Boolean),
        literal(False, Boolean),
        literal(now, DateTime),
        literal(ChangeStatus.PENDING.value, Text),
        literal(0, Integer),
        literal(0, Integer),
        literal(pair.call.value, Text),
        literal(pair.kind.value, Text),
    ]


def member_change_columns(
    pair: Pair, rows: Any, *, value: str, forced: bool, now: datetime
) -> list[Any]:
    """:func:`change_columns` of an audience's change made from ``rows``, columns that name
    the user as upstream does (``user_id``, ``anonymous_id``, ``email``)."""
    return change_columns(
        pair,
        user=rows.user_id,
        value=value,
        forced=forced,
        now=now,
        anonymous_id=rows.anonymous_id,
        email=rows.email,
    )


def insert_changes(connection: Connection, select_: Any) -> int:
    """Insert the changes ``select_`` yields (the outbox's columns, in planning's order);
    return how many."""
    counted = connection.execution_options(preserve_rowcount=True)
    postgresql = connection.dialect.name == "postgresql"
    if postgresql:
        # The statement reads the outbox it writes to (to skip users already queued). With the
        # outbox nearly empty when statistics were taken, PostgreSQL would rescan it for every
        # row read, walking the rows the statement has just inserted: quadratic, 6 s for 30,000
        # members. Index lookups (or one hash of it) stay linear.
        connection.exec_driver_sql("SET LOCAL enable_seqscan = off")
    try:
        return int(counted.execute(insert(outbox).from_select(_OUTBOX_COLUMNS, select_)).rowcount)
    finally:
        if postgresql:
            connection.exec_driver_sql("SET LOCAL enable_seqscan TO DEFAULT")


def count_invalid(
    connection: Connection, user: Any, problem: Any, rows: ColumnElement[bool]
) -> tuple[int, str | None]:
    """How many of ``rows`` cannot be sent (``problem`` is not NULL), and one of them as
    "user_id: problem" (the first by user id), for the report."""
    invalid = and_(rows, problem.is_not(None))
    count = int(connection.execute(select(func.count()).where(invalid)).scalar_one())
    if not count:
        return 0, None
    first = connection.execute(select(user, problem).where(invalid).order_by(user).limit(1)).one()
    return count, f"{first[0]!r}: {first[1]}"


def ensure_pair(pair: Pair) -> None:
    """Create the pair's row if it has none yet."""
    # Outside the plan's savepoint: a hold must find the row even when the plan is undone.
    pair.connection.execute(
        dialect_insert(pair.connection, pairs)
        .values(
            destination_id=pair.destination_id, audience_id=pair.audience_id, kind=pair.kind.value
        )
        .on_conflict_do_nothing()
    )


def lock_pair(pair: Pair) -> Any:
    """Lock the pair's row for the plan's transaction, and return it."""
    return pair.connection.execute(select(pairs).where(pair.pair_row()).with_for_update()).one()


def plan_floor(pair: Pair, row: Any, now: datetime) -> datetime:
    """The timestamp of the plan's new changes: ``now``, or later than every change of the pair
    before it, whatever the clocks of the hosts that planned those said."""
    newest_queued = pair.connection.execute(
        select(func.max(outbox.c.created_at)).where(pair.outbox())
    ).scalar_one()
    floor: datetime | None = max(
        (t for t in (row.last_planned_at, newest_queued) if t is not None), default=None
    )
    if floor is not None and now <= floor:
        return floor + TIMESTAMP_STEP
    return now


def start_plan(pair: Pair, now: datetime, retry_rejected: bool) -> tuple[datetime, bool, bool]:
    """Lock the pair, and put changes rejected by an earlier run back in line (once per run);
    return the plan's timestamp (:func:`plan_floor`), whether the pair is held, and whether the
    hold was approved."""
    row = lock_pair(pair)
    if retry_rejected:
        pair.connection.execute(
            update(outbox)
            .where(pair.outbox(), outbox.c.status == ChangeStatus.REJECTED.value)
            .values(status=ChangeStatus.PENDING.value)
        )
    held = row.held_at is not None
    return plan_floor(pair, row, now), held, held and row.approved_at is not None


def mark_dropped_as_doubtful(pair: Pair, dropped: ColumnElement[bool]) -> None:
    """Delete the pair's queued changes that are ``dropped``; a change that may have been
    processed leaves its doubt behind: until the URL accepts a newer value, the current one is
    sent even if it looks like a no-op."""
    o = outbox.c
    connection = pair.connection
    doubtful = select(
        o.destination_id,
        o.audience_id,
        o.kind,
        o.user_id,
        literal(True, Boolean),
        o.anonymous_id,
        o.email,
    ).where(pair.outbox(), OUTBOX_MAYBE_PROCESSED, dropped, not_(pair.suppressed(o.user_id)))
    upsert = dialect_insert(connection, state).from_select(
        ["destination_id", "audience_id", "kind", "user_id", "unsure", "anonymous_id", "email"],
        doubtful,
    )
    connection.execute(
        upsert.on_conflict_do_update(
            index_elements=["destination_id", "audience_id", "kind", "user_id"],
            set_={"unsure": True},
        )
    )
    connection.execute(delete(outbox).where(pair.outbox(), dropped))


def finish_plan(pair: Pair, now: datetime, held: bool) -> dict[str, int]:
    """Note the plan's time on the pair (lifting a hold it had), and count what is queued by
    value: sendable changes, not parked ones."""
    connection = pair.connection
    o = outbox.c
    queued: dict[str, int] = dict(
        connection.execute(
            select(o.value, func.count())
            .where(pair.outbox(), o.status != ChangeStatus.PARKED.value)
            .group_by(o.value)
        ).all()
    )
    connection.execute(
        update(pairs)
        .where(pair.pair_row())
        .values(
            last_planned_at=now,
            **({"held_at": None, "hold_reason": None, "approved_at": None} if held else {}),
        )
    )
    return queued


def _plan_in(
    pair: Pair, *, full: bool, now: datetime, limits: GuardLimits, retry_rejected: bool = True
) -> PlanResult:
    connection = pair.connection
    now, held, approved = start_plan(pair, now, retry_rejected)

    o = outbox.c
    kept = and_(
        not_(pair.suppressed(o.user_id)),
        or_(
            # A member whose row cannot be sent is left exactly as it is.
            and_(pair.member(o.user_id), not_(pair.valid_member(o.user_id))),
            and_(
                o.value == TRUE,
                pair.valid_member(o.user_id),
                pair.names_member_as_now(o.anonymous_id, o.email, o.user_id),
                or_(
                    OUTBOX_MAYBE_PROCESSED,
                    o.forced,
                    literal(full, Boolean),
                    not_(pair.certainly_told_as_member(o.user_id)),
                ),
            ),
            and_(
                o.value == FALSE,
                not_(pair.member(o.user_id)),
                or_(OUTBOX_MAYBE_PROCESSED, pair.may_hold_a_value(o.user_id)),
            ),
        ),
    )
    mark_dropped_as_doubtful(pair, not_(kept))
    if full:
        connection.execute(update(outbox).where(pair.outbox(), o.value == TRUE).values(forced=True))

    entering = _entry_candidates(pair, full)
    if connection.dialect.name == "sqlite":
        # Read once: reading the candidates twice (to insert, then to count the invalid ones)
        # was a tenth of a run that found 1% churn in a million memberships.
        with filled(connection, _entry_scratch, entering) as found:
            new_entered, invalid, example = _enter(pair, found, full, now)
    else:
        new_entered, invalid, example = _enter(pair, entering.subquery("candidates"), full, now)

    s = state.c
    leaving = and_(
        pair.state_rows(),
        not_(pair.member(s.user_id)),
        not_(pair.queued(s.user_id)),
        not_(pair.suppressed(s.user_id)),
    )
    exit_columns = member_change_columns(pair, s, value=FALSE, forced=False, now=now)
    if connection.dialect.name == "sqlite":
        gone = _sorted_difference(
            select(s.user_id).where(STATE_TOLD_TRUE, pair.state_rows()),
            select(pair.members.c.user_id).where(pair.members.c.audience_id == pair.audience_id),
        )
        told_leaving = (
            select(*exit_columns)
            .join_from(gone, state, and_(pair.state_rows(), s.user_id == gone.c.user_id))
            .where(not_(pair.queued(s.user_id)), not_(pair.suppressed(s.user_id)))
        )
    else:
        told_leaving = select(*exit_columns).where(STATE_TOLD_TRUE, leaving)
    new_exited = insert_changes(connection, told_leaving)
    told = int(
        connection.execute(
            select(func.count()).where(pair.state_rows(), STATE_TOLD_TRUE)
        ).scalar_one()
    )
    verdict = guard_verdict(told=told, new_exits=new_exited, limits=limits)
    if verdict.hold and not approved:
        raise Held(verdict.reason)
    # Users the URL may have been told about without ever accepting: tell them they are out.
    new_exited += insert_changes(
        connection,
        select(*exit_columns).where(STATE_UNSURE, or_(s.value.is_(None), s.value != TRUE), leaving),
    )

    queued = finish_plan(pair, now, held)
    return PlanResult(
        PlanOutcome.PLANNED,
        new_entered=new_entered,
        new_exited=new_exited,
        queued_entries=int(queued.get(TRUE, 0)),
        queued_exits=int(queued.get(FALSE, 0)),
        invalid=invalid,
        invalid_example=example,
        approved=approved and verdict.hold,
    )


def _sorted_difference(left: Select[Any], right: Select[Any]) -> Subquery:
    """``left EXCEPT right``, of user ids, as a subquery that SQLite computes as one merge of
    the two sorted index scans.

    SQLite answers "not in the other table" row by row, one index probe per row: 0.25 s for
    each 100,000 members of a pair, against 0.05 s for the merge, which it does for a compound
    SELECT with an ORDER BY. The LIMIT keeps the ORDER BY, which SQLite drops from a subquery
    in FROM otherwise (-1: no limit).
    """
    difference = except_(left, right)
    return difference.order_by(difference.selected_columns.user_id).limit(-1).subquery()


def _entry_candidates(pair: Pair, full: bool) -> Select[Any]:
    """The members that may need an entry queued (user_id, anonymous_id, email and the
    problem of their row, NULL when it can be sent): not suppressed, not queued, and not
    certainly told (a full sync: all)."""
    connection = pair.connection
    m = pair.members
    member_rows = select(
        m.c.user_id,
        m.c.anonymous_id,
        m.c.email,
        row_problem(connection, m.c.user_id, m.c.anonymous_id, m.c.email).label("problem"),
    )
    not_in_hand = and_(not_(pair.suppressed(m.c.user_id)), not_(pair.queued(m.c.user_id)))
    if connection.dialect.name == "sqlite" and not full and not pair.resend_identity:
        untold = _sorted_difference(
            select(m.c.user_id).where(m.c.audience_id == pair.audience_id),
            select(state.c.user_id).where(pair.certainly_true_rows()),
        )
        return member_rows.join_from(
            untold, m, and_(m.c.audience_id == pair.audience_id, m.c.user_id == untold.c.user_id)
        ).where(not_in_hand)
    return member_rows.where(
        m.c.audience_id == pair.audience_id,
        not_in_hand,
        or_(literal(full, Boolean), not_(pair.certainly_told_as_member(m.c.user_id))),
    )


def _enter(pair: Pair, candidates: Any, full: bool, now: datetime) -> tuple[int, int, str | None]:
    """Queue an entry for each of ``candidates`` (see :func:`_entry_candidates`) that can be
    sent; return how many, and the invalid count and example of :func:`count_invalid`."""
    c = candidates.c
    entry = member_change_columns(pair, c, value=TRUE, forced=full, now=now)
    entered = insert_changes(pair.connection, select(*entry).where(c.problem.is_(None)))
    invalid, example = count_invalid(pair.connection, c.user_id, c.problem, true())
    return entered, invalid, example


@contextmanager
def filled(connection: Connection, table: Table, rows: Select[Any]) -> Iterator[Table]:
    """``table``, a temporary table of the connection, holding ``rows`` (its columns, in
    order) for the block, and emptied after it.

    Its rows are written in the plan's transaction: a plan undone leaves none behind (nor the
    table, if the plan created it). Made on SQLite for rows that two statements of a plan read,
    which SQLite would otherwise find twice.
    """
    table.create(connection, checkfirst=True)
    connection.execute(insert(table).from_select([c.name for c in table.c], rows))
    yield table
    connection.execute(delete(table))


def scratch_table(name: str, *columns: Column[Any]) -> Table:
    """A temporary table for :func:`filled`."""
    return Table(name, MetaData(), *columns, prefixes=["TEMPORARY"])


# The entry candidates of one plan on SQLite (:func:`_entry_candidates`' columns).
_entry_scratch = scratch_table(
    "syncer_plan_candidates",
    Column("user_id", Text, nullable=False),
    Column("anonymous_id", Text),
    Column("email", Text),
    Column("problem", Text),
)


class _PlanIn(Protocol):
    def __call__(
        self,
        pair: Pair,
        *,
        full: bool,
        now: datetime,
        limits: GuardLimits,
        retry_rejected: bool = True,
    ) -> PlanResult: ...


def _planner(kind: Kind) -> _PlanIn:
    if kind is Kind.AUDIENCE:
        return _plan_in
    # Imported here: the trait planner is built on this module's pieces.
    from syncer.store.trait_planning import plan_trait_in

    return plan_trait_in


class PlanStore:
    """Plans (URL, audience) pairs, for real or as a dry run."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def pairs_with_work(
        self,
        destination_ids: list[int],
        audience_ids: list[str],
        *,
        resend_on_identity_change: bool = False,
    ) -> set[tuple[int, str]]:
        """The (URL, audience) pairs a run must plan (of table-defined audiences; traits have
        :meth:`trait_pairs_with_work`), found in a few set-based statements over
        every pair at once: those with changes queued or rejected, those held, those with a
        member the URL is not certainly told about, and those the URL may believe holds a user
        who is no longer a member. Every other pair has nothing to do; planning it would
        change nothing."""
        if not destination_ids or not audience_ids:
            return set()
        o, s, d, a = outbox.c, state.c, destinations.c, audiences.c
        wanted_pair = and_(o.destination_id.in_(destination_ids), o.audience_id.in_(audience_ids))
        queued = (
            select(o.destination_id, o.audience_id)
            .where(
                wanted_pair,
                o.kind == Kind.AUDIENCE.value,
                o.status.in_([ChangeStatus.PENDING.value, ChangeStatus.REJECTED.value]),
            )
            .distinct()
        )
        held = select(pairs.c.destination_id, pairs.c.audience_id).where(
            pairs.c.destination_id.in_(destination_ids),
            pairs.c.audience_id.in_(audience_ids),
            pairs.c.kind == Kind.AUDIENCE.value,
            pairs.c.held_at.is_not(None),
        )
        # Each pair is asked whether one member is not certainly told, and whether one user
        # the URL may believe a member is not one.
        told = (
            exists()
            .where(
                s.destination_id == d.id,
                s.audience_id == _m.c.audience_id,
                s.kind == Kind.AUDIENCE.value,
                s.user_id == _m.c.user_id,
                STATE_TOLD_TRUE,
                s.unsure == false(),
                same_identity(s, _m.c) if resend_on_identity_change else true(),
            )
            # The URL is the outermost query's, two levels up: left to itself, SQLAlchemy
            # correlates only with the query just around, and would ask about every URL.
            .correlate_except(state)
        )
        entering_member = exists().where(
            _m.c.audience_id == a.id,
            not_(told),
            not_(exists().where(deleted_users.c.user_id == _m.c.user_id)),
        )
        leaving_user = exists().where(
            s.destination_id == d.id,
            s.audience_id == a.id,
            s.kind == Kind.AUDIENCE.value,
            or_(STATE_TOLD_TRUE, STATE_UNSURE),
            not_(exists().where(_m.c.audience_id == s.audience_id, _m.c.user_id == s.user_id)),
        )
        every_pair = (
            select(d.id, a.id)
            .select_from(destinations.join(audiences, true()))
            .where(d.id.in_(destination_ids), a.id.in_(audience_ids))
        )
        with reading(self.engine) as connection:
            found: set[tuple[int, str]] = set()
            if connection.dialect.name == "sqlite":
                # Per pair, left to right, stopping at the first row found: exits first, since
                # a member who left is found anywhere in the pair's rows, while a new member
                # often sorts after every other (ids handed out in order).
                changed = [every_pair.where(or_(leaving_user, entering_member))]
            else:
                # Each EXISTS on its own becomes a hash semi-join, one pass over every pair;
                # under an OR, PostgreSQL would probe the index member by member instead.
                changed = [every_pair.where(leaving_user), every_pair.where(entering_member)]
            for statement in (queued, held, *changed):
                found.update((int(row[0]), str(row[1])) for row in connection.execute(statement))
            return found

    def trait_pairs_with_work(
        self, destination_ids: list[int], trait_ids: list[str]
    ) -> set[tuple[int, str]]:
        """:meth:`pairs_with_work` for table-defined computed traits (see
        :func:`syncer.store.trait_planning.trait_pairs_with_work`)."""
        from syncer.store.trait_planning import trait_pairs_with_work

        with reading(self.engine) as connection:
            return trait_pairs_with_work(connection, destination_ids, trait_ids)

    def plan(
        self,
        destination_id: int,
        audience_id: str,
        *,
        full: bool,
        now: datetime,
        limits: GuardLimits,
        retry_rejected: bool = True,
        resend_on_identity_change: bool = False,
        call: Call = Call.IDENTIFY,
        kind: Kind = Kind.AUDIENCE,
        from_query: bool = False,
    ) -> PlanResult:
        """Make the pair's outbox hold exactly what its URL must be told, or hold the pair.

        ``retry_rejected``: put changes rejected earlier back in line (the first plan of a run
        does; a second plan in the same run does not, so a rejection counts once per run).
        ``resend_on_identity_change``: a member whose email or anonymousId is not the one the
        URL was told with is sent again (see :func:`syncer.core.diff.plan_user`). ``call``:
        the call new changes are sent with; queued ones keep theirs. ``kind``: whether
        ``audience_id`` names an audience or a computed trait; ``from_query``: it is defined
        by a query in the settings, and its members or values are the query's snapshot.
        """
        plan_in = _planner(kind)

        def attempt() -> PlanResult:
            with writing(self.engine, snapshot=True) as connection:
                pair = Pair(
                    connection,
                    destination_id,
                    audience_id,
                    resend_on_identity_change,
                    call,
                    kind,
                    from_query,
                )
                ensure_pair(pair)
                try:
                    with connection.begin_nested():
                        return plan_in(
                            pair, full=full, now=now, limits=limits, retry_rejected=retry_rejected
                        )
                except Held as held:
                    reason = held.reason
                connection.execute(
                    update(pairs)
                    .where(pair.pair_row())
                    .values(
                        held_at=func.coalesce(pairs.c.held_at, now),
                        hold_reason=reason,
                    )
                )
                return PlanResult(PlanOutcome.HELD, hold_reason=reason)

        result = retrying_serialization(attempt)
        if result.new_entered + result.new_exited >= ANALYZE_AFTER_QUEUED:
            self._analyze_outbox()
        return result

    def _analyze_outbox(self) -> None:
        # The statistics taken at the start of the run saw the outbox before this plan filled
        # it: with them, PostgreSQL claims each chunk by sorting the whole pending outbox
        # (50 ms a chunk at 30,000 rows) instead of walking the pair's index (under 1 ms).
        if self.engine.dialect.name == "postgresql":
            with writing(self.engine) as connection:
                connection.exec_driver_sql("ANALYZE syncer_outbox")

    def dry_run(
        self,
        url: str,
        canonical: str,
        audience_id: str,
        *,
        full: bool,
        now: datetime,
        limits: GuardLimits,
        batch_size: int,
        emit: Callable[[str, str, Call], None],
        resend_on_identity_change: bool = False,
        call: Call = Call.IDENTIFY,
        kind: Kind = Kind.AUDIENCE,
        prepare: Callable[[Connection], None] | None = None,
    ) -> PlanResult:
        """Plan exactly as a run would, hand every change it would send to ``emit(user, value,
        call)`` in batches, then undo everything: nothing is written. ``prepare(connection)``
        runs first in the same transaction (evaluating the query of an audience or trait
        defined by one: a dry run then plans from its snapshot)."""
        with rolled_back(self.engine) as connection:
            connection.execute(
                dialect_insert(connection, destinations)
                .values(url=url, canonical=canonical, first_seen_at=now)
                .on_conflict_do_nothing()
            )
            destination_id = connection.execute(
                select(destinations.c.id).where(destinations.c.canonical == canonical)
            ).scalar_one()
            if prepare is not None:
                prepare(connection)
            pair = Pair(
                connection,
                destination_id,
                audience_id,
                resend_on_identity_change,
                call,
                kind,
                from_query=prepare is not None,
            )
            ensure_pair(pair)
            try:
                with connection.begin_nested():
                    result = _planner(kind)(pair, full=full, now=now, limits=limits)
            except Held as held:
                return PlanResult(PlanOutcome.HELD, hold_reason=held.reason)
            rows = connection.execution_options(stream_results=True, yield_per=batch_size).execute(
                select(outbox.c.user_id, outbox.c.value, outbox.c.call)
                .where(
                    pair.outbox(),
                    outbox.c.status == ChangeStatus.PENDING.value,
                    not_(pair.suppressed(outbox.c.user_id)),
                )
                .order_by(outbox.c.id)
            )
            for partition in rows.partitions(batch_size):
                for user_id, value, call in partition:
                    emit(user_id, value, Call(call))
            return result
