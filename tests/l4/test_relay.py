"""
Unit tests for L{balance.l4.relay}, in memory: L{StringTransport}s for both
sides, a L{MemoryReactorClock} for connects and time.
"""

from __future__ import annotations

from twisted.internet import error
from twisted.internet.address import IPv4Address
from twisted.internet.defer import CancelledError
from twisted.internet.interfaces import IHalfCloseableProtocol, IProtocol
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.logger import Logger, LogLevel, formatEvent
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyObject

from balance.cluster.cluster import Cluster
from balance.config import model
from balance.interfaces import IDrainable
from balance.l4.relay import L4ProxyFactory
from tests.helpers import backend_model

DONE = Failure(error.ConnectionDone())


class HalfCloseTransport(StringTransport):
    """A StringTransport that also records loseWriteConnection()."""

    write_closed = False

    def loseWriteConnection(self):
        self.write_closed = True


def listener_model(idle=60.0):
    return model.Listener(
        name="edge",
        listen="tcp:0",
        protocol="tcp",
        cluster="api",
        timeouts=model.Timeouts(idle=idle),
    )


class RelayTestCase(SynchronousTestCase):
    """Builds a proxy factory over a two-backend cluster on a fake reactor."""

    idle = 60.0

    def setUp(self):
        self.reactor = MemoryReactorClock()
        cluster = model.Cluster(
            name="api",
            backends=[backend_model("10.0.0.1", 8001), backend_model("10.0.0.2", 8002)],
        )
        self.cluster = Cluster(cluster, self.reactor)
        self.events = []
        self.cluster.log = Logger(observer=self.events.append, namespace="test")
        self.factory = L4ProxyFactory(listener_model(self.idle), {"api": self.cluster}, self.reactor)
        self.factory.log = Logger(observer=self.events.append, namespace="test")

    def accept(self):
        """A client connects: return its protocol and transport."""
        peer = IPv4Address("TCP", "192.0.2.7", 40000)
        proto = self.factory.buildProtocol(peer)
        down = HalfCloseTransport(peerAddress=peer)
        proto.makeConnection(down)
        return proto, down

    def connect_upstream(self):
        """The last connect attempt succeeds: return the wrapping protocol and transport."""
        _, _, factory, _, _ = self.reactor.tcpClients[-1]
        wrapper = factory.buildProtocol(None)
        up = HalfCloseTransport()
        wrapper.makeConnection(up)
        return wrapper, up

    def refuse_upstream(self):
        """The last connect attempt is refused."""
        _, _, factory, _, _ = self.reactor.tcpClients[-1]
        factory.clientConnectionFailed(
            self.reactor.connectors[-1], Failure(error.ConnectionRefusedError())
        )

    def open(self):
        proto, down = self.accept()
        wrapper, up = self.connect_upstream()
        return proto, down, wrapper, up

    def warnings(self):
        return [formatEvent(e) for e in self.events if e["log_level"] is LogLevel.warn]


