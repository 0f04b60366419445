"""One call in flight: the producer that owns it until it is recorded.

A JSON answer's producer is the view's greenlet (``answer_here``), which sends nothing
until the answer is whole anyway, so a client that leaves meanwhile changes nothing
but the record, as for a stream. A stream's is the handler's greenlet too where the
body can be written without gunicorn (a plain socket in a gateway worker:
``produce_here``): the producer is a generator that yields once, when the first bytes
are ready; the view returns, gunicorn sends them with the headers and iterates the body
(``_HandedOver``), which resumes the producer to the end. Its pieces are written as they
come, never waiting (``Downstream``), so it still reads the upstream whatever its
client does, and the call's deadline and any stop wait while gunicorn has the greenlet.
Elsewhere (TLS, outside a worker) a stream's producer is a greenlet of its own and
gunicorn writes the body.

The producer fails over until an upstream answers (``routing.failover``), reads the
answer to its end through the plan's operation (a stream through its
``StreamTranslator``, or a JSON answer whole), puts the client's pieces on its
``Downstream`` and keeps time: the first token, the answer whole, the client gone, and
what ended the call, in an ``ending.Ending``. Whatever ends it (the upstream's end or
failure, a stop from ``calls``: cancel, drain bound, shutdown; or its deadline) the
producer alone turns that into the final status (``ending.verdict``), finishes the
Exchange and hands it to the recorder, exactly once (SPEC rules 1-7).

Nothing here reads Flask's request (the view passes everything in) and nothing here
knows the other calls: the worker's ``calls`` hears of a client leaving through the
callback it gave, and stops a call through ``stop``.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import time
from collections.abc import Callable, Iterator
from typing import Any

import gevent
import gevent.event
import gevent.pool

from gateway import jsoncodec, pricing, sse
from gateway.adapters import ir
from gateway.adapters.translator import BrokenStream, Piece, StreamTranslator
from gateway.downstream import Downstream
from gateway.ending import BROKE, GATEWAY_ERROR, UNANSWERED, UPSTREAM_END, End, Ending, verdict
from gateway.errors import GatewayError, ServiceUnavailable
from gateway.plan import Plan, Settings
from gateway.recorder import recorder
from gateway.routing import Candidate, failover
from gateway.telemetry import telemetry
from gateway.upstream import Response, UpstreamError, endpoint, upstream

log = logging.getLogger(__name__)

# What one try opens: a stream (response, translator, events) or a JSON answer (bytes, parsed).
Opened = tuple[Response, StreamTranslator, Iterator[sse.Event]] | tuple[bytes, Any]


class _Stopped(BaseException):
    """Thrown into a producer to end its work: cancel, drain bound, deadline, shutdown.

    A BaseException, like gevent.Timeout, so no ``except Exception`` on the way
    swallows it.
    """

    def __init__(self, end: End) -> None:
        super().__init__(end.reason)
        self.end = end


class Call:
    """One call in flight: its producer, its client, and how it ended."""

    def __init__(
        self,
        plan: Plan,
        settings: Settings,
        sock: socket.socket | None,
        on_client_left: Callable[[Call, str], None],
    ) -> None:
        self.plan, self.settings = plan, settings
        self.exchange = plan.exchange
        self.stream = plan.exchange.stream
        self.down = Downstream(sock, self.stream, settings.pace, self._client_left)
        self.ready = gevent.event.AsyncResult()  # first byte (stream) or whole answer
        self.content = b""  # the non-streaming answer, in the client's format
        self.ending = Ending(time.monotonic)
        self._on_client_left = on_client_left
        self._translator: StreamTranslator | None = None  # once streaming to the client
        self._response: dict | None = None  # the non-streaming answer, parsed
        self._candidate: Candidate | None = None  # the latest tried: its prices cost the call
        self._producer: gevent.Greenlet | None = None
        self._reading = False
        self._stopping = False
        self._left_unanswered = False  # a JSON answer's client left while it was produced
        # A direct stream (``produce_here``): produced in the handler's greenlet, which
        # hands its first bytes to gunicorn and comes back for the rest (``_rest``).
        self._rest: Iterator[None] | None = None
        self._handing_over = False  # gunicorn is sending the first bytes
        self._handed = False
        self._stop_asked: End | None = None  # a stop asked meanwhile
        self._deadline = 0.0  # the call's deadline, and its timer (``_arm_deadline``)
        self._timer: gevent.Timeout | None = None

    # -- the view's side --------------------------------------------------------

    @property
    def abandoned(self) -> bool:
        """The client left before there was anything to answer."""
        if self._left_unanswered:
            return True
        return self.down.gone.is_set() and not (self._handed or self.ready.ready())

    def produce_here(self, watchers: gevent.pool.Group, run: Iterator[None]) -> None:
        """Produce a stream in this greenlet, the handler's, up to its first bytes: the
        body (``body``) sends them through gunicorn, then produces the rest here too. A
        call over before that, or whose client left, is produced to its end here; raise
        its error if it has one and its client waits."""
        self.down.start_watching(watchers)
        handed = False
        for _ in run:
            handed = True
            break
        if handed and not self.down.gone.is_set():
            self._rest = run
            return
        if handed:  # the client left before its first bytes could go: nobody takes them
            for _ in run:
                pass
        self.down.close()
        if self.down.gone.is_set():
            self._left_unanswered = True
        else:
            self.ready.get()  # its error: it never started

    def wait(self, watchers: gevent.pool.Group) -> None:
        """Watch the client; return once there is an answer to start or nobody waits; raise."""
        self.down.start_watching(watchers)
        gevent.wait([self.ready, self.down.gone], count=1)
        if self.abandoned:
            self.down.stop_watching()
            return
        try:
            self.ready.get()
        except BaseException:
            self.down.stop_watching()
            raise
        if not self.stream:
            self.down.stop_watching()

    def answer_here(self, watchers: gevent.pool.Group, produce: Callable[[], None]) -> None:
        """Produce a JSON answer in this greenlet, watching the client meanwhile; raise
        its error (nothing is raised for a client that left: the call is ``abandoned``)."""
        self.down.start_watching(watchers)
        try:
            produce()
        finally:
            self.down.stop_watching()
        if self.down.gone.is_set():
            self._left_unanswered = True  # the call is recorded; nobody takes the answer
            return
        self.ready.get()

    def body(self) -> Iterator[bytes]:
        """The streaming response body."""
        if self._rest is not None:
            return _HandedOver(self)
        return self.down.body()

    def _produce_rest(self, taken: bool) -> None:
        """A direct stream's first bytes went out (``taken``) or could not: the rest."""
        rest, self._rest = self._rest, None
        if rest is None:
            return
        if taken:
            self.down.opened()
        else:
            self.down.write_failed()
        try:
            for _ in rest:  # it hands over once only
                pass
        finally:
            self.down.close()

    def _hand_over(self) -> Iterator[None]:
        """Let the handler's greenlet give gunicorn the first bytes (a direct stream);
        while it is away, the call's deadline waits, and so does any stop asked."""
        self._handed = self._handing_over = True
        if not self.ready.ready():
            self.ready.set(True)
        reading = self._reading
        if reading:
            self._timer.close()
        try:
            yield
        finally:
            self._handing_over = False
        if reading:
            self._arm_deadline()
            if self._stop_asked is not None:
                raise _Stopped(self._stop_asked)

    def _arm_deadline(self) -> None:
        """Stop the call (``_Stopped``) once ``_deadline`` passes (CALL_TIMEOUT)."""
        left = max(self._deadline - time.monotonic(), 0.0)
        self._timer = gevent.Timeout.start_new(left, _Stopped(End.deadline()))

    # -- the producer: the only place a call is finished ------------------------

    def produce(self, direct: bool = False) -> Iterator[None]:
        """Fail over, read the upstream to its end, then record the call.

        A generator: a direct stream's (``direct``) yields once, when its first bytes
        are ready for gunicorn to send (``_hand_over``); any other call never yields.
        """
        self._producer = gevent.getcurrent()
        recorder.record(self.exchange)  # pending: an upstream is about to be contacted
        self._reading = True
        self._deadline = time.monotonic() + self.settings.call_timeout
        self._arm_deadline()
        try:
            try:
                candidate, opened = failover(
                    self.plan.candidates,
                    self._open,
                    tries_per_provider=self.settings.tries_per_provider,
                    backoff_range=self.settings.backoff,
                    sleep=gevent.sleep,
                    on_failure=_log_failure,
                )
                if self.stream:
                    yield from self._relay(*opened, direct)
                else:
                    self._answer(candidate, *opened)
            except GatewayError as exc:  # every candidate failed, or one refused
                self.ending.close(End(UNANSWERED, self.exchange.with_attempts(exc.message)))
                self._refuse(exc)
            except _Stopped as stopped:
                self.ending.close(stopped.end)
                self._tell_client(ServiceUnavailable(f"The gateway ended the call: {stopped}"))
            except GeneratorExit:  # dropped at its hand-over, never resumed
                self.ending.close(End(GATEWAY_ERROR, "gateway error: the stream was never sent"))
                raise
            except Exception as exc:  # a bug here must not cost the record
                log.exception("call: producer failed")
                self.ending.close(End(GATEWAY_ERROR, f"gateway error: {exc!r}"))
                self._tell_client(GatewayError("Internal gateway error"))
            finally:
                self._timer.close()
            self._reading = False
            if direct and self._translator is not None and not self._handed:
                # Nothing went out yet: the stream's first bytes are also its last.
                yield from self._hand_over()
        finally:
            self._reading = False
            self._finalise()

    def _open(self, candidate: Candidate) -> Opened:
        """One try: send, then read to the first event (stream) or the whole answer."""
        self.exchange.serving(
            candidate.model_id, candidate.provider_id, candidate.provider_type, candidate.base_url
        )
        self._candidate = candidate
        operation = self.plan.operation
        url, auth = endpoint(
            candidate.provider_type,
            candidate.base_url,
            candidate.api_key,
            candidate.api_version,
            candidate.remote_id,
            operation.endpoint,
        )
        body = jsoncodec.encode(operation.body(self.plan, candidate))
        started = time.monotonic()
        resp = None
        try:
            headers = {**self.plan.headers, **telemetry.upstream_headers(self.exchange), **auth}
            resp = upstream.post(url, headers, body, stream=self.stream)
            if self.stream:
                translator = operation.translator(self.plan, candidate)
                opened: Opened = (resp, translator, resp.events(translator.accepts))
            else:
                opened = resp.answer(lambda data: operation.read(self.plan, candidate, data))
        except UpstreamError as exc:
            if resp is not None:
                resp.close()
            request_id = exc.request_id or (resp.request_id if resp is not None else None)
            self._attempt(
                candidate, started, exc.kind, request_id, status=exc.status, error=exc.describe()
            )
            raise
        except BaseException:
            if resp is not None:
                resp.close()
            raise
        self._attempt(candidate, started, "ok", resp.request_id, status=resp.status)
        return opened

    def _attempt(
        self,
        candidate: Candidate,
        started: float,
        outcome: str,
        request_id: str | None,
        **detail: Any,
    ) -> None:
        ms = int((time.monotonic() - started) * 1000)
        self.exchange.attempt(
            candidate.provider_name, candidate.remote_id, outcome, ms, _id(request_id), **detail
        )

    def _relay(
        self,
        resp: Response,
        translator: StreamTranslator,
        events: Iterator[sse.Event],
        direct: bool,
    ) -> Iterator[None]:
        """Stream the upstream to the client, to the upstream's end; a direct stream
        hands its first bytes over as soon as it has some."""
        self._translator = translator
        if not direct:
            self.ready.set(True)
        try:
            for event in events:
                self._send(translator.feed(event))
                if direct and not self._handed and self.down.holds_bytes():
                    yield from self._hand_over()
            self._send(translator.finish())
        except (UpstreamError, BrokenStream) as exc:
            what = exc.describe() if isinstance(exc, UpstreamError) else f"protocol: {exc}"
            self._send(translator.fail(f"Upstream failed mid-stream: {what}"))
            self.ending.close(End(BROKE, f"upstream failed mid-stream: {what}"))
            return
        finally:
            resp.close()
        if translator.error:
            message = translator.error.get("message")
            self.ending.close(End(BROKE, f"upstream sent an error event: {message}"))
        self.ending.close(End(UPSTREAM_END))

    def _send(self, piece: Piece) -> None:
        if piece.first_token:
            self.exchange.first_token()
        if piece.terminal:
            self.down.look()  # a client that left first, seen before the answer is noted
            self.ending.answer()
        self.down.put(piece)

    def _answer(self, candidate: Candidate, content: bytes, response: dict) -> None:
        """A whole JSON answer: the client's, ready to send."""
        self.content = self.plan.operation.reply(self.plan, candidate, content, response)
        self._response = response
        self.exchange.first_token()  # a JSON answer's first token comes with all the rest
        self.down.look()
        self.ending.answer()
        self.ready.set(True)
        self.ending.close(End(UPSTREAM_END))

    def _tell_client(self, exc: GatewayError) -> None:
        """The call ended early: end the client's stream, or refuse it if nothing started."""
        if self._translator is not None:
            self._send(self._translator.fail(exc.message))
        else:
            self._refuse(exc)

    def _refuse(self, exc: GatewayError) -> None:
        if not self.ready.ready():
            self.ready.set_exception(exc)

    def _finalise(self) -> None:
        """The one place a call ends: its final status, its record, its client's end.

        This is the hook for what must happen once per finished call: the Exchange is
        final here. Its permit is settled before it is recorded (the answer kept for
        repeats of its request id, the slot given back, TPM charged, metrics), and its
        cost is added to its key's monthly spend.
        """
        if self.down.fin_at is not None and self.ending.hinges_on(self.down.fin_at):
            # Was that FIN a departure? The status depends on it. A stop asked for
            # meanwhile (shutdown) finds the call over: it must not cost the record.
            with contextlib.suppress(_Stopped):
                self.down.settle()
        status, error = verdict(self.ending)
        upstream_ended = self.exchange.elapsed_ms
        response = self._response
        if response is None and self._translator is not None:
            response = self._translator.response()
        outcome = self.plan.operation.outcome(response, self.settings) if response else {}
        self.down.end()
        account = self._account(response, outcome.get("usage"))
        self.exchange.finish(status, error=error, duration_ms=upstream_ended, **outcome, **account)
        self.plan.settle(response if self.ending.answered else None)
        recorder.record(self.exchange)

    def _account(self, response: dict | None, usage: dict | None) -> dict[str, Any]:
        """The record's account: its cost, the provider's id, what its client was sent.

        The cost is priced once, here, at the prices the catalog gave this worker for
        the candidate that answered. A stream waits here until its client's copy has
        ended (its last write, or its client gone) to say what the client got.
        """
        candidate = self._candidate
        prices = None
        if candidate is not None:
            prices = pricing.Prices(
                candidate.input_price,
                candidate.output_price,
                candidate.cache_read_price,
                candidate.cache_write_price,
            )
        account: dict[str, Any] = {
            "cost": pricing.cost(usage, prices),
            "upstream_id": _id((response or {}).get("id")),
        }
        if self.stream:
            # No stream started (refused, or nobody waited): the client got none of it.
            events, chars = self.down.delivery() if self._translator else (0, 0)
            text = ir.text_of(response["content"]) if response else ""
            account["delivered"] = {"events": events, "text": text[:chars]}
        return account

    # -- stopping ---------------------------------------------------------------

    def stop(self, end: End) -> None:
        """End the upstream work now; the producer records how (once; not while finishing).

        A call already finishing waits no longer for its client's copy to be written.
        """
        if self._reading and self._handing_over:
            self._stop_asked = self._stop_asked or end  # once the handler is back
        elif self._reading and self._producer is not None and not self._stopping:
            self._stopping = True
            gevent.kill(self._producer, _Stopped(end))  # not waiting: a raw greenlet too
        elif not self._reading:
            self.down.hurry()

    def _client_left(self, how: str, at: float) -> None:
        """The client is gone since ``at`` (``Downstream`` says so once); the worker decides
        what next."""
        self.ending.leave(at)
        if self._reading:
            self._on_client_left(self, how)


def _id(value: Any) -> str | None:
    """A provider's id as the record can keep it: printable text, at most 255 characters."""
    return value[:255] if isinstance(value, str) and value.isprintable() and value else None


def _log_failure(candidate: Candidate, exc: UpstreamError) -> None:
    log.warning(
        "call: %s via %s failed: %s",
        candidate.system_name,
        candidate.provider_name,
        exc.describe(),
    )


class _HandedOver:
    """A direct stream's body, as gunicorn iterates it: the first bytes (gunicorn sends
    the headers with them), then the rest of the call, produced in this greenlet. A body
    closed before its first bytes went out produces the rest for nobody."""

    def __init__(self, call: Call) -> None:
        self._call = call
        self._first = True

    def __iter__(self) -> _HandedOver:
        return self

    def __next__(self) -> bytes:
        if self._first:
            self._first = False
            return self._call.down.opening()
        self._call._produce_rest(taken=True)
        raise StopIteration

    def close(self) -> None:
        self._call._produce_rest(taken=False)
