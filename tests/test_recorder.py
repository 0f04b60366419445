"""The recorder: ordering, coalescing, finals never undone, the journal, surviving anything."""

from __future__ import annotations

import errno
import json
import logging
import os
import subprocess
import time
import uuid
from datetime import timedelta
from pathlib import Path

import gevent
import gevent.event
import pytest

from gateway import cli, held, metrics
from gateway import journal as journal_module
from gateway import recorder as recorder_module
from gateway.callrows import ahead_row, snapshot
from gateway.db import UNREACHABLE, database, open_database
from gateway.exchange import Exchange, new_uid
from gateway.models import ApiKey, Completion, utcnow
from gateway.recorder import Recorder, write_rows
from gateway.sweeper import identity
from gateway.writes import index_all_due
from tests import pools
from tests.loopwatch import assert_kept_turning, slow_disk, watch_loop
from tests.recorders import make_recorder
from tests.servers import (
    away,
    pg_lock_awaited,
    sqlite_lock_held,
    unreachable,
    varied_text,
    wait_until,
)


@pytest.fixture
def key_id(rec: Recorder) -> int:
    with database.connection_context():
        return ApiKey.create(key_hash="h" * 64, key_hint="sk-…test").id


def exchange(key_id: int, **kwargs: object) -> Exchange:
    return Exchange(
        api_key_id=key_id, model="m", api_format="openai-chat", prompt={"messages": []}, **kwargs
    )


def rows() -> list[Completion]:
    with database.connection_context():
        return list(Completion.select().order_by(Completion.id))


def test_pending_then_final_is_one_row(rec: Recorder, key_id: int) -> None:
    ex = exchange(key_id)
    rec.record(ex)
    assert rec.flush(5)
    (row,) = rows()
    assert row.status == "pending" and row.prompt_tokens is None and row.duration is None
    ex.finish(
        "completed",
        output=[{"role": "assistant", "content": "hi"}],
        usage={"input_tokens": 3, "output_tokens": 1},
    )
    rec.record(ex)
    assert rec.flush(5)
    (row,) = rows()
    assert (row.status, row.prompt_tokens, row.completion_tokens) == ("completed", 3, 1)
    assert row.completion == [{"role": "assistant", "content": "hi"}]
    assert row.duration is not None and row.uid == ex.uid


def test_a_call_that_ends_before_its_pending_write_is_inserted_once_final(
    rec: Recorder, key_id: int
) -> None:
    ex = exchange(key_id)
    rec.record(ex)
    ex.finish("aborted", error="client disconnected")
    rec.record(ex)  # no switch in between: the writer sees only the final state
    assert rec.flush(5)
    (row,) = rows()
    assert (row.status, row.error) == ("aborted", "client disconnected")


def test_a_stale_pending_snapshot_never_overwrites_a_final_row(rec: Recorder, key_id: int) -> None:
    ex = exchange(key_id)
    pending = snapshot(ex)
    ex.finish("completed", usage={"input_tokens": 5, "output_tokens": 7})
    write_rows([snapshot(ex)])
    write_rows([pending])  # e.g. replayed from a journal after the final landed
    (row,) = rows()
    assert (row.status, row.prompt_tokens, row.completion_tokens) == ("completed", 5, 7)


def test_finish_is_refused_twice() -> None:
    ex = exchange(1)
    assert ex.finish("completed")
    assert not ex.finish("failed", error="late")
    assert (ex.status, ex.error) == ("completed", None)


def test_uids_are_uuid7_in_the_order_of_their_time() -> None:
    # Inserted in uid order, records go at the end of the uid index (issue 11).
    before = time.time_ns() // 1_000_000
    uids = []
    for _ in range(200):
        uids.append(new_uid())
        if len(uids) % 50 == 0:
            time.sleep(0.002)  # a later millisecond
    after = time.time_ns() // 1_000_000
    assert len(set(uids)) == len(uids)
    for uid in uids:
        parsed = uuid.UUID(uid)
        assert (uid, parsed.version, parsed.variant) == (parsed.hex, 7, uuid.RFC_4122)
        assert before <= int(uid[:12], 16) <= after
    # Whole milliseconds in order; within one, the random bits decide.
    assert [u[:12] for u in uids] == sorted(u[:12] for u in uids)
    assert uids[0] < uids[50] < uids[100] < uids[150]
    assert len({u[13:] for u in uids}) == len(uids)  # the random part differs


def test_many_calls_many_writes_exactly_one_row_each(rec: Recorder, key_id: int) -> None:
    calls = [exchange(key_id) for _ in range(120)]
    for ex in calls:
        rec.record(ex)
    for i, ex in enumerate(calls):
        ex.finish(
            "completed" if i % 2 else "aborted", usage={"input_tokens": i, "output_tokens": i}
        )
        rec.record(ex)
    assert rec.flush(10)
    got = {r.uid: r for r in rows()}
    assert len(got) == 120
    for i, ex in enumerate(calls):
        assert got[ex.uid].status == ("completed" if i % 2 else "aborted")
        assert got[ex.uid].prompt_tokens == i


