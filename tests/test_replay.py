"""Request dedup (``X-NexusGate-ReqId``) on /v1, through Flask's test client.

A repeat by the same key of a finished call gets the stored answer without the upstream
being asked, in its own format (streamed or not, whatever the first call was), and is
recorded once as ``cache_hit`` linked to its source, which carries the request id. A
repeat while the first runs gets 409 in its shape; a failed first call is retried, not
replayed. Answers older than the claim come from the record; neither answering means a
new call. Across instances (atomic claims): tests/test_server_instances.py.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta

import gevent
import pytest

from gateway import replay, srvlog, sse
from gateway.adapters import PROTOCOLS, ir
from gateway.db import database
from gateway.limiter import limiter
from gateway.models import Completion
from gateway.recorder import recorder
from tests import test_admission
from tests.test_admission import new_key, sent
from tests.test_proxy import ADMIN, CHAT, EMBEDDINGS, MESSAGES, RESPONSES, VALID, post

REQ = "X-NexusGate-ReqId"
FORMAT = {CHAT: "openai-chat", MESSAGES: "anthropic", RESPONSES: "openai-responses"}
setup = test_admission.setup  # the fixture: models on the fake upstream, a call id


def rows() -> list[Completion]:
    assert recorder.flush(5)
    with database.connection_context():
        return list(Completion.select().order_by(Completion.id))


def text_of_stream(path: str, data: bytes) -> tuple[str, bool]:
    """The answer text of a client stream, read back with its protocol's parser; whole?"""
    fmt = FORMAT[path]
    decoder, parser, acc = sse.Decoder(), PROTOCOLS[fmt].StreamParser(), ir.Accumulator()
    for event in decoder.feed(data) + decoder.flush():
        for e in parser.feed(event):
            acc.feed(e)
    for e in parser.finish():
        acc.feed(e)
    return ir.text_of(acc.result()["content"]), acc.terminal


def text_of_json(path: str, body: dict) -> str:
    fmt = FORMAT[path]
    return ir.text_of(PROTOCOLS[fmt].parse_response(body)["content"])


def test_a_repeat_gets_the_stored_answer_and_is_recorded_once_as_a_cache_hit(
    client, fake, setup
) -> None:  # type: ignore[no-untyped-def]
    key, key_id = new_key(client, rpmLimit=6)  # refills slowly: the count below holds
    first = post(client, CHAT, VALID[CHAT], key, **{REQ: " job-42 "})
    again = post(client, CHAT, VALID[CHAT], key, **{REQ: "job-42"})
    assert first.status_code == again.status_code == 200
    assert text_of_json(CHAT, again.get_json()) == text_of_json(CHAT, first.get_json())
    assert again.get_json()["usage"] == first.get_json()["usage"]
    assert sent(fake, setup) == 1, "the upstream is not asked again"
    source, hit = rows()
    assert (source.status, source.req_id, source.source_uid) == ("completed", "job-42", None)
    assert source.cached_response["content"][0]["text"] == text_of_json(CHAT, first.get_json())
    assert hit.status == "cache_hit" and hit.uid != source.uid
    assert (hit.source_completion_id, hit.source_uid, hit.req_id) == (source.id, source.uid, None)
    assert (hit.prompt_tokens, hit.completion_tokens) == (0, 0)  # the provider did no work
    assert hit.completion == source.completion and hit.model_id == source.model_id
    assert all(name in again.headers for name in ("X-RateLimit-Remaining-RPM",))
    listed = client.get(f"/api/admin/completions/{hit.id}", headers=ADMIN).get_json()
    assert (listed["status"], listed["sourceCompletionId"]) == ("cache_hit", source.id)
    usage = client.get(f"/api/admin/apiKey/{key}/usage", headers=ADMIN).get_json()["usage"]
    assert usage["rpm"]["current"] == 2  # a repeat is a request; it costs no tokens
    assert key_id == source.api_key_id


@pytest.mark.parametrize("path", [CHAT, MESSAGES, RESPONSES])
def test_a_repeat_streams_the_answer_in_its_own_format(client, fake, setup, path) -> None:  # type: ignore[no-untyped-def]
    key, _ = new_key(client)
    first = post(client, RESPONSES, VALID[RESPONSES], key, **{REQ: "job-7"})  # not streamed
    expected = text_of_json(RESPONSES, first.get_json())
    again = post(client, path, {**VALID[path], "stream": True}, key, **{REQ: "job-7"})
    assert again.status_code == 200 and again.mimetype == "text/event-stream"
    assert text_of_stream(path, again.get_data()) == (expected, True)
    assert sent(fake, setup) == 1
    assert [r.status for r in rows()] == ["completed", "cache_hit"]
    hit = rows()[1]
    assert hit.stream is True and hit.api_format == FORMAT[path]
    events = len(sse.Decoder().feed(again.get_data()))
    assert hit.delivered == {"events": events, "text": expected}  # all of it was written


