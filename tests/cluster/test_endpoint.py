"""
L{balance.cluster.endpoint} over real loopback sockets: the lean connect
behaves as Twisted's TCP endpoints do, and keeps nothing of the connect.
"""

from __future__ import annotations

import gc
import socket
import weakref

from twisted.internet import error, reactor
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.interfaces import IHalfCloseableProtocol
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import deferLater
from twisted.internet.testing import MemoryReactorClock
from twisted.trial.unittest import SkipTest, TestCase
from zope.interface import implementer

from balance._io import LeanClient, can_send_directly
from balance.cluster.endpoint import LeanTCP4ClientEndpoint, LeanTCP6ClientEndpoint
from tests.helpers import EchoFactory, closed_port, ipv6_available, wait_for


@implementer(IHalfCloseableProtocol)
class Client(Protocol):
    """Records what it gets and whether it was connected; closes on EOF."""

    def __init__(self):
        self.received = bytearray()
        self.made_before_fired = None
        self.eof = False
        self.lost = Deferred()

    def connectionMade(self):
        self.made_before_fired = True

    def dataReceived(self, data):
        self.received += data

    def readConnectionLost(self):
        self.eof = True
        self.transport.loseConnection()

    def writeConnectionLost(self):
        pass

    def connectionLost(self, reason):
        self.reason = reason
        self.lost.callback(None)


class Clients(Factory):
    noisy = False
    protocol = Client


class LeanEndpointTests(TestCase):
    """Connecting to an IP-literal backend with the lean endpoints."""

    def listen(self, interface="127.0.0.1"):
        self.backend = EchoFactory()
        port = reactor.listenTCP(0, self.backend, interface=interface)
        self.addCleanup(port.stopListening)
        return port.getHost().port

    @inlineCallbacks
    def test_connects_and_relays(self):
        """
        The Deferred fires with the factory's own protocol once it is
        connected; its transport is a plain TCP one that carries bytes both
        ways and keeps no connector, wrapper or connect timer.
        """
        port = self.listen()
        protocol = yield LeanTCP4ClientEndpoint(reactor, "127.0.0.1", port, timeout=5).connect(
            Clients()
        )
        self.assertIsInstance(protocol, Client)
        self.assertTrue(protocol.made_before_fired)
        transport = protocol.transport
        self.assertIs(type(transport), LeanClient)
        self.assertIs(transport.protocol, protocol)
        self.assertTrue(can_send_directly(transport))
        self.assertFalse(hasattr(transport, "connector"))
        # The connect timer (5 s) is gone; trial's own (120 s) is not ours.
        soon = reactor.seconds() + 10
        self.assertEqual([c for c in reactor.getDelayedCalls() if c.getTime() < soon], [])
        self.assertEqual((transport.getPeer().host, transport.getPeer().port), ("127.0.0.1", port))
        self.assertEqual(transport.getHost().host, "127.0.0.1")
        self.assertGreater(transport.fileno(), 2)
        transport.write(b"hello")
        yield wait_for(lambda: bytes(protocol.received) == b"hello", 10, "the echo")
        transport.loseWriteConnection()
        yield protocol.lost
        self.assertTrue(protocol.eof)
        self.assertTrue(protocol.reason.check(error.ConnectionDone))
        self.assertEqual(transport.fileno(), -1)

    @inlineCallbacks
    def test_refused(self):
        """A refused connect fails with ConnectionRefusedError, as Twisted's."""
        endpoint = LeanTCP4ClientEndpoint(reactor, "127.0.0.1", closed_port(), timeout=5)
        with self.assertRaises(error.ConnectionRefusedError):
            yield endpoint.connect(Clients())

    @inlineCallbacks
    def test_timeout(self):
        """A connect that does not finish within the timeout fails with TimeoutError."""
        # A listener whose accept queue is full drops further SYNs.
        listener = socket.socket()
        self.addCleanup(listener.close)
        listener.bind(("127.0.0.1", 0))
        listener.listen(0)
        address = listener.getsockname()
        fillers = []
        self.addCleanup(lambda: [s.close() for s in fillers])
        for _ in range(8):
            s = socket.socket()
            s.setblocking(False)
            fillers.append(s)
            s.connect_ex(address)
        endpoint = LeanTCP4ClientEndpoint(reactor, *address, timeout=0.2)
        try:
            yield endpoint.connect(Clients())
        except error.TimeoutError:
            return
        except error.ConnectError as e:
            raise SkipTest(f"this kernel does not drop SYNs to a full queue: {e}") from e
        raise SkipTest("this kernel accepted beyond the listen backlog")

    @inlineCallbacks
    def test_cancel(self):
        """Cancelling a connect in flight fails it with ConnectingCancelledError."""
        listener = socket.socket()
        self.addCleanup(listener.close)
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        endpoint = LeanTCP4ClientEndpoint(reactor, *listener.getsockname(), timeout=5)
        d = endpoint.connect(Clients())
        d.cancel()
        with self.assertRaises(error.ConnectingCancelledError):
            yield d
        self.assertEqual([w for w in reactor.getWriters() if type(w).__name__ == "_Connecting"], [])

    @inlineCallbacks
    def test_no_protocol(self):
        """A factory that builds no protocol fails the connect with NoProtocol."""
        port = self.listen()

        class Nothing(Factory):
            def buildProtocol(self, addr):
                return None

        with self.assertRaises(error.NoProtocol):
            yield LeanTCP4ClientEndpoint(reactor, "127.0.0.1", port).connect(Nothing())
        yield wait_for(lambda: self.backend.open == 0, 10, "the backend side to close")

    @inlineCallbacks
    def test_ipv6(self):
        """An IPv6 literal connects the same way, with an IPv6 peer address."""
        if not ipv6_available():
            raise SkipTest("no IPv6 on this machine")
        port = self.listen("::1")
        protocol = yield LeanTCP6ClientEndpoint(reactor, "::1", port, timeout=5).connect(
            Clients()
        )
        peer = protocol.transport.getPeer()
        self.assertEqual((type(peer).__name__, peer.host, peer.port), ("IPv6Address", "::1", port))
        protocol.transport.loseConnection()
        yield protocol.lost

    @inlineCallbacks
    def test_nothing_kept_of_the_connect(self):
        """Once connected, nothing of the connect stays alive with the connection."""
        port = self.listen()
        d = LeanTCP4ClientEndpoint(reactor, "127.0.0.1", port).connect(Clients())
        connecting = weakref.ref(d._canceller.__self__)
        protocol = yield d
        del d
        # The Deferred is on the stack while it runs this generator.
        yield deferLater(reactor, 0, lambda: None)
        gc.collect()
        self.assertIsNone(connecting())
        self.assertEqual(reactor.getWriters().count(protocol.transport), 0)
        protocol.transport.abortConnection()
        yield protocol.lost

    def test_other_reactors_connect_as_twisted(self):
        """On a reactor without file descriptors (tests) the endpoint uses connectTCP."""
        memory = MemoryReactorClock()
        LeanTCP4ClientEndpoint(memory, "127.0.0.1", 9001, timeout=3).connect(Clients())
        self.assertEqual(memory.tcpClients[0][:2], ("127.0.0.1", 9001))
        self.assertEqual(memory.tcpClients[0][3], 3)
