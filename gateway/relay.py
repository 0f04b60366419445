"""Upstream -> client, and the greenlet that owns each call until it is recorded.

For every call a *producer* greenlet (in ``Relay.calls``, not the request's) fails
over until an upstream answers, reads it to its end, parses it on the side into the
record, and queues the client's bytes. The response body is a *consumer* generator
that only relays the queue; a *watcher* greenlet notices a client that hangs up
while nothing is being written. Whatever happens (completion, upstream error,
client disconnect, timeout, shutdown) the producer alone finishes the Exchange and
hands it to the recorder, exactly once (SPEC rules 1-7). An embeddings call is a
``Call`` too, never streamed, whose hooks send, read, answer and record its own way.

Client disconnects: with ``ON_DISCONNECT=drain`` (default) the producer keeps
reading, bounded by ``DRAIN_TIMEOUT`` and ``MAX_DRAINS``; with ``cancel`` it closes
the upstream at once. The record is ``aborted`` unless the upstream's terminal event
arrived before the client left; then it is ``completed``. Nothing here reads
Flask's request: the view passes everything in.
"""

from __future__ import annotations

import contextlib
import json
import logging
import socket
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any

import gevent
import gevent.event
import gevent.pool
import gevent.queue
import gevent.socket

from gateway import sse
from gateway.adapters import (
    PROTOCOLS,
    PROVIDER_PROTOCOLS,
    embeddings,
    endpoint,
    record,
    upstream_body,
)
from gateway.adapters.ir import Accumulator
from gateway.errors import GatewayError, ServiceUnavailable
from gateway.exchange import EMBEDDING, Exchange
from gateway.recorder import recorder
from gateway.routing import Candidate, failover
from gateway.upstream import Response, UpstreamError, upstream

log = logging.getLogger(__name__)

_END, _GONE, _PROBE = object(), object(), object()
SHUTDOWN = "gateway shutdown"


class _Stop(BaseException):
    """Thrown into a producer to end its work: cancel, drain bound, deadline, shutdown.

    A BaseException, like gevent.Timeout, so no ``except Exception`` on the way
    swallows it.
    """

    def __init__(self, reason: str, status: str) -> None:
        super().__init__(reason)
        self.reason, self.status = reason, status


@dataclass
class Settings:
    on_disconnect: str = "drain"
    drain_timeout: float = 300.0
    max_drains: int = 200
    call_timeout: float = 900.0
    client_write_timeout: float = 60.0
    heartbeat: float = 15.0
    probe_interval: float = 0.25
    tries_per_provider: int = 2
    backoff: tuple[float, float] = (0.1, 5.0)
    embedding_record_values: int = 16384


@dataclass
class Plan:
    """Everything the producer needs, decided by the view."""

    exchange: Exchange
    candidates: list[Candidate]
    client_format: str
    request: dict  # the parsed request: IR for chat formats
    body: dict  # the client's JSON, for same-format passthrough
    headers: dict[str, str] = field(default_factory=dict)  # client headers to forward


