# -*- test-case-name: tests.integration.test_websocket -*-
"""
WebSocket through Balance over real loopback sockets: autobahn's Twisted
server as the backend, autobahn's client in front, both on the reactor
trial runs, with Balance in between in the same process.
"""

from __future__ import annotations

import base64
import json
import os
import signal
import socket
import subprocess

import httptools
from autobahn.twisted.websocket import (
    WebSocketClientFactory,
    WebSocketClientProtocol,
    WebSocketServerFactory,
    WebSocketServerProtocol,
)
from OpenSSL import SSL
from twisted.internet import reactor, ssl
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ClientEndpoint, wrapClientTLS
from twisted.internet.interfaces import IHalfCloseableProtocol, IOpenSSLContextFactory
from twisted.internet.protocol import Factory, Protocol
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Site
from zope.interface import implementer

from balance.http.websocket import accept_value
from balance.l4.tunnel import Tunnel
from balance.testing import ParsedRequest
from tests.helpers import connect_client, need_tool, wait_for
from tests.integration.test_http_proxy import BalanceTestCase, closes, read_responses
from tests.tls import support as tls_support

MEGABYTE = 1 << 20


def handshake(path: bytes = b"/ws/", extra: bytes = b"", key: bytes | None = None) -> bytes:
    """A valid WebSocket opening handshake (plus C{extra} header lines)."""
    key = key or base64.b64encode(os.urandom(16))
    return (
        b"GET %s HTTP/1.1\r\nHost: a\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        b"Sec-WebSocket-Key: %s\r\nSec-WebSocket-Version: 13\r\n%s\r\n" % (path, key, extra)
    )


# -- the backend: autobahn's echo server -------------------------------------------


class EchoServer(WebSocketServerProtocol):
    """
    Echoes every message; a text message C{close:CODE} makes it close with
    that code.  Records the close code the client sent.
    """

    def onConnect(self, request):
        self.factory.requests.append(request)

    def onMessage(self, payload, isBinary):
        if not isBinary and payload.startswith(b"close:"):
            self.sendClose(int(payload[6:]), "asked to")
            return
        if not isBinary and payload.startswith(b"big:"):
            self.sendMessage(b"b" * int(payload[4:]), True)
            return
        self.sendMessage(payload, isBinary)

    def onClose(self, wasClean, code, reason):
        self.factory.closes.append(code)


def echo_factory() -> WebSocketServerFactory:
    """An L{EchoServer} factory with no size limits, recording handshakes and closes."""
    factory = WebSocketServerFactory()
    factory.protocol = EchoServer
    factory.requests = []
    factory.closes = []
    factory.setProtocolOptions(maxMessagePayloadSize=0, maxFramePayloadSize=0)
    return factory


# -- the client --------------------------------------------------------------------


class Client(WebSocketClientProtocol):
    """Records messages, pongs and the close; C{factory.opened} fires on open."""

    def __init__(self):
        super().__init__()
        self.messages: list[tuple[bytes, bool]] = []
        self.pongs: list[bytes] = []
        self.closed = None

    def onOpen(self):
        self.factory.opened.callback(self)

    def onMessage(self, payload, isBinary):
        self.messages.append((payload, isBinary))

    def onPong(self, payload):
        self.pongs.append(payload)

    def onClose(self, wasClean, code, reason):
        self.closed = (code, reason)
        if not self.factory.opened.called:
            self.factory.opened.errback(AssertionError(f"handshake failed: {code} {reason}"))


async def connect(port: int, path: str = "/ws/", host: str = "127.0.0.1") -> Client:
    """An open autobahn client connected through Balance's C{port}."""
    factory = WebSocketClientFactory(f"ws://{host}:{port}{path}")
    factory.protocol = Client
    factory.setProtocolOptions(maxMessagePayloadSize=0, maxFramePayloadSize=0)
    factory.opened = Deferred()
    reactor.connectTCP(host, port, factory)
    return await factory.opened


