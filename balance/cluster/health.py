# -*- test-case-name: tests.cluster.test_health,tests.integration.test_health -*-
"""
Active health checks (C{health_check:}): probe every backend of a cluster
on a timer and take it out of load balancing (C{backend.healthy = False})
after C{unhealthy_threshold} consecutive failed probes, back in after
C{healthy_threshold} consecutive good ones.

Two layers:

 - L{HealthState}, a pure threshold state machine per backend
   (C{record(ok, reason) -> Transition | None}), with no reactor at all;
 - L{HealthChecker}, a service that schedules probes with jitter on the
   injected reactor, runs each as one L{Deferred} chain bounded by
   C{addTimeout(timeout)} (a probe that hangs is cancelled and its
   connection aborted), feeds the verdicts to the L{HealthState}s, writes
   C{backend.healthy}, logs each change once and calls hooks for metrics.

Probes: C{tcp} connects and closes; C{http} sends C{GET path} (HTTP/1.1,
C{Connection: close}, C{User-Agent: balance-health/1}) and parses the
response with httptools: the status must be one of C{expect_status} and,
if C{expect_body} is set, the substring must occur in the first
L{MAX_BODY} bytes of the body.  In clusters with C{upstream_protocol: h2}
the same C{GET} goes as one HTTP/2 stream on a new connection (prior
knowledge, or ALPN C{h2} under the cluster's TLS), as the cluster's
requests do.  C{grpc} calls C{grpc.health.v1.Health/Check} for C{service}
over HTTP/2 (Envoy's gRPC health check): it passes on C{grpc-status: 0}
with C{SERVING}.

Initial state.  A backend starts I{unknown}, which counts as healthy, and
its first verdict alone decides: one failed first probe marks it DOWN, one
good one confirms it UP (from then on the thresholds apply).  This is
HAProxy's default.  Envoy instead holds traffic until the first check
passes; Balance does not, because a reload or restart must not black-hole a
cluster whose backends are fine for the first interval, and a backend that
is really dead is still taken out after one probe (and, meanwhile, connect
failover and outlier detection keep requests away from it).  Backends that
are already marked unhealthy when the checker starts (kept across a reload)
start DOWN and need C{healthy_threshold} good probes.

Timing.  The first probe of each backend runs after a random delay of up
to 10% of C{interval}; each next one C{interval} +-10% (injected random)
after the previous probe ended, so probes never overlap and the backends of
a cluster, and clusters started together, do not probe in lockstep.  A
backend that stops answering is therefore DOWN after at most
C{unhealthy_threshold x (interval x 1.1 + timeout)}.
"""

from __future__ import annotations

import enum
import random as _random
import urllib.parse
from collections.abc import Callable

import h2.config
import h2.connection
import h2.events
import h2.exceptions
import httptools
from attrs import frozen
from twisted.application.service import Service
from twisted.internet import defer, error
from twisted.internet.defer import Deferred, maybeDeferred, succeed
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure

from balance.config import model

#: Body bytes an http probe reads at most when looking for C{expect_body}.
MAX_BODY = 64 * 1024

#: Probe intervals vary by up to this fraction either way.
JITTER = 0.1

USER_AGENT = b"balance-health/1"

#: The probes' side of HTTP/2: answers are checked by h2 as they come.
_H2_CONFIG = h2.config.H2Configuration(client_side=True, header_encoding=None)

#: The method a C{grpc} probe calls.
GRPC_HEALTH_CHECK = "/grpc.health.v1.Health/Check"


class Health(enum.Enum):
    """What the health checks say of a backend."""

    #: Not probed yet: counts as healthy; the first verdict decides.
    UNKNOWN = "unknown"
    UP = "UP"
    DOWN = "DOWN"


@frozen
class Transition:
    """
    A backend's health changed.

    :ivar healthy: the new state: L{True} for UP.
    :ivar count: the consecutive verdicts that caused it.
    :ivar reason: why the last probe failed (for DOWN), else L{None}.
    """

    healthy: bool
    count: int
    reason: str | None = None


# (state, probe passed) -> the state it leads to once enough consecutive
# verdicts agree; how many is _needed() below.  Pairs not listed change
# nothing but the counters.
_TRANSITIONS: dict[tuple[Health, bool], Health] = {
    (Health.UNKNOWN, True): Health.UP,
    (Health.UNKNOWN, False): Health.DOWN,
    (Health.UP, False): Health.DOWN,
    (Health.DOWN, True): Health.UP,
}


