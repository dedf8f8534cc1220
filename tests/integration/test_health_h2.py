"""
Health checks of clusters whose backends speak HTTP/2: C{http} probes as
HTTP/2 streams against a real h2 backend (L{tests.h2peer}), C{grpc} probes
(C{grpc.health.v1.Health/Check}) against a real grpcio server in a process
of its own (L{tests.integration.grpc_peer}), and the config plumbing from
C{health_check: {type: grpc}} to backends going DOWN in a running Balance.
"""

from __future__ import annotations

from twisted.internet import reactor
from twisted.trial.unittest import TestCase
from twisted.web.resource import Resource
from twisted.web.server import Site

from balance.cluster.backend import Backend
from balance.cluster.health import Health, HealthChecker
from balance.config import model
from tests.h2peer import H2Backend
from tests.helpers import backend_model, closed_port, wait_for
from tests.integration.test_grpc import grpc_server
from tests.integration.test_h2 import H2TestCase

INTERVAL = 0.1
TIMEOUT = 1.0


class _CheckerMixin:
    def backend(self, port: int) -> Backend:
        return Backend.build(backend_model("127.0.0.1", port), reactor, 2.0)

    def checker(self, backends, **config) -> HealthChecker:
        settings = dict(interval=INTERVAL, timeout=TIMEOUT, healthy_threshold=1)
        settings.update(config)
        self.changes = []
        checker = HealthChecker(
            "api",
            backends,
            model.HealthCheck(**settings),
            reactor,
            on_change=lambda b, healthy, reason: self.changes.append((healthy, reason)),
            upstream_protocol="h2",
        )
        checker.start()
        self.addCleanup(checker.stop)
        return checker

    async def verdict(self, **config) -> tuple[Health, str | None]:
        """The first verdict of a checker on C{self.port}: state and reason."""
        backend = self.backend(self.port)
        checker = self.checker([backend], **config)
        await wait_for(
            lambda: checker.state(backend) is not Health.UNKNOWN, what="the first probe"
        )
        return checker.state(backend), (self.changes[-1][1] if self.changes else None)


class H2HTTPProbeTests(_CheckerMixin, TestCase):
    """C{type: http} on an C{upstream_protocol: h2} cluster speaks HTTP/2."""

    timeout = 30

    def setUp(self):
        self.h2 = H2Backend()
        self.port = self.h2.listen(self)

    async def test_up(self):
        """
        A 200 keeps the backend UP; the probe is one HTTP/2 GET with the
        path, authority and user agent of the health checker.
        """
        self.assertEqual(await self.verdict(type="http", path="/healthz"), (Health.UP, None))
        headers = self.h2.requests[0]
        self.assertEqual(headers[b":method"], b"GET")
        self.assertEqual(headers[b":path"], b"/healthz")
        self.assertEqual(headers[b":scheme"], b"http")
        self.assertEqual(headers[b":authority"], b"127.0.0.1:%d" % self.port)
        self.assertEqual(headers[b"user-agent"], b"balance-health/1")

    async def test_status(self):
        """A status outside C{expect_status} is a failure, naming the status."""
        self.assertEqual(
            await self.verdict(type="http", path="/status/503"), (Health.DOWN, "status 503")
        )

    async def test_expected_status(self):
        self.assertEqual(
            await self.verdict(type="http", path="/status/204", expect_status=(204,)),
            (Health.UP, None),
        )

    async def test_expect_body(self):
        """C{expect_body} is looked for in the DATA frames."""
        self.assertEqual(
            await self.verdict(type="http", path="/status/200", expect_body="status 2"),
            (Health.UP, None),
        )
        self.assertEqual(
            await self.verdict(type="http", path="/status/200", expect_body="nope"),
            (Health.DOWN, "body does not contain 'nope'"),
        )

    async def test_reset(self):
        """A stream reset by the backend is a failure, naming the error code."""
        self.assertEqual(
            await self.verdict(type="http", path="/reset"),
            (Health.DOWN, "stream reset (INTERNAL_ERROR)"),
        )

    async def test_http1_backend(self):
        """An HTTP/1.1-only backend in an h2 cluster fails its probe."""

        class Ok(Resource):
            isLeaf = True

            def render_GET(self, request):
                return b"ok"

        site = Site(Ok())
        site.log = lambda request: None
        web = reactor.listenTCP(0, site, interface="127.0.0.1")
        self.addCleanup(web.stopListening)
        self.port = web.getHost().port
        state, reason = await self.verdict(type="http", path="/")
        self.assertIs(state, Health.DOWN)
        self.assertTrue(
            reason.startswith(("malformed HTTP/2 response", "connection closed")), reason
        )

    async def test_refused(self):
        self.port = closed_port()
        self.assertEqual(await self.verdict(type="http"), (Health.DOWN, "connection refused"))


class GRPCProbeTests(_CheckerMixin, TestCase):
    """C{type: grpc}: C{grpc.health.v1.Health/Check} against grpcio."""

    timeout = 60

    async def setUp(self):
        self.port = await grpc_server(self)

    async def test_serving(self):
        """The server as a whole, and a named service, answer SERVING."""
        self.assertEqual(await self.verdict(type="grpc"), (Health.UP, None))
        self.assertEqual(await self.verdict(type="grpc", service="test.Echo"), (Health.UP, None))

    async def test_not_serving(self):
        self.assertEqual(
            await self.verdict(type="grpc", service="broken"), (Health.DOWN, "NOT_SERVING")
        )

    async def test_unknown_service(self):
        """A non-zero grpc-status is a failure, with its name and message."""
        self.assertEqual(
            await self.verdict(type="grpc", service="nosuch"),
            (Health.DOWN, "grpc-status 5 NOT_FOUND: unknown service"),
        )

    async def test_not_grpc(self):
        """An HTTP/2 backend that is not a gRPC server fails the check."""
        h2 = H2Backend()
        self.port = h2.listen(self)
        self.assertEqual(
            await self.verdict(type="grpc"), (Health.DOWN, "no grpc-status in the answer")
        )


class GRPCHealthServiceTests(H2TestCase):
    """From the config: a running Balance takes a dead gRPC backend out."""

    async def test_config(self):
        port = await grpc_server(self)
        dead = closed_port()
        self.start_balance(
            f"""
            listeners:
              - name: web
                listen: "tcp:0:interface=127.0.0.1"
                cluster: grpc
            clusters:
              - name: grpc
                upstream_protocol: h2
                backends: ["127.0.0.1:{port}", "127.0.0.1:{dead}"]
                health_check: {{type: grpc, service: test.Echo, interval: 100ms}}
            """
        )
        cluster = self.service.cluster_services.getServiceNamed("cluster:grpc").cluster
        live, gone = cluster.backends
        await wait_for(lambda: not gone.healthy, what="the dead backend DOWN")
        health = cluster.health
        await wait_for(lambda: health.state(live) is Health.UP, what="the live backend UP")
