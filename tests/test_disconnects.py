"""Hang-ups, stalls and lying upstreams, through real gunicorn and the openai SDK.

Each test of a setting (drain bound, drain cap, cancel mode, read timeout) starts its
own gateway with it; the others share the module's. Each checks both the record and
what the fake upstream saw of its own response.
"""

from __future__ import annotations

import socket
import struct
import time

import openai
import pytest

from tests.servers import Gateway, own_route, post_on_socket, wait_until

pytestmark = pytest.mark.server

PROMPT = [{"role": "user", "content": "tell me a story"}]


@pytest.fixture(autouse=True)
def _fresh_fake_log(fake) -> None:  # type: ignore[no-untyped-def]
    fake.reset()


def words(n: int) -> str:
    return "".join(f"tok{i} " for i in range(n))


@pytest.fixture
def gateway(module_gateway: Gateway) -> Gateway:
    """The module's gateway, for the tests that need no settings of their own.

    They keep apart by their own model name and key (``own_route``): a gateway starts
    and stops in 3-4 s, longer than most of these tests take.
    """
    return module_gateway


def client_for(gw: Gateway, key: str, **kwargs: object) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{gw.url}/v1", api_key=key, max_retries=0, **kwargs)


def read_then_hang_up(gw: Gateway, key: str, pieces: int) -> str:
    """Stream, read ``pieces`` text pieces, then close the connection."""
    stream = client_for(gw, key).chat.completions.create(model="fake", messages=PROMPT, stream=True)
    seen = ""
    for chunk in stream:
        seen += chunk.choices[0].delta.content or "" if chunk.choices else ""
        if seen.count("tok") == pieces:
            break
    stream.close()
    return seen


def test_cancel_mode_closes_the_upstream_and_records_the_partial_answer(
    gateway_factory, fake
) -> None:  # type: ignore[no-untyped-def]
    gw = gateway_factory(GATEWAY_ON_DISCONNECT="cancel")
    route = gw.setup_route(fake.url, remote_id="fake;id=x1;chunks=40;delay=0.05")
    read_then_hang_up(gw, route["key"], 3)
    (row,) = gw.wait_final(1)
    assert row["status"] == "aborted"
    assert "ON_DISCONNECT=cancel" in row["error"]
    assert row["completion"][0]["content"].startswith(words(3))
    assert len(row["completion"][0]["content"]) < len(words(40))
    assert wait_until(lambda: fake.log("x1")[0]["outcome"] == "client_gone")


def test_a_drain_is_bounded_by_drain_timeout(gateway_factory, fake) -> None:  # type: ignore[no-untyped-def]
    gw = gateway_factory(GATEWAY_DRAIN_TIMEOUT="0.5")
    route = gw.setup_route(fake.url, remote_id="fake;id=x2;chunks=100;delay=0.05")  # 5 s
    started = time.monotonic()
    read_then_hang_up(gw, route["key"], 2)
    (row,) = gw.wait_final(1)
    assert time.monotonic() - started < 3
    assert row["status"] == "aborted" and "DRAIN_TIMEOUT" in row["error"]
    assert words(2) in row["completion"][0]["content"]
    assert row["completionTokens"] == -1  # the usage never came
    assert wait_until(lambda: fake.log("x2")[0]["outcome"] == "client_gone")


def test_past_the_drain_cap_a_hang_up_cancels(gateway_factory, fake) -> None:  # type: ignore[no-untyped-def]
    gw = gateway_factory(GATEWAY_MAX_DRAINS="0")
    route = gw.setup_route(fake.url, remote_id="fake;id=x3;chunks=40;delay=0.05")
    read_then_hang_up(gw, route["key"], 2)
    (row,) = gw.wait_final(1)
    assert row["status"] == "aborted" and "MAX_DRAINS" in row["error"]
    assert wait_until(lambda: fake.log("x3")[0]["outcome"] == "client_gone")


def test_a_hang_up_during_an_upstream_stall_is_noticed_without_a_write(
    gateway_factory, fake
) -> None:  # type: ignore[no-untyped-def]
    # The upstream goes silent for 20 s after 3 events; in cancel mode the gateway
    # must notice the hang-up from the socket and close the upstream long before.
    gw = gateway_factory(GATEWAY_ON_DISCONNECT="cancel", GATEWAY_HEARTBEAT_INTERVAL="30")
    route = gw.setup_route(fake.url, remote_id="fake;id=x4;chunks=10;stall_at=3;stall_for=20")
    read_then_hang_up(gw, route["key"], 2)
    left = time.monotonic()
    (row,) = gw.wait_final(1, timeout=10)
    assert time.monotonic() - left < 3
    assert row["status"] == "aborted"
    assert row["completion"][0]["content"] == words(2)


