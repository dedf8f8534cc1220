# -*- test-case-name: tests.http.test_h2_upstream -*-
"""
HTTP/2 to backends (a cluster's C{upstream_protocol: h2}): multiplexed
client connections, with the sans-IO C{h2} library, shared by every
exchange of every downstream (HTTP/1.1 and HTTP/2 alike).

The pieces mirror the HTTP/1.1 upstream side, so that the
L{balance.http.proxy.Exchange} drives both the same way:

  - L{H2Pool} stands where L{balance.http.pool.BackendPool} stands:
    C{take()} gives a new stream on an open connection with room for one
    (the peer's C{SETTINGS_MAX_CONCURRENT_STREAMS}), C{connect()} opens a
    further connection when none has room (or joins one being opened);
  - L{H2UpstreamStream} stands where one
    L{balance.http.upstream.UpstreamConnection} stands: the Exchange
    writes its request to it and gets the response from it, and it is the
    producer (and the transport) the Exchange wires for backpressure;
  - L{H2UpstreamConnection} is the Twisted protocol of one connection: it
    frames what its streams queue, within the peer's flow-control windows,
    and hands each stream its events.

Flow control, per stream, both ways: request DATA goes within the
backend's windows, and beyond L{HIGH_WATER} queued bytes the downstream
stops being read (only that request's); response DATA is acknowledged
(WINDOW_UPDATE) as the downstream takes it, so a client that does not read
stops its own stream at the backend, not its neighbours (the connection
window is as large as all the stream windows together).

Failures: a reset stream fails its exchange alone (502, or a retry under
the route's policy); a lost connection fails every stream on it.  Streams
the backend did not process (C{REFUSED_STREAM}, above a GOAWAY's
C{last_stream_id}, or never sent) are sent again on another connection
when their body is still at hand, as HTTP/1.1 does for a reused
connection the backend had closed.
"""

from __future__ import annotations

import socket
from collections import deque

import h2.config
import h2.connection
import h2.events
import h2.exceptions
import h2.settings
from h2.errors import ErrorCodes
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IPushProducer
from twisted.internet.protocol import Factory, Protocol
from zope.interface import implementer

from balance import _io
from balance.http.h2_flow import HIGH_WATER, LOW_WATER, QueuedStream
from balance.http.h2_headers import response_head_fields, safe_trailers
from balance.http.upstream import describe_failure

__all__ = ["H2Pool", "H2UpstreamConnection", "H2UpstreamStream", "HIGH_WATER", "LOW_WATER"]

#: Streams Balance opens on a connection before the backend's SETTINGS
#: say how many it takes, and at most whatever they say.
DEFAULT_MAX_STREAMS = 100
MAX_STREAMS = 1000

# Stream objects (open or closed) beyond which h2 forgets the closed ones.
_PRUNE_STREAMS = 2 * DEFAULT_MAX_STREAMS

#: Request body bytes kept after they were sent, so that a stream the
#: backend refuses unprocessed can go again elsewhere (RFC 9113 8.7).
REPLAY_LIMIT = 64 * 1024

#: The flow-control window of each response stream (the protocol's
#: default, so no SETTINGS entry is needed), and of the connection: room
#: for every stream's, so one stalled stream never holds up the others.
STREAM_WINDOW = 65535
CONNECTION_WINDOW = DEFAULT_MAX_STREAMS * STREAM_WINDOW

_CONFIG = h2.config.H2Configuration(
    client_side=True,
    header_encoding=None,
    # Responses are checked by h2 (they go on to clients); requests were
    # checked on their way in, by the downstream parsers.
    validate_inbound_headers=True,
    validate_outbound_headers=False,
    normalize_outbound_headers=False,
)
# No server push.  (Not MAX_CONCURRENT_STREAMS 0 as well: h2 would count
# the response HEADERS of a stream Balance has reset and forgotten as a
# pushed stream beyond that limit, and fail the whole connection.)
_SETTINGS = {h2.settings.SettingCodes.ENABLE_PUSH: 0}


