# -*- test-case-name: tests.tls.test_server -*-
"""
TLS on a listener's connections: Twisted's memory-BIO TLS layer around the
listener's own factory, counting handshakes and passing drain and abort on
to the factory it wraps; and what the proxy asks a TLS connection
(L{peer_subject}).
"""

from __future__ import annotations

from OpenSSL._util import ffi as _ffi
from OpenSSL._util import lib as _lib
from OpenSSL.SSL import Error, WantReadError, ZeroReturnError
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IHandshakeListener
from twisted.internet.main import CONNECTION_LOST
from twisted.internet.protocol import Protocol
from twisted.protocols.policies import ProtocolWrapper
from twisted.protocols.tls import TLSMemoryBIOFactory, TLSMemoryBIOProtocol
from twisted.python.failure import Failure
from zope.interface import implementer

from balance import _io
from balance.interfaces import IDrainable
from balance.tls.server import ServerTLS

# Out-parameter of BIO_get_mem_data, which _flushSendBIO only uses for the
# length it returns (the reactor is single-threaded).
_PENDING = _ffi.new("char **")

# Where _flushSendBIO copies what OpenSSL wrote, before it becomes bytes.
_SEND_BUFFER_SIZE = 65536
_SEND_BUFFER = _ffi.new("char[]", _SEND_BUFFER_SIZE)

# Where _flushReceiveBIO has OpenSSL decrypt a record (16 KiB at most).
_RECEIVE_BUFFER_SIZE = 32768
_RECEIVE_BUFFER = _ffi.new("char[]", _RECEIVE_BUFFER_SIZE)

_BIO_pending = _lib.BIO_get_mem_data
_BIO_read = _lib.BIO_read
_BIO_write = _lib.BIO_write
_SSL_do_handshake = _lib.SSL_do_handshake
_SSL_get_error = _lib.SSL_get_error
_SSL_pending = _lib.SSL_pending
_SSL_read = _lib.SSL_read
_SSL_set_accept_state = _lib.SSL_set_accept_state
_WANT_READ = _lib.SSL_ERROR_WANT_READ

#: Seconds a connection may stay silent after Balance sent its close_notify
#: and FIN, waiting for the peer to close its side, before it is aborted.
#: Each read from the peer restarts the wait (as nginx's lingering_timeout).
LINGER_TIMEOUT = 5.0


