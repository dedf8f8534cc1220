# -*- test-case-name: tests.test_proxyproto -*-
"""
The PROXY protocol (HAProxy's, versions 1 and 2): a header a load balancer
in front sends first on each connection, saying who the client really is.

  - L{HeaderParser}: sans-IO, strict and bounded.  Bytes go in with
    C{feed()} in any segmentation; it answers L{None} (need more), a
    L{ProxyInfo}, or raises L{InvalidProxyHeader}.  It decides as soon as
    the bytes so far cannot start a header (a plain HTTP request or TLS
    ClientHello is refused at its first byte), and never buffers more than
    a v1 line (107 bytes) or a v2 header of L{MAX_V2_LENGTH} bytes.
  - L{encode}: the header Balance sends to backends (C{send_proxy_protocol}).
  - L{ProxyHeaderFactory}: a listener's factory wrapper, outermost (the
    header comes before a TLS ClientHello): it reads the header within a
    timeout, records the addresses on the socket transport, then hands the
    connection, and the bytes after the header, to the wrapped factory's
    protocol, which replaces it on the transport (no per-read cost after).
  - L{client_address} / L{server_address}: the one accessor every part of
    Balance uses for "who is the client" (logs, X-Forwarded-For, ACLs,
    rate limits, hashing): the PROXY header's source when there was one,
    else the socket's peer.

A v2 header with the LOCAL command (health checks of the load balancer
itself), a v1 C{UNKNOWN} line, or v2 addresses of family AF_UNSPEC or
AF_UNIX mean "use the connection's own addresses".  v2 TLVs are checked for
well-formed lengths and otherwise skipped.
"""

from __future__ import annotations

import ipaddress
import struct

import attr
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.defer import Deferred, gatherResults, maybeDeferred, succeed
from twisted.internet.protocol import Protocol, ServerFactory
from twisted.logger import Logger
from zope.interface import implementer

from balance.interfaces import IDrainable

__all__ = [
    "HeaderParser",
    "InvalidProxyHeader",
    "ProxyHeaderFactory",
    "ProxyInfo",
    "client_address",
    "encode",
    "server_address",
]

V1_PREFIX = b"PROXY "
#: The longest v1 line the specification allows, CRLF included.
V1_MAX = 107
V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
_V2_FIXED = 16
#: The largest v2 header accepted (addresses and TLVs, after the 16 fixed
#: bytes).  The format allows 65535; senders use a few hundred at most.
MAX_V2_LENGTH = 4096

_LOCAL, _PROXY = 0x0, 0x1
_AF_UNSPEC, _AF_INET, _AF_INET6, _AF_UNIX = 0x0, 0x1, 0x2, 0x3
_UNSPEC, _STREAM = 0x0, 0x1
_ADDRESS_LENGTH = {_AF_UNSPEC: 0, _AF_INET: 12, _AF_INET6: 36, _AF_UNIX: 216}


class InvalidProxyHeader(Exception):
    """The bytes are not a valid PROXY header; the message says why."""


@attr.s(frozen=True, slots=True, auto_attribs=True)
class ProxyInfo:
    """
    What a PROXY header said.

    :ivar version: 1 or 2.
    :ivar source: the client's address (an L{IPv4Address} or
        L{IPv6Address}), or L{None} when the header says to use the
        connection's own (LOCAL, UNKNOWN, AF_UNSPEC, AF_UNIX).
    :ivar destination: the address the client connected to, or L{None}.
    :ivar rest: the bytes after the header, for the next protocol.
    """

    version: int
    source: IPv4Address | IPv6Address | None
    destination: IPv4Address | IPv6Address | None
    rest: bytes = b""


def _address(host: str, port: int):
    cls = IPv6Address if ":" in host else IPv4Address
    return cls("TCP", host, port)


def _v1_port(text: bytes) -> int:
    if not text.isdigit() or len(text) > 5 or (len(text) > 1 and text[:1] == b"0"):
        raise InvalidProxyHeader(f"bad port {text[:8]!r} in PROXY v1 header")
    port = int(text)
    if port > 65535:
        raise InvalidProxyHeader(f"port {port} out of range in PROXY v1 header")
    return port


