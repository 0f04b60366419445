"""The chunked decoder reads what http.client reads, however the bytes are split."""

from __future__ import annotations

import http.client
import io

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.chunked import MAX_LINE, MAX_TRAILERS, Chunked
from tests.fuzz_support import FUZZ

HEAD = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"


class _Socket:
    def __init__(self, data: bytes) -> None:
        self._data = data

    def makefile(self, mode: str) -> io.BufferedReader:
        return io.BufferedReader(io.BytesIO(self._data))


def by_http_client(body: bytes) -> bytes | None:
    """The body http.client reads from ``body`` on the wire, None if it fails."""
    resp = http.client.HTTPResponse(_Socket(HEAD + body))  # type: ignore[arg-type]
    resp.begin()
    try:
        return resp.read()
    except (http.client.HTTPException, ValueError):
        return None


def by_chunked(body: bytes, cuts: list[int]) -> bytes | None:
    """The body the decoder reads from ``body`` arriving in reads cut at ``cuts``, None
    if it fails (only ever with ValueError)."""
    decoder, out, start = Chunked(), [], 0
    try:
        for end in [*sorted(set(cuts)), len(body)]:
            if not decoder.done and end > start:
                out.append(decoder.feed(body[start:end]))
                start = end
        if not decoder.done:
            decoder.ended()
    except ValueError:
        return None
    assert decoder.done
    return b"".join(out)


def encode(chunks: list[bytes], sizes: list[str], trailers: list[bytes], end: bytes) -> bytes:
    """A chunked body: each chunk's size written as ``sizes`` says (``%x``, ``%X``, zero
    padded, with an extension), then the last chunk, trailers and ``end``."""
    out = []
    for i, chunk in enumerate(chunks):
        form = sizes[i % len(sizes)] if sizes else "%x"
        out.append((form % len(chunk)).encode() + b"\r\n" + chunk + b"\r\n")
    return b"".join(out) + b"0\r\n" + b"".join(t + b"\r\n" for t in trailers) + end


chunk_lists = st.lists(st.binary(min_size=1, max_size=300), max_size=8)
size_forms = st.lists(st.sampled_from(["%x", "%X", "%04x", "%x;ext=1", "%x ; a=b;c", "%x\t"]))
trailer_lists = st.lists(
    st.sampled_from([b"X-Checksum: abc", b"a:b", b"Server-Timing: x;dur=1"]), max_size=3
)
cut_lists = st.lists(st.integers(min_value=0, max_value=3000), max_size=12)


@settings(FUZZ, max_examples=1500)
@given(chunk_lists, size_forms, trailer_lists, st.sampled_from([b"\r\n", b"\n", b""]), cut_lists)
def test_a_well_formed_body_decodes_to_its_chunks_however_it_is_cut(
    chunks: list[bytes], sizes: list[str], trailers: list[bytes], end: bytes, cuts: list[int]
) -> None:
    body = encode(chunks, sizes, trailers, end)
    assert by_chunked(body, cuts) == b"".join(chunks) == by_http_client(body)


@settings(FUZZ, max_examples=3000)
@given(
    chunk_lists,
    size_forms,
    trailer_lists,
    st.lists(
        st.tuples(
            st.integers(min_value=0, max_value=3000),
            st.integers(min_value=0, max_value=3),  # bytes cut out there
            st.sampled_from([b"", b"\r", b"\n", b"\r\n", b"0", b"-", b"f", b";", b" ", b"_", b"x"]),
        ),
        min_size=1,
        max_size=4,
    ),
    cut_lists,
)
def test_a_damaged_body_fails_or_decodes_as_http_client_reads_it(
    chunks: list[bytes],
    sizes: list[str],
    trailers: list[bytes],
    damage: list[tuple[int, int, bytes]],
    cuts: list[int],
) -> None:
    body = encode(chunks, sizes, trailers, b"\r\n")
    for at, cut, put in damage:
        at %= len(body) + 1
        body = body[:at] + put + body[at + cut :]
    assert by_chunked(body, cuts) == by_http_client(body)


@pytest.mark.parametrize("last", [b"0\r\n\r\n", b"0\n\n", b"0;x\r\nA: b\r\n\n"])
def test_a_stream_of_one_chunk_per_read_is_decoded_read_by_read(last: bytes) -> None:
    """Each read's event at once, and the body's end seen without the connection closing
    (on a kept-alive connection, nothing else says so)."""
    decoder, events = Chunked(), [b"data: 1\n\n", b"data: 2\n\n"]
    for event in events:
        assert decoder.feed(b"%x\r\n%s\r\n" % (len(event), event)) == event
    assert not decoder.done
    assert decoder.feed(last + b"HTTP/1.1 200 OK\r\n") == b""  # the rest is not this body's
    assert decoder.done


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b"-5\r\nhello\r\n0\r\n\r\n", "negative chunk size"),
        (b"zz\r\n", "invalid literal"),
        (b"5\r\nhel", "closed before the last chunk"),
        (b"5\r\nhello\r\n", "closed before the last chunk"),
        (b"1" * (MAX_LINE + 1), "too long"),
        (b"0\r\n" + b"a: b\r\n" * (MAX_TRAILERS + 1) + b"\r\n", "trailer lines"),
    ],
)
def test_framing_it_cannot_read_fails_with_a_reason(body: bytes, message: str) -> None:
    decoder = Chunked()
    with pytest.raises(ValueError, match=message):
        decoder.feed(body)
        decoder.ended()


@pytest.mark.parametrize(
    ("body", "decoded"),
    [
        (b"5\r\nhello\r\n0", b"hello"),  # the connection closed in the last chunk's size line
        (b"5\r\nhello\r\n0\r\nX-Trailer: cut", b"hello"),  # ... or in a trailer line
        (b"5\r\nhelloXY0\r\n\r\n", b"hello"),  # the two bytes after the data are not read
        (b"0x5\r\nhello\r\n0\r\n\r\n", b"hello"),  # what int(line, 16) takes
        (b"0" * (MAX_LINE - 2) + b"\r\n\r\n", b""),  # the longest size line
        (b"0" * (MAX_LINE - 1) + b"\r\n\r\n", None),  # one byte more
        (b"0\r\n" + b"a" * (MAX_LINE - 1) + b"\n\r\n", b""),  # the longest trailer line
        (b"0\r\n" + b"a" * MAX_LINE + b"\n\r\n", None),
    ],
)
def test_the_edges_decode_or_fail_as_http_client_reads_them(
    body: bytes, decoded: bytes | None
) -> None:
    assert by_chunked(body, []) == decoded == by_http_client(body)
