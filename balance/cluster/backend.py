# -*- test-case-name: tests.cluster.test_backend -*-
"""
The runtime state of one backend: the mutable counterpart of the frozen
L{balance.config.model.Backend}.
"""

from __future__ import annotations

from collections.abc import Callable

from twisted.internet.abstract import isIPAddress, isIPv6Address
from twisted.internet.endpoints import HostnameEndpoint
from twisted.internet.interfaces import IStreamClientEndpoint

from balance.cluster.endpoint import LeanTCP4ClientEndpoint, LeanTCP6ClientEndpoint
from balance.config import model

_NEVER = float("-inf")


def is_ip_literal(host: str) -> bool:
    """
    Whether C{host} is an IPv4 or IPv6 address (without brackets) rather
    than a host name that needs resolving.
    """
    return isIPAddress(host) or isIPv6Address(host)


def client_endpoint(reactor, host: str, port: int, timeout: float) -> IStreamClientEndpoint:
    """
    Make the client endpoint that connects to C{host}:C{port}.

    Host names go through L{HostnameEndpoint}, which resolves them without
    blocking the reactor and tries every address it gets (happy eyeballs).
    IP literals, IPv4 or IPv6, get a plain TCP endpoint: the result is the
    same, but without a trip through the resolver's thread pool on every
    connect; and a lean one (L{balance.cluster.endpoint}), whose connections
    keep nothing of the connect.

    @param reactor: An L{IReactorTCP} and L{IReactorTime} provider.
    @param host: A host name or an IP literal, without brackets.
    @param port: The TCP port.
    @param timeout: Seconds to wait for each connection attempt.
    """
    if isIPAddress(host):
        return LeanTCP4ClientEndpoint(reactor, host, port, timeout=timeout)
    if isIPv6Address(host):
        return LeanTCP6ClientEndpoint(reactor, host, port, timeout=timeout)
    return HostnameEndpoint(reactor, host, port, timeout=timeout)


