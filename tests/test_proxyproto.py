"""
Tests for L{balance.proxyproto}: the PROXY v1/v2 parser on raw bytes (fed
whole and one byte at a time), the encoder, and the listener wrapper on a
string transport.
"""

from __future__ import annotations

import struct

from twisted.internet.address import IPv4Address, IPv6Address, UNIXAddress
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.testing import MemoryReactorClock, StringTransportWithDisconnection
from twisted.trial.unittest import SynchronousTestCase

from balance.proxyproto import (
    MAX_V2_LENGTH,
    V2_SIGNATURE,
    HeaderParser,
    InvalidProxyHeader,
    ProxyHeaderFactory,
    client_address,
    encode,
    host_bytes,
    server_address,
)

V1 = b"PROXY TCP4 192.0.2.1 198.51.100.2 56324 443\r\n"


def v2(command=0x21, family=0x11, body=None, tlvs=b"") -> bytes:
    if body is None:
        body = bytes([192, 0, 2, 1, 198, 51, 100, 2]) + struct.pack("!HH", 56324, 443)
    body += tlvs
    return V2_SIGNATURE + bytes([command, family]) + struct.pack("!H", len(body)) + body


def feed_all(data: bytes, bytewise: bool):
    parser = HeaderParser()
    if not bytewise:
        return parser.feed(data)
    result = None
    for i in range(len(data)):
        result = parser.feed(data[i : i + 1])
        if result is not None:
            # Whatever is left goes to the next protocol.
            return result.__class__(
                result.version, result.source, result.destination, result.rest + data[i + 1 :]
            )
    return result


class ParserTests(SynchronousTestCase):
    def both(self, data: bytes):
        """Parse whole and byte by byte; the results must agree."""
        whole, bytewise = feed_all(data, False), feed_all(data, True)
        self.assertEqual(whole, bytewise)
        return whole

    def refused(self, data: bytes, fragment: str):
        for bytewise in (False, True):
            e = self.assertRaises(InvalidProxyHeader, feed_all, data, bytewise)
            self.assertIn(fragment, str(e))

    def test_v1_tcp4(self):
        """A v1 TCP4 line gives the client and destination; what follows is kept."""
        info = self.both(V1 + b"GET / HTTP/1.1\r\n")
        self.assertEqual(info.version, 1)
        self.assertEqual(info.source, IPv4Address("TCP", "192.0.2.1", 56324))
        self.assertEqual(info.destination, IPv4Address("TCP", "198.51.100.2", 443))
        self.assertEqual(info.rest, b"GET / HTTP/1.1\r\n")

    def test_v1_tcp6(self):
        info = self.both(b"PROXY TCP6 2001:db8::1 2001:db8::2 1 65535\r\n")
        self.assertEqual(info.source, IPv6Address("TCP", "2001:db8::1", 1))
        self.assertEqual(info.destination.port, 65535)

    def test_v1_unknown(self):
        """UNKNOWN, with or without addresses after it: use the connection's own."""
        for line in (b"PROXY UNKNOWN\r\n", b"PROXY UNKNOWN ffff::1 ffff::2 1 2\r\n"):
            info = self.both(line + b"x")
            self.assertIsNone(info.source)
            self.assertEqual(info.rest, b"x")

    def test_v1_incomplete(self):
        """A truncated header asks for more bytes."""
        self.assertIsNone(HeaderParser().feed(V1[:-1]))
        self.assertIsNone(HeaderParser().feed(b"PRO"))

    def test_v1_malformed(self):
        self.refused(b"PROXY TCP4 192.0.2.1 198.51.100.2 56324\r\n", "malformed")
        self.refused(b"PROXY TCP5 1.2.3.4 1.2.3.4 1 2\r\n", "malformed")
        self.refused(b"PROXY TCP4  192.0.2.1 198.51.100.2 1 2\r\n", "malformed")
        self.refused(b"PROXY TCP4 192.0.2.1 198.51.100.2 1 2\n", "CRLF")
        self.refused(b"PROXY TCP4 300.0.2.1 198.51.100.2 1 2\r\n", "bad address")
        self.refused(b"PROXY TCP4 2001:db8::1 198.51.100.2 1 2\r\n", "TCP4 header with")
        self.refused(b"PROXY TCP4 192.0.2.1 198.51.100.2 65536 2\r\n", "out of range")
        self.refused(b"PROXY TCP4 192.0.2.1 198.51.100.2 +1 2\r\n", "bad port")
        self.refused(b"PROXY TCP4 192.0.2.1 198.51.100.2 01 2\r\n", "bad port")
        self.refused(b"PROXY TCP4 192.0.2.1 198.51.100.2 1 2\r\n"[:20] + b"\xff\r\n", "malformed")

    def test_v1_oversized(self):
        """No CRLF within 107 bytes: refused without buffering more."""
        self.refused(b"PROXY UNKNOWN " + b"a" * 200, "longer than 107")

    def test_bad_signature(self):
        """Anything else is refused at its first differing byte (HTTP, TLS)."""
        for data in (b"GET / HTTP/1.1\r\n", b"\x16\x03\x01", b"PROXX", b"\r\n\r\n\x00\r\nQUIT!"):
            self.assertRaises(InvalidProxyHeader, HeaderParser().feed, data)
        self.refused(b"\r\n\r\n\x01", "signature")

    def test_v2_inet(self):
        info = self.both(v2() + b"rest")
        self.assertEqual(info.version, 2)
        self.assertEqual(info.source, IPv4Address("TCP", "192.0.2.1", 56324))
        self.assertEqual(info.destination, IPv4Address("TCP", "198.51.100.2", 443))
        self.assertEqual(info.rest, b"rest")

    def test_v2_inet6_with_tlvs(self):
        """TLVs (ALPN, authority, unknown types) are checked and skipped."""
        body = (b"\x20\x01\x0d\xb8" + b"\x00" * 11 + b"\x01") + (b"\xfe" * 16) + b"\x00\x50\x01\xbb"
        tlvs = b"\x01\x00\x02h2" + b"\x02\x00\x0bexample.com" + b"\xee\x00\x00"
        info = self.both(v2(family=0x21, body=body, tlvs=tlvs))
        self.assertEqual(info.source, IPv6Address("TCP", "2001:db8::1", 80))
        self.assertEqual(info.destination.port, 443)
        self.assertEqual(info.rest, b"")

    def test_v2_local_and_unspec(self):
        """LOCAL (the proxy's own health check), AF_UNSPEC and AF_UNIX: the connection's own address."""
        self.assertIsNone(self.both(v2(command=0x20)).source)
        self.assertIsNone(self.both(v2(command=0x20, family=0x00, body=b"")).source)
        self.assertIsNone(self.both(v2(family=0x00, body=b"")).source)
        self.assertIsNone(self.both(v2(family=0x31, body=b"\x00" * 216)).source)

    def test_v2_truncated(self):
        data = v2()
        for cut in (5, 15, 16, len(data) - 1):
            self.assertIsNone(HeaderParser().feed(data[:cut]))

    def test_v2_invalid(self):
        self.refused(v2(command=0x11), "version 1")
        self.refused(v2(command=0x22), "command 2")
        self.refused(v2(family=0x12), "address family")
        self.refused(v2(family=0x41), "address family")
        self.refused(v2(body=b"\x00" * 8), "shorter than its addresses")
        self.refused(v2(tlvs=b"\x01\x00"), "truncated TLV")
        self.refused(v2(tlvs=b"\x01\x00\x09abc"), "TLV longer")

    def test_v2_oversized(self):
        """A length beyond the bound is refused from the fixed part alone."""
        head = V2_SIGNATURE + b"\x21\x11" + struct.pack("!H", MAX_V2_LENGTH + 1)
        self.refused(head, "more than the 4096")
        self.assertIsNone(HeaderParser(max_v2_length=8192).feed(head))


