# -*- test-case-name: tests.observe.test_tracing -*-
"""
Tracing: W3C trace context parsing and sampling (pure), the OTLP/HTTP JSON
exporter against a receiver written here (a twisted.web resource on a
free loopback port), and Balance end to end: a real backend sees the
propagated C{traceparent}, the receiver gets the spans.
"""

from __future__ import annotations

import json
import random

from twisted.internet import reactor
from twisted.internet.defer import Deferred, fail
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.resource import Resource
from twisted.web.server import Site

from balance.observe.tracing import (
    OTLPExporter,
    Span,
    Tracer,
    encode_spans,
    parse_traceparent,
    strip,
)
from tests.helpers import wait_for
from tests.integration.test_http_proxy import OK, BalanceTestCase, raw_exchange

TRACE = b"4bf92f3577b34da6a3ce929d0e0e4736"
PARENT = b"00f067aa0ba902b7"


def traceparent(flags: bytes = b"01", trace: bytes = TRACE, parent: bytes = PARENT) -> bytes:
    return b"00-" + trace + b"-" + parent + b"-" + flags


class ParseTests(SynchronousTestCase):
    """Which C{traceparent} values continue a trace and which start a new one."""

    def test_valid(self):
        """A well-formed value gives the trace id, the parent id and the sampled flag."""
        self.assertEqual(parse_traceparent(traceparent()), (TRACE, PARENT, True))
        self.assertEqual(parse_traceparent(traceparent(b"00")), (TRACE, PARENT, False))
        # Flags other than "sampled" are ignored.
        self.assertEqual(parse_traceparent(traceparent(b"03")), (TRACE, PARENT, True))

    def test_future_version(self):
        """A later version may carry more fields after a dash; the known part is used."""
        value = b"cc" + traceparent()[2:] + b"-what-the-future-holds"
        self.assertEqual(parse_traceparent(value), (TRACE, PARENT, True))
        self.assertIsNone(parse_traceparent(b"cc" + traceparent()[2:] + b"x"))

    def test_invalid(self):
        """Malformed values are ignored (a new trace starts)."""
        for value in (
            b"",
            b"garbage",
            traceparent() + b"-",  # version 00 has exactly four fields
            b"ff" + traceparent()[2:],  # version ff is forbidden
            traceparent(trace=b"0" * 32),
            traceparent(parent=b"0" * 16),
            traceparent(trace=TRACE.upper()),  # lower-case hex only
            traceparent(flags=b"0g"),
            traceparent().replace(b"-", b"_"),
            traceparent()[:-1],
        ):
            self.assertIsNone(parse_traceparent(value), value)


class SamplingTests(SynchronousTestCase):
    """Head sampling: the parent's decision wins; the ratio decides for new traces."""

    def tracer(self, ratio: float, exporter=None) -> Tracer:
        return Tracer(ratio, exporter, clock=lambda: 100.0, rng=random.Random(1))

    def test_sampled_parent_with_ratio_zero(self):
        """A sampled parent is followed even with sample_ratio 0."""
        span = self.tracer(0.0).begin([(b"traceparent", traceparent(b"01"))])
        self.assertTrue(span.sampled)
        self.assertEqual((span.trace_id, span.parent_id), (TRACE, PARENT))
        self.assertNotEqual(span.span_id, PARENT)
        self.assertEqual(len(span.span_id), 16)

    def test_unsampled_parent_with_ratio_one(self):
        """An unsampled parent is followed even with sample_ratio 1."""
        span = self.tracer(1.0).begin([(b"TraceParent", traceparent(b"00"))])
        self.assertFalse(span.sampled)
        self.assertTrue(span.carried)

    def test_ratio(self):
        """Without a parent, about sample_ratio of new traces are sampled."""
        tracer = self.tracer(0.25)
        sampled = sum(tracer.begin([]).sampled for _ in range(4000))
        self.assertTrue(800 < sampled < 1200, sampled)
        self.assertFalse(any(self.tracer(0.0).begin([]).sampled for _ in range(500)))
        self.assertTrue(all(self.tracer(1.0).begin([]).sampled for _ in range(500)))

    def test_invalid_parent_starts_new_trace(self):
        """An invalid or repeated traceparent starts a new trace; its tracestate is dropped."""
        for fields in (
            [(b"traceparent", b"nonsense"), (b"tracestate", b"a=1")],
            [(b"traceparent", traceparent()), (b"traceparent", traceparent())],
        ):
            span = self.tracer(1.0).begin(fields)
            self.assertNotEqual(span.trace_id, TRACE)
            self.assertEqual(span.parent_id, b"")
            self.assertIsNone(span.tracestate)
            self.assertTrue(span.carried)

    def test_headers(self):
        """The backend gets the trace id, this span's id as parent, the flag and the tracestate."""
        span = self.tracer(0.0).begin(
            [
                (b"traceparent", traceparent()),
                (b"tracestate", b"congo=t61rcWkgMzE"),
                (b"tracestate", b"rojo=00f067aa0ba902b7"),
            ]
        )
        self.assertEqual(
            span.headers(),
            b"traceparent: 00-%s-%s-01\r\ntracestate: congo=t61rcWkgMzE,rojo=00f067aa0ba902b7\r\n"
            % (TRACE, span.span_id),
        )
        unsampled = self.tracer(0.0).begin([])
        self.assertTrue(unsampled.headers().endswith(b"-00\r\n"))

    def test_strip(self):
        """The client's trace fields are removed before the span's own are added."""
        fields = [(b"Host", b"a"), (b"TraceParent", b"x"), (b"tracestate", b"y"), (b"X", b"1")]
        self.assertEqual(strip(fields), [(b"Host", b"a"), (b"X", b"1")])

    def test_only_sampled_spans_exported(self):
        """Ending a span queues it for export only when it is sampled."""
        exported = []

        class Exporter:
            add = exported.append

        tracer = self.tracer(0.0, Exporter())
        tracer.end(tracer.begin([(b"traceparent", traceparent(b"00"))]), {}, None)
        self.assertEqual(exported, [])
        tracer.end(tracer.begin([(b"traceparent", traceparent(b"01"))]), {"a": 1}, "boom")
        [(span, end, attributes, error)] = exported
        self.assertEqual((end, attributes, error), (100.0, {"a": 1}, "boom"))


