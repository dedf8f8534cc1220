"""
Tests for L{balance.cluster.cluster}: building a cluster and connecting with
failover.
"""

from __future__ import annotations

from twisted.internet import error
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.logger import Logger, LogLevel, formatEvent
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from balance.cluster.cluster import Cluster, NoBackendAvailable, describe
from balance.cluster.lb.round_robin import RoundRobin
from balance.config import model
from tests.helpers import backend_model


class FakeEndpoint:
    """A client endpoint whose connection attempts the test settles."""

    def __init__(self):
        self.attempts: list[Deferred] = []
        self.cancelled = 0

    def connect(self, factory):
        d = Deferred(lambda d: self._cancel(d))
        d.factory = factory
        self.attempts.append(d)
        return d

    def _cancel(self, d):
        self.cancelled += 1
        d.errback(error.ConnectingCancelledError(None))

    def succeed(self):
        """Settle the last attempt with a connected protocol."""
        d = self.attempts[-1]
        protocol = d.factory.buildProtocol(None)
        protocol.makeConnection(StringTransport())
        d.callback(protocol)
        return protocol

    def refuse(self):
        """Fail the last attempt with connection refused."""
        self.attempts[-1].errback(error.ConnectionRefusedError())


class BrokenEndpoint:
    """An endpoint whose connect raises instead of returning a Deferred."""

    def connect(self, factory):
        raise ValueError("endpoint exploded")


def cluster_model(*ports, name="api", **kwargs):
    return model.Cluster(
        name=name,
        backends=[backend_model("127.0.0.1", port) for port in ports],
        **kwargs,
    )


