# -*- test-case-name: tests.http.test_proxy -*-
"""
One proxied HTTP request, from its parsed head to the end of its
response: routing, picking a backend, taking a pooled connection, streaming
the request body up and the response down, and the error answers.

An L{Exchange} is created by the downstream side for every request and
talks to two peers: its C{downstream}, to answer the client, and its
upstream, to write the request (C{send_head}, C{write_body}, C{end_body})
and get the response: an L{balance.http.upstream.UpstreamConnection} it
borrowed from its backend's pool, or for a cluster with
C{upstream_protocol: h2} one stream on a shared connection
(L{balance.http.h2_upstream.H2UpstreamStream}), which also brings
response trailers.  The downstream is an HTTP/1.1 connection
(L{balance.http.h1.DownstreamConnection}) or one HTTP/2 stream
(L{balance.http.h2}): the Exchange hands it the response as a status and
fields, body chunks and an end (C{send_response_head}, C{send_body},
C{end_response}), or whole when Balance answers itself (C{send_local},
C{send_route_reply}; C{send_continue} for a 100), and the downstream frames
them for its protocol.

Resilience, per request: the cluster's circuit breakers cap requests,
waiting requests and connections (503 beyond); each try is counted on its
backend (C{backend.active}, for the load-aware policies), its outcome fed
to the backend's breaker and to outlier detection; a route with C{retry:}
gets per-try timeouts and retries with backoff within its budget (state in
L{_Tries}, allocated only for such routes); without C{retry:} a backend
that refuses a connection is skipped and the next one tried at once, as
nothing was sent.
"""

from __future__ import annotations

from balance.cluster.breaker import BreakerState, Permit
from balance.cluster.retry import MAX_REPLAY_BODY, Outcome
from balance.http import message
from balance.http.headers import upgrade_response_head
from balance.http.upstream import describe_failure
from balance.http.websocket import FrameGuard, accept_matches
from balance.observe.tracing import strip as strip_trace_headers
from balance.ratelimit.limiter import Decision

_VIA = b"1.1 balance"

# Large or unbounded bodies are streamed with flow control; small ones are
# written as they come (they fit in the socket buffers anyway), which saves
# registering a producer per request.
_STREAM_THRESHOLD = 64 * 1024

_SUCCESS = Outcome.SUCCESS
_STATUS_5XX = Outcome.STATUS_5XX
_DENIED = Permit.DENIED
_GRANTED = Permit.GRANTED
_PROBE = Permit.PROBE
_CLOSED = BreakerState.CLOSED


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


def try_attributes(ex, span) -> dict:
    """
    The attributes of the client span of C{ex}'s last try, after the
    OpenTelemetry HTTP client conventions.
    """
    backend = ex.backend
    attributes = {
        "http.request.method": ex.method.decode("latin-1"),
        "server.address": backend.host,
        "server.port": backend.port,
        "balance.upstream.address": backend.address,
    }
    if span.try_status:
        attributes["http.response.status_code"] = span.try_status
    if span.tries > 1:
        attributes["http.request.resend_count"] = span.tries - 1
    return attributes


def try_error(ex, span) -> str | None:
    """Why C{ex}'s last try failed (no response, or a 5xx), or L{None}."""
    status = span.try_status
    if status and status < 500:
        return None
    return ex.reason or ("status %d" % (status,) if status else "no response")