class EncodeTests(SynchronousTestCase):
    """The OTLP/HTTP JSON body (protobuf JSON mapping)."""

    def test_encoding(self):
        """Hex ids, nanosecond strings, integer enums, typed attribute values."""
        span = Span(TRACE, b"1234567890abcdef", PARENT, True, b"k=v", 1.5)
        body = json.loads(
            encode_spans(
                [(span, 2.25, {"http.request.method": "GET", "http.route": "/a*", "n": 3}, None)],
                "edge",
            )
        )
        [resource] = body["resourceSpans"]
        self.assertEqual(
            resource["resource"]["attributes"],
            [{"key": "service.name", "value": {"stringValue": "edge"}}],
        )
        [scope] = resource["scopeSpans"]
        [item] = scope["spans"]
        self.assertEqual(item["traceId"], TRACE.decode())
        self.assertEqual(item["spanId"], "1234567890abcdef")
        self.assertEqual(item["parentSpanId"], PARENT.decode())
        self.assertEqual(item["traceState"], "k=v")
        self.assertEqual(item["name"], "GET /a*")
        self.assertEqual(item["kind"], 2)
        self.assertEqual(item["startTimeUnixNano"], "1500000000")
        self.assertEqual(item["endTimeUnixNano"], "2250000000")
        self.assertEqual(item["status"], {"code": 0})
        self.assertIn({"key": "n", "value": {"intValue": "3"}}, item["attributes"])
        error = json.loads(
            encode_spans([(Span(TRACE, b"1" * 16, b"", True, None, 1), 2, {}, "x")], "s")
        )
        item = error["resourceSpans"][0]["scopeSpans"][0]["spans"][0]
        self.assertEqual(item["status"], {"code": 2, "message": "x"})
        self.assertNotIn("parentSpanId", item)
        self.assertEqual(item["name"], "HTTP")


class _FakeAgent:
    """An IAgent that records requests and answers them when told."""

    def __init__(self):
        self.requests = []

    def request(self, method, uri, headers=None, bodyProducer=None):
        d = Deferred()
        body = []

        class Consumer:
            write = body.append

        bodyProducer.startProducing(Consumer())
        self.requests.append((method, uri, b"".join(body), d))
        return d


class _Response:
    phrase = b"whatever"
    length = 2

    def __init__(self, code):
        self.code = code

    def deliverBody(self, protocol):
        from twisted.python.failure import Failure
        from twisted.web.client import ResponseDone

        protocol.dataReceived(b"{}")
        protocol.connectionLost(Failure(ResponseDone()))


