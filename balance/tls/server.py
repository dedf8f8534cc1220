# -*- test-case-name: tests.tls.test_server -*-
"""
TLS termination for one listener: the OpenSSL contexts, and the connection
creator that Twisted's memory-BIO TLS layer asks for a connection per client.

How a handshake finds its certificate.  Every connection starts on the
listener's I{session context}, which holds the default certificates and
owns the session cache and the session-ticket keys.  Its server-name
callback (run by OpenSSL for every ClientHello, with or without SNI) looks
the name up in the L{balance.tls.certs.Selection} and, unless the default
group answers, moves the connection to the context of the matching group
(C{SSL_set_SSL_CTX}).  Sessions and tickets stay with the session context
whatever the certificate, so resumption works across names.  A group may
hold an ECDSA and an RSA certificate; OpenSSL serves the one the client's
signature algorithms allow.

Every context gets the same settings: TLS 1.2 and 1.3 only (or 1.3 only),
AEAD ciphers with forward secrecy for TLS 1.2, the server's cipher order, no
compression, no renegotiation, ALPN, client certificate verification, OCSP
stapling.  All files are read when the object is made and on L{reload};
handshakes only look things up.

Session tickets.  Neither pyOpenSSL nor the OpenSSL bindings it uses (those
of C{cryptography}, which links OpenSSL statically and exports none of its
symbols) offer OpenSSL's ticket-key callback or C{SSL_CTX_ctrl}, so the keys
can be neither set nor chosen per ticket: they are the ones OpenSSL generates
for each session context.  They are rotated by replacing the session context
every C{session_rotation} seconds (an hour by default).  The previous
session context is kept for one more period, with the name of its key
(the first 16 bytes of every ticket it issues, learnt by one handshake with
itself in memory): a ClientHello that carries a ticket under that name is
handshaken on the previous context (see
L{balance.tls.transport._ServerTLSProtocol}), so tickets issued just before
a rotation still resume.  Sessions live C{SESSION_TIMEOUT} seconds (5
minutes, as nginx and HAProxy) whichever key encrypted them.  Session IDs
(the session cache, which TLS 1.2 clients without tickets use) stay with
their context and do not survive a rotation.
"""

from __future__ import annotations

import datetime
import hashlib
import tempfile
from collections.abc import Sequence

import attrs
from cryptography.hazmat.primitives.serialization import Encoding
from OpenSSL import SSL, crypto
from OpenSSL._util import ffi as _ffi
from OpenSSL._util import lib as _lib
from twisted.application.service import Service
from twisted.internet.interfaces import IOpenSSLServerConnectionCreator
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from zope.interface import implementer

from balance.config import model
from balance.tls.certs import (
    CertificateError,
    LoadedCertificate,
    Selection,
    normalize_name,
    read_ca_bundle,
    read_certificate,
    select,
)
from balance.tls.ocsp import OCSPStaple

#: TLS 1.2 cipher suites: ECDHE key exchange (forward secrecy) with an AEAD
#: cipher only, ECDSA before RSA, AES-GCM before ChaCha20 (AES-NI is the
#: common case).  TLS 1.3 suites are all AEAD; OpenSSL's defaults stay.
TLS12_CIPHERS = (
    b"ECDHE-ECDSA-AES128-GCM-SHA256:ECDHE-RSA-AES128-GCM-SHA256:"
    b"ECDHE-ECDSA-AES256-GCM-SHA384:ECDHE-RSA-AES256-GCM-SHA384:"
    b"ECDHE-ECDSA-CHACHA20-POLY1305:ECDHE-RSA-CHACHA20-POLY1305"
)

#: TLS 1.3 cipher suites in the server's order of preference: AES-128-GCM
#: first (as Mozilla's recommendation and HAProxy's default), which hashes
#: the handshake with SHA-256 rather than SHA-384 and costs less per
#: handshake than OpenSSL's default of AES-256-GCM first.
TLS13_CIPHERSUITES = b"TLS_AES_128_GCM_SHA256:TLS_AES_256_GCM_SHA384:TLS_CHACHA20_POLY1305_SHA256"

#: Seconds a TLS session (ticket or cache entry) may be resumed.
SESSION_TIMEOUT = 300

#: Seconds between session-ticket key rotations.
SESSION_ROTATION = 3600.0

#: Seconds between checks of the OCSP response file.
OCSP_POLL_INTERVAL = 60.0

