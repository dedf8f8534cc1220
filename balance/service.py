"""
Build the running service tree from a validated config.
"""

from __future__ import annotations

import gc

from twisted.application.service import MultiService
from twisted.internet import defer
from twisted.logger import Logger

from balance.cluster.cluster import Cluster
from balance.config import model
from balance.http.pool import PoolSet
from balance.http.server import HTTPContext, HTTPFactory
from balance.l4.relay import L4ProxyFactory
from balance.listener import ListenerService
from balance.observe.accesslog import AccessLog
from balance.observe.metrics import Metrics
from balance.ratelimit import build_store
from balance.sdnotify import notify
from balance.tls.server import ServerTLS
from balance.tls.transport import wrap as wrap_tls
from balance.whoami import WhoamiFactory


class BalanceService(MultiService):
    """
    The root service of a running Balance.

    Stopping it first drains the listeners (they stop accepting and wait for
    in-flight work), and only then stops the rest, so that the built-in
    upstreams outlive the connections still using them.

    @ivar clusters: The runtime clusters by name, shared by all listeners.
    @ivar listeners: The listener services by listener name.
    @ivar tls: The L{ServerTLS} of each listener with C{tls}, by listener
        name; C{reload()} re-reads their certificate files.
    """

    log = Logger()

    def __init__(self, config: model.Config, reactor):
        super().__init__()
        self.config = config
        self.clusters: dict[str, Cluster] = {}
        self.pools = PoolSet(reactor)
        self.access_logs: list[AccessLog] = []
        self.metrics = Metrics()
        self.metrics.add_backend_source(self._backend_states)
        self.rate_limit_store = build_store(config.rate_limit_store, reactor)
        self.tls: dict[str, ServerTLS] = {}
        self.listeners = MultiService()
        self.upstreams = MultiService()
        self.upstreams.setServiceParent(self)
        self.listeners.setServiceParent(self)

    def _backend_states(self):
        """Live backend gauges for the metrics: (cluster, backend, up, active, breaker open)."""
        for cluster in self.clusters.values():
            for backend in cluster.backends:
                yield (cluster.name, backend.address, backend.healthy, backend.active, False)

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
        # Listeners bind synchronously in startService: we are serving.
        notify("READY=1")

    @defer.inlineCallbacks
    def stopService(self):
        self.log.info("Balance stopping: draining listeners")
        notify("STOPPING=1")
        if self.listeners.running:
            yield self.listeners.stopService()
        self.pools.close_idle()
        for access_log in self.access_logs:
            access_log.close()
        if self.upstreams.running:
            yield self.upstreams.stopService()
        super(MultiService, self).stopService()
        self.log.info("Balance stopped")


def build(config: model.Config, reactor) -> BalanceService:
    """
    Make the service tree for C{config}: one child per listener and per
    built-in whoami upstream, and the clusters and pools they share.
    """
    root = BalanceService(config, reactor)
    if hasattr(root.rate_limit_store, "setServiceParent"):
        # Redis: connect before the listeners accept.
        root.rate_limit_store.setServiceParent(root.upstreams)
    for c in config.clusters:
        root.clusters[c.name] = Cluster(c, reactor)
    for w in config.whoami:
        svc = ListenerService(w.listen, WhoamiFactory(w.name, reactor), reactor, 0)
        svc.setName(f"whoami:{w.name}")
        svc.setServiceParent(root.upstreams)
    for listener in config.listeners:
        if listener.protocol == "http":
            access_log = None
            if listener.access_log is not None:
                access_log = AccessLog(
                    listener.access_log.path, listener.access_log.format, reactor
                )
                root.access_logs.append(access_log)
            context = HTTPContext(
                listener,
                root.clusters,
                root.pools,
                reactor,
                access_log,
                metrics=root.metrics,
                rate_limit_store=root.rate_limit_store,
            )
            factory = HTTPFactory(context)
        else:
            factory = L4ProxyFactory(listener, root.clusters, reactor)
        if listener.tls is not None:
            # Beside its listener, before it: the listener stops (and drains)
            # first, then the TLS timers.
            tls = root.tls[listener.name] = ServerTLS(listener, reactor)
            tls.setServiceParent(root.listeners)
            factory = wrap_tls(tls, factory, reactor)
        svc = ListenerService(listener.listen, factory, reactor, config.drain_timeout)
        svc.setName(listener.name)
        svc.setServiceParent(root.listeners)
    return root