class Call:
    """One call in flight: its producer, the client's queue, and how it ended."""

    def __init__(self, relay: Relay, plan: Plan, sock: socket.socket | None) -> None:
        self.relay, self.plan, self.sock = relay, plan, sock
        self.settings = relay.settings
        self.exchange = plan.exchange
        self.stream = plan.exchange.stream
        self.queue: gevent.queue.Queue = gevent.queue.Queue()
        self.ready = gevent.event.AsyncResult()  # first byte (stream) or whole answer
        self.gone = gevent.event.Event()  # the client hung up
        self.content = b""  # the non-streaming answer, in the client's format
        self._response: dict | None = None  # the non-streaming answer, parsed (IR for chat)
        self._gone_at: float | None = None
        self._terminal_at: float | None = None
        self._reading = False
        self._stop: _Stop | None = None
        self._draining = False
        self._producer: gevent.Greenlet | None = None
        self._watcher: gevent.Greenlet | None = None
        self._timer: gevent.Greenlet | None = None

    @property
    def client(self) -> ModuleType:
        """The client's protocol module (chat formats only)."""
        return PROTOCOLS[self.plan.client_format]

    @property
    def abandoned(self) -> bool:
        """The client left before there was anything to answer."""
        return self.gone.is_set() and not self.ready.ready()

    # -- the producer: the only place a call is finished ----------------------

    def produce(self) -> None:
        """Fail over, read the upstream to its end, then record the call."""
        acc = Accumulator()
        status, error = "failed", None
        recorder.record(self.exchange)  # pending: an upstream is about to be contacted
        self._reading = True
        deadline = _Stop("call exceeded CALL_TIMEOUT", "failed")
        try:
            with gevent.Timeout(self.settings.call_timeout, deadline):
                candidate, (resp, opened) = failover(
                    self.plan.candidates,
                    self._open,
                    tries_per_provider=self.settings.tries_per_provider,
                    backoff_range=self.settings.backoff,
                    sleep=gevent.sleep,
                    on_failure=_log_failure,
                )
                if self.stream:
                    status, error = self._relay_stream(candidate, resp, opened, acc)
                else:
                    status, error = self._answer(candidate, opened)
        except GatewayError as exc:  # every candidate failed, or one refused
            error = self._with_attempts(exc.message)
            self._fail_before_answer(exc)
        except _Stop as stop:
            status, error = self._stopped(stop)
        except Exception as exc:  # a bug here must not cost the record
            log.exception("relay: producer failed")
            status, error = "failed", f"gateway error: {exc!r}"
            if self.ready.ready() and self.stream:
                self._put(self.client.stream_error("Internal gateway error"))
            self._fail_before_answer(GatewayError("Internal gateway error"))
        finally:
            self._reading = False
            self._finish(acc, status, error)

    def _open(self, candidate: Candidate) -> tuple[Response, Any]:
        """One try: send, then read to the first byte (stream) or the whole answer."""
        self.exchange.serving(candidate.model_id, candidate.provider_id)
        url, auth, body = self._request(candidate)
        started = time.monotonic()
        resp = None
        try:
            resp = upstream.post(
                url, {**self.plan.headers, **auth}, json.dumps(body).encode(), stream=self.stream
            )
            opened = self._read_first(resp) if self.stream else self._read_answer(resp, candidate)
        except UpstreamError as exc:
            if resp is not None:
                resp.close()
            self._attempt(candidate, started, exc.kind, status=exc.status, error=exc.describe())
            raise
        except BaseException:
            if resp is not None:
                resp.close()
            raise
        self._attempt(candidate, started, "ok", status=resp.status)
        return resp, opened

    def _request(self, candidate: Candidate) -> tuple[str, dict[str, str], dict]:
        """URL, auth headers and body for one try at ``candidate``."""
        url, auth = _endpoint(candidate, "chat")
        body = upstream_body(
            self.plan.client_format,
            PROVIDER_PROTOCOLS[candidate.provider_type],
            self.plan.body,
            self.plan.request,
            candidate.remote_id,
            stream_usage=candidate.stream_usage,
        )
        return url, auth, body

    @staticmethod
    def _read_first(resp: Response) -> tuple[sse.Decoder, list[sse.Event], Iterator[bytes]]:
        """Read up to the first event with data: before it, nothing is answered yet
        (and a 200 carrying garbage or only comments can still be failed over)."""
        if "json" in resp.content_type:  # asked for a stream, got a verdict instead
            text = resp.read(4096, truncate=True).decode("utf-8", "replace")
            raise UpstreamError(
                "protocol", f"upstream answered JSON to a streaming request: {text}"
            )
        decoder = sse.Decoder()
        events: list[sse.Event] = []
        chunks = resp.chunks()
        for chunk in chunks:
            events.extend(decoder.feed(chunk))
            if any(event.data is not None for event in events):
                return decoder, events, chunks
        raise UpstreamError("protocol", "upstream ended the stream before its first event")

    def _read_answer(self, resp: Response, candidate: Candidate) -> tuple[bytes, dict]:
        content = resp.read()
        try:
            return content, self._parse(candidate, json.loads(content))
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise UpstreamError("protocol", f"upstream sent an unusable answer: {exc!r}") from exc

    def _parse(self, candidate: Candidate, data: Any) -> dict:
        """A non-streaming upstream answer, parsed (ValueError and kin if unusable)."""
        return PROTOCOLS[PROVIDER_PROTOCOLS[candidate.provider_type]].parse_response(data)

    def _attempt(self, candidate: Candidate, started: float, outcome: str, **detail: Any) -> None:
        ms = int((time.monotonic() - started) * 1000)
        self.exchange.attempt(candidate.provider_name, candidate.remote_id, outcome, ms, **detail)

    def _relay_stream(
        self,
        candidate: Candidate,
        resp: Response,
        opened: tuple[sse.Decoder, list[sse.Event], Iterator[bytes]],
        acc: Accumulator,
    ) -> tuple[str, str | None]:
        decoder, first, chunks = opened
        upstream_format = PROVIDER_PROTOCOLS[candidate.provider_type]
        parser = PROTOCOLS[upstream_format].StreamParser()
        renderer = None
        if upstream_format != self.plan.client_format:
            renderer = self.client.StreamRenderer(self.plan.request)
        # We asked an OpenAI-format upstream for usage; a client that did not ask
        # must not see the extra chunk.
        hide_usage = renderer is None and not self.plan.request.get("stream_usage")
        self.ready.set(True)

        def take(events: list[sse.Event]) -> None:
            for event in events:
                ir_events = parser.feed(event)
                self._observe(ir_events, acc)
                if renderer is not None:
                    self._put(b"".join(out for e in ir_events for out in renderer.feed(e)))
                elif not (
                    hide_usage and ir_events and all(e["type"] == "usage" for e in ir_events)
                ):
                    self._put(event.raw)

        try:
            take(first)
            for chunk in chunks:
                take(decoder.feed(chunk))
            take(decoder.flush())
            tail = parser.finish()
            self._observe(tail, acc)
            if renderer is not None:
                self._put(b"".join(out for e in tail for out in renderer.feed(e)))
        except UpstreamError as exc:
            self._put(self.client.stream_error(f"Upstream failed mid-stream: {exc.describe()}"))
            return self._ended("failed", f"upstream failed mid-stream: {exc.describe()}")
        finally:
            resp.close()
        if acc.error:
            return self._ended(
                "failed", f"upstream sent an error event: {acc.error.get('message')}"
            )
        if not acc.terminal:
            self._put(self.client.stream_error("Upstream ended the stream before its end"))
            return self._ended("failed", "upstream ended the stream without its terminal event")
        if renderer is not None:
            self._put(b"".join(renderer.finish()))
        return self._ended("completed", None)

    def _answer(self, candidate: Candidate, opened: tuple[bytes, dict]) -> tuple[str, str | None]:
        content, response = opened
        self.content = self._reply(candidate, content, response)
        self._response = response
        self.exchange.first_token()  # a JSON answer's first token comes with all the rest
        self._terminal_at = time.monotonic()
        self.ready.set(True)
        return self._ended("completed", None)

    def _reply(self, candidate: Candidate, content: bytes, response: dict) -> bytes:
        """The client's body for a non-streaming answer: the upstream's own if it fits."""
        if PROVIDER_PROTOCOLS[candidate.provider_type] == self.plan.client_format:
            return content
        return json.dumps(self.client.render_response(response, self.plan.request)).encode()

    def _observe(self, ir_events: list[dict], acc: Accumulator) -> None:
        for event in ir_events:
            acc.feed(event)
            if event["type"] == "block_delta":
                self.exchange.first_token()
            elif event["type"] == "stop":
                self._terminal_at = time.monotonic()

    def _ended(self, status: str, error: str | None) -> tuple[str, str | None]:
        """The final status, given how the upstream ended and whether the client left first."""
        gone_first = self._gone_at is not None and (
            self._terminal_at is None or self._gone_at < self._terminal_at
        )
        if not gone_first:
            return status, error
        if status == "completed":
            return "aborted", "client disconnected; the upstream was read to its end"
        return "aborted", f"client disconnected; then {error}"

    def _stopped(self, stop: _Stop) -> tuple[str, str | None]:
        if stop.reason == SHUTDOWN:  # rule 7: always failed, whoever was connected
            status, error = "failed", SHUTDOWN
        elif stop.status == "aborted":  # cancel or drain bound: the client had left
            status, error = "aborted", stop.reason
        else:
            status, error = self._ended("failed", stop.reason)
        if self.ready.ready():
            if self.stream:
                self._put(self.client.stream_error(f"The gateway ended the call: {stop.reason}"))
        else:
            self._fail_before_answer(
                ServiceUnavailable(f"The gateway ended the call: {stop.reason}")
            )
        return status, error

    def _fail_before_answer(self, exc: GatewayError) -> None:
        if not self.ready.ready():
            self.ready.set_exception(exc)

    def _finish(self, acc: Accumulator, status: str, error: str | None) -> None:
        self.exchange.finish(status, error=error, **self._outcome(acc))
        recorder.record(self.exchange)
        self.queue.put(_END)
        if self._timer is not None:
            self._timer.kill(block=False)
        if self._draining:
            self._draining = False
            self.relay.drains -= 1

    def _outcome(self, acc: Accumulator) -> dict[str, Any]:
        """What the upstream answered, for the record: ``output`` and ``usage`` if anything."""
        if self._response is None and not acc.events:
            return {}
        response = self._response or acc.result()
        return {"output": record.completion(response), "usage": response["usage"]}

    def _with_attempts(self, message: str) -> str:
        tries = "; ".join(
            f"{a['provider']}: {a.get('error') or a['outcome']}"
            for a in self.exchange.attempts
            if a["outcome"] != "ok"
        )
        return f"{message} [{tries}]" if tries else message

    def _put(self, item: Any) -> None:
        if item and not self.gone.is_set():
            self.queue.put(item)

    # -- stopping -------------------------------------------------------------

    def stop(self, reason: str, status: str) -> None:
        """End the upstream work now; the producer records ``status`` and ``reason``."""
        if self._reading and self._producer is not None and self._stop is None:
            self._stop = _Stop(reason, status)
            self._producer.kill(self._stop, block=False)

    def client_left(self, how: str) -> None:
        """The client is gone: stop writing, then drain or cancel the upstream."""
        if self.gone.is_set():
            return
        self._gone_at = time.monotonic()
        self.gone.set()
        self.queue.put(_GONE)
        if not self._reading:
            return
        if self.settings.on_disconnect == "cancel":
            self.stop(
                f"client disconnected ({how}); upstream cancelled (ON_DISCONNECT=cancel)", "aborted"
            )
        elif self.relay.drains >= self.settings.max_drains:
            self.stop(
                f"client disconnected ({how}); {self.settings.max_drains} drains already "
                "running (MAX_DRAINS), upstream closed",
                "aborted",
            )
        else:
            self.relay.drains += 1
            self._draining = True
            self._timer = self.relay.spawn(self._drain_deadline, how)

    def _drain_deadline(self, how: str) -> None:
        gevent.sleep(self.settings.drain_timeout)
        self.stop(
            f"client disconnected ({how}); drain exceeded DRAIN_TIMEOUT "
            f"({self.settings.drain_timeout:g} s), upstream closed",
            "aborted",
        )

    # -- the client side ------------------------------------------------------

    def watch(self) -> None:
        """Notice a hang-up while nothing is being written (FIN or RST on the socket)."""
        sock = self.sock
        try:
            gevent.socket.wait_read(sock.fileno())
            if sock.recv(1, socket.MSG_PEEK):
                return  # the client sent more (pipelining): nothing to learn here
            reset = False
        except OSError:
            reset = True
        if self.stream and not reset:
            # A FIN may be a half-close from a client that still reads. Probe: a dead
            # peer fails the second write, a live one just skips an SSE comment.
            while not self.gone.is_set():
                self.queue.put(_PROBE)
                gevent.sleep(self.settings.probe_interval)
            return
        self.client_left("connection reset" if reset else "connection closed")

    def body(self) -> Iterator[bytes]:
        """The streaming response body; a failed write means the client left."""
        if self.sock is not None:
            self.sock.settimeout(self.settings.client_write_timeout)  # a client that stops reading
        delivered = False
        try:
            while True:
                try:
                    item = self.queue.get(timeout=self.settings.heartbeat)
                except gevent.queue.Empty:
                    yield sse.comment("keep-alive")
                    continue
                if item is _END or item is _GONE:
                    delivered = item is _END
                    return
                yield sse.comment("probe") if item is _PROBE else item
        finally:
            self.stop_watching()
            if self.sock is not None:
                with contextlib.suppress(OSError):
                    self.sock.settimeout(None)
            if not delivered:
                self.client_left("write failed")

    def stop_watching(self) -> None:
        """Kill the watcher: with keep-alive, the socket's next bytes are gunicorn's."""
        if self._watcher is not None:
            self._watcher.kill(block=False)
            self._watcher = None


