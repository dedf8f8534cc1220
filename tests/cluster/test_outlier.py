"""
Tests for L{balance.cluster.outlier} (passive ejection) and
L{balance.cluster.panic} (the panic threshold).
"""

from __future__ import annotations

from twisted.internet.task import Clock
from twisted.logger import Logger, LogLevel, formatEvent
from twisted.trial.unittest import SynchronousTestCase

from balance.cluster.outlier import OutlierDetector
from balance.cluster.panic import PanicMonitor, count, in_panic
from balance.cluster.retry import Outcome
from balance.config import model


class FakeBackend:
    """The runtime backend attributes outlier detection and panic read."""

    def __init__(self, address, healthy=True, drained=False):
        self.address = address
        self.name = address
        self.healthy = healthy
        self.drained = drained
        self.ejected = False

    def __repr__(self):
        return f"<FakeBackend {self.address}>"


def backends(n):
    return [FakeBackend(f"127.0.0.1:{9001 + i}") for i in range(n)]


class OutlierTests(SynchronousTestCase):
    """Consecutive failures eject a backend for a growing, capped time."""

    def setUp(self):
        self.clock = Clock()
        self.backends = backends(4)
        self.changes = []
        self.events = []
        self.patch(OutlierDetector, "log", Logger(observer=self.events.append))
        self.detector = self.make()

    def make(self, failures=3, base=10.0, percent=50.0, **kwargs):
        return OutlierDetector(
            model.OutlierDetection(
                consecutive_failures=failures, base_ejection=base, max_ejected_percent=percent
            ),
            self.clock,
            self.backends,
            cluster_name="api",
            on_change=lambda b, ejected, reason: self.changes.append((b, ejected, reason)),
            **kwargs,
        )

    def failures(self, backend, n, outcome=Outcome.CONNECT_FAILURE, detector=None):
        detector = detector or self.detector
        return [detector.record(backend, outcome) for _ in range(n)]

    def messages(self):
        return [formatEvent(e) for e in self.events]

    def test_consecutive_failures_eject(self):
        """
        The C{consecutive_failures}th failure in a row ejects the backend:
        its C{ejected} flag is set, it is logged once, the hook is told.
        """
        a = self.backends[0]
        self.assertEqual(self.failures(a, 3, Outcome.STATUS_5XX), [False, False, True])
        self.assertTrue(a.ejected)
        self.assertTrue(self.detector.is_ejected(a))
        self.assertEqual(self.detector.ejected, 1)
        self.assertEqual(
            self.messages(),
            [
                "backend 127.0.0.1:9001 in cluster api is EJECTED for 10s: "
                "3 consecutive failures (last: status_5xx)"
            ],
        )
        self.assertEqual(self.events[0]["log_level"], LogLevel.warn)
        self.assertEqual(self.changes, [(a, True, "3 consecutive failures (last: status_5xx)")])

    def test_success_resets(self):
        """A success between failures starts the count again."""
        a = self.backends[0]
        self.failures(a, 2)
        self.detector.record(a, Outcome.SUCCESS)
        self.failures(a, 2, Outcome.RESET)
        self.assertFalse(a.ejected)
        self.failures(a, 1, Outcome.TIMEOUT)
        self.assertTrue(a.ejected)

    def test_returns_after_ejection(self):
        """After C{base_ejection} the backend is back, logged once."""
        a = self.backends[0]
        self.failures(a, 3)
        self.clock.advance(9.9)
        self.assertTrue(a.ejected)
        self.assertAlmostEqual(self.detector.next_return(), 0.1)
        self.clock.advance(0.1)
        self.assertFalse(a.ejected)
        self.assertFalse(self.detector.is_ejected(a))
        self.assertEqual(self.detector.ejected, 0)
        self.assertIsNone(self.detector.next_return())
        self.assertEqual(
            self.messages()[1], "backend 127.0.0.1:9001 in cluster api is back from ejection"
        )
        self.assertEqual(self.changes[-1], (a, False, "ejection ended"))
        # Counting starts afresh.
        self.failures(a, 2)
        self.assertFalse(a.ejected)

    def test_multiplier(self):
        """Each further ejection lasts one C{base_ejection} longer."""
        a = self.backends[0]
        for n in (1, 2, 3):
            self.failures(a, 3)
            self.assertEqual(self.detector.ejection_count(a), n)
            self.assertEqual(self.detector.next_return(), 10.0 * n)
            self.clock.advance(10.0 * n)
            self.assertFalse(a.ejected)

    def test_cap(self):
        """An ejection never lasts longer than the ceiling."""
        detector = self.make(max_ejection=25.0)
        a = self.backends[0]
        durations = []
        for _ in range(5):
            self.failures(a, 3, detector=detector)
            durations.append(detector.next_return())
            self.clock.advance(durations[-1])
        self.assertEqual(durations, [10.0, 20.0, 25.0, 25.0, 25.0])

    def test_default_cap(self):
        """The default ceiling is 300 s, or C{base_ejection} if longer."""
        self.assertEqual(self.make(base=30.0).max_ejection, 300.0)
        self.assertEqual(self.make(base=600.0).max_ejection, 600.0)

    def test_decay(self):
        """
        Time back in service without ejection lowers the multiplier by one
        per C{base_ejection}.
        """
        a = self.backends[0]
        for _ in range(3):
            self.failures(a, 3)
            self.clock.advance(self.detector.next_return())
        self.assertEqual(self.detector.ejection_count(a), 3)
        # Two quiet base periods: from 3 down to 1, so the next is the 2nd.
        self.clock.advance(25.0)
        self.failures(a, 3)
        self.assertEqual(self.detector.ejection_count(a), 2)
        self.assertEqual(self.detector.next_return(), 20.0)

    def test_failures_while_ejected_ignored(self):
        """Tries ending while ejected neither extend nor repeat the ejection."""
        a = self.backends[0]
        self.failures(a, 3)
        self.assertEqual(self.failures(a, 10), [False] * 10)
        self.assertEqual(self.detector.ejection_count(a), 1)
        self.clock.advance(10)
        self.assertFalse(a.ejected)

    def test_max_ejected_percent(self):
        """
        No more than C{max_ejected_percent} of the cluster is ejected at
        once: with 50% of 4 backends, a third failing backend stays in and
        is ejected once room frees up.
        """
        a, b, c, _ = self.backends
        self.failures(a, 3)
        self.failures(b, 3)
        self.assertEqual(self.failures(c, 3), [False, False, False])
        self.assertFalse(c.ejected)
        self.assertEqual(self.detector.ejected, 2)
        self.assertEqual(self.detector.refused, 1)
        self.clock.advance(10)
        self.assertEqual(self.failures(c, 1), [True])
        self.assertTrue(c.ejected)

    def test_at_least_one(self):
        """
        One backend may always be ejected, even when the percentage rounds
        below one backend (Envoy's rule).
        """
        self.backends = backends(2)
        detector = self.make(percent=10.0)
        a, b = self.backends
        self.failures(a, 3, detector=detector)
        self.assertTrue(a.ejected)
        self.failures(b, 3, detector=detector)
        self.assertFalse(b.ejected)

    def test_zero_percent_disables(self):
        """C{max_ejected_percent: 0%} never ejects."""
        detector = self.make(percent=0.0)
        a = self.backends[0]
        self.failures(a, 10, detector=detector)
        self.assertFalse(a.ejected)

    def test_update(self):
        """
        Backends removed by a reload return to service and stop counting;
        kept ones keep their state; new ones start clean.
        """
        a, b, c, d = self.backends
        self.failures(a, 3)
        self.failures(b, 2)
        e = FakeBackend("127.0.0.1:9100")
        self.detector.update([b, c, e])
        self.assertFalse(a.ejected)
        self.assertEqual(self.detector.ejected, 0)
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.assertFalse(self.detector.record(a, Outcome.RESET))
        self.assertEqual(self.failures(b, 1), [True])
        self.assertEqual(self.failures(e, 3), [False, False, False])  # 50% of 3: one at a time

    def test_stop(self):
        """Stopping returns every ejected backend and cancels the timers."""
        a = self.backends[0]
        self.failures(a, 3)
        self.detector.stop()
        self.assertFalse(a.ejected)
        self.assertEqual(self.clock.getDelayedCalls(), [])