def test_a_non_streaming_hang_up_in_cancel_mode_is_noticed_at_once(gateway_factory, fake) -> None:  # type: ignore[no-untyped-def]
    gw = gateway_factory(GATEWAY_ON_DISCONNECT="cancel")
    route = gw.setup_route(fake.url, remote_id="fake;id=x5;first_delay=10")
    with pytest.raises(openai.APITimeoutError):
        client_for(gw, route["key"], timeout=0.3).chat.completions.create(
            model="fake", messages=PROMPT
        )
    left = time.monotonic()
    (row,) = gw.wait_final(1)
    assert time.monotonic() - left < 2
    assert row["status"] == "aborted" and row["completion"] == []


def test_upstream_silent_before_answering_is_a_504(gateway_factory, fake) -> None:  # type: ignore[no-untyped-def]
    gw = gateway_factory(GATEWAY_READ_TIMEOUT="0.5")
    route = gw.setup_route(fake.url, remote_id="fake;id=x6;header_delay=3")
    with pytest.raises(openai.APIStatusError) as info:
        client_for(gw, route["key"]).chat.completions.create(model="fake", messages=PROMPT)
    assert info.value.status_code == 504
    (row,) = gw.wait_final(1)
    assert row["status"] == "failed"
    assert [a["outcome"] for a in row["attempts"]] == ["timeout", "timeout"]


def test_upstream_stalling_mid_stream_fails_with_the_partial_answer(gateway_factory, fake) -> None:  # type: ignore[no-untyped-def]
    gw = gateway_factory(GATEWAY_READ_TIMEOUT="0.5")
    route = gw.setup_route(fake.url, remote_id="fake;id=x7;chunks=10;stall_at=4;stall_for=3")
    stream = client_for(gw, route["key"]).chat.completions.create(
        model="fake", messages=PROMPT, stream=True
    )
    seen = ""
    with pytest.raises(openai.APIError):
        for chunk in stream:
            seen += chunk.choices[0].delta.content or "" if chunk.choices else ""
    assert seen == words(3)
    (row,) = gw.wait_final(1)
    assert row["status"] == "failed" and "timeout" in row["error"]
    assert row["completion"][0]["content"] == words(3)


@pytest.mark.parametrize("framing", ["", ";gzip=1"], ids=["relayed", "gzip-read-apart"])
def test_a_stream_still_flowing_at_call_timeout_is_ended_with_its_partial_answer(
    gateway_factory, fake, framing: str
) -> None:  # type: ignore[no-untyped-def]
    """CALL_TIMEOUT bounds a stream whose upstream never goes silent for a read timeout:
    the relay's timer ends it as the waiting greenlet's Timeout does."""
    gw = gateway_factory(GATEWAY_CALL_TIMEOUT="1.5")
    route = gw.setup_route(fake.url, remote_id=f"fake;id=x8;chunks=20;delay=0.3{framing}")
    stream = client_for(gw, route["key"]).chat.completions.create(
        model="fake", messages=PROMPT, stream=True
    )
    seen = ""
    started = time.monotonic()
    with pytest.raises(openai.APIError) as info:
        for chunk in stream:
            seen += chunk.choices[0].delta.content or "" if chunk.choices else ""
    assert time.monotonic() - started < 3
    assert "ended the call" in str(info.value)
    (row,) = gw.wait_final(1)
    assert row["status"] == "failed" and "CALL_TIMEOUT" in row["error"]
    assert 2 <= seen.count("tok") <= 6
    assert row["completion"][0]["content"] == seen
    (sent,) = fake.log("x8")
    assert sent["outcome"] == "client_gone"  # the upstream was closed, not read on


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
def test_an_upstream_answering_garbage_is_failed_over_then_502(gateway, fake, stream: bool) -> None:  # type: ignore[no-untyped-def]
    gw = gateway
    route = own_route(gw, fake.url, remote_id="fake;id=x8;garbage=1")
    with pytest.raises(openai.APIStatusError) as info:
        result = client_for(gw, route["key"]).chat.completions.create(
            model=route["name"], messages=PROMPT, stream=stream
        )
        list(result) if stream else None
    assert info.value.status_code == 502
    (row,) = gw.wait_final(1, apiKeyId=route["key_id"])
    assert row["status"] == "failed" and len(row["attempts"]) == 2
    assert all(a["outcome"] == "protocol" for a in row["attempts"])


