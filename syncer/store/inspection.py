"""Read-only queries behind ``syncer inspect``: what is in the database, and what happened.

Each method returns plain JSON-ready structures (strings, numbers, lists, dicts), so the same
answer serves the table for people and the JSON for scripts. Nothing here returns a secret.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from datetime import datetime
from typing import Any

from sqlalchemy import Engine, and_, func, select

from syncer.core.payload import message_id
from syncer.store.repository import STATUS_PENDING, Repository
from syncer.store.schema import (
    audience_memberships,
    audiences,
    deleted_users,
    deletions,
    delivered,
    destinations,
    outbox,
    pair_state,
    runs,
)

Record = dict[str, Any]


def _when(moment: datetime | None) -> str | None:
    return None if moment is None else moment.isoformat(timespec="seconds") + "Z"


class Inspection:
    """Answers the questions operators ask of the syncer, from the database alone."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._repository = Repository(engine)

    def _destination_ids(self, urls: Sequence[str]) -> dict[str, int]:
        return self._repository.find_destinations(urls)

    def _keys(self) -> tuple[dict[str, str], dict[str, str]]:
        _, resolution = self._repository.audiences_with_keys()
        return resolution.keys, {p.audience_id: p.reason for p in resolution.problems}

    def _namespace(self) -> uuid.UUID:
        return self._repository.message_namespace()

    def find_audience(self, wanted: str) -> str | None:
        """The id of the audience whose id or key is ``wanted``."""
        rows, resolution = self._repository.audiences_with_keys()
        for row in rows:
            if row.is_named(wanted, resolution.keys):
                return row.audience_id
        return None

    def audiences(self, urls: Sequence[str]) -> list[Record]:
        """Every audience with its members and, per configured URL, what that URL knows."""
        keys, problems = self._keys()
        destination_ids = self._destination_ids(urls)
        held = self._repository.holds()
        with self.engine.connect() as connection:
            members: dict[str, int] = dict(
                connection.execute(
                    select(audience_memberships.c.audience_id, func.count()).group_by(
                        audience_memberships.c.audience_id
                    )
                ).all()
            )
            told = {
                (row[0], row[1]): row[2]
                for row in connection.execute(
                    select(delivered.c.destination_id, delivered.c.audience_id, func.count())
                    .where(delivered.c.value == "true")
                    .group_by(delivered.c.destination_id, delivered.c.audience_id)
                )
            }
            queued: dict[tuple[int, str, str, bool], int] = {}
            for row in connection.execute(
                select(
                    outbox.c.destination_id,
                    outbox.c.audience_id,
                    outbox.c.value,
                    outbox.c.status,
                    func.count(),
                ).group_by(
                    outbox.c.destination_id, outbox.c.audience_id, outbox.c.value, outbox.c.status
                )
            ):
                key = (row[0], row[1], row[2], row[3] != STATUS_PENDING)
                queued[key] = queued.get(key, 0) + row[4]
            synced = {
                (row.destination_id, row.audience_id): row.last_success_at
                for row in connection.execute(select(pair_state))
            }
        result = []
        for audience in self._repository.load_audiences():
            per_url = []
            for url in urls:
                destination = destination_ids.get(url)
                pair = (destination, audience.audience_id)

                def count(value: str, rejected: bool, pair: tuple[Any, str] = pair) -> int:
                    return queued.get((pair[0], pair[1], value, rejected), 0)

                per_url.append(
                    {
                        "url": url,
                        "told_members": told.get(pair, 0),
                        "pending_entries": count("true", False),
                        "pending_exits": count("false", False),
                        "rejected": count("true", True) + count("false", True),
                        "last_successful_sync": _when(synced.get(pair)),
                    }
                )
            result.append(
                {
                    "id": audience.audience_id,
                    "name": audience.name,
                    "key": keys.get(audience.audience_id),
                    "key_problem": problems.get(audience.audience_id),
                    "enabled": audience.enabled,
                    "held": audience.audience_id in held,
                    "hold_reason": held.get(audience.audience_id, (None, False))[0],
                    "members": members.get(audience.audience_id, 0),
                    "urls": per_url,
                }
            )
        return result

    def members(self, audience_id: str, limit: int) -> Record:
        """Up to ``limit`` current members of one audience, by user id, and their total."""
        m = audience_memberships
        with self.engine.connect() as connection:
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
        url_of = {v: k for k, v in self._destination_ids(urls).items()}
        with self.engine.connect() as connection:
            current = connection.execute(
                select(audiences.c.id, audiences.c.name)
                .join(audience_memberships, audience_memberships.c.audience_id == audiences.c.id)
                .where(audience_memberships.c.user_id == user_id)
                .order_by(audiences.c.id)
            ).all()
            told = connection.execute(
                select(delivered)
                .where(delivered.c.user_id == user_id)
                .order_by(delivered.c.destination_id, delivered.c.audience_id)
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
                    "url": url_of.get(row.destination_id, f"(unconfigured #{row.destination_id})"),
                    "audience_id": row.audience_id,
                    "key": keys.get(row.audience_id),
                    "value": row.value == "true",
                    "delivered_at": _when(row.delivered_at),
                    "message_id": row.message_id,
                }
                for row in told
            ],
            "pending": [
                {
                    "url": url_of.get(row.destination_id, f"(unconfigured #{row.destination_id})"),
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
        with self.engine.connect() as connection:
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
        """Changes and deletes not yet accepted after at least one try, per URL."""
        keys, _ = self._keys()
        url_of = {v: k for k, v in self._destination_ids(urls).items()}
        with self.engine.connect() as connection:
            changes = connection.execute(
                select(outbox)
                .where((outbox.c.attempts > 0) | (outbox.c.status != STATUS_PENDING))
                .order_by(outbox.c.destination_id, outbox.c.id)
                .limit(limit)
            ).all()
            deletes = connection.execute(
                select(deletions)
                .where(and_(deletions.c.delivered_at.is_(None), deletions.c.attempts > 0))
                .order_by(deletions.c.destination_id, deletions.c.id)
                .limit(limit)
            ).all()
        found: list[Record] = [
            {
                "url": url_of.get(row.destination_id, f"(unconfigured #{row.destination_id})"),
                "type": "identify",
                "audience_id": row.audience_id,
                "key": keys.get(row.audience_id),
                "user_id": row.user_id,
                "value": row.value == "true",
                "state": "retrying" if row.status == STATUS_PENDING else row.status,
                "attempts": row.attempts,
                "last_status": row.last_status,
                "last_error": row.last_error,
                "last_attempt_at": _when(row.last_attempt_at),
            }
            for row in changes
        ]
        found += [
            {
                "url": url_of.get(row.destination_id, f"(unconfigured #{row.destination_id})"),
                "type": "delete",
                "audience_id": None,
                "key": None,
                "user_id": row.user_id,
                "value": None,
                "state": "retrying",
                "attempts": row.attempts,
                "last_status": row.last_status,
                "last_error": row.last_error,
                "last_attempt_at": _when(row.last_attempt_at),
            }
            for row in deletes
        ]
        return found[:limit]