class HealthState:
    """
    The threshold logic of one backend's health: consecutive verdicts
    against thresholds.  Pure: no clock, no I/O.

    :ivar state: the L{Health}.
    :ivar successes: consecutive passed probes so far.
    :ivar failures: consecutive failed probes so far.
    """

    __slots__ = ("state", "healthy_threshold", "unhealthy_threshold", "successes", "failures")

    def __init__(
        self,
        healthy_threshold: int,
        unhealthy_threshold: int,
        initial: Health = Health.UNKNOWN,
    ):
        """
        :param healthy_threshold: consecutive passed probes that bring a
            DOWN backend UP, at least 1.
        :param unhealthy_threshold: consecutive failed probes that take an
            UP backend DOWN, at least 1.
        :param initial: where to start; see the module docstring.
        """
        if healthy_threshold < 1 or unhealthy_threshold < 1:
            raise ValueError(
                "health check thresholds must be at least 1, got "
                f"healthy {healthy_threshold} and unhealthy {unhealthy_threshold}"
            )
        self.state = initial
        self.healthy_threshold = healthy_threshold
        self.unhealthy_threshold = unhealthy_threshold
        self.successes = 0
        self.failures = 0

    @property
    def healthy(self) -> bool:
        """Whether the backend may get work (UP or not yet probed)."""
        return self.state is not Health.DOWN

    def _needed(self, target: Health) -> int:
        if self.state is Health.UNKNOWN:
            return 1
        return self.healthy_threshold if target is Health.UP else self.unhealthy_threshold

    def record(self, ok: bool, reason: str | None = None) -> Transition | None:
        """
        Count one probe's verdict.

        :param ok: whether the probe passed.
        :param reason: why it failed, a short phrase.
        :return: a L{Transition} when this verdict flips the backend
            between healthy and unhealthy, else L{None} (including the
            silent UNKNOWN -> UP confirmation).
        """
        if ok:
            self.successes += 1
            self.failures = 0
            count = self.successes
        else:
            self.failures += 1
            self.successes = 0
            count = self.failures
        target = _TRANSITIONS.get((self.state, ok))
        if target is None or count < self._needed(target):
            return None
        was_healthy = self.healthy
        self.state = target
        if self.healthy == was_healthy:
            return None
        return Transition(healthy=ok, count=count, reason=None if ok else reason)


class ProbeFailed(Exception):
    """
    A probe got an answer, and it was wrong.

    :ivar reason: what was wrong, a short phrase for the log.
    """

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


def describe(reason: Failure) -> str:
    """Say in a few words why a probe failed, for the log."""
    if reason.check(ProbeFailed):
        return reason.value.reason
    if reason.check(error.ConnectionRefusedError):
        return "connection refused"
    if reason.check(defer.TimeoutError, error.TimeoutError, error.TCPTimedOutError):
        return "timed out"
    if reason.check(error.DNSLookupError):
        return "host name did not resolve"
    if reason.check(error.NoRouteError):
        return "no route to host"
    if reason.check(error.ConnectionDone):
        return "connection closed before a complete response"
    if reason.check(error.ConnectionLost):
        return "connection reset before a complete response"
    return reason.getErrorMessage()


class _OpenProbes:
    """The probe connections open now, to wait for them on stop."""

    def __init__(self):
        self.open: set[Protocol] = set()
        self._waiting: list[Deferred] = []

    def opened(self, protocol: Protocol) -> None:
        self.open.add(protocol)

    def closed(self, protocol: Protocol) -> None:
        self.open.discard(protocol)
        if not self.open:
            waiting, self._waiting = self._waiting, []
            for d in waiting:
                d.callback(None)

    def wait(self) -> Deferred:
        if not self.open:
            return succeed(None)
        d = Deferred()
        self._waiting.append(d)
        return d


