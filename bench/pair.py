"""Paired benchmark: two builds of the gateway side by side, with the floor.

``python bench/pair.py BEFORE [AFTER]``: BEFORE and AFTER are checkouts of this
repository (``git worktree add /tmp/before <commit>``; AFTER defaults to this one). Starts
the fake upstream, the floor and one gateway from each checkout (real gunicorn, 1 worker
each, one SQLite file, so both have the same key and models), then alternates blocks of
calls across the three, so the shared machine's noise falls on all alike:

- default: worker CPU per JSON call and per 20-chunk stream (the median block), 1-client
  p50 / p99 of a JSON call and of a stream's first byte;
- ``--beside N``: a JSON call's latency at 1 client while 4 other clients send prompts of
  N words to the same worker (what a gateway's own work on big calls costs its others);
- ``--redis URL``: both builds keep their limits in that Redis (as several instances do),
  so each call's admission and settling are round trips;
- ``--setting NAME=VALUE``: a setting of both builds (``GATEWAY_ACCESS_LOG=-`` to weigh
  a change to the access log, which the benchmark's gateways otherwise leave off);
- ``--together SECONDS``: the CPU figures from both builds loaded at the same time,
  ``--clients`` each, SECONDS a round, each with a database of its own. This VM's own
  speed moves by 15-20% within minutes, which blocks a few seconds apart still see in
  part; loaded together, both builds meet the same moments. The median of the rounds'
  ratios is what to read (the same build against itself: 0.992 to 1.004 over two runs);
  single rounds stray. No latency figures (those need calls alternated one by one).
  With ``--both-ways`` it runs again with the builds started and loaded the other way
  round, and prints the geometric mean of the two runs' ratios: the position alone
  favours one build by about 1% (on 2026-12-05, four runs of one change read 0.973 and
  0.991 with it second, 1.008 and 1.001 with it first).

A difference smaller than the spread between two runs with BEFORE and AFTER swapped is
noise (about 7% on CPU here): run it both ways before believing a few percent. Uses the
dependencies of the virtualenv it runs in, for both builds (a package a checkout holds
at its top, where gunicorn starts, is imported before the virtualenv's: one way to
compare a dependency).
"""

from __future__ import annotations

from gevent import monkey

monkey.patch_all()

import argparse  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import shutil  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
from pathlib import Path  # noqa: E402

import gevent  # noqa: E402
import gevent.event  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench import run  # noqa: E402
from bench.client import Connection, request  # noqa: E402
from tests import servers  # noqa: E402
from tests.servers import FakeUpstream, Floor, Gateway, varied_text  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("before", type=Path, help="a checkout of the build to compare with")
    parser.add_argument("after", type=Path, nargs="?", default=ROOT, help="default: this one")
    parser.add_argument("--rounds", type=int, default=6, help="CPU blocks per target")
    parser.add_argument("--calls", type=int, default=600, help="1-client calls per target")
    parser.add_argument("--block", type=int, default=300, help="JSON calls per CPU block")
    parser.add_argument("--beside", type=int, metavar="WORDS", help="big calls beside")
    parser.add_argument("--redis", metavar="URL", help="REDIS_URL for both: limits in Redis")
    parser.add_argument(
        "--setting",
        metavar="NAME=VALUE",
        action="append",
        type=run.setting,
        help="a setting of both builds (repeatable), e.g. GATEWAY_ACCESS_LOG=-",
    )
    parser.add_argument("--workers", type=int, default=1, help="workers of each gateway")
    parser.add_argument(
        "--together", type=float, metavar="SECONDS", help="both loaded at once, for CPU"
    )
    parser.add_argument("--clients", type=int, default=10, help="each build's (--together)")
    parser.add_argument(
        "--both-ways", action="store_true", help="--together: again the other way round"
    )
    args = parser.parse_args()
    orders = [("before", "after")]
    if args.together and args.both_ways:
        orders.append(("after", "before"))
    ratios = [measure(args, order) for order in orders]
    if len(ratios) == 2:
        for kind, first in ratios[0].items():
            second = ratios[1][kind]
            print(
                f"worker CPU per {kind} call, after / before both ways round: "
                f"{math.sqrt(first * second):.3f} (the geometric mean of {first:.3f},"
                f" the after build started second, and {second:.3f}, started first)"
            )


