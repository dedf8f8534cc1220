"""Tests for L{balance._timers}."""

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from balance._timers import DeadlineWheel, TimerList, TimerLists


class Owner:
    def __init__(self, log, name, again=None):
        self.log, self.name, self.again = log, name, again

    def deadline_passed(self):
        self.log.append(self.name)
        if self.again is not None:
            self.again.add(self)


class TimerListTests(SynchronousTestCase):
    """One shared timer expires each owner exactly at its deadline."""

    def setUp(self):
        self.clock = Clock()
        self.log = []
        self.timers = TimerList(self.clock, 10.0)

    def test_exact_expiry_in_order(self):
        """Owners added at different times expire at their own deadlines."""
        a, b = Owner(self.log, "a"), Owner(self.log, "b")
        self.assertEqual(self.timers.add(a), 10.0)
        self.clock.advance(3)
        self.timers.add(b)
        self.clock.advance(6.9)
        self.assertEqual(self.log, [])
        self.clock.advance(0.1)
        self.assertEqual(self.log, ["a"])
        self.clock.advance(2.9)
        self.assertEqual(self.log, ["a"])
        self.clock.advance(0.1)
        self.assertEqual(self.log, ["a", "b"])
        self.assertEqual(len(self.timers), 0)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_rearm_and_discard(self):
        """Re-adding moves the deadline later; a discarded owner never expires."""
        a, b = Owner(self.log, "a"), Owner(self.log, "b")
        self.timers.add(a)
        self.timers.add(b)
        self.clock.advance(5)
        self.timers.add(a)
        self.timers.discard(b)
        self.clock.advance(5)
        self.assertEqual(self.log, [])
        self.clock.advance(5)
        self.assertEqual(self.log, ["a"])
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_one_reactor_call(self):
        """However many owners, the list holds one DelayedCall."""
        for i in range(100):
            self.timers.add(Owner(self.log, i))
        self.assertEqual(len(self.clock.getDelayedCalls()), 1)
        self.clock.advance(10)
        self.assertEqual(self.log, list(range(100)))

    def test_readd_from_handler(self):
        """An owner may arm itself again, in this list or another, when it expires."""
        other = TimerLists(self.clock)(2.0)
        a = Owner(self.log, "a", again=other)
        self.timers.add(a)
        self.clock.advance(10)
        self.clock.advance(2)
        self.assertEqual(self.log, ["a", "a"])

    def test_failing_handler(self):
        """A handler that raises is logged; the others still expire."""

        class Bad:
            def deadline_passed(self):
                raise RuntimeError("boom")

        self.timers.add(Bad())
        self.timers.add(Owner(self.log, "b"))
        self.clock.advance(10)
        self.assertEqual(self.log, ["b"])
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)

    def test_stop_if_empty(self):
        """An emptied list's timer can be cancelled at once; a list with owners keeps it."""
        lists = TimerLists(self.clock)
        a = Owner(self.log, "a")
        lists(5.0).add(a)
        lists.stop_if_empty()
        self.assertEqual(len(self.clock.getDelayedCalls()), 1)
        lists(5.0).discard(a)
        lists.stop_if_empty()
        self.assertEqual(self.clock.getDelayedCalls(), [])
        lists(5.0).add(a)
        self.clock.advance(5)
        self.assertEqual(self.log, ["a"])


class Lazy:
    """An owner whose deadline is its last activity plus a timeout."""

    def __init__(self, wheel, clock, log, name, timeout):
        self.wheel, self.clock, self.log = wheel, clock, log
        self.name, self.timeout = name, timeout
        self.last = clock.seconds()
        self.token = wheel.add(self, self.last + timeout, timeout)

    def deadline_passed(self):
        deadline = self.last + self.timeout
        if deadline > self.clock.seconds():
            self.token = self.wheel.add(self, deadline, self.timeout)
        else:
            self.token = None
            self.log.append((self.name, self.clock.seconds()))


class DeadlineWheelTests(SynchronousTestCase):
    """Deadlines checked in coarse buckets: never early, at most a bucket late."""

    def setUp(self):
        self.clock = Clock()
        self.log = []
        self.wheel = DeadlineWheel(self.clock)

    def test_expiry_within_a_bucket(self):
        """
        A deadline passes no earlier than it is due and at most 1/16 of its
        timeout later (a bucket), also after activity moved it on.
        """
        self.clock.advance(0.3)
        a = Lazy(self.wheel, self.clock, self.log, "a", 8.0)
        self.clock.advance(5)
        a.last = self.clock.seconds()
        self.clock.advance(7.99)
        self.assertEqual(self.log, [])
        self.clock.advance(0.01)
        self.assertEqual(self.log, [])
        self.clock.advance(8.0 / 16)
        self.assertEqual([name for name, _ in self.log], ["a"])
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.assertEqual(len(self.wheel), 0)

    def test_resolution_caps_the_bucket(self):
        """Long timeouts use buckets of C{resolution} seconds at most."""
        Lazy(self.wheel, self.clock, self.log, "a", 600.0)
        self.clock.advance(600)
        self.assertEqual(self.log, [("a", 600.0)])
        self.clock.advance(0.25)
        Lazy(self.wheel, self.clock, self.log, "b", 600.0)
        self.clock.advance(600)
        self.assertEqual(self.log, [("a", 600.0)])
        self.clock.advance(0.75)
        self.assertEqual(self.log, [("a", 600.0), ("b", 1201.0)])

    def test_one_reactor_call(self):
        """However many owners and buckets, the wheel holds one DelayedCall."""
        for i in range(100):
            Lazy(self.wheel, self.clock, self.log, i, 1.0 + i / 10)
            self.clock.advance(0.01)
        self.assertEqual(len(self.clock.getDelayedCalls()), 1)
        self.clock.advance(12)
        self.assertEqual(sorted(name for name, _ in self.log), list(range(100)))

    def test_earlier_bucket_moves_the_call(self):
        """A shorter timeout added later still fires on time."""
        Lazy(self.wheel, self.clock, self.log, "long", 10.0)
        Lazy(self.wheel, self.clock, self.log, "short", 1.0)
        self.clock.advance(1.0)
        self.assertEqual(self.log, [("short", 1.0)])

    def test_discard(self):
        """A discarded owner never expires; the timer stops with the last owner."""
        a = Lazy(self.wheel, self.clock, self.log, "a", 4.0)
        self.clock.advance(1)
        Lazy(self.wheel, self.clock, self.log, "b", 4.0)
        self.wheel.discard(a, a.token)
        self.clock.advance(4)
        self.assertEqual(self.log, [("b", 5.0)])
        c = Lazy(self.wheel, self.clock, self.log, "c", 4.0)
        self.wheel.discard(c, c.token)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_failing_handler(self):
        """A handler that raises is logged; the others still expire."""

        class Bad:
            def deadline_passed(self):
                raise RuntimeError("boom")

        self.wheel.add(Bad(), 2.0, 2.0)
        Lazy(self.wheel, self.clock, self.log, "b", 2.0)
        self.clock.advance(2)
        self.assertEqual(self.log, [("b", 2.0)])
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)
