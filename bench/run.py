"""Benchmark: the gateway against calling the fake upstream directly, in one run.

Starts tests/fake_upstream.py and a real gunicorn gateway (gevent workers, SQLite by
default), then measures with the same minimal client both ways:

- non-streaming latency (p50/p99) at 1 and 50 concurrent clients, and throughput;
- streaming time to first token (first content byte) and total time, at 1 and 50;
- memory per open stream: gateway worker RSS with N slow streams open vs idle;
- gateway CPU per request (worker utime+stime over the run).

Prints a table of absolute figures, added milliseconds and ratios (gateway/direct);
writes the same as JSON to bench/results/latest.json. Run: ``make bench`` or
``python bench/run.py [--requests 400] [--database-url postgresql://...]``.
"""

from __future__ import annotations

from gevent import monkey

monkey.patch_all()

import argparse  # noqa: E402
import http.client  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402
from urllib.parse import urlparse  # noqa: E402

import gevent  # noqa: E402
import gevent.pool  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.servers import FakeUpstream, Gateway  # noqa: E402

PROMPT = [{"role": "user", "content": "Say something short about latency budgets."}]
NON_STREAM_MODEL = "fake;chunks=20"
STREAM_MODEL = "fake;chunks=20;delay=0.01"


class Client:
    """One keep-alive HTTP/1.1 connection; measures first content byte and total time."""

    def __init__(self, base_url: str, key: str) -> None:
        parsed = urlparse(base_url)
        self.host, self.port, self.prefix = parsed.hostname, parsed.port, parsed.path.rstrip("/")
        self.headers = {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}
        self.conn = http.client.HTTPConnection(self.host, self.port, timeout=60)

    def call(self, model: str, stream: bool) -> tuple[float, float]:
        body = json.dumps({"model": model, "messages": PROMPT, "stream": stream})
        started = time.perf_counter()
        self.conn.request(
            "POST", f"{self.prefix}/chat/completions", body=body, headers=self.headers
        )
        resp = self.conn.getresponse()
        first = None
        data = b""
        while True:
            chunk = resp.read1(65536)
            if not chunk:
                break
            data += chunk
            if first is None and b"tok0" in data:
                first = time.perf_counter()
        resp.read()  # read1 leaves a Content-Length response open at its end
        done = time.perf_counter()
        if resp.status != 200 or b"tok19" not in data:
            raise RuntimeError(f"bad answer {resp.status}: {data[:200]!r}")
        return ((first or done) - started) * 1000, (done - started) * 1000

    def close(self) -> None:
        self.conn.close()


