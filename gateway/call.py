"""One call in flight: the producer that owns it until it is recorded.

Until the first byte a call's producer is the view's greenlet, which sends nothing
before then anyway, so a client that leaves meanwhile changes nothing but the record.
There (``produce_here``) a JSON answer is read whole, and a stream is opened (fails
over up to its first event past those that open it with nothing a client could use:
``StreamTranslator.preface``), then handed to the worker's relay
(``relay.py``): the stream waits as a watch in the hub, its ``_pump`` moves what comes
(in the hub's callback, or in the relay's greenlet), and at its end a greenlet of
``calls`` is asked for to
``finish`` it. A body only a read that waits can take (encoded, or ended by the close)
is handed straight to that greenlet, which reads it to its end first. Either way the
rest of a stream is never read by its request's greenlet (SPEC rule 3).

The producer fails over until an upstream answers (``routing.failover``; each try is
``attempt.send``: its request, noted on the Exchange), reads the answer to its end
through the plan's operation (a stream through its ``StreamTranslator``, or a JSON
answer whole), puts the client's pieces on its ``Downstream`` and keeps time: the first
token, the answer whole, the client gone, and what ended the call, in an
``ending.Ending``. Whatever ends it (the upstream's end or failure, a stop from
``calls``: cancel, drain bound, shutdown; or its deadline) the producer (or the relay's
pump, then ``finish``) alone turns that into the final status (``ending.verdict``),
finishes the Exchange and hands it to the recorder, exactly once
(SPEC rules 1-7), with its account (what the answer says, what it cost, what the client
got: ``account.py``).

Nothing here reads Flask's request (the view passes everything in) and nothing here
knows the other calls: the worker's ``calls`` hears of a client leaving through the
callback it gave, and stops a call through ``stop``.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import sys
import time
import weakref
from collections.abc import Callable, Iterator
from typing import Any

import gevent
import gevent.event
import gevent.pool

from gateway import account, attempt
from gateway.adapters.translator import BrokenStream, Piece, StreamTranslator
from gateway.downstream import Downstream
from gateway.ending import BROKE, GATEWAY_ERROR, UNANSWERED, UPSTREAM_END, End, Ending, verdict
from gateway.errors import GatewayError, ServiceUnavailable
from gateway.plan import Plan, Settings
from gateway.recorder import recorder
from gateway.relay import TURN, relay
from gateway.routing import Candidate, failover
from gateway.upstream import Events, Response, UpstreamError

log = logging.getLogger(__name__)

# An HTTP/1.1 client takes interim responses before the final one (RFC 9110, 15.2). With
# ON_DISCONNECT=cancel, a stream whose client sent a FIN before the first event writes
# one: a client that closed answers it with a reset, and its upstream is closed at once;
# one that only half-closed reads on. Else the FIN waited for the upstream's first event.
INTERIM = b"HTTP/1.1 100 Continue\r\n\r\n"
# Seconds a stream's body may take to end after its terminal event, for its connection to
# go back to the pool; an upstream lingering longer has its connection dropped.
TAIL = 1.0


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
        finish_later: Callable[[Call], None],
        interim: bool = False,
    ) -> None:
        self.plan, self.settings = plan, settings
        self.exchange = plan.exchange
        self.stream = plan.exchange.stream
        early = INTERIM if interim and self.stream and settings.on_disconnect == "cancel" else None
        self.down = Downstream(sock, self.stream, settings.pace, _told(self), early)
        self.ready = gevent.event.AsyncResult()  # first byte (stream) or whole answer
        self.content = b""  # the non-streaming answer, in the client's format
        self.ending = Ending(time.monotonic)
        self._on_client_left = on_client_left
        self._finish_later = finish_later  # a greenlet to run ``finish`` in, for the relay
        self._translator: StreamTranslator | None = None  # once streaming to the client
        self._last: Piece | None = None  # the terminal event's, held for ``_finalise``
        self._response: dict | None = None  # the non-streaming answer, parsed
        self._candidate: Candidate | None = None  # the latest tried: its prices cost the call
        self._producer: gevent.Greenlet | None = None  # while a greenlet reads for it
        self._reading = False
        self._stop_end: End | None = None  # the first stop's: the call is stopping
        self._deadline_at = 0.0
        # Once the relay reads the stream: the upstream, and its watches.
        self._relayed: tuple[Response, Events] | None = None
        self._unwatched: tuple[Response, Events] | None = None  # handed on unread (``_relay``)
        self._waiting = False  # the stream waits for its upstream (``Events.expect``)
        self._deadline: Any = None  # the hub's timer for call_timeout
        self.abandoned = False  # the client left before there was anything to answer

    # -- the view's side --------------------------------------------------------

    def produce_here(self, watchers: gevent.pool.Group, produce: Callable[[], None]) -> None:
        """Produce the call in this greenlet up to its first byte, watching the client
        meanwhile: a JSON answer whole; a stream up to its first event, queued for the
        body, the rest read by the relay (or by a greenlet of ``calls``, for a body only
        a waiting read can take). Raise its error; nothing is raised for a client that
        left (the call is ``abandoned``, and recorded as it ends). A stream's client
        stays watched while its stream goes on."""
        self.down.start_watching(watchers)
        watched = False
        try:
            produce()
            if self.down.gone.is_set():
                self.abandoned = True
                return
            self.ready.get()
            watched = self.stream
        finally:
            if not watched:
                self.down.stop_watching()

    def body(self) -> Iterator[bytes]:
        """The streaming response body."""
        return self.down.body()

    # -- the producer: the only place a call is finished ------------------------

    def produce(self) -> bool:
        """Fail over, read the upstream to its end, then record the call.

        Returns False if a stream was handed on after its first event: to the relay,
        which reads it and then asks ``finish_later`` for a greenlet to ``finish`` it in,
        or straight to that greenlet, which reads it to its end first (``_read_rest``).
        """
        self._producer = gevent.getcurrent()
        recorder.record(self.exchange)  # pending: an upstream is about to be contacted
        self._reading = True
        self._deadline_at = time.monotonic() + self.settings.call_timeout
        handed = False
        try:
            with gevent.Timeout(self.settings.call_timeout, _Stopped(End.deadline())):
                candidate, opened = failover(
                    self.plan.candidates,
                    self._open,
                    tries_per_provider=self.settings.tries_per_provider,
                    backoff_range=self.settings.backoff,
                    sleep=gevent.sleep,
                    on_failure=_log_failure,
                )
                if self.stream:
                    self._relay(*opened)
                    handed = True
                else:
                    self._answer(candidate, *opened)
        except GatewayError as exc:  # every candidate failed, or one refused
            self.ending.close(End(UNANSWERED, self.exchange.with_attempts(exc.message)))
            self._refuse(exc)
        except _Stopped as stopped:
            self._stopped(stopped)
        except Exception as exc:  # a bug here must not cost the record
            self._failed(exc)
        finally:
            if not handed:
                self.finish()
        return not handed

    def finish(self) -> None:
        """The upstream work is over: record the call (``_finalise``). A stream handed
        on unread (``_relay``) is read to its end here first."""
        if self._unwatched is not None:
            self._read_rest(*self._unwatched)
        self._reading = False
        self._finalise()

    def _open(self, candidate: Candidate) -> attempt.Opened:
        """One try (``attempt.send``); the latest tried is the one whose prices cost the call."""
        self._candidate = candidate
        return attempt.send(self.plan, candidate)

    def _relay(self, resp: Response, translator: StreamTranslator, stream: Events) -> None:
        """Hand the stream on once its first event is here: to the relay, or, for a body
        only a read that waits can take, to a greenlet of ``calls`` (``finish_later``)."""
        self._translator = translator
        self.ready.set(True)
        handed = False
        try:
            if self._stop_end is not None:
                gevent.sleep(0)  # a stop is on its way to this greenlet: it arrives here
            if stream.watch(self._woken):
                self._producer = None
                self._relayed = resp, stream
                self._deadline = gevent.get_hub().loop.timer(
                    max(0.0, self._deadline_at - time.monotonic())
                )
                self._deadline.start(self._past_deadline)
                handed = True
                # The events read with the first go now (in hand: no read), so the view's
                # body finds the first piece queued when it runs, which is before the
                # relay's turn (its wake-up was scheduled first); the relay reads the
                # rest. What a pump raises is the relay's to log: the call is finished
                # either way.
                try:
                    self._pump(1)
                except Exception:
                    log.exception("call: relaying the first events failed")
                return
            # Read to its end by a greenlet of ``calls``, not by this one: the request's,
            # whose client waits for the first piece.
            self._producer = None
            self._unwatched = resp, stream
            handed = True
            self._finish_later(self)
        finally:
            if not handed:
                resp.close()

    def _read_rest(self, resp: Response, stream: Events) -> None:
        """Read a stream the relay cannot watch to its end, waiting, within what is left
        of the call's deadline (``finish``'s greenlet, which ``stop`` throws into)."""
        self._unwatched = None
        self._producer = gevent.getcurrent()
        translator = self._translator
        left = max(0.0, self._deadline_at - time.monotonic())
        try:
            with gevent.Timeout(left, _Stopped(End.deadline())):
                if self._stop_end is not None:  # asked for before this greenlet ran
                    raise _Stopped(self._stop_end)
                while not translator.terminal and (events := stream.take()):
                    for event in events:
                        self._send(translator.feed(event))
                self._send(translator.finish())
            self._upstream_ended()
        except (Exception, _Stopped) as exc:
            self._read_ended(exc)
        finally:
            self._producer = None
            resp.close()

    def _pump(self, turn: int = TURN) -> None:
        """Move what the upstream sent since the stream's last turn (in the hub or the
        relay's greenlet: nothing here waits), then watch for more; or end the relay's
        part. What raises here (a wait in the hub included) is the gateway's error,
        recorded."""
        resp, stream = self._relayed
        over = True
        try:
            over = self._move(stream, turn)
        except (Exception, _Stopped) as exc:
            self._read_ended(exc)
        finally:
            if over:
                self._relay_over(resp)

    def _read_ended(self, exc: Exception | _Stopped) -> None:
        """End the call as what reading its stream raised says: the upstream failed, a
        stop came, or a bug here (which must not cost the record)."""
        if isinstance(exc, (UpstreamError, BrokenStream)):
            self._broke(exc)
        elif isinstance(exc, _Stopped):
            self._stopped(exc)
        else:
            self._failed(exc)

    def _move(self, stream: Events, turn: int) -> bool:
        """Relay what has come, up to ``turn`` reads; True once the upstream ended."""
        translator = self._translator
        for _ in range(turn):
            if self._stop_end is not None:
                raise _Stopped(self._stop_end)
            events = stream.ready()
            if events is None:
                if self._stop_end is not None:
                    raise _Stopped(self._stop_end)
                self._waiting = True
                stream.expect()
                return False
            if not events:
                self._send(translator.finish())
                self._upstream_ended()
                return True
            for event in events:
                self._send(translator.feed(event))
            if translator.terminal:
                self._past_the_end(stream)
                return True
        relay.ready(self._pump)  # more may be here: after the others' turns
        return False

    def _past_the_end(self, stream: Events) -> None:
        """The terminal event came: the answer is whole, and nothing after it is anyone's
        (``StreamTranslator.feed``). The call ends now; the body is given ``TAIL`` to end,
        without waiting, for its connection to go back to the pool (``Response.release``)."""
        resp, _ = self._relayed
        try:
            while events := stream.ready():
                pass
        except (UpstreamError, BrokenStream):  # the answer was whole: the connection goes
            pass
        else:
            if events is None:  # not ended yet (its last chunk may be a moment behind)
                resp.release(TAIL)
        self._send(self._translator.finish())
        self._upstream_ended()

    def _relay_over(self, resp: Response) -> None:
        """The relay's part is over: the upstream goes, and a greenlet finishes the call."""
        try:
            resp.close()
            self._deadline.close()
        finally:
            self._relayed = None
            self._reading = False  # a stop from now on hurries the finish
            self._finish_later(self)

    def _woken(self) -> None:
        # In the hub: the upstream's socket is readable, or its read timeout passed.
        self._waiting = False
        relay.ready(self._pump)

    def _past_deadline(self) -> None:
        # In the hub: call_timeout passed.
        self.stop(End.deadline())

    def _broke(self, exc: UpstreamError | BrokenStream) -> None:
        what = exc.describe() if isinstance(exc, UpstreamError) else f"protocol: {exc}"
        self._send(self._translator.fail(f"Upstream failed mid-stream: {what}"))
        self.ending.close(End(BROKE, f"upstream failed mid-stream: {what}"))

    def _upstream_ended(self) -> None:
        self._erred()
        self.ending.close(End(UPSTREAM_END))

    def _erred(self) -> None:
        """The upstream's error event, if it sent one, ends the call: when it came, not
        when the upstream's body ended, so a client that hangs up on reading it (as an
        SDK raising on it does) left after the upstream failed, not before."""
        error = self._translator.error
        if error:
            self.ending.close(End(BROKE, f"upstream sent an error event: {error.get('message')}"))

    def _stopped(self, stopped: _Stopped) -> None:
        self.ending.close(stopped.end)
        self._tell_client(ServiceUnavailable(f"The gateway ended the call: {stopped}"))

    def _failed(self, exc: Exception) -> None:
        log.exception("call: producer failed", exc_info=exc)
        self.ending.close(End(GATEWAY_ERROR, f"gateway error: {exc!r}"))
        self._tell_client(GatewayError("Internal gateway error"))

    def _send(self, piece: Piece) -> None:
        if piece.first_token:
            self.exchange.first_token()
        if piece.terminal:
            self.down.look()  # a client that left first, seen before the answer is noted
            self.ending.answer()
            # Held for ``_finalise``: what the call owes Redis goes before its end does.
            self._last = piece
            return
        self._erred()  # an error event ends the call before the client can read it
        if self._last is None:  # nothing after the end is the client's
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
        try:
            response, outcome, accounted = self._read_for_record()
        except Exception as exc:  # a bug, or an answer no parser foresaw: not the call's
            log.exception("call: %s is recorded without what its answer says", self.exchange.uid)
            response, outcome, accounted = None, {}, {"cost": None, "upstream_id": None}
            error = error or f"gateway error: the answer could not be recorded: {exc!r}"
        # Settled before the client's copy ends (a stream's terminal event was held for
        # it): a next call, on any instance, finds the slot free and the dues charged.
        # The Exchange is finished only after: a snapshot of it is its record.
        answer = response if self.ending.answered else None
        self.plan.settle(answer, outcome.get("usage"), accounted["cost"])
        if self._last is not None:
            self.down.put(self._last)
        self.down.end()
        if self.stream:
            accounted["delivered"] = self._delivered(response)
        self.exchange.finish(
            status, error=error, duration_ms=upstream_ended, **outcome, **accounted
        )
        self.plan.count()
        recorder.record(self.exchange)

    def _read_for_record(self) -> tuple[dict | None, dict[str, Any], dict[str, Any]]:
        """The answer as the record keeps it: the IR response, what the record takes of
        it (text, usage, ...) and its account (cost, the provider's id): ``account``."""
        response = self._response
        if response is None and self._translator is not None:
            response = self._translator.response()
        return response, *account.read(
            response, self.plan.operation, self.settings, self._candidate
        )

    def _delivered(self, response: dict | None) -> dict[str, Any]:
        """What a stream's client got, once its copy has ended (its last write, or its
        client gone): this waits for that."""
        # No stream started (refused, or nobody waited): the client got none of it.
        events, chars = self.down.delivery() if self._translator else (0, 0)
        return account.delivered(response, events, chars)

    # -- stopping ---------------------------------------------------------------

    def stop(self, end: End) -> None:
        """End the upstream work now; the producer records how (once; not while finishing).

        A call already finishing waits no longer for its client's copy to be written.
        """
        if self._reading and self._stop_end is None:
            self._stop_end = end
            if self._producer is not None:
                gevent.get_hub().loop.run_callback(self._throw_stop, self._producer, end)
            elif self._waiting:  # the relay's: its pump ends it (a running one will see)
                self._waiting = False
                self._relayed[1].unexpect()
                relay.ready(self._pump)
        elif not self._reading:
            self.down.hurry()

    def _throw_stop(self, producer: gevent.Greenlet, end: End) -> None:
        # In the hub, once ``producer`` waits: the stop is thrown into it only if it
        # still reads for this call. Meanwhile it may have begun to finish the call,
        # which a stop must not cut short (it hurries it, as ``stop`` does then), or
        # handed the stream on (whoever reads it now sees ``_stop_end``): a request's
        # greenlet then has other work.
        if not self._reading:
            self.down.hurry()
        elif self._producer is producer and not producer.dead:
            try:
                producer.throw(_Stopped(end))
            except BaseException:  # what it did not catch: the hub reports it, as for a kill
                gevent.get_hub().handle_error(producer, *sys.exc_info())

    def _client_left(self, how: str, at: float) -> None:
        """The client is gone since ``at`` (``Downstream`` says so once); the worker decides
        what next."""
        self.ending.leave(at)
        if self._reading:
            self._on_client_left(self, how)


def _told(call: Call) -> Callable[[str, float], None]:
    """``call._client_left`` for its ``Downstream``, holding the call weakly.

    A bound method would make the call and its downstream a cycle, which only the
    garbage collector frees: every call's objects (about 25) were kept until its next
    pass, and those passes were about 4% of a JSON call's CPU (issue 11). Nothing is
    told once the call is gone: nobody is left to care.
    """
    ref = weakref.ref(call)

    def told(how: str, at: float) -> None:
        if (alive := ref()) is not None:
            alive._client_left(how, at)

    return told


def _log_failure(candidate: Candidate, exc: UpstreamError) -> None:
    log.warning(
        "call: %s via %s failed: %s",
        candidate.system_name,
        candidate.provider_name,
        exc.describe(),
    )
