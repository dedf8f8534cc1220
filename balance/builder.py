"""
Making the parts of a running Balance from config: clusters, listeners and
their factories, used both at start (L{balance.service.build}) and by the
reloader, which also swaps and retires them.
"""

from __future__ import annotations

from twisted.internet import defer
from twisted.internet.endpoints import AdoptedStreamServerEndpoint
from twisted.logger import Logger

from balance.cluster.cluster import Cluster
from balance.cluster.service import ClusterService
from balance.config import model
from balance.http.server import HTTPContext, HTTPFactory
from balance.http.sniff import HTTPProtocols
from balance.l4.relay import L4ProxyFactory
from balance.listener import ListenerService
from balance.observe.accesslog import AccessLog
from balance.proxyproto import ProxyHeaderFactory
from balance.tls.server import ServerTLS
from balance.tls.transport import wrap as wrap_tls

_log = Logger()


def _inner(factory):
    """The listener's own factory, under its PROXY and TLS wrappers if it has them."""
    while hasattr(factory, "wrappedFactory"):
        factory = factory.wrappedFactory
    return factory


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
        metrics = root.metrics

        def connect_failed(backend) -> None:
            metrics.backend(config.name, backend.address).connect_failures += 1

        cluster.on_connect_failure = connect_failed
        service = ClusterService(cluster, self._reactor, on_check=root._health_checked(config.name))
        service.setServiceParent(root.cluster_services)
        return cluster

    def retire_cluster(self, root, cluster: Cluster) -> None:
        """Stop the health checks and DNS of a cluster no longer in the config."""
        for service in list(root.cluster_services):
            if getattr(service, "cluster", None) is cluster:
                service.disownServiceParent()

    # -- listeners -------------------------------------------------------------

    def access_log(self, root, listener: model.Listener, previous=None, previous_config=None):
        """
        The access log of C{listener}: C{previous} when its settings did
        not change, else a new one (or L{None} when it has none).
        """
        if listener.access_log is None:
            return None
        if previous is not None and previous_config == listener.access_log:
            return previous
        access_log = AccessLog(listener.access_log.path, listener.access_log.format, self._reactor)
        root.access_logs.append(access_log)
        return access_log

    def context(self, root, listener: model.Listener, previous: HTTPContext | None = None):
        """The L{HTTPContext} of an http listener."""
        access_log = self.access_log(
            root,
            listener,
            previous.access_log if previous is not None else None,
            previous.listener.access_log if previous is not None else None,
        )
        return HTTPContext(
            listener,
            root.clusters,
            root.pools,
            self._reactor,
            access_log,
            metrics=root.metrics,
            rate_limit_store=root.rate_limit_store,
            tracer=root.tracer,
        )

    def listener(
        self, root, listener: model.Listener, start: bool = False
    ) -> ListenerService | None:
        """
        Make the service of C{listener} (binding when started).

        :param start: start it now (a listener added by a reload).
        :return: the service, or L{None} in a worker that has no socket
            for it from its parent (it serves after a restart).
        """
        reactor = self._reactor
        endpoint = None
        if root.fixed_sockets:
            adopted = root.adopted.pop(listener.name, None)
            if adopted is None:
                _log.warn(
                    "listener {name}: no socket from the workers' parent; "
                    "it will listen after a restart",
                    name=listener.name,
                )
                return None
            endpoint = AdoptedStreamServerEndpoint(reactor, *adopted)
        if listener.protocol == "http":
            factory = HTTPFactory(self.context(root, listener))
        else:
            factory = L4ProxyFactory(
                listener,
                root.clusters,
                reactor,
                metrics=root.metrics.listener(listener.name),
                access_log=self.access_log(root, listener),
            )
        tls = None
        if listener.tls is not None:
            # Beside its listener, before it: the listener stops (and drains)
            # first, then the TLS timers.
            tls = root.tls[listener.name] = ServerTLS(
                listener, reactor, http2=listener.protocol == "http"
            )
            # Its handshake counts are balance_tls_handshakes_total.
            handshakes = root.metrics.listener(listener.name).tls_handshakes
            for result, n in tls.handshakes.items():
                handshakes[result] = handshakes.get(result, 0) + n
            tls.handshakes = handshakes
            tls.setServiceParent(root.listeners)
            factory = wrap_tls(tls, factory, reactor)
        if listener.proxy_protocol:
            # Outermost: the header comes before a TLS ClientHello.
            factory = ProxyHeaderFactory(factory, reactor, listener.timeouts.handshake)
        svc = ListenerService(
            listener.listen,
            factory,
            reactor,
            root.config.drain_timeout,
            endpoint=endpoint,
            nodelay=listener.tls is not None,
        )
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
            new.per_ip = old.per_ip
            new._drained = old._drained
            new.draining = old.draining
            # The connections' deadlines stay in the lists they are in.
            new.timers = old.timers
            for conn in old.connections:
                conn.ctx = new
            factory.context = new
            factory.protocols = HTTPProtocols(new)
            factory.max_connections = listener.limits.max_connections
            if old.access_log is not None and old.access_log is not new.access_log:
                old.access_log.close()
                root.access_logs.remove(old.access_log)
        else:
            old_log = factory.access_log
            factory.access_log = self.access_log(
                root, listener, old_log, factory.listener.access_log
            )
            factory.reconfigure(listener)
            if old_log is not None and old_log is not factory.access_log:
                old_log.close()
                root.access_logs.remove(old_log)
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
