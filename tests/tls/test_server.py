"""
TLS termination on a listener, in memory: a real OpenSSL client handshakes
with the listener's TLS factory through memory buffers, and the tests look
at what a client would see.
"""

from __future__ import annotations

import os

from OpenSSL import SSL
from OpenSSL._util import lib
from twisted.internet.task import Clock
from twisted.logger import Logger, LogLevel, formatEvent
from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyObject

from balance.config import model
from balance.interfaces import IDrainable
from balance.tls.server import ServerTLS, TLSError, offered_alpn
from balance.tls.transport import LINGER_TIMEOUT, is_tls, peer_subject, wrap
from tests.tls.support import (
    Handshake,
    RecordingFactory,
    client_context,
    listener,
    pki,
    write,
    write_ca,
)

# pyOpenSSL has no public "was this session resumed?".
SSL_session_reused = lib.SSL_session_reused


class ServerTestCase(SynchronousTestCase):
    """Builds a listener's TLS from certificates written to a temp dir."""

    def setUp(self):
        self.dir = self.mktemp()
        self.clock = Clock()
        self.events = []
        self.patch(ServerTLS, "log", Logger(observer=self.events.append))
        self.ca = write_ca(self.dir)

    def serve(self, names=("site_ec",), protocol="http", **tls_options):
        certificates = [write(self.dir, n) for n in names]
        tls_model = model.ListenerTLS(certificates=certificates, **tls_options)
        self.tls = ServerTLS(listener(tls_model, protocol), self.clock)
        self.factory = RecordingFactory()
        self.tls_factory = wrap(self.tls, self.factory, self.clock)
        return self.tls

    def connect(self, server_name=None, context=None, **client):
        ca = client.pop("ca", self.ca)
        kwargs = {k: client.pop(k) for k in ("session", "ocsp", "chunk") if k in client}
        if context is None:
            context = client_context(ca=ca, **client)
        return Handshake(self.tls_factory, context, server_name, **kwargs)

    def warnings(self):
        return [formatEvent(e) for e in self.events if e["log_level"] >= LogLevel.warn]


class CertificateSelectionTests(ServerTestCase):
    """The certificate a client gets depends on the name it asks for."""

    def test_sni_picks_certificate(self):
        self.serve(["site_ec", "api"])
        hs = self.connect("api.test")
        self.assertTrue(hs.done, hs.error)
        self.assertEqual(hs.certificate, pki()["api"].cert)

    def test_wildcard(self):
        self.serve(["api", "site_ec"])
        self.assertEqual(self.connect("shop.example.com").certificate, pki()["site_ec"].cert)

    def test_default_without_sni(self):
        """No SNI, or an unknown name: the first certificate, or default_certificate."""
        self.serve(["api", "site_ec"])
        self.assertEqual(self.connect(None).certificate, pki()["api"].cert)
        self.assertEqual(self.connect("nope.test").certificate, pki()["api"].cert)
        site = write(self.dir, "site_ec").cert
        self.serve(["api", "site_ec"], default_certificate=site)
        self.assertEqual(self.connect(None).certificate, pki()["site_ec"].cert)

    def test_full_chain_served(self):
        """The intermediates in the certificate file go to the client, which verifies."""
        self.serve(["site_ec"])
        hs = self.connect("example.com")
        self.assertIsNone(hs.error)
        self.assertEqual(hs.chain[1], pki()["ca"].signer.cert)

    def test_rsa_for_rsa_only_clients(self):
        """With an ECDSA and an RSA certificate, each client gets what it supports."""
        self.serve(["site_ec", "site_rsa"])
        rsa_only = self.connect(
            "example.com", max_version=SSL.TLS1_2_VERSION, ciphers=b"ECDHE-RSA-AES128-GCM-SHA256"
        )
        self.assertIsNone(rsa_only.error)
        self.assertEqual(rsa_only.certificate, pki()["site_rsa"].cert)
        self.assertEqual(self.connect("example.com").certificate, pki()["site_ec"].cert)
        # Also when the names only match through SNI on a non-default group.
        self.serve(["api", "site_ec", "site_rsa"])
        hs = self.connect("x.example.com", max_version=SSL.TLS1_2_VERSION,
                          ciphers=b"ECDHE-RSA-AES256-GCM-SHA384")
        self.assertEqual(hs.certificate, pki()["site_rsa"].cert)

    def test_chains_per_key_type(self):
        """ECDSA and RSA certificates from different intermediates each get their own chain."""
        self.serve(["site_ec", "site_rsa_own_chain"])
        rsa = self.connect(
            "example.com", ca=None, max_version=SSL.TLS1_2_VERSION,
            ciphers=b"ECDHE-RSA-AES128-GCM-SHA256",
        )
        self.assertEqual(rsa.chain[1], pki()["rsa_ca"].signer.cert)
        ecdsa = self.connect("example.com")
        self.assertIsNone(ecdsa.error)
        self.assertEqual(ecdsa.chain[1], pki()["ca"].signer.cert)

    def test_counts_handshakes(self):
        self.serve(["site_ec"])
        self.connect("example.com")
        self.connect("example.com", min_version=SSL.TLS1_3_VERSION, ciphers=None)
        failed = self.connect("example.com", ca=write_ca(self.dir, "other_ca"))
        self.assertIsNotNone(failed.error)
        failed.protocol.connectionLost(None)
        self.assertEqual(self.tls.handshakes, {"success": 2, "failure": 1})


