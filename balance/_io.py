"""
Writing to a TCP transport without the detour through Twisted's write buffer.

C{transport.write} always queues the bytes and arms the reactor's writer,
which costs two C{epoll_ctl} calls and a loop turn per write.  When nothing
is queued, sending straight on the socket is equivalent and much cheaper
(DESIGN.md measured 38 -> 27 us per proxied request); whatever the kernel
does not take goes through C{transport.write} as usual, keeping ordering
and flow control intact.
"""

from __future__ import annotations

import errno
import socket

from twisted.internet import abstract, address, error, tcp
from twisted.python import log


def _no_fileno() -> int:
    return -1


class _FilenoOnDemand:
    """
    C{fileno} as a method of the class rather than the socket's bound
    C{fileno} that C{tcp.Connection} stores per connection (88 bytes on
    every idle connection); it is -1 once the socket is gone, as Twisted's.
    """

    @property
    def fileno(self):
        try:
            return self.socket.fileno
        except AttributeError:
            return _no_fileno

    @fileno.setter
    def fileno(self, value) -> None:
        """Made on demand: what C{tcp.Connection.__init__} sets is dropped."""

    @fileno.deleter
    def fileno(self) -> None:
        """Nothing stored, nothing to delete."""


class LeanServer(_FilenoOnDemand, tcp.Server):
    """
    A C{tcp.Server} that makes its log prefix and its repr when asked for
    them: Twisted formats both for every accepted connection, two strings
    (about 160 bytes) that an idle connection would otherwise hold, and
    works out the log prefix (an interface lookup and a class name) to do
    so.
    """

    def __init__(self, sock, protocol, client, server, sessionno, reactor):
        # tcp.Server.__init__ with the classes it calls (Connection,
        # FileDescriptor), less the two strings and the stored fileno;
        # tests.test_listener checks that it sets what they set.
        self.reactor = reactor
        self._tempDataBuffer = []
        self._tempDataLen = 0
        self.socket = sock
        sock.setblocking(False)
        # fileno: see _FilenoOnDemand.
        self.protocol = protocol
        if len(client) != 2:
            self._addressType = address.IPv6Address
        self.server = server
        self.client = client
        self.sessionno = sessionno
        self.hostname = client[0]
        self.startReading()
        self.connected = 1

    def connectionLost(self, reason) -> None:
        # tcp.Connection.connectionLost, with an isinstance test for an
        # abort where Twisted calls reason.check (which compares qualified
        # class names, made by string formatting, on every close).
        if not hasattr(self, "socket"):
            return
        abstract.FileDescriptor.connectionLost(self, reason)
        self._closeSocket(not isinstance(reason.value, error.ConnectionAborted))
        protocol = self.protocol
        del self.protocol
        del self.socket
        protocol.connectionLost(reason)

    @property
    def logstr(self) -> str:
        protocol = getattr(self, "protocol", None)
        return f"{self._getLogPrefix(protocol)},{self.sessionno},{self.hostname}"

    @logstr.setter
    def logstr(self, value: str) -> None:
        """Made on demand: what tcp.Server.__init__ sets is dropped."""

    @property
    def repstr(self) -> str:
        name = type(getattr(self, "protocol", None)).__name__
        return f"<{name} #{self.sessionno} on {self.server._realPortNumber}>"

    @repstr.setter
    def repstr(self, value: str) -> None:
        """Made on demand: what tcp.Server.__init__ sets is dropped."""


