"""Benchmark: the gateway against the floor (a bare gevent proxy) and the upstream itself.

Starts the fake upstream (``tests/fake_upstream.py``), the floor (``bench/floor.py``) and
the gateway (real gunicorn with ``gunicorn.conf.py``: 2 workers, SQLite; ``--postgres
URL`` for a fresh PostgreSQL database on that server; ``--redis URL`` for limits in that
Redis, as several instances have them, and beside it its twin without Redis (its
instance store), so that what Redis adds is measured in the same run; ``--twin NAME=VALUE`` for a twin
with those settings instead, so that what they change is), then measures the targets
in one run, alternating target by target so that the machine's noise falls on all alike:

- added latency (p50, p99), non-streaming, 1 client: a target's minus direct's;
- added time to first byte, streaming, 1 client;
- throughput at 50 clients, as a share of calling the upstream directly;
- worker CPU per call, non-streaming and a 20-chunk stream, 10 clients: utime + stime
  from ``/proc/<pid>/stat`` of the gunicorn workers (and the instance store's, which
  does the gateway's work: Redis's is not counted) and of the floor's process;
- with ``--streams N``: N open streams on one worker (a 1-worker gateway, and the
  floor): RSS per open stream, and the time to first byte of a new call meanwhile.

Every target gets the same request bytes. Prints a Markdown table (gateway, floor,
ratio) and writes every figure to ``bench/results/latest.json``. Run: ``make bench``,
``make bench BENCH_ARGS="--streams 5000"`` or ``python bench/run.py --help``.
"""

from __future__ import annotations

from gevent import monkey

monkey.patch_all()

import argparse  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import resource  # noqa: E402
import shutil  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
import uuid  # noqa: E402
from collections.abc import Iterator  # noqa: E402
from contextlib import contextmanager  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402
from pathlib import Path  # noqa: E402

import gevent  # noqa: E402
import gevent.pool  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.client import Connection, request  # noqa: E402
from bench.report import SETTINGS_TWIN, TWIN, load_average, machine, pct, table  # noqa: E402
from tests.servers import FakeUpstream, Floor, Gateway, stop_all  # noqa: E402

ANSWER = "fake;chunks=20"  # a JSON answer of 20 pieces
FIRST_BYTE = "fake;chunks=20;stall_at=1;stall_for=0.005"  # first event, a pause, the rest
PACED = "fake;chunks=20;delay=0.002"  # 20 chunks, each its own read
OPEN = "fake;chunks=100;delay=10"  # open for minutes, nearly quiet
CLIENTS_LOAD, CLIENTS_CPU = 50, 10


@dataclass
class Target:
    name: str
    port: int
    pids: list[int] = field(default_factory=list)  # processes whose CPU and RSS count


def rotated(targets: list[Target], i: int) -> list[Target]:
    """The targets in turn, starting one further each round: nobody always goes first."""
    i %= len(targets)
    return targets[i:] + targets[:i]


# -- the figures ---------------------------------------------------------------------------


def serial(targets: list[Target], req: bytes, calls: int) -> dict[str, list[tuple[float, float]]]:
    """``calls`` calls per target from one client each, interleaved call by call."""
    conns = {t.name: Connection(t.port) for t in targets}
    for t in targets:
        for _ in range(20):  # warm: pools, caches, allocators
            conns[t.name].call(req)
    times: dict[str, list[tuple[float, float]]] = {t.name: [] for t in targets}
    for i in range(calls):
        for t in rotated(targets, i):
            times[t.name].append(conns[t.name].call(req))
    for conn in conns.values():
        conn.close()
    return times


def load(target: Target, req: bytes, clients: int, seconds: float) -> tuple[float, list[float]]:
    """Calls per second from ``clients`` kept-alive clients calling for ``seconds``, and
    each call's duration."""
    deadline = time.perf_counter() + seconds
    durations: list[float] = []

    def client() -> None:
        conn = Connection(target.port)
        while time.perf_counter() < deadline:
            durations.append(conn.call(req)[1])
        conn.close()

    started = time.perf_counter()
    gevent.joinall([gevent.spawn(client) for _ in range(clients)], raise_error=True)
    return len(durations) / (time.perf_counter() - started), durations


def calls(target: Target, req: bytes, count: int, clients: int) -> None:
    """Exactly ``count`` calls over ``clients`` kept-alive clients."""
    left = count

    def client() -> None:
        nonlocal left
        conn = Connection(target.port)
        while left > 0:
            left -= 1
            conn.call(req)
        conn.close()

    gevent.joinall([gevent.spawn(client) for _ in range(clients)], raise_error=True)


