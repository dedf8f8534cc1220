"""
Making the parts of a running Balance from config: clusters, listeners and
their factories, used both at start (L{balance.service.build}) and by the
reloader, which also swaps and retires them.
"""

from __future__ import annotations

from twisted.internet import defer
from twisted.logger import Logger

from balance.cluster.cluster import Cluster
from balance.cluster.service import ClusterService
from balance.config import model
from balance.http.server import HTTPContext, HTTPFactory
from balance.http.sniff import HTTPProtocols
from balance.l4.relay import L4ProxyFactory
from balance.listener import ListenerService
from balance.observe.accesslog import AccessLog
from balance.tls.server import ServerTLS
from balance.tls.transport import wrap as wrap_tls

_log = Logger()


def _inner(factory):
    """The listener's own factory, under a TLS wrapper if there is one."""
    return getattr(factory, "wrappedFactory", factory)


class Builder:
    """
    Builds the parts of the service tree of a L{balance.service.BalanceService}.

    :param reactor: the reactor everything runs on.
    """

    def __init__(self, reactor):
        self._reactor = reactor

    # -- clusters ----------------------------------------------------------------

    def cluster(self, root, config: model.Cluster, previous: Cluster | None = None) -> Cluster:
        """
        Make the runtime cluster of C{config} with its health checks and
        DNS service (started if C{root} runs).  Backends that C{previous}
        had too keep their health and drain state (an ejection belongs to
        the old cluster's outlier detector, which has the timer that ends
        it, so it does not carry over).
        """
        cluster = Cluster(config, self._reactor)
        if previous is not None:
            for backend in cluster.backends:
                try:
                    old = previous.backend(backend.address)
                except KeyError:
                    continue
                backend.drained = old.drained
                backend.healthy = old.healthy
        root.pools.watch(cluster)
        service = ClusterService(cluster, self._reactor, on_check=root._health_checked(config.name))
        service.setServiceParent(root.cluster_services)
        return cluster

    def retire_cluster(self, root, cluster: Cluster) -> None:
        """Stop the health checks and DNS of a cluster no longer in the config."""
        for service in list(root.cluster_services):
            if getattr(service, "cluster", None) is cluster:
                service.disownServiceParent()

    # -- listeners -------------------------------------------------------------

    def context(self, root, listener: model.Listener, previous: HTTPContext | None = None):
        """The L{HTTPContext} of an http listener."""
        access_log = None
        if listener.access_log is not None:
            if (
                previous is not None
                and previous.access_log is not None
                and previous.listener.access_log == listener.access_log
            ):
                access_log = previous.access_log
            else:
                access_log = AccessLog(
                    listener.access_log.path, listener.access_log.format, self._reactor
                )
                root.access_logs.append(access_log)
        return HTTPContext(
            listener,
            root.clusters,
            root.pools,
            self._reactor,
            access_log,
            metrics=root.metrics,
            rate_limit_store=root.rate_limit_store,
        )

    def listener(self, root, listener: model.Listener, start: bool = False) -> ListenerService:
        """
        Make the service of C{listener} (binding when started).

        :param start: start it now (a listener added by a reload).
        """
        reactor = self._reactor
        if listener.protocol == "http":
            factory = HTTPFactory(self.context(root, listener))
        else:
            factory = L4ProxyFactory(listener, root.clusters, reactor, metrics=root.metrics)
        tls = None
        if listener.tls is not None:
            # Beside its listener, before it: the listener stops (and drains)
            # first, then the TLS timers.
            tls = root.tls[listener.name] = ServerTLS(
                listener, reactor, http2=listener.protocol == "http"
            )
            tls.setServiceParent(root.listeners)
            factory = wrap_tls(tls, factory, reactor)
        svc = ListenerService(listener.listen, factory, reactor, root.config.drain_timeout)
        svc.setName(listener.name)
        svc.setServiceParent(root.listeners)
        return svc

    def swap_listener(self, root, svc: ListenerService, listener: model.Listener) -> None:
        """
        Give a listener that keeps its socket the settings of C{listener}:
        its open connections take the new routes for their next request;
        requests in flight finish on the objects they started with.
        """
        factory = _inner(svc.factory)
        if isinstance(factory, HTTPFactory):
            old = factory.context
            new = self.context(root, listener, previous=old)
            new.connections = old.connections
            new._drained = old._drained
            new.draining = old.draining
            for conn in old.connections:
                conn.ctx = new
            factory.context = new
            factory.protocols = HTTPProtocols(new)
            factory.max_connections = listener.limits.max_connections
            if old.access_log is not None and old.access_log is not new.access_log:
                old.access_log.close()
                root.access_logs.remove(old.access_log)
        else:
            factory.reconfigure(listener)
        tls = root.tls.get(listener.name)
        if tls is not None and listener.tls is not None:
            tls.reload(listener.tls)

    def retire_listener(self, root, svc: ListenerService) -> None:
        """Stop accepting on a listener the new config dropped, and drain it."""
        name = svc.name
        # Removing a running child stops it: stopService drains.
        d = defer.maybeDeferred(svc.disownServiceParent)
        tls = root.tls.pop(name, None)
        if tls is not None:
            d.addBoth(lambda _: tls.disownServiceParent())
        d.addErrback(lambda f: _log.failure("retiring listener {name}", f, name=name))
