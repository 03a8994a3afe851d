"""The mass-exit guard's decision (:func:`syncer.core.guard.guard_verdict`) at its boundaries.

The guard applies from ``max(min_audience_size, 1)`` members told (not one below) and holds when
the exits are strictly more than ``max_exit_share`` of them (exactly that share still goes out).
Every boundary is tested on both sides, so that moving it by one (``<`` for ``<=``, ``>`` for
``>=``, a floor of 0 or 2 instead of 1) fails a row.
"""

from __future__ import annotations

import pytest

from syncer.core.guard import GuardLimits, guard_verdict

HALF_OF_TEN = GuardLimits(max_exit_share=0.5, min_audience_size=10)


@pytest.mark.parametrize(
    ("told", "new_exits", "limits", "hold"),
    [
        # --- the audience size from which the guard applies ---
        pytest.param(9, 9, HALF_OF_TEN, False, id="told-one-below-min-size -> never held"),
        pytest.param(10, 10, HALF_OF_TEN, True, id="told-exactly-min-size -> guarded, held"),
        pytest.param(11, 11, HALF_OF_TEN, True, id="told-one-above-min-size -> guarded, held"),
        # --- the exit share (told 10, share 0.5: 5 exits may go out) ---
        pytest.param(10, 4, HALF_OF_TEN, False, id="exits-below-share -> not held"),
        pytest.param(10, 5, HALF_OF_TEN, False, id="exits-exactly-share -> not held"),
        pytest.param(10, 6, HALF_OF_TEN, True, id="exits-one-over-share -> held"),
        pytest.param(20, 10, HALF_OF_TEN, False, id="exits-exactly-share-of-20 -> not held"),
        pytest.param(20, 11, HALF_OF_TEN, True, id="exits-one-over-share-of-20 -> held"),
        # 0.3 * 10 is 3.0000000000000004 in floating point: 3 exits are still the share.
        pytest.param(
            10, 3, GuardLimits(0.3, 1), False, id="exits-exactly-inexact-share -> not held"
        ),
        pytest.param(10, 4, GuardLimits(0.3, 1), True, id="exits-one-over-inexact-share -> held"),
        # --- min_audience_size 0 still needs one member told (the floor is 1) ---
        pytest.param(0, 0, GuardLimits(0.5, 0), False, id="min-size-0-told-0-no-exits -> not held"),
        pytest.param(0, 1, GuardLimits(0.5, 0), False, id="min-size-0-told-0 -> below floor"),
        pytest.param(1, 1, GuardLimits(0.5, 0), True, id="min-size-0-told-1 -> guarded, held"),
        pytest.param(1, 0, GuardLimits(0.5, 0), False, id="min-size-0-told-1-no-exits -> not held"),
        pytest.param(1, 1, GuardLimits(0.5, 1), True, id="min-size-1-told-1 -> guarded, held"),
        # --- the extreme shares ---
        pytest.param(10, 0, GuardLimits(0.0, 1), False, id="share-0-no-exits -> not held"),
        pytest.param(10, 1, GuardLimits(0.0, 1), True, id="share-0-one-exit -> held"),
        pytest.param(10, 10, GuardLimits(1.0, 1), False, id="share-1-everyone-exits -> not held"),
    ],
)
def test_guard_verdict(told: int, new_exits: int, limits: GuardLimits, hold: bool) -> None:
    verdict = guard_verdict(told=told, new_exits=new_exits, limits=limits)
    assert verdict.hold is hold
    if hold:
        assert f"{new_exits} of the {told} members" in verdict.reason
    else:
        assert verdict.reason == ""
