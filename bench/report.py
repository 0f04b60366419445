"""The benchmark's figures as a Markdown table: gateway, floor, and their ratio."""

from __future__ import annotations

import os
import platform
import random
import statistics
from collections.abc import Iterator
from pathlib import Path

# How many resamples make a percentile ratio's interval, and which share of them it holds.
RESAMPLES, HELD = 400, 0.9
# run.py's twin of the gateway: with --redis, the same gateway without Redis (its limits
# in its instance store, or with one worker in process);
# with --twin NAME=VALUE, the same gateway with those settings.
TWIN, SETTINGS_TWIN = "without Redis", "twin"


def load_average() -> str:
    """The machine's 1, 5 and 15 minute load averages: how busy it was meanwhile."""
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def machine() -> str:
    """Cores, CPU model and Python version."""
    model = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ),
        platform.processor() or "unknown CPU",
    )
    return f"{os.cpu_count()} cores ({model}), Python {platform.python_version()}"


def table(r: dict) -> str:
    """The figures as Markdown: gateway, floor, and the gateway's ratio to the floor."""
    lat, fb, cpu = r["latency_ms"], r["first_byte_ms"], r["cpu_ms_per_call"]
    clients, cpu_clients = r["clients"]["load"], r["clients"]["cpu"]

    def added(figures: dict, p: int) -> tuple[float, float]:
        direct = figures["direct"][p]
        return figures["gateway"][p] - direct, figures["floor"][p] - direct

    def both(figures: dict, key: str | None = None) -> tuple[float, float]:
        pick = (lambda f: f[key]) if key else (lambda f: f)
        return pick(figures["gateway"]), pick(figures["floor"])

    def spread(key: str, p: int) -> tuple[float, float] | None:
        calls = r.get(key)
        return percentile_interval(calls, p) if calls else None

    def rounds(per_round: dict | None) -> tuple[float, float] | None:
        if not per_round:
            return None
        ratios = [g / f for g, f in zip(per_round["gateway"], per_round["floor"], strict=True)]
        return min(ratios), max(ratios)

    cpu_rounds = r.get("cpu_ms_per_round", {})
    rows = [
        (
            "added p50, non-streaming, 1 client",
            *added(lat, 50),
            "ms",
            spread("latency_calls_ms", 50),
        ),
        (
            "added p99, non-streaming, 1 client",
            *added(lat, 99),
            "ms",
            spread("latency_calls_ms", 99),
        ),
        (
            "added time to first byte (p50), streaming, 1 client",
            *added(fb, 50),
            "ms",
            spread("first_byte_calls_ms", 50),
        ),
        (
            "added time to first byte (p99), streaming, 1 client",
            *added(fb, 99),
            "ms",
            spread("first_byte_calls_ms", 99),
        ),
        (
            f"throughput at {clients} clients, share of direct",
            *both(r["share_of_direct"]),
            "",
            rounds(r.get("rps")),
        ),
        (
            f"worker CPU per non-streaming call ({cpu_clients} clients)",
            *both(cpu["json"]),
            "ms",
            rounds(cpu_rounds.get("json")),
        ),
        (
            f"worker CPU per 20-chunk stream ({cpu_clients} clients)",
            *both(cpu["stream"]),
            "ms",
            rounds(cpu_rounds.get("stream")),
        ),
    ]
    if "open_streams" in r:
        s = r["open_streams"]
        n = s["gateway"]["streams"]
        rows += [
            (f"RSS per open stream ({n} open, one process)", *both(s, "kb_per_stream"), "KB", None),
            (
                f"time to first byte with {n} streams open (p50)",
                *both(s, "ttfb_busy_ms"),
                "ms",
                None,
            ),
        ]
    lines = [
        f"{r['when']}; {r['machine']}; gateway: {r['workers']} workers, {r['database']}"
        f"{', limits in Redis' if r.get('redis') else ''}; "
        f"floor: {r.get('floor_processes', 1)} process(es); "
        f"load average {r['load_start']} at the start, {r['load_after']} at the end",
        "",
        "| figure | gateway | floor | ratio (spread) |",
        "|---|---|---|---|",
    ]
    for name, gateway, floor, unit, between in rows:
        ratio = f"{gateway / floor:.2f}\N{MULTIPLICATION SIGN}" if floor > 0 else "n/a"
        if between is not None:
            ratio += f" ({between[0]:.2f}\N{EN DASH}{between[1]:.2f})"
        lines.append(f"| {name} | {_cell(gateway, unit)} | {_cell(floor, unit)} | {ratio} |")
    rates = ", ".join(f"{name} {statistics.median(v):.0f}" for name, v in r["rps"].items())
    direct = (
        f"direct: p50 {lat['direct'][50]:.2f} ms, p99 {lat['direct'][99]:.2f} ms, first byte "
        f"p50 {fb['direct'][50]:.2f} ms; calls/s at {clients} clients (median round): {rates}"
    )
    if "open_streams" in r:
        s = r["open_streams"]
        direct += (
            f"; first byte before the streams opened: gateway {s['gateway']['ttfb_idle_ms']:.2f} ms, "
            f"floor {s['floor']['ttfb_idle_ms']:.2f} ms"
        )
    if TWIN in lat or SETTINGS_TWIN in lat:
        return "\n".join([*lines, "", direct, "", *twin_table(r)])
    return "\n".join([*lines, "", direct])


