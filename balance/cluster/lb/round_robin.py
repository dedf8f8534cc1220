# -*- test-case-name: tests.cluster.test_round_robin -*-
"""
Round robin: each eligible backend in turn.
"""

from __future__ import annotations

from zope.interface import implementer

from balance.cluster.lb.weighted_round_robin import WeightedRoundRobin
from balance.interfaces import ILoadBalancer


@implementer(ILoadBalancer)
class RoundRobin(WeightedRoundRobin):
    """
    Pick eligible backends in config order, one after the other.

    Ineligible and excluded backends are skipped without losing the turn of
    the backends after them: the cursor moves to just past the backend
    picked, so with ``a, b, c`` and ``b`` drained the order is
    ``a, c, a, c, ...``, not ``a, c, c, a, c, c``.

    Configured weights are ignored (that is ``weighted_round_robin``); a
    slow-start ramp is not: while one is under way, turns are shared as
    smooth weighted round robin over the ramped shares of equal weights.
    """

    __slots__ = ()

    def _static_weight(self, backend):
        return 1
