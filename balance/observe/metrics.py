# -*- test-case-name: tests.observe.test_metrics -*-
"""
Metrics: plain counters the data path bumps for almost nothing, rendered
as Prometheus text only when scraped.

The data path never calls C{prometheus_client}: it holds small objects
with C{__slots__} (one per listener, per C{(listener, route, cluster)},
per backend) fetched once when a config is built, and updates their int
attributes, a dict of status codes and a fixed-bucket histogram.  At
scrape time a custom collector turns them into metric families, so the
cost of labels, locks and formatting is paid once per scrape, not per
request.  Everything runs on the reactor thread, so no locks are needed.

Names and labels are those of CONFIG.md.  Label values stay bounded: route
labels are the router's labels (index, name or C{"default"}), never
paths; status codes are the strings C{"100"} to C{"599"}, anything else
counts as C{"other"}.  Objects are kept across reloads (asking again for the
same labels returns the same object), so counters never go back.

The gauges of backends (up, active connections, circuit breaker open) are
read from the live cluster objects at scrape time through sources, see
L{Metrics.add_backend_source}.
"""

from __future__ import annotations

from bisect import bisect_left

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
)
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.utils import floatToGoString

__all__ = [
    "CONTENT_TYPE",
    "DURATION_BUCKETS",
    "NO_ROUTE",
    "BackendMetrics",
    "Counter",
    "ListenerMetrics",
    "Metrics",
    "RouteMetrics",
]

#: The upper bounds of C{balance_http_request_duration_seconds}, in
#: seconds: 0.5 ms to 10 s (and +Inf).
DURATION_BUCKETS = (
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
)
_LE = tuple(floatToGoString(b) for b in DURATION_BUCKETS) + ("+Inf",)

#: The route label of requests answered before any route matched (400,
#: 404, 408, 431...).
NO_ROUTE = "none"

#: The C{Content-Type} of L{Metrics.render}'s output.
CONTENT_TYPE = CONTENT_TYPE_LATEST

_OTHER = "other"


class Counter:
    """A single counter: bump C{value}."""

    __slots__ = ("value",)

    def __init__(self):
        self.value = 0


class ListenerMetrics:
    """
    The counters of one listener.  The data path updates the attributes
    directly.

    :ivar connections_total: connections accepted.
    :ivar active: connections open now (increment on accept, decrement on
        close).
    :ivar bytes_in: bytes received from clients.
    :ivar bytes_out: bytes sent to clients.
    :ivar tls_handshakes: C{{result: count}}; see L{tls_handshake}.
    :ivar refused: C{{reason: count}} of connections closed as soon as
        accepted; see L{refuse}.
    """

    __slots__ = (
        "listener",
        "connections_total",
        "active",
        "bytes_in",
        "bytes_out",
        "tls_handshakes",
        "refused",
    )

    def __init__(self, listener: str):
        self.listener = listener
        self.connections_total = 0
        self.active = 0
        self.bytes_in = 0
        self.bytes_out = 0
        self.tls_handshakes: dict[str, int] = {}
        self.refused: dict[str, int] = {}

    def refuse(self, reason: str) -> None:
        """
        Count a connection refused at accept.

        :param reason: C{"max_connections"}, C{"max_connections_per_ip"}
            or C{"denied"} (keep to a fixed set).
        """
        self.refused[reason] = self.refused.get(reason, 0) + 1

    def tls_handshake(self, result: str) -> None:
        """
        Count a TLS handshake.

        :param result: C{"success"} or C{"failure"} (keep to a fixed set).
        """
        self.tls_handshakes[result] = self.tls_handshakes.get(result, 0) + 1