class EmbeddingCall(Call):
    """An embeddings call: never streamed; every provider type speaks OpenAI's format,
    so the upstream's answer is the client's, and only the record needs reading it."""

    def _request(self, candidate: Candidate) -> tuple[str, dict[str, str], dict]:
        url, auth = _endpoint(candidate, "embeddings")
        return url, auth, embeddings.build_request(self.plan.body, candidate.remote_id)

    def _parse(self, candidate: Candidate, data: Any) -> dict:
        return embeddings.parse_response(data)

    def _reply(self, candidate: Candidate, content: bytes, response: dict) -> bytes:
        return content

    def _outcome(self, acc: Accumulator) -> dict[str, Any]:
        if self._response is None:
            return {}
        self.exchange.dimensions = self._response["dimensions"]  # a column only embeddings have
        budget = self.settings.embedding_record_values
        vectors = embeddings.record_vectors(self._response["vectors"], budget)
        return {"output": vectors, "usage": self._response["usage"]}


def _endpoint(candidate: Candidate, operation: str) -> tuple[str, dict[str, str]]:
    return endpoint(
        candidate.provider_type,
        candidate.base_url,
        candidate.api_key,
        candidate.api_version,
        candidate.remote_id,
        operation,
    )


def _log_failure(candidate: Candidate, exc: UpstreamError) -> None:
    log.warning(
        "relay: %s via %s failed: %s",
        candidate.system_name,
        candidate.provider_name,
        exc.describe(),
    )


