# -*- test-case-name: tests.http.test_proxy -*-
"""
One proxied HTTP/1.1 request, from its parsed head to the end of its
response: routing, picking a backend, taking a pooled connection, streaming
the request body up and the response down, and the error answers.

An L{Exchange} is created by the downstream connection for every request and
talks to two peers: the L{balance.http.h1.DownstreamConnection} it came from
(to write the response) and the L{balance.http.upstream.UpstreamConnection}
it borrowed (to write the request).
"""

from __future__ import annotations

from balance.http import message
from balance.http.upstream import describe_failure
from balance.ratelimit.limiter import Decision

_CHUNK_END = b"\r\n"
_LAST_CHUNK = b"0\r\n\r\n"
_VIA = b"1.1 balance"

# Large or unbounded bodies are streamed with flow control; small ones are
# written as they come (they fit in the socket buffers anyway), which saves
# registering a producer per request.
_STREAM_THRESHOLD = 64 * 1024


def local_response(status: int, body: bytes, close: bool, extra: bytes = b"") -> bytes:
    """
    The bytes of a response Balance answers itself.

    :param close: add C{Connection: close}.
    :param extra: further header lines, each ending in CRLF.
    """
    return b"%sContent-Type: text/plain; charset=utf-8\r\nContent-Length: %d\r\n%s%s\r\n%s" % (
        message.status_line(status),
        len(body),
        extra,
        b"Connection: close\r\n" if close else b"",
        body,
    )


ERROR_BODIES = {
    400: b"Bad Request\n",
    403: b"Forbidden\n",
    404: b"Not Found\n",
    405: b"Method Not Allowed\n",
    408: b"Request Timeout\n",
    413: b"Payload Too Large\n",
    429: b"Too Many Requests\n",
    417: b"Expectation Failed\n",
    431: b"Request Header Fields Too Large\n",
    501: b"Not Implemented\n",
    502: b"Bad Gateway\n",
    503: b"Service Unavailable\n",
    504: b"Gateway Timeout\n",
    505: b"HTTP Version Not Supported\n",
}