class _ProbeProtocol(Protocol):
    """
    The common part of the probes: C{result} fires with L{None} when the
    probe passed, or fails with L{ProbeFailed} or the connection's error.
    Cancelling C{result} aborts the connection.
    """

    def __init__(self, tracker: _OpenProbes | None):
        self.result: Deferred = Deferred(self._cancel)
        self._tracker = tracker

    def connectionMade(self):
        if self._tracker is not None:
            self._tracker.opened(self)

    def connectionLost(self, reason=None):
        if self._tracker is not None:
            self._tracker.closed(self)
        if not self.result.called:
            self._lost(reason)

    def _lost(self, reason) -> None:
        self.result.errback(reason)

    def _cancel(self, result: Deferred) -> None:
        # A hanging probe: drop the connection now rather than wait for
        # the backend to notice.  result fails with CancelledError.
        self.transport.abortConnection()

    def _passed(self) -> None:
        if not self.result.called:
            self.result.callback(None)
            self.transport.loseConnection()

    def _failed(self, reason: str) -> None:
        if not self.result.called:
            self.result.errback(ProbeFailed(reason))
            self.transport.loseConnection()


class _TCPProbe(_ProbeProtocol):
    """Passes as soon as the connection is made, and closes it."""

    def connectionMade(self):
        super().connectionMade()
        self._passed()


class _HTTPProbe(_ProbeProtocol):
    """Sends one request and judges the response as it is parsed."""

    def __init__(self, tracker, request: bytes, expect_status, expect_body: bytes | None):
        super().__init__(tracker)
        self._request = request
        self._expect_status = expect_status
        self._expect_body = expect_body
        self._parser = None
        self._status = 0
        self._body = b""

    def connectionMade(self):
        super().connectionMade()
        self._parser = httptools.HttpResponseParser(self)
        self.transport.write(self._request)

    def dataReceived(self, data: bytes):
        if self.result.called:
            return
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._failed("unexpected protocol upgrade")
        except httptools.HttpParserError as e:
            self._failed(f"malformed response ({e})")

    def _lost(self, reason) -> None:
        if self._status and self._expect_body is not None and reason.check(error.ConnectionDone):
            # A body delimited by the end of the connection ended without
            # the expected text.
            self._failed(self._body_missing())
        else:
            super()._lost(reason)

    def _body_missing(self) -> str:
        return f"body does not contain {self._expect_body.decode('utf-8', 'replace')!r}"

    # httptools callbacks

    def on_headers_complete(self):
        self._got_status(self._parser.get_status_code())

    def on_body(self, body: bytes):
        self._got_body(body)

    def on_message_complete(self):
        self._got_end()

    # the verdict, whichever protocol carried the response

    def _got_status(self, status: int) -> None:
        if self.result.called:
            return
        if status < 200:
            # An interim response (103 Early Hints): the real one follows.
            return
        self._status = status
        if status not in self._expect_status:
            self._failed(f"status {status}")
        elif self._expect_body is None:
            self._passed()

    def _got_body(self, body: bytes) -> None:
        if self.result.called or not self._status:
            return
        expect = self._expect_body
        # Search only where a match could newly start: the tail of what was
        # searched before, plus the new bytes.
        start = max(0, len(self._body) - len(expect) + 1)
        self._body = (self._body + body)[:MAX_BODY]
        if self._body.find(expect, start) >= 0:
            self._passed()
        elif len(self._body) >= MAX_BODY:
            self._failed(f"{self._body_missing()} in its first {MAX_BODY // 1024} KiB")

    def _got_end(self) -> None:
        if self.result.called or not self._status:
            return
        self._failed(self._body_missing())