class ExporterTests(SynchronousTestCase):
    """Batches off the request path: bounded queue, interval, one export at a time."""

    def setUp(self):
        self.clock = Clock()
        self.agent = _FakeAgent()
        self.exporter = OTLPExporter(
            "http://collector:4318/", "balance", self.clock, self.agent, max_queue=4, batch=2
        )

    def record(self):
        return (Span(TRACE, b"1" * 16, b"", True, None, 1.0), 2.0, {}, None)

    def test_queue_bounded(self):
        """Spans beyond the queue's size are dropped and counted, never blocking."""
        for _ in range(6):
            self.exporter.add(self.record())
        self.assertEqual(self.exporter.dropped, 2)

    def test_batches(self):
        """A full batch goes at once; one export is in flight at a time; 2xx counts as exported."""
        self.exporter.start()
        self.exporter.add(self.record())
        self.clock.advance(0)
        self.assertEqual(self.agent.requests, [])
        self.exporter.add(self.record())
        self.exporter.add(self.record())
        self.exporter.add(self.record())
        self.clock.advance(0)
        [(method, uri, body, d)] = self.agent.requests
        self.assertEqual((method, uri), (b"POST", b"http://collector:4318/v1/traces"))
        self.assertEqual(len(json.loads(body)["resourceSpans"][0]["scopeSpans"][0]["spans"]), 2)
        d.callback(_Response(200))
        self.assertEqual(self.exporter.exported, 2)
        # The rest was a full batch too: sent on the next turn.
        self.clock.advance(0)
        self.assertEqual(len(self.agent.requests), 2)
        self.agent.requests[1][3].callback(_Response(503))
        self.assertEqual((self.exporter.exported, self.exporter.failed), (2, 2))

    def test_interval(self):
        """A partial batch goes after the flush interval."""
        self.exporter.start()
        self.exporter.add(self.record())
        self.clock.advance(1.0)
        self.assertEqual(len(self.agent.requests), 1)
        self.agent.requests[0][3].errback(ConnectionRefusedError())
        self.assertEqual(self.exporter.failed, 1)

    def test_stop_flushes(self):
        """Stopping sends everything queued, batch after batch."""
        self.exporter.start()
        for _ in range(3):
            self.exporter.add(self.record())
        self.clock.advance(0)
        done = self.exporter.stop()
        self.assertNoResult(done)
        self.agent.requests[0][3].callback(_Response(200))
        self.assertNoResult(done)
        self.agent.requests[1][3].callback(_Response(200))
        self.successResultOf(done)
        self.assertEqual(self.exporter.exported, 3)

    def test_stop_empty(self):
        """Stopping with nothing queued is immediate."""
        self.exporter.start()
        self.successResultOf(self.exporter.stop())


class Receiver(Resource):
    """An OTLP/HTTP receiver: records the spans POSTed to /v1/traces."""

    isLeaf = True

    def __init__(self):
        super().__init__()
        self.posts = []
        self.spans = []

    def render_POST(self, request):
        self.posts.append((request.path, request.getHeader(b"content-type")))
        body = json.loads(request.content.read())
        for resource in body["resourceSpans"]:
            service = {a["key"]: a["value"] for a in resource["resource"]["attributes"]}
            for scope in resource["scopeSpans"]:
                for span in scope["spans"]:
                    span["service"] = service["service.name"]["stringValue"]
                    span["attrs"] = {
                        a["key"]: next(iter(a["value"].values())) for a in span["attributes"]
                    }
                    self.spans.append(span)
        request.setHeader(b"content-type", b"application/json")
        return b"{}"


def request_with(port: int, *fields: bytes):
    head = b"GET /api/items?x=1 HTTP/1.1\r\nHost: shop.test:8080\r\n" + b"".join(
        f + b"\r\n" for f in fields
    )
    return raw_exchange(port, head + b"\r\n")


