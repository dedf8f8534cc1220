"""
Operating Balance over real sockets: access logs rotated with SIGUSR1 in a
twistd-run process, per-client connection limits, and two Balance
processes sharing one Redis rate limit.
"""

from __future__ import annotations

import http.client
import json
import os
import signal
import socket
import textwrap
import time

from twisted.internet import reactor, threads
from twisted.internet.defer import Deferred, gatherResults
from twisted.internet.task import deferLater
from twisted.trial import unittest

from tests.helpers import closed_port, free_port, need_tool, wait_for
from tests.integration import twistd
from tests.integration.test_http_proxy import BalanceTestCase
from tests.integration.test_redis import RedisServer


def lines(path: str) -> list[str]:
    """The lines of a file, or none while it does not exist."""
    try:
        with open(path) as f:
            return f.read().splitlines()
    except FileNotFoundError:
        return []


def http_get(port: int, path: str = "/") -> int:
    """One GET on a new connection; the status."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request("GET", path)
        response = conn.getresponse()
        response.read()
        return response.status
    finally:
        conn.close()


def tcp_echo(port: int, data: bytes) -> bytes:
    """Send C{data} on a new connection, half-close, read everything back."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(data)
        sock.shutdown(socket.SHUT_WR)
        received = b""
        while chunk := sock.recv(65536):
            received += chunk
        return received


class AccessLogRotationTests(unittest.TestCase):
    """logrotate's way: rename the file, send SIGUSR1, lines go to a new file."""

    timeout = 60

    async def test_sigusr1_reopens(self):
        """
        After a rename and SIGUSR1, new lines are written to a new file at
        the configured path, the old file keeps its lines; a tcp listener
        logs one line per connection.
        """
        directory = os.path.abspath(self.mktemp())
        os.makedirs(directory)
        http_log = os.path.join(directory, "access.log")
        tcp_log = os.path.join(directory, "tcp.log")
        port, tcp_port, upstream = free_port(), free_port(), free_port()
        config = os.path.join(directory, "balance.yaml")
        with open(config, "w") as f:
            f.write(
                textwrap.dedent(
                    f"""
                    listeners:
                      - name: web
                        listen: "tcp:{port}:interface=127.0.0.1"
                        access_log: {{path: {http_log}, format: json}}
                        cluster: alpha
                      - name: raw
                        listen: "tcp:{tcp_port}:interface=127.0.0.1"
                        protocol: tcp
                        access_log: {{path: {tcp_log}, format: combined}}
                        cluster: alpha
                    clusters:
                      - {{name: alpha, backends: ["127.0.0.1:{upstream}"]}}
                    whoami:
                      - {{name: alpha, listen: "tcp:{upstream}:interface=127.0.0.1"}}
                    """
                )
            )
        proc = await twistd.start(self, config, port)
        self.assertEqual(await threads.deferToThread(http_get, port, "/before"), 200)
        await wait_for(lambda: len(lines(http_log)) == 1, 10, "the first line")
        os.rename(http_log, http_log + ".1")
        proc.signal(signal.SIGUSR1)
        await wait_for(lambda: os.path.exists(http_log), 10, "the reopened file")
        self.assertEqual(await threads.deferToThread(http_get, port, "/after"), 200)
        await wait_for(lambda: len(lines(http_log)) == 1, 10, "a line in the new file")
        [before] = lines(http_log + ".1")
        [after] = lines(http_log)
        self.assertEqual(json.loads(before)["path"], "/before")
        after = json.loads(after)
        self.assertEqual((after["path"], after["status"]), ("/after", 200))
        self.assertEqual(after["backend"], f"127.0.0.1:{upstream}")
        self.assertIsInstance(after["upstream_duration_ms"], float)

        self.assertEqual(await threads.deferToThread(tcp_echo, tcp_port, b"ping"), b"ping")
        await wait_for(lambda: lines(tcp_log), 10, "the tcp connection's line")
        [line] = lines(tcp_log)
        self.assertRegex(
            line,
            r'^127\.0\.0\.1 - - \[.*\] "TCP" - 4 "-" "-" request_bytes=4 '
            rf"duration_ms=[0-9.]+ backend=127\.0\.0\.1:{upstream}$",
        )
        proc.signal("TERM")
        self.assertEqual(await proc.ended, 0, proc.output)