class _H2Stream:
    """
    One request on a new HTTP/2 connection (prior knowledge, or ALPN C{h2}
    under the cluster's backend TLS), for the probes of clusters with
    C{upstream_protocol: h2}.  It feeds what comes back to its probe:
    C{_got_status(status)}, C{_got_body(data)}, C{_got_end()} and, for
    gRPC, C{_got_fields(headers)} with the response headers and trailers.
    """

    __slots__ = ("_probe", "_conn")

    def __init__(self, probe: _ProbeProtocol):
        self._probe = probe
        self._conn = h2.connection.H2Connection(_H2_CONFIG)

    def start(self, transport, headers: list, body: bytes = b"") -> None:
        conn = self._conn
        conn.initiate_connection()
        conn.send_headers(1, headers, end_stream=not body)
        if body:
            conn.send_data(1, body, end_stream=True)
        transport.write(conn.data_to_send())

    def received(self, transport, data: bytes) -> None:
        probe = self._probe
        try:
            events = self._conn.receive_data(data)
        except h2.exceptions.ProtocolError as e:
            probe._failed(f"malformed HTTP/2 response ({e.__class__.__name__})")
            return
        for event in events:
            if probe.result.called:
                return
            if isinstance(event, h2.events.ResponseReceived):
                fields = dict(event.headers)
                probe._got_fields(fields)
                try:
                    status = int(fields.get(b":status", b""))
                except ValueError:
                    probe._failed("malformed HTTP/2 response (bad :status)")
                    return
                probe._got_status(status)
            elif isinstance(event, h2.events.DataReceived):
                self._conn.acknowledge_received_data(event.flow_controlled_length, 1)
                probe._got_body(event.data)
            elif isinstance(event, h2.events.TrailersReceived):
                probe._got_fields(dict(event.headers))
            elif isinstance(event, h2.events.StreamEnded):
                probe._got_end()
            elif isinstance(event, h2.events.StreamReset):
                probe._failed(f"stream reset ({_h2_error(event.error_code)})")
            elif isinstance(event, h2.events.ConnectionTerminated):
                probe._failed(f"connection refused the probe ({_h2_error(event.error_code)})")
        out = self._conn.data_to_send()
        if out and not probe.result.called:
            transport.write(out)


def _h2_error(code) -> str:
    return getattr(code, "name", str(code))


class _H2HTTPProbe(_HTTPProbe):
    """The C{http} probe of a cluster whose backends speak HTTP/2."""

    def __init__(self, tracker, headers: list, expect_status, expect_body: bytes | None):
        super().__init__(tracker, b"", expect_status, expect_body)
        self._headers = headers
        self._stream = _H2Stream(self)

    def connectionMade(self):
        _ProbeProtocol.connectionMade(self)
        self._stream.start(self.transport, self._headers)

    def dataReceived(self, data: bytes):
        if not self.result.called:
            self._stream.received(self.transport, data)

    def _lost(self, reason) -> None:
        _ProbeProtocol._lost(self, reason)

    def _got_fields(self, fields: dict) -> None:
        pass


#: C{grpc.health.v1.HealthCheckResponse.ServingStatus}, by number.
GRPC_SERVING_STATUS = {0: "UNKNOWN", 1: "SERVING", 2: "NOT_SERVING", 3: "SERVICE_UNKNOWN"}

#: The gRPC status codes, by number, for the log.
GRPC_STATUS = (
    "OK CANCELLED UNKNOWN INVALID_ARGUMENT DEADLINE_EXCEEDED NOT_FOUND "
    "ALREADY_EXISTS PERMISSION_DENIED RESOURCE_EXHAUSTED FAILED_PRECONDITION "
    "ABORTED OUT_OF_RANGE UNIMPLEMENTED INTERNAL UNAVAILABLE DATA_LOSS "
    "UNAUTHENTICATED"
).split()


