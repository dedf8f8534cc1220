"""
Tests for L{balance.cluster.retry}: which failed tries are retried, how long
to back off, and the per-cluster retry budget.
"""

from __future__ import annotations

import random

from twisted.trial.unittest import SynchronousTestCase

from balance.cluster.retry import (
    IDEMPOTENT_METHODS,
    MAX_REPLAY_BODY,
    Outcome,
    RetryBudget,
    RetryPolicy,
)
from balance.config import model


class FixedRandom:
    """A random source that always answers C{value}."""

    def __init__(self, value: float):
        self.value = value

    def random(self) -> float:
        return self.value


def policy(on=("connect-failure",), attempts=3, base=0.025, maximum=0.25, rnd=None, **kw):
    config = model.Retry(
        attempts=attempts,
        on=tuple(on),
        backoff=model.Backoff(base=base, max=maximum),
        **kw,
    )
    return RetryPolicy(config, rnd or random.Random(5))


class OutcomeTests(SynchronousTestCase):
    """Outcomes classify a try once for retries, ejection and breakers."""

    def test_of_status(self):
        """A 5xx response is a failed try; anything else a success."""
        self.assertIs(Outcome.of_status(200), Outcome.SUCCESS)
        self.assertIs(Outcome.of_status(404), Outcome.SUCCESS)
        self.assertIs(Outcome.of_status(429), Outcome.SUCCESS)
        self.assertIs(Outcome.of_status(500), Outcome.STATUS_5XX)
        self.assertIs(Outcome.of_status(503), Outcome.STATUS_5XX)

    def test_failed(self):
        """Every outcome but success counts against the backend."""
        self.assertEqual(
            [o for o in Outcome if o.failed],
            [Outcome.CONNECT_FAILURE, Outcome.RESET, Outcome.TIMEOUT, Outcome.STATUS_5XX],
        )


class ConditionTests(SynchronousTestCase):
    """C{retry.on} conditions select the outcomes worth another try."""

    def test_connect_failure_only(self):
        """The default retries connect failures and nothing else."""
        p = policy()
        self.assertTrue(p.retries_on(Outcome.CONNECT_FAILURE))
        self.assertFalse(p.retries_on(Outcome.RESET))
        self.assertFalse(p.retries_on(Outcome.TIMEOUT))
        self.assertFalse(p.retries_on(Outcome.STATUS_5XX, 503))

    def test_reset_and_timeout(self):
        """C{reset} and C{timeout} name themselves only."""
        p = policy(on=("reset", "timeout"))
        self.assertTrue(p.retries_on(Outcome.RESET))
        self.assertTrue(p.retries_on(Outcome.TIMEOUT))
        self.assertFalse(p.retries_on(Outcome.CONNECT_FAILURE))
        self.assertFalse(p.retries_on(Outcome.STATUS_5XX, 500))

    def test_specific_codes(self):
        """A status code in C{on} retries exactly that status."""
        p = policy(on=("503", "429"))
        self.assertTrue(p.retries_on(Outcome.STATUS_5XX, 503))
        self.assertTrue(p.retries_on(Outcome.SUCCESS, 429))
        self.assertFalse(p.retries_on(Outcome.STATUS_5XX, 502))
        self.assertFalse(p.retries_on(Outcome.CONNECT_FAILURE))

    def test_5xx(self):
        """C{5xx} retries any 5xx answer, and no answer at all."""
        p = policy(on=("5xx",))
        for status in (500, 501, 502, 503, 504, 599):
            self.assertTrue(p.retries_on(Outcome.STATUS_5XX, status), status)
        for outcome in (Outcome.CONNECT_FAILURE, Outcome.RESET, Outcome.TIMEOUT):
            self.assertTrue(p.retries_on(outcome), outcome)
        self.assertFalse(p.retries_on(Outcome.SUCCESS, 404))

    def test_gateway_error(self):
        """
        C{gateway-error} retries 502, 503 and 504 and the failures a gateway
        answers those for, but not other 5xx.
        """
        p = policy(on=("gateway-error",))
        for status in (502, 503, 504):
            self.assertTrue(p.retries_on(Outcome.STATUS_5XX, status), status)
        for status in (500, 501):
            self.assertFalse(p.retries_on(Outcome.STATUS_5XX, status), status)
        for outcome in (Outcome.CONNECT_FAILURE, Outcome.RESET, Outcome.TIMEOUT):
            self.assertTrue(p.retries_on(outcome), outcome)


