# -*- test-case-name: tests.http.test_h2 -*-
"""
HTTP/2 downstream (L{balance.http.h2}), in memory: a client made with the
C{h2} library talks to Balance through L{balance.testing.InMemoryProxy},
whose backends are fake HTTP/1.1 servers, on a L{task.Clock}.

The helpers here (L{H2Client}, L{h2_proxy}) are shared by the other
C{test_h2*} modules.
"""

from __future__ import annotations

import textwrap
from collections import defaultdict

import h2.config
import h2.connection
import h2.events
from h2.errors import ErrorCodes
from hyperframe.frame import DataFrame, Frame, GoAwayFrame, HeadersFrame, PingFrame, RstStreamFrame
from twisted.trial.unittest import SynchronousTestCase

from balance.http import h2 as balance_h2
from balance.http.server import HTTPFactory
from balance.http.sniff import HTTPProtocols
from balance.testing import InMemoryProxy

OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"

CONFIG = """
    listeners:
      - name: web
        listen: "tcp:8080"
        cluster: app
        routes:
          - {match: {path: "/healthz"}, direct_response: {status: 200, body: "ok\\n", headers: {content-type: text/plain}}}
          - {match: {path_prefix: "/slow/"}, cluster: app, timeout: 5s}
          - {match: {path_prefix: "/"}, cluster: app, response_headers: {set: {x-route: main}, remove: [server]}}
    clusters:
      - {name: app, backends: ["10.0.0.1:80"]}
"""


class H2Factory(HTTPFactory):
    """
    The listener factory with HTTP/2, as the wiring in
    L{balance.http.server} does it (test-only until it is applied).
    """

    def __init__(self, context):
        super().__init__(context)
        self.protocols = HTTPProtocols(context)

    def buildProtocol(self, addr):
        if len(self.context.connections) >= self.max_connections:
            return None
        return self.protocols.build()


def h2_proxy(config: str = CONFIG, access_log=None) -> InMemoryProxy:
    """An L{InMemoryProxy} whose listener speaks HTTP/2 too."""
    proxy = InMemoryProxy(config, access_log=access_log)
    proxy.factory = H2Factory(proxy.context)
    return proxy


def parse_frames(data: bytes) -> list:
    """The whole frames in C{data}, parsed with hyperframe."""
    frames = []
    pos = 0
    while pos + 9 <= len(data):
        frame, length = Frame.parse_frame_header(memoryview(data[pos : pos + 9]))
        frame.parse_body(memoryview(data[pos + 9 : pos + 9 + length]))
        frames.append(frame)
        pos += 9 + length
    return frames


class Response:
    """What a client received on one stream."""

    def __init__(self):
        self.headers = None
        self.interim = []
        self.body = b""
        self.ended = False
        self.reset = None
        self.trailers = None

    @property
    def status(self) -> int | None:
        if self.headers is None:
            return None
        return int(dict(self.headers)[b":status"])

    def header(self, name: bytes) -> bytes | None:
        for n, v in self.headers or ():
            if n == name:
                return v
        return None

    def __repr__(self):
        return f"<Response {self.status} {len(self.body)}B ended={self.ended} reset={self.reset}>"