def _v1_ip(text: bytes, family: bytes) -> str:
    try:
        ip = ipaddress.ip_address(text.decode("ascii"))
    except (UnicodeDecodeError, ValueError):
        raise InvalidProxyHeader(f"bad address {text[:40]!r} in PROXY v1 header") from None
    if ip.version != (4 if family == b"TCP4" else 6):
        raise InvalidProxyHeader(f"{family.decode()} header with address {ip}")
    return str(ip)


def _parse_v1(line: bytes) -> tuple[IPv4Address | IPv6Address | None, ...]:
    """The addresses of a v1 line without its CRLF."""
    parts = line.split(b" ")
    if len(parts) >= 2 and parts[1] == b"UNKNOWN":
        # "PROXY UNKNOWN" may be followed by anything, which is ignored.
        return None, None
    if len(parts) != 6 or parts[1] not in (b"TCP4", b"TCP6"):
        raise InvalidProxyHeader(f"malformed PROXY v1 header {line[:60]!r}")
    family = parts[1]
    src, dst = _v1_ip(parts[2], family), _v1_ip(parts[3], family)
    sport, dport = _v1_port(parts[4]), _v1_port(parts[5])
    return _address(src, sport), _address(dst, dport)


def _check_tlvs(data: bytes) -> None:
    """Walk the TLVs: each must fit in the header (they are otherwise skipped)."""
    offset, end = 0, len(data)
    while offset < end:
        if end - offset < 3:
            raise InvalidProxyHeader("truncated TLV in PROXY v2 header")
        (length,) = struct.unpack_from("!H", data, offset + 1)
        offset += 3 + length
        if offset > end:
            raise InvalidProxyHeader("TLV longer than the PROXY v2 header")


def _parse_v2(header: bytes) -> tuple[IPv4Address | IPv6Address | None, ...]:
    """The addresses of a whole v2 header (fixed part included)."""
    command = header[12] & 0x0F
    family, transport = header[13] >> 4, header[13] & 0x0F
    body = header[_V2_FIXED:]
    if command not in (_LOCAL, _PROXY):
        raise InvalidProxyHeader(f"unknown PROXY v2 command {command}")
    if family not in _ADDRESS_LENGTH or transport not in (_UNSPEC, _STREAM):
        raise InvalidProxyHeader(f"unsupported PROXY v2 address family 0x{header[13]:02x}")
    needed = _ADDRESS_LENGTH[family]
    if len(body) < needed:
        raise InvalidProxyHeader("PROXY v2 header shorter than its addresses")
    _check_tlvs(body[needed:])
    if command == _LOCAL or family in (_AF_UNSPEC, _AF_UNIX):
        return None, None
    if family == _AF_INET:
        src, dst = str(ipaddress.IPv4Address(body[0:4])), str(ipaddress.IPv4Address(body[4:8]))
        sport, dport = struct.unpack_from("!HH", body, 8)
    else:
        src, dst = str(ipaddress.IPv6Address(body[0:16])), str(ipaddress.IPv6Address(body[16:32]))
        sport, dport = struct.unpack_from("!HH", body, 32)
    return _address(src, sport), _address(dst, dport)


class HeaderParser:
    """
    Reads one PROXY header, v1 or v2, from bytes fed in any segmentation.

    :param max_v2_length: the largest v2 header body accepted.
    """

    __slots__ = ("_buffer", "_max_v2")

    def __init__(self, max_v2_length: int = MAX_V2_LENGTH):
        self._buffer = b""
        self._max_v2 = max_v2_length

    def feed(self, data: bytes) -> ProxyInfo | None:
        """
        Take more bytes.

        :return: L{None} while the header is incomplete, then its
            L{ProxyInfo} (with the bytes after it in C{rest}).
        :raise InvalidProxyHeader: as soon as the bytes cannot be a header.
        """
        buf = self._buffer = self._buffer + data
        if buf[:1] == b"P":
            return self._v1(buf)
        if buf[:1] == b"\r":
            return self._v2(buf)
        raise InvalidProxyHeader("the connection does not start with a PROXY header")

    def _v1(self, buf: bytes) -> ProxyInfo | None:
        head = buf[: len(V1_PREFIX)]
        if not V1_PREFIX.startswith(head):
            raise InvalidProxyHeader("the connection does not start with a PROXY header")
        end = buf.find(b"\n", 0, V1_MAX)
        if end < 0:
            if len(buf) >= V1_MAX:
                raise InvalidProxyHeader(f"PROXY v1 header longer than {V1_MAX} bytes")
            return None
        if end == 0 or buf[end - 1 : end] != b"\r":
            raise InvalidProxyHeader("PROXY v1 header not ended by CRLF")
        source, destination = _parse_v1(buf[: end - 1])
        return ProxyInfo(1, source, destination, buf[end + 1 :])

    def _v2(self, buf: bytes) -> ProxyInfo | None:
        if not V2_SIGNATURE.startswith(buf[: len(V2_SIGNATURE)]):
            raise InvalidProxyHeader("bad PROXY v2 signature")
        if len(buf) < _V2_FIXED:
            return None
        if buf[12] >> 4 != 2:
            raise InvalidProxyHeader(f"unsupported PROXY protocol version {buf[12] >> 4}")
        (length,) = struct.unpack_from("!H", buf, 14)
        if length > self._max_v2:
            raise InvalidProxyHeader(
                f"PROXY v2 header of {length} bytes, more than the {self._max_v2} accepted"
            )
        end = _V2_FIXED + length
        if len(buf) < end:
            return None
        source, destination = _parse_v2(buf[:end])
        return ProxyInfo(2, source, destination, buf[end:])


