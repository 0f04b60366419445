"""A failed try at an upstream, named: ``UpstreamError``, its ``kind`` and whether
failing over may help (``retriable``), and what a read that failed or timed out means.

A module of its own so that ``bodies``, which ``upstream`` imports, raises the same
error ``upstream`` does. ``routing`` fails over on ``retriable``; the admin views,
routing and the call's record take ``describe``. Pure: nothing here does I/O.
"""

from __future__ import annotations

import ssl


class UpstreamError(Exception):
    """One failed try at an upstream.

    ``kind`` is ``connect``, ``timeout``, ``reset``, ``http``, ``protocol`` (the
    upstream answered 2xx with something unusable) or ``invalid`` (we could not
    even send it); ``retriable`` says whether failing over may help.
    """

    def __init__(
        self,
        kind: str,
        message: str,
        *,
        status: int | None = None,
        content: bytes = b"",
        content_type: str | None = None,
        request_id: str | None = None,
    ) -> None:
        super().__init__(message)
        self.kind = kind
        self.message = message
        self.status = status
        self.content = content
        self.content_type = content_type
        self.request_id = request_id  # the provider's, when it answered at all

    @property
    def retriable(self) -> bool:
        """Connection trouble, timeouts, 429 and 5xx are worth another try (SPEC)."""
        if self.kind == "http":
            return self.status is not None and (self.status == 429 or self.status >= 500)
        return self.kind in ("connect", "timeout", "reset", "protocol")

    def describe(self) -> str:
        """A one-line account for records and logs."""
        if self.kind == "http":
            text = self.content[:500].decode("utf-8", errors="replace")
            return f"HTTP {self.status}: {text}"
        return f"{self.kind}: {self.message}"


def read_failed(exc: BaseException) -> UpstreamError:
    """What a failed read of the body means: a read timeout, or a broken connection."""
    if timed_out_error(exc):
        return UpstreamError("timeout", "upstream went silent past the read timeout")
    return UpstreamError("reset", f"upstream connection broke: {exc}")


def timed_out_error(exc: BaseException) -> bool:
    # gevent's TLS socket says it timed out with an SSLError
    return isinstance(exc, TimeoutError) or (
        isinstance(exc, ssl.SSLError) and "operation timed out" in str(exc)
    )
