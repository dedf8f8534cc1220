# -*- test-case-name: tests.ratelimit.test_limiter -*-
"""
Rate limiting: token buckets per key, kept in a store.

 - L{balance.ratelimit.bucket}: the pure token bucket arithmetic;
 - L{balance.ratelimit.local}: an in-process store with bounded memory;
 - L{balance.ratelimit.redis}: a store shared by several Balance processes
   through Redis;
 - L{balance.ratelimit.limiter}: a route's C{rate_limit}: the key of a
   request, the decision, and the headers of the answer.

The store interface lives here until it joins L{balance.interfaces}.
"""

from __future__ import annotations

from zope.interface import Attribute, Interface

__all__ = ["IRateLimitStore", "build_store"]


class IRateLimitStore(Interface):
    """
    Where the token buckets of rate limits live.

    A store keeps one bucket per key and answers one question: may one more
    request with this key pass?  Buckets are created full on first use and
    forgotten once full again, so a store's size follows the keys that are
    actually being limited, not all keys ever seen.
    """

    synchronous = Attribute(
        "True when L{take} always answers at once with a tuple (never a "
        "Deferred), so a caller may skip pausing the request."
    )

    def take(key, rate, capacity):
        """
        Take one token from the bucket of C{key}.

        :param key: the bucket's name, C{bytes}; callers namespace it (the
            listener and route come first) so that routes do not share
            buckets by accident.
        :param rate: tokens added per second, a float above 0.
        :param capacity: tokens a full bucket holds, an int of at least 1.
        :return: the decision C{(allowed, remaining, reset_after,
            retry_after)} (see L{balance.ratelimit.bucket}), or a
            L{twisted.internet.defer.Deferred} that fires with one.  Such a
            Deferred never fails: a store that cannot decide answers with its
            failure mode instead.
        """


def build_store(config, reactor, max_keys: int | None = None):
    """
    The store a config asks for: Redis when C{rate_limit_store} is given,
    else an in-process store.

    :param config: the L{balance.config.model.RateLimitStore} or L{None}.
    :param reactor: the reactor (clock, and TCP for Redis).
    :param max_keys: for the local store, the most buckets kept at once
        (its default when L{None}).
    :return: a provider of L{IRateLimitStore}.  A Redis store is an
        L{twisted.application.service.IService}: add it to the service tree
        so that it connects on start and disconnects on stop.
    """
    if config is None:
        from balance.ratelimit.local import LocalRateLimitStore

        if max_keys is None:
            return LocalRateLimitStore(reactor)
        return LocalRateLimitStore(reactor, max_keys=max_keys)
    from balance.ratelimit.redis import RedisRateLimitStore

    return RedisRateLimitStore.from_url(config.redis, reactor, failure_mode=config.failure_mode)
