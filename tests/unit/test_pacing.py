"""Pacing a workflow URL: the pure slot reservation every worker makes, and how a chunk is paced.

``syncer.core.pacing.reserve(next_free, now, count, rate)`` is what a worker computes, under the
URL's row lock, in the transaction that claims a chunk: ``count`` consecutive slots ``1/rate``
apart from the first free one, and the URL's next free slot after them. These tests prove, with
no database and no clock:

- a table of cases: ``next_free`` unset, in the past, now or in the future; ``count`` 0, 1, many;
  slow and fast rates; epoch-sized clocks;
- successive reservations chain: the next one starts where the last one ended (or now, if that
  is later: slots left unused are never handed out again), so two never overlap;
- a property: any interleaving of reservations by several workers, at any non-decreasing
  database clock, gives slots whose union has no two closer than ``1/rate``, none in the past
  of its reservation, and no gap the schedule did not need;
- ``paced`` turns a reservation into send times on the event loop's clock (item n at
  ``now + delay + n * interval``), and leaves an unpaced chunk free to go at once.
"""

from __future__ import annotations

import math
from itertools import pairwise

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from syncer.core.pacing import Slots, reserve
from syncer.delivery.claims import paced

EPOCH = 1_764_000_000.0  # a database clock in epoch seconds (late 2025)


def slot_times(slots: Slots, now: float, count: int) -> list[float]:
    """The moments (on the clock ``now`` is on) of the ``count`` slots of a reservation."""
    return [now + slots.delay + n * slots.interval for n in range(count)]


# ---------------------------------------------------------------------------------------------
# A table of cases

CASES = [
    # (what, next_free, now, count, rate) -> (delay, interval, next_free)
    ("never sent: starts now", None, 100.0, 1, 10.0, (0.0, 0.1, 100.1)),
    ("never sent, nothing to send", None, 100.0, 0, 10.0, (0.0, 0.1, 100.0)),
    ("never sent, a chunk", None, 100.0, 5, 10.0, (0.0, 0.1, 100.5)),
    ("free slot in the past: starts now", 90.0, 100.0, 5, 10.0, (0.0, 0.1, 100.5)),
    ("free slot in the past, one", 99.95, 100.0, 1, 10.0, (0.0, 0.1, 100.1)),
    ("free slot exactly now", 100.0, 100.0, 5, 10.0, (0.0, 0.1, 100.5)),
    ("free slot in the future: waits for it", 102.0, 100.0, 5, 10.0, (2.0, 0.1, 102.5)),
    ("future, one", 100.05, 100.0, 1, 10.0, (0.05, 0.1, 100.15)),
    ("future, nothing to send: schedule unchanged", 102.0, 100.0, 0, 10.0, (2.0, 0.1, 102.0)),
    ("past, nothing to send: schedule starts now", 90.0, 100.0, 0, 10.0, (0.0, 0.1, 100.0)),
    ("slow rate: one every 2 s", None, 0.0, 3, 0.5, (0.0, 2.0, 6.0)),
    ("fast rate", 0.0, 0.0, 1000, 100_000.0, (0.0, 1e-5, 0.01)),
    ("epoch clock, future", EPOCH + 0.5, EPOCH, 4, 40.0, (0.5, 0.025, EPOCH + 0.6)),
    ("epoch clock, past", EPOCH - 30, EPOCH, 40, 40.0, (0.0, 0.025, EPOCH + 1.0)),
]


@pytest.mark.parametrize(
    ("next_free", "now", "count", "rate", "expected"),
    [pytest.param(*case[1:], id=case[0]) for case in CASES],
)
def test_reserve_table(
    next_free: float | None,
    now: float,
    count: int,
    rate: float,
    expected: tuple[float, float, float],
) -> None:
    slots = reserve(next_free, now, count, rate)
    delay, interval, after = expected
    assert slots.delay == pytest.approx(delay, abs=1e-9)
    assert slots.interval == pytest.approx(interval, rel=1e-12)
    assert slots.next_free == pytest.approx(after, abs=1e-6)
    # Never in the past, and the URL's next free slot is right after the last one taken.
    assert slots.delay >= 0
    if count:
        last = slot_times(slots, now, count)[-1]
        assert slots.next_free == pytest.approx(last + slots.interval, abs=1e-6)


def test_two_reservations_at_the_same_moment_follow_each_other() -> None:
    first = reserve(None, 100.0, 3, 10.0)
    second = reserve(first.next_free, 100.0, 2, 10.0)
    assert slot_times(first, 100.0, 3) == pytest.approx([100.0, 100.1, 100.2])
    assert slot_times(second, 100.0, 2) == pytest.approx([100.3, 100.4])
    assert second.next_free == pytest.approx(100.5)


def test_a_reservation_while_the_last_one_is_being_sent_waits_for_its_end() -> None:
    first = reserve(None, 100.0, 10, 10.0)  # 100.0 .. 100.9, next free 101.0
    second = reserve(first.next_free, 100.42, 3, 10.0)
    assert second.delay == pytest.approx(101.0 - 100.42)
    assert slot_times(second, 100.42, 3) == pytest.approx([101.0, 101.1, 101.2])
    assert min(slot_times(second, 100.42, 3)) - max(slot_times(first, 100.0, 10)) == (
        pytest.approx(0.1)
    )


