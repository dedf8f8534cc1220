# -*- test-case-name: tests.cluster.test_retry -*-
"""
Retrying a failed upstream try: which failures are worth another try, how
long to wait before it, and how many retries a cluster can afford at once.

Everything here is pure: no reactor, no sockets, no logging.  The proxy
classifies each finished try into an L{Outcome} once and hands it to
L{RetryPolicy.should_retry}, to L{balance.cluster.outlier.OutlierDetector}
and to L{balance.cluster.breaker.BackendBreaker}.

The rules, in order (L{RetryPolicy.should_retry}):

 1. At most C{retry.attempts} tries in all, the first included.
 2. A request whose body was not kept for replay (larger than
    L{MAX_REPLAY_BODY}, or already streamed) is never retried once any of
    it was sent.
 3. A request that reached the backend (C{request_sent}) is retried only
    when its method is idempotent (RFC 9110 section 9.2.2: GET, HEAD,
    OPTIONS, TRACE, PUT, DELETE).  A request that never left Balance (the
    connect failed, or a pooled connection turned out closed before it was
    written) is safe to send again whatever its method.
 4. The outcome must match one of the route's C{retry.on} conditions.
 5. The cluster's L{RetryBudget} must have room.
"""

from __future__ import annotations

import enum
import random as _random

from balance.config import model

#: The largest request body Balance keeps in memory to replay on a retry.
#: A request with a bigger (or chunked, unbounded) body is streamed to the
#: backend as it arrives and is not retried once any of it was sent.
MAX_REPLAY_BODY = 64 * 1024

#: RFC 9110 section 9.2.2.  Methods as the downstream parser hands them over.
IDEMPOTENT_METHODS = frozenset(
    {b"GET", b"HEAD", b"OPTIONS", b"TRACE", b"PUT", b"DELETE"}
    | {"GET", "HEAD", "OPTIONS", "TRACE", "PUT", "DELETE"}
)

_GATEWAY_STATUSES = frozenset({502, 503, 504})


class Outcome(enum.Enum):
    """
    How one upstream try ended, as the proxy classifies it.  The same value
    feeds retries, outlier detection and the per-backend breaker.
    """

    #: A response other than 5xx arrived.
    SUCCESS = "success"
    #: The TCP (or TLS) connection to the backend could not be made:
    #: refused, unreachable, connect timeout.  Nothing was sent.
    CONNECT_FAILURE = "connect_failure"
    #: The connection was reset or closed before a complete response head.
    RESET = "reset"
    #: The per-try timeout (or the route timeout) expired first.
    TIMEOUT = "timeout"
    #: The backend answered with a 5xx status.
    STATUS_5XX = "status_5xx"

    @classmethod
    def of_status(cls, status: int) -> Outcome:
        """
        The outcome of a try that got a response with C{status}.

        :param status: the HTTP status code of the backend's response.
        """
        return cls.STATUS_5XX if status >= 500 else cls.SUCCESS

    @property
    def failed(self) -> bool:
        """Whether this outcome counts against the backend."""
        return self is not Outcome.SUCCESS


def _matcher(conditions) -> tuple[frozenset[Outcome], frozenset[int], bool]:
    """
    Compile C{retry.on} into the outcomes retried whatever the status, the
    exact statuses retried, and whether any 5xx is.
    """
    outcomes: set[Outcome] = set()
    statuses: set[int] = set()
    any_5xx = False
    for condition in conditions:
        if condition == "connect-failure":
            outcomes.add(Outcome.CONNECT_FAILURE)
        elif condition == "reset":
            outcomes.add(Outcome.RESET)
        elif condition == "timeout":
            outcomes.add(Outcome.TIMEOUT)
        elif condition == "5xx":
            # As Envoy's 5xx: any 5xx answer, or no answer at all.
            outcomes.update((Outcome.CONNECT_FAILURE, Outcome.RESET, Outcome.TIMEOUT))
            any_5xx = True
        elif condition == "gateway-error":
            # The failures a gateway itself would answer 502/503/504 for,
            # and those statuses from the backend.
            outcomes.update((Outcome.CONNECT_FAILURE, Outcome.RESET, Outcome.TIMEOUT))
            statuses.update(_GATEWAY_STATUSES)
        else:
            statuses.add(int(condition))
    return frozenset(outcomes), frozenset(statuses), any_5xx