class _Tries:
    """
    The retry state of one request on a route with C{retry:}.

    :ivar policy: the route's L{balance.cluster.retry.RetryPolicy}.
    :ivar budget: the route's L{balance.cluster.retry.RetryBudget}.
    :ivar count: tries started so far.
    :ivar retrying: the try in flight (or the backoff before it) is a retry
        counted in the budget.
    :ivar route_deadline: when the route's C{timeout} expires.
    :ivar try_deadline: when the try in flight exceeds C{per_try_timeout}
        (0 when there is none).  The exchange's C{deadline} is the earlier
        of the two: the downstream connection's one timer serves both, so a
        per-try timeout costs no timer of its own.
    :ivar backoff: the delayed call of the next try, or L{None}.
    :ivar connecting: the connection attempt of the try in flight, or
        L{None}.
    :ivar kept: the request body so far, kept to replay it on another
        try; L{None} once it is larger than L{MAX_REPLAY_BODY}.
    :ivar timed_out: the per-try timeout cancelled the connection attempt.
    """

    __slots__ = (
        "policy",
        "budget",
        "count",
        "retrying",
        "route_deadline",
        "try_deadline",
        "backoff",
        "connecting",
        "kept",
        "timed_out",
    )

    def __init__(self, policy, budget, kept):
        self.policy = policy
        self.budget = budget
        self.count = 0
        self.retrying = False
        self.route_deadline = 0.0
        self.try_deadline = 0.0
        self.backoff = None
        self.connecting = None
        self.kept = kept
        self.timed_out = False

    def end_retry(self) -> None:
        """The try in flight, if a retry, no longer counts in the budget."""
        if self.retrying:
            self.retrying = False
            self.budget.retry_finished()


