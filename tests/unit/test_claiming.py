"""The claim keeper's gate, on a fake clock: when a worker may start a request under its claim.

``ClaimKeeper`` (syncer.sync.claiming) decides, before every attempt, whether a request started
now ends before the claim could run out. These tests drive it with an injected clock and a
scripted renewal, with no I/O and no real waiting, and prove:

- the gate is open right after ``starting()`` and closes once ``now + timeout + SAFETY`` reaches
  the earliest expiry; once ``now + SAFETY`` reaches it, the claim is lost for good;
- a later ``starting()`` (more rows claimed) never pushes the expiry back: the first rows bound it;
- a successful renewal moves the expiry to (start of the renewal + ttl), not to its end;
- a renewal that raises does not extend; one that finishes at or after the expiry, or after
  the gate declared the claim lost, does not revive it; ``mark_lost()`` closes for good;
- renewals are asked for every ttl / 3, and ``renewing()`` stops them when its block ends;
- settings the validator accepts keep the gate open while renewals succeed promptly.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass
from types import ModuleType
from typing import Any

import pytest

from syncer.settings import DeliverySettings
from syncer.store.claims import Claim
from syncer.sync import claiming
from syncer.sync.claiming import SAFETY_SECONDS, ClaimKeeper, renewal_interval

TTL = 9.0
TIMEOUT = 2.0
# With TTL 9 and TIMEOUT 2, starting at 0: the gate closes at 9 - 2 - 1 = 6, the claim is
# lost at 9 - 1 = 8, and renewals come every 3 seconds.
CLOSES = TTL - TIMEOUT - SAFETY_SECONDS
LOST = TTL - SAFETY_SECONDS
TICK = 1e-6


class FakeClock:
    """A monotonic clock that moves only when told."""

    def __init__(self, now: float = 0.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


class _Finished(Exception):
    """Raised by the fake sleep when the script has no renewal left: ends the drive."""


@dataclass(frozen=True)
class Renewal:
    """One scripted renewal: how long it takes on the fake clock, whether it fails, and
    whether a sender asks the gate at its very end (the worst moment: the old expiry still
    stands)."""

    seconds: float = 0.0
    fails: bool = False
    gate_asked_at_end: bool = False


class ScriptedRenewals:
    """The database side of a keeper: renewals that take scripted time and succeed or fail,
    and a sleep that moves the fake clock instead of waiting."""

    def __init__(self, clock: FakeClock, script: list[Renewal]) -> None:
        self.clock = clock
        self.script = list(script)
        self.sleeps: list[float] = []
        self.renewed = 0
        self.gate_answers: list[tuple[float, bool]] = []
        self.keeper: ClaimKeeper | None = None

    async def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        if not self.script:
            raise _Finished
        self.clock.advance(seconds)

    async def renew(self) -> int:
        step = self.script.pop(0)
        self.clock.advance(step.seconds)
        if step.gate_asked_at_end:
            assert self.keeper is not None
            self.gate_answers.append((self.clock(), self.keeper.gate()))
        if step.fails:
            raise OSError("database unreachable")
        self.renewed += 1
        return 1


class _FakeAsyncio(ModuleType):
    """``asyncio`` as the keeper's module sees it, with ``sleep`` replaced."""

    def __init__(self, sleep: Callable[[float], Any]) -> None:
        super().__init__("asyncio")
        self.sleep = sleep

    def __getattr__(self, name: str) -> Any:
        return getattr(asyncio, name)


def keeper_on(
    clock: FakeClock,
    renew: Callable[[], Any] | None = None,
    *,
    ttl: float = TTL,
    timeout: float = TIMEOUT,
) -> ClaimKeeper:
    async def never() -> int:
        raise AssertionError("no renewal expected")

    return ClaimKeeper(
        Claim("token", "host:1:test", ttl),
        renew or never,
        request_timeout_seconds=timeout,
        clock=clock,
    )


def drive(
    monkeypatch: pytest.MonkeyPatch, script: list[Renewal], *, ttl: float = TTL, timeout: float
) -> tuple[ClaimKeeper, FakeClock, ScriptedRenewals]:
    """A keeper started at 0 whose renewal loop ran through ``script``."""
    clock = FakeClock()
    renewals = ScriptedRenewals(clock, script)
    keeper = keeper_on(clock, renewals.renew, ttl=ttl, timeout=timeout)
    renewals.keeper = keeper
    monkeypatch.setattr(claiming, "asyncio", _FakeAsyncio(renewals.sleep))
    keeper.starting()

    async def run() -> None:
        with pytest.raises(_Finished):
            await keeper._renew_forever()

    asyncio.run(run())
    return keeper, clock, renewals