# -- a backend that declines upgrades ------------------------------------------------


class _Declining(Protocol):
    """Parses requests (an upgrade stops its parser: the connection then
    closes), answers 403 to upgrades and 200 to the rest."""

    def connectionMade(self):
        self.factory.connections += 1
        self._parser = httptools.HttpRequestParser(self)

    def dataReceived(self, data):
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade as e:
            self.factory.leftovers.append(data[e.args[0] :])
        except httptools.HttpParserError:
            self.transport.abortConnection()

    def on_message_begin(self):
        self._current = ParsedRequest()

    def on_url(self, url):
        self._current.target += url

    def on_header(self, name, value):
        self._current.headers.append((name, value))

    def on_body(self, body):
        self._current.body += body

    def on_message_complete(self):
        self.factory.requests.append(self._current)
        if self._parser.should_upgrade():
            self.transport.write(b"HTTP/1.1 403 Forbidden\r\nContent-Length: 4\r\n\r\nnope")
        else:
            self.transport.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")

    def connectionLost(self, reason):
        self.factory.connections -= 1


class Declining(Factory):
    """A backend that never switches protocols (see L{_Declining})."""

    protocol = _Declining
    noisy = False

    def __init__(self):
        self.requests: list[ParsedRequest] = []
        self.leftovers: list[bytes] = []
        self.connections = 0


@implementer(IHalfCloseableProtocol)
class _RawWebSocket(Protocol):
    """
    A backend that accepts the handshake by hand, then echoes raw bytes and
    answers the client's EOF with C{done} and its own close.
    """

    def connectionMade(self):
        self._head = b""
        self._open = False

    def dataReceived(self, data):
        if self._open:
            self.transport.write(data)
            return
        self._head += data
        if b"\r\n\r\n" not in self._head:
            return
        head, _, rest = self._head.partition(b"\r\n\r\n")
        self.factory.heads.append(head)
        keys = [
            line.split(b":", 1)[1].strip()
            for line in head.split(b"\r\n")
            if line.lower().startswith(b"sec-websocket-key:")
        ]
        key = keys[0] if keys else b""
        accept = self.factory.accept(key)
        gate = self.factory.gate
        if gate is not None and not gate.called:
            gate.addCallback(lambda _: self._answer(accept, rest))
            return
        self._answer(accept, rest)

    def _answer(self, accept: bytes, rest: bytes) -> None:
        self.transport.write(
            b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
            b"Connection: Upgrade\r\nSec-WebSocket-Accept: %s\r\n\r\nhi" % (accept,)
        )
        self._open = True
        if rest:
            self.transport.write(rest)

    def readConnectionLost(self):
        self.transport.write(b"done")
        self.transport.loseConnection()

    def writeConnectionLost(self):
        pass


class _RawClient(Protocol):
    """A client on the reactor: records what it reads."""

    def __init__(self):
        self.received = b""
        self.lost = Deferred()

    def dataReceived(self, data):
        self.received += data

    def connectionLost(self, reason):
        self.lost.callback(None)


class RawWebSocket(Factory):
    """
    The factory of L{_RawWebSocket}s.

    :param accept: computes the C{Sec-WebSocket-Accept} it answers (a liar
        answers a wrong one).
    """

    protocol = _RawWebSocket
    noisy = False

    def __init__(self, accept=accept_value):
        self.accept = accept
        self.heads: list[bytes] = []
        # When set, the 101 waits for this Deferred.
        self.gate = None


