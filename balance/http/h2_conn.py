# -*- test-case-name: tests.http.test_h2_conn -*-
"""
The server side of an HTTP/2 connection (RFC 9113), sans I/O: the
client's bytes go in (L{ServerConnection.receive}), the requests come out
as calls on a handler, and the frames to send pile up for
L{ServerConnection.data_to_send}.

It is what Balance needs of the protocol and no more: frames are parsed
from the bytes in place, header blocks decoded by L{balance.http.hpack}
(with a cache for the blocks clients repeat), and streams are small
records of their flow-control windows and which side may still send.
Stream ids below the highest one seen that are not open are closed, so a
closed stream costs nothing (but the ids Balance reset lately, whose
frames in flight are dropped quietly).

Errors are answered as RFC 9113 5.4 asks: a connection error queues
GOAWAY with its code and raises L{H2ConnectionError} out of C{receive}
(the caller closes the connection); a stream error queues RST_STREAM and
tells the handler (C{h2_stream_error}) when the stream was open.

The handler's methods, called from inside C{receive}:

  - C{h2_request(stream_id, fields, ended)}: a new stream's request head
    (C{ended}: END_STREAM came with it);
  - C{h2_data(stream_id, data, flow_controlled_length)}: request body;
  - C{h2_trailers(stream_id, fields)}: trailers (C{h2_end} follows);
  - C{h2_end(stream_id)}: the client ended its side (after DATA or
    trailers; not after a request head that ended it);
  - C{h2_reset(stream_id, code)}: the client reset an open stream;
  - C{h2_stream_error(stream_id, code)}: Balance reset an open stream
    because of a stream error;
  - C{h2_ping_ack(data)}, C{h2_goaway(code, last_stream_id)}.

The handler answers through C{send_headers}, C{send_data}, C{end_stream},
C{reset_stream} and C{acknowledge_received_data}, which have the names
and meaning of the C{h2} library's (so that
L{balance.http.h2_flow.QueuedStream} frames for both).
"""

from __future__ import annotations

import enum
import struct

from balance.http.hpack import Decoder, Encoder, HeaderListTooLarge, HPACKError

__all__ = [
    "ErrorCodes",
    "H2ConnectionError",
    "StreamClosedError",
    "ServerConnection",
    "PREFACE",
]


class ErrorCodes(enum.IntEnum):
    """The error codes of RFC 9113 7."""

    NO_ERROR = 0x0
    PROTOCOL_ERROR = 0x1
    INTERNAL_ERROR = 0x2
    FLOW_CONTROL_ERROR = 0x3
    SETTINGS_TIMEOUT = 0x4
    STREAM_CLOSED = 0x5
    FRAME_SIZE_ERROR = 0x6
    REFUSED_STREAM = 0x7
    CANCEL = 0x8
    COMPRESSION_ERROR = 0x9
    CONNECT_ERROR = 0xA
    ENHANCE_YOUR_CALM = 0xB
    INADEQUATE_SECURITY = 0xC
    HTTP_1_1_REQUIRED = 0xD


PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"

# Frame types (RFC 9113 6).
DATA = 0x0
HEADERS = 0x1
PRIORITY = 0x2
RST_STREAM = 0x3
SETTINGS = 0x4
PUSH_PROMISE = 0x5
PING = 0x6
GOAWAY = 0x7
WINDOW_UPDATE = 0x8
CONTINUATION = 0x9

# Flags.
END_STREAM = 0x1
ACK = 0x1
END_HEADERS = 0x4
PADDED = 0x8
PRIORITY_FLAG = 0x20

# SETTINGS parameters (RFC 9113 6.5.2).
HEADER_TABLE_SIZE = 0x1
ENABLE_PUSH = 0x2
MAX_CONCURRENT_STREAMS = 0x3
INITIAL_WINDOW_SIZE = 0x4
MAX_FRAME_SIZE = 0x5
MAX_HEADER_LIST_SIZE = 0x6
ENABLE_CONNECT_PROTOCOL = 0x8