class Relay:
    """Starts calls and owns their greenlets; stops them all at shutdown."""

    def __init__(self) -> None:
        self.settings = Settings()
        self.calls = gevent.pool.Group()  # producers and drain timers
        self.watchers = gevent.pool.Group()  # killed, never waited for
        self._active: set[Call] = set()
        self.drains = 0

    def spawn(self, fn: Callable[..., Any], *args: Any) -> gevent.Greenlet:
        """Run ``fn`` in the call group, logging if it dies of an exception."""
        greenlet = self.calls.spawn(fn, *args)
        greenlet.link_exception(_log_death)
        return greenlet

    def open(self, plan: Plan, sock: socket.socket | None) -> Call:
        """Start a call; wait for its first byte (or whole answer); raise its error."""
        call = (EmbeddingCall if plan.exchange.kind == EMBEDDING else Call)(self, plan, sock)
        self._active.add(call)
        call._producer = self.spawn(self._run, call)
        if sock is not None:
            call._watcher = self.watchers.spawn(call.watch)
            call._watcher.link_exception(_log_death)
        gevent.wait([call.ready, call.gone], count=1)
        if call.abandoned:
            call.stop_watching()
            return call
        try:
            call.ready.get()
        except BaseException:
            call.stop_watching()
            raise
        if not call.stream:
            call.stop_watching()
        return call

    def _run(self, call: Call) -> None:
        try:
            call.produce()
        finally:
            self._active.discard(call)

    def stop_all(self, reason: str = SHUTDOWN) -> int:
        """Stop every call in flight; each records itself. Return how many."""
        calls = list(self._active)
        for call in calls:
            call.stop(reason, "failed")
        return len(calls)

    def wait(self, timeout: float | None) -> bool:
        """Wait for every call to end; True if they all did."""
        return self.calls.join(timeout=timeout)

    @property
    def active(self) -> int:
        """Calls in flight in this worker."""
        return len(self._active)


