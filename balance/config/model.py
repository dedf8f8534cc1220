"""
The validated configuration: frozen objects built once by
L{balance.config.validate} and shared, read-only, by everything else.

Durations are floats in seconds, sizes are ints in bytes, optional features
are L{None} when absent.  Field names follow CONFIG.md exactly.
"""

from __future__ import annotations

from attrs import field, frozen


def _tuple(value):
    return tuple(value)


@frozen
class Backend:
    """
    One backend address of a cluster.

    @ivar address: The address as the user wrote it, C{"host:port"}.
    @ivar host: The host name or IP literal (without brackets).
    @ivar port: The TCP port.
    @ivar weight: Relative share of traffic, at least 1.
    """

    address: str
    host: str
    port: int
    weight: int = 1


@frozen
class HealthCheck:
    """Active health check settings of a cluster."""

    type: str = "tcp"
    path: str = "/"
    expect_status: tuple[int, ...] = (200,)
    expect_body: str | None = None
    host: str | None = None
    interval: float = 5.0
    timeout: float = 1.0
    healthy_threshold: int = 2
    unhealthy_threshold: int = 3
    service: str | None = None


@frozen
class OutlierDetection:
    """Passive ejection of backends that fail consecutively."""

    consecutive_failures: int = 5
    base_ejection: float = 30.0
    max_ejected_percent: float = 50.0


@frozen
class CircuitBreaker:
    """Envoy-style limits per cluster."""

    max_connections: int = 1024
    max_pending: int = 256
    max_requests: int = 1024


@frozen
class Pool:
    """Upstream keep-alive pool settings."""

    max_idle_per_backend: int = 1024
    idle_timeout: float = 60.0


@frozen
class UpstreamTLS:
    """TLS towards the backends of a cluster."""

    verify: bool = True
    ca: str | None = None
    sni: str | None = None
    client_cert: str | None = None
    client_key: str | None = None


@frozen
class Cluster:
    """A named group of backends and the policies that spread work over them."""

    name: str
    backends: tuple[Backend, ...] = field(converter=_tuple)
    lb: str = "round_robin"
    hash_on: str | None = None
    bounded_load: float = 1.25
    sticky_cookie: str | None = None
    slow_start: float = 0.0
    upstream_protocol: str = "http/1.1"
    tls: UpstreamTLS | None = None
    connect_timeout: float = 2.0
    pool: Pool = Pool()
    health_check: HealthCheck | None = None
    outlier_detection: OutlierDetection | None = None
    panic_threshold: float = 50.0
    circuit_breaker: CircuitBreaker = CircuitBreaker()
    send_proxy_protocol: str | None = None


@frozen
class Certificate:
    """A certificate and its private key, as file paths."""

    cert: str
    key: str


@frozen
class ListenerTLS:
    """TLS termination settings of a listener."""

    certificates: tuple[Certificate, ...] = field(converter=_tuple)
    default_certificate: str | None = None
    alpn: tuple[str, ...] = ("http/1.1",)
    min_version: str = "1.2"
    client_ca: str | None = None
    client_cert_header: str = "x-client-subject"
    ocsp_staple: str | None = None


@frozen
class Limits:
    """Per-listener resource limits."""

    max_connections: int = 50000
    max_header_bytes: int = 64 * 1024
    max_body_bytes: int = 10 * 1024 * 1024
    max_connections_per_ip: int | None = None


@frozen
class Timeouts:
    """Per-listener timeouts, in seconds."""

    handshake: float = 10.0
    idle: float = 60.0


@frozen
class AccessLog:
    """Where and how a listener writes its access log."""

    path: str
    format: str = "json"


@frozen
class Match:
    """The conditions of a route; all given conditions must hold."""

    host: str | None = None
    path: str | None = None
    path_prefix: str | None = None
    path_regex: str | None = None
    methods: tuple[str, ...] = ()
    headers: tuple[tuple[str, str], ...] = ()
    sni: str | None = None


@frozen
class HeaderEdits:
    """Headers to set and to remove."""

    set: tuple[tuple[str, str], ...] = ()
    remove: tuple[str, ...] = ()


@frozen
class Backoff:
    """Exponential backoff with full jitter between retries."""

    base: float = 0.025
    max: float = 0.25


@frozen
class Retry:
    """Retry policy of a route."""

    attempts: int = 1
    on: tuple[str, ...] = ("connect-failure",)
    backoff: Backoff = Backoff()
    per_try_timeout: float | None = None
    budget: float = 20.0


@frozen
class RateLimit:
    """Token bucket settings of a route."""

    requests: int
    per: float
    burst: int = 0
    key: str = "client_ip"


@frozen
class DirectResponse:
    """A response Balance answers itself."""

    status: int = 200
    body: str = ""
    headers: tuple[tuple[str, str], ...] = ()


@frozen
class Redirect:
    """A redirect Balance answers itself."""

    location: str
    status: int = 302


@frozen
class Route:
    """A routing rule: where matching requests (or connections) go."""

    match: Match = Match()
    cluster: str | None = None
    rewrite_path_prefix: str | None = None
    request_headers: HeaderEdits = HeaderEdits()
    response_headers: HeaderEdits = HeaderEdits()
    timeout: float | None = None
    retry: Retry | None = None
    rate_limit: RateLimit | None = None
    websocket: bool = False
    websocket_max_message_bytes: int | None = None
    allow: tuple[str, ...] = ()
    direct_response: DirectResponse | None = None
    redirect: Redirect | None = None


@frozen
class Listener:
    """A socket Balance accepts connections on, and what it does with them."""

    name: str
    listen: str
    protocol: str = "http"
    proxy_protocol: bool = False
    tls: ListenerTLS | None = None
    limits: Limits = Limits()
    allow: tuple[str, ...] = ()
    deny: tuple[str, ...] = ()
    timeouts: Timeouts = Timeouts()
    access_log: AccessLog | None = None
    cluster: str | None = None
    routes: tuple[Route, ...] = ()


@frozen
class Admin:
    """The admin API listener."""

    listen: str = "tcp:9901:interface=127.0.0.1"
    token_file: str | None = None


@frozen
class RateLimitStore:
    """Shared rate-limit counters."""

    redis: str
    failure_mode: str = "open"


@frozen
class Tracing:
    """OpenTelemetry tracing."""

    service_name: str = "balance"
    sample_ratio: float = 0.01
    otlp_endpoint: str | None = None


@frozen
class Whoami:
    """A built-in demo upstream."""

    name: str
    listen: str


@frozen
class Config:
    """
    A whole validated configuration file.

    @ivar path: The file it was read from.
    @ivar workers: Number of processes; 0 means one per core ("auto").
    @ivar drain_timeout: Seconds in-flight work may take to finish on stop.
    """

    path: str
    listeners: tuple[Listener, ...] = ()
    clusters: tuple[Cluster, ...] = ()
    admin: Admin | None = None
    workers: int = 1
    drain_timeout: float = 30.0
    rate_limit_store: RateLimitStore | None = None
    tracing: Tracing | None = None
    whoami: tuple[Whoami, ...] = ()

    def cluster(self, name: str) -> Cluster:
        """
        Return the cluster called C{name}.

        @raise KeyError: If there is none (validation prevents it for names
            that routes and listeners refer to).
        """
        for c in self.clusters:
            if c.name == name:
                return c
        raise KeyError(name)
