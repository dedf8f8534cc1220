# -*- test-case-name: tests.ratelimit.test_limiter -*-
"""
A route's C{rate_limit}: which bucket a request draws from, the decision,
and the header fields that tell the client about it.

Header fields follow the IETF draft "RateLimit header fields for HTTP"
(draft-ietf-httpapi-ratelimit-headers-08 to -10, the structured-field
form that replaced the older C{RateLimit-Limit}/C{-Remaining}/C{-Reset}
trio)::

    RateLimit-Policy: "web.0";q=100;w=1
    RateLimit: "web.0";r=49;t=1

 - C{RateLimit-Policy} is a list of quota policies; each item is the
   policy's name (an sf-string) with parameters C{q}, the quota, and C{w},
   the window in whole seconds.  Balance states its long-run rate:
   C{q=requests;w=per}.  (The draft has no burst parameter; the burst shows
   as the C{r} of a fresh bucket.)  When C{per} is not a whole number of
   seconds, the window is rounded (at least 1 s) and the quota scaled to it.
 - C{RateLimit} gives the live state: C{r}, the requests that would pass
   now, and C{t}, the whole seconds until the bucket is full again (the
   draft's "quota reset"), rounded up.
 - A refused request (429) also gets C{Retry-After}, the whole seconds,
   rounded up and at least 1, until one request would pass again.
"""

from __future__ import annotations

import hashlib
from math import ceil

from balance.config import model
from balance.ratelimit.bucket import capacity_of

# Longer keys (a client-chosen header value) are hashed, so that a store
# holding 100k keys cannot be made to hold 100k large values.
_MAX_KEY_VALUE = 64


def _sf_string(text: str) -> bytes:
    """C{text} as a structured-field sf-string (RFC 8941 3.3.3)."""
    printable = "".join(ch if " " <= ch <= "~" else "_" for ch in text)
    return b'"' + printable.replace("\\", "\\\\").replace('"', '\\"').encode("ascii") + b'"'


def _window(requests: int, per: float) -> tuple[int, int]:
    """The C{(q, w)} of the policy header: whole seconds, same rate."""
    window = max(1, round(per))
    if window == per:
        return requests, window
    return max(1, round(requests * window / per)), window


class Decision:
    """
    The answer for one request.

    :ivar allowed: whether the request may pass.
    :ivar remaining: requests that would pass now, or -1 when unknown (a
        shared store failing open); then no C{RateLimit} field is sent.
    :ivar reset_after: seconds until the bucket is full again.
    :ivar retry_after: seconds until one request would pass (0 if allowed).
    :ivar limiter: the L{RateLimiter} that decided.
    """

    __slots__ = ("limiter", "allowed", "remaining", "reset_after", "retry_after")

    def __init__(self, limiter, allowed, remaining, reset_after, retry_after):
        self.limiter = limiter
        self.allowed = allowed
        self.remaining = remaining
        self.reset_after = reset_after
        self.retry_after = retry_after

    def retry_after_seconds(self) -> int:
        """The value of C{Retry-After}: whole seconds, at least 1."""
        return max(1, ceil(self.retry_after - 1e-9))

    def _state(self) -> bytes | None:
        if self.remaining < 0:
            return None
        return b"%s;r=%d;t=%d" % (
            self.limiter.policy_name,
            self.remaining,
            ceil(self.reset_after - 1e-9),
        )

    def reject_headers(self) -> bytes:
        """
        The header lines of a 429 answer, each ending in CRLF:
        C{Retry-After}, C{RateLimit-Policy} and (when known) C{RateLimit}.
        Pass them as C{extra} to L{balance.http.proxy.local_response}.
        """
        state = self._state()
        return b"Retry-After: %d\r\nRateLimit-Policy: %s\r\n%s" % (
            self.retry_after_seconds(),
            self.limiter.policy,
            b"" if state is None else b"RateLimit: " + state + b"\r\n",
        )

    def response_headers(self) -> list[tuple[bytes, bytes]]:
        """
        The fields to add to an allowed response (optional, per route):
        C{(name, value)} pairs with lower-case names.
        """
        state = self._state()
        if state is None:
            return [(b"ratelimit-policy", self.limiter.policy)]
        return [(b"ratelimit-policy", self.limiter.policy), (b"ratelimit", state)]

    def __repr__(self) -> str:
        return "<Decision allowed=%r remaining=%r reset_after=%.3f retry_after=%.3f>" % (
            self.allowed,
            self.remaining,
            self.reset_after,
            self.retry_after,
        )


class RateLimiter:
    """
    The rate limit of one route: built once per config, shared by all its
    requests.

    :param config: the route's L{balance.config.model.RateLimit}.
    :param store: the L{balance.ratelimit.IRateLimitStore} holding buckets;
        one store serves every route.
    :param name: what identifies this limit across routes, listeners and
        (with Redis) processes: it prefixes every key and names the policy
        in the header fields.  Use C{"<listener>.<route label>"}.
    :param counter: an object whose C{value} attribute counts refusals, for
        example from L{balance.observe.metrics.Metrics.rate_limited}; or
        L{None}.

    :ivar rate: tokens per second.
    :ivar capacity: the bucket size.
    :ivar policy: the value of C{RateLimit-Policy}, bytes.
    :ivar policy_name: the policy name as an sf-string, bytes.
    """

    def __init__(self, config: model.RateLimit, store, name: str = "default", counter=None):
        self.config = config
        self.name = name
        self.rate = config.requests / config.per
        self.capacity = capacity_of(config.requests, config.burst)
        self._store = store
        self._counter = counter
        self._prefix = name.encode("utf-8") + b"|"
        self._header = None
        if config.key.startswith("header:"):
            self._header = config.key[len("header:") :].strip().lower().encode("ascii")
        self._by_route = config.key == "route"
        self.policy_name = _sf_string(name)
        q, w = _window(config.requests, config.per)
        self.policy = b"%s;q=%d;w=%d" % (self.policy_name, q, w)

    def key(self, client_ip: bytes, headers) -> bytes:
        """
        The bucket key of a request.

        - C{client_ip}: one bucket per client address;
        - C{header:NAME}: one per value of that request header (the first
          one, compared exactly); a request without it falls back to its
          client address, so leaving the header out does not escape the
          limit, nor put all such clients in one bucket;
        - C{route}: one bucket for the whole route.

        :param client_ip: the client address as ASCII bytes.
        :param headers: the request headers, C{[(name, value)]} bytes pairs
            as received (any case).
        """
        if self._by_route:
            return self._prefix
        wanted = self._header
        if wanted is not None:
            size = len(wanted)
            for name, value in headers:
                if len(name) == size and name.lower() == wanted:
                    if len(value) > _MAX_KEY_VALUE:
                        value = hashlib.blake2b(value, digest_size=16).digest()
                    return self._prefix + b"h:" + value
        return self._prefix + client_ip

    def check(self, client_ip: bytes, headers):
        """
        Decide whether a request may pass, taking a token if it may.

        :param client_ip: see L{key}.
        :param headers: see L{key}.
        :return: a L{Decision} right away when the store is local, else a
            L{twisted.internet.defer.Deferred} that fires with one and never
            fails.  Test which with C{type(result) is Decision}.
        """
        result = self._store.take(self.key(client_ip, headers), self.rate, self.capacity)
        if type(result) is tuple:
            return self._decide(result)
        return result.addCallback(self._decide)

    def _decide(self, result) -> Decision:
        allowed, remaining, reset_after, retry_after = result
        if not allowed and self._counter is not None:
            self._counter.value += 1
        return Decision(self, allowed, remaining, reset_after, retry_after)