class WebSocketTests(BalanceTestCase):
    """WebSocket tunnels through Balance to autobahn's echo server."""

    def setUp(self):
        self.echo = echo_factory()
        echo_port = self.listen(self.echo)
        self.declining = Declining()
        declining_port = self.listen(self.declining)
        self.raw = RawWebSocket()
        raw_port = self.listen(self.raw)
        self.liar = RawWebSocket(lambda key: accept_value(key + b"x"))
        liar_port = self.listen(self.liar)
        self.log_path = os.path.abspath(self.mktemp())
        self.port = self.start_balance(
            f"""
            listeners:
              - name: web
                listen: "tcp:0:interface=127.0.0.1"
                protocol: http
                access_log: {{path: "{self.log_path}", format: json}}
                routes:
                  - match: {{path_prefix: "/ws/"}}
                    cluster: echo
                    websocket: true
                  - match: {{path_prefix: "/limited/"}}
                    cluster: echo
                    websocket: true
                    websocket_max_message_bytes: 1000
                  - match: {{path_prefix: "/declines/"}}
                    cluster: declining
                    websocket: true
                  - match: {{path_prefix: "/plain/"}}
                    cluster: declining
                  - match: {{path_prefix: "/raw/"}}
                    cluster: raw
                    websocket: true
                  - match: {{path_prefix: "/liar/"}}
                    cluster: liar
                    websocket: true
                  - match: {{path_prefix: "/unasked/"}}
                    cluster: raw
              - name: idle
                listen: "tcp:0:interface=127.0.0.2"
                protocol: http
                timeouts: {{idle: 500ms}}
                routes:
                  - {{match: {{path_prefix: "/"}}, cluster: echo, websocket: true}}
            clusters:
              - name: echo
                backends: [{{address: "127.0.0.1:{echo_port}"}}]
              - name: declining
                backends: [{{address: "127.0.0.1:{declining_port}"}}]
              - name: raw
                backends: [{{address: "127.0.0.1:{raw_port}"}}]
              - name: liar
                backends: [{{address: "127.0.0.1:{liar_port}"}}]
            """
        )
        self.metrics = self.service.metrics

    def listener_port(self, name: str) -> int:
        return self.service.listeners.getServiceNamed(name).port.getHost().port

    def access(self):
        """The route metrics of listener web, by route label."""
        return {m.route: m for m in self.service.metrics._routes.values() if m.listener == "web"}

    async def test_text_and_binary(self):
        """Text and binary messages are echoed through the tunnel, in order."""
        client = await connect(self.port)
        client.sendMessage("héllo".encode(), isBinary=False)
        client.sendMessage(b"\x00\x01\xff", isBinary=True)
        await wait_for(lambda: len(client.messages) == 2, what="two echoes")
        self.assertEqual(client.messages, [("héllo".encode(), False), (b"\x00\x01\xff", True)])
        [request] = self.echo.requests
        self.assertEqual(request.path, "/ws/")
        self.assertIn("x-forwarded-for", request.headers)
        client.sendClose(1000)
        await wait_for(lambda: client.closed is not None, what="close")
        self.assertEqual(client.closed[0], 1000)

    async def test_fragmented_and_large(self):
        """
        A message sent in fragments arrives whole; 1 MB messages go both
        ways with flow control.
        """
        client = await connect(self.port)
        fragmented = os.urandom(10000)
        client.sendMessage(fragmented, isBinary=True, fragmentSize=1000)
        big = os.urandom(MEGABYTE)
        for _ in range(3):
            client.sendMessage(big, isBinary=True)
        await wait_for(lambda: len(client.messages) == 4, what="four echoes")
        self.assertEqual(client.messages[0], (fragmented, True))
        self.assertEqual([m for m, _ in client.messages[1:]], [big] * 3)
        client.sendClose(1000)
        await wait_for(lambda: client.closed is not None, what="close")

    async def test_ping_pong(self):
        """A ping is answered with a pong carrying its payload."""
        client = await connect(self.port)
        client.sendPing(b"are you there")
        await wait_for(lambda: client.pongs, what="pong")
        self.assertEqual(client.pongs, [b"are you there"])
        client.sendClose(1000)
        await wait_for(lambda: client.closed is not None, what="close")

    async def test_close_codes(self):
        """Close codes go through both ways: the backend's, and the client's."""
        client = await connect(self.port)
        client.sendMessage(b"close:4001")
        await wait_for(lambda: client.closed is not None, what="backend close")
        self.assertEqual(client.closed[0], 4001)
        client = await connect(self.port)
        client.sendClose(4002, "client leaves")
        await wait_for(lambda: len(self.echo.closes) == 2, what="client close at the backend")
        self.assertEqual(self.echo.closes[1], 4002)

    async def test_access_log_metrics(self):
        """The upgrade counts as a 101 on its route; listener bytes include the tunnel."""
        listener = self.metrics.listener("web")
        before = listener.bytes_in
        client = await connect(self.port)
        client.sendMessage(b"x" * 50000, isBinary=True)
        await wait_for(lambda: client.messages, what="echo")
        client.sendClose(1000)
        await wait_for(lambda: self.access()["0"].codes.get(101) == 1, what="101 counted")
        self.assertGreater(listener.bytes_in - before, 50000)
        self.assertGreater(listener.bytes_out, 50000)
        await wait_for(lambda: listener.active == 0, what="connection closed")
        await wait_for(lambda: self.log_lines(), what="the access log line")
        [line] = self.log_lines()
        self.assertEqual((line["status"], line["target"], line["reason"]), (101, "/ws/", None))
        self.assertGreater(line["request_bytes"], 50000)
        self.assertGreater(line["response_bytes"], 50000)

    def log_lines(self) -> list[dict]:
        """The access log's lines so far, parsed."""
        if not os.path.exists(self.log_path):
            return []
        with open(self.log_path) as f:
            return [json.loads(line) for line in f]

    async def test_not_websocket_route(self):
        """A WebSocket handshake on a route without websocket: true is 400, never forwarded."""
        responses, _, closed = await self.in_thread(
            _exchange, self.port, handshake(b"/plain/"), 1, True
        )
        self.assertEqual([r.status for r in responses], [400])
        self.assertTrue(closed)
        self.assertEqual(self.declining.requests, [])

    async def test_invalid_handshakes(self):
        """A handshake missing or getting wrong any required part is 400."""
        key = base64.b64encode(os.urandom(16))
        bad = [
            handshake()
            .replace(b"GET", b"POST", 1)
            .replace(b"\r\n\r\n", b"\r\nContent-Length: 0\r\n\r\n"),
            handshake().replace(b"HTTP/1.1", b"HTTP/1.0", 1),
            handshake().replace(b"Version: 13", b"Version: 8"),
            handshake(key=b"c2hvcnQ="),
            handshake(key=b"not base64 at all!!!"),
            handshake().replace(b"Sec-WebSocket-Key: ", b"X-Key: "),
            handshake(extra=b"Sec-WebSocket-Key: " + key + b"\r\n"),
        ]
        for data in bad:
            responses, _, closed = await self.in_thread(_exchange, self.port, data, 1)
            self.assertEqual([r.status for r in responses], [400], data)
        self.assertEqual(self.echo.requests, [])
        # Without "Connection: upgrade" the Upgrade field is hop-by-hop
        # noise (RFC 9110 7.8): dropped, and the GET served as plain HTTP.
        plain = handshake().replace(b"Connection: Upgrade", b"Connection: keep-alive")
        responses, _, _ = await self.in_thread(_exchange, self.port, plain, 1)
        self.assertNotIn(101, [r.status for r in responses])

    async def test_declined_upgrade_is_not_a_tunnel(self):
        """
        A backend answering the handshake with anything but 101 has its
        answer passed on, and the connection stays HTTP: a request sent
        right behind the handshake (the smuggling attempt) is parsed and
        answered as HTTP, by the backend, on a connection of its own.
        """
        smuggled = b"GET /plain/smuggled HTTP/1.1\r\nHost: a\r\n\r\n"
        responses, _, _ = await self.in_thread(
            _exchange, self.port, handshake(b"/declines/") + smuggled, 2
        )
        self.assertEqual([r.status for r in responses], [403, 200])
        self.assertEqual(responses[1].body, b"ok")
        targets = [r.target for r in self.declining.requests]
        self.assertEqual(targets, [b"/declines/", b"/plain/smuggled"])
        upgrade = dict((n.lower(), v) for n, v in self.declining.requests[0].headers)
        self.assertEqual(upgrade[b"upgrade"], b"websocket")
        self.assertEqual(upgrade[b"connection"], b"Upgrade")
        self.assertEqual(self.declining.leftovers, [b""])

    async def test_other_upgrades_ignored(self):
        """An Upgrade other than websocket (h2c) is dropped and the request served."""
        data = (
            b"POST /plain/a HTTP/1.1\r\nHost: a\r\nConnection: Upgrade, HTTP2-Settings\r\n"
            b"Upgrade: h2c\r\nHTTP2-Settings: AAMAAABkAAQCAAAAAAIAAAAA\r\nContent-Length: 5\r\n\r\n"
            b"helloGET /plain/b HTTP/1.1\r\nHost: a\r\n\r\n"
        )
        responses, _, _ = await self.in_thread(_exchange, self.port, data, 2)
        self.assertEqual([r.status for r in responses], [200, 200])
        first, second = self.declining.requests
        self.assertEqual((first.target, second.target), (b"/plain/a", b"/plain/b"))
        self.assertEqual(first.body, b"hello")
        names = {n.lower() for n, _ in first.headers}
        self.assertFalse(names & {b"upgrade", b"http2-settings"}, first.headers)

    async def test_half_close_and_early_bytes(self):
        """
        Bytes the client sends right behind its handshake reach the backend
        after it; the client's write half-close reaches the backend, whose
        answer and close come back.
        """

        def client():
            with socket.create_connection(("127.0.0.1", self.port), timeout=10) as sock:
                sock.sendall(handshake(b"/raw/") + b"early ")
                data = b""
                while b"early " not in data:
                    data += sock.recv(65536)
                sock.sendall(b"late")
                sock.shutdown(socket.SHUT_WR)
                while True:
                    chunk = sock.recv(65536)
                    if not chunk:
                        return data
                    data += chunk

        data = await self.in_thread(client)
        head, _, body = data.partition(b"\r\n\r\n")
        self.assertTrue(head.startswith(b"HTTP/1.1 101 "), head)
        self.assertIn(b"\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n", head)
        self.assertEqual(body, b"hiearly latedone")
        [sent] = self.raw.heads
        self.assertIn(b"\r\nConnection: Upgrade\r\nUpgrade: websocket", sent)

    async def test_bytes_while_waiting_for_101(self):
        """
        Bytes the client sends in later reads while the backend has not
        answered yet are held, then sent through the tunnel in order.
        """
        self.raw.gate = Deferred()
        client = _RawClient()
        await connect_client(self.port, client)
        client.transport.write(handshake(b"/raw/"))
        await wait_for(lambda: self.raw.heads, what="the handshake at the backend")
        before = self.metrics.listener("web").bytes_in
        client.transport.write(b"sent while waiting")
        await wait_for(
            lambda: self.metrics.listener("web").bytes_in > before, what="Balance read it"
        )
        self.raw.gate.callback(None)
        await wait_for(lambda: client.received.endswith(b"hisent while waiting"), what="echo")
        client.transport.loseConnection()
        await client.lost

    async def test_backend_message_limit(self):
        """A backend message over the limit closes both sides with 1009 too."""
        client = await connect(self.port, "/limited/")
        client.sendMessage(b"big:1001")
        await wait_for(lambda: client.closed is not None, what="1009")
        self.assertEqual(client.closed[0], 1009)
        self.assertEqual(client.messages, [])
        await wait_for(lambda: self.echo.closes, what="backend closed")
        self.assertEqual(self.echo.closes, [1009])

    async def test_wrong_accept(self):
        """A 101 with the wrong Sec-WebSocket-Accept is a 502, and no tunnel."""
        responses, _, _ = await self.in_thread(_exchange, self.port, handshake(b"/liar/"), 1)
        self.assertEqual([r.status for r in responses], [502])

    async def test_unasked_101(self):
        """A 101 to a request that asked no upgrade is a 502."""
        responses, _, _ = await self.in_thread(
            _exchange, self.port, b"GET /unasked/ HTTP/1.1\r\nHost: a\r\n\r\n", 1
        )
        self.assertEqual([r.status for r in responses], [502])

    async def test_other_upgrades_chunked(self):
        """An ignored Upgrade on a chunked request: the body is read as a body."""
        data = (
            b"POST /plain/a HTTP/1.1\r\nHost: a\r\nConnection: Upgrade\r\n"
            b"Upgrade: h2c\r\nTransfer-Encoding: chunked\r\n\r\n"
            b"5\r\nhello\r\n0\r\n\r\n"
            b"GET /plain/b HTTP/1.1\r\nHost: a\r\n\r\n"
        )
        responses, _, _ = await self.in_thread(_exchange, self.port, data, 2)
        self.assertEqual([r.status for r in responses], [200, 200])
        first, second = self.declining.requests
        self.assertEqual((first.target, second.target), (b"/plain/a", b"/plain/b"))
        self.assertEqual(first.body, b"hello")

    async def test_idle_timeout(self):
        """A tunnel without traffic for the listener's idle timeout is closed."""
        client = await connect(self.listener_port("idle"), "/", host="127.0.0.2")
        client.sendMessage(b"still here")
        await wait_for(lambda: client.messages, what="echo")
        await wait_for(lambda: client.closed is not None, timeout=10, what="idle close")
        self.assertEqual(client.messages, [(b"still here", False)])

    async def test_message_limit(self):
        """
        In frame-aware mode messages up to the limit pass and are counted;
        one larger closes both sides with 1009, also when it comes in
        fragments that are each small enough.
        """
        client = await connect(self.port, "/limited/")
        client.sendMessage(b"a" * 1000, isBinary=True)
        client.sendMessage(b"b" * 10, isBinary=False, fragmentSize=3)
        await wait_for(lambda: len(client.messages) == 2, what="echoes")
        up = self.metrics.websocket_messages("1", "upstream")
        down = self.metrics.websocket_messages("1", "downstream")
        self.assertEqual((up.value, down.value), (2, 2))
        client.sendMessage(b"c" * 1001, isBinary=True, fragmentSize=400)
        await wait_for(lambda: client.closed is not None, what="1009")
        self.assertEqual(client.closed[0], 1009)
        await wait_for(lambda: len(self.echo.closes) == 1, what="backend closed")
        self.assertEqual(self.echo.closes, [1009])
        self.assertEqual(len(client.messages), 2)
        await wait_for(lambda: self.log_lines(), what="the access log line")
        [line] = self.log_lines()
        self.assertEqual(line["status"], 101)
        self.assertEqual(line["reason"], "client message above websocket_max_message_bytes")
        text = self.metrics.render().decode()
        self.assertIn('balance_websocket_messages_total{direction="upstream",route="1"} 2.0', text)



