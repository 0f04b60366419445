"""Benchmark: how many call records the recorder writes, and what it costs the call path.

Several processes ("instances", each one gevent-patched like a gunicorn worker, with the
recorder as the gateway configures it) write into one PostgreSQL database (a fresh one,
created on ``--postgres`` and dropped afterwards). Each instance feeds its recorder
synthetic finished calls (a prompt of two messages, an answer, usage, one attempt) as fast
as it takes them: it keeps at most ``--backlog`` calls queued and waits while more are.
Rows per second are counted from the recorder's own ``writes`` over a window common to
every instance, overall and per instance.

The second figure is what the recorder costs the calls sharing its process: a greenlet
standing for the call path sleeps 1 ms over and over, and the lateness of each wake-up
(p50 / p99 / max) is how long it waited to run again: with the recorder idle, then
saturated. A call's latency grows by that lateness at each of its switches. On a busy
machine part of it is the OS giving the CPU to other processes (PostgreSQL, the other
instances), so the CPU time this process spent meanwhile is reported too ("held": with
the process busier, the sleep fills with more of its own work). Plainest of all: how
long the recorder's writers run each time they have the worker (CPU time between two
switches, "writer slices"): a call waits at most one such slice per writer.
Run: ``python bench/recorder.py --postgres postgresql://postgres@127.0.0.1:5432/test``.
"""

from __future__ import annotations

from gevent import monkey

monkey.patch_all()

import argparse  # noqa: E402
import json  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
import uuid  # noqa: E402
from pathlib import Path  # noqa: E402

import gevent  # noqa: E402
import greenlet  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

PROMPT = {
    "messages": [
        {"role": "system", "content": "You are a helpful assistant. " * 4},
        {"role": "user", "content": "Summarise the following text, please. " * 10},
    ],
    "temperature": 0.2,
}
ANSWER = [{"role": "assistant", "content": "Here is a short summary of the text. " * 15}]


# -- one instance --------------------------------------------------------------


def _lateness(until: float, into: list[tuple[float, float]]) -> None:
    """Sleep 1 ms over and over until ``until``; note how late each wake-up is (ms).

    And how much CPU the process spent meanwhile, beyond the 1 ms sleep (ms).
    """
    while time.time() < until:
        started, cpu = time.perf_counter(), time.thread_time()
        gevent.sleep(0.001)
        into.append(
            ((time.perf_counter() - started) * 1000 - 1.0, (time.thread_time() - cpu) * 1000)
        )


def _call(key_id: int) -> object:
    from gateway.exchange import Exchange

    exchange = Exchange(
        api_key_id=key_id, model="gpt-4o", api_format="openai-chat", prompt=PROMPT, stream=True
    )
    exchange.serving(1, 1, "openai", "http://upstream.example")
    exchange.attempt("bench", "gpt-4o", "ok", 12, "req-" + exchange.uid[:8], status=200)
    exchange.first_token()
    exchange.finish(
        "completed",
        output=ANSWER,
        usage={"input_tokens": 120, "output_tokens": 90},
        upstream_id="chatcmpl-" + exchange.uid[:12],
    )
    return exchange


def instance(args: argparse.Namespace) -> None:
    """Idle for ``--idle`` seconds, then feed the recorder for ``--seconds``; print JSON."""
    from flask import Flask

    from gateway import db
    from gateway.config import DEFAULTS
    from gateway.recorder import recorder

    app = Flask("bench-recorder")
    app.config.update(DEFAULTS)
    app.config.update(DATABASE_URL=args.database, JOURNAL_DIR=args.journal)
    db.init_app(app)
    recorder.init_app(app)

    start = args.start
    gevent.sleep(max(0.0, start - time.time()))
    idle: list[tuple[float, float]] = []
    _lateness(start + args.idle, idle)

    # How long a writer runs each time it has the worker (CPU ms between two switches).
    writers, slices, last = set(recorder._group), [], [time.thread_time()]

    def trace(event: str, switch: tuple) -> None:
        now = time.thread_time()
        if switch[0] in writers:
            slices.append((now - last[0]) * 1000)
        last[0] = now

    busy: list[tuple[float, float]] = []
    feeding = start + args.idle
    window = (feeding + args.warmup, feeding + args.warmup + args.seconds)
    probe = gevent.spawn(_lateness, window[1], busy)
    counted: dict[str, float] = {}
    while time.time() < window[1]:
        if "from" not in counted and time.time() >= window[0]:
            counted["from"], busy[:] = recorder.writes, []
            greenlet.settrace(trace)
        while recorder.backlog() >= args.backlog:
            gevent.sleep(0.0005)
        recorder.record(_call(args.key))
        gevent.sleep(0)  # the feeder is not the thing measured: let others run
    rows = recorder.writes - counted.get("from", 0)
    greenlet.settrace(None)
    probe.join()
    recorder.flush(30)
    print(
        json.dumps(
            {"rows": rows, "seconds": args.seconds, "idle": idle, "busy": busy, "slices": slices},
        )
    )


