"""Retention: old records and server logs go, old bodies go, numbers stay, one pruner at a time.

On both backends; PostgreSQL also drops whole month partitions, makes them ahead, and
moves rows the DEFAULT partition caught into their month's new partition.
"""

from __future__ import annotations

import json
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from datetime import datetime, timedelta
from pathlib import Path

import gevent
import peewee
import pytest
from flask import Flask

from gateway import callrows, fulltext, ledger, partitions
from gateway import journal as journal_module
from gateway import recorder as recorder_module
from gateway.config import DEFAULTS
from gateway.db import database, is_postgres, open_database
from gateway.exchange import Exchange
from gateway.models import ApiKey, Completion, Embedding, RetiredSpend, SrvLog, utcnow
from gateway.recorder import Recorder
from gateway.retention import Retention
from tests import pools
from tests.loopwatch import watch_loop
from tests.servers import varied_text, wait_until

NOW = datetime(2027, 3, 10, 12, 0)


def make_retention(tmp_path: Path, clock: datetime = NOW, **config: object) -> Retention:
    app = Flask("retention-test")
    app.config.update(DEFAULTS)
    app.config.update(RETENTION_PAUSE=0, RETENTION_LOCK_FILE=str(tmp_path / "r.lock"))
    # No background loop: it would run later, with this clock, on another test's database.
    app.config.update(RETENTION_INTERVAL=0)
    app.config.update(config)
    job = Retention(clock=lambda: clock)
    job.init_app(app)
    return job


@pytest.fixture
def dbase(database_url: str) -> Iterator[peewee.Database]:
    database.initialize(open_database(database_url))
    yield database
    pools.release(database.obj)


@pytest.fixture
def key_id(dbase: peewee.Database) -> int:
    with database.connection_context():
        return ApiKey.create(key_hash=uuid.uuid4().hex * 2, key_hint="sk-…test").id


def add_old_calls(
    key_id: int, first: datetime, count: int, text: Callable[[int], str] | None = None
) -> None:
    """``count`` completed calls a second apart from ``first``, call i asking ``text(i)``
    (no prompt without ``text``)."""
    with database.connection_context():
        rows = [
            {
                "uid": uuid.uuid4().hex,
                "api_key": key_id,
                "model": "m",
                "api_format": "openai-chat",
                "status": "completed",
                "created_at": first + timedelta(seconds=i),
                "updated_at": first + timedelta(seconds=i),
            }
            | ({"prompt": {"messages": [{"role": "user", "content": text(i)}]}} if text else {})
            for i in range(count)
        ]
        for start in range(0, count, 500):
            Completion.insert_many(rows[start : start + 500]).execute()


def add_call(key_id: int, when: datetime, text: str = "hello", **fields: object) -> Completion:
    with database.connection_context():
        values: dict[str, object] = dict(
            uid=uuid.uuid4().hex,
            api_key=key_id,
            model="m",
            api_format="openai-chat",
            status="completed",
            prompt={"messages": [{"role": "user", "content": f"ask {text}"}]},
            completion=[{"role": "assistant", "content": f"answer {text}"}],
            cached_response={"choices": [{"message": {"content": f"answer {text}"}}]},
            delivered={"events": 3, "text": f"answer {text}"},
            prompt_tokens=11,
            completion_tokens=7,
            usage={"input_tokens": 11, "output_tokens": 7},
            cost={"total": 0.25, "currency": "USD"},
            cost_nanos=250_000_000,
            ttft=120,
            duration=900,
            created_at=when,
            updated_at=when,
        )
        return Completion.create(**{**values, **fields})


def uids() -> set[str]:
    with database.connection_context():
        return {uid for (uid,) in Completion.select(Completion.uid).tuples()}


