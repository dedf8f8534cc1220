# -*- test-case-name: tests.http.test_h1 -*-
"""
The downstream side of the HTTP/1.1 proxy: a client connection, parsed with
httptools (llhttp), strict about everything that could make Balance and a
backend read a request differently.

Requests are answered in order.  While one is being proxied, a pipelined
next one is parsed and queued, and reading stops until its turn, so the
bytes held for a client stay bounded by one socket read.
"""

from __future__ import annotations

import socket
from collections import deque

import httptools
from twisted.internet.interfaces import IPushProducer
from twisted.internet.protocol import Protocol
from zope.interface import implementer

from balance import _io
from balance.http import message, websocket
from balance.http.proxy import ERROR_BODIES, Exchange, local_response
from balance.l4.tunnel import Tunnel
from balance.proxyproto import client_address, host_bytes

_MAX_HEADERS = 128
_CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"
_LAST_CHUNK = b"0\r\n\r\n"


class _Reject(Exception):
    """Raised from a parser callback to refuse the request being parsed."""

    def __init__(self, status: int, reason: str):
        self.status = status
        self.reason = reason


class _Stop(Exception):
    """Raised from a parser callback to stop parsing a closing connection."""


def _codings(te: bytes) -> bytes:
    """
    The Transfer-Encoding to send upstream for a request's C{te}, which the
    parser found to end in chunked: one canonical spelling, so that no
    backend reads C{CHUNKED}, C{chunked ,} or C{identity, chunked}
    differently.  Chunked twice is refused (RFC 9112 6.1).
    """
    codings = [c.strip().lower() for c in te.split(b",")]
    codings = [c for c in codings if c and c != b"identity"]
    if codings.count(b"chunked") != 1 or codings[-1] != b"chunked":
        raise _Reject(400, "invalid Transfer-Encoding: %r" % (te,))
    return b", ".join(codings)


_TIMER_HEAD = 1  # waiting for (the rest of) a request head
_TIMER_IDLE = 2  # keep-alive, between requests


