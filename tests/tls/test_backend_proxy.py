"""
Backend TLS through the HTTP proxy: a cluster with C{tls} verifies its
backends' certificates, and refuses (502) one that names another host.
"""

from __future__ import annotations

import http.client
import os

from twisted.internet import reactor, threads
from twisted.internet.defer import inlineCallbacks
from twisted.trial.unittest import TestCase

from balance.config import model
from balance.config.load import load_text
from balance.config.validate import validate
from balance.service import build
from balance.tls.server import ServerTLS
from balance.tls.transport import wrap
from balance.whoami import WhoamiFactory
from tests.integration.twistd import free_port
from tests.tls.support import listener, write, write_ca


class BackendTLSProxyTests(TestCase):
    timeout = 30

    def tls_backend(self, directory) -> int:
        """A whoami upstream behind TLS, with a certificate for localhost."""
        tls = ServerTLS(
            listener(model.ListenerTLS(certificates=[write(directory, "localhost")]), "tcp"),
            reactor,
        )
        port = reactor.listenTCP(
            0, wrap(tls, WhoamiFactory("secure", reactor), reactor), interface="127.0.0.1"
        )
        self.addCleanup(port.stopListening)
        return port.getHost().port

    def proxy(self, tls_settings: str) -> int:
        directory = os.path.abspath(self.mktemp())
        backend = self.tls_backend(directory)
        ca = write_ca(directory)
        port = free_port()
        text = f"""
listeners:
  - name: web
    listen: "tcp:{port}:interface=127.0.0.1"
    protocol: http
    cluster: secure
clusters:
  - name: secure
    backends: ["127.0.0.1:{backend}"]
    tls: {{ca: "{ca}", {tls_settings}}}
"""
        root = build(validate(load_text(text, "t.yaml"), "t.yaml"), reactor)
        root.startService()
        self.addCleanup(root.stopService)
        return port

    def get(self, port: int):
        def run():
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
            conn.request("GET", "/tls")
            response = conn.getresponse()
            body = response.read()
            conn.close()
            return response.status, body

        return threads.deferToThread(run)

    @inlineCallbacks
    def test_verified(self):
        """A backend whose certificate names the expected host is used over TLS."""
        port = self.proxy('sni: "localhost"')
        status, body = yield self.get(port)
        self.assertEqual(status, 200)
        self.assertIn(b"Name: secure", body)

    @inlineCallbacks
    def test_wrongName(self):
        """A certificate for another name is refused: 502, nothing forwarded."""
        port = self.proxy('sni: "other.example.com"')
        status, body = yield self.get(port)
        self.assertEqual(status, 502)