@pytest.mark.parametrize("linger", [0, 1])
def test_an_upstream_error_event_fails_the_call(gateway, fake, linger: int) -> None:  # type: ignore[no-untyped-def]
    # The SDK raises on the error event and hangs up; the upstream may end its body only
    # later (linger): the client left after the upstream failed, not before.
    gw = gateway
    script = f"fake;id=x9-{linger};chunks=3;error_event=1;linger={linger}"
    route = own_route(gw, fake.url, remote_id=script)
    stream = client_for(gw, route["key"]).chat.completions.create(
        model=route["name"], messages=PROMPT, stream=True
    )
    with pytest.raises(openai.APIError) as info:
        list(stream)
    assert "fake upstream failure" in str(info.value)
    (row,) = gw.wait_final(1, apiKeyId=route["key_id"])
    assert row["status"] == "failed" and "fake upstream failure" in row["error"]
    assert row["completion"][0]["content"] == words(3)


def _raw_stream_request(gw: Gateway, route: dict) -> socket.socket:
    body = {"model": route["name"], "messages": PROMPT, "stream": True}
    return post_on_socket(gw, "/v1/chat/completions", body, route["key"])


def _read_to_done(sock: socket.socket) -> bytes:
    """What the stream sent up to its ``[DONE]``, read as it comes (10 s at most a read)."""
    received = b""
    sock.settimeout(10)
    while b"[DONE]" not in received:
        data = sock.recv(65536)
        assert data, f"connection closed early after {received[-200:]!r}"
        received += data
    return received


def test_a_half_closing_client_still_gets_the_whole_stream(gateway, fake) -> None:  # type: ignore[no-untyped-def]
    # It sends its request, then shuts its side (FIN), and keeps reading: that is
    # not a hang-up. The gateway probes instead of cutting it off.
    gw = gateway
    route = own_route(gw, fake.url, remote_id="fake;id=h1;chunks=10;delay=0.1")
    sock = _raw_stream_request(gw, route)
    sock.shutdown(socket.SHUT_WR)
    received = _read_to_done(sock)
    sock.close()
    assert all(f"tok{i} ".encode() in received for i in range(10))
    (row,) = gw.wait_final(1, apiKeyId=route["key_id"])
    assert row["status"] == "completed"


def _read_until(sock: socket.socket, marker: bytes) -> bytes:
    sock.settimeout(10)
    received = b""
    while marker not in received:
        received += sock.recv(65536)
    return received


def test_a_fin_just_before_the_terminal_event_is_a_hang_up(gateway, fake) -> None:  # type: ignore[no-untyped-def]
    # The client closes (FIN) after the last piece; the terminal event follows 0.15 s
    # later, before the probes can have confirmed that FIN. The client left first: the
    # status is decided by when the FIN was seen, not by when it was confirmed.
    gw = gateway
    route = own_route(gw, fake.url, remote_id="fake;id=h3;chunks=5;end_delay=0.15")
    sock = _raw_stream_request(gw, route)
    received = _read_until(sock, b"tok4 ")
    sock.close()
    (row,) = gw.wait_final(1, apiKeyId=route["key_id"])
    assert row["status"] == "aborted", row["error"]
    assert row["error"] == "client disconnected; the upstream was read to its end"
    assert row["completion"][0]["content"] == words(5)
    assert fake.log("h3")[0]["outcome"] == "complete"
    assert b"[DONE]" not in received


def test_a_stream_idle_upstream_gets_heartbeats_then_the_rest(gateway_factory, fake) -> None:  # type: ignore[no-untyped-def]
    # The upstream goes silent for 1.1 s after tok0: the client hears a keep-alive
    # comment every 0.2 s meanwhile (nothing else writes to it then), then the rest.
    gw = gateway_factory(GATEWAY_HEARTBEAT_INTERVAL="0.2")
    route = own_route(gw, fake.url, remote_id="fake;id=hb;chunks=4;stall_at=2;stall_for=1.1")
    sock = _raw_stream_request(gw, route)
    received = _read_until(sock, b"[DONE]")
    sock.close()
    stall = received[received.index(b"tok0 ") : received.index(b"tok1 ")]
    assert 3 <= stall.count(b": keep-alive") <= 7, stall
    (row,) = gw.wait_final(1, apiKeyId=route["key_id"])
    assert row["status"] == "completed"
    assert row["completion"][0]["content"] == words(4)


