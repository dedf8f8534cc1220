"""
TLS with real peers over loopback: Balance's service tree built from a YAML
config, in this process, and C{openssl s_client}, C{curl} and
C{testssl.sh} as the clients (tests.tls.support.run, which does not block
the reactor Balance runs in).  Without a tool the test is skipped, except
in CI, where it fails.
"""

from __future__ import annotations

import json
import os
import textwrap

from twisted.internet import reactor
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.protocol import Factory, Protocol
from twisted.trial.unittest import TestCase

from balance.config import model
from balance.config.validate import load_config
from balance.service import build
from balance.tls.client import ClientTLS
from balance.tls.server import ServerTLS
from balance.tls.transport import wrap
from tests.helpers import EchoFactory, free_port, wait_for
from tests.tls.support import listener, pki, require, run, write, write_ca


class _Greeter(Protocol):
    """A TLS backend that says its name and closes."""

    def connectionMade(self):
        self.transport.write(self.factory.greeting)
        self.transport.loseConnection()


class _HTTPClient(Protocol):
    """Sends requests on one keep-alive connection, one at a time."""

    def __init__(self):
        self.buffer = b""
        self.waiting: Deferred | None = None

    def request(self, path: bytes) -> Deferred:
        self.buffer = b""
        self.waiting = Deferred()
        self.transport.write(b"GET " + path + b" HTTP/1.1\r\nHost: api.test\r\n\r\n")
        return self.waiting

    def dataReceived(self, data):
        self.buffer += data
        head, sep, body = self.buffer.partition(b"\r\n\r\n")
        if sep and b"content-length" in head.lower():
            length = int(head.lower().split(b"content-length:")[1].split(b"\r\n")[0])
            if len(body) >= length and self.waiting is not None:
                waiting, self.waiting = self.waiting, None
                waiting.callback(self.buffer)

    def connectionLost(self, reason):
        if self.waiting is not None:
            self.waiting.errback(reason)