# -- the run -------------------------------------------------------------------


def _figures(samples: list[list[float]]) -> dict[str, float]:
    out = {}
    for i, name in enumerate(("late", "held")):
        values = [s[i] for s in samples]
        out[f"{name} p50"] = statistics.median(values)
        out[f"{name} p99"] = statistics.quantiles(values, n=100)[98]
        out[f"{name} max"] = max(values)
    return out


def _slices(values: list[float]) -> dict[str, float]:
    return {
        "p50": statistics.median(values),
        "p99": statistics.quantiles(values, n=100)[98],
        "max": max(values),
    }


def run(url: str, instances: int, args: argparse.Namespace, tmp: Path) -> dict:
    """Start ``instances`` processes on database ``url``; gather their figures."""
    start = time.time() + 3.0  # time for every instance to import and connect
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                __file__,
                "--instance",
                f"--database={url}",
                f"--journal={tmp / f'journal-{instances}-{i}'}",
                f"--key={args.key}",
                f"--start={start}",
                f"--idle={args.idle}",
                f"--warmup={args.warmup}",
                f"--seconds={args.seconds}",
                f"--backlog={args.backlog}",
            ],
            stdout=subprocess.PIPE,
        )
        for i in range(instances)
    ]
    outs = [json.loads(p.communicate(timeout=120)[0]) for p in procs]
    per = [o["rows"] / o["seconds"] for o in outs]
    return {
        "instances": instances,
        "rows/s": sum(per),
        "rows/s per instance": per,
        "1 ms sleep, recorder idle": _figures([x for o in outs for x in o["idle"]]),
        "1 ms sleep, recorder saturated": _figures([x for o in outs for x in o["busy"]]),
        "writer slices ms": _slices([x for o in outs for x in o["slices"]]),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--postgres", default="postgresql://postgres@127.0.0.1:5432/test")
    parser.add_argument("--instances", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--idle", type=float, default=2.0, help="seconds probed idle")
    parser.add_argument("--warmup", type=float, default=1.0)
    parser.add_argument("--backlog", type=int, default=1000, help="calls queued at most")
    parser.add_argument("--instance", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--database", help=argparse.SUPPRESS)
    parser.add_argument("--journal", help=argparse.SUPPRESS)
    parser.add_argument("--key", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--start", type=float, default=0.0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.instance:
        instance(args)
        return

    from gateway.db import migrate, open_database
    from gateway.models import ApiKey, Completion

    admin, name = open_database(args.postgres), f"gw_benchrec_{uuid.uuid4().hex[:10]}"
    with admin.connection_context():
        admin.execute_sql(f'CREATE DATABASE "{name}"')
    url = args.postgres.rsplit("/", 1)[0] + "/" + name
    results = []
    try:
        db = open_database(url)
        migrate(db)
        with db.bind_ctx([ApiKey, Completion]), db.connection_context():
            args.key = ApiKey.create(key_hash="b" * 64, key_hint="sk-…bench").id
        with tempfile.TemporaryDirectory() as tmp:
            for count in sorted({args.instances, 1}, reverse=True):
                results.append(run(url, count, args, Path(tmp)))
        with db.bind_ctx([Completion]), db.connection_context():
            stored = Completion.select().count()
        db.close_all()
    finally:
        with admin.connection_context():
            admin.execute_sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        admin.close_all()

    print(f"recorder into PostgreSQL, {args.seconds:g} s windows, {stored} rows stored")
    for r in results:
        per = ", ".join(f"{x:.0f}" for x in r["rows/s per instance"])
        print(f"{r['instances']} instance(s): {r['rows/s']:.0f} rows/s ({per})")
        for phase in ("recorder idle", "recorder saturated"):
            f = r[f"1 ms sleep, {phase}"]
            print(
                f"  1 ms sleep, {phase:18}: late p50 {f['late p50']:.3f} p99 {f['late p99']:.3f}"
                f" max {f['late max']:.1f} ms; held p50 {f['held p50']:.3f}"
                f" p99 {f['held p99']:.3f} max {f['held max']:.1f} ms"
            )
        f = r["writer slices ms"]
        print(f"  writer slices: p50 {f['p50']:.3f} p99 {f['p99']:.3f} max {f['max']:.2f} ms")
    out = ROOT / "bench" / "results"
    out.mkdir(parents=True, exist_ok=True)
    (out / "recorder.json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
