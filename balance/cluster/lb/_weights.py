# -*- test-case-name: tests.cluster.test_policies -*-
"""
Weights as the weight-aware policies read them: static weights with their
prefix sums for sampling, and slow start's ramp on top.
"""

from __future__ import annotations

from bisect import bisect_right
from itertools import accumulate

from balance.cluster.lb.options import DEFAULT


class Weights:
    """
    The weights of a policy's backends.

    :ivar static: The configured weights, parallel to the backends.
    :ivar uniform: Whether all configured weights are equal (sampling is
        then a plain ``randrange``).
    """

    __slots__ = ("static", "uniform", "_cumulative", "_total", "_slow", "_clock")

    def __init__(self, slow_start=None, clock=None):
        """
        :param slow_start: A :class:`balance.cluster.slow_start.SlowStart`,
            or ``None``.
        :param clock: Anything with ``seconds()``; required with
            ``slow_start``.
        """
        if slow_start is not None and clock is None:
            raise ValueError("slow start needs an injected clock (Options.clock)")
        self._slow = slow_start
        self._clock = clock
        self.update(())

    def update(self, backends, weight_of=None) -> None:
        """
        Take the weights of ``backends``.

        :param weight_of: Maps a backend to its static weight; its
            ``weight`` attribute by default.
        """
        if weight_of is None:
            self.static = [b.weight for b in backends]
        else:
            self.static = [weight_of(b) for b in backends]
        self._cumulative = list(accumulate(self.static))
        self._total = self._cumulative[-1] if self._cumulative else 0
        self.uniform = len(set(self.static)) <= 1

    def ramp_now(self) -> float | None:
        """
        The current time when slow start may be ramping a backend up, else
        ``None`` (then every effective weight is the static one).
        """
        slow = self._slow
        if slow is None:
            return None
        now = self._clock.seconds()
        return now if slow.ramping(now) else None

    def factor(self, backend, now: float) -> float:
        """Slow start's share of ``backend``'s weight at ``now``."""
        return self._slow.factor(backend, now)

    def sample(self, rng) -> int:
        """
        An index drawn with probability proportional to its static weight.
        There must be at least one backend.
        """
        if self.uniform:
            return rng.randrange(len(self.static))
        index = bisect_right(self._cumulative, rng.random() * self._total)
        # Float rounding can land exactly on the total.
        return index if index < len(self.static) else len(self.static) - 1

    def sample_other(self, rng, first: int) -> int:
        """
        An index other than ``first``, drawn with probability proportional
        to its static weight among the others (sampling without
        replacement, still O(log n)).  There must be at least two backends.
        """
        count = len(self.static)
        if self.uniform:
            index = rng.randrange(count - 1)
            return index + 1 if index >= first else index
        weight = self.static[first]
        point = rng.random() * (self._total - weight)
        # Skip over the first's stretch of the cumulative line.
        if point >= self._cumulative[first] - weight:
            point += weight
        index = bisect_right(self._cumulative, point)
        if index >= count:
            index = count - 1
        return index if index != first else (first + 1) % count


class RandomizedPolicy:
    """
    What the policies that draw from an injected ``rng`` over weighted
    backends share: the backends, their (slow-start aware) weights and the
    random source.  Subclasses name themselves in ``name`` (for the error
    when no ``rng`` is given) and implement ``pick``.
    """

    __slots__ = ("_backends", "_weights", "_rng")
    name = ""

    def __init__(self, backends=(), options=None):
        """
        :param backends: The backends to choose from.
        :param options: ``rng`` (required), ``slow_start`` and ``clock``.
        """
        options = DEFAULT if options is None else options
        self._rng = options.need_rng(self.name)
        self._weights = Weights(options.slow_start, options.clock)
        self._backends: tuple = ()
        self.update(backends)

    def update(self, backends) -> None:
        """Replace the backends."""
        self._backends = tuple(backends)
        self._weights.update(self._backends)
