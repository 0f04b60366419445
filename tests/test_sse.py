"""The SSE decoder at every byte split of recorded streams, and the encoder."""

from __future__ import annotations

import pytest

from gateway import sse

OPENAI_CHAT = (
    b'data: {"id":"chatcmpl-1","object":"chat.completion.chunk","created":1,"model":"m",'
    b'"choices":[{"index":0,"delta":{"role":"assistant","content":""},"finish_reason":null}]}\n\n'
    b'data: {"id":"chatcmpl-1","object":"chat.completion.chunk","created":1,"model":"m",'
    b'"choices":[{"index":0,"delta":{"content":"Hel"},"finish_reason":null}]}\n\n'
    b'data: {"id":"chatcmpl-1","object":"chat.completion.chunk","created":1,"model":"m",'
    b'"choices":[{"index":0,"delta":{"content":"lo \xe4\xbd\xa0\xe5\xa5\xbd"},"finish_reason":null}]}\n\n'
    b'data: {"id":"chatcmpl-1","object":"chat.completion.chunk","created":1,"model":"m",'
    b'"choices":[{"index":0,"delta":{},"finish_reason":"stop"}]}\n\n'
    b'data: {"id":"chatcmpl-1","object":"chat.completion.chunk","created":1,"model":"m",'
    b'"choices":[],"usage":{"prompt_tokens":9,"completion_tokens":3,"total_tokens":12}}\n\n'
    b"data: [DONE]\n\n"
)

ANTHROPIC = (
    b"event: message_start\r\n"
    b'data: {"type":"message_start","message":{"id":"msg_1","type":"message","role":"assistant",'
    b'"content":[],"model":"claude","stop_reason":null,"usage":{"input_tokens":25,"output_tokens":1}}}\r\n\r\n'
    b"event: ping\r\n"
    b'data: {"type": "ping"}\r\n\r\n'
    b"event: content_block_start\r\n"
    b'data: {"type":"content_block_start","index":0,"content_block":{"type":"text","text":""}}\r\n\r\n'
    b"event: content_block_delta\r\n"
    b'data: {"type":"content_block_delta","index":0,"delta":{"type":"text_delta","text":"Hi"}}\r\n\r\n'
    b"event: content_block_stop\r\n"
    b'data: {"type":"content_block_stop","index":0}\r\n\r\n'
    b"event: message_delta\r\n"
    b'data: {"type":"message_delta","delta":{"stop_reason":"end_turn"},"usage":{"output_tokens":15}}\r\n\r\n'
    b"event: message_stop\r\n"
    b'data: {"type":"message_stop"}\r\n\r\n'
)

# Bare CR line endings, a comment heartbeat, multi-line data, id and retry fields,
# a field with no space after the colon, and an unterminated last event.
ODD = (
    b": keep-alive\r\r"
    b'event:response.output_text.delta\rdata:{"delta":"a"}\r\r'
    b"id: 7\nretry: 1500\ndata: line one\ndata: line two\n\n"
    b"data:  leading space kept\n\n"
    b"data: [DONE]"
)


def decode(chunks: list[bytes], max_event: int | None = None) -> list[sse.Event]:
    decoder = sse.Decoder(max_event)
    events: list[sse.Event] = []
    for chunk in chunks:
        events.extend(decoder.feed(chunk))
    events.extend(decoder.flush())
    return events


def fields(events: list[sse.Event]) -> list[tuple]:
    return [(e.event, e.data, e.id, e.retry, e.comments) for e in events]


@pytest.mark.parametrize("stream", [OPENAI_CHAT, ANTHROPIC, ODD], ids=["chat", "anthropic", "odd"])
def test_every_split_gives_the_same_events_and_bytes(stream: bytes) -> None:
    whole = decode([stream])
    for cut in range(len(stream) + 1):
        events = decode([stream[:cut], stream[cut:]])
        assert fields(events) == fields(whole), f"split at byte {cut}"
        assert b"".join(e.raw for e in events) == stream


@pytest.mark.parametrize("stream", [OPENAI_CHAT, ANTHROPIC, ODD], ids=["chat", "anthropic", "odd"])
def test_one_byte_at_a_time(stream: bytes) -> None:
    events = decode([stream[i : i + 1] for i in range(len(stream))])
    assert fields(events) == fields(decode([stream]))
    assert b"".join(e.raw for e in events) == stream


def test_crlf_straddling_two_chunks_ends_one_line_not_two() -> None:
    events = decode([b"data: a\r", b"\ndata: b\r", b"\n\r", b"\n"])
    assert fields(events) == [(None, "a\nb", None, None, [])]


