# -*- test-case-name: tests.adversarial.test_http2 -*-
"""
HTTP/2 to HTTP/1.1 downgrade smuggling against a real Balance listener (h2c
with prior knowledge), with the C{h2} library as a raw client whose own
checks are off, so it sends what a hostile client would.  Each case checks
what the client got and the bytes the HTTP/1.1 backend received.
"""

from __future__ import annotations

import h2.config
import h2.connection
import h2.events
from hyperframe.frame import DataFrame, HeadersFrame

from balance.testing import parse_requests
from tests.adversarial.support import AdversarialCase, connect

SMUGGLED = b"GET /smuggled HTTP/1.1\r\nHost: a\r\n\r\n"
BASE = [(b":method", b"POST"), (b":scheme", b"http"), (b":authority", b"a"), (b":path", b"/p")]
GET = [(b":method", b"GET"), (b":scheme", b"http"), (b":authority", b"a"), (b":path", b"/g")]


class Outcome:
    """What a client saw of its stream 1."""

    def __init__(self):
        self.status = None
        self.body = b""
        self.reset = None
        self.goaway = None
        self.ended = False

    @property
    def refused(self) -> bool:
        """Answered 4xx, reset, or the connection ended: anything but a success."""
        return (
            self.reset is not None
            or self.goaway is not None
            or (self.status is not None and self.status >= 400)
            or self.status is None
        )

    def __repr__(self):
        return f"<Outcome {self.status} reset={self.reset} goaway={self.goaway}>"


def exchange(port: int, headers, data=(), end_stream=True, raw_frames=()) -> Outcome:
    """
    Open an h2c connection, send C{headers} on stream 1 (then each of
    C{data}, the last with END_STREAM unless not C{end_stream}), and
    collect the outcome until the stream or the connection ends.

    :param raw_frames: serialized frames sent after, as they are.
    """
    config = h2.config.H2Configuration(
        client_side=True,
        header_encoding=None,
        validate_outbound_headers=False,
        normalize_outbound_headers=False,
        validate_inbound_headers=False,
    )
    conn = h2.connection.H2Connection(config)
    conn.initiate_connection()
    out = Outcome()
    with connect(port, timeout=5) as sock:
        conn.send_headers(1, headers, end_stream=not data and end_stream)
        for i, chunk in enumerate(data):
            last = i == len(data) - 1
            # Bypass h2's own flow-control and length bookkeeping.
            frame = DataFrame(1, data=chunk)
            if last and end_stream:
                frame.flags.add("END_STREAM")
            conn._data_to_send += frame.serialize()
        try:
            sock.sendall(conn.data_to_send() + b"".join(raw_frames))
            while not (out.ended or out.reset is not None or out.goaway is not None):
                data_in = sock.recv(65536)
                if not data_in:
                    break
                for event in conn.receive_data(data_in):
                    if isinstance(event, h2.events.ResponseReceived) and event.stream_id == 1:
                        out.status = int(dict(event.headers)[b":status"])
                    elif isinstance(event, h2.events.DataReceived) and event.stream_id == 1:
                        out.body += event.data
                    elif isinstance(event, h2.events.StreamEnded) and event.stream_id == 1:
                        out.ended = True
                    elif isinstance(event, h2.events.StreamReset) and event.stream_id == 1:
                        out.reset = event.error_code
                    elif isinstance(event, h2.events.ConnectionTerminated):
                        out.goaway = event.error_code
                sock.sendall(conn.data_to_send())
        except (OSError, h2.exceptions.ProtocolError):
            # Reset, closed, or timed out: the outcome so far stands.
            pass
    return out