class ConnectTests(RelayTestCase):
    """Accepting a client and connecting it to a backend."""

    def test_interfaces(self):
        """The protocols are slotted IProtocol/IHalfCloseableProtocol providers."""
        proto, _, wrapper, _ = self.open()
        for p in (proto, wrapper._wrappedProtocol):
            verifyObject(IProtocol, p)
            verifyObject(IHalfCloseableProtocol, p)
            self.assertFalse(hasattr(p, "__dict__"))
        self.assertTrue(IHalfCloseableProtocol.providedBy(wrapper))
        verifyObject(IDrainable, self.factory)

    def test_pauses_client_until_connected(self):
        """The client is not read from until the backend is connected."""
        _, down = self.accept()
        self.assertEqual(down.producerState, "paused")
        self.assertEqual(self.reactor.tcpClients[0][:2], ("10.0.0.1", 8001))
        self.connect_upstream()
        self.assertEqual(down.producerState, "producing")

    def test_flow_control_wired(self):
        """Each transport is the streaming producer of the other."""
        _, down, _, up = self.open()
        self.assertIs(down.producer, up)
        self.assertTrue(down.streaming)
        self.assertIs(up.producer, down)
        self.assertTrue(up.streaming)

    def test_counts(self):
        """The factory counts the connection, the backend counts it as active."""
        self.open()
        self.assertEqual(self.factory.active, 1)
        self.assertEqual(self.cluster.backends[0].active, 1)

    def test_relays_both_ways(self):
        """Bytes go from client to backend and back unchanged."""
        proto, down, wrapper, up = self.open()
        proto.dataReceived(b"hello ")
        proto.dataReceived(b"backend")
        wrapper.dataReceived(b"hello client")
        self.assertEqual(up.value(), b"hello backend")
        self.assertEqual(down.value(), b"hello client")

    def test_failover(self):
        """A refused backend is skipped; the next one gets the connection."""
        _, down = self.accept()
        self.refuse_upstream()
        self.assertEqual(self.reactor.tcpClients[-1][:2], ("10.0.0.2", 8002))
        self.assertEqual(down.producerState, "paused")
        self.connect_upstream()
        self.assertEqual(down.producerState, "producing")
        self.assertEqual([b.active for b in self.cluster.backends], [0, 1])
        self.assertEqual(len(self.warnings()), 1)

    def test_all_backends_down(self):
        """
        When no backend accepts, the client is closed (after nothing was
        read from it) and one line says why.
        """
        proto, down = self.accept()
        self.refuse_upstream()
        self.refuse_upstream()
        self.assertTrue(down.disconnecting)
        self.assertEqual(down.value(), b"")
        self.assertEqual(
            self.warnings()[-1],
            "closing connection from 192.0.2.7:40000 on listener edge: no backend of "
            "cluster api accepted the connection (tried 10.0.0.1:8001, 10.0.0.2:8002; "
            "last: connection refused)",
        )
        d = self.factory.drain()
        self.assertNoResult(d)
        proto.connectionLost(DONE)
        self.successResultOf(d)
        self.assertEqual(self.factory.active, 0)

    def test_no_eligible_backend(self):
        """With every backend drained the client is closed at once."""
        for backend in self.cluster.backends:
            backend.drained = True
        proto, down = self.accept()
        self.assertTrue(down.disconnecting)
        self.assertEqual(self.reactor.tcpClients, [])
        self.assertIn("cluster api has no eligible backend", self.warnings()[-1])

    def test_client_gone_while_connecting(self):
        """A client that leaves while the backend connects cancels the attempt."""
        proto, _ = self.accept()
        proto.connectionLost(Failure(error.ConnectionLost()))
        self.assertTrue(self.reactor.connectors[0].stoppedConnecting)
        self.assertEqual(self.cluster.backends[0].active, 0)
        self.assertEqual(self.factory.active, 0)
        self.assertEqual(len(self.reactor.tcpClients), 1)
        self.assertEqual(self.events, [])


class HalfCloseTests(RelayTestCase):
    """Half-closes are passed on; both sides close once both are done."""

    def test_client_eof(self):
        """
        The client's EOF shuts the backend's write half, stops treating the
        client as a producer, and the answer still flows back.
        """
        proto, down, wrapper, up = self.open()
        proto.dataReceived(b"request")
        proto.readConnectionLost()
        self.assertTrue(up.write_closed)
        self.assertIsNone(up.producer)
        self.assertFalse(up.disconnecting)
        wrapper.dataReceived(b"answer")
        self.assertEqual(down.value(), b"answer")
        self.assertFalse(down.disconnecting)
        # Then the backend finishes too: both are closed, after flushing.
        wrapper.readConnectionLost()
        self.assertTrue(down.disconnecting)
        self.assertTrue(up.disconnecting)
        self.assertIsNone(down.producer)

    def test_backend_eof(self):
        """The backend's EOF shuts the client's write half; the client may still send."""
        proto, down, wrapper, up = self.open()
        wrapper.dataReceived(b"greeting")
        wrapper.readConnectionLost()
        self.assertTrue(down.write_closed)
        self.assertIsNone(down.producer)
        proto.dataReceived(b"more")
        self.assertEqual(up.value(), b"more")
        self.assertFalse(up.disconnecting)
        proto.readConnectionLost()
        self.assertTrue(down.disconnecting)
        self.assertTrue(up.disconnecting)
        self.assertIsNone(up.producer)

    def test_all_accounted(self):
        """After both sides are lost, the connection and the backend are released."""
        proto, _, wrapper, _ = self.open()
        d = self.factory.drain()
        proto.readConnectionLost()
        wrapper.readConnectionLost()
        proto.connectionLost(DONE)
        self.assertNoResult(d)
        self.assertEqual(self.factory.active, 1)
        wrapper.connectionLost(DONE)
        self.successResultOf(d)
        self.assertEqual(self.factory.active, 0)
        self.assertEqual(self.cluster.backends[0].active, 0)


