# -*- test-case-name: tests.cluster.test_cluster -*-
"""
A running cluster: its backends, its load-balancing policy, and connecting
to a backend with failover to the next one.
"""

from __future__ import annotations

from collections.abc import Mapping

from twisted.internet import error
from twisted.internet.defer import Deferred, fail
from twisted.internet.interfaces import IProtocolFactory
from twisted.logger import Logger
from twisted.python.failure import Failure

from balance.cluster import lb
from balance.cluster.backend import Backend
from balance.config import model

_NO_CONTEXT: Mapping[str, object] = {}


class NoBackendAvailable(Exception):
    """
    No backend of a cluster could take a connection: none was eligible, or
    every one tried refused, timed out or failed.

    @ivar cluster: The cluster's name.
    @ivar tried: The addresses tried, in order.
    @ivar reason: Why the last attempt failed, a short phrase, or L{None}
        when nothing was tried.
    """

    def __init__(self, cluster: str, tried: tuple[str, ...] = (), reason: str | None = None):
        super().__init__(cluster, tried, reason)
        self.cluster = cluster
        self.tried = tried
        self.reason = reason

    def __str__(self) -> str:
        if not self.tried:
            return f"cluster {self.cluster} has no eligible backend"
        return (
            f"no backend of cluster {self.cluster} accepted the connection "
            f"(tried {', '.join(self.tried)}; last: {self.reason})"
        )


def describe(reason: Failure) -> str:
    """
    Say in a few words why a connection attempt failed, for a log line.
    """
    if reason.check(error.ConnectionRefusedError):
        return "connection refused"
    if reason.check(error.TimeoutError, error.TCPTimedOutError):
        return "timed out"
    if reason.check(error.DNSLookupError):
        return "host name did not resolve"
    if reason.check(error.NoRouteError):
        return "no route to host"
    if reason.check(error.ConnectionLost, error.ConnectionDone):
        return "connection closed during connect"
    return reason.getErrorMessage()


class Cluster:
    """
    The backends of one configured cluster and the policy that spreads work
    over them.

    @ivar model: The configured cluster.
    @ivar name: Its name.
    @ivar backends: The runtime L{Backend}s, in config order.
    @ivar policy: The L{balance.interfaces.ILoadBalancer} named by C{lb:}.
    """

    log = Logger()

    def __init__(self, cluster: model.Cluster, reactor):
        """
        @param cluster: The validated cluster config.
        @param reactor: What the backends' endpoints connect with
            (L{IReactorTCP}, L{IReactorTime}).
        """
        self.model = cluster
        self.name = cluster.name
        self.backends = tuple(
            Backend.build(b, reactor, cluster.connect_timeout) for b in cluster.backends
        )
        self.policy = lb.make(cluster.lb, self.backends)

    def __repr__(self) -> str:
        return f"<Cluster {self.name} backends={len(self.backends)}>"

    def backend(self, address: str) -> Backend:
        """
        Return the backend whose address is C{address} (C{"host:port"} as
        configured).

        @raise KeyError: If there is none.
        """
        for b in self.backends:
            if b.address == address:
                return b
        raise KeyError(address)

    def pick(self, key=None, exclude=()) -> Backend | None:
        """
        Ask the policy for a backend.

        @param key: For hashing policies; see L{ILoadBalancer.pick}.
        @param exclude: Backends not to choose.
        @return: An eligible backend, or L{None}.
        """
        return self.policy.pick(key, exclude)

    def connect(
        self,
        protocol_factory: IProtocolFactory,
        key=None,
        log_context: Mapping[str, object] | None = None,
        max_attempts: int | None = None,
    ) -> Deferred:
        """
        Connect to a backend, in the policy's order, trying the next one
        when an attempt fails.

        Each backend is tried at most once, and at most C{max_attempts}
        backends in all.  Each failed attempt is logged at warn level with
        the backend and the reason.

        While an attempt is in flight and after it succeeds, the backend
        counts the connection in C{active}; on success the caller owns that
        count and must call L{release} once the connection has ended.

        @param protocol_factory: Builds the protocol of the upstream
            connection (only for the attempt that succeeds).
        @param key: Passed to the policy's C{pick}.
        @param log_context: Extra structured fields for the log events (for
            example C{{"listener": "web"}}).
        @param max_attempts: At most this many backends are tried; all of
            them when L{None}.

        @return: A L{Deferred} that fires with C{(backend, protocol)}, or
            fails with L{NoBackendAvailable} when every attempt failed (or
            none could be made).  Cancelling it abandons the attempt in
            flight.
        """
        attempts = _Attempts(
            self,
            protocol_factory,
            key,
            log_context or _NO_CONTEXT,
            len(self.backends) if max_attempts is None else max_attempts,
        )
        attempts.next()
        return attempts.result

    def release(self, backend: Backend) -> None:
        """
        Note that a connection to C{backend} obtained from L{connect} has
        ended.
        """
        backend.active -= 1
        self.policy.finished(backend)

    def _acquire(self, backend: Backend) -> None:
        backend.active += 1
        self.policy.started(backend)


class _Attempts:
    """
    One L{Cluster.connect} call: the backends tried so far and the attempt
    in flight.  Plain callbacks rather than a coroutine, because this runs
    once per proxied connection.
    """

    __slots__ = (
        "_cluster",
        "_factory",
        "_key",
        "_log_context",
        "_max",
        "_tried",
        "_pending",
        "_cancelled",
        "result",
    )

    def __init__(self, cluster, factory, key, log_context, max_attempts):
        self._cluster = cluster
        self._factory = factory
        self._key = key
        self._log_context = log_context
        self._max = max_attempts
        self._tried: list[Backend] = []
        self._pending: Deferred | None = None
        self._cancelled = False
        self.result = Deferred(self._cancel)

    def next(self, failed: Backend | None = None, reason: Failure | None = None) -> None:
        """
        Start an attempt on the next backend, or fail C{result} when there is
        none left.  C{failed} and C{reason} describe the attempt that just
        failed, if any, for the log line.
        """
        backend = None
        if len(self._tried) < self._max:
            backend = self._cluster.pick(self._key, self._tried)
        why = None if reason is None else describe(reason)
        if failed is not None:
            self._cluster.log.warn(
                "connect to {backend} in cluster {cluster} failed ({reason}); {outcome}",
                backend=failed.address,
                cluster=self._cluster.name,
                reason=why,
                outcome="no backend left to try" if backend is None else "trying next backend",
                **self._log_context,
            )
        if backend is None:
            tried = tuple(b.address for b in self._tried)
            self.result.errback(NoBackendAvailable(self._cluster.name, tried, why))
            return
        self._tried.append(backend)
        self._cluster._acquire(backend)
        try:
            attempt = backend.endpoint.connect(self._factory)
        except Exception:
            attempt = fail()
        self._pending = attempt
        attempt.addCallbacks(
            self._connected,
            self._failed,
            callbackArgs=(backend,),
            errbackArgs=(backend,),
        )

    def _connected(self, protocol, backend: Backend) -> None:
        self._pending = None
        self.result.callback((backend, protocol))

    def _failed(self, reason: Failure, backend: Backend) -> None:
        self._pending = None
        self._cluster.release(backend)
        if self._cancelled:
            return
        self.next(backend, reason)

    def _cancel(self, result: Deferred) -> None:
        self._cancelled = True
        if self._pending is not None:
            self._pending.cancel()


__all__ = ["Cluster", "NoBackendAvailable", "describe"]
