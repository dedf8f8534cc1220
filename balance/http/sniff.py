# -*- test-case-name: tests.http.test_h2_sniff -*-
"""
Choosing HTTP/1.1 or HTTP/2 for each connection of an HTTP listener.

Over TLS, ALPN decides: the handshake is over when the first bytes arrive,
and C{transport.negotiatedProtocol} says C{b"h2"} or C{b"http/1.1"}.  On a
cleartext listener (or TLS without ALPN) a client that knows the server
speaks HTTP/2 ("prior knowledge", C{curl --http2-prior-knowledge}, h2load,
gRPC) starts with the 24-byte connection preface
C{PRI * HTTP/2.0\\r\\n\\r\\nSM\\r\\n\\r\\n}.  The sniffer buffers until the
bytes so far confirm the preface or refute it, whatever the segmentation:
an HTTP/1.1 request refutes it at its first byte (at its second for
C{POST}, C{PUT} and C{PATCH}).

Until then the connection is an HTTP/1.1 one (made when it is accepted, so
it is counted, timed out and drained as any other).  Once decided, the
chosen protocol replaces the sniffer on the transport, so the sniffer costs
nothing after the first read.
"""

from __future__ import annotations

from twisted.internet.protocol import Protocol

from balance.http.h1 import DownstreamConnection
from balance.http.h2 import H2DownstreamConnection, H2Options
from balance.http.h2_guard import PREFACE

__all__ = ["HTTPProtocols", "ProtocolSniffer"]

_PREFACE_SIZE = len(PREFACE)


class HTTPProtocols:
    """
    The protocol of each connection of one HTTP listener: the HTTP/1.1 one,
    or a L{ProtocolSniffer} when the listener may speak HTTP/2.

    Cleartext listeners accept h2c with prior knowledge; TLS listeners
    speak HTTP/2 when ALPN chose C{h2} (so when their C{tls.alpn} lists it).

    :param ctx: the listener's L{balance.http.server.HTTPContext}.
    :ivar h2_options: the listener's L{H2Options}, or L{None} without HTTP/2.
    """

    def __init__(self, ctx):
        self.ctx = ctx
        tls = ctx.listener.tls
        self.h2_enabled = tls is None or "h2" in tls.alpn
        self.h2_options = H2Options(ctx) if self.h2_enabled else None

    def build(self) -> Protocol:
        """A protocol for a new connection."""
        if self.h2_options is None:
            return DownstreamConnection(self.ctx)
        return ProtocolSniffer(self.ctx, self.h2_options)


class ProtocolSniffer(Protocol):
    """
    The protocol of a connection until its first bytes (or ALPN) say which
    HTTP it speaks; then the chosen protocol takes its place on the
    transport and gets every byte so far.

    :ivar chosen: the protocol chosen, or L{None} while undecided.
    """

    # It lives as long as an idle connection that never sent a byte.
    __slots__ = ("transport", "connected", "ctx", "_options", "_h1", "_buffer", "chosen")

    def __init__(self, ctx, h2_options: H2Options):
        self.ctx = ctx
        self._options = h2_options
        self._h1 = None
        self._buffer = b""
        self.chosen = None

    def connectionMade(self):
        # The HTTP/1.1 protocol stands for the connection while undecided:
        # it counts it, applies the ACL, times out a silent client and
        # closes it on drain.
        self._h1 = DownstreamConnection(self.ctx)
        self._h1.makeConnection(self.transport)

    def dataReceived(self, data: bytes):
        chosen = self.chosen
        if chosen is not None:
            # Only reached by callers that kept a reference to the sniffer.
            chosen.dataReceived(data)
            return
        if self._buffer:
            data = self._buffer + data
            self._buffer = b""
        alpn = getattr(self.transport, "negotiatedProtocol", None)
        if alpn == b"h2":
            self._become_h2(data)
            return
        if alpn is None:
            seen = data[:_PREFACE_SIZE]
            if PREFACE.startswith(seen):
                if len(seen) < _PREFACE_SIZE:
                    self._buffer = data
                    return
                self._become_h2(data)
                return
        self._become(self._h1, data)

    def connectionLost(self, reason):
        protocol = self.chosen or self._h1
        if protocol is not None:
            protocol.connectionLost(reason)

    def _become_h2(self, data: bytes) -> None:
        h2conn = H2DownstreamConnection(self.ctx, self._options)
        h2conn.take_over(self._h1)
        h2conn.makeConnection(self.transport)
        self._become(h2conn, data)

    def _become(self, protocol, data: bytes) -> None:
        self.chosen = protocol
        self._h1 = None
        transport = self.transport
        # The transport calls its protocol by attribute on every read and on
        # connectionLost: a plain socket its "protocol", a TLS layer its
        # "wrappedProtocol".
        if getattr(transport, "protocol", None) is self:
            transport.protocol = protocol
        elif getattr(transport, "wrappedProtocol", None) is self:
            transport.wrappedProtocol = protocol
        if data:
            protocol.dataReceived(data)