# -- encoding ------------------------------------------------------------------


def _ip(address) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    host = getattr(address, "host", None)
    if not isinstance(host, str):
        return None
    try:
        return ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return None


def encode(version: str | int, source, destination) -> bytes:
    """
    The PROXY header for a connection from C{source} to C{destination}.

    :param version: C{"v1"}/C{1} or C{"v2"}/C{2}.
    :param source: the client's L{IAddress}; anything without an IP (a
        UNIX socket) makes an C{UNKNOWN} (v1) or AF_UNSPEC (v2) header.
    :param destination: the address the client connected to.
    :return: the header bytes, to be written before anything else.
    """
    src, dst = _ip(source), _ip(destination)
    if src is not None and dst is not None and src.version != dst.version:
        # One family for both: IPv4 as IPv4-mapped IPv6.
        if src.version == 4:
            src = ipaddress.IPv6Address("::ffff:" + str(src))
        else:
            dst = ipaddress.IPv6Address("::ffff:" + str(dst))
    known = src is not None and dst is not None
    if version in ("v1", 1):
        if not known:
            return b"PROXY UNKNOWN\r\n"
        family = b"TCP4" if src.version == 4 else b"TCP6"
        return b"PROXY %s %s %s %d %d\r\n" % (
            family,
            str(src).encode("ascii"),
            str(dst).encode("ascii"),
            source.port,
            destination.port,
        )
    if version not in ("v2", 2):
        raise ValueError(f"unknown PROXY protocol version {version!r}")
    if not known:
        return V2_SIGNATURE + bytes((0x20 | _PROXY, 0x00)) + b"\x00\x00"
    family = _AF_INET if src.version == 4 else _AF_INET6
    body = src.packed + dst.packed + struct.pack("!HH", source.port, destination.port)
    return (
        V2_SIGNATURE
        + bytes((0x20 | _PROXY, family << 4 | _STREAM))
        + struct.pack("!H", len(body))
        + body
    )


# -- addresses -----------------------------------------------------------------

# Attributes the PROXY layer sets on the socket transport.
_SOURCE = "balance_proxied_source"
_DESTINATION = "balance_proxied_destination"


def _lookup(transport, name: str):
    # A TLS layer's transport is the socket transport; at most two hops.
    t = transport
    for _ in range(3):
        value = getattr(t, name, None)
        if value is not None:
            return value
        t = getattr(t, "transport", None)
        if t is None:
            return None
    return None


def client_address(transport):
    """
    The client of a downstream connection: the source of its PROXY header
    when it had one, else the socket's peer.

    :param transport: the connection's transport (socket or TLS layer).
    :return: an L{IAddress}.
    """
    source = _lookup(transport, _SOURCE)
    return source if source is not None else transport.getPeer()


def server_address(transport):
    """
    The address the client connected to: the destination of its PROXY
    header when it had one, else the socket's own address.
    """
    destination = _lookup(transport, _DESTINATION)
    return destination if destination is not None else transport.getHost()


def host_bytes(address) -> bytes:
    """The IP of C{address} as ASCII bytes; C{b"unix"} for an address without one."""
    return getattr(address, "host", "").encode("ascii") or b"unix"


# -- the listener side -----------------------------------------------------------