def test_database_down_journals_then_replays_everything(
    rec: Recorder, key_id: int, database_url: str
) -> None:
    real = database.obj
    first, second = exchange(key_id), exchange(key_id)
    database.initialize(unreachable(database_url))
    try:
        rec.record(first)
        assert rec.flush(5)
        first.finish("completed", usage={"input_tokens": 2, "output_tokens": 4})
        rec.record(first)
        second.finish("failed", error="upstream 500")
        rec.record(second)
        assert rec.flush(5)
        assert rec.journaled == 3 and rec.writes == 0
        assert metrics.JOURNAL_DEPTH._value.get() == 3  # gateway_journal_depth
        journal = list(rec.journal.directory.glob("journal-*.jsonl"))
        assert len(journal) == 1 and len(journal[0].read_text().splitlines()) == 3
    finally:
        database.initialize(real)
    rec._replay_once()
    got = {r.uid: r for r in rows()}
    assert got[first.uid].status == "completed" and got[first.uid].completion_tokens == 4
    assert got[second.uid].status == "failed" and got[second.uid].error == "upstream 500"
    assert not list(rec.journal.directory.glob("journal-*.jsonl"))
    assert not rec._journaling and metrics.JOURNAL_DEPTH._value.get() == 0
    # Back to direct writes.
    third = exchange(key_id)
    third.finish("completed")
    rec.record(third)
    assert rec.flush(5)
    assert rec.writes == 1 and len(rows()) == 3


