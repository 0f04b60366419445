"""Benchmark: what traffic control adds to one call: with Redis, with an instance store,
in process.

Wired in, a call is admitted once before it is routed (``admission.admit``: a
maxConcurrent slot if the key has one, RPM, TPM and a per-model bucket, in one script)
and settled once when its record is final (``Permit.finished``: the slot given back,
its tokens charged, its cost added to the month's spend, in one write whose replies
are read with the next round trip; the call counted in the metrics). Those are timed
per call, for a key without and with ``maxConcurrent``, and with a monthly budget
("wired" rows): every client waits for ``admit`` (the target: under 0.2 ms), a JSON
call's for ``finished`` too (its answer goes once the settling is sent; a stream's last
event has gone by then), and their sum is the worker's time per call. Then each limiter
operation alone. Measured in a gevent-patched process like a gunicorn worker, one
caller at a time and 50 concurrent greenlets, against this benchmark's own
redis-server (or ``--redis-url``), its own instance store process (``storeprocess``,
as gunicorn's master starts one without Redis) and the in-process store. Prints a table
(microseconds) and writes bench/results/limiter.json.
Run: ``python bench/limiter.py [--calls 5000]``.
"""

from __future__ import annotations

from gevent import monkey

monkey.patch_all()

import argparse  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import shutil  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
import uuid  # noqa: E402
from collections.abc import Callable  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import gevent.pool  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from gateway import pricing  # noqa: E402
from gateway.admission import admit  # noqa: E402
from gateway.auth import Caller  # noqa: E402
from gateway.exchange import Exchange  # noqa: E402
from gateway.limiter import Limiter, limiter, model_bucket  # noqa: E402
from gateway.model_limits import model_limits  # noqa: E402
from tests.servers import RedisServer  # noqa: E402

PER_MODEL = [model_bucket("gpt-4o", 10**9, 10**6)]
BIG = 10**9  # limits no call reaches: every decision is an allow, as in steady traffic
OPERATIONS = ("admit", "admit+model", "enter", "leave", "charge")
# (row, maxConcurrent, budgetUsd): a budget no call reaches, as a key's steady traffic
WIRED = (
    ("wired", None, None),
    ("wired, maxConcurrent", BIG, None),
    ("wired, budgetUsd", None, 1e9),
)
PARTS = ("admit", "finished", "admit + finished")


def one_call(store: Limiter, key_id: int, timings: dict[str, list[float]]) -> None:
    """The limiter's operations for one call, each timed."""
    uid = uuid.uuid4().hex
    steps: list[tuple[str, Callable[[], object]]] = [
        ("admit", lambda: store.admit(key_id, BIG, BIG)),
        ("admit+model", lambda: store.admit(key_id, BIG, BIG, PER_MODEL)),
        ("enter", lambda: store.enter(key_id, uid, BIG)),
        ("leave", lambda: store.leave(key_id, uid)),
        ("charge", lambda: store.charge(key_id, BIG, 1234)),
    ]
    for name, step in steps:
        started = time.perf_counter()
        step()
        timings[name].append((time.perf_counter() - started) * 1e6)


USAGE = {"input_tokens": 1000, "output_tokens": 234}
COST = pricing.cost(USAGE, pricing.Prices(2.5, 10.0))  # a priced call: the month's spend


def wired_call(
    key_id: int, slots: int | None, budget: float | None, into: dict[str, list[float]]
) -> None:
    """What the call path does, as it does it: admit before routing, settle at the end."""
    caller = Caller(key_id, BIG, BIG, False, None, budget, slots, comment="bench")
    exchange = Exchange(api_key_id=key_id, model="gpt-4o", api_format="openai-chat")
    exchange.finish("completed", usage=USAGE, cost=COST)
    started = time.perf_counter()
    permit = admit(caller, "gpt-4o", stream=False)
    admitted = time.perf_counter()
    permit.finished(exchange, None)
    ended = time.perf_counter()
    for part, seconds in zip(
        PARTS, (admitted - started, ended - admitted, ended - started), strict=True
    ):
        into.setdefault(part, []).append(seconds * 1e6)


