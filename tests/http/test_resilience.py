# -*- test-case-name: tests.http.test_resilience -*-
"""
Tests for the load-balancing and resilience wiring of L{balance.http.proxy}:
which backend a request goes to (sticky cookies, hashing, load), and what
happens when backends fail (retries, budgets, per-try timeouts, circuit
breakers, health checks, outlier ejection, panic, C{Retry-After}), in
memory (L{balance.testing.InMemoryProxy}) on a L{task.Clock}.
"""

from __future__ import annotations

from random import Random

from twisted.trial.unittest import SynchronousTestCase

from balance.cluster.breaker import BreakerState, Limit
from balance.cluster.health import HealthChecker
from balance.http.upstream import UpstreamConnection
from balance.testing import InMemoryProxy, parse_requests

A, B, C = "10.0.0.1:80", "10.0.0.2:80", "10.0.0.3:80"
OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
UNAVAILABLE = b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 4\r\n\r\nbusy"

RETRY = """
listeners:
  - name: web
    listen: "tcp:8080"
    routes:
      - match: {path_prefix: /r/}
        cluster: app
        timeout: 10s
        retry:
          attempts: 3
          on: [connect-failure, reset, timeout, "503"]
          backoff: {base: 100ms, max: 100ms}
          per_try_timeout: 1s
          budget: 20%
      - match: {path_prefix: /}
        cluster: app
        timeout: 2s
clusters:
  - name: app
    backends: ["10.0.0.1:80", "10.0.0.2:80", "10.0.0.3:80"]
    panic_threshold: 0%
"""


def request(
    path: bytes = b"/", *headers: bytes, method: bytes = b"GET", body: bytes = b""
) -> bytes:
    """A request for C{path} with C{headers} (full lines) and C{body}."""
    if body or method in (b"POST", b"PUT"):
        headers = (*headers, b"Content-Length: %d" % len(body))
    return (
        method
        + b" "
        + path
        + b" HTTP/1.1\r\nHost: example.com\r\n"
        + b"".join(h + b"\r\n" for h in headers)
        + b"\r\n"
        + body
    )


class ResilienceTestCase(SynchronousTestCase):
    """An in-memory proxy over three backends, with helpers."""

    config = RETRY

    def setUp(self):
        self.proxy = InMemoryProxy(self.config)
        self.cluster = self.proxy.clusters["app"]
        self.a, self.b, self.c = (self.proxy.backend(x) for x in (A, B, C))

    def send(self, data: bytes, host: str = "192.0.2.10"):
        """A new client sends C{data}; return it once the proxy has run."""
        client = self.proxy.client(host)
        client.send(data)
        self.proxy.run()
        return client

    def requests(self, endpoint) -> list:
        """The HTTP requests C{endpoint} received, on every connection."""
        return [
            r
            for conn in endpoint.connections
            if isinstance(conn.protocol, UpstreamConnection)
            for r in parse_requests(conn.received())
        ]

    def answer(self, endpoint, data: bytes = OK) -> None:
        """C{endpoint} answers on its latest connection."""
        endpoint.connections[-1].respond(data)
        self.proxy.run()

    def status(self, client) -> int:
        [response] = client.responses()
        return response.status

    def runtime(self, address: str):
        return self.cluster.backend(address)

    def assert_clean(self) -> None:
        """Nothing is left counted: requests, tries, retries, waiting requests."""
        breakers = self.cluster.breakers
        self.assertEqual(
            (breakers.count(Limit.REQUESTS), breakers.count(Limit.PENDING)),
            (0, 0),
        )
        self.assertEqual([b.active for b in self.cluster.backends], [0, 0, 0])
        for _, budget in self.proxy.context.retry_policies.values():
            self.assertEqual((budget.active, budget.retries), (0, 0))

    def budget(self):
        [(_, budget)] = self.proxy.context.retry_policies.values()
        return budget


