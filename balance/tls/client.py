# -*- test-case-name: tests.tls.test_client -*-
"""
TLS towards backends (a cluster's C{tls}): verify the backend's certificate
against the configured CA (or the system's trust store) and the expected
name with C{service-identity}, send SNI, present a client certificate if
configured.

One L{ClientTLS} per cluster reads the files once; it makes one connection
creator (one OpenSSL context) per backend host, and wraps each backend's
endpoint with TLS.
"""

from __future__ import annotations

from collections.abc import Sequence

from OpenSSL import SSL, crypto
from twisted.internet import ssl
from twisted.internet.abstract import isIPAddress, isIPv6Address
from twisted.internet.interfaces import (
    IOpenSSLClientConnectionCreator,
    IStreamClientEndpoint,
)
from twisted.logger import Logger
from zope.interface import implementer

from balance.config import model
from balance.tls.certs import CertificateError, read_ca_bundle, read_certificate
from balance.tls.server import TLSError
from balance.tls.transport import TLSClientFactory


@implementer(IOpenSSLClientConnectionCreator)
class _Unverified:
    """
    Connections that accept any backend certificate (C{verify: false}); SNI
    is still sent for DNS names.
    """

    def __init__(self, context: SSL.Context, server_name: str):
        self._context = context
        self._server_name = None
        if not (isIPAddress(server_name) or isIPv6Address(server_name)):
            self._server_name = server_name.encode("idna")

    def clientConnectionForTLS(self, protocol) -> SSL.Connection:
        connection = SSL.Connection(self._context, None)
        if self._server_name is not None:
            connection.set_tlsext_host_name(self._server_name)
        return connection


@implementer(IStreamClientEndpoint)
class TLSClientEndpoint:
    """
    An endpoint that connects with C{endpoint} and speaks TLS over it, as
    L{twisted.internet.endpoints.wrapClientTLS} does, but with an injected
    reactor.

    The Deferred of L{connect} fires once the TCP connection is made, with
    the protocol C{factory} built; bytes it writes before the handshake
    finishes are sent once it has.  A backend that fails verification is
    disconnected: the protocol's C{connectionLost} gets the reason.
    """

    def __init__(self, creator, endpoint: IStreamClientEndpoint, reactor):
        self._creator = creator
        self._endpoint = endpoint
        self._reactor = reactor

    def connect(self, factory):
        """Connect; see L{IStreamClientEndpoint.connect}."""
        tls_factory = TLSClientFactory(self._creator, factory, self._reactor)
        d = self._endpoint.connect(tls_factory)
        d.addCallback(_connected)
        return d


def _connected(tls_protocol):
    return tls_protocol.wrappedProtocol


class ClientTLS:
    """
    The TLS settings of one cluster's backend connections, loaded once.

    :ivar cluster: the cluster's name.
    :ivar verify: whether backend certificates are verified.
    :ivar server_name: the configured C{sni}, or L{None} for each backend's
        host.
    """

    log = Logger()

    def __init__(
        self, tls: model.UpstreamTLS, cluster: str, reactor, alpn: Sequence[bytes] = ()
    ):
        """
        Read the CA and client certificate files.

        :param tls: the cluster's validated C{tls}.
        :param cluster: the cluster's name, for messages.
        :param reactor: the reactor connections are made with.
        :param alpn: ALPN protocols to offer backends, in order of
            preference (for example C{(b"http/1.1",)} for HTTP clusters);
            none by default.
        :raise TLSError: if a file is missing or unusable.
        """
        self.cluster = cluster
        self.verify = tls.verify
        self.server_name = tls.sni
        self._reactor = reactor
        self._alpn = list(alpn)
        self._creators: dict[str, object] = {}
        try:
            cas = read_ca_bundle(tls.ca) if tls.ca is not None else ()
            client = None
            if tls.client_cert is not None:
                client = read_certificate(tls.client_cert, tls.client_key or tls.client_cert)
        except CertificateError as e:
            raise TLSError(f"cluster {cluster}: {e}") from None
        self._client = client
        if cas:
            self._trust = ssl.trustRootFromCertificates(
                [ssl.Certificate(crypto.X509.from_cryptography(c)) for c in cas]
            )
        else:
            self._trust = ssl.platformTrust()
        if not self.verify:
            self.log.warn(
                "cluster {cluster}: tls.verify is false: backend certificates are NOT "
                "verified, so anyone on the path to the backends can impersonate them",
                cluster=cluster,
            )

    def _certificate_options(self) -> dict:
        options = {"raiseMinimumTo": ssl.TLSVersion.TLSv1_2}
        client = self._client
        if client is not None:
            options["privateKey"] = crypto.PKey.from_cryptography_key(client.key)
            options["certificate"] = crypto.X509.from_cryptography(client.leaf)
            options["extraCertChain"] = [crypto.X509.from_cryptography(c) for c in client.chain[1:]]
        return options

    def _unverified_context(self) -> SSL.Context:
        context = SSL.Context(SSL.TLS_METHOD)
        context.set_min_proto_version(SSL.TLS1_2_VERSION)
        context.set_options(SSL.OP_NO_COMPRESSION | SSL.OP_NO_RENEGOTIATION)
        context.set_verify(SSL.VERIFY_NONE)
        client = self._client
        if client is not None:
            context.use_certificate(client.leaf)
            context.use_privatekey(client.key)
            for c in client.chain[1:]:
                context.add_extra_chain_cert(c)
        if self._alpn:
            context.set_alpn_protos(self._alpn)
        return context

    def creator(self, host: str):
        """
        The connection creator for backend C{host}: it sends C{sni} (else
        C{host}, when it is a DNS name) and, unless C{verify} is false,
        checks that the certificate chains to the trusted CAs and names
        C{sni} (else C{host}: a DNS name, or an IP address in the
        certificate's IP SANs).  Made once per host.
        """
        name = self.server_name or host
        creator = self._creators.get(name)
        if creator is None:
            if self.verify:
                creator = ssl.optionsForClientTLS(
                    name,
                    trustRoot=self._trust,
                    acceptableProtocols=self._alpn or None,
                    extraCertificateOptions=self._certificate_options(),
                )
            else:
                creator = _Unverified(self._unverified_context(), name)
            self._creators[name] = creator
        return creator

    def wrap(self, endpoint: IStreamClientEndpoint, host: str) -> IStreamClientEndpoint:
        """
        Speak TLS over C{endpoint}, which connects to backend C{host}.

        :param endpoint: the plain TCP endpoint of the backend.
        :param host: the backend's host name or IP address, as configured.
        """
        return TLSClientEndpoint(self.creator(host), endpoint, self._reactor)