def test_a_repeat_whose_client_left_before_its_stream_was_written_delivered_none(
    client, fake, setup
) -> None:  # type: ignore[no-untyped-def]
    key, _ = new_key(client)
    post(client, CHAT, VALID[CHAT], key, **{REQ: "gone-1"})
    body = json.dumps({**VALID[CHAT], "stream": True})
    headers = {"Authorization": f"Bearer {key}", REQ: "gone-1"}
    again = client.post(
        CHAT, data=body, headers=headers, content_type="application/json", buffered=False
    )
    assert again.status_code == 200
    again.close()  # the server closes the body unwritten: the client was gone
    hit = rows()[1]
    assert hit.status == "cache_hit" and hit.delivered == {"events": 0, "text": ""}
    assert [r.status for r in rows()] == ["completed", "cache_hit"]  # recorded once


def test_a_streamed_first_call_is_replayed_as_json(client, fake, setup) -> None:  # type: ignore[no-untyped-def]
    key, _ = new_key(client)
    first = post(client, MESSAGES, {**VALID[MESSAGES], "stream": True}, key, **{REQ: "s-1"})
    expected, whole = text_of_stream(MESSAGES, first.get_data())
    assert whole and expected
    again = post(client, CHAT, VALID[CHAT], key, **{REQ: "s-1"})
    assert again.mimetype == "application/json"
    assert text_of_json(CHAT, again.get_json()) == expected
    assert sent(fake, setup) == 1


@pytest.mark.parametrize("path", [CHAT, MESSAGES])
def test_a_repeat_while_the_first_runs_is_409_in_its_shape(client, fake, setup, path) -> None:  # type: ignore[no-untyped-def]
    key, _ = new_key(client)
    slow = {REQ: "busy-1", "X-Fake-Script": "first_delay=0.8"}
    first = gevent.spawn(post, client, CHAT, VALID[CHAT], key, **slow)
    gevent.sleep(0.3)
    busy = post(client, path, VALID[path], key, **{REQ: "busy-1"})
    assert busy.status_code == 409 and busy.mimetype == "application/json"
    body = busy.get_json()
    if path == MESSAGES:
        assert body["type"] == "error" and "code" not in body["error"]
    else:
        assert set(body) == ({"object", "error"} if path == RESPONSES else {"error"})
        assert body["error"]["code"] == "request_in_flight"
    error = body["error"]
    assert error["type"] == "conflict" and "busy-1" in error["message"]
    assert "still in flight" in error["message"]
    assert 28 <= int(busy.headers["Retry-After"]) <= 30  # NexusGate's 30 s guess, less the age
    # NexusGate's fields, in either shape: its clients read them unchanged.
    assert (error["req_id"], error["retry_after"]) == ("busy-1", int(busy.headers["Retry-After"]))
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", error["started_at"])
    started = datetime.fromisoformat(error["started_at"].replace("Z", "+00:00"))
    assert timedelta(0) <= datetime.now(UTC) - started < timedelta(seconds=5)
    assert first.get().status_code == 200
    assert sent(fake, setup) == 1 and [r.status for r in rows()] == ["completed"]
    assert post(client, path, VALID[path], key, **{REQ: "busy-1"}).status_code == 200  # replayed
    assert sent(fake, setup) == 1


def test_a_repeat_finding_another_repeat_holding_the_id_gets_the_recorded_answer(
    app, client, fake, setup
) -> None:  # type: ignore[no-untyped-def]
    # Once the answer has gone from the claim (DEDUP_TTL), a repeat claims the id while
    # it reads the record; a repeat meanwhile found the id "in flight" and got 409,
    # though the call had finished long before (a probe: 3 of 4 concurrent repeats,
    # with the record read slow). It looks in the record before it says 409.
    key, key_id = new_key(client)
    first = post(client, CHAT, VALID[CHAT], key, **{REQ: "done-1"})
    assert [r.status for r in rows()] == ["completed"]
    limiter.configure(app.config)  # the answer gone from the claim
    assert limiter.claim(key_id, "done-1", "another-repeat") is None  # it reads the record
    again = post(client, CHAT, VALID[CHAT], key, **{REQ: "done-1"})
    assert again.status_code == 200
    assert text_of_json(CHAT, again.get_json()) == text_of_json(CHAT, first.get_json())
    assert sent(fake, setup) == 1
    assert [r.status for r in rows()] == ["completed", "cache_hit"]


def test_a_failed_first_call_is_retried_not_replayed(client, fake, setup) -> None:  # type: ignore[no-untyped-def]
    key, _ = new_key(client)
    failed = post(
        client, CHAT, VALID[CHAT], key, **{REQ: "retry-me", "X-Fake-Script": "status=500"}
    )
    assert failed.status_code == 502
    retried = post(client, CHAT, VALID[CHAT], key, **{REQ: "retry-me"})
    assert retried.status_code == 200
    assert sent(fake, setup) == 3  # two tries of the failed call, then the retry
    assert [(r.status, r.req_id) for r in rows()] == [
        ("failed", "retry-me"),
        ("completed", "retry-me"),
    ]
    assert rows()[0].cached_response is None
    again = post(client, CHAT, VALID[CHAT], key, **{REQ: "retry-me"})
    assert text_of_json(CHAT, again.get_json()) == text_of_json(CHAT, retried.get_json())
    assert sent(fake, setup) == 3
    assert rows()[-1].source_uid == rows()[1].uid  # the retry's answer, not the failure


