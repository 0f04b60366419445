"""The sweeper: dead processes' pending rows are finalised, a live process's never are.

Several processes are played in one by ``Sweeper`` objects with their own names and
a shared fake clock, against the real database; the database "goes away" by
pointing the proxy at one that cannot be reached.
"""

from __future__ import annotations

import os
import socket
import subprocess
from collections.abc import Iterator
from datetime import timedelta

import pytest

from gateway import metrics
from gateway.callrows import snapshot
from gateway.db import database, open_database
from gateway.exchange import Exchange
from gateway.models import ApiKey, Completion, Heartbeat, utcnow
from gateway.recorder import write_rows
from gateway.sweeper import SWEPT_ERROR, Sweeper, _place, identity
from tests import pools
from tests.servers import unreachable

DEAD_AFTER = 5.0


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def key_id(database_url: str) -> Iterator[int]:
    database.initialize(open_database(database_url))
    with database.connection_context():
        yield ApiKey.create(key_hash="s" * 64, key_hint="sk-…s").id
    pools.release(database.obj)


def process(clock: Clock, name: str) -> Sweeper:
    sweeper = Sweeper(clock, name)
    sweeper.heartbeat, sweeper.interval, sweeper.dead_after = 1.0, 1.0, DEAD_AFTER
    sweeper.orphan_after = timedelta(hours=1)
    return sweeper


def pending_call(key_id: int, owner: str | None) -> str:
    """A pending row as ``owner`` recorded it; its uid."""
    row = snapshot(Exchange(api_key_id=key_id, model="m", api_format="openai-chat"))
    row["owner"] = owner
    write_rows([row])
    return row["uid"]


def status(uid: str) -> tuple[str, str | None, bool]:
    row = Completion.get(Completion.uid == uid)
    return row.status, row.error, row.swept


def second(clock: Clock, *beating: Sweeper, watcher: Sweeper | None = None) -> int:
    """One second passes: the beating processes beat, the watcher beats and sweeps."""
    clock.now += 1.0
    for proc in beating:
        assert proc.beat()
    if watcher is None:
        return 0
    watcher.beat()
    return watcher.sweep()


def test_identity_is_random_host_pid_namespace_and_pid() -> None:
    name = identity()
    assert name == identity()
    random_part, _, rest = name.partition("@")
    space = os.readlink("/proc/self/ns/pid").rpartition("[")[2].rstrip("]")
    assert len(random_part) == 8 and rest == f"{socket.gethostname()}~{space}:{os.getpid()}"


