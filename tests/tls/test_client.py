"""
TLS towards backends, against a real TLS server on loopback with its own CA:
the backend's certificate is verified (CA and name), SNI is sent, a client
certificate is presented when configured, and C{verify: false} is loud.
"""

from __future__ import annotations

from twisted.internet import reactor
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger, LogLevel, formatEvent
from twisted.trial.unittest import TestCase

from balance.cluster.cluster import Cluster
from balance.config import model
from balance.l4.relay import L4ProxyFactory
from balance.tls.client import ClientTLS
from balance.tls.server import ServerTLS, TLSError
from balance.tls.transport import peer_subject, wrap
from tests.helpers import CheckingClient, EchoFactory, backend_model, connect_client
from tests.tls.support import listener, write, write_ca


class _Backend(Protocol):
    """Answers "pong" and remembers the SNI and client certificate it saw."""

    def dataReceived(self, data):
        handle = self.transport.getHandle()
        self.factory.seen.append((handle.get_servername(), peer_subject(self.transport)))
        self.transport.write(b"pong")


class _BackendFactory(Factory):
    protocol = _Backend
    active = 0

    def __init__(self):
        self.seen = []


class _Client(Protocol):
    def __init__(self):
        self.data = b""
        self.done = Deferred()

    def connectionMade(self):
        self.transport.write(b"ping")

    def dataReceived(self, data):
        self.data += data
        self.transport.loseConnection()

    def connectionLost(self, reason):
        self.reason = reason
        self.done.callback(self)


class ClientTLSTests(TestCase):
    timeout = 20

    def setUp(self):
        self.dir = self.mktemp()
        self.events = []
        self.patch(ClientTLS, "log", Logger(observer=self.events.append))

    def backend(self, client_ca=None):
        """A TLS server on 127.0.0.1 with a certificate for localhost and 127.0.0.1."""
        tls = ServerTLS(
            listener(
                model.ListenerTLS(
                    certificates=[write(self.dir, "localhost")],
                    client_ca=client_ca,
                ),
                "tcp",
            ),
            reactor,
        )
        self.backend_factory = _BackendFactory()
        port = reactor.listenTCP(
            0, wrap(tls, self.backend_factory, reactor), interface="127.0.0.1"
        )
        self.addCleanup(port.stopListening)
        return port.getHost().port

    @inlineCallbacks
    def exchange(self, upstream: model.UpstreamTLS, host="localhost", client_ca=None):
        port = self.backend(client_ca)
        tls = ClientTLS(upstream, "api", reactor, alpn=[b"http/1.1"])
        endpoint = tls.wrap(TCP4ClientEndpoint(reactor, "127.0.0.1", port), host)
        client = yield connectProtocol(endpoint, _Client())
        yield client.done
        return client

    @inlineCallbacks
    def test_verified(self):
        """The backend's certificate chains to the configured CA and names the host."""
        client = yield self.exchange(model.UpstreamTLS(ca=write_ca(self.dir)))
        self.assertEqual(client.data, b"pong")
        self.assertEqual(self.backend_factory.seen, [(b"localhost", None)])

    @inlineCallbacks
    def test_wrong_name(self):
        """A certificate for another name is refused before any byte is exchanged."""
        client = yield self.exchange(model.UpstreamTLS(ca=write_ca(self.dir), sni="db.test"))
        self.assertEqual(client.data, b"")
        self.assertIn("db.test", str(client.reason.value))
        self.assertEqual(self.backend_factory.seen, [])

    @inlineCallbacks
    def test_unknown_ca(self):
        client = yield self.exchange(model.UpstreamTLS(ca=write_ca(self.dir, "other_ca")))
        self.assertEqual(client.data, b"")
        self.assertIn("certificate verify failed", str(client.reason.value))

    @inlineCallbacks
    def test_system_store(self):
        """Without ca, the system's trust store is used, which does not know the test CA."""
        client = yield self.exchange(model.UpstreamTLS())
        self.assertEqual(client.data, b"")
        self.assertIn("certificate verify failed", str(client.reason.value))

    @inlineCallbacks
    def test_ip_address(self):
        """An IP backend is verified against the certificate's IP names; no SNI is sent."""
        client = yield self.exchange(model.UpstreamTLS(ca=write_ca(self.dir)), host="127.0.0.1")
        self.assertEqual(client.data, b"pong")
        self.assertEqual(self.backend_factory.seen, [(None, None)])

    @inlineCallbacks
    def test_unverified(self):
        """verify: false accepts anything, still sends SNI, and says so at start."""
        client = yield self.exchange(
            model.UpstreamTLS(verify=False, ca=write_ca(self.dir, "other_ca"), sni="db.test")
        )
        self.assertEqual(client.data, b"pong")
        self.assertEqual(self.backend_factory.seen, [(b"db.test", None)])
        [warning] = [formatEvent(e) for e in self.events if e["log_level"] is LogLevel.warn]
        self.assertIn("cluster api: tls.verify is false", warning)

    @inlineCallbacks
    def test_client_certificate(self):
        """A backend that requires a client certificate gets the configured one."""
        alice = write(self.dir, "alice")
        client = yield self.exchange(
            model.UpstreamTLS(ca=write_ca(self.dir), client_cert=alice.cert, client_key=alice.key),
            client_ca=write_ca(self.dir, "client_ca"),
        )
        self.assertEqual(client.data, b"pong")
        self.assertEqual(self.backend_factory.seen, [(b"localhost", "CN=alice,O=Example\\, Inc.")])

    @inlineCallbacks
    def test_client_certificate_missing(self):
        client = yield self.exchange(
            model.UpstreamTLS(ca=write_ca(self.dir)), client_ca=write_ca(self.dir, "client_ca")
        )
        self.assertEqual(client.data, b"")

    def test_bad_files(self):
        """Unreadable files are refused at start, naming the cluster."""
        e = self.assertRaises(
            TLSError, ClientTLS, model.UpstreamTLS(ca=f"{self.dir}/none.pem"), "api", reactor
        )
        self.assertTrue(str(e).startswith("cluster api: cannot read"), str(e))

    def test_one_creator_per_host(self):
        tls = ClientTLS(model.UpstreamTLS(ca=write_ca(self.dir)), "api", reactor)
        self.assertIs(tls.creator("a.test"), tls.creator("a.test"))
        self.assertIsNot(tls.creator("a.test"), tls.creator("b.test"))


