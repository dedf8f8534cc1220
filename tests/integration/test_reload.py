"""
Hot reload under traffic: routes, weights and backends change twenty times
while clients send a continuous stream of requests, over keep-alive and new
connections, and not one request fails.
"""

from __future__ import annotations

import http.client
import os
import threading

from twisted.internet import reactor, threads
from twisted.internet.defer import inlineCallbacks
from twisted.trial import unittest

from balance.config.validate import load_config
from balance.service import build
from tests.helpers import wait_for
from tests.integration.twistd import free_port

VARIANTS = [
    # (route prefix -> cluster, cluster backends with weights)
    ("a", {"a": [("alpha", 1), ("beta", 1)]}),
    ("a", {"a": [("alpha", 3), ("beta", 1)]}),
    ("b", {"a": [("alpha", 1)], "b": [("gamma", 1)]}),
    ("a", {"a": [("beta", 1)], "b": [("gamma", 1)]}),
    ("b", {"b": [("gamma", 1), ("alpha", 1)]}),
]


def render(port: int, upstreams: dict[str, int], variant) -> str:
    cluster, clusters = variant
    lines = [
        "listeners:",
        "  - name: web",
        f'    listen: "tcp:{port}:interface=127.0.0.1"',
        "    protocol: http",
        "    routes:",
        "      - match: {path: /healthz}",
        '        direct_response: {status: 200, body: "ok"}',
        "      - match: {path_prefix: /}",
        f"        cluster: {cluster}",
        "clusters:",
    ]
    for name, backends in clusters.items():
        lines.append(f"  - name: {name}")
        lines.append("    backends:")
        for upstream, weight in backends:
            lines.append(f'      - {{address: "127.0.0.1:{upstreams[upstream]}", weight: {weight}}}')
        if len(backends) > 1 and backends[0][1] != backends[1][1]:
            lines.append("    lb: weighted_round_robin")
    lines.append("whoami:")
    for name, upstream_port in upstreams.items():
        lines.append(f'  - {{name: {name}, listen: "tcp:{upstream_port}:interface=127.0.0.1"}}')
    return "\n".join(lines) + "\n"


class _Traffic:
    """Clients in threads sending requests until told to stop."""

    def __init__(self, port: int):
        self.port = port
        self.stop = threading.Event()
        self.failures: list[str] = []
        self.count = 0
        self.lock = threading.Lock()
        self.last_names: list[str] = []

    def run_keepalive(self):
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
        while not self.stop.is_set():
            self._one(conn)
        conn.close()

    def run_fresh(self):
        while not self.stop.is_set():
            conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
            self._one(conn)
            conn.close()

    def _one(self, conn):
        try:
            conn.request("GET", "/")
            response = conn.getresponse()
            response.read()
            name = response.getheader("X-Whoami-Name") or "?"
            ok = response.status == 200
        except Exception as e:  # any failure is what the test counts
            ok, name = False, repr(e)
            conn.close()
        with self.lock:
            self.count += 1
            if not ok:
                self.failures.append(name)
            self.last_names.append(name)
            del self.last_names[:-20]


