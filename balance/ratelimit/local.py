# -*- test-case-name: tests.ratelimit.test_local -*-
"""
The in-process rate-limit store: token buckets in a dict, with memory that
stays bounded however many distinct keys clients invent.

Memory policy:

 - A bucket is one float (its GCRA C{tat}, see L{balance.ratelimit.bucket})
   in an insertion-ordered dict kept in least-recently-used order (a key
   moves to the end whenever it is used).
 - A bucket that is full again is the same as no bucket, so full buckets
   are dropped: every decision also looks at the least recently used
   entries and drops up to two that are full by now.  Since at most one
   entry is added per decision, idle buckets drain faster than new ones
   arrive, with no timer and no full scan.
 - A hard cap, C{max_keys} (100,000 by default, about 20 MB with short
   keys), bounds the rest: when a new key would exceed it, the least
   recently used bucket is evicted even if it is not full.  That client
   gets a full bucket again the next time, so size the cap above the number
   of keys that are limited I{at the same time}; L{LocalRateLimitStore.evicted}
   counts the evictions.
"""

from __future__ import annotations

from collections import OrderedDict

from zope.interface import implementer

from balance.ratelimit import IRateLimitStore
from balance.ratelimit.bucket import gcra

DEFAULT_MAX_KEYS = 100_000


@implementer(IRateLimitStore)
class LocalRateLimitStore:
    """
    Token buckets of one process.

    :param clock: an L{twisted.internet.interfaces.IReactorTime}: the
        reactor, or a L{twisted.internet.task.Clock} in tests.
    :param max_keys: the most buckets kept at once, at least 1.
    :ivar evicted: buckets dropped before they were full because of
        C{max_keys}.
    """

    synchronous = True

    def __init__(self, clock, max_keys: int = DEFAULT_MAX_KEYS):
        if max_keys < 1:
            raise ValueError(f"max_keys must be at least 1, got {max_keys!r}")
        self._clock = clock
        self.max_keys = max_keys
        self.evicted = 0
        self._tats: OrderedDict[bytes, float] = OrderedDict()

    def __len__(self) -> int:
        """The number of buckets held now."""
        return len(self._tats)

    def take(self, key: bytes, rate: float, capacity: int):
        """
        Take one token from the bucket of C{key}; see
        L{IRateLimitStore.take}.  Always answers at once.
        """
        now = self._clock.seconds()
        tats = self._tats
        tat = tats.get(key)
        if tat is None:
            if len(tats) >= self.max_keys:
                self._make_room(now)
            tat = now
        else:
            tats.move_to_end(key)
        new_tat, allowed, remaining, reset_after, retry_after = gcra(tat, now, 1.0 / rate, capacity)
        tats[key] = new_tat
        # Drop up to two full buckets from the cold end.
        for _ in (0, 1):
            oldest = next(iter(tats))
            if tats[oldest] > now:
                break
            del tats[oldest]
        return allowed, remaining, reset_after, retry_after

    def _make_room(self, now: float) -> None:
        tats = self._tats
        _, tat = tats.popitem(last=False)
        if tat > now:
            self.evicted += 1

    def sweep(self) -> int:
        """
        Drop every full bucket now, scanning all of them.

        Not needed for bounded memory (L{take} drains full buckets as it
        goes); useful after a burst of distinct keys, when traffic stops,
        to give the memory back.  Costs about 50 ns per bucket.

        :return: the number of buckets dropped.
        """
        now = self._clock.seconds()
        full = [key for key, tat in self._tats.items() if tat <= now]
        for key in full:
            del self._tats[key]
        return len(full)
