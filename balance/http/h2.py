# -*- test-case-name: tests.http.test_h2 -*-
"""
The downstream side of HTTP/2: a client connection speaking h2 (over TLS
after ALPN) or h2c (cleartext, prior knowledge), with Balance's own
sans-IO frame layer (L{balance.http.h2_conn}) inside a Twisted protocol.

Every stream becomes an L{balance.http.proxy.Exchange}, proxied exactly as
an HTTP/1.1 request is (routing, pools, retries, limits, access log): the
Exchange's downstream is the stream's L{balance.http.h2_stream.H2Stream},
which turns what the Exchange hands it (a response head, body chunks, an
end) into HEADERS and DATA frames of its stream.

Flow control is end-to-end back-pressure, per stream, both ways:

  - request bodies: DATA is acknowledged (WINDOW_UPDATE) only once the
    Exchange could pass it to its backend connection, not while it waits
    for one or while the backend does not read; the client's stream
    window (64 KiB) bounds what Balance holds for a stream, the
    connection window (that times the stream limit) what it holds for a
    connection;
  - response bodies: a stream sends what the client's windows allow and
    queues the rest; beyond C{HIGH_WATER} queued bytes it pauses reading
    from that stream's backend connection only, and resumes below
    C{LOW_WATER} (see L{balance.http.h2_stream}).  When the client does not read its socket at all, no
    DATA is sent and every stream's queue fills up to its mark.

Abuse limits (RFC 9113 10.5) are enforced by L{balance.http.h2_guard}
before the frame layer parses a frame; a client beyond them gets GOAWAY
ENHANCE_YOUR_CALM and is closed.  Streams beyond
C{SETTINGS_MAX_CONCURRENT_STREAMS} are refused one by one
(REFUSED_STREAM).  Header lists are checked by
L{balance.http.h2_headers}.

Draining (the listener's C{drain()}) is the graceful GOAWAY of RFC 9113
6.8: a first GOAWAY with the largest stream id and a PING; once the PING
comes back (or after a second), a GOAWAY with the last stream Balance
accepted; streams below it finish, then the connection closes.
"""

from __future__ import annotations

import socket

from twisted.internet.interfaces import IPushProducer
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from zope.interface import implementer

from balance import _io
from balance.http.h2_conn import (
    ENABLE_PUSH,
    MAX_HEADER_LIST_SIZE,
    STREAM_WINDOW,
    ErrorCodes,
    H2ConnectionError,
    ServerConnection,
    StreamClosedError,
)
from balance.http.h2_conn import (
    MAX_CONCURRENT_STREAMS as _MAX_CONCURRENT_STREAMS,
)
from balance.http.h2_guard import FrameGuard
from balance.http.h2_headers import (
    MAX_FIELDS,
    RequestError,
    read_request,
    route_reply,
    safe_trailers,
)
from balance.http.h2_stream import H2Stream
from balance.http.proxy import Exchange
from balance.proxyproto import client_address, host_bytes

__all__ = ["H2Options", "H2DownstreamConnection", "MAX_CONCURRENT_STREAMS"]

#: Streams a client may have open at once (advertised in SETTINGS).
MAX_CONCURRENT_STREAMS = 100

#: Bytes written while the client reads nothing (its socket buffer is
#: full) beyond which the connection is cut: control frames (SETTINGS and
#: PING acknowledgements, response heads) it keeps causing.
MAX_UNREAD_OUTPUT = 1024 * 1024

#: Seconds the first GOAWAY of a drain waits for its PING to come back.
DRAIN_PING_TIMEOUT = 1.0

#: Seconds a closing connection may take to deliver its last frames.
CLOSE_LINGER = 5.0

_DRAIN_PING = b"balance!"
_LAST_STREAM_ID = 2**31 - 1
# Methods whose empty body still says "content-length: 0" to a backend.
_BODY_METHODS = frozenset({b"POST", b"PUT", b"PATCH"})


