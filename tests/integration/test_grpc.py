# -*- test-case-name: tests.integration.test_grpc -*-
"""
gRPC through Balance: a real grpcio server and a real grpcio client, each
in a process of its own (L{tests.integration.grpc_peer}), the client
speaking h2c with prior knowledge to an http listener whose cluster has
C{upstream_protocol: h2}.  Unary and server-streaming calls go through,
and a non-OK status with its details comes back in the trailers.
"""

from __future__ import annotations

import json
import os
import sys

from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.protocol import ProcessProtocol
from twisted.internet.utils import getProcessOutputAndValue
from twisted.trial.unittest import SkipTest

from tests.h2peer import H2Backend
from tests.helpers import closed_port, connect_client, wait_for
from tests.integration.test_h2 import H2TestCase
from tests.integration.test_h2_upstream import _H2Client

_PEER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "grpc_peer.py")


def _need_grpc() -> None:
    try:
        import grpc  # noqa: F401
    except ImportError:
        if os.environ.get("CI") == "true":
            raise
        raise SkipTest("grpcio is not installed (pip install grpcio)") from None


class _Client(ProcessProtocol):
    """The drain client: says "first" mid-call, prints JSON at the end."""

    def __init__(self):
        self.first = Deferred()
        self.ended = Deferred()
        self.out = b""

    def outReceived(self, data):
        self.out += data
        if b"first\n" in self.out and not self.first.called:
            self.first.callback(None)

    def processEnded(self, reason):
        self.ended.callback(reason.value.exitCode)


class _Server(ProcessProtocol):
    """The gRPC server process: its port comes on its first stdout line."""

    def __init__(self):
        self.port = Deferred()
        self.ended = Deferred()
        self._out = b""

    def outReceived(self, data):
        self._out += data
        if b"\n" in self._out and not self.port.called:
            self.port.callback(int(self._out.split(b"\n", 1)[0]))

    def processEnded(self, reason):
        if not self.port.called:
            self.port.errback(reason)
        self.ended.callback(None)


async def grpc_server(testcase) -> int:
    """
    Start the gRPC server process of L{tests.integration.grpc_peer} for
    C{testcase} (stopped by its PID at the end); its port.
    """
    _need_grpc()
    server = _Server()
    process = reactor.spawnProcess(
        server, sys.executable, [sys.executable, _PEER, "server"], env=os.environ
    )

    async def stop():
        # By its PID, then wait for it to be gone.
        if process.pid is not None:
            process.signalProcess("KILL")
        await server.ended

    testcase.addCleanup(stop)
    return await server.port


class GRPCTests(H2TestCase):
    async def setUp(self):
        port = await grpc_server(self)
        self.port = self.start_balance(
            f"""
            listeners:
              - name: web
                listen: "tcp:0:interface=127.0.0.1"
                cluster: grpc
            clusters:
              - name: grpc
                upstream_protocol: h2
                backends: ["127.0.0.1:{port}"]
                health_check: {{type: tcp, interval: 1s}}
            """
        )

    async def test_calls(self):
        out, err, code = await getProcessOutputAndValue(
            sys.executable,
            [_PEER, "client", f"127.0.0.1:{self.port}"],
            env=os.environ,
            reactor=reactor,
        )
        self.assertEqual(code, 0, err.decode("utf-8", "replace"))
        results = json.loads(out)
        self.assertEqual(results["unary"], "olleh")
        self.assertEqual(results["unary_code"], "OK")
        self.assertEqual(results["stream"], ["item-%d" % i for i in range(5)])
        self.assertEqual(results["big"], 1_000_000)
        self.assertEqual(results["error_code"], "NOT_FOUND")
        self.assertEqual(results["error_details"], "no such thing")

    async def test_graceful_goaway_on_drain(self):
        """
        Draining an HTTP/2 connection (as a drain or a reload that removes
        its listener does) lets the call in flight finish; the client's
        next call goes on a new connection, which it opens by itself.
        """
        client = _Client()
        process = reactor.spawnProcess(
            client,
            sys.executable,
            [sys.executable, _PEER, "drain", f"127.0.0.1:{self.port}"],
            env=os.environ,
        )
        self.addCleanup(lambda: client.ended)
        self.addCleanup(lambda: process.pid is not None and process.signalProcess("KILL"))
        await client.first
        context = self.service.listeners.getServiceNamed("web").factory.context
        [conn] = list(context.connections)
        conn.drain()
        process.write(b"go\n")
        self.assertEqual(await client.ended, 0)
        results = json.loads(client.out.split(b"first\n", 1)[1])
        self.assertEqual(results["stream"], ["item-%d" % i for i in range(5)])
        self.assertEqual(results["after"], "niaga")
        self.assertEqual(context.listener_metrics.connections_total, 2)
        self.assertNotIn(conn, context.connections)