class CopyingWebSocketTests(WebSocketTests):
    """
    The same through the producer/consumer relay (plain TCP tunnels without
    a frame guard are otherwise spliced).
    """

    def setUp(self):
        self.patch(Tunnel, "splice", False)
        return super().setUp()

class DrainTests(BalanceTestCase):
    """On stop, open tunnels may finish within drain_timeout, then are closed."""

    def start(self, drain_timeout: str) -> None:
        self.echo = echo_factory()
        echo_port = self.listen(self.echo)
        self.port = self.start_balance(
            f"""
            drain_timeout: {drain_timeout}
            listeners:
              - name: web
                listen: "tcp:0:interface=127.0.0.1"
                routes:
                  - {{match: {{path_prefix: "/"}}, cluster: echo, websocket: true}}
            clusters:
              - name: echo
                backends: [{{address: "127.0.0.1:{echo_port}"}}]
            """
        )

    async def test_tunnel_finishes(self):
        """A tunnel keeps working while Balance drains; the stop waits for its close."""
        self.start("30s")
        client = await connect(self.port)
        stopped = self.service.stopService()
        client.sendMessage(b"still served")
        await wait_for(lambda: client.messages, what="echo while draining")
        self.assertFalse(stopped.called)
        client.sendClose(1000)
        await stopped
        self.assertEqual(client.messages, [(b"still served", False)])

    async def test_tunnel_cut_after_drain_timeout(self):
        """A tunnel still open when drain_timeout passes is closed."""
        self.start("300ms")
        client = await connect(self.port)
        await self.service.stopService()
        await wait_for(lambda: client.closed is not None, what="the client's connection closed")