def measure(
    calls: int, concurrency: int, run: Callable[[int, Any], None], into: Any
) -> dict[str, float]:
    """Run ``calls`` calls, ``concurrency`` at once; the worker's time per call (wall/calls).

    With calls overlapping, their waits on Redis overlap too, and what is left is what
    each call costs the worker (CPU, mostly).
    """
    for i in range(200):  # warm up: connections, script cache
        run(i, type(into)())
    pool = gevent.pool.Pool(concurrency)
    started = time.perf_counter()
    for i in range(calls):
        pool.spawn(run, i, into)
    pool.join()
    return {"wall / calls": (time.perf_counter() - started) / calls * 1e6}


def figures(values: list[float]) -> dict[str, float]:
    return {
        "mean": statistics.fmean(values),
        "p50": statistics.median(values),
        "p99": statistics.quantiles(values, n=100)[98],
    }


def scenario(calls: int, concurrency: int) -> dict[str, dict[str, float]]:
    """Every row of one store at one concurrency."""
    out: dict[str, dict[str, float]] = {}
    for name, slots, budget in WIRED:
        timed: dict[str, list[float]] = {}

        def wired(i: int, into: dict[str, list[float]], s=slots, b=budget) -> None:  # type: ignore[no-untyped-def]
            wired_call(i % 50, s, b, into)

        wall = measure(calls, concurrency, wired, timed)
        for part in PARTS:
            out[f"{name}: {part}"] = figures(timed[part])
        out[f"{name}: admit + finished"].update(wall)
    timings: dict[str, list[float]] = {k: [] for k in OPERATIONS}

    def operations(i: int, into: dict[str, list[float]]) -> None:
        one_call(limiter, i % 50, into if into else {k: [] for k in OPERATIONS})

    wall = measure(calls, concurrency, operations, timings)
    out.update({name: figures(values) for name, values in timings.items()})
    out["all five operations"] = {"mean": 0.0, "p50": 0.0, "p99": 0.0, **wall}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=5000)
    parser.add_argument("--redis-url", default=None, help="default: start a redis-server")
    args = parser.parse_args()
    server = None if args.redis_url else RedisServer(Path(tempfile.mkdtemp()) / "redis")
    url = args.redis_url or server.url  # type: ignore[union-attr]
    store_dir = tempfile.mkdtemp(prefix="gateway-store-")
    socket_path = os.path.join(store_dir, "store.sock")
    store = subprocess.Popen(
        [sys.executable, "-m", "gateway.storeprocess", socket_path, str(os.getpid())], cwd=ROOT
    )
    while not os.path.exists(socket_path):
        time.sleep(0.01)
    model_limits._limits = {"gpt-4o": (BIG, 1e6)}  # one per-model limit, held in memory
    model_limits._loaded_at = float("inf")
    try:
        results = {}
        stores = (
            ("redis", {"REDIS_URL": url}),
            ("instance store", {"INSTANCE_STORE": socket_path}),
            ("in process", {}),
        )
        for kind, config in stores:
            # A generous timeout: a busy shared machine must not turn a slow answer into
            # a fail-open, which would time nothing.
            prefix = f"bench{uuid.uuid4().hex[:6]}"
            limiter.configure({**config, "REDIS_PREFIX": prefix, "REDIS_TIMEOUT": 1.0})
            for concurrency in (1, 50):
                name = f"{kind}, {concurrency} at once"
                results[name] = scenario(args.calls, concurrency)
                assert limiter.fail_opens == 0, f"{kind} did not answer in time"
    finally:
        store.kill()
        shutil.rmtree(store_dir, ignore_errors=True)  # killed, it removes nothing itself
        if server is not None:
            server.stop()
    head = f"{'microseconds':40} {'mean':>8} {'p50':>8} {'p99':>8} {'wall/calls':>11}"
    print(head)
    for name, rows in results.items():
        print(name)
        for op, row in rows.items():
            wall = row.get("wall / calls")
            print(
                f"  {op:38} {row['mean']:8.1f} {row['p50']:8.1f} {row['p99']:8.1f}"
                + (f" {wall:11.1f}" if wall is not None else "")
            )
    out = ROOT / "bench" / "results"
    out.mkdir(parents=True, exist_ok=True)
    (out / "limiter.json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
