# -*- test-case-name: tests.http.test_websocket -*-
"""
WebSocket (RFC 6455) over HTTP/1.1: what Balance checks of the opening
handshake, and the optional frame-aware mode of a tunnel.

A request asking C{Upgrade: websocket} is a handshake: it must be a valid
one (L{handshake_error}) on a route with C{websocket: true}, or it is
answered 400 and never forwarded.  The backend's C{101} must carry the
C{Sec-WebSocket-Accept} computed from the client's key (L{accept_value}),
which proves the backend understood the handshake; then the connection is a
byte tunnel (L{balance.l4.tunnel.Tunnel}).

With C{websocket_max_message_bytes}, a L{FrameGuard} follows the frames of
both directions without buffering them: a frame's header states its payload
length, so a message growing beyond the limit is caught at the header of the
frame that would make it too big, before a byte of that frame is forwarded,
and both sides get a close frame with code 1009 at a frame boundary.  The
payload itself is never unmasked or copied; only headers (2 to 14 bytes) are
read.  (autobahn's parser is a protocol that buffers and unmasks whole
frames, which a pass-through proxy has no use for.)
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import os
import struct

_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"

#: Close code: a message too big to process (RFC 6455 7.4.1).
CLOSE_TOO_BIG = 1009


def is_websocket(upgrade: bytes) -> bool:
    """Whether an C{Upgrade} header value offers C{websocket} (any case)."""
    return any(token.strip().lower() == b"websocket" for token in upgrade.split(b","))


def accept_value(key: bytes) -> bytes:
    """The C{Sec-WebSocket-Accept} a server answers to C{Sec-WebSocket-Key: key}."""
    return base64.b64encode(hashlib.sha1(key + _GUID).digest())


def _single(headers, name: bytes) -> bytes | None:
    """The value of header C{name} when it appears exactly once, else L{None}."""
    found = None
    for n, v in headers:
        if len(n) == len(name) and n.lower() == name:
            if found is not None:
                return None
            found = v
    return found


def handshake_error(ex) -> str | None:
    """
    What is wrong with the WebSocket opening handshake of C{ex}'s request
    (RFC 6455 4.2.1), or L{None} when it is valid.  Sets C{ex.ws_key}.

    :param ex: the L{balance.http.proxy.Exchange}, its head parsed.
    """
    if ex.method != b"GET":
        return "WebSocket handshake with method %s" % (ex.method.decode("ascii", "replace"),)
    if not ex.http11:
        return "WebSocket handshake over HTTP/1.0"
    if not ex.connection_tokens or b"upgrade" not in ex.connection_tokens:
        return "WebSocket handshake without Connection: upgrade"
    if ex.content_length or ex.chunked_in:
        return "WebSocket handshake with a body"
    headers = ex.headers
    version = _single(headers, b"sec-websocket-version")
    if version is None or version.strip() != b"13":
        return "WebSocket handshake without Sec-WebSocket-Version: 13"
    key = _single(headers, b"sec-websocket-key")
    if key is None:
        return "WebSocket handshake without a Sec-WebSocket-Key"
    key = key.strip()
    try:
        raw = base64.b64decode(key, validate=True)
    except (binascii.Error, ValueError):
        raw = b""
    if len(raw) != 16:
        return "Sec-WebSocket-Key is not 16 bytes in base64"
    ex.ws_key = key
    return None


def accept_matches(key: bytes, headers) -> bool:
    """Whether a backend's 101 C{headers} accept the client's C{key}."""
    value = _single(headers, b"sec-websocket-accept")
    return value is not None and value.strip() == accept_value(key)


# -- frame-aware mode --------------------------------------------------------------


def close_frame(code: int, masked: bool) -> bytes:
    """
    A close frame with status C{code} and no reason; C{masked} (with a
    random key) for frames sent to a server, as RFC 6455 5.3 requires.
    """
    payload = struct.pack("!H", code)
    if not masked:
        return b"\x88\x02" + payload
    mask = os.urandom(4)
    return b"\x88\x82" + mask + bytes(b ^ mask[i] for i, b in enumerate(payload))


class _Direction:
    """
    The frame boundaries of one direction of a WebSocket connection.

    :ivar left: payload bytes of the current frame not seen yet.
    :ivar pending: the start of a frame header split across reads, held
        back until it is whole (at most 13 bytes).
    :ivar message: the payload size of the data message in progress.
    :ivar counter: a L{balance.observe.metrics.Counter} of complete data
        messages, or L{None}.
    """

    __slots__ = ("left", "pending", "message", "counter")

    def __init__(self, counter):
        self.left = 0
        self.pending = b""
        self.message = 0
        self.counter = counter

    @property
    def at_boundary(self) -> bool:
        """Whether everything forwarded so far ends with a whole frame."""
        return not self.left and not self.pending

    def feed(self, data: bytes, limit: int) -> tuple[bytes, bool]:
        """
        Follow C{data} through the frames.

        :return: the bytes that may be forwarded now, and whether a message
            went over C{limit} (the bytes returned then end at the header of
            the frame that would have taken it over).
        """
        buf = self.pending + data if self.pending else data
        end = len(buf)
        i = 0
        while True:
            left = self.left
            if left:
                if end - i <= left:
                    self.left = left - (end - i)
                    self.pending = b""
                    return buf, False
                i += left
                self.left = 0
            if end - i < 2:
                break
            first = buf[i]
            second = buf[i + 1]
            size = second & 0x7F
            head = 6 if second & 0x80 else 2
            if size == 126:
                head += 2
            elif size == 127:
                head += 8
            if end - i < head:
                break
            if size == 126:
                size = int.from_bytes(buf[i + 2 : i + 4], "big")
            elif size == 127:
                size = int.from_bytes(buf[i + 2 : i + 10], "big")
            opcode = first & 0x0F
            if opcode < 8:
                # A data frame: text or binary starts a message, a
                # continuation adds to it.  Control frames are short and
                # may come between fragments.
                message = size if opcode else self.message + size
                if message > limit:
                    self.pending = b""
                    return buf[:i], True
                self.message = message
                if first & 0x80 and self.counter is not None:
                    self.counter.value += 1
            self.left = size
            i += head
        self.pending = buf[i:] if i < end else b""
        return (buf[:i] if self.pending else buf), False


class FrameGuard:
    """
    Frame-aware mode of a WebSocket tunnel: count the messages of both
    directions and close the connection with 1009 when one is larger than
    C{limit} bytes.

    The tunnel passes every read through L{from_client} or L{from_backend}
    and forwards what they return; once L{stopped}, it sends
    L{farewell}'s frames and closes both sides.

    :param limit: the route's C{websocket_max_message_bytes}.
    :param upstream: a counter of messages from the client, or L{None}.
    :param downstream: a counter of messages from the backend, or L{None}.
    :ivar stopped: a message went over the limit.
    :ivar reason: why, for the access log.
    """

    __slots__ = ("limit", "_client", "_backend", "stopped", "reason")

    def __init__(self, limit: int, upstream=None, downstream=None):
        self.limit = limit
        self._client = _Direction(upstream)
        self._backend = _Direction(downstream)
        self.stopped = False
        self.reason = ""

    def from_client(self, data: bytes) -> bytes:
        """The part of C{data} (from the client) that may go to the backend."""
        forward, over = self._client.feed(data, self.limit)
        if over:
            self.stopped = True
            self.reason = "client message above websocket_max_message_bytes"
        return forward

    def from_backend(self, data: bytes) -> bytes:
        """The part of C{data} (from the backend) that may go to the client."""
        forward, over = self._backend.feed(data, self.limit)
        if over:
            self.stopped = True
            self.reason = "backend message above websocket_max_message_bytes"
        return forward

    def farewell(self) -> tuple[bytes, bytes]:
        """
        The close frames to send the client and the backend once stopped:
        1009 to each side whose stream of frames is at a boundary (a close
        frame in the middle of a frame would be read as its payload), and
        nothing to the others.
        """
        to_client = close_frame(CLOSE_TOO_BIG, False) if self._backend.at_boundary else b""
        to_backend = close_frame(CLOSE_TOO_BIG, True) if self._client.at_boundary else b""
        return to_client, to_backend
