"""
The HTTP/2 upstream's pure parts and its pool, without sockets: request
HEADERS for a backend, response heads, trailers, the pool's idle sweep and
connect bookkeeping.  (Real connections: tests.integration.test_h2_upstream.)
"""

from __future__ import annotations

from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from balance.http.h2_headers import request_fields, response_head_fields, safe_trailers
from balance.http.h2_upstream import H2Pool, H2UpstreamConnection
from balance.http.message import trailer_block
from balance.http.upstream import UpstreamConnection


class _Route:
    request_remove = frozenset({b"x-secret"})
    request_set = [(b"X-Env", b"prod")]
    request_set_names = frozenset({b"x-env"})
    rewrite = None


class _Backend:
    address = "10.0.0.1:50051"

    def __init__(self):
        self.connects = []
        self.endpoint = self

    def connect(self, factory):
        d = Deferred()
        self.connects.append((factory, d))
        return d


class _Exchange:
    def __init__(self, headers, host=b"api.example", te=False):
        self.route = _Route()
        self.method = b"POST"
        self.target = b"/pkg.Svc/Call"
        self.host = host
        self.headers = headers
        self.connection_tokens = {b"x-hop"}
        self.te_trailers = te
        self.backend = _Backend()
        self.chunked_in = True
        self.trailers_in = None


class RequestFieldsTests(SynchronousTestCase):
    def test_fields(self):
        ex = _Exchange(
            [
                (b"Host", b"api.example"),
                (b"Content-Type", b"application/grpc"),
                (b"TE", b"trailers"),
                (b"Connection", b"x-hop"),
                (b"X-Hop", b"1"),
                (b"X-Secret", b"s"),
                (b"X-Env", b"dev"),
                (b"X-Forwarded-For", b"192.0.2.1"),
                (b"Via", b"1.1 edge"),
                (b"Transfer-Encoding", b"chunked"),
            ]
        )
        fields = request_fields(ex, b"198.51.100.7", b"http", b"https")
        self.assertEqual(
            fields,
            [
                (b":method", b"POST"),
                (b":scheme", b"https"),
                (b":authority", b"api.example"),
                (b":path", b"/pkg.Svc/Call"),
                (b"content-type", b"application/grpc"),
                (b"te", b"trailers"),
                (b"x-forwarded-for", b"192.0.2.1, 198.51.100.7"),
                (b"x-forwarded-proto", b"http"),
                (b"x-forwarded-host", b"api.example"),
                (b"forwarded", b'for=198.51.100.7;host="api.example";proto=http'),
                (b"via", b"1.1 edge, 1.1 balance"),
                (b"x-env", b"prod"),
            ],
        )

    def test_no_host_and_client_subject(self):
        """No Host (HTTP/1.0): the backend's address is the authority; mTLS subject added."""
        ex = _Exchange([(b"x-client-subject", b"forged")], host=b"", te=True)
        fields = dict(
            request_fields(ex, b"::1", b"https", b"http", b"x-client-subject", b"CN=alice")
        )
        self.assertEqual(fields[b":authority"], b"10.0.0.1:50051")
        self.assertEqual(fields[b"x-client-subject"], b"CN=alice")
        self.assertEqual(fields[b"te"], b"trailers")
        self.assertEqual(fields[b"forwarded"], b'for="[::1]";proto=https')


class ResponseTests(SynchronousTestCase):
    def test_head(self):
        self.assertEqual(
            response_head_fields([(b":status", b"404"), (b"grpc-status", b"5")]),
            (404, [(b"grpc-status", b"5")]),
        )
        for bad in ([], [(b":status", b"20")], [(b":status", b"abc")]):
            self.assertRaises(ValueError, response_head_fields, bad)

    def test_trailers_filtered(self):
        self.assertEqual(
            safe_trailers(
                [
                    (b"grpc-status", b"0"),
                    (b":status", b"200"),
                    (b"content-length", b"5"),
                    (b"transfer-encoding", b"chunked"),
                    (b"grpc-message", b"ok"),
                ]
            ),
            [(b"grpc-status", b"0"), (b"grpc-message", b"ok")],
        )
        self.assertEqual(safe_trailers([(b"content-length", b"1")]), [])

    def test_malformed_trailers_dropped_whole(self):
        for fields in (
            [(b"grpc-status", b"0"), (b"x", b"a\r\nInjected: 1")],
            [(b"Upper", b"1")],
            [(b"x", b"nul\x00")],
        ):
            self.assertEqual(safe_trailers(fields), [])

    def test_trailer_block(self):
        self.assertEqual(
            trailer_block([(b"grpc-status", b"0"), (b"x", b"y")]),
            b"0\r\ngrpc-status: 0\r\nx: y\r\n\r\n",
        )

    def test_http11_backend_gets_request_trailers(self):
        """A chunked request to an HTTP/1.1 backend carries the trailers in its last chunk."""
        conn = UpstreamConnection(None)
        ex = _Exchange([])
        conn.end_body(ex)
        ex.trailers_in = [(b"x-sum", b"1")]
        conn.end_body(ex)
        self.assertEqual(conn._wbuf, [b"0\r\n\r\n", b"0\r\nx-sum: 1\r\n\r\n"])


