"""The named states of changes, runs and (URL, audience) pairs.

Stored as their string values; compared and branched on as enums, never by string prefixes.
"""

from __future__ import annotations

import enum


class ChangeStatus(enum.StrEnum):
    """Where a queued change stands."""

    PENDING = "pending"  # waiting to be claimed and sent
    REJECTED = "rejected"  # refused for good last time; the next plan queues it again
    PARKED = "parked"  # rejected on max_rejections runs: waits for `syncer retry`


class Kind(enum.StrEnum):
    """What a synced computation is: an audience (members, sent as true/false) or a computed
    trait (a JSON value per user). Audiences and traits may share an id: the kind tells them
    apart in every table of the syncer's."""

    AUDIENCE = "audience"
    TRAIT = "trait"


class Call(enum.StrEnum):
    """Which Segment call tells a workflow URL about a change (``send`` of its entry)."""

    IDENTIFY = "identify"  # the key as a trait of the user
    TRACK = "track"  # "Audience Entered" / "Audience Exited" (or "Trait Computed") events
    BOTH = "both"  # an identify and a track call, each delivered and retried on its own

    def owed(self, done: Call | None = None) -> tuple[Call, ...]:
        """The calls a change with this ``send`` is told by, but ``done`` (accepted already)."""
        calls = (Call.IDENTIFY, Call.TRACK) if self is Call.BOTH else (self,)
        return tuple(call for call in calls if call is not done)


class LogOutcome(enum.StrEnum):
    """What the change log says became of a change sent to a URL (one entry per recorded
    outcome; see ``syncer_change_log``)."""

    DELIVERED = "delivered"  # 2xx: the URL accepted it
    RETRYABLE = "retryable"  # timeout, connection lost, 408/423/429/5xx: sent again later
    REFUSED = "refused"  # 401/403/404/410: the URL refused everything; the change waits
    REJECTED = "rejected"  # another 4xx: sent again by the next run's plan
    PARKED = "parked"  # rejected max_rejections times: waits for `syncer retry`


class RunStatus(enum.StrEnum):
    """How a run ended (or that it has not)."""

    RUNNING = "running"
    OK = "ok"  # everything due was delivered
    PARTIAL = "partial"  # something stays owed: pending, rejected, held, or a URL refused
    FAILED = "failed"  # the run itself failed (database down, a bug)
    STOPPED = "stopped"  # asked to stop; what was not sent stays queued
    CANCELLED = "cancelled"  # cancelled after the stop grace ran out
    CRASHED = "crashed"  # the process running it died


class PairState(enum.StrEnum):
    """What one run did with one (URL, audience)."""

    DONE = "done"  # nothing left owed
    PENDING = "pending"  # changes left for a later run
    HELD = "held"  # the mass-exit guard holds it until `syncer approve`
    URL_DOWN = "url_down"  # the URL failed (retryable) and was given up for this run
    URL_REFUSED = "url_refused"  # the URL refused everything (401/403/404/410)
    STOPPED = "stopped"  # the run was asked to stop
    CLAIM_LOST = "claim_lost"  # the database could not confirm our claims: we stopped sending
