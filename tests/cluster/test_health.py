"""
Tests for L{balance.cluster.health}: the threshold state machine, and the
checker driven by a L{Clock} over fake endpoints and in-memory transports.
"""

from __future__ import annotations

import random

from twisted.internet import error
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ClientEndpoint
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.logger import Logger, LogLevel, formatEvent
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from balance.cluster.health import (
    MAX_BODY,
    Health,
    HealthChecker,
    HealthState,
    Transition,
    describe,
    grpc_health_request,
    grpc_serving_status,
    http_request,
)
from balance.config import model

UP, DOWN, UNKNOWN = Health.UP, Health.DOWN, Health.UNKNOWN


class FixedRandom:
    """A random source that always answers C{value}."""

    def __init__(self, value: float):
        self.value = value

    def random(self) -> float:
        return self.value


class ProbeTransport(StringTransport):
    """
    A transport that tells its protocol about the end of the connection on
    the next turn of the clock, as Twisted's TCP transports do.
    """

    def __init__(self, clock, protocol):
        super().__init__()
        self._clock = clock
        self._protocol = protocol
        self.aborted = False
        self._lost = False

    def loseConnection(self):
        super().loseConnection()
        self._end(error.ConnectionDone())

    def abortConnection(self):
        self.aborted = True
        super().abortConnection()
        self._end(error.ConnectionLost())

    def _end(self, exc):
        if not self._lost:
            self._lost = True
            self._clock.callLater(0, self._protocol.connectionLost, Failure(exc))


class FakeEndpoint:
    """
    A client endpoint whose attempts the test settles, or settles itself
    according to C{mode}: C{"accept"}, C{"refuse"} or C{None} (wait).
    """

    def __init__(self, clock, mode=None):
        self.clock = clock
        self.mode = mode
        self.attempts: list[Deferred] = []
        self.cancelled = 0
        self.transports: list[ProbeTransport] = []

    def connect(self, factory):
        d = Deferred(self._cancel)
        d.factory = factory
        self.attempts.append(d)
        if self.mode == "accept":
            self.accept()
        elif self.mode == "refuse":
            self.refuse()
        return d

    def _cancel(self, d):
        self.cancelled += 1
        d.errback(error.ConnectingCancelledError(None))

    def accept(self):
        """Connect the last attempt; return its protocol and transport."""
        d = self.attempts[-1]
        protocol = d.factory.buildProtocol(None)
        transport = ProbeTransport(self.clock, protocol)
        self.transports.append(transport)
        protocol.makeConnection(transport)
        d.callback(protocol)
        return protocol, transport

    def refuse(self):
        self.attempts[-1].errback(error.ConnectionRefusedError())


class FakeBackend:
    """What the checker reads and writes of a runtime backend."""

    def __init__(self, address, endpoint=None, healthy=True):
        self.address = address
        self.name = address
        self.endpoint = endpoint
        self.healthy = healthy

    def __repr__(self):
        return f"<FakeBackend {self.address}>"


def health_config(**kwargs):
    defaults = dict(
        type="tcp", interval=1.0, timeout=0.5, healthy_threshold=2, unhealthy_threshold=3
    )
    defaults.update(kwargs)
    return model.HealthCheck(**defaults)


