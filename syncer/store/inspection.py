"""Read-only queries behind ``syncer inspect``: what is in the database, and what happened.

Each method returns plain JSON-ready structures (strings, numbers, lists, dicts), so the same
answer serves the table for people and the JSON for scripts. Nothing here returns a secret.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from datetime import datetime
from typing import Any

from sqlalchemy import and_, func, or_, select

from syncer.core.payload import message_id
from syncer.core.states import ChangeStatus, Kind
from syncer.store import Store
from syncer.store.schema import (
    DELETION_OWED,
    STATE_TOLD_TRUE,
    audience_memberships,
    audiences,
    deleted_users,
    deletions,
    destinations,
    outbox,
    pairs,
    runs,
    state,
)
from syncer.store.sql import reading, row_problem

Record = dict[str, Any]


def _when(moment: datetime | None) -> str | None:
    return None if moment is None else moment.isoformat(timespec="seconds") + "Z"


class Inspection:
    """Answers the questions operators ask of the syncer, from the database alone."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self.engine = store.engine

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

    def _keys(self) -> tuple[dict[str, str], dict[str, str]]:
        _, resolution = self.store.audiences.with_keys()
        audience = Kind.AUDIENCE
        return (
            {
                subject.id: key
                for subject, key in resolution.keys.items()
                if subject.kind is audience
            },
            {p.audience_id: p.reason for p in resolution.problems if p.subject.kind is audience},
        )

    def _namespace(self) -> uuid.UUID:
        return self.store.namespace

    def find_audience(self, wanted: str) -> str | None:
        """The id of the audience whose id or key is ``wanted``."""
        subject = self.store.audiences.find(wanted)
        return subject.id if subject is not None and subject.kind is Kind.AUDIENCE else None

    def audiences(self, urls: Sequence[str]) -> list[Record]:
        """Every audience with its members and, per configured URL, what that URL knows,
        what it is owed, whether the guard holds it, and whether the URL refuses everything."""
        keys, problems = self._keys()
        destination_ids = self._destination_ids(urls)
        m = audience_memberships
        with reading(self.engine) as connection:
            members: dict[str, int] = dict(
                connection.execute(
                    select(m.c.audience_id, func.count()).group_by(m.c.audience_id)
                ).all()
            )
            problem = row_problem(connection, m.c.user_id, m.c.anonymous_id, m.c.email)
            invalid: dict[str, int] = dict(
                connection.execute(
                    select(m.c.audience_id, func.count())
                    .where(problem.is_not(None))
                    .group_by(m.c.audience_id)
                ).all()
            )
            told = {
                (row[0], row[1]): row[2]
                for row in connection.execute(
                    select(state.c.destination_id, state.c.audience_id, func.count())
                    .where(STATE_TOLD_TRUE)
                    .group_by(state.c.destination_id, state.c.audience_id)
                )
            }
            queued: dict[tuple[int, str, str, str], int] = {
                (row[0], row[1], row[2], row[3]): row[4]
                for row in connection.execute(
                    select(
                        outbox.c.destination_id,
                        outbox.c.audience_id,
                        outbox.c.value,
                        outbox.c.status,
                        func.count(),
                    ).group_by(
                        outbox.c.destination_id,
                        outbox.c.audience_id,
                        outbox.c.value,
                        outbox.c.status,
                    )
                )
            }
            pair_rows = {
                (row.destination_id, row.audience_id): row
                for row in connection.execute(select(pairs))
            }
            refused = {
                row.id: row
                for row in connection.execute(
                    select(destinations).where(destinations.c.refused_status.is_not(None))
                )
            }
        result = []
        for audience in self.store.audiences.load():
            per_url = []
            for url in urls:
                destination = destination_ids.get(url)
                pair = (destination, audience.audience_id)

                def count(
                    value: str | None, status: ChangeStatus, pair: tuple[Any, str] = pair
                ) -> int:
                    values = ("true", "false") if value is None else (value,)
                    return sum(queued.get((pair[0], pair[1], v, status.value), 0) for v in values)

                row = pair_rows.get(pair)
                refusal = refused.get(destination) if destination is not None else None
                per_url.append(
                    {
                        "url": url,
                        "told_members": told.get(pair, 0),
                        "pending_entries": count("true", ChangeStatus.PENDING),
                        "pending_exits": count("false", ChangeStatus.PENDING),
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
            result.append(
                {
                    "id": audience.audience_id,
                    "name": audience.name,
                    "key": keys.get(audience.audience_id),
                    "key_problem": problems.get(audience.audience_id),
                    "enabled": audience.enabled,
                    "held_for": [entry["url"] for entry in per_url if entry["held"]],
                    "members": members.get(audience.audience_id, 0),
                    "invalid_members": invalid.get(audience.audience_id, 0),
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
        """Where one user is now, what each URL was last told about them, and any deletion."""
        keys, _ = self._keys()
        namespace = self._namespace()
        url_of = self._url_names(urls)
        with reading(self.engine) as connection:
            current = connection.execute(
                select(audiences.c.id, audiences.c.name)
                .join(audience_memberships, audience_memberships.c.audience_id == audiences.c.id)
                .where(audience_memberships.c.user_id == user_id)
                .order_by(audiences.c.id)
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
                {"id": row.id, "name": row.name, "key": keys.get(row.id)} for row in current
            ],
            "told": [
                {
                    "url": url_of.get(row.destination_id, f"#{row.destination_id}"),
                    "audience_id": row.audience_id,
                    "key": keys.get(row.audience_id),
                    "value": None if row.value is None else row.value == "true",
                    "unsure": bool(row.unsure),
                    "delivered_at": _when(row.told_at),
                    "message_id": row.message_id,
                }
                for row in told
            ],
            "pending": [
                {
                    "url": url_of.get(row.destination_id, f"#{row.destination_id}"),
                    "audience_id": row.audience_id,
                    "key": keys.get(row.audience_id),
                    "value": row.value == "true",
                    "status": row.status,
                    "attempts": row.attempts,
                    "last_status": row.last_status,
                    "last_error": row.last_error,
                    "message_id": message_id(namespace, row.id),
                }
                for row in queued
            ],
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
                "error": row.error,
            }
            for row in rows
        ]

    def failures(self, urls: Sequence[str], limit: int) -> list[Record]:
        """Changes and deletes not yet accepted after at least one try, per URL, and every
        delete owed to a URL no longer configured (nothing can deliver it until it returns)."""
        keys, _ = self._keys()
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
                "type": "identify",
                "audience_id": row.audience_id,
                "key": keys.get(row.audience_id),
                "user_id": row.user_id,
                "value": row.value == "true",
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