def measure(args: argparse.Namespace, order: tuple[str, str]) -> dict[str, float]:
    """One run: the floor and the two builds, started in ``order``; with ``--together``,
    each kind of call's median ratio after / before."""
    checkouts = {"before": args.before, "after": args.after}
    ratios: dict[str, float] = {}
    tmp = Path(tempfile.mkdtemp(prefix="gw-pair-"))
    fake = FakeUpstream()
    floor = Floor(fake.url + "/v1", tmp / "floor.log")
    gateways: list[Gateway] = []
    try:
        url = f"sqlite:///{tmp}/gw.db"
        # Both builds' limits in the same Redis, under a prefix of the run's own (and of
        # each build's own with --together: their keys are not the same ones).
        shared = {"REDIS_URL": args.redis, "GATEWAY_REDIS_PREFIX": tmp.name} if args.redis else {}
        shared.update(args.setting or ())
        route: dict = {}
        keys: dict[str, str] = {}
        for name in order:
            servers.ROOT = checkouts[name].resolve()  # where gunicorn starts: that build's code
            if args.together:  # a file each: one's writes must not slow the other's SQLite
                url = f"sqlite:///{tmp}/{name}.db"
                if args.redis:
                    shared["GATEWAY_REDIS_PREFIX"] = f"{tmp.name}-{name}"
            gateways.append(
                Gateway(
                    url, tmp / name, workers=args.workers, GATEWAY_LOG_LEVEL="WARNING", **shared
                )
            )
            if args.together:
                keys[name] = setup(gateways[-1], fake.url)["key"]
            elif not route:  # made before the second starts, which reads them as it starts
                route = setup(gateways[0], fake.url)
        targets = [run.Target("floor", floor.port, floor.pids)] + [
            run.Target(name, gw.port, gw.worker_pids())
            for name, gw in zip(order, gateways, strict=True)
        ]
        if args.together:
            ratios = together(targets[1:], keys, args)
        elif args.beside:
            beside(targets[1:], route["key"], args.beside, args.rounds)
        else:
            paired(targets, route["key"], args)
    except BaseException:
        print(f"pair: failed; the logs are in {tmp}", file=sys.stderr)
        raise
    else:
        shutil.rmtree(tmp, ignore_errors=True)
    finally:
        servers.stop_all([*gateways, floor, fake])  # a gateway's bad exit leaves none running
    return ratios


def setup(gw: Gateway, upstream: str) -> dict:
    """A key with limits no run reaches, and the models the runs call."""
    route = gw.setup_route(upstream, key={"rpmLimit": 10**9, "tpmLimit": 10**9})
    for script in (run.ANSWER, run.FIRST_BYTE, run.PACED):
        model = {"providerId": route["provider"]["id"], "systemName": script}
        gw.api("POST", "/models", json={**model, "remoteId": script})
    return route


