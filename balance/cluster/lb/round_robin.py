# -*- test-case-name: tests.cluster.test_round_robin -*-
"""
Round robin: each eligible backend in turn.
"""

from __future__ import annotations

from zope.interface import implementer

from balance.interfaces import ILoadBalancer


@implementer(ILoadBalancer)
class RoundRobin:
    """
    Pick eligible backends in config order, one after the other.

    Ineligible and excluded backends are skipped without losing the turn of
    the backends after them: the cursor moves to just past the backend
    picked, so with C{a, b, c} and C{b} drained the order is
    C{a, c, a, c, ...}, not C{a, c, c, a, c, c}.

    Weights are ignored (that is C{weighted_round_robin}).
    """

    __slots__ = ("_backends", "_next")

    def __init__(self, backends=()):
        """
        @param backends: The backends to choose from, in config order.
        """
        self._backends = ()
        self._next = 0
        self.update(backends)

    def update(self, backends) -> None:
        """
        Replace the backends.  The cursor keeps its position (modulo the new
        count), so a reload does not send the next connection back to the
        first backend.
        """
        self._backends = tuple(backends)
        self._next = self._next % len(self._backends) if self._backends else 0

    def pick(self, key=None, exclude=()):
        """
        Return the next eligible backend not in C{exclude}, or L{None}.

        @param key: Ignored.
        """
        backends = self._backends
        count = len(backends)
        start = self._next
        for offset in range(count):
            index = (start + offset) % count
            backend = backends[index]
            if backend.eligible and backend not in exclude:
                self._next = (index + 1) % count
                return backend
        return None

    def started(self, backend) -> None:
        """Round robin does not weigh load."""

    def finished(self, backend) -> None:
        """Round robin does not weigh load."""
