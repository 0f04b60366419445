"""Crash recovery through real gunicorn: ``kill -9`` of a worker, and of a whole instance.

A killed process's pending rows are finalised by a surviving one once its heartbeat has
stood still for PROCESS_DEAD_AFTER (shortened here so the tests run fast; the defaults,
10 s beats and 45 s, give "within about a minute"); a live process's call is never swept,
however long it runs. On SQLite (two instances share the file) and PostgreSQL.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import gevent
import gevent.event
import openai
import peewee
import pytest

from gateway.db import migrate, open_database
from gateway.sweeper import SWEPT_ERROR
from tests.servers import Gateway, children, stop_all, wait_until

pytestmark = pytest.mark.server

FAST = {
    "GATEWAY_PROCESS_HEARTBEAT": "0.5",
    "GATEWAY_PROCESS_DEAD_AFTER": "3",
    "GATEWAY_SWEEP_INTERVAL": "0.5",
}
PROMPT = [{"role": "user", "content": "tell me a story"}]
DOOMED = "fake;chunks=400;delay=0.05"  # 20 s: still running when its process dies
LONG = "fake;chunks=50;delay=0.16"  # 8 s: well past PROCESS_DEAD_AFTER, on a live process


class Rows:
    """The completions table, read straight from the database the gateways share."""

    def __init__(self, url: str) -> None:
        self.db = open_database(url)

    def all(self) -> list[dict]:
        with self.db.connection_context():
            cursor = self.db.execute_sql(
                "SELECT uid, owner, status, error, swept, completion_tokens, model "
                "FROM completions ORDER BY id"
            )
            columns = [c[0] for c in cursor.description]
            return [dict(zip(columns, row, strict=True)) for row in cursor.fetchall()]

    def of(self, model: str) -> dict | None:
        return next((r for r in self.all() if r["model"] == model), None)

    def heartbeats(self) -> set[str]:
        with self.db.connection_context():
            return {owner for (owner,) in self.db.execute_sql("SELECT owner FROM heartbeats")}

    def close(self) -> None:
        if isinstance(self.db, peewee.PostgresqlDatabase):
            self.db.close_all()


@pytest.fixture
def rows(database_url: str) -> Iterator[Rows]:
    handle = Rows(database_url)
    yield handle
    handle.close()


def stream(gw: Gateway, key: str, model: str) -> gevent.Greenlet:
    """Read a whole stream in the background; the greenlet's value is the text (or error)."""

    def read() -> str | openai.APIError:
        client = openai.OpenAI(base_url=f"{gw.url}/v1", api_key=key, max_retries=0)
        try:
            chunks = client.chat.completions.create(model=model, messages=PROMPT, stream=True)
            return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        except openai.APIError as exc:  # the doomed call's process is killed under it
            return exc

    return gevent.spawn(read)


def pending_row(rows: Rows, model: str) -> dict:
    return wait_until(lambda: (r := rows.of(model)) and r["status"] == "pending" and r, 10)


def watch(rows: Rows, doomed: str, live: str, reader: gevent.Greenlet) -> float:
    """Seconds until the doomed row is finalised. The live row must stay pending all
    along, until its call has ended (a swept row would be overwritten by its final one)."""
    started, took = time.monotonic(), None
    while not reader.ready() or took is None:
        now = {r["model"]: r for r in rows.all()}
        assert not now[live]["swept"] and now[live]["status"] in ("pending", "completed"), now[live]
        if took is None and now[doomed]["status"] != "pending":
            took = time.monotonic() - started
        assert time.monotonic() - started < 30, "the dead process's row was not finalised"
        time.sleep(0.1)
    return took


def assert_swept(row: dict) -> None:
    assert (row["status"], row["error"], bool(row["swept"])) == ("failed", SWEPT_ERROR, True)


def assert_completed(reader: gevent.Greenlet, rows: Rows, model: str) -> None:
    text = reader.get(timeout=30)
    assert text == "".join(f"tok{i} " for i in range(50))
    row = wait_until(lambda: (r := rows.of(model)) and r["status"] != "pending" and r, 10)
    assert (row["status"], bool(row["swept"]), row["completion_tokens"]) == ("completed", False, 50)


