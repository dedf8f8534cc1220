"""
Balance's HTTP/2 frame layer (L{balance.http.h2_conn}) on its own, sans
I/O: frames built and read back with C{hyperframe}, requests sent by the
C{h2} library as a client, and every protocol error RFC 9113 asks a
server to find answered with its code.
"""

from __future__ import annotations

import h2.config
import h2.connection
import h2.events
import hpack
from hyperframe.frame import (
    ContinuationFrame,
    DataFrame,
    Frame,
    GoAwayFrame,
    HeadersFrame,
    PingFrame,
    PriorityFrame,
    PushPromiseFrame,
    RstStreamFrame,
    SettingsFrame,
    WindowUpdateFrame,
)
from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from balance.http.h2_conn import (
    PREFACE,
    ErrorCodes,
    H2ConnectionError,
    ServerConnection,
    StreamClosedError,
    frame,
)

REQUEST = [(b":method", b"GET"), (b":scheme", b"http"), (b":path", b"/")]
REQUEST += [(b":authority", b"a")]
RESPONSE = [(b":status", b"200"), (b"content-type", b"text/plain")]


class Recorder:
    """A handler that writes down the calls of the frame layer."""

    def __init__(self):
        self.calls = []

    def __getattr__(self, name):
        if not name.startswith("h2_"):
            raise AttributeError(name)
        return lambda *args: self.calls.append((name[3:],) + args)


def parse(data: bytes) -> list:
    """The frames in C{data}, as C{hyperframe} objects."""
    frames = []
    while data:
        f, length = Frame.parse_frame_header(memoryview(data[:9]))
        f.parse_body(memoryview(data[9 : 9 + length]))
        frames.append(f)
        data = data[9 + length :]
    return frames


def block(fields) -> bytes:
    return hpack.Encoder().encode(fields)


class FrameLayerCase(SynchronousTestCase):
    def setUp(self):
        self.handler = Recorder()
        self.conn = ServerConnection(
            self.handler,
            {3: 100, 6: 65536},
            connection_window=100 * 65535,
            max_header_list_size=100000,
        )
        self.initial = parse(self.conn.data_to_send())
        self.conn.receive(PREFACE + SettingsFrame(0).serialize())
        self.assertEqual([type(f) for f in parse(self.conn.data_to_send())], [SettingsFrame])

    def feed(self, *frames) -> list:
        """Send frames; return the frames Balance answered with."""
        self.conn.receive(b"".join(f if isinstance(f, bytes) else f.serialize() for f in frames))
        return parse(self.conn.data_to_send())

    def request(self, sid: int = 1, end: bool = True, fields=REQUEST) -> list:
        flags = ["END_HEADERS", "END_STREAM"] if end else ["END_HEADERS"]
        return self.feed(HeadersFrame(sid, data=block(fields), flags=flags))

    def assert_connection_error(self, code, *frames) -> GoAwayFrame:
        with self.assertRaises(H2ConnectionError) as caught:
            self.conn.receive(
                b"".join(f if isinstance(f, bytes) else f.serialize() for f in frames)
            )
        self.assertEqual(caught.exception.code, code)
        [goaway] = [f for f in parse(self.conn.data_to_send()) if isinstance(f, GoAwayFrame)]
        self.assertEqual(goaway.error_code, code)
        self.assertTrue(self.conn.closed)
        # Nothing more is read.
        self.conn.receive(PingFrame(0, opaque_data=b"12345678").serialize())
        self.assertEqual(self.conn.data_to_send(), b"")
        return goaway

    def assert_stream_error(self, sid, code, *frames) -> None:
        out = self.feed(*frames)
        resets = [(f.stream_id, f.error_code) for f in out if isinstance(f, RstStreamFrame)]
        self.assertEqual(resets, [(sid, code)])
        self.assertFalse(self.conn.closed)


