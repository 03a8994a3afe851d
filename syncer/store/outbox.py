"""The outbox: claiming queued changes just before sending them, and recording what the URL
did with them, fenced by the claim."""

from __future__ import annotations

import json
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import (
    BigInteger,
    ColumnElement,
    DateTime,
    Engine,
    Integer,
    Text,
    and_,
    bindparam,
    case,
    cast,
    delete,
    exists,
    func,
    insert,
    literal,
    not_,
    null,
    or_,
    select,
    text,
    tuple_,
    update,
)
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.engine import Connection
from sqlalchemy.sql.elements import BindParameter

from syncer.core.diff import FALSE, NULL_VALUE, TRUE
from syncer.core.outcomes import Outcome, OutcomeKind
from syncer.core.pacing import Slots
from syncer.core.payload import message_id
from syncer.core.states import Call, ChangeStatus, Kind, LogOutcome
from syncer.core.traits import Subject
from syncer.store.claims import CLAIM_SET, RELEASED, Claim, claim_parameters, owned, unclaimed
from syncer.store.history import log_entries, other_call
from syncer.store.pacing import reserve_slots
from syncer.store.schema import (
    audience_memberships,
    change_log,
    computed_trait_values,
    deleted_users,
    destinations,
    outbox,
    pairs,
    query_members,
    query_values,
    state,
)
from syncer.store.sql import json_text, reading, same_json, writing

_m = audience_memberships


@dataclass(frozen=True)
class QueuedChange:
    """One claimed change, with everything its body is built from."""

    change_id: int
    user_id: str
    value: str
    anonymous_id: str | None
    email: str | None
    created_at: datetime
    call: Call = Call.IDENTIFY
    done_call: Call | None = None  # of a change sent both ways: the call accepted already

    def __post_init__(self) -> None:
        # Rows give the calls as text.
        object.__setattr__(self, "call", Call(self.call))
        if self.done_call is not None:
            object.__setattr__(self, "done_call", Call(self.done_call))

    @property
    def calls(self) -> tuple[Call, ...]:
        """The calls still owed for this change: one, or two for a change sent both ways."""
        return self.call.owed(self.done_call)


@dataclass(frozen=True)
class Exchanged:
    """What one exchange did: the changes now claimed (by id), how many recorded outcomes were
    refused because another claim had taken their rows over, and whether the pair is held."""

    claimed: list[QueuedChange]
    lost: int = 0
    held: bool = False
    slots: Slots | None = None  # where the claimed changes go in the URL's paced schedule


def _suppressed(user: ColumnElement[str]) -> ColumnElement[bool]:
    return exists().where(deleted_users.c.user_id == user)


_o = outbox.c
_ids: BindParameter[list[int]] = bindparam("ids", expanding=True)

# The statements of an exchange are built once: building them costs more than running them.
_HOLD = select(pairs.c.held_at, pairs.c.approved_at).where(
    pairs.c.destination_id == bindparam("destination_id"),
    pairs.c.audience_id == bindparam("audience_id"),
    pairs.c.kind == bindparam("kind"),
)
_v = computed_trait_values


def _claimable(kind: Kind, from_query: bool) -> Any:
    """The ids of a pair's changes that may be claimed now, ``want`` at most, after a cursor.

    A change is still wanted when it says what is true now: an audience's entry while the user
    is a member and its exit while not; a trait's value while it equals the current one (by
    JSON equality; a removed or null value is ``null``).
    """
    # Outer joins on primary keys, not EXISTS under OR: PostgreSQL would hash the whole audience
    # (and every deleted user) for each claim of a few rows.
    if kind is Kind.AUDIENCE:
        m = current = query_members if from_query else _m
        joined = and_(m.c.audience_id == bindparam("audience_id"), m.c.user_id == _o.user_id)
        wanted = or_(
            and_(_o.value == TRUE, m.c.user_id.is_not(None)),
            and_(_o.value == FALSE, m.c.user_id.is_(None)),
        )
    else:
        v = current = query_values if from_query else _v
        joined = and_(v.c.trait_id == bindparam("audience_id"), v.c.user_id == _o.user_id)
        wanted = same_json(_o.value, func.coalesce(json_text(v.c.value), NULL_VALUE))
    return (
        select(_o.id)
        .select_from(
            outbox.outerjoin(current, joined).outerjoin(
                deleted_users, deleted_users.c.user_id == _o.user_id
            )
        )
        .where(
            _o.destination_id == bindparam("destination_id"),
            _o.audience_id == bindparam("audience_id"),
            _o.kind == kind.value,
            _o.status == ChangeStatus.PENDING.value,
            # As a row value: only the pair's index serves it (the primary key on id alone does
            # not), so the claim never walks other pairs' rows after the cursor, whatever the
            # planner's estimates of a small or freshly widened table say.
            tuple_(_o.destination_id, _o.audience_id, _o.id)
            > tuple_(bindparam("destination_id"), bindparam("audience_id"), bindparam("after_id")),
            unclaimed(outbox),
            deleted_users.c.user_id.is_(None),
            wanted,
        )
        .order_by(_o.id)
        .limit(bindparam("want"))
        .with_for_update(of=outbox, skip_locked=True)
    )