class HealthStateTests(SynchronousTestCase):
    """The pure threshold machine, with no reactor."""

    def test_unknown_counts_as_healthy(self):
        """A backend not yet probed is healthy."""
        state = HealthState(2, 3)
        self.assertIs(state.state, UNKNOWN)
        self.assertTrue(state.healthy)

    def test_first_failure_decides(self):
        """One failed first probe marks an unknown backend DOWN."""
        state = HealthState(2, 3)
        self.assertEqual(
            state.record(False, "connection refused"), Transition(False, 1, "connection refused")
        )
        self.assertIs(state.state, DOWN)
        self.assertFalse(state.healthy)

    def test_first_success_confirms_silently(self):
        """
        One good first probe confirms UP without a transition (the backend
        was already taken as healthy); after that the thresholds apply.
        """
        state = HealthState(2, 3)
        self.assertIsNone(state.record(True))
        self.assertIs(state.state, UP)
        self.assertIsNone(state.record(False, "x"))
        self.assertIsNone(state.record(False, "x"))
        self.assertEqual(state.record(False, "status 500"), Transition(False, 3, "status 500"))

    def test_thresholds(self):
        """
        C{unhealthy_threshold} failures in a row take an UP backend DOWN,
        C{healthy_threshold} successes bring it back.
        """
        state = HealthState(2, 3, initial=UP)
        self.assertEqual(
            [state.record(False, "r") for _ in range(3)][-1], Transition(False, 3, "r")
        )
        self.assertEqual([state.record(True) for _ in range(2)], [None, Transition(True, 2, None)])
        self.assertIs(state.state, UP)

    def test_flapping(self):
        """
        A backend alternating between good and bad probes never crosses a
        threshold of 2 or more, in either state.
        """
        for initial in (UP, DOWN):
            state = HealthState(2, 2, initial=initial)
            for i in range(50):
                self.assertIsNone(state.record(i % 2 == 0, "flap"))
            self.assertIs(state.state, initial)

    def test_threshold_one(self):
        """Thresholds of 1 follow every verdict."""
        state = HealthState(1, 1, initial=UP)
        self.assertEqual(state.record(False, "r"), Transition(False, 1, "r"))
        self.assertEqual(state.record(True), Transition(True, 1, None))

    def test_repeated_verdicts_no_transition(self):
        """Further failures of a DOWN backend change nothing."""
        state = HealthState(2, 1, initial=UP)
        state.record(False)
        for _ in range(5):
            self.assertIsNone(state.record(False))
        self.assertEqual(state.failures, 6)

    def test_invalid(self):
        """Thresholds below 1 are refused."""
        self.assertRaises(ValueError, HealthState, 0, 3)
        self.assertRaises(ValueError, HealthState, 2, 0)


class CheckerTestCase(SynchronousTestCase):
    """A checker over fake backends, with events and hooks recorded."""

    address = "127.0.0.1:9002"

    def setUp(self):
        self.clock = Clock()
        self.events = []
        self.patch(HealthChecker, "log", Logger(observer=self.events.append))
        self.changes = []
        self.checks = []

    def make(self, backends, config=None, rnd=None, **kwargs):
        checker = HealthChecker(
            "api",
            backends,
            config or health_config(),
            self.clock,
            random=rnd or FixedRandom(0.5),
            on_change=lambda b, healthy, reason: self.changes.append((b.address, healthy, reason)),
            on_check=lambda b, ok, reason: self.checks.append((b.address, ok, reason)),
            **kwargs,
        )
        self.addCleanup(checker.stopService)
        return checker

    def backend(self, mode=None, address=None, healthy=True):
        return FakeBackend(address or self.address, FakeEndpoint(self.clock, mode), healthy=healthy)

    def messages(self, level=None):
        return [formatEvent(e) for e in self.events if level is None or e["log_level"] is level]

    def next_check_in(self):
        [call] = self.clock.getDelayedCalls()
        return call.getTime() - self.clock.seconds()


