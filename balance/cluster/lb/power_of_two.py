# -*- test-case-name: tests.cluster.test_policies -*-
"""
The power of two random choices: draw two backends, take the less loaded.
"""

from __future__ import annotations

from zope.interface import implementer

from balance.cluster.lb._weights import RandomizedPolicy, Weights
from balance.cluster.lb.weighted_random import draw
from balance.interfaces import ILoadBalancer


def two_choices(backends, weights: Weights, exclude, now, rng):
    """
    Draw two distinct eligible backends not in ``exclude``, in proportion
    to their (ramped) weights, without replacement.

    :return: ``(first, second)``; ``second`` is ``None`` when only one
        backend qualifies, both are ``None`` when none does.
    """
    first = draw(backends, weights, exclude, now, rng)
    if first < 0:
        return None, None
    second = draw(backends, weights, exclude, now, rng, first)
    return backends[first], (backends[second] if second >= 0 else None)


@implementer(ILoadBalancer)
class PowerOfTwo(RandomizedPolicy):
    """
    Two distinct backends drawn at random (in proportion to weight, from
    the injected ``rng``); the one with the lower ``active / weight`` wins,
    the first drawn on a tie.

    Constant work per pick, and, unlike a single random choice, the most
    loaded backend stays within a small constant of the average
    (Mitzenmacher's "power of two choices"), without the herd behaviour of
    least-connections when several balancers share stale counts.
    """

    __slots__ = ()
    name = "power_of_two"

    def pick(self, key=None, exclude=()):
        """
        Return the less loaded of two random eligible backends not in
        ``exclude``, or ``None``.

        :param key: Ignored.
        """
        weights = self._weights
        now = weights.ramp_now()
        first, second = two_choices(self._backends, weights, exclude, now, self._rng)
        if second is None:
            return first
        if now is None:
            if second.active * first.weight < first.active * second.weight:
                return second
            return first
        first_load = first.active / (first.weight * weights.factor(first, now))
        second_load = second.active / (second.weight * weights.factor(second, now))
        return second if second_load < first_load else first

    def started(self, backend) -> None:
        """The load is ``backend.active``, which the cluster keeps."""

    def finished(self, backend) -> None:
        """The load is ``backend.active``, which the cluster keeps."""

    def observe(self, backend, latency) -> None:
        """Power of two choices does not weigh latency."""
