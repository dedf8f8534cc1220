"""
An HTTP listener: the factory of downstream connections and the context
they share (router, clusters, pools, limits, access log), built once per
config.
"""

from __future__ import annotations

from twisted.internet.defer import Deferred
from twisted.internet.protocol import ServerFactory
from twisted.logger import Logger

from balance._timers import TimerLists
from balance.acl import CidrMatcher
from balance.cluster.retry import RetryBudget, RetryPolicy
from balance.config import model
from balance.http import h2_headers, headers
from balance.http.h1 import DownstreamConnection
from balance.http.proxy import try_attributes, try_error
from balance.http.router import Router
from balance.http.sniff import HTTPProtocols
from balance.observe.accesslog import protocol_version, tls_version
from balance.observe.metrics import NO_ROUTE, Metrics
from balance.proxyproto import client_address, encode, server_address
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
    :ivar ws_limits: C{{route: (limit, upstream counter, downstream
        counter)}} for the WebSocket routes in frame-aware mode (with
        C{websocket_max_message_bytes}); empty when none is.
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
        tracer=None,
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
        self.ws_limits: dict = {}
        for route in self.router.routes:
            route.metrics = metrics.route(listener.name, route.label, route.cluster)
            config = route.config
            if config.websocket and config.websocket_max_message_bytes is not None:
                # Frame-aware mode: (limit, client messages, backend messages).
                self.ws_limits[route] = (
                    config.websocket_max_message_bytes,
                    metrics.websocket_messages(route.label, "upstream"),
                    metrics.websocket_messages(route.label, "downstream"),
                )
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
        # A balance.observe.tracing.Tracer, or None: tracing is off.
        self.tracer = tracer
        self.connections: set[DownstreamConnection] = set()
        # Open connections by client address (bytes), for
        # limits.max_connections_per_ip; kept across reloads.
        self.per_ip: dict[bytes, int] = {}
        self.max_per_ip = listener.limits.max_connections_per_ip
        self.draining = False
        self._drained: list[Deferred] = []
        # Head and idle deadlines of the connections, one timer per delay.
        self.timers = TimerLists(reactor)

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
        span = ex.span
        if self.cert_header is None:
            if span is None:
                return headers.request_head(ex, down.client_ip, self.proto)
            return headers.request_head(ex, down.client_ip, self.proto, None, None, span.headers())
        return headers.request_head(
            ex,
            down.client_ip,
            self.proto,
            self.cert_header,
            client_subject(down),
            b"" if span is None else span.headers(),
        )

    def proxy_header(self, down, version: str) -> bytes:
        """
        The PROXY header (C{send_proxy_protocol}) for the client connection
        of C{down} (a connection or an HTTP/2 stream), made once per
        connection and version.
        """
        holder = getattr(down, "conn", down)
        made = getattr(holder, "proxy_headers", None)
        if made is None:
            made = holder.proxy_headers = {}
        header = made.get(version)
        if header is None:
            transport = holder.transport
            header = made[version] = encode(
                version, client_address(transport), server_address(transport)
            )
        return header

    def request_fields(self, ex, scheme: bytes) -> list:
        """The request HEADERS for an HTTP/2 backend; see L{h2_headers.request_fields}."""
        down = ex.downstream
        if self.cert_header is None:
            fields = h2_headers.request_fields(ex, down.client_ip, self.proto, scheme)
        else:
            fields = h2_headers.request_fields(
                ex, down.client_ip, self.proto, scheme, self.cert_header, client_subject(down)
            )
        span = ex.span
        if span is not None:
            fields += span.fields()
        return fields

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
        ip = conn.client_ip
        self.per_ip[ip] = self.per_ip.get(ip, 0) + 1
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
        made = getattr(conn, "proxy_headers", None)
        if made:
            # Pooled connections that began with this client's PROXY
            # header can serve no one else.
            self.pools.close_private(made.values())
        per_ip = self.per_ip
        ip = conn.client_ip
        n = per_ip.get(ip, 0)
        if n > 1:
            per_ip[ip] = n - 1
        else:
            per_ip.pop(ip, None)
        self.listener_metrics.active -= 1
        if not self.connections and self.draining:
            # The listener is going away: no timer may outlive it.  (While
            # it serves, the timers stay armed when the last connection
            # goes: they stop by themselves when they find nothing due, and
            # a lone connection after another costs no callLater/cancel.)
            self.timers.stop_if_empty()
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
        span = ex.span
        if span is not None and span.recording:
            # Attributes only for spans that are kept.
            if span.try_id is not None:
                self.tracer.end_try(span, try_attributes(ex, span), try_error(ex, span))
            self.tracer.end(span, span_attributes(self, conn, ex), _span_error(ex))


