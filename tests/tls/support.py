"""
Shared pieces of the TLS tests: certificates made once per test run (keys
are generated in memory, and written only into each test's temporary
directory), an in-memory TLS client driven against a listener's TLS
factory, and running external tools (openssl, curl, testssl.sh) without
blocking the reactor.
"""

from __future__ import annotations

import os
from functools import cache
from pathlib import Path

from OpenSSL import SSL
from twisted.internet import reactor
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred, succeed
from twisted.internet.protocol import ProcessProtocol, Protocol
from twisted.internet.testing import StringTransport

from balance.config import model
from balance.tls.testing import CA, Issued
from tests.helpers import need_tool


@cache
def pki() -> dict[str, object]:
    """
    The certificates every TLS test uses, made once: a CA with an
    intermediate, leaves for example.com (ECDSA and RSA, with wildcard),
    api.test, a client CA and client certificates.
    """
    ca = CA("Balance Test CA", intermediate=True)
    other_ca = CA("Some Other CA")
    client_ca = CA("Balance Client CA")
    rsa_ca = CA("Balance RSA CA", intermediate=True)
    return {
        "ca": ca,
        "other_ca": other_ca,
        "client_ca": client_ca,
        "site_ec": ca.issue(["example.com", "*.example.com"], key_type="ecdsa"),
        "site_rsa": ca.issue(["example.com", "*.example.com"], key_type="rsa"),
        "rsa_ca": rsa_ca,
        "site_rsa_own_chain": rsa_ca.issue(["example.com", "*.example.com"], key_type="rsa"),
        "api": ca.issue(["api.test"], key_type="ecdsa"),
        "api2": ca.issue(["api.test"], key_type="ecdsa"),
        "exact": ca.issue(["www.example.com"], key_type="ecdsa"),
        "localhost": ca.issue(["localhost"], key_type="ecdsa", ips=["127.0.0.1"]),
        "alice": client_ca.issue(
            [], common_name="alice", organization="Example, Inc.", client=True
        ),
        "mallory": other_ca.issue([], common_name="mallory", client=True),
    }


def write(directory, name: str) -> model.Certificate:
    """Write certificate C{name} of L{pki} (chain and key) into C{directory}."""
    issued: Issued = pki()[name]
    cert, key = issued.write(directory, name)
    return model.Certificate(cert=cert, key=key)


def write_ca(directory, name: str = "ca") -> str:
    """Write the root of CA C{name} of L{pki}; return its path."""
    return pki()[name].write_cert(Path(directory) / f"{name}.pem")


def listener(tls: model.ListenerTLS, protocol: str = "http", name: str = "web") -> model.Listener:
    """A listener model with C{tls}."""
    return model.Listener(
        name=name, listen="tcp:0", protocol=protocol, cluster="c", tls=tls
    )


# -- an in-memory client ------------------------------------------------------


class Recorder(Protocol):
    """The listener's own protocol: records what it gets."""

    def __init__(self):
        self.data = b""
        self.lost = None
        self.made = False

    def connectionMade(self):
        self.made = True

    def dataReceived(self, data):
        self.data += data

    def connectionLost(self, reason):
        self.lost = reason


class RecordingFactory:
    """A listener factory double, L{balance.interfaces.IDrainable} like the real ones."""

    def __init__(self):
        self.built: list[Recorder] = []
        self.refuse = False
        self.drained = False
        self.aborted = False

    def buildProtocol(self, addr):
        if self.refuse:
            return None
        p = Recorder()
        self.built.append(p)
        return p

    def doStart(self):
        pass

    def doStop(self):
        pass

    @property
    def active(self):
        return len(self.built)

    def drain(self):
        self.drained = True
        return succeed(None)

    def abort_all(self):
        self.aborted = True


class SocketLikeTransport(StringTransport):
    """A StringTransport with the half-close a TCP transport has."""

    write_closed = False

    def loseWriteConnection(self):
        self.write_closed = True


def client_context(
    ca: str | None = None,
    min_version: int | None = None,
    max_version: int | None = None,
    ciphers: bytes | None = None,
    alpn=(),
    cert: Issued | None = None,
) -> SSL.Context:
    """A pyOpenSSL client context; verifies the server if C{ca} is given."""
    ctx = SSL.Context(SSL.TLS_METHOD)
    if ca is not None:
        ctx.load_verify_locations(ca)
        ctx.set_verify(SSL.VERIFY_PEER)
    if min_version is not None:
        ctx.set_min_proto_version(min_version)
    if max_version is not None:
        ctx.set_max_proto_version(max_version)
    if ciphers is not None:
        ctx.set_cipher_list(ciphers)
    if alpn:
        ctx.set_alpn_protos(list(alpn))
    if cert is not None:
        ctx.use_certificate(cert.cert)
        ctx.use_privatekey(cert.key)
        for c in cert.chain:
            ctx.add_extra_chain_cert(c)
    # Reading the tickets of TLS 1.3 needs a session cache on the client.
    ctx.set_session_cache_mode(SSL.SESS_CACHE_CLIENT)
    return ctx