_OPTIONS = (
    SSL.OP_NO_SSLv2
    | SSL.OP_NO_SSLv3
    | SSL.OP_NO_TLSv1
    | SSL.OP_NO_TLSv1_1
    | SSL.OP_NO_COMPRESSION
    | SSL.OP_NO_RENEGOTIATION
    | SSL.OP_CIPHER_SERVER_PREFERENCE
    | SSL.OP_SINGLE_ECDH_USE
)

_MIN_VERSIONS = {"1.2": SSL.TLS1_2_VERSION, "1.3": SSL.TLS1_3_VERSION}


class TLSError(Exception):
    """
    The TLS settings of a listener cannot be used (a certificate, key or CA
    file is missing or wrong).  The message is a sentence naming the
    listener and the file.
    """


def offered_alpn(
    listener: model.Listener, log: Logger | None = None, http2: bool = False
) -> tuple[bytes, ...]:
    """
    The ALPN protocols a listener offers, in its order of preference.

    An HTTP listener offers C{h2} only when its connections can speak
    HTTP/2 (C{http2}); otherwise C{h2} is left out, with a warning, rather
    than offered to clients that would then speak HTTP/2 to an HTTP/1.1
    server.  On tcp listeners the bytes go to the backend as they are, so
    the list is offered as configured.

    :param http2: whether the listener's protocol factory serves HTTP/2.
    """
    names = listener.tls.alpn if listener.tls is not None else ()
    if listener.protocol == "http" and "h2" in names and not http2:
        names = tuple(n for n in names if n != "h2")
        if log is not None:
            log.warn(
                "listener {listener}: alpn lists h2, but Balance does not serve HTTP/2 "
                "to clients yet; offering {offered}",
                listener=listener.name,
                offered=", ".join(names) or "no ALPN protocol",
            )
    return tuple(n.encode("ascii") for n in names)


_ALPN_CALLBACK = (
    "int (*)(SSL *, unsigned char **, unsigned char *, unsigned char *, unsigned int, void *)"
)


def _set_alpn(context: SSL.Context, preference: tuple[bytes, ...]) -> None:
    """
    Choose the ALPN protocol of each handshake on C{context}: the first of
    C{preference} the client offers, or none.

    Installed on OpenSSL directly rather than with pyOpenSSL's
    C{set_alpn_select_callback}, whose wrapper finds the L{SSL.Connection}
    of the handshake and splits the client's list into a Python list
    first: a few microseconds of every handshake for a choice that needs
    neither.
    """
    # The selected name must outlive the handshake: OpenSSL keeps the
    # pointer; these buffers live as long as the context (below).
    names = [(p, _ffi.new("unsigned char[]", p)) for p in preference]

    def select(ssl, out, outlen, client, client_len, arg):
        offered = _ffi.buffer(client, client_len)[:]
        # The client's list, in wire format (length-prefixed names).
        listed = set()
        i = 0
        while i < client_len:
            end = i + 1 + offered[i]
            listed.add(offered[i + 1 : end])
            i = end
        for name, buffer in names:
            if name in listed:
                out[0] = buffer
                outlen[0] = len(name)
                return _lib.SSL_TLSEXT_ERR_OK
        # Go on without ALPN rather than failing the handshake: HTTP/1.1
        # is what a client that offered something else gets anyway.
        return _lib.SSL_TLSEXT_ERR_NOACK

    callback = _ffi.callback(_ALPN_CALLBACK, select, error=_lib.SSL_TLSEXT_ERR_ALERT_FATAL)
    _lib.SSL_CTX_set_alpn_select_cb(context._context, callback, _ffi.NULL)
    context._balance_alpn = (callback, names)


def _stapler(staple: OCSPStaple):
    def staple_response(connection, data):
        cert = connection.get_certificate(as_cryptography=True)
        if cert is None:
            return b""
        return staple.response_for(cert.serial_number)

    return staple_response


def _install(context: SSL.Context, certificates: Sequence[LoadedCertificate]) -> None:
    """
    Put C{certificates} (at most one per key type) and their chains into
    C{context}.
    """
    chains = {c.chain[1:] for c in certificates}
    if len(chains) == 1:
        for c in certificates:
            context.use_certificate(c.leaf)
            context.use_privatekey(c.key)
        # Extra chain certificates are shared by every certificate of the
        # context, which is right when they all have the same issuers.
        for intermediate in chains.pop():
            context.add_extra_chain_cert(intermediate)
        return
    # Different issuers (say ECDSA and RSA intermediates): each certificate
    # needs its own chain, which pyOpenSSL only sets from a file.  The chain
    # is public; write what was read and parsed, not the user's file again.
    for c in certificates:
        with tempfile.NamedTemporaryFile(suffix=".pem") as f:
            f.write(b"".join(x.public_bytes(Encoding.PEM) for x in c.chain))
            f.flush()
            context.use_certificate_chain_file(f.name.encode())
        context.use_privatekey(c.key)