def span_attributes(ctx: HTTPContext, conn, ex) -> dict:
    """
    The attributes of the server span of C{ex}, after the OpenTelemetry
    HTTP semantic conventions, plus Balance's route, cluster and backend.
    """
    host = ex.host.decode("latin-1")
    if host.startswith("["):
        host = host[1 : host.find("]")]
    elif ":" in host:
        host = host.rpartition(":")[0]
    attributes = {
        "http.request.method": ex.method.decode("latin-1"),
        "url.path": ex.path.decode("latin-1"),
        "url.scheme": ctx.proto.decode("ascii"),
        "http.response.status_code": ex.status,
        "server.address": host,
        "client.address": conn.client_ip.decode("ascii"),
        "network.protocol.name": "http",
        "network.protocol.version": protocol_version(conn, ex),
        "balance.listener": ctx.name,
        "http.request.body.size": ex.body_received,
        "http.response.body.size": ex.response_bytes,
    }
    route = ex.route
    if route is not None:
        attributes["http.route"] = route_template(route)
        attributes["balance.route"] = route.label
        if route.cluster is not None:
            attributes["balance.cluster"] = route.cluster
    backend = ex.backend
    if backend is not None:
        attributes["balance.upstream.address"] = backend.address
        if ex.t_head:
            attributes["balance.upstream.duration_ms"] = round((ex.t_head - ex.t_sent) * 1000, 3)
    if ex.reason:
        attributes["balance.reason"] = ex.reason
    tls = tls_version(conn)
    if tls is not None:
        # "TLSv1.3" -> name "tls", version "1.3", as the conventions say.
        name, _, version = tls.partition("v")
        attributes["tls.protocol.name"] = name.lower()
        attributes["tls.protocol.version"] = version
    return attributes


def route_template(route) -> str:
    """C{http.route}: the matched path pattern, or the route's label when it matches no path."""
    match = route.config.match
    if match is not None:
        if match.path is not None:
            return match.path
        if match.path_prefix is not None:
            return match.path_prefix + "*"
        if match.path_regex is not None:
            return match.path_regex
    return route.label


def _span_error(ex) -> str | None:
    # Server spans are errors for 5xx only (a 4xx is the client's).
    if ex.status >= 500:
        return ex.reason or "status %d" % (ex.status,)
    return None


class HTTPFactory(ServerFactory):
    """
    The factory of an HTTP listener.

    Beyond C{limits.max_connections}, or C{limits.max_connections_per_ip}
    from one client address, new connections are closed as soon as they
    are accepted.
    """

    log = Logger()
    noisy = False

    def __init__(self, context: HTTPContext):
        self.context = context
        self.max_connections = context.listener.limits.max_connections
        # HTTP/1.1, or a sniffer choosing HTTP/2 by ALPN or its preface.
        self.protocols = HTTPProtocols(context)

    def buildProtocol(self, addr):
        ctx = self.context
        if len(ctx.connections) >= self.max_connections:
            ctx.listener_metrics.refuse("max_connections")
            return None
        limit = ctx.max_per_ip
        if limit is not None:
            host = getattr(addr, "host", None)
            if host is not None and ctx.per_ip.get(host.encode("ascii"), 0) >= limit:
                # Closed as soon as accepted, as beyond max_connections.
                ctx.listener_metrics.refuse("max_connections_per_ip")
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
            ctx.timers.stop_if_empty()
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
