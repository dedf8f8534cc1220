"""
The token bucket: how many requests pass, when, and what it tells clients.
"""

from __future__ import annotations

import ast
import inspect

from twisted.trial.unittest import SynchronousTestCase

from balance.ratelimit import bucket
from balance.ratelimit.bucket import TokenBucket, capacity_of, gcra


class TokenBucketTests(SynchronousTestCase):
    """A bucket of C{burst} tokens refilled at C{rate} per second."""

    def test_burst_then_refused(self):
        """
        A fresh bucket lets exactly C{burst} requests through at once,
        counting C{remaining} down to 0, then refuses.
        """
        b = TokenBucket(10, 5)
        results = [b.take(100.0) for _ in range(6)]
        self.assertEqual([r[0] for r in results], [True] * 5 + [False])
        self.assertEqual([r[1] for r in results], [4, 3, 2, 1, 0, 0])

    def test_continuous_refill(self):
        """
        Tokens come back continuously, one every C{1 / rate} seconds: not
        before, and the bucket never holds more than C{burst}.
        """
        b = TokenBucket(10, 2)
        self.assertTrue(b.take(0.0)[0])
        self.assertTrue(b.take(0.0)[0])
        self.assertFalse(b.take(0.05)[0])  # half a token
        self.assertTrue(b.take(0.1)[0])
        self.assertFalse(b.take(0.1)[0])
        # A long idle time fills the bucket, but only to its capacity.
        self.assertAlmostEqual(b.tokens(1000.0), 2.0)
        self.assertEqual([b.take(1000.0)[0] for _ in range(3)], [True, True, False])

    def test_reset_and_retry(self):
        """
        C{reset_after} is the time until the bucket is full again;
        C{retry_after}, on a refusal, the time until one token is back.
        """
        b = TokenBucket(4, 3)  # a token every 0.25 s
        allowed, remaining, reset_after, retry_after = b.take(10.0)
        self.assertEqual((allowed, remaining, retry_after), (True, 2, 0.0))
        self.assertAlmostEqual(reset_after, 0.25)
        b.take(10.0)
        b.take(10.0)
        allowed, remaining, reset_after, retry_after = b.take(10.1)
        self.assertEqual((allowed, remaining), (False, 0))
        self.assertAlmostEqual(reset_after, 0.65)
        self.assertAlmostEqual(retry_after, 0.15)
        self.assertTrue(b.take(10.25)[0])

    def test_long_run_rate(self):
        """
        Under constant overload, what passes over a period is the burst
        plus the rate times the period, and no more.
        """
        b = TokenBucket(100, 50)
        admitted = 0
        for i in range(100_000):  # 10,000 requests a second for 10 s
            admitted += b.take(i / 10_000)[0]
        self.assertIn(admitted, range(50 + 1000 - 1, 50 + 1000 + 2))

    def test_fractional_rate(self):
        """Rates below one per second work: 1 request per minute."""
        b = TokenBucket(1 / 60, 1)
        self.assertTrue(b.take(0.0)[0])
        self.assertFalse(b.take(59.0)[0])
        self.assertTrue(b.take(60.0)[0])

    def test_invalid(self):
        """A rate that is not positive or a burst below 1 is refused."""
        self.assertRaises(ValueError, TokenBucket, 0, 1)
        self.assertRaises(ValueError, TokenBucket, 1, 0)

    def test_capacity_of(self):
        """The capacity is C{burst}, or C{requests} when C{burst} is 0."""
        self.assertEqual(capacity_of(100, 50), 50)
        self.assertEqual(capacity_of(100, 0), 100)

    def test_gcra_refusal_keeps_state(self):
        """A refused request does not use up anything."""
        tat, allowed, *_ = gcra(10.5, 10.0, 0.25, 2)
        self.assertFalse(allowed)
        self.assertEqual(tat, 10.5)


class PurityTests(SynchronousTestCase):
    """The bucket is a pure policy."""

    def test_no_reactor(self):
        """
        C{balance.ratelimit.bucket} imports nothing from
        C{twisted.internet}, nor C{time} or C{random}.
        """
        tree = ast.parse(inspect.getsource(bucket))
        imported = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                imported.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom):
                imported.add(node.module)
        self.assertEqual({name for name in imported if name.startswith("twisted.internet")}, set())
        self.assertNotIn("time", imported)
        self.assertNotIn("random", imported)
