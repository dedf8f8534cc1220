# -*- test-case-name: tests.cluster.test_peak_ewma -*-
"""
Peak EWMA: latency-aware balancing, as Finagle and Linkerd do it.
"""

from __future__ import annotations

from math import exp

from zope.interface import implementer

from balance.cluster.lb._weights import Weights
from balance.cluster.lb.options import DEFAULT, Options
from balance.cluster.lb.power_of_two import two_choices
from balance.interfaces import ILoadBalancer

#: The cost of a backend with requests in flight but no latency measured
#: yet: worse than any measured one, so a new backend takes one request
#: at a time until it has answered once.
PENALTY = 1e9


class _Estimate:
    """The latency estimate of one backend, and when it was last updated."""

    __slots__ = ("latency", "stamp")

    def __init__(self, stamp: float):
        self.latency = 0.0
        self.stamp = stamp


@implementer(ILoadBalancer)
class PeakEwma:
    """
    Draw two backends at random (in proportion to weight) and take the one
    with the lower cost, ``latency estimate x (active + 1) / weight``.

    The estimate is an exponentially weighted moving average of observed
    latencies over time, with time constant ``decay`` (Options, default
    10 s): a sample ``dt`` seconds after the last update weighs
    ``1 - exp(-dt / decay)``.  It is peak-sensitive: a sample above the
    estimate replaces it at once, so a backend that turns slow loses
    traffic at its next answer.  Reading it decays it towards zero (as
    Linkerd's tower does), so a backend that gets no traffic any more is
    tried again after a few time constants and wins its share back once it
    answers quickly.

    A backend with no estimate yet costs 0 while idle and
    :data:`PENALTY` plus its in-flight count otherwise.
    """

    __slots__ = ("_backends", "_weights", "_rng", "_clock", "_decay", "_estimates")

    def __init__(self, backends=(), options: Options = DEFAULT):
        """
        :param backends: The backends to choose from.
        :param options: ``rng`` and ``clock`` (both required), ``decay``,
            ``slow_start``.
        :raise ValueError: If ``rng`` or ``clock`` is missing, or ``decay``
            is not positive.
        """
        self._rng = options.need_rng("peak_ewma")
        self._clock = options.need_clock("peak_ewma")
        if not options.decay > 0:
            raise ValueError(f"peak_ewma decay must be more than 0, got {options.decay!r}")
        self._decay = float(options.decay)
        self._weights = Weights(options.slow_start, options.clock)
        self._backends: tuple = ()
        self._estimates: dict = {}
        self.update(backends)

    def update(self, backends) -> None:
        """
        Replace the backends.  Backends that stay keep their estimate.
        """
        now = self._clock.seconds()
        previous = self._estimates
        self._backends = tuple(backends)
        self._weights.update(self._backends)
        self._estimates = {b: previous.get(b) or _Estimate(now) for b in self._backends}

    def latency(self, backend) -> float | None:
        """
        The current latency estimate of ``backend`` in seconds, decayed to
        now; ``None`` for a backend the policy does not know.
        """
        estimate = self._estimates.get(backend)
        if estimate is None:
            return None
        return self._decayed(estimate, self._clock.seconds())

    def _decayed(self, estimate: _Estimate, now: float) -> float:
        latency = estimate.latency
        elapsed = now - estimate.stamp
        if latency and elapsed > 0:
            latency *= exp(-elapsed / self._decay)
            estimate.latency = latency
            estimate.stamp = now
        return latency

    def _cost(self, backend, now: float, ramp: float | None) -> float:
        latency = self._decayed(self._estimates[backend], now)
        active = backend.active
        if latency == 0.0:
            return PENALTY + active if active else 0.0
        weight = backend.weight
        if ramp is not None:
            weight = weight * self._weights.factor(backend, ramp)
        return latency * (active + 1) / weight

    def pick(self, key=None, exclude=()):
        """
        Return the cheaper of two random eligible backends not in
        ``exclude``, or ``None``.

        :param key: Ignored.
        """
        weights = self._weights
        ramp = weights.ramp_now()
        first, second = two_choices(self._backends, weights, exclude, ramp, self._rng)
        if second is None:
            return first
        now = self._clock.seconds()
        if self._cost(second, now, ramp) < self._cost(first, now, ramp):
            return second
        return first

    def started(self, backend) -> None:
        """The in-flight count is ``backend.active``, which the cluster keeps."""

    def finished(self, backend) -> None:
        """The in-flight count is ``backend.active``, which the cluster keeps."""

    def observe(self, backend, latency: float) -> None:
        """
        Fold a latency sample of ``backend`` (seconds) into its estimate:
        a peak replaces it, a lower sample moves it by the weight of the
        time since the last update.  Samples of backends the policy no
        longer has are dropped.
        """
        estimate = self._estimates.get(backend)
        if estimate is None:
            return
        now = self._clock.seconds()
        if latency > estimate.latency:
            estimate.latency = latency
        else:
            elapsed = now - estimate.stamp
            keep = exp(-elapsed / self._decay) if elapsed > 0 else 1.0
            estimate.latency = estimate.latency * keep + latency * (1.0 - keep)
        estimate.stamp = now
