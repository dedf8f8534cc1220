# -*- test-case-name: tests.http.test_h2_limits -*-
"""
HTTP/2 abuse, sent as raw frames (hyperframe and hpack) to Balance in
memory, and what a client and the backends see: streams beyond the
concurrency limit refused, Rapid Reset, CONTINUATION and control frame
floods, HPACK bombs, and the request smuggling surface of an HTTP/2 to
HTTP/1.1 downgrade.  Every attack must end with bounded work and memory,
and nothing malformed may reach a backend.
"""

from __future__ import annotations

import time

import hpack
from h2.errors import ErrorCodes
from hyperframe.frame import (
    ContinuationFrame,
    DataFrame,
    GoAwayFrame,
    HeadersFrame,
    PingFrame,
    PriorityFrame,
    RstStreamFrame,
    SettingsFrame,
)
from twisted.trial.unittest import SynchronousTestCase

from balance.http.h2_guard import PREFACE
from tests.http.test_h2 import CONFIG, OK, H2Client, h2_proxy, parse_frames

_REQUEST = [(b":method", b"GET"), (b":scheme", b"http"), (b":authority", b"a"), (b":path", b"/")]


class RawClient:
    """A client that writes frames by hand and reads them back raw."""

    def __init__(self, proxy):
        self.proxy = proxy
        self.peer = proxy.client()
        self.encoder = hpack.Encoder()
        self.decoder = hpack.Decoder()
        self._read = 0
        self.peer.send(PREFACE + SettingsFrame(0).serialize())
        proxy.run()

    def headers(self, sid: int, fields=_REQUEST, end_stream: bool = True) -> bytes:
        """A HEADERS frame for stream C{sid}."""
        flags = ["END_HEADERS", "END_STREAM"] if end_stream else ["END_HEADERS"]
        return HeadersFrame(sid, data=self.encoder.encode(fields), flags=flags).serialize()

    def send(self, *frames: bytes) -> None:
        self.peer.send(b"".join(frames))

    def frames(self) -> list:
        """The frames received since the last call."""
        data = self.peer.received()[self._read :]
        self._read += len(data)
        return parse_frames(data)

    def goaway(self, frames) -> GoAwayFrame | None:
        found = [f for f in frames if isinstance(f, GoAwayFrame)]
        return found[-1] if found else None


class LimitTestCase(SynchronousTestCase):
    config = CONFIG

    def setUp(self):
        self.proxy = h2_proxy(self.config)
        self.client = RawClient(self.proxy)
        self.client.frames()

    @property
    def backend(self):
        return self.proxy.backend()

    def assert_calmed(self, frames) -> GoAwayFrame:
        """The client got GOAWAY ENHANCE_YOUR_CALM and its connection is closing."""
        goaway = self.client.goaway(frames)
        self.assertIsNotNone(goaway, "no GOAWAY")
        self.assertEqual(goaway.error_code, ErrorCodes.ENHANCE_YOUR_CALM)
        self.assertTrue(self.client.peer.closed)
        return goaway


class ConcurrencyTests(LimitTestCase):
    """SETTINGS_MAX_CONCURRENT_STREAMS is 100, and enforced stream by stream."""

    def test_advertised(self):
        """Balance's SETTINGS say 100 streams at most."""
        client = RawClient(self.proxy)
        settings = [f for f in client.frames() if isinstance(f, SettingsFrame)][0]
        self.assertEqual(settings.settings[SettingsFrame.MAX_CONCURRENT_STREAMS], 100)

    def test_refused_beyond(self):
        """
        The 101st stream open at once is refused with REFUSED_STREAM (safe
        to retry), without a backend request; the others go on, and once
        one ends a new one is accepted.
        """
        self.backend.mode = "hang"
        self.client.send(*[self.client.headers(1 + 2 * i) for i in range(101)])
        self.proxy.run()
        frames = self.client.frames()
        [reset] = [f for f in frames if isinstance(f, RstStreamFrame)]
        self.assertEqual((reset.stream_id, reset.error_code), (201, ErrorCodes.REFUSED_STREAM))
        self.assertIsNone(self.client.goaway(frames))
        self.assertEqual(self.backend.attempts, 100)
        self.backend.complete()
        self.proxy.run()
        self.backend.connections[0].respond(OK)
        self.proxy.run()
        self.client.send(self.client.headers(203))
        self.proxy.run()
        self.assertIsNone(self.client.goaway(self.client.frames()))
        requests = [r.target for c in self.backend.connections for r in c.requests()]
        self.assertEqual(len(requests), 101)