class H2Client:
    """
    An HTTP/2 client over a L{balance.testing.FakeClient}.

    :ivar h2: its C{h2} connection (validating what Balance sends).
    :ivar responses: L{Response} by stream id.
    :ivar goaway: the C{ConnectionTerminated} event received, or L{None}.
    :ivar auto_ack: acknowledge response DATA as it is read (else the
        client's windows run out, like a client that does not read).
    """

    def __init__(self, proxy, host: str = "192.0.2.10", validate: bool = True, preface=True):
        config = h2.config.H2Configuration(
            client_side=True,
            header_encoding=None,
            validate_outbound_headers=validate,
            normalize_outbound_headers=validate,
        )
        self.h2 = h2.connection.H2Connection(config)
        self.h2.initiate_connection()
        self.proxy = proxy
        self.peer = proxy.client(host)
        self.responses: dict[int, Response] = defaultdict(Response)
        self.goaway = None
        self.auto_ack = True
        self.pings = []
        self.events = []
        self._read = 0
        if preface:
            self.flush()

    @property
    def protocol(self):
        """Balance's protocol for this connection, once chosen."""
        return self.peer.transport.protocol

    def flush(self, byte_by_byte: bool = False) -> None:
        """Send what the client's h2 connection queued."""
        data = self.h2.data_to_send()
        if data:
            self.peer.send(data, byte_by_byte)

    def send_raw(self, data: bytes, byte_by_byte: bool = False) -> None:
        """Send bytes as they are (hand-made frames)."""
        self.peer.send(data, byte_by_byte)

    def request(
        self,
        path: bytes = b"/",
        method: bytes = b"GET",
        authority: bytes = b"example.com",
        headers=(),
        body: bytes | None = None,
        end: bool = True,
        scheme: bytes = b"http",
    ) -> int:
        """Open a stream with a request; return its id."""
        sid = self.h2.get_next_available_stream_id()
        fields = [
            (b":method", method),
            (b":scheme", scheme),
            (b":authority", authority),
            (b":path", path),
            *headers,
        ]
        self.h2.send_headers(sid, fields, end_stream=end and body is None)
        if body is not None:
            self._send_body(sid, body, end)
        self.flush()
        return sid

    def _send_body(self, sid: int, data: bytes, end: bool) -> None:
        size = self.h2.max_outbound_frame_size
        for i in range(0, max(len(data), 1), size):
            last = i + size >= len(data)
            self.h2.send_data(sid, data[i : i + size], end_stream=end and last)

    def send_data(self, sid: int, data: bytes, end: bool = False) -> None:
        self._send_body(sid, data, end)
        self.flush()

    def reset(self, sid: int, code=ErrorCodes.CANCEL) -> None:
        self.h2.reset_stream(sid, code)
        self.flush()

    def read(self) -> list:
        """Take what Balance sent since the last read; return the events."""
        data = self.peer.received()[self._read :]
        self._read += len(data)
        events = self.h2.receive_data(data) if data else []
        for event in events:
            self.events.append(event)
            sid = getattr(event, "stream_id", None)
            if isinstance(event, h2.events.ResponseReceived):
                self.responses[sid].headers = event.headers
            elif isinstance(event, h2.events.InformationalResponseReceived):
                self.responses[sid].interim.append(event.headers)
            elif isinstance(event, h2.events.DataReceived):
                self.responses[sid].body += event.data
                if self.auto_ack:
                    self.h2.acknowledge_received_data(event.flow_controlled_length, sid)
            elif isinstance(event, h2.events.StreamEnded):
                self.responses[sid].ended = True
            elif isinstance(event, h2.events.StreamReset):
                self.responses[sid].reset = event.error_code
            elif isinstance(event, h2.events.TrailersReceived):
                self.responses[sid].trailers = event.headers
            elif isinstance(event, h2.events.ConnectionTerminated):
                self.goaway = event
            elif isinstance(event, h2.events.PingAckReceived):
                self.pings.append(event.ping_data)
        self.flush()
        return events

    def read_frames(self) -> list:
        """
        Take what Balance sent since the last read as raw frames, without
        the client's h2 connection (which can process nothing after a
        GOAWAY, not even the streams still running).
        """
        data = self.peer.received()[self._read :]
        self._read += len(data)
        return parse_frames(data)

    def get(self, path: bytes = b"/", **kwargs) -> Response:
        """A request, the clock run, and what arrived for it."""
        sid = self.request(path, **kwargs)
        self.proxy.run()
        self.read()
        return self.responses[sid]


class Recorder:
    """An access log that keeps the exchanges."""

    def __init__(self):
        self.lines = []

    def write(self, ctx, conn, ex):
        self.lines.append((conn, ex))


