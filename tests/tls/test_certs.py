"""
Certificates as Balance reads them: names from the SAN, chains, keys that
must match, and which certificates answer which server name.
"""

from __future__ import annotations

from cryptography.hazmat.primitives import serialization
from twisted.trial.unittest import SynchronousTestCase

from balance.tls.certs import (
    CertificateError,
    names_of,
    normalize_name,
    parse_certificate,
    read_ca_bundle,
    read_certificate,
    select,
)
from balance.tls.testing import CA
from tests.tls.support import pki


def loaded(name):
    issued = pki()[name]
    return parse_certificate(issued.cert_pem, issued.key_pem, f"{name}.pem", f"{name}.key")


class ParseTests(SynchronousTestCase):
    """Reading certificate and key files."""

    def test_names_and_chain(self):
        """The SAN names come out lower case, and the intermediates with the leaf."""
        site = loaded("site_ec")
        self.assertEqual(site.names, ("example.com", "*.example.com"))
        self.assertEqual(len(site.chain), 2)
        self.assertEqual(site.key_type, "ecdsa")
        self.assertEqual(loaded("site_rsa").key_type, "rsa")

    def test_common_name_fallback(self):
        """A certificate without SAN names answers for its common name."""
        leaf = CA().issue([], common_name="Old.Example.org")
        self.assertEqual(names_of(leaf.cert), ("old.example.org",))

    def test_combined_file(self):
        """A key file may also hold the certificate (HAProxy's combined PEM)."""
        issued = pki()["api"]
        both = issued.cert_pem + issued.key_pem
        self.assertEqual(parse_certificate(both, both).names, ("api.test",))

    def test_key_mismatch(self):
        """A key that is not the certificate's is refused, naming the key file."""
        e = self.assertRaises(
            CertificateError,
            parse_certificate,
            pki()["api"].cert_pem,
            pki()["exact"].key_pem,
            "api.pem",
            "exact.key",
        )
        self.assertEqual(e.field, "key")
        self.assertIn("exact.key is not the private key of the certificate in api.pem", str(e))

    def test_no_certificate(self):
        e = self.assertRaises(CertificateError, parse_certificate, b"junk", b"", "x.pem", "x.key")
        self.assertEqual(str(e), "x.pem holds no PEM certificate")

    def test_no_key(self):
        e = self.assertRaises(
            CertificateError, parse_certificate, pki()["api"].cert_pem, b"", "x.pem", "x.key"
        )
        self.assertEqual((e.field, str(e)), ("key", "x.key holds no PEM private key"))

    def test_encrypted_key(self):
        """An encrypted key is refused with advice, not a password prompt."""
        key = pki()["api"].key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(b"secret"),
        )
        e = self.assertRaises(
            CertificateError, parse_certificate, pki()["api"].cert_pem, key, "x.pem", "x.key"
        )
        self.assertIn("x.key is encrypted", str(e))

    def test_malformed_certificate(self):
        pem = b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n"
        e = self.assertRaises(CertificateError, parse_certificate, pem, b"", "x.pem", "x.key")
        self.assertIn("x.pem holds a malformed certificate", str(e))

    def test_read_missing_file(self):
        e = self.assertRaises(CertificateError, read_certificate, "/nonexistent.pem", "k")
        self.assertEqual(str(e), "cannot read /nonexistent.pem: No such file or directory")
        e = self.assertRaises(CertificateError, read_ca_bundle, "/nonexistent-ca.pem")
        self.assertEqual(e.field, "ca")

    def test_read_files(self):
        path = self.mktemp()
        cert, key = pki()["api"].write(path, "api")
        self.assertEqual(read_certificate(cert, key).names, ("api.test",))
        self.assertEqual(len(read_ca_bundle(cert)), 2)  # the leaf and its intermediate


class SelectTests(SynchronousTestCase):
    """Which certificates answer which server name."""

    def setUp(self):
        # 0: example.com + *.example.com (ECDSA), 1: the same (RSA),
        # 2: api.test, 3: www.example.com
        self.certs = [loaded("site_ec"), loaded("site_rsa"), loaded("api"), loaded("exact")]

    def test_exact_and_default(self):
        s = select(self.certs)
        self.assertEqual(s.lookup("api.test"), (2,))
        self.assertEqual(s.lookup(None), (0, 1))
        self.assertEqual(s.lookup("unknown.test"), (0, 1))

    def test_ecdsa_and_rsa_together(self):
        """Certificates for the same names, of different key types, share a group."""
        s = select(self.certs)
        self.assertEqual(s.lookup("example.com"), (0, 1))
        self.assertEqual(s.lookup("a.example.com"), (0, 1))

    def test_wildcard_one_label(self):
        """A wildcard covers one label, not the bare domain nor deeper names."""
        s = select(self.certs[2:3] + self.certs[:1])
        self.assertEqual(s.lookup("a.example.com"), (1,))
        self.assertEqual(s.lookup("a.b.example.com"), (0,))

    def test_exact_name_preferred(self):
        """An exact certificate wins over a wildcard of the same key type."""
        s = select(self.certs)
        self.assertEqual(s.lookup("www.example.com"), (1, 3))

    def test_default_certificate(self):
        s = select(self.certs, default=2)
        self.assertEqual(s.lookup(None), (2,))
        self.assertEqual(s.lookup("example.com"), (0, 1))

    def test_first_of_a_type_wins(self):
        """Two ECDSA certificates for one name: the first configured one serves."""
        s = select([loaded("api"), loaded("api2")])
        self.assertEqual(s.lookup("api.test"), (0,))

    def test_groups(self):
        self.assertEqual(select(self.certs).groups(), {(0, 1), (2,), (1, 3)})

    def test_normalize(self):
        self.assertEqual(normalize_name(b"WWW.Example.COM."), "www.example.com")