class TLSProtocol(TLSMemoryBIOProtocol):
    """
    One connection's TLS layer, client or server.  Compared with Twisted's:

      - the socket gets C{TCP_NODELAY}, and TLS records go straight to the
        socket when nothing is queued (see L{balance._io}), which saves two
        C{epoll_ctl} calls and a loop turn per flight;
      - closing sends close_notify and a FIN at once, instead of waiting,
        with the socket open, for the peer's close_notify (which an idle
        peer may never send); the peer may still send until it closes, as
        long as it is not silent for L{LINGER_TIMEOUT} seconds;
      - the wrapper does not copy the socket transport's interfaces onto
        itself (a per-connection C{zope.interface} declaration Balance does
        not use).

    Application writes are not batched per reactor turn (as Twisted's
    default L{BufferingTLSTransport} does with a timer per write): Balance's
    protocols already write whole responses and whole relayed reads.
    """

    _direct = False
    _linger = None
    # The PROXY layer's addresses live on the socket transport, never on
    # the TLS layer; without these, each lookup on the TLS layer (one per
    # connection, in client_address) goes through ProtocolWrapper's
    # __getattr__ and an AttributeError.
    balance_proxied_source = None
    balance_proxied_destination = None

    def makeConnection(self, transport):
        # TLSMemoryBIOProtocol.makeConnection and ProtocolWrapper's, minus
        # their directlyProvides calls and their second registration.
        self._tlsConnection = self.factory._creatorCallable(self)
        self._appSendBuffer = []
        if _io.can_send_directly(transport):
            self._direct = True
            transport.setTcpNoDelay(True)
            # The TLS layer is not an IHalfCloseableProtocol, so a FIN from
            # the peer ends the connection: Twisted's readConnectionLost
            # finds that out by a zope adaptation (hooks, registry lookup)
            # on every close; go straight to what it would call.
            transport.readConnectionLost = transport.connectionLost
        Protocol.makeConnection(self, transport)
        self.factory.registerProtocol(self)
        self.wrappedProtocol.makeConnection(self)
        # A client speaks first (its ClientHello); a listener's connection
        # (_ServerTLSProtocol) waits for it.
        self._checkHandshakeStatus()

    def dataReceived(self, data):
        linger = self._linger
        if linger is not None and linger.active():
            linger.reset(LINGER_TIMEOUT)
        # TLSMemoryBIOProtocol.dataReceived, with the bytes handed to
        # OpenSSL's memory BIO directly.
        connection = self._tlsConnection
        if _BIO_write(connection._into_ssl, data, len(data)) != len(data):
            # Out of memory: pyOpenSSL raises what it would have.
            connection.bio_write(data)
        if not self._handshakeDone:
            self._checkHandshakeStatus()
            if not self._handshakeDone:
                return
        if self._appSendBuffer:
            self._unbufferPendingWrites()
        self._flushReceiveBIO()

    def _flushReceiveBIO(self):
        # Twisted's loop, with OpenSSL asked directly: pyOpenSSL's recv
        # allocates a 32 KiB buffer per call and ends every loop by raising
        # WantReadError once the records are read.  Errors (the peer's
        # close_notify included) take Twisted's way, through the exception
        # pyOpenSSL makes of them.
        connection = self._tlsConnection
        ssl = connection._ssl
        while not self._lostTLSConnection:
            result = _SSL_read(ssl, _RECEIVE_BUFFER, _RECEIVE_BUFFER_SIZE)
            if result > 0:
                if not self._aborted:
                    ProtocolWrapper.dataReceived(self, _ffi.buffer(_RECEIVE_BUFFER, result)[:])
                continue
            if _SSL_get_error(ssl, result) == _WANT_READ:
                break
            try:
                connection._raise_ssl_error(ssl, result)
            except ZeroReturnError:
                # TLS has shut down: no more TLS data on this connection.
                self._shutdownTLS()
                self._tlsShutdownFinished(None)
            except Error:
                self._tlsShutdownFinished(Failure())
            else:
                break
        self._flushSendBIO()

    def _flushSendBIO(self):
        connection = self._tlsConnection
        if connection is None:
            # Closing the socket after a half-close ends the connection at
            # once (connectionLost has run); nothing is left to send.
            return
        if self._direct and not self.transport.connected:
            # The socket is closed (say in connectionLost, after OpenSSL
            # wrote an alert about the EOF): the transport would drop the
            # bytes anyway, so do not copy them out.
            return
        # Ask the memory BIO how much it holds instead of letting bio_read
        # fail with WantReadError (an exception, and a 32 KiB buffer, per
        # empty read: several per handshake).
        source = connection._from_ssl
        pending = _BIO_pending(source, _PENDING)
        if pending <= 0:
            return
        if pending > _SEND_BUFFER_SIZE:
            data = connection.bio_read(pending)
        else:
            # BIO_read of a memory BIO with bytes in it cannot fail.
            data = _ffi.buffer(_SEND_BUFFER, _BIO_read(source, _SEND_BUFFER, pending))[:]
        if self._direct:
            # A reset found by the read side ends the connection as well:
            # the TLS layer reports either as ConnectionLost.
            _io.send(self.transport, data, reset_read=True)
        else:
            self.transport.write(data)

    def _shutdownTLS(self):
        try:
            both = self._tlsConnection.shutdown()
        except Error:
            both = False
        self._flushSendBIO()
        if both or self._aborted:
            # The peer's close_notify came first (or this is an abort,
            # which closes the socket itself).
            if not self._aborted:
                self.transport.loseConnection()
            return
        self.transport.loseWriteConnection()
        if self._linger is None:
            self._linger = self.factory._clock.callLater(
                LINGER_TIMEOUT, self.transport.abortConnection
            )

    def connectionLost(self, reason):
        if self._linger is not None:
            if self._linger.active():
                self._linger.cancel()
            self._linger = None
        super().connectionLost(reason)