class H2Options:
    """
    What the HTTP/2 connections of one listener share, built once: the
    SETTINGS, limits, and the HEADERS form of the listener's local route
    replies.

    :param ctx: the listener's L{balance.http.server.HTTPContext}.
    """

    def __init__(self, ctx, max_concurrent_streams: int = MAX_CONCURRENT_STREAMS):
        self.max_streams = max_concurrent_streams
        self.max_header_bytes = ctx.max_header_bytes
        # Decoded header lists up to this size are answered 431 when above
        # max_header_bytes; beyond it decoding stops (an HPACK bomb) and
        # the connection ends.  HPACK counts 32 bytes more per field than
        # HTTP/1.1 does.
        self.hpack_limit = 2 * ctx.max_header_bytes + 32 * MAX_FIELDS
        self.settings = {
            _MAX_CONCURRENT_STREAMS: max_concurrent_streams,
            MAX_HEADER_LIST_SIZE: ctx.max_header_bytes,
            ENABLE_PUSH: 0,
        }
        # Enough connection window for every stream's window, so that one
        # stalled stream never holds up the others.
        self.connection_window = max_concurrent_streams * STREAM_WINDOW
        self._replies: dict = {}

    def route_reply(self, route, head_only: bool) -> tuple[list, bytes]:
        """The fields and body of a local route's response, cached per route."""
        reply = self._replies.get(route)
        if reply is None:
            reply = self._replies[route] = route_reply(route.local_reply())
        return (reply[0], b"") if head_only else reply