class RetryTests(ResilienceTestCase):
    """Routes with C{retry:} try again where it is safe."""

    def test_connect_failure_fails_over_at_once(self):
        """
        A refused connection goes to another backend at once, as without
        C{retry:}, and outside the budget: the backend never saw the
        request, and a retry policy must not make failover worse than none.
        """
        self.a.mode = "refuse"
        client = self.send(request(b"/r/x"))
        self.assertEqual((self.a.attempts, self.b.attempts), (1, 1))
        self.answer(self.b)
        self.assertEqual(self.status(client), 200)
        self.assertEqual(self.runtime(A).breaker.failures, 1)
        self.assertEqual((self.budget().retries, self.budget().rejected), (0, 0))
        self.assert_clean()

    def test_connect_failures_beyond_budget(self):
        """
        A burst of requests meeting a refusing backend all fail over, even
        where their retries would not all fit the budget (at least 3).
        """
        self.a.mode = "refuse"
        clients = [self.proxy.client() for _ in range(6)]
        for client in clients:
            client.send(request(b"/r/x"))
        self.proxy.run()
        self.assertEqual(self.a.attempts, 2)
        for endpoint in (self.b, self.c):
            for conn in endpoint.connections:
                if conn.received():
                    conn.respond(OK)
        self.proxy.run()
        self.assertEqual([self.status(c) for c in clients], [200] * 6)
        self.assertEqual(self.budget().rejected, 0)
        self.assert_clean()

    def test_connect_failover_without_retry(self):
        """Without C{retry:}, a refusing backend is skipped at once (nothing was sent)."""
        self.a.mode = "refuse"
        client = self.send(request(b"/x"))
        self.assertEqual((self.a.attempts, self.b.attempts), (1, 1))
        self.answer(self.b)
        self.assertEqual(self.status(client), 200)
        self.assert_clean()

    def test_all_refuse(self):
        """Each try refused: after C{attempts} tries, 502."""
        for endpoint in (self.a, self.b, self.c):
            endpoint.mode = "refuse"
        client = self.send(request(b"/r/x"))
        self.proxy.run(0.1)
        self.proxy.run(0.1)
        self.assertEqual(self.status(client), 502)
        self.assertEqual([e.attempts for e in (self.a, self.b, self.c)], [1, 1, 1])
        self.assert_clean()

    def test_get_retried_on_reset(self):
        """An idempotent GET whose connection is reset before any answer goes to another backend."""
        client = self.send(request(b"/r/x"))
        self.a.connections[0].reset()
        self.proxy.run(0.1)
        [retried] = self.requests(self.b)
        self.assertEqual(retried.target, b"/r/x")
        self.answer(self.b)
        self.assertEqual(self.status(client), 200)
        self.assert_clean()

    def test_post_sent_not_retried(self):
        """A POST that reached a backend is never sent twice: a reset is a 502."""
        client = self.send(request(b"/r/x", method=b"POST", body=b"pay"))
        [sent] = self.requests(self.a)
        self.assertEqual(sent.body, b"pay")
        self.a.connections[0].reset()
        self.proxy.run(1)
        self.assertEqual(self.status(client), 502)
        self.assertEqual((self.b.attempts, self.c.attempts), (0, 0))
        self.assert_clean()

    def test_put_body_replayed(self):
        """An idempotent PUT with a small body is replayed whole on the next backend."""
        client = self.send(request(b"/r/x", method=b"PUT", body=b"state"))
        self.a.connections[0].reset()
        self.proxy.run(0.1)
        [replayed] = self.requests(self.b)
        self.assertEqual((replayed.method, replayed.body), (b"PUT", b"state"))
        self.answer(self.b)
        self.assertEqual(self.status(client), 200)

    def test_large_body_not_replayed(self):
        """A body larger than the replay limit (64 KiB) is not kept: no retry once sent."""
        client = self.send(request(b"/r/x", method=b"PUT", body=b"x" * 70000))
        self.a.connections[0].reset()
        self.proxy.run(1)
        self.assertEqual(self.status(client), 502)
        self.assertEqual(self.b.attempts, 0)

    def test_retry_on_status(self):
        """
        A status named in C{retry.on} is not passed on: the backend's
        connection is dropped, with the rest of its response, and another
        backend answers.
        """
        client = self.send(request(b"/r/x"))
        self.answer(self.a, UNAVAILABLE)
        self.assertTrue(self.a.connections[0].aborted)
        self.assertEqual(client.received(), b"")
        self.proxy.run(0.1)
        self.answer(self.b)
        [response] = client.responses()
        self.assertEqual((response.status, response.body), (200, b"ok"))
        self.assert_clean()

    def test_status_not_listed_passed_on(self):
        """A status not in C{retry.on} is the answer."""
        client = self.send(request(b"/r/x"))
        self.answer(self.a, b"HTTP/1.1 500 Oops\r\nContent-Length: 0\r\n\r\n")
        self.assertEqual(self.status(client), 500)
        self.assertEqual(self.b.attempts, 0)

    def test_last_try_status_passed_on(self):
        """When no try is left, the last backend's answer is the client's, body and all."""
        client = self.send(request(b"/r/x"))
        for endpoint in (self.a, self.b, self.c):
            self.answer(endpoint, UNAVAILABLE)
            self.proxy.run(0.1)
        [response] = client.responses()
        self.assertEqual((response.status, response.body), (503, b"busy"))
        self.assert_clean()

    def test_budget_exhausted(self):
        """
        Retries in flight are capped by the budget (at least 3 at once):
        the fourth request in a burst answered 503 gets that answer, not a
        retry.
        """
        clients = [self.proxy.client() for _ in range(4)]
        for client in clients:
            client.send(request(b"/r/x"))
        self.proxy.run()
        first = []
        for endpoint in (self.a, self.b, self.c):
            for conn in endpoint.connections:
                if conn.received():
                    first.append(conn)
                    conn.respond(UNAVAILABLE)
        self.proxy.run()
        self.assertEqual(self.budget().retries, 3)
        self.assertEqual(self.budget().rejected, 1)
        answered = [c for c in clients if c.received()]
        self.assertEqual([self.status(c) for c in answered], [503])
        self.proxy.run(0.1)
        self.proxy.run()
        for endpoint in (self.a, self.b, self.c):
            for conn in endpoint.connections:
                for _ in range(len(conn.requests()) - first.count(conn)):
                    conn.respond(OK)
        self.proxy.run()
        self.assertEqual(sorted(self.status(c) for c in clients), [200, 200, 200, 503])
        self.assert_clean()

    def test_per_try_timeout(self):
        """A backend slower than C{per_try_timeout} is abandoned and the request retried."""
        client = self.send(request(b"/r/x"))
        self.proxy.run(0.9)
        self.assertEqual(self.b.attempts, 0)
        self.proxy.run(0.1)
        self.assertTrue(self.a.connections[0].aborted)
        self.proxy.run(0.1)
        self.answer(self.b)
        self.assertEqual(self.status(client), 200)
        self.assert_clean()

    def test_per_try_timeout_while_connecting(self):
        """A connection attempt slower than C{per_try_timeout} is cancelled: a connect failure."""
        self.a.mode = "hang"
        client = self.send(request(b"/r/x"))
        self.proxy.run(1)
        self.proxy.run(0.1)
        self.answer(self.b)
        self.assertEqual(self.status(client), 200)
        self.assertEqual(self.runtime(A).breaker.failures, 1)
        self.assertEqual(self.cluster.breakers.count(Limit.CONNECTIONS), 1)

    def test_route_timeout_not_retried(self):
        """The route's timeout is final: 504, no other try."""
        client = self.send(request(b"/x"))
        self.proxy.run(2)
        self.assertEqual(self.status(client), 504)
        self.assertEqual(self.b.attempts, 0)
        self.assertEqual(self.runtime(A).breaker.failures, 1)
        self.assert_clean()

    def test_client_gone_during_backoff(self):
        """A client that leaves while its retry waits releases everything it held."""
        client = self.send(request(b"/r/x"))
        self.answer(self.a, UNAVAILABLE)
        client.reset()
        self.proxy.run(1)
        self.assertEqual((self.b.attempts, self.c.attempts), (0, 0))
        self.assert_clean()


