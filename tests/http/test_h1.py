# -*- test-case-name: tests.http.test_h1 -*-
"""
Tests for L{balance.http.h1}: what a client connection to an HTTP listener
accepts, refuses, and in which order it is answered.

Everything runs in memory (L{balance.testing.InMemoryProxy}): fake clients,
fake backends, a L{task.Clock}.  Every input is fed in one segment and one
byte at a time.  A refused request must never reach a backend: the tests
check that no connection to it was even attempted.
"""

from __future__ import annotations

from twisted.trial.unittest import SynchronousTestCase

from balance.testing import InMemoryProxy

CONFIG = """
listeners:
  - name: web
    listen: "tcp:8080"
    cluster: app
    limits: {max_header_bytes: 2KiB, max_body_bytes: 1KiB}
    timeouts: {handshake: 5s, idle: 30s}
    routes:
      - match: {path: /here}
        direct_response: {status: 200, body: "here\\n"}
      - match: {path_prefix: /}
        cluster: app
clusters:
  - {name: app, backends: ["10.0.0.1:80"]}
"""

OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"


def get(path: bytes = b"/", *headers: bytes, version: bytes = b"1.1") -> bytes:
    """A GET request for C{path} with a Host and C{headers} (full lines)."""
    return (
        b"GET "
        + path
        + b" HTTP/"
        + version
        + b"\r\nHost: example.com\r\n"
        + b"".join(h + b"\r\n" for h in headers)
        + b"\r\n"
    )


class ProxyTestCase(SynchronousTestCase):
    """Builds an in-memory proxy from C{config}."""

    config = CONFIG

    def proxy(self, config: str | None = None) -> InMemoryProxy:
        return InMemoryProxy(config or self.config)

    def answer(self, proxy, index: int = -1, response: bytes = OK):
        """The backend answers on its connection C{index}."""
        conn = proxy.backend().connections[index]
        conn.respond(response)
        proxy.run()
        return conn