def test_a_killed_worker_is_swept_and_a_live_long_call_is_not(
    gateway_factory, fake, rows: Rows
) -> None:  # type: ignore[no-untyped-def]
    gw = gateway_factory(GATEWAY_WORKERS="2", **FAST)
    doomed = gw.setup_route(fake.url, system_name="doomed", remote_id=DOOMED)
    live = gw.setup_route(fake.url, system_name="live", remote_id=LONG)
    stream(gw, doomed["key"], "doomed")
    victim = pending_row(rows, "doomed")["owner"]
    pid = int(victim.rsplit(":", 1)[1])
    assert pid in children(gw.proc.pid)
    os.kill(pid, signal.SIGKILL)
    reader = stream(gw, live["key"], "live")  # lands on the other worker, or the new one
    pending_row(rows, "live")
    took = watch(rows, "doomed", "live", reader)
    print(f"\nkill -9 of a worker: its row finalised {took:.1f} s later")
    assert took < 15
    assert_swept(rows.of("doomed"))
    assert victim not in rows.heartbeats()  # the dead heartbeat row is cleaned up
    assert_completed(reader, rows, "live")
    # The admin API says which record the sweeper closed, and when.
    shown = {r["model"]: r for r in gw.records()}
    assert shown["doomed"]["swept"] is True and shown["doomed"]["sweptAt"].endswith("Z")
    assert (shown["live"]["swept"], shown["live"]["sweptAt"]) == (False, None)


def test_calls_a_killed_worker_answered_keep_their_records(
    gateway_factory, fake, rows: Rows
) -> None:  # type: ignore[no-untyped-def]
    # Records wait in a worker's memory before their write (RECORDER_LINGER, _INTERVAL):
    # a kill -9 lost the answered calls of its last tens of milliseconds (17-56 a kill
    # at 4-8 clients), and left no row of calls begun under 0.25 s before it. Each
    # snapshot now goes to a write-ahead file first, which the next worker replays.
    gw = gateway_factory(GATEWAY_WORKERS="1", **FAST)
    route = gw.setup_route(fake.url, key={"rpmLimit": 10**6, "tpmLimit": 10**9})
    answered: list[int] = []
    stop = gevent.event.Event()

    def client() -> None:
        ai = openai.OpenAI(base_url=f"{gw.url}/v1", api_key=route["key"], max_retries=0)
        while not stop.is_set():
            with contextlib.suppress(openai.APIError):  # the worker is killed under some
                ai.chat.completions.create(model="fake", messages=PROMPT)
                answered.append(1)

    clients = [gevent.spawn(client) for _ in range(6)]
    # Each kill lands among calls answered and recording: 35 answered since the last
    # (not a fixed time, which a loaded machine answered too few calls in), and 10 after.
    for goal in (35, 70, 105):
        wait_until(lambda goal=goal: len(answered) >= goal, timeout=60, interval=0.02)
        (pid,) = children(gw.proc.pid)
        os.kill(pid, signal.SIGKILL)
        wait_until(lambda pid=pid: children(gw.proc.pid) not in ([], [pid]), timeout=30)
    wait_until(lambda: len(answered) >= 115, timeout=60, interval=0.02)
    stop.set()
    gevent.joinall(clients, raise_error=True)

    def settled() -> list[dict] | None:
        # The last kill's lines are written once its replacement's replay has run (at
        # its start, then every 5 s): until then no row of theirs is even pending.
        now = rows.all()
        if any(r["status"] == "pending" for r in now):
            return None
        done = sum(r["status"] == "completed" for r in now) >= len(answered)
        return now if done else None

    def how_far() -> str:
        statuses = Counter(r["status"] for r in rows.all())
        return f"every row final, one completed per call answered ({len(answered)}): {statuses}"

    # Replayed, and the rest swept: a replay that never comes, or a slow one, fails here.
    final = wait_until(settled, timeout=60, interval=0.5, what=how_far)
    completed = [r for r in final if r["status"] == "completed"]
    assert len(completed) >= len(answered), (len(completed), len(answered))
    assert all(r["status"] in ("completed", "failed") for r in final)
    assert len({r["uid"] for r in final}) == len(final)


