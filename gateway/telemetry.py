"""Optional export of every finished call as an OpenTelemetry span, over OTLP/HTTP.

The recorder hands over rows once they are committed (``telemetry.export(rows)``), so a
span and its row always agree: pending rows are skipped, and a row that waited in the
journal is exported when it is finally written. ``spans.py`` turns each row into a
GenAI span; the SDK's BatchSpanProcessor queues it and its worker thread (a greenlet
once gevent has patched threading) posts batches to the collector. ``export`` never
blocks on the network and never raises, and the queue holds at most
``OTEL_BSP_MAX_QUEUE_SIZE`` spans: with the collector down spans are dropped, while
calls and records go on untouched. ``shutdown(timeout)`` flushes at worker exit.

Off by default: on when an OTLP endpoint is configured (``OTEL_EXPORTER_OTLP_ENDPOINT``
or ``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT``) or ``GATEWAY_OTEL_EXPORT=true``; off with
``OTEL_SDK_DISABLED=true``, ``OTEL_TRACES_EXPORTER=none`` or ``GATEWAY_OTEL_EXPORT=false``.
While off the SDK is never imported and ``export`` returns at once.
"""

from __future__ import annotations

import atexit
import logging
import os
import secrets
import threading
from collections import OrderedDict
from collections.abc import Iterable, Mapping
from typing import Any

from gateway import spans

log = logging.getLogger(__name__)

