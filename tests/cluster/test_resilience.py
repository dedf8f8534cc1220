# -*- test-case-name: tests.cluster.test_resilience -*-
"""
Tests for the resilience state a L{balance.cluster.cluster.Cluster} keeps:
per-backend circuit breakers folded into eligibility, outlier detection,
the panic threshold, C{Retry-After} hints, and connection failover (L4)
feeding the breakers.
"""

from __future__ import annotations

from twisted.internet.protocol import Factory, Protocol
from twisted.internet.testing import MemoryReactorClock
from twisted.trial.unittest import SynchronousTestCase

from balance.cluster.breaker import BreakerState, Permit
from balance.cluster.cluster import BREAKER_THRESHOLD, Cluster, NoBackendAvailable
from balance.cluster.retry import Outcome
from balance.config import model
from tests.cluster.test_cluster import FakeEndpoint, cluster_model


class ClusterResilienceTests(SynchronousTestCase):
    def setUp(self):
        self.reactor = MemoryReactorClock()

    def cluster(self, *ports, **kwargs) -> Cluster:
        return Cluster(cluster_model(*(ports or (9001, 9002, 9003)), **kwargs), self.reactor)

    def test_breaker_per_backend(self):
        """
        Every backend has a breaker; connect failures, resets and timeouts
        open it after 5 in a row, and an open breaker makes it ineligible.
        """
        cluster = self.cluster()
        a, b, c = cluster.backends
        self.assertIsNot(a.breaker, b.breaker)
        for outcome in (Outcome.CONNECT_FAILURE, Outcome.RESET, Outcome.TIMEOUT):
            cluster.record(a, outcome)
        cluster.record(a, Outcome.STATUS_5XX)
        self.assertEqual(a.breaker.failures, 0, "a 5xx is an answer: the backend is reachable")
        for _ in range(BREAKER_THRESHOLD):
            cluster.record(a, Outcome.RESET)
        self.assertEqual(a.breaker.state, BreakerState.OPEN)
        self.assertFalse(a.eligible)
        self.assertEqual({cluster.pick() for _ in range(4)}, {b, c})
        self.assertEqual(cluster.retry_after(), 5)
        self.reactor.advance(5)
        self.assertTrue(a.eligible, "half-open: one probe may go")
        self.assertEqual(a.breaker.allow(), Permit.PROBE)
        self.assertFalse(a.eligible, "the probe is out")
        cluster.record(a, Outcome.SUCCESS, Permit.PROBE)
        self.assertEqual(a.breaker.state, BreakerState.CLOSED)
        self.assertTrue(a.eligible)

    def test_outlier_detection(self):
        """C{outlier_detection:} ejects on consecutive failures, for C{base_ejection}."""
        cluster = self.cluster(
            outlier_detection=model.OutlierDetection(consecutive_failures=2, base_ejection=10.0)
        )
        a = cluster.backends[0]
        cluster.record(a, Outcome.STATUS_5XX)
        cluster.record(a, Outcome.STATUS_5XX)
        self.assertTrue(a.ejected)
        self.assertFalse(a.eligible)
        self.assertEqual(cluster.retry_after(), 10)
        self.reactor.advance(10)
        self.assertFalse(a.ejected)
        self.assertIsNone(self.cluster().outlier)

    def test_panic(self):
        """
        Below C{panic_threshold} healthy, every backend not drained is
        eligible again, until enough are healthy.
        """
        cluster = self.cluster(panic_threshold=50.0)
        a, b, c = cluster.backends
        a.healthy = False
        self.assertFalse(cluster.panic.active)
        self.assertEqual([x.eligible for x in (a, b, c)], [False, True, True])
        b.healthy = False
        self.assertTrue(cluster.panic.active)
        self.assertEqual([x.eligible for x in (a, b, c)], [True, True, True])
        a.drained = True
        self.assertFalse(a.eligible, "drained stays out, panic or not")
        b.healthy = True
        self.assertFalse(cluster.panic.active)
        self.assertEqual([x.eligible for x in (a, b, c)], [False, True, True])

    def test_panic_off(self):
        """C{panic_threshold: 0%}: no panic, whatever the health."""
        cluster = self.cluster(panic_threshold=0.0)
        for b in cluster.backends:
            b.healthy = False
        self.assertIsNone(cluster.pick())

    def test_retry_after_health_interval(self):
        """With a backend down by health checks, Retry-After is the check interval."""
        cluster = self.cluster(
            panic_threshold=0.0, health_check=model.HealthCheck(interval=2.5, timeout=1.0)
        )
        self.assertEqual(cluster.retry_after(), 1)
        cluster.backends[0].healthy = False
        self.assertEqual(cluster.retry_after(), 3)

    def test_connect_feeds_breaker(self):
        """
        Connection failover (L4) counts refused connections against each
        backend's breaker, and a connection made closes it again.
        """
        cluster = self.cluster(9001)
        endpoint = FakeEndpoint()
        (a,) = cluster.backends
        a.endpoint = endpoint
        factory = Factory.forProtocol(Protocol)
        for _ in range(BREAKER_THRESHOLD):
            d = cluster.connect(factory)
            endpoint.refuse()
            self.failureResultOf(d, NoBackendAvailable)
        self.assertEqual(a.breaker.state, BreakerState.OPEN)
        self.failureResultOf(cluster.connect(factory), NoBackendAvailable)
        self.assertEqual(len(endpoint.attempts), BREAKER_THRESHOLD)
        self.reactor.advance(5)
        d = cluster.connect(factory)
        endpoint.succeed()
        self.successResultOf(d)
        self.assertEqual(a.breaker.state, BreakerState.CLOSED)

    def test_connect_cancel_gives_probe_back(self):
        """A probe connection cancelled by its caller lets the next one probe."""
        cluster = self.cluster(9001)
        endpoint = FakeEndpoint()
        (a,) = cluster.backends
        a.endpoint = endpoint
        factory = Factory.forProtocol(Protocol)
        for _ in range(BREAKER_THRESHOLD):
            cluster.connect(factory).addErrback(lambda f: None)
            endpoint.refuse()
        self.reactor.advance(5)
        d = cluster.connect(factory)
        self.assertFalse(a.eligible)
        d.cancel()
        self.failureResultOf(d)
        self.assertTrue(a.eligible)

    def test_stop_cancels_timers(self):
        """Stopping the cluster cancels ejection and open-breaker timers."""
        cluster = self.cluster(
            outlier_detection=model.OutlierDetection(consecutive_failures=1, base_ejection=10.0)
        )
        a = cluster.backends[0]
        for _ in range(BREAKER_THRESHOLD):
            cluster.record(a, Outcome.CONNECT_FAILURE)
        self.assertTrue(self.reactor.getDelayedCalls())
        cluster.stop()
        self.assertEqual(self.reactor.getDelayedCalls(), [])
