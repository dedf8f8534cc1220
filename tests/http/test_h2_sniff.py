# -*- test-case-name: tests.http.test_h2_sniff -*-
"""
Choosing HTTP/1.1 or HTTP/2 per connection (L{balance.http.sniff}): by
ALPN over TLS, by the connection preface otherwise, buffering until sure
whatever the segmentation.
"""

from __future__ import annotations

from types import SimpleNamespace

from twisted.trial.unittest import SynchronousTestCase

from balance.http.h1 import DownstreamConnection
from balance.http.h2 import H2DownstreamConnection
from balance.http.h2_guard import PREFACE
from balance.http.sniff import HTTPProtocols, ProtocolSniffer
from tests.http.test_h2 import OK, H2Client, h2_proxy

GET = b"GET / HTTP/1.1\r\nHost: a\r\n\r\n"


class SniffTests(SynchronousTestCase):
    def setUp(self):
        self.proxy = h2_proxy()

    def test_http11_byte_by_byte(self):
        """An HTTP/1.1 request, one byte per read, is served by HTTP/1.1."""
        client = self.proxy.client()
        self.assertIsInstance(client.protocol, ProtocolSniffer)
        client.send(GET, byte_by_byte=True)
        self.proxy.run()
        self.assertIsInstance(client.transport.protocol, DownstreamConnection)
        self.proxy.backend().connections[0].respond(OK)
        self.proxy.run()
        [response] = client.responses()
        self.assertEqual((response.status, response.body), (200, b"ok"))

    def test_decided_early(self):
        """
        HTTP/1.1 is chosen as soon as a byte differs from the preface: the
        first for GET, the second for POST, PUT and PATCH.
        """
        for request, needed in [(b"GET", 1), (b"POST", 2), (b"PUT", 2), (b"PATCH", 2)]:
            client = self.proxy.client()
            client.send(request[:needed])
            self.assertIsInstance(client.transport.protocol, DownstreamConnection, request)

    def test_almost_preface(self):
        """A request line that starts like the preface goes to HTTP/1.1 all the same."""
        client = self.proxy.client()
        client.send(b"PRI * HTTP/2.0\r\n\r\nXX", byte_by_byte=True)
        self.assertIsInstance(client.transport.protocol, DownstreamConnection)

    def test_preface_in_pieces(self):
        """The preface in any pieces makes an HTTP/2 connection."""
        for split in (1, 5, 23):
            client = self.proxy.client()
            client.send(PREFACE[:split])
            self.assertIsInstance(client.transport.protocol, ProtocolSniffer)
            client.send(PREFACE[split:])
            self.assertIsInstance(client.transport.protocol, H2DownstreamConnection)

    def test_counted_once(self):
        """The connection is counted once, whichever protocol it speaks."""
        H2Client(self.proxy)
        self.proxy.client().send(GET)
        metrics = self.proxy.context.listener_metrics
        self.assertEqual((metrics.connections_total, metrics.active), (2, 2))
        self.assertEqual(len(self.proxy.context.connections), 2)
        kinds = sorted(type(c).__name__ for c in self.proxy.context.connections)
        self.assertEqual(kinds, ["DownstreamConnection", "H2DownstreamConnection"])

    def test_silent_client(self):
        """A client that never sends a byte is closed after the handshake timeout."""
        client = self.proxy.client()
        self.proxy.run(11)
        self.assertTrue(client.closed)
        self.proxy.run()
        self.assertEqual(self.proxy.context.listener_metrics.active, 0)

    def test_partial_preface_times_out(self):
        client = self.proxy.client()
        client.send(PREFACE[:10])
        self.proxy.run(11)
        self.assertTrue(client.closed)

    def test_drain_undecided(self):
        """Draining closes a connection that has not said what it speaks."""
        client = self.proxy.client()
        client.send(PREFACE[:3])
        d = self.proxy.factory.drain()
        self.assertTrue(client.closed)
        self.proxy.run()
        self.successResultOf(d)

    def test_denied(self):
        """A client the listener's ACL denies gets 403 over HTTP/2 as well."""
        proxy = h2_proxy(
            """
            listeners:
              - {name: web, listen: "tcp:8080", cluster: app, deny: ["192.0.2.0/24"]}
            clusters:
              - {name: app, backends: ["10.0.0.1:80"]}
            """
        )
        response = H2Client(proxy).get(b"/")
        self.assertEqual(response.status, 403)


class ALPNTests(SynchronousTestCase):
    """Over TLS the negotiated protocol decides (the transport is faked here)."""

    def client(self, alpn):
        proxy = h2_proxy()
        client = proxy.client()
        client.transport.negotiatedProtocol = alpn
        return client

    def test_h2(self):
        client = self.client(b"h2")
        client.send(PREFACE[:1])
        self.assertIsInstance(client.transport.protocol, H2DownstreamConnection)

    def test_http11(self):
        """With ALPN http/1.1, even a preface goes to HTTP/1.1 (which refuses it)."""
        client = self.client(b"http/1.1")
        client.send(PREFACE)
        self.assertIsInstance(client.transport.protocol, DownstreamConnection)

    def test_wrapped_protocol(self):
        """A TLS layer calls its "wrappedProtocol": the chosen one takes its place."""
        proxy = h2_proxy()
        sniffer = proxy.factory.buildProtocol(None)
        transport = proxy.client().transport
        layer = SimpleNamespace(
            wrappedProtocol=sniffer,
            negotiatedProtocol=b"h2",
            getPeer=transport.getPeer,
            getHost=transport.getHost,
            registerProducer=transport.registerProducer,
            write=transport.write,
            loseConnection=transport.loseConnection,
        )
        sniffer.makeConnection(layer)
        sniffer.dataReceived(PREFACE)
        self.assertIsInstance(layer.wrappedProtocol, H2DownstreamConnection)


class ProtocolsTests(SynchronousTestCase):
    def context(self, tls):
        return SimpleNamespace(
            listener=SimpleNamespace(tls=tls), max_header_bytes=65536, max_body_bytes=1
        )

    def test_cleartext(self):
        """Cleartext listeners take h2c with prior knowledge."""
        protocols = HTTPProtocols(self.context(None))
        self.assertIsInstance(protocols.build(), ProtocolSniffer)

    def test_tls_with_h2(self):
        protocols = HTTPProtocols(self.context(SimpleNamespace(alpn=("h2", "http/1.1"))))
        self.assertIsInstance(protocols.build(), ProtocolSniffer)

    def test_tls_without_h2(self):
        """A TLS listener whose ALPN does not list h2 only speaks HTTP/1.1."""
        protocols = HTTPProtocols(self.context(SimpleNamespace(alpn=("http/1.1",))))
        self.assertIsInstance(protocols.build(), DownstreamConnection)
