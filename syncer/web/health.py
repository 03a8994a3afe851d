"""``/healthz``: why the syncer needs attention, from what the database says.

:func:`health_reasons` is a pure function of the figures, tested on its own; :func:`check`
takes them from an :class:`~syncer.store.status.Overview`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

from syncer.core.states import RunStatus
from syncer.store.status import Overview, RunRow

# A URL given up on in this many runs in a row is reported (one bad run is a blip).
FAILED_RUNS_LIMIT = 3
_BAD_RUN_STATUSES = frozenset({RunStatus.FAILED.value, RunStatus.CRASHED.value})


@dataclass(frozen=True)
class UrlHealth:
    """What the health check looks at for one configured URL."""

    url: str
    failed_runs: int = 0
    oldest_pending_age_seconds: float | None = None


def describe_seconds(seconds: float) -> str:
    """A duration for people: "45s", "12m 5s", "3h 20m", "2d 4h"."""
    whole = int(seconds)
    days, rest = divmod(whole, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    if days:
        return f"{days}d {hours}h"
    if hours:
        return f"{hours}h {minutes}m"
    if minutes:
        return f"{minutes}m {secs}s"
    return f"{secs}s"


def health_reasons(
    last_run: RunRow | None, urls: Sequence[UrlHealth], max_backlog_age_seconds: float
) -> list[str]:
    """Why the syncer is unhealthy, one reason per line (none: healthy).

    The last finished run failed or crashed; a URL's oldest pending change has waited longer
    than ``max_backlog_age_seconds``; a URL was given up on FAILED_RUNS_LIMIT runs in a row.
    """
    reasons = []
    if last_run is not None and last_run.status in _BAD_RUN_STATUSES:
        detail = f": {' '.join(last_run.error.split())[:300]}" if last_run.error else ""
        reasons.append(f"the last run (#{last_run.id}) {last_run.status}{detail}")
    for url in urls:
        age = url.oldest_pending_age_seconds
        if age is not None and age > max_backlog_age_seconds:
            reasons.append(
                f"{url.url}: the oldest pending change has waited {describe_seconds(age)} "
                f"(max_backlog_age {describe_seconds(max_backlog_age_seconds)})"
            )
        if url.failed_runs >= FAILED_RUNS_LIMIT:
            reasons.append(f"{url.url}: down or refusing for {url.failed_runs} runs in a row")
    return reasons


def url_health(overview: Overview, configured: dict[str, str], now: datetime) -> list[UrlHealth]:
    """The health figures of each configured URL; ``configured``: URL -> its canonical form."""
    by_canonical = {row.canonical: row for row in overview.destinations}
    found = []
    for url, canonical in configured.items():
        row = by_canonical.get(canonical)
        if row is None:  # not synced yet: nothing owed, nothing failed
            found.append(UrlHealth(url))
            continue
        found.append(
            UrlHealth(
                url,
                failed_runs=row.failed_runs,
                oldest_pending_age_seconds=overview.backlog_of(row.id).oldest_pending_age(now),
            )
        )
    return found


def check(
    overview: Overview, configured: dict[str, str], now: datetime, max_backlog_age_seconds: float
) -> list[str]:
    """:func:`health_reasons` of what the database says at ``now``."""
    return health_reasons(
        overview.last_finished_run,
        url_health(overview, configured, now),
        max_backlog_age_seconds,
    )