class ProtocolTests(ServerTestCase):
    """Versions, ciphers, ALPN."""

    def test_old_versions_refused(self):
        """TLS 1.1 and older are refused."""
        self.serve()
        hs = self.connect(
            "example.com", max_version=SSL.TLS1_1_VERSION, ciphers=b"DEFAULT:@SECLEVEL=0"
        )
        self.assertIsNotNone(hs.error)
        self.assertFalse(hs.inner.data)

    def test_tls12_and_13(self):
        self.serve()
        hs = self.connect("example.com", max_version=SSL.TLS1_2_VERSION)
        self.assertEqual(hs.client.get_protocol_version_name(), "TLSv1.2")
        self.assertEqual(self.connect("example.com").client.get_protocol_version_name(), "TLSv1.3")

    def test_min_version_13(self):
        self.serve(min_version="1.3")
        self.assertIsNotNone(self.connect("example.com", max_version=SSL.TLS1_2_VERSION).error)
        self.assertIsNone(self.connect("example.com").error)

    def test_no_cbc_or_static_rsa(self):
        """TLS 1.2 ciphers are AEAD with forward secrecy: CBC and RSA key exchange fail."""
        self.serve(["site_ec", "site_rsa"])
        for cipher in (b"ECDHE-ECDSA-AES128-SHA", b"AES128-GCM-SHA256", b"ECDHE-RSA-AES128-SHA256"):
            hs = self.connect("example.com", max_version=SSL.TLS1_2_VERSION, ciphers=cipher)
            self.assertIsNotNone(hs.error, cipher)

    def test_server_cipher_order(self):
        """The server's order wins: AES-128-GCM before ChaCha20 even if the client prefers it."""
        self.serve()
        hs = self.connect(
            "example.com",
            max_version=SSL.TLS1_2_VERSION,
            ciphers=b"ECDHE-ECDSA-CHACHA20-POLY1305:ECDHE-ECDSA-AES128-GCM-SHA256",
        )
        self.assertEqual(hs.client.get_cipher_name(), "ECDHE-ECDSA-AES128-GCM-SHA256")

    def test_no_renegotiation(self):
        """A client asking to renegotiate is refused and the connection closed."""
        self.serve()
        hs = self.connect("example.com", max_version=SSL.TLS1_2_VERSION)
        self.assertTrue(hs.client.renegotiate())
        hs.done = False
        hs.pump()
        self.assertIn("no renegotiation", str(hs.error))
        self.assertTrue(hs.transport.disconnecting)

    def test_alpn(self):
        """HTTP listeners negotiate http/1.1, never h2 (not served yet; warned about)."""
        self.serve(alpn=("h2", "http/1.1"))
        hs = self.connect("example.com", alpn=[b"h2", b"http/1.1"])
        self.assertEqual(hs.client.get_alpn_proto_negotiated(), b"http/1.1")
        self.assertEqual(hs.protocol.negotiatedProtocol, b"http/1.1")
        self.assertIn("alpn lists h2", self.warnings()[0])

    def test_alpn_h2_when_served(self):
        """Once the listener serves HTTP/2, h2 is offered as configured."""
        http = listener(model.ListenerTLS(certificates=(), alpn=("h2", "http/1.1")))
        self.assertEqual(offered_alpn(http, http2=True), (b"h2", b"http/1.1"))
        self.assertEqual(offered_alpn(http), (b"http/1.1",))

    def test_alpn_no_overlap(self):
        """A client offering only other protocols still connects, without ALPN."""
        self.serve()
        hs = self.connect("example.com", alpn=[b"imap"])
        self.assertIsNone(hs.error)
        self.assertEqual(hs.client.get_alpn_proto_negotiated(), b"")

    def test_alpn_tcp(self):
        """tcp listeners offer the list as configured, h2 included."""
        tcp = listener(model.ListenerTLS(certificates=(), alpn=("h2", "http/1.1")), "tcp")
        self.assertEqual(offered_alpn(tcp), (b"h2", b"http/1.1"))
        self.serve(protocol="tcp", alpn=("h2", "http/1.1"))
        hs = self.connect("example.com", alpn=[b"http/1.1", b"h2"])
        self.assertEqual(hs.client.get_alpn_proto_negotiated(), b"h2")


