"""Where a call's CPU goes, in the gateway and in the floor, side by side.

``python bench/profile.py [--kind stream|json] [--workers 2] [--seconds 10] [--calls 2000]``

Starts the fake upstream, the floor (as many processes as the gateway has workers) and
the gateway (SQLite; ``--redis URL`` puts its limits in that Redis, as ``run.py``
does), as ``pair.py`` does, and looks at each of the two in turn:

- **perf** (``--seconds``): ``perf record -e cpu-clock`` on the target's processes while
  10 clients call it, then µs of CPU a call by library (DSO) and by symbol. perf sees
  every sample, the kernel's and SQLite's included. Python 3.11 has no perf trampoline,
  so Python functions show as the interpreter's own (``_PyEval_EvalFrameDefault``).
  py-spy's ``--gil`` view, which the journal used before, saw 858 µs of a 20-chunk
  stream's 2.8 ms in the gateway on 2026-12-05 (and 950 of the floor's 2.1): it
  drops more of the gateway's samples than of the floor's, so its totals do not
  compare across the two.
- **threads** (``--calls``): each thread's CPU and its switches a call, read from
  ``/proc`` before and after ``--calls`` calls from 10 clients: a worker's loop is its
  main thread, the others are the hub's pool (SQLite's work beside the loop). A
  voluntary switch is the thread waiting (for the GIL, for work, for the disk), each
  one a trip through the kernel for it and for whoever wakes it.
- **calls** (``--calls``): the targets' processes run under cProfile (a
  ``sitecustomize`` put on ``PYTHONPATH``); a real-time signal takes a snapshot before
  and after ``--calls`` calls from 10 clients, and the difference is Python function
  calls a call (built-in ones included) and the functions called most, with what they
  cost under cProfile (which slows small functions most: read the counts, not the
  times); then the same by source file, a built-in's calls counted in the files that
  called it (so a part of the work, the stream's parsing say, shows as its files' sum).

Needs ``perf`` (Debian's ``linux-perf``) and the right to read other processes' counters
(root, or ``kernel.perf_event_paranoid`` at most 1); ``--no-perf`` skips it.
"""

from __future__ import annotations

from gevent import monkey

monkey.patch_all()

import argparse  # noqa: E402
import marshal  # noqa: E402
import os  # noqa: E402
import shutil  # noqa: E402
import signal  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import sysconfig  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from collections import Counter  # noqa: E402
from collections.abc import Iterator  # noqa: E402
from contextlib import contextmanager  # noqa: E402
from pathlib import Path  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench import pair, run  # noqa: E402
from bench.client import request  # noqa: E402
from tests.servers import FakeUpstream, Floor, Gateway, stop_all  # noqa: E402

FREQUENCY = 4999  # perf samples a second of CPU
CLIENTS = 10
SNAPSHOT = signal.SIGRTMIN + 3  # neither gunicorn nor gevent touches the real-time ones

