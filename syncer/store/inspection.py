"""Read-only queries behind ``syncer inspect``: what is in the database, and what happened.

Each method returns plain JSON-ready structures (strings, numbers, lists, dicts), so the same
answer serves the table for people and the JSON for scripts. Nothing here returns a secret.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from datetime import datetime
from typing import Any

from sqlalchemy import ColumnElement, and_, func, not_, or_, select, true

from syncer.core.diff import NULL_VALUE
from syncer.core.payload import message_id
from syncer.core.states import Call, ChangeStatus, Kind
from syncer.core.traits import Subject
from syncer.store import Store
from syncer.store.audiences import AudienceRow
from syncer.store.schema import (
    DELETION_OWED,
    STATE_TOLD_TRUE,
    audience_memberships,
    audiences,
    computed_trait_values,
    computed_traits,
    deleted_users,
    deletions,
    destinations,
    outbox,
    pairs,
    query_members,
    query_values,
    runs,
    state,
)
from syncer.store.sql import is_json_null, json_text, reading, row_problem
from syncer.store.trait_planning import trait_value_problem

Record = dict[str, Any]


def shown_value(kind: str, value: str | None) -> Any:
    """A recorded value as inspection shows it: an audience's as true or false, a trait's as
    the JSON text it was sent as (its digits exactly), None for none."""
    if value is None:
        return None
    return value == "true" if kind == Kind.AUDIENCE.value else value


def _when(moment: datetime | None) -> str | None:
    return None if moment is None else moment.isoformat(timespec="seconds") + "Z"


class Inspection:
    """Answers the questions operators ask of the syncer, from the database alone (and the
    audiences and traits the settings define by a query, ``defined``)."""

    def __init__(self, store: Store, defined: Sequence[AudienceRow] = ()) -> None:
        self.store = store
        self.engine = store.engine
        self.defined = list(defined)

    def _destination_ids(self, urls: Sequence[str]) -> dict[str, int]:
        return self.store.destinations.find(urls)

    def _url_names(self, urls: Sequence[str]) -> dict[int, str]:
        """Destination id -> URL as configured, or as last configured for removed ones."""
        with reading(self.engine) as connection:
            known = {
                row.id: f"{row.url} (removed)" for row in connection.execute(select(destinations))
            }
        known.update({v: k for k, v in self._destination_ids(urls).items()})
        return known

    def _resolved(self) -> tuple[list[AudienceRow], dict[Subject, str], dict[Subject, str]]:
        rows, resolution = self.store.audiences.with_keys(self.defined)
        problems = {p.subject: p.reason for p in resolution.problems}
        return rows, resolution.keys, problems

    def _namespace(self) -> uuid.UUID:
        return self.store.namespace

    def find_audience(self, wanted: str) -> str | None:
        """The id of the audience whose id or key is ``wanted``."""
        subject = self.store.audiences.find(wanted, self.defined)
        return subject.id if subject is not None and subject.kind is Kind.AUDIENCE else None

    def audiences(self, urls: Sequence[str]) -> list[Record]:
        """Every audience with its members and, per configured URL, what that URL knows,
        what it is owed, whether the guard holds it, and whether the URL refuses everything."""
        return self._subjects(Kind.AUDIENCE, urls)

    def traits(self, urls: Sequence[str]) -> list[Record]:
        """Every computed trait with its values and, per configured URL, what that URL holds,
        what it is owed, whether the guard holds it, and whether the URL refuses everything."""
        return self._subjects(Kind.TRAIT, urls)

    def _current_counts(self, connection: Any, kind: Kind) -> tuple[dict[Any, int], ...]:
        """(id, from a query) -> rows now, and -> rows that cannot be sent."""
        present: dict[Any, int] = {}
        invalid: dict[Any, int] = {}
        for from_query in (False, True):
            where: ColumnElement[bool]
            if kind is Kind.AUDIENCE:
                table = query_members if from_query else audience_memberships
                owner, where = table.c.audience_id, true()
                problem = row_problem(
                    connection, table.c.user_id, table.c.anonymous_id, table.c.email
                )
            else:
                table = query_values if from_query else computed_trait_values
                owner = table.c.trait_id
                value = json_text(table.c.value)
                where = and_(
                    value.is_not(None),
                    not_(is_json_null(value)),
                )
                problem = trait_value_problem(connection, table.c.user_id, table.c.value)
            for source, condition in (
                (present, where),
                (invalid, and_(where, problem.is_not(None))),
            ):
                for row in connection.execute(
                    select(owner, func.count()).where(condition).group_by(owner)
                ):
                    source[(row[0], from_query)] = int(row[1])
        return present, invalid

    def _subjects(self, kind: Kind, urls: Sequence[str]) -> list[Record]:
        rows, keys, problems = self._resolved()
        destination_ids = self._destination_ids(urls)
        exits = "false" if kind is Kind.AUDIENCE else NULL_VALUE
        s, o = state.c, outbox.c
        held_a_value = (
            STATE_TOLD_TRUE
            if kind is Kind.AUDIENCE
            else and_(s.value.is_not(None), s.value != NULL_VALUE)
        )
        with reading(self.engine) as connection:
            present, invalid = self._current_counts(connection, kind)
            told = {
                (row[0], row[1]): row[2]
                for row in connection.execute(
                    select(s.destination_id, s.audience_id, func.count())
                    .where(s.kind == kind.value, held_a_value)
                    .group_by(s.destination_id, s.audience_id)
                )
            }
            is_exit = o.value == exits
            queued: dict[tuple[int, str, bool, str], int] = {
                (row[0], row[1], bool(row[2]), row[3]): row[4]
                for row in connection.execute(
                    select(o.destination_id, o.audience_id, is_exit, o.status, func.count())
                    .where(o.kind == kind.value)
                    .group_by(o.destination_id, o.audience_id, is_exit, o.status)
                )
            }
            pair_rows = {
                (row.destination_id, row.audience_id): row
                for row in connection.execute(select(pairs).where(pairs.c.kind == kind.value))
            }
            refused = {
                row.id: row
                for row in connection.execute(
                    select(destinations).where(destinations.c.refused_status.is_not(None))
                )
            }
        told_name, in_name, out_name = (
            ("told_members", "pending_entries", "pending_exits")
            if kind is Kind.AUDIENCE
            else ("told_values", "pending_values", "pending_nulls")
        )
        result = []
        for subject_row in rows:
            if subject_row.kind is not kind:
                continue
            subject = subject_row.subject
            per_url = []
            for url in urls:
                destination = destination_ids.get(url)
                pair = (destination, subject.id)

                def count(
                    exit_: bool | None, status: ChangeStatus, pair: tuple[Any, str] = pair
                ) -> int:
                    which = (False, True) if exit_ is None else (exit_,)
                    return sum(queued.get((pair[0], pair[1], e, status.value), 0) for e in which)

                row = pair_rows.get(pair)
                refusal = refused.get(destination) if destination is not None else None
                per_url.append(
                    {
                        "url": url,
                        told_name: told.get(pair, 0),
                        in_name: count(False, ChangeStatus.PENDING),
                        out_name: count(True, ChangeStatus.PENDING),
                        "rejected": count(None, ChangeStatus.REJECTED),
                        "parked": count(None, ChangeStatus.PARKED),
                        "held": row is not None and row.held_at is not None,
                        "hold_reason": None if row is None else row.hold_reason,
                        "hold_approved": row is not None and row.approved_at is not None,
                        "url_refused": None
                        if refusal is None
                        else f"{refusal.refused_status} since {_when(refusal.refused_at)}",
                        "last_successful_sync": _when(None if row is None else row.last_success_at),
                    }
                )
            origin = (subject.id, subject_row.from_query)
            result.append(
                {
                    "id": subject.id,
                    "name": subject_row.name,
                    "key": keys.get(subject),
                    "key_problem": problems.get(subject),
                    "enabled": subject_row.enabled,
                    "defined_by": "query" if subject_row.from_query else "table",
                    "held_for": [entry["url"] for entry in per_url if entry["held"]],
                    ("members" if kind is Kind.AUDIENCE else "values"): present.get(origin, 0),
                    ("invalid_members" if kind is Kind.AUDIENCE else "invalid_values"): (
                        invalid.get(origin, 0)
                    ),
                    "urls": per_url,
                }
            )
        return result

    def members(self, audience_id: str, limit: int) -> Record:
        """Up to ``limit`` current members of one audience, by user id, and their total."""
        m = audience_memberships
        with reading(self.engine) as connection:
            total = connection.execute(
                select(func.count()).where(m.c.audience_id == audience_id)
            ).scalar_one()
            rows = connection.execute(
                select(
                    m.c.user_id,
                    m.c.anonymous_id,
                    m.c.email,
                    deleted_users.c.user_id.is_not(None).label("suppressed"),
                )
                .outerjoin(deleted_users, deleted_users.c.user_id == m.c.user_id)
                .where(m.c.audience_id == audience_id)
                .order_by(m.c.user_id)
                .limit(limit)
            ).all()
        return {
            "audience_id": audience_id,
            "total": total,
            "shown": len(rows),
            "members": [
                {
                    "user_id": row.user_id,
                    "anonymous_id": row.anonymous_id,
                    "email": row.email,
                    "suppressed": bool(row.suppressed),
                }
                for row in rows
            ],
        }

    def user(self, user_id: str, urls: Sequence[str]) -> Record:
        """Where one user is now (audiences, trait values), what each URL was last told about
        them, and any deletion."""
        _, keys, _ = self._resolved()
        namespace = self._namespace()
        url_of = self._url_names(urls)
        with reading(self.engine) as connection:
            current = connection.execute(
                select(audiences.c.id, audiences.c.name)
                .join(audience_memberships, audience_memberships.c.audience_id == audiences.c.id)
                .where(audience_memberships.c.user_id == user_id)
                .order_by(audiences.c.id)
            ).all()
            values = connection.execute(
                select(
                    computed_traits.c.id,
                    computed_traits.c.name,
                    json_text(computed_trait_values.c.value),
                )
                .join(
                    computed_trait_values, computed_trait_values.c.trait_id == computed_traits.c.id
                )
                .where(
                    computed_trait_values.c.user_id == user_id,
                    computed_trait_values.c.value.is_not(None),
                )
                .order_by(computed_traits.c.id)
            ).all()
            told = connection.execute(
                select(state)
                .where(state.c.user_id == user_id)
                .order_by(state.c.destination_id, state.c.audience_id)
            ).all()
            queued = connection.execute(
                select(outbox).where(outbox.c.user_id == user_id).order_by(outbox.c.id)
            ).all()
            requested = connection.execute(
                select(deleted_users.c.requested_at).where(deleted_users.c.user_id == user_id)
            ).scalar_one_or_none()
            deletion_rows = connection.execute(
                select(deletions, destinations.c.url)
                .join(destinations, destinations.c.id == deletions.c.destination_id)
                .where(deletions.c.user_id == user_id)
                .order_by(deletions.c.id)
            ).all()
        return {
            "user_id": user_id,
            "deleted": requested is not None,
            "deletion_requested_at": _when(requested),
            "deletion_deliveries": [
                {
                    "url": row.url,
                    "delivered_at": _when(row.delivered_at),
                    "message_id": message_id(namespace, row.id, "delete"),
                    "attempts": row.attempts,
                    "last_status": row.last_status,
                    "last_error": row.last_error,
                }
                for row in deletion_rows
            ],
            "audiences": [
                {"id": row.id, "name": row.name, "key": keys.get(Subject.audience(row.id))}
                for row in current
            ],
            "traits": [
                {
                    "id": row[0],
                    "name": row[1],
                    "key": keys.get(Subject.trait(row[0])),
                    "value": row[2],
                }
                for row in values
            ],
            "told": [
                {
                    "url": url_of.get(row.destination_id, f"#{row.destination_id}"),
                    "kind": row.kind,
                    "audience_id": row.audience_id,
                    "key": keys.get(Subject(Kind(row.kind), row.audience_id)),
                    "value": shown_value(row.kind, row.value),
                    "unsure": bool(row.unsure),
                    "delivered_at": _when(row.told_at),
                    "message_id": row.message_id,
                }
                for row in told
            ],
            "pending": [
                {
                    "url": url_of.get(row.destination_id, f"#{row.destination_id}"),
                    "kind": row.kind,
                    "audience_id": row.audience_id,
                    "key": keys.get(Subject(Kind(row.kind), row.audience_id)),
                    "value": shown_value(row.kind, row.value),
                    "call": row.call,
                    "status": row.status,
                    "attempts": row.attempts,
                    "last_status": row.last_status,
                    "last_error": row.last_error,
                    "message_id": message_id(namespace, row.id),
                }
                for row in queued
            ],
        }

    def explain(self, user_id: str, urls: Sequence[str]) -> Record:
        """One user's timeline across audiences, traits and URLs: each change when it was
        detected, each outcome recorded for it (from the change log), what is still queued,
        and the deletion if any. A deleted user's history is gone: only the deletion shows.
        """
        now = self.user(user_id, urls)
        _, keys, _ = self._resolved()
        namespace = self._namespace()
        url_of = self._url_names(urls)
        events: list[Record] = []

        def about(url_id: int, kind: str, audience_id: str, value: str) -> Record:
            return {
                "url": url_of.get(url_id, f"#{url_id}"),
                "kind": kind,
                "audience_id": audience_id,
                "key": keys.get(Subject(Kind(kind), audience_id)),
                "value": shown_value(kind, value),
            }

        detected: set[tuple[int, int]] = set()
        for entry in [] if now["deleted"] else self.store.history.of_user(user_id):
            change = about(entry.destination_id, entry.kind.value, entry.audience_id, entry.value)
            if (entry.destination_id, entry.change_id) not in detected:
                detected.add((entry.destination_id, entry.change_id))
                events.append(
                    {"at": entry.created_at, "event": "detected", **change, "call": entry.call}
                )
            for call in entry.calls:
                kind = "track" if entry.call is Call.BOTH and call is Call.TRACK else "change"
                events.append(
                    {
                        "at": entry.recorded_at,
                        "event": "attempt",
                        **change,
                        "call": call.value,
                        "outcome": entry.outcome.value,
                        "http_status": entry.http_status,
                        "error": entry.error,
                        "attempts": entry.attempts,
                        "run_id": entry.run_id,
                        "message_id": message_id(namespace, entry.change_id, kind),
                    }
                )
        with reading(self.engine) as connection:
            queued = (
                []
                if now["deleted"]
                else connection.execute(
                    select(outbox).where(outbox.c.user_id == user_id).order_by(outbox.c.id)
                ).all()
            )
            deletion_rows = connection.execute(
                select(deletions).where(deletions.c.user_id == user_id).order_by(deletions.c.id)
            ).all()
            requested = connection.execute(
                select(deleted_users.c.requested_at).where(deleted_users.c.user_id == user_id)
            ).scalar_one_or_none()
        for row in queued:
            change = about(row.destination_id, row.kind, row.audience_id, row.value)
            if (row.destination_id, row.id) not in detected:
                events.append(
                    {"at": row.created_at, "event": "detected", **change, "call": row.call}
                )
            events.append(
                {
                    "at": row.last_attempt_at or row.created_at,
                    "event": "pending",
                    **change,
                    "call": row.call,
                    "outcome": row.status,
                    "http_status": row.last_status,
                    "error": row.last_error,
                    "attempts": row.attempts,
                    "message_id": message_id(namespace, row.id),
                }
            )
        if requested is not None:
            events.append({"at": requested, "event": "deletion_requested"})
        for row in deletion_rows:
            delivered = row.delivered_at is not None
            if delivered or row.attempts:
                events.append(
                    {
                        "at": row.delivered_at or row.last_attempt_at,
                        "event": "deletion_delivered" if delivered else "deletion_attempt",
                        "url": url_of.get(row.destination_id, f"#{row.destination_id}"),
                        "outcome": "delivered" if delivered else "retryable",
                        "http_status": row.last_status,
                        "error": None if delivered else row.last_error,
                        "attempts": row.attempts,
                        "message_id": message_id(namespace, row.id, "delete"),
                    }
                )
        # Stable: a change's detection comes before its attempts recorded at the same moment.
        events.sort(key=lambda event: event["at"])
        return {
            "user_id": user_id,
            "deleted": now["deleted"],
            "deletion_requested_at": now["deletion_requested_at"],
            "audiences": now["audiences"],
            "traits": now["traits"],
            "events": [{**event, "at": _when(event["at"])} for event in events],
        }

    def runs(self, limit: int) -> list[Record]:
        """The most recent runs, newest first."""
        with reading(self.engine) as connection:
            rows = connection.execute(select(runs).order_by(runs.c.id.desc()).limit(limit)).all()
        return [
            {
                "id": row.id,
                "trigger": row.trigger,
                "started_at": _when(row.started_at),
                "duration_seconds": None
                if row.finished_at is None
                else round((row.finished_at - row.started_at).total_seconds(), 3),
                "status": row.status,
                "audiences": row.audiences,
                "entered": row.entered,
                "exited": row.exited,
                "delivered": row.delivered,
                "pending": row.pending,
                "rejected": row.rejected,
                "parked": row.parked,
                "held": row.held,
                "urls_down": row.urls_down,
                "skipped": row.skipped,
                "invalid": row.invalid,
                "deletes_pending": row.deletes_pending,
                "error": row.error,
            }
            for row in rows
        ]

    def failures(self, urls: Sequence[str], limit: int) -> list[Record]:
        """Changes and deletes not yet accepted after at least one try, per URL, and every
        delete owed to a URL no longer configured (nothing can deliver it until it returns)."""
        _, keys, _ = self._resolved()
        url_of = self._url_names(urls)
        configured = list(self._destination_ids(urls).values())
        with reading(self.engine) as connection:
            changes = connection.execute(
                select(outbox)
                .where((outbox.c.attempts > 0) | (outbox.c.status != ChangeStatus.PENDING.value))
                .order_by(outbox.c.destination_id, outbox.c.id)
                .limit(limit)
            ).all()
            deletes = connection.execute(
                select(deletions)
                .where(
                    and_(
                        DELETION_OWED,
                        or_(
                            deletions.c.attempts > 0,
                            deletions.c.destination_id.not_in(configured),
                        ),
                    )
                )
                .order_by(deletions.c.destination_id, deletions.c.id)
                .limit(limit)
            ).all()
        found: list[Record] = [
            {
                "url": url_of.get(row.destination_id, f"#{row.destination_id}"),
                "type": row.call,
                "kind": row.kind,
                "audience_id": row.audience_id,
                "key": keys.get(Subject(Kind(row.kind), row.audience_id)),
                "user_id": row.user_id,
                "value": shown_value(row.kind, row.value),
                "state": "retrying" if row.status == ChangeStatus.PENDING.value else row.status,
                "attempts": row.attempts,
                "last_status": row.last_status,
                "last_error": row.last_error,
                "last_attempt_at": _when(row.last_attempt_at),
            }
            for row in changes
        ]
        found += [
            {
                "url": url_of.get(row.destination_id, f"#{row.destination_id}"),
                "type": "delete",
                "kind": None,
                "audience_id": None,
                "key": None,
                "user_id": row.user_id,
                "value": None,
                "state": "retrying"
                if row.destination_id in configured
                else "owed to a removed URL (re-add it, or `syncer forget-url`)",
                "attempts": row.attempts,
                "last_status": row.last_status,
                "last_error": row.last_error,
                "last_attempt_at": _when(row.last_attempt_at),
            }
            for row in deletes
        ]
        return found[:limit]