class CloseTests(RelayTestCase):
    """One side going away closes the other, after what is buffered."""

    def test_client_lost(self):
        """The client's connectionLost closes the backend gracefully."""
        proto, down, wrapper, up = self.open()
        proto.connectionLost(Failure(error.ConnectionLost()))
        self.assertTrue(up.disconnecting)
        self.assertFalse(up.disconnected)
        self.assertIsNone(up.producer)
        self.assertEqual(self.factory.active, 1)
        wrapper.connectionLost(DONE)
        self.assertEqual(self.factory.active, 0)
        self.assertEqual(self.cluster.backends[0].active, 0)

    def test_backend_lost(self):
        """The backend's connectionLost closes the client gracefully."""
        proto, down, wrapper, up = self.open()
        wrapper.connectionLost(Failure(error.ConnectionLost()))
        self.assertTrue(down.disconnecting)
        self.assertFalse(down.disconnected)
        self.assertIsNone(down.producer)
        self.assertEqual(self.cluster.backends[0].active, 0)
        self.assertEqual(self.factory.active, 1)
        proto.connectionLost(DONE)
        self.assertEqual(self.factory.active, 0)

    def test_abort_all(self):
        """C{abort_all} aborts both sides of every connection."""
        proto1, down1, _, up1 = self.open()
        proto2, down2 = self.accept()
        self.factory.abort_all()
        self.assertTrue(down1.disconnected)
        self.assertTrue(up1.disconnected)
        self.assertTrue(down2.disconnected)
        self.assertTrue(self.reactor.connectors[-1].stoppedConnecting)

    def test_drain_when_idle(self):
        """Draining a factory with no connection fires at once."""
        self.successResultOf(self.factory.drain())

    def test_drain_cancel(self):
        """Cancelling a drain only stops waiting for it."""
        proto, _, wrapper, _ = self.open()
        d = self.factory.drain()
        d.cancel()
        self.failureResultOf(d, CancelledError)
        self.assertEqual(self.factory._drain_waiters, [])
        proto.connectionLost(DONE)
        wrapper.connectionLost(DONE)
        self.assertEqual(self.factory.active, 0)


class IdleTests(RelayTestCase):
    """No bytes either way for the idle timeout closes both sides."""

    idle = 10.0

    def test_idle_closes_both(self):
        """After C{idle} seconds without bytes both sides are aborted."""
        proto, down, wrapper, up = self.open()
        self.reactor.advance(9.9)
        self.assertFalse(down.disconnected)
        self.reactor.advance(0.1)
        self.assertTrue(down.disconnected)
        self.assertTrue(up.disconnected)

    def test_activity_defers_timeout(self):
        """
        Bytes in either direction push the deadline back; it is checked
        lazily, in buckets of 1/16 of the timeout: never early, at most
        that late.
        """
        proto, down, wrapper, up = self.open()
        self.reactor.advance(6)
        proto.dataReceived(b"x")
        self.reactor.advance(6)
        wrapper.dataReceived(b"y")
        self.reactor.advance(9.99)
        self.assertFalse(down.disconnected)
        self.reactor.advance(0.01 + self.idle / 16)
        self.assertTrue(down.disconnected)
        self.assertTrue(up.disconnected)

    def test_timer_not_rescheduled_per_chunk(self):
        """
        Traffic does not touch the timer: there is one delayed call, and it
        is only re-armed when it fires.
        """
        proto, down, wrapper, up = self.open()
        (call,) = self.reactor.getDelayedCalls()
        for _ in range(100):
            proto.dataReceived(b"x")
            wrapper.dataReceived(b"y")
        self.assertEqual(self.reactor.getDelayedCalls(), [call])
        self.assertEqual(call.getTime(), 10.0)

    def test_idle_while_connecting(self):
        """A backend that takes longer than the idle timeout to connect is given up."""
        proto, down = self.accept()
        self.reactor.advance(10)
        self.assertTrue(down.disconnected)
        self.assertTrue(self.reactor.connectors[0].stoppedConnecting)
        self.assertEqual(self.cluster.backends[0].active, 0)

    def test_idle_aborts_lingering_close(self):
        """
        A graceful close that cannot finish (the peer never reads) is
        aborted by the idle timeout.
        """
        proto, down, wrapper, up = self.open()
        proto.connectionLost(Failure(error.ConnectionLost()))
        self.assertTrue(up.disconnecting)
        self.reactor.advance(10)
        self.assertTrue(up.disconnected)

    def test_timer_cancelled_when_closed(self):
        """Once both sides are gone no timer is left behind."""
        proto, down, wrapper, up = self.open()
        proto.connectionLost(DONE)
        wrapper.connectionLost(DONE)
        self.assertEqual(self.reactor.getDelayedCalls(), [])


