# -*- test-case-name: tests.cluster.test_cluster -*-
"""
A running cluster: its backends, its load-balancing policy, its
resilience state (circuit breakers, outlier detection, panic threshold),
and connecting to a backend with failover to the next one.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Mapping

from twisted.internet import error
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.interfaces import IProtocolFactory
from twisted.logger import Logger
from twisted.python.failure import Failure

from balance.cluster import lb
from balance.cluster.backend import Backend, is_ip_literal
from balance.cluster.breaker import BackendBreaker, BreakerState, CircuitBreakers, Permit
from balance.cluster.lb.keys import key_function
from balance.cluster.outlier import OutlierDetector
from balance.cluster.panic import PanicMonitor, count
from balance.cluster.resolve import DEFAULT_INTERVAL, DEFAULT_TIMEOUT, Resolver
from balance.cluster.retry import Outcome
from balance.cluster.slow_start import SlowStart
from balance.cluster.sticky import StickyCookie, derive_secret
from balance.config import model
from balance.tls.client import ClientTLS

_NO_CONTEXT: Mapping[str, object] = {}

#: Consecutive failed tries (connect failure, reset, timeout) that open a
#: backend's circuit breaker.
BREAKER_THRESHOLD = 5
#: Seconds a backend's breaker stays open the first time; each failed probe
#: doubles it, up to L{BREAKER_MAX_OPEN}.
BREAKER_OPEN = 5.0
BREAKER_MAX_OPEN = 60.0

# What counts against a backend's breaker: the backend did not answer.  A
# 5xx is an answer (the backend is reachable): it is outlier detection's
# and the retry policy's business, not the breaker's.
_BREAKER_FAILURES = frozenset({Outcome.CONNECT_FAILURE, Outcome.RESET, Outcome.TIMEOUT})


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

    Backends given as IP literals are used as they are.  Backends given as
    host names connect through the name (resolved at each connect) until
    L{start} has resolved it; from then on each address of the name is a
    backend of its own, and the names are resolved again periodically (see
    L{balance.cluster.resolve}).

    @ivar model: The configured cluster.
    @ivar name: Its name.
    @ivar backends: The runtime L{Backend}s, in config order (the
        addresses of one host name sorted); replaced, never mutated, when
        DNS changes the set.
    @ivar policy: The L{balance.interfaces.ILoadBalancer} named by C{lb:}.
    @ivar sticky: The L{StickyCookie} of C{sticky_cookie:}, or L{None}.
    @ivar slow_start: The L{SlowStart} of C{slow_start:}, or L{None}.
    @ivar watchers: Callables called with the new C{backends} each time DNS
        changes the set, after the policy, the sticky cookie, outlier
        detection and the breakers have taken it (health checks and
        connection pools follow the set through this).
    @ivar breakers: The L{CircuitBreakers} of C{circuit_breaker:} (always
        present: the config has defaults).
    @ivar outlier: The L{OutlierDetector} of C{outlier_detection:}, or
        L{None}.
    @ivar panic: The L{PanicMonitor} of C{panic_threshold:}; it sets
        C{panic} on every backend when the cluster enters or leaves panic.
    @ivar health: The L{balance.cluster.health.HealthChecker} of
        C{health_check:} once the service has attached one (see
        L{attach_health}), else L{None}.
    @ivar measures_latency: Whether the policy weighs latency, so that
        callers measure it for L{finished} (otherwise they need not read
        the clock).
    """

    log = Logger()

    def __init__(
        self,
        cluster: model.Cluster,
        reactor,
        *,
        rng=None,
        name_resolver=None,
        sticky_secret: bytes | None = None,
        resolve_interval: float = DEFAULT_INTERVAL,
        resolve_timeout: float = DEFAULT_TIMEOUT,
    ):
        """
        @param cluster: The validated cluster config.
        @param reactor: What the backends' endpoints connect with
            (L{IReactorTCP}, L{IReactorTime}); also the cluster's clock.
        @param rng: The C{random.Random} of the policy; a fresh one when
            L{None}.  Pass a seeded one for reproducible picks.
        @param name_resolver: The L{IHostnameResolver} for backend host
            names; C{reactor.nameResolver} when L{None}.
        @param sticky_secret: The key of sticky cookie tokens, the same in
            every process; derived from the cluster name when L{None} (see
            L{balance.cluster.sticky.derive_secret}).
        @param resolve_interval: Seconds between re-resolutions of names.
        @param resolve_timeout: Seconds a name lookup may take.
        """
        self.model = cluster
        self.name = cluster.name
        self._reactor = reactor
        self._name_resolver = name_resolver
        self._resolve_interval = resolve_interval
        self._resolve_timeout = resolve_timeout
        self._resolver: Resolver | None = None
        self._addresses: dict[str, tuple[str, ...]] = {}
        self.slow_start = SlowStart(cluster.slow_start) if cluster.slow_start > 0 else None
        self.watchers: list[Callable[[tuple[Backend, ...]], object]] = []
        self.breakers = CircuitBreakers(cluster.circuit_breaker)
        self.panic = PanicMonitor(cluster.name, cluster.panic_threshold)
        self.health = None
        self.measures_latency = cluster.lb in lb.LATENCY_POLICIES
        # Called with the backend of each failed attempt of connect() (the
        # tcp listeners' path), for balance_upstream_connect_failures_total.
        self.on_connect_failure = None
        # Backend TLS (the cluster's tls:), loaded once; every backend's
        # endpoint then speaks TLS, verified unless verify: false.
        self.tls = None
        # The :scheme of an HTTP/2 cluster's requests; None for HTTP/1.1.
        self.h2_scheme = None
        if cluster.upstream_protocol == "h2":
            self.h2_scheme = b"https" if cluster.tls is not None else b"http"
        if cluster.tls is not None:
            alpn = (b"h2",) if cluster.upstream_protocol == "h2" else (b"http/1.1",)
            self.tls = ClientTLS(cluster.tls, cluster.name, reactor, alpn=alpn)
        self.backends: tuple[Backend, ...] = ()
        self.backends = self._build()
        self.outlier = (
            OutlierDetector(
                cluster.outlier_detection,
                reactor,
                self.backends,
                cluster.name,
            )
            if cluster.outlier_detection is not None
            else None
        )
        self.policy = lb.make(
            cluster.lb,
            self.backends,
            lb.Options(
                rng=rng if rng is not None else random.Random(),
                clock=reactor,
                slow_start=self.slow_start,
                bounded_load=cluster.bounded_load,
            ),
        )
        self.sticky = (
            StickyCookie(
                cluster.sticky_cookie,
                derive_secret(cluster.name, sticky_secret),
                self.backends,
            )
            if cluster.sticky_cookie
            else None
        )
        # The policies shipped read backend.active themselves; a policy
        # that keeps its own counts says so by not being in this set.
        self._load_hooks = cluster.lb not in lb.ACTIVE_READERS
        self._hash_on = cluster.hash_on if cluster.lb in lb.HASH_POLICIES else None
        self._key = key_function(self._hash_on) if self._hash_on else None

    def __repr__(self) -> str:
        return f"<Cluster {self.name} backends={len(self.backends)}>"

    def backend(self, address: str) -> Backend:
        """
        Return the backend whose address is C{address} (C{"host:port"} as
        configured), or whose C{name} is C{address}.  For a host name that
        resolves to several addresses, the first of them; see
        L{backends_at} for all.

        @raise KeyError: If there is none.
        """
        for b in self.backends:
            if b.address == address or b.name == address:
                return b
        raise KeyError(address)

    def backends_at(self, address: str) -> tuple[Backend, ...]:
        """
        All the runtime backends of the configured C{address}: one per
        address its host name resolves to (one for an IP literal); empty
        when the cluster has no such backend.
        """
        return tuple(b for b in self.backends if b.address == address)

    # Picking.

    def pick(self, key=None, exclude=()) -> Backend | None:
        """
        Ask the policy for a backend.

        @param key: For hashing policies; see L{ILoadBalancer.pick} and
            L{request_key}.
        @param exclude: Backends not to choose.
        @return: An eligible backend, or L{None}.
        """
        return self.policy.pick(key, exclude)

    def request_key(self, client_ip: bytes, headers, path: bytes) -> bytes | None:
        """
        The hash key of an HTTP request, per the cluster's C{hash_on}:
        L{None} when the policy does not hash or the request lacks the key.

        @param client_ip: The client's address.
        @param headers: The request's C{(name, value)} pairs, as received.
        @param path: The request target.
        """
        key = self._key
        return None if key is None else key(client_ip, headers, path)

    def connection_key(self, client_ip: bytes) -> bytes | None:
        """
        The hash key of a TCP connection: its client's address when the
        policy hashes on C{client_ip}, else L{None}.
        """
        return client_ip if self._hash_on == "client_ip" else None

    def pick_request(self, client_ip: bytes, headers, path: bytes, exclude=()) -> Backend | None:
        """
        Choose the backend of an HTTP request: the one its sticky cookie
        names, when the cluster has C{sticky_cookie} and that backend is
        eligible and not excluded; else the policy's pick with the
        request's hash key.

        @return: An eligible backend not in C{exclude}, or L{None}.
        """
        sticky = self.sticky
        if sticky is not None:
            backend = sticky.from_request(headers, exclude)
            if backend is not None:
                return backend
        key = self._key
        if key is None:
            return self.policy.pick(None, exclude)
        return self.policy.pick(key(client_ip, headers, path), exclude)

    def _admit(self, key, exclude) -> tuple[Backend | None, Permit]:
        """
        Pick a backend for a connection (L{connect}) whose breaker lets it
        through: C{(backend, permit)}, or C{(None, DENIED)}.
        """
        skipped: list[Backend] = []
        while True:
            backend = self.policy.pick(key, [*exclude, *skipped] if skipped else exclude)
            if backend is None:
                return None, Permit.DENIED
            breaker = backend.breaker
            permit = Permit.GRANTED if breaker is None else breaker.allow()
            if permit:
                return backend, permit
            skipped.append(backend)

    # Accounting.

    def started(self, backend: Backend) -> None:
        """
        Note that a connection (tcp) or request (http) to C{backend}
        starts: it counts in C{backend.active} until L{finished}.
        """
        backend.active += 1
        if self._load_hooks:
            self.policy.started(backend)

    def finished(self, backend: Backend, latency: float | None = None) -> None:
        """
        Note that work counted by L{started} is over (done, failed or
        abandoned).

        @param latency: Seconds from sending the request to receiving the
            response head, when it was measured; fed to the policy.
        """
        backend.active -= 1
        if self._load_hooks:
            self.policy.finished(backend)
        if latency is not None:
            self.policy.observe(backend, latency)

    def observe(self, backend: Backend, latency: float) -> None:
        """Feed a latency sample of C{backend} (seconds) to the policy."""
        self.policy.observe(backend, latency)

    # Resilience.

    def record(self, backend: Backend, outcome: Outcome, permit: Permit = Permit.GRANTED) -> None:
        """
        Note how one try to C{backend} ended: its breaker counts connect
        failures, resets and timeouts (a response, even a 5xx, closes it
        again), and outlier detection, when configured, every outcome.

        @param permit: What C{backend.breaker.allow()} granted the try.
        """
        breaker = backend.breaker
        if breaker is not None:
            breaker.record(outcome not in _BREAKER_FAILURES, permit)
        if self.outlier is not None:
            self.outlier.record(backend, outcome)

    def retry_after(self) -> int:
        """
        Whole seconds a client refused because no backend is eligible
        should wait before trying again (C{Retry-After}): the soonest of
        the health check interval (when a backend is down), the end of the
        first ejection, and the end of the first open breaker's period;
        at least 1.
        """
        hints = []
        backends = [b for b in self.backends if not b.drained]
        check = self.model.health_check
        if check is not None and any(not b.healthy for b in backends):
            hints.append(check.interval)
        if self.outlier is not None:
            ejected = self.outlier.next_return()
            if ejected is not None:
                hints.append(ejected)
        for b in backends:
            breaker = b.breaker
            if breaker is not None and breaker.state is not BreakerState.CLOSED:
                hints.append(breaker.retry_after())
        return max(1, math.ceil(min(hints))) if hints else 1

    def attach_health(self, checker) -> None:
        """
        Make C{checker} (a L{balance.cluster.health.HealthChecker} over
        C{backends}) this cluster's, following DNS changes of the set.
        """
        self.health = checker
        self.watchers.append(checker.update)

    def _backend_changed(self, backend: Backend) -> None:
        """A backend's health, ejection or drain changed: panic or not?"""
        panic = self.panic.update(*count(self.backends))
        if panic != backend.panic:
            for b in self.backends:
                b.panic = panic

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
        the backend and the reason.  The time a successful connection took
        to establish is the latency the policy observes.

        While an attempt is in flight and after it succeeds, the backend
        counts the connection in C{active}; on success the caller owns that
        count and must call L{release} once the connection has ended.

        @param protocol_factory: Builds the protocol of the upstream
            connection (only for the attempt that succeeds).
        @param key: Passed to the policy's C{pick} (see L{connection_key}).
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
        self.finished(backend)

    # Backends and DNS.

    def start(self) -> Deferred:
        """
        Start resolving the backends' host names (now, and every
        C{resolve_interval} seconds) until L{stop}.  Nothing to do when
        every backend is an IP literal.

        @return: A L{Deferred} firing with L{None} once the first round of
            lookups is over (whatever its outcome: a name that does not
            resolve keeps connecting through the name); it never fails.
        """
        names = [b.host for b in self.model.backends if not is_ip_literal(b.host)]
        if not names or self._resolver is not None:
            return succeed(None)
        name_resolver = self._name_resolver
        if name_resolver is None:
            name_resolver = self._reactor.nameResolver
        self._resolver = Resolver(
            name_resolver,
            self._reactor,
            names,
            self._resolved,
            self._resolve_interval,
            self._resolve_timeout,
            self.name,
        )
        return self._resolver.start()

    def stop(self) -> None:
        """
        Stop resolving host names and cancel the timers of outlier
        ejections and open breakers (the cluster is being torn down); the
        backends stay as they are otherwise.
        """
        if self._resolver is not None:
            self._resolver.stop()
            self._resolver = None
        if self.outlier is not None:
            self.outlier.stop()
        for backend in self.backends:
            if backend.breaker is not None:
                backend.breaker.stop()

    def _resolved(self, host: str, addresses: tuple[str, ...]) -> None:
        self._addresses[host] = addresses
        backends = self._build()
        if backends == self.backends:
            return
        gone = set(self.backends).difference(backends)
        self.backends = backends
        self.policy.update(backends)
        if self.sticky is not None:
            self.sticky.update(backends)
        if self.outlier is not None:
            self.outlier.update(backends)
        for backend in gone:
            if backend.breaker is not None:
                backend.breaker.stop()
        if backends:
            self._backend_changed(backends[0])
        for watcher in self.watchers:
            try:
                watcher(backends)
            except Exception:
                self.log.failure(
                    "a watcher of cluster {cluster}'s backends failed", cluster=self.name
                )

    def _build(self) -> tuple[Backend, ...]:
        """
        The runtime backends for the config and the addresses known now,
        reusing the current ones where nothing changed, so that their
        state (active, health, drain) carries over.
        """
        position = {id(config): index for index, config in enumerate(self.model.backends)}
        current: dict[tuple[int, str | None], Backend] = {}
        placeholders: dict[int, Backend] = {}
        siblings: dict[int, Backend] = {}
        for b in self.backends:
            index = position[id(b.model)]
            current[(index, b.ip)] = b
            siblings.setdefault(index, b)
            if b.ip is None:
                placeholders[index] = b
        starting = not self.backends
        built: list[Backend] = []
        for index, config in enumerate(self.model.backends):
            if is_ip_literal(config.host):
                ips: tuple[str | None, ...] = (config.host,)
            else:
                ips = self._addresses.get(config.host, (None,))
            for ip in ips:
                backend = current.get((index, ip))
                if backend is None:
                    backend = self._new_backend(
                        config, ip, starting, placeholders.get(index), siblings.get(index)
                    )
                built.append(backend)
        return tuple(built)

    def _new_backend(self, config, ip, starting, placeholder, sibling) -> Backend:
        backend = Backend.build(config, self._reactor, self.model.connect_timeout, ip)
        if self.tls is not None:
            backend.endpoint = self.tls.wrap(backend.endpoint, config.host)
        backend.on_recovery = self._recovered
        backend.breaker = BackendBreaker(
            BREAKER_THRESHOLD,
            BREAKER_OPEN,
            self._reactor,
            BREAKER_MAX_OPEN,
            name=f"backend {backend.name} in cluster {self.name}",
            on_available=_CircuitFlag(backend),
        )
        backend.panic = self.panic.active
        if placeholder is not None:
            # The name resolved for the first time: its addresses take
            # over from the backend that connected through the name.
            backend.healthy = placeholder.healthy
            backend.drained = placeholder.drained
            backend.healthy_since = placeholder.healthy_since
        elif not starting:
            # A new address of a running cluster: ramp it up.
            if sibling is not None:
                backend.drained = sibling.drained
            self._recovered(backend)
        backend.on_change = self._backend_changed
        return backend

    def _recovered(self, backend: Backend) -> None:
        now = self._reactor.seconds()
        if self.slow_start is not None:
            self.slow_start.begin(backend, now)
        else:
            backend.healthy_since = now