def test_chat_stream_fields() -> None:
    events = decode([OPENAI_CHAT])
    assert len(events) == 6
    assert events[2].data.endswith('"content":"lo 你好"},"finish_reason":null}]}')
    assert events[-1].data == "[DONE]"
    assert all(e.type == "message" for e in events)


def test_anthropic_stream_event_types() -> None:
    types = [e.type for e in decode([ANTHROPIC])]
    assert types == [
        "message_start",
        "ping",
        "content_block_start",
        "content_block_delta",
        "content_block_stop",
        "message_delta",
        "message_stop",
    ]


def test_odd_stream_fields() -> None:
    events = decode([ODD])
    assert fields(events) == [
        (None, None, None, None, ["keep-alive"]),
        ("response.output_text.delta", '{"delta":"a"}', None, None, []),
        (None, "line one\nline two", "7", 1500, []),
        (None, " leading space kept", None, None, []),
        (None, "[DONE]", None, None, []),
    ]


def test_flush_of_an_empty_decoder_is_empty() -> None:
    decoder = sse.Decoder()
    assert decoder.flush() == []
    assert decoder.feed(b"") == []


def test_encode_round_trips_through_the_decoder() -> None:
    frame = sse.encode('{"a": 1}\nsecond', event="content_block_delta")
    assert frame == b'event: content_block_delta\ndata: {"a": 1}\ndata: second\n\n'
    (event,) = decode([frame])
    assert (event.event, event.data) == ("content_block_delta", '{"a": 1}\nsecond')


def test_comment_frame_is_ignored_by_parsers() -> None:
    (event,) = decode([sse.comment("probe")])
    assert event.data is None and event.comments == ["probe"]


def test_random_streams_and_random_splits() -> None:
    import random

    rng = random.Random(20261124)
    eols = [b"\n", b"\r", b"\r\n"]
    lines = [b"data: x", b'data: {"k": "v"}', b"event: e", b": c", b"id: 1", b"retry: 5", b"data"]
    for _ in range(300):
        stream = b"".join(
            rng.choice(lines) + rng.choice(eols) + (rng.choice(eols) if rng.random() < 0.4 else b"")
            for _ in range(rng.randint(1, 12))
        )
        whole = decode([stream])
        cuts = sorted(rng.sample(range(len(stream) + 1), k=min(4, len(stream) + 1)))
        chunks = [stream[a:b] for a, b in zip([0, *cuts], [*cuts, len(stream)], strict=True)]
        events = decode(chunks)
        assert fields(events) == fields(whole), stream
        assert b"".join(e.raw for e in events) == stream
        bounded = decode(chunks, max_event=max(len(e.raw) for e in whole))
        assert fields(bounded) == fields(whole), stream


# -- the bound on an event not yet ended


def test_an_event_that_never_ends_is_refused_once_past_the_bound() -> None:
    decoder = sse.Decoder(max_event=100)
    assert decoder.feed(b"data: " + b"x" * 94) == []  # 100 bytes held: at the bound
    assert decoder.feed(b"x") == []  # 101, refused when more comes
    with pytest.raises(sse.TooLarge, match="unfinished after 101 bytes"):
        decoder.feed(b"x")


def test_lines_without_the_blank_line_count_towards_the_bound() -> None:
    decoder = sse.Decoder(max_event=100)
    assert decoder.feed(b"data: x\n" * 13) == []  # 104 bytes of one event's lines
    with pytest.raises(sse.TooLarge):
        decoder.feed(b"data: x\n")


def test_the_events_a_chunk_ended_come_out_before_the_refusal() -> None:
    decoder = sse.Decoder(max_event=100)
    (event,) = decoder.feed(b"data: a\n\n" + b"data: " + b"x" * 200)
    assert event.data == "a" and event.raw == b"data: a\n\n"
    with pytest.raises(sse.TooLarge):
        decoder.feed(b"\n\n")


@pytest.mark.parametrize("stream", [OPENAI_CHAT, ANTHROPIC, ODD], ids=["chat", "anthropic", "odd"])
def test_events_as_large_as_the_bound_pass_at_every_split(stream: bytes) -> None:
    whole = decode([stream])
    bound = max(len(e.raw) for e in whole)
    for cut in range(len(stream) + 1):
        events = decode([stream[:cut], stream[cut:]], max_event=bound)
        assert fields(events) == fields(whole), f"split at byte {cut}"
    one_by_one = decode([stream[i : i + 1] for i in range(len(stream))], max_event=bound)
    assert fields(one_by_one) == fields(whole)


def test_without_a_bound_an_event_may_be_any_size() -> None:
    (event,) = decode([b"data: "] + [b"x" * 1_000_000] * 8)
    assert event.data == "x" * 8_000_000