class SelectionTests(ResilienceTestCase):
    """Where requests go: sticky cookies, hash keys, load."""

    def config_with(self, **cluster) -> str:
        extra = "".join(f"    {k}: {v}\n" for k, v in cluster.items())
        return RETRY + extra

    def use(self, **cluster) -> None:
        self.proxy = InMemoryProxy(self.config_with(**cluster))
        self.cluster = self.proxy.clusters["app"]
        self.a, self.b, self.c = (self.proxy.backend(x) for x in (A, B, C))

    def test_sticky_cookie(self):
        """
        The first response sets the sticky cookie; requests that send it back
        go to the same backend (round robin would move them), without a new
        cookie, until that backend is drained.
        """
        self.use(sticky_cookie="srv")
        client = self.send(request())
        self.answer(self.a)
        cookie = client.responses()[0].header(b"set-cookie")
        self.assertTrue(cookie.startswith(b"srv="), cookie)
        token = cookie.split(b";")[0]
        for _ in range(3):
            client = self.send(request(b"/", b"Cookie: other=1; " + token))
            self.answer(self.a)
            [response] = client.responses()
            self.assertEqual((response.status, response.header(b"set-cookie")), (200, None))
        self.assertEqual((self.b.attempts, self.c.attempts), (0, 0))
        self.runtime(A).drained = True
        client = self.send(request(b"/", b"Cookie: " + token))
        [endpoint] = [e for e in (self.b, self.c) if e.attempts]
        self.answer(endpoint)
        moved = client.responses()[0].header(b"set-cookie")
        self.assertNotEqual(moved.split(b";")[0], token)

    def test_hash_on_header(self):
        """With a hash policy, one key always reaches one backend; keys spread over all."""
        self.use(lb="maglev", hash_on='"header:x-user"')
        seen = {}
        for user in range(30):
            for _ in range(2):
                self.send(request(b"/", b"X-User: u%d" % user))
                [endpoint] = [
                    e for e in (self.a, self.b, self.c) if e.pending or e.open_connections()
                ]
                self.answer(endpoint)
                seen.setdefault(user, set()).add(endpoint.address)
                for conn in endpoint.open_connections():
                    conn.close()
                self.proxy.run()
        self.assertTrue(all(len(backends) == 1 for backends in seen.values()), seen)
        self.assertEqual(len(set().union(*seen.values())), 3)

    def test_least_connections_counts_requests(self):
        """
        C{backend.active} counts requests in flight, so least_connections
        sends new requests away from a backend still busy with one.
        """
        self.use(lb="least_connections")
        self.send(request())
        [busy] = [b for b in self.cluster.backends if b.active]
        self.assertEqual(busy.active, 1)
        for _ in range(2):
            self.send(request())
        self.assertEqual([b.active for b in self.cluster.backends], [1, 1, 1])
        for endpoint in (self.a, self.b, self.c):
            self.answer(endpoint)
        self.assertEqual([b.active for b in self.cluster.backends], [0, 0, 0])