# By kind, and whether the audience or trait is defined by a query (its snapshot is current).
_CLAIMABLE = {
    (kind, from_query): _claimable(kind, from_query)
    for kind in Kind
    for from_query in (False, True)
}
_CLAIM = (
    update(outbox)
    .where(_o.id.in_(_ids))
    # A run-out claim being taken over may have been sent by its dead claimer.
    .values(attempted=or_(_o.attempted, _o.claim_token.is_not(None)), **CLAIM_SET)
    .returning(
        _o.id, _o.user_id, _o.value, _o.anonymous_id, _o.email, _o.created_at, _o.call, _o.done_call
    )
)
# What the state and the change log are written from.
_LOGGED = (
    _o.id,
    _o.audience_id,
    _o.kind,
    _o.user_id,
    _o.value,
    _o.anonymous_id,
    _o.email,
    _o.created_at,
    _o.call,
    _o.done_call,
)
_ACCEPT = delete(outbox).where(_o.id.in_(_ids)).returning(*_LOGGED)
_ACCEPT_MINE = (
    delete(outbox)
    .where(_o.id.in_(_ids), _o.claim_token == bindparam("claim_token_"))
    .returning(*_LOGGED)
)
_LOGGED_ROWS = select(*_LOGGED, _o.status).where(
    _o.id.in_(_ids), not_(exists().where(deleted_users.c.user_id == _o.user_id))
)
_OWNED_ROWS = select(_o.id).where(_o.id.in_(_ids))
_DELETED_AMONG = select(deleted_users.c.user_id).where(
    deleted_users.c.user_id.in_(bindparam("users", expanding=True))
)
_TOLD_COLUMNS = ("value", "unsure", "anonymous_id", "email", "message_id", "told_at")


def _upsert_told(insert: Any) -> Any:
    statement = insert(state)
    return statement.on_conflict_do_update(
        index_elements=["destination_id", "audience_id", "kind", "user_id"],
        set_={name: statement.excluded[name] for name in _TOLD_COLUMNS},
    )


_UPSERT_TOLD_SQLITE = _upsert_told(sqlite_insert)
# On PostgreSQL the state and the change log in one statement over arrays: an executemany runs
# one INSERT per row on the server, which made recording a chunk cost 0.15 ms a row.
_RECORD_TOLD_POSTGRESQL = text(
    """
    WITH t AS (
        SELECT * FROM unnest(
            CAST(:change_ids AS bigint[]), CAST(:audience_ids AS text[]),
            CAST(:kinds AS text[]), CAST(:user_ids AS text[]), CAST(:told_values AS text[]),
            CAST(:anonymous_ids AS text[]), CAST(:emails AS text[]),
            CAST(:message_ids AS text[]), CAST(:calls AS text[]), CAST(:parts AS text[]),
            CAST(:created_ats AS timestamp[]), CAST(:attempts AS integer[]))
        AS t(change_id, audience_id, kind, user_id, value, anonymous_id, email, message_id,
             call, part, created_at, attempts)
    ), told AS (
        INSERT INTO syncer_state (destination_id, audience_id, kind, user_id, value, unsure,
                                  anonymous_id, email, message_id, told_at)
        SELECT :destination_id, t.audience_id, t.kind, t.user_id, t.value, false,
               t.anonymous_id, t.email, t.message_id, :told_at
        FROM t
        ON CONFLICT (destination_id, audience_id, kind, user_id) DO UPDATE SET
            value = excluded.value, unsure = excluded.unsure,
            anonymous_id = excluded.anonymous_id, email = excluded.email,
            message_id = excluded.message_id, told_at = excluded.told_at
    )
    INSERT INTO syncer_change_log (run_id, destination_id, kind, audience_id, user_id,
        change_id, call, part, value, anonymous_id, email, created_at, outcome, http_status,
        error, attempts, recorded_at)
    SELECT :run_id, :destination_id, t.kind, t.audience_id, t.user_id, t.change_id, t.call,
           t.part, t.value, t.anonymous_id, t.email, t.created_at, 'delivered', NULL, NULL,
           t.attempts, :told_at
    FROM t
    """
)


