# -*- test-case-name: tests.http.test_pool -*-
"""
Keep-alive connections to backends, reused across downstream connections.

One L{BackendPool} per backend keeps idle upstream connections on a stack
(the most recently used is the warmest and the least likely to have been
closed by the backend), up to C{pool.max_idle_per_backend}, and closes those
idle longer than C{pool.idle_timeout} with one sweep timer per pool rather
than a timer per connection.
"""

from __future__ import annotations

from twisted.internet.protocol import Factory
from twisted.logger import Logger

from balance.http.h2_upstream import H2Pool
from balance.http.upstream import UpstreamConnection


class _UpstreamFactory(Factory):
    noisy = False

    def __init__(self, pool: BackendPool):
        self.pool = pool

    def buildProtocol(self, addr):
        return UpstreamConnection(self.pool)


class BackendPool:
    """
    Idle keep-alive connections to one backend, and the way to make new ones.

    :ivar backend: the runtime backend the connections go to.
    :ivar idle: idle connections, most recently used last.
    :ivar closed: the backend left its cluster: connections handed back
        are closed rather than kept.
    """

    log = Logger()

    def __init__(self, reactor, backend, max_idle: int, idle_timeout: float):
        self._reactor = reactor
        self.backend = backend
        self.max_idle = max_idle
        self.idle_timeout = idle_timeout
        self.idle: list[UpstreamConnection] = []
        self._factory = _UpstreamFactory(self)
        self._sweeper = None
        self.closed = False

    def take(self) -> UpstreamConnection | None:
        """
        Pop the most recently used idle connection that is still usable.

        :return: a connection, or L{None} if a new one must be made.
        """
        idle = self.idle
        while idle:
            conn = idle.pop()
            if conn.usable():
                return conn
        return None

    def connect(self):
        """
        Open a new connection to the backend.

        :return: a Deferred firing with the L{UpstreamConnection}, or failing
            with the connect error (refused, timed out, unresolvable).
        """
        return self.backend.endpoint.connect(self._factory)

    def release(self, conn: UpstreamConnection) -> None:
        """
        Take back C{conn} after a complete exchange: keep it idle for reuse,
        or close it when the pool is full.
        """
        if len(self.idle) >= self.max_idle or self.closed or not conn.usable():
            conn.close()
            return
        conn.idle_since = self._reactor.seconds()
        self.idle.append(conn)
        if self._sweeper is None:
            self._sweeper = self._reactor.callLater(self.idle_timeout, self._sweep)

    def discard(self, conn: UpstreamConnection) -> None:
        """Forget C{conn}: the backend closed it while idle."""
        try:
            self.idle.remove(conn)
        except ValueError:
            pass

    def close_idle(self) -> None:
        """Close every idle connection (on stop or reload)."""
        idle, self.idle = self.idle, []
        for conn in idle:
            conn.close()
        if self._sweeper is not None and self._sweeper.active():
            self._sweeper.cancel()
        self._sweeper = None

    def _sweep(self) -> None:
        self._sweeper = None
        cutoff = self._reactor.seconds() - self.idle_timeout
        keep = []
        for conn in self.idle:
            if conn.idle_since <= cutoff:
                conn.close()
            else:
                keep.append(conn)
        self.idle = keep
        if keep:
            delay = max(keep[0].idle_since - cutoff, 0.05)
            self._sweeper = self._reactor.callLater(delay, self._sweep)


class PoolSet:
    """
    The pools of every backend, created on first use and shared by all the
    HTTP listeners of a running config.
    """

    def __init__(self, reactor):
        self._reactor = reactor
        self._pools: dict[int, BackendPool] = {}

    def get(self, backend, settings, h2_scheme: bytes | None = None):
        """
        The pool of C{backend}: a L{BackendPool}, or an
        L{balance.http.h2_upstream.H2Pool} for an HTTP/2 cluster.

        :param settings: the cluster's L{balance.config.model.Pool}.
        :param h2_scheme: for a cluster with C{upstream_protocol: h2}, the
            C{:scheme} of its requests (C{b"http"} or C{b"https"}).
        """
        pool = self._pools.get(id(backend))
        if pool is None:
            if h2_scheme is not None:
                pool = H2Pool(self._reactor, backend, settings.idle_timeout, h2_scheme)
            else:
                pool = BackendPool(
                    self._reactor, backend, settings.max_idle_per_backend, settings.idle_timeout
                )
            self._pools[id(backend)] = pool
        return pool

    def close_idle(self) -> None:
        """Close the idle connections of every pool."""
        for pool in self._pools.values():
            pool.close_idle()

    def drop(self, backends) -> None:
        """
        Forget the pools of C{backends}, which left their cluster: their
        idle connections are closed, and connections in use are closed
        when handed back.
        """
        for backend in backends:
            pool = self._pools.get(id(backend))
            if pool is not None and pool.backend is backend:
                del self._pools[id(backend)]
                pool.closed = True
                pool.close_idle()

    def watch(self, cluster) -> None:
        """
        Follow C{cluster}'s backend set (DNS changes): drop the pools of
        the backends it removes.  (Pools are keyed by C{id(backend)}, which
        a new backend could reuse once the removed one is gone.)
        """
        cluster.watchers.append(_ClusterWatch(self, cluster.backends))


class _ClusterWatch:
    """A cluster watcher dropping the pools of removed backends."""

    def __init__(self, pools: PoolSet, backends):
        self._pools = pools
        self._known = tuple(backends)

    def __call__(self, backends) -> None:
        gone = set(self._known).difference(backends)
        self._known = tuple(backends)
        if gone:
            self._pools.drop(gone)