class ClusterTests(SynchronousTestCase):
    """A cluster builds its backends and policy, and connects with failover."""

    def setUp(self):
        self.reactor = MemoryReactorClock()
        self.cluster = Cluster(cluster_model(9001, 9002, 9003), self.reactor)
        self.endpoints = [FakeEndpoint() for _ in self.cluster.backends]
        for backend, endpoint in zip(self.cluster.backends, self.endpoints, strict=True):
            backend.endpoint = endpoint
        self.events = []
        self.cluster.log = Logger(observer=self.events.append, namespace="test")
        self.factory = Factory.forProtocol(Protocol)

    def messages(self):
        return [formatEvent(e) for e in self.events if e["log_level"] is LogLevel.warn]

    def test_build(self):
        """Backends follow the config order; the policy is the one named."""
        self.assertEqual(self.cluster.name, "api")
        self.assertEqual(
            [b.address for b in self.cluster.backends],
            ["127.0.0.1:9001", "127.0.0.1:9002", "127.0.0.1:9003"],
        )
        self.assertIsInstance(self.cluster.policy, RoundRobin)
        self.assertIs(self.cluster.backend("127.0.0.1:9002"), self.cluster.backends[1])
        self.assertRaises(KeyError, self.cluster.backend, "127.0.0.1:1")

    def test_real_endpoints_use_connect_timeout(self):
        """The backends' endpoints connect with the cluster's connect_timeout."""
        cluster = Cluster(cluster_model(9001, connect_timeout=0.5), self.reactor)
        cluster.connect(self.factory)
        host, port, _, timeout, _ = self.reactor.tcpClients[0]
        self.assertEqual((host, port, timeout), ("127.0.0.1", 9001, 0.5))

    def test_pick(self):
        """C{pick} asks the policy, honouring C{exclude}."""
        a, b, c = self.cluster.backends
        self.assertIs(self.cluster.pick(), a)
        self.assertIs(self.cluster.pick(exclude=[b]), c)

    def test_connect_first(self):
        """
        A connection to the picked backend fires with the backend and the
        protocol, and counts as active until released.
        """
        d = self.cluster.connect(self.factory)
        self.assertNoResult(d)
        a = self.cluster.backends[0]
        self.assertEqual(a.active, 1)
        protocol = self.endpoints[0].succeed()
        self.assertEqual(self.successResultOf(d), (a, protocol))
        self.assertEqual(a.active, 1)
        self.cluster.release(a)
        self.assertEqual(a.active, 0)
        self.assertEqual(self.events, [])

    def test_failover(self):
        """
        A refused attempt is logged with the backend and the reason, and the
        next backend is tried.
        """
        a, b, _ = self.cluster.backends
        d = self.cluster.connect(self.factory, log_context={"listener": "edge"})
        self.endpoints[0].refuse()
        self.assertEqual(a.active, 0)
        self.assertEqual(b.active, 1)
        protocol = self.endpoints[1].succeed()
        self.assertEqual(self.successResultOf(d), (b, protocol))
        self.assertEqual(
            self.messages(),
            [
                "connect to 127.0.0.1:9001 in cluster api failed "
                "(connection refused); trying next backend"
            ],
        )
        self.assertEqual(self.events[0]["listener"], "edge")
        self.assertEqual(self.events[0]["backend"], "127.0.0.1:9001")

    def test_all_fail(self):
        """
        When every backend fails, each is tried exactly once, each failure is
        logged, and the result fails with NoBackendAvailable.
        """
        d = self.cluster.connect(self.factory)
        for endpoint in self.endpoints:
            endpoint.refuse()
        self.assertEqual([len(e.attempts) for e in self.endpoints], [1, 1, 1])
        f = self.failureResultOf(d, NoBackendAvailable)
        self.assertEqual(
            str(f.value),
            "no backend of cluster api accepted the connection (tried 127.0.0.1:9001, "
            "127.0.0.1:9002, 127.0.0.1:9003; last: connection refused)",
        )
        self.assertEqual(len(self.messages()), 3)
        self.assertTrue(
            self.messages()[-1].endswith("(connection refused); no backend left to try")
        )
        self.assertEqual([b.active for b in self.cluster.backends], [0, 0, 0])

    def test_max_attempts(self):
        """C{max_attempts} bounds the number of backends tried."""
        d = self.cluster.connect(self.factory, max_attempts=2)
        self.endpoints[0].refuse()
        self.endpoints[1].refuse()
        self.assertEqual(self.endpoints[2].attempts, [])
        self.assertEqual(
            self.failureResultOf(d, NoBackendAvailable).value.tried,
            ("127.0.0.1:9001", "127.0.0.1:9002"),
        )

    def test_skips_ineligible(self):
        """Drained and unhealthy backends are not connected to."""
        a, b, c = self.cluster.backends
        a.drained = True
        b.healthy = False
        d = self.cluster.connect(self.factory)
        self.assertEqual([len(e.attempts) for e in self.endpoints], [0, 0, 1])
        self.endpoints[2].succeed()
        self.assertIs(self.successResultOf(d)[0], c)

    def test_none_eligible(self):
        """With no eligible backend the result fails at once, with no attempt."""
        for backend in self.cluster.backends:
            backend.drained = True
        d = self.cluster.connect(self.factory)
        f = self.failureResultOf(d, NoBackendAvailable)
        self.assertEqual(str(f.value), "cluster api has no eligible backend")
        self.assertEqual(f.value.tried, ())
        self.assertEqual(self.events, [])

    def test_endpoint_raises(self):
        """An endpoint that raises counts as a failed attempt."""
        self.cluster.backends[0].endpoint = BrokenEndpoint()
        d = self.cluster.connect(self.factory)
        self.endpoints[1].succeed()
        self.assertIs(self.successResultOf(d)[0], self.cluster.backends[1])
        self.assertIn("(endpoint exploded); trying next backend", self.messages()[0])
        self.assertEqual(self.cluster.backends[0].active, 0)

    def test_cancel(self):
        """
        Cancelling stops the attempt in flight and tries nothing else, and
        logs nothing.
        """
        d = self.cluster.connect(self.factory)
        d.cancel()
        self.failureResultOf(d, CancelledError)
        self.assertEqual(self.endpoints[0].cancelled, 1)
        self.assertEqual([len(e.attempts) for e in self.endpoints], [1, 0, 0])
        self.assertEqual([b.active for b in self.cluster.backends], [0, 0, 0])
        self.assertEqual(self.events, [])

    def test_round_robin_across_connects(self):
        """Successive connects spread over the backends in turn."""
        picked = []
        for i in range(6):
            d = self.cluster.connect(self.factory)
            self.endpoints[i % 3].succeed()
            picked.append(self.successResultOf(d)[0].port)
        self.assertEqual(picked, [9001, 9002, 9003, 9001, 9002, 9003])


class DescribeTests(SynchronousTestCase):
    """Connection failures are described in a few words."""

    def test_known(self):
        cases = [
            (error.ConnectionRefusedError(), "connection refused"),
            (error.TimeoutError(), "timed out"),
            (error.TCPTimedOutError(), "timed out"),
            (error.DNSLookupError("x"), "host name did not resolve"),
            (error.NoRouteError(), "no route to host"),
        ]
        for exc, text in cases:
            self.assertEqual(describe(Failure(exc)), text)

    def test_other(self):
        """Other errors are described by their message."""
        self.assertEqual(describe(Failure(ValueError("bad thing"))), "bad thing")