class _ServerTLSProtocol(TLSProtocol):
    """
    A client's TLS layer on a listener; counts how its handshake ended.

    Its handshake takes the shortest way through pyOpenSSL and Twisted's
    layer, which a handshake-only client (a new connection per request, a
    health check) pays for in full on every connection: OpenSSL is asked
    directly whether it needs more bytes (rather than through a raised and
    caught C{WantReadError}), nothing is read back after the handshake
    unless bytes are left to read, and a connection that ends with nothing
    left to read skips the read that would only find the end.
    """

    def makeConnection(self, transport):
        # TLSProtocol.makeConnection for a listener's connection: the
        # factory's creator called directly rather than through Twisted's
        # compatibility wrapper, and no registration with the TLS factory
        # (the wrapped factory keeps track of connections, for drain and
        # limits).
        connection = self._tlsConnection = self.factory.tls.serverConnectionForTLS(self)
        _SSL_set_accept_state(connection._ssl)
        connection._app_data = self
        self._appSendBuffer = []
        self.transport = transport
        self.connected = 1
        direct = _io.can_send_directly(transport)
        if direct:
            self._direct = True
            if not getattr(transport.server, "balance_nodelay", False):
                transport.setTcpNoDelay(True)
            transport.readConnectionLost = transport.connectionLost
            # Close without shutdown(2) first: the descriptor is this
            # process's only one (close-on-exec, never spliced or handed
            # on), so close(2) alone sends the FIN; one system call less.
            transport._shouldShutdown = False
        self.wrappedProtocol.makeConnection(self)
        if direct and transport.server.factory is self.factory:
            # The ClientHello is nearly always in the socket by the time the
            # connection is accepted: read it now rather than after another
            # turn of the reactor (an epoll_wait and a dispatch per
            # handshake).  The reactor's own read handler does it, so a
            # read error, an EOF or an exception end the connection exactly
            # as they would on the next turn; an empty socket costs one
            # recv that fails with EAGAIN.
            # Not behind a PROXY header: this layer is then made while that
            # header's read is handled, and the bytes that came with the
            # header must reach it before any read now.
            # Only Twisted's epoll and poll reactors (their _PollLikeMixin)
            # have this handler; others read on the next turn as before.
            reactor = transport.reactor
            poll_in = getattr(reactor, "_POLL_IN", None)
            if poll_in is not None:
                reactor._doReadOrWrite(transport, transport.fileno(), poll_in)

    #: Whether the ClientHello was looked at for a previous ticket key.
    _hello_checked = False
    #: The start of a ClientHello held until its first record is whole.
    _hello = b""

    def dataReceived(self, data):
        if self._handshakeDone:
            TLSProtocol.dataReceived(self, data)
            return
        tls = self.factory.tls
        if not self._hello_checked and (tls.previous_ticket_key is not None or self._hello):
            data = self._check_hello(tls, data)
            if data is None:
                return
        connection = self._tlsConnection
        if _BIO_write(connection._into_ssl, data, len(data)) != len(data):
            # Out of memory: pyOpenSSL raises what it would have.
            connection.bio_write(data)
        self._checkHandshakeStatus()
        if not self._handshakeDone:
            return
        if self._appSendBuffer:
            self._unbufferPendingWrites()
        if _BIO_pending(connection._into_ssl, _PENDING) > 0 or _SSL_pending(connection._ssl) > 0:
            # The client's first request came with its last handshake
            # message.
            self._flushReceiveBIO()
        else:
            # What the handshake's end wrote (TLS 1.3 session tickets).
            self._flushSendBIO()

    def _check_hello(self, tls, data: bytes) -> bytes | None:
        """
        Move this connection to the session context before the last key
        rotation when its ClientHello offers a ticket issued there (the
        key's name begins every ticket), so that the ticket resumes.

        :return: the bytes to feed OpenSSL now, or L{None} to wait for the
            rest of the ClientHello's first record.
        """
        if self._hello:
            data = self._hello + data
        if data[:1] == b"\x16":
            # A handshake record: hold it until whole (the ticket is in
            # the ClientHello's last extension), up to the largest record.
            whole = len(data) >= 5 and len(data) >= 5 + int.from_bytes(data[3:5], "big")
            if not whole and len(data) < 5 + 16384 + 256:
                self._hello = data
                return None
        self._hello = b""
        self._hello_checked = True
        key = tls.previous_ticket_key
        if key is not None and key in data:
            connection = tls.previous_connection()
            if connection is not None:
                _SSL_set_accept_state(connection._ssl)
                connection._app_data = self
                self._tlsConnection = connection
        return data

    def _checkHandshakeStatus(self):
        # Twisted calls this only while the handshake is in progress, and
        # Balance's server side only from dataReceived.
        if self._aborted:
            return
        connection = self._tlsConnection
        ssl = connection._ssl
        result = _SSL_do_handshake(ssl)
        if result == 1:
            self._handshakeDone = True
            self.factory.tls.handshakes["success"] += 1
            if IHandshakeListener.providedBy(self.wrappedProtocol):
                self.wrappedProtocol.handshakeCompleted()
            return
        if _SSL_get_error(ssl, result) == _WANT_READ:
            self._flushSendBIO()
            return
        # A failed handshake: pyOpenSSL turns it into the exception (with
        # any raised by a callback) that Twisted's layer expects.
        try:
            connection._raise_ssl_error(ssl, result)
        except WantReadError:
            self._flushSendBIO()
        except Error:
            self._tlsShutdownFinished(Failure())

    def connectionLost(self, reason):
        if not self._handshakeDone:
            self.factory.tls.handshakes["failure"] += 1
        elif not self._lostTLSConnection:
            connection = self._tlsConnection
            if (
                _BIO_pending(connection._into_ssl, _PENDING) <= 0
                and _SSL_pending(connection._ssl) <= 0
            ):
                # Nothing left to read: Twisted's layer would read only to
                # find the end of the stream without the client's
                # close_notify, which it reports as ConnectionLost.
                self._lostTLSConnection = True
                if self._reason is None:
                    self._reason = Failure(CONNECTION_LOST)
        TLSProtocol.connectionLost(self, reason)