def test_records_and_server_logs_past_the_retention_are_gone(key_id: int, tmp_path: Path) -> None:
    old = add_call(key_id, NOW - timedelta(days=45))
    edge = add_call(key_id, NOW - timedelta(days=29))
    new = add_call(key_id, NOW - timedelta(hours=1))
    with database.connection_context():
        for days in (45, 1):
            Embedding.create(
                uid=uuid.uuid4().hex,
                api_key=key_id,
                model="e",
                input=["x"],
                status="completed",
                created_at=NOW - timedelta(days=days),
            )
            SrvLog.create(message=f"{days} days ago", created_at=NOW - timedelta(days=days))
    job = make_retention(tmp_path, RETENTION_DAYS=30, RETENTION_BATCH=1)
    done = job.run()
    assert done is not None and done["completions"] + len(done.get("partitions_dropped", [])) >= 1
    assert uids() == {edge.uid, new.uid}
    with database.connection_context():
        assert [e.created_at for e in Embedding.select()] == [NOW - timedelta(days=1)]
        assert [s.message for s in SrvLog.select()] == ["1 days ago"]
        # A full-text search finds nothing of the deleted record.
        assert (
            not Completion.select()
            .where(fulltext.condition(Completion, ["hello"]))
            .where(Completion.uid == old.uid)
            .exists()
        )


def test_a_month_s_spend_outlives_its_records(key_id: int, tmp_path: Path) -> None:
    """Retention shorter than a month deletes records of the month in progress: what
    they cost stays in the budget's figure, whether the delete took them in one batch
    or several; last month's, pending and unpriced calls are not kept."""
    with database.connection_context():
        other = ApiKey.create(key_hash=uuid.uuid4().hex * 2, key_hint="sk-…othr").id
    add_call(key_id, NOW - timedelta(days=9, seconds=3))  # March, $0.25 each
    add_call(key_id, NOW - timedelta(days=8, seconds=2))
    add_call(other, NOW - timedelta(days=7, seconds=1), cost_nanos=1)
    add_call(key_id, NOW - timedelta(days=6), status="pending", cost_nanos=None, cost=None)
    add_call(key_id, NOW - timedelta(days=6), cost_nanos=None, cost=None)
    add_call(key_id, NOW - timedelta(days=12))  # February: no budget reads it any more
    kept = add_call(key_id, NOW - timedelta(days=1))
    with database.connection_context():
        Embedding.create(
            uid=uuid.uuid4().hex, api_key=key_id, model="e", input=["x"], status="completed",
            cost_nanos=40, created_at=NOW - timedelta(days=8),
        )  # fmt: skip
        before = ledger.month_spend(NOW)
        # A past month's retired spend is never read again: the round drops it.
        RetiredSpend.insert(api_key_id=key_id, month="2027-01", nanos=5).execute()
    assert before == {key_id: 3 * 250_000_000 + 40, other: 1}
    job = make_retention(tmp_path, RETENTION_DAYS=5, RETENTION_BATCH=2)
    done = job.run()
    assert done is not None and done["embeddings"] == 1
    assert uids() == {kept.uid}  # on PostgreSQL February's went with its partition
    with database.connection_context():
        assert ledger.month_spend(NOW) == before
        assert ledger.month_spend(NOW, other) == {other: 1}
        assert {(r.api_key_id, r.month, r.nanos) for r in RetiredSpend.select()} == {
            (key_id, "2027-03", 2 * 250_000_000 + 40),
            (other, "2027-03", 1),
        }
    # A second round deletes nothing more and adds nothing twice.
    assert make_retention(tmp_path, RETENTION_DAYS=5).run() is not None
    with database.connection_context():
        assert ledger.month_spend(NOW) == before


def test_the_longest_retention_the_settings_take_deletes_nothing(
    key_id: int, tmp_path: Path
) -> None:
    """A billion days (what the settings allow) reaches before year 1: the round runs,
    and nothing is that old. It raised OverflowError every round before."""
    first = add_call(key_id, datetime(1, 1, 2))
    job = make_retention(tmp_path, RETENTION_DAYS=10**9, RETENTION_BODY_DAYS=10**9)
    done = job.run()
    assert done is not None and "completions" not in done
    assert uids() == {first.uid}


