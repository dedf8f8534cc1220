"""
A route's rate limit: which bucket a request uses, the decision, and the
header fields clients see.
"""

from __future__ import annotations

from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from balance.config import model
from balance.observe.metrics import Counter
from balance.ratelimit.limiter import Decision, RateLimiter
from balance.ratelimit.local import LocalRateLimitStore

HEADERS = [(b"Host", b"example.com"), (b"X-Api-Key", b"k1"), (b"Accept", b"*/*")]


def limiter(key="client_ip", requests=100, per=1.0, burst=50, name="web.0", store=None, **kw):
    clock = Clock()
    clock.advance(1000)
    config = model.RateLimit(requests=requests, per=per, burst=burst, key=key)
    return RateLimiter(config, store or LocalRateLimitStore(clock), name, **kw), clock


class KeyTests(SynchronousTestCase):
    """The bucket a request draws from."""

    def test_client_ip(self):
        """key: client_ip gives one bucket per address, under the limit's name."""
        lim, _ = limiter()
        self.assertEqual(lim.key(b"10.0.0.1", HEADERS), b"web.0|10.0.0.1")

    def test_header(self):
        """key: header:NAME uses the header's value, whatever the name's case."""
        lim, _ = limiter(key="header:x-api-key")
        self.assertEqual(lim.key(b"10.0.0.1", HEADERS), b"web.0|h:k1")
        lim, _ = limiter(key="header:X-API-KEY")
        self.assertEqual(lim.key(b"10.0.0.1", HEADERS), b"web.0|h:k1")

    def test_header_missing(self):
        """
        A request without the header is limited by its address: leaving
        the header out neither escapes the limit nor shares a bucket with
        every other such client.
        """
        lim, _ = limiter(key="header:x-api-key")
        self.assertEqual(lim.key(b"10.0.0.1", [(b"Host", b"a")]), b"web.0|10.0.0.1")
        # A header value that looks like an address is another bucket.
        self.assertNotEqual(
            lim.key(b"10.0.0.1", [(b"x-api-key", b"10.0.0.1")]),
            lim.key(b"10.0.0.1", []),
        )

    def test_long_header_hashed(self):
        """Long header values are hashed, so keys stay small."""
        lim, _ = limiter(key="header:x-api-key")
        key = lim.key(b"10.0.0.1", [(b"x-api-key", b"v" * 10_000)])
        self.assertLess(len(key), 40)
        self.assertEqual(key, lim.key(b"10.0.0.2", [(b"x-api-key", b"v" * 10_000)]))

    def test_route(self):
        """key: route gives the whole route one bucket."""
        lim, _ = limiter(key="route")
        self.assertEqual(lim.key(b"10.0.0.1", HEADERS), lim.key(b"10.0.0.2", []))


class DecisionTests(SynchronousTestCase):
    """Decisions and their header fields."""

    def test_burst(self):
        """
        requests: 100, per: 1s, burst: 50 lets 50 requests through at once,
        then refuses with Retry-After and the IETF RateLimit fields.
        """
        lim, clock = limiter()
        decisions = [lim.check(b"10.0.0.1", HEADERS) for _ in range(51)]
        self.assertTrue(all(type(d) is Decision for d in decisions))
        self.assertEqual(sum(d.allowed for d in decisions), 50)
        self.assertEqual(decisions[0].remaining, 49)
        last = decisions[-1]
        self.assertFalse(last.allowed)
        self.assertEqual(
            last.reject_headers(),
            b"Retry-After: 1\r\n"
            b'RateLimit-Policy: "web.0";q=100;w=1\r\n'
            b'RateLimit: "web.0";r=0;t=1\r\n',
        )
        # Another client is not affected.
        self.assertTrue(lim.check(b"10.0.0.2", HEADERS).allowed)
        # Refills at 100 a second.
        clock.advance(0.01)
        self.assertTrue(lim.check(b"10.0.0.1", HEADERS).allowed)

    def test_burst_zero(self):
        """With burst 0, the bucket holds C{requests}."""
        lim, _ = limiter(requests=3, per=60.0, burst=0)
        self.assertEqual(
            [lim.check(b"1.1.1.1", []).allowed for _ in range(4)], [True, True, True, False]
        )

    def test_retry_after_rounds_up(self):
        """Retry-After is whole seconds, rounded up: 1 per minute says 60."""
        lim, clock = limiter(requests=1, per=60.0, burst=0)
        lim.check(b"1.1.1.1", [])
        clock.advance(0.5)
        d = lim.check(b"1.1.1.1", [])
        self.assertEqual(d.retry_after_seconds(), 60)
        self.assertIn(b'RateLimit: "web.0";r=0;t=60\r\n', d.reject_headers())
        self.assertIn(b'RateLimit-Policy: "web.0";q=1;w=60\r\n', d.reject_headers())

    def test_allowed_headers(self):
        """Allowed responses may carry the policy and the live state."""
        lim, _ = limiter(requests=10, per=1.0, burst=0)
        d = lim.check(b"1.1.1.1", [])
        self.assertEqual(
            d.response_headers(),
            [(b"ratelimit-policy", b'"web.0";q=10;w=1'), (b"ratelimit", b'"web.0";r=9;t=1')],
        )

    def test_window_scaled(self):
        """
        A window that is not whole seconds is rounded and the quota scaled:
        10 per 500ms is advertised as 20 per second.
        """
        lim, _ = limiter(requests=10, per=0.5)
        self.assertEqual(lim.policy, b'"web.0";q=20;w=1')
        lim, _ = limiter(requests=10, per=90.0)
        self.assertEqual(lim.policy, b'"web.0";q=10;w=90')

    def test_policy_name_escaped(self):
        """The policy name is a valid structured-field string."""
        lim, _ = limiter(name='we"b\\1\n')
        self.assertEqual(lim.policy_name, b'"we\\"b\\\\1_"')

    def test_counter(self):
        """Each refusal counts once in the given counter."""
        counter = Counter()
        lim, _ = limiter(requests=1, per=1.0, burst=0, counter=counter)
        for _ in range(4):
            lim.check(b"1.1.1.1", [])
        self.assertEqual(counter.value, 3)

    def test_unknown_remaining(self):
        """
        A decision with unknown remaining (a shared store failing open)
        sends the policy but no RateLimit state.
        """
        lim, _ = limiter()
        d = Decision(lim, True, -1, 0.0, 0.0)
        self.assertEqual(d.response_headers(), [(b"ratelimit-policy", lim.policy)])
        d = Decision(lim, False, -1, 1.0, 1.0)
        self.assertNotIn(b"RateLimit:", d.reject_headers())

    def test_asynchronous_store(self):
        """
        With a store that answers later, check() returns a Deferred that
        fires with the Decision.
        """

        class Later:
            synchronous = False

            def __init__(self):
                self.calls = []

            def take(self, key, rate, capacity):
                d = Deferred()
                self.calls.append((key, rate, capacity, d))
                return d

        store = Later()
        lim, _ = limiter(store=store)
        result = lim.check(b"10.0.0.1", [])
        self.assertIsInstance(result, Deferred)
        self.assertNoResult(result)
        [(key, rate, capacity, d)] = store.calls
        self.assertEqual((key, rate, capacity), (b"web.0|10.0.0.1", 100.0, 50))
        d.callback((False, 0, 0.5, 0.01))
        decision = self.successResultOf(result)
        self.assertFalse(decision.allowed)
        self.assertEqual(decision.retry_after_seconds(), 1)