class SchedulingTests(CheckerTestCase):
    """Probes run every interval, with jitter, and stop with the service."""

    def test_first_probe_spread(self):
        """
        The first probe of each backend runs within the first 10% of the
        interval, at a random point, so backends do not probe in lockstep.
        """
        backends = [self.backend("accept", f"10.0.0.{i}:80") for i in range(20)]
        checker = self.make(backends, health_config(interval=10.0), rnd=random.Random(3))
        checker.startService()
        times = sorted(c.getTime() for c in self.clock.getDelayedCalls())
        self.assertEqual(len(times), 20)
        self.assertTrue(all(0 <= t <= 1.0 for t in times), times)
        self.assertEqual(len(set(times)), 20)

    def test_jitter_bounds(self):
        """
        Each next probe runs C{interval} +-10% after the previous one ended:
        the extremes of the random source give exactly 0.9 and 1.1 times.
        """
        for value, first, later in ((0.0, 0.0, 9.0), (0.999999, 1.0, 11.0)):
            clock = self.clock = Clock()
            backend = self.backend("accept")
            checker = self.make([backend], health_config(interval=10.0), rnd=FixedRandom(value))
            checker.startService()
            self.assertAlmostEqual(self.next_check_in(), first, places=4)
            clock.advance(self.next_check_in())
            self.assertAlmostEqual(self.next_check_in(), later, places=4)
            checker.stopService()

    def test_jitter_distribution(self):
        """With a real random source, intervals spread over the whole band."""
        backend = self.backend("accept")
        checker = self.make([backend], health_config(interval=10.0), rnd=random.Random(7))
        checker.startService()
        self.clock.advance(self.next_check_in())
        gaps = []
        for _ in range(300):
            gap = self.next_check_in()
            gaps.append(gap)
            self.clock.advance(gap)
        self.assertTrue(all(9.0 <= g <= 11.0 for g in gaps))
        self.assertLess(min(gaps), 9.1)
        self.assertGreater(max(gaps), 10.9)
        self.assertEqual(len(backend.endpoint.attempts), 301)

    def test_no_overlap(self):
        """The next probe is scheduled only once the previous one ended."""
        backend = self.backend()
        checker = self.make([backend])
        checker.startService()
        self.clock.advance(self.next_check_in())
        self.assertEqual(len(backend.endpoint.attempts), 1)
        self.assertEqual(self.clock.getDelayedCalls()[0].getTime(), 0.05 + 0.5)  # the timeout
        backend.endpoint.refuse()
        self.assertAlmostEqual(self.next_check_in(), 1.0)

    def test_stop_cancels(self):
        """
        Stopping cancels the next probe and the one in flight; the stop
        Deferred fires once the probe connections are closed, and nothing
        is recorded for the cancelled probe.
        """
        a, b = self.backend(), self.backend(address="127.0.0.1:9003")
        checker = self.make([a, b])
        checker.startService()
        self.clock.advance(0.05)
        _, transport = a.endpoint.accept()  # tcp probe passes and closes
        self.assertEqual(len(self.checks), 1)
        b_attempt = b.endpoint.attempts[0]
        d = checker.stopService()
        self.assertEqual(b.endpoint.cancelled, 1)
        self.assertTrue(b_attempt.called)
        self.assertNoResult(d)
        self.clock.advance(0)
        self.successResultOf(d)
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.assertEqual(len(self.checks), 1)
        self.assertFalse(checker.running)

    def test_start_twice(self):
        """Starting a running checker does not double the probes."""
        checker = self.make([self.backend()])
        checker.start()
        checker.start()
        self.assertEqual(len(self.clock.getDelayedCalls()), 1)

    def test_stop_idle(self):
        """Stopping with nothing in flight fires at once."""
        checker = self.make([self.backend()])
        checker.startService()
        self.successResultOf(checker.stop())
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_update(self):
        """
        A reload or re-resolution replaces the backends: dropped ones stop
        being probed, kept ones keep their state, new ones are probed soon.
        """
        a = self.backend("refuse")
        b = self.backend("accept", address="127.0.0.1:9003")
        checker = self.make([a, b])
        checker.start()
        self.clock.advance(0.05)
        self.assertIs(checker.state(a), DOWN)
        c = self.backend("accept", address="127.0.0.1:9004")
        checker.update([a, c])
        self.assertIs(checker.state(a), DOWN)
        self.assertRaises(KeyError, checker.state, b)
        self.clock.advance(0.05)
        self.assertIs(checker.state(c), UP)
        self.assertEqual(len(b.endpoint.attempts), 1)
        self.assertEqual(len(self.clock.getDelayedCalls()), 2)

    def test_initially_unhealthy_backend_starts_down(self):
        """
        A backend already marked unhealthy (kept across a reload) starts
        DOWN and needs C{healthy_threshold} good probes.
        """
        backend = self.backend("accept", healthy=False)
        checker = self.make([backend])
        checker.start()
        self.assertIs(checker.state(backend), DOWN)
        self.clock.advance(0.05)
        self.assertFalse(backend.healthy)
        self.clock.advance(1.0)
        self.assertTrue(backend.healthy)
        self.assertEqual(self.changes, [(self.address, True, None)])


