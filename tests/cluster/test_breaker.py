"""
Tests for L{balance.cluster.breaker}: the per-cluster ceilings and the
closed / open / half-open breaker of one backend.
"""

from __future__ import annotations

from twisted.internet.task import Clock
from twisted.logger import Logger, LogLevel, formatEvent
from twisted.trial.unittest import SynchronousTestCase

from balance.cluster.breaker import (
    BackendBreaker,
    BreakerState,
    CircuitBreakers,
    Limit,
    Permit,
)
from balance.config import model

CLOSED, OPEN, HALF_OPEN = BreakerState.CLOSED, BreakerState.OPEN, BreakerState.HALF_OPEN


class CircuitBreakersTests(SynchronousTestCase):
    """Each ceiling admits up to its maximum and counts overflows."""

    def setUp(self):
        self.breakers = CircuitBreakers(
            model.CircuitBreaker(max_connections=2, max_pending=1, max_requests=3)
        )

    def test_requests(self):
        """
        Requests beyond C{max_requests} are refused (the proxy answers 503)
        and the breaker reads open until one finishes.
        """
        b = self.breakers
        for _ in range(3):
            self.assertTrue(b.try_acquire_request())
        self.assertTrue(b.is_open(Limit.REQUESTS))
        self.assertTrue(b.open)
        self.assertFalse(b.try_acquire_request())
        self.assertEqual(b.overflows(Limit.REQUESTS), 1)
        self.assertEqual(b.count(Limit.REQUESTS), 3)
        b.release_request()
        self.assertFalse(b.open)
        self.assertTrue(b.try_acquire_request())

    def test_connections_and_pending(self):
        """Connections and pending requests have their own ceilings."""
        b = self.breakers
        self.assertTrue(b.try_acquire_connection())
        self.assertTrue(b.try_acquire_connection())
        self.assertFalse(b.try_acquire_connection())
        self.assertTrue(b.try_acquire_pending())
        self.assertFalse(b.try_acquire_pending())
        self.assertEqual(
            [b.is_open(limit) for limit in Limit],
            [True, True, False],
        )
        self.assertEqual(b.overflows(Limit.CONNECTIONS), 1)
        self.assertEqual(b.overflows(Limit.PENDING), 1)
        b.release_connection()
        b.release_pending()
        self.assertFalse(b.open)

    def test_zero_pending(self):
        """C{max_pending: 0} never lets a request wait for a connection."""
        b = CircuitBreakers(model.CircuitBreaker(max_pending=0))
        self.assertTrue(b.is_open(Limit.PENDING))
        self.assertFalse(b.try_acquire_pending())

    def test_unbalanced_release(self):
        """Releasing what was not acquired is a bug, reported at once."""
        b = self.breakers
        self.assertRaises(RuntimeError, b.release_request)
        self.assertRaises(RuntimeError, b.release_connection)
        self.assertRaises(RuntimeError, b.release_pending)

    def test_limit_names(self):
        """The limits are named as in the config."""
        self.assertEqual(
            [limit.value for limit in Limit], ["max_connections", "max_pending", "max_requests"]
        )


