# -*- test-case-name: tests.cluster.test_outlier -*-
"""
The panic threshold (C{panic_threshold:}): when too few of a cluster's
backends look healthy, trust the health signals less than the traffic.

When health checks or outlier detection take out most of a cluster, the
few backends left would get all of its traffic and likely fall over too;
and a health check that fails everywhere at once is as likely to be wrong
(a broken health endpoint, a network blip on the checker's path) as the
backends are to be dead.  So, as in Envoy, below C{panic_threshold}% of
healthy backends the picker balances over every backend that is not
drained, healthy or not, ejected or not.  Drained backends stay out:
draining is an operator's decision, not a signal.

C{panic_threshold: 0%} turns panic mode off.
"""

from __future__ import annotations

from twisted.logger import Logger


def in_panic(healthy: int, total: int, threshold_percent: float) -> bool:
    """
    Whether a cluster with C{healthy} of C{total} usable backends is in
    panic.

    :param healthy: backends neither unhealthy, ejected, open-circuited nor
        drained.
    :param total: backends not drained.  A cluster with none is not in
        panic (there is nothing to balance over).
    :param threshold_percent: the cluster's C{panic_threshold}, 0 to 100.
    """
    return total > 0 and healthy * 100 < threshold_percent * total


def count(backends) -> tuple[int, int]:
    """
    Count C{(healthy, total)} for L{in_panic} over runtime backends.

    A backend counts in C{total} unless drained, and in C{healthy} if it is
    also healthy and not ejected.  (C{ejected} is read with a default, for
    backends built before outlier detection existed.)
    """
    healthy = total = 0
    for backend in backends:
        if backend.drained:
            continue
        total += 1
        if backend.healthy and not getattr(backend, "ejected", False):
            healthy += 1
    return healthy, total


class PanicMonitor:
    """
    Tracks whether one cluster is in panic and logs entering and leaving
    it, once each.

    Call L{update} when a backend's health, ejection or drain changes (the
    health checker's and outlier detector's C{on_change} hooks), not per
    request; pickers read L{active}.

    :ivar active: whether the cluster is in panic now.
    """

    log = Logger()

    def __init__(self, cluster_name: str, threshold_percent: float):
        """
        :param cluster_name: for the log.
        :param threshold_percent: the cluster's C{panic_threshold}.
        """
        self.cluster_name = cluster_name
        self.threshold_percent = threshold_percent
        self.active = False

    def update(self, healthy: int, total: int) -> bool:
        """
        Recompute the state from fresh counts (see L{count}).

        :return: whether the cluster is in panic now.
        """
        panic = in_panic(healthy, total, self.threshold_percent)
        if panic != self.active:
            self.active = panic
            if panic:
                self.log.warn(
                    "cluster {cluster} is in PANIC: {healthy} of {total} backends healthy, "
                    "below {threshold:g}%; balancing over all of them",
                    cluster=self.cluster_name,
                    healthy=healthy,
                    total=total,
                    threshold=self.threshold_percent,
                    panic=True,
                )
            else:
                self.log.info(
                    "cluster {cluster} left panic: {healthy} of {total} backends healthy",
                    cluster=self.cluster_name,
                    healthy=healthy,
                    total=total,
                    threshold=self.threshold_percent,
                    panic=False,
                )
        return panic


__all__ = ["PanicMonitor", "count", "in_panic"]
