# -*- test-case-name: tests.cluster.test_slow_start -*-
"""
Slow start: a backend that has just become healthy, or was just added,
gets a growing share of the traffic instead of all of it at once.

Its effective weight ramps linearly from C{floor} (a fraction of its
configured weight) to the full weight over C{window} seconds, counted from
L{balance.cluster.backend.Backend.healthy_since}.  The object is pure: it
reads no clock, callers pass C{now}.

Policies that honour it (every weight-aware policy that is not a hash: a
hash policy that moved keys for a ramp would defeat its purpose) read
L{SlowStart.weight} at pick time, but only while L{SlowStart.ramping} says a
ramp may be under way, so that a cluster where nothing ramps pays one
comparison per pick.
"""

from __future__ import annotations


class SlowStart:
    """
    The weight ramp of one cluster.

    :ivar window: Seconds a ramp lasts, more than 0.
    :ivar floor: The share of its weight a backend starts with, in
        ``(0, 1]``.
    :ivar ramp_end: No ramp lasts beyond this time (cluster clock seconds);
        ``float("-inf")`` when no ramp ever began.
    """

    __slots__ = ("window", "floor", "ramp_end")

    def __init__(self, window: float, floor: float = 0.1):
        """
        :param window: How long a ramp lasts, in seconds; more than 0.
        :param floor: The starting share of the weight, in ``(0, 1]``.
        :raise ValueError: If either is out of range.
        """
        if not window > 0:
            raise ValueError(f"slow start window must be more than 0 seconds, got {window!r}")
        if not 0 < floor <= 1:
            raise ValueError(f"slow start floor must be in (0, 1], got {floor!r}")
        self.window = float(window)
        self.floor = float(floor)
        self.ramp_end = float("-inf")

    def begin(self, backend, now: float) -> None:
        """
        Start ramping ``backend`` up from ``now``: it has just become
        healthy, or has just been added to a running cluster.

        :param backend: A :class:`balance.cluster.backend.Backend`; its
            ``healthy_since`` is set to ``now``.
        :param now: The current time, in the cluster clock's seconds.
        """
        backend.healthy_since = now
        end = now + self.window
        if end > self.ramp_end:
            self.ramp_end = end

    def ramping(self, now: float) -> bool:
        """
        Whether some backend may still be ramping at ``now``.  When this is
        false every backend's effective weight is its configured weight.
        """
        return now < self.ramp_end

    def factor(self, backend, now: float) -> float:
        """
        The share of its configured weight ``backend`` gets at ``now``:
        ``floor`` when it has just begun, rising linearly to 1 at the end
        of the window (and 1 ever after).
        """
        age = now - backend.healthy_since
        if age >= self.window:
            return 1.0
        if age <= 0:
            return self.floor
        return self.floor + (1.0 - self.floor) * age / self.window

    def weight(self, backend, now: float) -> float:
        """
        The effective weight of ``backend`` at ``now``: its configured
        weight times :meth:`factor`.
        """
        age = now - backend.healthy_since
        if age >= self.window:
            return backend.weight
        return backend.weight * self.factor(backend, now)