class DowngradeTests(AdversarialCase):
    """Through the HTTP/2 front end to the recording HTTP/1.1 backend."""

    def answer(self, request, conn):
        conn.transport.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")

    async def h2(self, headers, data=(), end_stream=True, raw_frames=()) -> Outcome:
        return await self.in_thread(exchange, self.port, headers, data, end_stream, raw_frames)

    async def assert_refused(self, headers, data=(), end_stream=True):
        """Refused, and not one byte reached the backend."""
        self.new_backend_bytes()
        out = await self.h2(headers, data, end_stream)
        self.assertTrue(out.refused, (headers, out))
        self.assertEqual(self.new_backend_bytes(), b"", headers)

    async def assert_no_split(self, headers, data=(), end_stream=True):
        """
        Refused or not, the backend never gets a complete request whose
        body differs from what was declared, nor the smuggled one.
        """
        self.new_backend_bytes()
        before = len(self.backend.requests())
        out = await self.h2(headers, data, end_stream)
        seen = self.new_backend_bytes()
        self.assertNotIn(b"/smuggled", seen, (headers, data))
        self.assertEqual(len(self.backend.requests()), before, (headers, data, seen))
        self.assertTrue(out.refused, out)

    async def test_baseline(self):
        """A sound request with a body reaches the backend once, framed by its length."""
        self.new_backend_bytes()
        out = await self.h2(BASE + [(b"content-length", b"5")], [b"hel", b"lo"])
        self.assertEqual((out.status, out.body), (200, b"ok"))
        [request] = parse_requests(self.new_backend_bytes())
        self.assertEqual(request.body, b"hello")
        self.assertEqual(request.header_values(b"content-length"), [b"5"])

    async def test_body_without_length_is_chunked_upstream(self):
        """A body that looks like HTTP/1.1 framing is only ever a body."""
        self.new_backend_bytes()
        body = b"0\r\n\r\n" + SMUGGLED
        out = await self.h2(BASE, [body])
        self.assertEqual(out.status, 200)
        requests = parse_requests(self.new_backend_bytes())
        self.assertEqual([r.body for r in requests], [body])

    async def test_data_beyond_content_length(self):
        await self.assert_no_split(BASE + [(b"content-length", b"5")], [b"hello" + SMUGGLED])
        await self.assert_no_split(BASE + [(b"content-length", b"5")], [b"hello", SMUGGLED])
        await self.assert_no_split(BASE + [(b"content-length", b"0")], [SMUGGLED])

    async def test_data_short_of_content_length(self):
        await self.assert_no_split(BASE + [(b"content-length", b"100")], [b"hello"])
        await self.assert_no_split(BASE + [(b"content-length", b"100")], (), end_stream=True)

    async def test_bad_content_length(self):
        for value in (b"-1", b"+5", b"5, 5", b"0x5", b"5 5", b"", b"99999999999999999999999"):
            await self.assert_refused(BASE + [(b"content-length", value)], [b"hello"])
        await self.assert_refused(
            BASE + [(b"content-length", b"5"), (b"content-length", b"6")], [b"hello"]
        )

    async def test_connection_specific_fields(self):
        """transfer-encoding and the other connection-specific fields: refused."""
        for name, value in (
            (b"transfer-encoding", b"chunked"),
            (b"transfer-encoding", b"identity"),
            (b"connection", b"keep-alive"),
            (b"connection", b"close"),
            (b"keep-alive", b"timeout=5"),
            (b"proxy-connection", b"keep-alive"),
            (b"upgrade", b"websocket"),
            (b"te", b"gzip"),
            (b"te", b"trailers, gzip"),
        ):
            await self.assert_refused(BASE + [(name, value)], [b"0\r\n\r\n" + SMUGGLED])

    async def test_te_trailers_allowed(self):
        """C{te: trailers} is the one C{te} HTTP/2 allows; it is not forwarded."""
        self.new_backend_bytes()
        out = await self.h2(GET + [(b"te", b"trailers")])
        self.assertEqual(out.status, 200)
        [request] = parse_requests(self.new_backend_bytes())
        self.assertIsNone(request.header(b"te"))

    async def test_line_breaks_in_values(self):
        """CR, LF or NUL in any value would split the HTTP/1.1 head: refused."""
        for value in (
            b"a\r\nTransfer-Encoding: chunked",
            b"a\nX: b",
            b"a\rX: b",
            b"a\x00b",
            b"\r\n\r\n" + SMUGGLED,
        ):
            await self.assert_refused(GET + [(b"x-a", value)])
            await self.assert_refused(
                [(b":method", b"GET"), (b":scheme", b"http"), (b":authority", b"a" + value)]
                + [(b":path", b"/")]
            )
            await self.assert_refused(
                [(b":method", b"GET"), (b":scheme", b"http"), (b":authority", b"a")]
                + [(b":path", b"/x" + value)]
            )
            await self.assert_refused(
                [(b":method", b"GET" + value), (b":scheme", b"http"), (b":authority", b"a")]
                + [(b":path", b"/")]
            )

    async def test_bad_names_and_paths(self):
        for name in (b"X-Upper", b"x a", b"x:a", b"x\r\ny", b"x\x00", b""):
            await self.assert_refused(GET + [(name, b"1")])
        for path in (b"/a b", b"/a\tb", b"x", b"", b"/x HTTP/1.1"):
            await self.assert_refused(
                [(b":method", b"GET"), (b":scheme", b"http"), (b":authority", b"a")]
                + [(b":path", path)]
            )
        for method in (b"G ET", b"get\t", b""):
            await self.assert_refused(
                [(b":method", method), (b":scheme", b"http"), (b":authority", b"a")]
                + [(b":path", b"/")]
            )

    async def test_host_and_authority(self):
        """
        A host field beside :authority: refused when they differ, else one
        Host upstream.  Never two Host lines.
        """
        for host in (b"a", b"evil"):
            self.new_backend_bytes()
            out = await self.h2(GET + [(b"host", host)])
            seen = self.new_backend_bytes()
            if out.refused:
                self.assertEqual(seen, b"")
                continue
            [request] = parse_requests(seen)
            self.assertEqual(request.header_values(b"host"), [b"a"])

    async def test_trailers_with_framing_fields(self):
        """Trailers never become header lines upstream."""
        self.new_backend_bytes()
        trailers = h2.connection.H2Connection(
            h2.config.H2Configuration(client_side=True, validate_outbound_headers=False)
        )
        block = trailers.encoder.encode(
            [(b"content-length", b"50"), (b"x-t", b"1\r\nTransfer-Encoding: chunked")]
        )
        # The encoder of a throwaway connection starts with an empty table,
        # like the real client's after its HEADERS (all literal, no index).
        out = await self.h2(
            BASE,
            [b"hello"],
            end_stream=False,
            raw_frames=[
                HeadersFrame(1, data=block, flags=["END_HEADERS", "END_STREAM"]).serialize()
            ],
        )
        seen = self.new_backend_bytes()
        self.assertNotIn(b"Transfer-Encoding: chunked\r\n\r\n", seen.split(b"\r\n\r\n", 1)[-1])
        for request in parse_requests(seen):
            self.assertNotIn(b"50", request.header_values(b"content-length"))
        self.assertTrue(out is not None)
