"""The benchmark's figures as a Markdown table: gateway, floor, and their ratio."""

from __future__ import annotations

import os
import platform
import statistics
from pathlib import Path


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

    rows = [
        ("added p50, non-streaming, 1 client", *added(lat, 50), "ms"),
        ("added p99, non-streaming, 1 client", *added(lat, 99), "ms"),
        ("added time to first byte (p50), streaming, 1 client", *added(fb, 50), "ms"),
        ("added time to first byte (p99), streaming, 1 client", *added(fb, 99), "ms"),
        (f"throughput at {clients} clients, share of direct", *both(r["share_of_direct"]), ""),
        (f"worker CPU per non-streaming call ({cpu_clients} clients)", *both(cpu["json"]), "ms"),
        (f"worker CPU per 20-chunk stream ({cpu_clients} clients)", *both(cpu["stream"]), "ms"),
    ]
    if "open_streams" in r:
        s = r["open_streams"]
        n = s["gateway"]["streams"]
        rows += [
            (f"RSS per open stream ({n} open, one process)", *both(s, "kb_per_stream"), "KB"),
            (f"time to first byte with {n} streams open (p50)", *both(s, "ttfb_busy_ms"), "ms"),
        ]
    lines = [
        f"{r['when']}; {r['machine']}; gateway: {r['workers']} workers, {r['database']}"
        f"{', limits in Redis' if r.get('redis') else ''}; "
        f"floor: {r.get('floor_processes', 1)} process(es); "
        f"load average {r['load_start']} at the start, {r['load_after']} at the end",
        "",
        "| figure | gateway | floor | ratio |",
        "|---|---|---|---|",
    ]
    for name, gateway, floor, unit in rows:
        ratio = f"{gateway / floor:.2f}\N{MULTIPLICATION SIGN}" if floor > 0 else "n/a"
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
    return "\n".join([*lines, "", direct])


def _cell(value: float, unit: str) -> str:
    return f"{value:.2f} {unit}" if unit else f"{value:.2f}"