class HandshakeTests(FrameLayerCase):
    def test_initial_frames(self):
        """SETTINGS as given, then the connection window raised."""
        settings, update = self.initial
        self.assertEqual(dict(settings.settings), {3: 100, 6: 65536})
        self.assertEqual((update.stream_id, update.window_increment), (0, 99 * 65535))

    def test_bad_preface(self):
        conn = ServerConnection(Recorder(), {})
        conn.data_to_send()
        with self.assertRaises(H2ConnectionError):
            conn.receive(b"GET / HTTP/1.1\r\n\r\n")
        [goaway] = parse(conn.data_to_send())
        self.assertEqual(goaway.error_code, ErrorCodes.PROTOCOL_ERROR)

    def test_preface_byte_by_byte(self):
        conn = ServerConnection(Recorder(), {})
        data = PREFACE + SettingsFrame(0).serialize()
        for i in range(len(data)):
            conn.receive(data[i : i + 1])
        self.assertEqual([type(f) for f in parse(conn.data_to_send())], [SettingsFrame] * 2)

    def test_first_frame_not_settings(self):
        conn = ServerConnection(Recorder(), {})
        with self.assertRaises(H2ConnectionError) as caught:
            conn.receive(PREFACE + PingFrame(0, opaque_data=b"12345678").serialize())
        self.assertEqual(caught.exception.code, ErrorCodes.PROTOCOL_ERROR)


class RequestTests(FrameLayerCase):
    def test_with_h2_client(self):
        """A request and its response, both ways through the h2 library."""
        client = h2.connection.H2Connection(
            h2.config.H2Configuration(client_side=True, header_encoding=None)
        )
        client.initiate_connection()
        client.send_headers(1, REQUEST + [(b"x-a", b"b")], end_stream=False)
        client.send_data(1, b"body", end_stream=True)
        conn = ServerConnection(self.handler, {})
        client.receive_data(conn.data_to_send())
        conn.receive(client.data_to_send())
        self.assertEqual(
            self.handler.calls,
            [
                ("request", 1, REQUEST + [(b"x-a", b"b")], False),
                ("data", 1, b"body", 4),
                ("end", 1),
            ],
        )
        conn.acknowledge_received_data(4, 1)
        conn.send_headers(1, RESPONSE)
        conn.send_data(1, b"hello")
        conn.send_headers(1, [(b"x-trailer", b"t")], end_stream=True)
        events = client.receive_data(conn.data_to_send())
        kinds = [type(e) for e in events]
        self.assertIn(h2.events.ResponseReceived, kinds)
        self.assertIn(h2.events.TrailersReceived, kinds)
        self.assertIn(h2.events.StreamEnded, kinds)
        [response] = [e for e in events if isinstance(e, h2.events.ResponseReceived)]
        self.assertEqual(response.headers, RESPONSE)
        self.assertEqual(conn.streams, {})

    def test_header_block_in_continuations(self):
        data = block(REQUEST + [(b"x-big", b"v" * 100)])
        self.feed(
            HeadersFrame(1, data=data[:10], flags=["END_STREAM"]),
            ContinuationFrame(1, data=data[10:20]),
            ContinuationFrame(1, data=data[20:], flags=["END_HEADERS"]),
        )
        self.assertEqual(
            self.handler.calls, [("request", 1, REQUEST + [(b"x-big", b"v" * 100)], True)]
        )

    def test_padding_and_priority(self):
        """Padded HEADERS and DATA; the padding counts against the windows."""
        self.feed(
            HeadersFrame(
                1,
                data=block(REQUEST),
                pad_length=10,
                depends_on=0,
                stream_weight=16,
                flags=["END_HEADERS", "PADDED", "PRIORITY"],
            ),
            DataFrame(1, data=b"abc", pad_length=20, flags=["PADDED", "END_STREAM"]),
        )
        self.assertEqual(
            self.handler.calls,
            [("request", 1, REQUEST, False), ("data", 1, b"abc", 24), ("end", 1)],
        )

    def test_trailers(self):
        self.request(end=False)
        self.feed(
            HeadersFrame(1, data=block([(b"x-t", b"1")]), flags=["END_HEADERS", "END_STREAM"])
        )
        self.assertEqual(self.handler.calls[1:], [("trailers", 1, [(b"x-t", b"1")]), ("end", 1)])

    def test_byte_by_byte(self):
        data = HeadersFrame(1, data=block(REQUEST), flags=["END_HEADERS"]).serialize()
        data += DataFrame(1, data=b"xyz", flags=["END_STREAM"]).serialize()
        for i in range(len(data)):
            self.conn.receive(data[i : i + 1])
        self.assertEqual(
            self.handler.calls, [("request", 1, REQUEST, False), ("data", 1, b"xyz", 3), ("end", 1)]
        )

    def test_repeated_block_decoded_again_after_table_change(self):
        """The decode cache never serves a block decoded against an older table."""
        encoder = hpack.Encoder()
        first = encoder.encode(REQUEST + [(b"x-a", b"1")])
        again = encoder.encode(REQUEST + [(b"x-a", b"1")])
        self.feed(HeadersFrame(1, data=first, flags=["END_HEADERS", "END_STREAM"]))
        self.feed(HeadersFrame(3, data=again, flags=["END_HEADERS", "END_STREAM"]))
        self.feed(HeadersFrame(5, data=again, flags=["END_HEADERS", "END_STREAM"]))
        fields = [call[2] for call in self.handler.calls]
        self.assertEqual(fields, [REQUEST + [(b"x-a", b"1")]] * 3)

    def test_unknown_frame_ignored(self):
        self.assertEqual(self.feed(frame(0xEE, 0xFF, 0, b"xyz")), [])
        self.request()
        self.assertEqual(self.handler.calls, [("request", 1, REQUEST, True)])


