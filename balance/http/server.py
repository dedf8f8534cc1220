"""
An HTTP listener: the factory of downstream connections and the context
they share (router, clusters, pools, limits, access log), built once per
config.
"""

from __future__ import annotations

from twisted.internet.defer import Deferred
from twisted.internet.protocol import ServerFactory
from twisted.logger import Logger

from balance.acl import CidrMatcher
from balance.cluster.retry import RetryBudget, RetryPolicy
from balance.config import model
from balance.http import h2_headers, headers
from balance.http.h1 import DownstreamConnection
from balance.http.router import Router
from balance.http.sniff import HTTPProtocols
from balance.observe.metrics import NO_ROUTE, Metrics
from balance.ratelimit import build_store
from balance.ratelimit.limiter import RateLimiter
from balance.tls.transport import peer_subject

# When a route gives no timeout, a backend has this long to answer.
DEFAULT_ROUTE_TIMEOUT = 60.0


def client_subject(down) -> bytes | None:
    """
    The verified certificate subject of a downstream connection (or stream:
    its connection's), read once and kept on the connection.
    """
    # An HTTP/2 stream reads it from its connection.
    holder = getattr(down, "conn", down)
    subject = getattr(holder, "client_subject", _UNREAD)
    if subject is _UNREAD:
        text = peer_subject(holder.transport)
        subject = None if text is None else text.encode("ascii", "replace")
        holder.client_subject = subject
    return subject


_UNREAD = object()


