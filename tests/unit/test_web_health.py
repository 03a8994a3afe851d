"""Why /healthz fails (:func:`syncer.web.health.health_reasons`), from the figures alone: the
last run, each URL's oldest pending change and runs in a row given up on, each at its
boundary."""

from __future__ import annotations

from datetime import datetime

import pytest

from syncer.store.status import RunRow
from syncer.web.health import FAILED_RUNS_LIMIT, UrlHealth, describe_seconds, health_reasons

HOUR = 3600.0
URL = "https://example.trayapp.io/wf"


def run(status: str, error: str | None = None, run_id: int = 7) -> RunRow:
    started = datetime(2025, 1, 1, 12, 0)
    return RunRow(run_id, "schedule", started, None, status, error, {})


def test_nothing_wrong_is_healthy() -> None:
    assert health_reasons(None, [], HOUR) == []
    assert health_reasons(run("ok"), [UrlHealth(URL)], HOUR) == []


@pytest.mark.parametrize("status", ["ok", "partial", "stopped", "cancelled", "running"])
def test_a_last_run_that_did_not_fail_is_no_reason(status: str) -> None:
    assert health_reasons(run(status), [], HOUR) == []


def test_a_failed_last_run_is_a_reason_with_its_error_on_one_line() -> None:
    reasons = health_reasons(run("failed", "OperationalError:\n  database is locked"), [], HOUR)
    assert reasons == ["the last run (#7) failed: OperationalError: database is locked"]


def test_a_crashed_last_run_is_a_reason() -> None:
    reasons = health_reasons(run("crashed", "the process running it died", 9), [], HOUR)
    assert reasons == ["the last run (#9) crashed: the process running it died"]


def test_a_backlog_is_a_reason_only_once_older_than_max_backlog_age() -> None:
    at_limit = UrlHealth(URL, oldest_pending_age_seconds=HOUR)
    over = UrlHealth(URL, oldest_pending_age_seconds=HOUR + 1)

    assert health_reasons(None, [at_limit], HOUR) == []
    assert health_reasons(None, [UrlHealth(URL, oldest_pending_age_seconds=None)], HOUR) == []
    assert health_reasons(None, [over], HOUR) == [
        f"{URL}: the oldest pending change has waited 1h 0m (max_backlog_age 1h 0m)"
    ]


def test_a_url_is_a_reason_from_three_failed_runs_in_a_row() -> None:
    assert FAILED_RUNS_LIMIT == 3
    assert health_reasons(None, [UrlHealth(URL, failed_runs=2)], HOUR) == []
    assert health_reasons(None, [UrlHealth(URL, failed_runs=3)], HOUR) == [
        f"{URL}: down or refusing for 3 runs in a row"
    ]


def test_every_reason_is_given_one_per_url_and_problem() -> None:
    other = "https://other.trayapp.io/wf"
    reasons = health_reasons(
        run("failed", "boom"),
        [
            UrlHealth(URL, failed_runs=4, oldest_pending_age_seconds=2 * HOUR),
            UrlHealth(other, failed_runs=0, oldest_pending_age_seconds=10.0),
        ],
        HOUR,
    )
    assert reasons == [
        "the last run (#7) failed: boom",
        f"{URL}: the oldest pending change has waited 2h 0m (max_backlog_age 1h 0m)",
        f"{URL}: down or refusing for 4 runs in a row",
    ]


@pytest.mark.parametrize(
    ("seconds", "text"),
    [(0, "0s"), (59.9, "59s"), (60, "1m 0s"), (3599, "59m 59s"), (3600, "1h 0m"),
     (86399, "23h 59m"), (86400, "1d 0h"), (90061, "1d 1h")],
)  # fmt: skip
def test_durations_for_people(seconds: float, text: str) -> None:
    assert describe_seconds(seconds) == text
