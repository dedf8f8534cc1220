"""
L{balance.l4.splice} on its own, over real loopback sockets: two TCP
connections (outer client <-> inner A, inner B <-> outer server) tunnelled
A <-> B by the relay, as an L4 proxy, a WebSocket tunnel or SNI passthrough
would.
"""

from __future__ import annotations

import os

from twisted.internet import error, reactor
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.interfaces import IHalfCloseableProtocol
from twisted.internet.protocol import ClientFactory, Factory, Protocol
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.trial.unittest import SkipTest, TestCase
from zope.interface import implementer

from balance.l4 import splice
from tests.helpers import wait_for


@implementer(IHalfCloseableProtocol)
class Peer(Protocol):
    """Records what it receives, its EOF and its end; closes on EOF unless told not to."""

    close_on_eof = True

    def __init__(self):
        self.received = bytearray()
        self.eof = False
        self.reason = None
        self.made = Deferred()
        self.lost = Deferred()

    def connectionMade(self):
        self.made.callback(self)

    def dataReceived(self, data):
        self.received += data

    def readConnectionLost(self):
        self.eof = True
        if self.close_on_eof:
            self.transport.loseConnection()

    def writeConnectionLost(self):
        pass

    def connectionLost(self, reason):
        self.reason = reason
        self.lost.callback(None)


class _Factory(Factory):
    noisy = False

    def __init__(self):
        self.peers = []

    def buildProtocol(self, addr):
        peer = Peer()
        peer.factory = self
        self.peers.append(peer)
        return peer


class _ClientFactory(ClientFactory, _Factory):
    pass