class TLSClientFactory(TLSMemoryBIOFactory):
    """
    TLS towards a backend, with the connection behaviour of L{TLSProtocol}.

    :param creator: an L{IOpenSSLClientConnectionCreator}.
    :param wrapped_factory: the factory of the protocol spoken over TLS.
    :param reactor: an L{IReactorTime}.
    """

    protocol = TLSProtocol

    def __init__(self, creator, wrapped_factory, reactor):
        super().__init__(creator, True, wrapped_factory, clock=reactor)


@implementer(IDrainable)
class TLSListenerFactory(TLSMemoryBIOFactory):
    """
    A listener factory with TLS: each accepted connection gets a TLS layer
    (contexts from a L{ServerTLS}) in front of the protocol the wrapped
    factory builds.

    It is L{IDrainable} when the wrapped factory is, so that the listener
    service drains and aborts through it.

    :ivar tls: the L{ServerTLS}.
    """

    protocol = _ServerTLSProtocol

    def __init__(self, tls: ServerTLS, wrapped_factory, reactor):
        """
        :param tls: the listener's TLS contexts.
        :param wrapped_factory: the listener's own factory (HTTP or L4).
        :param reactor: the clock that paces the TLS layer's write batching.
        """
        super().__init__(tls, False, wrapped_factory, clock=reactor)
        self.tls = tls

    def registerProtocol(self, protocol) -> None:
        """Nothing: the wrapped factory keeps track of connections."""

    def unregisterProtocol(self, protocol) -> None:
        """Nothing: see L{registerProtocol}."""

    def buildProtocol(self, addr):
        """
        Wrap the protocol the wrapped factory builds, or refuse the
        connection (L{None}) when it refuses (say, beyond
        C{max_connections}).
        """
        inner = self.wrappedFactory.buildProtocol(addr)
        if inner is None:
            return None
        return self.protocol(self, inner)

    @property
    def active(self) -> int:
        """The wrapped factory's count of open connections."""
        return self.wrappedFactory.active

    def drain(self) -> Deferred:
        """Drain the wrapped factory; see L{IDrainable.drain}."""
        return self.wrappedFactory.drain()

    def abort_all(self) -> None:
        """Abort the wrapped factory's connections; see L{IDrainable.abort_all}."""
        self.wrappedFactory.abort_all()


def wrap(tls: ServerTLS, factory, reactor) -> TLSListenerFactory:
    """
    Put TLS in front of a listener's C{factory}.

    :param tls: the listener's L{ServerTLS}.
    :param factory: the listener's factory (L{balance.http.server.HTTPFactory}
        or L{balance.l4.relay.L4ProxyFactory}).
    :param reactor: an L{IReactorTime}.
    """
    return TLSListenerFactory(tls, factory, reactor)


def is_tls(transport) -> bool:
    """Whether C{transport} is a TLS layer (rather than a plain socket)."""
    return isinstance(transport, TLSMemoryBIOProtocol)


def _escape(subject: str) -> str:
    # RFC 4514 leaves control and non-ASCII characters as they are; a header
    # value must not carry them (CR/LF would split the header).  Escape them
    # as RFC 4514 hex pairs of their UTF-8 bytes, which parsers read back.
    if subject.isascii() and subject.isprintable():
        return subject
    out = []
    for char in subject:
        if char.isascii() and char.isprintable():
            out.append(char)
        else:
            out.extend(f"\\{byte:02X}" for byte in char.encode("utf-8"))
    return "".join(out)


def peer_subject(transport) -> str | None:
    """
    The subject of the client certificate of a TLS connection, as an RFC
    4514 string (C{"CN=alice,O=Example"}), with control and non-ASCII
    characters hex-escaped so that it is safe in an HTTP header.

    A listener with C{client_ca} only finishes handshakes with clients whose
    certificate verified, so on such a listener the subject is a verified
    one.  Call it once per connection, after the handshake (for example
    when the first request arrives), and keep the result.

    :param transport: a protocol's transport.
    :return: the subject, or L{None} for a plain TCP connection, a TLS
        connection without a client certificate, or a handshake not finished.
    """
    if not isinstance(transport, TLSMemoryBIOProtocol):
        return None
    connection = transport.getHandle()
    if connection is None:
        return None
    cert = connection.get_peer_certificate(as_cryptography=True)
    if cert is None:
        return None
    return _escape(cert.subject.rfc4514_string())
