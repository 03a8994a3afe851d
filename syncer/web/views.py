"""What the status page and the user lookup show, gathered from the store into plain values
for the templates (which only lay them out)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from syncer.core.states import Kind
from syncer.core.traits import Subject
from syncer.store import Store
from syncer.store.audiences import AudienceRow
from syncer.store.inspection import Inspection
from syncer.store.status import Backlog, DestinationRow, HeldPair, Overview, RunRow, StatusStore
from syncer.web.chart import Chart, size_chart
from syncer.web.health import check
from syncer.web.urls import ConfiguredUrls

RECENT_RUNS = 20
CHART_RUNS = 60


@dataclass(frozen=True)
class UrlView:
    """One configured URL's line on the page."""

    url: str
    row: DestinationRow | None  # None until a run has seen it
    backlog: Backlog
    oldest_pending_age_seconds: float | None
    held: list[tuple[HeldPair, str]]  # and the key (or id) of the held audience or trait


@dataclass(frozen=True)
class SubjectView:
    """One audience or trait: what it is, its size at the last run, and its chart."""

    kind: str
    id: str
    name: str
    key: str | None
    enabled: bool
    from_query: bool
    members: int | None  # at the last run that measured it
    measured_at: datetime | None
    chart: Chart


@dataclass(frozen=True)
class StatusPage:
    """Everything ``GET /`` shows."""

    now: datetime
    reasons: list[str]
    urls: list[UrlView]
    subjects: list[SubjectView]
    runs: list[RunRow]
    last_ok_at: datetime | None


def status_page(
    store: Store,
    status: StatusStore,
    urls: ConfiguredUrls,
    defined: Sequence[AudienceRow],
    now: datetime,
    max_backlog_age_seconds: float,
) -> StatusPage:
    """Read what the status page shows, as of ``now``."""
    overview = status.overview()
    rows, resolution = store.audiences.with_keys(defined)
    keys = resolution.keys
    history = status.size_history(CHART_RUNS)
    subjects = []
    for row in sorted(rows, key=lambda r: (r.kind.value, r.name.lower(), r.audience_id)):
        points = history.get((row.kind.value, row.audience_id), [])
        last = points[-1] if points else None
        subjects.append(
            SubjectView(
                kind=row.kind.value,
                id=row.audience_id,
                name=row.name,
                key=keys.get(row.subject),
                enabled=row.enabled,
                from_query=row.from_query,
                members=last.members if last is not None else None,
                measured_at=last.measured_at if last is not None else None,
                chart=size_chart([(p.measured_at, p.members) for p in points]),
            )
        )
    return StatusPage(
        now=now,
        reasons=check(overview, urls.canonical, now, max_backlog_age_seconds),
        urls=_url_views(overview, urls, keys, now),
        subjects=subjects,
        runs=status.recent_runs(RECENT_RUNS),
        last_ok_at=overview.last_ok_at,
    )


def _url_views(
    overview: Overview, urls: ConfiguredUrls, keys: dict[Subject, str], now: datetime
) -> list[UrlView]:
    views = []
    for url, row in urls.rows(overview.destinations).items():
        backlog = overview.backlog_of(row.id) if row is not None else Backlog()
        held = [
            (pair, keys.get(Subject(Kind(pair.kind), pair.audience_id), pair.audience_id))
            for pair in overview.held
            if row is not None and pair.destination_id == row.id
        ]
        views.append(UrlView(url, row, backlog, backlog.oldest_pending_age(now), held))
    return views


def user_timeline(
    store: Store, defined: Sequence[AudienceRow], user_id: str, urls: ConfiguredUrls
) -> dict[str, Any]:
    """One user's explain timeline (see :meth:`Inspection.explain`)."""
    return Inspection(store, defined).explain(user_id, urls.urls)