def run_load(
    base_url: str, key: str, model: str, stream: bool, concurrency: int, requests: int
) -> dict:
    """``requests`` calls over ``concurrency`` connections; latency percentiles and rate."""
    firsts: list[float] = []
    totals: list[float] = []
    per_client = max(1, requests // concurrency)

    def worker() -> None:
        client = Client(base_url, key)
        try:
            for _ in range(per_client):
                first, total = client.call(model, stream)
                firsts.append(first)
                totals.append(total)
        finally:
            client.close()

    warm = Client(base_url, key)
    for _ in range(5):
        warm.call(model, stream)
    warm.close()
    started = time.perf_counter()
    pool = gevent.pool.Pool(concurrency)
    for _ in range(concurrency):
        pool.spawn(worker)
    pool.join(raise_error=True)
    elapsed = time.perf_counter() - started
    return {
        "requests": len(totals),
        "rps": len(totals) / elapsed,
        "ttft_p50": pct(firsts, 50),
        "ttft_p99": pct(firsts, 99),
        "p50": pct(totals, 50),
        "p99": pct(totals, 99),
    }


def pct(values: list[float], p: int) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    return ordered[min(len(ordered) - 1, round(p / 100 * (len(ordered) - 1)))]


def worker_pid(master: int) -> int:
    children = Path(f"/proc/{master}/task/{master}/children").read_text().split()
    return int(children[0])


def rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError("no VmRSS")


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def memory_per_stream(gateway_url: str, key: str, pid: int, streams: int) -> dict:
    """Open ``streams`` slow streams at once; RSS growth per open stream."""
    gevent.sleep(0.5)
    idle = rss_kb(pid)
    opened: list[http.client.HTTPResponse] = []
    conns = []
    body = json.dumps({"model": "fake;chunks=60;delay=0.25", "messages": PROMPT, "stream": True})
    parsed = urlparse(gateway_url)

    def open_one() -> None:
        conn = http.client.HTTPConnection(parsed.hostname, parsed.port, timeout=60)
        conn.request(
            "POST",
            "/v1/chat/completions",
            body=body,
            headers={"Authorization": f"Bearer {key}", "Content-Type": "application/json"},
        )
        resp = conn.getresponse()
        resp.read1(65536)  # the stream is open and flowing
        conns.append(conn)
        opened.append(resp)

    pool = gevent.pool.Pool(100)
    for _ in range(streams):
        pool.spawn(open_one)
    pool.join(raise_error=True)
    gevent.sleep(2.0)  # several chunks into every stream
    busy = rss_kb(pid)
    for conn in conns:
        conn.close()
    return {
        "streams": len(opened),
        "idle_rss_kb": idle,
        "busy_rss_kb": busy,
        "kb_per_stream": (busy - idle) / max(1, len(opened)),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--requests", type=int, default=400, help="calls per scenario at concurrency 50"
    )
    parser.add_argument(
        "--serial", type=int, default=100, help="calls per scenario at concurrency 1"
    )
    parser.add_argument(
        "--streams", type=int, default=300, help="open streams for the memory figure"
    )
    parser.add_argument("--database-url", default=None)
    args = parser.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="gw-bench-"))
    fake = FakeUpstream()
    gw = Gateway(
        args.database_url or f"sqlite:///{tmp}/bench.db",
        tmp / "instance",
        workers=1,
        GATEWAY_LOG_LEVEL="WARNING",
    )
    try:
        route = gw.setup_route(fake.url, remote_id="fake")
        # One model per scenario script, so the gateway path names it as the client does.
        for script in (NON_STREAM_MODEL, STREAM_MODEL):
            gw.api(
                "POST",
                "/models",
                json={
                    "providerId": route["provider"]["id"],
                    "systemName": script,
                    "remoteId": script,
                },
            )
        pid = worker_pid(gw.proc.pid)
        results: dict[str, dict] = {}
        cpu_before, calls_before = cpu_seconds(pid), 0
        for label, model, stream in (
            ("non-stream", NON_STREAM_MODEL, False),
            ("stream", STREAM_MODEL, True),
        ):
            for concurrency, count in ((1, args.serial), (50, args.requests)):
                name = f"{label} c={concurrency}"
                direct = run_load(f"{fake.url}/v1", "unused", model, stream, concurrency, count)
                via = run_load(f"{gw.url}/v1", route["key"], model, stream, concurrency, count)
                calls_before += via["requests"] + 5
                results[name] = {"direct": direct, "gateway": via}
        cpu_ms = (cpu_seconds(pid) - cpu_before) * 1000 / calls_before
        memory = memory_per_stream(gw.url, route["key"], pid, args.streams)
        report(results, cpu_ms, memory)
        out = ROOT / "bench" / "results"
        out.mkdir(exist_ok=True)
        (out / "latest.json").write_text(
            json.dumps(
                {
                    "scenarios": results,
                    "gateway_cpu_ms_per_call": cpu_ms,
                    "memory": memory,
                    "database": "postgresql" if args.database_url else "sqlite",
                    "when": time.strftime("%F %T"),
                },
                indent=2,
            )
        )
    finally:
        gw.stop()
        fake.stop()


def report(results: dict, cpu_ms: float, memory: dict) -> None:
    print(
        f"{'scenario':<16} {'metric':<9} {'direct ms':>10} {'gateway ms':>11} {'added ms':>9} {'ratio':>6}"
    )
    for name, pair in results.items():
        metrics = ["p50", "p99"] + (["ttft_p50", "ttft_p99"] if name.startswith("stream") else [])
        for metric in metrics:
            d, g = pair["direct"][metric], pair["gateway"][metric]
            print(f"{name:<16} {metric:<9} {d:>10.2f} {g:>11.2f} {g - d:>9.2f} {g / d:>6.2f}")
        d, g = pair["direct"]["rps"], pair["gateway"]["rps"]
        print(f"{name:<16} {'req/s':<9} {d:>10.1f} {g:>11.1f} {'':>9} {g / d:>6.2f}")
    print(f"gateway worker CPU per call: {cpu_ms:.2f} ms")
    print(
        f"memory: {memory['streams']} open streams, worker RSS {memory['idle_rss_kb'] / 1024:.1f} MB idle -> "
        f"{memory['busy_rss_kb'] / 1024:.1f} MB; {memory['kb_per_stream']:.1f} KB per open stream"
    )
    print("(one gateway worker; client, gateway and fake upstream share this machine's cores)")


if __name__ == "__main__":
    main()
