"""
SNI passthrough on a tcp listener, in memory: the relay reads the ClientHello
(byte by byte if that is how it comes), picks the cluster of the first route
matching its server name, connects, and sends the bytes it read first.
"""

from __future__ import annotations

from twisted.internet.address import IPv4Address
from twisted.internet.testing import MemoryReactorClock
from twisted.logger import Logger, LogLevel, formatEvent
from twisted.trial.unittest import SynchronousTestCase

from balance.cluster.cluster import Cluster
from balance.config import model
from balance.l4.relay import L4ProxyFactory
from tests.helpers import backend_model
from tests.l4.test_relay import HalfCloseTransport
from tests.l4.test_sni import client_hello


def listener_model(default="web", handshake=10.0):
    return model.Listener(
        name="edge",
        listen="tcp:0",
        protocol="tcp",
        cluster=default,
        routes=(
            model.Route(match=model.Match(sni="db.example.com"), cluster="db"),
            model.Route(match=model.Match(sni="*.api.test"), cluster="api"),
        ),
        timeouts=model.Timeouts(handshake=handshake, idle=60.0),
    )


class SNIRoutingTests(SynchronousTestCase):
    def setUp(self):
        self.reactor = MemoryReactorClock()
        self.clusters = {
            name: Cluster(
                model.Cluster(name=name, backends=[backend_model(f"10.0.0.{i}", 443)]),
                self.reactor,
            )
            for i, name in enumerate(("web", "db", "api"), start=1)
        }
        self.events = []
        self.build()

    def build(self, **kwargs):
        self.factory = L4ProxyFactory(listener_model(**kwargs), self.clusters, self.reactor)
        self.factory.log = Logger(observer=self.events.append)

    def accept(self):
        peer = IPv4Address("TCP", "192.0.2.7", 40000)
        proto = self.factory.buildProtocol(peer)
        down = HalfCloseTransport(peerAddress=peer)
        proto.makeConnection(down)
        return proto, down

    def connected_to(self):
        """The host of the last connect attempt."""
        return self.reactor.tcpClients[-1][0]

    def connect_upstream(self):
        _, _, factory, _, _ = self.reactor.tcpClients[-1]
        wrapper = factory.buildProtocol(None)
        up = HalfCloseTransport()
        wrapper.makeConnection(up)
        return wrapper, up

    def test_routes_by_sni_fed_bytewise(self):
        """Nothing is connected until the ClientHello is whole; then its bytes go first."""
        proto, down = self.accept()
        self.assertEqual(down.producerState, "producing")
        hello = client_hello(b"db.example.com")
        for i in range(len(hello)):
            self.assertEqual(self.reactor.tcpClients, [])
            proto.dataReceived(hello[i : i + 1])
        self.assertEqual(self.connected_to(), "10.0.0.2")
        self.assertEqual(down.producerState, "paused")
        _, up = self.connect_upstream()
        self.assertEqual(up.value(), hello)
        self.assertEqual(down.producerState, "producing")
        proto.dataReceived(b"more")
        self.assertEqual(up.value(), hello + b"more")

    def test_wildcard_and_default(self):
        proto, _ = self.accept()
        proto.dataReceived(client_hello(b"v1.api.test"))
        self.assertEqual(self.connected_to(), "10.0.0.3")
        proto, _ = self.accept()
        proto.dataReceived(client_hello(b"other.test"))
        self.assertEqual(self.connected_to(), "10.0.0.1")
        proto, _ = self.accept()
        proto.dataReceived(client_hello(None))
        self.assertEqual(self.connected_to(), "10.0.0.1")

    def test_not_tls_goes_to_default(self):
        """Plain bytes are decided on the first one, and relayed unchanged."""
        proto, _ = self.accept()
        proto.dataReceived(b"G")
        self.assertEqual(self.connected_to(), "10.0.0.1")
        proto.dataReceived(b"ET /")
        _, up = self.connect_upstream()
        self.assertEqual(up.value(), b"GET /")

    def test_no_route_no_default(self):
        """No match and no default cluster: the client is closed, with a warning."""
        self.build(default=None)
        proto, down = self.accept()
        proto.dataReceived(client_hello(b"other.test"))
        self.assertEqual(self.reactor.tcpClients, [])
        self.assertTrue(down.disconnecting)
        proto.connectionLost(None)
        self.assertEqual(self.factory.active, 0)
        [warning] = [formatEvent(e) for e in self.events if e["log_level"] is LogLevel.warn]
        self.assertIn("no route for server name other.test and no default cluster", warning)

    def test_silent_client_times_out_to_default(self):
        """A client that sends nothing (a server-speaks-first protocol) goes to the default."""
        proto, _ = self.accept()
        self.reactor.advance(9.9)
        self.assertEqual(self.reactor.tcpClients, [])
        self.reactor.advance(0.1)
        self.assertEqual(self.connected_to(), "10.0.0.1")
        _, up = self.connect_upstream()
        self.assertEqual(up.value(), b"")

    def test_eof_while_sniffing(self):
        """A client that sends a partial hello and shuts down: relayed, EOF passed on."""
        proto, down = self.accept()
        proto.dataReceived(b"\x16\x03")
        proto.readConnectionLost()
        self.assertEqual(self.connected_to(), "10.0.0.1")
        _, up = self.connect_upstream()
        self.assertEqual(up.value(), b"\x16\x03")
        self.assertTrue(up.write_closed)
        # Not resumed: a transport at EOF would report it again.
        self.assertEqual(down.producerState, "paused")

    def test_client_gone_while_sniffing(self):
        proto, down = self.accept()
        proto.dataReceived(b"\x16")
        proto.connectionLost(None)
        self.assertEqual(self.factory.active, 0)
        self.assertEqual(self.reactor.getDelayedCalls(), [])
        self.assertEqual(self.reactor.tcpClients, [])

    def test_backend_released_to_its_cluster(self):
        proto, _ = self.accept()
        proto.dataReceived(client_hello(b"db.example.com"))
        wrapper, _ = self.connect_upstream()
        db = self.clusters["db"].backends[0]
        self.assertEqual(db.active, 1)
        wrapper.connectionLost(None)
        self.assertEqual(db.active, 0)

    def test_no_routes_connects_at_once(self):
        """Without routes nothing is sniffed: the connect starts on accept."""
        self.factory = L4ProxyFactory(
            model.Listener(name="plain", listen="tcp:0", protocol="tcp", cluster="web"),
            self.clusters,
            self.reactor,
        )
        self.accept()
        self.assertEqual(self.connected_to(), "10.0.0.1")