class _Settings:
    """What every context of a listener shares, read once per load."""

    def __init__(self, tls: model.ListenerTLS, listener: str, alpn, client_cas, staple):
        self.min_version = _MIN_VERSIONS[tls.min_version]
        self.alpn = alpn
        self.client_cas = client_cas
        self.staple = staple
        self.session_id = hashlib.sha256(f"balance:{listener}".encode()).digest()[:32]


def _context(certificates, settings: _Settings) -> SSL.Context:
    context = SSL.Context(SSL.TLS_METHOD)
    context.set_options(_OPTIONS)
    context.set_mode(SSL.MODE_RELEASE_BUFFERS)
    context.set_min_proto_version(settings.min_version)
    context.set_cipher_list(TLS12_CIPHERS)
    if _lib.SSL_CTX_set_ciphersuites(context._context, TLS13_CIPHERSUITES) != 1:
        raise SSL.Error("OpenSSL refused the TLS 1.3 cipher suites")
    _install(context, certificates)
    # The same id context everywhere: a connection moved to another context
    # by SNI keeps the one its sessions were issued under.
    context.set_session_id(settings.session_id)
    if settings.alpn:
        _set_alpn(context, settings.alpn)
    if settings.client_cas:
        store = context.get_cert_store()
        for ca in settings.client_cas:
            store.add_cert(crypto.X509.from_cryptography(ca))
            context.add_client_ca(ca)
        context.set_verify(SSL.VERIFY_PEER | SSL.VERIFY_FAIL_IF_NO_PEER_CERT)
    if settings.staple is not None:
        context.set_ocsp_server_callback(_stapler(settings.staple))
    return context


def _der_items(der: bytes, start: int, end: int):
    """The (tag, content start, content end) of each DER element in C{der[start:end]}."""
    i = start
    while i + 2 <= end:
        tag = der[i]
        length = der[i + 1]
        i += 2
        if length & 0x80:
            size = length & 0x7F
            length = int.from_bytes(der[i : i + size], "big")
            i += size
        yield tag, i, i + length
        i += length


def _pump(client: SSL.Connection, server: SSL.Connection) -> bool:
    """Move what each side wrote to the other; whether anything moved."""
    moved = False
    for source, sink in ((client, server), (server, client)):
        try:
            data = source.bio_read(65536)
        except SSL.WantReadError:
            continue
        sink.bio_write(data)
        moved = True
    return moved


def ticket_key_name(context: SSL.Context) -> bytes | None:
    """
    The name of the key C{context} encrypts session tickets with: the
    first 16 bytes of each ticket (OpenSSL's format), found by a handshake
    with itself in memory and the ticket it issues.

    :return: the name, or L{None} if no ticket came (tickets disabled).
    """
    client_context = SSL.Context(SSL.TLS_METHOD)
    client = SSL.Connection(client_context, None)
    client.set_connect_state()
    server = SSL.Connection(context, None)
    server.set_accept_state()
    # A listener that asks clients for a certificate (mTLS) must not
    # refuse this one, which has none.
    server.set_verify(SSL.VERIFY_NONE)
    try:
        for _ in range(8):
            for side in (client, server):
                try:
                    side.do_handshake()
                except SSL.WantReadError:
                    pass
            if not _pump(client, server):
                break
        # TLS 1.3 tickets come after the handshake: the client reads them.
        try:
            client.recv(1)
        except SSL.WantReadError:
            pass
    except SSL.Error:
        return None
    session = _lib.SSL_get_session(client._ssl)
    if session == _ffi.NULL:
        return None
    size = _lib.i2d_SSL_SESSION(session, _ffi.NULL)
    buffer = _ffi.new("unsigned char[]", size)
    _lib.i2d_SSL_SESSION(session, _ffi.new("unsigned char **", buffer))
    der = _ffi.buffer(buffer, size)[:]
    # SSL_SESSION_ASN1 (ssl/ssl_asn1.c): a SEQUENCE whose [10] EXPLICIT
    # element is the ticket, an OCTET STRING.
    for tag, start, end in _der_items(der, 0, len(der)):
        if tag != 0x30:
            continue
        for inner, s, e in _der_items(der, start, end):
            if inner == 0xAA:
                for octets, ts, te in _der_items(der, s, e):
                    if octets == 0x04 and te - ts > 16:
                        return der[ts : ts + 16]
    return None