class BackendBreakerTests(SynchronousTestCase):
    """The per-backend breaker follows its transition table."""

    def setUp(self):
        self.clock = Clock()
        self.changes = []
        self.events = []
        self.patch(BackendBreaker, "log", Logger(observer=self.events.append))
        self.breaker = BackendBreaker(
            threshold=3,
            open_duration=5.0,
            clock=self.clock,
            max_open_duration=18.0,
            on_change=lambda breaker, state: self.changes.append(state),
            name="backend 127.0.0.1:9002 in cluster api",
        )

    def failures(self, n=1, permit=Permit.GRANTED):
        for _ in range(n):
            self.breaker.record(False, permit)

    def trip(self):
        self.failures(3)
        self.assertIs(self.breaker.state, OPEN)

    def test_closed_counts_consecutive_failures(self):
        """Failures interrupted by a success do not open the breaker."""
        b = self.breaker
        self.failures(2)
        b.record(True)
        self.failures(2)
        self.assertIs(b.state, CLOSED)
        self.assertEqual(b.allow(), Permit.GRANTED)
        self.assertTrue(b.available)
        self.assertEqual(self.changes, [])

    def test_opens_after_threshold(self):
        """
        C{threshold} consecutive failures open the breaker: no work is
        allowed, the backend is unavailable, and it is logged once.
        """
        b = self.breaker
        self.trip()
        self.assertFalse(b.available)
        self.assertEqual(b.allow(), Permit.DENIED)
        self.assertFalse(b.allow())
        self.assertEqual(b.retry_after(), 5.0)
        self.assertEqual(self.changes, [OPEN])
        self.assertEqual(
            [formatEvent(e) for e in self.events],
            [
                "circuit breaker of backend 127.0.0.1:9002 in cluster api is OPEN "
                "for 5s: failures reached the threshold"
            ],
        )
        self.assertEqual(self.events[0]["log_level"], LogLevel.warn)

    def test_half_open_single_probe(self):
        """
        After the open period exactly one request goes through as a probe;
        others are refused while it is in flight.
        """
        b = self.breaker
        self.trip()
        self.clock.advance(4.9)
        self.assertFalse(b.allow())
        self.clock.advance(0.1)
        self.assertIs(b.state, HALF_OPEN)
        self.assertTrue(b.available)
        self.assertEqual(b.retry_after(), 0.0)
        self.assertEqual(b.allow(), Permit.PROBE)
        self.assertFalse(b.available)
        self.assertEqual(b.allow(), Permit.DENIED)
        self.assertEqual(b.allow(), Permit.DENIED)

    def test_probe_success_closes(self):
        """A successful probe closes the breaker and resets the counts."""
        b = self.breaker
        self.trip()
        self.clock.advance(5)
        permit = b.allow()
        b.record(True, permit)
        self.assertIs(b.state, CLOSED)
        self.assertTrue(b.available)
        self.assertEqual(b.allow(), Permit.GRANTED)
        self.failures(2)
        self.assertIs(b.state, CLOSED)
        self.assertEqual(self.changes, [OPEN, HALF_OPEN, CLOSED])

    def test_probe_failure_reopens_with_backoff(self):
        """
        A failed probe opens the breaker again, for twice as long each
        time, up to the ceiling; closing resets the period.
        """
        b = self.breaker
        self.trip()
        for expected in (10.0, 18.0, 18.0):
            self.clock.advance(b.retry_after())
            permit = b.allow()
            self.assertEqual(permit, Permit.PROBE)
            b.record(False, permit)
            self.assertIs(b.state, OPEN)
            self.assertEqual(b.retry_after(), expected)
        self.clock.advance(18)
        b.record(True, b.allow())
        self.assertIs(b.state, CLOSED)
        self.trip()
        self.assertEqual(b.retry_after(), 5.0)

    def test_stale_results_ignored(self):
        """
        Results of requests let through before the breaker opened do not
        move it: only the probe decides.
        """
        b = self.breaker
        self.trip()
        b.record(True)
        self.assertIs(b.state, OPEN)
        self.clock.advance(5)
        permit = b.allow()
        b.record(True, Permit.GRANTED)
        b.record(False, Permit.GRANTED)
        self.assertIs(b.state, HALF_OPEN)
        self.assertEqual(b.allow(), Permit.DENIED)
        b.record(True, permit)
        self.assertIs(b.state, CLOSED)

    def test_release_probe(self):
        """
        A probe that ends without a verdict (client gone) lets the next
        request probe instead.
        """
        b = self.breaker
        self.trip()
        self.clock.advance(5)
        permit = b.allow()
        b.release(Permit.GRANTED)
        self.assertEqual(b.allow(), Permit.DENIED)
        b.release(permit)
        self.assertTrue(b.available)
        self.assertEqual(b.allow(), Permit.PROBE)

    def test_on_available(self):
        """
        Every change of C{available} is reported, so the backend's
        eligibility can follow: off on trip, on when half-open, off while
        the probe is out, on when it closes the breaker.
        """
        seen = []
        b = BackendBreaker(3, 5.0, self.clock, on_available=seen.append)
        for _ in range(3):
            b.record(False)
        self.clock.advance(5)
        permit = b.allow()
        b.release(permit)
        permit = b.allow()
        b.record(True, permit)
        self.assertEqual(seen, [False, True, False, True, False, True])

    def test_stop(self):
        """Stopping cancels the end of the open period."""
        self.trip()
        self.assertEqual(len(self.clock.getDelayedCalls()), 1)
        self.breaker.stop()
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_invalid(self):
        """Nonsense settings are refused."""
        self.assertRaises(ValueError, BackendBreaker, 0, 5.0, self.clock)
        self.assertRaises(ValueError, BackendBreaker, 3, 0, self.clock)

    def test_no_reactor_imports(self):
        """
        The breaker is a pure policy: from Twisted's reactor layer it
        imports only interfaces.
        """
        import balance.cluster.breaker as module

        with open(module.__file__) as f:
            source = f.read()
        imports = [line for line in source.splitlines() if "twisted.internet" in line]
        self.assertEqual(
            imports, ["from twisted.internet.interfaces import IDelayedCall, IReactorTime"]
        )