class LeanPort(tcp.Port):
    """
    A C{tcp.Port} whose accept loop does less per connection than
    Twisted's: no log-buffering context per readable event, and the
    accepted socket made from its descriptor directly (C{socket.accept}
    converts the family and type to enums on every call).  Any error other
    than "nothing more to accept" is left to Twisted's loop, which knows
    what each one means (running out of descriptors, a connection reset
    while queued, a firewall's EPERM).

    Connections get a L{LeanServer}.
    """

    transport = LeanServer

    #: Whether the listening socket has C{TCP_NODELAY}, which Linux passes
    #: on to the sockets it accepts (see L{balance.listener}).
    balance_nodelay = False

    def doRead(self):
        accept = self.socket._accept
        family = self.addressFamily
        limit = self.numberAccepts
        accepted = 0
        try:
            while accepted < limit:
                try:
                    fd, addr = accept()
                except BlockingIOError:
                    break
                except OSError:
                    tcp.Port.doRead(self)
                    return
                accepted += 1
                skt = socket.socket(family, socket.SOCK_STREAM, 0, fd)
                if len(addr) == 4:
                    # IPv6: keep the scope id, as Twisted does.
                    host = socket.getnameinfo(addr, socket.NI_NUMERICHOST | socket.NI_NUMERICSERV)
                    addr = (host[0], *addr[1:])
                protocol = self.factory.buildProtocol(self._addressType("TCP", *addr))
                if protocol is None:
                    skt.close()
                    continue
                s = self.sessionno
                self.sessionno = s + 1
                protocol.makeConnection(self.transport(skt, protocol, addr, self, s, self.reactor))
        except BaseException:
            log.deferr()
        # Twisted's scaling of the accepts per readable event.
        if accepted == limit:
            self.numberAccepts = limit + 20
        else:
            self.numberAccepts = max(1, accepted)


class LeanClient(_FilenoOnDemand, tcp.Client):
    """
    The transport of an outgoing TCP connection that has connected (made by
    L{balance.cluster.endpoint}): unlike a C{tcp.Client}, it holds no
    connector, connecting state or log strings for the life of the
    connection, only the socket, the protocol and the peer's address.
    """

    def __init__(self, skt, protocol, reactor, address, address_type=None):
        """
        @param skt: The connected, non-blocking socket.
        @param protocol: The connection's protocol (not connected yet).
        @param address: The peer's socket address, as C{connect} took it
            (a tuple shared by the connections to one backend).
        @param address_type: L{twisted.internet.address.IPv6Address} for
            an IPv6 peer.
        """
        tcp.Connection.__init__(self, skt, protocol, reactor)
        self.realAddress = address
        if address_type is not None:
            self._addressType = address_type
        self.connected = 1

    @property
    def logstr(self) -> str:
        return f"{self._getLogPrefix(getattr(self, 'protocol', None))},client"

    @logstr.setter
    def logstr(self, value: str) -> None:
        """Made on demand."""

    def connectionLost(self, reason) -> None:
        """The connection is gone: tell the protocol (no connector to tell)."""
        tcp.Connection.connectionLost(self, reason)

    def failIfNotConnected(self, err) -> None:
        """Connected from the start: never fails to connect."""

    def __repr__(self) -> str:
        return f"<LeanClient to {self.realAddress} at {id(self):x}>"


# Exact types: a TLS transport subclasses none of these, but a subclass
# could change what writing means.
_DIRECT = (tcp.Server, tcp.Client, LeanServer, LeanClient)


_RESET = (errno.ECONNRESET, errno.EPIPE)


def _reading(transport) -> bool:
    # Twisted's epoll and poll reactors keep the descriptors they read.
    reads = getattr(transport.reactor, "_reads", None)
    return reads is not None and transport.fileno() in reads


def can_send_directly(transport) -> bool:
    """
    Whether L{send} may bypass C{transport}'s buffer: a plain TCP
    connection (not TLS) that is connected and has nothing queued.
    """
    return type(transport) in _DIRECT


def send(transport, data: bytes, reset_read: bool = False) -> None:
    """
    Write C{data} to a plain TCP C{transport}, directly on its socket when
    nothing is queued.

    :param transport: a L{tcp.Server} or L{tcp.Client}; callers check
        L{can_send_directly} once per connection.
    :param data: the bytes; must not be empty.
    :param reset_read: drop C{data} when the peer has reset the connection
        and the transport is reading: the reader meets the end of the
        stream on the reactor's next turn and ends the connection, without
        the write being queued and the writer armed first (two
        C{epoll_ctl} calls).  For callers whose protocol reports any loss
        the same way whichever side finds it (the TLS layer).
    """
    if (
        transport._tempDataLen
        or len(transport.dataBuffer) > transport.offset
        or transport.disconnecting
        or transport._writeDisconnected
        or not transport.connected
    ):
        transport.write(data)
        return
    try:
        sent = transport.socket.send(data)
    except BlockingIOError:
        sent = 0
    except OSError as e:
        if reset_read and e.errno in _RESET and _reading(transport):
            return
        # Let Twisted meet the error on its own write and report it through
        # connectionLost, as it would have without us.
        transport.write(data)
        return
    if sent < len(data):
        transport.write(data[sent:])