# The convention's opt-in switch. Its values: "true" (the original boolean), and with
# the latest experimental conventions NO_CONTENT, SPAN_ONLY, EVENT_ONLY, SPAN_AND_EVENT.
# Content goes on span attributes; this gateway emits no events, so EVENT_ONLY records none.
CAPTURE_CONTENT = "OTEL_INSTRUMENTATION_GENAI_CAPTURE_MESSAGE_CONTENT"
_CONTENT_ON_SPANS = frozenset({"true", "span_only", "span_and_event"})
_ENDPOINTS = ("OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
_REMEMBERED = 20_000  # final rows remembered against exporting one twice
_AT_EXIT_TIMEOUT = 2.0  # seconds, when nobody called shutdown() before the process exits


def wanted(setting: Any, environ: Mapping[str, str]) -> bool:
    """Whether to export, from ``GATEWAY_OTEL_EXPORT`` (None: auto) and the OTEL_* variables."""
    if environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return False
    if setting is not None:
        return setting is True or str(setting).strip().lower() in ("true", "1", "yes", "on")
    if environ.get("OTEL_TRACES_EXPORTER", "").strip().lower() == "none":
        return False
    return any(environ.get(name, "").strip() for name in _ENDPOINTS)


def captures_content(environ: Mapping[str, str]) -> bool:
    """Whether the operator opted in to prompt and answer content on spans."""
    return environ.get(CAPTURE_CONTENT, "").strip().lower() in _CONTENT_ON_SPANS


class Telemetry:
    """The span pipeline of one worker process: configured by ``init_app``, fed by the recorder."""

    def __init__(self) -> None:
        self.enabled = False
        self.capture_content = False
        self.content_limit = 0
        self.service_name = "llm-gateway"
        self.emitted = 0  # spans handed to the SDK
        self.errors = 0  # rows that could not become spans
        self._tracer: Any = None
        self._processor: Any = None
        self._exporter: Any = None
        self._propagator: Any = None
        self._root: Any = None  # the empty context: a span without a caller's parent
        self._lock = threading.Lock()
        self._ids: Any = None
        self._exported: OrderedDict[tuple, None] = OrderedDict()  # (uid, status), newest last

    def init_app(self, app: Any) -> None:
        """Read the switch and limits; start the pipeline now if this is a gevent worker."""
        cfg = app.config
        self.configure(
            cfg["OTEL_EXPORT"],
            content_limit=int(cfg["OTEL_CONTENT_MAX_CHARS"]),
            service_name=str(cfg["OTEL_DEFAULT_SERVICE_NAME"]),
        )
        from gevent import monkey

        # Pay the SDK's import at boot, not on the first record; a CLI process (not
        # patched) writes no records and never starts it.
        if self.enabled and monkey.is_module_patched("threading"):
            self.start()

    def configure(
        self, setting: Any = None, *, content_limit: int = 0, service_name: str = "llm-gateway"
    ) -> None:
        """Decide from the setting and the environment whether and what to export."""
        if self._tracer is not None:
            return  # already exporting: a second app in this process changes nothing
        self.enabled = wanted(setting, os.environ)
        self.capture_content = captures_content(os.environ)
        self.content_limit = content_limit
        self.service_name = service_name

    def start(self) -> None:
        """Build the provider, the OTLP exporter and the batch processor (imports the SDK)."""
        with self._lock:
            if self._tracer is not None or not self.enabled:
                return
            try:
                self._tracer = self._build()
            except Exception:
                log.exception("telemetry: could not start the OTLP exporter; spans are off")
                self.enabled = False
                return
        atexit.register(self.shutdown, _AT_EXIT_TIMEOUT)
        for name in ("OTEL_EXPORTER_OTLP_PROTOCOL", "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL"):
            if os.environ.get(name, "http/protobuf").strip() != "http/protobuf":
                log.warning("telemetry: %s is ignored: spans go as http/protobuf", name)
        log.info(
            "telemetry: exporting call spans over OTLP to %s%s",
            getattr(self._exporter, "_endpoint", "the default endpoint"),
            " with message content" if self.capture_content else "",
        )

    def _build(self) -> Any:
        from opentelemetry.context import Context
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
        from opentelemetry.sdk.resources import SERVICE_NAME, Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor
        from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

        resource = Resource.create()  # OTEL_SERVICE_NAME, OTEL_RESOURCE_ATTRIBUTES
        if str(resource.attributes.get(SERVICE_NAME, "")).startswith("unknown_service"):
            resource = resource.merge(Resource({SERVICE_NAME: self.service_name}))
        # Our own shutdown(timeout) flushes at exit: the SDK's would wait up to 30 s.
        self._ids = _preset_ids()
        provider = TracerProvider(resource=resource, shutdown_on_exit=False, id_generator=self._ids)
        self._exporter = OTLPSpanExporter()
        self._processor = BatchSpanProcessor(self._exporter)
        provider.add_span_processor(self._processor)
        self._propagator = TraceContextTextMapPropagator()
        self._root = Context()
        return provider.get_tracer("gateway.telemetry")

    def export(self, rows: Iterable[Mapping[str, Any]]) -> None:
        """Queue a span for each final row just committed; never blocks, never raises."""
        if not self.enabled:
            return
        if self._tracer is None:
            self.start()
            if self._tracer is None:
                return
        for row in rows:
            if row.get("status") == "pending" or self._seen(row):
                continue
            try:
                self._emit(row)
            except Exception:
                self.errors += 1
                if self.errors == 1 or self.errors % 1000 == 0:
                    log.exception("telemetry: record %s not exported as a span", row.get("uid"))

    def _seen(self, row: Mapping[str, Any]) -> bool:
        """True for a final row this process already exported as it stands.

        A row can be written twice: a batch journaled at shutdown or after a timeout
        may have landed, and replaying it changes nothing in the database. The write
        itself says so (the recorder exports only the snapshots the database took);
        this memory is the second guard. A swept row that its live owner finalises
        after all did change, even when both say ``failed``: that one is exported
        again, marked (``spans.supersedes_swept``).
        """
        key = (row.get("uid"), row.get("status"), spans.supersedes_swept(row))
        if key in self._exported:
            return True
        self._exported[key] = None
        if len(self._exported) > _REMEMBERED:
            self._exported.popitem(last=False)
        return False

    def upstream_headers(self, exchange: Any) -> dict[str, str]:
        """The ``traceparent`` naming this call's span, for its upstream; {} while off.

        The span's ids are fixed here, once per call (every attempt is the same span),
        and kept on the Exchange: the span emitted once the row is written takes them.
        """
        if not self.enabled:
            return {}  # the caller's traceparent, if any, goes upstream unchanged
        if exchange.span_id is None:
            exchange.span_id = secrets.token_hex(8)
            exchange.trace_id, exchange.upstream_traceparent = spans.child_context(
                exchange.trace_parent, exchange.span_id
            )
        return {"traceparent": exchange.upstream_traceparent}

    def _emit(self, row: Mapping[str, Any]) -> None:
        from opentelemetry.trace import SpanKind, Status, StatusCode

        span = spans.build(
            row,
            trace_parent=row.get("trace_parent"),
            trace_state=row.get("trace_state"),
            capture_content=self.capture_content,
            content_limit=self.content_limit,
        )
        # The ids the upstream was told of (upstream_headers), if it was: no greenlet
        # switch can come between setting them and the SDK taking them.
        self._ids.preset(row.get("trace_id"), row.get("span_id"))
        try:
            otel = self._tracer.start_span(
                span.name,
                context=self._parent(span.trace_parent, span.trace_state),
                kind=SpanKind.CLIENT,
                attributes=span.attributes,
                start_time=span.start_ns,
            )
        finally:
            self._ids.preset(None, None)
        if span.error:
            otel.set_status(Status(StatusCode.ERROR, span.description))
        otel.end(end_time=span.end_ns)
        self.emitted += 1

    def _parent(self, trace_parent: str | None, trace_state: str | None) -> Any:
        """The caller's span as a remote parent; a missing or malformed traceparent: none."""
        if not trace_parent:
            return self._root
        carrier = {"traceparent": trace_parent}
        if trace_state:
            carrier["tracestate"] = trace_state
        # W3C Trace Context rules: a malformed header leaves the (empty) context as it is.
        return self._propagator.extract(carrier, context=self._root)

    def shutdown(self, timeout: float) -> bool:
        """Send what is queued, waiting at most ``timeout`` s; True if that finished in time."""
        with self._lock:
            if self._tracer is None or not self.enabled:
                return True
            self.enabled = False  # from now on nothing would send a span
        flush = threading.Thread(target=self._processor.force_flush, daemon=True)
        flush.start()
        flush.join(timeout)
        if flush.is_alive():
            log.warning("telemetry: spans not sent within %.1f s at exit are lost", timeout)
            self._exporter.shutdown()  # ends its retries; a post in flight ends at its timeout
            return False
        self._processor.shutdown()  # the queue is empty: stops the worker and the exporter
        return True


def _preset_ids() -> Any:
    """The SDK's random id generator, which hands out preset ids once when given some."""
    from opentelemetry.sdk.trace.id_generator import RandomIdGenerator

    class PresetIds(RandomIdGenerator):
        _trace: int | None = None
        _span: int | None = None

        def preset(self, trace_id: str | None, span_id: str | None) -> None:
            self._trace = int(trace_id, 16) if trace_id else None
            self._span = int(span_id, 16) if span_id else None

        def generate_trace_id(self) -> int:
            preset, self._trace = self._trace, None
            return preset or super().generate_trace_id()

        def generate_span_id(self) -> int:
            preset, self._span = self._span, None
            return preset or super().generate_span_id()

    return PresetIds()


telemetry = Telemetry()
