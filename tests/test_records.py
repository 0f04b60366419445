"""The one records query on SQLite and PostgreSQL: every filter, full text, totals, downloads.

Records are written as the recorder writes them (``write_rows``: pending, then final),
so the full-text index is the database's own, kept in step by its generated column
(PostgreSQL) or its triggers (SQLite).
"""

from __future__ import annotations

import csv
import io
import json
from datetime import timedelta

import pytest

from gateway import records
from gateway.callrows import snapshot
from gateway.db import database, is_postgres
from gateway.exchange import Exchange
from gateway.models import ApiKey, Completion, utcnow
from gateway.recorder import write_rows
from gateway.search import Search
from gateway.writes import finalise_orphans
from tests.servers import ADMIN_SECRET
from tests.test_dashboard import login

ADMIN = {"Authorization": f"Bearer {ADMIN_SECRET}"}
IMAGE = "data:image/png;base64,c2VjcmV0aW1hZ2VieXRlcw=="


def call(
    key: int, text: str, answer: str | None, status: str = "completed", **facts: object
) -> Exchange:
    """One call written pending, then final (as the recorder does), with ``facts``."""
    prompt = {
        "messages": [
            {"role": "system", "content": "You are terse."},
            {"role": "user", "content": [{"type": "text", "text": text}, {"type": "image_url", "image_url": {"url": IMAGE}}]},
        ],
        "tools": [{"type": "function", "function": {"name": "schemaonlyword"}}],
    }  # fmt: skip
    ex = Exchange(
        api_key_id=key,
        model=str(facts.pop("model", "gpt-4o")),
        api_format=str(facts.pop("api_format", "openai-chat")),
        prompt=prompt,
    )
    created = facts.pop("created_at", None)
    if created is not None:
        ex.created_at = created  # type: ignore[assignment]
    write_rows([snapshot(ex)])
    ex.provider_id = facts.pop("provider_id", None)  # type: ignore[assignment]
    ex.ttft_ms = facts.pop("ttft", 100)  # type: ignore[assignment]
    failed = status == "failed"
    cost = facts.pop("cost", None)
    ex.finish(
        status,
        output=None if failed else [{"role": "assistant", "content": answer, **facts}],
        usage=None if failed else {"input_tokens": 10, "output_tokens": 20},
        cost=None if cost is None else {"currency": "USD", "total": cost},
    )
    write_rows([snapshot(ex)])
    return ex


