# -*- test-case-name: tests.observe.test_tracing -*-
"""
Distributed tracing: W3C Trace Context propagation and one OpenTelemetry
server span per proxied request, exported over OTLP/HTTP (JSON).

Written here rather than with the OpenTelemetry SDK, whose span objects,
context variables and processors cost tens of microseconds per request:
what Balance needs is small.  A request's C{traceparent} (and
C{tracestate}) is parsed; an invalid one is ignored and a new trace
starts.  The request gets a server span of its own, a child of the
client's, and each try of it upstream a client span, a child of the server
span (as Envoy's upstream spans): the backend receives a C{traceparent}
naming its try's span as its parent (the C{tracestate} passed on as
received), so that retries show as sibling spans.  Requests that are not
recorded (not sampled, or no exporter) make no client spans: the backend
sees the server span as its parent.  Sampling is decided at the head: a
request with a valid parent follows the parent's sampled flag; one without
is sampled with probability C{sample_ratio}, decided from its trace id (as
OpenTelemetry's C{TraceIdRatioBased}, so every proxy in a fleet agrees).

Finished sampled spans are queued as plain tuples; L{OTLPExporter} turns
them into OTLP JSON and POSTs them to C{otlp_endpoint}/v1/traces in
batches, once a second or when a batch is full, with a non-blocking
Twisted HTTP client, one request at a time.  The queue is bounded: spans
that find it full are dropped and counted.  With tracing off, a request
pays one attribute check (C{ctx.tracer is not None}).
"""

from __future__ import annotations

import json
import random
import time
from collections import deque

from twisted.internet.defer import Deferred, succeed
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.web.iweb import IBodyProducer
from zope.interface import implementer

__all__ = [
    "OTLPExporter",
    "Span",
    "TrySpan",
    "Tracer",
    "encode_spans",
    "parse_traceparent",
    "valid_tracestate",
]

_ZERO_TRACE = b"0" * 32
_ZERO_SPAN = b"0" * 16
_TRACEPARENT = b"traceparent"
_TRACESTATE = b"tracestate"
# W3C Trace Context: vendors may cut tracestate beyond 512 characters.
_MAX_TRACESTATE = 512

#: OTLP span kinds and status codes (opentelemetry-proto trace.proto).
SPAN_KIND_SERVER = 2
SPAN_KIND_CLIENT = 3
STATUS_UNSET = 0
STATUS_ERROR = 2


def _is_hex(value: bytes) -> bool:
    return not value.translate(None, b"0123456789abcdef") if value else False


def parse_traceparent(value: bytes):
    """
    Parse a W3C C{traceparent} header value.

    :return: C{(trace_id, parent_id, sampled)} with the ids as lower-case
        hex bytes, or L{None} when the value is not valid (which starts a
        new trace, as the specification asks).
    """
    value = value.strip(b" \t")
    if len(value) < 55:
        return None
    version = value[:2]
    if not _is_hex(version) or version == b"ff":
        return None
    if version == b"00":
        if len(value) != 55:
            return None
    elif len(value) > 55 and value[55:56] != b"-":
        # A later version may append fields, after a dash.
        return None
    if value[2:3] != b"-" or value[35:36] != b"-" or value[52:53] != b"-":
        return None
    trace_id = value[3:35]
    parent_id = value[36:52]
    flags = value[53:55]
    if not (_is_hex(trace_id) and _is_hex(parent_id) and _is_hex(flags)):
        return None
    if trace_id == _ZERO_TRACE or parent_id == _ZERO_SPAN:
        return None
    return trace_id, parent_id, bool(int(flags, 16) & 1)


def valid_tracestate(value: bytes) -> bool:
    """
    Whether a C{tracestate} value may be passed on: printable ASCII within
    the length the specification allows.  (Its list members are not
    checked one by one: Balance passes it through, it does not edit it.)
    """
    if len(value) > _MAX_TRACESTATE:
        return False
    return all(0x20 <= c < 0x7F for c in value)


