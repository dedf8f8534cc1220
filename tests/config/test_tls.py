"""
TLS settings in the config: certificates are read and checked at load (so
C{--check} finds a bad key), with errors that name the file, line and key.
"""

import os
import textwrap

from twisted.trial import unittest

from balance.config.load import load_text
from balance.config.validate import ConfigError, validate
from tests.tls.support import pki, write, write_ca


class TLSConfigTests(unittest.TestCase):
    def setUp(self):
        self.dir = os.path.abspath(self.mktemp())
        self.site = write(self.dir, "site_ec")
        self.api = write(self.dir, "api")

    def check(self, text: str):
        return validate(load_text(text, "t.yaml"), "t.yaml")

    def errors(self, text: str) -> list[str]:
        return self.assertRaises(ConfigError, self.check, text).errors

    def listener(self, tls: str, protocol: str = "http", extra: str = "") -> str:
        """A config whose listener's tls section is C{tls} (lines from line 7 on)."""
        return (
            "listeners:\n"
            "  - name: web\n"
            '    listen: "tcp:8443"\n'
            f"    protocol: {protocol}\n"
            "    cluster: app\n"
            "    tls:\n"
            + textwrap.indent(tls, " " * 6)
            + extra
            + "clusters:\n"
            "  - name: app\n"
            '    backends: ["127.0.0.1:9001"]\n'
        )

    def test_valid(self):
        config = self.check(
            self.listener(
                f"certificates:\n"
                f"  - {{cert: {self.site.cert}, key: {self.site.key}}}\n"
                f"  - {{cert: {self.api.cert}, key: {self.api.key}}}\n"
                f"default_certificate: {self.api.cert}\n"
                f"min_version: 1.3\n"
                f"client_ca: {write_ca(self.dir, 'client_ca')}\n"
            )
        )
        tls = config.listeners[0].tls
        self.assertEqual((tls.min_version, tls.default_certificate), ("1.3", self.api.cert))

    def test_bad_key(self):
        """A key that does not match is an error on the key's line."""
        with open(f"{self.dir}/wrong.key", "wb") as f:
            f.write(pki()["api"].key_pem)
        [error] = self.errors(
            self.listener(
                f"certificates:\n  - cert: {self.site.cert}\n    key: {self.dir}/wrong.key\n"
            )
        )
        self.assertEqual(
            error,
            f"t.yaml:9: listeners[0].tls.certificates[0].key: {self.dir}/wrong.key is not the "
            f"private key of the certificate in {self.site.cert}",
        )

    def test_missing_files(self):
        errors = self.errors(
            self.listener(
                f"certificates: [{{cert: {self.dir}/none.pem, key: {self.site.key}}}]\n"
                f"client_ca: {self.dir}/none-ca.pem\n"
            )
        )
        self.assertEqual(
            errors,
            [
                f"t.yaml:7: listeners[0].tls.certificates[0].cert: cannot read "
                f"{self.dir}/none.pem: No such file or directory",
                f"t.yaml:8: listeners[0].tls.client_ca: cannot read {self.dir}/none-ca.pem: "
                "No such file or directory",
            ],
        )

    def test_default_certificate_must_be_listed(self):
        [error] = self.errors(
            self.listener(
                f"certificates: [{{cert: {self.site.cert}, key: {self.site.key}}}]\n"
                f"default_certificate: {self.api.cert}\n"
            )
        )
        self.assertIn("listeners[0].tls.default_certificate: expected the cert of one of", error)

    def test_sni_routes_and_tls(self):
        """SNI routes pass TLS through: a tcp listener cannot also terminate it."""
        [error] = self.errors(
            self.listener(
                f"certificates: [{{cert: {self.site.cert}, key: {self.site.key}}}]\n",
                protocol="tcp",
                extra='    routes: [{match: {sni: "a.test"}, cluster: app}]\n',
            )
        )
        self.assertIn("listeners[0].tls: sni routes pass TLS through", error)

    def test_cluster_tls(self):
        alice = write(self.dir, "alice")
        base = (
            "listeners:\n"
            '  - {name: l, listen: "tcp:1", protocol: tcp, cluster: app}\n'
            "clusters:\n"
            "  - name: app\n"
            '    backends: ["127.0.0.1:9001"]\n'
            "    tls:\n"
        )
        config = self.check(
            base + f"      ca: {write_ca(self.dir)}\n      sni: api.internal\n"
            f"      client_cert: {alice.cert}\n      client_key: {alice.key}\n"
        )
        self.assertEqual(config.clusters[0].tls.sni, "api.internal")
        errors = self.errors(
            base + f"      client_cert: {alice.cert}\n      client_key: {self.api.key}\n"
        )
        self.assertEqual(
            errors,
            [
                f"t.yaml:8: clusters[0].tls.client_key: {self.api.key} is not the private key "
                f"of the certificate in {alice.cert}"
            ],
        )
        [error] = self.errors(base + f"      client_key: {alice.key}\n")
        self.assertIn("clusters[0].tls.client_key: expected client_cert too", error)

    def test_tcp_sni_routes_accepted(self):
        config = self.check(
            textwrap.dedent(
                """\
            listeners:
              - name: l
                listen: "tcp:1"
                protocol: tcp
                routes:
                  - {match: {sni: "db.example.com"}, cluster: app}
                  - {match: {sni: "*.example.com"}, cluster: app}
            clusters:
              - {name: app, backends: ["127.0.0.1:9001"]}
            """
            )
        )
        self.assertEqual(config.listeners[0].routes[1].match.sni, "*.example.com")