class _ClientConnection(h2.connection.H2Connection):
    """
    C{h2}'s connection, with two changes:

      - a GOAWAY does not close its state machine: C{h2} would then refuse
        every further frame, where RFC 9113 6.8 has the streams up to
        C{last_stream_id} complete.  No new stream is opened on a
        connection that received one;
      - no count of the open streams of its own each time a stream opens
        (a scan of every stream): L{H2UpstreamConnection} keeps within the
        backend's limit itself.  Closed streams are forgotten in batches.
    """

    MAX_CLOSED_STREAMS = 1024

    @property
    def open_outbound_streams(self) -> int:
        if len(self.streams) > _PRUNE_STREAMS:
            self._open_streams(1)
        return 0

    def _receive_goaway_frame(self, frame):
        event = h2.events.ConnectionTerminated()
        try:
            event.error_code = ErrorCodes(frame.error_code)
        except ValueError:
            event.error_code = frame.error_code
        event.last_stream_id = frame.last_stream_id
        event.additional_data = frame.additional_data or None
        return [], [event]


@implementer(IPushProducer)
class H2UpstreamStream(QueuedStream):
    """
    One request on an HTTP/2 backend connection, as its
    L{balance.http.proxy.Exchange} sees it: what an
    L{balance.http.upstream.UpstreamConnection} is for HTTP/1.1.

    :ivar connection: its L{H2UpstreamConnection}.
    :ivar id: the stream id, 0 until HEADERS went out.
    :ivar exchange: the exchange it carries, or L{None} once let go of.
    :ivar unsent: set when the stream failed before the backend processed
        any of it: the request body chunks to send again (a list), or
        L{None} when part of the body went out already.
    :ivar client_full: the downstream paused this stream (its client does
        not read): response DATA is not acknowledged.
    """

    __slots__ = (
        "connection",
        "id",
        "exchange",
        "unsent",
        "reused",
        "client_full",
        "done",
        "_fields",
        "_out",
        "_out_bytes",
        "_end",
        "_trailers",
        "_sent",
        "_sent_bytes",
        "_end_sent",
        "_response_ended",
        "_producer",
        "_producer_paused",
        "_unacked",
    )

    def __init__(self, connection: H2UpstreamConnection):
        self.connection = connection
        self.id = 0
        self.exchange = None
        self.unsent = None
        # Never reused (see Exchange.upstream_failed): set once released.
        self.reused = False
        self.client_full = False
        self.done = False
        self._fields = None
        self._out = deque()
        self._out_bytes = 0
        self._end = False
        self._trailers = None
        # DATA sent, kept (up to REPLAY_LIMIT) to send again if refused.
        self._sent = []
        self._sent_bytes = 0
        self._end_sent = False
        self._response_ended = False
        self._producer = None
        self._producer_paused = False
        self._unacked = 0

    # -- what the Exchange calls (as on an UpstreamConnection) ----------------

    @property
    def breakers(self):
        """The connection's breaker slot holder."""
        return self.connection.breakers

    @breakers.setter
    def breakers(self, breakers) -> None:
        # Every exchange that waited for a new connection took a connection
        # slot; the connection keeps one, the others go back at once.
        conn = self.connection
        if conn.breakers is None and not conn.closed:
            conn.breakers = breakers
        else:
            breakers.release_connection()

    def attach(self, exchange, head_only: bool) -> None:
        """Start carrying C{exchange} (C{head_only} changes nothing in HTTP/2)."""
        self.exchange = exchange

    def send_head(self, ex) -> None:
        """Queue the request's HEADERS; they go with the next L{flush}."""
        self._fields = ex.downstream.ctx.request_fields(ex, self.connection.pool.scheme)
        self.connection.want_to_send(self)

    def write_body(self, ex, chunk: bytes) -> None:
        """Queue a piece of the request body."""
        if not chunk:
            return
        self._out.append(chunk)
        self._out_bytes += len(chunk)
        if self._out_bytes > HIGH_WATER:
            self._pause_producer()
        self.connection.want_to_send(self)

    def end_body(self, ex) -> None:
        """The request is complete: END_STREAM (on its trailers, if any)."""
        self._end = True
        if ex.trailers_in:
            self._trailers = ex.trailers_in
        self.connection.want_to_send(self)

    def flush(self) -> None:
        """Send what is queued."""
        self.connection.flush()

    def abort(self) -> None:
        """The exchange lets go (a timeout, an error, its client left): reset."""
        self.exchange = None
        self.connection.cancel(self)

    def close(self) -> None:
        """The exchange is done with this stream."""
        self.exchange = None
        if not self.done:
            # Answered before the whole request went: stop the rest.
            self.connection.cancel(self)

    # -- the backend as the request body's transport --------------------------

    def _sent_chunk(self, chunk: bytes) -> None:
        # Kept (up to REPLAY_LIMIT) to go again should the backend refuse
        # the stream.
        sent = self._sent
        if sent is not None:
            self._sent_bytes += len(chunk)
            if self._sent_bytes > REPLAY_LIMIT:
                self._sent = None
            else:
                sent.append(chunk)

    # -- IPushProducer: the response body, for the downstream -----------------

    def pauseProducing(self) -> None:
        """The client does not read: stop acknowledging this stream's DATA."""
        self.client_full = True

    def resumeProducing(self) -> None:
        """The client reads again: acknowledge what was held back."""
        self.client_full = False
        size = self._unacked
        if size:
            self._unacked = 0
            self.connection.acknowledge(self, size)
            self.connection.flush()

    def stopProducing(self) -> None:
        """The client is gone; its Exchange aborts this stream."""

    # -- driven by the connection ---------------------------------------------

    def send_some(self, h2conn, data_allowed: bool) -> bool:
        """
        Put what the backend's windows allow of this stream's queue into
        C{h2conn}.

        :return: whether everything queued, END_STREAM included, went.
        """
        sid = self.id
        fields = self._fields
        out = self._out
        if fields is not None:
            self._fields = None
            if self._end and not out and self._trailers is None:
                h2conn.send_headers(sid, fields, end_stream=True)
                self._end_sent = True
                return True
            h2conn.send_headers(sid, fields)
        if out:
            if not data_allowed:
                return False
            if self._send_queued(h2conn, sid):
                self._end_sent = True
            if out:
                return False
        if self._end and not self._end_sent:
            self._end_sent = True
            if self._trailers is not None:
                h2conn.send_headers(sid, self._trailers, end_stream=True)
            else:
                h2conn.end_stream(sid)
        return True

    def refused(self, why: str) -> None:
        """The backend did not process this stream: it may go again elsewhere."""
        if self._sent is not None:
            self.unsent = self._sent + list(self._out)
        self.fail(why)

    def fail(self, why: str) -> None:
        """The stream cannot complete: tell its exchange."""
        self.done = True
        ex = self.exchange
        if ex is None:
            return
        self.exchange = None
        ex.upstream_failed(self, why, 502)
        self.connection.touched(ex)

    def on_response(self, fields, ended: bool) -> None:
        ex = self.exchange
        if ex is None:
            return
        try:
            status, headers = response_head_fields(fields)
        except ValueError as e:
            self.connection.cancel(self)
            self.exchange = None
            ex.upstream_failed(self, "malformed response: %s" % (e,), 502)
            self.connection.touched(ex)
            return
        self._sent = None
        ex.response_head(self, status, b"", headers)
        self.connection.touched(ex)
        if ended:
            self.on_end()

    def on_data(self, data: bytes, size: int) -> None:
        ex = self.exchange
        if ex is None:
            self.connection.acknowledge(self, size)
            return
        ex.response_body(data)
        self.connection.touched(ex)
        if self.client_full:
            # Paused by that very chunk: hold its window back too.
            self._unacked += size
        else:
            self.connection.acknowledge(self, size)

    def on_trailers(self, fields) -> None:
        ex = self.exchange
        if ex is not None:
            ex.response_trailers(self, safe_trailers(fields))

    def on_end(self) -> None:
        self._response_ended = True
        ex = self.exchange
        if self._end_sent:
            self.connection.stream_closed(self)
        if ex is not None and ex.upstream is self:
            ex.response_complete(self, True)
            self.connection.touched(ex)