def test_a_dead_process_is_swept_once_watched_for_dead_after(
    clock: Clock, key_id: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    counted: list = []  # /metrics: no process of its own will count it
    monkeypatch.setattr(metrics, "calls_swept", lambda rows, keys: counted.append((rows, keys)))
    dead, watcher = process(clock, "dead@h:1"), process(clock, "watcher@h:2")
    assert dead.beat()
    uid = pending_call(key_id, dead.name)
    mine = pending_call(key_id, watcher.name)
    for _ in range(int(DEAD_AFTER)):  # the first look starts the watch
        assert second(clock, watcher=watcher) == 0
    assert status(uid)[0] == "pending" and counted == []
    assert second(clock, watcher=watcher) == 1
    assert status(uid) == ("failed", SWEPT_ERROR, True)
    ((rows, keys),) = counted
    assert [(r["uid"], r["status"], r["model"], r["api_key"]) for r in rows] == [
        (uid, "failed", "m", key_id)
    ]
    assert keys == {key_id: ApiKey.get_by_id(key_id).comment}
    assert status(mine)[0] == "pending"  # its own rows are never swept
    assert [h.owner for h in Heartbeat.select()] == [watcher.name]  # the dead row is gone


def test_a_live_process_long_call_is_never_swept(clock: Clock, key_id: int) -> None:
    live, watcher = process(clock, "live@h:1"), process(clock, "watcher@h:2")
    live.beat()
    uid = pending_call(key_id, live.name)
    for _ in range(120):  # two minutes: 24 times PROCESS_DEAD_AFTER
        assert second(clock, live, watcher=watcher) == 0
    assert status(uid)[0] == "pending"


def test_an_outage_never_makes_a_live_process_look_dead(
    clock: Clock, key_id: int, database_url: str
) -> None:
    """Nobody can beat while the database is away; the watcher must start watching afresh."""
    live, dead, watcher = (
        process(clock, f"{n}@h:{i}") for i, n in enumerate(("live", "dead", "w"))
    )
    live.beat(), dead.beat()
    live_uid, dead_uid = pending_call(key_id, live.name), pending_call(key_id, dead.name)
    for _ in range(3):
        second(clock, live, watcher=watcher)
    real = database.obj
    database.initialize(unreachable(database_url))
    try:
        for _ in range(30):  # 30 s down: every beat fails, the sweep loop keeps ticking
            clock.now += 1.0
            assert not live.beat() and not watcher.beat()
            assert watcher.sweep() == 0
    finally:
        database.initialize(real)
    # Back. The live process's next beat comes a little after the watcher's first look.
    assert second(clock, watcher=watcher) == 0
    assert second(clock, live, watcher=watcher) == 0
    for _ in range(int(DEAD_AFTER) - 2):
        assert second(clock, live, watcher=watcher) == 0
    assert status(dead_uid)[0] == "pending", "swept before the watcher saw DEAD_AFTER itself"
    assert second(clock, live, watcher=watcher) == 1
    assert status(dead_uid)[0] == "failed"
    for _ in range(30):
        assert second(clock, live, watcher=watcher) == 0
    assert status(live_uid)[0] == "pending"


def test_a_gap_in_watching_starts_the_watch_again(clock: Clock, key_id: int) -> None:
    """A watcher that stalled (its loop did not run) did not see what happened meanwhile."""
    quiet, watcher = process(clock, "quiet@h:1"), process(clock, "w@h:2")
    quiet.beat()
    uid = pending_call(key_id, quiet.name)
    second(clock, watcher=watcher)
    clock.now += 60.0
    assert second(clock, watcher=watcher) == 0
    assert status(uid)[0] == "pending"


def test_rows_replayed_for_an_owner_with_no_heartbeat_are_judged_the_same_way(
    clock: Clock, key_id: int
) -> None:
    """A process that died during an outage never wrote a heartbeat; a sibling replays its
    journal. A live one replaying its own rows before its first beat lands is not swept."""
    watcher, late = process(clock, "w@h:1"), process(clock, "late@h:2")
    gone_uid = pending_call(key_id, "gone@h:3")
    late_uid = pending_call(key_id, late.name)
    second(clock, watcher=watcher)
    second(clock, late, watcher=watcher)
    for _ in range(int(DEAD_AFTER) - 1):
        second(clock, late, watcher=watcher)
    assert status(gone_uid)[0] == "failed" and status(late_uid)[0] == "pending"


def test_rows_without_an_owner_keep_the_age_rule(clock: Clock, key_id: int) -> None:
    watcher = process(clock, "w@h:1")
    old, young = pending_call(key_id, None), pending_call(key_id, None)
    Completion.update(updated_at=utcnow() - timedelta(hours=2)).where(
        Completion.uid == old
    ).execute()
    assert second(clock, watcher=watcher) == 1
    assert status(old) == ("failed", SWEPT_ERROR, True) and status(young)[0] == "pending"


def test_a_process_whose_heartbeat_fails_does_not_sweep(
    clock: Clock, key_id: int, database_url: str
) -> None:
    dead, watcher = process(clock, "dead@h:1"), process(clock, "w@h:2")
    dead.beat()
    uid = pending_call(key_id, dead.name)
    for _ in range(int(DEAD_AFTER)):
        second(clock, watcher=watcher)  # one more second and it would be swept
    real = database.obj
    database.initialize(unreachable(database_url))
    try:
        clock.now += 1.0
        assert not watcher.beat()
    finally:
        database.initialize(real)
    assert watcher.sweep() == 0  # the database answers again, but our beat did not land
    assert status(uid)[0] == "pending"


def test_a_silent_owner_still_running_on_this_host_is_not_swept(clock: Clock, key_id: int) -> None:
    # Its heartbeat stopped because its own connections to the database failed (refused
    # or cut while the watcher kept its own); its calls still run. They were swept as
    # "orphaned" and answered calls recorded failed. A pid now held by a process that
    # began after the owner's first heartbeat is another process: swept.
    # A pid of another PID namespace on a host of the same name (a container with host
    # networking) is not ours, whatever runs under it here: swept. So is an owner named
    # without its namespace (before it was named), as nothing tells.
    host, here = socket.gethostname()[:64], _place()
    live = process(clock, f"live@{here}:{os.getpid()}")
    gone = process(clock, f"gone@{here}:{_exited_pid()}")
    reused = process(clock, f"reused@{here}:{os.getpid()}")
    contained = process(clock, f"contained@{host}~1:{os.getpid()}")
    unplaced = process(clock, f"unplaced@{host}:{os.getpid()}")
    watcher = process(clock, "watcher@h:2")
    owners = (live, gone, reused, contained, unplaced)
    for proc in owners:
        assert proc.beat()
    Heartbeat.update(started_at=utcnow() - timedelta(days=400)).where(
        Heartbeat.owner == reused.name
    ).execute()
    uids = {proc.name: pending_call(key_id, proc.name) for proc in owners}
    swept = sum(second(clock, watcher=watcher) for _ in range(int(DEAD_AFTER) + 1))
    assert swept == 4
    assert status(uids[live.name])[0] == "pending"
    assert {status(uids[p.name])[0] for p in owners if p is not live} == {"failed"}


def _exited_pid() -> int:
    child = subprocess.Popen(["true"])
    child.wait()
    return child.pid