@dataclass
class CpuReading:
    """The CPU time of some processes at one moment, read two ways."""

    scheduled: float  # seconds, the scheduler's nanoseconds of the threads alive now
    ticks: float  # seconds, utime + stime in clock ticks: ended threads' time included
    threads: set[tuple[int, str]]  # (pid, tid) of the threads alive now
    exact: bool = True  # False where the kernel keeps no schedstat

    def __sub__(self, before: CpuReading) -> float:
        """The CPU time between ``before`` and this reading, in seconds.

        The scheduler's nanoseconds (``/proc/<pid>/task/<tid>/schedstat``) are exact, but
        a thread that ends takes its time with it: a worker's hub grows its thread pool
        under load (SQLite's work beside the loop) and the idle threads end later, which
        made a block of calls lose all the CPU such a thread ever used (a JSON call once
        read 0.34 ms where it costs 0.6). When a thread ended in between, the process's
        clock ticks (10 ms; they keep ended threads' time) are used instead.
        """
        if before.threads - self.threads or not (self.exact and before.exact):
            return self.ticks - before.ticks
        return self.scheduled - before.scheduled


def cpu_seconds(pids: list[int]) -> CpuReading:
    """CPU time of these processes (all their threads) now; subtract two readings."""
    scheduled, ticks, threads, exact = 0.0, 0.0, set(), True
    for pid in pids:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        ticks += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
        for task in Path(f"/proc/{pid}/task").iterdir():
            try:
                scheduled += int(task.joinpath("schedstat").read_text().split()[0]) / 1e9
            except (FileNotFoundError, ValueError):  # the thread just ended, or no schedstat
                exact = exact and not task.exists()
                continue
            threads.add((pid, task.name))
    return CpuReading(scheduled, ticks, threads, exact)


def rss_kb(pids: list[int]) -> int:
    total = 0
    for pid in pids:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                total += int(line.split()[1])
    return total


def cpu_rounds(
    targets: list[Target], req: bytes, count: int, rounds: int
) -> dict[str, list[float]]:
    """Milliseconds of each target's own CPU per call in each round's block of ``count``
    calls (the blocks of one round run one after the other, the targets in turn)."""
    used: dict[str, list[float]] = {t.name: [] for t in targets}
    for r in range(rounds):
        for t in rotated(targets, r):
            before = cpu_seconds(t.pids)
            calls(t, req, count, CLIENTS_CPU)
            gevent.sleep(1.0)  # the recorder's last writes (RECORDER_LINGER is 0.25 s)
            used[t.name].append((cpu_seconds(t.pids) - before) * 1000 / count)
    return used


def open_streams(target: Target, key: str, count: int) -> dict:
    """RSS per open stream, and a new call's time to first byte while they are open."""
    probe = request(FIRST_BYTE, True, key)

    def ttfb(n: int = 30) -> float:
        conn = Connection(target.port)
        samples = [conn.call(probe)[0] * 1000 for _ in range(n)]
        conn.close()
        return statistics.median(samples)

    ttfb()  # warm
    gevent.sleep(1.0)
    idle_rss, idle_ttfb = rss_kb(target.pids), ttfb()
    opened: list[Connection] = []
    req = request(OPEN, True, key)

    def open_one() -> None:
        conn = Connection(target.port)
        conn.call(req, whole=False)  # the stream flows; it stays open, unread
        opened.append(conn)

    pool = gevent.pool.Pool(100)
    for _ in range(count):
        pool.spawn(open_one)
    pool.join(raise_error=True)
    gevent.sleep(2.0)
    busy_rss, busy_ttfb = rss_kb(target.pids), ttfb()
    for conn in opened:
        conn.close()
    return {
        "streams": len(opened),
        "idle_rss_kb": idle_rss,
        "busy_rss_kb": busy_rss,
        "kb_per_stream": (busy_rss - idle_rss) / len(opened),
        "ttfb_idle_ms": idle_ttfb,
        "ttfb_busy_ms": busy_ttfb,
    }


