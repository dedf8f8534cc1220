# -*- test-case-name: tests.cluster.test_service -*-
"""
The service of one running cluster: what it does on its own, on timers,
while Balance runs (re-resolving backend host names, active health
checks), started before the listeners and stopped after they drained.
"""

from __future__ import annotations

from collections.abc import Callable

from twisted.application.service import MultiService
from twisted.internet.defer import Deferred
from twisted.logger import Logger

from balance.cluster.cluster import Cluster
from balance.cluster.health import HealthChecker


class ClusterService(MultiService):
    """
    Runs a L{Cluster}: its health checker (a child service, when the
    cluster has C{health_check:}) and its DNS re-resolution.  Stopping it
    stops the probes (waiting for those in flight to close), the
    resolver, and the timers of ejections and open breakers.

    :ivar cluster: the cluster.
    :ivar health: its L{HealthChecker}, or L{None}.
    """

    log = Logger()

    def __init__(
        self,
        cluster: Cluster,
        reactor,
        on_check: Callable[[object, bool, str | None], object] | None = None,
        random=None,
    ):
        """
        :param cluster: the cluster to run.
        :param reactor: schedules the probes (L{IReactorTime}).
        :param on_check: called as C{on_check(backend, ok, reason)} after
            every health probe (metrics).
        :param random: the health checks' source of jitter (tests).
        """
        super().__init__()
        self.setName(f"cluster:{cluster.name}")
        self.cluster = cluster
        self.health = None
        check = cluster.model.health_check
        if check is not None:
            self.health = HealthChecker(
                cluster.name,
                cluster.backends,
                check,
                reactor,
                random=random,
                on_check=on_check,
                upstream_protocol=cluster.model.upstream_protocol,
                scheme="https" if cluster.model.tls is not None else "http",
            )
            cluster.attach_health(self.health)
            self.health.setServiceParent(self)

    def startService(self) -> None:
        super().startService()
        (
            self.cluster.start().addErrback(
                lambda f: self.log.failure(
                    "resolving the backends of cluster {cluster} failed",
                    f,
                    cluster=self.cluster.name,
                )
            )
        )

    def stopService(self) -> Deferred:
        d = super().stopService()
        self.cluster.stop()
        return d


__all__ = ["ClusterService"]