def test_body_retention_keeps_the_numbers_and_the_cost(key_id: int, tmp_path: Path) -> None:
    old = add_call(key_id, NOW - timedelta(days=10), text="zebrafish")
    new = add_call(key_id, NOW - timedelta(days=1), text="zebrafish")
    pending = add_call(key_id, NOW - timedelta(days=10), text="pending", status="pending")
    with database.connection_context():
        vectors = Embedding.create(
            uid=uuid.uuid4().hex,
            api_key=key_id,
            model="e",
            input=["x"],
            embedding=[[0.1, 0.2]],
            input_tokens=3,
            dimensions=2,
            status="completed",
            created_at=NOW - timedelta(days=10),
        )
    job = make_retention(tmp_path, RETENTION_BODY_DAYS=7, RETENTION_BATCH=2)
    assert job.run()["completions_bodies"] == 1
    with database.connection_context():
        got = Completion.get(Completion.uid == old.uid)
        assert (got.prompt, got.completion, got.cached_response, got.delivered) == (None,) * 4
        assert (got.prompt_tokens, got.completion_tokens, got.usage) == (11, 7, old.usage)
        assert (got.cost, got.cost_nanos, got.ttft, got.duration, got.status) == (
            {"total": 0.25, "currency": "USD"},
            250_000_000,
            120,
            900,
            "completed",
        )
        kept = Completion.get(Completion.uid == new.uid)
        assert kept.prompt == new.prompt and kept.delivered == new.delivered
        assert Completion.get(Completion.uid == pending.uid).prompt is not None  # still running
        # The stripped record's full-text entry went with its text.
        found = Completion.select(Completion.uid).where(
            fulltext.condition(Completion, ["zebrafish"])
        )
        assert {r.uid for r in found} == {new.uid}
        emb = Embedding.get_by_id(vectors.id)
        assert (emb.input, emb.embedding, emb.input_tokens, emb.dimensions) == (None, None, 3, 2)
    assert job.run()["completions_bodies"] == 0  # nothing twice


def test_two_pruners_never_run_at_once(key_id: int, tmp_path: Path) -> None:
    """Two jobs (two instances' worth: own connections, own lock attempts) start together."""
    spans: list[tuple[str, float, float]] = []

    class Slow(Retention):
        def _work(self, now: datetime) -> dict:
            start = time.monotonic()
            gevent.sleep(0.3)  # long enough for the other to try while this one works
            spans.append((self.label, start, time.monotonic()))
            return {}

    jobs = []
    for label in ("a", "b"):
        job = Slow()
        job.lock_file = tmp_path / "r.lock"
        job.label = label  # type: ignore[attr-defined]
        jobs.append(job)
    results = [g.get() for g in [gevent.spawn(job.run) for job in jobs]]
    assert sorted(r is None for r in results) == [False, True]  # one ran, one was refused
    assert len(spans) == 1
    # Once the first is done, the lock is free again.
    assert jobs[1].run() == {} and len(spans) == 2