class RapidResetTests(LimitTestCase):
    """Rapid Reset (CVE-2023-44487): streams opened and cancelled at once."""

    def test_reset_flood(self):
        """
        A client opening and resetting thousands of streams is sent away
        after about a hundred, and the backends see at most that many
        requests.
        """
        sent = 0
        for i in range(1000):
            sid = 1 + 2 * i
            self.client.send(
                self.client.headers(sid), RstStreamFrame(sid, error_code=8).serialize()
            )
            sent += 1
            self.proxy.run()
            if self.client.peer.closed:
                break
        self.assert_calmed(self.client.frames())
        self.assertLessEqual(sent, 101)
        self.assertLessEqual(self.backend.attempts, 101)

    def test_reset_after_start(self):
        """
        The same when each stream's request reached a backend before the
        reset: the number of backend requests stays bounded.
        """
        for i in range(1000):
            sid = 1 + 2 * i
            self.client.send(self.client.headers(sid))
            self.proxy.run()
            self.client.send(RstStreamFrame(sid, error_code=8).serialize())
            self.proxy.run()
            if self.client.peer.closed:
                break
        self.assert_calmed(self.client.frames())
        requests = sum(len(c.requests()) for c in self.backend.connections)
        self.assertLessEqual(requests, 101)
        self.assertEqual(self.backend.open_connections(), [])

    def test_refusals_count(self):
        """Streams refused for concurrency count like resets: a flood of them ends too."""
        self.backend.mode = "hang"
        for i in range(1000):
            self.client.send(self.client.headers(1 + 2 * i))
            if self.client.peer.closed:
                break
        self.proxy.run()
        self.assert_calmed(self.client.frames())
        self.assertEqual(self.backend.attempts, 100)

    def test_occasional_resets(self):
        """A client that cancels now and then, and completes requests, is never sent away."""
        for i in range(300):
            sid = 1 + 2 * i
            self.client.send(self.client.headers(sid))
            self.proxy.run()
            if i % 2:
                self.client.send(RstStreamFrame(sid, error_code=8).serialize())
            else:
                self.backend.connections[-1].respond(OK)
            self.proxy.run(0.05)
        frames = self.client.frames()
        self.assertIsNone(self.client.goaway(frames))
        self.assertFalse(self.client.peer.closed)


class HeaderBlockTests(LimitTestCase):
    """CONTINUATION floods and HPACK bombs."""

    def test_continuation_flood(self):
        """
        A header block that never ends is refused once it passes
        max_header_bytes (64 KiB): GOAWAY ENHANCE_YOUR_CALM, long before
        the 1 MiB the h2 library would have held.
        """
        self.client.send(HeadersFrame(1, data=b"\x00" * 16384).serialize())
        sent = 16384
        while not self.client.peer.closed and sent < 2 * 1024 * 1024:
            self.client.send(ContinuationFrame(1, data=b"\x00" * 16384).serialize())
            sent += 16384
        self.assertLessEqual(sent, 64 * 1024 + 16384)
        self.assert_calmed(self.client.frames())
        self.assertEqual(self.backend.attempts, 0)

    def test_continuation_byte_by_byte(self):
        """Frames split into single bytes are followed all the same."""
        data = HeadersFrame(1, data=b"\x00" * 16384).serialize()
        data += ContinuationFrame(1, data=b"\x00" * 16384).serialize() * 5
        self.client.peer.send(data[:300], byte_by_byte=True)
        self.client.peer.send(data[300:])
        self.assert_calmed(self.client.frames())

    def test_unfinished_header_block(self):
        """A header block left unfinished is dropped after the handshake timeout."""
        block = self.client.encoder.encode(_REQUEST)
        self.client.send(HeadersFrame(1, data=block).serialize())
        self.proxy.run(9)
        self.assertFalse(self.client.peer.closed)
        self.proxy.run(2)
        self.assert_calmed(self.client.frames())

    def test_hpack_bomb(self):
        """
        A small header block that decodes to megabytes (one large dynamic
        table entry, referenced a thousand times) is cut off while being
        decoded: GOAWAY ENHANCE_YOUR_CALM, quickly, no backend request.
        """
        block = self.client.encoder.encode(_REQUEST + [(b"x-bomb", b"a" * 4000)])
        # 0xbe: the newest dynamic table entry (index 62), one byte each.
        block += b"\xbe" * 4000
        started = time.process_time()
        self.client.send(
            HeadersFrame(1, data=block, flags=["END_HEADERS", "END_STREAM"]).serialize()
        )
        self.assertLess(time.process_time() - started, 1.0)
        self.assert_calmed(self.client.frames())
        self.assertEqual(self.backend.attempts, 0)

    def test_large_header_list(self):
        """
        A header list above max_header_bytes that is no bomb is answered
        431 on its stream, and the connection goes on.
        """
        proxy = h2_proxy(
            CONFIG.replace(
                'listen: "tcp:8080"', 'listen: "tcp:8080"\n        limits: {max_header_bytes: 8KiB}'
            )
        )
        client = H2Client(proxy)
        response = client.get(b"/", headers=[(b"x-big", b"b" * 10000)])
        self.assertEqual(response.status, 431)
        self.assertEqual(proxy.backend().attempts, 0)
        self.assertEqual(client.get(b"/healthz").status, 200)