@implementer(IPushProducer)
class H2DownstreamConnection(Protocol):
    """
    One client connection speaking HTTP/2.

    It is the streaming producer of its transport: while the client does
    not read, no DATA is sent (see the module docstring).

    :ivar ctx: the listener's L{balance.http.server.HTTPContext}.
    :ivar options: the listener's L{H2Options}.
    :ivar h2: the L{ServerConnection} (for the streams).
    :ivar client_ip: the peer address as bytes.
    """

    log = Logger()

    def __init__(self, ctx, options: H2Options):
        self.ctx = ctx
        self.options = options
        self.client_ip = b""
        self.client_port = 0
        self.denied = False
        self.gone = False
        self.draining = False
        self.bytes_in = 0
        self.bytes_out = 0
        self.h2 = None
        self._guard = None
        self._streams: dict[int, H2Stream] = {}
        self._sending: dict[int, H2Stream] = {}
        self._starting: list[H2Stream] = []
        self._direct = False
        self._adopted = False
        self._write_paused = False
        self._unread_output = 0
        self._timer = None
        self._idle_deadline = 0.0
        self._drain_deadline = 0.0
        self._last_stream = 0
        # The last request head read: its field list, the limits it was
        # read under, and what read_request made of it.
        self._parsed = None
        # 0: serving; 1: first GOAWAY sent (draining); 2: last GOAWAY sent.
        self._goaway = 0
        self._peer_goaway = False
        self._closing = False
        self._close_pending = False
        self._linger = None
        self._flush_call = None
        #: Inside L{dataReceived}, which flushes when it is done.
        self.reading = False

    def take_over(self, other) -> None:
        """
        Take the place of C{other}, the HTTP/1.1 protocol that was made for
        this connection before its first bytes said HTTP/2 (see
        L{balance.http.sniff}): its registration with the listener and its
        ACL verdict, without counting the connection twice.  Call before
        C{makeConnection}.
        """
        self._adopted = True
        self.denied = other.denied
        other.hand_over()

    # -- Protocol ------------------------------------------------------------------

    def connectionMade(self):
        transport = self.transport
        peer = client_address(transport)
        self.client_ip = host_bytes(peer)
        self.client_port = getattr(peer, "port", 0)
        self._direct = _io.can_send_directly(transport)
        if self._direct:
            transport.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        options = self.options
        self.h2 = ServerConnection(
            self, options.settings, options.connection_window, options.hpack_limit
        )
        self._guard = FrameGuard(options.max_header_bytes)
        transport.registerProducer(self, True)
        ctx = self.ctx
        self._idle_deadline = ctx.reactor.seconds() + ctx.handshake_timeout
        self.arm(self._idle_deadline)
        if self._adopted:
            ctx.connections.add(self)
            if ctx.draining:
                self.drain()
        else:
            ctx.connection_made(self)
        self._flush_now()

    def dataReceived(self, data: bytes):
        if self._closing:
            return
        size = len(data)
        self.bytes_in += size
        ctx = self.ctx
        ctx.listener_metrics.bytes_in += size
        why = self._guard.feed(data, ctx.reactor.seconds())
        if why is not None:
            self._enhance_your_calm(why)
            return
        self.reading = True
        try:
            self.h2.receive(data)
            if self._closing:
                return
            if self._starting:
                self._start_exchanges()
        except H2ConnectionError as e:
            # GOAWAY is queued (PROTOCOL_ERROR and the like, or
            # ENHANCE_YOUR_CALM for an HPACK bomb).
            self._close_now("HTTP/2 protocol error: %s" % (e,))
            return
        finally:
            self.reading = False
        if self._guard.block_started is not None:
            self.arm(self._guard.block_started + ctx.handshake_timeout)
        self._flush_now()

    def connectionLost(self, reason):
        self.gone = True
        self._closing = True
        for timer in (self._timer, self._linger, self._flush_call):
            if timer is not None and timer.active():
                timer.cancel()
        self._timer = self._linger = self._flush_call = None
        streams = list(self._streams.values())
        self._streams.clear()
        self._sending.clear()
        self._starting = []
        for stream in streams:
            self._cancel(stream, "client closed the connection")
        self.ctx.connection_lost(self)

    # -- the frame layer's calls ---------------------------------------------------

    def h2_request(self, sid: int, fields: list, ended: bool) -> None:
        """A new stream: its request head (see L{balance.http.h2_conn})."""
        if self._goaway == 2 and sid > self._last_stream:
            # After the last GOAWAY: not processed, safe to retry elsewhere.
            self._reset(sid, ErrorCodes.REFUSED_STREAM)
            return
        if len(self._streams) >= self.options.max_streams:
            self._reset(sid, ErrorCodes.REFUSED_STREAM)
            if not self._guard.stream_refused(self.ctx.reactor.seconds()):
                self._enhance_your_calm("streams refused faster than the reset budget")
            return
        self._last_stream = sid
        stream = self._streams[sid] = H2Stream(self, sid)
        ex = stream.exchange = Exchange(stream)
        ctx = self.ctx
        ex.started = ctx.reactor.seconds()
        if ended:
            stream.request_ended = ex.request_done = True
        parsed = self._parsed
        if (
            parsed is not None
            and parsed[0] is fields
            and parsed[1] == ctx.max_header_bytes
            and parsed[2] == ctx.max_body_bytes
        ):
            # The same header block as the last request, decoded to the
            # same list (see balance.http.hpack): checked already.
            (
                ex.method,
                ex.target,
                ex.path,
                ex.host,
                ex.content_length,
                ex.te_trailers,
                ex.expect_continue,
                ex.grpc_timeout,
            ) = parsed[3]
            ex.headers = list(parsed[4])
            stream.has_length = parsed[5]
        else:
            try:
                stream.has_length = read_request(
                    ex, fields, ctx.max_header_bytes, ctx.max_body_bytes
                )
            except RequestError as e:
                stream.started = True
                ex.fail(e.status, e.reason)
                return
            self._parsed = (
                fields,
                ctx.max_header_bytes,
                ctx.max_body_bytes,
                (
                    ex.method,
                    ex.target,
                    ex.path,
                    ex.host,
                    ex.content_length,
                    ex.te_trailers,
                    ex.expect_continue,
                    ex.grpc_timeout,
                ),
                list(ex.headers),
                stream.has_length,
            )
        if stream.has_length:
            stream.body_left = ex.content_length
        if stream.request_ended and ex.content_length:
            # DATA is checked against content-length, not a lone HEADERS:
            # a backend would wait for this body, then take the next
            # request for it.
            stream.started = True
            ex.fail(400, "content-length without a body")
            return
        self._starting.append(stream)

    def _start_exchanges(self) -> None:
        """
        Start the Exchanges of the requests of this read, once all of it is
        processed: a body that came whole with its head goes upstream with a
        C{content-length}, not chunked.
        """
        starting, self._starting = self._starting, []
        for stream in starting:
            if stream.gone:
                continue
            stream.started = True
            ex = stream.exchange
            if ex.response_done:
                continue
            if not stream.has_length:
                if not ex.request_done:
                    ex.chunked_in = True
                    ex.te_value = b"chunked"
                elif ex.body_received or ex.method in _BODY_METHODS:
                    ex.content_length = ex.body_received
                    ex.headers.append((b"content-length", b"%d" % ex.body_received))
            ex.start()
            stream.release_acks()

    def h2_data(self, sid: int, data: bytes, size: int) -> None:
        """Request body on a stream (C{size} counts its padding too)."""
        stream = self._streams.get(sid)
        if stream is None:
            self.acknowledge(sid, size)
            return
        if stream.body_left >= 0:
            stream.body_left -= len(data)
            if stream.body_left < 0:
                # The extra bytes would be a backend's next request.
                self.h2.connection_error(ErrorCodes.PROTOCOL_ERROR, "DATA beyond content-length")
        ex = stream.exchange
        if ex.response_done:
            # Answered already (an error, a local reply): the rest of the
            # body is read and dropped.
            self.acknowledge(sid, size)
            return
        if not stream.has_length and ex.body_received + len(data) > self.ctx.max_body_bytes:
            self.acknowledge(sid, size)
            if ex.response_started:
                self.reset_stream(stream, ErrorCodes.CANCEL)
            else:
                ex.fail(413, "request body above max_body_bytes")
            return
        ex.request_body(data)
        stream.received(size)

    def h2_end(self, sid: int) -> None:
        """The client ended its side of a stream."""
        stream = self._streams.get(sid)
        if stream is None or stream.request_ended:
            return
        if stream.body_left > 0:
            self.h2.connection_error(ErrorCodes.PROTOCOL_ERROR, "DATA short of content-length")
        stream.request_ended = True
        ex = stream.exchange
        if not stream.started:
            ex.request_done = True
        else:
            ex.request_complete()
        if stream.response_sent:
            self._stream_closed(stream)

    def h2_trailers(self, sid: int, fields: list) -> None:
        """
        Request trailers (END_STREAM comes with them, C{h2_end} follows):
        they go upstream with the end of the body, if the backend's
        protocol has room.
        """
        stream = self._streams.get(sid)
        if stream is None:
            return
        ex = stream.exchange
        if stream.body_left > 0 and not ex.response_done:
            # Ended short of its content-length: malformed (RFC 9113
            # 8.1.1), and never completed upstream.
            ex.status = 400
            ex.reason = "body shorter than its content-length"
            self.reset_stream(stream, ErrorCodes.PROTOCOL_ERROR)
            return
        stream.body_left = -1
        ex.trailers_in = safe_trailers(fields) or None

    def h2_reset(self, sid: int, code: int) -> None:
        """The client reset a stream."""
        self._end_stream(sid, "client reset the stream")

    def h2_stream_error(self, sid: int, code: int) -> None:
        """The frame layer reset a stream for a stream error."""
        self._end_stream(sid, "stream error: " + ErrorCodes(code).name)

    def _end_stream(self, sid: int, reason: str) -> None:
        stream = self._streams.pop(sid, None)
        if stream is not None:
            self._sending.pop(stream.id, None)
            self._cancel(stream, reason)
            self._after_stream()

    def h2_ping_ack(self, data: bytes) -> None:
        """A PING of Balance's came back."""
        if self._goaway == 1 and data == _DRAIN_PING:
            self._last_goaway()

    def h2_goaway(self, code: int, last_stream_id: int) -> None:
        """
        The client sent GOAWAY: the streams still running end here (the
        frame layer could answer them, but clients send GOAWAY when they
        are done anyway: curl, nghttp2, browsers).
        """
        self._peer_goaway = True
        if self._streams:
            self._close_now("client sent GOAWAY")
        else:
            self._close_gracefully()

    # -- streams -------------------------------------------------------------------

    def want_to_send(self, stream: H2Stream) -> None:
        """C{stream} has output queued; it goes at the next L{flush}."""
        self._sending[stream.id] = stream

    def acknowledge(self, stream_id: int, size: int) -> None:
        """Give C{size} bytes of window back to the client."""
        if size and not self._closing:
            self.h2.acknowledge_received_data(size, stream_id)

    def reset_stream(self, stream: H2Stream, code: int) -> None:
        """Reset C{stream} (its response cannot be completed), and end it."""
        if self._streams.pop(stream.id, None) is None:
            return
        self._sending.pop(stream.id, None)
        if not self._closing:
            self._reset(stream.id, code)
        self._cancel(stream, "stream reset: " + ErrorCodes(code).name)
        self._after_stream()

    def _reset(self, stream_id: int, code: int) -> None:
        # Nothing when already closed on both sides.
        self.h2.reset_stream(stream_id, code)

    def _cancel(self, stream: H2Stream, reason: str) -> None:
        """The stream ends before its Exchange did: drop the backend side."""
        stream.gone = True
        unacked = stream.take_unacked()
        if unacked and not self._closing:
            # The connection window still counts these bytes.
            self.h2.acknowledge_received_data(unacked, stream.id)
        ex = stream.exchange
        if ex is None:
            return
        if not ex.response_done:
            ex.reason = ex.reason or reason
            if not ex.status:
                ex.status = 499
        # Gives back what it holds (backend, breaker slots, retry budget).
        ex.abandon()
        if not stream.logged:
            stream.logged = True
            self.ctx.request_done(stream, ex)

    def _stream_closed(self, stream: H2Stream) -> None:
        """The response went out whole; the request may still be coming."""
        if self._streams.pop(stream.id, None) is None:
            return
        if not stream.request_ended:
            # Answered before the whole request: ask the client to stop
            # sending (RFC 9113 8.1), and drop what it already sent.
            self._reset(stream.id, ErrorCodes.NO_ERROR)
            unacked = stream.take_unacked()
            if unacked:
                self.h2.acknowledge_received_data(unacked, stream.id)
        stream.gone = True
        self._guard.request_completed(self.ctx.reactor.seconds())
        self._after_stream()

    def _after_stream(self) -> None:
        if self._streams:
            return
        if self._goaway == 2 or self._peer_goaway:
            # Closed by the next flush, after the last frames.
            self._close_pending = True
            return
        self._idle_deadline = self.ctx.reactor.seconds() + self.ctx.idle_timeout
        self.arm(self._idle_deadline)

    # -- output --------------------------------------------------------------------

    def flush(self) -> None:
        """
        Frame what the streams queued, and send it, once the reactor is
        done with the events at hand: the responses that many backend
        connections bring in one turn leave in one write.
        """
        if self._flush_call is None and not self.reading and not self.gone:
            self._flush_call = self.ctx.reactor.callLater(0, self._flush_later)

    def _flush_later(self) -> None:
        self._flush_call = None
        self._flush_now()

    def _flush_now(self) -> None:
        """Frame what the streams queued, and send it now."""
        if self.gone:
            return
        if self._sending:
            self._pump()
        data = self.h2.data_to_send()
        if data:
            self._send(data)
        if self._close_pending and not self._closing:
            self._closing = True
            self._lose_connection()

    def _send(self, data: bytes) -> None:
        size = len(data)
        self.bytes_out += size
        self.ctx.listener_metrics.bytes_out += size
        if self._write_paused:
            self._unread_output += size
            if self._unread_output > MAX_UNREAD_OUTPUT:
                self._log_away("the client reads nothing and keeps sending frames")
                self.transport.abortConnection()
                return
        if self._direct:
            _io.send(self.transport, data)
        else:
            self.transport.write(data)

    def _pump(self) -> None:
        conn = self.h2
        data_allowed = not self._write_paused
        sending = self._sending
        try:
            for stream in list(sending.values()):
                if stream.gone:
                    sending.pop(stream.id, None)
                elif stream.send_some(conn, data_allowed):
                    sending.pop(stream.id, None)
                    if stream.response_sent:
                        self._stream_closed(stream)
        except (StreamClosedError, ValueError) as e:
            # A state the frame layer refuses to send in: never expected,
            # but it must not escape into the backend connection that
            # flushed.
            self.log.failure("HTTP/2 output refused")
            self._close_now("HTTP/2 output refused: %s" % (e,))

    # -- IPushProducer: the client's socket ---------------------------------------

    def pauseProducing(self) -> None:
        """The client is not reading: send no more DATA."""
        self._write_paused = True

    def resumeProducing(self) -> None:
        """The client reads again."""
        self._write_paused = False
        self._unread_output = 0
        self._flush_now()

    def stopProducing(self) -> None:
        """The connection is closing; C{connectionLost} cleans up."""

    # -- closing -------------------------------------------------------------------

    def drain(self) -> None:
        """
        Stop taking new streams gracefully (RFC 9113 6.8): GOAWAY with the
        largest id and a PING now, the real last stream id once the PING
        returns; the streams below it finish, then the connection closes.
        """
        if self.draining or self._closing:
            return
        self.draining = True
        if not self._streams and not self._starting:
            self.h2.close_connection(ErrorCodes.NO_ERROR, last_stream_id=self._last_stream)
            self._close_gracefully()
            return
        self._goaway = 1
        self.h2.goaway(_LAST_STREAM_ID)
        self.h2.ping(_DRAIN_PING)
        self._drain_deadline = self.ctx.reactor.seconds() + DRAIN_PING_TIMEOUT
        self.arm(self._drain_deadline)
        self._flush_now()

    def _last_goaway(self) -> None:
        self._goaway = 2
        self.h2.goaway(self._last_stream)
        self._after_stream()

    def _close_gracefully(self) -> None:
        self._close_pending = True
        self._flush_now()

    def _lose_connection(self) -> None:
        self.transport.loseConnection()
        # A client that reads nothing would keep the socket open for ever.
        self._linger = self.ctx.reactor.callLater(CLOSE_LINGER, self._linger_over)

    def _linger_over(self) -> None:
        self._linger = None
        if not self.gone:
            self.transport.abortConnection()

    def _enhance_your_calm(self, why: str) -> None:
        self._log_away(why)
        if not self._closing:
            self.h2.close_connection(
                ErrorCodes.ENHANCE_YOUR_CALM, additional_data=why.encode("ascii")
            )
        self._close_now(why)

    def _close_now(self, why: str) -> None:
        """End the connection after an error: every stream is cancelled."""
        streams = list(self._streams.values())
        self._streams.clear()
        self._sending.clear()
        self._starting = []
        self._closing = True
        self.h2.stop()
        for stream in streams:
            self._cancel(stream, why)
        data = self.h2.data_to_send()
        if data:
            self._send(data)
        self._lose_connection()

    def _log_away(self, why: str) -> None:
        # Once per connection sent away, never per request.
        self.log.warn(
            "HTTP/2 client {client}:{port} on listener {listener} sent away: {why}",
            client=self.client_ip.decode("ascii"),
            port=self.client_port,
            listener=self.ctx.name,
            why=why,
        )

    # -- one timer per connection ------------------------------------------------

    def arm(self, deadline: float) -> None:
        """Make sure the timer fires by C{deadline} (see h1's C{arm})."""
        timer = self._timer
        if timer is None:
            self._timer = self.ctx.reactor.callLater(
                max(deadline - self.ctx.reactor.seconds(), 0), self._on_timer
            )
        elif timer.getTime() > deadline:
            timer.reset(max(deadline - self.ctx.reactor.seconds(), 0))

    def _on_timer(self) -> None:
        self._timer = None
        if self.gone or self._closing:
            return
        now = self.ctx.reactor.seconds()
        nearest = float("inf")
        for stream in list(self._streams.values()):
            ex = stream.exchange
            if ex is None or ex.response_done or not ex.deadline:
                continue
            if ex.deadline <= now:
                ex.timed_out()
            elif ex.deadline < nearest:
                nearest = ex.deadline
        started = self._guard.block_started
        if started is not None:
            if started + self.ctx.handshake_timeout <= now:
                self._enhance_your_calm("header block not finished within the handshake timeout")
                return
            nearest = min(nearest, started + self.ctx.handshake_timeout)
        if self._goaway == 1:
            if self._drain_deadline <= now:
                self._last_goaway()
            else:
                nearest = min(nearest, self._drain_deadline)
        if not self._closing and not self._streams and not self._starting:
            if self._idle_deadline <= now:
                self.h2.close_connection(ErrorCodes.NO_ERROR, last_stream_id=self._last_stream)
                self._close_gracefully()
                return
            nearest = min(nearest, self._idle_deadline)
        if not self._closing and nearest != float("inf"):
            self._timer = self.ctx.reactor.callLater(nearest - now, self._on_timer)
        self._flush_now()