class RelayToTLSBackendTests(TestCase):
    """
    The wiring the cluster will use (each backend's endpoint wrapped by the
    cluster's L{ClientTLS}), under the L4 relay: bytes and EOFs cross it.
    """

    timeout = 20

    @inlineCallbacks
    def test_echo_through_tls(self):
        directory = self.mktemp()
        tls = ServerTLS(
            listener(model.ListenerTLS(certificates=[write(directory, "localhost")]), "tcp"),
            reactor,
        )
        echo = EchoFactory()
        port = reactor.listenTCP(0, wrap(tls, echo, reactor), interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        cluster = Cluster(
            model.Cluster(name="tls", backends=[backend_model("127.0.0.1", port.getHost().port)]),
            reactor,
        )
        client_tls = ClientTLS(model.UpstreamTLS(ca=write_ca(directory)), "tls", reactor)
        for backend in cluster.backends:
            backend.endpoint = client_tls.wrap(backend.endpoint, "localhost")
        relay = L4ProxyFactory(
            model.Listener(name="l4", listen="tcp:0", protocol="tcp", cluster="tls"),
            {"tls": cluster},
            reactor,
        )
        proxy = reactor.listenTCP(0, relay, interface="127.0.0.1")
        self.addCleanup(proxy.stopListening)
        payload = bytes(range(256)) * 4096
        client = CheckingClient(payload)
        yield connect_client(proxy.getHost().port, client)
        yield client.lost
        self.assertTrue(client.complete, (client.received, client.mismatch))
        self.assertEqual(tls.handshakes["success"], 1)