class ThresholdTests(CheckerTestCase):
    """Verdicts move backend.healthy through the thresholds, logged once."""

    def test_down_then_up(self):
        """
        An UP backend that starts refusing is DOWN after 3 failed probes,
        logged once with the reason; it is UP again after 2 good ones.
        """
        backend = self.backend("accept")
        checker = self.make([backend])
        checker.start()
        self.clock.advance(0.05)
        self.assertIs(checker.state(backend), UP)
        backend.endpoint.mode = "refuse"
        self.clock.advance(1.0)
        self.clock.advance(1.0)
        self.assertTrue(backend.healthy)
        self.clock.advance(1.0)
        self.assertFalse(backend.healthy)
        self.clock.advance(1.0)
        backend.endpoint.mode = "accept"
        self.clock.advance(1.0)
        self.assertFalse(backend.healthy)
        self.clock.advance(1.0)
        self.assertTrue(backend.healthy)
        self.assertEqual(
            self.messages(),
            [
                "backend 127.0.0.1:9002 in cluster api is DOWN: "
                "3 consecutive failures (connection refused)",
                "backend 127.0.0.1:9002 in cluster api is UP: 2 consecutive successes",
            ],
        )
        self.assertEqual([e["log_level"] for e in self.events], [LogLevel.warn, LogLevel.info])
        self.assertEqual(self.events[0]["backend"], "127.0.0.1:9002")
        self.assertEqual(self.events[0]["cluster"], "api")
        self.assertEqual(self.events[0]["reason"], "connection refused")
        self.assertEqual(
            self.changes,
            [(self.address, False, "connection refused"), (self.address, True, None)],
        )
        self.assertEqual(
            [ok for _, ok, _ in self.checks], [True, False, False, False, False, True, True]
        )

    def test_dead_at_start(self):
        """A backend dead from the start is DOWN after its first probe."""
        backend = self.backend("refuse")
        checker = self.make([backend])
        checker.start()
        self.clock.advance(0.05)
        self.assertFalse(backend.healthy)
        self.assertEqual(
            self.messages(),
            [
                "backend 127.0.0.1:9002 in cluster api is DOWN: "
                "1 consecutive failure (connection refused)"
            ],
        )

    def test_initial_up(self):
        """With C{initial=UP}, the full threshold applies from the start."""
        backend = self.backend("refuse")
        checker = self.make([backend], initial=UP)
        checker.start()
        self.clock.advance(0.05)
        self.clock.advance(1.0)
        self.assertTrue(backend.healthy)
        self.clock.advance(1.0)
        self.assertFalse(backend.healthy)

    def test_flapping_backend_keeps_state(self):
        """A backend whose probes alternate is never marked DOWN."""
        backend = self.backend("accept")
        checker = self.make([backend], health_config(unhealthy_threshold=2))
        checker.start()
        self.clock.advance(0.05)
        for i in range(20):
            backend.endpoint.mode = "refuse" if i % 2 == 0 else "accept"
            self.clock.advance(1.0)
        self.assertTrue(backend.healthy)
        self.assertEqual(self.events, [])

    def test_hook_failure_logged(self):
        """A hook that raises is logged, and checking goes on."""
        backend = self.backend("refuse")
        checker = HealthChecker(
            "api",
            [backend],
            health_config(),
            self.clock,
            random=FixedRandom(0.5),
            on_change=lambda *a: 1 / 0,
        )
        checker.start()
        self.addCleanup(checker.stop)
        self.clock.advance(0.05)
        self.assertFalse(backend.healthy)
        [failure] = [e["log_failure"] for e in self.events if "log_failure" in e]
        self.assertTrue(failure.check(ZeroDivisionError))
        self.assertEqual(len(self.clock.getDelayedCalls()), 1)

    def test_endpoint_for(self):
        """Probes may connect through a given endpoint factory."""
        endpoint = FakeEndpoint(self.clock, "refuse")
        backend = FakeBackend(self.address)
        checker = self.make([backend], endpoint_for=lambda b: endpoint)
        checker.start()
        self.clock.advance(0.05)
        self.assertEqual(len(endpoint.attempts), 1)
        self.assertFalse(backend.healthy)

    def test_endpoint_raises(self):
        """An endpoint that raises instead of failing counts as a failure."""

        class Broken:
            def connect(self, factory):
                raise ValueError("no such endpoint")

        backend = FakeBackend(self.address, Broken())
        checker = self.make([backend])
        checker.start()
        self.clock.advance(0.05)
        self.assertFalse(backend.healthy)
        self.assertEqual(self.checks, [(self.address, False, "no such endpoint")])