#: The frame size Balance accepts (it never raises SETTINGS_MAX_FRAME_SIZE).
MAX_INBOUND_FRAME = 16384
#: The stream window Balance gives (it never changes
#: SETTINGS_INITIAL_WINDOW_SIZE).
STREAM_WINDOW = 65535

_MAX_WINDOW = 2**31 - 1
_HEADER = struct.Struct(">HBBBL")
_U32 = struct.Struct(">L")
_SETTING = struct.Struct(">HL")
_GOAWAY = struct.Struct(">LL")
# Ids of streams Balance reset, remembered to drop their frames in flight:
# two generations of this many.
_RESET_MEMORY = 512


def frame(kind: int, flags: int, stream_id: int, payload: bytes = b"") -> bytes:
    """One frame, serialized."""
    size = len(payload)
    return _HEADER.pack(size >> 8, size & 255, kind, flags, stream_id) + payload


def settings_frame(settings: dict) -> bytes:
    """A SETTINGS frame with C{settings} (parameter to value)."""
    return frame(SETTINGS, 0, 0, b"".join([_SETTING.pack(k, v) for k, v in settings.items()]))


class H2ConnectionError(Exception):
    """
    A connection error (RFC 9113 5.4.1): GOAWAY with C{code} is queued,
    the connection must close.
    """

    def __init__(self, code: int, message: str):
        super().__init__(code, message)
        self.code = code
        self.message = message

    def __str__(self) -> str:
        return "%s: %s" % (ErrorCodes(self.code).name, self.message)


class StreamClosedError(Exception):
    """Something was to be sent on a stream that is closed on Balance's side."""


class _Stream:
    """
    What the connection knows of an open stream.

    :ivar send_window: bytes of DATA the client's window allows.
    :ivar recv_window: bytes of DATA the client may still send.
    :ivar recv_unacked: bytes received and handed on, not yet given back.
    :ivar remote_open: the client may still send (no END_STREAM yet).
    :ivar local_open: Balance may still send.
    """

    __slots__ = ("send_window", "recv_window", "recv_unacked", "remote_open", "local_open")

    def __init__(self, send_window: int, remote_open: bool):
        self.send_window = send_window
        self.recv_window = STREAM_WINDOW
        self.recv_unacked = 0
        self.remote_open = remote_open
        self.local_open = True


