# -*- test-case-name: tests.ratelimit.test_bucket -*-
"""
The token bucket: pure arithmetic, no clock, no I/O.

A bucket holds at most C{capacity} tokens and refills continuously at
C{rate} tokens per second; a request takes one token or is refused.  It is
kept in the equivalent form of the generic cell rate algorithm (GCRA, from
ATM networks, and what most Redis rate limiters use): instead of a token
count and a timestamp, one number per bucket, the I{theoretical arrival
time} (C{tat}), the moment the bucket will be full again.  From it::

    tokens(now) = capacity - max(0, tat - now) * rate

so a bucket whose C{tat} has passed is exactly a fresh, full one and can be
forgotten.  That is what keeps the stores small: an entry only matters while
it is not full.

Every decision is the tuple C{(allowed, remaining, reset_after,
retry_after)}:

 - C{allowed}: whether this request may pass (it took a token);
 - C{remaining}: whole tokens left after it (requests that would pass now),
   or C{-1} when unknown (a shared store that fails open);
 - C{reset_after}: seconds until the bucket is full again, the "quota
   reset" of the IETF RateLimit header;
 - C{retry_after}: seconds until one request would pass (0 when allowed),
   what C{Retry-After} says on a 429.
"""

from __future__ import annotations

from math import floor

# Float noise must not turn an exact fit (the 50th request of a burst of
# 50) into a refusal, nor shave a token off C{remaining}.
_EPSILON = 1e-9


def capacity_of(requests: int, burst: int) -> int:
    """
    The bucket size for a route's C{rate_limit}: C{burst}, or C{requests}
    when C{burst} is 0 (the CONFIG.md rule).
    """
    return burst if burst > 0 else requests


def gcra(tat: float, now: float, interval: float, capacity: int):
    """
    One decision of a bucket, in its GCRA form.

    :param tat: the bucket's theoretical arrival time; any value at or
        before C{now} (for example 0.0) means a full bucket.
    :param now: the current time, in seconds, on the same clock as C{tat}.
    :param interval: seconds per token, C{1 / rate}.
    :param capacity: the bucket size, at least 1.
    :return: C{(new_tat, allowed, remaining, reset_after, retry_after)}:
        the C{tat} to store (unchanged when refused) and the decision.
    """
    if tat < now:
        tat = now
    new_tat = tat + interval
    # The latest tat a full bucket minus this request may have.
    allow_at = new_tat - capacity * interval
    if allow_at > now + _EPSILON:
        return tat, False, 0, tat - now, allow_at - now
    return (
        new_tat,
        True,
        int(floor((now - allow_at) / interval + _EPSILON)),
        new_tat - now,
        0.0,
    )


class TokenBucket:
    """
    One token bucket, for a single key.

    :param rate: tokens added per second (C{requests / per}), above 0.
    :param burst: the capacity: tokens a full bucket holds, at least 1.
    :raise ValueError: for a rate or capacity out of range.
    """

    __slots__ = ("rate", "capacity", "_interval", "_tat")

    def __init__(self, rate: float, burst: int):
        if not rate > 0:
            raise ValueError(f"rate must be above 0, got {rate!r}")
        if burst < 1:
            raise ValueError(f"burst must be at least 1, got {burst!r}")
        self.rate = float(rate)
        self.capacity = int(burst)
        self._interval = 1.0 / self.rate
        self._tat = float("-inf")

    def take(self, now: float):
        """
        Take one token at time C{now} if there is one.

        :param now: seconds on any monotonic-enough clock (the reactor's);
            calls must not go back in time by more than float noise.
        :return: C{(allowed, remaining, reset_after, retry_after)}, see the
            module docstring.
        """
        self._tat, allowed, remaining, reset_after, retry_after = gcra(
            self._tat, now, self._interval, self.capacity
        )
        return allowed, remaining, reset_after, retry_after

    def tokens(self, now: float) -> float:
        """The tokens in the bucket at time C{now} (fractional)."""
        return self.capacity - max(0.0, self._tat - now) * self.rate

    def full_at(self) -> float:
        """The time from which the bucket is full (and could be dropped)."""
        return self._tat
