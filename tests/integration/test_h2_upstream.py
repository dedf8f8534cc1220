# -*- test-case-name: tests.integration.test_h2_upstream -*-
"""
HTTP/2 to backends (C{upstream_protocol: h2}) over real loopback sockets:
Balance in this process, a scriptable HTTP/2 backend
(L{tests.h2peer.H2Backend}) that counts its connections, and real clients
(Twisted's HTTP/1.1 Agent, raw sockets, curl, nghttp and h2load for HTTP/2
downstreams).
"""

from __future__ import annotations

import io
import os
import re
import shutil
import tempfile

import h2.config
import h2.connection
import h2.events
from OpenSSL import SSL
from twisted.internet import reactor, ssl
from twisted.internet.defer import DeferredList, ensureDeferred
from twisted.internet.protocol import Protocol
from twisted.web.client import Agent, FileBodyProducer, readBody
from twisted.web.http_headers import Headers

from tests.h2peer import H2Backend
from tests.helpers import connect_client, wait_for
from tests.integration.test_h2 import H2TestCase


class _RawClient(Protocol):
    """Sends one request; keeps what comes back; may stop reading."""

    def __init__(self, request: bytes):
        self.request = request
        self.received = []
        self.size = 0
        self.closed = False

    def connectionMade(self):
        self.transport.write(self.request)

    def dataReceived(self, data):
        self.received.append(data)
        self.size += len(data)

    def connectionLost(self, reason):
        self.closed = True

    @property
    def data(self) -> bytes:
        return b"".join(self.received)


class _H2Client(Protocol):
    """A minimal HTTP/2 client (h2c): one request, with request trailers."""

    def __init__(self, headers, body: bytes, trailers):
        self.request = (headers, body, trailers)
        self.h2 = h2.connection.H2Connection(
            h2.config.H2Configuration(client_side=True, header_encoding=None)
        )
        self.headers = self.trailers = None
        self.body = b""
        self.done = False

    def connectionMade(self):
        headers, body, trailers = self.request
        self.h2.initiate_connection()
        self.h2.send_headers(1, headers)
        self.h2.send_data(1, body, end_stream=trailers is None)
        if trailers is not None:
            self.h2.send_headers(1, trailers, end_stream=True)
        self.transport.write(self.h2.data_to_send())

    def dataReceived(self, data):
        for event in self.h2.receive_data(data):
            if isinstance(event, h2.events.ResponseReceived):
                self.headers = dict(event.headers)
            elif isinstance(event, h2.events.DataReceived):
                self.body += event.data
                self.h2.acknowledge_received_data(event.flow_controlled_length, 1)
            elif isinstance(event, h2.events.TrailersReceived):
                self.trailers = dict(event.headers)
            elif isinstance(event, h2.events.StreamEnded):
                self.done = True
        self.transport.write(self.h2.data_to_send())


class H2UpstreamTestCase(H2TestCase):
    max_streams = 100
    extra_cluster = ""

    def setUp(self):
        self.backend = H2Backend(self.max_streams)
        port = self.backend.listen(self)
        self.port = self.start_balance(
            f"""
            listeners:
              - name: web
                listen: "tcp:0:interface=127.0.0.1"
                cluster: h2
                routes:
                  - match: {{path_prefix: "/retry/"}}
                    cluster: h2
                    rewrite: {{path_prefix: "/"}}
                    retry: {{attempts: 3, on: [reset, "502"], backoff: {{base: 1ms, max: 5ms}}}}
                  - match: {{path_prefix: "/quick/"}}
                    cluster: h2
                    rewrite: {{path_prefix: "/"}}
                    timeout: 200ms
            clusters:
              - name: h2
                upstream_protocol: h2
                backends: ["127.0.0.1:{port}"]
                {self.extra_cluster}
            """
        )
        self.url = f"http://127.0.0.1:{self.port}"

    def get(self, path: str, method: bytes = b"GET", body: bytes | None = None):
        """An HTTP/1.1 request through Balance: a Deferred of C{(status, body)}."""
        return ensureDeferred(self._get(path, method, body))

    async def _get(self, path, method, body):
        producer = FileBodyProducer(io.BytesIO(body)) if body is not None else None
        response = await Agent(reactor).request(
            method, (self.url + path).encode("ascii"), Headers(), producer
        )
        return response.code, await readBody(response)

    async def raw(self, request: bytes) -> _RawClient:
        client = _RawClient(request)
        await connect_client(self.port, client)
        return client