class NoIdleTests(RelayTestCase):
    """An idle timeout of 0 disables it."""

    idle = 0

    def test_no_timer(self):
        self.open()
        self.assertEqual(self.reactor.getDelayedCalls(), [])


class _LogRecorder:
    """An access log that keeps the connection lines' arguments."""

    def __init__(self):
        self.lines = []

    def write_connection(self, *args):
        self.lines.append(args)


class ObservabilityTests(RelayTestCase):
    """What a tcp listener counts and logs per connection."""

    def test_metrics(self):
        """Connections (total and open) and bytes both ways are counted."""
        proto, down, wrapper, up = self.open()
        m = self.factory.metrics
        self.assertEqual((m.connections_total, m.active), (1, 1))
        proto.dataReceived(b"hello")
        wrapper.dataReceived(b"world!")
        self.assertEqual((m.bytes_in, m.bytes_out), (5, 6))
        proto.connectionLost(DONE)
        wrapper.connectionLost(DONE)
        self.assertEqual((m.connections_total, m.active), (1, 0))

    def test_access_log(self):
        """A closed connection leaves one line: client, backend, bytes, duration."""
        log = self.factory.access_log = _LogRecorder()
        proto, down, wrapper, up = self.open()
        proto.dataReceived(b"hello")
        wrapper.dataReceived(b"world!")
        self.reactor.advance(2.5)
        proto.connectionLost(DONE)
        wrapper.connectionLost(DONE)
        [line] = log.lines
        self.assertEqual(line, ("edge", "192.0.2.7", "10.0.0.1:8001", 5, 6, 2.5, "", None))

    def test_access_log_reason(self):
        """A connection no backend took is logged with the reason."""
        log = self.factory.access_log = _LogRecorder()
        proto, down = self.accept()
        self.refuse_upstream()
        self.refuse_upstream()
        proto.connectionLost(DONE)
        [line] = log.lines
        self.assertIsNone(line[2])
        self.assertIn("10.0.0.2:8002", line[6])

    def test_idle_reason(self):
        """An idle timeout is the reason of its connection's line."""
        log = self.factory.access_log = _LogRecorder()
        proto, down, wrapper, up = self.open()
        self.reactor.advance(61)
        proto.connectionLost(DONE)
        wrapper.connectionLost(DONE)
        self.assertEqual(log.lines[0][6], "idle timeout")

    def test_max_connections_per_ip(self):
        """Beyond max_connections_per_ip, a client's new connections are refused at accept."""
        self.factory.max_per_ip = 2
        first, _ = self.accept()
        self.accept()
        peer = IPv4Address("TCP", "192.0.2.7", 40001)
        self.assertIsNone(self.factory.buildProtocol(peer))
        self.assertIsNotNone(self.factory.buildProtocol(IPv4Address("TCP", "192.0.2.8", 1)))
        self.assertEqual(self.factory.metrics.refused, {"max_connections_per_ip": 1})
        first.connectionLost(DONE)
        self.assertIsNotNone(self.factory.buildProtocol(peer))
