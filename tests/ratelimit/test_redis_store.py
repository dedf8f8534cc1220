"""
The Redis store without a Redis: what it sends, how it reads answers, and
what it decides when Redis cannot answer.  (tests.integration.test_redis
runs it against a real redis-server.)
"""

from __future__ import annotations

import random

from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.internet.testing import EventLoggingObserver
from twisted.logger import globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyObject

from balance.config import model
from balance.ratelimit import IRateLimitStore, build_store
from balance.ratelimit._resp import encode
from balance.ratelimit.redis import SCRIPT, SCRIPT_SHA, RedisRateLimitStore, RedisURL
from tests.ratelimit.fakes import FakeEndpoint, written


def bulk(value: bytes) -> bytes:
    return b"$%d\r\n%s\r\n" % (len(value), value)


def decision_reply(allowed, remaining, reset_us, retry_us) -> bytes:
    return bulk(b"%d %d %d %d" % (allowed, remaining, reset_us, retry_us))


class StoreTests(SynchronousTestCase):
    """One decision, one EVALSHA; failures follow failure_mode."""

    def setUp(self):
        self.clock = Clock()
        self.endpoint = FakeEndpoint()
        self.log = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)

    def store(self, **kw):
        store = RedisRateLimitStore(
            self.endpoint, self.clock, display="redis://h:6379/0", rng=random.Random(0), **kw
        )
        store.startService()
        self.addCleanup(store.stopService)
        return store

    def ready(self, proto, expect=(b"SCRIPT", b"LOAD")):
        """Answer the connection's preparing commands."""
        sent = written(proto)
        for word in expect:
            self.assertIn(word, sent)
        replies = b""
        if b"AUTH" in sent:
            replies += b"+OK\r\n"
        if b"SELECT" in sent:
            replies += b"+OK\r\n"
        proto.dataReceived(replies + bulk(SCRIPT_SHA))

    def messages(self):
        return [
            e["log_format"].format(**e)
            for e in self.log
            if e.get("log_namespace", "").startswith("balance")
        ]

    def test_interface(self):
        """The store provides IRateLimitStore and says it is asynchronous."""
        store = self.store()
        self.assertTrue(verifyObject(IRateLimitStore, store))
        self.assertFalse(store.synchronous)

    def test_one_round_trip(self):
        """
        A decision is one EVALSHA with the prefixed key, microseconds per
        token and the capacity; the reply is turned into seconds.
        """
        store = self.store()
        proto = self.endpoint.last
        self.ready(proto)
        d = store.take(b"web.0|10.0.0.1", 4.0, 50)
        self.assertEqual(
            written(proto),
            encode(
                (b"EVALSHA", SCRIPT_SHA, b"1", b"balance:rl:web.0|10.0.0.1", b"250000.000", b"50")
            ),
        )
        self.assertNoResult(d)
        proto.dataReceived(decision_reply(1, 49, 250000, 0))
        self.assertEqual(self.successResultOf(d), (True, 49, 0.25, 0.0))
        d = store.take(b"web.0|10.0.0.1", 4.0, 50)
        proto.dataReceived(decision_reply(0, 0, 12_500_000, 250_000))
        self.assertEqual(self.successResultOf(d), (False, 0, 12.5, 0.25))
        self.assertEqual(self.messages(), ["rate limit store redis://h:6379/0 connected"])

    def test_auth_and_select(self):
        """Credentials and a database number from the URL are used on connect."""
        store = self.store(db=3, password="s3cret", username="balance")
        proto = self.endpoint.last
        sent = proto.transport.value()
        self.assertTrue(sent.startswith(encode((b"AUTH", b"balance", b"s3cret"))))
        proto.dataReceived(b"+OK\r\n")
        self.assertIn(encode((b"SELECT", b"3")), written(proto))
        proto.dataReceived(b"+OK\r\n" + bulk(SCRIPT_SHA))
        self.assertTrue(store.reachable)

    def test_noscript(self):
        """
        When Redis forgot the script (restart, SCRIPT FLUSH), the decision
        is made with EVAL, which loads it again.
        """
        store = self.store()
        proto = self.endpoint.last
        self.ready(proto)
        d = store.take(b"k", 1.0, 1)
        written(proto)
        proto.dataReceived(b"-NOSCRIPT No matching script. Please use EVAL.\r\n")
        self.assertEqual(
            written(proto), encode((b"EVAL", SCRIPT, b"1", b"balance:rl:k", b"1000000.000", b"1"))
        )
        proto.dataReceived(decision_reply(1, 0, 1_000_000, 0))
        self.assertEqual(self.successResultOf(d), (True, 0, 1.0, 0.0))
        self.assertTrue(store.reachable)

    def test_unreachable_open(self):
        """
        While Redis cannot be reached, requests pass at once (fail open),
        and that is logged once, however many attempts fail.
        """
        self.endpoint.refuse = True
        store = self.store()
        for _ in range(20):
            self.assertEqual(store.take(b"k", 1.0, 1), (True, -1, 0.0, 0.0))
            self.clock.advance(1)
        self.assertGreater(self.endpoint.attempts, 5)
        self.assertEqual(
            self.messages(),
            [
                "rate limit store redis://h:6379/0 unreachable: "
                "Connection was refused by other side: refused by the test.; failing open"
            ],
        )
        self.endpoint.refuse = False
        self.clock.advance(10)
        self.ready(self.endpoint.last)
        self.assertEqual(self.messages()[-1], "rate limit store redis://h:6379/0 reachable again")
        self.assertIsInstance(store.take(b"k", 1.0, 1), Deferred)

    def test_unreachable_closed(self):
        """With failure_mode closed, requests are refused while Redis is away."""
        self.endpoint.refuse = True
        store = self.store(failure_mode="closed")
        self.assertEqual(store.take(b"k", 1.0, 1), (False, 0, 1.0, 1.0))
        self.assertIn("failing closed", self.messages()[0])

    def test_timeout(self):
        """
        A Redis that stops answering: after 100 ms the waiting decisions
        get the failure mode, the connection is dropped, and the next
        decisions do not wait at all until a new connection is ready.
        """
        store = self.store(failure_mode="closed")
        proto = self.endpoint.last
        self.ready(proto)
        d1 = store.take(b"k", 1.0, 1)
        self.clock.advance(0.05)
        d2 = store.take(b"k", 1.0, 1)
        self.assertNoResult(d1)
        self.clock.advance(0.05)
        self.assertEqual(self.successResultOf(d1), (False, 0, 1.0, 1.0))
        self.assertEqual(self.successResultOf(d2), (False, 0, 1.0, 1.0))
        self.assertFalse(proto.connected)
        self.assertEqual(store.take(b"k", 1.0, 1), (False, 0, 1.0, 1.0))
        self.assertEqual(
            self.messages()[1:],
            [
                "rate limit store redis://h:6379/0 unreachable: no reply within 100 ms; failing closed"
            ],
        )

    def test_error_reply(self):
        """
        An error reply (say, Redis out of memory) gives the failure mode
        for that decision and is logged once; the next good answer logs
        the recovery.
        """
        store = self.store()
        proto = self.endpoint.last
        self.ready(proto)
        for _ in range(3):
            d = store.take(b"k", 1.0, 1)
            proto.dataReceived(b"-OOM command not allowed when used memory > 'maxmemory'.\r\n")
            self.assertEqual(self.successResultOf(d), (True, -1, 0.0, 0.0))
        d = store.take(b"k", 1.0, 1)
        proto.dataReceived(decision_reply(1, 0, 1, 0))
        self.successResultOf(d)
        self.assertEqual(
            self.messages()[1:],
            [
                "rate limit store redis://h:6379/0 unreachable: error reply OOM command not "
                "allowed when used memory > 'maxmemory'.; failing open",
                "rate limit store redis://h:6379/0 reachable again",
            ],
        )

    def test_unexpected_reply(self):
        """A reply that is not the script's gives the failure mode, not an error."""
        store = self.store(failure_mode="closed")
        proto = self.endpoint.last
        self.ready(proto)
        d = store.take(b"k", 1.0, 1)
        proto.dataReceived(b":1\r\n")
        self.assertEqual(self.successResultOf(d), (False, 0, 1.0, 1.0))
        self.assertIn("unexpected reply 1; failing closed", self.messages()[-1])

    def test_stop(self):
        """Stopping the service closes the connection, quietly."""
        store = self.store()
        proto = self.endpoint.last
        self.ready(proto)
        d = store.take(b"k", 1.0, 1)
        self.successResultOf(store.stopService())
        self.assertEqual(self.successResultOf(d), (True, -1, 0.0, 0.0))
        self.assertFalse(proto.connected)
        self.assertEqual(len(self.messages()), 1)

    def test_invalid_failure_mode(self):
        """Only open and closed are failure modes."""
        self.assertRaises(
            ValueError, RedisRateLimitStore, self.endpoint, self.clock, failure_mode="x"
        )