class MultiplexingTests(H2UpstreamTestCase):
    async def test_many_streams_one_connection(self):
        """100 concurrent HTTP/2 streams and 50 HTTP/1.1 clients share one backend connection."""
        out = await self.tool("h2load", "-n", "1000", "-c", "4", "-m", "25", self.url + "/x")
        self.assertIn("1000 succeeded, 0 failed, 0 errored, 0 timeout", out)
        results = await DeferredList(
            [self.get("/y") for _ in range(50)], consumeErrors=True, fireOnOneErrback=True
        )
        self.assertEqual([r[1] for r in results], [(200, b"ok")] * 50)
        held = [self.get("/hold") for _ in range(50)]
        await wait_for(lambda: len(self.backend.held) == 50, what="50 held requests")
        self.backend.release()
        for d in held:
            self.assertEqual(await d, (200, b"held"))
        self.assertEqual(self.backend.connections, 1)
        self.assertEqual(self.backend.peak, 50)
        self.assertEqual(len(self.backend.requests), 1100)

    async def test_large_bodies(self):
        """5 MiB up and back through an h2c client, 20 MiB down to an HTTP/1.1 client."""
        body = os.urandom(5 * 1024 * 1024)
        directory = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, directory)
        up, down = os.path.join(directory, "up"), os.path.join(directory, "down")
        with open(up, "wb") as f:
            f.write(body)
        await self.tool(
            "curl", "-sS", "--max-time", "60", "--http2-prior-knowledge",
            "--data-binary", "@" + up, "-o", down, self.url + "/echo",
        )  # fmt: skip
        with open(down, "rb") as f:
            self.assertEqual(f.read(), body)
        status, data = await self.get("/echo", b"POST", body)
        self.assertEqual((status, len(data)), (200, len(body)))
        self.assertEqual(data, body)
        status, data = await self.get("/size/%d" % (20 * 1024 * 1024))
        self.assertEqual((status, len(data)), (200, 20 * 1024 * 1024))
        self.assertEqual(self.backend.connections, 1)

    async def test_slow_reader_stalls_only_its_stream(self):
        """A client that reads nothing holds back its own stream's window, not the others'."""
        total = 64 * 1024 * 1024
        slow = await self.raw(b"GET /size/%d HTTP/1.1\r\nHost: x\r\n\r\n" % total)
        slow.transport.pauseProducing()
        await wait_for(lambda: self.backend.sent > 1024 * 1024, what="the big response to start")
        for _ in range(5):
            status, data = await self.get("/size/100000")
            self.assertEqual((status, len(data)), (200, 100000))
        # Only the window Balance acknowledged went out, not the whole body.
        self.assertLess(self.backend.sent, total)
        self.assertEqual(self.backend.connections, 1)
        slow.transport.resumeProducing()
        await wait_for(lambda: slow.size > total, timeout=60, what="the slow client to read all")
        slow.transport.loseConnection()

    async def test_te_and_trailers_to_http2_client(self):
        """te: trailers reaches the backend; its trailers reach an HTTP/2 client."""
        out = await self.tool(
            "nghttp", "-v", "-H", "te: trailers", "-d", "/dev/null", self.url + "/echo"
        )
        self.assertIn("x-te: trailers", out)
        self.assertIn("x-trailer: done", out)
        # Trailers come in a HEADERS frame of their own, with END_STREAM.
        self.assertGreaterEqual(out.count("recv HEADERS frame"), 2, out)

    async def test_request_trailers_to_http2_backend(self):
        """An HTTP/2 client's request trailers reach the HTTP/2 backend."""
        client = _H2Client(
            [(b":method", b"POST"), (b":scheme", b"http"), (b":authority", b"x"),
             (b":path", b"/echo"), (b"te", b"trailers")],
            b"payload",
            [(b"x-checksum", b"abc"), (b"content-length", b"1")],
        )  # fmt: skip
        await connect_client(self.port, client)
        await wait_for(lambda: client.done, what="the response")
        client.transport.loseConnection()
        self.assertEqual(client.body, b"payload")
        self.assertEqual(client.headers[b"x-te"], b"trailers")
        # content-length is no trailer: dropped on the way.
        self.assertEqual(client.trailers, {b"x-trailer": b"done", b"x-got-x-checksum": b"abc"})

    async def test_upload_backpressure(self):
        """A backend that stops reading stops Balance reading that client, within bounds."""
        self.backend.stall_uploads = True
        size = 8 * 1024 * 1024
        client = await self.raw(
            b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % size
        )
        client.transport.write(b"u" * size)
        await wait_for(lambda: self.backend.received >= 65535, what="the first window")
        [pool] = self.service.pools._pools.values()
        [conn] = pool.connections
        [stream] = conn._streams.values()
        await wait_for(lambda: stream._producer_paused, what="the client to be paused")
        self.assertEqual(self.backend.received, 65535)
        self.assertLess(stream._out_bytes, 1024 * 1024)
        # The backend dies: the request fails, and the client connection
        # (which Balance was not reading) is closed.
        for conn in list(self.backend.open):
            conn.transport.abortConnection()
        await wait_for(lambda: client.closed, what="the client connection closed")
        self.assertIn(b"502 Bad Gateway", client.data)

    async def test_trailers_to_http11_client(self):
        """An HTTP/1.1 client gets the trailers in the last chunk."""
        client = await self.raw(
            b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\nTE: trailers\r\n"
            b"Connection: close\r\n\r\nabc"
        )
        await wait_for(lambda: client.closed, what="the response")
        data = client.data
        self.assertIn(b"Transfer-Encoding: chunked\r\n", data)
        self.assertIn(b"x-te: trailers\r\n", data)
        self.assertTrue(data.endswith(b"3\r\nabc\r\n0\r\nx-trailer: done\r\n\r\n"), data)


