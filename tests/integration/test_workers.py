"""
C{workers: 2} run as users run it, C{twistd -n balance}: the parent binds,
two workers serve; both get traffic; a worker killed with SIGKILL is
replaced while the other keeps serving; SIGHUP reloads every worker;
SIGTERM drains them and exits 0.
"""

from __future__ import annotations

import json
import os
import re

from twisted.internet import reactor
from twisted.internet.defer import DeferredList, inlineCallbacks
from twisted.internet.error import ConnectError
from twisted.internet.task import deferLater
from twisted.trial import unittest
from twisted.web.client import Agent, HTTPConnectionPool, readBody
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Site

from tests.integration import twistd

CONFIG = """\
workers: 2
drain_timeout: 5s
admin: {{listen: "tcp:{admin}:interface=127.0.0.1"}}
listeners:
  - name: web
    listen: "tcp:{port}:interface=127.0.0.1"
    protocol: http
    routes:
      - match: {{path: /version}}
        direct_response: {{status: 200, body: "{version}"}}
      - match: {{path_prefix: /}}
        cluster: app
clusters:
  - name: app
    backends: ["127.0.0.1:{upstream}"]
whoami:
  - {{name: alpha, listen: "tcp:{upstream}:interface=127.0.0.1"}}
"""


def get(url: str):
    """GET C{url} on a new connection; fires with (status, body)."""
    agent = Agent(reactor, pool=HTTPConnectionPool(reactor, persistent=False))
    d = agent.request(b"GET", url.encode("ascii"))
    return d.addCallback(lambda r: readBody(r).addCallback(lambda body: (r.code, body)))


@inlineCallbacks
def until(check, timeout: float, what: str):
    """
    Run the async C{check} again (one at a time, every 50 ms) until it
    answers true; fail after C{timeout} seconds.
    """
    deadline = reactor.seconds() + timeout
    while True:
        done = yield check()
        if done:
            return
        if reactor.seconds() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        yield deferLater(reactor, 0.05, lambda: None)


def samples(metrics: bytes, name: str) -> dict[str, float]:
    """{worker: value} of the samples of C{name} (summed over their other labels)."""
    found: dict[str, float] = {}
    for line in metrics.decode().splitlines():
        if line.startswith(name + "{"):
            worker = re.search(r'worker="(\d+)"', line).group(1)
            found[worker] = found.get(worker, 0.0) + float(line.rsplit(" ", 1)[1])
    return found


class WorkersTests(unittest.TestCase):
    def setUp(self):
        self.ports = {n: twistd.free_port() for n in ("admin", "port", "upstream")}
        self.path = os.path.abspath(self.mktemp() + ".yaml")
        self.write("v1")

    def write(self, version: str) -> None:
        with open(self.path, "w") as f:
            f.write(CONFIG.format(version=version, **self.ports))

    def url(self, path: str, admin: bool = False) -> str:
        return "http://127.0.0.1:%d%s" % (self.ports["admin" if admin else "port"], path)

    @inlineCallbacks
    def stats(self):
        code, body = yield get(self.url("/stats", admin=True))
        return json.loads(body)

    @inlineCallbacks
    def burst(self, path: str = "/", count: int = 20):
        """C{count} concurrent requests on new connections; their (status, body)."""
        results = yield DeferredList([get(self.url(path)) for _ in range(count)], consumeErrors=True)
        return [r if ok else (None, str(r.value)) for ok, r in results]

    @inlineCallbacks
    def test_workers(self):
        proc = yield twistd.start(self, self.path, self.ports["port"])

        @inlineCallbacks
        def ready():
            # The data port binds first; the admin port a moment later.
            try:
                code, _ = yield get(self.url("/ready", admin=True))
            except ConnectError:
                return False
            return code == 200

        yield until(ready, 30, "workers ready")
        stats = yield self.stats()
        pids = {w["index"]: w["pid"] for w in stats["workers"]}
        self.assertEqual(sorted(pids), [0, 1])
        self.assertNotIn(proc.pid, pids.values())

        # Both workers get traffic (the kernel hands each connection to
        # whichever accepts first): send bursts until both have served.
        served = {}

        @inlineCallbacks
        def both_served():
            results = yield self.burst()
            for code, body in results:
                self.assertEqual(code, 200, body)
                self.assertIn(b"Name: alpha", body)
            _, metrics = yield get(self.url("/metrics", admin=True))
            served.update(samples(metrics, "balance_http_requests_total"))
            return len(served) == 2

        yield until(both_served, 60, "both workers to serve")
        self.assertTrue(all(v > 0 for v in served.values()), served)

        # kill -9 one worker: the other serves meanwhile, and it is replaced.
        os.kill(pids[0], 9)
        results = yield self.burst()
        self.assertEqual([code for code, _ in results], [200] * 20, results)
        new_pids = {}

        @inlineCallbacks
        def replaced():
            stats = yield self.stats()
            new_pids.update(
                {w["index"]: w["pid"] for w in stats["workers"] if w["ready"] and w["pid"]}
            )
            return new_pids.get(0) not in (None, pids[0])

        yield until(replaced, 30, "worker 0 to be replaced")
        self.assertEqual(new_pids[1], pids[1])
        self.assertIn("worker 0 exited unexpectedly", proc.output)
        results = yield self.burst()
        self.assertEqual([code for code, _ in results], [200] * 20, results)

        # SIGHUP: the parent validates and has every worker reload.
        self.write("v2")
        proc.signal("HUP")
        reloads = {}

        @inlineCallbacks
        def reloaded():
            _, metrics = yield get(self.url("/metrics", admin=True))
            reloads.update(samples(metrics, "balance_config_reloads_total"))
            return len(reloads) == 2

        yield until(reloaded, 30, "both workers to reload")
        results = yield self.burst("/version")
        self.assertEqual(set(results), {(200, b"v2")})
        # The admin API answers for the group.
        _, clusters = yield get(self.url("/clusters", admin=True))
        self.assertEqual(json.loads(clusters)["clusters"][0]["name"], "app")
        _, config = yield get(self.url("/config", admin=True))
        self.assertEqual(json.loads(config)["workers"], 2)
        # A drain goes to every worker: no worker sends it work any more.
        agent = Agent(reactor, pool=HTTPConnectionPool(reactor, persistent=False))
        backend = "127.0.0.1:%d" % self.ports["upstream"]
        response = yield agent.request(
            b"POST", self.url(f"/clusters/app/backends/{backend}/drain", admin=True).encode()
        )
        body = yield readBody(response)
        self.assertEqual(json.loads(body)["drained"], True)
        results = yield self.burst("/")
        self.assertEqual({code for code, _ in results}, {503})

        # SIGTERM: every worker drains and exits, then the parent, with 0.
        proc.signal("TERM")
        code = yield proc.ended
        self.assertEqual(code, 0, proc.output)
        for pid in (new_pids[0], pids[1]):
            self.assertRaises(ProcessLookupError, os.kill, pid, 0)