class ProtocolErrorTests(FrameLayerCase):
    """Connection errors: GOAWAY with the right code, nothing more read."""

    def test_frame_too_large(self):
        self.assert_connection_error(ErrorCodes.FRAME_SIZE_ERROR, DataFrame(1, data=b"x" * 16385))

    def test_bad_control_frame_sizes(self):
        for bad in [
            frame(6, 0, 0, b"1234567"),  # PING
            frame(8, 0, 0, b"\x00\x00\x01"),  # WINDOW_UPDATE
            frame(4, 0, 0, b"\x00\x03\x00\x00\x00"),  # SETTINGS, not 6n
            frame(4, 1, 0, b"\x00" * 6),  # SETTINGS ACK with a payload
            frame(3, 0, 1, b"\x00\x00\x00"),  # RST_STREAM
            frame(7, 0, 0, b"\x00" * 7),  # GOAWAY
        ]:
            self.setUp()
            self.request()
            with self.assertRaises(H2ConnectionError) as caught:
                self.conn.receive(bad)
            self.assertEqual(caught.exception.code, ErrorCodes.FRAME_SIZE_ERROR, bad)

    def test_stream_id_reuse(self):
        """A new HEADERS on a stream id below the highest one is refused."""
        self.request(3)
        self.request(5)
        self.assert_connection_error(
            ErrorCodes.PROTOCOL_ERROR,
            HeadersFrame(1, data=block(REQUEST), flags=["END_HEADERS", "END_STREAM"]),
        )

    def test_even_stream(self):
        self.assert_connection_error(
            ErrorCodes.PROTOCOL_ERROR, HeadersFrame(2, data=block(REQUEST), flags=["END_HEADERS"])
        )

    def test_stream_zero(self):
        self.assert_connection_error(ErrorCodes.PROTOCOL_ERROR, frame(0, 0, 0, b"x"))
        self.setUp()
        self.assert_connection_error(ErrorCodes.PROTOCOL_ERROR, frame(2, 0, 0, b"\x00" * 5))
        self.setUp()
        self.assert_connection_error(ErrorCodes.PROTOCOL_ERROR, frame(3, 0, 0, b"\x00" * 4))

    def test_frames_on_idle_streams(self):
        for bad in [DataFrame(7, data=b"x"), RstStreamFrame(7), WindowUpdateFrame(7, 10)]:
            self.setUp()
            self.request(5)
            self.assert_connection_error(ErrorCodes.PROTOCOL_ERROR, bad)

    def test_priority_on_idle_stream_allowed(self):
        self.assertEqual(self.feed(PriorityFrame(9, depends_on=0)), [])

    def test_continuation_interleaved(self):
        """Anything but CONTINUATION of the same stream inside a header block."""
        start = HeadersFrame(1, data=block(REQUEST)[:3])
        for bad in [
            DataFrame(1, data=b"x"),
            PingFrame(0, opaque_data=b"12345678"),
            ContinuationFrame(3, data=b"\x82", flags=["END_HEADERS"]),
            HeadersFrame(3, data=block(REQUEST), flags=["END_HEADERS"]),
        ]:
            self.setUp()
            self.assert_connection_error(ErrorCodes.PROTOCOL_ERROR, start, bad)

    def test_continuation_without_headers(self):
        self.assert_connection_error(
            ErrorCodes.PROTOCOL_ERROR, ContinuationFrame(1, data=b"\x82", flags=["END_HEADERS"])
        )

    def test_hpack_index_out_of_range(self):
        self.assert_connection_error(
            ErrorCodes.COMPRESSION_ERROR,
            HeadersFrame(1, data=b"\x82\xff\x00", flags=["END_HEADERS"]),
        )

    def test_hpack_bomb(self):
        data = block([(b"x-bomb", b"a" * 4000)]) + b"\xbe" * 100
        self.assert_connection_error(
            ErrorCodes.ENHANCE_YOUR_CALM, HeadersFrame(1, data=data, flags=["END_HEADERS"])
        )

    def test_padding_beyond_frame(self):
        self.request(end=False)
        self.assert_connection_error(ErrorCodes.PROTOCOL_ERROR, frame(0, 0x8, 1, b"\x05abc"))
        self.setUp()
        self.assert_connection_error(
            ErrorCodes.PROTOCOL_ERROR, frame(1, 0x8 | 0x4, 1, b"\x09" + block(REQUEST)[:3])
        )

    def test_push_promise(self):
        self.request(end=False)
        self.assert_connection_error(
            ErrorCodes.PROTOCOL_ERROR,
            PushPromiseFrame(1, promised_stream_id=2, data=block(REQUEST), flags=["END_HEADERS"]),
        )

    def test_connection_window_overflow(self):
        self.assert_connection_error(ErrorCodes.FLOW_CONTROL_ERROR, WindowUpdateFrame(0, 2**31 - 1))

    def test_zero_window_update(self):
        self.assert_connection_error(ErrorCodes.PROTOCOL_ERROR, WindowUpdateFrame(0, 0))

    def test_data_beyond_connection_window(self):
        conn = self.conn = ServerConnection(Recorder(), {}, connection_window=65535)
        conn.receive(PREFACE + SettingsFrame(0).serialize())
        conn.data_to_send()
        for sid in (1, 3, 5, 7, 9):
            conn.receive(HeadersFrame(sid, data=block(REQUEST), flags=["END_HEADERS"]).serialize())
        for sid in (1, 3, 5, 7):
            conn.receive(DataFrame(sid, data=b"x" * 16383).serialize())
        self.assert_connection_error(ErrorCodes.FLOW_CONTROL_ERROR, DataFrame(9, data=b"x" * 10))

    def test_bad_settings(self):
        for setting, code in [
            ({4: 2**31}, ErrorCodes.FLOW_CONTROL_ERROR),
            ({5: 16383}, ErrorCodes.PROTOCOL_ERROR),
            ({5: 2**24}, ErrorCodes.PROTOCOL_ERROR),
            ({2: 2}, ErrorCodes.PROTOCOL_ERROR),
        ]:
            self.setUp()
            self.assert_connection_error(code, SettingsFrame(0, settings=setting))

    def test_settings_on_a_stream(self):
        self.assert_connection_error(ErrorCodes.PROTOCOL_ERROR, frame(4, 0, 1, b""))

    def test_headers_on_closed_stream(self):
        """HEADERS after a stream closed both ways: STREAM_CLOSED."""
        self.request(1)
        self.conn.send_headers(1, RESPONSE, end_stream=True)
        self.conn.data_to_send()
        self.assert_connection_error(
            ErrorCodes.PROTOCOL_ERROR,
            HeadersFrame(1, data=block(REQUEST), flags=["END_HEADERS", "END_STREAM"]),
        )