class TimeoutTests(CheckerTestCase):
    """A probe that hangs is cancelled at its timeout."""

    def test_hanging_connect(self):
        """A connect attempt still pending at the timeout is cancelled."""
        backend = self.backend()
        checker = self.make([backend])
        checker.start()
        self.clock.advance(0.05)
        self.clock.advance(0.49)
        self.assertEqual(backend.endpoint.cancelled, 0)
        self.clock.advance(0.01)
        self.assertEqual(backend.endpoint.cancelled, 1)
        self.assertEqual(self.checks, [(self.address, False, "timed out after 0.5s")])
        self.assertFalse(backend.healthy)

    def test_hanging_response(self):
        """
        A backend that accepts and never answers has its probe connection
        aborted at the timeout.
        """
        backend = self.backend()
        checker = self.make([backend], health_config(type="http"))
        checker.start()
        self.clock.advance(0.05)
        _, transport = backend.endpoint.accept()
        self.clock.advance(0.4)
        self.assertFalse(transport.aborted)
        self.assertEqual(self.checks, [])
        self.clock.advance(0.1)
        self.assertTrue(transport.aborted)
        self.assertEqual(self.checks, [(self.address, False, "timed out after 0.5s")])
        # The aborted connection's loss does not count a second time.
        self.clock.advance(0)
        self.assertEqual(len(self.checks), 1)

    def test_real_endpoint_memory_reactor(self):
        """
        With a real TCP endpoint on a memory reactor, the probe connects
        with the backend's address and a hanging connection is aborted at
        the timeout.
        """
        reactor = MemoryReactorClock()
        endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", 9002, timeout=2)
        backend = FakeBackend(self.address, endpoint)
        checker = HealthChecker(
            "api", [backend], health_config(type="http"), reactor, random=FixedRandom(0.0)
        )
        checker.start()
        reactor.advance(0)
        [(host, port, factory, timeout, _)] = reactor.tcpClients
        self.assertEqual((host, port), ("127.0.0.1", 9002))
        protocol = factory.buildProtocol(None)
        transport = StringTransport()
        protocol.makeConnection(transport)
        self.assertTrue(transport.value().startswith(b"GET / HTTP/1.1\r\n"))
        reactor.advance(0.5)
        self.assertTrue(transport.disconnecting)
        self.assertFalse(backend.healthy)
        protocol.connectionLost(Failure(error.ConnectionLost()))
        d = checker.stop()
        self.successResultOf(d)


