# -*- test-case-name: tests.tls -*-
"""
TLS: termination on listeners (certificates chosen by SNI, ALPN, session
resumption, OCSP stapling, client certificates, hot reload) and TLS towards
backends (verified with service-identity).
"""

from balance.tls.client import ClientTLS
from balance.tls.server import ServerTLS, TLSError
from balance.tls.transport import TLSListenerFactory, is_tls, peer_subject, wrap

__all__ = [
    "ClientTLS",
    "ServerTLS",
    "TLSError",
    "TLSListenerFactory",
    "is_tls",
    "peer_subject",
    "wrap",
]