class PerClientLimitTests(BalanceTestCase):
    """C{limits.max_connections_per_ip}: one client cannot take every connection."""

    def hold(self, port: int, count: int) -> list[socket.socket]:
        socks = [socket.create_connection(("127.0.0.1", port), timeout=10) for _ in range(count)]
        for s in socks:
            self.addCleanup(s.close)
        return socks

    async def check_refused(self, port: int, accepted) -> None:
        self.hold(port, 2)
        await wait_for(lambda: accepted() == 2, 10, "two connections accepted")
        [third] = self.hold(port, 1)
        # Closed as soon as accepted: EOF (or a reset), nothing else.
        data = await threads.deferToThread(_read_all, third)
        self.assertEqual(data, b"")
        self.assertEqual(accepted(), 2)

    async def test_http(self):
        """On an http listener the third connection from one address is closed at accept."""
        upstream = self.whoami()
        port = self.start_balance(
            f"""
            listeners:
              - name: web
                listen: "tcp:0:interface=127.0.0.1"
                limits: {{max_connections_per_ip: 2}}
                cluster: app
            clusters:
              - {{name: app, backends: ["127.0.0.1:{upstream}"]}}
            """
        )
        factory = self.service.listeners.getServiceNamed("web").factory
        await self.check_refused(port, lambda: len(factory.context.connections))
        metrics = self.service.metrics.render().decode()
        self.assertIn(
            'balance_listener_refused_connections_total{listener="web",'
            'reason="max_connections_per_ip"} 1.0',
            metrics,
        )

    async def test_tcp(self):
        """On a tcp listener too."""
        upstream = self.whoami()
        port = self.start_balance(
            f"""
            listeners:
              - name: web
                listen: "tcp:0:interface=127.0.0.1"
                protocol: tcp
                limits: {{max_connections_per_ip: 2}}
                cluster: app
            clusters:
              - {{name: app, backends: ["127.0.0.1:{upstream}"]}}
            """
        )
        factory = self.service.listeners.getServiceNamed("web").factory
        await self.check_refused(port, lambda: factory.active)
        stats = self.service.metrics.stats()["listeners"]["web"]
        self.assertEqual(stats["connections_total"], 2)


class TCPMetricsTests(BalanceTestCase):
    """A tcp listener's connections, bytes and backend connect failures on /metrics."""

    async def test_metrics(self):
        """Bytes both ways and connections are counted; a refused backend is a connect failure."""
        upstream = self.whoami()
        dead = closed_port()
        self.start_balance(
            f"""
            listeners:
              - name: web
                listen: "tcp:0:interface=127.0.0.1"
                protocol: tcp
                cluster: app
            clusters:
              - {{name: app, lb: round_robin,
                  backends: ["127.0.0.1:{dead}", "127.0.0.1:{upstream}"]}}
            """
        )
        port = self.service.listeners.getServiceNamed("web").port.getHost().port
        for _ in range(2):
            self.assertEqual(await threads.deferToThread(tcp_echo, port, b"hello"), b"hello")
        factory = self.service.listeners.getServiceNamed("web").factory
        await wait_for(lambda: factory.active == 0, 10, "connections closed")
        text = self.service.metrics.render().decode()
        for sample in (
            'balance_listener_connections_total{listener="web"} 2.0',
            'balance_listener_active_connections{listener="web"} 0.0',
            'balance_bytes_received_total{listener="web"} 10.0',
            'balance_bytes_sent_total{listener="web"} 10.0',
        ):
            self.assertIn(sample, text)
        # Each connection may try the refused backend first.
        self.assertRegex(
            text,
            rf'balance_upstream_connect_failures_total{{backend="127.0.0.1:{dead}",cluster="app"}} [12]\.0',
        )


