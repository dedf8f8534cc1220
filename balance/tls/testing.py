# -*- test-case-name: tests.tls.test_certs -*-
"""
Certificates for tests and benchmarks, made on the fly with C{cryptography}:
a private CA, leaf certificates with SAN names (RSA or ECDSA P-256), and
OCSP responses to staple.  Nothing here is fit for production; private keys
are written only where the caller says (a test's temporary directory), and
never belong in the repository.

Typical use::

    ca = CA("Test CA")
    site = ca.issue(["example.com", "*.example.com"], key_type="ecdsa")
    cert_path, key_path = site.write(directory, "site")
    ca.write_cert(directory / "ca.pem")
"""

from __future__ import annotations

import datetime
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509 import ocsp
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

_DAY = datetime.timedelta(days=1)


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


def make_key(key_type: str = "ecdsa"):
    """
    Make a private key.

    :param key_type: ``"ecdsa"`` (P-256) or ``"rsa"`` (2048 bits).
    """
    if key_type == "ecdsa":
        return ec.generate_private_key(ec.SECP256R1())
    if key_type == "rsa":
        return rsa.generate_private_key(public_exponent=65537, key_size=2048)
    raise ValueError(f"unknown key type {key_type!r}")


def _pem_key(key) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _pem_certs(certs) -> bytes:
    return b"".join(c.public_bytes(serialization.Encoding.PEM) for c in certs)


class Issued:
    """
    A certificate issued by a L{CA}, with its key and the chain up to (not
    including) the root.

    :ivar cert: the leaf, a :class:`cryptography.x509.Certificate`.
    :ivar key: its private key.
    :ivar chain: the intermediates, leaf first excluded.
    """

    def __init__(self, cert: x509.Certificate, key, chain=()):
        self.cert = cert
        self.key = key
        self.chain = tuple(chain)

    @property
    def cert_pem(self) -> bytes:
        """The leaf followed by its intermediates, PEM."""
        return _pem_certs((self.cert, *self.chain))

    @property
    def key_pem(self) -> bytes:
        """The private key, unencrypted PKCS#8 PEM."""
        return _pem_key(self.key)

    @property
    def subject(self) -> str:
        """The subject as an RFC 4514 string."""
        return self.cert.subject.rfc4514_string()

    def write(self, directory, name: str) -> tuple[str, str]:
        """
        Write C{name}.pem (leaf and chain) and C{name}.key into
        C{directory}.

        :return: the two paths, as strings.
        """
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        cert_path, key_path = directory / f"{name}.pem", directory / f"{name}.key"
        cert_path.write_bytes(self.cert_pem)
        key_path.write_bytes(self.key_pem)
        key_path.chmod(0o600)
        return str(cert_path), str(key_path)


class CA:
    """
    A certificate authority for tests: a self-signed root, optionally an
    intermediate that signs the leaves.

    :ivar cert: the root certificate.
    :ivar signer: the L{Issued} intermediate that signs leaves, or L{None}
        when the root signs them directly.
    """

    def __init__(self, name: str = "Balance Test CA", intermediate: bool = False):
        self.name = name
        self.key = make_key("ecdsa")
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        self.cert = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(subject)
            .public_key(self.key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(_now() - _DAY)
            .not_valid_after(_now() + 30 * _DAY)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=True,
                    crl_sign=True,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(
                x509.SubjectKeyIdentifier.from_public_key(self.key.public_key()), critical=False
            )
            .sign(self.key, hashes.SHA256())
        )
        self.signer: Issued | None = None
        if intermediate:
            self.signer = self._intermediate(f"{name} Intermediate")

    def _intermediate(self, name: str) -> Issued:
        key = make_key("ecdsa")
        cert = (
            self._builder(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]), key)
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .sign(self.key, hashes.SHA256())
        )
        return Issued(cert, key)

    def _builder(self, subject: x509.Name, key, issuer=None, days: int = 10):
        issuer = self.cert if issuer is None else issuer
        return (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(issuer.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(_now() - _DAY)
            .not_valid_after(_now() + days * _DAY)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer.public_key()),
                critical=False,
            )
        )

    def issue(
        self,
        names=(),
        key_type: str = "ecdsa",
        common_name: str | None = None,
        client: bool = False,
        ips=(),
        organization: str | None = None,
    ) -> Issued:
        """
        Issue a leaf certificate.

        :param names: DNS names for the SAN (wildcards such as
            ``"*.example.com"`` allowed); the first is also the common name
            unless C{common_name} is given.
        :param key_type: ``"ecdsa"`` or ``"rsa"``.
        :param client: a client certificate (extended key usage clientAuth)
            rather than a server one.
        :param ips: IP address strings for the SAN.
        :param organization: an O= attribute for the subject.
        """
        import ipaddress

        key = make_key(key_type)
        attributes = []
        if organization is not None:
            attributes.append(x509.NameAttribute(NameOID.ORGANIZATION_NAME, organization))
        cn = common_name or (names[0] if names else "client")
        attributes.append(x509.NameAttribute(NameOID.COMMON_NAME, cn))
        signer = self.signer
        issuer_cert = signer.cert if signer else self.cert
        issuer_key = signer.key if signer else self.key
        builder = self._builder(x509.Name(attributes), key, issuer=issuer_cert)
        sans = [x509.DNSName(n) for n in names] + [
            x509.IPAddress(ipaddress.ip_address(i)) for i in ips
        ]
        if sans:
            builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
        usage = ExtendedKeyUsageOID.CLIENT_AUTH if client else ExtendedKeyUsageOID.SERVER_AUTH
        builder = builder.add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        builder = builder.add_extension(
            x509.BasicConstraints(ca=False, path_length=None), critical=True
        )
        cert = builder.sign(issuer_key, hashes.SHA256())
        return Issued(cert, key, (signer.cert,) if signer else ())

    @property
    def cert_pem(self) -> bytes:
        """The root certificate, PEM."""
        return _pem_certs((self.cert,))

    def write_cert(self, path) -> str:
        """Write the root certificate to C{path}; return the path as a string."""
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_bytes(self.cert_pem)
        return str(path)

    def ocsp_response(self, issued: Issued, good: bool = True, hours: int = 24) -> bytes:
        """
        A signed, successful OCSP response (DER) for C{issued}, saying it
        is good (or revoked), valid for C{hours}.
        """
        signer = self.signer
        issuer_cert = signer.cert if signer else self.cert
        issuer_key = signer.key if signer else self.key
        now = _now()
        status = ocsp.OCSPCertStatus.GOOD if good else ocsp.OCSPCertStatus.REVOKED
        builder = ocsp.OCSPResponseBuilder().add_response(
            cert=issued.cert,
            issuer=issuer_cert,
            algorithm=hashes.SHA1(),
            cert_status=status,
            this_update=now - datetime.timedelta(minutes=5),
            next_update=now + datetime.timedelta(hours=hours),
            revocation_time=None if good else now - _DAY,
            revocation_reason=None if good else x509.ReasonFlags.key_compromise,
        )
        builder = builder.responder_id(ocsp.OCSPResponderEncoding.HASH, issuer_cert)
        response = builder.sign(issuer_key, hashes.SHA256())
        return response.public_bytes(serialization.Encoding.DER)
