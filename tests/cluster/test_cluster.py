"""
Tests for L{balance.cluster.cluster}: building a cluster and connecting with
failover.
"""

from __future__ import annotations

from random import Random

from twisted.internet import error
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.endpoints import HostnameEndpoint
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.logger import Logger, LogLevel, formatEvent
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from balance.cluster.cluster import Cluster, NoBackendAvailable, describe
from balance.cluster.lb.round_robin import RoundRobin
from balance.config import model
from tests.cluster.support import FakeResolver
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


class ClusterPolicyTests(SynchronousTestCase):
    """The cluster builds its policy from the config and feeds it."""

    def setUp(self):
        self.reactor = MemoryReactorClock()

    def test_policy_from_config(self):
        """Each C{lb} name builds its policy, with the config's tunables."""
        from balance.cluster import lb

        for name, policy_class in lb.POLICIES.items():
            extra = {"hash_on": "client_ip"} if name in lb.HASH_POLICIES else {}
            cluster = Cluster(cluster_model(9001, 9002, lb=name, **extra), self.reactor)
            self.assertIsInstance(cluster.policy, policy_class, name)

    def test_started_finished_latency(self):
        """
        C{started} and C{finished} keep C{active}; a latency given to
        C{finished} reaches the policy.
        """
        cluster = Cluster(cluster_model(9001, 9002, lb="peak_ewma"), self.reactor, rng=Random(1))
        a, _ = cluster.backends
        cluster.started(a)
        self.assertEqual(a.active, 1)
        cluster.finished(a, latency=0.25)
        self.assertEqual(a.active, 0)
        self.assertEqual(cluster.policy.latency(a), 0.25)
        cluster.started(a)
        cluster.release(a)
        self.assertEqual(a.active, 0)

    def test_connect_observes_connect_time(self):
        """A connection's set-up time is the latency the policy observes."""
        cluster = Cluster(cluster_model(9001, lb="peak_ewma"), self.reactor, rng=Random(1))
        endpoint = FakeEndpoint()
        (backend,) = cluster.backends
        backend.endpoint = endpoint
        d = cluster.connect(Factory.forProtocol(Protocol))
        self.reactor.advance(0.125)
        endpoint.succeed()
        self.successResultOf(d)
        self.assertEqual(cluster.policy.latency(backend), 0.125)

    def test_request_key(self):
        """
        The hash key follows C{hash_on} for hash policies, and is None for
        the others (whose C{hash_on} has no use).
        """
        headers = [(b"X-Tenant", b"t1")]
        cluster = Cluster(cluster_model(9001, lb="maglev", hash_on="header:x-tenant"), self.reactor)
        self.assertEqual(cluster.request_key(b"10.0.0.1", headers, b"/"), b"t1")
        self.assertIsNone(cluster.connection_key(b"10.0.0.1"))
        cluster = Cluster(cluster_model(9001, lb="ring_hash", hash_on="client_ip"), self.reactor)
        self.assertEqual(cluster.connection_key(b"10.0.0.1"), b"10.0.0.1")
        cluster = Cluster(cluster_model(9001, hash_on="client_ip"), self.reactor)
        self.assertIsNone(cluster.request_key(b"10.0.0.1", headers, b"/"))
        self.assertIsNone(cluster.connection_key(b"10.0.0.1"))

    def test_hash_key_sticks(self):
        """Requests with the same key go to the same backend; without one, round robin."""
        cluster = Cluster(
            cluster_model(9001, 9002, 9003, lb="ring_hash", hash_on="cookie:user"), self.reactor
        )
        headers = [(b"Cookie", b"user=alice")]
        picked = {cluster.pick_request(b"10.0.0.1", headers, b"/") for _ in range(20)}
        self.assertEqual(len(picked), 1)
        picked = [cluster.pick_request(b"10.0.0.1", [], b"/") for _ in range(3)]
        self.assertEqual(picked, list(cluster.backends))

    def test_sticky(self):
        """
        With C{sticky_cookie}, C{cluster.sticky} pins requests to the backend
        their cookie names while it is eligible.
        """
        self.assertIsNone(Cluster(cluster_model(9001), self.reactor).sticky)
        cluster = Cluster(cluster_model(9001, 9002, 9003, sticky_cookie="srv"), self.reactor)
        b = cluster.backends[1]
        headers = [(b"Cookie", b"srv=" + cluster.sticky.token_for(b).encode())]
        self.assertEqual({cluster.pick_request(b"1.1.1.1", headers, b"/") for _ in range(5)}, {b})
        self.assertIsNot(cluster.pick_request(b"1.1.1.1", headers, b"/", exclude=[b]), b)
        b.healthy = False
        replacement = cluster.pick_request(b"1.1.1.1", headers, b"/")
        self.assertIsNot(replacement, b)
        self.assertEqual(
            cluster.sticky.set_cookie_for(headers, replacement),
            b"srv=%s; Path=/; HttpOnly" % cluster.sticky.token_for(replacement).encode(),
        )

    def test_sticky_secret(self):
        """Tokens depend on the cluster's secret."""
        one = Cluster(cluster_model(9001, sticky_cookie="srv"), self.reactor)
        two = Cluster(cluster_model(9001, sticky_cookie="srv"), self.reactor, sticky_secret=b"k")
        self.assertNotEqual(
            one.sticky.token_for(one.backends[0]), two.sticky.token_for(two.backends[0])
        )

    def test_slow_start_on_recovery(self):
        """
        With C{slow_start}, a backend that turns healthy again ramps up from
        10% of its share, on the cluster's clock.
        """
        cluster = Cluster(
            cluster_model(9001, 9002, lb="weighted_round_robin", slow_start=20.0), self.reactor
        )
        a, b = cluster.backends
        self.reactor.advance(100)
        b.healthy = False
        b.healthy = True
        self.assertEqual(b.healthy_since, 100)
        picks = [cluster.pick() for _ in range(1100)]
        self.assertEqual(picks.count(b), 100)
        self.reactor.advance(20)
        picks = [cluster.pick() for _ in range(1000)]
        self.assertEqual(picks.count(b), 500)

    def test_recovery_recorded_without_slow_start(self):
        """Without slow start, C{healthy_since} still records the recovery."""
        cluster = Cluster(cluster_model(9001), self.reactor)
        (a,) = cluster.backends
        self.reactor.advance(7)
        a.healthy = False
        a.healthy = True
        self.assertEqual(a.healthy_since, 7)


