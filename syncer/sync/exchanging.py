"""One exchange of a delivery, as a value in and a value out: record the outcomes handed in,
claim what comes next, and build and sign the bodies to send.

A plain function of the store and two picklable values, so that it runs the same on a
database thread of this process or in the store's helper process (:mod:`syncer.sync.helper`).
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from datetime import datetime
from typing import NamedTuple

from syncer.core.outcomes import Outcome
from syncer.core.pacing import Slots
from syncer.core.payload import Computation, TraitChange, identify_body, track_body
from syncer.core.signing import signature_headers
from syncer.core.states import Call, Kind
from syncer.store import Store
from syncer.store.claims import Claim
from syncer.store.outbox import QueuedChange


@dataclass(frozen=True)
class ExchangeRequest:
    """What one exchange records, and how much more it claims, for one (URL, audience)."""

    claim: Claim
    destination_id: int
    computation: Computation
    results: list[tuple[int, Outcome]]
    want: int
    after_id: int
    now: datetime
    max_rejections: int
    rate_per_second: float
    clear_refusal: bool
    secret: str | None = field(repr=False)  # what the bodies are signed with
    half_done: list[tuple[int, Call]] = field(default_factory=list)
    from_query: bool = False  # the audience or trait is defined by a query in the settings
    run_id: int | None = None  # the run the change log files the outcomes under


class OwedCall(NamedTuple):
    """One request to send: a claimed change and one of the calls it is told by."""

    change: QueuedChange
    call: Call


@dataclass(frozen=True)
class ExchangeReply:
    """The changes now claimed, each with the body that tells the URL about it and the signed
    headers it goes with, and what the store said besides (see
    :class:`syncer.store.outbox.Exchanged`)."""

    claimed: list[tuple[OwedCall, bytes, dict[str, str]]]
    lost: int = 0
    held: bool = False
    slots: Slots | None = None


def exchange(store: Store, request: ExchangeRequest) -> ExchangeReply:
    """Record and claim in one transaction of ``store``'s, then build and sign the bodies."""
    computation = request.computation
    exchanged = store.outbox.exchange(
        request.claim,
        request.destination_id,
        computation.computation_id,
        results=request.results,
        want=request.want,
        after_id=request.after_id,
        now=request.now,
        max_rejections=request.max_rejections,
        rate_per_second=request.rate_per_second,
        clear_refusal=request.clear_refusal,
        kind=Kind(computation.computation_class),
        half_done=request.half_done,
        from_query=request.from_query,
        run_id=request.run_id,
    )
    claimed = []
    for change in exchanged.claimed:
        for call in change.calls:
            body = call_body(computation, change, call, store.namespace)
            claimed.append((OwedCall(change, call), body, signature_headers(body, request.secret)))
    return ExchangeReply(claimed, exchanged.lost, exchanged.held, exchanged.slots)


def call_body(
    computation: Computation, change: QueuedChange, call: Call, namespace: uuid.UUID
) -> bytes:
    """The body of one of a change's calls. A change's only call carries its messageId; the
    track call of a change sent both ways has one of its own."""
    if call is Call.IDENTIFY:
        return identify_body(computation, trait_change(change), namespace)
    message_kind = "track" if change.call is Call.BOTH else "change"
    return track_body(computation, trait_change(change), namespace, message_kind)


def trait_change(change: QueuedChange) -> TraitChange:
    """A claimed change as the payload builder takes it."""
    return TraitChange(
        change.change_id,
        change.user_id,
        change.anonymous_id,
        change.email,
        change.value,
        change.created_at,
    )
