"""Benchmark: what the limiter adds to one call, with Redis and in process.

A call asks the limiter once before it is routed (``admit``: RPM, TPM and, when
configured, a per-model bucket, in one script) and once after it ended (``charge``:
its real tokens); a key with ``maxConcurrent`` also takes and gives back a slot
(``enter``/``leave``). Only ``admit`` (and ``enter``) delay the client; all of them cost
worker time. Measured in a gevent-patched process like a gunicorn worker, one caller at
a time and 50 concurrent greenlets, against this benchmark's own redis-server (or
``--redis-url``) and the in-process store. Prints a table (microseconds) and writes
bench/results/limiter.json. Run: ``python bench/limiter.py [--calls 5000]``.
"""

from __future__ import annotations

from gevent import monkey

monkey.patch_all()

import argparse  # noqa: E402
import json  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
import uuid  # noqa: E402
from collections.abc import Callable  # noqa: E402
from pathlib import Path  # noqa: E402

import gevent.pool  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from gateway.limiter import Limiter, model_bucket  # noqa: E402
from tests.servers import RedisServer  # noqa: E402

PER_MODEL = [model_bucket("gpt-4o", 10**9, 10**6)]
BIG = 10**9  # limits no call reaches: every decision is an allow, as in steady traffic


def one_call(limiter: Limiter, key_id: int, n: int, timings: dict[str, list[float]]) -> None:
    """The limiter's part of one call, each operation timed."""
    uid = uuid.uuid4().hex
    steps: list[tuple[str, Callable[[], object]]] = [
        ("admit", lambda: limiter.admit(key_id, BIG, BIG)),
        ("admit+model", lambda: limiter.admit(key_id, BIG, BIG, PER_MODEL)),
        ("enter", lambda: limiter.enter(key_id, uid, BIG)),
        ("leave", lambda: limiter.leave(key_id, uid)),
        ("charge", lambda: limiter.charge(key_id, BIG, 1234)),
    ]
    for name, step in steps:
        started = time.perf_counter()
        step()
        timings[name].append((time.perf_counter() - started) * 1e6)


def measure(limiter: Limiter, calls: int, concurrency: int) -> dict[str, dict[str, float]]:
    timings: dict[str, list[float]] = {
        k: [] for k in ("admit", "admit+model", "enter", "leave", "charge")
    }
    for i in range(200):  # warm up: connections, script cache
        one_call(limiter, i % 7, i, {k: [] for k in timings})
    pool = gevent.pool.Pool(concurrency)
    started = time.perf_counter()
    for i in range(calls):
        pool.spawn(one_call, limiter, i % 50, i, timings)
    pool.join()
    wall = time.perf_counter() - started
    out = {
        name: {
            "mean": statistics.fmean(values),
            "p50": statistics.median(values),
            "p99": statistics.quantiles(values, n=100)[98],
        }
        for name, values in timings.items()
    }
    # Worker time per call: every operation of a call with maxConcurrent, under this load.
    out["per call (wall / calls)"] = {"mean": wall / calls * 1e6, "p50": 0.0, "p99": 0.0}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=5000)
    parser.add_argument("--redis-url", default=None, help="default: start a redis-server")
    args = parser.parse_args()
    server = None if args.redis_url else RedisServer(Path(tempfile.mkdtemp()) / "redis")
    url = args.redis_url or server.url  # type: ignore[union-attr]
    try:
        results = {}
        for store, config in (("redis", {"REDIS_URL": url}), ("in process", {})):
            limiter = Limiter()
            limiter.configure({**config, "REDIS_PREFIX": f"bench{uuid.uuid4().hex[:6]}"})
            for concurrency in (1, 50):
                name = f"{store}, {concurrency} at once"
                results[name] = measure(limiter, args.calls, concurrency)
                assert limiter.fail_opens == 0, "Redis did not answer in time"
    finally:
        if server is not None:
            server.stop()
    print(f"{'microseconds per operation':34} {'mean':>8} {'p50':>8} {'p99':>8}")
    for scenario, ops in results.items():
        print(scenario)
        for op, figures in ops.items():
            print(f"  {op:32} {figures['mean']:8.1f} {figures['p50']:8.1f} {figures['p99']:8.1f}")
    out = ROOT / "bench" / "results"
    out.mkdir(parents=True, exist_ok=True)
    (out / "limiter.json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
