"""The status page's size chart (:func:`syncer.web.chart.size_chart`): where each run's size is
drawn, at the edges (no point, one point, all zero, one moment) and in proportion."""

from __future__ import annotations

from datetime import datetime, timedelta

from syncer.web.chart import size_chart

T0 = datetime(2025, 1, 1, 12, 0, 0)


def at(minutes: float) -> datetime:
    return T0 + timedelta(minutes=minutes)


def test_no_sizes_draw_no_points() -> None:
    chart = size_chart([])
    assert chart.points == [] and chart.polyline == "" and chart.largest == 0


def test_x_follows_time_and_y_runs_from_zero_at_the_bottom_to_the_largest_at_the_top() -> None:
    chart = size_chart([(at(0), 0), (at(10), 50), (at(40), 100)], width=108, height=58, padding=4)

    assert [(p.x, p.y) for p in chart.points] == [(4, 54), (29, 29), (104, 4)]
    assert chart.polyline == "4,54 29,29 104,4"
    assert chart.largest == 100
    assert [p.members for p in chart.points] == [0, 50, 100]
    assert [p.measured_at for p in chart.points] == [at(0), at(10), at(40)]


def test_a_small_change_looks_small_the_scale_starts_at_zero_not_at_the_smallest() -> None:
    chart = size_chart([(at(0), 990), (at(1), 1000)], width=100, height=104, padding=2)
    # 990 of 1000 is 99% of the height: one percent lower, not at the bottom.
    assert [p.y for p in chart.points] == [3, 2]


def test_one_point_or_points_at_one_moment_stand_in_the_middle() -> None:
    assert [(p.x, p.y) for p in size_chart([(at(0), 7)], width=100, height=50).points] == [(50, 4)]
    same = size_chart([(at(5), 1), (at(5), 2)], width=100, height=50)
    assert [p.x for p in same.points] == [50, 50]


def test_all_zero_sizes_lie_on_the_bottom_line() -> None:
    chart = size_chart([(at(0), 0), (at(1), 0)], width=100, height=50, padding=4)
    assert [p.y for p in chart.points] == [46, 46]
    assert chart.largest == 0


def test_coordinates_are_rounded_to_a_tenth_and_whole_ones_written_without_decimals() -> None:
    chart = size_chart([(at(0), 1), (at(3), 2), (at(9), 3)], width=100, height=50, padding=0)
    assert chart.polyline == "0,33.3 33.3,16.7 100,0"
