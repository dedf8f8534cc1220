"""
Tests for L{balance.cluster.slow_start}: the weight ramp after recovery.
"""

from __future__ import annotations

from twisted.trial.unittest import SynchronousTestCase

from balance.cluster.slow_start import SlowStart
from tests.cluster.support import backends


class SlowStartTests(SynchronousTestCase):
    """A linear ramp from the floor to the full weight over the window."""

    def setUp(self):
        self.slow = SlowStart(30.0)
        (self.backend,) = backends(4)

    def test_not_ramping_by_default(self):
        """Backends there from the start have their full weight."""
        self.assertEqual(self.slow.factor(self.backend, 0.0), 1.0)
        self.assertEqual(self.slow.weight(self.backend, 0.0), 4)
        self.assertFalse(self.slow.ramping(0.0))

    def test_linear_ramp(self):
        """10% at the start, 55% half-way, 100% at the end and after."""
        self.slow.begin(self.backend, 100.0)
        self.assertEqual(self.backend.healthy_since, 100.0)
        self.assertAlmostEqual(self.slow.factor(self.backend, 100.0), 0.1)
        self.assertAlmostEqual(self.slow.factor(self.backend, 115.0), 0.55)
        self.assertAlmostEqual(self.slow.weight(self.backend, 115.0), 2.2)
        self.assertEqual(self.slow.factor(self.backend, 130.0), 1.0)
        self.assertEqual(self.slow.weight(self.backend, 200.0), 4)

    def test_ramping_window(self):
        """C{ramping} is true until the last ramp begun has ended."""
        a, b = backends(1, 1)
        self.slow.begin(a, 0.0)
        self.slow.begin(b, 10.0)
        self.assertTrue(self.slow.ramping(35.0))
        self.assertFalse(self.slow.ramping(40.0))

    def test_floor(self):
        """The floor is configurable."""
        slow = SlowStart(10.0, floor=0.5)
        slow.begin(self.backend, 0.0)
        self.assertEqual(slow.factor(self.backend, 0.0), 0.5)
        self.assertEqual(slow.factor(self.backend, 5.0), 0.75)

    def test_bad_arguments(self):
        """A window of 0 or a floor outside (0, 1] is refused."""
        self.assertRaises(ValueError, SlowStart, 0)
        self.assertRaises(ValueError, SlowStart, 1, floor=0)
        self.assertRaises(ValueError, SlowStart, 1, floor=1.5)