class ReloadUnderTrafficTests(unittest.TestCase):
    @inlineCallbacks
    def test_twentyReloads(self):
        """
        Twenty reloads that change routes, weights and backends lose no
        request, and after each one the traffic goes where the new config
        says.
        """
        port = free_port()
        upstreams = {name: free_port() for name in ("alpha", "beta", "gamma")}
        path = os.path.abspath(self.mktemp() + ".yaml")
        with open(path, "w") as f:
            f.write(render(port, upstreams, VARIANTS[0]))
        root = build(load_config(path), reactor)
        root.startService()
        self.addCleanup(root.stopService)

        traffic = _Traffic(port)
        workers = [
            threading.Thread(target=traffic.run_keepalive),
            threading.Thread(target=traffic.run_keepalive),
            threading.Thread(target=traffic.run_fresh),
        ]
        for t in workers:
            t.start()

        def stop():
            traffic.stop.set()
            return threads.deferToThread(lambda: [t.join(15) for t in workers])

        self.addCleanup(stop)
        yield wait_for(lambda: traffic.count > 20, what="traffic to flow")

        for i in range(1, 21):
            variant = VARIANTS[i % len(VARIANTS)]
            with open(path, "w") as f:
                f.write(render(port, upstreams, variant))
            result = yield root.reload(False)
            self.assertTrue(result["ok"], result)
            cluster, clusters = variant
            expected = {name for name, _ in clusters[cluster]}
            seen_before = traffic.count
            yield wait_for(
                lambda seen=seen_before, expected=expected: traffic.count > seen + 15
                and set(traffic.last_names[-10:]) <= expected,
                timeout=15,
                what=f"traffic to follow reload {i} to {sorted(expected)}",
            )
        yield stop()
        self.assertEqual(traffic.failures, [])
        self.assertGreater(traffic.count, 300)

    @inlineCallbacks
    def test_invalidKeepsRunning(self):
        """
        An invalid file is refused with its errors, and the running config
        keeps serving; a dry run says what would change and changes nothing.
        """
        port = free_port()
        upstreams = {name: free_port() for name in ("alpha", "beta", "gamma")}
        path = os.path.abspath(self.mktemp() + ".yaml")
        with open(path, "w") as f:
            f.write(render(port, upstreams, VARIANTS[0]))
        root = build(load_config(path), reactor)
        root.startService()
        self.addCleanup(root.stopService)

        with open(path, "w") as f:
            f.write(render(port, upstreams, VARIANTS[0]).replace("cluster: a", "cluster: nope"))
        result = yield root.reload(False)
        self.assertFalse(result["ok"])
        self.assertIn('got "nope" (no such cluster)', result["errors"][0])
        self.assertEqual(root.config.listeners[0].routes[1].cluster, "a")

        with open(path, "w") as f:
            f.write(render(port, upstreams, VARIANTS[2]))
        result = yield root.reload(True)
        self.assertTrue(result["ok"])
        self.assertEqual(result["changes"]["clusters"]["added"], ["b"])
        self.assertEqual(result["changes"]["routes"], {"web": {"before": 2, "after": 2}})
        self.assertEqual(root.config.listeners[0].routes[1].cluster, "a")

        def get():
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
            conn.request("GET", "/")
            response = conn.getresponse()
            response.read()
            conn.close()
            return response.status, response.getheader("X-Whoami-Name")

        status, name = yield threads.deferToThread(get)
        self.assertEqual(status, 200)
        self.assertIn(name, ("alpha", "beta"))


class TCPReloadTests(unittest.TestCase):
    @inlineCallbacks
    def test_tcpListenerFollowsReload(self):
        """A tcp listener keeps its socket and sends new connections to the new cluster."""
        port = free_port()
        upstreams = {name: free_port() for name in ("alpha", "gamma")}

        def config(cluster):
            return (
                "listeners:\n"
                f'  - {{name: tcp, listen: "tcp:{port}:interface=127.0.0.1", protocol: tcp, cluster: {cluster}}}\n'
                "clusters:\n"
                f'  - {{name: a, backends: ["127.0.0.1:{upstreams["alpha"]}"]}}\n'
                f'  - {{name: b, backends: ["127.0.0.1:{upstreams["gamma"]}"]}}\n'
                "whoami:\n"
                + "".join(
                    f'  - {{name: {n}, listen: "tcp:{p}:interface=127.0.0.1"}}\n'
                    for n, p in upstreams.items()
                )
            )

        path = os.path.abspath(self.mktemp() + ".yaml")
        with open(path, "w") as f:
            f.write(config("a"))
        root = build(load_config(path), reactor)
        root.startService()
        self.addCleanup(root.stopService)

        def name():
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
            conn.request("GET", "/")
            response = conn.getresponse()
            response.read()
            conn.close()
            return response.getheader("X-Whoami-Name")

        self.assertEqual((yield threads.deferToThread(name)), "alpha")
        with open(path, "w") as f:
            f.write(config("b"))
        result = yield root.reload(False)
        self.assertEqual(result["changes"]["listeners"]["changed"], ["tcp"])
        self.assertEqual((yield threads.deferToThread(name)), "gamma")