@implementer(IOpenSSLContextFactory)
class _ChainContext:
    """A server TLS context with the certificate chain of C{cert}'s file."""

    def __init__(self, cert: str, key: str):
        self.cert, self.key = cert, key

    def getContext(self):
        context = SSL.Context(SSL.TLS_METHOD)
        context.use_certificate_chain_file(self.cert)
        context.use_privatekey_file(self.key)
        return context


class SecureWebSocketTests(BalanceTestCase):
    """
    wss://: Balance terminates TLS and tunnels to the backend over TLS
    too, its certificate verified.
    """

    def setUp(self):
        self.echo = echo_factory()
        directory = os.path.abspath(self.mktemp())
        os.makedirs(directory)
        cert = tls_support.write(directory, "localhost")
        ca = tls_support.write_ca(directory)
        port = reactor.listenSSL(
            0, self.echo, _ChainContext(cert.cert, cert.key), interface="127.0.0.1"
        )
        self.addCleanup(port.stopListening)
        echo_port = port.getHost().port
        self.port = self.start_balance(
            f"""
            listeners:
              - name: web
                listen: "tcp:0:interface=127.0.0.1"
                protocol: http
                tls:
                  certificates: [{{cert: {cert.cert}, key: {cert.key}}}]
                  alpn: [http/1.1]
                routes:
                  - {{match: {{path_prefix: "/"}}, cluster: echo, websocket: true}}
            clusters:
              - name: echo
                backends: [{{address: "127.0.0.1:{echo_port}"}}]
                tls: {{verify: true, ca: {ca}, sni: localhost}}
            """
        )

    async def test_echo_over_tls(self):
        """Messages of every size are echoed over wss, and the close goes through."""
        factory = WebSocketClientFactory(f"wss://localhost:{self.port}/tls")
        factory.protocol = Client
        factory.setProtocolOptions(maxMessagePayloadSize=0, maxFramePayloadSize=0)
        factory.opened = Deferred()
        trust = ssl.Certificate.loadPEM(tls_support.pki()["ca"].cert_pem)
        endpoint = wrapClientTLS(
            ssl.optionsForClientTLS("localhost", trustRoot=trust),
            TCP4ClientEndpoint(reactor, "127.0.0.1", self.port),
        )
        await endpoint.connect(factory)
        client = await factory.opened
        big = os.urandom(MEGABYTE)
        client.sendMessage(b"over tls", isBinary=False)
        client.sendMessage(big, isBinary=True)
        await wait_for(lambda: len(client.messages) == 2, what="echoes")
        self.assertEqual(client.messages, [(b"over tls", False), (big, True)])
        client.sendClose(4005)
        await wait_for(lambda: self.echo.closes, what="close at the backend")
        self.assertEqual(self.echo.closes, [4005])
        await wait_for(lambda: client.closed is not None, what="client closed")