class HTTPContext:
    """
    What every connection of one HTTP listener needs, computed once.

    :ivar clusters: runtime clusters by name.
    :ivar pools: the shared L{balance.http.pool.PoolSet}.
    :ivar access_log: an L{balance.observe.accesslog.AccessLog} or L{None}.
    :ivar metrics: the process's L{Metrics}; C{listener_metrics} is this
        listener's handle in it.
    :ivar acl: the listener's address ACL, or L{None} when it has none.
    :ivar retry_policies: C{{route: (RetryPolicy, RetryBudget)}} for the
        routes with C{retry:}; empty when none has.
    """

    def __init__(
        self,
        listener: model.Listener,
        clusters,
        pools,
        reactor,
        access_log=None,
        metrics: Metrics | None = None,
        rate_limit_store=None,
    ):
        self.listener = listener
        self.name = listener.name
        self.reactor = reactor
        self.clusters = clusters
        self.pools = pools
        self.metrics = metrics = metrics if metrics is not None else Metrics()
        self.listener_metrics = metrics.listener(listener.name)
        self.no_route_metrics = metrics.route(listener.name, NO_ROUTE, None)
        self._backend_metrics: dict = {}
        acl = CidrMatcher(listener.allow, listener.deny)
        self.acl = None if acl.empty else acl
        self.router = Router(listener.routes, default_cluster=listener.cluster)
        store = rate_limit_store
        self.retry_policies: dict = {}
        for route in self.router.routes:
            route.metrics = metrics.route(listener.name, route.label, route.cluster)
            config = route.config
            if config.allow:
                route.acl = CidrMatcher(config.allow, ())
            if config.retry is not None and route.cluster is not None:
                self.retry_policies[route] = (
                    RetryPolicy(config.retry),
                    RetryBudget(config.retry.budget),
                )
            if config.rate_limit is not None:
                if store is None:
                    store = build_store(None, reactor)
                route.limiter = RateLimiter(
                    config.rate_limit,
                    store,
                    f"{listener.name}.{route.label}",
                    metrics.rate_limited(listener.name, route.label),
                )
        self.max_header_bytes = listener.limits.max_header_bytes
        self.max_body_bytes = listener.limits.max_body_bytes
        self.handshake_timeout = listener.timeouts.handshake
        self.idle_timeout = listener.timeouts.idle
        self.default_timeout = DEFAULT_ROUTE_TIMEOUT
        self.proto = b"https" if listener.tls is not None else b"http"
        # mTLS: the verified client subject goes upstream in this header.
        tls = listener.tls
        self.cert_header = (
            tls.client_cert_header.encode("ascii")
            if tls is not None and tls.client_ca is not None
            else None
        )
        self.access_log = access_log
        self.connections: set[DownstreamConnection] = set()
        self.draining = False
        self._drained: list[Deferred] = []

    # -- head builders, bound to this listener --------------------------------------

    def with_client_subject(self, request_headers, down):
        """
        C{request_headers} with the verified client subject under
        C{cert_header} in place of any value the client sent, so that
        C{match.headers} can route on it.
        """
        name = self.cert_header
        kept = [(n, v) for n, v in request_headers if n.lower() != name]
        subject = client_subject(down)
        if subject is not None:
            kept.append((name, subject))
        return kept

    def request_head(self, ex) -> bytes:
        """The request head for the backend; see L{headers.request_head}."""
        down = ex.downstream
        if self.cert_header is None:
            return headers.request_head(ex, down.client_ip, self.proto)
        return headers.request_head(
            ex, down.client_ip, self.proto, self.cert_header, client_subject(down)
        )

    def request_fields(self, ex, scheme: bytes) -> list:
        """The request HEADERS for an HTTP/2 backend; see L{h2_headers.request_fields}."""
        down = ex.downstream
        if self.cert_header is None:
            return h2_headers.request_fields(ex, down.client_ip, self.proto, scheme)
        return h2_headers.request_fields(
            ex, down.client_ip, self.proto, scheme, self.cert_header, client_subject(down)
        )

    def response_head(
        self, ex, status: int, phrase: bytes, response_headers, set_cookie: bytes | None = None
    ) -> bytes:
        """The response head for the client; see L{headers.response_head}."""
        return headers.response_head(
            ex, status, phrase, response_headers, self.draining, set_cookie
        )

    # -- connection bookkeeping -------------------------------------------------------

    def connection_made(self, conn: DownstreamConnection) -> None:
        self.connections.add(conn)
        lm = self.listener_metrics
        lm.connections_total += 1
        lm.active += 1
        if self.acl is not None and not self.acl.allowed(conn.client_ip):
            # Answered 403 on its first request (CONFIG.md: 403 for http).
            conn.denied = True
        if self.draining:
            conn.drain()

    def connection_lost(self, conn: DownstreamConnection) -> None:
        self.connections.discard(conn)
        self.listener_metrics.active -= 1
        if not self.connections and self._drained:
            waiting, self._drained = self._drained, []
            for d in waiting:
                d.callback(None)

    def backend_metrics(self, cluster, backend):
        """The metrics handle of C{backend} of C{cluster}, cached."""
        handle = self._backend_metrics.get(backend)
        if handle is None:
            handle = self._backend_metrics[backend] = self.metrics.backend(
                cluster.name, backend.address
            )
        return handle

    def request_done(self, conn: DownstreamConnection, ex) -> None:
        """An exchange ended: count it and write its access log line."""
        route = ex.route
        (route.metrics if route is not None else self.no_route_metrics).observe(
            ex.status, self.reactor.seconds() - ex.started if ex.started else 0.0
        )
        if self.access_log is not None:
            self.access_log.write(self, conn, ex)


class HTTPFactory(ServerFactory):
    """
    The factory of an HTTP listener.

    Beyond C{limits.max_connections}, new connections are closed as soon as
    they are accepted.
    """

    log = Logger()
    noisy = False

    def __init__(self, context: HTTPContext):
        self.context = context
        self.max_connections = context.listener.limits.max_connections
        # HTTP/1.1, or a sniffer choosing HTTP/2 by ALPN or its preface.
        self.protocols = HTTPProtocols(context)

    def buildProtocol(self, addr):
        if len(self.context.connections) >= self.max_connections:
            return None
        return self.protocols.build()

    @property
    def active(self) -> int:
        """The number of open client connections."""
        return len(self.context.connections)

    def drain(self) -> Deferred:
        """
        Close idle connections now, and the others after their current
        response (which says C{Connection: close}).

        :return: a Deferred firing when no connection is left.
        """
        ctx = self.context
        ctx.draining = True
        d = Deferred()
        if not ctx.connections:
            d.callback(None)
            return d
        ctx._drained.append(d)
        for conn in list(ctx.connections):
            conn.drain()
        return d

    def abort_all(self) -> None:
        """Cut every connection still open (the drain timeout passed)."""
        for conn in list(self.context.connections):
            conn.transport.abortConnection()