LISTENER_CONFIG = """\
workers: 2
drain_timeout: 20s
admin: {{listen: "tcp:{admin}:interface=127.0.0.1"}}
listeners:
  - name: web
    listen: "tcp:{port}:interface=127.0.0.1"
    routes:
      - match: {{path: /hold}}
        cluster: held
      - match: {{path_prefix: /}}
        cluster: app
{more}clusters:
  - name: app
    backends: ["127.0.0.1:{upstream}"]
  - name: held
    backends: ["127.0.0.1:{held}"]
whoami:
  - {{name: alpha, listen: "tcp:{upstream}:interface=127.0.0.1"}}
"""

MORE = """\
  - name: more
    listen: "tcp:{more_port}:interface=127.0.0.1"
    cluster: app
"""


class Held(Resource):
    """Holds every request until L{release}."""

    isLeaf = True

    def __init__(self):
        super().__init__()
        self.waiting = []

    def render_GET(self, request):
        self.waiting.append(request)
        return NOT_DONE_YET

    def release(self):
        waiting, self.waiting = self.waiting, []
        for request in waiting:
            request.write(b"held and answered")
            request.finish()


class ListenerReloadTests(unittest.TestCase):
    """A reload that adds a listener in worker mode replaces the workers."""

    def setUp(self):
        self.held = Held()
        site = Site(self.held)
        site.log = lambda request: None
        port = reactor.listenTCP(0, site, interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        self.ports = {n: twistd.free_port() for n in ("admin", "port", "upstream", "more_port")}
        self.ports["held"] = port.getHost().port
        self.path = os.path.abspath(self.mktemp() + ".yaml")
        self.write("")

    def write(self, more: str) -> None:
        with open(self.path, "w") as f:
            f.write(LISTENER_CONFIG.format(more=more.format(**self.ports), **self.ports))

    def url(self, path: str, name: str = "port") -> str:
        return "http://127.0.0.1:%d%s" % (self.ports[name], path)

    @inlineCallbacks
    def pids(self):
        code, body = yield get(self.url("/stats", "admin"))
        return {w["index"]: w["pid"] for w in json.loads(body)["workers"] if w["ready"]}

    @inlineCallbacks
    def test_add_listener(self):
        """
        The new listener serves after the reload; a request in flight on
        a replaced worker finishes; the old workers exit; every request
        sent meanwhile is answered.
        """
        proc = yield twistd.start(self, self.path, self.ports["port"])

        @inlineCallbacks
        def ready():
            try:
                pids = yield self.pids()
            except ConnectError:
                return False
            return len(pids) == 2

        yield until(ready, 30, "workers ready")
        old = yield self.pids()
        in_flight = get(self.url("/hold"))
        yield twistd.wait_for(lambda: self.held.waiting, 10, "the held request")
        self.assertFalse(twistd.port_open(self.ports["more_port"]))

        self.write(MORE)
        proc.signal("HUP")
        results = []

        @inlineCallbacks
        def replaced():
            # Traffic keeps flowing on the old listener all along.
            status, _ = yield get(self.url("/"))
            results.append(status)
            pids = yield self.pids()
            return len(pids) == 2 and not set(pids.values()) & set(old.values())

        yield until(replaced, 60, "the new generation of workers")
        status, body = yield get(self.url("/", "more_port"))
        self.assertEqual(status, 200)
        self.assertIn(b"Name: alpha", body)
        # The replaced worker still drains the request it had.
        self.held.release()
        status, body = yield in_flight
        self.assertEqual((status, body), (200, b"held and answered"))
        self.assertEqual(set(results), {200})

        @inlineCallbacks
        def gone():
            yield None
            return not any(_alive(pid) for pid in old.values())

        yield until(gone, 30, "the replaced workers to exit")
        self.assertIn("starting generation 1 of 2 workers", proc.output)
        proc.signal("TERM")
        code = yield proc.ended
        self.assertEqual(code, 0, proc.output)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


RATE_CONFIG = """\
workers: 2
admin: {{listen: "tcp:{admin}:interface=127.0.0.1"}}
listeners:
  - name: web
    listen: "tcp:{port}:interface=127.0.0.1"
    routes:
      - match: {{path_prefix: /}}
        cluster: app
        rate_limit: {{requests: 30, per: 1m, burst: 30, key: route}}
clusters:
  - name: app
    backends: ["127.0.0.1:{upstream}"]
whoami:
  - {{name: alpha, listen: "tcp:{upstream}:interface=127.0.0.1"}}
"""


class SharedRateLimitTests(unittest.TestCase):
    """The workers of a group share local rate limits."""

    @inlineCallbacks
    def test_shared_limit(self):
        """
        A limit of 30 a minute lets 30 requests through the group, however
        the kernel spreads the connections over the two workers (each
        with a bucket of its own would let 60 through).
        """
        ports = {n: twistd.free_port() for n in ("admin", "port", "upstream")}
        path = os.path.abspath(self.mktemp() + ".yaml")
        with open(path, "w") as f:
            f.write(RATE_CONFIG.format(**ports))
        proc = yield twistd.start(self, path, ports["port"])
        admin = "http://127.0.0.1:%d" % ports["admin"]

        @inlineCallbacks
        def ready():
            try:
                code, _ = yield get(admin + "/ready")
            except ConnectError:
                return False
            return code == 200

        yield until(ready, 30, "workers ready")
        started = reactor.seconds()
        codes = []
        served = {}

        @inlineCallbacks
        def both_served():
            results = yield DeferredList(
                [get("http://127.0.0.1:%d/" % ports["port"]) for _ in range(20)],
                consumeErrors=True,
            )
            codes.extend(r[0] if ok else None for ok, r in results)
            _, metrics = yield get(admin + "/metrics")
            served.update(samples(metrics, "balance_http_requests_total"))
            return len(served) == 2 and len(codes) >= 60

        yield until(both_served, 60, "both workers to serve")
        elapsed = reactor.seconds() - started
        self.assertEqual(set(codes), {200, 429}, codes)
        # 30 in the burst, plus what refilled meanwhile (one per 2 s).
        self.assertGreaterEqual(codes.count(200), 30)
        self.assertLessEqual(codes.count(200), 30 + int(elapsed / 2) + 1, (elapsed, codes))
        proc.signal("TERM")
        code = yield proc.ended
        self.assertEqual(code, 0, proc.output)


class ParentKilledTests(unittest.TestCase):
    """Workers never outlive their group."""

    @inlineCallbacks
    def test_parent_killed(self):
        """
        The parent killed with SIGKILL (it cannot tell anyone): its workers
        drain and exit by themselves, and the port is free again.
        """
        ports = {n: twistd.free_port() for n in ("admin", "port", "upstream")}
        path = os.path.abspath(self.mktemp() + ".yaml")
        with open(path, "w") as f:
            f.write(CONFIG.format(version="v1", **ports))
        proc = yield twistd.start(self, path, ports["port"])
        admin = "http://127.0.0.1:%d" % ports["admin"]
        pids = {}

        @inlineCallbacks
        def ready():
            try:
                code, body = yield get(admin + "/stats")
            except ConnectError:
                return False
            workers = json.loads(body).get("workers", []) if code == 200 else []
            pids.update({w["index"]: w["pid"] for w in workers if w["ready"]})
            return len(pids) == 2

        yield until(ready, 30, "workers ready")
        proc.signal("KILL")
        yield proc.ended

        @inlineCallbacks
        def gone():
            yield None
            return not any(_alive(pid) for pid in pids.values())

        yield until(gone, 30, "the workers to exit")
        yield twistd.wait_for(lambda: not twistd.port_open(ports["port"]), 10, "the port closed")
