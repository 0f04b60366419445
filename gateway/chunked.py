"""HTTP/1.1's chunked transfer coding, decoded as the bytes arrive (RFC 9112, 7.1).

A pure decoder for ``upstream``: ``feed`` takes whatever one read returned and gives
the body bytes it holds; ``done`` once the last chunk and the trailer section are in
(what comes after them is not this body's, and is dropped, as http.client drops it).

It reads what http.client reads, as it reads it: a size line in hex (``int(line,
16)``, an extension after ``;`` ignored, at most ``MAX_LINE`` bytes), the chunk's data,
two bytes tossed, and after the zero-size chunk, trailer lines up to an empty one,
ignored. So a body read here instead of through http.client and urllib3 (five layers of
Python calls per read, a fifth of a stream's CPU; issue 11) decodes to the same bytes,
and fails where they fail. Two differences: a negative size fails at once (http.client
reads to the connection's end first), and more than ``MAX_TRAILERS`` trailer lines
fail (http.client reads any number). Framing it cannot read raises ``ValueError``.
"""

from __future__ import annotations

MAX_LINE = 65536  # http.client's _MAXLINE: a longer size or trailer line is refused
MAX_TRAILERS = 100


class Chunked:
    """One chunked body being decoded."""

    __slots__ = ("_left", "_line", "_skip", "_trailers", "done")

    def __init__(self) -> None:
        self._line = b""  # the start of a line whose end has not come yet
        self._left = 0  # data bytes of the current chunk still to come
        self._skip = 0  # bytes after a chunk's data still to toss (its CRLF)
        self._trailers: int | None = None  # trailer lines read, once the last chunk came
        self.done = False

    def feed(self, data: bytes) -> bytes:
        """The body bytes in ``data``, the next bytes read; raise ValueError on bad framing."""
        if self.done:
            return b""
        if self._trailers is None and not (self._left or self._skip or self._line):
            # The usual read: one whole chunk (a stream's event), decoded in one step.
            end = data.find(b"\n") + 1
            if 0 < end <= MAX_LINE:
                size = _size(data[:end])
                if size and end + size + 2 == len(data):
                    return data[end:-2]
        out: list[bytes] = []
        pos, stop = 0, len(data)
        while pos < stop:
            if self._left:
                end = min(pos + self._left, stop)
                out.append(data[pos:end])
                self._left -= end - pos
                pos = end
                if not self._left:
                    self._skip = 2
            elif self._skip:
                step = min(self._skip, stop - pos)
                self._skip -= step
                pos += step
            else:
                end = data.find(b"\n", pos) + 1
                if not end:  # the line goes on in the next read
                    self._line += data[pos:]
                    if len(self._line) > MAX_LINE:
                        raise ValueError("a chunk size or trailer line too long")
                    break
                line, self._line = self._line + data[pos:end], b""
                pos = end
                if len(line) > MAX_LINE:
                    raise ValueError("a chunk size or trailer line too long")
                if self._trailers is None:
                    size = _size(line)
                    if size:
                        self._left = size
                    else:
                        self._trailers = 0
                elif self._trailer(line):
                    self.done = True
                    break
        return out[0] if len(out) == 1 else b"".join(out)

    def _trailer(self, line: bytes) -> bool:
        """A line after the last chunk; True for the empty one that ends the body."""
        if line in (b"\r\n", b"\n"):
            return True
        self._trailers = (self._trailers or 0) + 1
        if self._trailers > MAX_TRAILERS:
            raise ValueError(f"more than {MAX_TRAILERS} trailer lines")
        return False

    def ended(self) -> None:
        """The connection closed: the body is whole if its last chunk came (its size line
        or trailer lines may be cut short, as http.client allows); else ValueError."""
        if self._trailers is None and not (self._line and _size(self._line) == 0):
            raise ValueError("the connection closed before the last chunk")
        self.done = True


def _size(line: bytes) -> int:
    """A size line's chunk size, read as http.client reads it; ValueError if it is none."""
    cut = line.find(b";")
    size = int(line if cut < 0 else line[:cut], 16)
    if size < 0:
        raise ValueError(f"a negative chunk size: {line!r}")
    return size
