# -*- test-case-name: tests.cluster.test_registry -*-
"""
Load-balancing policies, registered by their config name (C{lb:}).

Every policy provides L{balance.interfaces.ILoadBalancer} and is built as
C{Policy(backends, options)} with an L{Options}.
"""

from __future__ import annotations

import random

from attrs import evolve

from balance.cluster.lb.bounded import ConsistentHashBounded
from balance.cluster.lb.least_connections import LeastConnections
from balance.cluster.lb.maglev import Maglev
from balance.cluster.lb.options import Options
from balance.cluster.lb.peak_ewma import PeakEwma
from balance.cluster.lb.power_of_two import PowerOfTwo
from balance.cluster.lb.ring_hash import RingHash
from balance.cluster.lb.round_robin import RoundRobin
from balance.cluster.lb.weighted_random import WeightedRandom
from balance.cluster.lb.weighted_round_robin import WeightedRoundRobin
from balance.interfaces import ILoadBalancer

POLICIES = {
    "round_robin": RoundRobin,
    "weighted_round_robin": WeightedRoundRobin,
    "least_connections": LeastConnections,
    "random": WeightedRandom,
    "power_of_two": PowerOfTwo,
    "peak_ewma": PeakEwma,
    "ring_hash": RingHash,
    "maglev": Maglev,
    "consistent_hash_bounded": ConsistentHashBounded,
}

#: The policies that hash a key (and need C{hash_on}).
HASH_POLICIES = frozenset({"ring_hash", "maglev", "consistent_hash_bounded"})

#: The policies that weigh the latency fed to C{observe}: the HTTP path
#: reads the clock for them only.
LATENCY_POLICIES = frozenset({"peak_ewma"})

#: The policies whose C{started}/C{finished} do nothing (they read
#: C{backend.active}, which the cluster keeps): the cluster skips the calls.
ACTIVE_READERS = frozenset(POLICIES) - {"consistent_hash_bounded"}

#: The policies that honour C{slow_start}: all but the hash policies, whose
#: keys would move with the weights.
SLOW_START_POLICIES = frozenset(POLICIES) - HASH_POLICIES


def make(name: str, backends, options: Options | None = None) -> ILoadBalancer:
    """
    Build the policy called C{name} over C{backends}.

    @param name: A key of L{POLICIES}, as in a cluster's C{lb:}.
    @param backends: Sequence of L{balance.cluster.backend.Backend}.
    @param options: The policy's injected dependencies and tunables; a
        fresh C{random.Random} is supplied when C{options.rng} is L{None}
        (pass a seeded one for reproducible picks).

    @raise KeyError: If no policy has that name (config validation only
        lets known names through).
    @raise ValueError: If a policy lacks what it needs (a clock for
        C{peak_ewma} or slow start).
    """
    policy = POLICIES[name]
    if options is None:
        options = Options()
    if options.rng is None:
        options = evolve(options, rng=random.Random())
    return policy(backends, options)


__all__ = [
    "ACTIVE_READERS",
    "HASH_POLICIES",
    "LATENCY_POLICIES",
    "POLICIES",
    "SLOW_START_POLICIES",
    "ConsistentHashBounded",
    "LeastConnections",
    "Maglev",
    "Options",
    "PeakEwma",
    "PowerOfTwo",
    "RingHash",
    "RoundRobin",
    "WeightedRandom",
    "WeightedRoundRobin",
    "make",
]