def gate_at(keeper: ClaimKeeper, clock: FakeClock, when: float) -> bool:
    clock.now = when
    return keeper.gate()


# ---------------------------------------------------------------------------------------------
# The gate without renewals


@pytest.mark.parametrize(
    ("when", "open_", "lost"),
    [
        (0.0, True, False),
        (CLOSES - TICK, True, False),
        # A request started now could still be in flight when the claim runs out.
        (CLOSES, False, False),
        (LOST - TICK, False, False),
        # The claim may have run out (within the safety margin): never trusted again.
        (LOST, False, True),
        (TTL, False, True),
        (TTL * 10, False, True),
    ],
)
def test_gate_after_starting_closes_before_the_earliest_expiry(
    when: float, open_: bool, lost: bool
) -> None:
    clock = FakeClock()
    keeper = keeper_on(clock)
    keeper.starting()

    assert gate_at(keeper, clock, when) is open_
    assert keeper.lost is lost


def test_gate_is_closed_before_anything_was_claimed() -> None:
    clock = FakeClock()
    assert keeper_on(clock).gate() is False


def test_gate_never_opens_when_a_request_cannot_fit_in_the_claim() -> None:
    clock = FakeClock()
    keeper = keeper_on(clock, ttl=TIMEOUT + SAFETY_SECONDS, timeout=TIMEOUT)
    keeper.starting()
    assert keeper.gate() is False


def test_a_later_starting_does_not_push_the_expiry_back() -> None:
    # Rows claimed first run out first: claiming more later gives them no more life.
    clock = FakeClock()
    keeper = keeper_on(clock)
    keeper.starting()
    clock.advance(CLOSES - 1)
    keeper.starting()

    assert gate_at(keeper, clock, CLOSES - TICK) is True
    assert gate_at(keeper, clock, CLOSES) is False


def test_once_lost_the_gate_stays_closed_even_if_asked_at_an_earlier_time() -> None:
    clock = FakeClock()
    keeper = keeper_on(clock)
    keeper.starting()
    assert gate_at(keeper, clock, LOST) is False
    assert gate_at(keeper, clock, 0.0) is False


def test_mark_lost_closes_the_gate_for_good() -> None:
    clock = FakeClock()
    keeper = keeper_on(clock)
    keeper.starting()
    assert keeper.gate() is True

    keeper.mark_lost()

    assert keeper.lost is True
    assert gate_at(keeper, clock, 0.0) is False
    keeper.starting()
    assert keeper.gate() is False


# ---------------------------------------------------------------------------------------------
# Renewals (ttl 9: one every 2.25 s; started at 0, the first renewal starts at 2.25)


@dataclass(frozen=True)
class RenewalCase:
    name: str
    script: list[Renewal]
    # When the gate closes after the script, or None: closed now, and for good.
    closes_at: float | None
    renewed: int


RENEWAL_CASES = [
    # Starts at 2.25, ends at 2.75: the claim lives until 2.25 + 9, measured from the start.
    RenewalCase("prompt renewal extends from its start", [Renewal(0.5)], 11.25 - 3, 1),
    # Second starts at 2.75 + 2.25 = 5: expiry 14.
    RenewalCase("renewals keep extending", [Renewal(0.5), Renewal(0.5)], 14 - 3, 2),
    RenewalCase("failed renewal does not extend", [Renewal(0.5, fails=True)], CLOSES, 0),
    RenewalCase(
        "failure then prompt renewal extends from the later start",
        [Renewal(0.5, fails=True), Renewal(0.5)],
        14 - 3,
        1,
    ),
    # Starts at 2.25, ends at 8.15 (< 9): extended, but only to 2.25 + 9 (from its start).
    RenewalCase(
        "slow renewal that ends in time extends from its start", [Renewal(5.9)], 11.25 - 3, 1
    ),
    # Ends at 9 exactly: some rows may already have run out (and been taken).
    RenewalCase("renewal ending at the expiry does not revive", [Renewal(6.75)], None, 1),
    RenewalCase(
        "renewal ending after the expiry does not revive, nor does a prompt one later",
        [Renewal(7.0), Renewal(0.5)],
        None,
        2,
    ),
    # Ends at 8.25 (< 9), but a sender asked the gate at 8.25 (>= 9 - SAFETY): lost already.
    RenewalCase(
        "renewal ending after the gate declared the claim lost does not revive",
        [Renewal(6.0, gate_asked_at_end=True), Renewal(0.5)],
        None,
        2,
    ),
]


