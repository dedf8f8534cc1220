# -*- test-case-name: tests.cluster.test_service -*-
"""
Tests for L{balance.cluster.service.ClusterService}: a cluster's health
checks run while the service runs, and stop with it.
"""

from __future__ import annotations

from random import Random

from twisted.internet.testing import MemoryReactorClock
from twisted.trial.unittest import SynchronousTestCase

from balance.cluster.cluster import BREAKER_THRESHOLD, Cluster
from balance.cluster.retry import Outcome
from balance.cluster.service import ClusterService
from balance.config import model
from balance.config.load import load_text
from balance.config.validate import validate
from balance.service import build
from tests.cluster.test_cluster import FakeEndpoint, cluster_model


class ClusterServiceTests(SynchronousTestCase):
    def test_health_checks(self):
        """
        With C{health_check:}, probes start with the service, each is
        reported to C{on_check}, and stopping cancels them.
        """
        reactor = MemoryReactorClock()
        cluster = Cluster(
            cluster_model(
                9001,
                health_check=model.HealthCheck(interval=1.0, timeout=0.5, unhealthy_threshold=1),
                panic_threshold=0.0,
            ),
            reactor,
        )
        (backend,) = cluster.backends
        endpoint = backend.endpoint = FakeEndpoint()
        checks = []
        service = ClusterService(
            cluster, reactor, on_check=lambda b, ok, why: checks.append(ok), random=Random(0)
        )
        self.assertIs(cluster.health, service.health)
        self.assertEqual(endpoint.attempts, [])
        service.startService()
        reactor.advance(0.2)
        endpoint.refuse()
        self.assertEqual(checks, [False])
        self.assertFalse(backend.healthy)
        self.successResultOf(service.stopService())
        self.assertEqual(reactor.getDelayedCalls(), [])

    def test_without_health_check(self):
        """Without C{health_check:} there is no checker, and nothing is scheduled."""
        reactor = MemoryReactorClock()
        service = ClusterService(Cluster(cluster_model(9001), reactor), reactor)
        self.assertIsNone(service.health)
        service.startService()
        self.assertEqual(reactor.getDelayedCalls(), [])
        self.successResultOf(service.stopService())


class BalanceServiceTests(SynchronousTestCase):
    """The service tree runs each cluster, and reports breakers in the metrics."""

    def service(self):
        config = validate(
            load_text(
                "listeners: [{name: web, listen: 'tcp:0:interface=127.0.0.1', cluster: app}]\n"
                "clusters:\n"
                "  - name: app\n"
                "    backends: ['127.0.0.1:9001', '127.0.0.1:9002']\n"
                "    health_check: {type: tcp, interval: 1s}\n",
                "t.yaml",
            ),
            "t.yaml",
        )
        return build(config, MemoryReactorClock())

    def test_cluster_services(self):
        """Every cluster gets its service, with its health checker, before the listeners."""
        root = self.service()
        [service] = root.cluster_services
        self.assertIs(service.cluster, root.clusters["app"])
        self.assertIsNotNone(service.health)
        self.assertLess(list(root).index(root.cluster_services), list(root).index(root.listeners))

    def test_breaker_gauge(self):
        """A backend whose breaker is not closed reports it (balance_circuit_breaker_open)."""
        root = self.service()
        cluster = root.clusters["app"]
        a = cluster.backends[0]
        for _ in range(BREAKER_THRESHOLD):
            cluster.record(a, Outcome.CONNECT_FAILURE)
        self.assertEqual(
            sorted(root._backend_states()),
            [
                ("app", "127.0.0.1:9001", True, 0, True),
                ("app", "127.0.0.1:9002", True, 0, False),
            ],
        )
