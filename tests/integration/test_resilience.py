# -*- test-case-name: tests.integration.test_resilience -*-
"""
Balance keeps answering while its backends fail: three real backends (whoami
servers, each in a process of its own so that it can be killed or frozen)
behind Balance, a client sending idempotent GETs throughout, one backend
killed, a second one hung (SIGSTOP: it accepts connections but answers
nothing), then both back.  Health checks, per-try timeouts and retries must
hide all of it from the client.  And a POST that reached a backend which
then died is never sent again.

Short health check intervals keep it to a few seconds; conditions are
waited for, never slept on.
"""

from __future__ import annotations

import os
import signal
import sys
import textwrap
from io import BytesIO

from twisted.internet import reactor
from twisted.internet.defer import Deferred, ensureDeferred, gatherResults, succeed
from twisted.internet.protocol import ProcessProtocol
from twisted.trial.unittest import TestCase
from twisted.web.client import Agent, FileBodyProducer, HTTPConnectionPool, readBody

from balance.config.load import load_text
from balance.config.validate import validate
from balance.service import build
from tests.helpers import wait_for
from tests.integration.twistd import ROOT, child_env, free_port

INTERVAL = 0.2
TIMEOUT = 0.2
UNHEALTHY = 2
# Loopback probes take milliseconds; this absorbs a busy test machine.
SLACK = 1.0
#: How long a dead or hung backend may stay UP (see balance.cluster.health).
DOWN_WITHIN = UNHEALTHY * (INTERVAL * 1.1 + TIMEOUT) + SLACK

#: A backend process: a whoami server, or a "sink" that reads requests,
#: says so on stdout, and never answers.
BACKEND = textwrap.dedent(
    """
    import sys
    from twisted.internet import reactor
    from twisted.internet.protocol import Factory, Protocol
    from balance.whoami import WhoamiFactory

    mode, name, port = sys.argv[1], sys.argv[2], int(sys.argv[3])
    if mode == "whoami":
        factory = WhoamiFactory(name, reactor)
    else:
        class Sink(Protocol):
            def dataReceived(self, data):
                sys.stdout.write("received\\n")
                sys.stdout.flush()
        factory = Factory.forProtocol(Sink)
    reactor.listenTCP(port, factory, interface="127.0.0.1")
    sys.stdout.write("listening\\n")
    sys.stdout.flush()
    reactor.run()
    """
)


class Backend(ProcessProtocol):
    """
    One backend process; L{start} it, then signal it by its process id.

    :ivar lines: what it said on stdout, one entry per line.
    """

    def __init__(self, mode: str, name: str, port: int):
        self.mode = mode
        self.name = name
        self.port = port
        self.lines: list[str] = []
        self.ended = None
        self._transport = None
        self._buffer = b""

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def running(self) -> bool:
        return self._transport is not None and not self.ended.called

    def start(self) -> Deferred:
        """Start the process; fires once it listens."""
        self.lines = []
        self.ended = Deferred()
        self._transport = reactor.spawnProcess(
            self,
            sys.executable,
            [sys.executable, "-c", BACKEND, self.mode, self.name, str(self.port)],
            env=child_env(),
            path=ROOT,
        )
        return wait_for(lambda: "listening" in self.lines, 10, f"backend {self.name} to listen")

    def signal(self, name: str) -> None:
        """Send it a signal (C{"KILL"}, C{"STOP"}, C{"CONT"}) by its process id."""
        if self.running:
            os.kill(self._transport.pid, getattr(signal, "SIG" + name))

    def stop(self) -> Deferred:
        """Kill it (awake, so that it dies) and wait for its end."""
        if not self.running:
            return succeed(None)
        self.signal("CONT")
        self.signal("KILL")
        return self.ended

    def outReceived(self, data: bytes) -> None:
        self._buffer += data
        *lines, self._buffer = self._buffer.split(b"\n")
        self.lines.extend(line.decode() for line in lines)

    def processEnded(self, reason) -> None:
        self.ended.callback(None)


class Traffic:
    """
    Clients sending GETs one after another on keep-alive connections, each
    answer checked, until L{stop} (or C{limit} requests).

    :ivar ok: the answers that were a 200 from a backend.
    :ivar failures: every other outcome, described.
    :ivar served: C{(time, backend name)} of each good answer.
    """

    def __init__(self, port: int, clients: int = 2, limit: int = 50000):
        self.url = b"http://127.0.0.1:%d/" % port
        self.pool = HTTPConnectionPool(reactor, persistent=True)
        # A failure must show, not be retried by the client.
        self.pool.retryAutomatically = False
        self.pool.maxPersistentPerHost = clients
        self.agent = Agent(reactor, pool=self.pool)
        self.limit = limit
        self.running = True
        self.ok = 0
        self.failures: list[str] = []
        self.served: list[tuple[float, str]] = []
        self._loops = [ensureDeferred(self._loop()) for _ in range(clients)]

    async def _loop(self) -> None:
        while self.running and self.ok + len(self.failures) < self.limit:
            try:
                response = await self.agent.request(b"GET", self.url)
                body = await readBody(response)
            except Exception as e:
                self.failures.append(f"{reactor.seconds():.3f}: {e!r}")
                continue
            if response.code != 200:
                self.failures.append(f"{reactor.seconds():.3f}: {response.code} {body[:80]!r}")
                continue
            self.ok += 1
            [name] = response.headers.getRawHeaders(b"x-whoami-name")
            self.served.append((reactor.seconds(), name.decode()))

    def served_by_since(self, name: str, since: float) -> int:
        """How many good answers C{name} gave since C{since}."""
        return sum(1 for when, who in self.served if who == name and when >= since)

    async def stop(self) -> None:
        self.running = False
        await gatherResults(self._loops)
        await self.pool.closeCachedConnections()