def twin_table(r: dict) -> list[str]:
    """The gateway against its twin (``run.py --redis`` or ``--twin``), both in the same
    run, with what the difference between them changes.

    With ``--redis`` the twin keeps its limits without Redis, and the difference is what
    Redis adds (the gateway's figure minus the twin's); with ``--twin NAME=VALUE`` the
    twin has those settings, and the difference is what they change (the twin's figure
    minus the gateway's).
    """
    settings = r.get("twin_settings")
    if settings:
        base, subject = "gateway", SETTINGS_TWIN
        named = " ".join(f"{name}={value}" for name, value in settings.items())
        heading = [
            f"What the twin's settings change: {named}.",
            "The gateway against its twin (same database, same run, calls alternated);",
            "the difference is the twin's figure minus the gateway's.",
        ]
        columns = f"| figure | gateway | twin ({named}) | the twin's difference (spread) |"
    else:
        base, subject = TWIN, "gateway"
        heading = [
            "What limits in Redis add: the gateway against its twin without Redis",
            "(same database, same run, calls alternated); issue 11's target is at most 0.2 ms",
            "a call.",
        ]
        columns = "| figure | limits without Redis | limits in Redis | Redis adds (spread) |"
    lat, fb, cpu = r["latency_ms"], r["first_byte_ms"], r["cpu_ms_per_call"]
    cpu_rounds, rps = r["cpu_ms_per_round"], r["rps"]

    def percentiles(figures: dict, key: str, p: int) -> tuple:
        was, now = figures[base][p], figures[subject][p]
        return was, now, f"{now - was:+.2f} ms", difference_interval(r[key], p, base, subject)

    def per_call(kind: str) -> tuple:
        rounds = cpu_rounds[kind]
        added = [s - b for s, b in zip(rounds[subject], rounds[base], strict=True)]
        was, now = cpu[kind][base], cpu[kind][subject]
        return was, now, f"{now - was:+.2f} ms", (min(added), max(added))

    shares = [s / b for s, b in zip(rps[subject], rps[base], strict=True)]
    share = r["share_of_direct"]
    rows = [
        ("p50, non-streaming, 1 client", "ms", *percentiles(lat, "latency_calls_ms", 50)),
        ("p99, non-streaming, 1 client", "ms", *percentiles(lat, "latency_calls_ms", 99)),
        ("time to first byte (p50), streaming", "ms", *percentiles(fb, "first_byte_calls_ms", 50)),
        ("time to first byte (p99), streaming", "ms", *percentiles(fb, "first_byte_calls_ms", 99)),
        (
            f"throughput at {r['clients']['load']} clients, share of direct",
            "",
            share[base],
            share[subject],
            f"{share[subject] / share[base]:.2f}\N{MULTIPLICATION SIGN}",
            (min(shares), max(shares)),
        ),
        (f"worker CPU per non-streaming call ({r['clients']['cpu']} clients)", "ms",
         *per_call("json")),
        (f"worker CPU per 20-chunk stream ({r['clients']['cpu']} clients)", "ms",
         *per_call("stream")),
    ]  # fmt: skip
    lines = [*heading, "", columns, "|---|---|---|---|"]
    for name, unit, was, now, change, (low, high) in rows:
        sign = "+" if unit else ""  # milliseconds added, or a ratio
        change += f" ({low:{sign}.2f}\N{EN DASH}{high:{sign}.2f})"
        lines.append(f"| {name} | {_cell(was, unit)} | {_cell(now, unit)} | {change} |")
    return lines


def difference_interval(
    calls: dict[str, list[float]], p: int, base: str = TWIN, subject: str = "gateway"
) -> tuple[float, float]:
    """Where ``subject``'s ``p``th percentile minus ``base``'s lies in ``HELD`` of
    ``RESAMPLES`` resamples of the calls, drawn in pairs as ``percentile_interval``'s."""
    was, now = calls[base], calls[subject]
    return _held(
        [
            pct([now[i] for i in picks], p) - pct([was[i] for i in picks], p)
            for picks in _resamples(len(now), p)
        ]
    )


def percentile_interval(calls: dict[str, list[float]], p: int) -> tuple[float, float] | None:
    """Where the ratio of the gateway's added ``p``th percentile to the floor's lies in
    ``HELD`` of ``RESAMPLES`` resamples of the calls (a bootstrap).

    ``calls`` holds each target's milliseconds, call i of every target made side by side
    (``run.serial``): a resample draws call indices, the same for every target, so the
    machine's moments stay paired. A p99 of 2,000 calls rests on its 20 slowest: this
    says how far another run of the same builds may read. None if the floor's added
    percentile is not above 0 in most resamples.
    """
    gateway, floor, direct = calls["gateway"], calls["floor"], calls["direct"]
    ratios = []
    for picks in _resamples(len(gateway), p):
        base = pct([direct[i] for i in picks], p)
        ours, theirs = pct([gateway[i] for i in picks], p), pct([floor[i] for i in picks], p)
        if theirs - base > 0:
            ratios.append((ours - base) / (theirs - base))
    if len(ratios) < RESAMPLES / 2:
        return None
    return _held(ratios)


def _resamples(n: int, p: int) -> Iterator[list[int]]:
    """``RESAMPLES`` draws of ``n`` call indices with replacement; the same for the same
    ``p``, so the same calls give the same interval."""
    draw = random.Random(p)
    for _ in range(RESAMPLES):
        yield [draw.randrange(n) for _ in range(n)]


def _held(values: list[float]) -> tuple[float, float]:
    """The lowest and highest of the middle ``HELD`` of ``values``."""
    values.sort()
    cut = (1 - HELD) / 2
    return values[int(cut * len(values))], values[int((1 - cut) * len(values)) - 1]


def pct(values: list[float], p: float) -> float:
    """The ``p``th percentile of ``values`` (the nearest rank)."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(p / 100 * (len(ordered) - 1)))]


def _cell(value: float, unit: str) -> str:
    return f"{value:.2f} {unit}" if unit else f"{value:.2f}"