class RetryPolicy:
    """
    The retry rules of one route, compiled once from its config.

    :ivar attempts: total tries allowed, the first included.
    :ivar per_try_timeout: seconds one try may take before the proxy
        abandons it (and retries it if the policy says so), or L{None} for
        no per-try limit (the route timeout still applies).
    :ivar lowest_status: the lowest response status C{retry.on} names (600
        when none): a response below it is never retried, which the proxy
        can tell without asking.
    """

    __slots__ = (
        "attempts",
        "per_try_timeout",
        "lowest_status",
        "_outcomes",
        "_statuses",
        "_any_5xx",
        "_base",
        "_max",
        "_random",
    )

    def __init__(self, config: model.Retry, random: _random.Random | None = None):
        """
        :param config: the route's validated C{retry:} section.
        :param random: the source of backoff jitter; a fresh
            L{random.Random} when L{None}.  Tests pass a seeded one.
        """
        self.attempts = config.attempts
        self.per_try_timeout = config.per_try_timeout
        self._outcomes, self._statuses, self._any_5xx = _matcher(config.on)
        self.lowest_status = min(self._statuses | ({500} if self._any_5xx else set()), default=600)
        self._base = config.backoff.base
        self._max = max(config.backoff.max, config.backoff.base)
        self._random = random if random is not None else _random.Random()

    def retries_on(self, outcome: Outcome, status: int = 0) -> bool:
        """
        Whether C{retry.on} names this outcome, ignoring attempts, method
        and budget.

        :param outcome: how the try ended.
        :param status: the response status for L{Outcome.STATUS_5XX} (and
            for any response the route may retry on by code, such as 429).
        """
        if outcome in self._outcomes:
            return True
        if status:
            return status in self._statuses or (self._any_5xx and status >= 500)
        return False

    def should_retry(
        self,
        attempt: int,
        outcome: Outcome,
        method,
        request_sent: bool,
        status: int = 0,
        replayable: bool = True,
    ) -> bool:
        """
        Decide whether a failed try gets another one (budget aside: ask
        L{RetryBudget.can_retry} after this says yes).

        :param attempt: tries made so far, the one that just ended included
            (1 after the first try).
        :param outcome: how that try ended.
        :param method: the request method, C{bytes} or C{str}, upper case.
        :param request_sent: whether any byte of the request may have
            reached the backend.  L{False} only for a connect failure, or a
            pooled connection found closed before the request was written.
        :param status: the response status, when there was a response.
        :param replayable: whether the proxy still holds the whole request
            body (no body, or one of at most L{MAX_REPLAY_BODY} bytes kept
            in memory).
        """
        if attempt >= self.attempts:
            return False
        if request_sent and not (replayable and method in IDEMPOTENT_METHODS):
            return False
        return self.retries_on(outcome, status)

    def delay(self, attempt: int) -> float:
        """
        Seconds to wait before the next try: exponential backoff with full
        jitter, uniform in C{[0, min(backoff.max, backoff.base * 2 **
        (attempt - 1))]}.

        :param attempt: tries made so far (1 before the first retry).
        """
        # min() before the power would overflow for absurd attempt counts.
        ceiling = self._base * (2 ** min(attempt - 1, 62)) if attempt > 0 else self._base
        return self._random.random() * min(self._max, ceiling)


class RetryBudget:
    """
    How many retries a cluster may have in flight at once: at most
    C{percent} of its active requests, but always at least C{min_concurrent}
    so that a cluster with little traffic can still retry.

    This is Envoy's retry budget (and Finagle's, by concurrency rather than
    by rate): when a backend fails every request, retries cannot multiply
    the load on the others beyond the budget, and a retry storm stops by
    itself.

    A request counts from L{request_started} to L{request_finished}, once,
    however many tries it takes; a retry counts from L{retry_started} to
    L{retry_finished}.

    :ivar active: requests in flight.
    :ivar retries: retries in flight.
    :ivar rejected: retries refused for want of budget, since creation.
    """

    __slots__ = ("percent", "min_concurrent", "active", "retries", "rejected")

    def __init__(self, percent: float, min_concurrent: int = 3):
        """
        :param percent: the route's C{retry.budget}, 0 to 100.
        :param min_concurrent: retries always allowed at once, whatever the
            traffic.
        """
        if not 0 <= percent <= 100:
            raise ValueError(f"retry budget must be 0% to 100%, got {percent}%")
        if min_concurrent < 0:
            raise ValueError(f"min_concurrent must not be negative, got {min_concurrent}")
        self.percent = percent
        self.min_concurrent = min_concurrent
        self.active = 0
        self.retries = 0
        self.rejected = 0

    @property
    def limit(self) -> int:
        """Retries allowed in flight right now."""
        return max(self.min_concurrent, int(self.active * self.percent / 100))

    def request_started(self) -> None:
        """A request to the cluster started (before its first try)."""
        self.active += 1

    def request_finished(self) -> None:
        """A request counted by L{request_started} ended, however it ended."""
        if self.active <= 0:
            raise RuntimeError("request_finished without request_started")
        self.active -= 1

    def can_retry(self) -> bool:
        """
        Whether one more retry fits the budget; counts a refusal in
        C{rejected}.  Does not reserve it: call L{retry_started} when the
        retry goes ahead.
        """
        if self.retries < self.limit:
            return True
        self.rejected += 1
        return False

    def retry_started(self) -> None:
        """A retry (a second or later try) started its backoff or its try."""
        self.retries += 1

    def retry_finished(self) -> None:
        """A retry counted by L{retry_started} ended."""
        if self.retries <= 0:
            raise RuntimeError("retry_finished without retry_started")
        self.retries -= 1


__all__ = [
    "IDEMPOTENT_METHODS",
    "MAX_REPLAY_BODY",
    "Outcome",
    "RetryBudget",
    "RetryPolicy",
]