class RouteMetrics:
    """
    The requests of one C{(listener, route, cluster)}: counts by status code
    and a latency histogram.

    :ivar codes: C{{status: count}} for statuses 100 to 599.
    :ivar other: requests with any other status.
    :ivar buckets: observations per histogram bucket, not cumulative; the
        last one is +Inf.
    :ivar sum: the sum of all durations, in seconds.
    """

    __slots__ = ("listener", "route", "cluster", "codes", "other", "buckets", "sum")

    def __init__(self, listener: str, route: str, cluster: str):
        self.listener = listener
        self.route = route
        self.cluster = cluster
        self.codes: dict[int, int] = {}
        self.other = 0
        self.buckets = [0] * (len(DURATION_BUCKETS) + 1)
        self.sum = 0.0

    def observe(self, code: int, seconds: float, _bisect=bisect_left, _bounds=DURATION_BUCKETS):
        """
        Count a finished request: once per request, with the status sent
        to the client and the time from its head to its last byte.

        :param code: the status code.
        :param seconds: the duration.
        """
        try:
            self.codes[code] += 1
        except KeyError:
            self._first(code)
        # bisect_left puts a value equal to a bound in that bound's bucket,
        # as Prometheus' "le" (less than or equal) wants.
        self.buckets[_bisect(_bounds, seconds)] += 1
        self.sum += seconds

    def _first(self, code: int) -> None:
        if type(code) is int and 100 <= code <= 599:
            self.codes[code] = 1
        else:
            self.other += 1

    @property
    def count(self) -> int:
        """The number of requests observed."""
        return sum(self.buckets)


class BackendMetrics:
    """
    The counters of one backend of a cluster.

    :ivar codes: upstream responses C{{status: count}}, 100 to 599.
    :ivar other: upstream responses with any other status.
    :ivar connect_failures: failed connection attempts.
    :ivar health_checks: C{{result: count}}; see L{health_check}.
    """

    __slots__ = ("cluster", "backend", "codes", "other", "connect_failures", "health_checks")

    def __init__(self, cluster: str, backend: str):
        self.cluster = cluster
        self.backend = backend
        self.codes: dict[int, int] = {}
        self.other = 0
        self.connect_failures = 0
        self.health_checks: dict[str, int] = {}

    def observe(self, code: int) -> None:
        """Count a response the backend sent, by its status."""
        try:
            self.codes[code] += 1
        except KeyError:
            if type(code) is int and 100 <= code <= 599:
                self.codes[code] = 1
            else:
                self.other += 1

    def health_check(self, result: str) -> None:
        """
        Count an active health check.

        :param result: C{"success"} or C{"failure"} (keep to a fixed set).
        """
        self.health_checks[result] = self.health_checks.get(result, 0) + 1