class URLTests(SynchronousTestCase):
    """Redis URLs as CONFIG.md writes them."""

    def test_plain(self):
        """redis://host:port/db."""
        u = RedisURL("redis://127.0.0.1:6380/2")
        self.assertEqual(
            (u.host, u.port, u.db, u.tls, u.password), ("127.0.0.1", 6380, 2, False, None)
        )
        self.assertEqual(u.display, "redis://127.0.0.1:6380/2")

    def test_defaults(self):
        """Port 6379 and database 0 by default."""
        u = RedisURL("redis://cache.internal")
        self.assertEqual((u.host, u.port, u.db), ("cache.internal", 6379, 0))

    def test_credentials_hidden(self):
        """Passwords are parsed (percent-decoded) and never displayed."""
        u = RedisURL("rediss://user:p%40ss@[::1]:7000/1")
        self.assertEqual((u.username, u.password, u.host, u.tls), ("user", "p@ss", "::1", True))
        self.assertEqual(u.display, "rediss://[::1]:7000/1")
        u = RedisURL("redis://:pw@h")
        self.assertEqual((u.username, u.password), (None, "pw"))

    def test_invalid(self):
        """Other schemes and non-numeric databases are refused."""
        self.assertRaises(ValueError, RedisURL, "http://h:1")
        self.assertRaises(ValueError, RedisURL, "redis://h:1/x")
        self.assertRaises(ValueError, RedisURL, "redis:///0")

    def test_build_store(self):
        """rate_limit_store in the config gives a Redis store."""
        from twisted.internet import reactor

        store = build_store(
            model.RateLimitStore(redis="redis://127.0.0.1:1/0", failure_mode="closed"), reactor
        )
        self.assertIsInstance(store, RedisRateLimitStore)
        self.assertEqual(store.failure_mode, "closed")
        self.assertEqual(store.display, "redis://127.0.0.1:1/0")