class _Generation:
    """
    The contexts built from one reading of the files.  Connections keep
    the generation they started in; L{ServerTLS.reload} makes a new one.

    :ivar session: the session context (see the module docstring).
    :ivar previous: the session context before the last rotation, or
        L{None}.
    :ivar previous_key: the name of C{previous}'s ticket key, or L{None}.
    """

    def __init__(self, certificates, selection: Selection, settings: _Settings):
        self.certificates = certificates
        self.selection = selection
        self.settings = settings
        self.contexts = {
            group: _context([certificates[i] for i in group], settings)
            for group in selection.groups()
            if group != selection.default
        }
        self.session = self.new_session_context()
        self.previous: SSL.Context | None = None
        self.previous_key: bytes | None = None

    def rotate(self) -> None:
        """
        Issue tickets under new keys, keeping the current session context
        as the previous one (the one before goes).
        """
        key = ticket_key_name(self.session)
        self.previous = self.session if key is not None else None
        self.previous_key = key
        self.session = self.new_session_context()

    def new_session_context(self) -> SSL.Context:
        """A session context: fresh ticket keys and an empty cache."""
        selection, contexts = self.selection, self.contexts
        context = _context([self.certificates[i] for i in selection.default], self.settings)
        context.set_session_cache_mode(SSL.SESS_CACHE_SERVER)
        context.set_timeout(SESSION_TIMEOUT)
        default = selection.default
        if not contexts:
            # One group of certificates: whatever the name, the session
            # context answers, so no callback runs per handshake.
            return context

        def on_server_name(connection):
            name = connection.get_servername()
            if name is None:
                return
            group = selection.lookup(normalize_name(name))
            if group != default:
                connection.set_context(contexts[group])

        context.set_tlsext_servername_callback(on_server_name)
        return context