class H2UpstreamConnection(Protocol):
    """
    One HTTP/2 connection to a backend, carrying many streams.

    It is the streaming producer of its transport: while the backend does
    not read, no DATA is sent (the streams' queues fill and pause their
    downstreams).

    :ivar pool: its L{H2Pool}.
    :ivar load: streams handed out and not finished (opened or waiting to).
    :ivar breakers: the L{balance.cluster.breaker.CircuitBreakers} whose
        connection slot it holds until it closes, or L{None}.
    :ivar goaway: the backend sent GOAWAY: no new stream goes here.
    """

    def __init__(self, pool: H2Pool):
        self.pool = pool
        self.h2 = None
        self.load = 0
        self.breakers = None
        self.connecting = True
        self.closed = False
        self.goaway = False
        self.idle_since = 0.0
        self.waiters: list[Deferred] = []
        self._streams: dict[int, H2UpstreamStream] = {}
        self._pending: deque[H2UpstreamStream] = deque()
        self._sending: dict[int, H2UpstreamStream] = {}
        self._settings_known = False
        self._write_paused = False
        self._direct = False
        self._reading = False
        self._touched: dict[int, object] = {}

    # -- room -------------------------------------------------------------------

    def max_streams(self) -> int:
        """How many streams the backend takes at once (as far as we know)."""
        if not self._settings_known:
            # Streams handed out before then wait for the SETTINGS.
            return DEFAULT_MAX_STREAMS
        return min(self.h2.remote_settings.max_concurrent_streams, MAX_STREAMS)

    def has_room(self, more: int = 1) -> bool:
        """Whether C{more} further streams may be handed out on this connection."""
        return not self.closed and not self.goaway and self.load + more <= self.max_streams()

    def new_stream(self) -> H2UpstreamStream:
        """A stream for a new exchange (counted in C{load})."""
        self.load += 1
        return H2UpstreamStream(self)

    # -- Protocol ---------------------------------------------------------------

    def connectionMade(self):
        self.connecting = False
        transport = self.transport
        self._direct = _io.can_send_directly(transport)
        if self._direct:
            transport.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        conn = self.h2 = _ClientConnection(_CONFIG)
        conn.local_settings = h2.settings.Settings(client=True, initial_values=_SETTINGS)
        conn.initiate_connection()
        conn.increment_flow_control_window(CONNECTION_WINDOW - STREAM_WINDOW)
        transport.registerProducer(self, True)
        self.flush()

    def dataReceived(self, data: bytes):
        if self.closed:
            return
        try:
            events = self.h2.receive_data(data)
        except h2.exceptions.ProtocolError as e:
            self._close_now("HTTP/2 protocol error from backend: %s" % (e,))
            return
        self._reading = True
        streams = self._streams
        try:
            for event in events:
                kind = event.__class__
                if kind is h2.events.DataReceived:
                    stream = streams.get(event.stream_id)
                    if stream is None:
                        self.h2.acknowledge_received_data(
                            event.flow_controlled_length, event.stream_id
                        )
                    else:
                        stream.on_data(event.data, event.flow_controlled_length)
                elif kind is h2.events.ResponseReceived:
                    stream = streams.get(event.stream_id)
                    if stream is not None:
                        stream.on_response(event.headers, False)
                elif kind is h2.events.StreamEnded:
                    stream = streams.get(event.stream_id)
                    if stream is not None:
                        stream.on_end()
                elif kind is h2.events.TrailersReceived:
                    stream = streams.get(event.stream_id)
                    if stream is not None:
                        stream.on_trailers(event.headers)
                elif kind is h2.events.StreamReset:
                    self._on_reset(event)
                elif kind is h2.events.WindowUpdated:
                    self._on_window(event.stream_id)
                elif kind is h2.events.RemoteSettingsChanged:
                    self._settings_known = True
                    self._on_window(0)
                elif kind is h2.events.ConnectionTerminated:
                    self._on_goaway(event)
                if self.closed:
                    break
        finally:
            self._reading = False
        self.flush()
        self._flush_downstreams()

    def connectionLost(self, reason):
        self.closed = True
        breakers = self.breakers
        if breakers is not None:
            self.breakers = None
            breakers.release_connection()
        self.pool.discard(self)
        why = describe_failure(reason)
        streams = list(self._streams.values())
        pending = list(self._pending)
        self._streams.clear()
        self._pending.clear()
        self._sending.clear()
        for stream in pending:
            stream.refused(why)
        for stream in streams:
            stream.fail(why)
        self._flush_downstreams()

    # -- events -----------------------------------------------------------------

    def _on_reset(self, event) -> None:
        stream = self._streams.pop(event.stream_id, None)
        if stream is None:
            return
        self._sending.pop(event.stream_id, None)
        self._finished(stream)
        code = event.error_code
        name = getattr(code, "name", str(code))
        if code == ErrorCodes.REFUSED_STREAM:
            stream.refused("stream refused by backend")
        else:
            stream.fail("stream reset by backend: " + name)

    def _on_window(self, stream_id: int) -> None:
        if stream_id:
            stream = self._streams.get(stream_id)
            if stream is not None and (stream._out or stream._end and not stream._end_sent):
                self._sending[stream_id] = stream
        else:
            for stream in self._streams.values():
                if stream._out:
                    self._sending[stream.id] = stream

    def _on_goaway(self, event) -> None:
        """
        The backend goes away: streams above C{last_stream_id} were not
        processed and go again elsewhere; the others finish here.
        """
        self.goaway = True
        last = event.last_stream_id
        if last is None:
            last = 0
        for sid in [sid for sid in self._streams if sid > last]:
            stream = self._streams.pop(sid)
            self._sending.pop(sid, None)
            self._finished(stream)
            stream.refused("backend sent GOAWAY")
        pending, self._pending = self._pending, deque()
        for stream in pending:
            self.load -= 1
            stream.refused("backend sent GOAWAY")
        if not self._streams:
            self._close_now(None)

    # -- streams ----------------------------------------------------------------

    def want_to_send(self, stream: H2UpstreamStream) -> None:
        """C{stream} has HEADERS or DATA queued; they go at the next L{flush}."""
        if stream.id:
            self._sending[stream.id] = stream
        elif stream not in self._pending:
            self._pending.append(stream)

    def touched(self, ex) -> None:
        """C{ex}'s downstream got output: flushed at the end of this read."""
        if self._reading:
            self._touched[id(ex.downstream)] = ex.downstream
        else:
            ex.downstream.flush()

    def _flush_downstreams(self) -> None:
        touched = self._touched
        if touched:
            self._touched = {}
            for down in touched.values():
                down.flush()

    def acknowledge(self, stream: H2UpstreamStream, size: int) -> None:
        """Give C{size} bytes of window back to the backend."""
        if size and not self.closed:
            # (For a stream closed meanwhile, h2 credits the connection only.)
            self.h2.acknowledge_received_data(size, stream.id)

    def cancel(self, stream: H2UpstreamStream) -> None:
        """Drop C{stream}: reset it if it was opened."""
        if stream.done:
            return
        stream.done = True
        sid = stream.id
        if not sid:
            try:
                self._pending.remove(stream)
            except ValueError:
                pass
            self.load -= 1
            self._after_stream()
            return
        if self._streams.pop(sid, None) is None:
            return
        self._sending.pop(sid, None)
        if stream._unacked:
            # Held back from a client that stopped reading: the connection
            # window still counts these bytes.
            self.h2.acknowledge_received_data(stream._unacked, sid)
            stream._unacked = 0
        if not self.closed:
            try:
                self.h2.reset_stream(sid, ErrorCodes.CANCEL)
            except h2.exceptions.StreamClosedError:
                pass
        self._finished(stream)
        if not self._reading:
            self.flush()

    def stream_closed(self, stream: H2UpstreamStream) -> None:
        """Both sides of C{stream} ended."""
        if self._streams.pop(stream.id, None) is not None:
            self._sending.pop(stream.id, None)
            self._finished(stream)

    def _finished(self, stream: H2UpstreamStream) -> None:
        stream.done = True
        self.load -= 1
        self._after_stream()

    def _after_stream(self) -> None:
        if self._streams or self._pending:
            return
        if self.goaway:
            self._close_now(None)
            return
        if self.load == 0:
            self.idle_since = self.pool.now()
            self.pool.idle(self)

    # -- output -----------------------------------------------------------------

    def flush(self) -> None:
        """Open the streams there is room for and send what they queued."""
        if self.closed or self.h2 is None or self._reading:
            return
        conn = self.h2
        try:
            pending = self._pending
            # Streams open once the backend's SETTINGS told how many it
            # takes (its preface, sent at once, so this costs no round trip).
            if pending and self._settings_known:
                limit = self.max_streams()
                streams = self._streams
                while pending and len(streams) < limit:
                    stream = pending.popleft()
                    stream.id = sid = conn.get_next_available_stream_id()
                    streams[sid] = stream
                    if not stream.send_some(conn, not self._write_paused):
                        self._sending[sid] = stream
                    elif stream._response_ended:
                        self.stream_closed(stream)
            if self._sending:
                data_allowed = not self._write_paused
                sending = self._sending
                for stream in list(sending.values()):
                    if stream.done:
                        sending.pop(stream.id, None)
                    elif stream.send_some(conn, data_allowed):
                        sending.pop(stream.id, None)
                        if stream._response_ended:
                            self.stream_closed(stream)
        except h2.exceptions.ProtocolError as e:
            self._close_now("HTTP/2 output refused: %s" % (e,))
            return
        data = conn.data_to_send()
        if data:
            if self._direct:
                _io.send(self.transport, data)
            else:
                self.transport.write(data)

    def close(self) -> None:
        """Close the connection gracefully (no stream is left on it)."""
        self._close_now(None)

    def _close_now(self, why: str | None) -> None:
        if self.closed:
            return
        if self.h2 is not None and self.transport is not None:
            try:
                self.h2.close_connection()
            except h2.exceptions.ProtocolError:
                pass
            self.flush()
        self.closed = True
        self.pool.discard(self)
        streams = list(self._streams.values())
        pending = list(self._pending)
        self._streams.clear()
        self._pending.clear()
        self._sending.clear()
        if why is not None:
            for stream in pending:
                stream.refused(why)
            for stream in streams:
                stream.fail(why)
        if self.transport is not None:
            self.transport.loseConnection()

    # -- IPushProducer: the backend's socket -------------------------------------

    def pauseProducing(self) -> None:
        """The backend is not reading: send no more DATA."""
        self._write_paused = True

    def resumeProducing(self) -> None:
        """The backend reads again."""
        self._write_paused = False
        for stream in self._streams.values():
            if stream._out:
                self._sending[stream.id] = stream
        self.flush()

    def stopProducing(self) -> None:
        """The connection is closing; C{connectionLost} cleans up."""