class StreamErrorTests(FrameLayerCase):
    """Stream errors: RST_STREAM, the handler told, the connection goes on."""

    def test_data_beyond_stream_window(self):
        self.request(end=False)
        frames = [DataFrame(1, data=b"x" * 16384) for _ in range(4)]
        frames.append(DataFrame(1, data=b"x" * 10))
        self.assert_stream_error(1, ErrorCodes.FLOW_CONTROL_ERROR, *frames)
        self.assertEqual(self.handler.calls[-1], ("stream_error", 1, ErrorCodes.FLOW_CONTROL_ERROR))

    def test_stream_window_overflow(self):
        self.request()
        self.assert_stream_error(1, ErrorCodes.FLOW_CONTROL_ERROR, WindowUpdateFrame(1, 2**31 - 1))

    def test_zero_stream_window_update(self):
        self.request()
        self.assert_stream_error(1, ErrorCodes.PROTOCOL_ERROR, WindowUpdateFrame(1, 0))

    def test_data_after_end_stream(self):
        self.request()
        self.assert_stream_error(1, ErrorCodes.STREAM_CLOSED, DataFrame(1, data=b"x"))

    def test_trailers_without_end_stream(self):
        self.request(end=False)
        self.assert_stream_error(
            1,
            ErrorCodes.PROTOCOL_ERROR,
            HeadersFrame(1, data=block([(b"x", b"y")]), flags=["END_HEADERS"]),
        )

    def test_self_dependency(self):
        self.request(end=False)
        self.assert_stream_error(1, ErrorCodes.PROTOCOL_ERROR, PriorityFrame(1, depends_on=1))
        self.assert_stream_error(
            3,
            ErrorCodes.PROTOCOL_ERROR,
            HeadersFrame(3, data=block(REQUEST), depends_on=3, flags=["END_HEADERS", "PRIORITY"]),
        )
        # The block was decoded all the same: the next one reads.
        self.request(5)
        self.assertEqual(self.handler.calls[-1], ("request", 5, REQUEST, True))

    def test_priority_frame_size(self):
        self.request()
        self.assert_stream_error(1, ErrorCodes.FRAME_SIZE_ERROR, frame(2, 0, 1, b"\x00" * 4))

    def test_frames_after_reset_dropped(self):
        """
        What the client sent before it saw Balance's RST_STREAM is dropped
        quietly; its DATA still comes back to the connection window, and
        its header block still feeds the HPACK table.
        """
        self.request(end=False)
        self.conn.reset_stream(1, ErrorCodes.CANCEL)
        self.conn.data_to_send()
        encoder = hpack.Encoder()
        out = self.feed(
            DataFrame(1, data=b"x" * 16384),
            DataFrame(1, data=b"x" * 16384),
            HeadersFrame(
                1, data=encoder.encode([(b"x-t", b"1")]), flags=["END_HEADERS", "END_STREAM"]
            ),
        )
        self.assertEqual([f for f in out if isinstance(f, RstStreamFrame)], [])
        self.assertFalse(self.conn.closed)
        # The trailers' entry is in the table: the next request uses it.
        self.feed(
            HeadersFrame(
                3,
                data=encoder.encode(REQUEST + [(b"x-t", b"1")]),
                flags=["END_HEADERS", "END_STREAM"],
            )
        )
        self.assertEqual(self.handler.calls[-1], ("request", 3, REQUEST + [(b"x-t", b"1")], True))

    def test_client_reset(self):
        self.request(end=False)
        self.feed(RstStreamFrame(1, error_code=ErrorCodes.CANCEL))
        self.assertEqual(self.handler.calls[-1], ("reset", 1, ErrorCodes.CANCEL))
        with self.assertRaises(StreamClosedError):
            self.conn.send_headers(1, RESPONSE)


