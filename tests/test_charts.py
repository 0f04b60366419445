"""Chart geometry: axis ticks, stacked bars, lines with gaps, shares. Pure units."""

from __future__ import annotations

import pytest

from gateway import charts


@pytest.mark.parametrize(
    ("top", "expected"),
    [
        (0, [0.0, 1.0]),
        (4, [0, 1, 2, 3, 4]),
        (7, [0, 2, 4, 6, 8]),
        (94_200, [0, 25_000, 50_000, 75_000, 100_000]),
        (1.0, [0, 0.25, 0.5, 0.75, 1.0]),
    ],
)
def test_nice_ticks_cover_the_top_in_round_steps(top: float, expected: list[float]) -> None:
    assert charts.nice_ticks(top) == pytest.approx(expected)


def test_stacked_bars_stack_in_order_and_fill_to_scale() -> None:
    chart = charts.stacked(["a", "b"], [("ok", [3, 0]), ("bad", [1, 2])])
    assert chart.ceiling == 4
    first = [s for s in chart.segments if s.x < chart.slots[1].x]
    assert [s.key for s in first] == ["ok", "bad"]  # first series at the bottom
    ok, bad = first
    assert ok.y + ok.height == pytest.approx(chart.bottom)
    assert bad.y + bad.height == pytest.approx(ok.y)  # stacked on top, touching
    assert ok.height + bad.height == pytest.approx(chart.bottom - chart.top)  # 4 of 4
    assert [s.key for s in chart.segments if s.x > chart.slots[1].x] == ["bad"]  # no 0 bars
    assert chart.slots[1].values == {"ok": 0, "bad": 2}


def test_lines_leave_gaps_where_a_value_is_unknown() -> None:
    chart = charts.lines(range(5), [("ms", [10, None, 30, 40, None])])
    (line,) = chart.lines
    assert line.d.count("M") == 2 and line.d.count("L") == 1
    assert len(line.points) == 3
    assert chart.y_ticks[0] == (chart.bottom, 0)  # the axis starts at 0, at the bottom


def test_time_labels_are_few_and_include_the_latest_bucket() -> None:
    chart = charts.stacked(list(range(31)), [("n", [1] * 31)])
    labels = [label for _, label in chart.x_ticks]
    assert len(labels) <= charts.X_LABELS and labels[-1] == 30


def test_shares_scale_to_the_largest() -> None:
    assert charts.shares([("a", 10), ("b", 5)]) == [("a", 10, 1.0), ("b", 5, 0.5)]
    assert charts.shares([]) == []