def test_slots_left_unused_are_not_handed_out_again() -> None:
    # A worker reserved 100.0 .. 100.9 and stopped; the next one asks at 105: it starts at 105,
    # not at 101 (which would let it catch up with a burst of more than the rate).
    first = reserve(None, 100.0, 10, 10.0)
    later = reserve(first.next_free, 105.0, 4, 10.0)
    assert later.delay == 0.0
    assert later.next_free == pytest.approx(105.4)


def test_a_chain_of_reservations_never_overlaps() -> None:
    next_free: float | None = None
    now = EPOCH
    taken: list[float] = []
    for count, waited in [(1, 0.0), (64, 0.0), (0, 0.3), (64, 0.01), (7, 5.0), (128, 0.0)]:
        now += waited
        slots = reserve(next_free, now, count, 40.0)
        times = slot_times(slots, now, count)
        if taken and times:
            assert times[0] >= taken[-1] + 0.025 - 1e-6
        taken += times
        next_free = slots.next_free
    assert len(taken) == 1 + 64 + 64 + 7 + 128


# ---------------------------------------------------------------------------------------------
# The property: workers sharing one URL's schedule never send two requests closer than 1/rate


@st.composite
def interleavings(draw: st.DrawFn) -> tuple[float, list[tuple[int, float, int]]]:
    """A rate, and a sequence of (worker, seconds since the last reservation, slots wanted):
    the order in which the URL's row lock serializes the workers' reservations."""
    rate = draw(
        st.one_of(
            st.sampled_from([0.5, 1.0, 3.0, 40.0, 100.0, 1000.0]),
            st.floats(min_value=0.01, max_value=100_000.0, allow_nan=False),
        )
    )
    steps = draw(
        st.lists(
            st.tuples(
                st.integers(min_value=0, max_value=3),
                st.one_of(
                    st.just(0.0),
                    st.floats(min_value=0.0, max_value=10.0, allow_nan=False),
                    # about one interval, where rounding could put a slot too close
                    st.floats(min_value=0.0, max_value=2.0 / rate, allow_nan=False),
                ),
                st.integers(min_value=0, max_value=130),
            ),
            min_size=1,
            max_size=40,
        )
    )
    return rate, steps


@settings(deadline=None)  # pure and quick, but the machine is shared: no per-example deadline
@given(interleavings(), st.sampled_from([0.0, 1000.0, EPOCH]))
def test_interleaved_workers_never_get_slots_closer_than_one_interval(
    scenario: tuple[float, list[tuple[int, float, int]]], start: float
) -> None:
    rate, steps = scenario
    interval = 1.0 / rate
    next_free: float | None = None  # syncer_destinations.next_send_at
    now = start
    by_worker: dict[int, list[float]] = {}
    for worker, waited, count in steps:
        now += waited  # the database clock never goes back
        slots = reserve(next_free, now, count, rate)
        times = slot_times(slots, now, count)
        # Never in the past of the reservation, and no idle gap the schedule did not need:
        # the first slot is the later of now and the URL's first free slot.
        assert slots.delay >= 0
        expected_start = now if next_free is None else max(now, next_free)
        # Rounding is a few units in the last place of the largest figure involved.
        slack = 4 * math.ulp(max(now, expected_start) + 1000.0)
        assert now + slots.delay == pytest.approx(expected_start, abs=slack)
        assert slots.interval == interval
        next_free = slots.next_free
        by_worker.setdefault(worker, []).extend(times)

    # Rounding is the only slack: a few units in the last place of the latest slot (which may
    # lie far beyond the clock: 40 reservations of 130 slots at 85 s apart end days later).
    union = sorted(t for times in by_worker.values() for t in times)
    tolerance = 16 * math.ulp(max([1.0, now + 1000.0, *union[-1:]]))
    gaps = [b - a for a, b in pairwise(union)]
    assert all(gap >= interval - tolerance for gap in gaps), (min(gaps), interval)
    # Each worker's own slots are in order too (the delivery loop sends a chunk in order).
    for times in by_worker.values():
        assert all(b - a >= interval - tolerance for a, b in pairwise(times))


# ---------------------------------------------------------------------------------------------
# paced(): a reservation as send times on the event loop's clock


def test_paced_items_go_one_interval_apart_from_the_first_slot() -> None:
    items = [(f"ref-{n}", f"body-{n}".encode(), {"X-Signature": str(n)}) for n in range(4)]
    slots = Slots(delay=1.5, interval=0.25, next_free=0.0)  # next_free: not paced's business
    outgoing = paced(items, slots, now=10.0)
    assert [(o.ref, o.body, o.headers) for o in outgoing] == items
    assert [o.not_before for o in outgoing] == pytest.approx([11.5, 11.75, 12.0, 12.25])


def test_unpaced_items_may_go_at_once() -> None:
    items = [("a", b"1", {}), ("b", b"2", {})]
    assert [o.not_before for o in paced(items, None, now=10.0)] == [0.0, 0.0]
    assert paced([], Slots(0.0, 0.1, 0.0), now=10.0) == []