class SessionTests(ServerTestCase):
    """Resumption with tickets and session IDs, and key rotation."""

    def resumed(self, **client):
        context = client_context(ca=self.ca, **client)
        first = self.connect("example.com", context)
        first.send(b"GET / HTTP/1.1\r\n\r\n")  # TLS 1.3 tickets come after the handshake
        session = first.client.get_session()
        second = self.connect("example.com", context, session=session)
        self.assertIsNone(second.error)
        return bool(SSL_session_reused(second.client._ssl))

    def test_tls13_ticket(self):
        self.serve(["site_ec", "api"])
        self.assertTrue(self.resumed())

    def test_tls12_session(self):
        self.serve()
        self.assertTrue(self.resumed(max_version=SSL.TLS1_2_VERSION))

    def test_resumes_across_names(self):
        """Sessions live on the session context, whatever certificate SNI chose."""
        self.serve(["api", "site_ec"])
        self.assertTrue(self.resumed())

    def session_after(self, rotations: int, reload: bool = False, **client):
        """
        Whether a ticket issued before C{rotations} key rotations (and a
        reload of the certificates, if C{reload}) resumes.
        """
        tls = self.serve()
        tls.startService()
        self.addCleanup(tls.stopService)
        context = client_context(ca=self.ca, **client)
        first = self.connect("example.com", context)
        first.send(b"x")
        session = first.client.get_session()
        for _ in range(rotations):
            self.clock.advance(3600)
        if reload:
            tls.reload()
        second = self.connect("example.com", context, session=session)
        self.assertIsNone(second.error)
        # Whatever happened, new sessions resume.
        self.assertTrue(self.resumed(**client))
        return bool(SSL_session_reused(second.client._ssl))

    def test_rotation_keeps_previous_key(self):
        """A ticket issued just before a key rotation still resumes after it."""
        self.assertTrue(self.session_after(1))

    def test_rotation_keeps_previous_key_tls12(self):
        self.assertTrue(self.session_after(1, max_version=SSL.TLS1_2_VERSION))

    def test_second_rotation_retires_key(self):
        """Two rotations later, the ticket is refused: a full handshake."""
        self.assertFalse(self.session_after(2))

    def test_reload_retires_keys(self):
        """After a reload of the certificates, earlier tickets do not resume."""
        self.assertFalse(self.session_after(1, reload=True))

    def test_previous_key_when_hello_is_split(self):
        """The ClientHello may come in pieces: it is held until its first record is whole."""
        tls = self.serve()
        context = client_context(ca=self.ca)
        first = self.connect("example.com", context)
        first.send(b"x")
        session = first.client.get_session()
        tls.rotate_session_keys()
        self.assertIsNotNone(tls.previous_ticket_key)
        second = self.connect("example.com", context, session=session, chunk=7)
        self.assertIsNone(second.error)
        self.assertTrue(SSL_session_reused(second.client._ssl))

    def test_rotation_timer(self):
        """The keys rotate every session_rotation seconds while the service runs."""
        tls = self.serve()
        tls.startService()
        self.assertIsNone(tls.previous_ticket_key)
        self.clock.advance(3600)
        key = tls.previous_ticket_key
        self.assertEqual(len(key), 16)
        self.clock.advance(3600)
        self.assertNotIn(tls.previous_ticket_key, (None, key))
        tls.stopService()
        self.assertFalse(self.clock.getDelayedCalls())


class ClientCertificateTests(ServerTestCase):
    """mTLS: client_ca requires a verified client certificate."""

    def setUp(self):
        super().setUp()
        self.serve(client_ca=write_ca(self.dir, "client_ca"))

    def test_required(self):
        hs = self.connect("example.com")
        self.assertIsNotNone(hs.error)
        self.assertEqual(self.tls.handshakes["success"], 0)

    def test_wrong_ca(self):
        self.assertIsNotNone(self.connect("example.com", cert=pki()["mallory"]).error)

    def test_subject(self):
        hs = self.connect("example.com", cert=pki()["alice"])
        self.assertIsNone(hs.error)
        hs.send(b"hello")
        self.assertEqual(hs.inner.data, b"hello")
        self.assertEqual(peer_subject(hs.protocol), "CN=alice,O=Example\\, Inc.")

    def test_subject_needs_tls(self):
        """Plain connections and TLS ones without a client certificate have no subject."""
        self.assertIsNone(peer_subject(object()))
        self.serve()
        self.assertIsNone(peer_subject(self.connect("example.com").protocol))


