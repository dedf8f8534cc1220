"""
The pure parts of WebSocket support: handshake checks, the accept value,
and the frame guard of frame-aware mode, fed every way a stream of frames
can be cut into reads.
"""

from __future__ import annotations

import os
import struct

from twisted.trial import unittest

from balance.config import model
from balance.http.headers import request_head, upgrade_response_head
from balance.http.proxy import Exchange
from balance.http.router import CompiledRoute
from balance.http.websocket import (
    CLOSE_TOO_BIG,
    FrameGuard,
    accept_matches,
    accept_value,
    close_frame,
    handshake_error,
    is_websocket,
)
from balance.observe.metrics import Counter
from balance.testing import InMemoryProxy

KEY = b"dGhlIHNhbXBsZSBub25jZQ=="


def frame(payload: bytes, opcode: int = 2, fin: bool = True, masked: bool = True) -> bytes:
    """One frame, masked (as a client sends) unless told otherwise."""
    first = (0x80 if fin else 0) | opcode
    n = len(payload)
    mask_bit = 0x80 if masked else 0
    if n < 126:
        head = bytes([first, mask_bit | n])
    elif n < 1 << 16:
        head = bytes([first, mask_bit | 126]) + struct.pack("!H", n)
    else:
        head = bytes([first, mask_bit | 127]) + struct.pack("!Q", n)
    if not masked:
        return head + payload
    mask = os.urandom(4)
    return head + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload))


def exchange(**changes) -> Exchange:
    """An exchange whose head is a valid handshake, with C{changes} applied."""
    ex = Exchange(None)
    ex.method = b"GET"
    ex.http11 = True
    ex.connection_tokens = {b"upgrade"}
    ex.headers = [
        (b"Host", b"a"),
        (b"Upgrade", b"websocket"),
        (b"Sec-WebSocket-Key", KEY),
        (b"Sec-WebSocket-Version", b"13"),
    ]
    for name, value in changes.items():
        setattr(ex, name, value)
    return ex


class HandshakeTests(unittest.TestCase):
    """What makes an opening handshake valid, and the accept value."""

    def test_accept_value(self):
        """RFC 6455 section 1.3's example."""
        self.assertEqual(accept_value(KEY), b"s3pPLMBiTxaQ9kYGzzhZRbK+xOo=")
        self.assertTrue(
            accept_matches(KEY, [(b"Sec-WebSocket-Accept", b"s3pPLMBiTxaQ9kYGzzhZRbK+xOo=")])
        )
        self.assertFalse(accept_matches(KEY, [(b"Sec-WebSocket-Accept", b"nope")]))
        self.assertFalse(accept_matches(KEY, []))

    def test_is_websocket(self):
        self.assertTrue(is_websocket(b"WebSocket"))
        self.assertTrue(is_websocket(b"h2c, websocket"))
        self.assertFalse(is_websocket(b"h2c"))

    def test_valid(self):
        ex = exchange()
        self.assertIsNone(handshake_error(ex))
        self.assertEqual(ex.ws_key, KEY)

    def test_invalid(self):
        """Each required part, missing or wrong, is named."""
        headers = exchange().headers
        cases = [
            (exchange(method=b"POST"), "method POST"),
            (exchange(http11=False), "HTTP/1.0"),
            (exchange(connection_tokens=None), "Connection: upgrade"),
            (exchange(connection_tokens={b"keep-alive"}), "Connection: upgrade"),
            (exchange(content_length=3), "with a body"),
            (exchange(chunked_in=True), "with a body"),
            (exchange(headers=headers[:3]), "Version: 13"),
            (exchange(headers=headers[:3] + [(b"sec-websocket-version", b"8")]), "Version: 13"),
            (exchange(headers=headers[:2] + headers[3:]), "without a Sec-WebSocket-Key"),
            (
                exchange(headers=headers + [(b"Sec-WebSocket-Key", KEY)]),
                "without a Sec-WebSocket-Key",
            ),
            (exchange(headers=[(b"Sec-WebSocket-Key", b"c2hvcnQ=")] + headers[3:]), "16 bytes"),
            (exchange(headers=[(b"Sec-WebSocket-Key", b"!!!!")] + headers[3:]), "16 bytes"),
        ]
        for ex, expected in cases:
            self.assertIn(expected, handshake_error(ex))


class HeadTests(unittest.TestCase):
    """The heads of an upgrade, both ways."""

    def test_response_head(self):
        """
        The 101 keeps Upgrade and Connection: Upgrade, drops other
        hop-by-hop fields, appends Via, and applies the route's edits.
        """
        route = CompiledRoute(
            model.Route(
                cluster="c",
                websocket=True,
                response_headers=model.HeaderEdits(set=(("x-set", "1"),), remove=("server",)),
            ),
            0,
        )
        ex = exchange(route=route, upgrade=b"websocket")
        head = upgrade_response_head(
            ex,
            b"Switching Protocols",
            [
                (b"Upgrade", b"WebSocket"),
                (b"Connection", b"upgrade"),
                (b"Keep-Alive", b"timeout=5"),
                (b"Sec-WebSocket-Accept", b"abc"),
                (b"Server", b"backend"),
                (b"X-Set", b"old"),
                (b"Via", b"1.1 inner"),
            ],
        )
        self.assertEqual(
            head,
            b"HTTP/1.1 101 Switching Protocols\r\n"
            b"Sec-WebSocket-Accept: abc\r\n"
            b"Connection: Upgrade\r\nUpgrade: WebSocket\r\n"
            b"Via: 1.1 inner, 1.1 balance\r\n"
            b"x-set: 1\r\n\r\n",
        )

    def test_request_head(self):
        """Upstream, the handshake offers websocket alone, with Connection: Upgrade."""
        route = CompiledRoute(model.Route(cluster="c", websocket=True), 0)
        ex = exchange(route=route, upgrade=b"websocket, h2c", target=b"/ws", host=b"a")
        ex.connection_tokens = {b"upgrade", b"keep-alive"}
        head = request_head(ex, b"192.0.2.1", b"http")
        self.assertIn(b"\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n", head)
        self.assertEqual(head.count(b"Upgrade:"), 1)
        self.assertIn(b"Sec-WebSocket-Key: " + KEY + b"\r\n", head)