class BreakerTests(ResilienceTestCase):
    """Circuit breakers: the cluster's ceilings and each backend's breaker."""

    def use(self, text: str) -> None:
        self.proxy = InMemoryProxy(text)
        self.cluster = self.proxy.clusters["app"]

    def test_max_requests(self):
        """Beyond C{max_requests} in flight, requests are refused 503 at once."""
        self.use(RETRY + "    circuit_breaker: {max_requests: 1}\n")
        a = self.proxy.backend(A)
        first = self.send(request())
        second = self.send(request())
        [response] = second.responses()
        self.assertEqual(response.status, 503)
        self.answer(a)
        self.assertEqual(self.status(first), 200)
        third = self.send(request())
        self.answer(self.proxy.backend(B))
        self.assertEqual(self.status(third), 200)
        self.assertEqual(self.cluster.breakers.overflows(Limit.REQUESTS), 1)

    def test_max_connections(self):
        """Beyond C{max_connections} open upstream connections, 503; a pooled one is reused."""
        self.use(
            RETRY.replace('"10.0.0.2:80", "10.0.0.3:80"', "")
            + "    circuit_breaker: {max_connections: 1}\n"
        )
        a = self.proxy.backend(A)
        first = self.send(request())
        second = self.send(request())
        self.assertEqual(self.status(second), 503)
        self.answer(a)
        self.assertEqual(self.status(first), 200)
        third = self.send(request())
        self.answer(a)
        self.assertEqual(self.status(third), 200)
        self.assertEqual(a.attempts, 1)
        a.connections[0].close()
        self.proxy.run()
        self.assertEqual(self.cluster.breakers.count(Limit.CONNECTIONS), 0)

    def test_max_pending_zero(self):
        """C{max_pending: 0}: only idle pooled connections serve; none yet means 503."""
        self.use(RETRY + "    circuit_breaker: {max_pending: 0}\n")
        self.assertEqual(self.status(self.send(request())), 503)

    def test_backend_breaker(self):
        """
        Five consecutive connect failures open a backend's breaker: it gets
        no work (503 with Retry-After when it is the only one); after 5 s
        one probe goes through, and its success closes the breaker.
        """
        self.use(RETRY.replace('"10.0.0.2:80", "10.0.0.3:80"', ""))
        a = self.proxy.backend(A)
        a.mode = "refuse"
        for _ in range(5):
            self.assertEqual(self.status(self.send(request())), 502)
        backend = self.cluster.backends[0]
        self.assertEqual(backend.breaker.state, BreakerState.OPEN)
        self.assertTrue(backend.circuit_open)
        client = self.send(request())
        [response] = client.responses()
        self.assertEqual((response.status, response.header(b"retry-after")), (503, b"5"))
        self.assertEqual(a.attempts, 5)
        a.mode = "accept"
        self.proxy.run(5)
        probe = self.send(request())
        self.answer(a)
        self.assertEqual(self.status(probe), 200)
        self.assertEqual(backend.breaker.state, BreakerState.CLOSED)
        self.assertFalse(backend.circuit_open)