class FloodTests(LimitTestCase):
    """Control frames that cost Balance work and give the client nothing."""

    def flood(self, frame: bytes, count: int = 5000) -> list:
        for _ in range(count // 100):
            self.client.send(frame * 100)
            if self.client.peer.closed:
                break
        return self.client.frames()

    def test_ping_flood(self):
        """A PING flood ends with GOAWAY; Balance answered at most its budget."""
        frames = self.flood(PingFrame(0, opaque_data=b"12345678").serialize())
        self.assert_calmed(frames)
        acks = [f for f in frames if isinstance(f, PingFrame)]
        self.assertLessEqual(len(acks), 1000)

    def test_settings_flood(self):
        frames = self.flood(SettingsFrame(0).serialize())
        self.assert_calmed(frames)
        acks = [f for f in frames if isinstance(f, SettingsFrame) and "ACK" in f.flags]
        self.assertLessEqual(len(acks), 1001)

    def test_empty_data_flood(self):
        self.client.send(self.client.headers(1, end_stream=False))
        self.proxy.run()
        self.assert_calmed(self.flood(DataFrame(1).serialize()))

    def test_priority_flood(self):
        self.assert_calmed(self.flood(PriorityFrame(1, depends_on=0).serialize()))

    def test_sustained_pings_allowed(self):
        """A keepalive PING every second for minutes is fine."""
        for _ in range(300):
            self.client.send(PingFrame(0, opaque_data=b"12345678").serialize())
            self.client.send(self.client.headers(1 + 2 * _))
            self.proxy.run()
            self.backend.connections[-1].respond(OK)
            self.proxy.run(1)
        self.assertIsNone(self.client.goaway(self.client.frames()))


class SmugglingTests(LimitTestCase):
    """
    The HTTP/2 to HTTP/1.1 downgrade never forwards what an HTTP/1.1
    backend could read differently.
    """

    def test_data_beyond_content_length(self):
        """
        More DATA than content-length is a connection error: the extra
        bytes never reach the backend (they would be its next request),
        whose connection is cut.
        """
        c = self.client
        fields = [
            (b":method", b"POST"),
            (b":scheme", b"http"),
            (b":authority", b"a"),
            (b":path", b"/"),
            (b"content-length", b"5"),
        ]
        c.send(c.headers(1, fields, end_stream=False))
        self.proxy.run()
        smuggled = b"helloGET /admin HTTP/1.1\r\nHost: a\r\n\r\n"
        c.send(DataFrame(1, data=smuggled, flags=["END_STREAM"]).serialize())
        self.proxy.run()
        goaway = c.goaway(c.frames())
        self.assertEqual(goaway.error_code, ErrorCodes.PROTOCOL_ERROR)
        [conn] = self.backend.connections
        self.assertNotIn(b"/admin", conn.received())
        self.assertTrue(conn.aborted)

    def test_data_short_of_content_length(self):
        """Less DATA than content-length: the backend's connection is cut too."""
        c = self.client
        fields = [(b":method", b"POST"), (b":scheme", b"http"), (b":authority", b"a")]
        fields += [(b":path", b"/"), (b"content-length", b"10")]
        c.send(c.headers(1, fields, end_stream=False))
        self.proxy.run()
        c.send(DataFrame(1, data=b"abc", flags=["END_STREAM"]).serialize())
        self.proxy.run()
        self.assertEqual(c.goaway(c.frames()).error_code, ErrorCodes.PROTOCOL_ERROR)
        [conn] = self.backend.connections
        self.assertTrue(conn.aborted)
        self.assertFalse(any(r.complete for r in conn.requests()))

    def test_length_without_body(self):
        """
        content-length with END_STREAM on the HEADERS (no body at all) is
        refused: the backend would wait for the body, then read the next
        request on its connection as that body.
        """
        c = self.client
        fields = [(b":method", b"POST"), (b":scheme", b"http"), (b":authority", b"a")]
        fields += [(b":path", b"/"), (b"content-length", b"20")]
        c.send(c.headers(1, fields, end_stream=True))
        self.proxy.run()
        frames = c.frames()
        self.assertEqual(self.backend.attempts, 0)
        [headers] = [f for f in frames if isinstance(f, HeadersFrame)]
        self.assertIn((b":status", b"400"), c.decoder.decode(headers.data, raw=True))

    def test_trailers_short_of_content_length(self):
        """
        A body that ends, with trailers, short of its content-length (which
        the h2 library does not check) never completes a backend request.
        """
        c = self.client
        fields = [(b":method", b"POST"), (b":scheme", b"http"), (b":authority", b"a")]
        fields += [(b":path", b"/"), (b"content-length", b"10")]
        c.send(c.headers(1, fields, end_stream=False))
        self.proxy.run()
        c.send(DataFrame(1, data=b"abc").serialize())
        trailers = c.encoder.encode([(b"x-t", b"1")])
        c.send(HeadersFrame(1, data=trailers, flags=["END_HEADERS", "END_STREAM"]).serialize())
        self.proxy.run()
        [conn] = self.backend.connections
        self.assertTrue(conn.aborted)
        self.assertFalse(any(r.complete for r in conn.requests()))
        resets = [f for f in c.frames() if isinstance(f, RstStreamFrame)]
        self.assertEqual([r.error_code for r in resets], [ErrorCodes.PROTOCOL_ERROR])

    def refused(self, fields, status: int = 400) -> None:
        client = H2Client(self.proxy, validate=False)
        sid = client.h2.get_next_available_stream_id()
        client.h2.send_headers(sid, fields, end_stream=True)
        client.flush()
        self.proxy.run()
        client.read()
        self.assertEqual(client.responses[sid].status, status, fields)
        self.assertEqual(self.backend.attempts, 0, fields)

    def test_connection_specific_fields(self):
        """transfer-encoding, connection, keep-alive, upgrade, te other than trailers: 400."""
        for name, value in [
            (b"transfer-encoding", b"chunked"),
            (b"connection", b"keep-alive"),
            (b"keep-alive", b"5"),
            (b"proxy-connection", b"x"),
            (b"upgrade", b"websocket"),
            (b"te", b"gzip"),
        ]:
            self.refused(_REQUEST + [(name, value)])

    def test_bad_values(self):
        """CR, LF, NUL (which would split an HTTP/1.1 head) in a value: 400."""
        for value in [b"a\r\nX-Injected: 1", b"a\nb", b"a\rb", b"a\x00b", b" a", b"a\t"]:
            self.refused(_REQUEST + [(b"x-a", value)])

    def test_bad_names(self):
        for name in [b"X-Upper", b"x a", b"x:a", b"", b"x\r\ny"]:
            self.refused(_REQUEST + [(name, b"1")])

    def test_pseudo_header_rules(self):
        get, http, auth, path = _REQUEST
        for fields in [
            [get, http, auth],  # no :path
            [get, auth, path],  # no :scheme
            [get, http, auth, path, path],
            [get, http, (b"x-a", b"1"), auth, path],
            [get, http, auth, path, (b":status", b"200")],
            [get, http, auth, path, (b":foo", b"1")],
            [get, http, auth, (b":path", b"/a b")],
            [get, http, auth, (b":path", b"/a#b")],
            [get, http, auth, (b":path", b"a")],
            [(b":method", b"G T"), http, auth, path],
            [get, (b":scheme", b"ftp"), auth, path],
            [get, http, auth, path, (b"host", b"other")],
            [get, http, path],  # no :authority nor host
            [get, http, (b":authority", b"a b"), path],
        ]:
            self.refused(fields)

    def test_connect(self):
        self.refused([(b":method", b"CONNECT"), (b":authority", b"a:443")], 405)

    def test_te_trailers_not_forwarded(self):
        """te: trailers is allowed, and not forwarded (hop-by-hop)."""
        client = H2Client(self.proxy)
        client.request(b"/", headers=[(b"te", b"trailers")])
        self.proxy.run()
        [request] = self.backend.connections[0].requests()
        self.assertIsNone(request.header(b"te"))
