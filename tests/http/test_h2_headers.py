# -*- test-case-name: tests.http.test_h2_headers -*-
"""
HTTP/2 header lists in and out of an Exchange (L{balance.http.h2_headers}):
what a backend gets for a request, what is refused, and what a client gets
for a response.  Pure functions.
"""

from __future__ import annotations

from twisted.trial.unittest import SynchronousTestCase

from balance.http.h2_headers import (
    RequestError,
    grpc_local_fields,
    grpc_status,
    grpc_timeout,
    is_grpc,
    local_fields,
    read_request,
    response_fields,
    route_reply,
)
from balance.http.proxy import Exchange

_BASE = [(b":method", b"GET"), (b":scheme", b"https"), (b":authority", b"example.com:8443")]


class _Route:
    response_remove = frozenset()
    response_set = ()


def request(fields, max_header_bytes: int = 65536, max_body_bytes: int = 1 << 20):
    ex = Exchange(None)
    has_length = read_request(ex, fields, max_header_bytes, max_body_bytes)
    return ex, has_length


class ReadRequestTests(SynchronousTestCase):
    def assert_refused(self, fields, status: int = 400) -> RequestError:
        e = self.assertRaises(RequestError, request, fields)
        self.assertEqual(e.status, status, (fields, e.reason))
        return e

    def test_fields(self):
        """The pseudo-headers make the request line and Host; the rest is kept in order."""
        ex, has_length = request(
            _BASE + [(b":path", b"/a/b?c=d"), (b"accept", b"*/*"), (b"x-b", b"")]
        )
        self.assertEqual((ex.method, ex.target, ex.path), (b"GET", b"/a/b?c=d", b"/a/b"))
        self.assertEqual(ex.host, b"example.com:8443")
        self.assertEqual(
            ex.headers, [(b"host", b"example.com:8443"), (b"accept", b"*/*"), (b"x-b", b"")]
        )
        self.assertFalse(has_length)

    def test_host_field(self):
        """A host field without :authority serves; with it, they must agree."""
        fields = [(b":method", b"GET"), (b":scheme", b"http"), (b":path", b"/"), (b"host", b"a")]
        ex, _ = request(fields)
        self.assertEqual((ex.host, ex.headers), (b"a", [(b"host", b"a")]))
        ex, _ = request(_BASE + [(b":path", b"/"), (b"host", b"example.com:8443")])
        self.assertEqual(ex.headers, [(b"host", b"example.com:8443")])
        self.assert_refused(_BASE + [(b":path", b"/"), (b"host", b"evil.com")])
        self.assert_refused(_BASE + [(b":path", b"/"), (b"host", b"a"), (b"host", b"a")])

    def test_content_length(self):
        ex, has_length = request(
            _BASE + [(b":path", b"/"), (b"content-length", b"12"), (b"content-length", b"12")]
        )
        self.assertTrue(has_length)
        self.assertEqual(ex.content_length, 12)
        self.assertEqual([v for n, v in ex.headers if n == b"content-length"], [b"12"])
        for bad in [[b"1x"], [b"-1"], [b"1", b"2"], [b""], [b" 1"]]:
            self.assert_refused(_BASE + [(b":path", b"/")] + [(b"content-length", v) for v in bad])

    def test_body_too_large(self):
        self.assert_refused(_BASE + [(b":path", b"/"), (b"content-length", b"%d" % (2 << 20))], 413)

    def test_head_too_large(self):
        fields = _BASE + [(b":path", b"/")] + [(b"x-%d" % i, b"v" * 100) for i in range(100)]
        self.assertRaises(RequestError, request, fields, 5000)
        request(fields, 20000)

    def test_too_many_fields(self):
        self.assert_refused(_BASE + [(b":path", b"/")] + [(b"x-a", b"1")] * 200, 431)

    def test_cookies(self):
        ex, _ = request(
            _BASE + [(b":path", b"/"), (b"cookie", b"a=1"), (b"x", b"y"), (b"cookie", b"b=2")]
        )
        self.assertEqual(ex.headers[-1], (b"cookie", b"a=1; b=2"))
        self.assertEqual(len([n for n, _ in ex.headers if n == b"cookie"]), 1)

    def test_expect(self):
        ex, _ = request(_BASE + [(b":path", b"/"), (b"expect", b"100-Continue")])
        self.assertTrue(ex.expect_continue)
        self.assertNotIn(b"expect", [n for n, _ in ex.headers])
        self.assert_refused(_BASE + [(b":path", b"/"), (b"expect", b"magic")], 417)

    def test_te(self):
        ex, _ = request(_BASE + [(b":path", b"/"), (b"te", b"trailers")])
        self.assertEqual(ex.headers, [(b"host", b"example.com:8443")])
        self.assert_refused(_BASE + [(b":path", b"/"), (b"te", b"trailers, gzip")])

    def test_connection_specific(self):
        for name in [
            b"connection",
            b"keep-alive",
            b"proxy-connection",
            b"transfer-encoding",
            b"upgrade",
        ]:
            e = self.assert_refused(_BASE + [(b":path", b"/"), (name, b"x")])
            self.assertIn(name.decode(), e.reason)

    def test_values(self):
        """Control characters but HTAB, and whitespace at the ends, are refused."""
        for value in [
            b"a\rb",
            b"a\nb",
            b"a\x00b",
            b"\x00",
            b"a\x7f",
            b"a\x01",
            b" a",
            b"a ",
            b"\ta",
        ]:
            self.assert_refused(_BASE + [(b":path", b"/"), (b"x-a", b"ok"), (b"x-b", value)])
        request(_BASE + [(b":path", b"/"), (b"x-a", b"a\tb c"), (b"x-b", b"\xc3\xa9")])

    def test_values_of_special_fields(self):
        """The checks cover host, cookie, and every other field alike."""
        self.assert_refused(_BASE + [(b":path", b"/"), (b"cookie", b"a=1\r\nx: y")])
        self.assert_refused(
            [(b":method", b"GET"), (b":scheme", b"http"), (b":path", b"/"), (b"host", b"a\r\n")]
        )

    def test_names(self):
        for name in [b"X-A", b"x a", b"x:a", b"", b"x\x00", b"\xc3\xa9", b"x(a)"]:
            self.assert_refused(_BASE + [(b":path", b"/"), (name, b"1")])
        request(_BASE + [(b":path", b"/"), (b"x-a_b.c~d!#$%&'*+^`|", b"1")])

    def test_pseudo(self):
        self.assert_refused(_BASE + [(b":path", b"/"), (b":path", b"/")])
        self.assert_refused(_BASE + [(b":path", b"/"), (b":method", b"GET")])
        self.assert_refused(_BASE + [(b"x", b"1"), (b":path", b"/")])
        self.assert_refused(_BASE + [(b":path", b"/"), (b":protocol", b"websocket")])
        self.assert_refused(_BASE + [(b":path", b"/"), (b":status", b"200")])
        self.assert_refused([(b":method", b"GET"), (b":path", b"/"), (b":authority", b"a")])

    def test_paths(self):
        for path in [b"", b"a", b"/a b", b"/a\tb", b"/#", b"/\x7f", b"/\xc3\xa9", b"http://a/"]:
            self.assert_refused(_BASE + [(b":path", path)])
        ex, _ = request(_BASE + [(b":path", b"/a%20b/~x?q=1&r=[2]")])
        self.assertEqual(ex.path, b"/a%20b/~x")

    def test_asterisk(self):
        fields = [
            (b":method", b"OPTIONS"),
            (b":scheme", b"http"),
            (b":authority", b"a"),
            (b":path", b"*"),
        ]
        ex, _ = request(fields)
        self.assertEqual(ex.target, b"*")
        self.assert_refused(_BASE + [(b":path", b"*")])

    def test_methods(self):
        self.assert_refused([(b":method", b"CONNECT"), (b":authority", b"a:1")], 405)
        self.assert_refused(
            [(b":method", b"G(T"), (b":scheme", b"http"), (b":authority", b"a"), (b":path", b"/")]
        )
        ex, _ = request(
            [
                (b":method", b"PROPFIND"),
                (b":scheme", b"http"),
                (b":authority", b"a"),
                (b":path", b"/"),
            ]
        )
        self.assertEqual(ex.method, b"PROPFIND")

    def test_authority(self):
        for authority in [b"a b", b"user@host", b"a/b", b""]:
            fields = [(b":method", b"GET"), (b":scheme", b"http"), (b":authority", authority)]
            self.assert_refused(fields + [(b":path", b"/")])
        self.assert_refused([(b":method", b"GET"), (b":scheme", b"http"), (b":path", b"/")])


