"""
Build the running service tree from a validated config.
"""

from __future__ import annotations

import gc

from twisted.application.service import MultiService
from twisted.internet import defer
from twisted.logger import Logger
from zope.interface import implementer

from balance.admin import AdminService, IAdminTarget
from balance.builder import Builder
from balance.cluster.breaker import BreakerState
from balance.cluster.cluster import Cluster
from balance.config import model
from balance.http.pool import PoolSet
from balance.listener import ListenerService
from balance.observe.accesslog import AccessLog
from balance.observe.metrics import Metrics
from balance.observe.tracing import OTLPExporter, Tracer
from balance.ratelimit import build_store
from balance.reload import Reloader
from balance.sdnotify import notify
from balance.tls.server import ServerTLS
from balance.whoami import WhoamiFactory


@implementer(IAdminTarget)
class BalanceService(MultiService):
    """
    The root service of a running Balance.

    Stopping it first drains the listeners (they stop accepting and wait for
    in-flight work), and only then stops the rest, so that the built-in
    upstreams outlive the connections still using them.

    @ivar clusters: The runtime clusters by name, shared by all listeners.
    @ivar cluster_services: The L{ClusterService} of each cluster (health
        checks, DNS), started before the listeners and stopped after they
        drained.
    @ivar listeners: The listener services by listener name.
    @ivar tls: The L{ServerTLS} of each listener with C{tls}, by listener
        name; C{reload()} re-reads their certificate files.
    @ivar ready: listeners are bound and the config loaded (C{/ready}).
    @ivar draining: a stop has begun (C{/ready} answers 503).
    @ivar reload: the reloader the admin API calls, or L{None}.
    @ivar admin: the L{AdminService}, when the config has C{admin}.
    """

    log = Logger()

    def __init__(self, config: model.Config, reactor):
        super().__init__()
        self._reactor = reactor
        self.config = config
        self.clusters: dict[str, Cluster] = {}
        self.pools = PoolSet(reactor)
        self.access_logs: list[AccessLog] = []
        self.metrics = Metrics()
        self.metrics.add_backend_source(self._backend_states)
        self.rate_limit_store = build_store(config.rate_limit_store, reactor)
        self.tracer, self.span_exporter = build_tracer(config.tracing, reactor)
        self.metrics.span_exporter = self.span_exporter
        self.tls: dict[str, ServerTLS] = {}
        self.ready = False
        self.draining = False
        self.reload = None
        self.admin = None
        # A worker process (balance.worker): the listening sockets its
        # parent bound, {listener name: (fd, address family)}, adopted once
        # each; listeners cannot bind or move (a reload says "restart").
        self.adopted: dict[str, tuple[int, int]] = {}
        self.fixed_sockets = False
        self.listeners = MultiService()
        self.upstreams = MultiService()
        self.cluster_services = MultiService()
        self.upstreams.setServiceParent(self)
        self.cluster_services.setServiceParent(self)
        self.listeners.setServiceParent(self)

    def _backend_states(self):
        """Live backend gauges for the metrics: (cluster, backend, up, active, breaker open)."""
        for cluster in self.clusters.values():
            for backend in cluster.backends:
                breaker = backend.breaker
                yield (
                    cluster.name,
                    backend.address,
                    backend.healthy,
                    backend.active,
                    breaker is not None and breaker.state is not BreakerState.CLOSED,
                )

    def _health_checked(self, cluster: str):
        """The C{on_check} hook of C{cluster}'s health checker: count each probe."""
        metrics = self.metrics

        def checked(backend, ok: bool, reason) -> None:
            metrics.backend(cluster, backend.address).health_check("success" if ok else "failure")

        return checked

    def reopen_logs(self) -> None:
        """Reopen the access log files (SIGUSR1, after logrotate renamed them)."""
        for access_log in self.access_logs:
            access_log.reopen()
        self.log.info("access logs reopened")

    def startService(self):
        # Everything built so far (modules, config, clusters) lives as long
        # as the process: move it out of the cyclic collector's sight, so
        # that full collections, which would otherwise walk all of it, stay
        # short and do not show up as latency spikes.
        gc.collect()
        gc.freeze()
        self.log.info(
            "Balance starting with {config} ({listeners} listeners, {clusters} clusters)",
            config=self.config.path,
            listeners=len(self.config.listeners),
            clusters=len(self.config.clusters),
        )
        super().startService()
        if self.span_exporter is not None:
            self.span_exporter.start()
        # Listeners bind synchronously in startService, but twistd calls it
        # before the reactor runs: say READY once it does, after the signal
        # handlers (installed from an earlier callWhenRunning) are in place.
        self._reactor.callWhenRunning(self._serving)

    def _serving(self) -> None:
        self.ready = True
        notify("READY=1")

    @defer.inlineCallbacks
    def stopService(self):
        self.log.info("Balance stopping: draining listeners")
        self.draining = True
        notify("STOPPING=1")
        if self.listeners.running:
            yield self.listeners.stopService()
        if self.cluster_services.running:
            # Health probes and DNS stop once no request needs them, and
            # before the built-in upstreams they may be probing.
            yield self.cluster_services.stopService()
        self.pools.close_idle()
        for access_log in self.access_logs:
            access_log.close()
        if self.span_exporter is not None:
            # The spans of the drained requests, within a bound: a collector
            # that does not answer must not hold the exit up.
            yield (
                self.span_exporter.stop()
                .addTimeout(5, self._reactor)
                .addErrback(lambda f: self.log.warn("spans not exported at stop: {e}", e=f.value))
            )
        if self.upstreams.running:
            yield self.upstreams.stopService()
        if self.admin is not None and self.admin.running:
            # Last: /ready and /metrics answer through the whole drain.
            yield self.admin.stopService()
        super(MultiService, self).stopService()
        self.log.info("Balance stopped")


