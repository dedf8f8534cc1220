# -*- test-case-name: tests.http.test_h2 -*-
"""
One HTTP/2 stream as the downstream of its L{balance.http.proxy.Exchange}
(the other kind is an HTTP/1.1 connection, L{balance.http.h1}).

The Exchange hands a stream its response as a head, body chunks and an end
(or whole, when Balance answers itself); the stream turns them into field
lists and queues them, and its connection
(L{balance.http.h2.H2DownstreamConnection}) frames what the client's
flow-control windows allow.  The stream also stands in for the two things
the Exchange registers producers with:

  - the client's transport (C{transport}), for the response body: beyond
    L{HIGH_WATER} queued bytes the stream pauses its own backend
    connection, and resumes it below L{LOW_WATER};
  - the client as producer of the request body (C{pauseProducing}): while
    the backend does not read, request DATA is not acknowledged, so the
    client's window runs out and it stops sending.
"""

from __future__ import annotations

from collections import deque

from twisted.internet.interfaces import IPushProducer
from zope.interface import implementer

from balance.http.h2_conn import ErrorCodes
from balance.http.h2_flow import HIGH_WATER, LOW_WATER, QueuedStream
from balance.http.h2_headers import grpc_local_fields, is_grpc, local_fields, response_fields
from balance.http.proxy import Exchange

__all__ = ["H2Stream", "HIGH_WATER", "LOW_WATER"]


_CONTINUE = [(b":status", b"100")]


