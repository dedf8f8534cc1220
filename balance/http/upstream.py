# -*- test-case-name: tests.http.test_proxy -*-
"""
The upstream side of the HTTP/1.1 proxy: one keep-alive connection to a
backend, carrying one exchange at a time, parsing responses with httptools.

The connection knows nothing of routing or clients: it hands what it parses
to the L{balance.http.proxy.Exchange} attached to it and tells its pool when
it is free again.
"""

from __future__ import annotations

import socket

import httptools
from twisted.internet.interfaces import IPushProducer
from twisted.internet.protocol import Protocol
from zope.interface import implementer

from balance import _io
from balance.http.message import trailer_block

_HEAD_END = b"\r\n\r\n"
_CHUNK_END = b"\r\n"
_LAST_CHUNK = b"0\r\n\r\n"
_MAX_HEAD = 64 * 1024


class _Unsolicited(Exception):
    """Raised from a parser callback: a second response followed the first."""


@implementer(IPushProducer)
class UpstreamConnection(Protocol):
    """
    A connection to a backend.

    It is also the producer of a response body streamed to a client: the
    client connection's transport pauses it while the client is not reading.

    :ivar exchange: the exchange using this connection, or L{None} while idle.
    :ivar reused: whether this connection already carried an exchange (a
        failure before any response byte may then be the backend having
        closed it while idle, which is worth one retry on a fresh one).
    :ivar idle_since: when it was last returned to its pool.
    :ivar breakers: the L{balance.cluster.breaker.CircuitBreakers} whose
        connection slot this connection holds until it closes, or L{None}.
    """

    __slots__ = (
        "pool",
        "exchange",
        "reused",
        "idle_since",
        "_parser",
        "_direct",
        "_status",
        "_reason",
        "_headers",
        "_keep_alive",
        "_response_bytes",
        "_skip",
        "_head_only",
        "_head_buffer",
        "_closed",
        "_wbuf",
        "_complete",
        "client_full",
        "breakers",
        "proxy_header",
    )

    #: Set by HTTP/2 streams the backend refused (see
    #: L{balance.http.h2_upstream}); an HTTP/1.1 connection never knows.
    unsent = None

    def __init__(self, pool):
        self.pool = pool
        self.exchange = None
        self.reused = False
        self.idle_since = 0.0
        self._parser = None
        self._direct = False
        self._closed = False
        self._wbuf = []
        self.client_full = False
        self.breakers = None
        self.proxy_header = None
        self._reset()

    def _reset(self):
        self._status = 0
        self._reason = b""
        self._headers = []
        self._keep_alive = False
        self._response_bytes = 0
        self._skip = False
        self._head_only = False
        self._head_buffer = b""
        self._complete = False

    # -- Protocol ----------------------------------------------------------

    def connectionMade(self):
        self._direct = _io.can_send_directly(self.transport)
        try:
            self.transport.setTcpNoDelay(True)
        except (AttributeError, OSError):
            pass
        self._parser = httptools.HttpResponseParser(self)

    def dataReceived(self, data: bytes):
        exchange = self.exchange
        if exchange is None:
            # A backend must not speak unasked; whatever it is, this
            # connection can no longer be trusted to frame a response.
            self.close()
            return
        self._response_bytes += len(data)
        try:
            if self._head_only:
                self._feed_head_only(data)
            else:
                self._parser.feed_data(data)
        except httptools.HttpParserUpgrade as e:
            if self._status == 101 and exchange.switching is not None:
                # The parser stopped at the end of the 101: what follows is
                # the upgraded protocol's, for the tunnel.
                self._complete = False
                exchange.switch_protocols(self, data[e.args[0] :])
                exchange.downstream.flush()
                return
            self._keep_alive = False
            if not self._complete:
                self.exchange = None
                self.close()
                exchange.upstream_failed(self, "malformed response: %s" % (e,), 502)
                exchange.downstream.flush()
                return
        except httptools.HttpParserError as e:
            if not self._complete:
                self.exchange = None
                self.close()
                exchange.upstream_failed(self, "malformed response: %s" % (e,), 502)
                exchange.downstream.flush()
                return
            # More bytes followed a complete response: the backend and
            # Balance disagree on where it ended, so they are dropped with
            # the connection rather than read as the next response.
            self._keep_alive = False
        if self._complete:
            # Completed only now, after the parser stopped: a connection
            # released from inside it could be taken by the next request
            # while bytes of this one are still being parsed.
            self._complete = False
            exchange.response_complete(self, self._keep_alive)
        exchange.downstream.flush()

    def connectionLost(self, reason):
        self._closed = True
        breakers = self.breakers
        if breakers is not None:
            self.breakers = None
            breakers.release_connection()
        exchange = self.exchange
        if exchange is not None:
            self.exchange = None
            if (
                self._status
                and not self._skip
                and exchange.response_started
                and exchange.until_close
            ):
                # The response had no length: the end of the connection is
                # the end of the body.
                exchange.response_complete(self, False)
            else:
                exchange.upstream_failed(self, describe_failure(reason), 502)
            exchange.downstream.flush()
        else:
            self.pool.discard(self)

    # -- used by the exchange ---------------------------------------------

    def usable(self) -> bool:
        """Whether the connection is open and free for a new exchange."""
        return not self._closed and self.exchange is None and not self.transport.disconnecting

    def attach(self, exchange, head_only: bool) -> None:
        """
        Start carrying C{exchange}.

        :param head_only: the request is a HEAD, so the response has no body
            whatever its headers say.
        """
        self.exchange = exchange
        self._reset()
        self._head_only = head_only

    def send_head(self, ex) -> None:
        """Queue the request head of C{ex}; L{flush} sends it."""
        self._wbuf.append(ex.downstream.ctx.request_head(ex))

    def write_body(self, ex, chunk: bytes) -> None:
        """Queue a piece of the request body, chunked if its head said so."""
        if ex.chunked_in:
            self._wbuf += (b"%x\r\n" % len(chunk), chunk, _CHUNK_END)
        else:
            self._wbuf.append(chunk)

    def end_body(self, ex) -> None:
        """The request body is complete: the last chunk, with its trailers."""
        if ex.chunked_in:
            trailers = ex.trailers_in
            if trailers:
                self._wbuf.append(trailer_block(trailers))
            else:
                self._wbuf.append(_LAST_CHUNK)

    def write(self, data: bytes) -> None:
        """Queue bytes for the backend; L{flush} sends them."""
        self._wbuf.append(data)

    def flush(self) -> None:
        """Send what L{write} queued, in one system call when possible."""
        wbuf = self._wbuf
        if not wbuf:
            return
        data = wbuf[0] if len(wbuf) == 1 else b"".join(wbuf)
        wbuf.clear()
        if self._direct:
            _io.send(self.transport, data)
        else:
            self.transport.write(data)

    def close(self) -> None:
        """Close the connection (it will not be reused)."""
        self._closed = True
        self.exchange = None
        if self.transport is not None:
            self.transport.loseConnection()

    def abort(self) -> None:
        """Drop the connection at once (a half-sent request)."""
        self._closed = True
        self.exchange = None
        if self.transport is not None:
            self.transport.abortConnection()

    # -- IPushProducer: a response body streamed to a slow client ----------

    def pauseProducing(self) -> None:
        """The client is not reading: stop reading from the backend."""
        self.client_full = True
        self.transport.pauseProducing()

    def resumeProducing(self) -> None:
        """The client caught up (or the body ended): read again."""
        self.client_full = False
        if not self._closed:
            self.transport.resumeProducing()

    def stopProducing(self) -> None:
        """The client connection is gone; its exchange aborts this one."""

    # -- httptools callbacks -----------------------------------------------

    def on_status(self, status: bytes):
        self._reason += status

    def on_header(self, name: bytes, value: bytes):
        self._headers.append((name, value))

    def on_headers_complete(self):
        if self._complete or self.exchange is None:
            # A second response, or one the exchange let go of (aborted
            # from inside this very parse, e.g. to retry on its status).
            raise _Unsolicited()
        status = self._parser.get_status_code()
        if status == 101:
            if self.exchange.upgrade is None:
                raise httptools.HttpParserError("101 to a request that asked no upgrade")
            self._status = status
            self.exchange.response_head(self, status, self._reason, self._headers)
            return
        if status < 200:
            if status < 100:
                raise httptools.HttpParserError("invalid status code %d" % (status,))
            # Interim responses (100 Continue, 103 Early Hints) are not
            # relayed: Balance answered the client's Expect itself.
            self._skip = True
            self._headers = []
            self._reason = b""
            return
        self._skip = False
        self._status = status
        self._keep_alive = self._parser.should_keep_alive()
        self.exchange.response_head(self, status, self._reason, self._headers)

    def on_body(self, body: bytes):
        exchange = self.exchange
        if exchange is not None:
            # None: the exchange dropped this response (a status it
            # retries) from inside the parse that brought the body too.
            exchange.response_body(body)

    def on_message_complete(self):
        if self._skip:
            self._skip = False
            return
        if self._head_only:
            # Completed by _feed_head_only, which knows where the head ends.
            return
        self._complete = True

    # -- HEAD --------------------------------------------------------------

    def _feed_head_only(self, data: bytes):
        """
        Parse the response to a HEAD request.  httptools cannot be told that
        such a response has no body, so the head is cut out here and fed to
        a parser of its own, and the connection's parser starts afresh.
        """
        buffer = self._head_buffer + data
        while True:
            end = buffer.find(_HEAD_END)
            if end < 0:
                if len(buffer) > _MAX_HEAD:
                    raise httptools.HttpParserError("response head too long")
                self._head_buffer = buffer
                return
            head, buffer = buffer[: end + 4], buffer[end + 4 :]
            self._parser = httptools.HttpResponseParser(self)
            self._parser.feed_data(head)
            if self._status:
                break
            # That was an interim 1xx response: look for the final one.
        self._head_buffer = b""
        self._parser = httptools.HttpResponseParser(self)
        self._complete = True
        if buffer:
            # A body after the response to HEAD: the client has its
            # response; the connection cannot be trusted any more.
            self._keep_alive = False


def describe_failure(reason) -> str:
    """A short reason for an upstream connection's loss, for the access log."""
    value = getattr(reason, "value", reason)
    name = type(value).__name__
    if "Refused" in name:
        return "connection refused"
    if "Timeout" in name or "TimedOut" in name:
        return "connect timeout"
    if "Done" in name:
        return "connection closed by backend"
    if "Lost" in name:
        return "connection reset by backend"
    if isinstance(value, socket.gaierror) or "DNS" in name:
        return "backend name did not resolve"
    return str(value) or name