class EndToEndTests(BalanceTestCase):
    """Balance on real sockets, a recording backend, and the receiver."""

    def setUp(self):
        self.receiver = Receiver()
        port = reactor.listenTCP(0, Site(self.receiver), interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        self.collector = port.getHost().port
        self.backend, backend_port = self.recording()
        self.port = self.start_balance(
            f"""
            listeners:
              - name: web
                listen: "tcp:0:interface=127.0.0.1"
                routes:
                  - match: {{path_prefix: "/api/"}}
                    cluster: app
            clusters:
              - name: app
                backends: ["127.0.0.1:{backend_port}"]
            tracing:
              service_name: edge
              sample_ratio: 0
              otlp_endpoint: "http://127.0.0.1:{self.collector}"
            """
        )

    def upstream_fields(self, index: int) -> dict:
        request = self.backend.requests()[index]
        fields = {}
        for name, value in request.headers:
            fields.setdefault(name.lower(), []).append(value)
        return fields

    async def test_sampled_parent(self):
        """
        A sampled parent with sample_ratio 0: the backend sees the client's
        trace id with Balance's span as parent, and the span reaches the
        collector with the HTTP attributes.
        """
        [response], _, _ = await self.in_thread(
            request_with, self.port, b"traceparent: " + traceparent(), b"tracestate: k=v"
        )
        self.assertEqual(response.status, 200)
        fields = self.upstream_fields(0)
        [value] = fields[b"traceparent"]
        trace, parent, sampled = parse_traceparent(value)
        self.assertEqual((trace, sampled), (TRACE, True))
        self.assertNotEqual(parent, PARENT)
        self.assertEqual(fields[b"tracestate"], [b"k=v"])
        await wait_for(lambda: self.receiver.spans, 10, "the spans at the collector")
        [client, span] = self.receiver.spans
        self.assertEqual(self.receiver.posts, [(b"/v1/traces", b"application/json")])
        self.assertEqual(span["service"], "edge")
        self.assertEqual(span["traceId"], TRACE.decode())
        self.assertEqual(span["parentSpanId"], PARENT.decode())
        self.assertEqual(span["kind"], 2)
        # The try upstream: a client span, child of the server span, and
        # the backend's parent.
        self.assertEqual(client["kind"], 3)
        self.assertEqual(client["traceId"], TRACE.decode())
        self.assertEqual(client["parentSpanId"], span["spanId"])
        self.assertEqual(client["spanId"], parent.decode())
        self.assertEqual(client["name"], "GET")
        self.assertEqual(
            client["attrs"],
            {
                "http.request.method": "GET",
                "server.address": "127.0.0.1",
                "server.port": str(self.backend_port()),
                "balance.upstream.address": f"127.0.0.1:{self.backend_port()}",
                "http.response.status_code": "200",
            },
        )
        self.assertEqual(client["status"], {"code": 0})
        self.assertLessEqual(int(span["startTimeUnixNano"]), int(client["startTimeUnixNano"]))
        self.assertLessEqual(int(client["endTimeUnixNano"]), int(span["endTimeUnixNano"]))
        self.assertLess(int(span["startTimeUnixNano"]), int(span["endTimeUnixNano"]))
        attrs = span["attrs"]
        self.assertEqual(attrs["http.request.method"], "GET")
        self.assertEqual(attrs["url.path"], "/api/items")
        self.assertEqual(attrs["http.response.status_code"], "200")
        self.assertEqual(attrs["server.address"], "shop.test")
        self.assertEqual(attrs["client.address"], "127.0.0.1")
        self.assertEqual(attrs["network.protocol.version"], "1.1")
        self.assertEqual(attrs["http.route"], "/api/*")
        self.assertEqual(attrs["balance.route"], "0")
        self.assertEqual(attrs["balance.cluster"], "app")
        self.assertEqual(attrs["balance.upstream.address"], f"127.0.0.1:{self.backend_port()}")

    def backend_port(self) -> int:
        return self.backend.connections[0].transport.getHost().port

    async def test_unsampled_and_new_traces(self):
        """
        An unsampled parent is propagated (flag 00) and not exported; with
        sample_ratio 0 a request without a parent starts a new, unsampled
        trace; an invalid traceparent is replaced.
        """
        await self.in_thread(request_with, self.port, b"traceparent: " + traceparent(b"00"))
        await self.in_thread(request_with, self.port)
        await self.in_thread(request_with, self.port, b"traceparent: 00-nonsense")
        [value] = self.upstream_fields(0)[b"traceparent"]
        self.assertEqual(parse_traceparent(value)[0::2], (TRACE, False))
        for index in (1, 2):
            [value] = self.upstream_fields(index)[b"traceparent"]
            trace, _, sampled = parse_traceparent(value)
            self.assertNotEqual(trace, TRACE)
            self.assertFalse(sampled)
        # Stopping flushes whatever is queued: nothing was.
        await self.service.stopService()
        self.assertEqual(self.receiver.spans, [])
        self.assertEqual(self.service.span_exporter.exported, 0)

    async def test_flush_at_stop(self):
        """Spans still queued when Balance stops are exported before it exits."""
        await self.in_thread(request_with, self.port, b"traceparent: " + traceparent())
        self.assertEqual(self.receiver.spans, [])
        await self.service.stopService()
        self.assertEqual([s["kind"] for s in self.receiver.spans], [3, 2])
        text = self.service.metrics.render().decode()
        self.assertIn('balance_tracing_spans_total{result="exported"} 2.0', text)


class CollectorDownTests(SynchronousTestCase):
    """A collector that is down costs spans, never requests."""

    def test_refused(self):
        """Exports to a closed port fail and are counted."""
        clock = Clock()

        class Agent:
            def request(self, *args, **kwargs):
                return fail(ConnectionRefusedError())

        exporter = OTLPExporter("http://127.0.0.1:1", "b", clock, Agent())
        exporter.add((Span(TRACE, b"1" * 16, b"", True, None, 1.0), 2.0, {}, None))
        self.successResultOf(exporter.stop())
        self.assertEqual(exporter.failed, 1)


class AttributesTests(SynchronousTestCase):
    """Span attributes from an exchange, in memory."""

    def test_tls_and_host(self):
        """TLS name and version split; the Host's port (and IPv6 brackets) dropped."""
        from balance.testing import InMemoryProxy

        proxy = InMemoryProxy(
            """
            listeners:
              - name: web
                listen: "tcp:8080"
                routes: [{match: {path_regex: "/r/.*"}, direct_response: {status: 503}}]
            """.replace("\n            ", "\n")
        )
        spans = []

        class Exporter:
            add = spans.append

        proxy.context.tracer = Tracer(1.0, Exporter())
        client = proxy.client()
        conn = proxy.context.connections.copy().pop()
        conn.tls_version = "TLSv1.3"
        client.send(b"GET /r/1 HTTP/1.1\r\nHost: [::1]:8443\r\n\r\n")
        proxy.run()
        [(span, _, attributes, error)] = spans
        self.assertEqual(attributes["tls.protocol.name"], "tls")
        self.assertEqual(attributes["tls.protocol.version"], "1.3")
        self.assertEqual(attributes["server.address"], "::1")
        self.assertEqual(attributes["http.route"], "/r/.*")
        self.assertEqual(error, "status 503")


class RetrySpanTests(BalanceTestCase):
    """Each try upstream is a client span of its own; retries are siblings."""

    async def test_retry(self):
        receiver = Receiver()
        port = reactor.listenTCP(0, Site(receiver), interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        unavailable = (
            b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
        )
        answers = [unavailable]

        def answer(request, conn):
            conn.transport.write(answers.pop() if answers else OK)

        backend, backend_port = self.recording(answer)
        self.port = self.start_balance(
            f"""
            listeners:
              - name: web
                listen: "tcp:0:interface=127.0.0.1"
                routes:
                  - match: {{path_prefix: "/"}}
                    cluster: app
                    retry: {{attempts: 2, on: ["503"], backoff: {{base: 1ms, max: 2ms}}}}
            clusters:
              - name: app
                backends: ["127.0.0.1:{backend_port}"]
            tracing:
              service_name: edge
              sample_ratio: 1
              otlp_endpoint: "http://127.0.0.1:{port.getHost().port}"
            """
        )
        [response], _, _ = await self.in_thread(request_with, self.port)
        self.assertEqual(response.status, 200)
        await self.service.stopService()
        first, second, server = receiver.spans
        self.assertEqual([s["kind"] for s in (first, second, server)], [3, 3, 2])
        self.assertEqual({first["parentSpanId"], second["parentSpanId"]}, {server["spanId"]})
        self.assertNotEqual(first["spanId"], second["spanId"])
        self.assertEqual(first["attrs"]["http.response.status_code"], "503")
        self.assertEqual(first["status"]["code"], 2)
        self.assertIn("status 503", first["status"]["message"])
        self.assertNotIn("http.request.resend_count", first["attrs"])
        self.assertEqual(second["attrs"]["http.response.status_code"], "200")
        self.assertEqual(second["attrs"]["http.request.resend_count"], "1")
        self.assertEqual(second["status"], {"code": 0})
        self.assertLessEqual(int(first["endTimeUnixNano"]), int(second["startTimeUnixNano"]))
        # Each try's request names its own span as the parent.
        parents = [
            parse_traceparent(dict((n.lower(), v) for n, v in r.headers)[b"traceparent"])[1]
            for r in backend.requests()
        ]
        self.assertEqual(parents, [first["spanId"].encode(), second["spanId"].encode()])
