"""What a run did, per (URL, audience), per URL's deletes, and in total."""

from __future__ import annotations

from dataclasses import dataclass, field

from syncer.core.states import Kind, PairState
from syncer.core.traits import KeyProblem
from syncer.store.destinations import RemovedDestination
from syncer.store.runs import RunCounts

# Pairs in these states were left with something owed, whatever their counts say.
_UNFINISHED = frozenset(
    {PairState.HELD, PairState.URL_DOWN, PairState.URL_REFUSED, PairState.CLAIM_LOST}
)


@dataclass
class PairReport:
    """What one run did for one (URL, audience)."""

    url: str
    audience_id: str  # of the audience or computed trait (``kind``)
    key: str
    state: PairState = PairState.DONE
    entered: int = 0  # new entries this run found
    exited: int = 0  # new exits this run found
    delivered: int = 0  # accepted by the URL in this run (by this process)
    pending: int = 0
    rejected: int = 0  # refused for good this time; tried again next run
    parked: int = 0  # rejected too often: waits for `syncer retry`
    invalid: int = 0  # members whose rows cannot be sent: not queued, reported every run
    invalid_example: str | None = None
    note: str = ""  # why, in words, when the state is not DONE
    joined: bool = False  # another worker was sending this pair's changes too
    kind: Kind = Kind.AUDIENCE


@dataclass
class DeletionReport:
    """What one run did with the privacy deletes owed to one URL."""

    url: str
    delivered: int = 0
    pending: int = 0
    note: str = ""


@dataclass
class SyncReport:
    """What one run did, for the summary, the exit status and the runs table."""

    run_id: int | None
    pairs: list[PairReport] = field(default_factory=list)
    deletions: list[DeletionReport] = field(default_factory=list)
    problems: list[KeyProblem] = field(default_factory=list)
    removed_urls: list[RemovedDestination] = field(default_factory=list)
    duration_seconds: float = 0.0
    down_urls: list[str] = field(default_factory=list)  # given up on: down, or refusing

    @property
    def held(self) -> list[PairReport]:
        """The pairs the mass-exit guard holds."""
        return [pair for pair in self.pairs if pair.state is PairState.HELD]

    @property
    def counts(self) -> RunCounts:
        """The run's totals, counted per workflow URL."""
        return RunCounts(
            audiences=len({pair.audience_id for pair in self.pairs}),
            entered=sum(pair.entered for pair in self.pairs),
            exited=sum(pair.exited for pair in self.pairs),
            delivered=sum(pair.delivered for pair in self.pairs),
            pending=sum(pair.pending for pair in self.pairs),
            rejected=sum(pair.rejected for pair in self.pairs),
            parked=sum(pair.parked for pair in self.pairs),
            held=len(self.held),
            urls_down=len(self.down_urls),
            skipped=len(self.problems),
            invalid=sum(pair.invalid for pair in self.pairs),
            deletes_pending=sum(report.pending for report in self.deletions),
        )

    @property
    def fully_delivered(self) -> bool:
        """True when nothing due was left owed: no change pending or rejected, no pair held or
        given up, no delete owed to a configured URL.

        Parked changes do not count: they are reported, and wait for `syncer retry`, but no
        later run would deliver them by itself, so they must not make every run a failure.
        Deletes owed to a URL no longer configured do not count either: nothing can deliver
        them until it returns (or `syncer forget-url` drops them).
        """
        counts = self.counts
        return (
            counts.pending == 0
            and counts.rejected == 0
            and not any(pair.state in _UNFINISHED for pair in self.pairs)
            and not any(report.pending or report.note for report in self.deletions)
        )