class PoolTests(SynchronousTestCase):
    def setUp(self):
        self.clock = Clock()
        self.backend = _Backend()
        self.pool = H2Pool(self.clock, self.backend, 60.0, b"http")

    def test_waiters_share_a_connection_being_made(self):
        """Exchanges that arrive while a connection is being made wait for that one."""
        first, second = self.pool.connect(), self.pool.connect()
        self.assertEqual(len(self.backend.connects), 1)
        [conn] = self.pool.connections
        self.assertEqual(conn.load, 2)
        self.assertIsNone(self.pool.take())
        factory, d = self.backend.connects[0]
        self.assertIs(factory.buildProtocol(None), conn)
        conn.connecting = False
        d.callback(conn)
        a, b = self.successResultOf(first), self.successResultOf(second)
        self.assertIs(a.connection, conn)
        self.assertIs(b.connection, conn)

    def test_connect_failure_fails_every_waiter(self):
        first, second = self.pool.connect(), self.pool.connect()
        self.backend.connects[0][1].errback(ConnectionRefusedError())
        self.failureResultOf(first, ConnectionRefusedError)
        self.failureResultOf(second, ConnectionRefusedError)
        self.assertEqual(self.pool.connections, [])

    def test_cancelled_waiter_gives_back_its_slot(self):
        d = self.pool.connect()
        [conn] = self.pool.connections
        d.cancel()
        self.failureResultOf(d)
        self.assertEqual((conn.load, conn.waiters), (0, []))

    def test_breaker_slot_kept_once(self):
        """The first exchange's connection slot stays with the connection; others go back."""
        released = []

        class Breakers:
            def release_connection(self):
                released.append(1)

        conn = H2UpstreamConnection(self.pool)
        breakers = Breakers()
        a, b = conn.new_stream(), conn.new_stream()
        a.breakers = breakers
        b.breakers = breakers
        self.assertIs(conn.breakers, breakers)
        self.assertIs(b.breakers, breakers)
        self.assertEqual(released, [1])

    def test_idle_connections_swept(self):
        closed = []
        conn = H2UpstreamConnection(self.pool)
        conn.connecting = False
        conn.close = lambda: closed.append(conn)
        self.pool.connections.append(conn)
        conn.idle_since = self.clock.seconds()
        self.pool.idle(conn)
        self.clock.advance(30)
        busy = H2UpstreamConnection(self.pool)
        busy.connecting = False
        busy.load = 1
        self.pool.connections.append(busy)
        self.clock.advance(31)
        self.assertEqual(closed, [conn])

    def test_sweep_waits_for_the_youngest(self):
        closed = []
        conn = H2UpstreamConnection(self.pool)
        conn.connecting = False
        conn.close = lambda: closed.append(conn)
        self.pool.connections.append(conn)
        self.pool.idle(conn)
        self.clock.advance(50)
        conn.idle_since = self.clock.seconds()
        self.clock.advance(10)
        self.assertEqual(closed, [])
        self.clock.advance(50)
        self.assertEqual(closed, [conn])

    def test_close_idle(self):
        closed = []
        idle, busy = H2UpstreamConnection(self.pool), H2UpstreamConnection(self.pool)
        for conn in (idle, busy):
            conn.connecting = False
            conn.close = lambda conn=conn: closed.append(conn)
            self.pool.connections.append(conn)
        busy.load = 3
        self.pool.idle(idle)
        self.pool.close_idle()
        self.assertEqual(closed, [idle])
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_closed_pool_closes_at_once(self):
        closed = []
        conn = H2UpstreamConnection(self.pool)
        conn.close = lambda: closed.append(conn)
        self.pool.closed = True
        self.pool.idle(conn)
        self.assertEqual(closed, [conn])


class _Down:
    """The downstream of a fake exchange: records what it is handed."""

    def __init__(self):
        self.ctx = self
        self.client_ip = b"192.0.2.1"
        self.flushed = 0

    def request_fields(self, ex, scheme):
        return request_fields(ex, self.client_ip, b"http", scheme)

    def flush(self):
        self.flushed += 1


class _ProtoExchange(_Exchange):
    """What the connection calls on an Exchange, recorded."""

    def __init__(self):
        super().__init__([(b"host", b"x")])
        self.method = b"GET"
        self.downstream = _Down()
        self.upstream = None
        self.events = []

    def response_head(self, conn, status, reason, headers):
        self.events.append(("head", status))

    def response_body(self, chunk):
        self.events.append(("body", chunk))

    def response_trailers(self, conn, fields):
        self.events.append(("trailers", fields))

    def response_complete(self, conn, keep_alive):
        self.events.append(("complete",))

    def upstream_failed(self, conn, why, status):
        self.events.append(("failed", why))