class _Factory(Factory):
    noisy = False

    def __init__(self, conn: H2UpstreamConnection):
        self.conn = conn

    def buildProtocol(self, addr):
        return self.conn


class H2Pool:
    """
    The HTTP/2 connections to one backend, with the interface of
    L{balance.http.pool.BackendPool}: streams instead of connections.

    :ivar scheme: C{b"https"} over backend TLS, else C{b"http"}.
    :ivar connections: open and opening connections, oldest first.
    """

    def __init__(self, reactor, backend, idle_timeout: float, scheme: bytes):
        self._reactor = reactor
        self.backend = backend
        self.idle_timeout = idle_timeout
        self.scheme = scheme
        self.connections: list[H2UpstreamConnection] = []
        self.closed = False
        self._sweeper = None

    def now(self) -> float:
        """The reactor's time."""
        return self._reactor.seconds()

    def take(self, key: bytes | None = None) -> H2UpstreamStream | None:
        """
        A new stream on an open connection with room, or L{None}.

        :param key: unused: multiplexed connections carry no PROXY header
            (the config refuses C{send_proxy_protocol} with h2).
        """
        for conn in self.connections:
            if not conn.connecting and conn.has_room():
                return conn.new_stream()
        return None

    def connect(self, key: bytes | None = None) -> Deferred:
        """
        A stream on a new connection: one being opened that has room, or
        a further one.

        :return: a Deferred firing with an L{H2UpstreamStream}, or failing
            with the connect error.
        """
        conn = None
        for candidate in self.connections:
            if candidate.connecting and candidate.has_room():
                conn = candidate
                break
        if conn is None:
            conn = H2UpstreamConnection(self)
            self.connections.append(conn)
            d = self.backend.endpoint.connect(_Factory(conn))
            d.addCallbacks(self._connected, self._failed, (conn,), None, (conn,))
        conn.load += 1

        def cancel(waiter, conn=conn):
            if waiter in conn.waiters:
                conn.waiters.remove(waiter)
                conn.load -= 1

        waiter = Deferred(cancel)
        conn.waiters.append(waiter)
        return waiter

    def _connected(self, protocol, conn: H2UpstreamConnection) -> None:
        waiters, conn.waiters = conn.waiters, []
        for waiter in waiters:
            waiter.callback(H2UpstreamStream(conn))
        if not waiters and conn.load == 0:
            self.idle(conn)

    def _failed(self, failure, conn: H2UpstreamConnection) -> None:
        conn.closed = True
        self.discard(conn)
        waiters, conn.waiters = conn.waiters, []
        conn.load = 0
        for waiter in waiters:
            waiter.errback(failure)

    def release(self, stream: H2UpstreamStream) -> None:
        """The exchange is done with C{stream}."""
        stream.close()

    def discard(self, conn: H2UpstreamConnection) -> None:
        """Forget C{conn} (closed, or refusing new streams)."""
        try:
            self.connections.remove(conn)
        except ValueError:
            pass

    def idle(self, conn: H2UpstreamConnection) -> None:
        """C{conn} carries no stream: close it if it stays so for C{idle_timeout}."""
        if self.closed:
            conn.close()
            return
        if self._sweeper is None:
            self._sweeper = self._reactor.callLater(self.idle_timeout, self._sweep)

    def close_idle(self) -> None:
        """Close the connections that carry no stream (on stop or reload)."""
        for conn in list(self.connections):
            if conn.load == 0 and not conn.connecting:
                conn.close()
        if self._sweeper is not None and self._sweeper.active():
            self._sweeper.cancel()
        self._sweeper = None

    def _sweep(self) -> None:
        self._sweeper = None
        cutoff = self._reactor.seconds() - self.idle_timeout
        nearest = None
        for conn in list(self.connections):
            if conn.load or conn.connecting:
                continue
            if conn.idle_since <= cutoff:
                conn.close()
            elif nearest is None or conn.idle_since < nearest:
                nearest = conn.idle_since
        if nearest is not None:
            self._sweeper = self._reactor.callLater(max(nearest - cutoff, 0.05), self._sweep)
