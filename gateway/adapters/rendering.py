"""The skeleton every ``StreamRenderer`` shares: IR stream events in, SSE frames out.

It keeps usage as it arrives (an OpenAI upstream tells it after the finish reason),
remembers the first ``finish``, opens the client's stream on the first event whatever it
is (a missing ``start`` is made up), and ends the stream exactly once: on ``stop``; on
``finish()`` once a finish was seen; or with the protocol's error frames on an IR
``error`` or when the upstream ended before its finish. Each protocol fills in the hooks.
Pure code.
"""

from __future__ import annotations

from . import ir

EARLY_END = "upstream stream ended before the answer was complete"


class StreamRendererBase:
    """Dispatch and ending rules; subclasses render each step in their protocol."""

    def __init__(self, request: dict) -> None:
        self.request = request
        self.model: str | None = request.get("model")
        self.usage: dict | None = None
        self.finish_event: dict | None = None
        self.started = False
        self.done = False

    def feed(self, event: dict) -> list[bytes]:
        """Render one IR event."""
        if self.done:
            return []
        kind = event["type"]
        if kind == "error":
            message = event.get("message") or "upstream error"
            error_type = event.get("error_type")  # an upstream's word: any JSON value
            if not isinstance(error_type, str) or not error_type:
                error_type = "api_error"
            return self._fail(str(message), error_type)
        self.usage = ir.merge_usage(self.usage, event.get("usage"))
        frames = [] if self.started else self._begin(event)
        if kind == "block_start":
            frames.extend(self._block_start(event["index"], event["block"]))
        elif kind == "block_delta":
            frames.extend(self._block_delta(event["index"], event["delta"]))
        elif kind == "block_stop":
            frames.extend(self._block_stop(event["index"]))
        elif kind == "finish" and self.finish_event is None:
            self.finish_event = event
            frames.extend(self._finish(event))
        elif kind == "more":
            frames.extend(self._more(event["more"]))
        elif kind == "stop":
            self.done = True
            frames.extend(self._end())
        return frames

    def finish(self) -> list[bytes]:
        """End of stream: close cleanly after a finish, else tell the client it broke off."""
        if self.done:
            return []
        if self.finish_event is not None:
            self.done = True
            return self._end()
        return self._fail(EARLY_END, "api_error")

    def _begin(self, event: dict) -> list[bytes]:
        self.started = True
        return self._start(event)

    def _fail(self, message: str, kind: str) -> list[bytes]:
        self.done = True
        return self._error(message, kind)

    # Hooks. ``_start`` gets the first event (a ``start`` or whatever came instead).
    def _start(self, event: dict) -> list[bytes]:
        raise NotImplementedError

    def _block_start(self, index: int, block: dict) -> list[bytes]:
        return []

    def _block_delta(self, index: int, delta: dict) -> list[bytes]:
        return []

    def _block_stop(self, index: int) -> list[bytes]:
        return []

    def _finish(self, event: dict) -> list[bytes]:
        return []

    def _more(self, more: list[list[dict]]) -> list[bytes]:
        """Choices past the first (``n``): only Chat Completions has a place for them."""
        return []

    def _end(self) -> list[bytes]:
        raise NotImplementedError

    def _error(self, message: str, kind: str) -> list[bytes]:
        raise NotImplementedError