def test_a_stream_cut_off_midway_is_retried_not_replayed(client, fake, setup) -> None:  # type: ignore[no-untyped-def]
    key, _ = new_key(client)
    body = {**VALID[CHAT], "stream": True}
    broken = post(client, CHAT, body, key, **{REQ: "cut-1", "X-Fake-Script": "drop_at=3"})
    assert b'"error"' in broken.get_data()  # the client was told it broke off
    assert rows()[0].status == "failed" and rows()[0].completion  # the partial answer
    whole = post(client, CHAT, body, key, **{REQ: "cut-1"})
    assert text_of_stream(CHAT, whole.get_data()) == ("tok0 tok1 tok2 tok3 tok4 ", True)
    assert sent(fake, setup) == 2 and [r.status for r in rows()] == ["failed", "completed"]


def test_request_ids_are_per_key_and_not_kept_for_embeddings(client, fake, setup) -> None:  # type: ignore[no-untyped-def]
    (key_a, _), (key_b, _) = new_key(client), new_key(client)
    post(client, CHAT, VALID[CHAT], key_a, **{REQ: "shared"})
    post(client, CHAT, VALID[CHAT], key_b, **{REQ: "shared"})
    assert sent(fake, setup) == 2
    for _ in range(2):  # embeddings have no record column for it: every call is made
        assert post(client, EMBEDDINGS, VALID[EMBEDDINGS], key_a, **{REQ: "e"}).status_code == 200
    assert sent(fake, setup) == 4


@pytest.mark.parametrize(
    ("value", "code"),
    [("x" * 128, "reqid_too_long"), ("a b", "reqid_invalid_characters"),
     ("a\x01b", "reqid_invalid_characters"), ("日本", "reqid_invalid_characters")],
)  # fmt: skip
def test_a_malformed_request_id_is_400_and_goes_nowhere(client, fake, setup, value, code) -> None:  # type: ignore[no-untyped-def]
    key, _ = new_key(client)
    resp = post(client, CHAT, VALID[CHAT], key, **{REQ: value})
    assert resp.status_code == 400 and resp.get_json()["error"]["code"] == code
    assert sent(fake, setup) == 0 and rows() == []


def test_an_older_answer_comes_from_the_record(app, client, fake, setup, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    key, _ = new_key(client)
    first = post(client, MESSAGES, VALID[MESSAGES], key, **{REQ: "old-1"})
    rows()  # written
    limiter.configure(app.config)  # the claims are gone (Redis restarted, or DEDUP_TTL passed)
    again = post(client, CHAT, {**VALID[CHAT], "stream": True}, key, **{REQ: "old-1"})
    assert text_of_stream(CHAT, again.get_data()) == (
        text_of_json(MESSAGES, first.get_json()),
        True,
    )
    assert sent(fake, setup) == 1
    source, hit = rows()
    assert hit.status == "cache_hit" and hit.source_completion_id == source.id
    assert (source.req_id, hit.req_id) == ("old-1", None)
    # The answer read from the record is kept in the claim again: later repeats do not
    # need the database.
    from gateway import db as db_module

    monkeypatch.setattr(db_module, "background", None)  # any use of it would fail
    assert post(client, CHAT, VALID[CHAT], key, **{REQ: "old-1"}).status_code == 200
    assert sent(fake, setup) == 1 and [r.status for r in rows()].count("cache_hit") == 2


def test_no_stored_answer_anywhere_makes_a_new_call(app, client, fake, setup, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    from gateway import db as db_module

    key, _ = new_key(client)
    post(client, CHAT, VALID[CHAT], key, **{REQ: "gone-1"})
    rows()
    limiter.configure(app.config)
    asked = []

    @contextmanager
    def database_away(timeout: float) -> Iterator[None]:
        asked.append(timeout)
        raise OSError("connection refused")
        yield

    monkeypatch.setattr(db_module, "background", database_away)
    # The recorder writes the first call's record on its own connection, which this
    # test leaves working, and would find the database reachable again: it is away for
    # everything this test asks, so only a failure counts.
    real_mark = db_module.mark_reachable
    monkeypatch.setattr(db_module, "mark_reachable", lambda ok: None if ok else real_mark(ok))
    # The server-log writer asks the database too (for the warning replay logs), at its
    # next turn; it is not what this test counts.
    monkeypatch.setattr(srvlog.handler, "write", lambda timeout=None: 0)
    try:
        assert post(client, CHAT, VALID[CHAT], key, **{REQ: "gone-1"}).status_code == 200
        assert post(client, CHAT, VALID[CHAT], key, **{REQ: "gone-2"}).status_code == 200
        assert sent(fake, setup) == 3  # both made anew: the claim had nothing, the database away
        assert asked == [replay.READ_TIMEOUT]  # and the database is not asked again meanwhile
    finally:
        real_mark(True)
