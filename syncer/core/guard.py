"""The mass-exit guard: a pure decision from counts and limits.

A broken upstream job that empties a table looks, to a diff, exactly like everybody leaving. The
guard holds a (URL, audience) whose plan would tell the URL that too large a share of the members
it knows of have left, until someone approves it.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class GuardLimits:
    """``[guard]``: hold when more than ``max_exit_share`` of at least ``min_audience_size``."""

    max_exit_share: float
    min_audience_size: int


@dataclass(frozen=True)
class GuardVerdict:
    """Whether to hold, and why (a sentence fit to show)."""

    hold: bool
    reason: str = ""


def guard_verdict(
    *, told: int, new_exits: int, limits: GuardLimits, of_trait: bool = False
) -> GuardVerdict:
    """Decide for one (URL, audience) from the members the URL was told of and the new exits;
    or, ``of_trait``, for one (URL, computed trait) from the values the URL was told and the
    new nulls.

    The guard applies once the URL knows of at least ``min_audience_size`` members (and at least
    one), and holds when the exits are strictly more than ``max_exit_share`` of them: exactly
    that share still goes out.
    """
    if told < max(limits.min_audience_size, 1):
        return GuardVerdict(hold=False)
    if new_exits <= limits.max_exit_share * told:
        return GuardVerdict(hold=False)
    told_of, leave = ("values", "become null") if of_trait else ("members", "exit")
    return GuardVerdict(
        hold=True,
        reason=(
            f"{new_exits} of the {told} {told_of} the URL was told of would {leave} "
            f"(over {limits.max_exit_share:.0%})"
        ),
    )
