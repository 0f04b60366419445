"""Chart geometry for server-side SVG: series in, coordinates out. Pure: no I/O, no Flask.

The overview draws its pictures on the server, so they render with JavaScript off and
need no front-end build. This module only does the arithmetic (scales, "nice" axis
ticks, stacked bars, line paths with gaps where a value is unknown);
``templates/dashboard/_charts.html`` turns the result into SVG, with labels in the
visitor's language and a native tooltip (``<title>``) on every bucket.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

WIDTH, HEIGHT = 640, 220
LEFT, RIGHT, TOP, BOTTOM = 56, 12, 12, 26  # room for the axis labels
X_LABELS = 6  # at most this many time labels under a chart


@dataclass
class Segment:
    """One rectangle of a stacked bar."""

    key: str
    value: float
    x: float
    y: float
    width: float
    height: float


@dataclass
class Line:
    """One series as an SVG path; ``d`` breaks where a value is unknown."""

    key: str
    d: str
    points: list[tuple[float, float]]


@dataclass
class Slot:
    """One bucket's column: where it is and what it holds (for its tooltip)."""

    label: Any
    x: float
    width: float
    values: dict[str, float | None]


@dataclass
class Chart:
    """A time chart ready to draw: plot box, ticks, and bars or lines."""

    ceiling: float  # the value at the top of the plot (the highest tick)
    y_ticks: list[tuple[float, float]] = field(default_factory=list)  # (pixel y, value)
    x_ticks: list[tuple[float, Any]] = field(default_factory=list)  # (slot centre x, label)
    slots: list[Slot] = field(default_factory=list)
    segments: list[Segment] = field(default_factory=list)
    lines: list[Line] = field(default_factory=list)
    width: int = WIDTH
    height: int = HEIGHT
    left: int = LEFT
    right: int = WIDTH - RIGHT
    top: int = TOP
    bottom: int = HEIGHT - BOTTOM

    def y(self, value: float) -> float:
        """Value -> pixel y: 0 on the bottom edge of the plot, ``ceiling`` on its top."""
        return self.bottom - (self.bottom - self.top) * value / self.ceiling


def nice_ticks(top: float, count: int = 4) -> list[float]:
    """Round axis values from 0 up to at least ``top``: steps of 1, 2 or 5 times 10^n."""
    if top <= 0:
        return [0.0, 1.0]
    raw = top / count
    magnitude = 10 ** math.floor(math.log10(raw))
    step = next(m * magnitude for m in (1, 2, 2.5, 5, 10) if m * magnitude >= raw)
    return [i * step for i in range(math.ceil(top / step - 1e-9) + 1)]


def stacked(labels: Sequence[Any], series: Sequence[tuple[str, Sequence[float]]]) -> Chart:
    """Bars per slot, the series stacked in the order given (first at the bottom)."""
    totals = [sum(values[i] for _, values in series) for i in range(len(labels))]
    chart = _frame(labels, series, max(totals, default=0))
    for i, slot in enumerate(chart.slots):
        base = 0.0
        for key, values in series:
            if values[i] <= 0:
                continue
            y0, y1 = chart.y(base), chart.y(base + values[i])
            bar_width = slot.width * 0.8
            chart.segments.append(
                Segment(key, values[i], slot.x + slot.width * 0.1, y1, bar_width, y0 - y1)
            )
            base += values[i]
    return chart


def lines(
    labels: Sequence[Any],
    series: Sequence[tuple[str, Sequence[float | None]]],
    top: float | None = None,
) -> Chart:
    """One line per series across the slots; unknown values leave a gap."""
    known = [v for _, values in series for v in values if v is not None]
    chart = _frame(labels, series, top if top is not None else max(known, default=0))
    for key, values in series:
        parts, points, pen_down = [], [], False
        for slot, value in zip(chart.slots, values, strict=True):
            if value is None:
                pen_down = False
                continue
            x, y = slot.x + slot.width / 2, chart.y(value)
            parts.append(f"{'L' if pen_down else 'M'}{x:.1f},{y:.1f}")
            points.append((round(x, 1), round(y, 1)))
            pen_down = True
        chart.lines.append(Line(key, " ".join(parts), points))
    return chart


def shares(
    items: Sequence[tuple[str, float]], width: float = 1.0
) -> list[tuple[str, float, float]]:
    """(name, value, bar length) with the largest value filling ``width``."""
    largest = max((value for _, value in items), default=0)
    return [(name, value, width * value / largest if largest else 0.0) for name, value in items]


def _frame(labels: Sequence[Any], series: Sequence[tuple[str, Sequence]], top: float) -> Chart:
    ticks = nice_ticks(top)
    chart = Chart(ceiling=ticks[-1])
    span = chart.right - chart.left
    width = span / max(len(labels), 1)
    for i, label in enumerate(labels):
        values = {key: values[i] for key, values in series}
        chart.slots.append(Slot(label, chart.left + i * width, width, values))
    every = max(1, math.ceil(len(labels) / X_LABELS))
    chart.x_ticks = [
        (slot.x + slot.width / 2, slot.label)
        for i, slot in enumerate(chart.slots)
        if (len(labels) - 1 - i) % every == 0  # always label the latest bucket
    ]
    chart.y_ticks = [(round(chart.y(value), 1), value) for value in ticks]
    return chart


def overview(data: Any, statuses: Sequence[str]) -> dict[str, Any]:
    """The overview's pictures from a ``stats.Overview`` (statuses: the order to stack)."""
    buckets = data.buckets
    starts = [b.start for b in buckets]
    shown = [s for s in statuses if any(b.statuses[s] for b in buckets)] or ["completed"]
    return {
        "requests": stacked(starts, [(s, [b.statuses[s] for b in buckets]) for s in shown]),
        "tokens": stacked(
            starts,
            [
                ("prompt", [b.prompt_tokens for b in buckets]),
                ("completion", [b.completion_tokens for b in buckets]),
                ("embedding", [b.embedding_tokens for b in buckets]),
            ],
        ),
        "latency": lines(
            starts,
            [
                ("duration", [b.duration.value for b in buckets]),
                ("ttft", [b.ttft.value for b in buckets]),
            ],
        ),
        "success": lines(starts, [("success", [b.success_rate for b in buckets])], top=1.0),
        "models": shares([((model, kind), n) for model, n, kind in data.models]),
    }
