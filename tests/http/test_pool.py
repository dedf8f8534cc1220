# -*- test-case-name: tests.http.test_pool -*-
"""
Tests for L{balance.http.pool}: which idle backend connection is reused,
how many are kept, and when they are closed.
"""

from __future__ import annotations

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from balance.config import model
from balance.http.pool import BackendPool, PoolSet


class FakeConnection:
    """An upstream connection as the pool sees it."""

    def __init__(self, name: str):
        self.name = name
        self.open = True
        self.idle_since = 0.0
        self.proxy_header = None
        self.written = []

    def write(self, data: bytes) -> None:
        self.written.append(data)

    def usable(self) -> bool:
        return self.open

    def close(self) -> None:
        self.open = False

    def __repr__(self) -> str:
        return f"<conn {self.name}>"


class BackendPoolTests(SynchronousTestCase):
    def setUp(self):
        self.clock = Clock()
        self.pool = BackendPool(self.clock, object(), max_idle=2, idle_timeout=10.0)

    def test_most_recent_first(self):
        """The connection released last is reused first: the warmest one."""
        a, b = FakeConnection("a"), FakeConnection("b")
        self.pool.release(a)
        self.pool.release(b)
        self.assertIs(self.pool.take(), b)
        self.assertIs(self.pool.take(), a)
        self.assertIsNone(self.pool.take())

    def test_unusable_skipped(self):
        """A connection that closed while idle is never handed out."""
        a, b = FakeConnection("a"), FakeConnection("b")
        self.pool.release(a)
        self.pool.release(b)
        b.open = False
        self.assertIs(self.pool.take(), a)

    def test_max_idle(self):
        """Beyond max_idle_per_backend, released connections are closed."""
        conns = [FakeConnection(str(i)) for i in range(3)]
        for conn in conns:
            self.pool.release(conn)
        self.assertEqual(self.pool.idle, conns[:2])
        self.assertFalse(conns[2].open)

    def test_idle_timeout(self):
        """
        Connections idle for pool.idle_timeout are closed by one sweep;
        younger ones stay until their own time comes.
        """
        old, young = FakeConnection("old"), FakeConnection("young")
        self.pool.release(old)
        self.clock.advance(6)
        self.pool.release(young)
        self.clock.advance(4.5)
        self.assertEqual((old.open, young.open), (False, True))
        self.assertEqual(self.pool.idle, [young])
        self.clock.advance(6)
        self.assertFalse(young.open)
        self.assertEqual(self.pool.idle, [])
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_discard(self):
        """A connection the backend closed is forgotten."""
        a = FakeConnection("a")
        self.pool.release(a)
        self.pool.discard(a)
        self.pool.discard(a)
        self.assertEqual(self.pool.idle, [])

    def test_close_idle(self):
        """Closing the pool closes its idle connections and its timer."""
        a = FakeConnection("a")
        self.pool.release(a)
        self.pool.close_idle()
        self.assertFalse(a.open)
        self.assertEqual(self.clock.getDelayedCalls(), [])


class PrivatePoolTests(SynchronousTestCase):
    """
    With send_proxy_protocol, connections begin with a client's PROXY
    header and are reused only for that header (HAProxy's rule).
    """

    def setUp(self):
        self.clock = Clock()
        self.pool = BackendPool(self.clock, object(), max_idle=3, idle_timeout=10.0)

    def conn(self, name, key):
        from balance.http.pool import _begin_with

        return _begin_with(FakeConnection(name), key)

    def test_reuse_by_header(self):
        a, b = self.conn("a", b"A"), self.conn("b", b"B")
        self.assertEqual(a.written, [b"A"])
        plain = FakeConnection("plain")
        for c in (a, b, plain):
            self.pool.release(c)
        self.assertIs(self.pool.take(b"B"), b)
        self.assertIsNone(self.pool.take(b"B"))
        self.assertIs(self.pool.take(), plain)
        self.assertIsNone(self.pool.take())
        a.open = False
        self.assertIsNone(self.pool.take(b"A"))
        self.assertEqual(self.pool.private, {})

    def test_limits_count_both(self):
        """max_idle counts private and shared idle connections together."""
        conns = [self.conn(str(i), b"K%d" % i) for i in range(3)] + [FakeConnection("x")]
        for c in conns:
            self.pool.release(c)
        self.assertFalse(conns[3].open)
        self.pool.discard(conns[0])
        self.pool.discard(conns[0])
        self.assertNotIn(b"K0", self.pool.private)
        self.pool.close_private(b"K1")
        self.assertFalse(conns[1].open)
        self.pool.close_private(b"nothing")
        self.pool.close_idle()
        self.assertFalse(conns[2].open)
        self.assertEqual(self.pool.private, {})

    def test_sweep(self):
        old, young = self.conn("old", b"O"), self.conn("young", b"Y")
        self.pool.release(old)
        self.clock.advance(6)
        self.pool.release(young)
        self.clock.advance(4.5)
        self.assertEqual((old.open, young.open), (False, True))
        self.assertEqual(list(self.pool.private), [b"Y"])
        self.clock.advance(6)
        self.assertFalse(young.open)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_pool_set_close_private(self):
        pools = PoolSet(self.clock)
        pool = pools.get(object(), model.Pool(max_idle_per_backend=3, idle_timeout=5.0))
        pools.get(object(), model.Pool(max_idle_per_backend=3, idle_timeout=5.0))
        c = self.conn("c", b"C")
        pool.release(c)
        pools.close_private([b"C"])
        self.assertFalse(c.open)


class PoolSetTests(SynchronousTestCase):
    def test_one_pool_per_backend(self):
        """Each backend has one pool, shared, with its cluster's settings."""
        pools = PoolSet(Clock())
        first, second = object(), object()
        settings = model.Pool(max_idle_per_backend=3, idle_timeout=5.0)
        pool = pools.get(first, settings)
        self.assertIs(pools.get(first, settings), pool)
        self.assertIsNot(pools.get(second, settings), pool)
        self.assertEqual((pool.max_idle, pool.idle_timeout), (3, 5.0))

    def test_dropped_with_its_backend(self):
        """
        A backend that leaves its cluster (DNS) takes its pool with it: idle
        connections close, connections in use close when handed back, and a
        new pool starts for a backend that comes later.
        """

        class Cluster:
            def __init__(self, backends):
                self.backends = backends
                self.watchers = []

        settings = model.Pool(max_idle_per_backend=3, idle_timeout=5.0)
        pools = PoolSet(Clock())
        kept, gone = object(), object()
        cluster = Cluster((kept, gone))
        pools.watch(cluster)
        pool, kept_pool = pools.get(gone, settings), pools.get(kept, settings)
        idle, busy = FakeConnection("idle"), FakeConnection("busy")
        pool.release(idle)
        for watcher in cluster.watchers:
            watcher((kept,))
        self.assertFalse(idle.open)
        pool.release(busy)
        self.assertFalse(busy.open)
        self.assertIs(pools.get(kept, settings), kept_pool)
        self.assertIsNot(pools.get(gone, settings), pool)