# -- running it ----------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=2000, help="1-client calls per target")
    parser.add_argument("--seconds", type=float, default=3.0, help="per target per load round")
    parser.add_argument("--rounds", type=int, default=3, help="rounds of the load and CPU figures")
    parser.add_argument("--cpu-calls", type=int, default=300, help="calls per CPU block")
    parser.add_argument("--workers", type=int, default=2, help="gateway workers")
    parser.add_argument("--streams", type=int, default=0, help="open streams figure (0: skip)")
    parser.add_argument("--postgres", metavar="URL", help="use a fresh database on this server")
    parser.add_argument("--redis", metavar="URL", help="REDIS_URL: limits and dedup in Redis")
    parser.add_argument(
        "--floor-processes", type=int, default=1, help="floor processes sharing its socket"
    )
    parser.add_argument(
        "--twin",
        metavar="NAME=VALUE",
        action="append",
        type=setting,
        help="start a twin of the gateway with this setting (repeatable), compared in one run",
    )
    args = parser.parse_args()
    _enough_files(2 * args.streams + 1000)  # a proxy holds a client and an upstream socket

    tmp = Path(tempfile.mkdtemp(prefix="gw-bench-"))
    fake = FakeUpstream()
    floor = Floor(fake.url + "/v1", tmp / "floor.log", args.floor_processes)
    try:
        with database(args.postgres, tmp) as url:
            results = run(url, tmp, fake, floor, args)
    except BaseException:
        print(f"bench: failed; the logs are in {tmp}", file=sys.stderr)
        raise
    finally:
        floor.stop()
        fake.stop()
    shutil.rmtree(tmp)
    results.update(
        when=time.strftime("%Y-%m-%d %H:%M %Z"),
        machine=machine(),
        database="postgresql" if args.postgres else "sqlite",
        redis=bool(args.redis),
        workers=args.workers,
        floor_processes=args.floor_processes,
        twin_settings=dict(args.twin or ()),
        load_after=load_average(),
    )
    print(table(results))
    out = ROOT / "bench" / "results"
    out.mkdir(exist_ok=True)
    (out / "latest.json").write_text(json.dumps(results, indent=2))


def setting(text: str) -> tuple[str, str]:
    """A NAME=VALUE argument (``--twin`` here, ``pair.py --setting``): an environment
    variable of the gateways it is given to."""
    name, sep, value = text.partition("=")
    if not sep or not name:
        raise argparse.ArgumentTypeError(f"expected NAME=VALUE, got {text!r}")
    return name, value


def run(url: str, tmp: Path, fake: FakeUpstream, floor: Floor, args: argparse.Namespace) -> dict:
    """Start the gateway and its twin if asked, on the same database (the key made on one
    is the other's too): with ``--twin``, the gateway with those settings; else with
    ``--redis``, the gateway without Redis. Measure, stop them; then the
    open streams figure if asked."""
    # A prefix of the run's own: a shared Redis may hold another run's keys.
    shared = {"REDIS_URL": args.redis, "GATEWAY_REDIS_PREFIX": tmp.name} if args.redis else {}
    if args.twin:
        twins = [(SETTINGS_TWIN, "instance-twin", {**shared, **dict(args.twin)})]
    else:
        twins = [(TWIN, "instance-twin", {})] if args.redis else []
    started: list[Gateway] = []
    targets = [
        Target("direct", fake.port, [fake.proc.pid]),
        Target("floor", floor.port, floor.pids),
    ]
    try:
        for name, instance, env in [("gateway", "instance", shared), *twins]:
            gw = Gateway(
                url, tmp / instance, workers=args.workers, GATEWAY_LOG_LEVEL="WARNING", **env
            )
            if not started:  # the twin starts with the models and the key in the database
                key = setup(gw, fake.url)
            started.append(gw)
            store = gw.instance_store()  # the limits' process, without Redis
            targets.append(Target(name, gw.port, gw.worker_pids() + ([store[0]] if store else [])))
        results = measure(targets, key, args)
    finally:
        stop_all(started)  # a gateway's bad exit leaves none running
    if args.streams:
        results["open_streams"] = streams_figure(url, tmp, floor, key, args.streams)
    return results


def setup(gw: Gateway, upstream_url: str) -> str:
    """The bench's models on ``gw``, and a key for them (returned)."""
    # Limits no bench call reaches: the figures are about the path, not about a 429.
    unlimited = {"rpmLimit": 10**9, "tpmLimit": 10**9}
    route = gw.setup_route(upstream_url, remote_id="fake", key=unlimited)
    for script in (ANSWER, FIRST_BYTE, PACED, OPEN):  # the model names the fake's script
        model = {"providerId": route["provider"]["id"], "systemName": script, "remoteId": script}
        gw.api("POST", "/models", json=model)
    return route["key"]