class Handshake:
    """
    A pyOpenSSL client talking to a protocol of a listener's TLS factory
    through memory, both ways, until nothing moves.

    :ivar client: the client L{SSL.Connection}.
    :ivar protocol: the server-side TLS protocol.
    :ivar inner: the listener's own protocol under it (a L{Recorder}).
    :ivar error: the client's L{SSL.Error} if the handshake failed.
    """

    def __init__(self, factory, context: SSL.Context, server_name=None, session=None,
                 ocsp: bool = False, chunk: int | None = None):
        self.chunk = chunk
        self.client = SSL.Connection(context, None)
        self.client.set_connect_state()
        if server_name is not None:
            self.client.set_tlsext_host_name(server_name.encode())
        if session is not None:
            self.client.set_session(session)
        if ocsp:
            self.client.request_ocsp()
        self.transport = SocketLikeTransport(
            peerAddress=IPv4Address("TCP", "192.0.2.1", 40000)
        )
        self.protocol = factory.buildProtocol(self.transport.getPeer())
        self.inner = self.protocol.wrappedProtocol
        self.protocol.makeConnection(self.transport)
        self.error: SSL.Error | None = None
        self.done = False
        self.pump()

    def pump(self) -> None:
        """Move bytes both ways until neither side has any to send."""
        for _ in range(50):
            moved = False
            if not self.done and self.error is None:
                try:
                    self.client.do_handshake()
                    self.done = True
                except SSL.WantReadError:
                    pass
                except SSL.Error as e:
                    self.error = e
            while True:
                try:
                    out = self.client.bio_read(65536)
                except SSL.WantReadError:
                    break
                if self.transport.disconnecting:
                    break
                moved = True
                step = self.chunk or len(out)
                for i in range(0, len(out), step):
                    self.protocol.dataReceived(out[i : i + step])
            back = self.transport.value()
            if back:
                self.transport.clear()
                moved = True
                self.client.bio_write(back)
                if self.done:
                    try:
                        self.received += self.client.recv(65536)
                    except (SSL.WantReadError, SSL.ZeroReturnError):
                        pass
                    except SSL.Error as e:
                        self.error = e
            if not moved:
                return

    received = b""

    def send(self, data: bytes) -> None:
        """The client sends application data."""
        self.client.send(data)
        self.pump()

    @property
    def certificate(self):
        """The server's certificate, a C{cryptography} object."""
        return self.client.get_peer_certificate(as_cryptography=True)

    @property
    def chain(self):
        return self.client.get_peer_cert_chain(as_cryptography=True)


# -- external tools -----------------------------------------------------------


def require(tool: str, *aliases: str) -> str:
    """The path of C{tool} or an alias; see L{tests.helpers.need_tool}."""
    return need_tool(tool, aliases=aliases)


class _Run(ProcessProtocol):
    def __init__(self, stdin: bytes, done: Deferred):
        self.stdin = stdin
        self.out = bytearray()
        self.done = done

    def connectionMade(self):
        if self.stdin:
            self.transport.write(self.stdin)
        self.transport.closeStdin()

    def outReceived(self, data):
        self.out += data

    errReceived = outReceived

    def processEnded(self, reason):
        self.done.callback((reason.value.exitCode, self.out.decode("utf-8", "replace")))


def run(argv: list[str], stdin: bytes = b"", timeout: float = 30.0, path=None) -> Deferred:
    """
    Run C{argv} without blocking the reactor (Balance runs in it).

    :return: a Deferred firing with C{(exit status, stdout + stderr)}; the
        process is killed after C{timeout} seconds.
    """
    done = Deferred()
    proto = _Run(stdin, done)
    process = reactor.spawnProcess(proto, argv[0], argv, env=dict(os.environ), path=path)

    def kill():
        if not done.called:
            process.signalProcess("KILL")

    call = reactor.callLater(timeout, kill)

    def finished(result):
        if call.active():
            call.cancel()
        return result

    return done.addBoth(finished)
