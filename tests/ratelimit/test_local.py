"""
The in-process store: buckets per key, and memory that stays bounded.
"""

from __future__ import annotations

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyObject

from balance.ratelimit import IRateLimitStore, build_store
from balance.ratelimit.local import DEFAULT_MAX_KEYS, LocalRateLimitStore


class LocalStoreTests(SynchronousTestCase):
    """Token buckets keyed by bytes, on an injected clock."""

    def setUp(self):
        self.clock = Clock()
        self.clock.advance(1000)

    def test_interface(self):
        """The store provides IRateLimitStore and answers synchronously."""
        store = LocalRateLimitStore(self.clock)
        self.assertTrue(verifyObject(IRateLimitStore, store))
        self.assertTrue(store.synchronous)

    def test_per_key(self):
        """Each key has its own bucket."""
        store = LocalRateLimitStore(self.clock)
        a = [store.take(b"a", 1.0, 2)[0] for _ in range(3)]
        b = [store.take(b"b", 1.0, 2)[0] for _ in range(3)]
        self.assertEqual(a, [True, True, False])
        self.assertEqual(b, [True, True, False])
        self.clock.advance(1.0)
        self.assertEqual(store.take(b"a", 1.0, 2)[:2], (True, 0))

    def test_decision_shape(self):
        """A decision is (allowed, remaining, reset_after, retry_after)."""
        store = LocalRateLimitStore(self.clock)
        allowed, remaining, reset_after, retry_after = store.take(b"k", 2.0, 1)
        self.assertEqual((allowed, remaining, retry_after), (True, 0, 0.0))
        self.assertAlmostEqual(reset_after, 0.5)
        allowed, remaining, reset_after, retry_after = store.take(b"k", 2.0, 1)
        self.assertEqual((allowed, remaining), (False, 0))
        self.assertAlmostEqual(retry_after, 0.5)

    def test_million_keys_bounded(self):
        """
        A million distinct keys in a burst (say, spoofed header values)
        leave at most C{max_keys} buckets, evicting the least recently
        used ones.
        """
        store = LocalRateLimitStore(self.clock, max_keys=100_000)
        for i in range(1_000_000):
            store.take(b"r|%d" % i, 1.0, 10)
        self.assertEqual(len(store), 100_000)
        self.assertEqual(store.evicted, 900_000)

    def test_idle_buckets_dropped(self):
        """
        Buckets that are full again are dropped as traffic goes on, with no
        timer: a million distinct keys spread over time, each full again
        after 10 ms, leave only the few recent ones and evict nothing.
        """
        store = LocalRateLimitStore(self.clock, max_keys=100_000)
        largest = 0
        for i in range(1_000_000):
            self.clock.advance(0.001)
            store.take(b"r|%d" % i, 100.0, 1)
            largest = max(largest, len(store))
        self.assertLessEqual(largest, 20)
        self.assertEqual(store.evicted, 0)

    def test_lru_eviction(self):
        """At the cap, the key used least recently goes first."""
        store = LocalRateLimitStore(self.clock, max_keys=2)
        store.take(b"a", 1.0, 1)
        store.take(b"b", 1.0, 1)
        store.take(b"a", 1.0, 1)  # refused, but used: a is now recent
        store.take(b"c", 1.0, 1)
        self.assertEqual(store.evicted, 1)
        # b was evicted: it has a full bucket again; a still has none.
        self.assertTrue(store.take(b"b", 1.0, 1)[0])
        self.assertEqual(store.evicted, 2)  # a went to make room for b
        self.assertFalse(store.take(b"c", 1.0, 1)[0])

    def test_sweep(self):
        """sweep() drops every full bucket and keeps the others."""
        store = LocalRateLimitStore(self.clock)
        store.take(b"slow", 0.01, 1)
        for i in range(10):
            store.take(b"fast%d" % i, 100.0, 1)
        self.clock.advance(1.0)
        self.assertEqual(store.sweep(), 10)
        self.assertEqual(len(store), 1)

    def test_invalid_cap(self):
        """A cap below 1 is refused."""
        self.assertRaises(ValueError, LocalRateLimitStore, self.clock, max_keys=0)

    def test_build_store(self):
        """Without rate_limit_store in the config, the store is local."""
        store = build_store(None, self.clock)
        self.assertIsInstance(store, LocalRateLimitStore)
        self.assertEqual(store.max_keys, DEFAULT_MAX_KEYS)
        self.assertEqual(build_store(None, self.clock, max_keys=7).max_keys, 7)