def _log_accepted_sqlite(mine: bool) -> Any:
    """Change-log entries for the deliveries of outbox rows (``ids``; with ``mine``, only the
    rows the claim still owns), about users not deleted. ``extra_attempts``: a JSON object of
    change id -> attempts, for the few that took more than one."""
    done = _o.done_call
    part = case(
        (done == Call.IDENTIFY.value, Call.TRACK.value),
        (done == Call.TRACK.value, Call.IDENTIFY.value),
        else_=null(),
    )
    path = literal('$."').concat(cast(_o.id, Text)).concat('"')
    attempts = func.coalesce(func.json_extract(bindparam("extra_attempts", type_=Text), path), 1)
    rows = select(
        bindparam("run_id", type_=BigInteger),
        bindparam("destination_id", type_=Integer),
        _o.kind,
        _o.audience_id,
        _o.user_id,
        _o.id,
        _o.call,
        part,
        _o.value,
        _o.anonymous_id,
        _o.email,
        _o.created_at,
        literal(LogOutcome.DELIVERED.value),
        null(),
        null(),
        attempts,
        bindparam("told_at", type_=DateTime),
    ).where(_o.id.in_(_ids), not_(_suppressed(_o.user_id)))
    if mine:
        rows = rows.where(_o.claim_token == bindparam("claim_token_"))
    columns = [
        "run_id", "destination_id", "kind", "audience_id", "user_id", "change_id", "call",
        "part", "value", "anonymous_id", "email", "created_at", "outcome", "http_status",
        "error", "attempts", "recorded_at",
    ]  # fmt: skip
    return insert(change_log).from_select(columns, rows)


_LOG_ACCEPTED_SQLITE = {mine: _log_accepted_sqlite(mine) for mine in (False, True)}
_CLEAR_REFUSAL = (
    update(destinations)
    .where(
        destinations.c.id == bindparam("destination_id"), destinations.c.refused_status.is_not(None)
    )
    .values(refused_status=None, refused_at=None, refused_error=None)
)


# On PostgreSQL, the common exchange (every answer a delivery, no pacing) is one call of the
# function of migrations 0007 to 0009: one round trip where the statements above take six to
# nine, each of which left the sender waiting about a millisecond under load.
_EXCHANGE_POSTGRESQL = text(
    """
    SELECT * FROM syncer_exchange(
        CAST(:destination_id AS integer), CAST(:audience_id AS text), CAST(:kind AS text),
        CAST(:claim_token_ AS text), CAST(:claimed_by_ AS text),
        CAST(:run_id AS bigint), CAST(:attempts AS integer[]),
        CAST(:ttl_ AS double precision), CAST(:ids AS bigint[]), CAST(:message_ids AS text[]),
        CAST(:told_at AS timestamp), CAST(:want AS integer), CAST(:after_id AS bigint),
        CAST(:clear_refusal AS boolean))
    """
)


_FAILURE_LOGGED = {
    OutcomeKind.RETRYABLE: LogOutcome.RETRYABLE,
    OutcomeKind.REFUSED: LogOutcome.REFUSED,
    OutcomeKind.REJECTED: LogOutcome.REJECTED,
}