class HTTPProbeTests(CheckerTestCase):
    """The http probe sends a proper request and judges the response."""

    def probe(self, response, config=None, byte_at_a_time=False, close=False):
        """
        Run one http probe answered with C{response}; return the verdict
        recorded and the transport.
        """
        self.clock = Clock()
        self.checks = []
        backend = self.backend()
        checker = self.make([backend], config or health_config(type="http", path="/healthz"))
        checker.start()
        self.clock.advance(0.05)
        protocol, transport = backend.endpoint.accept()
        if byte_at_a_time:
            for i in range(len(response)):
                protocol.dataReceived(response[i : i + 1])
        else:
            protocol.dataReceived(response)
        if close:
            protocol.connectionLost(Failure(error.ConnectionDone()))
        self.clock.advance(0)
        checker.stop()
        [(_, ok, reason)] = self.checks
        return ok, reason, transport

    def both(self, response, **kwargs):
        """The verdict fed in one blob and one byte at a time (must agree)."""
        blob = self.probe(response, **kwargs)[:2]
        bytewise = self.probe(response, byte_at_a_time=True, **kwargs)[:2]
        self.assertEqual(blob, bytewise)
        return blob

    def test_request(self):
        """
        The request is a GET of the path, HTTP/1.1, with Host (the
        backend's address), the health checker's User-Agent and
        C{Connection: close}.
        """
        _, _, transport = self.probe(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
        self.assertEqual(
            transport.value(),
            b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1:9002\r\n"
            b"User-Agent: balance-health/1\r\nAccept: */*\r\nConnection: close\r\n\r\n",
        )
        self.assertTrue(transport.disconnecting)

    def test_host_from_config(self):
        """The configured C{host} replaces the backend address."""
        config = health_config(type="http", path="/ready", host="api.example.com")
        _, _, transport = self.probe(b"HTTP/1.1 200 OK\r\n\r\n", config)
        self.assertIn(b"\r\nHost: api.example.com\r\n", transport.value())
        self.assertTrue(transport.value().startswith(b"GET /ready HTTP/1.1\r\n"))

    def test_resolved_backend(self):
        """
        A backend resolved from a host name is probed with the configured
        name in C{Host}, and logged by its own name (address and IP).
        """
        backend = self.backend(address="api.internal:8080")
        backend.name = "api.internal:8080 (10.0.0.7)"
        checker = self.make([backend], health_config(type="http"))
        checker.start()
        self.clock.advance(0.05)
        protocol, transport = backend.endpoint.accept()
        self.assertIn(b"\r\nHost: api.internal:8080\r\n", transport.value())
        protocol.dataReceived(b"HTTP/1.1 502 Bad Gateway\r\n\r\n")
        self.assertEqual(
            self.messages(),
            [
                "backend api.internal:8080 (10.0.0.7) in cluster api is DOWN: "
                "1 consecutive failure (status 502)"
            ],
        )

    def test_status_ok(self):
        """An expected status passes without reading the body."""
        self.assertEqual(
            self.both(b"HTTP/1.1 200 OK\r\nContent-Length: 1000000\r\n\r\npartial"),
            (True, None),
        )

    def test_status_wrong(self):
        """Any other status fails, with the status as the reason."""
        self.assertEqual(
            self.both(b"HTTP/1.1 500 Internal Server Error\r\nContent-Length: 0\r\n\r\n"),
            (False, "status 500"),
        )

    def test_expect_status_list(self):
        """Every status of C{expect_status} passes."""
        config = health_config(type="http", expect_status=(200, 204))
        ok, _, _ = self.probe(b"HTTP/1.1 204 No Content\r\n\r\n", config)
        self.assertTrue(ok)
        ok, reason, _ = self.probe(b"HTTP/1.1 301 Moved\r\nContent-Length: 0\r\n\r\n", config)
        self.assertEqual((ok, reason), (False, "status 301"))

    def test_interim_response_skipped(self):
        """A 1xx interim response is skipped; the final one decides."""
        self.assertEqual(
            self.both(b"HTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\nHTTP/1.1 200 OK\r\n\r\n"),
            (True, None),
        )

    def test_expect_body_found(self):
        """
        C{expect_body} passes when the substring is in the body, even split
        across reads (checked byte by byte).
        """
        config = health_config(type="http", expect_body="all good")
        self.assertEqual(
            self.both(
                b"HTTP/1.1 200 OK\r\nContent-Length: 20\r\n\r\nstatus: all good\n\n\n\n",
                config=config,
            ),
            (True, None),
        )

    def test_expect_body_chunked(self):
        """The body is searched after chunked decoding."""
        config = health_config(type="http", expect_body="all good")
        self.assertEqual(
            self.both(
                b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
                b"5\r\nall g\r\n3\r\nood\r\n0\r\n\r\n",
                config=config,
            ),
            (True, None),
        )

    def test_expect_body_missing(self):
        """A complete body without the substring fails."""
        config = health_config(type="http", expect_body="all good")
        self.assertEqual(
            self.both(b"HTTP/1.1 200 OK\r\nContent-Length: 7\r\n\r\ndegrade", config=config),
            (False, "body does not contain 'all good'"),
        )

    def test_expect_body_until_close(self):
        """A body delimited by the connection's end is judged at the end."""
        config = health_config(type="http", expect_body="ok")
        self.assertEqual(
            self.both(b"HTTP/1.0 200 OK\r\n\r\nnot really", config=config, close=True),
            (False, "body does not contain 'ok'"),
        )
        self.assertEqual(
            self.both(b"HTTP/1.0 200 OK\r\n\r\nit is ok", config=config, close=True),
            (True, None),
        )

    def test_expect_body_limit(self):
        """Only the first 64 KiB of the body are searched."""
        config = health_config(type="http", expect_body="needle")
        body = b"x" * MAX_BODY + b"needle"
        ok, reason, transport = self.probe(
            b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body), config
        )
        self.assertEqual(
            (ok, reason), (False, "body does not contain 'needle' in its first 64 KiB")
        )
        self.assertTrue(transport.disconnecting)
        ok, _, _ = self.probe(
            b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s"
            % (MAX_BODY, b"x" * (MAX_BODY - 6) + b"needle"),
            config,
        )
        self.assertTrue(ok)

    def test_empty_expect_body(self):
        """An empty C{expect_body} asks for nothing: the status decides."""
        config = health_config(type="http", expect_body="")
        ok, _, _ = self.probe(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n", config)
        self.assertTrue(ok)

    def test_expect_body_wrong_status(self):
        """The status is judged before the body."""
        config = health_config(type="http", expect_body="ok")
        ok, reason, _ = self.probe(b"HTTP/1.1 503 Busy\r\nContent-Length: 2\r\n\r\nok", config)
        self.assertEqual((ok, reason), (False, "status 503"))

    def test_malformed(self):
        """A response that is not HTTP fails as malformed."""
        ok, reason, transport = self.probe(b"SSH-2.0-OpenSSH_9.2\r\n")
        self.assertFalse(ok)
        self.assertTrue(reason.startswith("malformed response"), reason)
        self.assertTrue(transport.disconnecting)

    def test_upgrade(self):
        """A backend switching protocols fails the probe."""
        ok, reason, _ = self.probe(
            b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: h2c\r\nConnection: upgrade\r\n\r\n"
        )
        self.assertEqual((ok, reason), (False, "unexpected protocol upgrade"))

    def test_closed_before_response(self):
        """A connection closed before any response fails with that reason."""
        ok, reason, _ = self.probe(b"", close=True)
        self.assertEqual((ok, reason), (False, "connection closed before a complete response"))

    def test_closed_mid_head(self):
        """A connection closed in the middle of the head fails."""
        ok, reason, _ = self.probe(b"HTTP/1.1 200 OK\r\nContent-", close=True)
        self.assertEqual((ok, reason), (False, "connection closed before a complete response"))

    def test_tcp_probe_closes(self):
        """A tcp probe passes once connected, and closes the connection."""
        backend = self.backend()
        checker = self.make([backend])
        checker.start()
        self.clock.advance(0.05)
        _, transport = backend.endpoint.accept()
        self.assertTrue(transport.disconnecting)
        self.assertEqual(transport.value(), b"")
        self.assertEqual(self.checks, [(self.address, True, None)])


class RequestTests(SynchronousTestCase):
    """Building the request refuses what cannot go into a request head."""

    def test_path_slash(self):
        """A path without a leading slash gets one."""
        self.assertTrue(http_request("healthz", "a").startswith(b"GET /healthz HTTP/1.1\r\n"))

    def test_injection(self):
        """Spaces, line breaks and non-ASCII in path or host are refused."""
        for path, host in (("/a b", "h"), ("/a\r\nX: y", "h"), ("/", "h\n"), ("/é", "h")):
            self.assertRaises(ValueError, http_request, path, host)


class DescribeTests(SynchronousTestCase):
    """Probe failures read as a few words."""

    def test_reasons(self):
        cases = [
            (error.ConnectionRefusedError(), "connection refused"),
            (error.TimeoutError(), "timed out"),
            (error.DNSLookupError(), "host name did not resolve"),
            (error.NoRouteError(), "no route to host"),
            (error.ConnectionDone(), "connection closed before a complete response"),
            (error.ConnectionLost(), "connection reset before a complete response"),
            (ValueError("odd"), "odd"),
        ]
        for exc, expected in cases:
            self.assertEqual(describe(Failure(exc)), expected)


class GRPCMessageTests(SynchronousTestCase):
    """
    The hand-written protobuf of the gRPC health check, against the
    protobuf library's own encoding of messages of the same shape
    (C{StringValue} and C{UInt32Value} have one field numbered 1, as
    C{HealthCheckRequest.service} and C{HealthCheckResponse.status}).
    """

    def test_request(self):
        from google.protobuf import wrappers_pb2

        for service in ("", "foo", "grpc.health.v1.Health", "x" * 200, "é" * 70_000):
            message = wrappers_pb2.StringValue(value=service).SerializeToString()
            self.assertEqual(
                grpc_health_request(service), b"\x00" + len(message).to_bytes(4, "big") + message
            )

    def test_status(self):
        from google.protobuf import wrappers_pb2

        for status in (0, 1, 2, 3, 300):
            message = wrappers_pb2.UInt32Value(value=status).SerializeToString()
            self.assertEqual(grpc_serving_status(message), status)

    def test_unknown_fields_skipped(self):
        self.assertEqual(
            grpc_serving_status(b"\x12\x02ab\x08\x02\x1d\x00\x00\x00\x00\x21" + b"\0" * 8), 2
        )

    def test_malformed(self):
        for message in (b"\x08", b"\x08\x80", b"\x12\x05ab", b"\x0b", b"\x1d\x00"):
            self.assertRaises(ValueError, grpc_serving_status, message)