@pytest.fixture
def calls(db):  # type: ignore[no-untyped-def]
    key = ApiKey.create(key_hash="f" * 64, key_hint="sk-f…ffff").id
    return {
        "lighthouse": call(key, "Tell me about the lighthouse keeper", "He counted ships at night.", cost="0.0003"),
        "chinese": call(key, "请帮我总结数据库的全文检索问题", "好的，这是总结。", provider_id=2, cost="0.00025"),  # noqa: RUF001
        "failed": call(key, "Nobody answers this", None, status="failed"),
        "tools": call(
            key,
            "Weather please",
            None,
            tool_calls=[{"id": "c", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Hangzhou"}'}}],
        ),
        "reasoning": call(key, "Is 391 prime?", "No.", reasoning_content="391 is 17 times 23", api_format="anthropic"),
        "old": call(key, "An old question about ships", "Old answer.", created_at=utcnow() - timedelta(days=40), model="gpt-4o@azure"),
    }  # fmt: skip


def found(client, query: str) -> set[str]:  # type: ignore[no-untyped-def]
    """The uids the admin API lists for ``query``."""
    page = client.get(f"/api/admin/completions?limit=1000&{query}", headers=ADMIN).get_json()
    assert "data" in page, page
    assert page["total"] == len(page["data"])
    return {row["uid"] for row in page["data"]}


def uids(calls: dict, *names: str) -> set[str]:
    return {calls[n].uid for n in names}


def test_full_text_finds_what_people_wrote_and_read(client, calls) -> None:  # type: ignore[no-untyped-def]
    assert found(client, "q=lighthouse") == uids(calls, "lighthouse")
    assert found(client, "q=LIGHTHOUSE") == uids(calls, "lighthouse")  # any case
    assert found(client, "q=ships") == uids(calls, "lighthouse", "old")  # prompt and answer
    assert found(client, "q=ships+night") == uids(calls, "lighthouse")  # every term
    assert found(client, "q=%22counted+ships%22") == uids(calls, "lighthouse")  # a phrase
    assert found(client, "q=%22ships+counted%22") == set()  # in that order only
    assert found(client, "q=Hangzhou") == uids(calls, "tools")  # tool call arguments
    assert found(client, "q=17+times") == uids(calls, "reasoning")  # reasoning
    # Chinese is found as a substring, two characters or more.
    assert found(client, "q=全文检索") == uids(calls, "chinese")
    assert found(client, "q=数据") == uids(calls, "chinese")
    assert found(client, "q=总结") == uids(calls, "chinese")  # prompt and answer both
    assert found(client, "q=检全") == set()
    # What is not text people read is not indexed: tool schemas, image data, roles.
    for hidden in ("schemaonlyword", "c2VjcmV0aW1hZ2VieXRlcw", "image_url", "assistant"):
        assert found(client, f"q={hidden}") == set(), hidden
    assert found(client, "q=!!!") == found(client, "")  # no word: no text filter


def test_the_index_follows_every_write(client, calls, db) -> None:  # type: ignore[no-untyped-def]
    # The answer arrived with the final write: the index has it (asserted above), and
    # a soft-deleted record leaves the results, a deleted row the index.
    row = Completion.get(Completion.uid == calls["lighthouse"].uid)
    client.delete(f"/api/admin/completions/{row.id}", headers=ADMIN)
    assert found(client, "q=lighthouse") == set()
    Completion.delete().where(Completion.id == row.id).execute()
    if not is_postgres():
        left = database.execute_sql(
            "SELECT count(*) FROM completions_fts WHERE rowid = ?", (row.id,)
        )
        assert left.fetchone()[0] == 0


def test_a_call_is_found_by_its_text_once_it_has_ended(client, db) -> None:  # type: ignore[no-untyped-def]
    key = ApiKey.create(key_hash="6" * 64, key_hint="sk-6…6666").id
    ex = Exchange(api_key_id=key, model="m", api_format="openai-chat")
    ex.prompt = {"messages": [{"role": "user", "content": "inflight question"}]}
    write_rows([snapshot(ex)])
    assert found(client, "q=inflight") == set()  # indexing is a write's main cost: once
    assert found(client, "status=pending") == {ex.uid}
    ex.finish("completed", output=[{"role": "assistant", "content": "done"}])
    write_rows([snapshot(ex)])
    assert found(client, "q=inflight") == {ex.uid}


def test_a_call_swept_from_pending_is_found_by_its_text(client, db) -> None:  # type: ignore[no-untyped-def]
    key = ApiKey.create(key_hash="7" * 64, key_hint="sk-7…7777").id
    ex = Exchange(api_key_id=key, model="m", api_format="openai-chat")
    ex.prompt = {"messages": [{"role": "user", "content": "orphaned question"}]}
    write_rows([snapshot(ex)])  # pending, then its process dies: the sweeper finalises it
    finalise_orphans([snapshot(ex)["owner"]], None, "orphaned")
    assert found(client, "q=orphaned") == {ex.uid}


def test_the_recorder_and_the_triggers_index_one_batch_each_their_own(client, db) -> None:  # type: ignore[no-untyped-def]
    """The recorder indexes the calls whose text it can say, the triggers the others
    (a tool call's arguments sent as an object), in one write; and another writer's
    row is indexed by the triggers as ever."""
    key = ApiKey.create(key_hash="8" * 64, key_hint="sk-8…8888").id
    usual, odd = (Exchange(api_key_id=key, model="m", api_format="openai-chat") for _ in "ab")
    usual.prompt = {"messages": [{"role": "user", "content": "usual lighthouse"}]}
    odd.prompt = {"messages": [{"role": "user", "content": "odd lighthouse"}]}
    usual.finish("completed", output=[{"role": "assistant", "content": "plain"}])
    call = {"function": {"name": "seek", "arguments": {"city": "Hangzhou"}}}
    odd.finish("completed", output=[{"role": "assistant", "content": None, "tool_calls": [call]}])
    write_rows([snapshot(usual), snapshot(odd)])
    Completion.create(
        uid="by-another-writer", api_key=key, model="m", api_format="openai-chat", stream=False,
        status="completed", prompt={"messages": [{"role": "user", "content": "third lighthouse"}]},
    )  # fmt: skip
    assert found(client, "q=lighthouse") == {usual.uid, odd.uid, "by-another-writer"}
    assert found(client, "q=usual") == {usual.uid}
    assert found(client, "q=seek") == {odd.uid}  # the triggers' own text of that call
    if not is_postgres():
        flag = database.execute_sql("SELECT indexing FROM completions_fts_writer").fetchone()
        assert flag == (0,)  # down again once the recorder's write is over
        twice = "SELECT rowid, count(*) FROM completions_fts GROUP BY rowid HAVING count(*) > 1"
        assert database.execute_sql(twice).fetchall() == []


def test_a_final_snapshot_without_its_text_is_indexed_with_the_stored_text(client, db) -> None:  # type: ignore[no-untyped-def]
    """A journal of an older version may hold a final snapshot that lacks a column:
    the row keeps what it had, and the index its text (the triggers take it)."""
    key = ApiKey.create(key_hash="9" * 64, key_hint="sk-9…9999").id
    ex = Exchange(api_key_id=key, model="m", api_format="openai-chat")
    ex.prompt = {"messages": [{"role": "user", "content": "journaled lighthouse"}]}
    write_rows([snapshot(ex)])  # pending, with its prompt
    ex.finish("completed", output=[{"role": "assistant", "content": "kept"}])
    final = snapshot(ex)
    del final["prompt"]
    write_rows([final])
    assert found(client, "q=journaled") == {ex.uid}
    assert found(client, "q=kept") == {ex.uid}


def test_the_index_is_in_place_after_every_migration(db) -> None:  # type: ignore[no-untyped-def]
    # A later migration that rebuilds completions on SQLite (playhouse copies the table
    # to change a column) drops its triggers: the index would go stale without a word.
    if is_postgres():
        sql = "SELECT indexname FROM pg_indexes WHERE tablename = 'completions'"
        assert "completions_search" in {name for (name,) in database.execute_sql(sql)}
    else:
        sql = "SELECT name, sql FROM sqlite_master WHERE type = 'trigger' AND tbl_name = 'completions'"
        triggers = dict(database.execute_sql(sql).fetchall())
        assert set(triggers) >= {
            "completions_fts_insert",
            "completions_fts_update",
            "completions_fts_delete",
        }
        # ... leaving the recorder's own rows to it (0010), and only those.
        for name in ("completions_fts_insert", "completions_fts_update"):
            assert "completions_fts_writer" in triggers[name], name
        # ... and dropping the text due to the index (0014) where they take it.
        for name in ("completions_fts_update", "completions_fts_delete"):
            assert "completions_fts_due" in triggers[name], name


def test_every_filter_of_the_query(client, calls) -> None:  # type: ignore[no-untyped-def]
    everything = uids(calls, *calls)
    assert found(client, "") == everything
    assert found(client, "status=failed") == uids(calls, "failed")
    assert found(client, "status=failed,completed") == everything
    assert found(client, "providerId=2") == uids(calls, "chinese")
    assert found(client, "apiFormat=anthropic") == uids(calls, "reasoning")
    assert found(client, "model=gpt-4o") == everything  # pinned providers too
    assert found(client, "range=7d") == everything - uids(calls, "old")
    old = calls["old"].created_at
    window = (
        f"from={(old - timedelta(hours=1)).isoformat()}&to={(old + timedelta(hours=1)).isoformat()}"
    )
    assert found(client, window) == uids(calls, "old")
    assert found(client, f"to={old.date().isoformat()}") == uids(calls, "old")  # the whole day
    assert found(client, "minTokens=30&maxTokens=30") == everything - uids(calls, "failed")
    assert found(client, "minTokens=31") == set()
    assert found(client, "maxTtft=100&minTtft=100") == everything  # failed ones too: set
    assert found(client, "minDuration=0") == everything
    assert found(client, "q=ships&range=7d") == uids(calls, "lighthouse")
    assert found(client, "minCost=0.0003") == uids(calls, "lighthouse")  # USD, nano-USD kept
    assert found(client, "maxCost=0.000299") == uids(calls, "chinese")
    assert found(client, "minCost=0.0002&maxCost=0.0003") == uids(calls, "lighthouse", "chinese")
    # Bounds past any value a column can hold select what the column's extreme would
    # (SQLite refused to bind them: a 500).
    huge = "99999999999999999999"
    assert found(client, f"minCost=10000000000&maxTokens={huge}") == set()
    assert found(client, f"maxDuration={huge}&minTtft=-{huge}") == everything
    assert client.get("/api/admin/embeddings?q=x", headers=ADMIN).status_code == 400


def test_a_total_past_the_cap_is_an_estimate_and_the_page_is_still_right(
    app, client, calls
) -> None:  # type: ignore[no-untyped-def]
    app.config["SEARCH_COUNT_CAP"] = 2
    page = client.get("/api/admin/completions?q=ships", headers=ADMIN).get_json()
    assert [r["uid"] for r in page["data"]] == [calls["lighthouse"].uid, calls["old"].uid]
    assert page["total"] == 2 and "totalExact" not in page  # exactly the cap: exact
    page = client.get("/api/admin/completions?limit=2", headers=ADMIN).get_json()
    if is_postgres():
        assert page["total"] >= 3 and page["totalExact"] is False
    else:  # SQLite always counts
        assert page["total"] == 6 and "totalExact" not in page
    newest = [c.uid for c in sorted(calls.values(), key=lambda c: c.created_at, reverse=True)]
    assert [r["uid"] for r in page["data"]] == newest[:2]
    # Both plans of a text search (few matches, many) give the same rows in the same order.
    for cap in (1, 1000):
        app.config["SEARCH_COUNT_CAP"] = cap
        rows = client.get("/api/admin/completions?q=ships", headers=ADMIN).get_json()["data"]
        assert [r["uid"] for r in rows] == [calls["lighthouse"].uid, calls["old"].uid], cap


def test_batches_walk_every_record_once_in_order_even_with_equal_times(db) -> None:  # type: ignore[no-untyped-def]
    key = ApiKey.create(key_hash="9" * 64, key_hint="sk-9…9999").id
    moment = utcnow()
    made = [call(key, f"question {i}", f"answer {i}", created_at=moment) for i in range(7)]
    walked = [
        row.uid for batch in records.batches(Completion, Search(), True, size=3) for row in batch
    ]
    assert sorted(walked) == sorted(c.uid for c in made) and len(walked) == 7
    ids = [Completion.get(Completion.uid == u).id for u in walked]
    assert ids == sorted(ids, reverse=True)  # ties on created_at: newest id first


def test_downloads_hold_what_the_listing_holds(client, calls) -> None:  # type: ignore[no-untyped-def]
    listing = client.get("/api/admin/completions?q=ships", headers=ADMIN).get_json()["data"]
    jsonl = client.get("/api/admin/completions/export?format=jsonl&q=ships", headers=ADMIN)
    assert jsonl.status_code == 200 and jsonl.mimetype == "application/x-ndjson"
    assert "attachment" in jsonl.headers["Content-Disposition"]
    assert [json.loads(line) for line in jsonl.text.splitlines()] == listing

    resp = client.get("/api/admin/completions/export?format=csv&q=ships", headers=ADMIN)
    assert resp.mimetype == "text/csv"
    table = list(csv.DictReader(io.StringIO(resp.data.decode("utf-8-sig"))))
    assert list(table[0]) == list(listing[0])  # every field of the listing, in order
    assert [r["uid"] for r in table] == [r["uid"] for r in listing]
    assert json.loads(table[0]["prompt"]) == listing[0]["prompt"]
    assert table[0]["promptTokens"] == "10"
    assert client.get("/api/admin/completions/export?format=xml", headers=ADMIN).status_code == 400
    empty = client.get("/api/admin/completions/export?format=csv&q=nothingmatches", headers=ADMIN)
    assert empty.data.decode("utf-8-sig").splitlines() == [",".join(listing[0])]


def test_a_prompt_cannot_become_a_spreadsheet_formula(client, db) -> None:  # type: ignore[no-untyped-def]
    key = ApiKey.create(key_hash="8" * 64, key_hint="sk-8…8888").id
    ex = call(key, "harmless", "fine")
    Completion.update(error='=HYPERLINK("http://evil.example","x")').where(
        Completion.uid == ex.uid
    ).execute()
    resp = client.get("/api/admin/completions/export?format=csv", headers=ADMIN)
    (row,) = csv.DictReader(io.StringIO(resp.data.decode("utf-8-sig")))
    assert row["error"] == '\'=HYPERLINK("http://evil.example","x")'
    assert row["duration"].lstrip("-").isdigit()  # numbers stay numbers


def test_the_dashboard_search_is_a_url_and_its_download(client, calls) -> None:  # type: ignore[no-untyped-def]
    login(client)
    url = "/requests?q=ships&status=completed&providerId=&minDuration=0&range=30d"
    page = client.get(url).text
    assert page.count('<tr class="row-link">') == 1  # the 40-day-old one is out of range
    assert 'value="ships"' in page and '<option value="30d" selected' in page
    assert 'placeholder="Words or “a phrase” in prompts and answers"' in page  # whole
    assert 'name="minDuration" value="0"' in page
    csv_link = "/requests/export?q=ships&amp;status=completed&amp;range=30d&amp;minDuration=0&amp;format=csv"
    assert csv_link in page
    download = client.get(csv_link.replace("&amp;", "&"))
    assert download.status_code == 200 and download.mimetype == "text/csv"
    assert calls["lighthouse"].uid in download.text and calls["old"].uid not in download.text
    assert client.get("/requests/export?format=pdf").status_code == 404
