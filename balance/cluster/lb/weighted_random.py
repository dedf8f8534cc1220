# -*- test-case-name: tests.cluster.test_policies -*-
"""
Random choice in proportion to weight.
"""

from __future__ import annotations

from zope.interface import implementer

from balance.cluster.lb._weights import RandomizedPolicy, Weights
from balance.interfaces import ILoadBalancer

#: Draws before giving up on luck and drawing from the eligible backends
#: only (one pass over all of them).
_DRAWS = 4


def draw(backends, weights: Weights, exclude, now, rng, avoid: int = -1) -> int:
    """
    Draw the index of an eligible backend not in ``exclude`` (nor at
    ``avoid``) with probability in proportion to its (ramped) weight.

    Rejection sampling: draw by static weight in O(log n), and accept an
    eligible, not excluded backend with probability equal to its slow-start
    factor.  After a few rejections, draw exactly from the acceptable
    backends in one pass.  Both ways give the same distribution.

    :param now: The time while slow start is ramping, else ``None``.
    :param avoid: An index not to draw (the first of two choices), or -1.
    :return: An index into ``backends``, or -1 when no backend qualifies.
    """
    count = len(backends)
    if count == 0 or (avoid >= 0 and count == 1):
        return -1
    for _ in range(_DRAWS):
        index = weights.sample(rng) if avoid < 0 else weights.sample_other(rng, avoid)
        backend = backends[index]
        if backend.eligible and backend not in exclude:
            if now is None:
                return index
            factor = weights.factor(backend, now)
            if factor >= 1.0 or rng.random() < factor:
                return index
    candidates = []
    candidate_weights = []
    for index, weight in enumerate(weights.static):
        backend = backends[index]
        if index != avoid and backend.eligible and backend not in exclude:
            candidates.append(index)
            candidate_weights.append(
                weight if now is None else weight * weights.factor(backend, now)
            )
    if not candidates:
        return -1
    point = rng.random() * sum(candidate_weights)
    for index, weight in zip(candidates, candidate_weights, strict=True):
        point -= weight
        if point < 0:
            return index
    return candidates[-1]


@implementer(ILoadBalancer)
class WeightedRandom(RandomizedPolicy):
    """
    A backend drawn at random from the injected ``rng``, each with
    probability in proportion to its weight (ramped by slow start), among
    the eligible ones not excluded.  O(log n) per pick while most backends
    are eligible.
    """

    __slots__ = ()
    name = "random"

    def pick(self, key=None, exclude=()):
        """
        Return a random eligible backend not in ``exclude``, or ``None``.

        :param key: Ignored.
        """
        weights = self._weights
        index = draw(self._backends, weights, exclude, weights.ramp_now(), self._rng)
        return self._backends[index] if index >= 0 else None

    def started(self, backend) -> None:
        """Random choice does not weigh load."""

    def finished(self, backend) -> None:
        """Random choice does not weigh load."""

    def observe(self, backend, latency) -> None:
        """Random choice does not weigh latency."""
