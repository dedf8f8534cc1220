# -*- test-case-name: tests.cluster.test_backend -*-
"""
The runtime state of one backend: the mutable counterpart of the frozen
L{balance.config.model.Backend}.
"""

from __future__ import annotations

from twisted.internet.abstract import isIPAddress, isIPv6Address
from twisted.internet.endpoints import (
    HostnameEndpoint,
    TCP4ClientEndpoint,
    TCP6ClientEndpoint,
)
from twisted.internet.interfaces import IStreamClientEndpoint

from balance.config import model


def client_endpoint(reactor, host: str, port: int, timeout: float) -> IStreamClientEndpoint:
    """
    Make the client endpoint that connects to C{host}:C{port}.

    Host names go through L{HostnameEndpoint}, which resolves them without
    blocking the reactor and tries every address it gets (happy eyeballs).
    IP literals, IPv4 or IPv6, get a plain TCP endpoint: the result is the
    same, but without a trip through the resolver's thread pool on every
    connect.

    @param reactor: An L{IReactorTCP} and L{IReactorTime} provider.
    @param host: A host name or an IP literal, without brackets.
    @param port: The TCP port.
    @param timeout: Seconds to wait for each connection attempt.
    """
    if isIPAddress(host):
        return TCP4ClientEndpoint(reactor, host, port, timeout=timeout)
    if isIPv6Address(host):
        return TCP6ClientEndpoint(reactor, host, port, timeout=timeout)
    return HostnameEndpoint(reactor, host, port, timeout=timeout)


class Backend:
    """
    One backend of a running cluster.

    Load-balancing policies read C{eligible}, C{weight} and C{active};
    health checks, outlier detection and the admin API write C{healthy} and
    C{drained}; L{balance.cluster.cluster.Cluster} keeps C{active}.

    @ivar model: The configured backend this one was built from.
    @ivar address: C{"host:port"} as the user wrote it; the name used in logs,
        metrics and the admin API.
    @ivar host: Host name or IP literal, without brackets.
    @ivar port: TCP port.
    @ivar weight: Relative share of traffic, at least 1.
    @ivar active: Connections open or being opened to this backend.
    @ivar healthy: L{False} while health checks say the backend is down.
    @ivar drained: L{True} while an operator keeps new work away from it.
    @ivar endpoint: The L{IStreamClientEndpoint} that connects to it, built
        once; L{None} for backends that policies only reason about.
    """

    __slots__ = (
        "model",
        "address",
        "host",
        "port",
        "weight",
        "active",
        "healthy",
        "drained",
        "endpoint",
    )

    def __init__(
        self,
        backend: model.Backend,
        endpoint: IStreamClientEndpoint | None = None,
    ):
        """
        @param backend: The configured backend.
        @param endpoint: How to connect to it; see L{Backend.build}.
        """
        self.model = backend
        self.address = backend.address
        self.host = backend.host
        self.port = backend.port
        self.weight = backend.weight
        self.active = 0
        self.healthy = True
        self.drained = False
        self.endpoint = endpoint

    @classmethod
    def build(cls, backend: model.Backend, reactor, connect_timeout: float) -> Backend:
        """
        Make the runtime backend for C{backend}, with its client endpoint.

        @param reactor: The reactor the endpoint connects with.
        @param connect_timeout: Seconds each connection attempt may take.
        """
        return cls(
            backend,
            client_endpoint(reactor, backend.host, backend.port, connect_timeout),
        )

    @property
    def eligible(self) -> bool:
        """
        Whether new work may go to this backend: it is healthy and not
        drained.
        """
        return self.healthy and not self.drained

    def __repr__(self) -> str:
        flags = "" if self.healthy else " unhealthy"
        if self.drained:
            flags += " drained"
        return f"<Backend {self.address} active={self.active}{flags}>"