def named_cluster(**kwargs):
    return model.Cluster(
        name="api",
        backends=[
            model.Backend(address="app.internal:8080", host="app.internal", port=8080),
            backend_model("127.0.0.1", 9002),
        ],
        **kwargs,
    )


class ClusterDNSTests(SynchronousTestCase):
    """Backends named by host: resolved, re-resolved, one backend per address."""

    def setUp(self):
        self.reactor = MemoryReactorClock()
        self.fake = FakeResolver({"app.internal": ["10.0.0.2", "10.0.0.1"]})

    def make(self, **kwargs):
        return Cluster(named_cluster(**kwargs), self.reactor, name_resolver=self.fake)

    def test_before_start(self):
        """Before C{start}, a named backend connects through its name."""
        cluster = self.make()
        named, literal = cluster.backends
        self.assertIsNone(named.ip)
        self.assertIsInstance(named.endpoint, HostnameEndpoint)
        self.assertEqual(literal.ip, "127.0.0.1")
        self.assertEqual(self.fake.lookups, [])

    def test_literal_only_needs_nothing(self):
        """A cluster of IP literals resolves nothing."""
        cluster = Cluster(cluster_model(9001), self.reactor, name_resolver=self.fake)
        self.successResultOf(cluster.start())
        self.assertEqual(self.fake.lookups, [])
        cluster.stop()

    def test_one_backend_per_address(self):
        """
        Once resolved, each address is a backend of its own: the admin
        address stays "host:port", the name shows the IP, connections go
        to the IP, and the policy picks among all of them.
        """
        cluster = self.make()
        self.successResultOf(cluster.start())
        self.assertEqual(
            [b.name for b in cluster.backends],
            ["app.internal:8080 (10.0.0.1)", "app.internal:8080 (10.0.0.2)", "127.0.0.1:9002"],
        )
        self.assertEqual({b.address for b in cluster.backends[:2]}, {"app.internal:8080"})
        self.assertEqual(len(cluster.backends_at("app.internal:8080")), 2)
        self.assertIs(cluster.backend("app.internal:8080"), cluster.backends[0])
        self.assertIs(cluster.backend("app.internal:8080 (10.0.0.2)"), cluster.backends[1])
        self.assertEqual([cluster.pick() for _ in range(3)], list(cluster.backends))
        cluster.backends[1].endpoint.connect(Factory.forProtocol(Protocol))
        self.assertEqual(self.reactor.tcpClients[-1][:2], ("10.0.0.2", 8080))
        cluster.stop()

    def test_re_resolution(self):
        """
        Every 30 seconds the name is resolved again: kept addresses keep
        their backend (and its state), new ones are added with slow start,
        gone ones are removed, and the policy and sticky cookie follow.
        """
        cluster = self.make(slow_start=10.0, sticky_cookie="srv")
        cluster.start()
        first, second, literal = cluster.backends
        first.drained = True
        cluster.started(second)
        self.fake.answers["app.internal"] = ["10.0.0.2", "10.0.0.3"]
        self.reactor.advance(30)
        kept, added, literal_after = cluster.backends
        self.assertIs(kept, second)
        self.assertIs(literal_after, literal)
        self.assertEqual(kept.active, 1)
        self.assertEqual(added.name, "app.internal:8080 (10.0.0.3)")
        # A new address of a drained host name is drained too.
        self.assertTrue(added.drained)
        self.assertEqual(added.healthy_since, 30)
        self.assertIsNone(cluster.sticky.backend_for(cluster.sticky.token_for(first)))
        self.assertIs(cluster.sticky.backend_for(cluster.sticky.token_for(added)), added)
        self.assertNotIn(first, {cluster.pick() for _ in range(10)})
        # Work on a removed backend still finishes cleanly.
        cluster.started(first)
        cluster.finished(first)
        cluster.stop()

    def test_watchers(self):
        """
        Watchers hear of each new set of backends (only when it changes); one
        that fails is logged and does not stop the others.
        """
        cluster = self.make()
        seen = []
        events = []
        cluster.log = Logger(observer=events.append)
        cluster.watchers.append(lambda backends: 1 / 0)
        cluster.watchers.append(seen.append)
        cluster.start()
        self.reactor.advance(30)
        self.assertEqual(seen, [cluster.backends])
        self.assertEqual(len([e for e in events if e["log_level"] is LogLevel.critical]), 1)
        self.flushLoggedErrors(ZeroDivisionError)
        cluster.stop()

    def test_first_resolution_no_ramp(self):
        """The first resolution replaces the name's backend without a slow-start ramp."""
        cluster = self.make(slow_start=10.0)
        self.reactor.advance(5)
        cluster.start()
        self.assertEqual([b.healthy_since for b in cluster.backends], [float("-inf")] * 3)
        cluster.stop()

    def test_failure_keeps_backends(self):
        """A failed re-resolution keeps the last good backends."""
        cluster = self.make()
        cluster.start()
        before = cluster.backends
        self.fake.answers["app.internal"] = error.DNSLookupError("nope")
        self.reactor.advance(30)
        self.assertEqual(cluster.backends, before)
        cluster.stop()

    def test_unresolvable_keeps_name(self):
        """A name that never resolves keeps connecting through the name."""
        self.fake.answers["app.internal"] = []
        cluster = self.make()
        self.successResultOf(cluster.start())
        self.assertIsNone(cluster.backends[0].ip)
        cluster.stop()

    def test_stop(self):
        """After C{stop}, no more lookups."""
        cluster = self.make()
        cluster.start()
        cluster.stop()
        self.reactor.advance(300)
        self.assertEqual(self.fake.lookups, ["app.internal"])