class PanicTests(SynchronousTestCase):
    """Below the panic threshold the cluster balances over all backends."""

    def test_in_panic(self):
        """Panic is a strict 'below the threshold'."""
        self.assertFalse(in_panic(2, 4, 50))
        self.assertTrue(in_panic(1, 4, 50))
        self.assertTrue(in_panic(0, 4, 50))
        self.assertFalse(in_panic(4, 4, 100))
        self.assertTrue(in_panic(3, 4, 100))

    def test_zero_threshold_disables(self):
        """C{panic_threshold: 0%} is never in panic."""
        self.assertFalse(in_panic(0, 4, 0))

    def test_empty(self):
        """A cluster with every backend drained is not in panic."""
        self.assertFalse(in_panic(0, 0, 50))

    def test_count(self):
        """
        Drained backends count nowhere; unhealthy or ejected ones count in
        the total only.
        """
        a, b, c, d = backends(4)
        b.healthy = False
        c.ejected = True
        d.drained = True
        self.assertEqual(count([a, b, c, d]), (1, 3))

    def test_count_without_ejected_attribute(self):
        """Backends without an C{ejected} attribute count as not ejected."""

        class Plain:
            healthy = True
            drained = False

        self.assertEqual(count([Plain()]), (1, 1))

    def test_monitor_logs_once(self):
        """Entering and leaving panic are logged once each."""
        events = []
        self.patch(PanicMonitor, "log", Logger(observer=events.append))
        monitor = PanicMonitor("api", 50.0)
        self.assertFalse(monitor.update(3, 4))
        self.assertTrue(monitor.update(1, 4))
        self.assertTrue(monitor.update(0, 4))
        self.assertTrue(monitor.active)
        self.assertFalse(monitor.update(2, 4))
        self.assertFalse(monitor.active)
        self.assertEqual(
            [formatEvent(e) for e in events],
            [
                "cluster api is in PANIC: 1 of 4 backends healthy, below 50%; "
                "balancing over all of them",
                "cluster api left panic: 2 of 4 backends healthy",
            ],
        )
        self.assertEqual([e["log_level"] for e in events], [LogLevel.warn, LogLevel.info])
