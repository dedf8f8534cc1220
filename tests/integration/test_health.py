"""
Integration tests for L{balance.cluster.health}: the health checker against
real loopback servers (a Twisted web server whose answers the test changes,
a server that accepts and never answers, a closed port), on the global
reactor, with short intervals and no fixed sleeps.
"""

from __future__ import annotations

from twisted.internet import reactor
from twisted.internet.defer import inlineCallbacks
from twisted.internet.protocol import Factory, Protocol
from twisted.trial.unittest import TestCase
from twisted.web.resource import Resource
from twisted.web.server import Site

from balance.cluster.backend import Backend
from balance.cluster.health import Health, HealthChecker
from balance.config import model
from tests.helpers import backend_model, closed_port, wait_for

INTERVAL = 0.1
TIMEOUT = 0.3
# Loopback probes take milliseconds; this absorbs a busy test machine.
SLACK = 0.5


class Controlled(Resource):
    """Answers every GET with the status and body the test sets."""

    isLeaf = True

    def __init__(self):
        super().__init__()
        self.status = 200
        self.body = b"ok\n"
        self.requests: list = []

    def render_GET(self, request):
        self.requests.append(request)
        request.setResponseCode(self.status)
        return self.body


class Silent(Protocol):
    """Accepts a connection and never answers."""

    def connectionMade(self):
        self.factory.open += 1
        self.factory.accepted += 1

    def connectionLost(self, reason):
        self.factory.open -= 1


class SilentFactory(Factory):
    protocol = Silent
    noisy = False

    def __init__(self):
        self.open = 0
        self.accepted = 0