class Metrics:
    """
    All of a process's metrics, and their Prometheus rendering.

    :param process: also export the C{process_*}, C{python_info} and
        C{python_gc_*} metrics of C{prometheus_client}.
    :ivar registry: the C{prometheus_client.CollectorRegistry} (not the
        global one) holding the collectors.
    :ivar config_reloads: C{{result: count}}; see L{config_reload}.
    """

    def __init__(self, process: bool = True):
        self._listeners: dict[str, ListenerMetrics] = {}
        self._routes: dict[tuple[str, str, str], RouteMetrics] = {}
        self._backends: dict[tuple[str, str], BackendMetrics] = {}
        self._rate_limited: dict[tuple[str, str], Counter] = {}
        self._websocket_messages: dict[tuple[str, str], Counter] = {}
        self._backend_sources: list = []
        self.config_reloads: dict[str, int] = {}
        #: The L{balance.observe.tracing.OTLPExporter} whose counts are
        #: exported, or L{None}.
        self.span_exporter = None
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(_Collector(self))
        if process:
            from prometheus_client import GCCollector, PlatformCollector, ProcessCollector

            ProcessCollector(registry=self.registry)
            PlatformCollector(registry=self.registry)
            GCCollector(registry=self.registry)

    # -- handles for the data path ----------------------------------------------------

    def listener(self, name: str) -> ListenerMetrics:
        """The counters of listener C{name}, created on first use."""
        m = self._listeners.get(name)
        if m is None:
            m = self._listeners[name] = ListenerMetrics(name)
        return m

    def route(self, listener: str, route: str, cluster: str | None) -> RouteMetrics:
        """
        The request counters of a route, created on first use.

        :param listener: the listener's name.
        :param route: the route's label (L{NO_ROUTE} before routing).
        :param cluster: the cluster it forwards to, or L{None} (exported as
            an empty label) for routes that answer locally.
        """
        key = (listener, route, cluster or "")
        m = self._routes.get(key)
        if m is None:
            m = self._routes[key] = RouteMetrics(*key)
        return m

    def backend(self, cluster: str, backend: str) -> BackendMetrics:
        """
        The counters of a backend, created on first use.

        :param backend: its address as configured, C{"host:port"}.
        """
        key = (cluster, backend)
        m = self._backends.get(key)
        if m is None:
            m = self._backends[key] = BackendMetrics(cluster, backend)
        return m

    def rate_limited(self, listener: str, route: str) -> Counter:
        """The counter of requests a route's rate limit refused (429)."""
        key = (listener, route)
        m = self._rate_limited.get(key)
        if m is None:
            m = self._rate_limited[key] = Counter()
        return m

    def websocket_messages(self, route: str, direction: str) -> Counter:
        """
        The counter of WebSocket messages relayed on a route in frame-aware
        mode (C{websocket_max_message_bytes}).

        :param direction: C{"upstream"} (client to backend) or
            C{"downstream"} (backend to client).
        """
        key = (route, direction)
        m = self._websocket_messages.get(key)
        if m is None:
            m = self._websocket_messages[key] = Counter()
        return m

    def config_reload(self, result: str) -> None:
        """
        Count a config reload.

        :param result: C{"success"} or C{"failure"}.
        """
        self.config_reloads[result] = self.config_reloads.get(result, 0) + 1

    def add_backend_source(self, source) -> None:
        """
        Read backend gauges from live objects at scrape time.

        :param source: a callable with no argument returning an iterable of
            C{(cluster, backend, up, active, breaker_open)}: names as
            strings, C{up} and C{breaker_open} as booleans, C{active} the
            open connections (or requests in flight).  It runs on the
            reactor at each scrape, so it must be quick.
        """
        self._backend_sources.append(source)

    def remove_backend_source(self, source) -> None:
        """Undo L{add_backend_source} (for example on reload)."""
        self._backend_sources.remove(source)

    # -- output ----------------------------------------------------------------------------

    def render(self) -> bytes:
        """The Prometheus text exposition (format 0.0.4) of everything."""
        return generate_latest(self.registry)

    def stats(self) -> dict:
        """The counters as plain data, for C{GET /stats}."""
        listeners = {}
        for m in self._listeners.values():
            listeners[m.listener] = {
                "connections_total": m.connections_total,
                "active_connections": m.active,
                "bytes_received": m.bytes_in,
                "bytes_sent": m.bytes_out,
                "requests": {},
            }
        for r in self._routes.values():
            entry = listeners.setdefault(r.listener, {"requests": {}})
            for n, label in _codes(r):
                entry["requests"][label] = entry["requests"].get(label, 0) + n
        clusters: dict[str, dict] = {}
        for b in self._backends.values():
            clusters.setdefault(b.cluster, {})[b.backend] = {
                "responses": {label: n for n, label in _codes(b)},
                "connect_failures": b.connect_failures,
            }
        return {"listeners": listeners, "clusters": clusters}


def _codes(m):
    """C{(count, code_label)} pairs of a route's or backend's codes."""
    for code, n in m.codes.items():
        yield n, str(code)
    if m.other:
        yield m.other, _OTHER


