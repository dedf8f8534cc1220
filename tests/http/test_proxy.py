# -*- test-case-name: tests.http.test_proxy -*-
"""
Tests for L{balance.http.proxy} and L{balance.http.upstream}: one request's
way through Balance (route, backend, pooled connection, bodies both ways)
and every way it can fail, in memory (L{balance.testing.InMemoryProxy}).
"""

from __future__ import annotations

import json
import os

from twisted.trial.unittest import SynchronousTestCase

from balance.observe.accesslog import AccessLog
from balance.testing import InMemoryProxy

CONFIG = """
listeners:
  - name: web
    listen: "tcp:8080"
    timeouts: {handshake: 5s, idle: 30s}
    limits: {max_body_bytes: 10MiB}
    routes:
      - match: {path: /healthz}
        direct_response: {status: 200, body: "ok\\n", headers: {content-type: text/plain}}
      - match: {path_prefix: /old/}
        redirect: {status: 301, location: "https://example.com/new/"}
      - match: {path_prefix: /api/}
        cluster: api
        rewrite: {path_prefix: /}
        request_headers: {set: {x-env: prod}, remove: [x-debug]}
        response_headers: {set: {strict-transport-security: max-age=60}, remove: [server]}
      - match: {path_prefix: /slow}
        cluster: app
        timeout: 2s
      - match: {path_prefix: /}
        cluster: app
clusters:
  - {name: app, backends: ["10.0.0.1:80"], connect_timeout: 1s,
     pool: {max_idle_per_backend: 2, idle_timeout: 10s}}
  - {name: api, backends: ["10.0.0.2:80", "10.0.0.3:80"]}
"""

APP = "10.0.0.1:80"
OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"


def get(path: bytes = b"/", *headers: bytes, method: bytes = b"GET") -> bytes:
    """A request for C{path} with a Host and C{headers} (full lines), no body."""
    return (
        method
        + b" "
        + path
        + b" HTTP/1.1\r\nHost: example.com\r\n"
        + b"".join(h + b"\r\n" for h in headers)
        + b"\r\n"
    )


class ProxyTestCase(SynchronousTestCase):
    """An in-memory proxy per test, with helpers."""

    def setUp(self):
        self.proxy = InMemoryProxy(CONFIG)
        self.app = self.proxy.backend(APP)

    def request(self, data: bytes, byte_by_byte: bool = False):
        """A new client sends C{data}; return it once the proxy has run."""
        client = self.proxy.client()
        client.send(data, byte_by_byte=byte_by_byte)
        self.proxy.run()
        return client

    def respond(self, data: bytes = OK, index: int = -1, byte_by_byte: bool = False):
        """The app backend answers on its connection C{index}."""
        conn = self.app.connections[index]
        conn.respond(data, byte_by_byte=byte_by_byte)
        self.proxy.run()
        return conn

    def pool(self, address: str = APP):
        backend = self.proxy.endpoints[address]
        for cluster in self.proxy.clusters.values():
            for b in cluster.backends:
                if b.endpoint is backend:
                    return self.proxy.pools.get(b, cluster.model.pool)
        raise KeyError(address)


