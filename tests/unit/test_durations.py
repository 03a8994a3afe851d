"""Durations written the way people write them in settings."""

from __future__ import annotations

import pytest

from syncer.core.durations import parse_duration


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("90s", 90.0),
        ("15m", 900.0),
        ("2h", 7200.0),
        ("1h30m", 5400.0),
        ("500ms", 0.5),
        ("1d", 86400.0),
        ("1d2h", 93600.0),
        ("1m30s", 90.0),
        ("1s500ms", 1.5),
        ("1.5h", 5400.0),
        ("0.5s", 0.5),
        ("0s5ms", 0.005),
        ("2H", 7200.0),
        (" 15m ", 900.0),
    ],
)
def test_parse_duration(text: str, seconds: float) -> None:
    assert parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize(
    "text",
    ["", "   ", "0s", "0ms", "0h0m", "abc", "10", "5x", "1h 30m", "-5s", "s", "1h30", "m5", ".5s"],
)
def test_parse_duration_rejects(text: str) -> None:
    with pytest.raises(ValueError):
        parse_duration(text)