class OCSPTests(ServerTestCase):
    """Stapling the configured OCSP response."""

    def test_stapled(self):
        """The response goes to clients that ask, for the certificate it is about."""
        der = pki()["ca"].ocsp_response(pki()["site_ec"])
        path = f"{self.dir}/ocsp.der"
        with open(path, "wb") as f:
            f.write(der)
        self.serve(["api", "site_ec"], ocsp_staple=path)
        stapled = []
        ctx = client_context(ca=self.ca)
        ctx.set_ocsp_client_callback(lambda conn, response, data: stapled.append(response) or True)
        Handshake(self.tls_factory, ctx, "example.com", ocsp=True)
        Handshake(self.tls_factory, ctx, "api.test", ocsp=True)
        self.assertEqual(stapled, [der, b""])

    def test_renewed_file_picked_up(self):
        """A renewed response file is stapled from the next check on (60 s timer)."""
        path = f"{self.dir}/ocsp.der"
        with open(path, "wb") as f:
            f.write(pki()["ca"].ocsp_response(pki()["site_ec"]))
        os.utime(path, (1000, 1000))
        tls = self.serve(["site_ec"], ocsp_staple=path)
        tls.startService()
        self.addCleanup(tls.stopService)
        renewed = pki()["ca"].ocsp_response(pki()["site_ec"], hours=48)
        with open(path, "wb") as f:
            f.write(renewed)
        stapled = []
        ctx = client_context(ca=self.ca)
        ctx.set_ocsp_client_callback(lambda conn, response, data: stapled.append(response) or True)
        self.clock.advance(60)
        Handshake(self.tls_factory, ctx, "example.com", ocsp=True)
        self.assertEqual(stapled, [renewed])

    def test_wrong_certificate_warned(self):
        path = f"{self.dir}/ocsp.der"
        with open(path, "wb") as f:
            f.write(pki()["ca"].ocsp_response(pki()["exact"]))
        self.serve(["site_ec"], ocsp_staple=path)
        self.assertIn("is about none of its certificates", self.warnings()[0])


class ReloadTests(ServerTestCase):
    """Certificates reloaded for new connections; open ones untouched."""

    def test_reload(self):
        tls = self.serve(["api"])
        before = self.connect("api.test")
        # Replace the files in place (as certbot does), then reload.
        pki()["api2"].write(self.dir, "api")
        tls.reload()
        after = self.connect("api.test")
        self.assertEqual(after.certificate, pki()["api2"].cert)
        before.send(b"still here")
        self.assertEqual(before.inner.data, b"still here")
        self.assertEqual(before.certificate, pki()["api"].cert)

    def test_reload_failure_keeps_old(self):
        tls = self.serve(["api"])
        with open(f"{self.dir}/api.key", "wb") as f:
            f.write(pki()["exact"].key_pem)
        e = self.assertRaises(TLSError, tls.reload)
        self.assertIn("listener web: ", str(e))
        self.assertIn("is not the private key", str(e))
        self.assertEqual(self.connect("api.test").certificate, pki()["api"].cert)

    def test_missing_file(self):
        self.assertRaises(TLSError, self.serve, ["api"], client_ca=f"{self.dir}/none.pem")


class FactoryTests(ServerTestCase):
    """The TLS factory in front of a listener's own factory."""

    def test_drain_delegated(self):
        self.serve()
        verifyObject(IDrainable, self.tls_factory)
        self.connect("example.com")
        self.assertEqual(self.tls_factory.active, 1)
        self.tls_factory.drain()
        self.tls_factory.abort_all()
        self.assertTrue(self.factory.drained and self.factory.aborted)

    def test_refused_connection(self):
        """When the listener's factory refuses (max_connections), so does TLS."""
        self.serve()
        self.factory.refuse = True
        self.assertIsNone(self.tls_factory.buildProtocol(None))

    def test_close_sends_fin_and_lingers(self):
        """Closing sends close_notify and a FIN at once; a client that never closes is cut."""
        self.serve()
        hs = self.connect("example.com")
        self.assertTrue(is_tls(hs.protocol))
        hs.protocol.loseConnection()
        self.assertTrue(hs.transport.write_closed)
        hs.pump()
        self.assertEqual(hs.client.get_shutdown() & SSL.RECEIVED_SHUTDOWN, SSL.RECEIVED_SHUTDOWN)
        self.assertFalse(hs.transport.disconnecting)
        self.clock.advance(LINGER_TIMEOUT)
        self.assertTrue(hs.transport.disconnecting)

    def test_linger_while_client_sends(self):
        """After Balance closed its side, a client still sending is not cut off."""
        self.serve()
        hs = self.connect("example.com")
        hs.protocol.loseConnection()
        hs.pump()
        for _ in range(3):
            self.clock.advance(LINGER_TIMEOUT - 1)
            hs.send(b"more")
        self.assertFalse(hs.transport.disconnecting)
        self.assertEqual(hs.inner.data, b"moremoremore")
        self.clock.advance(LINGER_TIMEOUT)
        self.assertTrue(hs.transport.disconnecting)
