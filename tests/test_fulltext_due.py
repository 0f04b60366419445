"""SQLite: the recorder's text reaches the full-text index in lots (``migrations/0014``).

A final call's text waits in ``completions_fts_due`` until ``writes.index_due`` moves it
(the recorder, in lots; a search, first). What is asserted: nothing searched is ever
missing or stale (a search indexes what is due first), the text a row's own later
write gave it wins (a retention strip, another writer, a deletion), nothing due is
lost with a process, and the recorder empties the table by itself.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from gateway import db, indexdue, writes
from gateway.callrows import snapshot
from gateway.db import database, open_database
from gateway.exchange import Exchange
from gateway.models import ApiKey, Completion
from gateway.recorder import Recorder, write_rows
from gateway.writes import index_all_due, index_due
from tests import pools
from tests.servers import ADMIN_SECRET, sqlite_lock_held, wait_until

pytestmark = pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
ADMIN = {"Authorization": f"Bearer {ADMIN_SECRET}"}


def ended(key: int, text: str, answer: str = "noted") -> Exchange:
    ex = Exchange(api_key_id=key, model="m", api_format="openai-chat")
    ex.prompt = {"messages": [{"role": "user", "content": text}]}
    ex.finish("completed", output=[{"role": "assistant", "content": answer}])
    return ex


def due() -> dict[int, str]:
    return dict(database.execute_sql("SELECT id, body FROM completions_fts_due").fetchall())


def indexed() -> dict[int, str]:
    return dict(database.execute_sql("SELECT rowid, body FROM completions_fts").fetchall())


def row_id(ex: Exchange) -> int:
    return Completion.get(Completion.uid == ex.uid).id


def found(client, text: str) -> set[str]:  # type: ignore[no-untyped-def]
    page = client.get(f"/api/admin/completions?limit=1000&q={text}", headers=ADMIN).get_json()
    return {row["uid"] for row in page["data"]}


@pytest.fixture
def key(db) -> int:  # type: ignore[no-untyped-def]
    return ApiKey.create(key_hash="d" * 64, key_hint="sk-d…dddd").id


def test_a_write_leaves_the_text_due_and_a_search_finds_it_at_once(client, key) -> None:  # type: ignore[no-untyped-def]
    first, second = ended(key, "harbour pilot"), ended(key, "harbour master")
    write_rows([snapshot(first), snapshot(second)])
    ids = {row_id(first), row_id(second)}
    assert set(due()) == ids
    assert not ids & set(indexed())  # not indexed by the write, nor by the triggers
    assert found(client, "harbour") == {first.uid, second.uid}
    assert due() == {}
    assert set(indexed()) == ids
    assert "harbour pilot" in indexed()[row_id(first)]


def test_a_search_while_another_process_holds_the_write_lock_waits_db_timeout_at_most(
    client, key, database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:  # type: ignore[no-untyped-def]
    """A search first moves what is due into the index, which takes SQLite's write lock:
    held by another process (a worker's recorder in a long write, a stuck holder), the
    search waited as long as it was held, without bound. Past ``DB_TIMEOUT`` (an outage
    for the recorder too) it searches the index as it is, and finds the rest later."""
    first = ended(key, "harbour pilot")
    write_rows([snapshot(first)])
    monkeypatch.setattr(db, "_lock_timeout", 0.5)  # DB_TIMEOUT
    with sqlite_lock_held(database_url.removeprefix("sqlite:///"), 4.0):
        started = time.monotonic()
        page = client.get("/api/admin/completions?q=harbour", headers=ADMIN)
        took = time.monotonic() - started
    assert page.status_code == 200, page.get_data(as_text=True)
    assert took < 2.5, f"the search waited {took:.1f} s for another process's lock"
    assert set(due()) == {row_id(first)}  # still due: the next search takes it
    assert found(client, "harbour") == {first.uid}


def test_a_lot_moves_the_oldest_rows_due_and_says_how_many(key) -> None:  # type: ignore[no-untyped-def]
    calls = [ended(key, f"lot {i}") for i in range(5)]
    write_rows([snapshot(ex) for ex in calls])
    ids = sorted(row_id(ex) for ex in calls)
    assert index_due(limit=2) == 2
    assert sorted(indexed()) == ids[:2]
    assert sorted(due()) == ids[2:]
    assert index_due(limit=10) == 3
    assert index_due(limit=10) == 0
    assert sorted(indexed()) == ids


def test_a_lot_is_bounded_by_its_text_too_and_everything_due_gets_there(
    key,  # type: ignore[no-untyped-def]
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Calls with long prompts: a lot stops at ``INDEX_CHARS`` (a lot must fit in the
    recorder's timeout, or it would be cut short and tried again for ever), but always
    takes one row; ``index_all_due`` goes lot after lot until nothing is left."""
    monkeypatch.setattr(writes, "INDEX_CHARS", 60)
    calls = [ended(key, f"{'long prompt ' * 4}{i}") for i in range(5)]  # about 55 each
    write_rows([snapshot(ex) for ex in calls])
    ids = sorted(row_id(ex) for ex in calls)
    assert index_due() == 1
    monkeypatch.setattr(writes, "INDEX_CHARS", 120)
    assert index_due() == 2
    assert sorted(indexed()) == ids[:3]
    index_all_due()
    assert due() == {}
    assert sorted(indexed()) == ids


def test_a_later_text_of_the_same_call_replaces_the_one_due(client, key) -> None:  # type: ignore[no-untyped-def]
    """A row written final twice (a journal replayed, the sweeper's row then the real
    one): the index gets the last text once, not the first, not twice."""
    ex = ended(key, "first draft")
    write_rows([snapshot(ex)])
    index_all_due()
    ex.prompt = {"messages": [{"role": "user", "content": "second draft"}]}
    row = snapshot(ex)
    Completion.update(status="pending").where(Completion.uid == ex.uid).execute()
    write_rows([row])
    assert list(due().values()) == [indexed()[row_id(ex)].replace("first", "second")]
    assert found(client, "second+draft") == {ex.uid}
    assert found(client, "first+draft") == set()
    twice = "SELECT rowid FROM completions_fts GROUP BY rowid HAVING count(*) > 1"
    assert database.execute_sql(twice).fetchall() == []


def test_a_deleted_row_takes_its_due_text_with_it(key) -> None:  # type: ignore[no-untyped-def]
    kept, gone = ended(key, "kept lantern"), ended(key, "deleted lantern")
    write_rows([snapshot(kept), snapshot(gone)])
    gone_id = row_id(gone)
    Completion.delete().where(Completion.id == gone_id).execute()
    assert set(due()) == {row_id(kept)}
    index_all_due()
    assert set(indexed()) == {row_id(kept)}  # no entry for a row that is not there


def test_text_emptied_before_it_was_indexed_never_reaches_the_index(client, key) -> None:  # type: ignore[no-untyped-def]
    """Retention empties old rows' bodies (an UPDATE of another writer: the triggers'
    flag is down); a body it emptied must not come back through the text that was due."""
    old = ended(key, "secretive lighthouse")
    write_rows([snapshot(old)])
    assert set(due()) == {row_id(old)}
    Completion.update(prompt=None, completion=None).where(Completion.uid == old.uid).execute()
    assert due() == {}
    assert found(client, "secretive") == set()
    assert "secretive" not in " ".join(indexed().values())


def test_text_due_is_not_lost_with_the_process_that_wrote_it(
    database_url: str, tmp_path: Path
) -> None:
    """A worker killed after its write: its rows' text is in the database, and another
    process's index run (or search) takes it."""
    database.initialize(open_database(database_url))
    with database.connection_context():
        key = ApiKey.create(key_hash="e" * 64, key_hint="sk-e…eeee").id
        calls = [ended(key, f"orphan text {i}") for i in range(3)]
        write_rows([snapshot(ex) for ex in calls])
    pools.release(database.obj)  # the writer's connection and memory are gone
    database.initialize(open_database(database_url))  # another process
    with database.connection_context():
        assert len(due()) == 3
        assert index_all_due() is None and due() == {}
        assert {row_id(ex) for ex in calls} <= set(indexed())
    pools.release(database.obj)


def test_the_recorder_indexes_what_is_due_soon_after_it_writes(
    rec: Recorder, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(indexdue, "INDEX_AFTER", 0.2)
    with database.connection_context():
        key = ApiKey.create(key_hash="c" * 64, key_hint="sk-c…cccc").id
    calls = [ended(key, f"recorded beacon {i}") for i in range(3)]
    for ex in calls:
        rec.record(ex)
    assert rec.flush(5)
    with database.connection_context():
        assert len(due()) == 3  # written, not indexed yet: it waits for a lot
        ids = {row_id(ex) for ex in calls}
    # No search and nothing more written: the writer wakes for the index by itself.
    wait_until(_due_empty, timeout=5)
    with database.connection_context():
        assert ids <= set(indexed())


def test_the_recorder_indexes_at_once_when_a_lot_is_due(
    rec: Recorder, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(indexdue, "INDEX_AT", 4)
    monkeypatch.setattr(indexdue, "INDEX_AFTER", 60.0)  # the count, not the time
    with database.connection_context():
        key = ApiKey.create(key_hash="b" * 64, key_hint="sk-b…bbbb").id
    for i in range(2):
        rec.record(ended(key, f"early {i}"))
    assert rec.flush(5)
    with database.connection_context():
        assert len(due()) == 2
    for i in range(2):
        rec.record(ended(key, f"late {i}"))
    assert rec.flush(5)
    wait_until(_due_empty, timeout=5)


def _due_empty() -> bool:
    with database.connection_context():
        return due() == {}
