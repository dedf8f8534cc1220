# -*- test-case-name: tests.properties.test_headers -*-
"""
Header rewriting through the proxy (hop-by-hop removal, Connection-named
fields, forwarding fields, a route's set/remove edits), for generated
request and response heads, run through L{balance.testing.InMemoryProxy}:
what the backend and the client get always follows the rules.
"""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from balance.http.message import HOP_BY_HOP
from balance.testing import InMemoryProxy

CONFIG = """
listeners:
  - name: web
    listen: "tcp:8080"
    routes:
      - match: {path_prefix: /}
        cluster: app
        request_headers: {set: {x-env: prod}, remove: [x-debug]}
        response_headers: {set: {x-frame-options: DENY}, remove: [server]}
clusters:
  - {name: app, backends: ["10.0.0.1:80"]}
"""

FORWARDING = {b"x-forwarded-for", b"x-forwarded-proto", b"x-forwarded-host", b"forwarded", b"via"}
NAMES = [
    b"Accept", b"X-Debug", b"x-env", b"X-Env", b"Server", b"Keep-Alive", b"TE", b"Trailer",
    b"Upgrade", b"Proxy-Connection", b"Proxy-Authorization", b"X-Forwarded-For",
    b"X-Forwarded-Proto", b"X-Forwarded-Host", b"Forwarded", b"Via", b"Cookie", b"X-A",
    b"x-b", b"Set-Cookie", b"X-Frame-Options", b"Cache-Control",
]  # fmt: skip
TOKEN = st.text("abcdefghijklmnopqrstuvwxyz-0123456789", min_size=1, max_size=8).map(str.encode)
NAME = st.one_of(st.sampled_from(NAMES), TOKEN.map(lambda t: b"X-" + t))
VALUE = st.binary(max_size=20).map(
    lambda b: bytes(c for c in b if 0x21 <= c <= 0x7E or c in (0x20, 0x09)).strip(b" \t")
)
CONNECTION = st.lists(
    st.one_of(st.sampled_from(NAMES + [b"close", b"keep-alive"]), TOKEN), max_size=4
)


def lower_names(tokens):
    return {t.lower() for t in tokens}


class HeaderProperties(SynchronousTestCase):
    @given(
        st.lists(st.tuples(NAME, VALUE), max_size=12),
        CONNECTION,
        st.lists(st.tuples(NAME, VALUE), max_size=10),
        CONNECTION,
    )
    def test_rewriting(self, req_headers, req_conn, resp_headers, resp_conn):
        proxy = InMemoryProxy(CONFIG)
        client = proxy.client("192.0.2.10")
        head = b"GET /p HTTP/1.1\r\nHost: a.example\r\n"
        head += b"".join(n + b": " + v + b"\r\n" for n, v in req_headers)
        if req_conn:
            head += b"Connection: " + b", ".join(req_conn) + b"\r\n"
        client.send(head + b"\r\n")
        proxy.run()
        [conn] = proxy.backend().connections
        [request] = conn.requests()

        named = lower_names(req_conn) - {b"host", b"content-length"}
        names = request.header_names()
        # Exactly one Host, the client's.
        self.assertEqual(request.header_values(b"host"), [b"a.example"])
        for name in names:
            self.assertNotIn(name, HOP_BY_HOP - {b"transfer-encoding"})
            if name not in FORWARDING and name != b"x-env":
                self.assertNotIn(name, named)
        self.assertNotIn(b"x-debug", names)
        self.assertEqual(request.header_values(b"x-env"), [b"prod"])
        # One of each forwarding field; the real client is the last hop.
        for name in FORWARDING:
            self.assertEqual(names.count(name), 1, name)
        self.assertTrue(request.header(b"x-forwarded-for").endswith(b"192.0.2.10"))
        self.assertEqual(request.header(b"x-forwarded-proto"), b"http")
        self.assertTrue(request.header(b"via").endswith(b"1.1 balance"))
        # Every other field the client sent arrives, in order, unchanged.
        expected = [
            (n.lower(), v)
            for n, v in req_headers
            if n.lower() not in HOP_BY_HOP | FORWARDING | named | {b"x-debug", b"x-env"}
        ]
        got = [(n.lower(), v) for n, v in request.headers if n.lower() in {e[0] for e in expected}]
        self.assertEqual(got, expected)

        body = b"hello"
        response = b"HTTP/1.1 200 OK\r\n" + b"".join(
            n + b": " + v + b"\r\n" for n, v in resp_headers
        )
        if resp_conn:
            response += b"Connection: " + b", ".join(resp_conn) + b"\r\n"
        response += b"Content-Length: 5\r\n\r\n" + body
        conn.respond(response)
        proxy.run()
        [answer] = client.responses()
        self.assertEqual((answer.status, answer.body), (200, body))
        names = answer.header_names()
        self.assertEqual(answer.header_values(b"content-length"), [b"5"])
        self.assertNotIn(b"transfer-encoding", names)
        self.assertNotIn(b"server", names)
        self.assertEqual(answer.header_values(b"x-frame-options"), [b"DENY"])
        self.assertEqual(names.count(b"via"), 1)
        resp_named = lower_names(resp_conn) - {b"close", b"keep-alive", b"content-length"}
        for name in names:
            if name == b"connection":
                self.assertEqual(answer.header(b"connection"), b"close")
                continue
            self.assertNotIn(name, HOP_BY_HOP)
            if name not in {b"via", b"x-frame-options", b"content-length"}:
                self.assertNotIn(name, resp_named)