class ControlTests(FrameLayerCase):
    def test_ping(self):
        [ack] = self.feed(PingFrame(0, opaque_data=b"12345678"))
        self.assertEqual((ack.flags, ack.opaque_data), ({"ACK"}, b"12345678"))
        self.feed(PingFrame(0, opaque_data=b"abcdefgh", flags=["ACK"]))
        self.assertEqual(self.handler.calls, [("ping_ack", b"abcdefgh")])

    def test_goaway(self):
        self.feed(GoAwayFrame(0, last_stream_id=0, error_code=ErrorCodes.NO_ERROR))
        self.assertEqual(self.handler.calls, [("goaway", 0, 0)])

    def test_close_connection(self):
        self.request(5)
        self.conn.close_connection(ErrorCodes.NO_ERROR)
        [goaway] = parse(self.conn.data_to_send())
        self.assertEqual((goaway.last_stream_id, goaway.error_code), (5, 0))

    def test_graceful_goaway_keeps_serving(self):
        self.request(1)
        self.conn.goaway(2**31 - 1)
        self.request(3)
        self.assertFalse(self.conn.closed)
        self.assertEqual(len(self.handler.calls), 2)


class FlowControlTests(FrameLayerCase):
    def test_window_updates_batched(self):
        """The client's windows come back in halves, not per DATA frame."""
        self.request(end=False)
        self.feed(*[DataFrame(1, data=b"x" * 10000) for _ in range(6)])
        self.conn.acknowledge_received_data(10000, 1)
        self.assertEqual(self.conn.data_to_send(), b"")
        for _ in range(3):
            self.conn.acknowledge_received_data(10000, 1)
        [update] = parse(self.conn.data_to_send())
        self.assertEqual((update.stream_id, update.window_increment), (1, 40000))

    def test_spent_window_given_back_whole(self):
        self.request(end=False)
        self.feed(*[DataFrame(1, data=b"x" * 16383) for _ in range(4)], DataFrame(1, data=b"xyz"))
        self.conn.acknowledge_received_data(65535, 1)
        [update] = parse(self.conn.data_to_send())
        self.assertEqual(update.window_increment, 65535)

    def test_send_window(self):
        """DATA goes out as the client's windows allow; SETTINGS changes them."""
        self.request()
        self.assertEqual(self.conn.local_flow_control_window(1), 65535)
        self.conn.send_headers(1, RESPONSE)
        self.conn.send_data(1, b"x" * 16384)
        self.assertEqual(self.conn.local_flow_control_window(1), 65535 - 16384)
        self.feed(SettingsFrame(0, settings={4: 100000}))
        self.assertEqual(self.conn.local_flow_control_window(1), 65535 - 16384)
        self.feed(WindowUpdateFrame(0, 100000))
        self.assertEqual(self.conn.local_flow_control_window(1), 100000 - 16384)
        self.feed(SettingsFrame(0, settings={4: 0}))
        self.assertEqual(self.conn.local_flow_control_window(1), -16384)
        with self.assertRaises(ValueError):
            self.conn.send_data(1, b"x")

    def test_large_header_block_split(self):
        """A response head beyond the client's frame size goes in CONTINUATIONs."""
        self.request()
        fields = RESPONSE + [(b"x-big", bytes(range(256)) * 100)]
        self.conn.send_headers(1, fields, end_stream=True)
        frames = parse(self.conn.data_to_send())
        self.assertEqual([type(f) for f in frames], [HeadersFrame, ContinuationFrame])
        self.assertEqual(frames[-1].flags, {"END_HEADERS"})
        decoder = hpack.Decoder()
        self.assertEqual(decoder.decode(b"".join(f.data for f in frames), raw=True), fields)
        self.assertEqual(self.conn.streams, {})