def test_a_killed_instance_is_swept_by_another_sharing_the_database(
    gateway_factory, fake, rows: Rows
) -> None:  # type: ignore[no-untyped-def]
    first, second = gateway_factory(**FAST), gateway_factory(**FAST)
    doomed = first.setup_route(fake.url, system_name="doomed", remote_id=DOOMED)
    live = second.setup_route(fake.url, system_name="live", remote_id=LONG)
    stream(first, doomed["key"], "doomed")
    pending_row(rows, "doomed")
    reader = stream(second, live["key"], "live")
    pending_row(rows, "live")
    # A crash: the workers and the master die at once. (Killing only the master is
    # survivable: the orphaned worker notices and records the call itself.)
    for pid in children(first.proc.pid):
        os.kill(pid, signal.SIGKILL)
    first.kill()
    took = watch(rows, "doomed", "live", reader)
    print(f"\nkill -9 of an instance: its row finalised {took:.1f} s later by the other")
    assert took < 15
    assert_swept(rows.of("doomed"))
    assert_completed(reader, rows, "live")


def metrics_dir_of(master: int) -> Path | None:
    """The metrics directory gunicorn.conf.py made for the instance of ``master``."""
    for parent in ("/dev/shm", tempfile.gettempdir()):
        for owner in Path(parent).glob("gateway-metrics-*/master"):
            if owner.read_text().split(" ")[0] == str(master):
                return owner.parent
    return None


def test_a_killed_instances_metrics_directory_goes_at_the_next_start(fake, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """By default an instance's metrics files live in /dev/shm, memory until reboot;
    its master removes them at exit. A master killed with -9 cannot: the next instance
    to start on the host removes its directory, and that of a master whose pid another
    process took since (it started later). Never a live master's (here the test process
    stands for one, in the owner file's older form too), nor one whose pid is of another
    pid namespace, nor one whose owner cannot be read."""
    url = f"sqlite:///{tmp_path / 'gateway.db'}"
    migrate(handle := open_database(url))
    handle.close()
    default = {"PROMETHEUS_MULTIPROC_DIR": ""}  # as `make run`: gunicorn.conf.py chooses
    doomed = Gateway(url, tmp_path / "doomed", **default)
    later = None
    doomed_dir = metrics_dir_of(doomed.proc.pid)
    assert doomed_dir is not None
    namespace = os.readlink("/proc/self/ns/pid")
    started = Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19]
    kept, taken = [], Path(tempfile.mkdtemp(prefix="gateway-metrics-", dir=doomed_dir.parent))
    (taken / "master").write_text(f"{os.getpid()} {namespace} {int(started) - 1}")
    for owner in (
        f"{os.getpid()} {namespace} {started}",
        f"{os.getpid()} {namespace}",
        f"{doomed.proc.pid} pid:[1] 1",
        "garbage",
    ):
        kept.append(Path(tempfile.mkdtemp(prefix="gateway-metrics-", dir=doomed_dir.parent)))
        (kept[-1] / "master").write_text(owner)
    try:
        for pid in children(doomed.proc.pid):
            os.kill(pid, signal.SIGKILL)
        doomed.kill()
        assert doomed_dir.exists(), "nothing ran at its exit"
        later = Gateway(url, tmp_path / "later", **default)
        assert not doomed_dir.exists(), "the dead master's directory is still there"
        assert not taken.exists(), "a master whose pid was taken since is taken for alive"
        assert all(path.exists() for path in kept), "a live or unknown master's went"
        later_dir = metrics_dir_of(later.proc.pid)
        assert later_dir is not None and later_dir.exists()
        assert later.stop() == 0 and not later_dir.exists(), "on_exit removes its own"
    finally:
        stop_all([gw for gw in (doomed, later) if gw is not None])
        for path in [*kept, taken]:
            shutil.rmtree(path, ignore_errors=True)