class Exchange:
    """
    One request and its response.

    Request facts are filled in by the downstream parser; the rest is the
    state of proxying it.

    :ivar reason: why the exchange ended the way it did, for the access log
        (empty when all went well).
    :ivar permit: what the breaker of C{backend} granted the try in flight
        (L{Permit.DENIED} once its outcome is recorded).
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
        "te_trailers",
        "trailers_in",
        "trailers_out",
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
        "permit",
        "rs",
        "t_sent",
        "t_head",
        "span",
        "_slot",
        "_counted",
        "proxy_header",
        "upgrade",
        "ws_key",
        "switching",
        "grpc_timeout",
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
        # The client sent "te: trailers" (an HTTP/2 backend gets it).
        self.te_trailers = False
        # Request trailers (from an HTTP/2 client) and response trailers
        # (from an HTTP/2 backend), checked: see h2_headers.safe_trailers.
        self.trailers_in = None
        self.trailers_out = None
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
        self.permit = _DENIED
        # The retry state (_Tries), for routes with retry: only.
        self.rs = None
        self.t_sent = 0.0
        # When the response head of the last try arrived (access log).
        self.t_head = 0.0
        # The tracing span (balance.observe.tracing), when tracing is on.
        self.span = None
        # Holding a request slot of the cluster's breakers (until _end).
        self._slot = False
        # The try in flight counts in backend.active (until _end_try).
        self._counted = False
        # send_proxy_protocol: the header upstream connections begin with.
        self.proxy_header = None
        # A WebSocket handshake: the client's Upgrade value and its key;
        # and the backend's 101 (reason, headers), until the tunnel starts.
        self.upgrade = None
        self.ws_key = b""
        self.switching = None
        # A gRPC call's grpc-timeout, in seconds (0: none); it bounds the
        # route's timeout.
        self.grpc_timeout = 0.0

    # -- starting ------------------------------------------------------------

    def start(self) -> None:
        """Route the request and answer it locally or send it upstream."""
        down = self.downstream
        if down.denied:
            self.fail(403, "client address denied by the listener")
            return
        ctx = down.ctx
        tracer = ctx.tracer
        if tracer is not None:
            self.span = span = tracer.begin(self.headers)
            if span.carried:
                # Replaced by the span's own headers upstream.
                self.headers = strip_trace_headers(self.headers)
        if ctx.cert_header is not None:
            # mTLS: routes see the verified client subject under the
            # listener's client_cert_header, never a value the client sent.
            self.headers = ctx.with_client_subject(self.headers, down)
        route = ctx.router.match(self.host, self.path, self.method, self.headers)
        if route is None:
            self.fail(404, "no route")
            return
        self.route = route
        if self.upgrade is not None and not route.config.websocket:
            self.fail(400, "WebSocket upgrade on a route without websocket: true")
            return
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
        self.downstream.send_local(
            self, 429, ERROR_BODIES[429], close or self.close_after, decision.reject_headers()
        )
        self.answered_locally(429, "rate limited", close)

    def _dispatch(self) -> None:
        """Answer locally or start the trip to a backend."""
        down = self.downstream
        ctx = down.ctx
        route = self.route
        if route.local_response is not None:
            close = not self.keep_alive or not self.request_done or down.draining
            down.send_route_reply(self, route, self.method == b"HEAD", close)
            self.answered_locally(route.status, "", close)
            return
        cluster = ctx.clusters.get(route.cluster)
        if cluster is None:
            # A reload removed it between this connection's routing and now.
            self.fail(503, "cluster %s no longer configured" % route.cluster)
            return
        if self.upgrade is not None and cluster.h2_scheme is not None:
            # RFC 8441 (WebSocket over HTTP/2) is not offered to backends.
            self.fail(502, "WebSocket upgrade to an upstream_protocol h2 cluster")
            return
        if not cluster.breakers.try_acquire_request():
            self.fail(503, "circuit breaker open (max_requests)")
            return
        self.cluster = cluster
        self._slot = True
        timeout = route.timeout if route.timeout is not None else ctx.default_timeout
        grpc_timeout = self.grpc_timeout
        if grpc_timeout and grpc_timeout < timeout:
            timeout = grpc_timeout
        self.deadline = ctx.reactor.seconds() + timeout
        down.arm(self.deadline, timeout)
        if ctx.retry_policies:
            retry = ctx.retry_policies.get(route)
            if retry is not None:
                self._start_tries(*retry)
        if self.expect_continue and not self.request_done:
            down.send_continue(self)
        self._pick()

    def _start_tries(self, policy, budget) -> None:
        budget.request_started()
        kept = None
        if self.content_length <= MAX_REPLAY_BODY and self.body_received <= MAX_REPLAY_BODY:
            # What arrived before routing (nothing was sent yet).
            kept = list(self.body)
        self.rs = rs = _Tries(policy, budget, kept)
        rs.route_deadline = self.deadline

    def _pick(self, backend=None) -> None:
        """
        Start a try: choose a backend (unless given one not tried yet),
        then a pooled or a new connection.
        """
        cluster = self.cluster
        down = self.downstream
        tried = self.tried
        if backend is None:
            backend = cluster.pick_request(down.client_ip, self.headers, self.path, tried or ())
        rs = self.rs
        if backend is None and tried and rs is not None:
            # A retry with every other backend tried: the same ones again.
            backend = cluster.pick_request(down.client_ip, self.headers, self.path)
        if backend is not None:
            breaker = backend.breaker
            # allow() of a closed breaker, inlined: GRANTED.
            permit = _GRANTED if breaker.state is _CLOSED else breaker.allow()
            if not permit:
                backend, permit = self._past_breakers(backend)
        if backend is None:
            if tried:
                # Every backend was tried and refused: the last error stands.
                self.fail(self.status or 502, self.reason or "all backends failed")
            else:
                self.fail(
                    503,
                    "no eligible backend",
                    b"Retry-After: %d\r\n" % (cluster.retry_after(),),
                )
            return
        span = self.span
        if span is not None and span.recording:
            self._trace_try(span)
        self.backend = backend
        self.permit = permit
        cluster.started(backend)
        self._counted = True
        if rs is not None:
            rs.count += 1
            timeout = rs.policy.per_try_timeout
            if timeout is not None:
                rs.try_deadline = deadline = down.ctx.reactor.seconds() + timeout
                if deadline < rs.route_deadline:
                    self.deadline = deadline
                    down.arm(deadline, timeout)
        model = cluster.model
        self.pool = down.ctx.pools.get(backend, model.pool, cluster.h2_scheme)
        if model.send_proxy_protocol is not None:
            self.proxy_header = down.ctx.proxy_header(down, model.send_proxy_protocol)
        # An upgrade goes on a fresh connection, which becomes the tunnel's.
        conn = self.pool.take(self.proxy_header) if self.upgrade is None else None
        if conn is not None:
            self._send(conn)
            return
        self._connect()

    def _trace_try(self, span) -> None:
        """A try starts: end the client span of the one before, begin its own."""
        tracer = self.downstream.ctx.tracer
        if span.try_id is not None:
            tracer.end_try(span, try_attributes(self, span), try_error(self, span))
        tracer.begin_try(span)

    def _past_breakers(self, backend):
        """
        C{backend}'s breaker refused: pick among the others whose breaker
        lets the try through.

        :return: C{(backend, permit)}, or C{(None, DENIED)}.
        """
        down = self.downstream
        exclude = set(self.tried or ())
        while backend is not None:
            exclude.add(backend)
            backend = self.cluster.pick_request(down.client_ip, self.headers, self.path, exclude)
            if backend is not None:
                permit = backend.breaker.allow()
                if permit:
                    return backend, permit
        return None, _DENIED

    def _connect(self) -> None:
        """Open a new connection to C{self.backend}, within the breakers' limits."""
        breakers = self.cluster.breakers
        if not breakers.try_acquire_pending():
            self.fail(503, "circuit breaker open (max_pending)")
            return
        if not breakers.try_acquire_connection():
            breakers.release_pending()
            self.fail(503, "circuit breaker open (max_connections)")
            return
        self.attempts += 1
        # Do not read a request body we have nowhere to put yet.  Paused
        # first: an endpoint may connect synchronously, and the connection
        # resumes reading once it has taken what we hold.
        self.downstream.pause_reading()
        pool = self.pool
        d = pool.connect(self.proxy_header)
        if self.rs is not None:
            self.rs.connecting = d
        d.addCallbacks(
            self._connected,
            self._connect_failed,
            callbackArgs=(pool, breakers),
            errbackArgs=(self.backend, breakers),
        )

    def _connected(self, conn, pool, breakers) -> None:
        breakers.release_pending()
        # The connection holds its slot until it closes.
        conn.breakers = breakers
        if self.rs is not None:
            self.rs.connecting = None
        if self.response_done or self.downstream.gone:
            # The client went away (or was answered) while we connected:
            # the fresh connection is still good for someone else.
            pool.release(conn)
            return
        self._send(conn)

    def _connect_failed(self, failure, backend, breakers) -> None:
        breakers.release_pending()
        breakers.release_connection()
        rs = self.rs
        if rs is not None:
            rs.connecting = None
        if self.response_done or self.downstream.gone:
            return
        why = describe_failure(failure)
        if rs is not None and rs.timed_out:
            rs.timed_out = False
            why = "connect timeout (per_try_timeout)"
        self.downstream.ctx.backend_metrics(self.cluster, backend).connect_failures += 1
        self._end_try(Outcome.CONNECT_FAILURE)
        self.reason = "%s: %s" % (backend.address, why)
        self.status = 504 if why.startswith("connect timeout") else 502
        if rs is None:
            # Nothing was sent: the next backend, at once.
            self._pick()
        elif not why.startswith("connect timeout") and self._fail_over():
            pass
        elif self._may_retry(Outcome.CONNECT_FAILURE, False):
            self._schedule_retry(False)
        else:
            self.fail(self.status, self.reason)
        # Outside of any dataReceived: nothing else sends the error answer.
        self.downstream.flush()

    # -- tries ----------------------------------------------------------------

    def _end_try(self, outcome: Outcome | None = None) -> None:
        """
        The try in flight is over: count it off its backend, and feed its
        C{outcome} to the breaker and outlier detection (L{None}: it was
        abandoned, or its outcome was already recorded).  A backend that
        failed is not tried again while others are left.
        """
        if not self._counted:
            return
        self._counted = False
        span = self.span
        if span is not None and span.try_id is not None:
            self.downstream.ctx.tracer.try_ended(span)
        backend = self.backend
        cluster = self.cluster
        permit = self.permit
        self.permit = _DENIED
        if outcome is not None:
            cluster.record(backend, outcome, permit)
            if outcome is not _SUCCESS:
                if self.tried is None:
                    self.tried = set()
                self.tried.add(backend)
        elif permit is _PROBE:
            backend.breaker.release(permit)
        cluster.finished(backend)
        rs = self.rs
        if rs is not None:
            if rs.try_deadline:
                self._clear_try_deadline(rs)
            rs.end_retry()

    def _fail_over(self) -> bool:
        """
        A connection was refused (or unreachable): the backend never saw the
        request.  Try the next backend at once, as without C{retry:}, and
        outside the budget (which guards backends against retry storms; a
        refused connection cost nobody anything): a retry policy must never
        make failover worse than none.

        :return: whether a backend not tried yet took the request.
        """
        down = self.downstream
        backend = self.cluster.pick_request(
            down.client_ip, self.headers, self.path, self.tried or ()
        )
        if backend is None:
            return False
        # _end_try, before, ended this try's claim on the budget.
        self._pick(backend)
        return True

    def _may_retry(self, outcome: Outcome, sent: bool, status: int = 0) -> bool:
        """
        Whether the try that just ended gets another one: the route's
        policy (attempts, method, replayable body, C{on:}) and its budget.
        """
        rs = self.rs
        # This try's own claim on the budget is over.
        rs.end_retry()
        replayable = not sent or (self.request_done and rs.kept is not None)
        if not rs.policy.should_retry(rs.count, outcome, self.method, sent, status, replayable):
            return False
        if not rs.budget.can_retry():
            self.reason = (self.reason + " " if self.reason else "") + "(retry budget exhausted)"
            return False
        return True

    def _schedule_retry(self, sent: bool) -> None:
        """Start the backoff before the next try, on another backend if there is one."""
        rs = self.rs
        rs.budget.retry_started()
        rs.retrying = True
        if sent:
            # The body goes again, from the copy kept.
            self.body = list(rs.kept)
            self._body_sent = False
        rs.backoff = self.downstream.ctx.reactor.callLater(
            rs.policy.delay(rs.count), self._next_try
        )

    def _next_try(self) -> None:
        self.rs.backoff = None
        if self.response_done or self.downstream.gone:
            return
        self._pick()
        self.downstream.flush()

    def _try_timed_out(self) -> None:
        """The try in flight took longer than C{retry.per_try_timeout}."""
        rs = self.rs
        self._clear_try_deadline(rs)
        d = rs.connecting
        if d is not None:
            # Not even connected: nothing was sent, so this is a connect
            # failure (_connect_failed takes it from here).
            rs.timed_out = True
            d.cancel()
            return
        conn = self.upstream
        if conn is None or self.response_started:
            return
        self._detach(conn)
        conn.abort()
        self.reason = "per_try_timeout waiting for %s" % (self.backend.address,)
        self.status = 504
        self._end_try(Outcome.TIMEOUT)
        if self._may_retry(Outcome.TIMEOUT, True):
            self._schedule_retry(True)
        else:
            self.fail(504, self.reason)
        self.downstream.flush()

    def _clear_try_deadline(self, rs: _Tries) -> None:
        """The try in flight got its response head, or ended: only the route's deadline is left."""
        rs.try_deadline = 0.0
        self.deadline = rs.route_deadline

    def _detach(self, conn) -> None:
        """Stop using C{conn} (it is closed by the caller)."""
        self.upstream = None
        if self._streaming_down:
            self._stop_streaming_down(conn)
        if self._streaming_up:
            self._stop_streaming_up(conn)

    def _send(self, conn) -> None:
        """Write the request head and what we hold of the body to C{conn}."""
        self.upstream = conn
        conn.attach(self, self.method == b"HEAD")
        ctx = self.downstream.ctx
        if self.cluster.measures_latency or ctx.access_log is not None or ctx.tracer is not None:
            self.t_sent = ctx.reactor.seconds()
        conn.send_head(self)
        if self.body:
            for chunk in self.body:
                conn.write_body(self, chunk)
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
        rs = self.rs
        if rs is not None and rs.kept is not None:
            if self.body_received > MAX_REPLAY_BODY:
                rs.kept = None
            else:
                rs.kept.append(chunk)
        conn = self.upstream
        if conn is None:
            self.body.append(chunk)
        elif not self.response_done:
            conn.write_body(self, chunk)
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

    def _end_body(self, conn) -> None:
        conn.end_body(self)
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
        span = self.span
        if span is not None:
            span.try_status = status
        down = self.downstream
        backend = self.backend
        cluster = self.cluster
        down.ctx.backend_metrics(cluster, backend).observe(status)
        outcome = _SUCCESS if status < 500 else _STATUS_5XX
        rs = self.rs
        if rs is not None:
            if rs.try_deadline:
                self._clear_try_deadline(rs)
            if status >= rs.policy.lowest_status and self._may_retry(outcome, True, status):
                # Not for the client: the rest of this response is dropped
                # with its connection, and another try goes.
                self._detach(conn)
                conn.abort()
                self.status = status
                self.reason = "%s: status %d" % (backend.address, status)
                self._end_try(outcome)
                self._schedule_retry(True)
                return
        permit = self.permit
        if permit is not _GRANTED or backend.breaker.failures or cluster.outlier is not None:
            # Else the breaker would change nothing: skip the calls.
            cluster.record(backend, outcome, permit)
        self.permit = _DENIED
        ctx = down.ctx
        if cluster.measures_latency or ctx.access_log is not None or ctx.tracer is not None:
            self.t_head = now = ctx.reactor.seconds()
            if cluster.measures_latency:
                cluster.observe(backend, now - self.t_sent)
        self.status = status
        if status == 101:
            # Answered once the parser stops at the end of this head and
            # the bytes after it are known (switch_protocols).
            self.switching = (reason, headers)
            return
        self.response_started = True
        if not self.request_done:
            # An answer before the whole request: the rest of the body
            # cannot be told apart from a next request, so this is the last
            # response on the connection, and the head says so.
            self.close_after = True
        sticky = cluster.sticky
        cookie = None if sticky is None else sticky.set_cookie_for(self.headers, backend)
        down.send_response_head(self, status, reason, headers, cookie)

    def _stream_down(self, conn) -> None:
        if not self._streaming_down:
            self._streaming_down = True
            self.downstream.transport.registerProducer(conn, True)

    def response_body(self, chunk: bytes) -> None:
        """A piece of the response body arrived from the backend."""
        self.response_bytes += len(chunk)
        self.downstream.send_body(self, chunk)
        if not self._streaming_down and self.response_bytes > _STREAM_THRESHOLD:
            self._stream_down(self.upstream)

    def response_trailers(self, conn, fields) -> None:
        """
        The backend's response trailers (HTTP/2 backends), checked, passed
        on as the downstream can: HEADERS for HTTP/2, the last chunk of a
        chunked HTTP/1.1 body, else dropped.
        """
        if conn is self.upstream and fields:
            self.trailers_out = fields

    def response_complete(self, conn, keep_alive: bool) -> None:
        """The backend's response is complete."""
        if conn is not self.upstream:
            return
        self.downstream.end_response(self)
        # A connection that carried an upgrade request is not reused, even
        # when the backend declined it.
        self._release(conn, keep_alive and self._body_sent and self.upgrade is None)
        self._finish()

    def switch_protocols(self, conn, rest: bytes) -> None:
        """
        The backend answered the upgrade with C{101}; C{rest} is what it sent
        after that head.  If it accepted the client's key, the 101 goes to
        the client and both connections become a tunnel; else 502.
        """
        if conn is not self.upstream:
            return
        reason, headers = self.switching
        self.switching = None
        if not accept_matches(self.ws_key, headers):
            why = "%s: 101 without the right Sec-WebSocket-Accept" % (self.backend.address,)
            self.fail(502, why)
            return
        self.upstream = None
        self.response_started = True
        conn.exchange = None
        down = self.downstream
        down.write(upgrade_response_head(self, reason, headers))
        down.flush()
        guard = None
        limits = down.ctx.ws_limits.get(self.route) if down.ctx.ws_limits else None
        if limits is not None:
            guard = FrameGuard(*limits)
        down.start_tunnel(self, conn, rest, guard)

    def tunnel_done(self, tunnel, conn) -> None:
        """
        The tunnel of an upgraded request closed, and with it C{conn}, the
        backend connection it took over: the exchange is over.
        """
        conn._closed = True
        breakers, conn.breakers = conn.breakers, None
        if breakers is not None:
            breakers.release_connection()
        self.body_received = tunnel.client_bytes
        self.response_bytes = tunnel.backend_bytes
        self.reason = tunnel.reason
        self.response_done = True
        if self._slot:
            self._end()

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
        if self._slot:
            self._end()
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
        self._detach(conn)
        unsent = conn.unsent
        if unsent is not None and not self.response_started and self.attempts < 3:
            # An HTTP/2 backend refused the stream (REFUSED_STREAM, or above
            # its GOAWAY's last stream): nothing of it was processed, and
            # its body is at hand, so it goes again on another connection.
            self.body = unsent + self.body
            self._body_sent = False
            self._connect()
            return
        if (
            conn.reused
            and not self.response_started
            and not self.body_received
            and not self.chunked_in
            and self.content_length == 0
            and self.attempts < 2
        ):
            # Most likely the backend closed the idle connection just as we
            # reused it; nothing can have been processed twice.  The same
            # try goes on, on a fresh connection.
            self._connect()
            return
        self.reason = "%s: %s" % (self.backend.address, why)
        if self.response_started:
            # Part of the response is out: the only honest signal left is to
            # cut the client connection.
            self._end_try(Outcome.RESET)
            self.response_done = True
            self._end()
            self.downstream.abort()
            return
        self._end_try(Outcome.RESET)
        if self.rs is not None and self._may_retry(Outcome.RESET, True):
            self.status = status
            self._schedule_retry(True)
            return
        self.fail(status, self.reason)

    def timed_out(self) -> None:
        """
        The exchange's C{deadline} passed: the try's C{per_try_timeout}
        (see L{_try_timed_out}), or the route's timeout before the response
        was complete, which counts as a failed try and is never retried.
        """
        rs = self.rs
        if (
            rs is not None
            and rs.try_deadline
            and self.downstream.ctx.reactor.seconds() < rs.route_deadline
        ):
            self._try_timed_out()
            return
        conn = self.upstream
        self.reason = "timeout waiting for %s" % (
            self.backend.address if self.backend is not None else "a backend"
        )
        # Still waiting for the client's body (the backend taking it as it
        # comes), or for the client to read the response: its delay, not the
        # backend's.  Blaming the backend would let slow clients open its
        # breaker and eject it for everyone.
        slow_body = not self.request_done and not self.downstream.upstream_full
        client_slow = slow_body or (conn is not None and conn.client_full)
        if slow_body:
            self.reason = "request body not received in time"
        elif client_slow:
            self.reason = "client did not read the response in time"
        if conn is not None:
            self._detach(conn)
            conn.abort()
        self._end_try(None if client_slow else Outcome.TIMEOUT)
        if self.response_started:
            self.response_done = True
            self._end()
            self.downstream.abort()
            return
        self.fail(408 if slow_body else 504, self.reason)

    def abandon(self) -> None:
        """
        The client connection is gone: drop the upstream side, and give
        back what the exchange holds (request slot, try, budget).
        """
        if not self.response_done:
            self.response_done = True
            conn = self.upstream
            if conn is not None:
                self.upstream = None
                conn.abort()
        if self._slot:
            self._end()

    def _end(self) -> None:
        """The exchange is over, however it ended: give back what it holds."""
        self._slot = False
        if self._counted:
            self._end_try()
        rs = self.rs
        if rs is not None:
            backoff = rs.backoff
            if backoff is not None:
                rs.backoff = None
                if backoff.active():
                    backoff.cancel()
            rs.end_retry()
            rs.budget.request_finished()
        self.cluster.breakers.release_request()

    def fail(self, status: int, reason: str, extra: bytes = b"") -> None:
        """
        Answer the client with an error status, closing when unsure.

        :param extra: further header lines (C{Retry-After}), each ending
            in CRLF.
        """
        self.reason = reason
        conn = self.upstream
        if conn is not None:
            self.upstream = None
            if self._streaming_up:
                self._stop_streaming_up(conn)
            conn.abort()
        close = not self.request_done or status in (400, 408, 413, 431)
        self.downstream.send_local(
            self, status, ERROR_BODIES.get(status, b"Error\n"), close or self.close_after, extra
        )
        self.answered_locally(status, reason, close)

    def answered_locally(self, status: int, reason: str, close: bool = False) -> None:
        """
        The downstream was just handed a whole response Balance made
        itself (C{send_local}, C{send_route_reply}): the exchange is over.
        """
        self.status = status
        self.reason = reason
        self.response_started = True
        if close:
            self.close_after = True
        self._finish()
