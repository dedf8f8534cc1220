"""
Tests for L{balance.cluster.lb}: the policy registry and round robin.
"""

from __future__ import annotations

import ast
import inspect
from collections import Counter

from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyObject

from balance.cluster import lb
from balance.cluster.backend import Backend
from balance.cluster.lb.round_robin import RoundRobin
from balance.interfaces import ILoadBalancer
from tests.helpers import backend_model


def backends(*ports):
    """Runtime backends on 127.0.0.1 with the given ports, no endpoints."""
    return [Backend(backend_model("127.0.0.1", port)) for port in ports]


class RegistryTests(SynchronousTestCase):
    """The registry maps config names to policies."""

    def test_every_policy_provides_the_interface(self):
        """Each registered policy, built by C{make}, provides ILoadBalancer."""
        for name in lb.POLICIES:
            verifyObject(ILoadBalancer, lb.make(name, backends(1, 2)))

    def test_make_round_robin(self):
        """C{make("round_robin", ...)} builds a RoundRobin over the backends."""
        a, b = backends(1, 2)
        policy = lb.make("round_robin", [a, b])
        self.assertIsInstance(policy, RoundRobin)
        self.assertEqual([policy.pick(), policy.pick(), policy.pick()], [a, b, a])

    def test_unknown_name(self):
        """An unknown policy name raises KeyError."""
        self.assertRaises(KeyError, lb.make, "no_such_policy", backends(1))

    def test_policies_are_pure(self):
        """
        Policy modules import nothing that does I/O or reads the time or
        randomness behind the caller's back.
        """
        forbidden = ("time", "random", "socket", "twisted.internet.reactor")
        for policy in lb.POLICIES.values():
            tree = ast.parse(inspect.getsource(inspect.getmodule(policy)))
            for node in ast.walk(tree):
                if isinstance(node, ast.Import):
                    names = [alias.name for alias in node.names]
                elif isinstance(node, ast.ImportFrom):
                    names = [node.module or ""]
                else:
                    continue
                for name in names:
                    self.assertNotIn(name, forbidden)
                    if name.startswith("twisted.internet"):
                        self.assertEqual(name, "twisted.internet.interfaces")


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