class EncodeTests(SynchronousTestCase):
    src4 = IPv4Address("TCP", "192.0.2.1", 56324)
    dst4 = IPv4Address("TCP", "198.51.100.2", 443)

    def test_round_trip(self):
        """What Balance sends, Balance (and haproxy) read back."""
        src6 = IPv6Address("TCP", "2001:db8::1", 5)
        dst6 = IPv6Address("TCP", "::1", 6)
        for version in ("v1", "v2", 1, 2):
            for src, dst in ((self.src4, self.dst4), (src6, dst6)):
                info = HeaderParser().feed(encode(version, src, dst))
                self.assertEqual((info.source, info.destination), (src, dst))

    def test_v1_bytes(self):
        self.assertEqual(encode("v1", self.src4, self.dst4), V1)
        self.assertEqual(encode("v2", self.src4, self.dst4), v2())

    def test_mixed_families(self):
        """An IPv4 client on an IPv6 socket: both as IPv6, IPv4-mapped."""
        info = HeaderParser().feed(encode("v1", self.src4, IPv6Address("TCP", "::1", 80)))
        self.assertEqual(info.source.host, "::ffff:c000:201")
        info = HeaderParser().feed(encode("v2", IPv6Address("TCP", "::1", 80), self.dst4))
        self.assertEqual(info.destination.host, "::ffff:c633:6402")

    def test_unix(self):
        """A client without an IP: UNKNOWN / AF_UNSPEC."""
        unix = UNIXAddress(None)
        self.assertEqual(encode("v1", unix, self.dst4), b"PROXY UNKNOWN\r\n")
        self.assertIsNone(HeaderParser().feed(encode("v2", unix, self.dst4)).source)
        self.assertRaises(ValueError, encode, "v3", self.src4, self.dst4)

    def test_scoped_v6(self):
        info = HeaderParser().feed(encode("v1", IPv6Address("TCP", "fe80::1%eth0", 1), IPv6Address("TCP", "fe80::2", 2)))
        self.assertEqual(info.source.host, "fe80::1")