class Exchange:
    """
    One request and its response.

    Request facts are filled in by the downstream parser; the rest is the
    state of proxying it.

    :ivar reason: why the exchange ended the way it did, for the access log
        (empty when all went well).
    """

    __slots__ = (
        "downstream",
        "method",
        "target",
        "path",
        "host",
        "headers",
        "connection_tokens",
        "http11",
        "keep_alive",
        "chunked_in",
        "te_value",
        "content_length",
        "expect_continue",
        "body",
        "body_received",
        "request_done",
        "route",
        "cluster",
        "backend",
        "pool",
        "upstream",
        "tried",
        "attempts",
        "deadline",
        "status",
        "response_started",
        "response_done",
        "chunked_out",
        "until_close",
        "close_after",
        "reason",
        "request_bytes",
        "response_bytes",
        "started",
        "_streaming_up",
        "_streaming_down",
        "_body_sent",
    )

    def __init__(self, downstream):
        self.downstream = downstream
        self.method = b""
        self.target = b""
        self.path = b""
        self.host = b""
        self.headers = None
        self.connection_tokens = None
        self.http11 = True
        self.keep_alive = True
        self.chunked_in = False
        self.te_value = b""
        self.content_length = 0
        self.expect_continue = False
        self.body = []
        self.body_received = 0
        self.request_done = False
        self.route = None
        self.cluster = None
        self.backend = None
        self.pool = None
        self.upstream = None
        self.tried = None
        self.attempts = 0
        self.deadline = 0.0
        self.status = 0
        self.response_started = False
        self.response_done = False
        self.chunked_out = False
        self.until_close = False
        self.close_after = False
        self.reason = ""
        self.request_bytes = 0
        self.response_bytes = 0
        self.started = 0.0
        self._streaming_up = False
        self._streaming_down = False
        self._body_sent = False

    # -- starting ------------------------------------------------------------

    def start(self) -> None:
        """Route the request and answer it locally or send it upstream."""
        down = self.downstream
        if down.denied:
            self.fail(403, "client address denied by the listener")
            return
        route = down.ctx.router.match(self.host, self.path, self.method, self.headers)
        if route is None:
            self.fail(404, "no route")
            return
        self.route = route
        if route.acl is not None and not route.acl.allowed(down.client_ip):
            self.fail(403, "client address not allowed on this route")
            return
        limiter = route.limiter
        if limiter is not None:
            decision = limiter.check(down.client_ip, self.headers)
            if type(decision) is not Decision:
                # The shared store answers asynchronously: hold the request.
                down.pause_reading()
                decision.addCallback(self._rate_decided)
                return
            if not decision.allowed:
                self._rate_limited(decision)
                return
        self._dispatch()

    def _rate_decided(self, decision) -> None:
        down = self.downstream
        if self.response_done or down.gone:
            return
        if decision.allowed:
            self._dispatch()
            down.resume_reading()
        else:
            self._rate_limited(decision)
        down.flush()

    def _rate_limited(self, decision) -> None:
        close = not self.request_done
        self.reason = "rate limited"
        self.respond_locally(
            local_response(
                429, ERROR_BODIES[429], close or self.close_after, decision.reject_headers()
            ),
            429,
            "rate limited",
            close,
        )

    def _dispatch(self) -> None:
        """Answer locally or start the trip to a backend."""
        down = self.downstream
        ctx = down.ctx
        route = self.route
        if route.local_response is not None:
            close = not self.keep_alive or not self.request_done or down.draining
            self.respond_locally(
                route.local_reply(head_only=self.method == b"HEAD", close=close),
                route.status,
                "",
                close,
            )
            return
        self.cluster = ctx.clusters[route.cluster]
        self.deadline = ctx.reactor.seconds() + (
            route.timeout if route.timeout is not None else ctx.default_timeout
        )
        down.arm(self.deadline)
        if self.expect_continue and not self.request_done:
            down.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        self._pick()

    def _pick(self) -> None:
        backend = self.cluster.pick(None, self.tried or ())
        if backend is None:
            if self.tried:
                # Every backend was tried and refused: the last error stands.
                self.fail(self.status or 502, self.reason or "all backends failed")
            else:
                self.fail(503, "no healthy backend")
            return
        self.backend = backend
        self.pool = self.downstream.ctx.pools.get(backend, self.cluster.model.pool)
        conn = self.pool.take()
        if conn is not None:
            self._send(conn)
            return
        self.attempts += 1
        # Do not read a request body we have nowhere to put yet.  Paused
        # first: an endpoint may connect synchronously, and the connection
        # resumes reading once it has taken what we hold.
        self.downstream.pause_reading()
        (
            self.pool.connect()
            .addCallback(self._connected)
            .addErrback(self._connect_failed, backend)
        )

    def _connected(self, conn) -> None:
        if self.response_done or self.downstream.gone:
            # The client went away (or was answered) while we connected:
            # the fresh connection is still good for someone else.
            self.pool.release(conn)
            return
        self._send(conn)

    def _connect_failed(self, failure, backend) -> None:
        if self.response_done or self.downstream.gone:
            return
        if self.tried is None:
            self.tried = set()
        self.tried.add(backend)
        why = describe_failure(failure)
        self.downstream.ctx.backend_metrics(self.cluster, backend).connect_failures += 1
        self.reason = "%s: %s" % (backend.address, why)
        self.status = 504 if why == "connect timeout" else 502
        self._pick()
        # Outside of any dataReceived: nothing else sends the error answer.
        self.downstream.flush()

    def _send(self, conn) -> None:
        """Write the request head and what we hold of the body to C{conn}."""
        self.upstream = conn
        conn.attach(self, self.method == b"HEAD")
        conn.write(self.downstream.ctx.request_head(self))
        if self.body:
            for chunk in self.body:
                self._write_body(conn, chunk)
            self.body = []
        if self.request_done:
            self._end_body(conn)
        elif self.content_length > _STREAM_THRESHOLD or self.chunked_in:
            self._streaming_up = True
            conn.transport.registerProducer(self.downstream, True)
        conn.flush()
        self.downstream.resume_reading()

    # -- request body ---------------------------------------------------------

    def request_body(self, chunk: bytes) -> None:
        """A piece of the request body arrived from the client."""
        self.body_received += len(chunk)
        conn = self.upstream
        if conn is None:
            self.body.append(chunk)
        elif not self.response_done:
            self._write_body(conn, chunk)
            conn.flush()

    def request_complete(self) -> None:
        """The client has sent the whole request."""
        self.request_done = True
        conn = self.upstream
        if conn is not None and not self.response_done:
            self._end_body(conn)
            conn.flush()
        if self.response_done:
            self.downstream.exchange_done(self)

    def _write_body(self, conn, chunk: bytes) -> None:
        if self.chunked_in:
            conn.write(b"%x\r\n" % len(chunk))
            conn.write(chunk)
            conn.write(_CHUNK_END)
        else:
            conn.write(chunk)

    def _end_body(self, conn) -> None:
        if self.chunked_in:
            conn.write(_LAST_CHUNK)
        if self._streaming_up:
            self._stop_streaming_up(conn)
        self._body_sent = True

    def _stop_streaming_up(self, conn) -> None:
        """
        The request body stops flowing to C{conn}: unregister the client
        connection as its producer, and undo a pause the backend's full
        buffer caused, which nothing would undo once unregistered.
        """
        self._streaming_up = False
        conn.transport.unregisterProducer()
        down = self.downstream
        if down.upstream_full:
            down.resumeProducing()

    def _stop_streaming_down(self, conn) -> None:
        """As L{_stop_streaming_up}, for the response body to the client."""
        self._streaming_down = False
        self.downstream.transport.unregisterProducer()
        if conn.client_full:
            conn.resumeProducing()

    # -- response ---------------------------------------------------------------

    def response_head(self, conn, status: int, reason: bytes, headers) -> None:
        """The backend's response head was parsed."""
        if conn is not self.upstream:
            return
        self.status = status
        self.response_started = True
        self.downstream.ctx.backend_metrics(self.cluster, self.backend).observe(status)
        if not self.request_done:
            # An answer before the whole request: the rest of the body
            # cannot be told apart from a next request, so this is the last
            # response on the connection, and the head says so.
            self.close_after = True
        down = self.downstream
        down.write(down.ctx.response_head(self, status, reason, headers))

    def _stream_down(self, conn) -> None:
        if not self._streaming_down:
            self._streaming_down = True
            self.downstream.transport.registerProducer(conn, True)

    def response_body(self, chunk: bytes) -> None:
        """A piece of the response body arrived from the backend."""
        self.response_bytes += len(chunk)
        down = self.downstream
        if self.chunked_out:
            down.write(b"%x\r\n" % len(chunk))
            down.write(chunk)
            down.write(_CHUNK_END)
        else:
            down.write(chunk)
        if not self._streaming_down and self.response_bytes > _STREAM_THRESHOLD:
            self._stream_down(self.upstream)

    def response_complete(self, conn, keep_alive: bool) -> None:
        """The backend's response is complete."""
        if conn is not self.upstream:
            return
        if self.chunked_out:
            self.downstream.write(_LAST_CHUNK)
        self._release(conn, keep_alive and self._body_sent)
        self._finish()

    def _release(self, conn, reuse: bool) -> None:
        self.upstream = None
        if self._streaming_down:
            self._stop_streaming_down(conn)
        if self._streaming_up:
            self._stop_streaming_up(conn)
        conn.exchange = None
        conn.reused = True
        if reuse:
            self.pool.release(conn)
        else:
            conn.close()

    def _finish(self) -> None:
        self.response_done = True
        if not self.request_done:
            # The answer came before the whole request: the rest of the body
            # cannot be told apart from a next request without reading it.
            self.close_after = True
        self.downstream.exchange_done(self)

    # -- failures -----------------------------------------------------------------

    def upstream_failed(self, conn, why: str, status: int) -> None:
        """
        The upstream connection failed: closed, reset, or sent garbage.
        """
        if conn is not self.upstream:
            return
        self.upstream = None
        if self._streaming_down:
            self._stop_streaming_down(conn)
        if self._streaming_up:
            self._stop_streaming_up(conn)
        if (
            conn.reused
            and not self.response_started
            and not self.body_received
            and not self.chunked_in
            and self.content_length == 0
            and self.attempts < 2
        ):
            # Most likely the backend closed the idle connection just as we
            # reused it; nothing can have been processed twice.
            self.attempts += 1
            self.downstream.resume_reading()
            (
                self.pool.connect()
                .addCallback(self._connected)
                .addErrback(self._connect_failed, self.backend)
            )
            return
        self.reason = "%s: %s" % (self.backend.address, why)
        if self.response_started:
            # Part of the response is out: the only honest signal left is to
            # cut the client connection.
            self.response_done = True
            self.downstream.abort()
            return
        self.fail(status, self.reason)

    def timed_out(self) -> None:
        """The route's timeout expired before the response was complete."""
        conn = self.upstream
        self.reason = "timeout waiting for %s" % (
            self.backend.address if self.backend is not None else "a backend"
        )
        if conn is not None:
            self.upstream = None
            if self._streaming_down:
                self._stop_streaming_down(conn)
            if self._streaming_up:
                self._stop_streaming_up(conn)
            conn.abort()
        if self.response_started:
            self.response_done = True
            self.downstream.abort()
            return
        self.fail(504, self.reason)

    def fail(self, status: int, reason: str) -> None:
        """Answer the client with an error status, closing when unsure."""
        self.reason = reason
        conn = self.upstream
        if conn is not None:
            self.upstream = None
            if self._streaming_up:
                self._stop_streaming_up(conn)
            conn.abort()
        close = not self.request_done or status in (400, 408, 413, 431)
        self.respond_locally(
            local_response(status, ERROR_BODIES.get(status, b"Error\n"), close or self.close_after),
            status,
            reason,
            close,
        )

    def respond_locally(self, data: bytes, status: int, reason: str, close: bool = False) -> None:
        """Answer with C{data}, which Balance made itself."""
        self.status = status
        self.reason = reason
        self.response_started = True
        if close:
            self.close_after = True
        self.downstream.write(data)
        self._finish()