class _CircuitFlag:
    """A breaker's C{on_available} hook: keeps C{backend.circuit_open}."""

    __slots__ = ("_backend",)

    def __init__(self, backend: Backend):
        self._backend = backend

    def __call__(self, available: bool) -> None:
        self._backend.circuit_open = not available


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
        "_began",
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
        self._began = 0.0
        self.result = Deferred(self._cancel)

    def next(self, failed: Backend | None = None, reason: Failure | None = None) -> None:
        """
        Start an attempt on the next backend, or fail C{result} when there is
        none left.  C{failed} and C{reason} describe the attempt that just
        failed, if any, for the log line.
        """
        backend = None
        permit = Permit.DENIED
        if len(self._tried) < self._max:
            backend, permit = self._cluster._admit(self._key, self._tried)
        why = None if reason is None else describe(reason)
        if failed is not None:
            self._cluster.log.warn(
                "connect to {backend} in cluster {cluster} failed ({reason}); {outcome}",
                backend=failed.name,
                cluster=self._cluster.name,
                reason=why,
                outcome="no backend left to try" if backend is None else "trying next backend",
                **self._log_context,
            )
        if backend is None:
            tried = tuple(b.name for b in self._tried)
            self.result.errback(NoBackendAvailable(self._cluster.name, tried, why))
            return
        self._tried.append(backend)
        cluster = self._cluster
        cluster.started(backend)
        self._began = cluster._reactor.seconds()
        try:
            attempt = backend.endpoint.connect(self._factory)
        except Exception:
            attempt = fail()
        self._pending = attempt
        attempt.addCallbacks(
            self._connected,
            self._failed,
            callbackArgs=(backend, permit),
            errbackArgs=(backend, permit),
        )

    def _connected(self, protocol, backend: Backend, permit: Permit) -> None:
        self._pending = None
        cluster = self._cluster
        cluster.observe(backend, max(0.0, cluster._reactor.seconds() - self._began))
        cluster.record(backend, Outcome.SUCCESS, permit)
        self.result.callback((backend, protocol))

    def _failed(self, reason: Failure, backend: Backend, permit: Permit) -> None:
        self._pending = None
        self._cluster.release(backend)
        if self._cancelled:
            if backend.breaker is not None:
                backend.breaker.release(permit)
            return
        cluster = self._cluster
        cluster.record(backend, Outcome.CONNECT_FAILURE, permit)
        if cluster.on_connect_failure is not None:
            cluster.on_connect_failure(backend)
        self.next(backend, reason)

    def _cancel(self, result: Deferred) -> None:
        self._cancelled = True
        if self._pending is not None:
            self._pending.cancel()


__all__ = ["Cluster", "NoBackendAvailable", "describe"]
