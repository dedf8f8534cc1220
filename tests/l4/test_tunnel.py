"""
L{balance.l4.tunnel.Tunnel} over real loopback sockets: a front server
whose accepted connections are joined to a connection to a backend, as an
upgraded HTTP connection is.
"""

from __future__ import annotations

import os

from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.interfaces import IHalfCloseableProtocol
from twisted.internet.protocol import Factory, Protocol
from twisted.trial import unittest
from zope.interface import implementer

from balance.l4.tunnel import Tunnel, take_over
from tests.helpers import CheckingClient, EchoFactory, buffered, connect_client, wait_for


class _Before(Protocol):
    """A connection's protocol before the tunnel takes it over."""

    def __init__(self):
        self.received = b""

    def dataReceived(self, data):
        self.received += data


class _Front(Factory):
    """Joins each accepted connection to a new connection to C{backend_port}."""

    noisy = False

    def __init__(self, backend_port: int, idle: float, early: bytes = b""):
        self.backend_port = backend_port
        self.idle = idle
        self.early = early
        self.tunnels: list[Tunnel] = []
        self.done: list[Tunnel] = []
        self.started = Deferred()

    def buildProtocol(self, addr):
        protocol = _Before()
        protocol.factory = self
        reactor.callLater(0, self._join, protocol)
        return protocol

    def _join(self, front: _Before):
        front.transport.pauseProducing()
        d = connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", self.backend_port), _Before())

        def connected(back):
            tunnel = Tunnel(reactor, front.transport, back.transport, self.idle, self.done.append)
            self.tunnels.append(tunnel)
            tunnel.start(front, back, self.early + front.received)
            self.started.callback(tunnel)

        d.addCallback(connected)


@implementer(IHalfCloseableProtocol)
class _First(Protocol):
    """Says bye and shuts its write half at once; closes on the peer's EOF."""

    def connectionMade(self):
        self.transport.write(b"bye")
        self.transport.loseWriteConnection()

    def readConnectionLost(self):
        self.transport.loseConnection()

    def writeConnectionLost(self):
        pass


@implementer(IHalfCloseableProtocol)
class _HalfCloseable(Protocol):
    """A client that records what it reads and whether it read an EOF."""

    def __init__(self):
        self.received = b""
        self.eof = False
        self.lost = Deferred()

    def dataReceived(self, data):
        self.received += data

    def readConnectionLost(self):
        self.eof = True

    def writeConnectionLost(self):
        pass

    def connectionLost(self, reason):
        self.lost.callback(None)


class _FirstFactory(Factory):
    protocol = _First
    noisy = False


class TunnelTests(unittest.TestCase):
    """A tunnel between a front connection and an echoing (or half-closing) backend."""

    def setUp(self):
        self.echo = EchoFactory()
        port = reactor.listenTCP(0, self.echo, interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        self.addCleanup(wait_for, lambda: self.echo.open == 0, what="backend connections closed")
        self.backend_port = port.getHost().port

    def front(self, idle: float = 30.0, early: bytes = b"") -> int:
        self.factory = _Front(self.backend_port, idle, early)
        port = reactor.listenTCP(0, self.factory, interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        return port.getHost().port

    async def test_relay_with_flow_control(self):
        """
        32 MiB go through an echoing backend and back; the client's write
        half-close reaches the backend, which then closes, and that close
        reaches the client.  Neither side of the tunnel buffers more than a
        few socket reads meanwhile.
        """
        payload = os.urandom(32 << 20)
        client = CheckingClient(payload)
        port = self.front()
        await connect_client(port, client)
        tunnel = await self.factory.started
        most = [0]

        def watch():
            most[0] = max(most[0], buffered(tunnel._client), buffered(tunnel._backend))

        client.on_data = watch
        await client.lost
        self.assertTrue(client.complete, (client.received, client.mismatch))
        await wait_for(lambda: self.factory.done, what="tunnel done")
        self.assertEqual((tunnel.client_bytes, tunnel.backend_bytes), (len(payload), len(payload)))
        self.assertEqual(tunnel.reason, "")
        self.assertLess(most[0], 4 << 20)

    async def test_backend_half_close(self):
        """
        A backend that finishes sending first: its EOF reaches the client,
        which can still send; the client's EOF then ends the tunnel.
        """
        port = reactor.listenTCP(0, _FirstFactory(), interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        self.backend_port = port.getHost().port
        client = _HalfCloseable()
        front = self.front()
        await connect_client(front, client)
        tunnel = await self.factory.started
        await wait_for(lambda: client.eof, what="the backend's EOF at the client")
        self.assertEqual(client.received, b"bye")
        client.transport.write(b"still talking")
        client.transport.loseConnection()
        await client.lost
        await wait_for(lambda: self.factory.done, what="tunnel done")
        self.assertEqual(tunnel.client_bytes, 13)

    async def test_early_bytes_first(self):
        """Bytes read before the tunnel started go first, in order."""
        client = CheckingClient(b"world", expected=b"hello world")
        port = self.front(early=b"hello ")
        await connect_client(port, client)
        await client.lost
        self.assertTrue(client.complete, client.received)

    async def test_idle_timeout(self):
        """No byte either way for the idle timeout: both sides are aborted."""
        client = CheckingClient(b"ping", half_close=False)
        port = self.front(idle=0.3)
        await connect_client(port, client)
        await client.lost
        await wait_for(lambda: self.factory.done, what="tunnel done")
        self.assertEqual(client.received, 4)
        self.assertEqual(self.factory.done[0].reason, "tunnel idle timeout")

    async def test_abort(self):
        """abort() drops both sides."""
        client = CheckingClient(b"", half_close=False)
        port = self.front()
        await connect_client(port, client)
        tunnel = await self.factory.started
        tunnel.abort()
        await client.lost
        await wait_for(lambda: self.factory.done, what="tunnel done")

    def test_take_over_refuses_strangers(self):
        """take_over only replaces the protocol a transport reports to."""

        class Transport:
            protocol = None

        self.assertRaises(ValueError, take_over, Transport(), object(), object())


class CopyingTunnelTests(TunnelTests):
    """
    The same, through the producer/consumer relay that TLS transports and
    frame-aware tunnels use (plain TCP pairs are spliced otherwise).
    """

    def setUp(self):
        self.patch(Tunnel, "splice", False)
        super().setUp()
