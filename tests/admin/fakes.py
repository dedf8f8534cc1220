"""
Test doubles for the admin API: a target built from a YAML config with real
clusters, an HTTP client over real loopback sockets, and simulated traffic
for the metrics.
"""

from __future__ import annotations

import random
import textwrap

from twisted.internet import reactor
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.protocol import Protocol
from twisted.internet.task import LoopingCall
from twisted.web.client import Agent, HTTPConnectionPool, ResponseDone
from twisted.web.http_headers import Headers
from zope.interface import implementer

from balance.admin import AdminService, IAdminTarget
from balance.cluster.cluster import Cluster
from balance.config import model
from balance.config.load import load_text
from balance.config.validate import validate
from balance.observe.metrics import Metrics

CONFIG = """
listeners:
  - name: web
    listen: "tcp:8080"
    cluster: web
    routes:
      - match: {path_prefix: "/api/"}
        cluster: api
      - match: {path: "/healthz"}
        direct_response: {status: 200, body: "ok"}
  - name: db
    listen: "tcp:5433"
    protocol: tcp
    cluster: db
clusters:
  - name: api
    lb: least_connections
    backends:
      - "127.0.0.1:9001"
      - "127.0.0.1:9002"
      - {address: "127.0.0.1:9003", weight: 2}
  - name: web
    backends: ["127.0.0.1:9101", "[::1]:9102"]
  - name: db
    backends: ["10.0.0.7:5432"]
"""


def load(text: str = CONFIG) -> model.Config:
    """A validated config from YAML text."""
    return validate(load_text(textwrap.dedent(text), "t.yaml"), "t.yaml")


@implementer(IAdminTarget)
class FakeTarget:
    """
    What the root service offers the admin API, built from a config: real
    clusters (connecting with ``connect_reactor``, which the API never
    does), real metrics, and a reloader the test sets.
    """

    def __init__(self, config: model.Config, connect_reactor, metrics: Metrics | None = None):
        self.config = config
        self.clusters = {c.name: Cluster(c, connect_reactor) for c in config.clusters}
        self.metrics = metrics if metrics is not None else Metrics(process=False)
        self.ready = True
        self.draining = False
        self.reload = None


def start_admin(testcase, target, token_file: str | None = None) -> AdminService:
    """
    Serve ``target`` on a free loopback port for the length of ``testcase``.

    :return: The running service; its port is ``service.port.getHost().port``.
    """
    service = AdminService(
        model.Admin(listen="tcp:0:interface=127.0.0.1", token_file=token_file), target, reactor
    )
    service.startService()
    testcase.addCleanup(service.stopService)
    return service


class Response:
    """
    An answer of the admin API.

    :ivar code: The status code.
    :ivar headers: The ``Headers``.
    :ivar body: The body, bytes.
    """

    def __init__(self, code: int, headers: Headers, body: bytes):
        self.code = code
        self.headers = headers
        self.body = body

    def header(self, name: str) -> str | None:
        """The last value of header ``name``, or ``None``."""
        values = self.headers.getRawHeaders(name)
        return None if not values else values[-1]


class _Body(Protocol):
    def __init__(self, done: Deferred):
        self._done = done
        self._chunks: list[bytes] = []

    def dataReceived(self, data: bytes) -> None:
        self._chunks.append(data)

    def connectionLost(self, reason) -> None:
        if reason.check(ResponseDone):
            self._done.callback(b"".join(self._chunks))
        else:
            self._done.errback(reason)


def _read_body(response) -> Deferred:
    # Not readBody: it warns about Agent's own transports under -Wall.
    done = Deferred()
    response.deliverBody(_Body(done))
    return done


class Client:
    """
    A real HTTP client for one admin service, over loopback.

    :param service: A started :class:`AdminService`.
    :param token: Sent as ``Authorization: Bearer`` when not ``None``.
    """

    def __init__(self, service: AdminService, token: str | None = None):
        self.base = f"http://127.0.0.1:{service.port.getHost().port}"
        self.token = token
        self._agent = Agent(reactor, pool=HTTPConnectionPool(reactor, persistent=False))

    @inlineCallbacks
    def request(self, method: str, path: str, headers: dict[str, str] | None = None):
        """
        Send a request and read the whole answer.

        :return: A Deferred firing with a :class:`Response`.
        """
        sent = Headers()
        if self.token is not None:
            sent.setRawHeaders("authorization", [f"Bearer {self.token}"])
        for name, value in (headers or {}).items():
            sent.setRawHeaders(name, [value])
        response = yield self._agent.request(
            method.encode("ascii"), (self.base + path).encode("ascii"), sent
        )
        body = yield _read_body(response)
        return Response(response.code, response.headers, body)

    def get(self, path: str, **kw) -> Deferred:
        """``GET path``."""
        return self.request("GET", path, **kw)

    def post(self, path: str, **kw) -> Deferred:
        """``POST path``."""
        return self.request("POST", path, **kw)


class Traffic:
    """
    Simulated requests: every ``interval`` seconds, count a few dozen
    requests on each route of each http listener and on each backend, with
    log-normal latencies around a few milliseconds and a sprinkle of 5xx.
    Deterministic (seeded).
    """

    def __init__(self, target: FakeTarget, interval: float = 0.1, seed: int = 7):
        self._target = target
        self._rng = random.Random(seed)
        self._loop = LoopingCall(self.tick)
        self._loop.clock = reactor
        self._interval = interval

    def start(self) -> None:
        """Start counting, on the global reactor."""
        self._loop.start(self._interval, now=True)

    def stop(self) -> None:
        """Stop counting."""
        if self._loop.running:
            self._loop.stop()

    def tick(self) -> None:
        """Count one interval's worth of requests."""
        rng = self._rng
        metrics = self._target.metrics
        for listener in self._target.config.listeners:
            lm = metrics.listener(listener.name)
            lm.connections_total += rng.randint(1, 4)
            lm.active = rng.randint(5, 40)
            lm.bytes_in += rng.randint(2000, 8000)
            lm.bytes_out += rng.randint(40000, 160000)
            if listener.protocol != "http":
                continue
            routes = [(str(i), r.cluster) for i, r in enumerate(listener.routes)]
            if listener.cluster:
                routes.append(("default", listener.cluster))
            for label, cluster in routes:
                rm = metrics.route(listener.name, label, cluster)
                for _ in range(rng.randint(10, 40)):
                    code = 200 if rng.random() > 0.01 else 503
                    rm.observe(code, rng.lognormvariate(-5.3, 0.7))
                if cluster is None:
                    continue
                for backend in self._target.clusters[cluster].backends:
                    bm = metrics.backend(cluster, backend.address)
                    for _ in range(rng.randint(3, 12) * backend.weight):
                        bm.observe(200 if rng.random() > 0.01 else 502)
                    backend.active = 0 if backend.drained else rng.randint(0, 6)