class BalanceTLSTestCase(TestCase):
    """Balance with TLS listeners, whoami behind them, and TLS backends for passthrough."""

    timeout = 60

    def setUp(self):
        self.dir = os.path.abspath(self.mktemp())
        self.ca = write_ca(self.dir)
        self.ports = {}

    def backend(self, name: str, greeting: bytes) -> int:
        """A TLS backend serving certificate C{name} that greets and closes."""
        tls = ServerTLS(
            listener(model.ListenerTLS(certificates=[write(f"{self.dir}/b", name)]), "tcp"),
            reactor,
        )
        factory = Factory.forProtocol(_Greeter)
        factory.greeting = greeting
        factory.active = 0
        port = reactor.listenTCP(0, wrap(tls, factory, reactor), interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        return port.getHost().port

    def start(self, config: str):
        path = os.path.join(self.dir, "balance.yaml")
        with open(path, "w") as f:
            f.write(textwrap.dedent(config))
        self.root = build(load_config(path), reactor)
        self.root.startService()
        self.addCleanup(self.root.stopService)
        return self.root

    def s_client(self, port: int, *args: str, stdin: bytes = b""):
        return run(
            [require("openssl"), "s_client", "-connect", f"127.0.0.1:{port}", "-CAfile",
             self.ca, *args],
            stdin=stdin,
            timeout=15,
        )


class ListenerTests(BalanceTLSTestCase):
    """An HTTP listener terminating TLS, and a tcp listener passing TLS through by SNI."""

    def setUp(self):
        super().setUp()
        site_ec, site_rsa = write(self.dir, "site_ec"), write(self.dir, "site_rsa")
        api, alice = write(self.dir, "api"), write(self.dir, "alice")
        self.alice = alice
        with open(f"{self.dir}/ocsp.der", "wb") as f:
            f.write(pki()["ca"].ocsp_response(pki()["site_ec"]))
        p = self.ports = {n: free_port() for n in ("web", "strict", "sni", "whoami", "echo", "mtls")}
        echo = reactor.listenTCP(p["echo"], EchoFactory(), interface="127.0.0.1")
        self.addCleanup(echo.stopListening)
        db, api_backend = self.backend("site_ec", b"db\n"), self.backend("api", b"api\n")
        self.start(
            f"""
            listeners:
              - name: web
                listen: "tcp:{p["web"]}:interface=127.0.0.1"
                protocol: http
                tls:
                  certificates:
                    - {{cert: {site_ec.cert}, key: {site_ec.key}}}
                    - {{cert: {site_rsa.cert}, key: {site_rsa.key}}}
                    - {{cert: {api.cert}, key: {api.key}}}
                  alpn: [h2, http/1.1]
                  ocsp_staple: {self.dir}/ocsp.der
                cluster: whoami
              - name: strict
                listen: "tcp:{p["strict"]}:interface=127.0.0.1"
                protocol: tcp
                tls:
                  certificates: [{{cert: {api.cert}, key: {api.key}}}]
                  min_version: "1.3"
                  client_ca: {write_ca(self.dir, "client_ca")}
                cluster: echo
              - name: mtls
                listen: "tcp:{p["mtls"]}:interface=127.0.0.1"
                protocol: http
                tls:
                  certificates: [{{cert: {site_ec.cert}, key: {site_ec.key}}}]
                  alpn: [http/1.1]
                  client_ca: {write_ca(self.dir, "client_ca")}
                  client_cert_header: x-client-subject
                routes:
                  - match: {{path: /route, headers: {{x-client-subject: "CN=mallory"}}}}
                    direct_response: {{status: 403, body: "spoofed route"}}
                  - match: {{path: /route, headers: {{x-client-subject: 'CN=alice,O=Example\\, Inc.'}}}}
                    direct_response: {{status: 200, body: "hello alice"}}
                cluster: whoami
              - name: sni
                listen: "tcp:{p["sni"]}:interface=127.0.0.1"
                protocol: tcp
                routes:
                  - {{match: {{sni: "db.example.com"}}, cluster: db}}
                  - {{match: {{sni: "*.api.test"}}, cluster: api}}
            clusters:
              - {{name: whoami, backends: ["127.0.0.1:{p["whoami"]}"]}}
              - {{name: echo, backends: ["127.0.0.1:{p["echo"]}"]}}
              - {{name: db, backends: ["127.0.0.1:{db}"]}}
              - {{name: api, backends: ["127.0.0.1:{api_backend}"]}}
            whoami:
              - {{name: alpha, listen: "tcp:{p["whoami"]}:interface=127.0.0.1"}}
            """
        )

    @inlineCallbacks
    def test_sni_and_chain(self):
        """openssl s_client gets the certificate for the name it asks, with its chain."""
        code, out = yield self.s_client(self.ports["web"], "-servername", "api.test")
        self.assertIn("subject=CN = api.test", out)
        self.assertIn("Verify return code: 0 (ok)", out)
        code, out = yield self.s_client(self.ports["web"], "-servername", "shop.example.com")
        self.assertIn("subject=CN = example.com", out)
        self.assertIn("Verify return code: 0 (ok)", out)

    @inlineCallbacks
    def test_rsa_client(self):
        """A client that only accepts RSA signatures gets the RSA certificate (TLS 1.3)."""
        code, out = yield self.s_client(
            self.ports["web"], "-servername", "example.com", "-sigalgs", "rsa_pss_rsae_sha256"
        )
        self.assertIn("Server public key is 2048 bit", out)
        code, out = yield self.s_client(self.ports["web"], "-servername", "example.com")
        self.assertIn("Server public key is 256 bit", out)

    @inlineCallbacks
    def test_alpn(self):
        code, out = yield self.s_client(self.ports["web"], "-alpn", "h2,http/1.1")
        self.assertIn("ALPN protocol: h2", out)

    @inlineCallbacks
    def test_old_versions_refused(self):
        for flag in ("-tls1", "-tls1_1"):
            code, out = yield self.s_client(
                self.ports["web"], flag, "-cipher", "DEFAULT:@SECLEVEL=0"
            )
            self.assertNotEqual(code, 0, out)
            self.assertNotIn("Cipher is", out.replace("Cipher is (NONE)", ""))

    @inlineCallbacks
    def test_min_version_13(self):
        code, out = yield self.s_client(self.ports["strict"], "-tls1_2")
        self.assertNotEqual(code, 0, out)

    @inlineCallbacks
    def test_ocsp_status(self):
        code, out = yield self.s_client(self.ports["web"], "-servername", "example.com", "-status")
        self.assertIn("OCSP Response Status: successful", out)
        self.assertIn("Cert Status: good", out)

    @inlineCallbacks
    def test_client_certificate_required(self):
        """Without a client certificate nothing gets through; with one, bytes are relayed."""
        code, out = yield self.s_client(self.ports["strict"], "-quiet", stdin=b"hello\n")
        self.assertIn("certificate required", out)
        self.assertNotIn("hello", out)
        code, out = yield self.s_client(
            self.ports["strict"], "-quiet", "-cert", self.alice.cert, "-key", self.alice.key,
            stdin=b"hello\n",
        )
        self.assertIn("hello", out)

    @inlineCallbacks
    def test_mtls_subject_header(self):
        """
        On an mTLS HTTP listener the verified client subject reaches the
        backend in client_cert_header; a value the client sent is dropped.
        """
        code, out = yield run(
            [require("curl"), "-sS", "--cacert", self.ca, "--cert", self.alice.cert,
             "--key", self.alice.key, "-H", "X-Client-Subject: CN=mallory",
             "--resolve", f"www.example.com:{self.ports['mtls']}:127.0.0.1",
             f"https://www.example.com:{self.ports['mtls']}/whoami"],
            timeout=15,
        )
        self.assertEqual(code, 0, out)
        self.assertIn("x-client-subject: CN=alice", out)
        self.assertNotIn("mallory", out)

    @inlineCallbacks
    def test_mtls_subject_routing(self):
        """Routes can match the verified subject; a spoofed header cannot."""
        code, out = yield run(
            [require("curl"), "-sS", "--cacert", self.ca, "--cert", self.alice.cert,
             "--key", self.alice.key, "-H", "X-Client-Subject: CN=mallory",
             "--resolve", f"www.example.com:{self.ports['mtls']}:127.0.0.1",
             f"https://www.example.com:{self.ports['mtls']}/route"],
            timeout=15,
        )
        self.assertEqual(code, 0, out)
        self.assertEqual(out, "hello alice")

    @inlineCallbacks
    def test_curl(self):
        """curl through TLS to the whoami upstream: HTTP/2 by ALPN, HTTP/1.1 upstream."""
        code, out = yield run(
            [require("curl"), "-sS", "--http2", "--cacert", self.ca, "-w", "\n%{http_version}",
             "--resolve", f"www.example.com:{self.ports['web']}:127.0.0.1",
             f"https://www.example.com:{self.ports['web']}/hello"],
            timeout=15,
        )
        self.assertEqual(code, 0, out)
        self.assertIn("GET /hello HTTP/1.1", out)
        self.assertIn("X-Forwarded-Proto: https", out)
        self.assertTrue(out.endswith("\n2"), out)

    @inlineCallbacks
    def test_sni_passthrough(self):
        """Each name reaches its backend, which terminates TLS itself."""
        code, out = yield self.s_client(
            self.ports["sni"], "-servername", "db.example.com", "-ign_eof"
        )
        self.assertIn("subject=CN = example.com", out)
        self.assertIn("\ndb\n", out)
        code, out = yield self.s_client(self.ports["sni"], "-servername", "v1.api.test", "-ign_eof")
        self.assertIn("subject=CN = api.test", out)
        self.assertIn("\napi\n", out)
        code, out = yield self.s_client(self.ports["sni"], "-servername", "nope.test")
        self.assertNotIn("subject=", out)

    @inlineCallbacks
    def test_handshake_only_clients(self):
        """
        Clients that handshake and leave at once (openssl s_time -new, which
        closes before the TLS 1.3 tickets arrive, so they meet a reset) are
        counted as handshakes and leave no connection behind; the listener
        still serves.
        """
        tls = self.root.tls["web"]
        before = tls.handshakes["success"]
        code, out = yield run(
            [require("openssl"), "s_time", "-connect", f"127.0.0.1:{self.ports['web']}",
             "-new", "-time", "1"],
            timeout=30,
        )
        self.assertEqual(code, 0, out)
        made = int(out.split(" connections in ")[0].split()[-1])
        self.assertGreater(made, 0)
        factory = self.root.listeners.getServiceNamed("web").factory
        yield wait_for(lambda: factory.active == 0, what="every connection closed")
        self.assertGreaterEqual(tls.handshakes["success"] - before, made)
        self.assertTrue(self.root.listeners.getServiceNamed("web").port.balance_nodelay)
        code, out = yield self.s_client(
            self.ports["web"], "-servername", "example.com", "-ign_eof",
            stdin=b"GET / HTTP/1.0\r\nHost: example.com\r\n\r\n",
        )
        self.assertIn("200 OK", out)

    @inlineCallbacks
    def test_ticket_across_rotation(self):
        """
        openssl s_client resumes a session from just before a ticket-key
        rotation after it, TLS 1.3 and 1.2; two rotations later it cannot.
        """
        tls = self.root.tls["web"]
        request = b"GET / HTTP/1.0\r\nHost: example.com\r\n\r\n"
        for version in ("-tls1_3", "-tls1_2"):
            session = os.path.join(self.dir, f"session{version}.pem")
            args = (version, "-servername", "example.com", "-ign_eof")
            code, out = yield self.s_client(
                self.ports["web"], *args, "-sess_out", session, stdin=request
            )
            self.assertIn("200 OK", out)
            tls.rotate_session_keys()
            code, out = yield self.s_client(
                self.ports["web"], *args, "-sess_in", session, stdin=request
            )
            self.assertIn("Reused, TLSv1.", out)
            self.assertIn("200 OK", out)
            tls.rotate_session_keys()
            tls.rotate_session_keys()
            code, out = yield self.s_client(
                self.ports["web"], *args, "-sess_in", session, stdin=request
            )
            self.assertIn("New, TLSv1.", out)
            self.assertIn("200 OK", out)

    @inlineCallbacks
    def test_reload_with_open_connection(self):
        """A connection open across a reload keeps working; a new one gets the new cert."""
        tls = ClientTLS(model.UpstreamTLS(ca=self.ca, sni="api.test"), "t", reactor)
        endpoint = tls.wrap(TCP4ClientEndpoint(reactor, "127.0.0.1", self.ports["web"]), "x")
        before = yield connectProtocol(endpoint, _HTTPClient())
        self.addCleanup(before.transport.loseConnection)
        response = yield before.request(b"/one")
        self.assertIn(b"GET /one", response)
        old = before.transport.getPeerCertificate().to_cryptography()

        pki()["api2"].write(self.dir, "api")
        self.root.tls["web"].reload()

        response = yield before.request(b"/two")
        self.assertIn(b"GET /two", response)
        self.assertEqual(before.transport.getPeerCertificate().to_cryptography(), old)
        after = yield connectProtocol(endpoint, _HTTPClient())
        self.addCleanup(after.transport.loseConnection)
        yield after.request(b"/three")
        self.assertEqual(
            after.transport.getPeerCertificate().to_cryptography(), pki()["api2"].cert
        )


class TestSSLTests(BalanceTLSTestCase):
    """testssl.sh finds nothing of severity HIGH or CRITICAL in Balance's TLS."""

    timeout = 180

    @inlineCallbacks
    def test_testssl(self):
        testssl = require("testssl", "testssl.sh")  # Debian names it testssl
        site_ec, site_rsa = write(self.dir, "site_ec"), write(self.dir, "site_rsa")
        port, whoami = free_port(), free_port()
        self.start(
            f"""
            listeners:
              - name: web
                listen: "tcp:{port}:interface=127.0.0.1"
                protocol: http
                tls:
                  certificates:
                    - {{cert: {site_ec.cert}, key: {site_ec.key}}}
                    - {{cert: {site_rsa.cert}, key: {site_rsa.key}}}
                cluster: whoami
            clusters:
              - {{name: whoami, backends: ["127.0.0.1:{whoami}"]}}
            whoami:
              - {{name: alpha, listen: "tcp:{whoami}:interface=127.0.0.1"}}
            """
        )
        report = os.path.join(self.dir, "testssl.json")
        # Protocols, cipher categories, forward secrecy, server preference and
        # the vulnerability checks, in --fast mode: about 20 s.  The
        # certificate checks are left out: a test CA is untrusted by design.
        code, out = yield run(
            [testssl, "--quiet", "--fast", "--warnings", "off", "--color", "0",
             "--severity", "HIGH", "--jsonfile", report, "--nodns", "none",
             "-p", "-s", "-f", "-P", "-U", f"127.0.0.1:{port}"],
            timeout=170,
        )
        with open(report) as f:
            findings = json.load(f)
        bad = [f for f in findings if f.get("severity") in ("HIGH", "CRITICAL", "FATAL")]
        self.assertEqual(bad, [], out[-2000:])
        # It did scan: the checks ran against a TLS 1.3 server.
        self.assertIn("Testing vulnerabilities", out)
        self.assertRegex(out, r"TLS 1\.3\s+offered")


class AccessLogTests(BalanceTLSTestCase):
    """The access log says which TLS version and which HTTP each request came over."""

    @inlineCallbacks
    def test_tls_version_and_protocol(self):
        """curl over TLS 1.2 with HTTP/1.1, then TLS 1.3 with HTTP/2: both in the log."""
        curl = require("curl")
        site = write(self.dir, "site_ec")
        port, upstream = free_port(), free_port()
        log = os.path.join(self.dir, "access.log")
        root = self.start(
            f"""
            listeners:
              - name: web
                listen: "tcp:{port}:interface=127.0.0.1"
                tls:
                  certificates: [{{cert: {site.cert}, key: {site.key}}}]
                  alpn: [h2, http/1.1]
                access_log: {{path: {log}, format: json}}
                cluster: whoami
            clusters:
              - {{name: whoami, backends: ["127.0.0.1:{upstream}"]}}
            whoami:
              - {{name: alpha, listen: "tcp:{upstream}:interface=127.0.0.1"}}
            """
        )
        base = [curl, "-sS", "-o", "/dev/null", "--cacert", self.ca,
                "--resolve", f"example.com:{port}:127.0.0.1", f"https://example.com:{port}/"]
        for args in (["--http1.1", "--tlsv1.2", "--tls-max", "1.2"], ["--http2", "--tlsv1.3"]):
            code, out = yield run([*base[:-1], *args, base[-1]], timeout=15)
            self.assertEqual(code, 0, out)
        for access_log in root.access_logs:
            access_log.flush()
        with open(log) as f:
            lines = [json.loads(line) for line in f]
        self.assertEqual(
            [(line["tls_version"], line["protocol"], line["status"]) for line in lines],
            [("TLSv1.2", "HTTP/1.1", 200), ("TLSv1.3", "HTTP/2.0", 200)],
        )
        self.assertIn(
            'balance_tls_handshakes_total{listener="web",result="success"} 2.0',
            root.metrics.render().decode(),
        )
