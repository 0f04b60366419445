"""Answering a repeat (``X-NexusGate-ReqId``) from the stored answer of the call it repeats.

The stored answer comes from the request id's claim (``admission.Permit.claim``: Redis,
or this worker's memory without it, for ``DEDUP_TTL`` after the first call ended) or,
for an older call, from its record (``cached_response``). That read is bounded and
skipped while the database is known to be down (``db.reachable``, until a background
job finds it again): when neither has the answer, the call is made anew (fail open),
never refused. The answer is rendered in the repeat's
own format, as JSON or as a whole stream, whatever format the first call came in, and
recorded once as ``cache_hit`` (0 tokens: the provider did no work) through the recorder,
linked to its source. The upstream is not called.
"""

from __future__ import annotations

import json
import logging
import time
from datetime import UTC
from typing import Any

import gevent.event

from gateway import db, dedup
from gateway.adapters import PROTOCOLS, ir, record
from gateway.adapters.translator import Piece, StreamTranslator
from gateway.admission import Permit
from gateway.dedup import Stored
from gateway.errors import RequestInFlight
from gateway.exchange import Exchange
from gateway.models import Completion
from gateway.recorder import recorder

log = logging.getLogger(__name__)

CACHE_HIT = "cache_hit"
READ_TIMEOUT = 1.0  # seconds a repeat may wait for the database's answer
ZERO = ir.usage(input_tokens=0, output_tokens=0)  # a cache hit's: the provider did no work
REPLAYED = ("completed", "aborted")  # records whose whole answer is kept (cached_response)


def lookup(permit: Permit, req_id: str) -> Stored | None:
    """The stored answer a repeat gets, or None: make the call (its id now claimed).

    Raises RequestInFlight (409) while the first call with this id is running. The id's
    holder may instead be a repeat like this one, whose answer had gone from the claim,
    reading it from the record meanwhile: so a repeat told "in flight" looks there too
    before it answers 409 (a running call's record has no answer yet). A claim taken on
    a Redis that may have lost the first call's (restarted empty, until that call's
    worker takes it again) looks there for a call with this id still pending, too.
    """
    try:
        stored = permit.claim(req_id)
    except RequestInFlight:
        stored = _from_record(permit.caller.id, req_id)
        if stored is None:
            raise
        return stored
    if stored is None and permit.req_id is not None:
        stored = _from_record(permit.caller.id, req_id)
        if stored is None and permit.unsure:
            started = _running(permit.caller.id, req_id, permit.uid)
            if started is not None:  # its claim was lost (Redis restarted empty)
                age = max(0.0, time.time() - started)
                raise dedup.in_flight(req_id, permit.stream, age, started)
    return stored


def _running(key_id: int, req_id: str, uid: str) -> float | None:
    """When (epoch seconds) another call of this key's request id that is still pending
    in the records began, if the database says (its process lives: a dead one's are
    swept within about a minute)."""
    row = _newest(
        key_id,
        req_id,
        "calls in flight",
        [Completion.created_at],
        (Completion.status == "pending") & (Completion.uid != uid),
    )
    return None if row is None else row.created_at.replace(tzinfo=UTC).timestamp()


def _from_record(key_id: int, req_id: str) -> Stored | None:
    """The newest whole answer recorded for this key's request id, if the database says."""
    row = _newest(
        key_id,
        req_id,
        "stored answers",
        [Completion.uid, Completion.cached_response, Completion.model_id, Completion.provider_id],
        Completion.status.in_(REPLAYED) & Completion.cached_response.is_null(False),
    )
    if row is None or not isinstance(row.cached_response, dict):
        return None
    return Stored(row.uid, row.cached_response, row.model_id, row.provider_id)