class ConnectionTests(SynchronousTestCase):
    """One H2UpstreamConnection against an h2 server driven by hand."""

    def setUp(self):
        import h2.config
        import h2.connection
        from twisted.internet.testing import StringTransport

        self.pool = H2Pool(Clock(), _Backend(), 60.0, b"http")
        self.conn = H2UpstreamConnection(self.pool)
        self.pool.connections.append(self.conn)
        self.transport = StringTransport()
        self.conn.makeConnection(self.transport)
        self.server = h2.connection.H2Connection(
            h2.config.H2Configuration(client_side=False, header_encoding=None)
        )
        self.server.initiate_connection()
        self.exchange()

    def exchange(self):
        self.to_server()
        self.conn.dataReceived(self.server.data_to_send())

    def to_server(self):
        data = self.transport.value()
        self.transport.clear()
        return self.server.receive_data(data) if data else []

    def request(self):
        """The one request the server got since last asked."""
        import h2.events

        [request] = [e for e in self.to_server() if isinstance(e, h2.events.RequestReceived)]
        return request

    def start(self):
        ex = _ProtoExchange()
        stream = self.conn.new_stream()
        ex.upstream = stream
        stream.attach(ex, False)
        stream.send_head(ex)
        stream.end_body(ex)
        stream.flush()
        return ex, stream

    def test_response_after_reset_is_ignored(self):
        """
        HEADERS the backend sent before it saw Balance's RST_STREAM (and
        after h2 forgot the stream) do not fail the connection.
        """
        ex, stream = self.start()
        request = self.request()
        stream.abort()
        # The backend answers before reading the reset.
        self.server.send_headers(request.stream_id, [(b":status", b"200")], end_stream=True)
        late = self.server.data_to_send()
        # Streams enough for h2 to prune the reset one from its table.
        others = [self.start() for _ in range(3)]
        self.to_server()
        self.conn.dataReceived(late)
        self.assertFalse(self.conn.closed)
        self.assertEqual(ex.events, [])
        for other, _ in others:
            self.assertEqual(other.events, [])

    def test_response_with_trailers(self):
        ex, stream = self.start()
        request = self.request()
        sid = request.stream_id
        self.server.send_headers(sid, [(b":status", b"200"), (b"content-type", b"a/b")])
        self.server.send_data(sid, b"hello")
        self.server.send_headers(sid, [(b"grpc-status", b"0")], end_stream=True)
        self.conn.dataReceived(self.server.data_to_send())
        self.assertEqual(
            ex.events,
            [
                ("head", 200),
                ("body", b"hello"),
                ("trailers", [(b"grpc-status", b"0")]),
                ("complete",),
            ],
        )
        self.assertEqual(self.conn.load, 0)

    def test_paused_stream_holds_its_window(self):
        ex, stream = self.start()
        request = self.request()
        sid = request.stream_id
        self.server.send_headers(sid, [(b":status", b"200")])
        self.conn.dataReceived(self.server.data_to_send())
        stream.pauseProducing()
        for _ in range(4):
            self.server.send_data(sid, b"x" * 10000)
        self.conn.dataReceived(self.server.data_to_send())
        self.assertEqual([e for e in self.to_server() if e.stream_id == sid], [])
        stream.resumeProducing()
        [update] = [e for e in self.to_server() if e.stream_id == sid]
        self.assertEqual(update.delta, 40000)

    def test_malformed_status_fails_the_stream(self):
        ex, stream = self.start()
        request = self.request()
        self.server.config.validate_outbound_headers = False
        self.server.send_headers(request.stream_id, [(b":status", b"2xx")])
        self.conn.dataReceived(self.server.data_to_send())
        self.assertEqual(ex.events[0][0], "failed")

    def test_goaway_refuses_later_streams(self):
        first, _ = self.start()
        second, _ = self.start()
        events = self.to_server()
        sids = sorted({e.stream_id for e in events if hasattr(e, "headers")})
        from hyperframe.frame import GoAwayFrame

        # Written beside h2, whose state machine would refuse to answer after.
        self.conn.dataReceived(GoAwayFrame(0, last_stream_id=sids[0]).serialize())
        self.assertEqual(second.events, [("failed", "backend sent GOAWAY")])
        self.assertEqual(first.events, [])
        self.assertFalse(self.conn.has_room())
        self.server.send_headers(sids[0], [(b":status", b"204")], end_stream=True)
        self.conn.dataReceived(self.server.data_to_send())
        self.assertEqual(first.events, [("head", 204), ("complete",)])
        self.assertTrue(self.conn.closed)