class Span:
    """
    The server span of one request.

    :ivar trace_id: 32 lower-case hex digits, as bytes.
    :ivar span_id: this span's id, 16 hex digits (the parent the backend sees).
    :ivar parent_id: the client's span id, or C{b""} for a new trace.
    :ivar sampled: recorded and exported, and flagged so to the backend.
    :ivar tracestate: passed to the backend as received, or L{None}.
    :ivar start: wall-clock start, in seconds.
    :ivar carried: the request had C{traceparent} or C{tracestate} fields
        (to be removed before it goes upstream).
    :ivar recording: sampled, and there is an exporter: the spans are kept.
    :ivar try_id: the client span id of the try in flight upstream, or
        L{None} (none yet, or not recording).
    :ivar try_start: when that try started; C{try_end} when it ended (0
        while it goes on); C{try_status} the status of its response head
        (0 before one came).
    :ivar tries: the tries made so far.
    """

    __slots__ = (
        "trace_id",
        "span_id",
        "parent_id",
        "sampled",
        "tracestate",
        "start",
        "carried",
        "recording",
        "try_id",
        "try_start",
        "try_end",
        "try_status",
        "tries",
    )

    kind = SPAN_KIND_SERVER

    def __init__(
        self,
        trace_id,
        span_id,
        parent_id,
        sampled,
        tracestate,
        start,
        carried=False,
        recording=False,
    ):
        self.trace_id = trace_id
        self.span_id = span_id
        self.parent_id = parent_id
        self.sampled = sampled
        self.tracestate = tracestate
        self.start = start
        self.carried = carried
        self.recording = recording
        self.try_id = None
        self.try_start = 0.0
        self.try_end = 0.0
        self.try_status = 0
        self.tries = 0

    def _traceparent(self) -> bytes:
        return b"00-%s-%s-%s" % (
            self.trace_id,
            self.try_id or self.span_id,
            b"01" if self.sampled else b"00",
        )

    def headers(self) -> bytes:
        """The propagation header lines for the backend, each ending in CRLF."""
        line = b"traceparent: " + self._traceparent() + b"\r\n"
        if self.tracestate is not None:
            line += b"tracestate: " + self.tracestate + b"\r\n"
        return line

    def fields(self) -> list:
        """The propagation fields for an HTTP/2 backend."""
        fields = [(b"traceparent", self._traceparent())]
        if self.tracestate is not None:
            fields.append((b"tracestate", self.tracestate))
        return fields


class TrySpan:
    """
    The client span of one try upstream, as exported: the same fields as
    L{Span} that L{encode_spans} reads.
    """

    __slots__ = ("trace_id", "span_id", "parent_id", "tracestate", "start")

    kind = SPAN_KIND_CLIENT

    def __init__(self, span: Span):
        self.trace_id = span.trace_id
        self.span_id = span.try_id
        self.parent_id = span.span_id
        self.tracestate = span.tracestate
        self.start = span.try_start