class Backend:
    """
    One backend of a running cluster: one address to connect to.

    A configured backend whose host is a name becomes one runtime backend
    per address the name resolves to (see L{balance.cluster.resolve}); all
    of them share the configured C{address} and differ by C{ip}.

    Load-balancing policies read C{eligible}, C{weight} and C{active};
    health checks write C{healthy}, outlier detection C{ejected}, the admin
    API C{drained}, the backend's circuit breaker C{circuit_open}, the
    cluster's panic monitor C{panic}; L{balance.cluster.cluster.Cluster}
    keeps C{active} and C{healthy_since}.

    C{eligible} is a plain attribute kept up to date by the setters of
    those flags, because every pick of every policy reads it::

        eligible = not drained and not circuit_open
                   and (panic or (healthy and not ejected))

    @ivar model: The configured backend this one was built from.
    @ivar address: C{"host:port"} as the user wrote it; the name used in
        the admin API (shared by every address a host name resolves to).
    @ivar host: Host name or IP literal, without brackets.
    @ivar port: TCP port.
    @ivar ip: The IP address connections go to, or L{None} while a host
        name has not been resolved (connections then resolve it themselves).
    @ivar name: How logs, metrics, hashes and sticky cookies tell this
        backend apart: C{address}, followed by C{" (ip)"} when the IP came
        from resolving a host name.
    @ivar weight: Relative share of traffic, at least 1.
    @ivar active: Connections (tcp) or requests (http) in flight.
    @ivar eligible: Whether new work may go to this backend: not drained,
        its breaker not open, and healthy and not ejected (or the cluster
        in panic).  Read-only for everyone but the setters.
    @ivar healthy_since: When the backend last became healthy or was added
        to a running cluster, in the cluster clock's seconds;
        C{float("-inf")} for backends there from the start.  Slow start
        ramps the weight up from this moment.
    @ivar on_recovery: Called with the backend when it comes back into
        service: C{healthy} turns from L{False} to L{True}, or C{ejected}
        from L{True} to L{False}.  L{None}, or the cluster's hook that
        starts slow start.
    @ivar endpoint: The L{IStreamClientEndpoint} that connects to it, built
        once; L{None} for backends that policies only reason about.
    @ivar breaker: Its L{balance.cluster.breaker.BackendBreaker}, given by
        the cluster; L{None} for backends that policies only reason about.
    @ivar on_change: Called with the backend after C{healthy}, C{ejected}
        or C{drained} changed (the cluster's panic monitor); L{None} or a
        callable.
    """

    __slots__ = (
        "model",
        "address",
        "host",
        "port",
        "ip",
        "name",
        "weight",
        "active",
        "eligible",
        "healthy_since",
        "on_recovery",
        "endpoint",
        "breaker",
        "on_change",
        "_healthy",
        "_ejected",
        "_drained",
        "_circuit_open",
        "_panic",
    )

    def __init__(
        self,
        backend: model.Backend,
        endpoint: IStreamClientEndpoint | None = None,
        ip: str | None = None,
    ):
        """
        @param backend: The configured backend.
        @param endpoint: How to connect to it; see L{Backend.build}.
        @param ip: The address it was resolved to; by default the host
            itself when it is an IP literal, else L{None}.
        """
        self.model = backend
        self.address = backend.address
        self.host = backend.host
        self.port = backend.port
        if ip is None and is_ip_literal(backend.host):
            ip = backend.host
        self.ip = ip
        self.name = (
            backend.address if ip is None or ip == backend.host else f"{backend.address} ({ip})"
        )
        self.weight = backend.weight
        self.active = 0
        self.healthy_since = _NEVER
        self.on_recovery: Callable[[Backend], object] | None = None
        self.endpoint = endpoint
        self.breaker = None
        self.on_change: Callable[[Backend], object] | None = None
        self._healthy = True
        self._ejected = False
        self._drained = False
        self._circuit_open = False
        self._panic = False
        self.eligible = True

    @classmethod
    def build(
        cls,
        backend: model.Backend,
        reactor,
        connect_timeout: float,
        ip: str | None = None,
    ) -> Backend:
        """
        Make the runtime backend for C{backend}, with its client endpoint.

        @param reactor: The reactor the endpoint connects with.
        @param connect_timeout: Seconds each connection attempt may take.
        @param ip: The address a host name resolved to; connections go
            there.  When L{None} they go to the configured host (resolving
            a name at each connect).
        """
        return cls(
            backend,
            client_endpoint(reactor, ip or backend.host, backend.port, connect_timeout),
            ip,
        )

    @property
    def healthy(self) -> bool:
        """
        L{False} while health checks (or outlier detection) say the backend
        is down.  Turning it back on calls C{on_recovery}.
        """
        return self._healthy

    @healthy.setter
    def healthy(self, value: bool) -> None:
        recovered = value and not self._healthy
        changed = bool(value) != self._healthy
        self._healthy = bool(value)
        self._update()
        if recovered and self.on_recovery is not None:
            self.on_recovery(self)
        if changed and self.on_change is not None:
            self.on_change(self)

    @property
    def ejected(self) -> bool:
        """
        L{True} while outlier detection keeps the backend out.  Ending an
        ejection calls C{on_recovery}.
        """
        return self._ejected

    @ejected.setter
    def ejected(self, value: bool) -> None:
        returned = self._ejected and not value
        changed = bool(value) != self._ejected
        self._ejected = bool(value)
        self._update()
        if returned and self.on_recovery is not None:
            self.on_recovery(self)
        if changed and self.on_change is not None:
            self.on_change(self)

    @property
    def drained(self) -> bool:
        """L{True} while an operator keeps new work away from the backend."""
        return self._drained

    @drained.setter
    def drained(self, value: bool) -> None:
        changed = bool(value) != self._drained
        self._drained = bool(value)
        self._update()
        if changed and self.on_change is not None:
            self.on_change(self)

    @property
    def circuit_open(self) -> bool:
        """
        L{True} while the backend's circuit breaker gets no work through:
        open, or half-open with its probe request in flight.  Overrides
        panic: a backend that refuses connections gets nothing.
        """
        return self._circuit_open

    @circuit_open.setter
    def circuit_open(self, value: bool) -> None:
        self._circuit_open = bool(value)
        self._update()

    @property
    def panic(self) -> bool:
        """
        L{True} while the cluster is in panic (see L{balance.cluster.panic}):
        the backend is eligible whatever its health and ejection say.
        """
        return self._panic

    @panic.setter
    def panic(self, value: bool) -> None:
        self._panic = bool(value)
        self._update()

    def _update(self) -> None:
        self.eligible = (
            not self._drained
            and not self._circuit_open
            and (self._panic or (self._healthy and not self._ejected))
        )

    def __repr__(self) -> str:
        flags = "" if self._healthy else " unhealthy"
        if self._ejected:
            flags += " ejected"
        if self._drained:
            flags += " drained"
        if self._circuit_open:
            flags += " circuit-open"
        if self._panic:
            flags += " panic"
        return f"<Backend {self.name} active={self.active}{flags}>"