_FAMILIES = (
    ("counter", "balance_listener_connections_total", "Connections accepted.", ("listener",)),
    ("gauge", "balance_listener_active_connections", "Connections open now.", ("listener",)),
    (
        "counter",
        "balance_http_requests_total",
        "HTTP requests answered, by status code sent to the client.",
        ("listener", "route", "cluster", "code"),
    ),
    (
        "histogram",
        "balance_http_request_duration_seconds",
        "Time from a request's head to the last byte of its response.",
        ("listener", "route", "cluster"),
    ),
    (
        "counter",
        "balance_upstream_requests_total",
        "Responses received from backends, by status code.",
        ("cluster", "backend", "code"),
    ),
    (
        "counter",
        "balance_upstream_connect_failures_total",
        "Failed connection attempts to backends.",
        ("cluster", "backend"),
    ),
    (
        "gauge",
        "balance_backend_up",
        "1 when the backend is healthy, else 0.",
        ("cluster", "backend"),
    ),
    (
        "gauge",
        "balance_backend_active_connections",
        "Connections or requests in flight to the backend.",
        ("cluster", "backend"),
    ),
    ("counter", "balance_bytes_received_total", "Bytes received from clients.", ("listener",)),
    ("counter", "balance_bytes_sent_total", "Bytes sent to clients.", ("listener",)),
    (
        "counter",
        "balance_tls_handshakes_total",
        "TLS handshakes with clients, by result.",
        ("listener", "result"),
    ),
    (
        "counter",
        "balance_rate_limited_total",
        "Requests refused by a route's rate limit (429).",
        ("listener", "route"),
    ),
    (
        "gauge",
        "balance_circuit_breaker_open",
        "1 while the circuit breaker refuses work for the backend, else 0.",
        ("cluster", "backend"),
    ),
    (
        "counter",
        "balance_health_checks_total",
        "Active health checks, by result.",
        ("cluster", "backend", "result"),
    ),
    ("counter", "balance_config_reloads_total", "Config reloads, by result.", ("result",)),
    (
        "counter",
        "balance_websocket_messages_total",
        "WebSocket messages relayed on routes in frame-aware mode, by direction.",
        ("route", "direction"),
    ),
    (
        "counter",
        "balance_listener_refused_connections_total",
        "Connections closed as soon as accepted, by reason.",
        ("listener", "reason"),
    ),
    (
        "counter",
        "balance_tracing_spans_total",
        "Sampled spans, by fate: exported, dropped (queue full), failed (export error).",
        ("result",),
    ),
)

_KINDS = {
    "counter": CounterMetricFamily,
    "gauge": GaugeMetricFamily,
    "histogram": HistogramMetricFamily,
}


class _Collector:
    """The C{prometheus_client} collector over a L{Metrics}."""

    def __init__(self, metrics: Metrics):
        self._metrics = metrics

    def describe(self):
        """The families, without samples (for the registry's name checks)."""
        return [_KINDS[kind](name, doc, labels=labels) for kind, name, doc, labels in _FAMILIES]

    def collect(self):
        m = self._metrics
        families = self.describe()
        (
            connections,
            active,
            requests,
            duration,
            upstream,
            connect_failures,
            up,
            backend_active,
            received,
            sent,
            tls,
            rate_limited,
            breaker,
            health,
            reloads,
            ws_messages,
            refused,
            spans,
        ) = families

        for lm in m._listeners.values():
            labels = (lm.listener,)
            connections.add_metric(labels, lm.connections_total)
            active.add_metric(labels, lm.active)
            received.add_metric(labels, lm.bytes_in)
            sent.add_metric(labels, lm.bytes_out)
            for result, n in lm.tls_handshakes.items():
                tls.add_metric((lm.listener, result), n)
            for reason, n in lm.refused.items():
                refused.add_metric((lm.listener, reason), n)

        for rm in m._routes.values():
            labels = (rm.listener, rm.route, rm.cluster)
            for n, code in _codes(rm):
                requests.add_metric((*labels, code), n)
            cumulative = 0
            buckets = []
            for le, n in zip(_LE, rm.buckets, strict=True):
                cumulative += n
                buckets.append((le, cumulative))
            duration.add_metric(labels, buckets, rm.sum)

        for bm in m._backends.values():
            labels = (bm.cluster, bm.backend)
            for n, code in _codes(bm):
                upstream.add_metric((*labels, code), n)
            connect_failures.add_metric(labels, bm.connect_failures)
            for result, n in bm.health_checks.items():
                health.add_metric((*labels, result), n)

        for source in m._backend_sources:
            for cluster, backend, is_up, in_flight, is_open in source():
                labels = (cluster, backend)
                up.add_metric(labels, 1 if is_up else 0)
                backend_active.add_metric(labels, in_flight)
                breaker.add_metric(labels, 1 if is_open else 0)

        for (listener, route), counter in m._rate_limited.items():
            rate_limited.add_metric((listener, route), counter.value)

        for result, n in m.config_reloads.items():
            reloads.add_metric((result,), n)

        for (route, direction), counter in m._websocket_messages.items():
            ws_messages.add_metric((route, direction), counter.value)

        exporter = m.span_exporter
        if exporter is not None:
            spans.add_metric(("exported",), exporter.exported)
            spans.add_metric(("dropped",), exporter.dropped)
            spans.add_metric(("failed",), exporter.failed)

        return families