# Virtual time (--virtual-time-budget) stands still while a fetch is pending,
# not while a WebSocket is: the page holds a fetch of /gate/hold open until
# it has the echo (or an error) and has asked for /gate/done.
_PAGE = """<!doctype html>
<html><body><p id="out">waiting</p><script>
fetch("/gate/hold");
const out = document.getElementById("out");
const done = () => fetch("/gate/done");
const ws = new WebSocket("ws://" + location.host + "/ws/");
ws.onopen = () => ws.send("hello from chromium");
ws.onmessage = (e) => {
  out.textContent = "echoed: " + e.data;
  ws.close(1000);
  done();
};
ws.onerror = () => { out.textContent = "websocket error"; done(); };
</script></body></html>"""


class Gate(Resource):
    """
    C{/gate/hold} answers once C{/gate/done} was asked (or after
    C{timeout} seconds, so that a broken page cannot hang the test).
    """

    isLeaf = True

    def __init__(self, timeout: float = 30.0):
        super().__init__()
        self.held: list = []
        self.opened = False
        self._timer = reactor.callLater(timeout, self.open)

    def render_GET(self, request):
        if request.path.endswith(b"/hold") and not self.opened:
            self.held.append(request)
            return NOT_DONE_YET
        if request.path.endswith(b"/done"):
            self.open()
        return b"ok"

    def open(self):
        self.opened = True
        if self._timer.active():
            self._timer.cancel()
        held, self.held = self.held, []
        for request in held:
            if not request.finished and not request._disconnected:
                request.write(b"ok")
                request.finish()