class _HeaderReader(Protocol):
    """The protocol of a connection until its PROXY header has arrived."""

    def __init__(self, factory: ProxyHeaderFactory):
        self._factory = factory
        self._parser = HeaderParser()
        self._timer = None

    def connectionMade(self):
        factory = self._factory
        factory._pending.add(self)
        self._timer = factory._reactor.callLater(factory.timeout, self._timed_out)

    def dataReceived(self, data: bytes):
        try:
            info = self._parser.feed(data)
        except InvalidProxyHeader as e:
            self._factory.refused(self.transport, str(e))
            self._done()
            self.transport.abortConnection()
            return
        if info is not None:
            self._done()
            self._hand_over(info)

    def _hand_over(self, info: ProxyInfo) -> None:
        transport = self.transport
        if info.source is not None:
            setattr(transport, _SOURCE, info.source)
            setattr(transport, _DESTINATION, info.destination)
        inner = self._factory.wrappedFactory.buildProtocol(client_address(transport))
        if inner is None:
            transport.loseConnection()
            return
        # The socket transport calls its "protocol" on every read and on
        # connectionLost: from now on, the wrapped protocol directly.
        transport.protocol = inner
        inner.makeConnection(transport)
        if info.rest and transport.connected and not transport.disconnecting:
            inner.dataReceived(info.rest)

    def _timed_out(self):
        self._timer = None
        self._factory.timeouts += 1
        self._done()
        self.transport.abortConnection()

    def _done(self) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        self._factory._pending.discard(self)
        waiting = self._factory._waiting
        if waiting and not self._factory._pending:
            self._factory._waiting = []
            for d in waiting:
                d.callback(None)

    def connectionLost(self, reason):
        self._done()


@implementer(IDrainable)
class ProxyHeaderFactory(ServerFactory):
    """
    A listener's factory for C{proxy_protocol: true}: every connection must
    start with a PROXY header (v1 or v2) within C{timeout} seconds, else it
    is closed; then C{wrappedFactory} (TLS or the listener's own) serves it
    as if the header's source had connected.

    Drain, abort and the connection count pass on to the wrapped factory,
    plus the connections still waiting for their header.

    :ivar rejected: connections closed for an invalid header.
    :ivar timeouts: connections closed for no header in time.
    """

    noisy = False
    log = Logger()

    def __init__(self, wrapped, reactor, timeout: float):
        self.wrappedFactory = wrapped
        self.timeout = timeout
        self._reactor = reactor
        self._pending: set[_HeaderReader] = set()
        self._waiting: list[Deferred] = []
        self.rejected = 0
        self.timeouts = 0
        self.last_error = None

    def buildProtocol(self, addr):
        return _HeaderReader(self)

    def refused(self, transport, reason: str) -> None:
        """
        Count a connection closed for an invalid header; log the first one,
        then one line per 1000 (a scanner must not flood the log).
        """
        self.rejected += 1
        self.last_error = reason
        if self.rejected % 1000 == 1:
            self.log.warn(
                "closed a connection from {peer} without a valid PROXY header ({reason}); "
                "{count} so far",
                peer=transport.getPeer(),
                reason=reason,
                count=self.rejected,
            )

    def doStart(self):
        self.wrappedFactory.doStart()
        super().doStart()

    def doStop(self):
        super().doStop()
        self.wrappedFactory.doStop()

    @property
    def active(self) -> int:
        """Open connections: those waiting for their header, and the wrapped factory's."""
        inner = getattr(self.wrappedFactory, "active", 0)
        return len(self._pending) + (inner() if callable(inner) else inner)

    def drain(self) -> Deferred:
        """Close connections still without a header, and drain the wrapped factory."""
        for reader in list(self._pending):
            reader.transport.loseConnection()
        waits = []
        if self._pending:
            d = Deferred()
            self._waiting.append(d)
            waits.append(d)
        drain = getattr(self.wrappedFactory, "drain", None)
        if drain is not None:
            waits.append(maybeDeferred(drain))
        if not waits:
            return succeed(None)
        return gatherResults(waits).addCallback(lambda _: None)

    def abort_all(self) -> None:
        """Abort every connection, with or without its header."""
        for reader in list(self._pending):
            reader.transport.abortConnection()
        abort = getattr(self.wrappedFactory, "abort_all", None)
        if abort is not None:
            abort()
