# -*- test-case-name: tests.http.test_headers -*-
"""
Tests for L{balance.http.headers}: which headers a backend and a client see
through Balance (RFC 9110 7.6: hop-by-hop fields, forwarding fields, Via).
"""

from __future__ import annotations

from twisted.trial.unittest import SynchronousTestCase

from balance.testing import InMemoryProxy

CONFIG = """
listeners:
  - {name: web, listen: "tcp:8080", cluster: app}
clusters:
  - {name: app, backends: ["10.0.0.1:80"]}
"""


class HeaderTestCase(SynchronousTestCase):
    def exchange(self, request_headers: bytes, response: bytes = b"", client_ip="192.0.2.10"):
        """
        Send a GET with C{request_headers} (CRLF-terminated lines) from
        C{client_ip}, answer it with C{response} (a whole response), and
        return what the backend got and what the client got.
        """
        proxy = InMemoryProxy(CONFIG)
        client = proxy.client(client_ip)
        client.send(b"GET /p HTTP/1.1\r\n" + request_headers + b"\r\n")
        proxy.run()
        conn = proxy.backend().connections[0]
        [request] = conn.requests()
        conn.respond(response or b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
        proxy.run()
        [answer] = client.responses()
        return request, answer


class RequestHeaderTests(HeaderTestCase):
    """The request head a backend receives."""

    def test_hop_by_hop_removed(self):
        """
        Connection-specific fields are not forwarded: Connection, Keep-Alive,
        Proxy-Connection, Proxy-Authorization, TE, Trailer, Upgrade, and the
        fields the Connection header names.
        """
        request, _ = self.exchange(
            b"Host: a\r\nConnection: keep-alive, X-Secret\r\nKeep-Alive: timeout=5\r\n"
            b"Proxy-Connection: keep-alive\r\nProxy-Authorization: Basic eA==\r\n"
            b"TE: trailers\r\nTrailer: X-T\r\nUpgrade: h2c\r\nX-Secret: s\r\nX-Kept: k\r\n"
        )
        names = request.header_names()
        for name in (
            b"connection",
            b"keep-alive",
            b"proxy-connection",
            b"proxy-authorization",
            b"te",
            b"trailer",
            b"upgrade",
            b"x-secret",
        ):
            self.assertNotIn(name, names)
        self.assertEqual(request.header(b"x-kept"), b"k")

    def test_end_to_end_headers_kept(self):
        """
        Other fields pass unchanged: in their order, with their case, and
        repeated ones repeated; Host is preserved.
        """
        request, _ = self.exchange(
            b"Host: Example.COM:8080\r\nAccept: a\r\ncookie: c=1\r\nAccept: b\r\nX-MiXeD: V  v\r\n"
        )
        self.assertEqual(
            request.headers[:5],
            [
                (b"Host", b"Example.COM:8080"),
                (b"Accept", b"a"),
                (b"cookie", b"c=1"),
                (b"Accept", b"b"),
                (b"X-MiXeD", b"V  v"),
            ],
        )

    def test_forwarding_headers(self):
        """
        X-Forwarded-For and Forwarded are appended to, Via gets Balance's
        entry, and X-Forwarded-Proto and X-Forwarded-Host are set by Balance
        alone: a client cannot pass its own.
        """
        request, _ = self.exchange(
            b"Host: example.com\r\nX-Forwarded-For: 203.0.113.1\r\nX-Forwarded-For: 10.1.1.1\r\n"
            b"X-Forwarded-Proto: https\r\nX-Forwarded-Host: evil.example\r\n"
            b"Forwarded: for=203.0.113.1\r\nVia: 1.0 edge\r\n"
        )
        self.assertEqual(
            request.header_values(b"x-forwarded-for"), [b"203.0.113.1, 10.1.1.1, 192.0.2.10"]
        )
        self.assertEqual(request.header_values(b"x-forwarded-proto"), [b"http"])
        self.assertEqual(request.header_values(b"x-forwarded-host"), [b"example.com"])
        self.assertEqual(
            request.header_values(b"forwarded"),
            [b'for=203.0.113.1, for=192.0.2.10;host="example.com";proto=http'],
        )
        self.assertEqual(request.header_values(b"via"), [b"1.0 edge, 1.1 balance"])

    def test_first_hop(self):
        """Without forwarding headers from the client, Balance starts them."""
        request, _ = self.exchange(b"Host: example.com\r\n")
        self.assertEqual(request.header(b"x-forwarded-for"), b"192.0.2.10")
        self.assertEqual(
            request.header(b"forwarded"), b'for=192.0.2.10;host="example.com";proto=http'
        )
        self.assertEqual(request.header(b"via"), b"1.1 balance")

    def test_ipv6_client(self):
        """An IPv6 client address is quoted and bracketed in Forwarded (RFC 7239)."""
        request, _ = self.exchange(b"Host: example.com\r\n", client_ip="2001:db8::7")
        self.assertEqual(request.header(b"x-forwarded-for"), b"2001:db8::7")
        self.assertTrue(request.header(b"forwarded").startswith(b'for="[2001:db8::7]";'))

    def test_request_line(self):
        """The request goes upstream as HTTP/1.1, with the target as received."""
        request, _ = self.exchange(b"Host: a\r\n")
        self.assertEqual((request.method, request.target, request.version), (b"GET", b"/p", "1.1"))


class ResponseHeaderTests(HeaderTestCase):
    """The response head a client receives."""

    def test_hop_by_hop_removed(self):
        """
        Connection-specific response fields are dropped, with those the
        backend's Connection header names.
        """
        _, response = self.exchange(
            b"Host: a\r\n",
            b"HTTP/1.1 200 OK\r\nConnection: X-Internal\r\nKeep-Alive: timeout=5\r\n"
            b"X-Internal: secret\r\nProxy-Authenticate: Basic\r\nUpgrade: h2c\r\n"
            b"Trailer: X-T\r\nContent-Length: 0\r\n\r\n",
        )
        names = response.header_names()
        for name in (
            b"connection",
            b"keep-alive",
            b"x-internal",
            b"proxy-authenticate",
            b"upgrade",
            b"trailer",
        ):
            self.assertNotIn(name, names)

    def test_backend_headers_kept(self):
        """
        Server, Date, repeated Set-Cookie and the rest of the backend's
        headers are passed on; Via gets Balance's entry.
        """
        _, response = self.exchange(
            b"Host: a\r\n",
            b"HTTP/1.1 201 Made It\r\nServer: origin/1\r\nDate: Tue, 14 Nov 2023 22:13:20 GMT\r\n"
            b"Set-Cookie: a=1\r\nSet-Cookie: b=2\r\nVia: 1.1 inner\r\nContent-Length: 0\r\n\r\n",
        )
        self.assertEqual((response.status, response.reason), (201, b"Made It"))
        self.assertEqual(response.header(b"server"), b"origin/1")
        self.assertEqual(response.header(b"date"), b"Tue, 14 Nov 2023 22:13:20 GMT")
        self.assertEqual(response.header_values(b"set-cookie"), [b"a=1", b"b=2"])
        self.assertEqual(response.header_values(b"via"), [b"1.1 inner, 1.1 balance"])

    def test_missing_reason_phrase(self):
        """A status line without reason phrase gets the standard one."""
        _, response = self.exchange(b"Host: a\r\n", b"HTTP/1.1 404\r\nContent-Length: 0\r\n\r\n")
        self.assertEqual((response.status, response.reason), (404, b"Not Found"))

    def test_http10_backend(self):
        """An HTTP/1.0 backend's response reaches the client as HTTP/1.1."""
        proxy = InMemoryProxy(CONFIG)
        client = proxy.client()
        client.send(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
        proxy.run()
        conn = proxy.backend().connections[0]
        conn.respond(b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\nok")
        proxy.run()
        self.assertTrue(client.received().startswith(b"HTTP/1.1 200 OK\r\n"))
        self.assertEqual(client.responses()[0].body, b"ok")
        self.assertTrue(conn.closed)