def test_no_journal_is_read_while_the_database_does_not_answer(
    rec: Recorder, key_id: int, database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A replay reads a file on the loop: during an outage it read every journal again
    every 5 s (a 100 MB one, read whole, stalled the worker's calls 0.6-1.4 s each time)."""
    call = exchange(key_id)
    call.finish("completed")
    proc = subprocess.Popen(["true"])
    proc.wait()
    dead = rec.journal.directory / f"journal-{proc.pid}.jsonl"
    dead.parent.mkdir(exist_ok=True)
    dead.write_text(json.dumps(journal_module._jsonable(snapshot(call))) + "\n")
    settled = journal_module._settled
    reads: list[Path] = []
    monkeypatch.setattr(
        journal_module, "_settled", lambda *args: reads.append(args[0]) or settled(*args)
    )
    with away(unreachable(database_url)), pytest.raises(UNREACHABLE):
        rec._replay_round()  # as the replay loop does every 5 s
    assert not reads and dead.exists()
    rec._replay_round()  # the database answers again
    assert [row.uid for row in rows()] == [call.uid] and not dead.exists()


def _disk_full(rec: Recorder, monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Every journal append refused as a full disk refuses it; returns the tries made.
    (``test_journal`` makes a real partial write: here the recorder's answer to it.)"""
    tries: list[int] = []

    def append(path: Path, data: bytes, exiting: bool = False) -> None:
        tries.append(len(data))
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))

    monkeypatch.setattr(rec.journal, "_append", append)
    monkeypatch.setattr(recorder_module, "HOLD_RETRY", 0.05)
    return tries


@pytest.mark.parametrize("back_first", ["database", "disk"])
def test_with_the_database_down_and_the_disk_full_calls_wait_in_memory(
    rec: Recorder,
    key_id: int,
    database_url: str,
    monkeypatch: pytest.MonkeyPatch,
    back_first: str,
) -> None:
    real = database.obj
    lost = metrics.RECORDS_LOST._value.get()
    calls = [exchange(key_id) for _ in range(3)]
    tries = _disk_full(rec, monkeypatch)
    database.initialize(unreachable(database_url))
    try:
        for ex in calls:
            ex.finish("completed", usage={"input_tokens": 1, "output_tokens": 2})
            rec.record(ex)
        assert not rec.flush(0.5), "nothing can have taken them"
        assert rec.backlog() == 3 and rec.writes == rec.journaled == 0
        assert len(tries) >= 4, "tried again, not given up"
        assert metrics.RECORDS_HELD._value.get() == 3
        if back_first == "disk":
            monkeypatch.undo()  # room on the disk again: the journal takes them
            assert rec.flush(5) and rec.journaled == 3
    finally:
        database.initialize(real)
    rec._replay_once()  # as the replay loop does every 5 s
    if back_first == "database":  # and the disk is still full: written straight to it
        assert rec.flush(5) and rec.journaled == 0
    got = {r.uid: r for r in rows()}
    assert sorted(got) == sorted(ex.uid for ex in calls)
    assert {(r.status, r.completion_tokens) for r in got.values()} == {("completed", 2)}
    assert metrics.RECORDS_HELD._value.get() == 0
    assert metrics.RECORDS_LOST._value.get() == lost


def test_past_the_hold_bound_a_batch_is_lost_counted_and_the_worker_goes_on(
    rec: Recorder, key_id: int, database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = database.obj
    lost = metrics.RECORDS_LOST._value.get()
    _disk_full(rec, monkeypatch)
    monkeypatch.setattr(held, "HOLD_BYTES", 2000)  # a record is about 800
    database.initialize(unreachable(database_url))
    try:
        for _ in range(3):
            ex = exchange(key_id)
            ex.finish("completed")
            rec.record(ex)
        assert rec.flush(5), "the batch past the limit is let go"
    finally:
        database.initialize(real)
    assert metrics.RECORDS_LOST._value.get() == lost + 3
    later = exchange(key_id)
    later.finish("completed")
    rec._replay_once()
    rec.record(later)
    assert rec.flush(5) and [r.uid for r in rows()] == [later.uid]


def test_a_row_the_database_refuses_is_set_aside_and_the_rest_are_written(
    rec: Recorder, key_id: int
) -> None:
    good, poison, also_good = (
        exchange(key_id),
        exchange(key_id + 999),
        exchange(key_id),
    )  # no such key
    for ex in (good, poison, also_good):
        ex.finish("completed")
        rec.record(ex)
    assert rec.flush(5)
    assert sorted(r.uid for r in rows()) == sorted([good.uid, also_good.uid])
    (refused,) = rec.journal.directory.glob("refused-*.jsonl")
    assert poison.uid in refused.read_text()
    assert not rec._journaling, "one bad row must not divert every later write to the journal"
    later = exchange(key_id)
    later.finish("completed")
    rec.record(later)
    assert rec.flush(5)
    assert later.uid in {r.uid for r in rows()}


def test_with_the_disk_full_a_refused_row_waits_alone_and_the_rest_are_written(
    rec: Recorder, key_id: int, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A refused row cannot be set aside while the disk is full: it waits in memory,
    alone. The rows after it in its batch are written meanwhile, not held with it. Its
    refusal is logged once, not at every try."""
    refused, lost = metrics.RECORDS_REFUSED._value.get(), metrics.RECORDS_LOST._value.get()
    good, poison, also_good = exchange(key_id), exchange(key_id + 999), exchange(key_id)
    tries = _disk_full(rec, monkeypatch)
    for ex in (good, poison, also_good):  # no switch in between: one batch
        ex.finish("completed")
        rec.record(ex)
    wait_until(lambda: len(tries) >= 3, timeout=5)  # set aside, tried again
    assert sorted(r.uid for r in rows()) == sorted([good.uid, also_good.uid])
    later = exchange(key_id)  # written meanwhile, by whichever writer takes it
    later.finish("completed")
    rec.record(later)
    wait_until(lambda: later.uid in {r.uid for r in rows()}, timeout=5)
    tried = len(tries)
    wait_until(lambda: len(tries) >= tried + 3, timeout=5)
    said = [r.getMessage() for r in caplog.records]
    refusals = [m for m in said if "refused; set aside" in m]
    assert len(refusals) == 1 and poison.uid in refusals[0]
    assert not [m for m in said if "taken again" in m], "a batch written is no release"
    assert not rec.flush(0.2), "the refused row has nowhere to go yet"
    assert rec.backlog() == 1 and metrics.RECORDS_HELD._value.get() == 1
    monkeypatch.undo()  # room on the disk again
    assert rec.flush(5)
    assert set_aside(rec.journal.directory) == [poison.uid]
    assert len(rows()) == 3 and not rec._journaling
    assert metrics.RECORDS_REFUSED._value.get() == refused + 1
    assert metrics.RECORDS_HELD._value.get() == 0
    assert metrics.RECORDS_LOST._value.get() == lost


def set_aside(journal_dir: Path) -> list[str]:
    """The uids of the rows set aside as refused, as many times as each is there."""
    return [
        json.loads(line)["uid"]
        for path in journal_dir.glob("refused-*.jsonl")
        for line in path.read_text().splitlines()
    ]


def test_refused_rows_are_written_once_their_cause_is_fixed(rec: Recorder, key_id: int) -> None:
    """The database refuses two calls' rows (their key is not there yet): set aside
    and counted. One key comes, and the operator's replay writes its call's row; the
    other's is refused again and set aside again, once."""
    refused = metrics.RECORDS_REFUSED._value.get()
    fixed, still = exchange(key_id + 999), exchange(key_id + 1999)
    for ex in (fixed, still):
        ex.finish("completed", usage={"input_tokens": 3, "output_tokens": 1})
        rec.record(ex)
    assert rec.flush(5) and rows() == []
    assert sorted(set_aside(rec.journal.directory)) == sorted([fixed.uid, still.uid])
    assert metrics.RECORDS_REFUSED._value.get() == refused + 2
    with database.connection_context():
        ApiKey.create(id=key_id + 999, key_hash="f" * 64, key_hint="sk-…fix")
    done = cli.replay_refused(rec.journal)
    assert (done.written, done.refused, done.stopped) == (1, 1, None)
    (row,) = rows()
    assert (row.uid, row.status, row.prompt_tokens) == (fixed.uid, "completed", 3)
    assert set_aside(rec.journal.directory) == [still.uid]
    assert cli.replay_refused(rec.journal).written == 0, "nothing twice"
    assert [r.uid for r in rows()] == [fixed.uid]


def test_a_replay_of_refused_rows_the_database_leaves_loses_none(
    rec: Recorder, key_id: int, database_url: str
) -> None:
    """The database goes away under the replay: the rows not written, in the file it
    was at and the files after it, stay set aside, each once; a later replay writes them."""
    calls = [exchange(key_id + 999) for _ in range(3)]
    for i, ex in enumerate(calls):
        ex.finish("completed")
        rec.record(ex)
        assert rec.flush(5)
        if i == 1:  # two files: the first as if another process's
            rec.journal.own_path("refused").rename(rec.journal.directory / "refused-1.jsonl")
    with database.connection_context():
        ApiKey.create(id=key_id + 999, key_hash="f" * 64, key_hint="sk-…fix")
    with away(unreachable(database_url)):
        done = cli.replay_refused(rec.journal)
    assert done.written == 0 and done.stopped is not None
    assert sorted(set_aside(rec.journal.directory)) == sorted(ex.uid for ex in calls)
    done = cli.replay_refused(rec.journal)
    assert (done.written, done.refused, done.stopped) == (3, 0, None)
    assert sorted(r.uid for r in rows()) == sorted(ex.uid for ex in calls)
    assert set_aside(rec.journal.directory) == []


def test_drain_journals_what_it_could_not_write_in_time(
    rec: Recorder, key_id: int, database_url: str
) -> None:
    rec._group.kill()  # no writers: nothing gets written in time
    ex = exchange(key_id)
    ex.finish("completed")
    rec.record(ex)
    assert not rec.drain(0.05)
    (path,) = rec.journal.directory.glob("journal-*.jsonl")
    assert ex.uid in path.read_text()
    rec._replay_once()
    assert [r.status for r in rows()] == ["completed"]


def test_calls_that_end_close_together_share_one_write(
    rec: Recorder, key_id: int, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """A record does not wake a writer for itself: finals of one interval share a write."""
    rec._group.kill()
    rec = make_recorder(tmp_path, RECORDER_WRITERS=4, RECORDER_INTERVAL=0.5)
    writes: list[int] = []
    real = recorder_module.write_rows
    monkeypatch.setattr(
        recorder_module, "write_rows", lambda rows, *a: (writes.append(len(rows)), real(rows, *a))
    )
    for _ in range(30):
        ex = exchange(key_id)
        ex.finish("completed")
        rec.record(ex)
        gevent.sleep(0)  # calls ending one after the other, the writers free to run
    assert rec.flush(5)
    rec._group.kill()
    assert writes == [30] and len(rows()) == 30


def test_drain_journals_a_batch_whose_snapshots_are_being_taken(
    rec: Recorder, key_id: int, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A writer hands the worker back between slices of a big batch's snapshots: a drain
    then must journal the whole batch, the snapshots not taken yet too."""
    rec._group.kill()
    rec = make_recorder(tmp_path, RECORDER_WRITERS=1, RECORDER_INTERVAL=0)
    taken, go_on = [], gevent.event.Event()
    real = recorder_module._snapshots

    def snapshots(batch: list[Exchange], ahead: dict[str, dict]) -> list[dict]:
        taken.append(len(batch))
        if len(taken) == 2:
            go_on.wait(10)  # the second slice: the writer is held between two slices
        return real(batch, ahead)

    monkeypatch.setattr(recorder_module, "_snapshots", snapshots)
    calls = [exchange(key_id) for _ in range(3 * recorder_module.SLICE)]
    for ex in calls:
        ex.finish("completed")
        rec.record(ex)
    wait_until(lambda: len(taken) == 2, timeout=5)
    assert not rec.drain(0)  # the process exits: what the writer holds must not be lost
    # Killed while still held: let go first, it could be mid-query when the fixture
    # closes the pool, and libev aborts the process.
    rec._group.kill()
    go_on.set()
    (path,) = rec.journal.directory.glob("journal-*.jsonl")
    journaled = {json.loads(line)["uid"] for line in path.read_text().splitlines()}
    assert journaled == {ex.uid for ex in calls}


class Gate:
    """Holds the first write of ``uid`` in flight until released (a slow database)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, uid: str) -> None:
        self.entered, self.release = gevent.event.Event(), gevent.event.Event()
        real = recorder_module.write_rows

        def write(rows: list[dict], *args: object) -> None:
            if any(r["uid"] == uid for r in rows) and not self.entered.is_set():
                self.entered.set()
                self.release.wait(10)
            real(rows, *args)

        monkeypatch.setattr(recorder_module, "write_rows", write)


@pytest.mark.parametrize("writers", [1, 4])
def test_a_final_snapshot_queued_while_the_pending_one_is_being_written_is_written(
    rec: Recorder, key_id: int, monkeypatch: pytest.MonkeyPatch, writers: int, tmp_path: Path
) -> None:
    """Defect 2: the write of the pending snapshot is held in flight, for sure, while
    the final one arrives; then it is let go."""
    rec._group.kill()
    rec = make_recorder(tmp_path, RECORDER_WRITERS=writers, RECORDER_LINGER=0)
    ex = exchange(key_id)
    gate = Gate(monkeypatch, ex.uid)
    rec.record(ex)
    assert gate.entered.wait(5), "the pending write never started"
    ex.finish("completed", usage={"input_tokens": 1, "output_tokens": 2})
    rec.record(ex)  # queued while the pending snapshot is in flight
    gevent.sleep(0.1)  # every other writer gets its chance to take it out of order
    gate.release.set()
    assert rec.flush(5), "the final snapshot was never written"
    assert [(r.status, r.completion_tokens) for r in rows()] == [("completed", 2)]
    rec._group.kill()


def test_drain_journals_a_final_snapshot_queued_behind_a_write_in_flight(
    rec: Recorder, key_id: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Defect 1: at shutdown the database is slow; the call's final state must not be lost."""
    ex = exchange(key_id)
    gate = Gate(monkeypatch, ex.uid)
    rec.linger = 0
    rec.record(ex)
    assert gate.entered.wait(5)
    ex.finish("completed", usage={"input_tokens": 1, "output_tokens": 2})
    rec.record(ex)
    assert not rec.drain(0.05)
    (path,) = rec.journal.directory.glob("journal-*.jsonl")
    journaled = [json.loads(line) for line in path.read_text().splitlines()]
    assert [r["status"] for r in journaled if r["uid"] == ex.uid][-1] == "completed"
    gate.release.set()  # the slow pending write lands after all...
    gevent.sleep(0.2)
    rec._replay_once()  # ...and the journal's final state still wins
    assert [(r.status, r.completion_tokens) for r in rows()] == [("completed", 2)]


def test_drain_journals_a_call_being_written_once(
    rec: Recorder, key_id: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Its row is in the write's hands already: a second snapshot of it doubled what the
    exit had to encode and fsync, the whole answer twice."""
    ex = exchange(key_id)
    ex.finish("completed")
    gate = Gate(monkeypatch, ex.uid)
    rec.record(ex)
    assert gate.entered.wait(5)
    assert not rec.drain(0)
    (path,) = rec.journal.directory.glob("journal-*.jsonl")
    journaled = [json.loads(line) for line in path.read_text().splitlines()]
    assert [(r["uid"], r["status"]) for r in journaled] == [(ex.uid, "completed")]
    gate.release.set()
    gevent.sleep(0.2)
    rec._replay_once()
    assert [r.status for r in rows()] == ["completed"]


def test_records_journaled_in_an_outage_are_synced_beside_the_loop(
    rec: Recorder, key_id: int, database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An outage leaves the calls unaffected (SPEC rule 8): every batch then goes to the
    journal, whose sync, on the loop, stopped every call of the worker for as long as
    the disk took."""
    slow_disk(monkeypatch)
    with away(unreachable(database_url)), watch_loop() as watch:
        for _ in range(3):
            ex = exchange(key_id)
            ex.finish("completed")
            rec.record(ex)
        assert rec.flush(5)
    assert rec.journaled == 3
    assert_kept_turning(watch)


def test_drain_has_its_journal_synced_before_anything_else_runs(
    rec: Recorder, key_id: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """At exit a drain may run in the worker's shutdown guard, which the worker leaves
    behind as it exits: the rows it took from the queue are on disk before it lets
    anything else run, not waiting for a sync beside a loop about to end."""
    rec._group.kill()  # no writers: the drain journals the call
    synced = slow_disk(monkeypatch)
    ex = exchange(key_id)
    ex.finish("completed")
    rec.record(ex)
    guard = gevent.spawn(rec.drain, 0)
    with gevent.Timeout(5, AssertionError("the drain never ended")):
        while not guard.dead:  # the exit, between two turns of the guard
            assert rec.backlog() or synced, "the drain let the exit go, its rows not synced"
            gevent.sleep(0)
    assert guard.value is False
    (path,) = rec.journal.directory.glob("journal-*.jsonl")
    assert ex.uid in path.read_text()


def test_a_stale_pending_snapshot_never_overwrites_a_swept_row(rec: Recorder, key_id: int) -> None:
    """Defect 3: a swept row is final too; only the call's own final state replaces it."""
    ex = exchange(key_id)
    write_rows([snapshot(ex)])
    with database.connection_context():
        Completion.update(status="failed", error="orphaned", swept=True).execute()
    write_rows([snapshot(ex)])  # a stale pending snapshot, replayed late
    (row,) = rows()
    assert (row.status, row.error, row.swept) == ("failed", "orphaned", True)
    ex.finish("completed", usage={"input_tokens": 1, "output_tokens": 1})
    write_rows([snapshot(ex)])  # its process was alive after all: the truth wins
    (row,) = rows()
    assert (row.status, row.error, row.swept) == ("completed", None, False)


def test_a_writer_survives_an_unexpected_error_and_sets_the_row_aside(
    database_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Defect 6: anything but a DatabaseError used to kill the (only, on SQLite) writer."""
    database.initialize(open_database(database_url))
    rec = make_recorder(tmp_path, RECORDER_WRITERS=1)
    real = recorder_module.upsert_records
    poison: set[str] = set()

    def upsert(rows: list[dict], touch: dict | None = None) -> list[dict]:
        if poison & {r["uid"] for r in rows}:
            raise TypeError("a bug, not a database error")
        return real(rows, touch)

    monkeypatch.setattr(recorder_module, "upsert_records", upsert)
    try:
        with database.connection_context():
            key = ApiKey.create(key_hash="w" * 64, key_hint="sk-…w").id
        good, bad = exchange(key), exchange(key)
        poison.add(bad.uid)
        for ex in (good, bad):
            ex.finish("completed")
            rec.record(ex)
        assert rec.flush(5), "the writer died"
        assert [r.uid for r in rows()] == [good.uid]
        (refused,) = rec.journal.directory.glob("refused-*.jsonl")
        assert bad.uid in refused.read_text()
        later = exchange(key)
        later.finish("completed")
        rec.record(later)
        assert rec.flush(5) and later.uid in {r.uid for r in rows()}
    finally:
        rec._group.kill()
        pools.release(database.obj)


def test_replay_sets_last_seen_to_when_the_calls_were_made(
    rec: Recorder, key_id: int, database_url: str
) -> None:
    """Defect 7: a replay an hour after an outage must not say the key was used just now."""
    an_hour_ago = utcnow() - timedelta(hours=1)
    ex = exchange(key_id, created_at=an_hour_ago)
    ex.finish("completed")
    rec.journal.append([snapshot(ex)])
    rec._replay_once()
    with database.connection_context():
        assert ApiKey.get_by_id(key_id).last_seen == an_hour_ago
        # An older call replayed later never moves it back.
        older = exchange(key_id, created_at=an_hour_ago - timedelta(hours=1))
        older.finish("completed")
        write_rows([snapshot(older)])
        assert ApiKey.get_by_id(key_id).last_seen == an_hour_ago


def test_every_row_names_the_process_that_recorded_it(rec: Recorder, key_id: int) -> None:
    rec.record(exchange(key_id))
    assert rec.flush(5)
    (row,) = rows()
    assert row.owner == identity() and row.owner.endswith(f":{os.getpid()}")


def test_text_the_database_cannot_store_is_replaced_where_rows_are_taken(
    rec: Recorder, key_id: int
) -> None:
    # An upstream's answer and error may hold a lone surrogate or NUL (valid JSON
    # escapes). PostgreSQL refuses both: the row would be refused and lost.
    ex = exchange(key_id, stream=True)
    ex.attempt("p\x00", "m", "http", 5, error="HTTP 500: \ud800 \x00")
    ex.finish(
        "failed",
        output=[{"role": "assistant", "content": "a\ud800b\x00c", "tool_calls": [{"\x00": 1}]}],
        usage={"input_tokens": 1, "output_tokens": 2},
        error="upstream said \udfff\x00",
    )
    row = snapshot(ex)
    assert row["completion"][0]["content"] == "a\ufffdb\ufffdc"
    assert row["completion"][0]["tool_calls"] == [{"\ufffd": 1}]
    assert row["error"] == "upstream said \ufffd\ufffd"
    assert row["attempts"][0]["provider"] == "p\ufffd"
    assert row["created_at"] == ex.created_at  # only text is touched
    rec.record(ex)
    assert rec.flush(5)
    (stored,) = rows()
    assert (stored.status, stored.error) == ("failed", "upstream said \ufffd\ufffd")
    assert stored.completion[0]["content"] == "a\ufffdb\ufffdc"
    assert ex.output[0]["content"] == "a\ud800b\x00c"  # the call's own facts are left as they are


@pytest.mark.parametrize("order", ["source first", "replay first", "one batch"])
def test_a_replay_is_linked_to_its_source_whichever_is_written_first(
    rec: Recorder, key_id: int, order: str
) -> None:
    source = exchange(key_id, req_id="job-1")
    source.finish("completed", output=[{"role": "assistant", "content": "hi"}])
    source.answer = {"content": [{"type": "text", "text": "hi"}]}
    hit = exchange(key_id, source_uid=source.uid)
    hit.finish("cache_hit")
    with database.connection_context():
        if order == "one batch":
            write_rows([snapshot(hit), snapshot(source)])
        else:
            first, second = (source, hit) if order == "source first" else (hit, source)
            write_rows([snapshot(first)])
            write_rows([snapshot(second)])
    by_uid = {r.uid: r for r in rows()}
    assert by_uid[hit.uid].source_completion_id == by_uid[source.uid].id
    assert by_uid[source.uid].source_completion_id is None
    assert by_uid[source.uid].cached_response == source.answer


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_a_sqlite_write_waits_for_another_process_lock_without_freezing_the_worker(
    rec: Recorder, key_id: int, database_url: str
) -> None:
    """SQLite's own busy handler sleeps in C: the worker's calls would stop meanwhile."""
    ex = exchange(key_id)
    ex.finish("completed")
    path = database_url.removeprefix("sqlite:///")
    with sqlite_lock_held(path, 0.5), watch_loop() as watch:  # another worker's batch
        write_rows([snapshot(ex)])
    assert watch.took > 0.3, "the lock was not held: the test tests nothing"
    assert watch.longest < 0.1, f"the worker froze for {watch.longest:.3f} s"
    ((status, uid),) = [(r.status, r.uid) for r in rows()]
    assert (status, uid) == ("completed", ex.uid)


def due_count() -> int:
    with database.connection_context():
        return database.execute_sql("SELECT count(*) FROM completions_fts_due").fetchone()[0]


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_indexing_cut_short_by_another_process_lock_is_one_line_not_a_traceback(
    rec: Recorder, key_id: int, database_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Another process holding SQLite's write lock past DB_TIMEOUT is an outage, as the
    record writes' own timeout is: the text stays due and the log says why, without a
    traceback (the chaos run with a 14 s lock found one in the worker's log)."""
    ex = exchange(key_id)
    ex.finish("completed")
    write_rows([snapshot(ex)])
    assert due_count() == 1
    rec.timeout = 0.3
    path = database_url.removeprefix("sqlite:///")
    with sqlite_lock_held(path, 1.0), caplog.at_level("WARNING", logger="gateway.recorder"):
        rec._index_due.index(rec.timeout)
    assert due_count() == 1, "the text stays due"
    (said,) = [r for r in caplog.records if "full-text index" in r.getMessage()]
    assert said.exc_info is None, "a traceback for an outage"
    assert "timed out" in said.getMessage()


def heavy_calls(key_id: int, count: int) -> list[Exchange]:
    """Ended calls with about 20 KB of prompt each, no two alike: work for an index."""
    calls = []
    for i in range(count):
        text = varied_text(i, 2500)
        ex = Exchange(
            api_key_id=key_id,
            model="m",
            api_format="openai-chat",
            prompt={"messages": [{"role": "user", "content": text}]},
        )
        ex.finish("completed")
        calls.append(ex)
    return calls


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_sqlite_indexing_a_heavy_batch_does_not_freeze_the_worker(
    rec: Recorder, key_id: int
) -> None:
    """SQLite's own work on a batch (rows, indexes, then the lot's text into the
    full-text trigram index and the commit that flushes and merges it) runs beside the
    loop: the worker's calls go on."""
    calls = heavy_calls(key_id, 150)
    with watch_loop() as watch:
        write_rows([snapshot(ex) for ex in calls])
        index_all_due()  # the text the batch left due: 3 MB, two lots
        assert due_count() == 0
    assert watch.took > 0.2, f"the batch took {watch.took:.3f} s: too light to show anything"
    # On a busy machine the loop's turns come late; frozen, it would miss them all.
    assert watch.longest < watch.took / 3, f"froze {watch.longest:.3f} s of {watch.took:.3f}"
    assert len(rows()) == 150


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_a_write_of_this_worker_meanwhile_waits_only_for_the_batch(
    rec: Recorder, key_id: int
) -> None:
    """While a heavy lot (150 calls' text into the index) is with SQLite, the worker's
    other greenlets run, and one of them may write: it waits for the lock in SQLite's
    busy handler, on the loop. The lot must not need the loop to end (it would wait out
    that handler: 5 s, then fail)."""
    calls = heavy_calls(key_id, 150)

    def admin_write() -> int:
        with database.connection_context():
            return ApiKey.create(key_hash="a" * 64, key_hint="sk-…adm").id

    write_rows([snapshot(ex) for ex in calls])  # their text is due: the heavy part is next
    started = time.monotonic()
    other = gevent.spawn_later(0.05, admin_write)
    index_all_due()
    assert due_count() == 0
    other.join(10)
    took = time.monotonic() - started
    assert other.successful(), other.exception
    assert took < 2.5, f"{took:.1f} s: the two writes waited for each other"
    assert len(rows()) == 150


def test_each_snapshot_is_written_ahead_and_the_lines_go_once_the_database_has_it(
    rec: Recorder, key_id: int, tmp_path: Path
) -> None:
    gate = gevent.event.Event()  # the database "hangs": the calls' records wait in memory
    real = recorder_module.upsert_records
    recorder_module.upsert_records = lambda *a, **k: (gate.wait(), real(*a, **k))[1]
    try:
        ex = exchange(key_id, stream=True)
        rec.record(ex)  # pending: its line says so, without the prompt
        ex.finish("completed", output=[{"role": "assistant", "content": "hi"}], usage={})
        rec.record(ex)
        (path,) = (tmp_path / "journal").glob("ahead-*")
        pending, final = (json.loads(line) for line in path.read_text().splitlines())
        assert (pending["uid"], pending["status"], "prompt" in pending) == (
            ex.uid,
            "pending",
            False,
        )
        assert (final["status"], final["prompt"], final["owner"]) == (
            "completed",
            {"messages": []},
            identity(),
        )
    finally:
        gate.set()
        recorder_module.upsert_records = real
    assert rec.ahead is not None
    rec.ahead.TRIM = 1  # cut back past a byte, not 256 KB
    assert rec.flush(5)
    wait_until(lambda: path.read_text() == "")  # all written: no line is needed


def test_a_dead_process_s_write_ahead_lines_are_written_by_a_live_one(
    rec: Recorder, key_id: int, tmp_path: Path
) -> None:
    answered, cut = exchange(key_id), exchange(key_id)
    answered.finish("completed", output=[{"role": "assistant", "content": "hi"}], usage={})
    lines = [ahead_row(cut), ahead_row(answered)]
    proc = subprocess.Popen(["true"])
    proc.wait()
    dead = tmp_path / "journal" / f"ahead-1-{proc.pid}.jsonl"
    dead.parent.mkdir(exist_ok=True)
    dead.write_text("".join(json.dumps(journal_module._jsonable(r)) + "\n" for r in lines))
    assert rec.journal.replay(rec._write_ahead, prefix="ahead") == 2
    found = {row.uid: row.status for row in rows()}
    assert found == {answered.uid: "completed", cut.uid: "pending"}  # the sweeper's next
    assert not dead.exists()


def test_a_batch_a_deadlock_gave_up_is_written_not_journaled(
    rec: Recorder, database_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    # The batch's transaction moves its keys' last_seen in key order; another holding the
    # second key and asking for the first makes it a deadlock's victim (real, PostgreSQL).
    # It was taken for an outage: 'database unreachable', the batch journaled, the
    # database marked unreachable; it answered, and the batch, written again, goes in.
    import psycopg

    from gateway import db

    if not db.is_postgres():
        pytest.skip("PostgreSQL's deadlocks")
    with database.connection_context():
        first, second = (ApiKey.create(key_hash=c * 64, key_hint="sk-…test").id for c in "kl")
    calls = [exchange(first), exchange(second)]
    for ex in calls:
        ex.finish("completed")
        rec.record(ex)
    caplog.set_level(logging.INFO, logger="gateway.recorder")
    with psycopg.connect(database_url, autocommit=True) as other:
        other.execute("BEGIN")
        other.execute("UPDATE api_keys SET comment = 'held' WHERE id = %s", (second,))
        flushed = gevent.spawn(rec.flush, 30)
        wait_until(lambda: pg_lock_awaited(other))
        # Had this side lost the deadlock, DeadlockDetected would be raised here.
        other.execute("UPDATE api_keys SET comment = 'held' WHERE id = %s", (first,))
        other.execute("COMMIT")
        assert flushed.get(timeout=30)
    assert "a write was given up (deadlock); written again" in caplog.text
    assert sorted(r.uid for r in rows()) == sorted(ex.uid for ex in calls)
    assert rec.journaled == 0 and not rec._journaling
    assert db.reachable()