def paired(targets: list[run.Target], key: str, args: argparse.Namespace) -> None:
    answer, first = request(run.ANSWER, False, key), request(run.FIRST_BYTE, True, key)
    paced = request(run.PACED, True, key)
    cpu: dict[str, dict[str, list[float]]] = {"json": {}, "stream": {}}
    for _ in range(args.rounds):
        for kind, req, count in (
            ("json", answer, args.block),
            ("stream", paced, args.block * 2 // 3),
        ):
            for name, (ms,) in run.cpu_rounds(targets, req, count, 1).items():
                cpu[kind].setdefault(name, []).append(ms)
    for kind, blocks in cpu.items():
        # Blocks of one round ran minutes apart from other rounds' but seconds apart
        # from each other: their ratio leaves out most of the machine's drift.
        _print_cpu(kind, blocks, "median block", each=False)
    for label, req, part in (("JSON call", answer, 1), ("stream's first byte", first, 0)):
        times = run.serial(targets, req, args.calls)
        for p in (50, 99):
            line = {
                n: round(run.pct([t[part] for t in ts], p) * 1000, 2) for n, ts in times.items()
            }
            print(f"{label} p{p}, ms, 1 client: {json.dumps(line)}")


def together(
    targets: list[run.Target], keys: dict[str, str], args: argparse.Namespace
) -> dict[str, float]:
    """Worker CPU per call of both builds, loaded at the same time round after round
    (started, in each round, in the order of ``targets``); each kind's median ratio."""
    ratios = {}
    for kind, model, stream in (("json", run.ANSWER, False), ("stream", run.PACED, True)):
        reqs = {t.name: request(model, stream, keys[t.name]) for t in targets}
        for t in targets:
            run.calls(t, reqs[t.name], 300, args.clients)
        per_round: dict[str, list[float]] = {t.name: [] for t in targets}
        for _ in range(args.rounds):
            before = {t.name: run.cpu_seconds(t.pids) for t in targets}
            loads = [
                gevent.spawn(run.load, t, reqs[t.name], args.clients, args.together)
                for t in targets
            ]
            gevent.joinall(loads, raise_error=True)
            gevent.sleep(1.0)  # the recorder's last writes (RECORDER_LINGER is 0.25 s)
            for t, load in zip(targets, loads, strict=True):
                _, durations = load.value  # one per call the round made
                used = run.cpu_seconds(t.pids) - before[t.name]
                per_round[t.name].append(used * 1000 / len(durations))
        ratios[kind] = _print_cpu(kind, per_round, "loaded together, median round", each=True)
    return ratios


def _print_cpu(kind: str, rounds: dict[str, list[float]], how: str, each: bool) -> float:
    """One CPU line: each target's median, ms, and the median of the rounds' after /
    before ratios (returned); with ``each``, every round's difference too."""
    pairs = list(zip(rounds["after"], rounds["before"], strict=True))
    line = {name: round(statistics.median(ms), 3) for name, ms in rounds.items()}
    diffs = " ".join(f"{(a - b) * 1000:+.0f}" for a, b in pairs)
    ratio = statistics.median(a / b for a, b in pairs)
    print(
        f"worker CPU per {kind} call, ms ({how}): {json.dumps(line)}; "
        + (f"after - before, µs, each round: {diffs}; " if each else "")
        + f"after / before, median of the rounds: {ratio:.3f}"
    )
    return ratio


def beside(targets: list[run.Target], key: str, words: int, rounds: int) -> None:
    """Small calls at 1 client while 4 clients send prompts of ``words`` words."""
    bigs = [
        request(run.ANSWER, False, key, [{"role": "user", "content": varied_text(i, words)}])
        for i in range(50)
    ]
    small = request(run.ANSWER, False, key)
    times: dict[str, list[float]] = {t.name: [] for t in targets}
    for r in range(rounds):
        for target in run.rotated(targets, r):
            done = gevent.event.Event()
            senders = [gevent.spawn(_send_until, target.port, bigs, done) for _ in range(4)]
            gevent.sleep(0.5)
            conn = Connection(target.port)
            times[target.name] += [conn.call(small)[1] for _ in range(300)]
            conn.close()
            done.set()
            gevent.joinall(senders, raise_error=True)
    for name, ts in times.items():
        p50, p99 = (run.pct(ts, p) * 1000 for p in (50, 99))
        print(
            f"{name}: JSON call beside {words}-word prompts, 1 client: p50 {p50:.2f} ms, "
            f"p99 {p99:.2f} ms, worst {max(ts) * 1000:.2f} ms"
        )


def _send_until(port: int, requests: list[bytes], done: gevent.event.Event) -> None:
    conn, i = Connection(port), 0
    while not done.is_set():
        conn.call(requests[i % len(requests)])
        i += 1
        gevent.sleep(0.002)
    conn.close()


if __name__ == "__main__":
    main()