@pytest.mark.parametrize("case", RENEWAL_CASES, ids=[case.name for case in RENEWAL_CASES])
def test_renewal_moves_the_expiry_only_when_it_renewed_every_row(
    monkeypatch: pytest.MonkeyPatch, case: RenewalCase
) -> None:
    keeper, clock, renewals = drive(monkeypatch, case.script, timeout=TIMEOUT)

    assert renewals.renewed == case.renewed
    assert renewals.sleeps == [renewal_interval(TTL)] * (len(case.script) + 1)
    if case.closes_at is None:
        assert keeper.gate() is False
        assert gate_at(keeper, clock, clock.now + 1000) is False
        assert keeper.lost is True
    else:
        assert clock.now < case.closes_at, "the script ran past the moment it checks"
        assert gate_at(keeper, clock, case.closes_at - TICK) is True
        assert gate_at(keeper, clock, case.closes_at) is False
        assert keeper.lost is False


def test_renewal_after_mark_lost_does_not_reopen(monkeypatch: pytest.MonkeyPatch) -> None:
    clock = FakeClock()
    renewals = ScriptedRenewals(clock, [Renewal(0.1), Renewal(0.1)])
    keeper = keeper_on(clock, renewals.renew)
    monkeypatch.setattr(claiming, "asyncio", _FakeAsyncio(renewals.sleep))
    keeper.starting()
    keeper.mark_lost()

    async def run() -> None:
        with pytest.raises(_Finished):
            await keeper._renew_forever()

    asyncio.run(run())
    assert renewals.renewed == 2
    assert keeper.gate() is False


def test_renewals_are_asked_for_every_third_of_the_ttl() -> None:
    assert renewal_interval(TTL) == TTL / 4
    assert renewal_interval(120) == 30


def test_renewing_block_stops_renewals_when_it_ends(monkeypatch: pytest.MonkeyPatch) -> None:
    clock = FakeClock()
    real_sleep = asyncio.sleep
    calls: list[float] = []

    async def renew() -> int:
        calls.append(clock())
        return 1

    async def fake_sleep(seconds: float) -> None:
        clock.advance(seconds)
        await real_sleep(0)

    monkeypatch.setattr(claiming, "asyncio", _FakeAsyncio(fake_sleep))
    keeper = keeper_on(clock, renew)

    async def run() -> int:
        async with keeper.renewing():
            keeper.starting()
            for _ in range(100):
                if len(calls) >= 3:
                    break
                await real_sleep(0)
            assert len(calls) >= 3, "the keeper did not renew in the background"
            assert keeper.gate() is True
        during = len(calls)
        for _ in range(20):
            await real_sleep(0)
        assert len(calls) == during, "renewals went on after the block ended"
        return during

    assert asyncio.run(run()) >= 3


# ---------------------------------------------------------------------------------------------
# The settings bound and the gate agree


@pytest.mark.parametrize(
    ("timeout", "lease", "renewal_seconds"),
    [
        pytest.param(10.0, 120.0, 0.05, id="defaults"),
        pytest.param(1.0, 4.0, 0.05, id="the fencing integration tests"),
        pytest.param(0.8, 4.0, 0.05, id="the renewal integration test"),
        pytest.param(5.0, 9.5, 0.05, id="tight"),
        pytest.param(0.5, 2.26, 0.05, id="just above the validator's minimum"),
    ],
)
def test_accepted_settings_keep_the_gate_open_while_renewals_succeed_promptly(
    monkeypatch: pytest.MonkeyPatch, timeout: float, lease: float, renewal_seconds: float
) -> None:
    DeliverySettings(timeout_seconds=timeout, lease_seconds=lease)  # accepted by the validator
    cycles = 6
    script = [Renewal(renewal_seconds, gate_asked_at_end=True) for _ in range(cycles)]

    keeper, _, renewals = drive(monkeypatch, script, ttl=lease, timeout=timeout)

    closed_at = [when for when, open_ in renewals.gate_answers if not open_]
    assert closed_at == [], f"gate closed at {closed_at} although every renewal succeeded"
    assert keeper.gate() is True