# Run by every Python process started with the run's folder on PYTHONPATH: a profile from
# the start (and anew in a forked child), written out at each SNAPSHOT signal.
SITECUSTOMIZE = f"""
import cProfile, marshal, os, signal
_profile = None
def _start():
    global _profile
    _profile = cProfile.Profile()
    _profile.enable()
def _snapshot(*_):
    _profile.disable()
    _profile.create_stats()
    path = os.path.join(os.environ["GW_PROFILE_DIR"], f"{{os.getpid()}}-{{time_ns()}}")
    with open(path + ".part", "wb") as f:
        marshal.dump(_profile.stats, f)
    os.replace(path + ".part", path)  # whole, or not there
    _profile.enable()
from time import time_ns
os.register_at_fork(after_in_child=_start)
signal.signal({int(SNAPSHOT)}, _snapshot)
_start()
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kind", choices=("stream", "json"), default="stream")
    parser.add_argument("--workers", type=int, default=2, help="gateway workers, floor processes")
    parser.add_argument("--seconds", type=float, default=10.0, help="perf's load, per target")
    parser.add_argument("--calls", type=int, default=2000, help="calls counted by cProfile")
    parser.add_argument("--top", type=int, default=25, help="rows of each listing")
    parser.add_argument("--redis", metavar="URL", help="REDIS_URL: the gateway's limits in Redis")
    parser.add_argument("--no-perf", action="store_true", help="skip perf")
    args = parser.parse_args()
    if not args.no_perf and not shutil.which("perf"):
        sys.exit("profile: perf is not installed (apt-get install linux-perf), or use --no-perf")
    tmp = Path(tempfile.mkdtemp(prefix="gw-profile-"))
    try:
        if not args.no_perf:
            with targets(tmp / "perf", args) as (found, key):
                for target in found:
                    perf(target, key, args, tmp)
        if args.calls:
            with targets(tmp / "threads", args) as (found, key):
                for target in found:
                    threads(target, key, args)
            with targets(tmp / "calls", args, profiled=True) as (found, key):
                for target in found:
                    calls(target, key, args, tmp / "calls" / "profiles")
    except BaseException:
        print(f"profile: failed; the logs are in {tmp}", file=sys.stderr)
        raise
    shutil.rmtree(tmp, ignore_errors=True)


@contextmanager
def targets(
    folder: Path, args: argparse.Namespace, profiled: bool = False
) -> Iterator[tuple[list, str]]:
    """The gateway and the floor on one fake upstream, and the key to call them with."""
    workers = args.workers
    # A prefix of the run's own: a shared Redis may hold another run's keys.
    shared = (
        {"REDIS_URL": args.redis, "GATEWAY_REDIS_PREFIX": f"{folder.parent.name}-{folder.name}"}
        if args.redis
        else {}
    )
    folder.mkdir(parents=True)
    saved = dict(os.environ)
    servers: list = []
    try:
        servers.append(fake := FakeUpstream())
        try:
            if profiled:  # the two targets' Python processes run SITECUSTOMIZE
                (folder / "profiles").mkdir()
                (folder / "sitecustomize.py").write_text(SITECUSTOMIZE)
                os.environ.update(PYTHONPATH=str(folder), GW_PROFILE_DIR=str(folder / "profiles"))
            servers.append(floor := Floor(fake.url + "/v1", folder / "floor.log", workers))
            url = f"sqlite:///{folder}/gw.db"
            servers.append(
                gw := Gateway(
                    url, folder / "instance", workers, GATEWAY_LOG_LEVEL="WARNING", **shared
                )
            )
        finally:
            os.environ.clear()
            os.environ.update(saved)
        key = pair.setup(gw, fake.url)["key"]
        yield (
            [
                run.Target("gateway", gw.port, gw.worker_pids()),
                run.Target("floor", floor.port, floor.pids),
            ],
            key,
        )
    finally:
        stop_all(reversed(servers))  # a gateway's bad exit leaves none running


def _request(kind: str, key: str) -> bytes:
    return request(run.PACED, True, key) if kind == "stream" else request(run.ANSWER, False, key)


def perf(target: run.Target, key: str, args: argparse.Namespace, tmp: Path) -> None:
    """perf's samples while the target is loaded: µs a call by library and by symbol."""
    req = _request(args.kind, key)
    run.calls(target, req, 500, CLIENTS)  # warm
    data = tmp / f"{target.name}.perf"
    command = ["perf", "record", "-q", "-e", "cpu-clock", "-F", str(FREQUENCY), "-o", str(data)]
    recorder = subprocess.Popen(
        [*command, "-p", ",".join(map(str, target.pids))],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    time.sleep(0.5)  # perf attaches
    _, durations = run.load(target, req, CLIENTS, args.seconds)
    recorder.send_signal(signal.SIGINT)
    _, err = recorder.communicate(timeout=60)
    if recorder.returncode not in (0, -signal.SIGINT):
        sys.exit(f"profile: perf failed: {err.decode().strip()}")
    per_call = 1e6 / FREQUENCY / len(durations)  # µs of CPU a sample, shared by the calls
    print(f"\n## {target.name}: perf, {len(durations)} {args.kind} calls, µs of CPU a call")
    for sort in ("dso", "sym"):
        rows = _perf_rows(data, sort)
        print(f"\n{'total':>9} {sum(rows.values()) * per_call:9.1f}")
        for name, samples in rows.most_common(args.top):
            print(f"{samples * per_call:9.1f}  {name}")


def _perf_rows(data: Path, sort: str) -> Counter[str]:
    command = ["perf", "report", "--stdio", "--no-children", "-q", "-i", str(data)]
    out = subprocess.run(
        [*command, "--sort", sort, "-F", f"sample,{sort}"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    rows: Counter[str] = Counter()
    for line in out.splitlines():
        count, _, name = line.strip().partition(" ")
        if count.isdigit():
            rows[name.strip()] += int(count)
    return rows


def threads(target: run.Target, key: str, args: argparse.Namespace) -> None:
    """Each thread's CPU, voluntary and involuntary switches a call, over ``--calls``."""
    req = _request(args.kind, key)
    run.calls(target, req, 500, CLIENTS)  # warm
    before = _tasks(target.pids)
    run.calls(target, req, args.calls, CLIENTS)
    after = _tasks(target.pids)
    n = args.calls
    print(f"\n## {target.name}: threads, {n} {args.kind} calls, a call's share")
    print(f"\n{'µs CPU':>9} {'waits':>6} {'preempted':>9}  thread")
    for (pid, tid), (cpu, waits, preempted) in sorted(after.items()):
        was = before.get((pid, tid), (0, 0, 0))
        if cpu - was[0] < 1e3 * n:  # under a µs a call: an idle thread
            continue
        name = f"{pid} {'main' if pid == tid else f'thread {tid}'}"
        print(
            f"{(cpu - was[0]) / 1e3 / n:9.1f} {(waits - was[1]) / n:6.2f}"
            f" {(preempted - was[2]) / n:9.2f}  {name}"
        )


def _tasks(pids: list[int]) -> dict[tuple[int, int], tuple[int, int, int]]:
    """Per thread: CPU in ns, voluntary and involuntary context switches, now."""
    found = {}
    for pid in pids:
        for task in Path(f"/proc/{pid}/task").iterdir():
            try:
                cpu = int(task.joinpath("schedstat").read_text().split()[0])
                status = dict(
                    line.split(":", 1) for line in task.joinpath("status").read_text().splitlines()
                )
            except (FileNotFoundError, ValueError):  # the thread just ended
                continue
            switches = (
                int(status[f"{kind}_ctxt_switches"]) for kind in ("voluntary", "nonvoluntary")
            )
            found[(pid, int(task.name))] = (cpu, *switches)
    return found


def calls(target: run.Target, key: str, args: argparse.Namespace, profiles: Path) -> None:
    """Python function calls a call, between two snapshots of the target's profiles."""
    req = _request(args.kind, key)
    run.calls(target, req, 500, CLIENTS)  # warm
    before = _snapshots(target.pids, profiles)
    run.calls(target, req, args.calls, CLIENTS)
    after = _snapshots(target.pids, profiles)
    counts: Counter[tuple] = Counter()
    seconds: Counter[tuple] = Counter()
    for pid, stats in after.items():
        for func, (_, ncalls, tottime, *_rest) in stats.items():
            was = before[pid].get(func, (0, 0, 0.0))
            counts[func] += ncalls - was[1]
            seconds[func] += tottime - was[2]
    n = args.calls
    print(f"\n## {target.name}: cProfile, {n} {args.kind} calls")
    print(f"\n{sum(counts.values()) / n:9.1f}  Python function calls a call (built-ins included)")
    print(f"{'calls':>9} {'µs':>7}  function (µs: its own time under cProfile)")
    for func, count in counts.most_common(args.top):
        print(f"{count / n:9.1f} {seconds[func] / n * 1e6:7.1f}  {_name(func)}")
    files = _by_file(before, after)
    print(f"\n{'calls':>9} {'µs':>7}  file (a built-in's calls go to its callers' files)")
    for file, (count, spent) in sorted(files.items(), key=lambda kv: -kv[1][1])[: args.top]:
        print(f"{count / n:9.1f} {spent / n * 1e6:7.1f}  {file}")


def _by_file(before: dict[int, dict], after: dict[int, dict]) -> dict[str, tuple[int, float]]:
    """Calls and own time by source file, between two snapshots."""
    files: Counter[str] = Counter()
    spent: Counter[str] = Counter()
    for pid, stats in after.items():
        old = before[pid]
        for func, (_, _, _, _, callers) in stats.items():
            was_callers = old.get(func, (0, 0, 0.0, 0.0, {}))[4]
            for caller, (_, ncalls, tottime, _) in callers.items():
                was = was_callers.get(caller, (0, 0, 0.0, 0.0))
                # A built-in's work is its caller's; a Python function's, its own file's.
                file = _name(caller if func[0] == "~" else func).rpartition("(")[2]
                file = file.rpartition(":")[0] or file.rstrip(")")
                files[file] += ncalls - was[1]
                spent[file] += tottime - was[2]
    return {file: (files[file], spent[file]) for file in files}


def _snapshots(pids: list[int], folder: Path) -> dict[int, dict]:
    """Each process's profile as of now (the SNAPSHOT signal, then its file)."""
    for path in folder.iterdir():
        path.unlink()
    for pid in pids:
        os.kill(pid, SNAPSHOT)
    deadline = time.monotonic() + 30
    while len(written := list(folder.glob("*[0-9]"))) < len(pids):  # not the .part files
        if time.monotonic() > deadline:
            sys.exit("profile: a process wrote no snapshot (is it idle in a C call?)")
        time.sleep(0.05)
    return {int(path.name.split("-")[0]): marshal.loads(path.read_bytes()) for path in written}


def _name(func: tuple) -> str:
    file, line, name = func
    for prefix in (str(ROOT) + "/", sysconfig.get_paths()["purelib"] + "/"):
        file = file.removeprefix(prefix)
    return f"{name} ({file}:{line})" if line else name


if __name__ == "__main__":
    main()