class DrainTests(H2UpstreamTestCase):
    async def test_drain_lets_stream_finish(self):
        """nghttp gets the graceful GOAWAY pair and still its in-flight response."""
        out = ensureDeferred(self.tool("nghttp", "-v", "-t", "30", self.url + "/hold"))
        await wait_for(lambda: self.backend.held, what="the held request")
        factory = self.service.listeners.getServiceNamed("web").factory
        [conn] = list(factory.context.connections)
        drained = factory.drain()
        # nghttp answered the drain PING: the last GOAWAY is out.
        await wait_for(lambda: conn._goaway == 2, what="the last GOAWAY")
        self.assertFalse(drained.called)
        self.backend.release()
        out = await out
        await drained
        self.assertIn(":status: 200", out)
        [sid] = re.findall(r"recv \(stream_id=(\d+)\) :status: 200", out)
        goaways = re.findall(r"recv GOAWAY frame.*\n.*last_stream_id=(\d+)", out)
        self.assertEqual(goaways, [str(2**31 - 1), sid], out)


class FailureTests(H2UpstreamTestCase):
    async def test_reset_fails_that_stream_only(self):
        held = self.get("/hold")
        await wait_for(lambda: self.backend.held, what="the held request")
        status, _ = await self.get("/reset")
        self.assertEqual(status, 502)
        self.backend.release()
        self.assertEqual(await held, (200, b"held"))
        self.assertEqual(self.backend.connections, 1)

    async def test_backend_dies(self):
        """Every stream in flight fails with 502; the next request gets a new connection."""
        held = [self.get("/hold") for _ in range(3)]
        await wait_for(lambda: len(self.backend.held) == 3, what="the held requests")
        status, _ = await self.get("/die")
        self.assertEqual(status, 502)
        for d in held:
            self.assertEqual((await d)[0], 502)
        self.assertEqual(await self.get("/next"), (200, b"ok"))
        self.assertEqual(self.backend.connections, 2)

    async def test_goaway_retried_on_new_connection(self):
        """A stream above the GOAWAY's last_stream_id goes again on a new connection."""
        self.assertEqual(await self.get("/first"), (200, b"ok"))
        self.assertEqual(await self.get("/goaway", b"POST", b"body"), (200, b"x" * 10))
        self.assertEqual(self.backend.connections, 2)
        self.assertEqual(self.backend.requests[-1][b":method"], b"POST")

    async def test_timeout_resets_only_that_stream(self):
        """The route's timeout: 504, the stream reset, the connection kept."""
        status, _ = await self.get("/quick/hold")
        self.assertEqual(status, 504)
        await wait_for(lambda: self.backend.resets == 1, what="the stream reset")
        self.assertEqual(await self.get("/after"), (200, b"ok"))
        self.assertEqual(self.backend.connections, 1)

    async def test_refused_stream_retried(self):
        self.assertEqual(await self.get("/refuse"), (200, b"x" * 10))
        self.assertEqual(len(self.backend.requests), 2)

    async def test_retry_policy_on_reset(self):
        """A reset stream is retried under the route's retry policy, then 502."""
        status, _ = await self.get("/retry/reset")
        self.assertEqual(status, 502)
        self.assertEqual(len(self.backend.requests), 3)


