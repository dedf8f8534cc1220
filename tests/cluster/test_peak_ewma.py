"""
Tests for L{balance.cluster.lb.peak_ewma}: latency-aware balancing, on an
injected clock.
"""

from __future__ import annotations

from math import exp
from random import Random

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from balance.cluster.lb.options import Options
from balance.cluster.lb.peak_ewma import PENALTY, PeakEwma
from tests.cluster.support import LatencySimulation, assert_near, backends, start


class EstimateTests(SynchronousTestCase):
    """The peak-sensitive moving average of one backend's latency."""

    def setUp(self):
        self.clock = Clock()
        self.a, self.b = backends(1, 1)
        self.policy = PeakEwma([self.a, self.b], Options(rng=Random(1), clock=self.clock))

    def test_peak_replaces(self):
        """A sample above the estimate replaces it at once."""
        self.policy.observe(self.a, 0.010)
        self.policy.observe(self.a, 0.500)
        self.assertEqual(self.policy.latency(self.a), 0.500)

    def test_lower_sample_weighs_by_time(self):
        """
        A lower sample moves the estimate by 1 - exp(-dt / decay): after one
        time constant (10 s), about 63% of the way.
        """
        self.policy.observe(self.a, 0.100)
        self.clock.advance(10)
        self.policy.observe(self.a, 0.000001)
        expected = 0.100 * exp(-1) + 0.000001 * (1 - exp(-1))
        assert_near(self, self.policy.latency(self.a), expected, 1e-9)

    def test_decays_when_idle(self):
        """With no samples, the estimate decays towards 0 with the time constant."""
        self.policy.observe(self.a, 0.100)
        self.clock.advance(20)
        assert_near(self, self.policy.latency(self.a), 0.100 * exp(-2), 1e-9)

    def test_unknown_backend(self):
        """Samples of a backend the policy does not have are dropped."""
        (other,) = backends(1, host="10.9.9")
        self.policy.observe(other, 1.0)
        self.assertIsNone(self.policy.latency(other))

    def test_update_keeps_estimates(self):
        """Backends that stay through an update keep their estimate."""
        self.policy.observe(self.a, 0.250)
        self.policy.update([self.a])
        self.assertEqual(self.policy.latency(self.a), 0.250)


class PickTests(SynchronousTestCase):
    """Cost is latency x (in flight + 1) / weight; the cheaper of two wins."""

    def setUp(self):
        self.clock = Clock()

    def test_faster_wins(self):
        """Of two idle backends, the faster one is picked."""
        a, b = backends(1, 1)
        policy = PeakEwma([a, b], Options(rng=Random(1), clock=self.clock))
        policy.observe(a, 0.050)
        policy.observe(b, 0.010)
        self.assertEqual({policy.pick() for _ in range(50)}, {b})

    def test_load_counts(self):
        """A fast backend with many requests in flight loses to a slower idle one."""
        a, b = backends(1, 1)
        policy = PeakEwma([a, b], Options(rng=Random(1), clock=self.clock))
        policy.observe(a, 0.030)
        policy.observe(b, 0.010)
        b.active = 5
        self.assertIs(policy.pick(), a)

    def test_unmeasured_backend(self):
        """
        A backend with no latency yet is tried while idle, but with a
        request in flight it costs more than any measured one.
        """
        a, b = backends(1, 1)
        policy = PeakEwma([a, b], Options(rng=Random(1), clock=self.clock))
        policy.observe(a, 2.0)
        self.assertIs(policy.pick(), b)
        start(policy, b)
        self.assertIs(policy.pick(), a)
        self.assertGreater(PENALTY, 2.0 * 100)


class SlowBackendTests(SynchronousTestCase):
    """
    Three backends answering in about 10 ms, 200 requests a second; at
    t=30 s one of them turns ten times slower, at t=60 s it recovers.
    """

    def setUp(self):
        self.clock = Clock()
        self.backends = backends(1, 1, 1)
        self.slow = self.backends[2]
        policy = PeakEwma(self.backends, Options(rng=Random(1), clock=self.clock))
        self.sim = LatencySimulation(policy, self.backends, self.clock)
        self.sim.run_until(30)
        self.sim.latency[self.slow] = 0.100
        self.sim.run_until(60)
        self.sim.latency[self.slow] = 0.010
        self.sim.run_until(120)

    def test_even_before(self):
        """Before the slowdown each backend takes a third (within 5 points)."""
        for backend in self.backends:
            assert_near(self, self.sim.share(backend, 0, 30), 1 / 3, 0.05)

    def test_loses_traffic_within_seconds(self):
        """
        Within 3 seconds of turning slow the backend's share falls below 8%
        (measured: about 4%, the probes that keep its estimate fresh), and
        stays there while it is slow.
        """
        self.assertLess(self.sim.share(self.slow, 30, 33), 0.08)
        self.assertLess(self.sim.share(self.slow, 33, 60), 0.08)

    def test_wins_back_after_recovery(self):
        """
        Once it is fast again its estimate decays back (time constant
        10 s): within 20 seconds it has its third again (within 6 points).
        """
        assert_near(self, self.sim.share(self.slow, 80, 120), 1 / 3, 0.06)
