"""One call in flight: the producer greenlet that owns it until it is recorded.

The producer fails over until an upstream answers, reads it to its end, parses it on
the side into the record (text, reasoning, tool calls, usage, timings) and puts the
client's bytes on its ``Downstream``. Whatever happens (completion, upstream error,
client disconnect, timeout, shutdown) the producer alone finishes the Exchange and
hands it to the recorder, exactly once (SPEC rules 1-7).

When the client leaves: with ``ON_DISCONNECT=drain`` (default) the producer keeps
reading, bounded by ``DRAIN_TIMEOUT`` and ``MAX_DRAINS``; with ``cancel`` it closes
the upstream at once. The record is ``aborted`` unless the upstream's terminal event
arrived before the client left; then it is ``completed``. An embeddings call is a
``Call`` too, never streamed, whose hooks send, read, answer and record its own way.
Nothing here reads Flask's request: the view passes everything in.
"""

from __future__ import annotations

import json
import logging
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from types import ModuleType
from typing import TYPE_CHECKING, Any

import gevent
import gevent.event

from gateway import sse
from gateway.adapters import PROTOCOLS, PROVIDER_PROTOCOLS, embeddings, record, upstream_body
from gateway.adapters.ir import Accumulator
from gateway.downstream import Downstream, Pace
from gateway.errors import GatewayError, ServiceUnavailable
from gateway.exchange import Exchange
from gateway.recorder import recorder
from gateway.routing import Candidate, failover
from gateway.upstream import Response, UpstreamError, endpoint, upstream

if TYPE_CHECKING:
    from gateway.relay import Relay

log = logging.getLogger(__name__)

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
    pace: Pace = field(default_factory=Pace)
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
    """One call in flight: its producer, its client, and how it ended."""

    def __init__(self, relay: Relay, plan: Plan, sock: socket.socket | None) -> None:
        self.relay, self.plan = relay, plan
        self.settings = relay.settings
        self.exchange = plan.exchange
        self.stream = plan.exchange.stream
        self.down = Downstream(sock, self.stream, self.settings.pace, self._client_left)
        self.ready = gevent.event.AsyncResult()  # first byte (stream) or whole answer
        self.content = b""  # the non-streaming answer, in the client's format
        self._response: dict | None = None  # the non-streaming answer, parsed (IR for chat)
        self._terminal_at: float | None = None
        self._reading = False
        self._stop: _Stop | None = None
        self._draining = False
        self._timer: gevent.Greenlet | None = None
        self.producer: gevent.Greenlet | None = None

    @property
    def client(self) -> ModuleType:
        """The client's protocol module (chat formats only)."""
        return PROTOCOLS[self.plan.client_format]

    @property
    def abandoned(self) -> bool:
        """The client left before there was anything to answer."""
        return self.down.gone.is_set() and not self.ready.ready()

    def body(self) -> Iterator[bytes]:
        """The streaming response body."""
        return self.down.body()

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
                self.down.put(self.client.stream_error("Internal gateway error"))
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
            if self.stream:
                opened = resp.events(lambda content_type: "json" not in content_type)
            else:
                opened = resp.answer(lambda data: self._parse(candidate, data))
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
        events: Iterator[sse.Event],
        acc: Accumulator,
    ) -> tuple[str, str | None]:
        upstream_format = PROVIDER_PROTOCOLS[candidate.provider_type]
        parser = PROTOCOLS[upstream_format].StreamParser()
        renderer = None
        if upstream_format != self.plan.client_format:
            renderer = self.client.StreamRenderer(self.plan.request)
        # We asked an OpenAI-format upstream for usage; a client that did not ask
        # must not see the extra chunk.
        hide_usage = renderer is None and not self.plan.request.get("stream_usage")
        self.ready.set(True)

        def take(events: Iterator[sse.Event]) -> None:
            for event in events:
                ir_events = parser.feed(event)
                self._observe(ir_events, acc)
                if renderer is not None:
                    self.down.put(b"".join(out for e in ir_events for out in renderer.feed(e)))
                elif not (
                    hide_usage and ir_events and all(e["type"] == "usage" for e in ir_events)
                ):
                    self.down.put(event.raw)

        try:
            take(events)
            tail = parser.finish()
            self._observe(tail, acc)
            if renderer is not None:
                self.down.put(b"".join(out for e in tail for out in renderer.feed(e)))
        except UpstreamError as exc:
            self.down.put(self.client.stream_error(f"Upstream failed mid-stream: {exc.describe()}"))
            return self._ended("failed", f"upstream failed mid-stream: {exc.describe()}")
        finally:
            resp.close()
        if acc.error:
            return self._ended(
                "failed", f"upstream sent an error event: {acc.error.get('message')}"
            )
        if not acc.terminal:
            self.down.put(self.client.stream_error("Upstream ended the stream before its end"))
            return self._ended("failed", "upstream ended the stream without its terminal event")
        if renderer is not None:
            self.down.put(b"".join(renderer.finish()))
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
        gone_at = self.down.gone_at
        gone_first = gone_at is not None and (
            self._terminal_at is None or gone_at < self._terminal_at
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
                self.down.put(
                    self.client.stream_error(f"The gateway ended the call: {stop.reason}")
                )
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
        self.down.end()
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

    # -- stopping -------------------------------------------------------------

    def stop(self, reason: str, status: str) -> None:
        """End the upstream work now; the producer records ``status`` and ``reason``."""
        if self._reading and self.producer is not None and self._stop is None:
            self._stop = _Stop(reason, status)
            self.producer.kill(self._stop, block=False)

    def _client_left(self, how: str) -> None:
        """The client is gone (``Downstream`` says so once): drain or cancel the upstream."""
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