@implementer(IOpenSSLServerConnectionCreator)
class ServerTLS(Service):
    """
    The TLS side of one listener: give it to L{balance.tls.transport.wrap}
    with the listener's factory.  As a service (a child of the listener's
    service tree) it rotates the session-ticket keys and re-reads the OCSP
    response file on timers.

    :ivar listener: the listener's name.
    :ivar alpn: the ALPN protocols offered, in order of preference.
    :ivar handshakes: counts of finished handshakes by result
        (``"success"``, ``"failure"``); failures include clients that left
        before finishing.
    :ivar staple: the L{OCSPStaple}, or L{None}.
    :ivar previous_ticket_key: the name of the ticket key before the last
        rotation, while tickets under it are still accepted, else L{None}.
    """

    log = Logger()
    previous_ticket_key: bytes | None = None

    def __init__(
        self,
        listener: model.Listener,
        reactor,
        session_rotation: float = SESSION_ROTATION,
        ocsp_interval: float = OCSP_POLL_INTERVAL,
        http2: bool = False,
    ):
        """
        Read every file the listener's C{tls} names and build the contexts.

        :param listener: a validated listener with C{tls}.
        :param reactor: an L{IReactorTime}, for the timers and the time.
        :param session_rotation: seconds between ticket key rotations.
        :param ocsp_interval: seconds between checks of the OCSP file.
        :param http2: whether the listener serves HTTP/2 (so may offer
            C{h2} with ALPN); see L{offered_alpn}.
        :raise TLSError: if a file is missing or unusable.
        """
        if listener.tls is None:
            raise ValueError(f"listener {listener.name} has no tls")
        self.setName(f"tls:{listener.name}")
        self.listener = listener.name
        self._reactor = reactor
        self._session_rotation = session_rotation
        self._ocsp_interval = ocsp_interval
        self._loops: list[LoopingCall] = []
        self.handshakes = {"success": 0, "failure": 0}
        self._listener_model = listener
        self._http2 = http2
        self.alpn: tuple[bytes, ...] = ()
        self.staple: OCSPStaple | None = None
        self.tls = listener.tls
        self._generation = self._load(listener.tls)

    # IOpenSSLServerConnectionCreator

    def serverConnectionForTLS(self, protocol) -> SSL.Connection:
        """A connection for a new client, on the current session context."""
        return SSL.Connection(self._generation.session, None)

    def previous_connection(self) -> SSL.Connection | None:
        """
        A connection on the session context before the last rotation, for
        a client whose ClientHello names its ticket key
        (L{previous_ticket_key}); L{None} if there is none.
        """
        previous = self._generation.previous
        if previous is None:
            return None
        return SSL.Connection(previous, None)

    # Loading

    def _load(self, tls: model.ListenerTLS) -> _Generation:
        name = self.listener
        certificates = []
        for cert in tls.certificates:
            try:
                certificates.append(read_certificate(cert.cert, cert.key))
            except CertificateError as e:
                raise TLSError(f"listener {name}: {e}") from None
        default = 0
        if tls.default_certificate is not None:
            paths = [c.cert for c in tls.certificates]
            if tls.default_certificate not in paths:
                raise TLSError(
                    f"listener {name}: default_certificate {tls.default_certificate} "
                    "is not one of its certificates"
                )
            default = paths.index(tls.default_certificate)
        client_cas = ()
        if tls.client_ca is not None:
            try:
                client_cas = read_ca_bundle(tls.client_ca)
            except CertificateError as e:
                raise TLSError(f"listener {name}: {e}") from None
        staple = self.staple
        if tls.ocsp_staple is None:
            staple = None
        else:
            if staple is None or staple.path != tls.ocsp_staple:
                staple = OCSPStaple(tls.ocsp_staple, self._reactor, name)
            staple.refresh()
        if staple is not None and staple.serial is not None:
            if staple.serial not in {c.leaf.serial_number for c in certificates}:
                self.log.warn(
                    "listener {listener}: the OCSP response in {path} is about none of "
                    "its certificates (serial {serial:x}); it will not be stapled",
                    listener=name,
                    path=staple.path,
                    serial=staple.serial,
                )
        self._warn_expiry(certificates)
        alpn = offered_alpn(attrs.evolve(self._listener_model, tls=tls), self.log, self._http2)
        settings = _Settings(tls, name, alpn, client_cas, staple)
        try:
            generation = _Generation(certificates, select(certificates, default), settings)
        except SSL.Error as e:
            raise TLSError(f"listener {name}: OpenSSL refused the certificates: {e}") from None
        self.staple = staple
        self.alpn = alpn
        return generation

    def _warn_expiry(self, certificates) -> None:
        now = self._reactor.seconds()
        for c in certificates:
            expires = c.leaf.not_valid_after_utc.timestamp()
            if expires - now < 7 * 86400:
                self.log.warn(
                    "listener {listener}: certificate {path} {state} on {when}",
                    listener=self.listener,
                    path=c.cert_path,
                    state="expired" if expires <= now else "expires",
                    when=datetime.datetime.fromtimestamp(expires, datetime.UTC)
                    .date()
                    .isoformat(),
                )

    @property
    def certificates(self) -> tuple[LoadedCertificate, ...]:
        """The certificates in use, in configuration order."""
        return tuple(self._generation.certificates)

    def reload(self, tls: model.ListenerTLS | None = None) -> None:
        """
        Re-read the certificate, key, CA and OCSP files (of C{tls} if given,
        else of the current settings) and use them for new connections.
        Connections already open, or handshaking, keep what they started
        with.  Sessions and tickets issued before do not resume afterwards
        (the session context is new, as after L{rotate_session_keys}).

        :raise TLSError: if a file is unusable; the previous settings stay.
        """
        tls = self.tls if tls is None else tls
        self._generation = self._load(tls)
        # The previous session context holds the certificates read before:
        # a client whose ticket fails to resume there would get them.
        self.previous_ticket_key = None
        self.tls = tls
        self.log.info(
            "listener {listener}: TLS certificates reloaded ({count})",
            listener=self.listener,
            count=len(tls.certificates),
        )

    def rotate_session_keys(self) -> None:
        """
        Start issuing session tickets under new keys (and a new session
        cache); tickets under the keys until now keep resuming until the
        next rotation.  See the module docstring.
        """
        generation = self._generation
        generation.rotate()
        self.previous_ticket_key = generation.previous_key

    def refresh_staple(self) -> None:
        """Re-read the OCSP response file if it changed."""
        if self.staple is not None:
            self.staple.refresh()

    # IService

    def startService(self) -> None:
        """Start the ticket-key rotation and OCSP file timers."""
        super().startService()
        # The OCSP timer runs even without a staple: a reload may add one.
        loops = [
            (self.rotate_session_keys, self._session_rotation),
            (self.refresh_staple, self._ocsp_interval),
        ]
        for call, interval in loops:
            loop = LoopingCall(call)
            loop.clock = self._reactor
            loop.start(interval, now=False).addErrback(self._loop_failed)
            self._loops.append(loop)

    def stopService(self) -> None:
        """Stop the timers."""
        for loop in self._loops:
            if loop.running:
                loop.stop()
        self._loops = []
        return super().stopService()

    def _loop_failed(self, reason) -> None:
        self.log.failure("listener {listener}: TLS timer failed", reason, listener=self.listener)