def test_a_prune_during_heavy_recording_loses_no_new_row(
    key_id: int, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    now = utcnow()
    add_old_calls(key_id, now - timedelta(days=60, seconds=3000), 3000, lambda i: "old text")
    writes: list[float] = []
    real = recorder_module.upsert_records

    def timed(batch: list[dict], touch: dict | None = None) -> list[dict]:
        start = time.perf_counter()
        written = real(batch, touch)
        writes.append(time.perf_counter() - start)
        return written

    monkeypatch.setattr(recorder_module, "upsert_records", timed)
    app = Flask("recorder-test")
    app.config.update(DEFAULTS, JOURNAL_DIR=str(tmp_path / "journal"))
    rec = Recorder()
    rec.init_app(app)
    job = make_retention(tmp_path, clock=now, RETENTION_DAYS=30, RETENTION_BATCH=100)
    calls: list[Exchange] = []

    def record(n: int) -> None:
        for i in range(n):
            ex = Exchange(api_key_id=key_id, model="m", api_format="openai-chat", prompt={})
            calls.append(ex)
            rec.record(ex)
            gevent.sleep(0.001)
            ex.finish("completed", usage={"input_tokens": i, "output_tokens": 1})
            rec.record(ex)

    try:
        recorders = [gevent.spawn(record, 150) for _ in range(4)]
        done = job.run()
        gevent.joinall(recorders, raise_error=True)
        assert rec.flush(20)
    finally:
        rec._group.kill()
    assert done is not None and done["completions"] == 3000
    with database.connection_context():
        got = dict(Completion.select(Completion.uid, Completion.status).tuples())
    assert got == {ex.uid: "completed" for ex in calls}
    writes.sort()
    print(
        f"\nrecorder writes during the prune ({'postgres' if is_postgres() else 'sqlite'}):"
        f" {len(writes)}, p50 {writes[len(writes) // 2] * 1000:.1f} ms,"
        f" max {writes[-1] * 1000:.1f} ms"
    )


def test_month_partitions_are_made_ahead_dropped_whole_and_catch_strays(
    key_id: int, tmp_path: Path
) -> None:
    with database.connection_context():
        if not partitions.partitioned():
            pytest.skip("PostgreSQL only: SQLite is not partitioned")
    # The template was migrated today: its first partition covers everything until next
    # month, then two months of partitions, then DEFAULT. A row far ahead lands there.
    today = utcnow()
    stray_month = partitions.month(today, 7)
    old = add_call(key_id, today - timedelta(days=1))
    kept = add_call(key_id, partitions.month(today, 2) + timedelta(days=14))
    stray = add_call(key_id, stray_month + timedelta(days=3), text="stray")
    with database.connection_context():
        assert _partition_of(stray.uid) == partitions.DEFAULT
    # Two months on: partitions for that month and the two next are made; the first
    # partition (every row before next month) is wholly past 30 days and is dropped.
    clock = partitions.month(today, 3) + timedelta(days=9)
    done = make_retention(tmp_path, clock=clock, RETENTION_DAYS=30).run()
    assert done["partitions_made"] == [
        partitions.name(partitions.month(clock, n)) for n in (0, 1, 2)
    ]
    assert "completions_legacy" in done["partitions_dropped"]
    assert old.uid not in uids() and {kept.uid, stray.uid} <= uids()
    # When the stray's month comes near, its partition is made and the row moves in.
    clock = stray_month - timedelta(days=20)
    done = make_retention(tmp_path, clock=clock).run()
    assert partitions.name(stray_month) in done["partitions_made"]
    with database.connection_context():
        assert _partition_of(stray.uid) == partitions.name(stray_month)
        row = Completion.get(Completion.uid == stray.uid)
        assert row.prompt_tokens == 11 and row.cost_nanos == 250_000_000
        # Still found by its text: the full-text column was recomputed in the new home.
        assert Completion.select().where(fulltext.condition(Completion, ["stray"])).count() == 1


def _partition_of(uid: str) -> str:
    cursor = database.execute_sql(
        "SELECT tableoid::regclass::text FROM completions WHERE uid = %s", (uid,)
    )
    return cursor.fetchone()[0]


def test_a_pruner_in_another_process_makes_this_one_skip(
    key_id: int, tmp_path: Path, database_url: str
) -> None:
    """Another process holds the lock (the advisory lock, or the flock): no work here."""
    import subprocess
    import sys

    from gateway.db import RETENTION_LOCK

    old = add_call(key_id, NOW - timedelta(days=90))
    if is_postgres():
        hold = (
            "import psycopg, sys, time\n"
            f"c = psycopg.connect({database_url!r})\n"
            f"c.execute('SELECT pg_advisory_lock({RETENTION_LOCK})')\n"
            "print('held', flush=True); time.sleep(30)\n"
        )
    else:
        hold = (
            "import fcntl, os, time\n"
            f"fd = os.open({str(tmp_path / 'r.lock')!r}, os.O_RDWR | os.O_CREAT)\n"
            "fcntl.flock(fd, fcntl.LOCK_EX)\n"
            "print('held', flush=True); time.sleep(30)\n"
        )
    other = subprocess.Popen([sys.executable, "-c", hold], stdout=subprocess.PIPE, text=True)
    try:
        assert other.stdout is not None and other.stdout.readline().strip() == "held"
        job = make_retention(tmp_path, RETENTION_DAYS=30)
        assert job.run() is None
        assert old.uid in uids()
    finally:
        other.kill()
        other.wait()
    # Its holder gone (killed: it never unlocked), the lock is free: at once for a flock,
    # once the server has seen the connection close for the advisory lock (a moment, on
    # a loaded machine: CI once found it still held).
    assert wait_until(lambda: make_retention(tmp_path, RETENTION_DAYS=30).run(), timeout=10)
    assert old.uid not in uids()


@pytest.mark.server
def test_the_gateway_prunes_while_it_records_and_loses_no_call(  # type: ignore[no-untyped-def]
    database_url: str, gateway_factory, fake
) -> None:
    """Two gunicorn workers, each running the job every second, prune while calls flow."""
    import gevent.pool
    import requests

    database.initialize(open_database(database_url))
    try:
        with database.connection_context():
            owner = ApiKey.create(key_hash=uuid.uuid4().hex * 2, key_hint="sk-…old").id
        add_old_calls(owner, utcnow() - timedelta(days=40), 2000)
    finally:
        pools.release(database.obj)
    gw = gateway_factory(
        GATEWAY_WORKERS="2",
        GATEWAY_RETENTION_DAYS="30",
        GATEWAY_RETENTION_INTERVAL="1",
        GATEWAY_RETENTION_BATCH="50",
        GATEWAY_RETENTION_PAUSE="0.2",  # 40 batches: the prune runs for seconds
    )
    unlimited = {"rpmLimit": 100_000, "tpmLimit": 100_000_000}
    route = gw.setup_route(fake.url, system_name="kept", remote_id="fake;chunks=3", key=unlimited)

    def call(_: int) -> int:
        return requests.post(
            f"{gw.url}/v1/chat/completions",
            headers={"Authorization": f"Bearer {route['key']}"},
            json={"model": "kept", "messages": [{"role": "user", "content": "hi"}]},
            timeout=30,
        ).status_code

    assert gw.api("GET", "/completions?limit=1")["total"] > 200  # still pruning
    statuses = list(gevent.pool.Pool(8).imap_unordered(call, range(200)))
    assert statuses == [200] * 200
    records = gw.wait_final(200, timeout=60, apiKeyId=route["key_id"])
    assert len(records) == 200 and all(r["status"] == "completed" for r in records)

    def pruned() -> bool:
        return gw.api("GET", "/completions?limit=1")["total"] == 200

    wait_until(pruned, timeout=60)
    assert "retention: a run failed" not in gw.log()


def test_a_busy_table_delays_partition_ddl_and_never_waits_on_it(
    key_id: int, tmp_path: Path, database_url: str
) -> None:
    """A long reader holds completions: DDL gives up after lock_timeout, rows still go."""
    import psycopg

    with database.connection_context():
        if not partitions.partitioned():
            pytest.skip("PostgreSQL only: SQLite is not partitioned")
    today = utcnow()
    old = add_call(key_id, today - timedelta(days=1))  # in the first partition
    clock = partitions.month(today, 3) + timedelta(days=9)  # it is wholly past 30 days
    reader = psycopg.connect(database_url)
    try:
        reader.execute("SELECT count(*) FROM completions")  # its transaction stays open
        started = time.monotonic()
        done = make_retention(tmp_path, clock=clock, RETENTION_DAYS=30).run()
        took = time.monotonic() - started
        assert done["partitions_made"] == [] and done["partitions_dropped"] == []
        assert done["completions"] == 1 and old.uid not in uids()  # deleted row by row instead
        assert took < 3 * 5 * partitions.LOCK_TIMEOUT_MS / 1000  # five DDL tries, none waited
    finally:
        reader.close()
    done = make_retention(tmp_path, clock=clock, RETENTION_DAYS=30).run()
    assert "completions_legacy" in done["partitions_dropped"] and len(done["partitions_made"]) == 3


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
@pytest.mark.parametrize("mode", ["rows", "bodies"])
def test_a_sqlite_prune_does_not_freeze_the_worker(key_id: int, tmp_path: Path, mode: str) -> None:
    """Each batch's work inside SQLite (the rows, and their full-text entries: FTS5
    reads a row's text again to unindex it) runs beside the loop: the calls go on."""
    add_old_calls(key_id, NOW - timedelta(days=60), 1500, lambda i: varied_text(i, 600))
    days = {"RETENTION_DAYS": 30} if mode == "rows" else {"RETENTION_BODY_DAYS": 30}
    job = make_retention(tmp_path, RETENTION_BATCH=750, **days)
    with watch_loop() as watch:
        done = job.run()
    assert done is not None
    assert done["completions" if mode == "rows" else "completions_bodies"] == 1500
    assert watch.took > 0.2, f"the prune took {watch.took:.3f} s: too light to show anything"
    # On a busy machine the loop's turns come late; frozen, it would miss them all.
    assert watch.longest < watch.took / 3, f"froze {watch.longest:.3f} s of {watch.took:.3f}"
    with database.connection_context():  # nothing of the old text is found any more
        word = varied_text(1, 1)
        found = Completion.select().where(fulltext.condition(Completion, [word]))
        assert not found.exists()


def test_a_dead_process_s_write_ahead_line_does_not_bring_a_deleted_record_back(
    key_id: int, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A process's write-ahead file keeps lines the database has (up to 256 KB: days of
    a quiet worker's calls); killed, its file is written back by a survivor. A line of a
    record retention deleted since must not bring it back: its cost is in retired_spend,
    and the budget would count it twice (and again at the next round)."""
    monkeypatch.setattr(recorder_module, "utcnow", lambda: NOW)
    app = Flask("recorder-test")
    app.config.update(DEFAULTS, JOURNAL_DIR=str(tmp_path / "journal"), RETENTION_DAYS=1)
    rec = Recorder()
    rec.init_app(app)
    try:
        old, new = (
            Exchange(api_key_id=key_id, model="m", api_format="openai-chat", prompt={})
            for _ in range(2)
        )
        for ex, age in ((old, timedelta(days=3)), (new, timedelta(hours=1))):
            ex.created_at = NOW - age
            ex.finish("completed", usage={"input_tokens": 1, "output_tokens": 1})
            ex.cost = {"total": 0.25, "currency": "USD"}
        lines = [callrows.ahead_row(old), callrows.ahead_row(new)]
        with database.connection_context():
            recorder_module.write_rows([callrows.snapshot(ex) for ex in (old, new)])
        assert make_retention(tmp_path, RETENTION_DAYS=1).run() is not None
        assert uids() == {new.uid}
        with database.connection_context():
            before = ledger.month_spend(NOW, key_id)
        assert before == {key_id: 500_000_000}
        proc = subprocess.Popen(["true"])
        proc.wait()
        dead = tmp_path / "journal" / f"ahead-1-{proc.pid}.jsonl"
        dead.parent.mkdir(exist_ok=True)
        dead.write_text("".join(json.dumps(journal_module._jsonable(r)) + "\n" for r in lines))
        rec.journal.replay(rec._write_ahead, prefix="ahead")
        assert not dead.exists()
        with database.connection_context():
            assert ledger.month_spend(NOW, key_id) == before
        assert uids() == {new.uid}
        # The next round finds nothing more to retire.
        assert make_retention(tmp_path, RETENTION_DAYS=1).run() is not None
        with database.connection_context():
            assert ledger.month_spend(NOW, key_id) == before
    finally:
        rec._group.kill()


def test_a_budget_s_figure_read_during_a_delete_counts_each_call_once(
    key_id: int, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The budget's figure is the month's records plus their retired spend: read from one
    snapshot of both. A retention batch that commits between a read of the records and
    one of retired_spend must not make a call deleted meanwhile count in each."""
    add_call(key_id, NOW - timedelta(days=3))
    add_call(key_id, NOW - timedelta(hours=1))
    job = make_retention(tmp_path, RETENTION_DAYS=1)
    real = database.obj.execute_sql
    ran: list[object] = []

    def execute_sql(sql: str, params: object = None, *args: object, **kwargs: object) -> object:
        if not ran and sql.lstrip("( ").upper().startswith("SELECT") and "retired_spend" in sql:
            ran.append(job.run())  # a retention batch commits just before this read
        return real(sql, params, *args, **kwargs)

    with database.connection_context():
        monkeypatch.setattr(database.obj, "execute_sql", execute_sql)
        spent = ledger.month_spend(NOW, key_id)
        monkeypatch.undo()
        assert ran and ran[0] is not None
        assert ledger.month_spend(NOW, key_id) == {key_id: 500_000_000}
    assert spent == {key_id: 500_000_000}
