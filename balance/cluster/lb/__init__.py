# -*- test-case-name: tests.cluster.test_round_robin -*-
"""
Load-balancing policies, registered by their config name (C{lb:}).

Every policy provides L{balance.interfaces.ILoadBalancer} and is built as
C{Policy(backends)}.
"""

from __future__ import annotations

from balance.cluster.lb.round_robin import RoundRobin
from balance.interfaces import ILoadBalancer

POLICIES = {
    "round_robin": RoundRobin,
}


def make(name: str, backends) -> ILoadBalancer:
    """
    Build the policy called C{name} over C{backends}.

    @param name: A key of L{POLICIES}, as in a cluster's C{lb:}.
    @param backends: Sequence of L{balance.cluster.backend.Backend}.

    @raise KeyError: If no policy has that name (config validation only
        lets known names through).
    """
    return POLICIES[name](backends)


__all__ = ["POLICIES", "RoundRobin", "make"]