class ResilienceTests(TestCase):
    """The acceptance test of health checks, retries and breakers, end to end."""

    timeout = 60

    def start_balance(self, config: str) -> int:
        """Run Balance in this process on C{config}; the port of listener C{web}."""
        model = validate(load_text(textwrap.dedent(config), "test.yaml"), "test.yaml")
        self.service = build(model, reactor)
        self.service.startService()
        self.addCleanup(self.service.stopService)
        return self.service.listeners.getServiceNamed("web").port.getHost().port

    async def start_backends(self, *specs: tuple[str, str]) -> list[Backend]:
        backends = [Backend(mode, name, free_port()) for mode, name in specs]
        for backend in backends:
            self.addCleanup(backend.stop)
        await gatherResults([b.start() for b in backends])
        return backends

    def runtime(self, cluster: str, backend: Backend):
        return self.service.clusters[cluster].backend(backend.address)

    async def until_down(self, cluster: str, backend: Backend, since: float) -> None:
        await wait_for(
            lambda: not self.runtime(cluster, backend).healthy,
            DOWN_WITHIN + 5,
            f"{backend.name} to be marked down",
        )
        took = reactor.seconds() - since
        self.assertLess(took, DOWN_WITHIN, f"{backend.name} marked down after {took:.2f}s")

    async def test_backends_fail_and_return(self):
        """
        One backend killed, then a second hung, then both back: no request
        fails, the dead and the hung one are marked down within
        C{unhealthy_threshold x (interval + timeout)} (with some slack), and
        both get traffic again once they are back.
        """
        alpha, beta, gamma = await self.start_backends(
            ("whoami", "alpha"), ("whoami", "beta"), ("whoami", "gamma")
        )
        port = self.start_balance(
            f"""
            listeners:
              - name: web
                listen: "tcp:0:interface=127.0.0.1"
                routes:
                  - match: {{path_prefix: /}}
                    cluster: app
                    timeout: 5s
                    retry:
                      attempts: 3
                      on: [connect-failure, reset, timeout, "502", "503", "504"]
                      backoff: {{base: 10ms, max: 50ms}}
                      per_try_timeout: 300ms
            clusters:
              - name: app
                backends: ["{alpha.address}", "{beta.address}", "{gamma.address}"]
                connect_timeout: 300ms
                health_check:
                  type: http
                  path: /health
                  interval: {int(INTERVAL * 1000)}ms
                  timeout: {int(TIMEOUT * 1000)}ms
                  healthy_threshold: 1
                  unhealthy_threshold: {UNHEALTHY}
            """
        )
        traffic = Traffic(port)
        self.addCleanup(lambda: ensureDeferred(traffic.stop()))
        start = reactor.seconds()
        await wait_for(
            lambda: all(traffic.served_by_since(b.name, start) for b in (alpha, beta, gamma)),
            10,
            "every backend to serve",
        )

        killed = reactor.seconds()
        alpha.signal("KILL")
        await alpha.ended
        await self.until_down("app", alpha, killed)
        mark = traffic.ok
        await wait_for(lambda: traffic.ok >= mark + 50, 10, "traffic with alpha dead")

        hung = reactor.seconds()
        beta.signal("STOP")
        await self.until_down("app", beta, hung)
        mark = traffic.ok
        await wait_for(lambda: traffic.ok >= mark + 50, 10, "traffic with two backends out")

        await alpha.start()
        beta.signal("CONT")
        back = reactor.seconds()
        await wait_for(
            lambda: (
                traffic.served_by_since("alpha", back) and traffic.served_by_since("beta", back)
            ),
            20,
            "alpha and beta to serve again",
        )
        self.assertTrue(self.runtime("app", alpha).healthy)
        self.assertTrue(self.runtime("app", beta).healthy)

        await traffic.stop()
        self.assertEqual(traffic.failures, [])
        self.assertGreater(traffic.ok, 150)
        probes = self.service.metrics.backend("app", alpha.address).health_checks
        self.assertGreater(probes.get("failure", 0), 0)
        self.assertGreater(probes.get("success", 0), 0)

    async def test_post_sent_is_not_retried(self):
        """
        A POST that reached a backend which then dies is answered 502, not
        sent to the next backend (it may have been processed); a GET in the
        same spot is retried there.
        """
        sink, omega = await self.start_backends(("sink", "sink"), ("whoami", "omega"))
        port = self.start_balance(
            f"""
            listeners:
              - name: web
                listen: "tcp:0:interface=127.0.0.1"
                routes:
                  - match: {{path_prefix: /}}
                    cluster: app
                    timeout: 10s
                    retry: {{attempts: 3, on: [connect-failure, reset, "502", "503"]}}
            clusters:
              - name: app
                backends: ["{sink.address}", "{omega.address}"]
            """
        )
        pool = HTTPConnectionPool(reactor, persistent=False)
        pool.retryAutomatically = False
        agent = Agent(reactor, pool=pool)
        url = b"http://127.0.0.1:%d/" % port

        other = self.runtime("app", omega)
        for method, body, expected in ((b"POST", b"pay once", 502), (b"GET", None, 200)):
            if not sink.running:
                await sink.start()
            # The first try must be the sink's; a retry may go to omega.
            other.drained = True
            producer = FileBodyProducer(BytesIO(body)) if body is not None else None
            d = agent.request(method, url, bodyProducer=producer)
            await wait_for(lambda: "received" in sink.lines, 10, "the sink to get the request")
            other.drained = False
            sink.signal("KILL")
            response = await d
            await readBody(response)
            self.assertEqual(response.code, expected, method)
            await sink.ended