class ShouldRetryTests(SynchronousTestCase):
    """Attempts, methods and replayability bound retries."""

    def setUp(self):
        self.policy = policy(on=("connect-failure", "reset", "timeout", "5xx"), attempts=3)

    def test_attempts(self):
        """C{attempts} counts the first try: 3 means at most 2 retries."""
        p = self.policy
        self.assertTrue(p.should_retry(1, Outcome.RESET, b"GET", True))
        self.assertTrue(p.should_retry(2, Outcome.RESET, b"GET", True))
        self.assertFalse(p.should_retry(3, Outcome.RESET, b"GET", True))

    def test_single_attempt(self):
        """C{attempts: 1} never retries."""
        p = policy(attempts=1)
        self.assertFalse(p.should_retry(1, Outcome.CONNECT_FAILURE, b"GET", False))

    def test_idempotent_methods(self):
        """A request that reached the backend is retried only if idempotent."""
        for method in (b"GET", b"HEAD", b"OPTIONS", b"TRACE", b"PUT", b"DELETE", "GET"):
            self.assertTrue(self.policy.should_retry(1, Outcome.RESET, method, True), method)
            self.assertTrue(
                self.policy.should_retry(1, Outcome.STATUS_5XX, method, True, status=503), method
            )
        for method in (b"POST", b"PATCH", b"CONNECT", "POST"):
            self.assertFalse(self.policy.should_retry(1, Outcome.RESET, method, True), method)
            self.assertFalse(self.policy.should_retry(1, Outcome.TIMEOUT, method, True), method)
            self.assertFalse(
                self.policy.should_retry(1, Outcome.STATUS_5XX, method, True, status=503), method
            )
        self.assertEqual(len(IDEMPOTENT_METHODS), 12)

    def test_unsent_any_method(self):
        """
        A request that never left Balance (connect failure, dead pooled
        connection) may be sent again whatever its method.
        """
        for method in (b"POST", b"PATCH", b"GET"):
            self.assertTrue(
                self.policy.should_retry(1, Outcome.CONNECT_FAILURE, method, False), method
            )
            self.assertTrue(self.policy.should_retry(1, Outcome.RESET, method, False), method)

    def test_condition_still_applies_when_unsent(self):
        """Unsent requests are retried only on configured conditions."""
        p = policy(on=("503",))
        self.assertFalse(p.should_retry(1, Outcome.CONNECT_FAILURE, b"POST", False))

    def test_not_replayable(self):
        """
        A sent request whose body was not kept (over L{MAX_REPLAY_BODY}) is
        not retried; an unsent one still is (its body was not consumed).
        """
        self.assertEqual(MAX_REPLAY_BODY, 64 * 1024)
        self.assertFalse(self.policy.should_retry(1, Outcome.RESET, b"PUT", True, replayable=False))
        self.assertTrue(
            self.policy.should_retry(1, Outcome.CONNECT_FAILURE, b"PUT", False, replayable=False)
        )

    def test_success_not_retried(self):
        """A good answer is not retried unless its code is listed."""
        self.assertFalse(self.policy.should_retry(1, Outcome.SUCCESS, b"GET", True, status=200))

    def test_per_try_timeout(self):
        """The per-try timeout is carried for the proxy to apply."""
        self.assertIsNone(self.policy.per_try_timeout)
        self.assertEqual(policy(per_try_timeout=1.5).per_try_timeout, 1.5)


