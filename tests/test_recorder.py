"""The recorder: ordering, coalescing, finals never undone, the journal, the sweeper."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import peewee
import pytest
from flask import Flask

from gateway import metrics
from gateway.config import DEFAULTS
from gateway.db import database, open_database
from gateway.exchange import Exchange
from gateway.models import ApiKey, Completion, utcnow
from gateway.recorder import SWEPT_ERROR, Recorder, snapshot, write_rows


@pytest.fixture
def rec(database_url: str, tmp_path: Path):  # type: ignore[no-untyped-def]
    database.initialize(open_database(database_url))
    app = Flask("recorder-test")
    app.config.update(DEFAULTS)
    app.config.update(JOURNAL_DIR=str(tmp_path / "journal"), SWEEP_INTERVAL=0, CALL_TIMEOUT=60)
    recorder = Recorder()
    recorder.init_app(app)
    yield recorder
    recorder.flush(5)
    recorder._group.kill()
    if isinstance(database.obj, peewee.PostgresqlDatabase):
        database.obj.close_all()


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


def _unreachable(database_url: str) -> peewee.Database:
    if database_url.startswith("sqlite"):
        return peewee.SqliteDatabase("/proc/no-such-dir/gateway.db", autoconnect=False)
    return open_database("postgresql://postgres@127.0.0.1:1/nowhere")


def test_database_down_journals_then_replays_everything(
    rec: Recorder, key_id: int, database_url: str
) -> None:
    real = database.obj
    first, second = exchange(key_id), exchange(key_id)
    database.initialize(_unreachable(database_url))
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
    assert not list(rec.journal.directory.glob("*.jsonl"))
    assert not rec._journaling and metrics.JOURNAL_DEPTH._value.get() == 0
    # Back to direct writes.
    third = exchange(key_id)
    third.finish("completed")
    rec.record(third)
    assert rec.flush(5)
    assert rec.writes == 1 and len(rows()) == 3


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


def test_sweeper_finalises_orphans_and_a_late_final_still_lands(rec: Recorder, key_id: int) -> None:
    orphan, live = exchange(key_id), exchange(key_id)
    write_rows([snapshot(orphan), snapshot(live)])
    with database.connection_context():
        Completion.update(updated_at=utcnow() - timedelta(hours=1)).where(
            Completion.uid == orphan.uid
        ).execute()
    assert rec.sweep() == 1
    got = {r.uid: r for r in rows()}
    assert (got[orphan.uid].status, got[orphan.uid].error, got[orphan.uid].swept) == (
        "failed",
        SWEPT_ERROR,
        True,
    )
    assert got[live.uid].status == "pending"
    # The process was alive after all (its database was away): its final write wins.
    orphan.finish("completed", usage={"input_tokens": 1, "output_tokens": 1})
    write_rows([snapshot(orphan)])
    assert {r.uid: r.status for r in rows()}[orphan.uid] == "completed"


def test_a_final_state_queued_while_its_pending_write_is_in_flight_is_written(
    database_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Several writers: one is mid-write with the pending snapshot when the final arrives."""
    import gevent

    from gateway import recorder as recorder_module

    real_write = recorder_module.write_rows

    def slow_write(rows: list[dict], **kwargs: object) -> None:
        gevent.sleep(0.05)  # a PostgreSQL round trip: other writers run meanwhile
        real_write(rows, **kwargs)

    monkeypatch.setattr(recorder_module, "write_rows", slow_write)
    database.initialize(open_database(database_url))
    app = Flask("recorder-test")
    app.config.update(DEFAULTS)
    app.config.update(JOURNAL_DIR=str(tmp_path / "journal"), SWEEP_INTERVAL=0, RECORDER_WRITERS=4)
    rec = Recorder()
    rec.init_app(app)
    try:
        with database.connection_context():
            key = ApiKey.create(key_hash="k" * 64, key_hint="sk-…k").id
        ex = exchange(key)
        rec.record(ex)
        gevent.sleep(0.01)  # a writer is now inside slow_write with the pending snapshot
        ex.finish("completed")
        rec.record(ex)
        assert rec.flush(2), "the final snapshot was never written"
        assert [r.status for r in rows()] == ["completed"]
    finally:
        rec._group.kill()
        if isinstance(database.obj, peewee.PostgresqlDatabase):
            database.obj.close_all()


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
