# -*- test-case-name: tests.cluster.test_registry -*-
"""
What a cluster hands its load-balancing policy besides the backends.
"""

from __future__ import annotations

from attrs import frozen

from balance.cluster.slow_start import SlowStart

#: The default Maglev lookup table size: a prime, ample for clusters of up
#: to a few hundred backends (the paper asks for M > 100 x N).
MAGLEV_TABLE_SIZE = 65537


@frozen
class Options:
    """
    The injected dependencies and tunables of a policy.  Each policy reads
    the fields it needs and ignores the rest.

    :ivar rng: A ``random.Random`` (or anything with ``random()`` and
        ``randrange()``): the only source of randomness of random,
        power-of-two, peak EWMA and least-connections tie breaking.
        :func:`balance.cluster.lb.make` supplies a fresh one when ``None``.
    :ivar clock: Anything with ``seconds()`` (an ``IReactorTime``): read by
        peak EWMA (latency decay) and by slow start.
    :ivar slow_start: The cluster's :class:`SlowStart`, or ``None`` when
        ``slow_start`` is 0.
    :ivar bounded_load: ``consistent_hash_bounded``: no backend takes more
        than this factor times the average load.
    :ivar decay: ``peak_ewma``: the time constant of the latency average,
        in seconds.
    :ivar vnodes: ``ring_hash`` and ``consistent_hash_bounded``: points on
        the ring per unit of weight.
    :ivar max_ring: Upper bound on the ring's points (131072): beyond it
        every backend gets proportionally fewer, so that building the ring
        of a large cluster stays near 0.1 s.
    :ivar table_size: ``maglev``: the lookup table size, a prime.
    """

    rng: object = None
    clock: object = None
    slow_start: SlowStart | None = None
    bounded_load: float = 1.25
    decay: float = 10.0
    vnodes: int = 160
    max_ring: int = 1 << 17
    table_size: int = MAGLEV_TABLE_SIZE

    def need_rng(self, policy: str):
        """
        Return ``rng``.

        :raise ValueError: If there is none; ``policy`` names who needs it.
        """
        if self.rng is None:
            raise ValueError(f"{policy} needs an injected random.Random (Options.rng)")
        return self.rng

    def need_clock(self, policy: str):
        """
        Return ``clock``.

        :raise ValueError: If there is none; ``policy`` names who needs it.
        """
        if self.clock is None:
            raise ValueError(f"{policy} needs an injected clock (Options.clock)")
        return self.clock


DEFAULT = Options()
