# -*- test-case-name: tests.cluster.test_hash_policies -*-
"""
Maglev consistent hashing (Eisenbud et al., NSDI 2016), weighted as in
Envoy.
"""

from __future__ import annotations

from zope.interface import implementer

from balance.cluster.lb.hashing import is_prime, key_hash, maglev_permutation, rehash
from balance.cluster.lb.options import DEFAULT, Options
from balance.cluster.lb.round_robin import RoundRobin
from balance.interfaces import ILoadBalancer

#: Salted lookups tried when a key's entry is not eligible, before one
#: pass over the table's backends.
_REHASHES = 8


def build_table(backends, size: int) -> list:
    """
    Fill a Maglev lookup table of prime ``size``.

    Each backend walks its own permutation of the slots (from
    :func:`balance.cluster.lb.hashing.maglev_permutation` of its name) and
    takes the next free slot when its turn comes.  Turns come in
    proportion to weight: in round ``r``, a backend of weight ``w`` takes a
    turn while ``r x w`` has not reached its running target, which grows by
    the largest weight at each of its turns (Envoy's weighted Maglev).  So
    the backends fill shares of the table in proportion to their weights,
    and a change of backends moves few entries.

    :return: ``size`` backends (``[]`` when there are none).
    """
    backends = tuple(backends)
    if not backends:
        return []
    table: list = [None] * size
    perms = [maglev_permutation(b.name, size) for b in backends]
    weights = [b.weight for b in backends]
    top = max(weights)
    targets = [0] * len(backends)
    nexts = [0] * len(backends)
    filled = 0
    round_ = 0
    while filled < size:
        round_ += 1
        for i, backend in enumerate(backends):
            if round_ * weights[i] < targets[i]:
                continue
            targets[i] += top
            offset, skip = perms[i]
            j = nexts[i]
            slot = (offset + j * skip) % size
            while table[slot] is not None:
                j += 1
                slot = (offset + j * skip) % size
            table[slot] = backend
            nexts[i] = j + 1
            filled += 1
            if filled == size:
                break
    return table


@implementer(ILoadBalancer)
class Maglev:
    """
    Maglev hashing: the key's hash indexes a lookup table of prime size
    (``table_size``, 65537 by default) whose slots are shared among the
    backends in proportion to weight.  A pick is one CRC32 and one list
    index.  Removing or adding one of N backends moves about 1/N of the
    keys, plus a little: slots freed or taken ripple through the
    permutations.

    A key whose backend is ineligible or excluded falls back, for that key
    alone, to the backends of further slots chosen by rehashing the key
    with a salt (1, 2, ...; then one pass over the backends): keys of
    healthy backends never move, the keys of a failed backend spread over
    the others in proportion to their share, and each such key always
    lands on the same fallback while the same backends are down.  The
    table is not rebuilt on health changes, only on :meth:`update`, so
    keys come home as soon as their backend does.

    A request without a key is served round robin.
    """

    __slots__ = ("_table", "_backends", "_size", "_fallback")

    def __init__(self, backends=(), options: Options = DEFAULT):
        """
        :param backends: The backends to choose from.
        :param options: ``table_size`` (a prime) is read.
        :raise ValueError: If ``table_size`` is not prime.
        """
        if not is_prime(options.table_size):
            raise ValueError(f"maglev table size must be prime, got {options.table_size!r}")
        self._size = options.table_size
        self._fallback = RoundRobin()
        self.update(backends)

    def update(self, backends) -> None:
        """Replace the backends and rebuild the table."""
        self._backends = tuple(backends)
        self._table = build_table(self._backends, self._size)
        self._fallback.update(self._backends)

    def pick(self, key=None, exclude=()):
        """
        Return the backend of ``key``'s slot (or its fallback), or the next
        one round robin when ``key`` is ``None``; ``None`` when no backend
        is eligible.
        """
        if key is None:
            return self._fallback.pick(None, exclude)
        table = self._table
        if not table:
            return None
        size = self._size
        h = key_hash(key)
        backend = table[h % size]
        if backend.eligible and backend not in exclude:
            return backend
        for salt in range(1, _REHASHES + 1):
            backend = table[rehash(h, salt) % size]
            if backend.eligible and backend not in exclude:
                return backend
        # Most of the table is unusable: hash over what is left.
        usable = [b for b in self._backends if b.eligible and b not in exclude]
        if not usable:
            return None
        return usable[rehash(h, _REHASHES + 1) % len(usable)]

    def started(self, backend) -> None:
        """Maglev does not weigh load."""

    def finished(self, backend) -> None:
        """Maglev does not weigh load."""

    def observe(self, backend, latency) -> None:
        """Maglev does not weigh latency."""
