"""
Tests for L{balance.cluster.lb.hashing}: stable hashes.
"""

from __future__ import annotations

from collections import Counter

from twisted.trial.unittest import SynchronousTestCase

from balance.cluster.lb.hashing import (
    is_prime,
    key_hash,
    maglev_permutation,
    rehash,
    ring_points,
)


class HashingTests(SynchronousTestCase):
    """The same inputs hash the same everywhere, and spread well."""

    def test_key_hash_stable(self):
        """Key hashes are fixed values (CRC-32: its check value), not salted per process."""
        self.assertEqual(key_hash(b"123456789"), 0xCBF43926)
        self.assertEqual(key_hash("203.0.113.7"), key_hash(b"203.0.113.7"))

    def test_rehash_spreads(self):
        """Salted rehashes of one value differ, and spread over buckets."""
        values = {rehash(12345, salt) for salt in range(1, 100)}
        self.assertEqual(len(values), 99)
        buckets = Counter(rehash(v, 1) % 10 for v in range(100_000))
        self.assertLess(max(buckets.values()) / min(buckets.values()), 1.1)

    def test_ring_points(self):
        """Points come four per MD5, as many as asked, the same every time."""
        points = ring_points("10.0.0.1:80", 10)
        self.assertEqual(len(points), 10)
        self.assertEqual(points, ring_points("10.0.0.1:80", 10))
        self.assertEqual(points[:8], ring_points("10.0.0.1:80", 8))
        self.assertTrue(all(0 <= p < 2**32 for p in points))

    def test_permutation(self):
        """The permutation's skip is in [1, size), so it visits every slot."""
        for name in ("a", "b", "c"):
            offset, skip = maglev_permutation(name, 13)
            self.assertTrue(0 <= offset < 13 and 1 <= skip < 13)
            self.assertEqual(len({(offset + j * skip) % 13 for j in range(13)}), 13)

    def test_is_prime(self):
        self.assertEqual([n for n in range(20) if is_prime(n)], [2, 3, 5, 7, 11, 13, 17, 19])
        self.assertTrue(is_prime(65537))