class ResponseFieldsTests(SynchronousTestCase):
    def response(self, status, headers, method=b"GET", set_cookie=None):
        ex = Exchange(None)
        ex.method = method
        ex.route = _Route()
        return ex, response_fields(ex, status, headers, set_cookie)

    def test_rewrite(self):
        _, fields = self.response(
            201,
            [
                (b"Content-Type", b"text/html"),
                (b"Connection", b"close, X-Hop"),
                (b"X-Hop", b"1"),
                (b"Keep-Alive", b"timeout=5"),
                (b"Via", b"1.0 other"),
                (b"Content-Length", b"3"),
                (b"Set-Cookie", b"a=1"),
            ],
            set_cookie=b"sticky=x",
        )
        self.assertEqual(
            fields,
            [
                (b":status", b"201"),
                (b"content-type", b"text/html"),
                (b"set-cookie", b"a=1"),
                (b"content-length", b"3"),
                (b"via", b"1.0 other, 1.1 balance"),
                (b"set-cookie", b"sticky=x"),
            ],
        )

    def test_framing(self):
        """until_close is set for a body that ends with the connection, as for HTTP/1.1."""
        ex, fields = self.response(200, [(b"Transfer-Encoding", b"chunked")])
        self.assertFalse(ex.until_close)
        self.assertNotIn(b"transfer-encoding", dict(fields))
        ex, _ = self.response(200, [])
        self.assertTrue(ex.until_close)
        ex, fields = self.response(200, [(b"Content-Length", b"5")], method=b"HEAD")
        self.assertFalse(ex.until_close)
        self.assertEqual(dict(fields)[b"content-length"], b"5")
        ex, fields = self.response(204, [(b"Content-Length", b"0")])
        self.assertNotIn(b"content-length", dict(fields))
        self.assertFalse(ex.until_close)

    def test_local(self):
        self.assertEqual(
            local_fields(429, b"Too Many\n", b"Retry-After: 3\r\nRateLimit-Policy: 10;w=1\r\n"),
            [
                (b":status", b"429"),
                (b"content-type", b"text/plain; charset=utf-8"),
                (b"content-length", b"9"),
                (b"retry-after", b"3"),
                (b"ratelimit-policy", b"10;w=1"),
            ],
        )

    def test_route_reply(self):
        fields, body = route_reply(
            b"HTTP/1.1 301 Moved Permanently\r\nlocation: /x\r\ncontent-length: 3\r\n\r\nabc"
        )
        self.assertEqual(
            fields, [(b":status", b"301"), (b"location", b"/x"), (b"content-length", b"3")]
        )
        self.assertEqual(body, b"abc")


