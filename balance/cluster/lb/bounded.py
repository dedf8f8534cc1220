# -*- test-case-name: tests.cluster.test_hash_policies -*-
"""
Consistent hashing with bounded loads (Mirrokni, Thorup and Zadimoghaddam,
2018; the variant Vimeo and HAProxy's ``hash-balance-factor`` use).
"""

from __future__ import annotations

from math import ceil

from zope.interface import implementer

from balance.cluster.lb.options import DEFAULT, Options
from balance.cluster.lb.ring_hash import Ring
from balance.cluster.lb.round_robin import RoundRobin
from balance.interfaces import ILoadBalancer


@implementer(ILoadBalancer)
class ConsistentHashBounded:
    """
    Ring hashing where no backend takes more than ``bounded_load`` (c)
    times its share of the load.

    The key picks a point on the ring as for ``ring_hash``; walking
    clockwise from it, the first eligible backend whose in-flight count is
    below its capacity takes the work.  With ``m`` units of work in flight,
    a backend of weight ``w`` out of a total eligible weight ``W`` has
    capacity ``ceil(c x (m + 1) x w / W)``; with equal weights that is
    ``ceil(c x (m + 1) / n)``, so no backend ever holds more than
    ``ceil(c x average)``, and the capacities always add up to more than
    ``m``: some backend has room.  Popular keys spill over to their
    neighbours on the ring instead of overloading one backend, and keys
    keep their backend while it has room.

    The in-flight total ``m`` is counted from :meth:`started` and
    :meth:`finished`.  A request without a key is served round robin.
    """

    __slots__ = ("_ring", "_fallback", "_vnodes", "_max_ring", "_factor", "_total")

    def __init__(self, backends=(), options: Options = DEFAULT):
        """
        :param backends: The backends to choose from.
        :param options: ``bounded_load`` (more than 1), ``vnodes`` and
            ``max_ring``.
        :raise ValueError: If ``bounded_load`` is not more than 1.
        """
        if not options.bounded_load > 1:
            raise ValueError(f"bounded_load must be more than 1, got {options.bounded_load!r}")
        self._factor = float(options.bounded_load)
        self._vnodes = options.vnodes
        self._max_ring = options.max_ring
        self._fallback = RoundRobin()
        self._total = 0
        self.update(backends)

    def update(self, backends) -> None:
        """Replace the backends and rebuild the ring."""
        backends = tuple(backends)
        self._ring = Ring(backends, self._vnodes, self._max_ring)
        self._fallback.update(backends)

    @property
    def in_flight(self) -> int:
        """The work in flight, as counted by started and finished."""
        return self._total

    def pick(self, key=None, exclude=()):
        """
        Return the first backend from ``key``'s point on the ring that is
        eligible, not excluded and below its capacity; round robin when
        ``key`` is ``None``; ``None`` when no backend is eligible.
        """
        if key is None:
            return self._fallback.pick(None, exclude)
        ring = self._ring
        owners = ring.owners
        count = len(owners)
        if not count:
            return None
        index = ring.start(key)
        factor_load = self._factor * (self._total + 1)
        # The capacity over all backends is never above the one over the
        # eligible ones: a backend below it is below the exact one too, so
        # the pass over the backends that the exact one needs is only paid
        # when a backend is at the cheap bound.  The walk ends once every
        # acceptable backend was found full.
        all_weight = ring.total_weight
        eligible_weight = 0
        usable = 0
        full: set | None = None
        first_eligible = None
        patience = 4 * len(ring.backends)
        for step in range(count):
            backend = owners[index]
            if backend.eligible and backend not in exclude:
                if first_eligible is None:
                    first_eligible = backend
                active = backend.active
                if active < ceil(factor_load * backend.weight / all_weight):
                    return backend
                if full is None:
                    full = set()
                    for b in ring.backends:
                        if b.eligible:
                            eligible_weight += b.weight
                            if b not in exclude:
                                usable += 1
                if active < ceil(factor_load * backend.weight / eligible_weight):
                    return backend
                full.add(backend)
                if len(full) >= usable:
                    break
            index += 1
            if index == count:
                index = 0
            if step == patience and first_eligible is None and not ring.any_eligible(exclude):
                return None
        # Every acceptable backend is full: only possible when exclusions
        # took away the room (or in-flight counts were not reported through
        # started and finished).  Take the key's first acceptable one.
        return first_eligible

    def started(self, backend) -> None:
        """Count a unit of work in flight."""
        self._total += 1

    def finished(self, backend) -> None:
        """Count a unit of work done."""
        if self._total > 0:
            self._total -= 1

    def observe(self, backend, latency) -> None:
        """Bounded-load hashing does not weigh latency."""
