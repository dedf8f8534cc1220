# -*- test-case-name: tests.adversarial.test_http2_frames -*-
"""
Protocol errors against a real Balance listener (h2c with prior knowledge)
over loopback sockets: a raw client writes the frames (C{hyperframe}) a
broken or hostile peer would, and reads what Balance answers until it
closes.  Each case checks the error code RFC 9113 asks for, and that no
byte reached the backend.
"""

from __future__ import annotations

import hpack
from hyperframe.frame import (
    ContinuationFrame,
    DataFrame,
    Frame,
    GoAwayFrame,
    HeadersFrame,
    RstStreamFrame,
    SettingsFrame,
    WindowUpdateFrame,
)

from balance.http.h2_conn import PREFACE, ErrorCodes, frame
from tests.adversarial.support import AdversarialCase, connect

GET = [(b":method", b"GET"), (b":scheme", b"http"), (b":authority", b"a"), (b":path", b"/g")]


def talk(port: int, data: bytes, until_stream: int | None = None) -> list:
    """
    Send the preface, SETTINGS and C{data}; return the frames received
    until the connection closes (or stream C{until_stream} ends).
    """
    frames = []
    buf = b""
    with connect(port, timeout=5) as sock:
        sock.sendall(PREFACE + SettingsFrame(0).serialize() + data)
        while True:
            try:
                chunk = sock.recv(65536)
            except (TimeoutError, ConnectionResetError):
                break
            if not chunk:
                break
            buf += chunk
            while len(buf) >= 9:
                f, length = Frame.parse_frame_header(memoryview(buf[:9]))
                if len(buf) < 9 + length:
                    break
                f.parse_body(memoryview(buf[9 : 9 + length]))
                buf = buf[9 + length :]
                frames.append(f)
                if (
                    until_stream is not None
                    and f.stream_id == until_stream
                    and "END_STREAM" in f.flags
                ):
                    return frames
    return frames


def request(sid: int, encoder=None, fields=GET) -> bytes:
    data = (encoder or hpack.Encoder()).encode(fields)
    return HeadersFrame(sid, data=data, flags=["END_HEADERS", "END_STREAM"]).serialize()


class ProtocolErrorTests(AdversarialCase):
    """A client that breaks the protocol gets GOAWAY with the right code."""

    async def assert_goaway(self, code, data: bytes) -> None:
        self.new_backend_bytes()
        frames = await self.in_thread(talk, self.port, data)
        goaways = [f for f in frames if isinstance(f, GoAwayFrame)]
        self.assertTrue(goaways, frames)
        self.assertEqual(ErrorCodes(goaways[-1].error_code), code)
        self.assertEqual(self.new_backend_bytes(), b"")

    async def test_bad_frame_size(self):
        await self.assert_goaway(ErrorCodes.FRAME_SIZE_ERROR, frame(6, 0, 0, b"1234567"))
        await self.assert_goaway(
            ErrorCodes.FRAME_SIZE_ERROR, DataFrame(1, data=b"x" * 16385).serialize()
        )

    async def test_stream_id_reuse(self):
        encoder = hpack.Encoder()
        data = HeadersFrame(5, data=encoder.encode(GET), flags=["END_HEADERS"]).serialize()
        data += HeadersFrame(3, data=encoder.encode(GET), flags=["END_HEADERS"]).serialize()
        await self.assert_goaway(ErrorCodes.PROTOCOL_ERROR, data)

    async def test_window_overflow(self):
        await self.assert_goaway(
            ErrorCodes.FLOW_CONTROL_ERROR, WindowUpdateFrame(0, 2**31 - 1).serialize()
        )

    async def test_continuation_interleaved(self):
        data = HeadersFrame(1, data=hpack.Encoder().encode(GET)[:2]).serialize()
        data += DataFrame(1, data=b"x").serialize()
        await self.assert_goaway(ErrorCodes.PROTOCOL_ERROR, data)
        data = HeadersFrame(1, data=hpack.Encoder().encode(GET)[:2]).serialize()
        data += ContinuationFrame(3, data=b"\x82", flags=["END_HEADERS"]).serialize()
        await self.assert_goaway(ErrorCodes.PROTOCOL_ERROR, data)

    async def test_header_block_too_large(self):
        """Beyond max_header_bytes (8 KiB here) across CONTINUATIONs."""
        data = HeadersFrame(1, data=b"\x00" * 4096).serialize()
        data += ContinuationFrame(1, data=b"\x00" * 4096).serialize() * 3
        await self.assert_goaway(ErrorCodes.ENHANCE_YOUR_CALM, data)

    async def test_hpack_index_out_of_range(self):
        data = HeadersFrame(1, data=b"\x82\x84\xbe", flags=["END_HEADERS"]).serialize()
        await self.assert_goaway(ErrorCodes.COMPRESSION_ERROR, data)

    async def test_stream_error_spares_the_connection(self):
        """
        DATA on a stream the client already ended resets that stream only
        (STREAM_CLOSED): the request on the next stream is answered on the
        same connection.
        """
        encoder = hpack.Encoder()
        data = request(1, encoder) + DataFrame(1, data=b"late").serialize()
        data += request(3, encoder)
        frames = await self.in_thread(talk, self.port, data, 3)
        resets = [(f.stream_id, f.error_code) for f in frames if isinstance(f, RstStreamFrame)]
        self.assertEqual(resets, [(1, ErrorCodes.STREAM_CLOSED)])
        [head] = [f for f in frames if isinstance(f, HeadersFrame) and f.stream_id == 3]
        self.assertEqual(hpack.Decoder().decode(head.data, raw=True)[0], (b":status", b"200"))
        self.assertEqual([f for f in frames if isinstance(f, GoAwayFrame)], [])