class _Recorder(Protocol):
    def __init__(self, addr):
        self.addr = addr
        self.data = b""
        self.lost = False

    def connectionMade(self):
        self.peer = client_address(self.transport)
        self.local = server_address(self.transport)

    def dataReceived(self, data):
        self.data += data

    def connectionLost(self, reason):
        self.lost = True


class _Inner(Factory):
    def __init__(self):
        self.built = []
        self.refuse = False
        self.active = 0
        self.drained = 0
        self.aborted = 0

    def buildProtocol(self, addr):
        if self.refuse:
            return None
        p = _Recorder(addr)
        self.built.append(p)
        return p

    def drain(self):
        from twisted.internet.defer import succeed

        self.drained += 1
        return succeed(None)

    def abort_all(self):
        self.aborted += 1


class FactoryTests(SynchronousTestCase):
    def setUp(self):
        self.reactor = MemoryReactorClock()
        self.inner = _Inner()
        self.factory = ProxyHeaderFactory(self.inner, self.reactor, 3.0)

    def connect(self):
        proto = self.factory.buildProtocol(IPv4Address("TCP", "10.0.0.9", 1234))
        transport = StringTransportWithDisconnection(
            hostAddress=IPv4Address("TCP", "10.0.0.1", 8080),
            peerAddress=IPv4Address("TCP", "10.0.0.9", 1234),
        )
        transport.protocol = proto
        proto.makeConnection(transport)
        return proto, transport

    def test_hand_over(self):
        """After the header, the wrapped protocol owns the transport and sees the real client."""
        proto, transport = self.connect()
        self.assertEqual(self.factory.active, 1)
        for byte in V1 + b"hello":
            transport.protocol.dataReceived(bytes([byte]))
        [inner] = self.inner.built
        self.assertIs(transport.protocol, inner)
        self.assertEqual(inner.addr, IPv4Address("TCP", "192.0.2.1", 56324))
        self.assertEqual(inner.peer, IPv4Address("TCP", "192.0.2.1", 56324))
        self.assertEqual(inner.local, IPv4Address("TCP", "198.51.100.2", 443))
        self.assertEqual(host_bytes(inner.peer), b"192.0.2.1")
        self.assertEqual(inner.data, b"hello")
        self.assertEqual(self.factory.active, 0)
        # The timer is gone: nothing closes the connection later.
        self.reactor.advance(10)
        self.assertFalse(transport.disconnecting)

    def test_unknown_keeps_socket_address(self):
        proto, transport = self.connect()
        proto.dataReceived(b"PROXY UNKNOWN\r\n")
        [inner] = self.inner.built
        self.assertEqual(inner.peer, IPv4Address("TCP", "10.0.0.9", 1234))
        self.assertEqual(inner.local, IPv4Address("TCP", "10.0.0.1", 8080))
        self.assertEqual(host_bytes(UNIXAddress(None)), b"unix")

    def test_invalid_closes(self):
        """A connection that does not start with a header is closed (and logged); nothing is built."""
        from twisted.logger import capturedLogs

        proto, transport = self.connect()
        with capturedLogs() as events:
            proto.dataReceived(b"GET / HTTP/1.1\r\n")
        [event] = events
        self.assertIn("without a valid PROXY header", event["log_format"])
        self.assertFalse(transport.connected)
        self.assertEqual(self.inner.built, [])
        self.assertEqual(self.factory.rejected, 1)
        self.assertIn("does not start", self.factory.last_error)

    def test_timeout_closes(self):
        """No header within the timeout: closed."""
        proto, transport = self.connect()
        proto.dataReceived(V1[:10])
        self.reactor.advance(3.0)
        self.assertFalse(transport.connected)
        self.assertEqual(self.factory.timeouts, 1)

    def test_refused_by_inner(self):
        """The wrapped factory refuses (ACL, connection limit): closed."""
        self.inner.refuse = True
        proto, transport = self.connect()
        proto.dataReceived(V1)
        self.assertFalse(transport.connected)

    def test_drain_and_abort(self):
        """Drain closes connections still waiting for a header and drains the wrapped factory."""
        proto, transport = self.connect()
        d = self.factory.drain()
        # Closed at once (the string transport reports it synchronously).
        self.assertFalse(transport.connected)
        self.successResultOf(d)
        self.assertEqual(self.inner.drained, 1)
        self.successResultOf(self.factory.drain())
        proto, transport = self.connect()
        self.factory.abort_all()
        self.assertFalse(transport.connected)
        self.assertEqual(self.inner.aborted, 1)
        self.factory.doStart()
        self.factory.doStop()
