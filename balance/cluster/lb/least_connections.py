# -*- test-case-name: tests.cluster.test_policies -*-
"""
Least connections (least outstanding requests, for HTTP), weight-aware.
"""

from __future__ import annotations

from zope.interface import implementer

from balance.cluster.lb._weights import RandomizedPolicy, Weights
from balance.interfaces import ILoadBalancer


def least_loaded(backends, weights: Weights, exclude, now, rng):
    """
    The eligible backend not in ``exclude`` with the least
    ``active / weight``, ties broken at random in proportion to weight (so
    an idle cluster is shared by weight, like nginx's ``least_conn``).

    :param now: The time when slow start is ramping (weights are then
        ramped), else ``None``.
    :return: A backend, or ``None`` when none is eligible.
    """
    best = float("inf")
    ties: list = []
    tie_weights: list = []
    for backend, weight in zip(backends, weights.static, strict=True):
        if not backend.eligible or backend in exclude:
            continue
        if now is not None:
            weight = weight * weights.factor(backend, now)
        load = backend.active / weight
        if load < best:
            best = load
            ties = [backend]
            tie_weights = [weight]
        elif load == best:
            ties.append(backend)
            tie_weights.append(weight)
    if len(ties) <= 1:
        return ties[0] if ties else None
    if now is None and weights.uniform:
        return ties[rng.randrange(len(ties))]
    point = rng.random() * sum(tie_weights)
    for backend, weight in zip(ties, tie_weights, strict=True):
        point -= weight
        if point < 0:
            return backend
    return ties[-1]


@implementer(ILoadBalancer)
class LeastConnections(RandomizedPolicy):
    """
    The eligible backend with the fewest connections (tcp) or requests
    (http) in flight relative to its weight: ``active / weight``.

    One pass over the backends per pick.  Under load the in-flight counts
    settle in proportion to the weights; when several backends tie (an
    idle cluster) one of them is drawn at random, in proportion to weight,
    from the injected ``rng``.  Slow start divides by the ramped weight.
    """

    __slots__ = ()
    name = "least_connections"

    def pick(self, key=None, exclude=()):
        """
        Return the least loaded eligible backend not in ``exclude``, or
        ``None``.

        :param key: Ignored.
        """
        weights = self._weights
        return least_loaded(self._backends, weights, exclude, weights.ramp_now(), self._rng)

    def started(self, backend) -> None:
        """The load is ``backend.active``, which the cluster keeps."""

    def finished(self, backend) -> None:
        """The load is ``backend.active``, which the cluster keeps."""

    def observe(self, backend, latency) -> None:
        """Least connections does not weigh latency."""
