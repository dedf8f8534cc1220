# -*- test-case-name: tests.http.test_pool -*-
"""
Keep-alive connections to backends, reused across downstream connections.

One L{BackendPool} per backend keeps idle upstream connections on a stack
(the most recently used is the warmest and the least likely to have been
closed by the backend), up to C{pool.max_idle_per_backend}, and closes those
idle longer than C{pool.idle_timeout} with one sweep timer per pool rather
than a timer per connection.

With C{send_proxy_protocol}, a connection starts with a PROXY header that
names one client connection (its address and port), so it may only carry
that client connection's requests: like HAProxy, which reuses a connection
only for requests with the same PROXY block, idle connections are then
kept by header (L{BackendPool.take} with a C{key}), and those of a client
connection are closed when it closes.
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
        #: Idle connections that began with a PROXY header, by header.
        self.private: dict[bytes, list[UpstreamConnection]] = {}
        self._private_count = 0
        self._factory = _UpstreamFactory(self)
        self._sweeper = None
        self.closed = False

    def take(self, key: bytes | None = None) -> UpstreamConnection | None:
        """
        Pop the most recently used idle connection that is still usable.

        :param key: the PROXY header the connection must have begun with
            (L{None}: connections without one).
        :return: a connection, or L{None} if a new one must be made.
        """
        if key is not None:
            return self._take_private(key)
        idle = self.idle
        while idle:
            conn = idle.pop()
            if conn.usable():
                return conn
        return None

    def connect(self, key: bytes | None = None):
        """
        Open a new connection to the backend.

        :param key: a PROXY header to send first on it; the connection is
            then reused only for the same header.
        :return: a Deferred firing with the L{UpstreamConnection}, or failing
            with the connect error (refused, timed out, unresolvable).
        """
        d = self.backend.endpoint.connect(self._factory)
        if key is not None:
            d.addCallback(_begin_with, key)
        return d

    def release(self, conn: UpstreamConnection) -> None:
        """
        Take back C{conn} after a complete exchange: keep it idle for reuse,
        or close it when the pool is full.
        """
        if (
            len(self.idle) + self._private_count >= self.max_idle
            or self.closed
            or not conn.usable()
        ):
            conn.close()
            return
        conn.idle_since = self._reactor.seconds()
        key = conn.proxy_header
        if key is None:
            self.idle.append(conn)
        else:
            self.private.setdefault(key, []).append(conn)
            self._private_count += 1
        if self._sweeper is None:
            self._sweeper = self._reactor.callLater(self.idle_timeout, self._sweep)

    def _take_private(self, key: bytes) -> UpstreamConnection | None:
        conns = self.private.get(key)
        while conns:
            conn = conns.pop()
            self._private_count -= 1
            if not conns:
                del self.private[key]
            if conn.usable():
                return conn
        return None

    def discard(self, conn: UpstreamConnection) -> None:
        """Forget C{conn}: the backend closed it while idle."""
        key = conn.proxy_header
        if key is not None:
            conns = self.private.get(key, ())
            if conn in conns:
                conns.remove(conn)
                self._private_count -= 1
                if not conns:
                    del self.private[key]
            return
        try:
            self.idle.remove(conn)
        except ValueError:
            pass

    def close_private(self, key: bytes) -> None:
        """Close the idle connections that began with PROXY header C{key}."""
        conns = self.private.pop(key, None)
        if conns:
            self._private_count -= len(conns)
            for conn in conns:
                conn.close()

    def close_idle(self) -> None:
        """Close every idle connection (on stop or reload)."""
        idle, self.idle = self.idle, []
        for conns in self.private.values():
            idle.extend(conns)
        self.private = {}
        self._private_count = 0
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
        oldest = keep[0].idle_since if keep else None
        for key, conns in list(self.private.items()):
            left = [c for c in conns if c.idle_since > cutoff]
            for conn in conns:
                if conn.idle_since <= cutoff:
                    conn.close()
            self._private_count -= len(conns) - len(left)
            if left:
                self.private[key] = left
                if oldest is None or left[0].idle_since < oldest:
                    oldest = left[0].idle_since
            else:
                del self.private[key]
        if oldest is not None:
            delay = max(oldest - cutoff, 0.05)
            self._sweeper = self._reactor.callLater(delay, self._sweep)


def _begin_with(conn: UpstreamConnection, header: bytes) -> UpstreamConnection:
    """Queue the PROXY C{header} first on a new connection (sent with the request head)."""
    conn.proxy_header = header
    conn.write(header)
    return conn


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

    def close_private(self, keys) -> None:
        """
        Close the idle connections that began with one of the PROXY
        headers C{keys}: the client connection they belong to closed.
        """
        for pool in self._pools.values():
            if pool.private:
                for key in keys:
                    pool.close_private(key)

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