class CloseFrameTests(unittest.TestCase):
    """The 1009 close frames, to a client (unmasked) and to a server (masked)."""

    def test_unmasked(self):
        self.assertEqual(close_frame(CLOSE_TOO_BIG, False), b"\x88\x02\x03\xf1")

    def test_masked(self):
        data = close_frame(CLOSE_TOO_BIG, True)
        self.assertEqual(data[:2], b"\x88\x82")
        mask = data[2:6]
        self.assertEqual(bytes(b ^ mask[i] for i, b in enumerate(data[6:])), b"\x03\xf1")


class FrameGuardTests(unittest.TestCase):
    """The guard forwards whole streams of frames, however they are cut up."""

    def feed(self, guard: FrameGuard, data: bytes, cut: int, from_client: bool = True):
        """Feed C{data} in reads of C{cut} bytes; return what may be forwarded."""
        out = b""
        for i in range(0, len(data), cut):
            step = guard.from_client if from_client else guard.from_backend
            out += step(data[i : i + cut])
            if guard.stopped:
                break
        return out

    def test_within_limit(self):
        """Messages up to the limit pass unchanged and are counted, in any cut."""
        stream = (
            frame(b"a" * 100)
            + frame(b"", opcode=9)
            + frame(b"b" * 300, opcode=1, fin=False)
            + frame(b"ping", opcode=9)
            + frame(b"c" * 700, opcode=0)
            + frame(b"d" * 1000, masked=False)
            + frame(b"x" * 70000, opcode=2, fin=False)
        )
        for cut in (1, 2, 3, 7, 13, 64, 1000, len(stream)):
            up = Counter()
            guard = FrameGuard(70000, up, None)
            self.assertEqual(self.feed(guard, stream, cut), stream, cut)
            self.assertFalse(guard.stopped)
            self.assertEqual(up.value, 3)

    def test_whole_message_too_big(self):
        """A frame whose length passes the limit is held back whole, and stops."""
        before = frame(b"a" * 10) + frame(b"b" * 10)
        for cut in (1, 5, 100):
            guard = FrameGuard(100)
            out = self.feed(guard, before + frame(b"c" * 101) + frame(b"d"), cut)
            self.assertEqual(out, before)
            self.assertTrue(guard.stopped)
            self.assertIn("client message", guard.reason)

    def test_fragments_add_up(self):
        """Small fragments whose sum passes the limit stop at the fragment that does."""
        first = frame(b"a" * 60, fin=False)
        for cut in (1, 9, 1000):
            guard = FrameGuard(100)
            out = self.feed(guard, first + frame(b"b" * 41, opcode=0), cut, from_client=False)
            self.assertEqual(out, first)
            self.assertTrue(guard.stopped)
            self.assertIn("backend message", guard.reason)

    def test_long_lengths(self):
        """16- and 64-bit lengths are read right."""
        for size in (125, 126, 65535, 65536, 200000):
            guard = FrameGuard(size)
            data = frame(b"z" * size)
            self.assertEqual(self.feed(guard, data, 4096), data)
            guard = FrameGuard(size - 1)
            self.assertEqual(self.feed(guard, data, 4096), b"")
            self.assertTrue(guard.stopped)

    def test_farewell(self):
        """
        1009 goes to each side at a frame boundary; not into the middle of
        a frame still on its way.
        """
        guard = FrameGuard(10)
        guard.from_client(frame(b"a" * 11))
        to_client, to_backend = guard.farewell()
        self.assertEqual(to_client, close_frame(CLOSE_TOO_BIG, False))
        self.assertEqual(to_backend[:2], b"\x88\x82")

        guard = FrameGuard(10)
        half = frame(b"b" * 8, masked=False)[:5]
        self.assertEqual(guard.from_backend(half), half)
        guard.from_client(frame(b"a" * 11))
        to_client, to_backend = guard.farewell()
        self.assertEqual(to_client, b"")
        self.assertTrue(to_backend)


class H2ClusterTests(unittest.TestCase):
    """WebSocket is not offered to HTTP/2 backends (RFC 8441)."""

    def test_upgrade_to_h2_cluster(self):
        """An upgrade routed to an C{upstream_protocol: h2} cluster is 502, never sent."""
        proxy = InMemoryProxy(
            """
            listeners:
              - name: web
                listen: "tcp:8080"
                routes:
                  - match: {path_prefix: /}
                    cluster: grpc
                    websocket: true
            clusters:
              - name: grpc
                upstream_protocol: h2
                backends: ["10.0.0.1:80"]
            """
        )
        client = proxy.client()
        client.send(
            b"GET /chat HTTP/1.1\r\nHost: a\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n"
            b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
        )
        proxy.run()
        [response] = client.responses()
        self.assertEqual(response.status, 502)
        self.assertEqual(proxy.endpoints["10.0.0.1:80"].attempts, 0)