_frames = st.lists(
    st.builds(
        frame,
        st.integers(0, 10),
        st.integers(0, 255),
        st.sampled_from([0, 1, 2, 3, 5, 7, 2**31 + 1]),
        st.one_of(
            st.binary(max_size=40),
            st.sampled_from([block(REQUEST), b"\x00\x00\x00\x01", b"\x00" * 8]),
        ),
    ),
    max_size=12,
)


class ArbitraryFrameTests(SynchronousTestCase):
    """Hypothesis: whatever a client sends, and however it is cut up."""

    def run_frames(self, data: bytes, cuts) -> tuple:
        handler = Recorder()
        conn = ServerConnection(handler, {3: 100}, connection_window=100 * 65535)
        error = None
        pos = 0
        chunks = []
        for cut in cuts:
            chunks.append(data[pos : pos + cut])
            pos += cut
        chunks.append(data[pos:])
        try:
            for chunk in chunks:
                conn.receive(chunk)
        except H2ConnectionError as e:
            error = e.code
        return handler.calls, error, conn.data_to_send()

    @settings(max_examples=500, deadline=None)
    @given(_frames, st.lists(st.integers(1, 40), max_size=6))
    def test_only_connection_errors(self, frames, cuts):
        """
        Only L{H2ConnectionError} ever comes out, and the outcome (calls,
        error, frames sent) does not depend on how the bytes were split.
        """
        data = PREFACE + SettingsFrame(0).serialize() + b"".join(frames)
        whole = self.run_frames(data, [])
        self.assertEqual(self.run_frames(data, cuts), whole)
