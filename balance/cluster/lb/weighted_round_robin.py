# -*- test-case-name: tests.cluster.test_policies -*-
"""
Smooth weighted round robin, as nginx does it.
"""

from __future__ import annotations

from functools import reduce
from math import gcd

from zope.interface import implementer

from balance.cluster.lb._weights import Weights
from balance.cluster.lb.options import DEFAULT, Options
from balance.interfaces import ILoadBalancer

#: Largest ``distinct weights x round length`` for which the round is
#: computed in advance (about 0.1 s of work at most); past it every pick
#: does a pass over the backends.
SCHEDULE_BUDGET = 1 << 18


def round_cost(weights: list[int]) -> int:
    """The work :func:`smooth_round` does: distinct weights x round length."""
    return len(set(weights)) * (sum(weights) // reduce(gcd, weights))


def smooth_round(weights: list[int]) -> list[int]:
    """
    One round of nginx's smooth weighted round robin over ``weights`` (all
    eligible), as indices: ``[5, 1, 1]`` gives ``[0, 0, 1, 0, 2, 0, 0]``.
    The round has ``sum(weights) / gcd(weights)`` picks, and the next round
    repeats it.

    nginx adds every weight to its backend's score, picks the highest
    score (the first on a tie) and takes the total off it.  After ``t``
    picks a backend of weight ``w`` picked ``k`` times has score ``t x w -
    total x k``, so among backends of equal weight the one picked least
    often (the first of them on a tie) is ahead: they take turns in config
    order.  Each step therefore compares one candidate per distinct weight,
    not every backend.
    """
    divisor = reduce(gcd, weights)
    weights = [w // divisor for w in weights]
    total = sum(weights)
    classes: dict[int, list[int]] = {}
    for index, weight in enumerate(weights):
        classes.setdefault(weight, []).append(index)
    groups = [(weight, members, len(members)) for weight, members in classes.items()]
    picks = [0] * len(groups)
    order = []
    for step in range(1, total + 1):
        best = -1
        best_score = best_index = 0
        for group, (weight, members, size) in enumerate(groups):
            taken = picks[group]
            score = step * weight - total * (taken // size)
            index = members[taken % size]
            if best < 0 or score > best_score or (score == best_score and index < best_index):
                best, best_score, best_index = group, score, index
        picks[best] += 1
        order.append(best_index)
    return order


@implementer(ILoadBalancer)
class WeightedRoundRobin:
    """
    Each eligible backend in turn, as many turns per round as its weight,
    spread out rather than bunched: weights 5, 1, 1 give
    ``a, a, b, a, c, a, a`` (nginx's smooth weighted round robin).

    nginx's algorithm adds each eligible backend's weight to its running
    score, takes the highest score (the first on a tie) and takes the sum
    of the weights off the winner: one pass over the backends per pick.
    Here the round is computed once, in :meth:`update`, and picks walk it
    with a cursor in constant time, skipping ineligible and excluded
    backends (the others keep their shares and order).  Equal weights make
    the round the config order.  When the round would be too long to
    compute (``backends x sum(weights) / gcd`` above
    :data:`SCHEDULE_BUDGET`, e.g. 1000 backends of unequal weights), and
    while slow start ramps a backend up (by its ramped weight), picks run
    nginx's algorithm itself.
    """

    __slots__ = ("_backends", "_weights", "_current", "_schedule", "_next")

    def __init__(self, backends=(), options: Options = DEFAULT):
        """
        :param backends: The backends to choose from, in config order.
        :param options: ``slow_start`` and ``clock`` are read.
        """
        self._weights = Weights(options.slow_start, options.clock)
        self._backends: tuple = ()
        self._current: list[float] = []
        self._schedule: list | None = None
        self._next = 0
        self.update(backends)

    def _static_weight(self, backend):
        return backend.weight

    def update(self, backends) -> None:
        """
        Replace the backends.  The cursor keeps its position in the round
        (modulo the new length) and backends that stay keep their running
        score, so a change of the set does not send the next picks back to
        the first backend.
        """
        previous = dict(zip(self._backends, self._current, strict=True))
        self._backends = backends = tuple(backends)
        weights = self._weights
        weights.update(backends, self._static_weight)
        self._current = [previous.get(b, 0) for b in backends]
        if weights.uniform:
            self._schedule = list(backends)
        elif round_cost(weights.static) <= SCHEDULE_BUDGET:
            self._schedule = [backends[i] for i in smooth_round(weights.static)]
        else:
            self._schedule = None
        length = len(self._schedule) if self._schedule else 0
        self._next = self._next % length if length else 0

    def pick(self, key=None, exclude=()):
        """
        Return the next eligible backend not in ``exclude``, or ``None``.

        :param key: Ignored.
        """
        now = self._weights.ramp_now()
        schedule = self._schedule
        if now is None and schedule is not None:
            count = len(schedule)
            start = self._next
            for offset in range(count):
                index = start + offset
                if index >= count:
                    index -= count
                backend = schedule[index]
                if backend.eligible and backend not in exclude:
                    self._next = index + 1 if index + 1 < count else 0
                    return backend
            return None
        return self._smooth(exclude, now)

    def _smooth(self, exclude, now):
        backends = self._backends
        current = self._current
        weights = self._weights
        best = -1
        best_score = 0.0
        total = 0.0
        for index, weight in enumerate(weights.static):
            backend = backends[index]
            if not backend.eligible or backend in exclude:
                continue
            if now is not None:
                weight = weight * weights.factor(backend, now)
            score = current[index] + weight
            current[index] = score
            total += weight
            if best < 0 or score > best_score:
                best = index
                best_score = score
        if best < 0:
            return None
        current[best] = best_score - total
        return backends[best]

    def started(self, backend) -> None:
        """Weighted round robin does not weigh load."""

    def finished(self, backend) -> None:
        """Weighted round robin does not weigh load."""

    def observe(self, backend, latency) -> None:
        """Weighted round robin does not weigh latency."""