class SpliceRelayTests(TestCase):
    """A tunnel between two real TCP connections."""

    timeout = 30

    def setUp(self):
        if not splice.ENABLED:
            raise SkipTest("splice(2) is not available here")
        self.server = _Factory()
        port = reactor.listenTCP(0, self.server, interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        self.port = port.getHost().port

    @inlineCallbacks
    def connection(self):
        """Connect: return (outer client protocol, inner server protocol)."""
        client = _ClientFactory()
        connector = reactor.connectTCP("127.0.0.1", self.port, client)
        self.addCleanup(connector.disconnect)
        yield wait_for(
            lambda: (
                client.peers
                and self.server.peers
                and client.peers[-1].made.called
                and self.server.peers[-1].made.called
            )
        )
        peers = (client.peers[-1], self.server.peers[-1])
        self.server.peers = []
        return peers

    @inlineCallbacks
    def tunnel(self, **kwargs):
        """
        Two connections and a relay between their inner ends: return
        (outer of A, outer of B, relay).
        """
        outer_a, inner_a = yield self.connection()
        outer_b, inner_b = yield self.connection()
        self.assertTrue(splice.can_splice(inner_a.transport, inner_b.transport))
        before = kwargs.pop("before", None)
        if before is not None:
            before(inner_a.transport, inner_b.transport)
        tunnel = splice.relay(inner_a.transport, inner_b.transport, reactor, **kwargs)
        self.addCleanup(lambda: tunnel.done.addErrback(lambda f: None))
        self.addCleanup(
            lambda: (outer_a.transport.abortConnection(), outer_b.transport.abortConnection())
        )
        return outer_a, outer_b, tunnel

    @inlineCallbacks
    def test_both_ways_with_half_close(self):
        """
        Bytes cross both ways; an EOF from one side reaches the other after
        its bytes while the other direction keeps flowing; when both are
        done both connections close and C{done} fires with the byte counts.
        """
        a, b, tunnel = yield self.tunnel()
        b.close_on_eof = False
        up, down = os.urandom(300_000), os.urandom(200_000)
        a.transport.write(up)
        a.transport.loseWriteConnection()
        yield wait_for(lambda: b.eof, what="EOF at B")
        self.assertEqual(bytes(b.received), up)
        b.transport.write(down)
        b.transport.loseWriteConnection()
        yield tunnel.done
        yield a.lost
        self.assertEqual(bytes(a.received), down)
        self.assertEqual((tunnel.a_to_b, tunnel.b_to_a), (len(up), len(down)))

    @inlineCallbacks
    def test_queued_and_initial_bytes_first(self):
        """
        Bytes queued in a transport's write buffer, then the initial bytes
        given to L{splice.relay}, arrive before anything spliced.
        """

        def queue(inner_a, inner_b):
            inner_b.write(b"queued-for-b;")
            inner_a.write(b"queued-for-a;")

        a, b, tunnel = yield self.tunnel(before=queue, a_to_b=b"early;", b_to_a=b"hello;")
        a.transport.write(b"spliced")
        yield wait_for(lambda: b.received.endswith(b"spliced") and a.received.endswith(b";"))
        self.assertEqual(bytes(b.received), b"queued-for-b;early;spliced")
        self.assertEqual(bytes(a.received), b"queued-for-a;hello;")
        self.assertEqual(tunnel.a_to_b, len(b.received))

    @inlineCallbacks
    def test_backpressure(self):
        """
        While B's reader does not read, A's sender is held back (the relay
        holds at most a pipe's worth); once it reads, everything arrives.
        """
        a, b, tunnel = yield self.tunnel()
        b.transport.pauseProducing()
        total = 32 * 1024 * 1024
        payload = os.urandom(1024 * 1024)
        for _ in range(total // len(payload)):
            a.transport.write(payload)
        # Let the kernel buffers and the pipe fill up.
        for _ in range(20):
            yield wait_for(lambda: True)
        yield _sleep(0.3)
        self.assertLess(tunnel.a_to_b, total // 2)
        self.assertGreater(len(a.transport.dataBuffer) + a.transport._tempDataLen, 0)
        b.transport.resumeProducing()
        yield wait_for(lambda: len(b.received) == total, what="all bytes at B")
        self.assertEqual(bytes(b.received[: len(payload)]), payload)

    @inlineCallbacks
    def test_reset_aborts_both(self):
        """A reset on one side aborts the other, and C{done} fails."""
        a, b, tunnel = yield self.tunnel()
        a.transport.write(b"x")
        yield wait_for(lambda: b.received)
        a.transport.abortConnection()
        yield b.lost
        self.assertTrue(b.reason.check(error.ConnectionLost, error.ConnectionDone))
        yield self.assertFailure(tunnel.done, error.ConnectionLost, error.ConnectionDone)

    @inlineCallbacks
    def test_writes_after_peer_gone(self):
        """
        Bytes for a side that closed completely make the relay abort both,
        instead of relaying into a dead socket.
        """
        a, b, tunnel = yield self.tunnel()
        a.close_on_eof = False
        b.transport.loseConnection()
        yield wait_for(lambda: a.eof, what="EOF passed on to A")
        for _ in range(20):
            if tunnel.done.called:
                break
            a.transport.write(b"z" * 65536)
            yield _sleep(0.05)
        yield self.assertFailure(tunnel.done, error.ConnectionLost)

    @inlineCallbacks
    def test_abort(self):
        """L{SpliceRelay.abort} resets both sides."""
        a, b, tunnel = yield self.tunnel()
        tunnel.abort()
        tunnel.abort()
        yield a.lost
        yield b.lost
        self.assertTrue(a.reason.check(error.ConnectionLost))
        yield self.assertFailure(tunnel.done, error.ConnectionAborted)

    @inlineCallbacks
    def test_close(self):
        """L{SpliceRelay.close} closes both sides with a FIN."""
        a, b, tunnel = yield self.tunnel()
        tunnel.close()
        yield tunnel.done
        yield a.lost
        yield b.lost
        self.assertTrue(a.reason.check(error.ConnectionDone))
        self.assertTrue(b.reason.check(error.ConnectionDone))

    @inlineCallbacks
    def test_reactor_reports_both_sockets_lost(self):
        """
        A reactor that shuts down reports every socket it watches as lost,
        both of a tunnel's among them: the first report ends the tunnel, and
        the second (or a late read or write event) is ignored instead of
        raising.
        """
        a, b, tunnel = yield self.tunnel()
        first, second = tunnel._a, tunnel._b
        lost = Failure(error.ConnectionLost())
        first.connectionLost(lost)
        second.connectionLost(lost)
        second.doRead()
        second.doWrite()
        yield self.assertFailure(tunnel.done, error.ConnectionLost)
        yield a.lost
        yield b.lost

    @inlineCallbacks
    def test_idle_timeout(self):
        """No byte either way for C{idle} seconds aborts both sides."""
        a, b, tunnel = yield self.tunnel(idle=0.3)
        yield _sleep(0.2)
        a.transport.write(b"keep")
        yield wait_for(lambda: b.received == b"keep")
        yield self.assertFailure(tunnel.done, error.TimeoutError)
        yield b.lost

    @inlineCallbacks
    def test_on_done_and_late_done(self):
        """
        C{on_done} is called with the relay and the reason when the tunnel
        ends, and C{done} read afterwards has the same outcome.
        """
        calls = []
        outer_a, inner_a = yield self.connection()
        outer_b, inner_b = yield self.connection()
        tunnel = splice.relay(
            inner_a.transport,
            inner_b.transport,
            reactor,
            on_done=lambda relay, reason: calls.append((relay, reason)),
        )
        tunnel.abort()
        self.assertEqual(len(calls), 1)
        self.assertIs(calls[0][0], tunnel)
        self.assertTrue(calls[0][1].check(error.ConnectionAborted))
        yield self.assertFailure(tunnel.done, error.ConnectionAborted)
        yield outer_a.lost
        yield outer_b.lost

    def test_can_splice(self):
        """Only connected plain TCP transports, and only when enabled."""
        self.assertFalse(splice.can_splice(StringTransport(), StringTransport()))
        self.patch(splice, "ENABLED", False)
        self.assertFalse(splice.can_splice(object(), object()))


def _sleep(seconds: float) -> Deferred:
    d = Deferred()
    reactor.callLater(seconds, d.callback, None)
    return d
