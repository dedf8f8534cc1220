"""
Tests for L{balance.cluster.lb}: the policy registry, the options, and what
every policy has in common.
"""

from __future__ import annotations

import ast
import inspect
from random import Random

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyObject

from balance.cluster import lb
from balance.cluster.lb.options import Options
from balance.cluster.slow_start import SlowStart
from balance.interfaces import ILoadBalancer
from tests.cluster.support import backends, finish, start


def options(**kwargs) -> Options:
    """Options with a seeded rng and a Clock, for every policy."""
    kwargs.setdefault("rng", Random(1))
    kwargs.setdefault("clock", Clock())
    kwargs.setdefault("table_size", 251)
    return Options(**kwargs)


class RegistryTests(SynchronousTestCase):
    """The registry maps config names to policies."""

    def test_names(self):
        """Every policy name of the config contract is registered."""
        from balance.config.validate import LB_POLICIES

        self.assertEqual(set(lb.POLICIES), set(LB_POLICIES))
        self.assertEqual(lb.HASH_POLICIES, {"ring_hash", "maglev", "consistent_hash_bounded"})
        self.assertEqual(lb.SLOW_START_POLICIES, set(lb.POLICIES) - lb.HASH_POLICIES)

    def test_every_policy_provides_the_interface(self):
        """Each registered policy, built by C{make}, provides ILoadBalancer."""
        for name in lb.POLICIES:
            policy = lb.make(name, backends(1, 2), options())
            verifyObject(ILoadBalancer, policy)

    def test_make_supplies_rng(self):
        """C{make} gives random policies a Random of their own when none is injected."""
        a, b = backends(1, 1)
        policy = lb.make("random", [a, b])
        self.assertIn(policy.pick(), (a, b))

    def test_make_round_robin(self):
        """C{make("round_robin", ...)} builds a RoundRobin over the backends."""
        a, b = backends(1, 1)
        policy = lb.make("round_robin", [a, b])
        self.assertIsInstance(policy, lb.RoundRobin)
        self.assertEqual([policy.pick(), policy.pick(), policy.pick()], [a, b, a])

    def test_unknown_name(self):
        """An unknown policy name raises KeyError."""
        self.assertRaises(KeyError, lb.make, "no_such_policy", backends(1))

    def test_missing_dependencies(self):
        """
        A policy that needs a clock or a random source refuses to be built
        without one, naming what is missing.
        """
        e = self.assertRaises(ValueError, lb.PeakEwma, backends(1), Options(rng=Random(1)))
        self.assertIn("clock", str(e))
        e = self.assertRaises(ValueError, lb.LeastConnections, backends(1), Options())
        self.assertIn("random.Random", str(e))
        e = self.assertRaises(
            ValueError,
            lb.WeightedRandom,
            backends(1),
            Options(rng=Random(1), slow_start=SlowStart(1)),
        )
        self.assertIn("clock", str(e))

    def test_bad_tunables(self):
        """Out-of-range tunables are refused at build time."""
        self.assertRaises(ValueError, lb.Maglev, backends(1), Options(table_size=100))
        self.assertRaises(
            ValueError, lb.ConsistentHashBounded, backends(1), Options(bounded_load=1)
        )
        self.assertRaises(ValueError, lb.PeakEwma, backends(1), options(decay=0))

    def test_policies_are_pure(self):
        """
        Policy modules import nothing that does I/O or reads the time or
        randomness behind the caller's back.
        """
        forbidden = ("time", "random", "socket", "twisted.internet.reactor")
        modules = {inspect.getmodule(policy) for policy in lb.POLICIES.values()}
        modules |= {lb.keys, lb.hashing, lb.options, lb._weights}
        for module in modules:
            tree = ast.parse(inspect.getsource(module))
            for node in ast.walk(tree):
                if isinstance(node, ast.Import):
                    names = [alias.name for alias in node.names]
                elif isinstance(node, ast.ImportFrom):
                    names = [node.module or ""]
                else:
                    continue
                for name in names:
                    self.assertNotIn(name, forbidden, module.__name__)
                    if name.startswith("twisted.internet"):
                        self.assertEqual(name, "twisted.internet.interfaces")


class CommonBehaviourTests(SynchronousTestCase):
    """What every policy does, whatever its algorithm."""

    def policies(self, weights=(1, 2, 3)):
        for name in lb.POLICIES:
            bs = backends(*weights)
            yield name, lb.make(name, bs, options()), bs

    def test_only_eligible(self):
        """
        Unhealthy, ejected, drained and excluded backends are never picked,
        with or without a key.
        """
        for name, policy, (a, b, c, d) in self.policies((1, 2, 3, 4)):
            a.healthy = False
            b.ejected = True
            c.drained = True
            for i in range(200):
                key = None if i % 2 else b"key-%d" % i
                self.assertIs(policy.pick(key), d, name)
                self.assertIsNone(policy.pick(key, exclude=[d]), name)

    def test_none_when_empty(self):
        """A policy with no backends picks None."""
        for name in lb.POLICIES:
            policy = lb.make(name, [], options())
            self.assertIsNone(policy.pick(), name)
            self.assertIsNone(policy.pick(b"k"), name)

    def test_none_when_all_out(self):
        """With every backend out of service, every policy picks None."""
        for name, policy, bs in self.policies():
            for b in bs:
                b.healthy = False
            self.assertIsNone(policy.pick(), name)
            self.assertIsNone(policy.pick(b"key"), name)

    def test_update(self):
        """After C{update}, only the new backends are picked."""
        for name, policy, _ in self.policies():
            fresh = backends(1, 1, host="10.9.9")
            policy.update(fresh)
            picked = {policy.pick(b"key-%d" % i if i % 2 else None) for i in range(300)}
            self.assertEqual(picked, set(fresh), name)

    def test_finished_after_removal(self):
        """
        Work that started on a backend an update has since removed can still
        finish (and report a latency) without error.
        """
        for name, policy, bs in self.policies():
            backend = policy.pick(b"key")
            start(policy, backend)
            policy.update([b for b in bs if b is not backend])
            finish(policy, backend, latency=0.01)
            self.assertEqual(backend.active, 0, name)