class GRPCLocalReplyTests(H2TestCase):
    """
    What Balance answers a gRPC call itself is a gRPC status (Trailers-Only,
    as Envoy sends), and a call's grpc-timeout bounds the route's timeout.
    """

    def balance_to(self, backend_port: int) -> int:
        """Balance in front of one h2 backend, with a 60 s route timeout; its port."""
        return self.start_balance(
            f"""
            listeners:
              - name: web
                listen: "tcp:0:interface=127.0.0.1"
                routes:
                  - {{match: {{path_prefix: /}}, cluster: grpc, timeout: 60s}}
            clusters:
              - name: grpc
                upstream_protocol: h2
                backends: ["127.0.0.1:{backend_port}"]
            """
        )

    async def call(self, port: int, path: bytes, timeout: bytes) -> _H2Client:
        """A raw gRPC call (h2c) with this grpc-timeout; the client once answered."""
        client = _H2Client(
            [
                (b":method", b"POST"),
                (b":scheme", b"http"),
                (b":authority", b"grpc.test"),
                (b":path", path),
                (b"content-type", b"application/grpc"),
                (b"te", b"trailers"),
                (b"grpc-timeout", timeout),
            ],
            b"\0\0\0\0\0",
            None,
        )
        await connect_client(port, client)
        await wait_for(lambda: client.done, 20, "the answer")
        return client

    async def test_unavailable(self):
        """No backend takes the call: the client (grpcio) sees UNAVAILABLE and why."""
        _need_grpc()
        dead = closed_port()
        port = self.balance_to(dead)
        out, err, code = await getProcessOutputAndValue(
            sys.executable,
            [_PEER, "status", f"127.0.0.1:{port}"],
            env=os.environ,
            reactor=reactor,
        )
        self.assertEqual(code, 0, err.decode("utf-8", "replace"))
        self.assertEqual(
            json.loads(out),
            {"code": "UNAVAILABLE", "details": f"127.0.0.1:{dead}: connection refused"},
        )

    async def test_grpc_timeout(self):
        """
        A call whose grpc-timeout passes while the backend holds it is
        answered DEADLINE_EXCEEDED by Balance, long before the route's
        timeout; the backend saw the grpc-timeout too.
        """
        backend = H2Backend()
        port = self.balance_to(backend.listen(self))
        started = reactor.seconds()
        client = await self.call(port, b"/hold", b"300m")
        self.assertLess(reactor.seconds() - started, 10)
        self.assertEqual(client.headers[b":status"], b"200")
        self.assertEqual(client.headers[b"grpc-status"], b"4")
        self.assertIn(b"timeout", client.headers[b"grpc-message"])
        self.assertEqual(client.body, b"")
        self.assertEqual(backend.requests[0][b"grpc-timeout"], b"300m")

    async def test_bad_grpc_timeout(self):
        """
        A malformed grpc-timeout makes a malformed request: 400 (which gRPC
        clients read as INTERNAL), never forwarded.
        """
        backend = H2Backend()
        port = self.balance_to(backend.listen(self))
        client = await self.call(port, b"/x", b"1 S")
        self.assertEqual(client.headers[b":status"], b"400")
        self.assertEqual(backend.requests, [])