class HealthTests(ResilienceTestCase):
    """Health checks, outlier ejection and panic decide who gets requests."""

    config = RETRY.replace(
        "    panic_threshold: 0%\n",
        "    panic_threshold: 0%\n"
        "    health_check: {type: tcp, interval: 5s, timeout: 1s,"
        " healthy_threshold: 2, unhealthy_threshold: 1}\n",
    )

    def checker(self) -> HealthChecker:
        checker = HealthChecker(
            "app",
            self.cluster.backends,
            self.cluster.model.health_check,
            self.proxy.clock,
            random=Random(0),
        )
        self.cluster.attach_health(checker)
        checker.startService()
        self.addCleanup(checker.stopService)
        return checker

    def served(self, n: int) -> list[str]:
        """Send C{n} requests one after the other; the backends that answered them."""
        served = []
        for _ in range(n):
            self.send(request())
            [endpoint] = [
                e
                for e in (self.a, self.b, self.c)
                if any(c.received() for c in e.open_connections())
            ]
            for conn in endpoint.open_connections():
                if conn.received():
                    conn.respond(OK)
                    conn.transport.clear()
            self.proxy.run()
            served.append(endpoint.address)
        return served

    def test_health_check_excludes(self):
        """A backend failing its health check gets no requests until it passes again."""
        self.a.mode = "refuse"
        self.checker()
        self.proxy.run(1)
        self.assertFalse(self.runtime(A).healthy)
        self.assertNotIn(A, self.served(4))
        self.a.mode = "accept"
        self.proxy.run(6)
        self.proxy.run(6)
        self.assertTrue(self.runtime(A).healthy)
        self.assertIn(A, self.served(3))

    def test_all_down_retry_after(self):
        """Every backend down: 503 at once, with the health check interval as Retry-After."""
        for endpoint in (self.a, self.b, self.c):
            endpoint.mode = "refuse"
        self.checker()
        self.proxy.run(1)
        attempts = sum(e.attempts for e in (self.a, self.b, self.c))
        [response] = self.send(request(b"/r/x")).responses()
        self.assertEqual((response.status, response.header(b"retry-after")), (503, b"5"))
        self.assertEqual(sum(e.attempts for e in (self.a, self.b, self.c)), attempts)

    def test_panic(self):
        """
        Below C{panic_threshold} of healthy backends, requests go to all of
        them, healthy or not (the health checks may be what is wrong).
        """
        self.proxy = InMemoryProxy(RETRY.replace("panic_threshold: 0%", "panic_threshold: 50%"))
        self.cluster = self.proxy.clusters["app"]
        self.a, self.b, self.c = (self.proxy.backend(x) for x in (A, B, C))
        self.runtime(A).healthy = False
        self.assertEqual(sorted(set(self.served(4))), [B, C])
        self.runtime(B).healthy = False
        self.assertTrue(self.cluster.panic.active)
        self.assertEqual(sorted(set(self.served(6))), [A, B, C])
        self.runtime(B).healthy = True
        self.assertFalse(self.cluster.panic.active)
        self.assertNotIn(A, self.served(4))

    def test_outlier_ejection(self):
        """
        Consecutive 5xx answers eject a backend for C{base_ejection}; it
        then comes back.  Retry-After says when, if nothing is left.
        """
        self.proxy = InMemoryProxy(
            RETRY.replace('"10.0.0.2:80", "10.0.0.3:80"', "")
            + "    outlier_detection: {consecutive_failures: 2, base_ejection: 30s}\n"
        )
        self.cluster = self.proxy.clusters["app"]
        a = self.proxy.backend(A)
        for _ in range(2):
            client = self.send(request())
            self.answer(a, b"HTTP/1.1 500 Oops\r\nContent-Length: 0\r\n\r\n")
            self.assertEqual(self.status(client), 500)
        self.assertTrue(self.cluster.backends[0].ejected)
        [response] = self.send(request()).responses()
        self.assertEqual((response.status, response.header(b"retry-after")), (503, b"30"))
        self.proxy.run(30)
        self.assertFalse(self.cluster.backends[0].ejected)
        client = self.send(request())
        self.answer(a)
        self.assertEqual(self.status(client), 200)