class StreamLimitTests(H2UpstreamTestCase):
    """A backend that takes 2 streams at once per connection."""

    max_streams = 2

    async def test_stream_limit_respected(self):
        """Streams beyond the backend's limit wait for a slot (or a further connection)."""
        held = [self.get("/hold") for _ in range(6)]
        answered = 0
        while answered < 6:
            await wait_for(lambda: self.backend.held, what="held requests")
            answered += len(self.backend.held)
            self.backend.release()
        for d in held:
            self.assertEqual(await d, (200, b"held"))
        self.assertEqual(self.backend.peak, 2)
        self.assertEqual(len(self.backend.requests), 6)


class TLSBackendTests(H2UpstreamTestCase):
    """ALPN h2 over backend TLS, verified against a test CA."""

    def setUp(self):
        from balance.tls.testing import CA

        directory = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, directory)
        ca = CA()
        cert, key = ca.issue(["backend.test"]).write(directory, "backend")
        ca_file = os.path.join(directory, "ca.pem")
        ca.write_cert(ca_file)
        self.extra_cluster = f"tls: {{ca: {ca_file}, sni: backend.test}}"
        self.negotiated = []
        real_listen = H2Backend.listen

        def listen_tls(backend, testcase):
            context = ssl.DefaultOpenSSLContextFactory(key, cert)
            ctx = context.getContext()
            ctx.use_certificate_chain_file(cert)

            def select(conn, protocols):
                self.negotiated.append(protocols)
                return b"h2"

            ctx.set_alpn_select_callback(select)
            port = reactor.listenSSL(0, backend, context, interface="127.0.0.1")
            testcase.addCleanup(port.stopListening)
            testcase.addCleanup(lambda: [c.transport.abortConnection() for c in backend.open])
            return port.getHost().port

        H2Backend.listen = listen_tls
        try:
            super().setUp()
        finally:
            H2Backend.listen = real_listen

    async def test_alpn_h2(self):
        self.assertEqual(await self.get("/tls"), (200, b"ok"))
        self.assertEqual(self.negotiated, [[b"h2"]])
        self.assertEqual(self.backend.requests[0][b":scheme"], b"https")


    async def test_health_check(self):
        """
        An http health check of the cluster goes as an HTTP/2 stream over
        the cluster's TLS (ALPN h2, C{:scheme https}).
        """
        from balance.cluster.health import Health, HealthChecker
        from balance.config import model

        cluster = self.service.cluster_services.getServiceNamed("cluster:h2").cluster
        [backend] = cluster.backends
        checker = HealthChecker(
            "h2",
            [backend],
            model.HealthCheck(type="http", path="/hc", interval=0.1, healthy_threshold=1),
            reactor,
            upstream_protocol="h2",
            scheme="https",
        )
        checker.start()
        self.addCleanup(checker.stop)
        await wait_for(lambda: checker.state(backend) is Health.UP, what="the backend UP")
        probe = next(r for r in self.backend.requests if r[b":path"] == b"/hc")
        self.assertEqual(probe[b":scheme"], b"https")
        self.assertEqual(self.negotiated[-1], [b"h2"])



class TraceContextTests(H2TestCase):
    """An HTTP/2 backend gets the trace context, as an HTTP/1.1 one does."""

    async def test_traceparent(self):
        backend = H2Backend()
        port = backend.listen(self)
        self.port = self.start_balance(
            f"""
            listeners:
              - name: web
                listen: "tcp:0:interface=127.0.0.1"
                cluster: h2
            clusters:
              - name: h2
                upstream_protocol: h2
                backends: ["127.0.0.1:{port}"]
            tracing: {{sample_ratio: 0}}
            """
        )
        trace = b"4bf92f3577b34da6a3ce929d0e0e4736"
        response = await Agent(reactor).request(
            b"GET",
            b"http://127.0.0.1:%d/x" % self.port,
            Headers(
                {
                    b"traceparent": [b"00-" + trace + b"-00f067aa0ba902b7-01"],
                    b"tracestate": [b"k=v"],
                }
            ),
        )
        self.assertEqual((response.code, await readBody(response)), (200, b"ok"))
        [request] = backend.requests
        value = request[b"traceparent"]
        self.assertTrue(value.startswith(b"00-" + trace + b"-"), value)
        self.assertTrue(value.endswith(b"-01"), value)
        self.assertNotIn(b"00f067aa0ba902b7", value)
        self.assertEqual(request[b"tracestate"], b"k=v")


del SSL