@implementer(IPushProducer)
class H2Stream(QueuedStream):
    """
    One HTTP/2 stream, as the C{downstream} of its L{Exchange}.

    It answers the Exchange's calls with frames on its stream, and stands
    in for the two things the Exchange registers producers with: the
    client's transport (C{transport}, for the response body: this stream
    pauses the backend connection when its queue is full) and the client as
    producer of the request body (C{pauseProducing}: the backend is full,
    so DATA is no longer acknowledged).

    :ivar conn: its L{balance.http.h2.H2DownstreamConnection}.
    :ivar id: the stream id.
    :ivar exchange: its L{Exchange}.
    :ivar gone: the stream ended before its Exchange did (reset, or the
        connection closed); the Exchange stops there.
    :ivar started: the Exchange was started (after the read that brought
        the request, see C{H2DownstreamConnection._start_exchanges}).
    :ivar request_ended: the client sent END_STREAM.
    :ivar has_length: the request has a C{content-length}.
    :ivar body_left: request body bytes its C{content-length} still
        announces, or -1 without one.
    """

    __slots__ = (
        "conn",
        "id",
        "ctx",
        "client_ip",
        "denied",
        "exchange",
        "gone",
        "upstream_full",
        "started",
        "request_ended",
        "logged",
        "has_length",
        "body_left",
        "_interim",
        "_read_paused",
        "_unacked",
        "_head",
        "_out",
        "_out_bytes",
        "_end",
        "_ended",
        "_trailers",
        "_producer",
        "_producer_paused",
    )

    #: HTTP/2 streams never ask for a connection close per response.
    draining = False
    #: For the access log and spans (HTTP/2.0, not the HTTP/1.1 upstream).
    http2 = True

    def __init__(self, conn, stream_id: int):
        self.conn = conn
        self.id = stream_id
        self.ctx = conn.ctx
        self.client_ip = conn.client_ip
        self.denied = conn.denied
        self.exchange = None
        self.gone = False
        self.upstream_full = False
        self.started = False
        self.request_ended = False
        self.logged = False
        self.has_length = False
        self.body_left = -1
        self._interim = False
        self._read_paused = False
        self._unacked = 0
        self._head = None
        self._out = deque()
        self._out_bytes = 0
        self._end = False
        self._ended = False
        self._trailers = None
        self._producer = None
        self._producer_paused = False

    # -- the Exchange's downstream interface: the response -----------------------

    def send_response_head(
        self, ex: Exchange, status: int, reason: bytes, headers, set_cookie=None
    ) -> None:
        """
        A backend's response head: HEADERS, sent with the first DATA.

        :param set_cookie: a C{set-cookie} value Balance adds (sticky), or
            L{None}.
        """
        self._head = response_fields(ex, status, headers, set_cookie)
        self.conn.want_to_send(self)

    def send_body(self, ex: Exchange, chunk: bytes) -> None:
        """Queue a piece of the response body; see L{HIGH_WATER}."""
        if not chunk:
            return
        self._out.append(chunk)
        self._out_bytes += len(chunk)
        if self._out_bytes > HIGH_WATER:
            self._pause_producer()
        self.conn.want_to_send(self)

    def end_response(self, ex: Exchange) -> None:
        """
        The response body is complete: END_STREAM after what is queued, on
        the backend's trailers if it sent any.
        """
        self._end = True
        self._trailers = ex.trailers_out
        self.conn.want_to_send(self)

    def send_local(
        self, ex: Exchange, status: int, body: bytes, close: bool, extra: bytes = b""
    ) -> None:
        """
        A whole response Balance makes itself (C{close} means nothing here);
        to a gRPC call, a Trailers-Only gRPC status instead.
        """
        if is_grpc(ex):
            # Trailers-Only: the status in the head, no body.
            self._head = grpc_local_fields(status, ex.reason, extra)
            body = b""
        else:
            self._head = local_fields(status, body, extra)
        if body and ex.method != b"HEAD":
            self._out.append(body)
            self._out_bytes += len(body)
        self._end = True
        self.conn.want_to_send(self)

    def send_route_reply(self, ex: Exchange, route, head_only: bool, close: bool) -> None:
        """The response of a C{direct_response} or C{redirect} route."""
        self._head, body = self.conn.options.route_reply(route, head_only)
        if body:
            self._out.append(body)
            self._out_bytes += len(body)
        self._end = True
        self.conn.want_to_send(self)

    def send_continue(self, ex: Exchange) -> None:
        """An interim C{100} response (the client sent C{expect: 100-continue})."""
        self._interim = True
        self.conn.want_to_send(self)

    def flush(self) -> None:
        """Send what is queued on the connection."""
        self.conn.flush()

    def abort(self) -> None:
        """The response cannot be completed: reset this stream (only)."""
        self.conn.reset_stream(self, ErrorCodes.INTERNAL_ERROR)

    def arm(self, deadline: float, delay: float | None = None) -> None:
        """Make sure the connection's timer fires by C{deadline} (C{delay} is unused)."""
        self.conn.arm(deadline)

    def exchange_done(self, ex: Exchange) -> None:
        """The Exchange is over (its response is queued): count it once."""
        if not self.logged:
            self.logged = True
            self.ctx.request_done(self, ex)

    # -- the Exchange's downstream interface: the request body ------------------

    def pause_reading(self) -> None:
        """Stop acknowledging request DATA (nowhere to put it yet)."""
        self._read_paused = True

    def resume_reading(self) -> None:
        """Acknowledge again, and what was held."""
        self._read_paused = False
        self.release_acks()

    def pauseProducing(self) -> None:
        """The backend is not reading the request body."""
        self.upstream_full = True

    def resumeProducing(self) -> None:
        """The backend caught up: acknowledge what was held."""
        self.upstream_full = False
        self.release_acks()

    def stopProducing(self) -> None:
        """The backend connection is gone; the Exchange answers."""

    def received(self, size: int) -> None:
        """
        C{size} flow-controlled bytes of request body were handed to the
        Exchange: acknowledge them now if its backend connection took them,
        else once it does.
        """
        ex = self.exchange
        if ex.upstream is None or self.upstream_full or self._read_paused or not self.started:
            self._unacked += size
        else:
            self.conn.acknowledge(self.id, size)

    def release_acks(self) -> None:
        """Acknowledge the request DATA held back, if it may go now."""
        size = self._unacked
        if (
            size
            and not self.gone
            and self.started
            and not self.upstream_full
            and not self._read_paused
            and self.exchange.upstream is not None
        ):
            self._unacked = 0
            conn = self.conn
            conn.acknowledge(self.id, size)
            if not conn.reading:
                # Resumed from outside a read of the client (a backend
                # connected, or drained its buffer): nothing else flushes.
                conn.flush()

    def take_unacked(self) -> int:
        """Forget and return the bytes not acknowledged (the stream ends)."""
        size, self._unacked = self._unacked, 0
        return size

    # -- the client's transport, as the Exchange sees it --------------------------

    # -- output, driven by the connection ---------------------------------------

    def send_some(self, h2conn, data_allowed: bool) -> bool:
        """
        Put what the client's windows allow of this stream's queue into
        C{h2conn}.

        :param data_allowed: DATA may be sent (the client reads).
        :return: whether everything queued, END_STREAM included, went.
        """
        sid = self.id
        if self._interim:
            self._interim = False
            h2conn.send_headers(sid, _CONTINUE)
        head = self._head
        out = self._out
        if head is not None:
            self._head = None
            if self._end and not out and self._trailers is None:
                h2conn.send_headers(sid, head, end_stream=True)
                self._ended = True
                return True
            h2conn.send_headers(sid, head)
        if not data_allowed:
            return False
        if out:
            if self._send_queued(h2conn, sid):
                self._ended = True
            if out:
                return False
        if self._end:
            if not self._ended:
                self._ended = True
                if self._trailers is not None:
                    h2conn.send_headers(sid, self._trailers, end_stream=True)
                else:
                    h2conn.end_stream(sid)
            return True
        return True

    @property
    def response_sent(self) -> bool:
        """END_STREAM (or a reset) went out."""
        return self._ended