def build_tracer(config: model.Tracing | None, reactor):
    """
    The tracer and the span exporter of a C{tracing} section.

    :return: C{(tracer, exporter)}; C{(None, None)} when tracing is off;
        the exporter is L{None} without C{otlp_endpoint} (trace context is
        propagated, spans are not kept).
    """
    if config is None:
        return None, None
    exporter = None
    if config.otlp_endpoint is not None:
        exporter = OTLPExporter(config.otlp_endpoint, config.service_name, reactor)
    return Tracer(config.sample_ratio, exporter), exporter


def build(config: model.Config, reactor, worker=None) -> BalanceService:
    """
    Make the service tree for C{config}: one child per listener and per
    built-in whoami upstream, and the clusters and pools they share.

    :param worker: in a worker process, its L{balance.worker.WorkerSetup}:
        listeners adopt the parent's sockets, the admin API listens on the
        parent's private socket, and the parent runs the whoami upstreams.
    """
    root = BalanceService(config, reactor)
    builder = Builder(reactor)
    root.reload = Reloader(root, reactor, builder).reload
    admin = config.admin
    if worker is not None:
        root.adopted = dict(worker.sockets)
        root.fixed_sockets = True
        admin = model.Admin(listen=worker.admin_listen, token_file=None)
        if worker.rate_limit_fd is not None and config.rate_limit_store is None:
            # Local limits are the group's: one table shared by the workers.
            from balance.ratelimit.shared import SharedRateLimitStore

            root.rate_limit_store = SharedRateLimitStore(reactor, worker.rate_limit_fd)
    if admin is not None:
        root.admin = AdminService(admin, root, reactor)
        root.admin.setServiceParent(root)
    if hasattr(root.rate_limit_store, "setServiceParent"):
        # Redis: connect before the listeners accept.
        root.rate_limit_store.setServiceParent(root.upstreams)
    for c in config.clusters:
        root.clusters[c.name] = builder.cluster(root, c)
    for w in config.whoami if worker is None else ():
        svc = ListenerService(w.listen, WhoamiFactory(w.name, reactor), reactor, 0)
        svc.setName(f"whoami:{w.name}")
        svc.setServiceParent(root.upstreams)
    for listener in config.listeners:
        builder.listener(root, listener)
    return root