def test_a_reset_connection_is_a_hang_up(gateway, fake) -> None:  # type: ignore[no-untyped-def]
    gw = gateway
    route = own_route(gw, fake.url, remote_id="fake;id=h2;chunks=20;delay=0.05")
    sock = _raw_stream_request(gw, route)
    _read_until(sock, b"tok1 ")
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()  # RST
    (row,) = gw.wait_final(1, apiKeyId=route["key_id"])
    assert row["status"] == "aborted"
    assert row["completion"][0]["content"] == words(20)
    assert fake.log("h2")[0]["outcome"] == "complete"


def _reset_before_the_first_byte(gw: Gateway, route: dict) -> None:
    """A stream asked for, then the connection reset while the upstream is still silent."""
    sock = _raw_stream_request(gw, route)
    time.sleep(0.1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()  # RST


def test_a_stream_whose_client_left_before_its_first_byte_is_drained(gateway, fake) -> None:  # type: ignore[no-untyped-def]
    # The upstream is silent for 0.5 s before its first event; the client resets after
    # 0.1 s. Nobody takes the stream: it is read to its end and recorded as such.
    gw = gateway
    route = own_route(gw, fake.url, remote_id="fake;id=h0;chunks=5;stall_at=0;stall_for=0.5")
    _reset_before_the_first_byte(gw, route)
    (row,) = gw.wait_final(1, apiKeyId=route["key_id"])
    assert row["status"] == "aborted"
    assert row["error"] == "client disconnected; the upstream was read to its end"
    assert row["completion"][0]["content"] == words(5)
    assert row["delivered"] == {"events": 0, "text": ""}
    assert fake.log("h0")[0]["outcome"] == "complete"


@pytest.mark.parametrize("how", ["reset", "close"])
def test_a_stream_whose_client_left_before_its_first_byte_is_cancelled(
    gateway_factory, fake, how: str
) -> None:  # type: ignore[no-untyped-def]
    # A reset is a departure. A normal close (FIN), as an SDK's is, may also be a
    # half-close from a client that still reads, which only a write tells apart: before
    # the first event there was nothing to write, and the upstream ran on until then.
    gw = gateway_factory(GATEWAY_ON_DISCONNECT="cancel")
    mark = f"h00-{how}"
    route = own_route(gw, fake.url, remote_id=f"fake;id={mark};chunks=5;stall_at=0;stall_for=2")
    started = time.monotonic()
    if how == "reset":
        _reset_before_the_first_byte(gw, route)
    else:
        sock = _raw_stream_request(gw, route)
        time.sleep(0.1)
        sock.close()  # FIN
    (row,) = gw.wait_final(1, timeout=10)
    assert time.monotonic() - started < 1.5  # not the upstream's 2 s of silence
    assert row["status"] == "aborted"
    assert "ON_DISCONNECT=cancel" in row["error"]
    assert fake.log(mark)[0]["outcome"] == "client_gone"


def test_a_half_closing_client_in_cancel_mode_gets_an_interim_answer_then_its_stream(
    gateway_factory, fake
) -> None:  # type: ignore[no-untyped-def]
    # The probe that tells it from a client that left is an interim 100 Continue (HTTP/1.1
    # clients take them before any answer); it reads on, and is not cancelled.
    gw = gateway_factory(GATEWAY_ON_DISCONNECT="cancel")
    route = own_route(gw, fake.url, remote_id="fake;id=fin1;chunks=5;first_delay=1.5")
    sock = _raw_stream_request(gw, route)
    sock.shutdown(socket.SHUT_WR)
    received = _read_until(sock, b"[DONE]")
    sock.close()
    assert received.startswith(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\n")
    assert all(f"tok{i} ".encode() in received for i in range(5))
    (row,) = gw.wait_final(1, apiKeyId=route["key_id"])
    assert row["status"] == "completed"


def test_a_client_that_never_reads_its_first_event_is_dropped_after_the_write_timeout(
    gateway_factory, fake
) -> None:  # type: ignore[no-untyped-def]
    # A Responses stream's first events echo its instructions: 2 x 3 MB here, more than
    # the socket buffers hold, so the write of the headers with them cannot end while
    # the client reads nothing. After CLIENT_WRITE_TIMEOUT the client counts as gone:
    # the call goes on without it (drained, here) and is recorded, nothing delivered.
    gw = gateway_factory(GATEWAY_CLIENT_WRITE_TIMEOUT="1")
    route = own_route(gw, fake.url, remote_id="fake;id=big0;chunks=5;delay=0.5")
    body = {"model": route["name"], "input": "hi", "instructions": "x" * 3_000_000, "stream": True}
    started = time.monotonic()
    sock = post_on_socket(gw, "/v1/responses", body, route["key"], rcvbuf=4096)
    (row,) = gw.wait_final(1, timeout=10, apiKeyId=route["key_id"])
    assert time.monotonic() - started < 5
    sock.close()
    assert row["status"] == "aborted"
    assert row["error"] == "client disconnected; the upstream was read to its end"
    assert row["completion"][0]["content"] == words(5)
    assert row["delivered"] == {"events": 0, "text": ""}
    assert fake.log("big0")[0]["outcome"] == "complete"
    assert "closed a connection whose client stopped reading" in gw.log()
    assert "Traceback" not in gw.log()


def test_a_client_that_never_reads_its_json_answer_is_dropped_after_the_write_timeout(
    gateway_factory, fake
) -> None:  # type: ignore[no-untyped-def]
    # A 6 MB JSON answer to a client that reads none of it: the call is recorded before
    # the write, and the write gives up after CLIENT_WRITE_TIMEOUT. Without that, the
    # connection's greenlet would wait forever, and every shutdown for graceful_timeout.
    gw = gateway_factory(GATEWAY_CLIENT_WRITE_TIMEOUT="1", GATEWAY_GRACEFUL_TIMEOUT="20")
    route = own_route(gw, fake.url, remote_id="fake;id=bigjson;chunks=1000;pad=6000")
    body = {"model": route["name"], "messages": PROMPT}
    sock = post_on_socket(gw, "/v1/chat/completions", body, route["key"], rcvbuf=4096)
    (row,) = gw.wait_final(1, timeout=10, apiKeyId=route["key_id"])
    assert row["status"] == "completed"
    wait_until(lambda: "closed a connection whose client stopped reading" in gw.log(), timeout=5)
    assert "Traceback" not in gw.log()
    sock.close()
    stopping = time.monotonic()
    gw.stop()
    assert time.monotonic() - stopping < 8  # not graceful_timeout (20 s)


def test_one_kept_alive_connection_serves_streams_and_answers_in_turn(gateway, fake) -> None:  # type: ignore[no-untyped-def]
    # The watcher of each call must be gone before the connection's next request.
    gw = gateway
    route = own_route(gw, fake.url, remote_id="fake;id=k1;chunks=3")
    client = client_for(gw, route["key"])
    for i in range(6):
        if i % 2:
            text = (
                client.chat.completions.create(model=route["name"], messages=PROMPT)
                .choices[0]
                .message.content
            )
        else:
            stream = client.chat.completions.create(
                model=route["name"], messages=PROMPT, stream=True
            )
            text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
        assert text == words(3)
    rows = gw.wait_final(6, apiKeyId=route["key_id"])
    assert [r["status"] for r in rows] == ["completed"] * 6


def test_a_streams_dues_are_settled_before_its_last_event_reaches_the_client(gateway, fake) -> None:  # type: ignore[no-untyped-def]
    """The client's next call, sent on reading the terminal event, finds the slot free
    and the tokens charged (README, Several instances). The upstream here ends its body
    3 s after its last event: the call's end waited for that, and the client, which
    has its whole answer at the terminal event, met a slot still held (429). A probe
    saw the same on a busy worker, where the finishing greenlet ran late."""
    gw = gateway
    limits = {"maxConcurrent": 1, "tpmLimit": 60}  # refilled at 1 token a second
    route = own_route(gw, fake.url, remote_id="fake;id=dues;chunks=3;linger=3", key=limits)
    started = time.monotonic()
    sock = _raw_stream_request(gw, route)
    _read_to_done(sock)
    assert time.monotonic() - started < 2  # the lingering body was not waited for
    usage = gw.api("GET", f"/apiKey/{route['key']}/usage")["usage"]
    assert usage["tpm"]["current"] > 0  # charged already
    nxt = client_for(gw, route["key"]).chat.completions.with_raw_response.create(
        model=route["name"], messages=PROMPT
    )
    assert nxt.status_code == 200  # the slot was free
    sock.close()
    rows = gw.wait_final(2, apiKeyId=route["key_id"])
    assert sorted(r["status"] for r in rows) == ["completed", "completed"]