class H2TestCase(SynchronousTestCase):
    config = CONFIG

    def setUp(self):
        self.log = Recorder()
        self.proxy = h2_proxy(self.config, access_log=self.log)
        self.client = H2Client(self.proxy)
        self.proxy.run()
        self.client.read()

    def backend(self, index: int = -1):
        return self.proxy.backend().connections[index]

    def answer(self, data: bytes = OK, index: int = -1) -> None:
        self.backend(index).respond(data)
        self.proxy.run()
        self.client.read()


class RequestTests(H2TestCase):
    """Requests over HTTP/2 reach HTTP/1.1 backends as the clients meant them."""

    def test_get(self):
        """
        A GET becomes an HTTP/1.1 request with Host from :authority and
        the forwarding headers, and its response comes back on the stream.
        """
        sid = self.client.request(b"/a?b=1", headers=[(b"user-agent", b"test")])
        self.proxy.run()
        [request] = self.backend().requests()
        self.assertEqual((request.method, request.target), (b"GET", b"/a?b=1"))
        self.assertEqual(request.header(b"host"), b"example.com")
        self.assertEqual(request.header(b"user-agent"), b"test")
        self.assertEqual(request.header(b"x-forwarded-for"), b"192.0.2.10")
        self.assertEqual(request.header(b"x-forwarded-proto"), b"http")
        self.assertIsNone(request.header(b"content-length"))
        self.answer(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nServer: x\r\nX-A: 1\r\n\r\nhello")
        response = self.client.responses[sid]
        self.assertEqual(response.status, 200)
        self.assertEqual(response.body, b"hello")
        self.assertTrue(response.ended)
        self.assertEqual(response.header(b"x-a"), b"1")
        self.assertEqual(response.header(b"content-length"), b"5")
        self.assertEqual(response.header(b"via"), b"1.1 balance")
        # The route's response edits apply as over HTTP/1.1.
        self.assertEqual(response.header(b"x-route"), b"main")
        self.assertIsNone(response.header(b"server"))

    def test_preface_byte_by_byte(self):
        """A client whose bytes arrive one at a time is served all the same."""
        client = H2Client(self.proxy, preface=False)
        client.flush(byte_by_byte=True)
        sid = client.h2.get_next_available_stream_id()
        client.h2.send_headers(
            sid,
            [(b":method", b"GET"), (b":scheme", b"http"), (b":authority", b"a"), (b":path", b"/")],
            end_stream=True,
        )
        client.flush(byte_by_byte=True)
        self.proxy.run()
        self.assertIsInstance(client.protocol, balance_h2.H2DownstreamConnection)
        self.backend().respond(OK)
        self.proxy.run()
        client.read()
        self.assertEqual(client.responses[sid].body, b"ok")

    def test_response_hop_by_hop_dropped(self):
        """
        Connection-specific fields of a backend's response (and those its
        Connection names) never reach an HTTP/2 client, which would treat
        them as malformed; a chunked body arrives de-chunked.
        """
        sid = self.client.request(b"/")
        self.proxy.run()
        self.answer(
            b"HTTP/1.1 200 OK\r\nConnection: keep-alive, x-private\r\nKeep-Alive: 5\r\n"
            b"X-Private: secret\r\nTransfer-Encoding: chunked\r\nUpgrade: foo\r\n\r\n"
            b"3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n"
        )
        response = self.client.responses[sid]
        names = [n for n, _ in response.headers]
        for name in (b"connection", b"keep-alive", b"x-private", b"transfer-encoding", b"upgrade"):
            self.assertNotIn(name, names)
        self.assertEqual(response.body, b"abcde")
        self.assertTrue(response.ended)

    def test_post_with_content_length(self):
        """A request body goes up with the client's content-length."""
        sid = self.client.request(
            b"/up", method=b"POST", headers=[(b"content-length", b"5")], body=b"hello"
        )
        self.proxy.run()
        [request] = self.backend().requests()
        self.assertEqual(request.header(b"content-length"), b"5")
        self.assertEqual(request.body, b"hello")
        self.answer()
        self.assertEqual(self.client.responses[sid].status, 200)

    def test_post_whole_body_without_length(self):
        """
        A body that arrives whole with its head, without content-length,
        goes up with a content-length rather than chunked.
        """
        self.client.request(b"/up", method=b"POST", body=b"hello")
        self.proxy.run()
        [request] = self.backend().requests()
        self.assertEqual(request.header(b"content-length"), b"5")
        self.assertIsNone(request.header(b"transfer-encoding"))
        self.assertEqual(request.body, b"hello")

    def test_repeated_heads_each_their_own(self):
        """
        Requests with the same head (one header block, decoded and checked
        once) each get their own fields: what one request's Exchange adds
        (its content-length) is not in the next one's.
        """
        bodies = [b"a", b"bb", b"ccc", b"dddd"]
        for body in bodies:
            self.client.request(b"/up", method=b"POST", body=body)
            self.proxy.run()
        requests = [r for conn in self.proxy.backend().connections for r in conn.requests()]
        self.assertEqual([r.body for r in requests], bodies)
        self.assertEqual(
            [r.header_values(b"content-length") for r in requests],
            [[b"%d" % len(body)] for body in bodies],
        )

    def test_post_streamed_without_length(self):
        """A body still coming when the request starts goes up chunked."""
        sid = self.client.request(b"/up", method=b"POST", body=b"abc", end=False)
        self.proxy.run()
        self.client.send_data(sid, b"def", end=True)
        self.proxy.run()
        [request] = self.backend().requests()
        self.assertTrue(request.chunked)
        self.assertEqual(request.body, b"abcdef")
        self.assertTrue(request.complete)

    def test_empty_post(self):
        """An empty POST tells the backend its length (0)."""
        self.client.request(b"/up", method=b"POST")
        self.proxy.run()
        [request] = self.backend().requests()
        self.assertEqual(request.header(b"content-length"), b"0")

    def test_cookies_joined(self):
        """Cookie fields, split in HTTP/2, reach HTTP/1.1 as one (RFC 9113 8.2.3)."""
        self.client.request(b"/", headers=[(b"cookie", b"a=1"), (b"cookie", b"b=2")])
        self.proxy.run()
        [request] = self.backend().requests()
        self.assertEqual(request.header_values(b"cookie"), [b"a=1; b=2"])

    def test_head(self):
        """A HEAD's response has the headers and no body."""
        sid = self.client.request(b"/", method=b"HEAD")
        self.proxy.run()
        self.answer(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n")
        response = self.client.responses[sid]
        self.assertEqual(response.header(b"content-length"), b"10")
        self.assertEqual(response.body, b"")
        self.assertTrue(response.ended)

    def test_direct_response(self):
        """A direct_response route answers on the stream without a backend."""
        response = self.client.get(b"/healthz")
        self.assertEqual(response.status, 200)
        self.assertEqual(response.body, b"ok\n")
        self.assertEqual(response.header(b"content-type"), b"text/plain")
        self.assertEqual(response.header(b"content-length"), b"3")
        self.assertEqual(self.proxy.backend().attempts, 0)

    def test_expect_continue(self):
        """expect: 100-continue gets an interim 100 before the body is sent."""
        sid = self.client.request(
            b"/up",
            method=b"PUT",
            headers=[(b"content-length", b"2"), (b"expect", b"100-continue")],
            end=False,
        )
        self.proxy.run()
        self.client.read()
        self.assertEqual(self.client.responses[sid].interim, [[(b":status", b"100")]])
        self.client.send_data(sid, b"hi", end=True)
        self.proxy.run()
        [request] = self.backend().requests()
        self.assertEqual(request.body, b"hi")
        self.assertIsNone(request.header(b"expect"))

    def test_concurrent_streams(self):
        """
        Fifty streams at once each get their own backend request and their
        own response, in whatever order the backends answer.
        """
        sids = [self.client.request(b"/n/%d" % i) for i in range(50)]
        self.proxy.run()
        connections = self.proxy.backend().connections
        self.assertEqual(len(connections), 50)
        for conn in reversed(connections):
            [request] = conn.requests()
            body = request.target
            conn.respond(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
        self.proxy.run()
        self.client.read()
        for i, sid in enumerate(sids):
            self.assertEqual(self.client.responses[sid].body, b"/n/%d" % i)
            self.assertTrue(self.client.responses[sid].ended)

    def test_keep_alive_upstream(self):
        """Requests on one HTTP/2 connection reuse pooled backend connections."""
        for _ in range(3):
            sid = self.client.request(b"/")
            self.proxy.run()
            self.answer()
            self.assertEqual(self.client.responses[sid].body, b"ok")
        self.assertEqual(len(self.proxy.backend().connections), 1)

    def test_access_log(self):
        """Every stream is one access log line, with the client's address."""
        self.client.request(b"/x")
        self.proxy.run()
        self.answer()
        [(conn, ex)] = self.log.lines
        self.assertEqual(conn.client_ip, b"192.0.2.10")
        self.assertEqual((ex.status, ex.target), (200, b"/x"))

    def test_trace_context(self):
        """An HTTP/2 request's traceparent reaches the backend re-parented, its span says HTTP 2."""
        from balance.observe.tracing import Tracer

        spans = []

        class Exporter:
            add = spans.append

        self.proxy.context.tracer = Tracer(0.0, Exporter())
        trace = b"4bf92f3577b34da6a3ce929d0e0e4736"
        self.client.request(
            b"/x", headers=[(b"traceparent", b"00-" + trace + b"-00f067aa0ba902b7-01")]
        )
        self.proxy.run()
        [request] = self.backend().requests()
        [value] = request.header_values(b"traceparent")
        self.assertTrue(value.startswith(b"00-" + trace + b"-"), value)
        self.assertNotIn(b"00f067aa0ba902b7", value)
        self.answer()
        [(client, _, _, client_error), (span, _, attributes, error)] = spans
        self.assertEqual(span.trace_id, trace)
        self.assertEqual(attributes["network.protocol.version"], "2")
        self.assertIsNone(error)
        # The backend's parent is the client span of its try.
        self.assertEqual((client.parent_id, client.kind), (span.span_id, 3))
        self.assertEqual(value, b"00-%s-%s-01" % (trace, client.span_id))
        self.assertIsNone(client_error)

    def test_access_log_protocol(self):
        """HTTP/2 requests are logged as HTTP/2.0, in both formats."""
        from balance.observe.accesslog import AccessLog

        self.client.request(b"/x")
        self.proxy.run()
        self.answer()
        [(conn, ex)] = self.log.lines
        lines = {}
        for fmt in ("json", "combined"):
            path = self.mktemp()
            log = AccessLog(path, fmt, self.proxy.clock)
            log.write(self.proxy.context, conn, ex)
            log.close()
            with open(path) as f:
                lines[fmt] = f.read()
        self.assertIn('"protocol":"HTTP/2.0"', lines["json"])
        self.assertIn('"GET /x HTTP/2.0" 200', lines["combined"])

    def test_connection_counted_once(self):
        """An HTTP/2 connection counts as one connection of the listener."""
        metrics = self.proxy.context.listener_metrics
        self.assertEqual((metrics.connections_total, metrics.active), (1, 1))
        self.assertEqual(len(self.proxy.context.connections), 1)
        self.client.peer.close()
        self.proxy.run()
        self.assertEqual((metrics.connections_total, metrics.active), (1, 0))


class ErrorTests(H2TestCase):
    """Failures end one stream, never the connection."""

    def test_no_route(self):
        config = textwrap.dedent(
            """
            listeners:
              - name: web
                listen: "tcp:8080"
                routes: [{match: {path: "/only"}, cluster: app}]
            clusters:
              - {name: app, backends: ["10.0.0.1:80"]}
            """
        )
        proxy = h2_proxy(config)
        client = H2Client(proxy)
        response = client.get(b"/else")
        self.assertEqual(response.status, 404)
        self.assertEqual(response.body, b"Not Found\n")

    def test_backend_refuses(self):
        """A backend that refuses the connection: 502 on that stream only."""
        self.proxy.backend().mode = "refuse"
        response = self.client.get(b"/")
        self.assertEqual(response.status, 502)
        self.assertEqual(response.body, b"Bad Gateway\n")
        self.assertEqual(self.client.get(b"/healthz").status, 200)
        self.assertIsNone(self.client.goaway)

    def test_timeout(self):
        """A backend slower than the route's timeout: 504 on that stream."""
        sid = self.client.request(b"/slow/x")
        self.proxy.run(5.1)
        self.client.read()
        self.assertEqual(self.client.responses[sid].status, 504)
        self.assertIsNone(self.client.goaway)

    def test_backend_cut_mid_response(self):
        """
        A backend that closes in the middle of a body: the stream is reset
        (the only honest signal left), the connection and others go on.
        """
        first = self.client.request(b"/1")
        second = self.client.request(b"/2")
        self.proxy.run()
        self.backend(0).respond(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc")
        self.backend(0).reset()
        self.proxy.run()
        self.answer(index=1)
        self.assertEqual(self.client.responses[first].reset, ErrorCodes.INTERNAL_ERROR)
        self.assertEqual(self.client.responses[second].body, b"ok")
        self.assertIsNone(self.client.goaway)

    def test_client_reset_cancels_upstream(self):
        """A stream the client resets drops its backend connection."""
        sid = self.client.request(b"/")
        self.proxy.run()
        self.client.reset(sid)
        self.proxy.run()
        self.assertTrue(self.backend().closed)
        [(_, ex)] = self.log.lines
        self.assertEqual(ex.status, 499)

    def test_client_closes(self):
        """The client's connection closing cancels every stream's backend side."""
        for _ in range(3):
            self.client.request(b"/")
        self.proxy.run()
        self.client.peer.close()
        self.proxy.run()
        self.assertEqual(self.proxy.backend().open_connections(), [])
        self.assertEqual([ex.status for _, ex in self.log.lines], [499, 499, 499])

    def test_client_goaway(self):
        """
        A client's GOAWAY ends the connection: streams still running are
        cancelled (the h2 library can send nothing after it), backends too.
        """
        self.client.request(b"/")
        self.proxy.run()
        self.client.h2.close_connection()
        self.client.flush()
        self.proxy.run()
        self.assertTrue(self.client.peer.closed)
        self.assertTrue(self.backend().closed)
        [(_, ex)] = self.log.lines
        self.assertEqual((ex.status, ex.reason), (499, "client sent GOAWAY"))

    def test_malformed_request(self):
        """A malformed request is answered 400 on its stream; the next one works."""
        client = H2Client(self.proxy, validate=False)
        bad = client.request(b"/", headers=[(b"transfer-encoding", b"chunked")])
        self.proxy.run()
        client.read()
        self.assertEqual(client.responses[bad].status, 400)
        self.assertEqual(self.proxy.backend().attempts, 0)
        response = client.get(b"/fine")
        self.backend().respond(OK)
        self.proxy.run()
        client.read()
        self.assertEqual(response.body, b"ok")

    def test_body_too_large(self):
        """A body above max_body_bytes without content-length: 413."""
        config = CONFIG.replace(
            'listen: "tcp:8080"', 'listen: "tcp:8080"\n        limits: {max_body_bytes: 10}'
        )
        proxy = h2_proxy(config)
        client = H2Client(proxy)
        sid = client.request(b"/up", method=b"POST", body=b"x" * 5, end=False)
        proxy.run()
        client.send_data(sid, b"y" * 6)
        proxy.run()
        client.read()
        self.assertEqual(client.responses[sid].status, 413)
        # The client is asked to stop sending (RST_STREAM NO_ERROR).
        self.assertEqual(client.responses[sid].reset, ErrorCodes.NO_ERROR)


class FlowControlTests(H2TestCase):
    """HTTP/2 flow control is end-to-end back-pressure, per stream."""

    def test_slow_client_pauses_its_stream_only(self):
        """
        A stream whose client does not read (its window is spent) stops
        reading from its own backend connection, with Balance holding a
        bounded amount; another stream on the same connection goes on.
        """
        self.client.auto_ack = False
        big = self.client.request(b"/big")
        small = self.client.request(b"/small")
        self.proxy.run()
        big_backend, small_backend = self.proxy.backend().connections
        big_backend.respond(b"HTTP/1.1 200 OK\r\nContent-Length: 10000000\r\n\r\n")
        for _ in range(40):
            big_backend.respond(b"x" * 16384)
        self.proxy.run()
        self.client.read()
        # The client's windows (64 KiB) are spent; the backend is paused.
        self.assertEqual(len(self.client.responses[big].body), 65535)
        self.assertFalse(big_backend.transport.reading)
        self.assertGreater(big_backend.held, 0)
        stream = self.client.protocol._streams[big]
        self.assertLessEqual(stream._out_bytes, 200 * 1024)
        # The other stream is not held up by the connection window: the
        # client opens it (as browsers do) and reads its response.
        self.client.h2.increment_flow_control_window(1 << 20)
        self.client.flush()
        small_backend.respond(OK)
        self.proxy.run()
        self.client.read()
        self.assertEqual(self.client.responses[small].body, b"ok")
        # Once the client reads, the big stream's backend reads again.
        self.client.h2.acknowledge_received_data(65535, big)
        self.client.h2.increment_flow_control_window(1 << 20, big)
        self.client.flush()
        self.proxy.run()
        self.client.read()
        self.assertGreater(len(self.client.responses[big].body), 65535)

    def test_whole_response_streams(self):
        """A response larger than every window arrives whole as the client reads."""
        sid = self.client.request(b"/big")
        self.proxy.run()
        backend = self.backend()
        body = bytes(range(256)) * 4096  # 1 MiB
        backend.respond(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(body))
        for i in range(0, len(body), 65536):
            backend.respond(body[i : i + 65536])
            self.proxy.run()
            self.client.read()
        for _ in range(50):
            self.proxy.run()
            self.client.read()
        self.assertEqual(self.client.responses[sid].body, body)
        self.assertTrue(self.client.responses[sid].ended)

    def test_request_body_acknowledged_when_consumed(self):
        """
        Request DATA is acknowledged only once the backend connection took
        it: not while Balance waits for the connection.
        """
        self.proxy.backend().mode = "hang"
        sid = self.client.request(b"/up", method=b"POST", body=b"x" * 60000, end=False)
        self.proxy.run()
        self.client.read()
        window = self.client.h2.local_flow_control_window(sid)
        self.assertLess(window, 10000)
        self.proxy.backend().complete()
        self.proxy.run()
        self.client.read()
        self.assertEqual(self.client.h2.local_flow_control_window(sid), 65535)
        [request] = self.backend().requests()
        self.assertEqual(request.body, b"x" * 60000)

    def test_slow_backend_stops_acknowledgements(self):
        """
        A backend that does not read the request body: Balance stops
        acknowledging that stream's DATA, so the client stops sending.
        """
        sid = self.client.request(
            b"/up", method=b"POST", headers=[(b"content-length", b"10000000")], end=False
        )
        self.proxy.run()
        backend = self.backend()
        backend.transport.consume_writes = False
        sent = 0
        for _ in range(100):
            window = self.client.h2.local_flow_control_window(sid)
            if not window:
                break
            chunk = min(window, 16384)
            self.client.send_data(sid, b"y" * chunk)
            sent += chunk
            self.proxy.run()
            self.client.read()
        self.assertEqual(self.client.h2.local_flow_control_window(sid), 0)
        self.assertLess(backend.transport.unread, 64 * 1024 + 2 * 65535)
        backend.transport.read()
        self.proxy.run()
        self.client.read()
        self.assertGreater(self.client.h2.local_flow_control_window(sid), 0)


class DrainTests(H2TestCase):
    """
    Draining sends GOAWAY and lets the streams in flight finish.  (The
    client side reads raw frames: the h2 library, as a client, can process
    nothing after a GOAWAY.)
    """

    def test_graceful_goaway(self):
        """
        The two-step GOAWAY of RFC 9113 6.8: the streams in flight and
        those the client opened before it learnt of the drain are served,
        later ones refused, then the connection closes.
        """
        first = self.client.request(b"/a")
        self.proxy.run()
        drained = self.proxy.factory.drain()
        frames = self.client.read_frames()
        [goaway] = [f for f in frames if isinstance(f, GoAwayFrame)]
        self.assertEqual((goaway.last_stream_id, goaway.error_code), (2**31 - 1, 0))
        [ping] = [f for f in frames if isinstance(f, PingFrame)]
        # The client answers the PING: the last GOAWAY names the last stream.
        self.client.send_raw(PingFrame(0, opaque_data=ping.opaque_data, flags=["ACK"]).serialize())
        [goaway] = [f for f in self.client.read_frames() if isinstance(f, GoAwayFrame)]
        self.assertEqual((goaway.last_stream_id, goaway.error_code), (first, 0))
        # A stream opened after that is refused (safe to retry elsewhere).
        block = self.client.h2.encoder.encode(
            [(b":method", b"GET"), (b":scheme", b"http"), (b":authority", b"a"), (b":path", b"/")]
        )
        late = HeadersFrame(first + 2, data=block, flags=["END_HEADERS", "END_STREAM"])
        self.client.send_raw(late.serialize())
        self.proxy.run()
        [reset] = self.client.read_frames()
        self.assertIsInstance(reset, RstStreamFrame)
        self.assertEqual(
            (reset.stream_id, reset.error_code), (first + 2, ErrorCodes.REFUSED_STREAM)
        )
        self.assertNoResult(drained)
        self.assertEqual(len(self.proxy.backend().connections), 1)
        # The stream in flight finishes, then the connection closes.
        self.backend().respond(OK)
        self.proxy.clock.advance(0)
        frames = self.client.read_frames()
        self.assertEqual(
            [(type(f), f.stream_id) for f in frames], [(HeadersFrame, first), (DataFrame, first)]
        )
        self.assertEqual(frames[1].data, b"ok")
        self.assertIn("END_STREAM", frames[1].flags)
        self.assertTrue(self.client.peer.closed)
        self.proxy.run()
        self.successResultOf(drained)

    def test_idle_connection_closes_at_once(self):
        """A connection without streams gets its GOAWAY and is closed."""
        drained = self.proxy.factory.drain()
        [goaway] = self.client.read_frames()
        self.assertEqual((goaway.last_stream_id, goaway.error_code), (0, 0))
        self.proxy.run()
        self.successResultOf(drained)

    def test_ping_lost(self):
        """A client that never answers the drain PING gets the last GOAWAY a second later."""
        self.client.request(b"/a")
        self.proxy.run()
        self.proxy.factory.drain()
        self.client.read_frames()
        self.proxy.run(1.1)
        [goaway] = [f for f in self.client.read_frames() if isinstance(f, GoAwayFrame)]
        self.assertEqual(goaway.last_stream_id, 1)

    def test_handshake_timeout(self):
        """A connection without a request within the handshake timeout is closed."""
        self.proxy.run(9)
        self.assertFalse(self.client.peer.closed)
        self.proxy.run(2)
        self.client.read()
        self.assertEqual(self.client.goaway.error_code, ErrorCodes.NO_ERROR)
        self.assertTrue(self.client.peer.closed)

    def test_idle_timeout(self):
        """An HTTP/2 connection without streams closes after the idle timeout."""
        self.client.request(b"/")
        self.proxy.run()
        self.answer()
        self.proxy.run(59)
        self.assertFalse(self.client.peer.closed)
        self.proxy.run(2)
        self.client.read()
        self.assertEqual(self.client.goaway.error_code, ErrorCodes.NO_ERROR)
        self.assertTrue(self.client.peer.closed)
