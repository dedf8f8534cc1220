# -*- test-case-name: tests.tls.test_certs -*-
"""
Certificates and keys as Balance uses them: parsed once from PEM, with the
DNS names each certificate answers for, and the choice of certificates per
TLS server name (exact names, C{*.domain} wildcards, a default).

Pure apart from L{read_certificate} and L{read_ca_bundle}, which read files;
they are called at start and on reload, never per handshake.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

from attrs import frozen
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa
from cryptography.x509.oid import NameOID

_PEM_CERT = re.compile(rb"-----BEGIN CERTIFICATE-----.+?-----END CERTIFICATE-----", re.S)
_PEM_KEY = re.compile(
    rb"-----BEGIN ((?:RSA |EC |ENCRYPTED )?PRIVATE KEY)-----.+?-----END \1-----", re.S
)


class CertificateError(Exception):
    """
    A certificate, key or CA file cannot be used.  The message is a sentence
    for the user, naming the file.

    :ivar field: which configured file is at fault: ``"cert"``, ``"key"`` or
        ``"ca"``.
    """

    def __init__(self, message: str, field: str = "cert"):
        super().__init__(message)
        self.field = field


def key_type(key) -> str:
    """
    The kind of a private or public key, as OpenSSL sorts certificates:
    ``"rsa"``, ``"ecdsa"``, ``"ed25519"``, ``"ed448"`` or ``"other"``.
    """
    if isinstance(key, rsa.RSAPrivateKey | rsa.RSAPublicKey):
        return "rsa"
    if isinstance(key, ec.EllipticCurvePrivateKey | ec.EllipticCurvePublicKey):
        return "ecdsa"
    if isinstance(key, ed25519.Ed25519PrivateKey | ed25519.Ed25519PublicKey):
        return "ed25519"
    if isinstance(key, ed448.Ed448PrivateKey | ed448.Ed448PublicKey):
        return "ed448"
    return "other"


def _spki(key) -> bytes:
    return key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def names_of(cert: x509.Certificate) -> tuple[str, ...]:
    """
    The DNS names C{cert} is valid for, lower case, in order: those of its
    subjectAltName extension, or its common name when it has none (as
    HAProxy and nginx do for old certificates).
    """
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName)
        names = san.value.get_values_for_type(x509.DNSName)
    except x509.ExtensionNotFound:
        names = []
    if not names:
        names = [
            a.value
            for a in cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
            if isinstance(a.value, str)
        ]
    seen: dict[str, None] = {}
    for name in names:
        seen.setdefault(name.lower().rstrip("."), None)
    return tuple(seen)


@frozen
class LoadedCertificate:
    """
    A parsed certificate chain and its private key.

    :ivar cert_path: the configured certificate file.
    :ivar key_path: the configured key file.
    :ivar chain: the leaf first, then the intermediates the file holds.
    :ivar key: the private key (a C{cryptography} key object).
    :ivar names: the DNS names of the leaf, see L{names_of}.
    :ivar key_type: see L{key_type}.
    """

    cert_path: str
    key_path: str
    chain: tuple[x509.Certificate, ...]
    key: object
    names: tuple[str, ...]
    key_type: str

    @property
    def leaf(self) -> x509.Certificate:
        """The certificate itself (the first of the chain)."""
        return self.chain[0]


def parse_certificates(data: bytes, path: str, field: str = "cert") -> list[x509.Certificate]:
    """
    Parse every PEM certificate in C{data}, in order.

    :raise CertificateError: when there is none or one is malformed.
    """
    blocks = _PEM_CERT.findall(data)
    if not blocks:
        raise CertificateError(f"{path} holds no PEM certificate", field)
    try:
        return [x509.load_pem_x509_certificate(block) for block in blocks]
    except ValueError as e:
        raise CertificateError(f"{path} holds a malformed certificate ({e})", field) from None


def parse_certificate(
    cert_pem: bytes, key_pem: bytes, cert_path: str = "cert", key_path: str = "key"
) -> LoadedCertificate:
    """
    Parse a certificate chain and its key, and check that they belong
    together.

    :param cert_pem: the leaf, optionally followed by its intermediates.
    :param key_pem: an unencrypted private key, PEM; other PEM blocks in the
        same file (a combined cert+key file) are ignored.
    :param cert_path: the file name, for messages.
    :param key_path: the file name, for messages.
    :raise CertificateError: naming the file and the problem.
    """
    chain = parse_certificates(cert_pem, cert_path)
    match = _PEM_KEY.search(key_pem)
    if match is None:
        raise CertificateError(f"{key_path} holds no PEM private key", "key")
    if match.group(1) == b"ENCRYPTED PRIVATE KEY" or b"Proc-Type: 4,ENCRYPTED" in match.group(0):
        raise CertificateError(
            f"{key_path} is encrypted; Balance needs an unencrypted key "
            "(protect it with file permissions instead)",
            "key",
        )
    try:
        key = serialization.load_pem_private_key(match.group(0), password=None)
    except (ValueError, TypeError) as e:
        raise CertificateError(f"{key_path} holds a malformed private key ({e})", "key") from None
    if _spki(key.public_key()) != _spki(chain[0].public_key()):
        raise CertificateError(
            f"{key_path} is not the private key of the certificate in {cert_path}", "key"
        )
    return LoadedCertificate(
        cert_path=cert_path,
        key_path=key_path,
        chain=tuple(chain),
        key=key,
        names=names_of(chain[0]),
        key_type=key_type(key),
    )


def _read(path: str, field: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as e:
        raise CertificateError(f"cannot read {path}: {e.strerror}", field) from None


def read_certificate(cert_path: str, key_path: str) -> LoadedCertificate:
    """
    Read and parse a certificate file and its key file (start and reload
    only: this blocks on the file system).

    :raise CertificateError: see L{parse_certificate}; also when a file
        cannot be read.
    """
    cert_pem = _read(cert_path, "cert")
    key_pem = cert_pem if key_path == cert_path else _read(key_path, "key")
    return parse_certificate(cert_pem, key_pem, cert_path, key_path)


def read_ca_bundle(path: str) -> tuple[x509.Certificate, ...]:
    """
    Read the CA certificates of a PEM bundle.

    :raise CertificateError: (with C{field} ``"ca"``) when the file cannot be
        read or holds no certificate.
    """
    return tuple(parse_certificates(_read(path, "ca"), path, "ca"))


def normalize_name(name: bytes | str) -> str:
    """A server name as L{Selection} keys it: lower case, no trailing dot."""
    if isinstance(name, bytes):
        name = name.decode("ascii", "replace")
    return name.lower().rstrip(".")


Group = tuple[int, ...]


@frozen
class Selection:
    """
    Which certificates answer which TLS server name, as indexes into the
    configured list.  A group holds at most one certificate per key type
    (say an ECDSA and an RSA one), so that OpenSSL can serve each client the
    kind it supports.

    :ivar default: the group for clients that send no server name, or one
        that no certificate covers.
    :ivar exact: groups by exact name.
    :ivar wildcard: groups by the domain under a wildcard (``"example.com"``
        for ``"*.example.com"``).
    """

    default: Group
    exact: Mapping[str, Group]
    wildcard: Mapping[str, Group]

    def lookup(self, server_name: str | None) -> Group:
        """
        The group for C{server_name} (already normalized, see
        L{normalize_name}): an exact name first, then a wildcard covering
        exactly one more label, else the default.
        """
        if not server_name:
            return self.default
        group = self.exact.get(server_name)
        if group is not None:
            return group
        _, dot, domain = server_name.partition(".")
        if dot:
            group = self.wildcard.get(domain)
            if group is not None:
                return group
        return self.default

    def groups(self) -> set[Group]:
        """Every distinct group, the default included."""
        return {self.default, *self.exact.values(), *self.wildcard.values()}


def _first_per_type(candidates: Sequence[int], certificates: Sequence[LoadedCertificate]) -> Group:
    chosen: dict[str, int] = {}
    for index in candidates:
        chosen.setdefault(certificates[index].key_type, index)
    return tuple(sorted(chosen.values()))


def select(certificates: Sequence[LoadedCertificate], default: int = 0) -> Selection:
    """
    Work out the certificate groups of a listener.

    For an exact name, the candidates are the certificates listing it, then
    those whose wildcard covers it; for a wildcard, the certificates listing
    that wildcard; for the default, the default certificate, then those
    with exactly the same names.  Each group keeps the first candidate of
    each key type, in configuration order.

    :param certificates: the listener's certificates, in configuration order.
    :param default: the index of the default certificate.
    """
    exact: dict[str, list[int]] = {}
    wildcard: dict[str, list[int]] = {}
    for index, cert in enumerate(certificates):
        for name in cert.names:
            if name.startswith("*."):
                wildcard.setdefault(name[2:], []).append(index)
            else:
                exact.setdefault(name, []).append(index)
    exact_groups = {}
    for name, indexes in exact.items():
        _, _, domain = name.partition(".")
        covering = wildcard.get(domain, [])
        exact_groups[name] = _first_per_type(indexes + covering, certificates)
    wildcard_groups = {
        domain: _first_per_type(indexes, certificates) for domain, indexes in wildcard.items()
    }
    twins = [i for i, c in enumerate(certificates) if c.names == certificates[default].names]
    return Selection(
        default=_first_per_type([default, *twins], certificates),
        exact=exact_groups,
        wildcard=wildcard_groups,
    )