class RejectTests(ProxyTestCase):
    """
    Requests Balance refuses: each gets the documented status, with
    C{Connection: close}, the connection closes, and nothing reaches a
    backend.
    """

    def assert_rejected(self, data: bytes, status: int) -> None:
        for byte_by_byte in (False, True):
            proxy = self.proxy()
            client = proxy.client()
            client.send(data, byte_by_byte=byte_by_byte)
            proxy.run()
            how = "byte by byte" if byte_by_byte else "in one segment"
            [response] = client.responses()
            self.assertEqual(response.status, status, f"{data!r} {how}")
            self.assertEqual(response.header(b"connection"), b"close", how)
            self.assertTrue(client.closed, how)
            self.assertEqual(proxy.backend().attempts, 0, f"backend contacted, {how}")

    def test_content_length_with_transfer_encoding(self):
        """
        A request with both Content-Length and Transfer-Encoding, in either
        order, is the classic request-smuggling vector: 400.
        """
        self.assert_rejected(
            b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
            400,
        )
        self.assert_rejected(
            b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n"
            b"Content-Length: 5\r\n\r\n0\r\n\r\n",
            400,
        )

    def test_duplicate_content_length(self):
        """Two Content-Length headers, or a list in one, are refused."""
        self.assert_rejected(
            b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello!",
            400,
        )
        self.assert_rejected(
            b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\nContent-Length: 5\r\n\r\nhello",
            400,
        )
        self.assert_rejected(
            b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5, 5\r\n\r\nhello", 400
        )

    def test_content_length_not_a_number(self):
        """A negative, signed or non-numeric Content-Length is refused."""
        for value in (b"-5", b"+5", b"5x", b"0x5", b""):
            self.assert_rejected(
                b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: " + value + b"\r\n\r\nhello", 400
            )

    def test_transfer_encoding_not_ending_in_chunked(self):
        """
        A Transfer-Encoding whose final coding is not chunked leaves the
        body length unknown: 400.  So does chunked applied twice, or an
        unknown coding that merely contains the word.
        """
        for value in (
            b"gzip",
            b"chunked, gzip",
            b"chunked, chunked",
            b"xchunked",
            b"chunked\r\nTransfer-Encoding: chunked",
        ):
            self.assert_rejected(
                b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: " + value + b"\r\n\r\n0\r\n\r\n",
                400,
            )

    def test_transfer_encoding_in_http10(self):
        """HTTP/1.0 has no chunked encoding: a 1.0 request with it is refused."""
        self.assert_rejected(b"POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n", 400)

    def test_obsolete_line_folding(self):
        """A header continued on the next line (obs-fold) is refused."""
        self.assert_rejected(b"GET / HTTP/1.1\r\nHost: a\r\nX-A: b\r\n c\r\n\r\n", 400)

    def test_bare_cr_and_lf(self):
        """A CR not followed by LF, in a value or as a line end, is refused."""
        self.assert_rejected(b"GET / HTTP/1.1\r\nHost: a\r\nX-A: b\rc\r\n\r\n", 400)
        self.assert_rejected(b"GET / HTTP/1.1\rHost: a\r\r", 400)
        self.assert_rejected(b"GET / HTTP/1.1\nHost: a\n\n", 400)

    def test_control_characters_in_headers(self):
        """NUL and other control characters in names or values are refused."""
        for line in (b"X-A: b\x00c", b"X-A: b\x01c", b"X-A: b\x7fc", b"X\x00A: b"):
            self.assert_rejected(b"GET / HTTP/1.1\r\nHost: a\r\n" + line + b"\r\n\r\n", 400)

    def test_malformed_header_names(self):
        """
        Whitespace before the colon or inside a name, a line without a
        colon, an empty name and a first header line starting with
        whitespace are all refused.
        """
        for line in (b"X-A : b", b"X A: b", b"XA", b": b"):
            self.assert_rejected(b"GET / HTTP/1.1\r\nHost: a\r\n" + line + b"\r\n\r\n", 400)
        self.assert_rejected(b"GET / HTTP/1.1\r\n X-A: b\r\nHost: a\r\n\r\n", 400)

    def test_host(self):
        """
        HTTP/1.1 needs exactly one valid Host: missing, repeated, or with
        spaces, slashes or user info, it is refused.
        """
        self.assert_rejected(b"GET / HTTP/1.1\r\n\r\n", 400)
        self.assert_rejected(b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n", 400)
        for host in (b"a b", b"a/b", b"u@a", b"a:b:c:d", b"[::1"):
            self.assert_rejected(b"GET / HTTP/1.1\r\nHost: " + host + b"\r\n\r\n", 400)

    def test_invalid_targets(self):
        """
        Targets that are not origin-form, absolute http(s) or C{*} for
        OPTIONS, or that hold characters a URI cannot, are refused;
        so is a fragment, which Balance and a backend could route
        differently.
        """
        for target in (
            b"foo",
            b"/a\x01b",
            b"/a\x7fb",
            b"/a\xe9",
            b"/a#frag",
            b"*",
            b"http://u@a/",
            b"ftp://a/",
            b"a:80",
        ):
            self.assert_rejected(b"GET " + target + b" HTTP/1.1\r\nHost: a\r\n\r\n", 400)
        self.assert_rejected(b"GET /a b HTTP/1.1\r\nHost: a\r\n\r\n", 400)

    def test_methods(self):
        """Unknown and lower-case methods are refused."""
        self.assert_rejected(b"FOO / HTTP/1.1\r\nHost: a\r\n\r\n", 400)
        self.assert_rejected(b"get / HTTP/1.1\r\nHost: a\r\n\r\n", 400)

    def test_versions(self):
        """
        HTTP/0.9 and unknown versions are refused with 400; HTTP/2.0 on an
        HTTP/1 connection with 505.
        """
        self.assert_rejected(b"GET /\r\n\r\n", 400)
        self.assert_rejected(b"GET / HTTP/1.2\r\nHost: a\r\n\r\n", 400)
        self.assert_rejected(b"GET / HTTP/1.1 \r\nHost: a\r\n\r\n", 400)
        self.assert_rejected(b"GET / HTTP/2.0\r\nHost: a\r\n\r\n", 505)

    def test_tunnels_not_supported(self):
        """
        CONNECT is answered 405, and a WebSocket handshake that is not one
        (no key, no version) 400.
        """
        self.assert_rejected(b"CONNECT a:443 HTTP/1.1\r\nHost: a:443\r\n\r\n", 405)
        self.assert_rejected(
            b"GET / HTTP/1.1\r\nHost: a\r\nConnection: upgrade\r\nUpgrade: websocket\r\n\r\n", 400
        )

    def test_unknown_expectation(self):
        """An Expect other than 100-continue is answered 417."""
        self.assert_rejected(b"GET / HTTP/1.1\r\nHost: a\r\nExpect: teapot\r\n\r\n", 417)

    def test_head_beyond_max_header_bytes(self):
        """
        A request head longer than limits.max_header_bytes, through one long
        header, a long target or many fields, is answered 431.
        """
        self.assert_rejected(get(b"/", b"X-A: " + b"a" * 2100), 431)
        self.assert_rejected(get(b"/" + b"a" * 2100), 431)
        self.assert_rejected(get(b"/", *[b"X-A: b"] * 300), 431)

    def test_head_beyond_limit_without_end(self):
        """
        A head that keeps coming without ever ending is refused as soon as
        it passes the limit, without waiting for its end.
        """
        proxy = self.proxy()
        client = proxy.client()
        client.send(b"GET / HTTP/1.1\r\nHost: a\r\nX-A: ")
        for _ in range(3):
            client.send(b"a" * 1000)
        [response] = client.responses()
        self.assertEqual(response.status, 431)
        self.assertTrue(client.closed)

    def test_content_length_beyond_max_body_bytes(self):
        """
        A Content-Length above limits.max_body_bytes is answered 413 before
        any of the body is read.
        """
        self.assert_rejected(b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 1025\r\n\r\n", 413)

    def test_chunked_body_beyond_max_body_bytes(self):
        """
        A chunked body that grows past limits.max_body_bytes is answered
        413 in the middle; what reached the backend is never a complete
        request and its connection is cut.
        """
        data = (
            b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n"
            + b"200\r\n"
            + b"a" * 512
            + b"\r\n"
            + b"201\r\n"
            + b"b" * 513
            + b"\r\n0\r\n\r\n"
        )
        self.assert_body_rejected(data, 413)

    def assert_body_rejected(self, data: bytes, status: int) -> None:
        """
        C{data} is refused with C{status} once its body shows the problem;
        the head may have reached the backend (the body streams), but no
        complete request did, and that connection was aborted.
        """
        for byte_by_byte in (False, True):
            proxy = self.proxy()
            client = proxy.client()
            client.send(data, byte_by_byte=byte_by_byte)
            proxy.run()
            how = "byte by byte" if byte_by_byte else "in one segment"
            [response] = client.responses()
            self.assertEqual(response.status, status, how)
            self.assertTrue(client.closed, how)
            for conn in proxy.backend().connections:
                self.assertTrue(conn.aborted, how)
                self.assertFalse(any(r.complete for r in conn.requests()), how)

    def test_invalid_chunk_framing(self):
        """
        Chunk sizes that are not hex, overflow, carry a C{0x} prefix or
        spaces, a chunk not followed by CRLF, or LF-only framing: 400.
        """
        for body in (
            b"zz\r\nhello\r\n0\r\n\r\n",
            b"ffffffffffffffffff\r\nhello\r\n0\r\n\r\n",
            b"0x5\r\nhello\r\n0\r\n\r\n",
            b"5 \r\nhello\r\n0\r\n\r\n",
            b"5\r\nhelloXX0\r\n\r\n",
            b"5\nhello\n0\n\n",
        ):
            self.assert_body_rejected(
                b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n" + body, 400
            )

    def test_oversized_trailers(self):
        """
        Trailers larger than limits.max_header_bytes are refused (431)
        rather than held in memory.
        """
        proxy = self.proxy()
        client = proxy.client()
        client.send(b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n")
        proxy.run()
        client.send(b"2\r\nhi\r\n0\r\nX-Trailer: ")
        for _ in range(5):
            client.send(b"t" * 1000)
        proxy.run()
        [response] = client.responses()
        self.assertEqual(response.status, 431)
        self.assertTrue(client.closed)
        self.assertTrue(proxy.backend().connections[0].aborted)

    def test_rejected_after_pipelined_request(self):
        """
        A malformed request pipelined after a good one: the good one is
        answered first, then the 400, then the connection closes; the bad
        one never reaches the backend.
        """
        for byte_by_byte in (False, True):
            proxy = self.proxy()
            client = proxy.client()
            client.send(
                get(b"/good") + b"GET /bad HTTP/1.1\r\nHost: a\r\nX-A : b\r\n\r\n",
                byte_by_byte=byte_by_byte,
            )
            proxy.run()
            self.assertEqual(client.received(), b"")
            conn = self.answer(proxy)
            [first, second] = client.responses()
            self.assertEqual((first.status, first.body), (200, b"ok"))
            self.assertEqual(second.status, 400)
            self.assertTrue(client.closed)
            self.assertEqual([r.target for r in conn.requests()], [b"/good"])

    def test_bad_body_of_queued_request(self):
        """
        A pipelined request whose chunked body turns out malformed: the
        request before it is answered, then the 400.  The bad one never
        reaches the backend complete: when its body arrives only after its
        turn came (byte by byte here), its head went upstream and that
        connection is cut.
        """
        for byte_by_byte in (False, True):
            proxy = self.proxy()
            client = proxy.client()
            client.send(
                get(b"/good")
                + b"POST /bad HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
                byte_by_byte=byte_by_byte,
            )
            proxy.run()
            conn = self.answer(proxy)
            self.assertEqual([r.status for r in client.responses()], [200, 400])
            self.assertTrue(client.closed)
            requests = conn.requests()
            self.assertEqual(requests[0].target, b"/good")
            if byte_by_byte:
                self.assertEqual([r.complete for r in requests], [True, False])
                self.assertTrue(conn.aborted)
            else:
                self.assertEqual(len(requests), 1)


class AcceptedInputTests(ProxyTestCase):
    """Unusual but valid requests go through."""

    def forwarded(self, data: bytes, byte_by_byte: bool = False):
        proxy = self.proxy()
        client = proxy.client()
        client.send(data, byte_by_byte=byte_by_byte)
        proxy.run()
        [request] = proxy.backend().connections[0].requests()
        return request

    def test_tabs_and_obs_text_in_values(self):
        """Tabs and bytes above 0x7F in header values are passed on as they are."""
        for byte_by_byte in (False, True):
            request = self.forwarded(get(b"/", b"X-A: b\tc\xe9"), byte_by_byte)
            self.assertEqual(request.header(b"x-a"), b"b\tc\xe9")

    def test_empty_line_before_request(self):
        """A CRLF before the request line is ignored (RFC 9112 2.2)."""
        request = self.forwarded(b"\r\n" + get(b"/x"))
        self.assertEqual(request.target, b"/x")

    def test_absolute_form(self):
        """
        An absolute-form target is sent on in origin-form, and its authority
        replaces the Host header (RFC 9112 3.2.2).
        """
        request = self.forwarded(b"GET http://Other.example:8080/p?q=1 HTTP/1.1\r\nHost: a\r\n\r\n")
        self.assertEqual(request.target, b"/p?q=1")
        self.assertEqual(request.header_values(b"host"), [b"Other.example:8080"])

    def test_asterisk_options(self):
        """C{OPTIONS *} is forwarded as it is."""
        request = self.forwarded(b"OPTIONS * HTTP/1.1\r\nHost: a\r\n\r\n")
        self.assertEqual((request.method, request.target), (b"OPTIONS", b"*"))

    def test_http10_without_host(self):
        """
        An HTTP/1.0 request may lack Host; it goes upstream as HTTP/1.1 with
        an empty Host, as RFC 9112 3.2 asks of a request without authority.
        """
        request = self.forwarded(b"GET /old HTTP/1.0\r\n\r\n")
        self.assertEqual(request.version, "1.1")
        self.assertEqual(request.header_values(b"host"), [b""])
        self.assertIsNone(request.header(b"x-forwarded-host"))

    def test_chunked_with_other_codings(self):
        """
        C{Transfer-Encoding: gzip, chunked} is valid: the body is de-chunked
        and re-chunked, and the gzip coding is passed on.
        """
        request = self.forwarded(
            b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: gzip, chunked\r\n\r\n"
            b"3\r\nabc\r\n0\r\n\r\n"
        )
        self.assertEqual(request.header(b"transfer-encoding"), b"gzip, chunked")
        self.assertEqual(request.body, b"abc")


class PipeliningTests(ProxyTestCase):
    """Pipelined requests are proxied one at a time and answered in order."""

    def test_in_order(self):
        """
        Three pipelined requests: the backend gets each only once the one
        before is answered, and the client gets the answers in order.
        """
        for byte_by_byte in (False, True):
            proxy = self.proxy()
            client = proxy.client()
            client.send(get(b"/1") + get(b"/2") + get(b"/3"), byte_by_byte=byte_by_byte)
            proxy.run()
            conn = proxy.backend().connections[0]
            for i in (1, 2, 3):
                requests = conn.requests()
                self.assertEqual(len(requests), i)
                self.assertEqual(requests[-1].target, b"/%d" % i)
                conn.respond(b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\n%d" % i)
                proxy.run()
            self.assertEqual([r.body for r in client.responses()], [b"1", b"2", b"3"])
            self.assertEqual(len(proxy.backend().connections), 1)
            self.assertFalse(client.closed)

    def test_local_and_proxied_mixed(self):
        """
        A request answered by Balance itself, pipelined behind a proxied one,
        waits its turn.
        """
        proxy = self.proxy()
        client = proxy.client()
        client.send(get(b"/1") + get(b"/here") + get(b"/3"))
        proxy.run()
        self.answer(proxy)
        self.answer(proxy)
        self.assertEqual([r.body for r in client.responses()], [b"ok", b"here\n", b"ok"])

    def test_pipelined_bodies(self):
        """Request bodies of pipelined requests go with their own requests."""
        proxy = self.proxy()
        client = proxy.client()
        client.send(
            b"POST /1 HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\n\r\none"
            b"POST /2 HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n3\r\ntwo\r\n0\r\n\r\n"
        )
        proxy.run()
        conn = self.answer(proxy)
        self.answer(proxy)
        self.assertEqual([r.body for r in conn.requests()], [b"one", b"two"])
        self.assertEqual(len(client.responses()), 2)

    def test_reading_stops_while_requests_wait(self):
        """
        A client pipelining many requests without reading is not read
        further while requests wait their turn: what Balance holds for it
        stays bounded.
        """
        proxy = self.proxy()
        client = proxy.client()
        for i in range(1000):
            client.send(get(b"/%d" % i))
        proxy.run()
        self.assertGreater(client.held, 900 * len(get(b"/100")))
        self.assertLess(len(client.transport.protocol._queue or ()), 3)
        conn = proxy.backend().connections[0]
        for _ in range(1000):
            conn.respond(OK)
            proxy.run()
        self.assertEqual(len(client.responses()), 1000)
        self.assertEqual(len(proxy.backend().connections), 1)
        self.assertEqual(client.held, 0)

    def test_close_after_pipelined_connection_close(self):
        """
        Requests pipelined after one with C{Connection: close} are not
        answered: that response is the last.
        """
        proxy = self.proxy()
        client = proxy.client()
        client.send(get(b"/1", b"Connection: close") + get(b"/2"))
        proxy.run()
        conn = self.answer(proxy)
        [response] = client.responses()
        self.assertEqual(response.header(b"connection"), b"close")
        self.assertTrue(client.closed)
        self.assertEqual(len(conn.requests()), 1)


class PersistenceTests(ProxyTestCase):
    """Keep-alive, Connection: close and HTTP/1.0."""

    def test_keep_alive(self):
        """Sequential requests on one client connection share one backend connection."""
        proxy = self.proxy()
        client = proxy.client()
        for i in range(5):
            client.send(get(b"/%d" % i))
            proxy.run()
            self.answer(proxy)
        self.assertEqual(len(client.responses()), 5)
        self.assertEqual(len(proxy.backend().connections), 1)
        self.assertFalse(client.closed)

    def test_client_connection_close(self):
        """
        C{Connection: close} from the client: the response says so and the
        client connection closes; the backend connection is kept for reuse.
        """
        proxy = self.proxy()
        client = proxy.client()
        client.send(get(b"/", b"Connection: close"))
        proxy.run()
        conn = self.answer(proxy)
        [response] = client.responses()
        self.assertEqual(response.header(b"connection"), b"close")
        self.assertTrue(client.closed)
        self.assertFalse(conn.closed)
        self.assertIsNone(conn.requests()[0].header(b"connection"))

    def test_http10(self):
        """
        An HTTP/1.0 client keeps its connection only when it asks to, and
        is then told C{Connection: keep-alive}.
        """
        proxy = self.proxy()
        client = proxy.client()
        client.send(get(b"/", b"Connection: keep-alive", version=b"1.0"))
        proxy.run()
        self.answer(proxy)
        [response] = client.responses()
        self.assertEqual(response.header(b"connection"), b"keep-alive")
        self.assertFalse(client.closed)
        client.send(get(b"/", version=b"1.0"))
        proxy.run()
        self.answer(proxy)
        self.assertEqual(client.responses()[1].header(b"connection"), b"close")
        self.assertTrue(client.closed)

    def test_backend_connection_close(self):
        """
        A backend closing its connection after a response does not close the
        client's: the next request goes on a new backend connection.
        """
        proxy = self.proxy()
        client = proxy.client()
        client.send(get(b"/1"))
        proxy.run()
        first = self.answer(
            proxy, response=b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 2\r\n\r\nok"
        )
        [response] = client.responses()
        self.assertIsNone(response.header(b"connection"))
        self.assertFalse(client.closed)
        self.assertTrue(first.closed)
        client.send(get(b"/2"))
        proxy.run()
        self.answer(proxy)
        self.assertEqual(len(proxy.backend().connections), 2)
        self.assertEqual(len(client.responses()), 2)


class TimeoutTests(ProxyTestCase):
    """The handshake and idle timeouts of a listener."""

    def test_slow_head(self):
        """
        A head trickling in (slowloris) is answered 408 when the handshake
        timeout expires, however regularly bytes arrive.
        """
        proxy = self.proxy()
        client = proxy.client()
        head = b"GET / HTTP/1.1\r\nHost: a\r\nX-Slow: " + b"s" * 100
        for i in range(49):
            client.send(head[i : i + 1])
            proxy.run(0.1)
        self.assertEqual(client.received(), b"")
        proxy.run(0.2)
        [response] = client.responses()
        self.assertEqual(response.status, 408)
        self.assertTrue(client.closed)
        self.assertEqual(proxy.backend().attempts, 0)

    def test_silent_connection(self):
        """A connection that never sends a byte is closed quietly at the handshake timeout."""
        proxy = self.proxy()
        client = proxy.client()
        proxy.run(4.9)
        self.assertFalse(client.closed)
        proxy.run(0.2)
        self.assertTrue(client.closed)
        self.assertEqual(client.received(), b"")

    def test_idle_keep_alive(self):
        """An idle keep-alive connection is closed quietly after timeouts.idle."""
        proxy = self.proxy()
        client = proxy.client()
        client.send(get())
        proxy.run()
        self.answer(proxy)
        proxy.run(29.9)
        self.assertFalse(client.closed)
        proxy.run(0.2)
        self.assertTrue(client.closed)
        self.assertEqual(len(client.responses()), 1)

    def test_slow_second_head(self):
        """The next request's head on a kept-alive connection has the handshake timeout too."""
        proxy = self.proxy()
        client = proxy.client()
        client.send(get())
        proxy.run()
        self.answer(proxy)
        client.send(b"GET / HTTP/1.1\r\n")
        proxy.run(5.1)
        self.assertEqual([r.status for r in client.responses()], [200, 408])
        self.assertTrue(client.closed)

    def test_waiting_for_backend_is_not_idle(self):
        """
        A request waiting for its response is governed by the route timeout
        (60s by default), not by the handshake or idle timeout.
        """
        proxy = self.proxy()
        client = proxy.client()
        client.send(get())
        proxy.run(40)
        self.assertFalse(client.closed)
        self.answer(proxy)
        self.assertEqual(client.responses()[0].status, 200)


class ExpectContinueTests(ProxyTestCase):
    """C{Expect: 100-continue}."""

    head = b"POST / HTTP/1.1\r\nHost: a\r\nExpect: 100-continue\r\nContent-Length: 5\r\n\r\n"

    def test_continue(self):
        """
        The client is told to continue once the request is routed; the
        backend gets the request without Expect, and its own 100 is not
        relayed a second time.
        """
        for byte_by_byte in (False, True):
            proxy = self.proxy()
            client = proxy.client()
            client.send(self.head, byte_by_byte=byte_by_byte)
            proxy.run()
            self.assertEqual(client.received(), b"HTTP/1.1 100 Continue\r\n\r\n")
            client.send(b"hello", byte_by_byte=byte_by_byte)
            proxy.run()
            conn = self.answer(proxy, response=b"HTTP/1.1 100 Continue\r\n\r\n" + OK)
            [request] = conn.requests()
            self.assertIsNone(request.header(b"expect"))
            self.assertEqual(request.body, b"hello")
            [interim, final] = client.responses()
            self.assertEqual((interim.status, final.status), (100, 200))

    def test_no_continue_when_refused(self):
        """
        A request Balance answers itself (no route) gets its final answer
        without a 100, and the connection closes: the body was never read.
        """
        proxy = self.proxy(
            CONFIG.replace("      - match: {path_prefix: /}\n        cluster: app\n", "").replace(
                "    cluster: app\n    limits", "    limits"
            )
        )
        client = proxy.client()
        client.send(self.head)
        proxy.run()
        [response] = client.responses()
        self.assertEqual(response.status, 404)
        self.assertTrue(client.closed)

    def test_body_already_sent(self):
        """A client that sends the body without waiting is not sent a 100."""
        proxy = self.proxy()
        client = proxy.client()
        client.send(self.head + b"hello")
        proxy.run()
        self.answer(proxy)
        self.assertEqual([r.status for r in client.responses()], [200])


class DrainTests(ProxyTestCase):
    """Stopping a listener gracefully."""

    def test_drain(self):
        """
        Draining closes idle connections at once; a connection with a request
        in flight gets its response, marked C{Connection: close}, and then
        closes; the drain completes when no connection is left.
        """
        proxy = self.proxy()
        idle = proxy.client()
        busy = proxy.client()
        busy.send(get())
        proxy.run()
        done = proxy.factory.drain()
        proxy.run()
        self.assertTrue(idle.closed)
        self.assertNoResult(done)
        self.answer(proxy)
        [response] = busy.responses()
        self.assertEqual(response.status, 200)
        self.assertEqual(response.header(b"connection"), b"close")
        self.assertTrue(busy.closed)
        proxy.run()
        self.successResultOf(done)

    def test_max_connections(self):
        """Beyond limits.max_connections, new connections are refused."""
        proxy = self.proxy(
            CONFIG.replace("max_body_bytes: 1KiB", "max_body_bytes: 1KiB, max_connections: 2")
        )
        proxy.client()
        proxy.client()
        self.assertIsNone(proxy.factory.buildProtocol(None))
