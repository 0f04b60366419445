"""Recorder write latency while a big prune runs: ``python bench/retention.py [--postgres URL]``.

Seeds ``--rows`` records 60 days old into a fresh database (SQLite file in a temporary
folder, or a new database on the PostgreSQL server given), then runs two processes:
a writer that does what the recorder does (``upsert_records``: a call's pending
snapshot, then its final one, ``--rate`` calls a second) and measures every write,
and a pruner that runs one retention round (``RETENTION_DAYS=30``: every seeded row
goes). The writer runs alone for ``--seconds`` first (the baseline), then with the
pruner until it is done. Prints p50 / p99 / max of the writes in both phases, and
the prune's duration. ``--mode body`` strips bodies instead of deleting rows.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
import uuid
from datetime import timedelta
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def _connect(url: str):  # peewee is imported after gevent patched
    from gateway.db import database, open_database

    database.initialize(open_database(url))
    return database


def seed(url: str, rows: int) -> int:
    from gateway.db import migrate
    from gateway.models import ApiKey, Completion, utcnow

    db = _connect(url)
    migrate(db.obj)
    with db.connection_context():
        key = ApiKey.create(key_hash=uuid.uuid4().hex * 2, key_hint="sk-…bench").id
        old = utcnow() - timedelta(days=60)
        for start in range(0, rows, 1000):
            Completion.insert_many(
                [
                    {
                        "uid": uuid.uuid4().hex,
                        "api_key": key,
                        "model": "m",
                        "api_format": "openai-chat",
                        "status": "completed",
                        "prompt": {
                            "messages": [{"role": "user", "content": f"question {n} " * 20}]
                        },
                        "completion": [{"role": "assistant", "content": f"answer {n} " * 40}],
                        "prompt_tokens": 40,
                        "completion_tokens": 80,
                        "created_at": old + timedelta(seconds=n),
                        "updated_at": old,
                    }
                    for n in range(start, min(rows, start + 1000))
                ]
            ).execute()
    return key


def writer(url: str, key: int, seconds: float, rate: float, until: Path | None) -> None:
    """Write calls at ``rate`` per second; print each write's seconds as JSON lines."""
    import gevent

    from gateway.models import utcnow
    from gateway.writes import upsert_records

    db = _connect(url)
    start = time.monotonic()
    with db.connection_context():
        while True:
            if until is None and time.monotonic() - start > seconds:
                break
            if until is not None and until.exists():
                break
            row = {
                "kind": "completion",
                "uid": uuid.uuid4().hex,
                "api_key": key,
                "model": "m",
                "api_format": "openai-chat",
                "created_at": utcnow(),
                "prompt": {"messages": [{"role": "user", "content": "hello " * 50}]},
            }
            for status in ("pending", "completed"):
                began = time.perf_counter()
                upsert_records([{**row, "status": status}])
                print(json.dumps(time.perf_counter() - began), flush=True)
            gevent.sleep(1 / rate)


def pruner(url: str, mode: str, done: Path, batch: int) -> None:
    from flask import Flask

    from gateway.config import DEFAULTS
    from gateway.retention import Retention

    _connect(url)
    app = Flask("bench")
    app.config.update(DEFAULTS)
    app.config["RETENTION_DAYS" if mode == "delete" else "RETENTION_BODY_DAYS"] = 30
    app.config["RETENTION_BATCH"] = batch
    app.config["RETENTION_INTERVAL"] = 0  # one run, by hand
    app.config["RETENTION_LOCK_FILE"] = str(done.with_suffix(".lock"))
    job = Retention()
    job.init_app(app)
    began = time.monotonic()
    result = job.run()
    print(json.dumps({"seconds": time.monotonic() - began, "done": result}), flush=True)
    done.touch()


def _summary(label: str, values: list[float]) -> str:
    values = sorted(values)
    if not values:
        return f"{label}: no writes"

    def pick(q: float) -> float:
        return values[min(len(values) - 1, int(q * len(values)))] * 1000

    return (
        f"{label}: {len(values)} writes, p50 {pick(0.5):.2f} ms, p99 {pick(0.99):.2f} ms,"
        f" max {values[-1] * 1000:.2f} ms"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--postgres", help="a PostgreSQL server URL (a database is made)")
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--rate", type=float, default=100.0)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--batch", type=int, default=500, help="RETENTION_BATCH")
    parser.add_argument("--mode", choices=("delete", "body"), default="delete")
    parser.add_argument("--role", help=argparse.SUPPRESS)
    parser.add_argument("--url", help=argparse.SUPPRESS)
    parser.add_argument("--key", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--until", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.role:
        from gevent import monkey

        monkey.patch_all()
        if args.role == "writer":
            until = Path(args.until) if args.until else None
            writer(args.url, args.key, args.seconds, args.rate, until)
        else:
            pruner(args.url, args.mode, Path(args.until), args.batch)
        return
    from gevent import monkey

    monkey.patch_all()
    folder = Path(tempfile.mkdtemp(prefix="bench-retention-"))
    name = None
    if args.postgres:
        from gateway.db import open_database

        name = f"gw_bench_ret_{uuid.uuid4().hex[:8]}"
        admin = open_database(args.postgres)
        with admin.connection_context():
            admin.execute_sql(f'CREATE DATABASE "{name}"')
        url = args.postgres.rsplit("/", 1)[0] + f"/{name}"
    else:
        url = f"sqlite:///{folder / 'gateway.db'}"
    try:
        began = time.monotonic()
        key = seed(url, args.rows)
        print(f"seeded {args.rows} rows in {time.monotonic() - began:.1f} s ({url})")
        me = [sys.executable, __file__, "--url", url, "--key", str(key)]
        me += ["--rate", str(args.rate), "--mode", args.mode, "--batch", str(args.batch)]
        base = subprocess.run(
            [*me, "--role", "writer", "--seconds", str(args.seconds)],
            capture_output=True,
            text=True,
            check=True,
        )
        done = folder / "pruned"
        writing = subprocess.Popen(
            [*me, "--role", "writer", "--until", str(done)], stdout=subprocess.PIPE, text=True
        )
        time.sleep(0.5)
        pruning = subprocess.run(
            [*me, "--role", "pruner", "--until", str(done)],
            capture_output=True,
            text=True,
            check=True,
        )
        out, _ = writing.communicate(timeout=60)
        print(_summary("writes alone        ", [json.loads(x) for x in base.stdout.split()]))
        print(_summary("writes during prune ", [json.loads(x) for x in out.split()]))
        print("prune:", pruning.stdout.strip().splitlines()[-1])
    finally:
        if name:
            from gateway.db import database

            database.obj.close_all() if hasattr(database.obj, "close_all") else None
            with admin.connection_context():
                admin.execute_sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


if __name__ == "__main__":
    main()
