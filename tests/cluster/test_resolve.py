"""
Tests for L{balance.cluster.resolve}: periodic, non-blocking resolution of
backend host names, with a fake resolver and a L{Clock}.
"""

from __future__ import annotations

from twisted.internet import error
from twisted.internet.defer import TimeoutError
from twisted.internet.task import Clock
from twisted.logger import Logger, LogLevel, formatEvent
from twisted.trial.unittest import SynchronousTestCase

from balance.cluster.resolve import Resolver, resolve
from tests.cluster.support import FakeResolver


class ResolveTests(SynchronousTestCase):
    """One lookup, as a Deferred."""

    def setUp(self):
        self.clock = Clock()

    def test_addresses(self):
        """The addresses come back sorted and without duplicates, v4 and v6."""
        fake = FakeResolver({"db": ["10.0.0.2", "10.0.0.1", "10.0.0.2", "fd00::1"]})
        d = resolve(fake, self.clock, "db")
        self.assertEqual(self.successResultOf(d), ("10.0.0.1", "10.0.0.2", "fd00::1"))

    def test_no_address(self):
        """A name without addresses fails with DNSLookupError."""
        d = resolve(FakeResolver({"db": []}), self.clock, "db")
        self.failureResultOf(d, error.DNSLookupError)

    def test_resolver_raises(self):
        """A resolver that raises fails the lookup."""
        d = resolve(FakeResolver({"db": ValueError("boom")}), self.clock, "db")
        self.failureResultOf(d, ValueError)

    def test_timeout(self):
        """No answer within the timeout fails it; a late answer is ignored."""
        fake = FakeResolver({"db": None})
        d = resolve(fake, self.clock, "db", timeout=5)
        self.assertNoResult(d)
        self.clock.advance(5)
        self.failureResultOf(d, TimeoutError, error.TimeoutError)
        fake.complete("db", ["10.0.0.1"])


class ResolverTests(SynchronousTestCase):
    """Names resolved at start and every interval; failures keep the last good set."""

    def setUp(self):
        self.clock = Clock()
        self.fake = FakeResolver(
            {"a.internal": ["10.0.0.1"], "b.internal": ["10.0.1.1", "10.0.1.2"]}
        )
        self.changes = []
        self.events = []
        self.resolver = Resolver(
            self.fake,
            self.clock,
            ["a.internal", "b.internal", "a.internal"],
            lambda name, addresses: self.changes.append((name, addresses)),
            interval=30,
            timeout=5,
            cluster="api",
        )
        self.resolver.log = Logger(observer=self.events.append)

    def messages(self, level):
        return [formatEvent(e) for e in self.events if e["log_level"] is level]

    def test_start(self):
        """Starting resolves each name once, reports it, and fires when done."""
        d = self.resolver.start()
        self.assertIsNone(self.successResultOf(d))
        self.assertEqual(self.fake.lookups, ["a.internal", "b.internal"])
        self.assertEqual(
            self.changes,
            [("a.internal", ("10.0.0.1",)), ("b.internal", ("10.0.1.1", "10.0.1.2"))],
        )
        self.assertEqual(
            self.messages(LogLevel.info)[1],
            "backend host b.internal of cluster api resolves to 10.0.1.1, 10.0.1.2",
        )

    def test_periodic(self):
        """Every interval each name is looked up again; unchanged sets report nothing."""
        self.resolver.start()
        self.clock.advance(29)
        self.assertEqual(len(self.fake.lookups), 2)
        self.clock.advance(1)
        self.assertEqual(len(self.fake.lookups), 4)
        self.assertEqual(len(self.changes), 2)
        self.fake.answers["b.internal"] = ["10.0.1.2", "10.0.1.3"]
        self.clock.advance(30)
        self.assertEqual(self.changes[-1], ("b.internal", ("10.0.1.2", "10.0.1.3")))
        self.assertEqual(self.resolver.addresses["b.internal"], ("10.0.1.2", "10.0.1.3"))

    def test_failure_keeps_last_good(self):
        """
        A failed lookup changes nothing and is logged once until the name
        resolves again.
        """
        self.resolver.start()
        self.fake.answers["a.internal"] = []
        self.clock.advance(30)
        self.clock.advance(30)
        self.assertEqual(self.resolver.addresses["a.internal"], ("10.0.0.1",))
        self.assertEqual(len(self.changes), 2)
        self.assertEqual(
            self.messages(LogLevel.warn),
            [
                "resolving backend host a.internal of cluster api failed (no address); "
                "keeping 10.0.0.1"
            ],
        )
        self.fake.answers["a.internal"] = ["10.0.0.1"]
        self.clock.advance(30)
        self.assertIn(
            "backend host a.internal of cluster api resolves again", self.messages(LogLevel.info)
        )

    def test_slow_lookup_not_duplicated(self):
        """A name whose lookup is still in flight is not looked up again."""
        self.fake.answers["a.internal"] = None
        self.resolver._timeout = 100
        self.resolver.start()
        self.clock.advance(30)
        self.assertEqual(self.fake.lookups.count("a.internal"), 1)
        self.fake.complete("a.internal", ["10.0.0.9"])
        self.assertEqual(self.resolver.addresses["a.internal"], ("10.0.0.9",))

    def test_timeout_keeps_last_good(self):
        """A lookup that times out counts as failed."""
        self.resolver.start()
        self.fake.answers["a.internal"] = None
        self.clock.advance(30)
        self.clock.advance(5)
        self.assertEqual(self.resolver.addresses["a.internal"], ("10.0.0.1",))
        self.assertIn("(timed out)", self.messages(LogLevel.warn)[0])

    def test_stop(self):
        """After stop nothing is looked up, and answers in flight are ignored."""
        self.fake.answers["a.internal"] = None
        self.resolver.start()
        self.resolver.stop()
        self.assertFalse(self.resolver.running)
        self.fake.complete("a.internal", ["10.0.0.9"])
        self.clock.advance(300)
        self.assertEqual(self.fake.lookups, ["a.internal", "b.internal"])
        self.assertNotIn("a.internal", self.resolver.addresses)
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.assertEqual(self.messages(LogLevel.warn), [])

    def test_bad_interval(self):
        self.assertRaises(ValueError, Resolver, self.fake, self.clock, [], print, interval=0)