relay = Relay()


def init_app(app: Any) -> None:
    """Take the relay's settings from the app's config."""
    cfg = app.config
    mode = str(cfg["ON_DISCONNECT"]).lower()
    if mode not in ("drain", "cancel"):
        raise ValueError(f"GATEWAY_ON_DISCONNECT must be drain or cancel, not {mode!r}")
    relay.settings = Settings(
        on_disconnect=mode,
        drain_timeout=float(cfg["DRAIN_TIMEOUT"]),
        max_drains=int(cfg["MAX_DRAINS"]),
        call_timeout=float(cfg["CALL_TIMEOUT"]),
        client_write_timeout=float(cfg["CLIENT_WRITE_TIMEOUT"]),
        heartbeat=float(cfg["HEARTBEAT_INTERVAL"]),
        probe_interval=float(cfg["PROBE_INTERVAL"]),
        tries_per_provider=int(cfg["TRIES_PER_PROVIDER"]),
        backoff=(float(cfg["BACKOFF_MIN"]), float(cfg["BACKOFF_MAX"])),
        embedding_record_values=int(cfg["EMBEDDING_RECORD_VALUES"]),
    )


def _log_death(greenlet: gevent.Greenlet) -> None:
    log.error("relay: greenlet died", exc_info=greenlet.exc_info)
