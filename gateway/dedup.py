"""Request dedup (``X-NexusGate-ReqId``): the pure decisions, as NexusGate makes them.

A client names a request with ``X-NexusGate-ReqId``; a repeat by the same key of a
finished call gets the stored answer, a repeat while the first still runs gets 409 with
Retry-After. This module validates the header, estimates the wait and shapes the stored
answer (``Stored``); the atomic claim is ``Limiter.claim`` (``admission.Permit``), and
answering a repeat is ``replay``. Pure code.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import asdict, dataclass
from datetime import UTC, datetime

from gateway.errors import InvalidRequest, RequestInFlight

HEADER = "X-NexusGate-ReqId"
MAX_LENGTH = 127
# NexusGate's pattern in JavaScript, where \w is ASCII only.
_ALLOWED = re.compile(r"[\w\-.:/]+", re.ASCII)
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
    if not _ALLOWED.fullmatch(value):  # anything else: spaces, NUL, controls, non-ASCII
        raise InvalidRequest(
            f"{HEADER} may contain only letters, digits and _ - . : /",
            param=HEADER,
            code="reqid_invalid_characters",
        )
    return value


def retry_after(stream: bool, age: float) -> int:
    """Seconds to suggest to a repeat of a call that has run ``age`` seconds (at least 1)."""
    return max(1, math.ceil(EXPECTED_SECONDS[stream] - age))


def in_flight(req_id: str, stream: bool, age: float, started: float) -> RequestInFlight:
    """The 409 for a repeat of a request that is still running, since ``started`` (epoch s)."""
    return RequestInFlight(
        f"A request with {HEADER} {req_id!r} is still in flight; retry when it has finished",
        req_id=req_id,
        retry_after=retry_after(stream, age),
        started_at=iso_utc(started),
    )


def iso_utc(epoch: float) -> str:
    """Epoch seconds as JavaScript's ``toISOString`` prints them: 2026-03-14T09:26:53.589Z."""
    moment = datetime.fromtimestamp(epoch, UTC).replace(tzinfo=None)
    return moment.isoformat(timespec="milliseconds") + "Z"


@dataclass(frozen=True)
class Stored:
    """A finished call's answer, kept for its repeats: whose it is and what it said.

    ``response`` is the whole answer as an IR response (``adapters.ir``), so a repeat
    gets it in its own format, streamed or not, whatever the first call's was.
    """

    uid: str  # the source call's record
    response: dict
    model_id: int | None = None
    provider_id: int | None = None

    def dumps(self) -> str:
        """As kept in the claim (Redis, or this process's store)."""
        return json.dumps(asdict(self), separators=(",", ":"))

    @classmethod
    def loads(cls, text: str) -> Stored | None:
        """Back from ``dumps``; None for anything else (an older gateway's, a torn value)."""
        try:
            data = json.loads(text)
            return cls(
                str(data["uid"]), dict(data["response"]), data.get("model_id"),
                data.get("provider_id"),
            )  # fmt: skip
        except (ValueError, TypeError, KeyError):
            return None