class BackoffTests(SynchronousTestCase):
    """Exponential backoff with full jitter."""

    def test_bounds(self):
        """
        The delay before retry n lies in [0, min(max, base * 2^(n-1))], and
        the ceiling grows then caps.
        """
        p = policy(base=0.025, maximum=0.25, rnd=random.Random(1))
        for attempt, ceiling in [(1, 0.025), (2, 0.05), (3, 0.1), (4, 0.2), (5, 0.25), (40, 0.25)]:
            delays = [p.delay(attempt) for _ in range(500)]
            self.assertTrue(all(0 <= d <= ceiling for d in delays), (attempt, max(delays)))
            # Full jitter: spread over the whole range, not bunched at the top.
            self.assertLess(min(delays), ceiling * 0.05)
            self.assertGreater(max(delays), ceiling * 0.95)
            mean = sum(delays) / len(delays)
            self.assertTrue(abs(mean - ceiling / 2) < ceiling * 0.1, (attempt, mean))

    def test_extremes(self):
        """The jitter source's extremes map to 0 and the ceiling."""
        self.assertEqual(policy(rnd=FixedRandom(0.0)).delay(3), 0.0)
        self.assertAlmostEqual(policy(rnd=FixedRandom(1.0)).delay(3), 0.1)
        self.assertAlmostEqual(policy(rnd=FixedRandom(1.0)).delay(1000), 0.25)

    def test_max_below_base(self):
        """A max below base does not shrink the first delay under base."""
        p = policy(base=0.1, maximum=0.05, rnd=FixedRandom(1.0))
        self.assertAlmostEqual(p.delay(1), 0.1)
        self.assertAlmostEqual(p.delay(5), 0.1)

    def test_zero_base(self):
        """A zero base means retry at once."""
        self.assertEqual(policy(base=0.0, maximum=0.0, rnd=FixedRandom(1.0)).delay(2), 0.0)


class BudgetTests(SynchronousTestCase):
    """The retry budget caps concurrent retries by the active requests."""

    def test_floor(self):
        """With little traffic, the floor of concurrent retries applies."""
        budget = RetryBudget(20, min_concurrent=3)
        budget.request_started()
        for _ in range(3):
            self.assertTrue(budget.can_retry())
            budget.retry_started()
        self.assertFalse(budget.can_retry())
        self.assertEqual(budget.rejected, 1)
        budget.retry_finished()
        self.assertTrue(budget.can_retry())

    def test_under_load(self):
        """
        With 1000 requests in flight and a 20% budget, 200 retries may run
        at once and the 201st is refused; as requests finish, so does room.
        """
        budget = RetryBudget(20, min_concurrent=3)
        for _ in range(1000):
            budget.request_started()
        granted = 0
        while budget.can_retry():
            budget.retry_started()
            granted += 1
        self.assertEqual(granted, 200)
        self.assertEqual(budget.rejected, 1)
        for _ in range(500):
            budget.request_finished()
        self.assertEqual(budget.limit, 100)
        self.assertFalse(budget.can_retry())
        for _ in range(101):
            budget.retry_finished()
        self.assertTrue(budget.can_retry())

    def test_storm_is_bounded(self):
        """
        When every try fails, retries never exceed the budget: a retry
        storm against a dead cluster cannot multiply the load.
        """
        budget = RetryBudget(10, min_concurrent=0)
        for _ in range(100):
            budget.request_started()
        for _ in range(100):
            if budget.can_retry():
                budget.retry_started()
        self.assertEqual(budget.retries, 10)
        self.assertEqual(budget.rejected, 90)

    def test_zero_percent(self):
        """A 0% budget allows only the floor."""
        budget = RetryBudget(0, min_concurrent=0)
        budget.request_started()
        self.assertFalse(budget.can_retry())

    def test_unbalanced_calls(self):
        """Finishing more than started is a bug, reported at once."""
        budget = RetryBudget(20)
        self.assertRaises(RuntimeError, budget.request_finished)
        self.assertRaises(RuntimeError, budget.retry_finished)

    def test_invalid(self):
        """Out-of-range settings are refused."""
        self.assertRaises(ValueError, RetryBudget, 101)
        self.assertRaises(ValueError, RetryBudget, -1)
        self.assertRaises(ValueError, RetryBudget, 20, -1)
