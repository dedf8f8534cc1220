# -*- test-case-name: tests.cluster.test_endpoint -*-
"""
Client endpoints to IP-literal backends that keep nothing but the
connection once it has connected.

C{TCP4ClientEndpoint.connect} goes through C{reactor.connectTCP}: a
C{Connector}, a wrapping factory, a wrapping protocol, its C{Deferred} and a
C{tcp.Client} carrying the connecting state all live as long as the
connection does (about a kilobyte on every idle proxied connection).  Here
the connect is a non-blocking C{connect(2)} watched by a small object
registered with the reactor while it is in flight; once the socket is
connected, it becomes a L{LeanClient<balance._io.LeanClient>} whose
protocol is the factory's own (no wrapper), and the rest is dropped.

What callers see is what Twisted's endpoints do: C{connect(factory)}
returns a L{Deferred} that fires with the protocol after its
C{makeConnection}, or fails with the same errors
(C{ConnectionRefusedError} and the other C{getConnectError} types,
L{TimeoutError} after the timeout, L{NoProtocol}, and
L{ConnectingCancelledError} when cancelled).  The factory's
C{doStart}/C{doStop} are not called.

On a reactor that is not a L{PosixReactorBase} (a test's
C{MemoryReactor}), or with a bind address, the endpoints connect as their
Twisted base classes do.
"""

from __future__ import annotations

import errno
import os
import socket

from twisted.internet import error, tcp
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.defer import Deferred, fail
from twisted.internet.endpoints import TCP4ClientEndpoint, TCP6ClientEndpoint
from twisted.internet.interfaces import IProtocolFactory
from twisted.internet.posixbase import PosixReactorBase
from twisted.python.failure import Failure

from balance._io import LeanClient

_IN_PROGRESS = frozenset({0, errno.EINPROGRESS, errno.EALREADY, errno.EWOULDBLOCK})


class _Connecting:
    """
    One connect in flight: the reactor's C{IWriteDescriptor} of the socket
    until it is connected (writable) or has failed.
    """

    __slots__ = (
        "_reactor",
        "_factory",
        "_socket",
        "_fd",
        "_address",
        "_type",
        "_timer",
        "result",
        "__weakref__",
    )

    def __init__(self, reactor, factory, family, address, address_type, timeout):
        self._reactor = reactor
        self._factory = factory
        self._address = address
        self._type = address_type
        self._timer = None
        self.result = Deferred(self._cancel)
        skt = self._socket = socket.socket(family, socket.SOCK_STREAM)
        skt.setblocking(False)
        self._fd = skt.fileno()
        err = skt.connect_ex(address)
        if err not in _IN_PROGRESS:
            # Fail on the next turn, as a connect that fails later does.
            self._timer = reactor.callLater(0, self._fail, _connect_error(err))
            return
        if timeout is not None:
            self._timer = reactor.callLater(timeout, self._fail, error.TimeoutError())
        reactor.addWriter(self)

    def fileno(self) -> int:
        return self._fd

    def logPrefix(self) -> str:
        return "LeanConnect"

    def doRead(self) -> None:
        """Not registered for reading."""

    def doWrite(self) -> None:
        """The connect finished: connected, or failed (C{SO_ERROR})."""
        err = self._socket.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if err:
            self._fail(_connect_error(err))
        else:
            self._connected()

    def connectionLost(self, reason: Failure) -> None:
        """The reactor saw an error or a hang-up, or is shutting down."""
        err = 0
        if self._socket is not None:
            err = self._socket.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        self._fail(_connect_error(err) if err else error.ConnectError(string=str(reason.value)))

    def _stop(self):
        """Stop watching; return the socket (L{None} if already done)."""
        skt, self._socket = self._socket, None
        if skt is None:
            return None
        timer, self._timer = self._timer, None
        if timer is not None and timer.active():
            timer.cancel()
        self._reactor.removeWriter(self)
        return skt

    def _fail(self, reason) -> None:
        skt = self._stop()
        if skt is None:
            return
        skt.close()
        self.result.errback(reason)

    def _cancel(self, result: Deferred) -> None:
        skt = self._stop()
        if skt is not None:
            skt.close()
            result.errback(
                error.ConnectingCancelledError(self._type("TCP", *self._address[:2]))
            )

    def _connected(self) -> None:
        skt = self._stop()
        if skt is None:
            return
        address, address_type = self._address, self._type
        try:
            protocol = self._factory.buildProtocol(address_type("TCP", *address[:2]))
            if protocol is None:
                raise error.NoProtocol()
        except BaseException:
            skt.close()
            self.result.errback()
            return
        transport = LeanClient(
            skt,
            protocol,
            self._reactor,
            address,
            None if address_type is IPv4Address else address_type,
        )
        transport.startReading()
        try:
            protocol.makeConnection(transport)
        except BaseException:
            reason = Failure()
            transport.connectionLost(reason)
            self.result.errback(reason)
            return
        self.result.callback(protocol)


def _connect_error(err: int) -> Exception:
    return error.getConnectError((err, os.strerror(err)))


class _LeanConnect:
    """
    C{connect} for L{LeanTCP4ClientEndpoint} and L{LeanTCP6ClientEndpoint}.
    """

    _family = socket.AF_INET
    _address_type = IPv4Address
    # The socket address, made on first use and shared by the connections.
    _sockaddr = None

    def _socket_address(self) -> tuple:
        return (self._host, self._port)

    def connect(self, protocolFactory: IProtocolFactory) -> Deferred:
        """Connect a protocol of C{protocolFactory}; see L{IStreamClientEndpoint}."""
        reactor = self._reactor
        if self._bindAddress is not None or not isinstance(reactor, PosixReactorBase):
            return super().connect(protocolFactory)
        address = self._sockaddr
        if address is None:
            try:
                address = self._sockaddr = self._socket_address()
            except OSError as e:
                return fail(error.ConnectError(string=str(e)))
        return _Connecting(
            reactor, protocolFactory, self._family, address, self._address_type, self._timeout
        ).result


class LeanTCP4ClientEndpoint(_LeanConnect, TCP4ClientEndpoint):
    """
    A L{TCP4ClientEndpoint} to an IPv4 literal whose connections keep
    nothing of the connect; see the module docstring.
    """


class LeanTCP6ClientEndpoint(_LeanConnect, TCP6ClientEndpoint):
    """
    A L{TCP6ClientEndpoint} to an IPv6 literal whose connections keep
    nothing of the connect (and whose connects need no resolver thread);
    see the module docstring.
    """

    _family = socket.AF_INET6
    _address_type = IPv6Address

    def _socket_address(self) -> tuple:
        # Numeric only (no lookup): resolves a scope such as "%eth0".
        return tcp._resolveIPv6(self._host, self._port)