class RoutingTests(ProxyTestCase):
    """What each kind of route does with a request."""

    def test_no_route(self):
        """A request no route matches is answered 404, on a connection kept open."""
        proxy = InMemoryProxy(
            CONFIG.replace("      - match: {path_prefix: /}\n        cluster: app\n", "")
        )
        client = proxy.client()
        client.send(get(b"/nowhere"))
        proxy.run()
        [response] = client.responses()
        self.assertEqual(response.status, 404)
        self.assertFalse(client.closed)

    def test_direct_response(self):
        """A direct_response route answers itself, with its body and headers; HEAD gets no body."""
        client = self.request(get(b"/healthz") + get(b"/healthz", method=b"HEAD"))
        [response, head] = client.responses([b"GET", b"HEAD"])
        self.assertEqual((response.status, response.body), (200, b"ok\n"))
        self.assertEqual(response.header(b"content-type"), b"text/plain")
        self.assertEqual(head.header(b"content-length"), b"3")
        self.assertEqual(client.received().count(b"ok\n"), 1)
        self.assertEqual(self.app.attempts, 0)

    def test_redirect(self):
        """A redirect route answers with its status and Location."""
        client = self.request(get(b"/old/page"))
        [response] = client.responses()
        self.assertEqual(response.status, 301)
        self.assertEqual(response.header(b"location"), b"https://example.com/new/")

    def test_cluster_rewrite_and_header_edits(self):
        """
        A route sends the request to its cluster, with the matched prefix
        rewritten, its request headers set and removed; the response gets the
        route's response header edits.
        """
        client = self.request(get(b"/api/users?id=1", b"X-Debug: 1", b"X-Env: staging"))
        self.assertEqual(self.app.attempts, 0)
        conn = self.proxy.backend("10.0.0.2:80").connections[0]
        [request] = conn.requests()
        self.assertEqual(request.target, b"/users?id=1")
        self.assertIsNone(request.header(b"x-debug"))
        self.assertEqual(request.header_values(b"x-env"), [b"prod"])
        conn.respond(b"HTTP/1.1 200 OK\r\nServer: gunicorn\r\nContent-Length: 0\r\n\r\n")
        self.proxy.run()
        [response] = client.responses()
        self.assertIsNone(response.header(b"server"))
        self.assertEqual(response.header(b"strict-transport-security"), b"max-age=60")

    def test_round_robin(self):
        """Requests to a cluster go to its backends in turn."""
        for _ in range(4):
            self.request(get(b"/api/x"))
        self.assertEqual(self.proxy.backend("10.0.0.2:80").attempts, 2)
        self.assertEqual(self.proxy.backend("10.0.0.3:80").attempts, 2)


