"""
Tests for L{balance.cluster.lb.round_robin}.
"""

from __future__ import annotations

from collections import Counter

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from balance.cluster.backend import Backend
from balance.cluster.lb.options import Options
from balance.cluster.lb.round_robin import RoundRobin
from balance.cluster.slow_start import SlowStart
from tests.cluster.support import assert_near, shares
from tests.helpers import backend_model


def backends(*ports):
    """Runtime backends on 127.0.0.1 with the given ports, no endpoints."""
    return [Backend(backend_model("127.0.0.1", port)) for port in ports]


class RoundRobinTests(SynchronousTestCase):
    """Round robin hands out eligible backends in turn."""

    def setUp(self):
        self.a, self.b, self.c = backends(1, 2, 3)
        self.policy = RoundRobin([self.a, self.b, self.c])

    def picks(self, count, **kwargs):
        return [self.policy.pick(**kwargs) for _ in range(count)]

    def test_order(self):
        """Three backends are picked a, b, c, a, b, c."""
        a, b, c = self.a, self.b, self.c
        self.assertEqual(self.picks(6), [a, b, c, a, b, c])

    def test_even_spread(self):
        """Over many picks each backend gets exactly its share."""
        counts = Counter(b.address for b in self.picks(3000))
        self.assertEqual(sorted(counts.values()), [1000, 1000, 1000])

    def test_skips_drained(self):
        """A drained backend is skipped, without giving its neighbour two turns."""
        self.b.drained = True
        a, c = self.a, self.c
        self.assertEqual(self.picks(4), [a, c, a, c])

    def test_skips_unhealthy(self):
        """An unhealthy backend is skipped until it is healthy again."""
        self.a.healthy = False
        b, c = self.b, self.c
        self.assertEqual(self.picks(3), [b, c, b])
        self.a.healthy = True
        self.assertEqual(self.picks(3), [c, self.a, b])

    def test_skips_excluded(self):
        """Excluded backends are not picked, and do not lose their turn later."""
        a, b, c = self.a, self.b, self.c
        self.assertEqual(self.policy.pick(exclude=[a]), b)
        self.assertEqual(self.policy.pick(exclude=[c, a]), b)
        self.assertEqual(self.picks(3), [c, a, b])

    def test_none_when_none_eligible(self):
        """With every backend drained, unhealthy or excluded, pick is None."""
        self.a.drained = True
        self.b.healthy = False
        self.assertIsNone(self.policy.pick(exclude=[self.c]))
        self.c.drained = True
        self.assertIsNone(self.policy.pick())

    def test_none_when_empty(self):
        """A policy with no backends picks None."""
        self.assertIsNone(RoundRobin([]).pick())

    def test_key_ignored(self):
        """The hashing key does not change round robin's order."""
        self.assertEqual(
            [self.policy.pick(key=b"10.0.0.1") for _ in range(3)],
            [self.a, self.b, self.c],
        )

    def test_update_keeps_turn(self):
        """
        Replacing the backends keeps the cursor (modulo the new count), so a
        reload does not send the next connection to the first backend again.
        """
        a, b, c = self.a, self.b, self.c
        self.assertEqual(self.picks(2), [a, b])
        (d,) = backends(4)
        self.policy.update([a, b, c, d])
        self.assertEqual(self.picks(3), [c, d, a])
        self.policy.update([b])
        self.assertEqual(self.picks(2), [b, b])
        self.policy.update([])
        self.assertIsNone(self.policy.pick())

    def test_started_finished_are_noops(self):
        """Load hooks do not change the order."""
        self.policy.started(self.a)
        self.policy.finished(self.a)
        self.assertEqual(self.picks(2), [self.a, self.b])

    def test_weights_ignored(self):
        """Configured weights do not change round robin's even spread."""
        a, b = (
            Backend(backend_model("127.0.0.1", port, weight)) for port, weight in ((1, 5), (2, 1))
        )
        policy = RoundRobin([a, b])
        self.assertEqual([policy.pick() for _ in range(4)], [a, b, a, b])


class RoundRobinSlowStartTests(SynchronousTestCase):
    """Round robin honours a slow-start ramp."""

    def test_ramp(self):
        """
        A backend that has just recovered gets about 10% of a full share at
        first, about half at mid-window, and its full turn after the window
        (counts over 1000 picks, within 2 percentage points).
        """
        clock = Clock()
        slow = SlowStart(10.0)
        a, b = backends(1, 2)
        policy = RoundRobin([a, b], Options(clock=clock, slow_start=slow))
        slow.begin(b, clock.seconds())
        expected = {0.0: 0.1 / 1.1, 5.0: 0.55 / 1.55, 10.0: 0.5}
        for when, share in expected.items():
            clock.advance(when - clock.seconds())
            picks = [policy.pick() for _ in range(1000)]
            assert_near(self, shares(picks, [b])[0], share, 0.02, f"share at {when}s")