def _increment(window: int, maximum: int, unacked: int) -> int:
    """
    How much window to give back, given C{unacked} bytes consumed: in
    batches of half the window, or all when the window is spent (as the
    C{h2} library does), not one WINDOW_UPDATE per DATA frame.
    """
    if window == 0 and unacked > min(1024, maximum // 4) or unacked >= maximum // 2:
        return min(unacked, maximum - window)
    return 0


class ServerConnection:
    """
    One HTTP/2 connection, server side (see the module docstring).

    :param handler: gets the calls listed in the module docstring.
    :param settings: the SETTINGS Balance sends (parameter to value).
    :param connection_window: the connection's receive window (a
        WINDOW_UPDATE raises it from 65535 at once).
    :param max_header_list_size: a decoded header list beyond this is a
        connection error ENHANCE_YOUR_CALM (an HPACK bomb).

    :ivar streams: the open streams by id.
    :ivar highest_stream_id: the largest stream id the client opened.
    :ivar max_outbound_frame_size: the client's SETTINGS_MAX_FRAME_SIZE.
    :ivar closed: a GOAWAY ended the connection: nothing more is read.
    """

    __slots__ = (
        "handler",
        "streams",
        "highest_stream_id",
        "max_outbound_frame_size",
        "closed",
        "decoder",
        "encoder",
        "_out",
        "_buf",
        "_preface",
        "_settings_seen",
        "_send_window",
        "_initial_send_window",
        "_recv_window",
        "_recv_max",
        "_recv_unacked",
        "_block",
        "_block_id",
        "_block_flags",
        "_reset",
        "_reset_old",
    )

    def __init__(
        self,
        handler,
        settings: dict,
        connection_window: int = STREAM_WINDOW,
        max_header_list_size: int = 1 << 20,
    ):
        self.handler = handler
        self.streams: dict[int, _Stream] = {}
        self.highest_stream_id = 0
        self.max_outbound_frame_size = 16384
        self.closed = False
        self.decoder = Decoder(max_header_list_size)
        self.encoder = Encoder()
        self._out: list[bytes] = [settings_frame(settings)]
        if connection_window > STREAM_WINDOW:
            self._out.append(
                frame(WINDOW_UPDATE, 0, 0, _U32.pack(connection_window - STREAM_WINDOW))
            )
        self._buf = b""
        self._preface = True
        self._settings_seen = False
        self._send_window = STREAM_WINDOW
        self._initial_send_window = STREAM_WINDOW
        self._recv_window = self._recv_max = connection_window
        self._recv_unacked = 0
        self._block = None
        self._block_id = 0
        self._block_flags = 0
        self._reset: set[int] = set()
        self._reset_old: set[int] = set()

    # -- input ---------------------------------------------------------------------

    def receive(self, data: bytes) -> None:
        """
        Process the next bytes from the client.

        :raise H2ConnectionError: a connection error (GOAWAY is queued).
        """
        if self.closed:
            return
        buf = self._buf + data if self._buf else data
        size = len(buf)
        pos = 0
        if self._preface:
            if size < 24:
                if not PREFACE.startswith(buf):
                    self._fail(ErrorCodes.PROTOCOL_ERROR, "invalid connection preface")
                self._buf = buf
                return
            if buf[:24] != PREFACE:
                self._fail(ErrorCodes.PROTOCOL_ERROR, "invalid connection preface")
            self._preface = False
            pos = 24
        header = _HEADER.unpack_from
        try:
            while size - pos >= 9:
                high, low, kind, flags, stream_id = header(buf, pos)
                length = (high << 8) | low
                if length > MAX_INBOUND_FRAME:
                    self._fail(ErrorCodes.FRAME_SIZE_ERROR, "frame larger than 16384 bytes")
                end = pos + 9 + length
                if end > size:
                    break
                payload = buf[pos + 9 : end]
                pos = end
                stream_id &= _MAX_WINDOW
                if not self._settings_seen and kind != SETTINGS:
                    self._fail(ErrorCodes.PROTOCOL_ERROR, "first frame not SETTINGS")
                if self._block is not None and kind != CONTINUATION:
                    self._fail(ErrorCodes.PROTOCOL_ERROR, "header block interrupted")
                if kind == HEADERS:
                    self._headers(flags, stream_id, payload)
                elif kind == DATA:
                    self._data(flags, stream_id, payload)
                elif kind == WINDOW_UPDATE:
                    self._window_update(stream_id, payload)
                elif kind == SETTINGS:
                    self._settings(flags, stream_id, payload)
                elif kind == RST_STREAM:
                    self._rst_stream(stream_id, payload)
                elif kind == PING:
                    self._ping(flags, stream_id, payload)
                elif kind == CONTINUATION:
                    self._continuation(flags, stream_id, payload)
                elif kind == PRIORITY:
                    self._priority(stream_id, payload)
                elif kind == GOAWAY:
                    self._goaway(stream_id, payload)
                elif kind == PUSH_PROMISE:
                    self._fail(ErrorCodes.PROTOCOL_ERROR, "PUSH_PROMISE from a client")
                # Frames of unknown types are ignored (RFC 9113 4.1).
                if self.closed:
                    return
        finally:
            self._buf = buf[pos:] if pos < size else b""

    def _fail(self, code: int, message: str):
        """A connection error: queue GOAWAY, stop reading, raise."""
        self.close_connection(code, additional_data=message.encode("ascii"))
        raise H2ConnectionError(code, message)

    def connection_error(self, code: int, message: str):
        """
        End the connection for an error the handler found (a body longer
        than its C{content-length}): GOAWAY and L{H2ConnectionError}.
        """
        self._fail(code, message)

    def _stream_error(self, stream_id: int, code: int) -> None:
        """RST_STREAM for a stream error; the handler hears of an open stream."""
        self._out.append(frame(RST_STREAM, 0, stream_id, _U32.pack(code)))
        self._forget(stream_id)
        if self.streams.pop(stream_id, None) is not None:
            self.handler.h2_stream_error(stream_id, code)

    def _forget(self, stream_id: int) -> None:
        """Balance reset this stream: drop what the client still sends on it."""
        reset = self._reset
        reset.add(stream_id)
        if len(reset) > _RESET_MEMORY:
            self._reset_old = reset
            self._reset = set()

    def _was_reset(self, stream_id: int) -> bool:
        return stream_id in self._reset or stream_id in self._reset_old

    def _headers(self, flags: int, stream_id: int, payload: bytes) -> None:
        if not stream_id & 1:
            self._fail(ErrorCodes.PROTOCOL_ERROR, "HEADERS on stream %d" % (stream_id,))
        start = 0
        end = len(payload)
        if flags & (PADDED | PRIORITY_FLAG):
            if flags & PADDED:
                if not end:
                    self._fail(ErrorCodes.FRAME_SIZE_ERROR, "HEADERS too short for its padding")
                start = 1
                end -= payload[0]
            if flags & PRIORITY_FLAG:
                start += 5
            if end < start:
                self._fail(ErrorCodes.PROTOCOL_ERROR, "HEADERS padding beyond the frame")
            if flags & PRIORITY_FLAG and (
                _U32.unpack_from(payload, start - 5)[0] & _MAX_WINDOW == stream_id
            ):
                # Decoded all the same (the table must follow), then refused.
                flags |= PRIORITY_FLAG << 8
            payload = payload[start:end]
        if flags & END_HEADERS:
            self._header_block(flags, stream_id, payload)
        else:
            self._block = [payload]
            self._block_id = stream_id
            self._block_flags = flags

    def _continuation(self, flags: int, stream_id: int, payload: bytes) -> None:
        block = self._block
        if block is None or stream_id != self._block_id:
            self._fail(ErrorCodes.PROTOCOL_ERROR, "CONTINUATION without its HEADERS")
        block.append(payload)
        if flags & END_HEADERS:
            self._block = None
            self._header_block(self._block_flags, stream_id, b"".join(block))

    def _header_block(self, flags: int, stream_id: int, block: bytes) -> None:
        try:
            fields = self.decoder.decode(block)
        except HeaderListTooLarge:
            self._fail(ErrorCodes.ENHANCE_YOUR_CALM, "header list too large (HPACK bomb)")
        except HPACKError as e:
            self._fail(ErrorCodes.COMPRESSION_ERROR, str(e))
        ended = flags & END_STREAM
        stream = self.streams.get(stream_id)
        if stream is None:
            if stream_id <= self.highest_stream_id:
                if self._was_reset(stream_id):
                    return
                # A new stream must have a higher id (RFC 9113 5.1.1).
                self._fail(ErrorCodes.PROTOCOL_ERROR, "HEADERS on closed stream %d" % (stream_id,))
            self.highest_stream_id = stream_id
            if flags & (PRIORITY_FLAG << 8):
                self._stream_error(stream_id, ErrorCodes.PROTOCOL_ERROR)
                return
            self.streams[stream_id] = _Stream(self._initial_send_window, not ended)
            self.handler.h2_request(stream_id, fields, bool(ended))
            return
        if not stream.remote_open:
            self._stream_error(stream_id, ErrorCodes.STREAM_CLOSED)
            return
        if not ended:
            # A second HEADERS that does not end the stream: malformed.
            self._stream_error(stream_id, ErrorCodes.PROTOCOL_ERROR)
            return
        stream.remote_open = False
        handler = self.handler
        handler.h2_trailers(stream_id, fields)
        handler.h2_end(stream_id)
        self._maybe_close(stream_id, stream)

    def _data(self, flags: int, stream_id: int, payload: bytes) -> None:
        if not stream_id:
            self._fail(ErrorCodes.PROTOCOL_ERROR, "DATA on stream 0")
        size = len(payload)
        self._recv_window -= size
        if self._recv_window < 0:
            self._fail(ErrorCodes.FLOW_CONTROL_ERROR, "DATA beyond the connection window")
        data = payload
        if flags & PADDED:
            if not size or payload[0] >= size:
                self._fail(ErrorCodes.PROTOCOL_ERROR, "DATA padding beyond the frame")
            data = payload[1 : size - payload[0]]
        stream = self.streams.get(stream_id)
        if stream is None or not stream.remote_open:
            if stream_id > self.highest_stream_id:
                self._fail(ErrorCodes.PROTOCOL_ERROR, "DATA on idle stream %d" % (stream_id,))
            # Still counted by the connection's window: give it back.
            self._ack_connection(size)
            if stream is not None or not self._was_reset(stream_id):
                self._stream_error(stream_id, ErrorCodes.STREAM_CLOSED)
            return
        stream.recv_window -= size
        if stream.recv_window < 0:
            self._ack_connection(size)
            self._stream_error(stream_id, ErrorCodes.FLOW_CONTROL_ERROR)
            return
        ended = flags & END_STREAM
        if ended:
            stream.remote_open = False
        handler = self.handler
        handler.h2_data(stream_id, data, size)
        if ended:
            handler.h2_end(stream_id)
            self._maybe_close(stream_id, stream)

    def _window_update(self, stream_id: int, payload: bytes) -> None:
        if len(payload) != 4:
            self._fail(ErrorCodes.FRAME_SIZE_ERROR, "WINDOW_UPDATE not 4 bytes")
        increment = _U32.unpack(payload)[0] & _MAX_WINDOW
        if not stream_id:
            if not increment:
                self._fail(ErrorCodes.PROTOCOL_ERROR, "WINDOW_UPDATE of 0")
            self._send_window += increment
            if self._send_window > _MAX_WINDOW:
                self._fail(ErrorCodes.FLOW_CONTROL_ERROR, "connection window above 2^31-1")
            return
        stream = self.streams.get(stream_id)
        if stream is None:
            if stream_id > self.highest_stream_id:
                self._fail(ErrorCodes.PROTOCOL_ERROR, "WINDOW_UPDATE on idle stream")
            return
        if not increment:
            self._stream_error(stream_id, ErrorCodes.PROTOCOL_ERROR)
            return
        stream.send_window += increment
        if stream.send_window > _MAX_WINDOW:
            self._stream_error(stream_id, ErrorCodes.FLOW_CONTROL_ERROR)

    def _settings(self, flags: int, stream_id: int, payload: bytes) -> None:
        if stream_id:
            self._fail(ErrorCodes.PROTOCOL_ERROR, "SETTINGS on a stream")
        size = len(payload)
        if flags & ACK:
            if size:
                self._fail(ErrorCodes.FRAME_SIZE_ERROR, "SETTINGS ACK with a payload")
            return
        if size % 6:
            self._fail(ErrorCodes.FRAME_SIZE_ERROR, "SETTINGS not a multiple of 6 bytes")
        self._settings_seen = True
        for pos in range(0, size, 6):
            key, value = _SETTING.unpack_from(payload, pos)
            if key == INITIAL_WINDOW_SIZE:
                if value > _MAX_WINDOW:
                    self._fail(ErrorCodes.FLOW_CONTROL_ERROR, "initial window above 2^31-1")
                delta = value - self._initial_send_window
                self._initial_send_window = value
                for stream in self.streams.values():
                    stream.send_window += delta
                    if stream.send_window > _MAX_WINDOW:
                        self._fail(ErrorCodes.FLOW_CONTROL_ERROR, "stream window above 2^31-1")
            elif key == MAX_FRAME_SIZE:
                if not 16384 <= value <= 16777215:
                    self._fail(ErrorCodes.PROTOCOL_ERROR, "invalid SETTINGS_MAX_FRAME_SIZE")
                self.max_outbound_frame_size = value
            elif key == ENABLE_PUSH or key == ENABLE_CONNECT_PROTOCOL:
                if value > 1:
                    self._fail(ErrorCodes.PROTOCOL_ERROR, "invalid SETTINGS value")
            # HEADER_TABLE_SIZE: the encoder keeps no table whatever the
            # size; the rest are advisory for a server, or unknown.
        self._out.append(frame(SETTINGS, ACK, 0))

    def _rst_stream(self, stream_id: int, payload: bytes) -> None:
        if len(payload) != 4:
            self._fail(ErrorCodes.FRAME_SIZE_ERROR, "RST_STREAM not 4 bytes")
        if not stream_id or stream_id > self.highest_stream_id:
            self._fail(ErrorCodes.PROTOCOL_ERROR, "RST_STREAM on idle stream %d" % (stream_id,))
        if self.streams.pop(stream_id, None) is not None:
            self.handler.h2_reset(stream_id, _U32.unpack(payload)[0])

    def _ping(self, flags: int, stream_id: int, payload: bytes) -> None:
        if stream_id:
            self._fail(ErrorCodes.PROTOCOL_ERROR, "PING on a stream")
        if len(payload) != 8:
            self._fail(ErrorCodes.FRAME_SIZE_ERROR, "PING not 8 bytes")
        if flags & ACK:
            self.handler.h2_ping_ack(payload)
        else:
            self._out.append(frame(PING, ACK, 0, payload))

    def _priority(self, stream_id: int, payload: bytes) -> None:
        # Priorities are not followed (RFC 9113 5.3.2 lets a server ignore them).
        if not stream_id:
            self._fail(ErrorCodes.PROTOCOL_ERROR, "PRIORITY on stream 0")
        if len(payload) != 5:
            self._stream_error(stream_id, ErrorCodes.FRAME_SIZE_ERROR)
        elif _U32.unpack_from(payload)[0] & _MAX_WINDOW == stream_id:
            self._stream_error(stream_id, ErrorCodes.PROTOCOL_ERROR)

    def _goaway(self, stream_id: int, payload: bytes) -> None:
        if stream_id:
            self._fail(ErrorCodes.PROTOCOL_ERROR, "GOAWAY on a stream")
        if len(payload) < 8:
            self._fail(ErrorCodes.FRAME_SIZE_ERROR, "GOAWAY shorter than 8 bytes")
        last, code = _GOAWAY.unpack_from(payload)
        self.handler.h2_goaway(code, last & _MAX_WINDOW)

    def _maybe_close(self, stream_id: int, stream: _Stream) -> None:
        if not stream.local_open and self.streams.get(stream_id) is stream:
            del self.streams[stream_id]

    # -- flow control of what the client sends --------------------------------------

    def acknowledge_received_data(self, size: int, stream_id: int) -> None:
        """
        C{size} bytes of the client's DATA on C{stream_id} were consumed:
        give them back to its windows (in batches, see L{_increment}).
        """
        if self.closed or not size:
            return
        self._ack_connection(size)
        stream = self.streams.get(stream_id)
        if stream is not None and stream.remote_open:
            unacked = stream.recv_unacked + size
            increment = _increment(stream.recv_window, STREAM_WINDOW, unacked)
            if increment:
                stream.recv_window += increment
                unacked = 0
                self._out.append(frame(WINDOW_UPDATE, 0, stream_id, _U32.pack(increment)))
            stream.recv_unacked = unacked

    def _ack_connection(self, size: int) -> None:
        unacked = self._recv_unacked + size
        increment = _increment(self._recv_window, self._recv_max, unacked)
        if increment:
            self._recv_window += increment
            unacked = 0
            self._out.append(frame(WINDOW_UPDATE, 0, 0, _U32.pack(increment)))
        self._recv_unacked = unacked

    # -- output --------------------------------------------------------------------

    def _open_stream(self, stream_id: int) -> _Stream:
        stream = self.streams.get(stream_id)
        if stream is None or not stream.local_open:
            raise StreamClosedError(stream_id)
        return stream

    def local_flow_control_window(self, stream_id: int) -> int:
        """The bytes of DATA that may be sent on C{stream_id} now."""
        window = self._open_stream(stream_id).send_window
        return window if window < self._send_window else self._send_window

    def send_headers(self, stream_id: int, fields, end_stream: bool = False) -> None:
        """
        Send a header list (a response head, or trailers with
        C{end_stream}).

        :raise StreamClosedError: the stream is closed.
        """
        stream = self._open_stream(stream_id)
        block = self.encoder.encode(fields)
        flags = END_STREAM if end_stream else 0
        size = len(block)
        limit = self.max_outbound_frame_size
        out = self._out
        if size <= limit:
            out.append(_HEADER.pack(size >> 8, size & 255, HEADERS, flags | END_HEADERS, stream_id))
            out.append(block)
        else:
            kind = HEADERS
            for pos in range(0, size, limit):
                piece = block[pos : pos + limit]
                if pos + limit >= size:
                    flags |= END_HEADERS
                out.append(frame(kind, flags, stream_id, piece))
                kind = CONTINUATION
                flags = 0
        if end_stream:
            self._local_end(stream_id, stream)

    def send_data(self, stream_id: int, data: bytes, end_stream: bool = False) -> None:
        """
        Send DATA, within the windows and the frame size (the caller's to
        respect: see L{local_flow_control_window}).

        :raise StreamClosedError: the stream is closed.
        """
        stream = self._open_stream(stream_id)
        size = len(data)
        if size > stream.send_window or size > self._send_window:
            raise ValueError("DATA beyond the flow-control window")
        stream.send_window -= size
        self._send_window -= size
        out = self._out
        out.append(
            _HEADER.pack(size >> 8, size & 255, DATA, END_STREAM if end_stream else 0, stream_id)
        )
        if size:
            out.append(data)
        if end_stream:
            self._local_end(stream_id, stream)

    def end_stream(self, stream_id: int) -> None:
        """End Balance's side of the stream with an empty DATA frame."""
        self.send_data(stream_id, b"", end_stream=True)

    def _local_end(self, stream_id: int, stream: _Stream) -> None:
        stream.local_open = False
        if not stream.remote_open:
            del self.streams[stream_id]

    def reset_stream(self, stream_id: int, code: int) -> None:
        """Reset an open stream; nothing if it is closed already."""
        if self.streams.pop(stream_id, None) is not None:
            self._forget(stream_id)
            self._out.append(frame(RST_STREAM, 0, stream_id, _U32.pack(code)))

    def ping(self, data: bytes) -> None:
        """Send a PING with 8 bytes of C{data}."""
        self._out.append(frame(PING, 0, 0, data))

    def goaway(self, last_stream_id: int, code: int = 0, additional_data: bytes = b"") -> None:
        """Send GOAWAY, and go on serving the streams up to C{last_stream_id}."""
        self._out.append(frame(GOAWAY, 0, 0, _GOAWAY.pack(last_stream_id, code) + additional_data))

    def close_connection(
        self, error_code: int = 0, last_stream_id: int | None = None, additional_data: bytes = b""
    ) -> None:
        """Send the last GOAWAY: nothing more is read."""
        if self.closed:
            return
        self.closed = True
        if last_stream_id is None:
            last_stream_id = self.highest_stream_id
        self.goaway(last_stream_id, error_code, additional_data or b"")

    def stop(self) -> None:
        """Read nothing more (the connection is closing)."""
        self.closed = True

    def data_to_send(self) -> bytes:
        """The frames queued since the last call."""
        out = self._out
        if not out:
            return b""
        data = out[0] if len(out) == 1 else b"".join(out)
        out.clear()
        return data
