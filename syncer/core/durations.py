"""Durations written the way people write them in settings: "90s", "15m", "2h", "1h30m"."""

from __future__ import annotations

import re

_UNIT_SECONDS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h|d)")


def parse_duration(text: str) -> float:
    """Return the number of seconds ``text`` names; raise ValueError when it names none.

    Accepts one or more number-unit parts (ms, s, m, h, d) with no spaces, e.g. "90s" or "1h30m".
    """
    compact = text.strip().lower()
    if not compact:
        raise ValueError("empty duration")
    position = 0
    total = 0.0
    for match in _PART.finditer(compact):
        if match.start() != position:
            break
        total += float(match.group(1)) * _UNIT_SECONDS[match.group(2)]
        position = match.end()
    if position != len(compact):
        raise ValueError(f"{text!r} is not a duration like '90s', '15m', '2h' or '1h30m'")
    if total <= 0:
        raise ValueError(f"{text!r} must be longer than zero")
    return total