class GRPCTests(SynchronousTestCase):
    """grpc-timeout in, gRPC statuses out."""

    def test_grpc_timeout(self):
        for value, seconds in (
            (b"1H", 3600.0),
            (b"2M", 120.0),
            (b"30S", 30.0),
            (b"250m", 0.25),
            (b"99999999u", 99.999999),
            (b"5n", 5e-9),
        ):
            self.assertAlmostEqual(grpc_timeout(value), seconds)
        for value in (b"", b"S", b"1", b"1s", b"123456789S", b"-1S", b"1 S", b"1.5S", b"\xff"):
            e = self.assertRaises(RequestError, grpc_timeout, value)
            self.assertEqual(e.status, 400)

    def test_read_request(self):
        """grpc-timeout is read into the exchange and still sent on."""
        ex, _ = request(_BASE + [(b":path", b"/svc/M"), (b"grpc-timeout", b"100m")])
        self.assertAlmostEqual(ex.grpc_timeout, 0.1)
        self.assertIn((b"grpc-timeout", b"100m"), ex.headers)
        ex, _ = request(_BASE + [(b":path", b"/")])
        self.assertEqual(ex.grpc_timeout, 0.0)

    def test_is_grpc(self):
        for content_type, expected in (
            (b"application/grpc", True),
            (b"application/grpc+proto", True),
            (b"Application/GRPC", True),
            (b"application/grpc-web", True),
            (b"application/json", False),
        ):
            ex, _ = request(_BASE + [(b":path", b"/"), (b"content-type", content_type)])
            self.assertEqual(is_grpc(ex), expected, content_type)
        ex, _ = request(_BASE + [(b":path", b"/")])
        self.assertFalse(is_grpc(ex))
        self.assertFalse(is_grpc(Exchange(None)))

    def test_status(self):
        """The gRPC mapping, and what the proxy knows better."""
        self.assertEqual(grpc_status(503, "no eligible backend"), 14)
        self.assertEqual(grpc_status(502, "127.0.0.1:1: connection refused"), 14)
        self.assertEqual(grpc_status(504, "connect timeout"), 14)
        self.assertEqual(grpc_status(504, "127.0.0.1:1: connect timeout (per_try_timeout)"), 14)
        self.assertEqual(grpc_status(504, "timeout waiting for 127.0.0.1:1"), 4)
        self.assertEqual(grpc_status(429, "rate limited"), 8)
        self.assertEqual(grpc_status(403, "denied"), 7)
        self.assertEqual(grpc_status(404, "no route"), 12)
        self.assertEqual(grpc_status(418, "teapot"), 2)

    def test_local_fields(self):
        """Trailers-Only: 200, the gRPC status, the reason percent-encoded, extra fields."""
        self.assertEqual(
            grpc_local_fields(429, "rate limited 100%, é", b"Retry-After: 1\r\nRateLimit: x\r\n"),
            [
                (b":status", b"200"),
                (b"content-type", b"application/grpc"),
                (b"grpc-status", b"8"),
                (b"grpc-message", b"rate limited 100%25, %C3%A9"),
                (b"retry-after", b"1"),
                (b"ratelimit", b"x"),
            ],
        )
