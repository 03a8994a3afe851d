"""The status page's size charts: an audience's member counts over runs, as SVG coordinates.

Pure arithmetic, so that it is tested on its own; the template draws the polyline and a dot per
run. Times run left to right in proportion; sizes from zero at the bottom to the largest at the
top, so that a small change looks small.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

CHART_WIDTH = 240
CHART_HEIGHT = 48
CHART_PADDING = 4


@dataclass(frozen=True)
class ChartPoint:
    """One run's size, placed in the chart."""

    x: float
    y: float
    members: int
    measured_at: datetime


@dataclass(frozen=True)
class Chart:
    """The points of one audience's chart, in a ``width`` x ``height`` SVG viewBox."""

    width: int
    height: int
    points: list[ChartPoint]
    largest: int

    @property
    def polyline(self) -> str:
        """The ``points`` attribute of the SVG polyline: "x,y x,y ..."."""
        return " ".join(f"{_number(p.x)},{_number(p.y)}" for p in self.points)


def _number(value: float) -> str:
    # One decimal is finer than a pixel; "12" rather than "12.0" keeps the page small.
    text = f"{value:.1f}"
    return text[:-2] if text.endswith(".0") else text


def size_chart(
    sizes: Sequence[tuple[datetime, int]],
    width: int = CHART_WIDTH,
    height: int = CHART_HEIGHT,
    padding: int = CHART_PADDING,
) -> Chart:
    """Place (measured_at, members) pairs, oldest first, in a chart: x in proportion to time
    (a lone point, or points at one moment, in the middle), y from 0 at the bottom to the
    largest count at the top (all at the bottom when every count is 0)."""
    inner_width, inner_height = width - 2 * padding, height - 2 * padding
    largest = max((members for _, members in sizes), default=0)
    points = []
    if sizes:
        first, last = sizes[0][0], sizes[-1][0]
        span = (last - first).total_seconds()
        for moment, members in sizes:
            share = (moment - first).total_seconds() / span if span > 0 else 0.5
            x = padding + inner_width * share
            y = padding + inner_height * (1 - members / largest if largest else 1)
            points.append(ChartPoint(round(x, 1), round(y, 1), members, moment))
    return Chart(width, height, points, largest)
