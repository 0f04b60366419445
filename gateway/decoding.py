"""Content codings: a gzip or deflate body decoded as it arrives (RFC 9110, 8.4).

A pure decoder for ``bodies``: ``feed`` takes whatever one read returned and gives the
bytes it decodes to, ``flush`` the rest at the body's end. It decodes what urllib3
decodes, as it does (see ``Decoding``); bytes it cannot decode raise ``ValueError``.
"""

from __future__ import annotations

import zlib

# The codings a body is decoded from, and zlib's window bits for each.
DECODERS = {"gzip": 16 + zlib.MAX_WBITS, "x-gzip": 16 + zlib.MAX_WBITS, "deflate": zlib.MAX_WBITS}


class Decoding:
    """A gzip or deflate body decoded as it arrives, as urllib3 decodes one: gzip's
    members one after another, and deflate in zlib's wrapping or, failing that, raw
    (servers send both). Bytes it cannot decode raise ``ValueError``."""

    __slots__ = ("_first", "_kept", "_spent", "_wbits", "_zlib")

    def __init__(self, coding: str) -> None:
        self._wbits = DECODERS[coding]
        self._zlib = zlib.decompressobj(self._wbits)
        self._first = self._wbits == zlib.MAX_WBITS  # deflate, and nothing decoded yet
        self._kept = b""  # deflate's bytes until one decodes, for a second try as raw
        self._spent = False  # what follows the last whole gzip member is not read

    def feed(self, data: bytes) -> bytes:
        try:
            if self._first:
                self._kept += data
                out = self._zlib.decompress(data)
                if out:
                    self._first, self._kept = False, b""
                return out
            if self._spent:
                return b""
            out = self._zlib.decompress(data)
            while self._wbits > zlib.MAX_WBITS and self._zlib.eof and self._zlib.unused_data:
                rest = self._zlib.unused_data  # another gzip member
                self._zlib = zlib.decompressobj(self._wbits)
                try:
                    out += self._zlib.decompress(rest)
                except zlib.error:  # garbage after a whole member: ignored, as gzip does
                    self._spent = True
                    break
            return out
        except zlib.error as exc:
            if self._first:  # deflate without zlib's wrapping
                self._first, self._wbits = False, -zlib.MAX_WBITS
                self._zlib = zlib.decompressobj(self._wbits)
                kept, self._kept = self._kept, b""
                return self.feed(kept)
            raise ValueError(f"the body could not be decoded: {exc}") from exc

    def flush(self) -> bytes:
        return b"" if self._spent else self._zlib.flush()
