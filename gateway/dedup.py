"""Request dedup (``X-NexusGate-ReqId``): the pure decisions, as NexusGate makes them.

A client names a request with ``X-NexusGate-ReqId``; a repeat by the same key of a
finished call gets the stored answer, a repeat while the first still runs gets 409 with
Retry-After. This module validates the header and estimates the wait; the atomic claim
is ``Limiter.claim`` and the stored answer is the database's. Pure code.
"""

from __future__ import annotations

import math
import re

from gateway.errors import InvalidRequest, RequestInFlight

HEADER = "X-NexusGate-ReqId"
MAX_LENGTH = 127
# NexusGate's pattern in JavaScript, where \w is ASCII only.
_ALLOWED = re.compile(r"^[\w\-.:/]+$", re.ASCII)
# How long NexusGate expects a call to take when it estimates the wait for a repeat.
EXPECTED_SECONDS = {True: 60.0, False: 30.0}  # streaming, not streaming


def request_id(value: str | None) -> str | None:
    """The trimmed request id, None if absent or blank; InvalidRequest (400) if malformed."""
    if value is None or not value.strip():
        return None
    value = value.strip()
    if len(value) > MAX_LENGTH:
        raise InvalidRequest(
            f"{HEADER} is longer than {MAX_LENGTH} characters", param=HEADER, code="reqid_too_long"
        )
    if not _ALLOWED.match(value):
        raise InvalidRequest(
            f"{HEADER} may contain only letters, digits and _ - . : /",
            param=HEADER,
            code="reqid_invalid_characters",
        )
    return value


def retry_after(stream: bool, age: float) -> int:
    """Seconds to suggest to a repeat of a call that has run ``age`` seconds (at least 1)."""
    return max(1, math.ceil(EXPECTED_SECONDS[stream] - age))


def in_flight(req_id: str, stream: bool, age: float) -> RequestInFlight:
    """The 409 for a repeat of a request that is still running."""
    return RequestInFlight(
        f"A request with {HEADER} {req_id!r} is still in flight; retry when it has finished",
        retry_after=retry_after(stream, age),
    )