def dump_dom(chromium: str, profile: str, url: str, timeout: float = 60.0) -> str:
    """
    The DOM of C{url} after headless Chromium ran its scripts
    (C{--dump-dom}); Chromium and its helpers are killed by process
    group if it takes longer than C{timeout}.
    """
    process = subprocess.Popen(
        [
            chromium,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-background-networking",
            "--disable-component-update",
            "--no-first-run",
            f"--user-data-dir={profile}",
            "--virtual-time-budget=10000",
            "--dump-dom",
            url,
        ],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        out, _ = process.communicate(timeout=timeout)
    finally:
        try:
            os.killpg(process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        process.wait()
    return out.decode("utf-8", "replace")


class ChromiumTests(BalanceTestCase):
    """
    A real browser: Balance serves a page (a direct_response route) whose
    script opens a WebSocket through Balance to the echo backend and
    writes the echo into the page.
    """

    def setUp(self):
        self.chromium = need_tool("chromium", "chromium")
        self.echo = echo_factory()
        echo_port = self.listen(self.echo)
        gate = Gate()
        self.addCleanup(gate.open)
        gate_port = self.listen(Site(gate))
        self.port = self.start_balance(
            f"""
            listeners:
              - name: web
                listen: "tcp:0:interface=127.0.0.1"
                protocol: http
                routes:
                  - match: {{path_prefix: "/ws/"}}
                    cluster: echo
                    websocket: true
                  - match: {{path: "/"}}
                    direct_response:
                      status: 200
                      body: {json.dumps(_PAGE)}
                      headers: {{content-type: "text/html; charset=utf-8"}}
                  - {{match: {{path_prefix: "/gate/"}}, cluster: gate}}
            clusters:
              - name: echo
                backends: [{{address: "127.0.0.1:{echo_port}"}}]
              - name: gate
                backends: [{{address: "127.0.0.1:{gate_port}"}}]
            """
        )

    async def test_browser_echo(self):
        """Chromium's WebSocket gets its message echoed through Balance."""
        profile = os.path.abspath(self.mktemp())
        os.makedirs(profile)
        dom = await self.in_thread(
            dump_dom, self.chromium, profile, f"http://127.0.0.1:{self.port}/"
        )
        self.assertIn('<p id="out">echoed: hello from chromium</p>', dom)
        [request] = self.echo.requests
        self.assertEqual(request.path, "/ws/")
        await wait_for(lambda: self.echo.closes, what="the browser's close")
        self.assertEqual(self.echo.closes, [1000])


def _exchange(port: int, data: bytes, count: int, wait_close: bool = False):
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(data)
        responses, raw, closed = read_responses(sock, count)
        if wait_close and not closed:
            closed = closes(sock)
        return responses, raw, closed
