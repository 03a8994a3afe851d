"""A change sent both ways is settled only once both of its calls are answered, whatever the
exchanges its answers arrive in; an answer handed in again replaces itself."""

from __future__ import annotations

from datetime import datetime

from syncer.core.outcomes import Outcome, OutcomeKind
from syncer.core.states import Call
from syncer.store.outbox import QueuedChange
from syncer.sync.exchanging import OwedCall
from syncer.sync.pairs import CallSettler

OK = Outcome(OutcomeKind.DELIVERED, 200, "", 1)
DOWN = Outcome(OutcomeKind.RETRYABLE, 503, "down", 1)
MOMENT = datetime(2026, 11, 30)


def change(change_id: int, call: Call, done: Call | None = None) -> QueuedChange:
    return QueuedChange(change_id, f"u{change_id}", "true", None, None, MOMENT, call, done)


def test_a_single_call_change_is_settled_at_its_answer() -> None:
    settler = CallSettler()
    one = change(1, Call.TRACK)
    assert settler.settle([(OwedCall(one, Call.TRACK), OK)]) == ([(1, OK)], [])


def test_a_both_change_waits_for_its_second_answer_in_a_later_exchange() -> None:
    settler = CallSettler()
    both = change(2, Call.BOTH)
    assert settler.settle([(OwedCall(both, Call.IDENTIFY), OK)]) == ([], [])
    results, half_done = settler.settle([(OwedCall(both, Call.TRACK), DOWN)])
    assert [(i, o.kind) for i, o in results] == [(2, OutcomeKind.RETRYABLE)]
    assert half_done == [(2, Call.IDENTIFY)]


def test_an_answer_handed_in_again_after_a_failed_exchange_counts_once() -> None:
    settler = CallSettler()
    both = change(3, Call.BOTH)
    first = [(OwedCall(both, Call.IDENTIFY), OK)]
    assert settler.settle(first) == ([], [])
    assert settler.settle(first) == ([], [])  # re-handed: still waiting for the track call
    assert settler.settle([(OwedCall(both, Call.TRACK), OK)]) == ([(3, OK)], [])


def test_a_both_change_with_one_call_accepted_owes_only_the_other() -> None:
    settler = CallSettler()
    half = change(4, Call.BOTH, done=Call.TRACK)
    assert half.calls == (Call.IDENTIFY,)
    assert settler.settle([(OwedCall(half, Call.IDENTIFY), OK)]) == ([(4, OK)], [])