def measure(targets: list[Target], key: str, args: argparse.Namespace) -> dict:
    """Every default figure, each one alternating over the targets."""
    answer, first_byte = request(ANSWER, False, key), request(FIRST_BYTE, True, key)
    out: dict = {
        "load_start": load_average(),
        "clients": {"load": CLIENTS_LOAD, "cpu": CLIENTS_CPU},
    }
    times = serial(targets, answer, args.calls)
    # Every call's milliseconds, call i of each target side by side: the ratios' spread
    # is worked out from them (``report.percentile_interval``).
    out["latency_calls_ms"] = {name: [t * 1000 for _, t in ts] for name, ts in times.items()}
    out["latency_ms"] = {
        name: {p: pct(ms, p) for p in (50, 99)} for name, ms in out["latency_calls_ms"].items()
    }
    times = serial(targets, first_byte, args.calls)
    out["first_byte_calls_ms"] = {name: [f * 1000 for f, _ in ts] for name, ts in times.items()}
    out["first_byte_ms"] = {
        name: {p: pct(ms, p) for p in (50, 99)} for name, ms in out["first_byte_calls_ms"].items()
    }
    out["stream_ms"] = {
        name: {p: pct([total for _, total in ts], p) * 1000 for p in (50, 99)}
        for name, ts in times.items()
    }
    rps: dict[str, list[float]] = {t.name: [] for t in targets}
    loaded: dict[str, list[float]] = {t.name: [] for t in targets}
    for r in range(args.rounds):
        for t in rotated(targets, r):
            rate, durations = load(t, answer, CLIENTS_LOAD, args.seconds)
            rps[t.name].append(rate)
            loaded[t.name] += durations
    out["rps"] = rps
    out["latency_ms_at_load"] = {
        name: {p: pct(durations, p) * 1000 for p in (50, 99)} for name, durations in loaded.items()
    }
    out["share_of_direct"] = {
        name: statistics.median(v / d for v, d in zip(values, rps["direct"], strict=True))
        for name, values in rps.items()
    }
    proxies = [t for t in targets if t.name != "direct"]
    out["cpu_ms_per_round"] = {
        "json": cpu_rounds(proxies, answer, args.cpu_calls, args.rounds),
        "stream": cpu_rounds(proxies, request(PACED, True, key), args.cpu_calls, args.rounds),
    }
    out["cpu_ms_per_call"] = {
        kind: {name: statistics.fmean(ms) for name, ms in per_round.items()}
        for kind, per_round in out["cpu_ms_per_round"].items()
    }
    return out


def streams_figure(database_url: str, tmp: Path, floor: Floor, key: str, count: int) -> dict:
    """The open streams figure: a gateway with one worker, then the floor."""
    gw = Gateway(
        database_url,
        tmp / "instance-streams",
        workers=1,
        GATEWAY_LOG_LEVEL="WARNING",
        GATEWAY_WORKER_CONNECTIONS=str(count + 1000),
        GATEWAY_ON_DISCONNECT="cancel",  # at the end, close the upstreams at once
    )
    try:
        result = {"gateway": open_streams(Target("gateway", gw.port, gw.worker_pids()), key, count)}
    finally:
        gw.stop()
    result["floor"] = open_streams(Target("floor", floor.port, floor.pids), key, count)
    return result


@contextmanager
def database(server: str | None, tmp: Path) -> Iterator[str]:
    """SQLite in the run's folder, or a fresh database on a PostgreSQL server (dropped after)."""
    if not server:
        yield f"sqlite:///{tmp}/bench.db"
        return
    from gateway.db import open_database  # after monkey-patching, as the gateway's workers

    admin, name = open_database(server), f"gw_bench_{uuid.uuid4().hex[:10]}"
    with admin.connection_context():
        admin.execute_sql(f'CREATE DATABASE "{name}"')
    try:
        yield server.rsplit("/", 1)[0] + "/" + name
    finally:
        with admin.connection_context():
            admin.execute_sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        admin.close_all()


def _enough_files(needed: int) -> None:
    """Raise this process's open-file limit (children inherit it) if it is too low."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < needed:
        if hard != resource.RLIM_INFINITY and hard < needed:
            sys.exit(f"bench: needs {needed} open files; the hard limit is {hard} (ulimit -Hn)")
        resource.setrlimit(resource.RLIMIT_NOFILE, (needed, hard))


if __name__ == "__main__":
    main()