def _varint(data: bytes, i: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if i >= len(data) or shift > 63:
            raise ValueError("truncated varint")
        byte = data[i]
        i += 1
        value |= (byte & 0x7F) << shift
        shift += 7
        if not byte & 0x80:
            return value, i


def grpc_health_request(service: str) -> bytes:
    """
    The length-prefixed gRPC message of a C{grpc.health.v1.HealthCheckRequest}
    asking about C{service} (C{""}: the server as a whole).
    """
    name = service.encode("utf-8")
    message = b""
    if name:
        size, length = len(name), b""
        while True:
            low, size = size & 0x7F, size >> 7
            length += bytes((low | 0x80 if size else low,))
            if not size:
                break
        message = b"\x0a" + length + name
    return b"\x00" + len(message).to_bytes(4, "big") + message


def grpc_serving_status(message: bytes) -> int:
    """
    The C{status} field of a serialized C{HealthCheckResponse} (0, unknown,
    when absent, as proto3 has it).

    :raise ValueError: if C{message} is not a well-formed protobuf message.
    """
    status, i = 0, 0
    while i < len(message):
        key, i = _varint(message, i)
        field, wire = key >> 3, key & 7
        if wire == 0:
            value, i = _varint(message, i)
            if field == 1:
                status = value
        elif wire == 2:
            size, i = _varint(message, i)
            i += size
        elif wire == 5:
            i += 4
        elif wire == 1:
            i += 8
        else:
            raise ValueError(f"unexpected wire type {wire}")
        if i > len(message):
            raise ValueError("truncated field")
    return status


class _GRPCProbe(_ProbeProtocol):
    """
    The C{grpc} probe: one C{grpc.health.v1.Health/Check} call, as Envoy's
    gRPC health checker makes it; it passes when the call ends with
    C{grpc-status: 0} and the answer says C{SERVING}.
    """

    def __init__(self, tracker, headers: list, request: bytes):
        super().__init__(tracker)
        self._headers = headers
        self._request = request
        self._stream = _H2Stream(self)
        self._status = 0
        self._fields: dict = {}
        self._body = b""

    def connectionMade(self):
        super().connectionMade()
        self._stream.start(self.transport, self._headers, self._request)

    def dataReceived(self, data: bytes):
        if not self.result.called:
            self._stream.received(self.transport, data)

    def _got_fields(self, fields: dict) -> None:
        self._fields.update(fields)

    def _got_status(self, status: int) -> None:
        if status >= 200:
            self._status = status
            if status != 200:
                self._failed(f"status {status}")

    def _got_body(self, body: bytes) -> None:
        if self.result.called:
            return
        if len(self._body) + len(body) > MAX_BODY:
            self._failed(f"answer longer than {MAX_BODY // 1024} KiB")
            return
        self._body += body

    def _got_end(self) -> None:
        if self.result.called:
            return
        fields = self._fields
        code = fields.get(b"grpc-status")
        if code is None:
            self._failed("no grpc-status in the answer")
            return
        if code != b"0":
            name = GRPC_STATUS[int(code)] if code.isdigit() and int(code) < 17 else ""
            why = f"grpc-status {code.decode('ascii', 'replace')} {name}".rstrip()
            message = fields.get(b"grpc-message")
            if message:
                why += f": {urllib.parse.unquote(message.decode('ascii', 'replace'))}"
            self._failed(why)
            return
        body = self._body
        if len(body) < 5 or int.from_bytes(body[1:5], "big") != len(body) - 5:
            self._failed("malformed gRPC answer (not one message)")
            return
        if body[0]:
            self._failed("malformed gRPC answer (compressed, though none was offered)")
            return
        try:
            status = grpc_serving_status(body[5:])
        except ValueError as e:
            self._failed(f"malformed gRPC answer ({e})")
            return
        if status != 1:
            self._failed(GRPC_SERVING_STATUS.get(status, f"serving status {status}"))
        else:
            self._passed()


class _ProbeFactory(Factory):
    noisy = False

    def __init__(self, make: Callable[[], _ProbeProtocol]):
        self._make = make

    def buildProtocol(self, addr):
        return self._make()


def _result_of(protocol: _ProbeProtocol) -> Deferred:
    return protocol.result


def _timed_out(result, timeout: float):
    # Whatever the cancelled chain failed with (CancelledError, or the
    # endpoint's ConnectingCancelledError), the probe timed out.
    raise defer.TimeoutError(timeout, "health check probe")


def tcp_probe(endpoint, tracker: _OpenProbes | None = None) -> Deferred:
    """
    Connect to C{endpoint} and close again.

    :param endpoint: an L{IStreamClientEndpoint}.
    :return: a L{Deferred} firing with L{None} once connected, or failing
        with the connect error.  Cancelling it cancels the attempt or
        aborts the connection.  It has no timeout of its own.
    """
    factory = _ProbeFactory(lambda: _TCPProbe(tracker))
    return endpoint.connect(factory).addCallback(_result_of)


def _request_target(path: str, host: str) -> tuple[bytes, bytes]:
    if not path.startswith("/"):
        path = "/" + path
    for what, value in (("path", path), ("host", host)):
        if not value.isascii() or any(c in value for c in " \r\n\0"):
            raise ValueError(
                f"health check {what} must be ASCII without spaces or line breaks, got {value!r}"
            )
    return path.encode("ascii"), host.encode("ascii")


def http_request(path: str, host: str) -> bytes:
    """
    The bytes of a health check request.

    :raise ValueError: if C{path} or C{host} contain characters that
        cannot go into a request head (validation should prevent it).
    """
    path_bytes, host_bytes = _request_target(path, host)
    return (
        b"GET %s HTTP/1.1\r\nHost: %s\r\nUser-Agent: %s\r\nAccept: */*\r\nConnection: close\r\n\r\n"
    ) % (path_bytes, host_bytes, USER_AGENT)


def _h2_fields(method: bytes, path: str, host: str, scheme: str, *more) -> list:
    path_bytes, host_bytes = _request_target(path, host)
    return [
        (b":method", method),
        (b":scheme", scheme.encode("ascii")),
        (b":authority", host_bytes),
        (b":path", path_bytes),
        *more,
        (b"user-agent", USER_AGENT),
    ]


def h2_request(path: str, host: str, scheme: str = "http") -> list[tuple[bytes, bytes]]:
    """
    The header fields of an HTTP/2 health check request (C{GET path}).

    :raise ValueError: as L{http_request}.
    """
    return _h2_fields(b"GET", path, host, scheme, (b"accept", b"*/*"))


def grpc_request(host: str, scheme: str = "http") -> list[tuple[bytes, bytes]]:
    """
    The header fields of a C{grpc.health.v1.Health/Check} call.

    :raise ValueError: as L{http_request}.
    """
    return _h2_fields(
        b"POST",
        GRPC_HEALTH_CHECK,
        host,
        scheme,
        (b"content-type", b"application/grpc"),
        (b"te", b"trailers"),
    )


def http_probe(
    endpoint,
    request: bytes,
    expect_status,
    expect_body: bytes | None = None,
    tracker: _OpenProbes | None = None,
) -> Deferred:
    """
    Send C{request} over a new connection to C{endpoint} and judge the
    response.

    :param request: from L{http_request}, or the header fields from
        L{h2_request} to speak HTTP/2 (prior knowledge, or ALPN under TLS).
    :param expect_status: the statuses that pass (a container of ints).
    :param expect_body: bytes the body must contain within L{MAX_BODY}, or
        L{None} to pass on the status alone (the body is then not read).
    :return: a L{Deferred} firing with L{None} when the response passed, or
        failing with L{ProbeFailed} (wrong status, body, malformed) or the
        connection's error.  Cancelling it aborts the connection.  It has no
        timeout of its own.
    """
    expect = frozenset(expect_status)
    if isinstance(request, list):
        factory = _ProbeFactory(lambda: _H2HTTPProbe(tracker, request, expect, expect_body))
    else:
        factory = _ProbeFactory(lambda: _HTTPProbe(tracker, request, expect, expect_body))
    return endpoint.connect(factory).addCallback(_result_of)


def grpc_probe(
    endpoint, headers: list, service: str = "", tracker: _OpenProbes | None = None
) -> Deferred:
    """
    Call C{grpc.health.v1.Health/Check} for C{service} over a new HTTP/2
    connection to C{endpoint}.

    :param headers: from L{grpc_request}.
    :return: a L{Deferred} firing with L{None} when the answer was
        C{SERVING}, or failing with L{ProbeFailed} (another serving status,
        a non-zero C{grpc-status}, a malformed answer) or the connection's
        error.  Cancelling it aborts the connection.
    """
    message = grpc_health_request(service)
    factory = _ProbeFactory(lambda: _GRPCProbe(tracker, headers, message))
    return endpoint.connect(factory).addCallback(_result_of)


class _Target:
    """One backend under watch: its state, its next probe, its probe."""

    __slots__ = ("backend", "state", "endpoint", "request", "call", "probe")

    def __init__(self, backend, state: HealthState, endpoint, request: bytes | None):
        self.backend = backend
        self.state = state
        self.endpoint = endpoint
        self.request = request
        self.call = None
        self.probe: Deferred | None = None

    def cancel(self) -> None:
        if self.call is not None and self.call.active():
            self.call.cancel()
        self.call = None
        probe, self.probe = self.probe, None
        if probe is not None:
            probe.cancel()


class HealthChecker(Service):
    """
    The active health checks of one cluster.

    Start and stop it as a service (C{startService}/C{stopService}, or
    L{start}/L{stop}).  It owns C{backend.healthy} of the backends it
    watches while it runs.

    :ivar cluster_name: for the log.
    :ivar config: the cluster's L{model.HealthCheck}.
    """

    log = Logger()

    def __init__(
        self,
        cluster_name: str,
        backends,
        config: model.HealthCheck,
        reactor,
        random: _random.Random | None = None,
        on_change: Callable[[object, bool, str | None], object] | None = None,
        on_check: Callable[[object, bool, str | None], object] | None = None,
        endpoint_for: Callable[[object], object] | None = None,
        initial: Health = Health.UNKNOWN,
        upstream_protocol: str = "http/1.1",
        scheme: str = "http",
    ):
        """
        :param cluster_name: the cluster's name, for the log.
        :param backends: the runtime backends to watch (each with
            C{address} (the default C{Host} of http checks), C{name} (for
            the log), C{healthy} and, unless C{endpoint_for} is given,
            C{endpoint}).
        :param config: the cluster's validated C{health_check:}.
        :param reactor: schedules the probes and times them out
            (L{IReactorTime}); the endpoints connect with their own.
        :param random: the source of jitter; a fresh L{random.Random} when
            L{None}.
        :param on_change: called as C{on_change(backend, healthy, reason)}
            after a backend turned DOWN or UP, once C{backend.healthy} is
            set (C{balance_backend_up}, the panic monitor).  C{reason} is the
            last failure, or L{None}.
        :param on_check: called as C{on_check(backend, ok, reason)} after
            every probe (C{balance_health_checks_total}).
        :param endpoint_for: maps a backend to the L{IStreamClientEndpoint}
            probes connect to; C{backend.endpoint} when L{None}.
        :param initial: the starting L{Health} of backends that are healthy
            when first watched; see the module docstring.
        :param upstream_protocol: the cluster's; C{http} probes of C{h2}
            clusters speak HTTP/2, as the cluster's requests do.
        :param scheme: C{:scheme} of HTTP/2 probes (C{https} under the
            cluster's backend TLS).
        """
        self.cluster_name = cluster_name
        self.config = config
        self._reactor = reactor
        self._random = random if random is not None else _random.Random()
        self._on_change = on_change
        self._on_check = on_check
        self._endpoint_for = endpoint_for or (lambda backend: backend.endpoint)
        self._initial = initial
        self._h2 = upstream_protocol == "h2"
        self._scheme = scheme
        # An empty expect_body asks for nothing: the status alone decides.
        self._expect_body = (config.expect_body or "").encode() or None
        self._probes = _OpenProbes()
        self._targets: dict[object, _Target] = {}
        self.update(backends)

    def __repr__(self) -> str:
        return (
            f"<HealthChecker {self.cluster_name} {self.config.type} backends={len(self._targets)}>"
        )

    # -- service ------------------------------------------------------------

    def startService(self):
        """Start probing; see L{start}."""
        if self.running:
            return
        Service.startService(self)
        for target in self._targets.values():
            self._schedule(target, self._random.random() * JITTER * self.config.interval)

    def stopService(self) -> Deferred:
        """
        Stop probing: cancel the timers and the probes in flight (aborting
        their connections).  Health states and C{backend.healthy} stay as
        they are.

        :return: a L{Deferred} that fires once every probe connection has
            closed.
        """
        Service.stopService(self)
        for target in self._targets.values():
            target.cancel()
        return self._probes.wait()

    def start(self) -> None:
        """
        Start probing every backend, the first probes spread over the first
        10% of C{interval}.  Starting a running checker does nothing.
        """
        self.startService()

    def stop(self) -> Deferred:
        """Stop probing; see L{stopService}."""
        return self.stopService()

    # -- backends -------------------------------------------------------------

    def update(self, backends) -> None:
        """
        Replace the backends watched (reload, DNS re-resolution).  Backends
        kept (the same objects) keep their state and schedule; new ones
        start as in the constructor and are probed soon if running;
        dropped ones stop being probed.
        """
        backends = tuple(backends)
        keep = set(backends)
        for backend in list(self._targets):
            if backend not in keep:
                self._targets.pop(backend).cancel()
        for backend in backends:
            if backend in self._targets:
                continue
            initial = self._initial if backend.healthy else Health.DOWN
            state = HealthState(
                self.config.healthy_threshold, self.config.unhealthy_threshold, initial
            )
            request = None
            host = self.config.host or backend.address
            if self.config.type == "grpc":
                request = grpc_request(host, self._scheme)
            elif self.config.type == "http" and self._h2:
                request = h2_request(self.config.path, host, self._scheme)
            elif self.config.type == "http":
                request = http_request(self.config.path, host)
            target = _Target(backend, state, self._endpoint_for(backend), request)
            self._targets[backend] = target
            if self.running:
                self._schedule(target, self._random.random() * JITTER * self.config.interval)

    def state(self, backend) -> Health:
        """
        The L{Health} of C{backend}.

        :raise KeyError: if it is not watched.
        """
        return self._targets[backend].state.state

    # -- probing ----------------------------------------------------------------

    def _schedule(self, target: _Target, delay: float) -> None:
        target.call = self._reactor.callLater(delay, self._check, target)

    def _next_delay(self) -> float:
        return self.config.interval * (1 + JITTER * (2 * self._random.random() - 1))

    def _probe(self, target: _Target) -> Deferred:
        if target.request is None:
            return tcp_probe(target.endpoint, self._probes)
        if self.config.type == "grpc":
            return grpc_probe(
                target.endpoint, target.request, self.config.service or "", self._probes
            )
        return http_probe(
            target.endpoint,
            target.request,
            self.config.expect_status,
            self._expect_body,
            self._probes,
        )

    def _check(self, target: _Target) -> None:
        target.call = None
        probe = maybeDeferred(self._probe, target)
        target.probe = probe
        (
            probe.addTimeout(self.config.timeout, self._reactor, _timed_out)
            .addCallbacks(
                self._passed,
                self._failed,
                callbackArgs=(target, probe),
                errbackArgs=(target, probe),
            )
            .addErrback(self._crashed, target)
        )

    def _passed(self, result, target: _Target, probe: Deferred) -> None:
        self._verdict(target, probe, True, None)

    def _failed(self, reason: Failure, target: _Target, probe: Deferred) -> None:
        why = describe(reason)
        if reason.check(defer.TimeoutError):
            why = f"timed out after {self.config.timeout:g}s"
        self._verdict(target, probe, False, why)

    def _verdict(self, target: _Target, probe: Deferred, ok: bool, reason: str | None) -> None:
        if target.probe is not probe:
            # Cancelled by stop or update: this verdict is stale.
            return
        target.probe = None
        backend = target.backend
        if self._on_check is not None:
            self._hook(self._on_check, backend, ok, reason)
        transition = target.state.record(ok, reason)
        if transition is not None:
            self._changed(backend, transition)
        if self.running and self._targets.get(backend) is target:
            self._schedule(target, self._next_delay())

    def _changed(self, backend, transition: Transition) -> None:
        backend.healthy = transition.healthy
        if transition.healthy:
            self.log.info(
                "backend {backend} in cluster {cluster} is UP: {count} consecutive {what}",
                backend=backend.name,
                cluster=self.cluster_name,
                healthy=True,
                count=transition.count,
                what="success" if transition.count == 1 else "successes",
            )
        else:
            self.log.warn(
                "backend {backend} in cluster {cluster} is DOWN: "
                "{count} consecutive {what} ({reason})",
                backend=backend.name,
                cluster=self.cluster_name,
                healthy=False,
                count=transition.count,
                what="failure" if transition.count == 1 else "failures",
                reason=transition.reason,
            )
        if self._on_change is not None:
            self._hook(self._on_change, backend, transition.healthy, transition.reason)

    def _hook(self, hook, backend, ok: bool, reason: str | None) -> None:
        try:
            hook(backend, ok, reason)
        except Exception:
            self.log.failure(
                "health check hook {hook!r} failed for backend {backend} in cluster {cluster}",
                hook=hook,
                backend=backend.name,
                cluster=self.cluster_name,
            )

    def _crashed(self, reason: Failure, target: _Target) -> None:
        self.log.failure(
            "health checking backend {backend} in cluster {cluster} failed unexpectedly",
            reason,
            backend=target.backend.name,
            cluster=self.cluster_name,
        )
        # Keep checking: one bug must not freeze a backend's health.
        if self.running and target.call is None and self._targets.get(target.backend) is target:
            self._schedule(target, self._next_delay())


__all__ = [
    "JITTER",
    "MAX_BODY",
    "Health",
    "HealthChecker",
    "HealthState",
    "ProbeFailed",
    "Transition",
    "grpc_health_request",
    "grpc_probe",
    "grpc_request",
    "grpc_serving_status",
    "h2_request",
    "http_probe",
    "http_request",
    "tcp_probe",
]