class RequestBodyTests(ProxyTestCase):
    """Request bodies on their way to the backend."""

    def test_content_length(self):
        """A Content-Length body is forwarded as it is, with its length."""
        for byte_by_byte in (False, True):
            client = self.request(
                b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 11\r\n\r\nhello world", byte_by_byte
            )
            conn = self.respond()
            request = conn.requests()[-1]
            self.assertEqual(request.body, b"hello world")
            self.assertEqual(request.header(b"content-length"), b"11")
            self.assertEqual(client.responses()[0].status, 200)

    def test_chunked(self):
        """
        A chunked body is forwarded chunked; its trailers are dropped, and
        never become headers, even when the whole request arrives at once.
        """
        for byte_by_byte in (False, True):
            self.setUp()
            client = self.request(
                b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n"
                b"5;ext=1\r\nhello\r\n6\r\n world\r\n0\r\n"
                b"X-Admin: 1\r\nX-Trailer: t\r\n\r\n",
                byte_by_byte,
            )
            conn = self.respond()
            [request] = conn.requests()
            self.assertEqual(request.body, b"hello world")
            self.assertTrue(request.chunked)
            self.assertIsNone(request.header(b"x-admin"))
            self.assertIsNone(request.header(b"x-trailer"))
            self.assertNotIn(b"X-Trailer", conn.received())
            self.assertEqual(client.responses()[0].status, 200)

    def test_body_while_connecting(self):
        """
        Body bytes that arrive while the backend connection is being made
        are held and sent once it is up; reading pauses meanwhile.
        """
        self.app.mode = "hang"
        client = self.request(b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 6\r\n\r\nabc")
        client.send(b"def")
        self.assertEqual(client.held, 3)
        self.app.complete()
        self.proxy.run()
        self.assertEqual(self.app.connections[0].requests()[0].body, b"abcdef")

    def test_streaming_up_with_backpressure(self):
        """
        A large upload to a backend that reads slowly: Balance stops reading
        the client while the backend's buffer is full, so it holds little;
        once the body is through, the client connection reads again and
        serves its next request.
        """
        body = b"u" * (1024 * 1024)
        client = self.request(
            b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: %d\r\n\r\n" % len(body)
        )
        conn = self.app.connections[0]
        conn.transport.consume_writes = False
        for i in range(0, len(body), 65536):
            client.send(body[i : i + 65536])
        self.assertGreater(client.held, len(body) - 300000)
        while client.held:
            conn.transport.read()
            self.proxy.run()
            self.assertLess(conn.transport.unread, 300000)
        conn.transport.read()
        self.assertEqual(len(conn.requests()[0].body), len(body))
        self.respond()
        client.send(get(b"/next"))
        self.proxy.run()
        self.assertEqual(conn.requests()[-1].target, b"/next")

    def test_backend_full_at_end_of_body(self):
        """
        When the last piece of a body fills the backend's buffer, the client
        connection is not left paused: its next request is read.
        """
        body = b"u" * 200000
        client = self.request(
            b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: %d\r\n\r\n" % len(body) + body[:100000]
        )
        conn = self.app.connections[0]
        conn.transport.consume_writes = False
        client.send(body[100000:])
        conn.transport.read()
        self.respond()
        client.send(get(b"/next"))
        self.proxy.run()
        self.assertEqual(client.held, 0)
        self.assertEqual(conn.requests()[-1].target, b"/next")

    def test_early_response(self):
        """
        A backend that answers before the whole body arrived (say, a 413 of
        its own): the answer is relayed and both connections are closed,
        since the rest of the body cannot be told from a next request.
        """
        client = self.request(b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 100\r\n\r\nabc")
        conn = self.respond(b"HTTP/1.1 413 Payload Too Large\r\nContent-Length: 0\r\n\r\n")
        [response] = client.responses()
        self.assertEqual(response.status, 413)
        self.assertEqual(response.header(b"connection"), b"close")
        self.assertTrue(client.closed)
        self.assertTrue(conn.closed)


class ResponseBodyTests(ProxyTestCase):
    """Response bodies on their way to the client, and their framing."""

    def test_content_length(self):
        """A Content-Length response is relayed as it is, and the backend connection pooled."""
        for byte_by_byte in (False, True):
            self.setUp()
            client = self.request(get())
            conn = self.respond(
                b"HTTP/1.1 200 OK\r\nContent-Length: 11\r\n\r\nhello world",
                byte_by_byte=byte_by_byte,
            )
            [response] = client.responses()
            self.assertEqual(response.body, b"hello world")
            self.assertEqual(self.pool().idle, [conn.protocol])

    def test_chunked(self):
        """A chunked response is relayed chunked; its trailers are dropped."""
        for byte_by_byte in (False, True):
            self.setUp()
            client = self.request(get())
            self.respond(
                b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nTrailer: X-T\r\n\r\n"
                b"5\r\nhello\r\n6\r\n world\r\n0\r\nX-T: t\r\n\r\n",
                byte_by_byte=byte_by_byte,
            )
            [response] = client.responses()
            self.assertTrue(response.chunked)
            self.assertEqual(response.body, b"hello world")
            self.assertNotIn(b"X-T", client.received())
            self.assertEqual(len(self.pool().idle), 1)

    def test_until_close(self):
        """
        A response delimited by the backend closing is re-chunked for an
        HTTP/1.1 client, which keeps its connection.
        """
        client = self.request(get())
        conn = self.respond(b"HTTP/1.1 200 OK\r\n\r\nhello ")
        conn.respond(b"world")
        conn.close()
        self.proxy.run()
        [response] = client.responses()
        self.assertTrue(response.chunked)
        self.assertTrue(response.complete)
        self.assertEqual(response.body, b"hello world")
        self.assertFalse(client.closed)

    def test_until_close_http10(self):
        """An HTTP/1.0 client gets such a body unframed, and the connection then closes."""
        client = self.request(b"GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
        conn = self.respond(b"HTTP/1.1 200 OK\r\n\r\nhello")
        conn.close()
        self.proxy.run()
        [response] = client.responses()
        self.assertEqual(response.body, b"hello")
        self.assertEqual(response.header(b"connection"), b"close")
        self.assertTrue(client.closed)

    def test_transfer_codings_kept(self):
        """
        A body in other transfer codings (gzip) is passed on undecoded, so
        the client is told those codings, followed by chunked.
        """
        client = self.request(get())
        self.respond(
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n"
        )
        [response] = client.responses()
        self.assertEqual(response.header(b"transfer-encoding"), b"gzip, chunked")
        self.assertEqual(response.body, b"abc")

    def test_head(self):
        """
        The response to HEAD has no body whatever its headers say, and the
        backend connection is reused afterwards.
        """
        for framing in (b"Content-Length: 1000", b"Transfer-Encoding: chunked"):
            self.setUp()
            client = self.request(get(method=b"HEAD"))
            conn = self.respond(b"HTTP/1.1 200 OK\r\n" + framing + b"\r\n\r\n")
            [response] = client.responses([b"HEAD"])
            self.assertEqual(response.status, 200)
            if framing.startswith(b"Content"):
                self.assertEqual(response.header(b"content-length"), b"1000")
            client.send(get(b"/after"))
            self.proxy.run()
            self.respond()
            self.assertEqual(len(self.app.connections), 1)
            self.assertEqual([r.status for r in client.responses([b"HEAD", b"GET"])], [200, 200])
            self.assertEqual(conn.requests()[-1].target, b"/after")

    def test_head_with_body(self):
        """
        A backend that sends a body after its response to HEAD: the client
        gets the head only, and the connection is not reused.
        """
        client = self.request(get(method=b"HEAD"))
        conn = self.respond(b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nbody")
        [response] = client.responses([b"HEAD"])
        self.assertEqual(response.status, 200)
        self.assertTrue(client.received().endswith(b"\r\n\r\n"))
        self.assertTrue(conn.closed)
        self.assertEqual(self.pool().idle, [])

    def test_no_body_statuses(self):
        """
        204 and 304 responses carry no body; a 204 loses a Content-Length it
        must not have, a 304 keeps it.  The connection is reused.
        """
        client = self.request(get(b"/1") + get(b"/2"))
        self.respond(b"HTTP/1.1 204 No Content\r\nContent-Length: 5\r\n\r\n")
        self.respond(b"HTTP/1.1 304 Not Modified\r\nContent-Length: 5\r\nETag: x\r\n\r\n")
        no_content, not_modified = client.responses()
        self.assertEqual((no_content.status, no_content.header(b"content-length")), (204, None))
        self.assertEqual((not_modified.status, not_modified.header(b"content-length")), (304, b"5"))
        self.assertTrue(client.received().endswith(b"\r\n\r\n"))
        self.assertEqual(len(self.app.connections), 1)

    def test_interim_responses(self):
        """1xx responses from the backend (100, 103) are not relayed."""
        client = self.request(get())
        self.respond(
            b"HTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\nHTTP/1.1 100 Continue\r\n\r\n" + OK,
            byte_by_byte=True,
        )
        [response] = client.responses()
        self.assertEqual((response.status, response.body), (200, b"ok"))

    def test_streaming_down_with_backpressure(self):
        """
        A large download to a client that reads slowly: Balance stops reading
        the backend while the client is behind, so it holds little; the
        backend connection goes back to the pool reading, and serves the
        next request.
        """
        size = 1024 * 1024
        client = self.request(get())
        client.transport.consume_writes = False
        conn = self.respond(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % size)
        for _ in range(size // 65536):
            conn.respond(b"d" * 65536)
        self.assertGreater(conn.held, size - 300000)
        while conn.held:
            client.transport.read()
            self.proxy.run()
            self.assertLess(client.transport.unread, 300000)
        client.transport.read()
        self.assertEqual(len(client.responses()[0].body), size)
        self.assertEqual(conn.transport.producerState, "producing")
        client.send(get(b"/next"))
        self.proxy.run()
        self.respond()
        self.assertEqual(len(client.responses()), 2)

    def test_client_gone_mid_response(self):
        """A client that leaves in the middle of a response: the backend connection is cut."""
        client = self.request(get())
        conn = self.respond(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\npartial")
        client.close()
        self.proxy.run()
        self.assertTrue(conn.aborted)
        self.assertEqual(self.pool().idle, [])


class UpstreamErrorTests(ProxyTestCase):
    """What the client gets when the backend side fails."""

    def assert_answered(self, client, status: int) -> None:
        [response] = client.responses()
        self.assertEqual(response.status, status)

    def test_connection_refused(self):
        """
        A refused connection is answered 502 straight away, on a connection
        that stays usable.
        """
        self.app.mode = "refuse"
        client = self.request(get())
        self.assert_answered(client, 502)
        self.assertFalse(client.closed)
        self.app.mode = "accept"
        client.send(get())
        self.proxy.run()
        self.respond()
        self.assertEqual([r.status for r in client.responses()], [502, 200])

    def test_failover_to_next_backend(self):
        """When one backend of a cluster refuses, the next one is tried."""
        self.proxy.backend("10.0.0.2:80").mode = "refuse"
        client = self.request(get(b"/api/x"))
        other = self.proxy.backend("10.0.0.3:80")
        self.assertEqual(len(other.connections), 1)
        other.connections[0].respond(OK)
        self.proxy.run()
        self.assert_answered(client, 200)

    def test_every_backend_refuses(self):
        """When every backend refuses, the answer is 502."""
        for address in ("10.0.0.2:80", "10.0.0.3:80"):
            self.proxy.backend(address).mode = "refuse"
        self.assert_answered(self.request(get(b"/api/x")), 502)

    def test_connect_timeout(self):
        """A connection attempt that times out (connect_timeout) is answered 504."""
        self.app.mode = "timeout"
        self.assert_answered(self.request(get()), 504)

    def test_no_eligible_backend(self):
        """
        With no eligible backend (all drained), the answer is 503 with a
        Retry-After, and nothing is tried.
        """
        for cluster in self.proxy.clusters.values():
            for backend in cluster.backends:
                backend.drained = True
        client = self.request(get())
        self.assert_answered(client, 503)
        self.assertEqual(client.responses()[0].header(b"retry-after"), b"1")
        self.assertEqual(self.app.attempts, 0)

    def test_route_timeout(self):
        """
        A backend slower than the route's timeout: 504, and its connection is
        cut rather than reused.
        """
        client = self.request(get(b"/slow"))
        self.proxy.run(1.9)
        self.assertEqual(client.received(), b"")
        self.proxy.run(0.2)
        self.assert_answered(client, 504)
        self.assertTrue(self.app.connections[0].aborted)
        self.assertFalse(client.closed)

    def test_route_timeout_while_connecting(self):
        """The route timeout covers a connection attempt that hangs, too."""
        self.app.mode = "hang"
        client = self.request(get(b"/slow"))
        self.proxy.run(2.1)
        self.assert_answered(client, 504)
        self.app.complete()
        self.proxy.run()
        self.assertEqual(self.pool().idle, [self.app.connections[0].protocol])

    def test_route_timeout_mid_response(self):
        """Past the timeout with the response half sent, the client connection is cut."""
        client = self.request(get(b"/slow"))
        self.respond(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc")
        self.proxy.run(2.1)
        self.assertTrue(client.aborted)

    def test_reset_before_response(self):
        """A backend connection reset before any response byte: 502."""
        client = self.request(get())
        self.app.connections[0].reset()
        self.proxy.run()
        self.assert_answered(client, 502)

    def test_closed_mid_response(self):
        """A backend closing in the middle of a body: the client connection is cut."""
        client = self.request(get())
        conn = self.respond(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc")
        conn.close()
        self.proxy.run()
        self.assertTrue(client.aborted)

    def test_malformed_responses(self):
        """
        Responses that are not valid HTTP/1.1 are never passed on: 502, and
        the backend connection is closed.
        """
        for data in (
            b"HTTP/1.1 200 OK\r\nX-A: a\rb\r\nContent-Length: 2\r\n\r\nok",
            b"HTTP/1.1 200 OK\r\nX-A: a\nb\r\nContent-Length: 2\r\n\r\nok",
            b"HTTP/1.1 200 OK\r\nX-A: a\x00b\r\nContent-Length: 2\r\n\r\nok",
            b"HTTP/1.1 200 OK\r\nX-A : b\r\nContent-Length: 2\r\n\r\nok",
            b"HTTP/1.1 200 OK\r\nX-A: b\r\n c\r\nContent-Length: 2\r\n\r\nok",
            b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\nok!",
            b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Length: 2\r\n\r\n2\r\nok\r\n0\r\n\r\n",
            b"HTTP/1.1 2000 OK\r\nContent-Length: 2\r\n\r\nok",
            b"HTTP/1.1 099 Odd\r\nContent-Length: 2\r\n\r\nok",
            b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: x\r\nConnection: upgrade\r\n\r\n",
            b"HTTP/2 200\r\n\r\n",
            b"garbage\r\n\r\n",
        ):
            for byte_by_byte in (False, True):
                self.setUp()
                client = self.request(get())
                conn = self.respond(data, byte_by_byte=byte_by_byte)
                [response] = client.responses()
                self.assertEqual(response.status, 502, data)
                self.assertTrue(conn.closed, data)
                self.assertEqual(self.pool().idle, [])

    def test_bad_chunk_mid_response(self):
        """Invalid chunk framing in the middle of a relayed body: the client connection is cut."""
        client = self.request(get())
        self.respond(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\nzz\r\n")
        self.assertTrue(client.aborted)

    def test_body_longer_than_declared(self):
        """
        Bytes after the declared end of a response, in the same read, never
        reach the client, not even as the response to its next, pipelined,
        request: the connection they came on is dropped.  (Bytes arriving
        only after the next request went out on the connection cannot be
        told from its response; bytes arriving while it is idle are
        L{test_unsolicited_bytes}.)
        """
        for extra in (
            b"HTTP/1.1 200 OK\r\nContent-Length: 7\r\n\r\nsmuggle",
            b"smuggle",
        ):
            self.setUp()
            client = self.request(get(b"/1") + get(b"/2"))
            conn = self.respond(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok" + extra)
            self.assertTrue(conn.closed)
            self.assertNotIn(b"smuggle", client.received())
            self.respond(b"HTTP/1.1 200 OK\r\nContent-Length: 6\r\n\r\nsecond")
            self.assertEqual([r.body for r in client.responses()], [b"ok", b"second"])
            self.assertEqual(len(self.app.connections), 2)

    def test_unsolicited_bytes(self):
        """A backend that sends bytes on an idle pooled connection loses that connection."""
        self.request(get())
        conn = self.respond()
        conn.respond(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
        self.proxy.run()
        self.assertTrue(conn.closed)
        self.assertEqual(self.pool().idle, [])


class PoolTests(ProxyTestCase):
    """Backend connections are kept and shared."""

    def test_reuse_across_clients(self):
        """Clients one after the other share one backend connection."""
        for _ in range(3):
            client = self.request(get())
            self.respond()
            client.close()
            self.proxy.run()
        self.assertEqual(len(self.app.connections), 1)
        self.assertEqual(len(self.app.connections[0].requests()), 3)

    def test_concurrent_clients(self):
        """Clients at the same time get a backend connection each; all are kept after."""
        clients = [self.request(get()) for _ in range(3)]
        for index in range(3):
            self.respond(index=index)
        self.assertEqual([c.responses()[0].status for c in clients], [200] * 3)
        # max_idle_per_backend: 2
        self.assertEqual(len(self.pool().idle), 2)
        self.assertTrue(self.app.connections[2].closed)

    def test_closed_while_idle(self):
        """
        A pooled connection the backend closed while idle is forgotten; the
        next request opens a new one.
        """
        self.request(get())
        conn = self.respond()
        conn.close()
        self.proxy.run()
        self.assertEqual(self.pool().idle, [])
        client = self.request(get())
        self.respond()
        self.assertEqual(client.responses()[0].status, 200)
        self.assertEqual(len(self.app.connections), 2)

    def test_closed_as_reused(self):
        """
        A pooled connection the backend closes just as a request is sent on
        it, before any response byte: the request is sent again on a new
        connection, and the client never notices.
        """
        for lost in ("close", "reset"):
            self.setUp()
            self.request(get())
            conn = self.respond()
            client = self.request(get(b"/again"))
            getattr(conn, lost)()
            self.proxy.run()
            self.assertEqual(len(self.app.connections), 2)
            self.respond()
            [response] = client.responses()
            self.assertEqual(response.status, 200)
            self.assertEqual(self.app.connections[1].requests()[0].target, b"/again")

    def test_not_retried_with_body(self):
        """
        A request with a body is not sent twice: when its reused connection
        dies before the answer, the client gets 502.
        """
        self.request(get())
        conn = self.respond()
        client = self.request(b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 2\r\n\r\nhi")
        conn.close()
        self.proxy.run()
        self.assertEqual(client.responses()[0].status, 502)
        self.assertEqual(len(self.app.connections), 1)

    def test_not_retried_on_fresh_connection(self):
        """A new connection that dies before the answer is not retried: 502."""
        client = self.request(get())
        self.app.connections[0].close()
        self.proxy.run()
        self.assertEqual(client.responses()[0].status, 502)
        self.assertEqual(len(self.app.connections), 1)

    def test_idle_timeout(self):
        """Connections idle longer than pool.idle_timeout are closed."""
        self.request(get())
        conn = self.respond()
        self.proxy.run(9)
        self.assertFalse(conn.closed)
        self.proxy.run(1.5)
        self.assertTrue(conn.closed)
        self.assertEqual(self.pool().idle, [])

    def test_not_reused_after_backend_close(self):
        """A backend's C{Connection: close} keeps its connection out of the pool."""
        self.request(get())
        conn = self.respond(b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 0\r\n\r\n")
        self.assertTrue(conn.closed)
        self.assertEqual(self.pool().idle, [])

    def test_client_gone_while_connecting(self):
        """A client that leaves while its backend connection is made: the connection is pooled."""
        self.app.mode = "hang"
        client = self.request(get())
        client.close()
        self.proxy.run()
        self.app.complete()
        self.proxy.run()
        self.assertEqual(self.pool().idle, [self.app.connections[0].protocol])


class AccessLogTests(SynchronousTestCase):
    """Each request leaves one access log line, with the reason when it failed."""

    def proxy(self, fmt: str):
        path = self.mktemp()
        proxy = InMemoryProxy(CONFIG)
        log = AccessLog(path, fmt, proxy.clock, clock=lambda: 1700000000.0)
        proxy.context.access_log = log
        self.addCleanup(log.close)
        return proxy, log, path

    def test_json(self):
        """A JSON line per request: status, route, backend, sizes, and why it failed."""
        proxy, log, path = self.proxy("json")
        proxy.backend(APP).mode = "refuse"
        client = proxy.client()
        client.send(get(b"/x") + get(b"/healthz"))
        proxy.run()
        log.flush()
        with open(path) as f:
            lines = [json.loads(line) for line in f]
        self.assertEqual([line["status"] for line in lines], [502, 200])
        self.assertEqual(lines[0]["backend"], APP)
        self.assertIn("refused", lines[0]["reason"])
        self.assertEqual(lines[0]["client"], "192.0.2.10")
        self.assertEqual(lines[1]["target"], "/healthz")
        self.assertIsNone(lines[1]["reason"])

    def test_json_fields(self):
        """
        A proxied request's line has the path, protocol, route, cluster,
        backend, request and response sizes, total and upstream durations
        (request sent to response head), and no TLS or trace id when there
        are none.
        """
        proxy, log, path = self.proxy("json")
        proxy.clock.advance(1000)
        app = proxy.backend(APP)
        client = proxy.client()
        client.send(b"POST /x?q=1 HTTP/1.1\r\nHost: example.com\r\nContent-Length: 5\r\n\r\nhello")
        proxy.run()
        proxy.run(0.25)
        app.connections[0].respond(b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nabc")
        proxy.run(0.5)
        log.flush()
        with open(path) as f:
            [line] = [json.loads(line) for line in f]
        self.assertEqual(line["time"], "2023-11-14T22:13:20.000Z")
        self.assertEqual((line["method"], line["path"], line["target"]), ("POST", "/x", "/x?q=1"))
        self.assertEqual(line["protocol"], "HTTP/1.1")
        self.assertEqual((line["route"], line["cluster"], line["backend"]), ("4", "app", APP))
        self.assertEqual((line["request_bytes"], line["response_bytes"]), (5, 3))
        self.assertEqual(line["upstream_duration_ms"], 250.0)
        self.assertEqual(line["duration_ms"], 250.0)
        self.assertIsNone(line["tls_version"])
        self.assertIsNone(line["trace_id"])
        self.assertIsNone(line["reason"])

    def test_trace_id(self):
        """With tracing on, the line carries the request's trace id."""
        from balance.observe.tracing import Tracer

        proxy, log, path = self.proxy("combined")
        proxy.context.tracer = Tracer(0.0)
        client = proxy.client()
        trace = b"4bf92f3577b34da6a3ce929d0e0e4736"
        client.send(get(b"/healthz", b"traceparent: 00-" + trace + b"-00f067aa0ba902b7-01"))
        proxy.run()
        log.flush()
        with open(path) as f:
            [line] = f.read().splitlines()
        self.assertIn(" trace_id=" + trace.decode(), line)
        self.assertIn(" route=0 cluster=- backend=- upstream_ms=- tls=-", line)

    def test_reopen(self):
        """After reopen(), lines go to a new file at the path (logrotate renamed the old)."""
        proxy, log, path = self.proxy("json")
        client = proxy.client()
        client.send(get(b"/healthz"))
        proxy.run()
        os.rename(path, path + ".1")
        log.reopen()
        client.send(get(b"/healthz"))
        proxy.run()
        log.flush()
        for name in (path, path + ".1"):
            with open(name) as f:
                self.assertEqual(len(f.read().splitlines()), 1, name)

    def test_combined(self):
        """Combined format lines, including refused requests."""
        proxy, log, path = self.proxy("combined")
        client = proxy.client()
        client.send(b"GET /x HTTP/1.1\r\nHost: a\r\nUser-Agent: test/1\r\nX-A : b\r\n\r\n")
        client = proxy.client()
        client.send(get(b"/healthz", b"User-Agent: test/1"))
        proxy.run()
        log.flush()
        with open(path) as f:
            lines = f.read().splitlines()
        self.assertEqual(len(lines), 2)
        self.assertTrue(
            lines[0].startswith('192.0.2.10 - - [14/Nov/2023:22:13:20 +0000] "-" 400 0')
        )
        self.assertIn('reason="malformed request', lines[0])
        self.assertIn('"GET /healthz HTTP/1.1" 200', lines[1])
        self.assertIn('"test/1"', lines[1])


class AccessLogEscapingTests(SynchronousTestCase):
    """Request bytes cannot break a log line."""

    def test_json(self):
        """Quotes, backslashes, control and non-ASCII bytes become a valid JSON string."""
        from balance.observe.accesslog import _json_bytes

        self.assertEqual(_json_bytes(b"/plain?a=1"), b'"/plain?a=1"')
        value = b'/a"b\\c\x01\xe9'
        self.assertEqual(json.loads(_json_bytes(value)), value.decode("latin-1"))

    def test_combined(self):
        """In the combined format they are written as \\xHH."""
        from balance.observe.accesslog import _clf_bytes

        self.assertEqual(_clf_bytes(b"curl/8"), b"curl/8")
        self.assertEqual(_clf_bytes(b'a"b\\\n\xe9'), b"a\\x22b\\x5c\\x0a\\xe9")