class Tracer:
    """
    Starts and ends the spans of requests.

    :param ratio: C{sample_ratio} for requests without a valid parent.
    :param exporter: where sampled spans go (L{OTLPExporter.add}), or
        L{None} to keep nothing (propagation only).
    :param clock: wall-clock time in seconds (C{time.time}).
    :param rng: the source of new ids (a C{random.Random}).
    """

    def __init__(self, ratio: float, exporter=None, clock=time.time, rng=None):
        self.ratio = ratio
        # TraceIdRatioBased: sampled when the low 64 bits of the trace id
        # are below ratio x 2^64.
        self._bound = int(ratio * (1 << 64))
        self.exporter = exporter
        self._clock = clock
        self._bits = (rng or random.Random()).getrandbits

    def _new_id(self, bits: int) -> bytes:
        while True:
            n = self._bits(bits)
            if n:
                return b"%0*x" % (bits // 4, n)

    def begin(self, request_headers) -> Span:
        """
        Start the span of a request with these header fields.  The
        request's own C{traceparent}/C{tracestate} must not be forwarded
        (see L{strip}); L{Span.headers} replaces them.
        """
        parent = None
        tracestate = None
        carried = False
        for name, value in request_headers:
            if len(name) == 11 and name.lower() == _TRACEPARENT:
                # More than one traceparent is invalid: a new trace.
                parent = parse_traceparent(value) if parent is None else False
                carried = True
            elif len(name) == 10 and name.lower() == _TRACESTATE:
                carried = True
                tracestate = value if tracestate is None else tracestate + b"," + value
        if parent:
            trace_id, parent_id, sampled = parent
            if tracestate is not None and not valid_tracestate(tracestate):
                tracestate = None
        else:
            trace_id = self._new_id(128)
            parent_id = b""
            sampled = int(trace_id[16:], 16) < self._bound
            # A tracestate without a valid traceparent means nothing.
            tracestate = None
        return Span(
            trace_id,
            self._new_id(64),
            parent_id,
            sampled,
            tracestate,
            self._clock(),
            carried,
            sampled and self.exporter is not None,
        )

    def begin_try(self, span: Span) -> None:
        """A try of a recording C{span}'s request starts upstream: a new client span."""
        span.try_id = self._new_id(64)
        span.try_start = self._clock()
        span.try_end = 0.0
        span.try_status = 0
        span.tries += 1

    def try_ended(self, span: Span) -> None:
        """The try in flight ended (its span is exported later, with what is known then)."""
        span.try_end = self._clock()

    def end_try(self, span: Span, attributes: dict, error: str | None) -> None:
        """Export the client span of C{span}'s last try."""
        end = span.try_end or self._clock()
        self.exporter.add((TrySpan(span), end, attributes, error))
        span.try_id = None

    def end(self, span: Span, attributes: dict, error: str | None) -> None:
        """
        End C{span} now; export it if it is sampled.

        :param attributes: its attributes, C{{key: str or int}}.
        :param error: the reason of a failed request (the span's status is
            then ERROR), or L{None}.
        """
        if not span.sampled or self.exporter is None:
            return
        self.exporter.add((span, self._clock(), attributes, error))


def strip(request_headers):
    """C{request_headers} without C{traceparent} and C{tracestate}."""
    return [
        (n, v)
        for n, v in request_headers
        if not (len(n) in (10, 11) and n.lower() in (_TRACEPARENT, _TRACESTATE))
    ]


def _value(v):
    if type(v) is int:
        return {"intValue": str(v)}
    return {"stringValue": v}


def _nanos(seconds: float) -> str:
    return str(int(seconds * 1e9))


def encode_spans(records, service_name: str, scope_version: str = "") -> bytes:
    """
    An OTLP/HTTP JSON C{ExportTraceServiceRequest} body for the finished
    spans C{records} (what L{Tracer.end} queues), following the protobuf
    JSON mapping of OTLP: ids as hex strings, times as decimal strings of
    nanoseconds, enums as integers.
    """
    spans = []
    for span, end, attributes, error in records:
        item = {
            "traceId": span.trace_id.decode("ascii"),
            "spanId": span.span_id.decode("ascii"),
            # HTTP semantic conventions: "{method} {route}" for servers,
            # "{method}" for clients.
            "name": span.kind == SPAN_KIND_SERVER
            and attributes.get("http.route")
            and "%s %s" % (attributes.get("http.request.method", "HTTP"), attributes["http.route"])
            or attributes.get("http.request.method", "HTTP"),
            "kind": span.kind,
            "startTimeUnixNano": _nanos(span.start),
            "endTimeUnixNano": _nanos(end),
            "attributes": [{"key": k, "value": _value(v)} for k, v in attributes.items()],
            "status": {"code": STATUS_ERROR, "message": error}
            if error is not None
            else {"code": STATUS_UNSET},
        }
        if span.parent_id:
            item["parentSpanId"] = span.parent_id.decode("ascii")
        if span.tracestate is not None:
            item["traceState"] = span.tracestate.decode("ascii")
        spans.append(item)
    body = {
        "resourceSpans": [
            {
                "resource": {
                    "attributes": [
                        {"key": "service.name", "value": {"stringValue": service_name}},
                    ]
                },
                "scopeSpans": [
                    {"scope": {"name": "balance", "version": scope_version}, "spans": spans}
                ],
            }
        ]
    }
    return json.dumps(body, separators=(",", ":")).encode("utf-8")


class OTLPExporter:
    """
    Sends finished spans to an OTLP/HTTP collector in JSON batches, off the
    request path.

    :param endpoint: the collector's base URL (C{http://host:4318}); spans
        go to C{endpoint + "/v1/traces"}.
    :param service_name: the C{service.name} resource attribute.
    :param reactor: for the flush timer and the HTTP client.
    :param agent: an C{IAgent} (a L{twisted.web.client.Agent} with a
        persistent pool by default).
    :param max_queue: spans held at most; more are dropped (and counted).
    :param batch: spans per request at most; a full batch is sent at once.
    :param interval: seconds between flushes of a partial batch.
    :ivar exported: spans the collector accepted (2xx).
    :ivar dropped: spans dropped because the queue was full.
    :ivar failed: spans lost to failed exports (error status, no answer).
    """

    log = Logger()

    def __init__(
        self,
        endpoint: str,
        service_name: str,
        reactor,
        agent=None,
        max_queue: int = 2048,
        batch: int = 512,
        interval: float = 1.0,
        timeout: float = 10.0,
    ):
        self.url = endpoint.rstrip("/").encode("utf-8") + b"/v1/traces"
        self.service_name = service_name
        self._reactor = reactor
        self._pool = None
        if agent is None:
            from twisted.web.client import Agent, HTTPConnectionPool

            self._pool = HTTPConnectionPool(reactor, persistent=True)
            self._pool.maxPersistentPerHost = 1
            agent = Agent(reactor, connectTimeout=timeout, pool=self._pool)
        self._agent = agent
        self.max_queue = max_queue
        self.batch = batch
        self.interval = interval
        self.timeout = timeout
        self._queue: deque = deque()
        self._sending = None
        self._waiters: list[Deferred] = []
        self._soon = None
        self._loop = LoopingCall(self.flush)
        self._loop.clock = reactor
        self.exported = 0
        self.dropped = 0
        self.failed = 0

    def add(self, record) -> None:
        """Queue a finished span (from L{Tracer.end}); never blocks."""
        queue = self._queue
        if len(queue) >= self.max_queue:
            self.dropped += 1
            return
        queue.append(record)
        if len(queue) >= self.batch and self._soon is None and self._sending is None:
            self._soon = self._reactor.callLater(0, self._flush_soon)

    def _flush_soon(self) -> None:
        self._soon = None
        self.flush()

    def start(self) -> None:
        """Flush every C{interval} seconds."""
        if not self._loop.running:
            self._loop.start(self.interval, now=False)

    def stop(self) -> Deferred:
        """
        Stop the timer and send what is queued.

        :return: a Deferred firing once the queue is empty (or its last
            export failed); it never fails.
        """
        if self._loop.running:
            self._loop.stop()
        if self._soon is not None and self._soon.active():
            self._soon.cancel()
        self._soon = None
        d = self._drain()
        if self._pool is not None:
            d.addBoth(lambda _: self._pool.closeCachedConnections())
        return d

    def _drain(self) -> Deferred:
        d = self.flush()
        if not self._queue and self._sending is None:
            return d

        def more(_):
            if self._queue or self._sending is not None:
                return self._drain()

        return d.addCallback(more)

    def flush(self) -> Deferred:
        """
        Send one batch of queued spans, unless an export is in flight.

        :return: a Deferred firing when that export (or the one in flight)
            is over; it never fails.
        """
        if self._sending is not None:
            waiter = Deferred()
            self._waiters.append(waiter)
            return waiter
        if not self._queue:
            return succeed(None)
        queue = self._queue
        records = [queue.popleft() for _ in range(min(self.batch, len(queue)))]
        try:
            body = encode_spans(records, self.service_name)
        except Exception:
            self.failed += len(records)
            self.log.failure("cannot encode {n} spans", n=len(records))
            return succeed(None)
        from twisted.web.client import readBody
        from twisted.web.http_headers import Headers

        waiter = Deferred()
        self._waiters = [waiter]
        self._sending = True
        d = self._agent.request(
            b"POST",
            self.url,
            Headers({b"content-type": [b"application/json"]}),
            _Body(body),
        )
        d.addTimeout(self.timeout, self._reactor)

        def answered(response):
            return readBody(response).addCallback(lambda _: response.code)

        def done(code):
            if 200 <= code < 300:
                self.exported += len(records)
            else:
                self.failed += len(records)
                self.log.warn(
                    "OTLP collector {url} answered {code}: {n} spans lost",
                    url=self.url.decode(),
                    code=code,
                    n=len(records),
                )

        def failed(f):
            self.failed += len(records)
            self.log.warn(
                "cannot export {n} spans to {url}: {error}",
                n=len(records),
                url=self.url.decode(),
                error=f.getErrorMessage(),
            )

        def over(_):
            self._sending = None
            waiters, self._waiters = self._waiters, []
            if len(self._queue) >= self.batch and self._loop.running:
                self._soon = self._reactor.callLater(0, self._flush_soon)
            for w in waiters:
                w.callback(None)

        d.addCallback(answered)
        d.addCallbacks(done, failed)
        d.addBoth(over)
        return waiter


@implementer(IBodyProducer)
class _Body:
    """A request body already in memory."""

    def __init__(self, data: bytes):
        self._data = data
        self.length = len(data)

    def startProducing(self, consumer):
        consumer.write(self._data)
        return succeed(None)

    def pauseProducing(self):
        pass

    def resumeProducing(self):
        pass

    def stopProducing(self):
        pass