def _entry(
    row: Any,
    destination_id: int,
    run_id: int | None,
    now: datetime,
    outcome: LogOutcome,
    attempts: int | None,
) -> dict[str, Any]:
    """A change-log entry for an outbox row (see :data:`_LOGGED`)."""
    return {
        "run_id": run_id,
        "destination_id": destination_id,
        "kind": row.kind,
        "audience_id": row.audience_id,
        "user_id": row.user_id,
        "change_id": row.id,
        "call": row.call,
        "part": None,
        "value": row.value,
        "anonymous_id": row.anonymous_id,
        "email": row.email,
        "created_at": row.created_at,
        "outcome": outcome.value,
        "http_status": None,
        "error": None,
        "attempts": attempts,
        "recorded_at": now,
    }


class OutboxStore:
    """Claims queued changes and records their outcomes."""

    def __init__(self, engine: Engine, namespace: uuid.UUID) -> None:
        self.engine = engine
        self.namespace = namespace
        # One statement is its own transaction: no BEGIN and COMMIT round trips around it.
        self._autocommit = engine.execution_options(isolation_level="AUTOCOMMIT")

    def exchange(
        self,
        claim: Claim,
        destination_id: int,
        audience_id: str,
        *,
        results: Sequence[tuple[int, Outcome]],
        want: int,
        after_id: int,
        now: datetime,
        max_rejections: int,
        rate_per_second: float = 0.0,
        clear_refusal: bool = True,
        kind: Kind = Kind.AUDIENCE,
        half_done: Sequence[tuple[int, Call]] = (),
        from_query: bool = False,
        run_id: int | None = None,
    ) -> Exchanged:
        """Record ``results`` and claim up to ``want`` more changes after ``after_id``, in one
        transaction: the send of each claimed change is decided here, against the state of now.

        A change is claimed only if it is pending, no live claim holds it, its user is not
        deleted, the pair is not held, and it is still wanted (an entry for a member, an exit
        for a non-member, a trait's current value): what upstream changed since the plan is
        left for the next plan. ``kind``: whether ``audience_id`` names an audience or a trait.
        With ``rate_per_second``, the claimed changes take that many slots of the URL's schedule.
        ``clear_refusal``: a delivery clears a refusal recorded for the URL (a worker asks once
        per run, on its first delivery, to save the statement on every exchange).
        ``half_done``: changes sent both ways of which the URL accepted one call (given with
        the outcome of the other in ``results``): that call is not sent again. ``from_query``:
        the audience or trait is defined by a query, and checked against its snapshot.
        Every outcome but "not sent" goes into the change log, under ``run_id``.
        """
        if (
            self.engine.dialect.name == "postgresql"
            and rate_per_second <= 0
            and not half_done
            and not from_query
            and all(outcome.kind is OutcomeKind.DELIVERED for _, outcome in results)
        ):
            return self._exchange_in_database(
                claim,
                (destination_id, audience_id, kind),
                results,
                want,
                after_id,
                now,
                clear_refusal,
                run_id,
            )
        with writing(self.engine) as connection:
            if half_done:
                # Before the outcomes, which release the claim this is fenced by.
                connection.execute(
                    update(outbox)
                    .where(_o.id == bindparam("change_id"), _o.claim_token == bindparam("token"))
                    .values(done_call=bindparam("done")),
                    [
                        {"change_id": i, "token": claim.token, "done": call.value}
                        for i, call in half_done
                    ],
                )
                self._log_half_done(connection, claim, destination_id, half_done, now, run_id)
            lost = self._record(
                connection, claim, destination_id, results, now, max_rejections, run_id
            )
            if clear_refusal and any(o.kind is OutcomeKind.DELIVERED for _, o in results):
                connection.execute(_CLEAR_REFUSAL, {"destination_id": destination_id})
            if want <= 0:
                return Exchanged([], lost)
            hold = connection.execute(
                _HOLD,
                {"destination_id": destination_id, "audience_id": audience_id, "kind": kind.value},
            ).one_or_none()
            if hold is not None and hold.held_at is not None and hold.approved_at is None:
                return Exchanged([], lost, held=True)
            claimed = self._claim(
                connection, claim, (destination_id, audience_id, kind), want, after_id, from_query
            )
            slots = None
            if claimed and rate_per_second > 0:
                requests = sum(len(change.calls) for change in claimed)
                slots = reserve_slots(connection, destination_id, requests, rate_per_second)
            return Exchanged(claimed, lost, slots=slots)

    def _exchange_in_database(
        self,
        claim: Claim,
        pair: tuple[int, str, Kind],
        results: Sequence[tuple[int, Outcome]],
        want: int,
        after_id: int,
        now: datetime,
        clear_refusal: bool,
        run_id: int | None,
    ) -> Exchanged:
        """:meth:`exchange` for deliveries only, on PostgreSQL: one call, one transaction."""
        destination_id, audience_id, kind = pair
        ids = [change_id for change_id, _ in results]
        attempts = [outcome.attempts for _, outcome in results]
        with self._autocommit.connect() as connection:
            rows = connection.execute(
                _EXCHANGE_POSTGRESQL,
                {
                    "destination_id": destination_id,
                    "audience_id": audience_id,
                    "kind": kind.value,
                    **claim_parameters(claim),
                    "run_id": run_id,
                    "attempts": attempts,
                    "ids": ids,
                    "message_ids": [message_id(self.namespace, i) for i in ids],
                    "told_at": now,
                    "want": max(want, 0),
                    "after_id": after_id,
                    "clear_refusal": clear_refusal and bool(ids),
                },
            ).all()
        summary = rows[0]
        claimed = [QueuedChange(*row[3:]) for row in rows[1:]]
        return Exchanged(claimed, summary.lost, held=summary.held)

    @staticmethod
    def _claim(
        connection: Connection,
        claim: Claim,
        pair: tuple[int, str, Kind],
        want: int,
        after_id: int,
        from_query: bool,
    ) -> list[QueuedChange]:
        destination_id, audience_id, kind = pair
        parameters = {"destination_id": destination_id, "audience_id": audience_id}
        # Chosen first, then updated by id: an UPDATE ... WHERE id IN (SELECT ... LIMIT n FOR
        # UPDATE SKIP LOCKED) may rescan its subquery on PostgreSQL and claim more than n rows.
        ids = (
            connection.execute(
                _CLAIMABLE[kind, from_query], {**parameters, "after_id": after_id, "want": want}
            )
            .scalars()
            .all()
        )
        if not ids:
            return []
        rows = connection.execute(_CLAIM, {"ids": ids, **claim_parameters(claim)}).all()
        return sorted((QueuedChange(*row) for row in rows), key=lambda change: change.change_id)

    def _record(
        self,
        connection: Connection,
        claim: Claim,
        destination_id: int,
        results: Sequence[tuple[int, Outcome]],
        now: datetime,
        max_rejections: int,
        run_id: int | None,
    ) -> int:
        if not results:
            return 0
        attempts = {change_id: outcome.attempts for change_id, outcome in results}
        if all(outcome.kind is OutcomeKind.DELIVERED for _, outcome in results):
            # The common case in one statement: take the rows this claim still owns.
            ids = [change_id for change_id, _ in results]
            taken = self._accepted(connection, destination_id, ids, now, attempts, run_id, claim)
            if taken == len(ids):
                return 0
            # Rows gone are superseded; rows still there belong to another claim now.
            left = connection.execute(_OWNED_ROWS, {"ids": ids}).scalars().all()
            return len(left)
        ownership = owned(connection, outbox, [change_id for change_id, _ in results], claim)
        mine = ownership.mine
        delivered = [
            i for i, outcome in results if i in mine and outcome.kind is OutcomeKind.DELIVERED
        ]
        if delivered:
            self._accepted(connection, destination_id, delivered, now, attempts, run_id)
        park = case(
            (outbox.c.rejections + 1 >= max_rejections, ChangeStatus.PARKED.value),
            else_=ChangeStatus.REJECTED.value,
        )
        failed = [(i, o) for i, o in results if i in mine and o.kind is not OutcomeKind.DELIVERED]
        for kind, status, rejection in (
            (OutcomeKind.RETRYABLE, outbox.c.status, 0),
            (OutcomeKind.REFUSED, outbox.c.status, 0),
            (OutcomeKind.REJECTED, park, 1),
        ):
            batch = [(i, o) for i, o in failed if o.kind is kind]
            if batch:
                connection.execute(
                    update(outbox)
                    .where(outbox.c.id == bindparam("change_id"))
                    .values(
                        status=status,
                        attempts=outbox.c.attempts + bindparam("tries", type_=Integer),
                        rejections=outbox.c.rejections + rejection,
                        last_status=bindparam("http_status", type_=Integer),
                        last_error=bindparam("error", type_=Text),
                        last_attempt_at=now,
                        attempted=True,
                        **RELEASED,
                    ),
                    [
                        {
                            "change_id": i,
                            "tries": o.attempts,
                            "http_status": o.status,
                            "error": o.detail,
                        }
                        for i, o in batch
                    ],
                )
        tried = {i: o for i, o in failed if o.kind is not OutcomeKind.NOT_SENT}
        if tried:
            self._log_failures(connection, destination_id, tried, now, run_id)
        unsent = [i for i, o in failed if o.kind is OutcomeKind.NOT_SENT]
        if unsent:
            connection.execute(update(outbox).where(outbox.c.id.in_(unsent)).values(**RELEASED))
        if failed:
            # A user deleted while their change was in flight: nothing more is sent about them.
            connection.execute(
                delete(outbox).where(
                    outbox.c.id.in_([i for i, _ in failed]), _suppressed(outbox.c.user_id)
                )
            )
        return ownership.taken_over

    def _accepted(
        self,
        connection: Connection,
        destination_id: int,
        change_ids: list[int],
        now: datetime,
        attempts: dict[int, int],
        run_id: int | None,
        claim: Claim | None = None,
    ) -> int:
        """Record deliveries, in the state and the change log; with ``claim``, only of the rows
        it still owns. Return how many."""
        sqlite = connection.dialect.name == "sqlite"
        if sqlite:
            # Logged from the rows before they are taken, in one statement: no row goes through
            # Python (binding two datetimes a row cost a sixth of a first sync's exchanges).
            # SQLite's writers take turns from BEGIN: nothing changes between this and the take.
            extra = {str(i): n for i, n in attempts.items() if n != 1}
            connection.execute(
                _LOG_ACCEPTED_SQLITE[claim is not None],
                {
                    "ids": change_ids,
                    "claim_token_": None if claim is None else claim.token,
                    "run_id": run_id,
                    "destination_id": destination_id,
                    "told_at": now,
                    "extra_attempts": json.dumps(extra),
                },
            )
        if claim is None:
            rows = connection.execute(_ACCEPT, {"ids": change_ids}).all()
        else:
            rows = connection.execute(
                _ACCEPT_MINE, {"ids": change_ids, "claim_token_": claim.token}
            ).all()
        # Checked after the rows were taken: a delete-user that committed meanwhile is seen
        # here, and one still running waits for this transaction and then removes what it wrote.
        users = sorted({row.user_id for row in rows})
        deleted = set(connection.execute(_DELETED_AMONG, {"users": users}).scalars())
        told = [row for row in rows if row.user_id not in deleted]
        if told and not sqlite:
            connection.execute(
                _RECORD_TOLD_POSTGRESQL,
                {
                    "run_id": run_id,
                    "destination_id": destination_id,
                    "told_at": now,
                    "change_ids": [row.id for row in told],
                    "audience_ids": [row.audience_id for row in told],
                    "kinds": [row.kind for row in told],
                    "user_ids": [row.user_id for row in told],
                    "told_values": [row.value for row in told],
                    "anonymous_ids": [row.anonymous_id for row in told],
                    "emails": [row.email for row in told],
                    "message_ids": [message_id(self.namespace, row.id) for row in told],
                    "calls": [row.call for row in told],
                    "parts": [other_call(row.done_call) for row in told],
                    "created_ats": [row.created_at for row in told],
                    "attempts": [attempts[row.id] for row in told],
                },
            )
        elif told:
            connection.execute(
                _UPSERT_TOLD_SQLITE,
                [
                    {
                        "destination_id": destination_id,
                        "audience_id": row.audience_id,
                        "kind": row.kind,
                        "user_id": row.user_id,
                        "value": row.value,
                        "unsure": False,
                        "anonymous_id": row.anonymous_id,
                        "email": row.email,
                        "message_id": message_id(self.namespace, row.id),
                        "told_at": now,
                    }
                    for row in told
                ],
            )
        return len(rows)

    @staticmethod
    def _log_half_done(
        connection: Connection,
        claim: Claim,
        destination_id: int,
        half_done: Sequence[tuple[int, Call]],
        now: datetime,
        run_id: int | None,
    ) -> None:
        """Log the one call a URL accepted of changes sent both ways (of the rows this claim
        still owns, about users not deleted)."""
        accepted = dict(half_done)
        rows = connection.execute(
            _LOGGED_ROWS.where(_o.claim_token == claim.token), {"ids": list(accepted)}
        ).all()
        log_entries(
            connection,
            [
                _entry(row, destination_id, run_id, now, LogOutcome.DELIVERED, None)
                | {"part": accepted[row.id].value}
                for row in rows
            ],
        )

    @staticmethod
    def _log_failures(
        connection: Connection,
        destination_id: int,
        failed: dict[int, Outcome],
        now: datetime,
        run_id: int | None,
    ) -> None:
        """Log the changes whose calls failed (already recorded: a rejection may have parked
        the change), but of users deleted meanwhile, whose history is gone."""
        rows = connection.execute(_LOGGED_ROWS, {"ids": list(failed)}).all()
        entries = []
        for row in rows:
            outcome = failed[row.id]
            logged = _FAILURE_LOGGED[outcome.kind]
            if row.status == ChangeStatus.PARKED.value:
                logged = LogOutcome.PARKED
            entries.append(
                _entry(row, destination_id, run_id, now, logged, outcome.attempts)
                | {
                    "part": other_call(row.done_call),
                    "http_status": outcome.status,
                    "error": outcome.detail or None,
                }
            )
        log_entries(connection, entries)

    def status_counts(
        self, destination_id: int, audience_id: str, kind: Kind = Kind.AUDIENCE
    ) -> dict[ChangeStatus, int]:
        """How many queued changes of one (URL, audience) are pending, rejected or parked."""
        with reading(self.engine) as connection:
            rows = connection.execute(
                select(outbox.c.status, func.count())
                .where(
                    outbox.c.destination_id == destination_id,
                    outbox.c.audience_id == audience_id,
                    outbox.c.kind == kind.value,
                )
                .group_by(outbox.c.status)
            )
            return {ChangeStatus(row[0]): int(row[1]) for row in rows}

    def claimed_elsewhere(
        self, destination_id: int, audience_id: str, kind: Kind = Kind.AUDIENCE
    ) -> int:
        """How many pending changes of one (URL, audience) a live claim holds: another worker
        is sending them (this worker holds none once its delivery loop has ended)."""
        with reading(self.engine) as connection:
            return int(
                connection.execute(
                    select(func.count()).where(
                        outbox.c.destination_id == destination_id,
                        outbox.c.audience_id == audience_id,
                        outbox.c.kind == kind.value,
                        outbox.c.status == ChangeStatus.PENDING.value,
                        not_(unclaimed(outbox)),
                    )
                ).scalar_one()
            )

    def requeue(self, destination_ids: Sequence[int] | None, subject: Subject | None) -> int:
        """Put rejected and parked changes back in line (of every pair, or of one audience's or
        trait's); return how many."""
        statement = update(outbox).where(
            outbox.c.status.in_([ChangeStatus.REJECTED.value, ChangeStatus.PARKED.value])
        )
        if destination_ids is not None:
            statement = statement.where(outbox.c.destination_id.in_(list(destination_ids)))
        if subject is not None:
            statement = statement.where(
                outbox.c.audience_id == subject.id, outbox.c.kind == subject.kind.value
            )
        with writing(self.engine) as connection:
            counted = connection.execution_options(preserve_rowcount=True)
            return int(
                counted.execute(
                    statement.values(status=ChangeStatus.PENDING.value, rejections=0)
                ).rowcount
            )