def _read_all(sock: socket.socket) -> bytes:
    sock.settimeout(10)
    data = b""
    try:
        while chunk := sock.recv(65536):
            data += chunk
    except ConnectionResetError:
        pass
    return data


def hammer(port: int, until: float) -> list[int]:
    """GETs on one keep-alive connection until C{until} (monotonic); the statuses."""
    statuses = []
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        while time.monotonic() < until:
            conn.request("GET", "/")
            response = conn.getresponse()
            response.read()
            statuses.append(response.status)
            if response.getheader("connection") == "close":
                conn.close()
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    finally:
        conn.close()
    return statuses


class SharedRateLimitTests(unittest.TestCase):
    """Two Balance processes, one Redis: one limit for the fleet."""

    timeout = 90

    async def test_two_processes(self):
        """
        Clients hammering two twistd-run Balance processes that share a
        route's rate limit through Redis get, together, what the limit
        allows (20/s), not twice that.
        """
        redis = RedisServer(need_tool("redis-server"), free_port())
        await redis.start()
        self.addCleanup(lambda: Deferred.fromCoroutine(redis.stop()))
        upstream = free_port()
        ports = []
        for i in range(2):
            port = free_port()
            path = os.path.abspath(self.mktemp() + ".yaml")
            whoami = (
                f'whoami: [{{name: alpha, listen: "tcp:{upstream}:interface=127.0.0.1"}}]'
                if i == 0
                else ""
            )
            with open(path, "w") as f:
                f.write(
                    textwrap.dedent(
                        f"""
                        listeners:
                          - name: web
                            listen: "tcp:{port}:interface=127.0.0.1"
                            routes:
                              - match: {{path_prefix: "/"}}
                                cluster: app
                                rate_limit: {{requests: 20, per: 1s, burst: 1, key: route}}
                        clusters:
                          - {{name: app, backends: ["127.0.0.1:{upstream}"]}}
                        rate_limit_store:
                          redis: "redis://127.0.0.1:{redis.port}/0"
                          failure_mode: closed
                        """
                    )
                    + whoami
                    + "\n"
                )
            await twistd.start(self, path, port)
            ports.append(port)
        # Both are connected to Redis once each has let a request through.
        for port in ports:
            await wait_for_status(port, 200)
        # Hammer both for a bounded time.
        start = time.monotonic()
        until = start + 3.0
        results = await gather_threads([(hammer, port, until) for port in ports])
        elapsed = time.monotonic() - start
        admitted = [r.count(200) for r in results]
        refused = [r.count(429) for r in results]
        total = sum(admitted)
        allowed = 1 + 20 * elapsed
        self.assertEqual(
            sum(len(r) for r in results), total + sum(refused), "only 200 and 429 expected"
        )
        self.assertTrue(all(admitted), admitted)
        self.assertTrue(all(refused), refused)
        # Tolerant bounds: well under the 2x two separate limits would give.
        self.assertLessEqual(total, allowed * 1.15 + 2, (admitted, elapsed))
        self.assertGreaterEqual(total, allowed * 0.7, (admitted, elapsed))


async def wait_for_status(port: int, status: int, timeout: float = 20.0) -> None:
    deadline = reactor.seconds() + timeout
    while True:
        try:
            got = await threads.deferToThread(http_get, port)
        except OSError:
            got = None
        if got == status:
            return
        if reactor.seconds() > deadline:
            raise AssertionError(f"port {port} never answered {status} (last: {got})")
        await deferLater(reactor, 0.05, lambda: None)


def gather_threads(calls):
    """Run blocking calls in threads at once; their results in order."""
    return gatherResults([threads.deferToThread(f, *args) for f, *args in calls])