@implementer(IPushProducer)
class DownstreamConnection(Protocol):
    """
    One client connection to an HTTP listener.

    It is also the producer of a request body streamed to a backend: the
    upstream connection's transport pauses it while the backend is not
    reading.  Reading from the client is paused for two independent
    reasons, each undone on its own: this connection's (a request waiting
    for a backend connection, or for its turn) and the backend's.

    :ivar ctx: the listener's L{balance.http.listener.HTTPContext}.
    :ivar client_ip: the peer address as bytes, for the forwarding headers.
    :ivar gone: the client connection is closed.
    :ivar upstream_full: the backend a request body streams to paused
        reading from the client.
    """

    #: An HTTP/1.x connection (an HTTP/2 stream says True).
    http2 = False

    # Slots keep an idle connection small (1.5 KB budget): with 30 attributes
    # the instance dict outgrows CPython's key sharing and costs about 2 KB.
    # Protocol still gives instances a __dict__ for anything not listed.
    __slots__ = (
        "transport", "connected", "ctx", "client_ip", "client_port", "gone", "denied",
        "_parser", "_direct", "_wbuf", "_active", "_queue", "_receiving", "_start_pending",
        "_closing", "_paused", "upstream_full", "draining", "_pending_reject", "_url",
        "_headers", "_head_bytes", "_in_head", "_body_mark", "_framing", "_timer",
        "_deadline", "_timer_kind", "_tlist", "bytes_in", "bytes_out", "_upgrading", "_held",
        "_skipped_body", "_synthetic", "tunnel", "proxy_headers", "client_subject",
        "tls_version",
    )  # fmt: skip

    def __init__(self, ctx):
        self.ctx = ctx
        self.client_ip = b""
        self.client_port = 0
        self.gone = False
        self.denied = False
        self._parser = None
        self._direct = False
        self._wbuf = []
        self._active = None
        self._queue = None
        self._receiving = None
        self._start_pending = None
        self._closing = False
        self._paused = False
        self.upstream_full = False
        self.draining = False
        self._pending_reject = None
        self._url = b""
        self._headers = None
        self._head_bytes = 0
        self._in_head = False
        self._body_mark = 0
        self._framing = 0
        self._timer = None
        self._deadline = 0.0
        self._timer_kind = _TIMER_HEAD
        # The listener's timer list holding the head or idle deadline.
        self._tlist = None
        self.bytes_in = 0
        self.bytes_out = 0
        # Upgrades: the exchange whose request made the parser stop (its
        # Upgrade is honoured or ignored), the bytes read after a WebSocket
        # handshake while its answer is awaited, a request body the parser
        # skipped for an ignored Upgrade, and the tunnel once upgraded.
        self._upgrading = None
        self._held = None
        self._skipped_body = None
        self._synthetic = False
        self.tunnel = None

    # -- Protocol ------------------------------------------------------------------

    def connectionMade(self):
        transport = self.transport
        peer = client_address(transport)
        self.client_ip = host_bytes(peer)
        self.client_port = getattr(peer, "port", 0)
        self._direct = _io.can_send_directly(transport)
        if self._direct:
            transport.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.ctx.connection_made(self)
        self._set_timer(_TIMER_HEAD, self.ctx.handshake_timeout)

    def dataReceived(self, data: bytes):
        self.bytes_in += len(data)
        self.ctx.listener_metrics.bytes_in += len(data)
        held = self._held
        if held is not None:
            # Read after a WebSocket handshake, before its answer: tunnel
            # bytes if the backend switches protocols, else the next request.
            self._held = held + data
            self.pause_reading()
            return
        self._feed(data)

    def _feed(self, data: bytes) -> None:
        """Parse C{data}, start the request it completes, send what is queued."""
        while True:
            parser = self._parser
            if parser is None:
                # Allocated on the first byte, not on accept: idle connections
                # cost only their transport.
                parser = self._parser = httptools.HttpRequestParser(self)
            try:
                parser.feed_data(data)
            except httptools.HttpParserCallbackError as e:
                cause = e.__context__
                if isinstance(cause, _Reject):
                    self._reject(cause.status, cause.reason)
                elif not isinstance(cause, _Stop):
                    raise
            except httptools.HttpParserUpgrade as e:
                # The parser stops after a request asking for an upgrade and
                # cannot go on: what follows gets a parser of its own.
                data = self._after_upgrade(data[e.args[0] :])
                if data:
                    continue
            except httptools.HttpParserError as e:
                self._reject(400, "malformed request: %s" % (e,))
            else:
                if self._in_head:
                    self._head_bytes += len(data)
                    if self._head_bytes > self.ctx.max_header_bytes:
                        self._reject(431, "request head larger than max_header_bytes")
                else:
                    rx = self._receiving
                    if rx is not None and rx.chunked_in:
                        self._check_framing(rx, len(data))
            break
        ex = self._start_pending
        if ex is not None:
            self._start_pending = None
            ex.start()
        self.flush()

    def _after_upgrade(self, rest: bytes) -> bytes:
        """
        The parser stopped after a request with C{Connection: upgrade}.
        A WebSocket handshake holds C{rest} until the backend answers.
        Any other upgrade (h2c...) is ignored: the request is served as
        HTTP/1.1, and parsing goes on with a new parser.

        :return: the bytes to parse next.
        """
        ex, self._upgrading = self._upgrading, None
        self._parser = None
        if ex is not None and ex.upgrade is not None:
            self._held = rest
            self.pause_reading()
            return b""
        skipped = self._skipped_body
        if skipped is not None:
            # The parser took the head for the whole request; its body
            # comes next, parsed behind a made-up head that frames it
            # the same way (see on_headers_complete).
            self._skipped_body = None
            self._synthetic = True
            if skipped.chunked_in:
                return b"PUT / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n" + rest
            return b"PUT / HTTP/1.1\r\nContent-Length: %d\r\n\r\n%s" % (
                skipped.content_length,
                rest,
            )
        return rest

    def connectionLost(self, reason):
        self.gone = True
        self._closing = True
        self._stop_timers()
        ex = self._active
        self._active = None
        self._queue = None
        if ex is not None:
            if not ex.response_done:
                ex.abandon()
                ex.reason = ex.reason or "client closed the connection"
                if not ex.status:
                    ex.status = 499
                self.ctx.request_done(self, ex)
            else:
                ex.abandon()
        self.ctx.connection_lost(self)

    # -- output --------------------------------------------------------------------

    def write(self, data: bytes) -> None:
        """Queue bytes for the client; L{flush} sends them."""
        self._wbuf.append(data)

    def flush(self) -> None:
        """Send what L{write} queued, in one system call when possible."""
        wbuf = self._wbuf
        if not wbuf or self.gone:
            wbuf.clear()
            return
        data = wbuf[0] if len(wbuf) == 1 else b"".join(wbuf)
        wbuf.clear()
        self.bytes_out += len(data)
        self.ctx.listener_metrics.bytes_out += len(data)
        if self._direct:
            _io.send(self.transport, data)
        else:
            self.transport.write(data)

    # -- the response, framed for HTTP/1.1 (the Exchange's downstream calls) ------

    def send_response_head(
        self, ex: Exchange, status: int, reason: bytes, headers, set_cookie=None
    ) -> None:
        """Queue the head of a backend's response; see C{ctx.response_head}."""
        self._wbuf.append(self.ctx.response_head(ex, status, reason, headers, set_cookie))

    def send_body(self, ex: Exchange, chunk: bytes) -> None:
        """Queue a piece of the response body, chunked if the head said so."""
        if ex.chunked_out:
            self._wbuf += (b"%x\r\n" % len(chunk), chunk, message.CRLF)
        else:
            self._wbuf.append(chunk)

    def end_response(self, ex: Exchange) -> None:
        """The response body is complete."""
        if ex.chunked_out:
            # An HTTP/2 backend's trailers (gRPC status) fit in the last
            # chunk; with a Content-Length body there is no room: dropped.
            trailers = ex.trailers_out
            self._wbuf.append(message.trailer_block(trailers) if trailers else _LAST_CHUNK)

    def send_local(
        self, ex: Exchange, status: int, body: bytes, close: bool, extra: bytes = b""
    ) -> None:
        """
        Queue a whole response Balance makes itself (an error, a 429).

        :param close: say C{Connection: close}.
        :param extra: further header lines, each ending in CRLF.
        """
        data = local_response(status, body, close, extra)
        if ex.method == b"HEAD":
            # The head says how long the body would be; none follows.
            data = data[: len(data) - len(body)]
        self._wbuf.append(data)

    def send_route_reply(self, ex: Exchange, route, head_only: bool, close: bool) -> None:
        """Queue the response of a C{direct_response} or C{redirect} route."""
        self._wbuf.append(route.local_reply(head_only=head_only, close=close))

    def send_continue(self, ex: Exchange) -> None:
        """Queue a C{100 Continue} interim response."""
        self._wbuf.append(_CONTINUE)

    def hand_over(self) -> None:
        """
        Another protocol takes this connection over before any request
        (HTTP/2, chosen by L{balance.http.sniff}): stop the timer and leave
        the listener's books, where the successor takes this place.
        """
        self.gone = True
        self._stop_timers()
        self.ctx.connections.discard(self)

    def abort(self) -> None:
        """Cut the connection: a response could not be completed."""
        self._closing = True
        self.flush()
        self.transport.abortConnection()

    def pause_reading(self) -> None:
        """Stop reading from the client (nowhere to put the bytes yet)."""
        if not self._paused and not self.gone:
            self._paused = True
            self.transport.pauseProducing()

    def resume_reading(self) -> None:
        """Read again, unless pipelined requests are waiting their turn."""
        if self._paused and not self._queue and not self._closing:
            self._paused = False
            if not self.upstream_full:
                self.transport.resumeProducing()

    # -- IPushProducer: a request body streamed to a slow backend ----------------

    def pauseProducing(self) -> None:
        """The backend is not reading the request body: stop reading it."""
        self.upstream_full = True
        if not self.gone:
            self.transport.pauseProducing()

    def resumeProducing(self) -> None:
        """The backend caught up (or the body ended): read again if we may."""
        self.upstream_full = False
        if not self._paused and not self.gone:
            self.transport.resumeProducing()

    def stopProducing(self) -> None:
        """The upstream connection is gone; its exchange answers the client."""

    # -- parser callbacks ----------------------------------------------------------

    def on_message_begin(self):
        if self._synthetic:
            return
        if self._closing:
            raise _Stop()
        self._url = b""
        self._headers = []
        self._head_bytes = 0
        self._in_head = True
        if self._active is None:
            self._set_timer(_TIMER_HEAD, self.ctx.handshake_timeout)

    def on_url(self, url: bytes):
        if self._synthetic:
            return
        self._url += url

    def on_header(self, name: bytes, value: bytes):
        if self._synthetic:
            return
        headers = self._headers
        if headers is None:
            # A trailer field after a chunked body.  The head has gone
            # upstream (or is about to, from this very list): trailers are
            # dropped, never read as headers.
            return
        headers.append((name, value))
        if len(headers) > _MAX_HEADERS:
            raise _Reject(431, "more than %d request header fields" % (_MAX_HEADERS,))

    def on_headers_complete(self):
        if self._synthetic:
            # The made-up head of a body the parser skipped: the body goes
            # to the exchange still receiving.
            self._synthetic = False
            return
        self._in_head = False
        ctx = self.ctx
        parser = self._parser
        ex = Exchange(self)
        ex.method = method = parser.get_method()
        upgrading = parser.should_upgrade()
        if upgrading:
            if method == b"CONNECT":
                raise _Reject(405, "CONNECT is not supported")
            self._upgrading = ex
        version = parser.get_http_version()
        ex.http11 = version == "1.1"
        if not ex.http11 and version != "1.0":
            if version == "0.9":
                raise _Reject(400, "HTTP/0.9 request")
            raise _Reject(505, "HTTP/%s request" % (version,))
        ex.keep_alive = parser.should_keep_alive() and not self.draining
        ex.started = ctx.reactor.seconds()
        head_size = len(self._url)
        host = None
        length = None
        te = None
        conn_values = None
        upgrade = None
        for name, value in self._headers:
            head_size += len(name) + len(value) + 4
            if len(name) > 17:
                continue
            lname = name.lower()
            if lname == b"host":
                if host is not None:
                    raise _Reject(400, "more than one Host header")
                host = value
            elif lname == b"content-length":
                length = value
            elif lname == b"transfer-encoding":
                te = value if te is None else te + b", " + value
            elif lname == b"connection":
                conn_values = [value] if conn_values is None else conn_values + [value]
            elif lname == b"upgrade":
                upgrade = value if upgrade is None else upgrade + b", " + value
            elif lname == b"expect":
                if value.lower() != b"100-continue":
                    raise _Reject(417, "unsupported Expect: %r" % (value,))
                ex.expect_continue = True
        if head_size > ctx.max_header_bytes:
            raise _Reject(431, "request head larger than max_header_bytes")
        ex.headers = self._headers
        self._headers = None
        ex.connection_tokens = message.connection_tokens(conn_values) if conn_values else None
        self._set_target(ex, method, host)
        if te is not None:
            # llhttp already refuses Transfer-Encoding with Content-Length
            # and a final coding other than chunked.
            if not ex.http11:
                raise _Reject(400, "Transfer-Encoding in an HTTP/1.0 request")
            ex.chunked_in = True
            ex.te_value = _codings(te)
            self._body_mark = -1
        elif length is not None:
            ex.content_length = int(length)
            if ex.content_length > ctx.max_body_bytes:
                raise _Reject(413, "Content-Length above max_body_bytes")
        if upgrading and upgrade is not None and websocket.is_websocket(upgrade):
            # Only with "Connection: upgrade" (RFC 9110 7.8): a bare Upgrade
            # field is hop-by-hop noise, dropped, and the request served.
            ex.upgrade = upgrade
            error = websocket.handshake_error(ex)
            if error is not None:
                raise _Reject(400, error)
        elif upgrading and (ex.content_length or ex.chunked_in):
            # An Upgrade Balance ignores (h2c...): the parser stops after
            # the head, before the body; see _after_upgrade.
            self._skipped_body = ex
        self._receiving = ex
        if self._active is None:
            self._active = ex
            self._start_pending = ex
        else:
            if self._queue is None:
                self._queue = deque()
            self._queue.append(ex)
            self.pause_reading()
            self._paused = True

    def on_body(self, body: bytes):
        ex = self._receiving
        if ex.chunked_in and ex.body_received + len(body) > self.ctx.max_body_bytes:
            raise _Reject(413, "chunked request body above max_body_bytes")
        ex.request_body(body)

    def on_message_complete(self):
        ex = self._receiving
        if ex is self._skipped_body:
            # Not complete: the parser skipped its body (_after_upgrade).
            return
        self._receiving = None
        if not ex.keep_alive:
            # Nothing after this request will be read.
            self._closing = True
        if ex is self._start_pending:
            ex.request_done = True
        else:
            ex.request_complete()

    # -- request checks ------------------------------------------------------------

    def _check_framing(self, ex: Exchange, size: int) -> None:
        """
        Bound the bytes of a chunked body that are not body: chunk sizes,
        extensions and trailers, which the parser holds until a field is
        complete.  Reads that bring no body byte count, up to
        C{max_header_bytes}; any body byte resets the count.
        """
        if ex.body_received != self._body_mark:
            self._body_mark = ex.body_received
            self._framing = 0
        else:
            self._framing += size
            if self._framing > self.ctx.max_header_bytes:
                self._reject(431, "chunk framing or trailers larger than max_header_bytes")

    def _set_target(self, ex: Exchange, method: bytes, host) -> None:
        url = self._url
        if b"#" in url:
            # A fragment is not part of a request target (RFC 9112 3.2);
            # Balance and a backend could route "/a#b" differently.
            raise _Reject(400, "fragment in request target")
        if url[:1] == b"/":
            ex.target = url
        elif url == b"*":
            if method != b"OPTIONS":
                raise _Reject(400, "asterisk-form target with %s" % (method.decode(),))
            ex.target = url
        else:
            split = message.split_absolute(url)
            if split is None:
                raise _Reject(400, "invalid request target")
            # RFC 9112 3.2.2: the target's authority replaces Host.
            authority, ex.target = split
            host = authority
            ex.headers = [(n, v) for n, v in ex.headers if n.lower() != b"host"]
            ex.headers.append((b"Host", authority))
        if host is None:
            if ex.http11:
                raise _Reject(400, "missing Host header")
            host = b""
            # The request goes upstream as HTTP/1.1, which needs a Host; an
            # empty one says there is no authority (RFC 9112 3.2).
            ex.headers.append((b"Host", b""))
        elif not message.valid_host(host):
            raise _Reject(400, "invalid Host header")
        ex.host = host
        query = ex.target.find(b"?")
        ex.path = ex.target if query < 0 else ex.target[:query]

    def _reject(self, status: int, reason: str) -> None:
        """
        Refuse the request being parsed.  The complete requests before it
        are still answered, in order, then the refusal, then the connection
        closes.
        """
        self._closing = True
        ex = self._receiving
        self._receiving = None
        self.pause_reading()
        if ex is not None:
            if ex is self._active:
                # Refused while it is already being proxied (a body over
                # the limit, bad chunk framing): cut the upstream side and
                # answer if we still can.
                if ex is self._start_pending:
                    self._start_pending = None
                if ex.response_started:
                    self.abort()
                else:
                    ex.fail(status, reason)
                return
            # A queued request whose body is bad: the last one parsed.
            queue = self._queue
            if queue and queue[-1] is ex:
                queue.pop()
        if self._active is not None:
            self._pending_reject = (status, reason)
            return
        self._send_reject(status, reason)

    def _send_reject(self, status: int, reason: str) -> None:
        ex = Exchange(self)
        ex.status = status
        ex.reason = reason
        ex.response_started = ex.response_done = True
        ex.started = self.ctx.reactor.seconds()
        self.write(local_response(status, ERROR_BODIES.get(status, b"Error\n"), True))
        self.ctx.request_done(self, ex)
        self.flush()
        self.transport.loseConnection()

    # -- exchanges -----------------------------------------------------------------

    def exchange_done(self, ex: Exchange) -> None:
        """C{ex} is answered and its request fully read: go on to the next."""
        if ex is not self._active:
            return
        self._active = None
        self.ctx.request_done(self, ex)
        if ex.close_after or not ex.keep_alive or self.draining:
            self._closing = True
            self.flush()
            self.transport.loseConnection()
            return
        if self._held is not None:
            # The backend declined an upgrade: what the client sent after
            # the handshake is HTTP again, parsed on a later turn (a run
            # of declined handshakes must not recurse).
            self._set_timer(_TIMER_IDLE, self.ctx.idle_timeout)
            self.ctx.reactor.callLater(0, self._replay)
            return
        queue = self._queue
        if queue:
            nxt = self._active = queue.popleft()
            if not queue:
                # Reading resumes on a later reactor turn, after nxt.start()
                # has paused it again if it must wait for a connection.
                self.resume_reading()
            nxt.start()
            return
        if self._pending_reject is not None:
            self._send_reject(*self._pending_reject)
            return
        self._set_timer(_TIMER_IDLE, self.ctx.idle_timeout)
        self.resume_reading()

    def _replay(self) -> None:
        """Parse the bytes held back during a declined upgrade."""
        held, self._held = self._held, None
        if self.gone or self._closing or held is None:
            return
        self.resume_reading()
        if held:
            self._feed(held)

    # -- upgraded connections ------------------------------------------------------

    def start_tunnel(self, ex: Exchange, conn, rest: bytes, guard) -> None:
        """
        The backend switched protocols for C{ex}: from now on this client
        connection and the backend's C{conn} are joined in a
        L{balance.l4.tunnel.Tunnel}, which takes both transports over.

        :param rest: what the backend sent after its 101.
        :param guard: a L{balance.http.websocket.FrameGuard}, or L{None}.
        """
        held, self._held = self._held or b"", None
        # The tunnel counts the held bytes as it sends them.
        self.bytes_in -= len(held)
        ctx = self.ctx
        ctx.listener_metrics.bytes_in -= len(held)
        self._stop_timers()
        self._paused = False
        tunnel = self.tunnel = Tunnel(
            ctx.reactor,
            self.transport,
            conn.transport,
            ctx.idle_timeout,
            lambda t: self._tunnel_done(ex, conn, t),
            ctx.listener_metrics,
            guard,
        )
        tunnel.start(self, conn, held, rest)

    def _tunnel_done(self, ex: Exchange, conn, tunnel) -> None:
        """Both sides of the tunnel are closed: the connection's end."""
        self.tunnel = None
        self.gone = True
        self._closing = True
        self._active = None
        self.bytes_in += tunnel.client_bytes
        self.bytes_out += tunnel.backend_bytes
        ex.tunnel_done(tunnel, conn)
        self.ctx.request_done(self, ex)
        self.ctx.connection_lost(self)

    def drain(self) -> None:
        """Finish the current exchange, then close; close now if idle."""
        self.draining = True
        if self._active is None and not self._in_head:
            self._closing = True
            self.transport.loseConnection()

    # -- timers ------------------------------------------------------------------
    #
    # Every deadline of a connection is normally a fixed delay after it is
    # set (the handshake or idle timeout, a route's timeout), so it lives in
    # one of the listener's timer lists, which share one reactor timer per
    # delay: a connection holds no DelayedCall.  A deadline that is not (the
    # rest of a route timeout after a per-try timeout fired, say) gets a
    # DelayedCall of its own.

    def _set_timer(self, kind: int, delay: float) -> None:
        """Make the connection's head or idle deadline C{delay} seconds from now."""
        self._timer_kind = kind
        self._deadline = self._enlist(delay)

    def _enlist(self, delay: float) -> float:
        """Move the connection to the timer list of C{delay}; return its deadline."""
        tlist = self.ctx.timers(delay)
        old = self._tlist
        if old is not tlist:
            if old is not None:
                old.discard(self)
            self._tlist = tlist
        return tlist.add(self)

    def _stop_timers(self) -> None:
        timer, self._timer = self._timer, None
        if timer is not None and timer.active():
            timer.cancel()
        tlist, self._tlist = self._tlist, None
        if tlist is not None:
            tlist.discard(self)

    def arm(self, deadline: float, delay: float | None = None) -> None:
        """
        Make sure the timer fires by C{deadline}, the active exchange's.

        :param delay: how far C{deadline} was from now when it was
            computed; the deadline then goes into the timer list of that
            delay instead of a timer of its own.
        """
        self._deadline = deadline
        if delay is not None:
            self._enlist(delay)
            return
        self._call_at(deadline)

    def _call_at(self, deadline: float) -> None:
        timer = self._timer
        reactor = self.ctx.reactor
        if timer is None:
            self._timer = reactor.callLater(deadline - reactor.seconds(), self._on_timer)
        elif timer.getTime() > deadline:
            timer.reset(deadline - reactor.seconds())

    def _on_timer(self) -> None:
        """The connection's own timer fired."""
        self._timer = None
        self._expire()

    def deadline_passed(self) -> None:
        """The deadline in a timer list passed (called by the list)."""
        self._tlist = None
        self._expire()

    def _expire(self) -> None:
        if self.gone:
            return
        now = self.ctx.reactor.seconds()
        ex = self._active
        deadline = ex.deadline if ex is not None and ex.deadline else self._deadline
        if deadline > now:
            if self._tlist is None:
                self._call_at(deadline)
            return
        if ex is not None:
            if ex.response_done:
                return
            ex.timed_out()
            self.flush()
        elif self._in_head or (self._timer_kind == _TIMER_HEAD and self.bytes_in):
            self._reject(408, "request head not received within the handshake timeout")
        else:
            # Idle keep-alive (or never a byte): close quietly.
            self._closing = True
            self.transport.loseConnection()