def _newest(key_id: int, req_id: str, what: str, fields: list, condition: Any) -> Completion | None:
    """This key's newest live record of the request id that meets ``condition``, read
    within READ_TIMEOUT; None if there is none, or the database is away or slow (known
    down: not asked), so that the repeat makes the call rather than wait."""
    if not db.reachable():
        return None
    try:
        with db.background(READ_TIMEOUT):
            return (
                Completion.select(*fields)
                .where(
                    (Completion.api_key == key_id)
                    & (Completion.req_id == req_id)
                    & condition
                    & (Completion.deleted == False)  # noqa: E712
                )
                .order_by(Completion.id.desc())
                .first()
            )
    except Exception as exc:  # away or slow: make the call instead
        if not isinstance(exc, db.Conflict):  # (a lock timeout: it answered)
            db.mark_reachable(False)  # until a background job finds it again
        log.warning("replay: cannot read %s (%s); repeats run anew for now", what, exc)
        return None


def answer(
    permit: Permit, exchange: Exchange, stored: Stored, client_format: str, request: dict
) -> bytes | Written:
    """The repeat's answer in its format, recorded as a cache hit: JSON, recorded now, or
    a whole stream, recorded pending now (a worker killed or stopped while it is written
    leaves its row, as a call's) and final once written (``Written``: what the client
    was sent). Its request id is settled before either goes."""
    response = stored.response
    exchange.source_uid, exchange.req_id = stored.uid, None  # the id is its source's
    exchange.model_id, exchange.provider_id = stored.model_id, stored.provider_id
    exchange.first_token()
    if exchange.stream:
        permit.settle(exchange, response, ZERO, None)
        recorder.record(exchange)  # pending
        piece = StreamTranslator.replay(client_format, request, response)
        return Written(piece, exchange, response, permit)
    data = json.dumps(PROTOCOLS[client_format].render_response(response, request)).encode()
    _finish(exchange, response)
    permit.finished(exchange, response)
    recorder.record(exchange)
    return data


def _finish(
    exchange: Exchange, response: dict, delivered: dict | None = None, error: str | None = None
) -> None:
    exchange.finish(
        CACHE_HIT,
        output=record.completion(response),
        usage=dict(ZERO),
        delivered=delivered,
        error=error,
    )


_writing: set[Written] = set()  # this worker's stream replays being written
_none_writing = gevent.event.Event()
_none_writing.set()


def wait(timeout: float | None) -> bool:
    """Wait for the stream replays being written to end; True if they all did."""
    return _none_writing.wait(timeout)


def stop_all() -> int:
    """Record every stream replay still being written (shutdown: its worker may not
    outlive the write), with none of it said delivered; how many."""
    cut = list(_writing)
    for written in cut:
        written._record(whole=False, error="gateway shutdown: the answer was being written")
    return len(cut)


class Written:
    """A repeat's whole stream as a WSGI body: its record says what was delivered.

    The server takes the one piece and asks for the next only once it wrote it: the
    call is recorded final then, with all of the stream delivered. A body closed before
    that (the client gone before or during the write; the server closes every body)
    records it with none delivered; so does a worker stopping meanwhile (``stop_all``).
    Once either way.
    """

    def __init__(self, piece: Piece, exchange: Exchange, response: dict, permit: Permit) -> None:
        self.piece = piece
        self._exchange: Exchange | None = exchange
        self._response, self._permit = response, permit
        self._given = False
        _writing.add(self)
        _none_writing.clear()

    def __iter__(self) -> Written:
        return self

    def __next__(self) -> bytes:
        if self._given:
            self._record(whole=True)  # asked again: the server wrote it
            raise StopIteration
        self._given = True
        return self.piece.data

    def close(self) -> None:
        self._record(whole=False)

    def _record(self, whole: bool, error: str | None = None) -> None:
        exchange, self._exchange = self._exchange, None
        if exchange is None:
            return
        _writing.discard(self)
        if not _writing:
            _none_writing.set()
        delivered = {
            "events": self.piece.events if whole else 0,
            "text": self.piece.text if whole else "",
        }
        _finish(exchange, self._response, delivered, error)
        self._permit.count(exchange)
        recorder.record(exchange)