class HealthCheckIntegrationTests(TestCase):
    """Backends go DOWN and UP with what real servers answer."""

    timeout = 20

    def setUp(self):
        self.resource = Controlled()
        site = Site(self.resource)
        site.noisy = False
        site.log = lambda request: None
        self.web = reactor.listenTCP(0, site, interface="127.0.0.1")
        self.addCleanup(self.web.stopListening)
        self.silent = SilentFactory()
        self.hanging = reactor.listenTCP(0, self.silent, interface="127.0.0.1")
        self.addCleanup(self.hanging.stopListening)
        self.changes = []

    def backend(self, port: int) -> Backend:
        return Backend.build(backend_model("127.0.0.1", port), reactor, 2.0)

    def checker(self, backends, initial=Health.UNKNOWN, **config) -> HealthChecker:
        settings = dict(
            type="http",
            path="/healthz",
            interval=INTERVAL,
            timeout=TIMEOUT,
            healthy_threshold=2,
            unhealthy_threshold=3,
        )
        settings.update(config)
        checker = HealthChecker(
            "api",
            backends,
            model.HealthCheck(**settings),
            reactor,
            on_change=lambda b, healthy, reason: self.changes.append((b.address, healthy, reason)),
            initial=initial,
        )
        checker.start()
        self.addCleanup(checker.stop)
        return checker

    @inlineCallbacks
    def timed(self, predicate, within: float, what: str):
        """Wait for C{predicate}; fail if it took longer than C{within}."""
        started = reactor.seconds()
        yield wait_for(predicate, timeout=within + 5, what=what)
        elapsed = reactor.seconds() - started
        self.assertLessEqual(elapsed, within, f"{what} took {elapsed:.2f}s")

    @inlineCallbacks
    def test_http_down_and_up(self):
        """
        A backend answering 200 is UP; once it answers 500 it is DOWN within
        3 intervals; once it answers 200 again it is UP within 2.  The
        requests carry the path, Host and User-Agent of the health checker.
        """
        backend = self.backend(self.web.getHost().port)
        checker = self.checker([backend])
        yield wait_for(lambda: checker.state(backend) is Health.UP, what="first check")
        self.resource.status = 500
        yield self.timed(lambda: not backend.healthy, 3 * INTERVAL * 1.1 + SLACK, "DOWN after 500s")
        self.resource.status = 200
        yield self.timed(lambda: backend.healthy, 2 * INTERVAL * 1.1 + SLACK, "UP after 200s")
        self.assertEqual(
            self.changes, [(backend.address, False, "status 500"), (backend.address, True, None)]
        )
        request = self.resource.requests[0]
        self.assertEqual(request.uri, b"/healthz")
        self.assertEqual(request.getHeader(b"host"), backend.address.encode())
        self.assertEqual(request.getHeader(b"user-agent"), b"balance-health/1")

    @inlineCallbacks
    def test_expect_body(self):
        """
        With C{expect_body}, a 200 whose body lacks the text counts as a
        failure.
        """
        self.resource.body = b"status: all good\n"
        backend = self.backend(self.web.getHost().port)
        checker = self.checker([backend], expect_body="all good")
        yield wait_for(lambda: checker.state(backend) is Health.UP, what="first check")
        self.resource.body = b"status: degraded\n"
        yield self.timed(
            lambda: not backend.healthy, 3 * INTERVAL * 1.1 + SLACK, "DOWN on a wrong body"
        )
        self.assertEqual(
            self.changes, [(backend.address, False, "body does not contain 'all good'")]
        )

    @inlineCallbacks
    def test_hanging_backend(self):
        """
        A backend that accepts and never answers is DOWN once its first
        probe times out, and the probe's connection is aborted.
        """
        backend = self.backend(self.hanging.getHost().port)
        checker = self.checker([backend])
        yield self.timed(
            lambda: not backend.healthy, INTERVAL * 0.1 + TIMEOUT + SLACK, "DOWN on a hang"
        )
        self.assertEqual(self.changes, [(backend.address, False, f"timed out after {TIMEOUT:g}s")])
        yield wait_for(lambda: self.silent.open == 0, what="probe connection aborted")
        self.assertEqual(self.silent.accepted, 1)
        yield checker.stop()

    @inlineCallbacks
    def test_hanging_backend_threshold(self):
        """
        A backend that was UP and starts hanging is DOWN within
        3 x (interval + timeout).
        """
        backend = self.backend(self.hanging.getHost().port)
        checker = self.checker([backend], initial=Health.UP)
        yield self.timed(
            lambda: not backend.healthy,
            3 * (INTERVAL * 1.1 + TIMEOUT) + SLACK,
            "DOWN on a hanging backend",
        )
        self.assertGreaterEqual(self.silent.accepted, 3)
        yield checker.stop()
        yield wait_for(lambda: self.silent.open == 0, what="probe connections closed")

    @inlineCallbacks
    def test_closed_port(self):
        """A backend whose port refuses connections is DOWN at its first probe."""
        backend = self.backend(closed_port())
        self.checker([backend])
        yield self.timed(lambda: not backend.healthy, INTERVAL * 0.1 + SLACK, "DOWN")
        self.assertEqual(self.changes, [(backend.address, False, "connection refused")])

    @inlineCallbacks
    def test_tcp(self):
        """
        A tcp check passes on a listening port (even one that never
        answers) and fails on a closed one.
        """
        up = self.backend(self.hanging.getHost().port)
        down = self.backend(closed_port())
        checker = self.checker([up, down], type="tcp")
        yield wait_for(
            lambda: checker.state(up) is Health.UP and checker.state(down) is Health.DOWN,
            what="both checked",
        )
        self.assertTrue(up.healthy)
        self.assertFalse(down.healthy)
        yield checker.stop()
        yield wait_for(lambda: self.silent.open == 0, what="probe connections closed")

    @inlineCallbacks
    def test_stop_during_probe(self):
        """Stopping while a probe hangs aborts it; stop waits for the close."""
        backend = self.backend(self.hanging.getHost().port)
        checker = self.checker([backend], timeout=5.0)
        yield wait_for(lambda: self.silent.open == 1, what="probe connected")
        started = reactor.seconds()
        yield checker.stop()
        self.assertLess(reactor.seconds() - started, 1.0)
        yield wait_for(lambda: self.silent.open == 0, what="server saw the close")
        self.assertTrue(backend.healthy)
        self.assertEqual(self.changes, [])
