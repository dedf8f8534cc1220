"""
Reading the server name out of a TLS ClientHello without terminating TLS:
real ClientHellos from OpenSSL, fed whole, one byte at a time, and split
across TLS records; other protocols told apart as early as possible.
"""

from __future__ import annotations

from OpenSSL import SSL
from twisted.trial.unittest import SynchronousTestCase

from balance.config import model
from balance.l4.sni import (
    ClientHello,
    ClientHelloParser,
    NotTLS,
    SNIRouter,
    parse_client_hello,
)


def client_hello(server_name: bytes | None = b"db.example.com", alpn=(), padding: int = 0) -> bytes:
    """The first flight of an OpenSSL client: one TLS record with the ClientHello."""
    ctx = SSL.Context(SSL.TLS_METHOD)
    if alpn:
        ctx.set_alpn_protos(list(alpn))
    conn = SSL.Connection(ctx, None)
    conn.set_connect_state()
    if server_name is not None:
        conn.set_tlsext_host_name(server_name)
    if padding:
        # A long ALPN list makes a ClientHello larger than one record.
        conn.set_alpn_protos([b"p%05d" % i for i in range(padding)])
    try:
        conn.do_handshake()
    except SSL.WantReadError:
        pass
    return conn.bio_read(1 << 20)


def resplit(data: bytes, size: int) -> bytes:
    """The same handshake bytes, re-framed into records of at most C{size} bytes."""
    assert data[0] == 0x16
    payload = b""
    while data:
        length = int.from_bytes(data[3:5], "big")
        payload += data[5 : 5 + length]
        data = data[5 + length :]
    out = b""
    for i in range(0, len(payload), size):
        chunk = payload[i : i + size]
        out += b"\x16\x03\x01" + len(chunk).to_bytes(2, "big") + chunk
    return out


def feed_bytewise(data: bytes, parser=None):
    parser = parser or ClientHelloParser()
    for i in range(len(data)):
        result = parser.feed(data[i : i + 1])
        if result is not None:
            return result, i + 1
    return None, len(data)


class ParserTests(SynchronousTestCase):
    def test_whole(self):
        hello = client_hello(alpn=[b"h2", b"http/1.1"])
        parser = ClientHelloParser()
        self.assertEqual(
            parser.feed(hello), ClientHello("db.example.com", (b"h2", b"http/1.1"))
        )
        self.assertEqual(bytes(parser.buffered), hello)

    def test_one_byte_at_a_time(self):
        """Undecided until the last byte of the ClientHello, then the name."""
        hello = client_hello(b"DB.Example.COM.")
        result, used = feed_bytewise(hello)
        self.assertEqual(result, ClientHello("db.example.com"))
        self.assertEqual(used, len(hello))

    def test_split_records(self):
        """A ClientHello spread over several TLS records, fed whole and byte by byte."""
        hello = resplit(client_hello(alpn=[b"http/1.1"]), 50)
        self.assertGreater(hello.count(b"\x16\x03\x01"), 3)
        expected = ClientHello("db.example.com", (b"http/1.1",))
        self.assertEqual(ClientHelloParser().feed(hello), expected)
        self.assertEqual(feed_bytewise(hello)[0], expected)

    def test_large(self):
        """A ClientHello bigger than one record (OpenSSL splits it)."""
        hello = client_hello(padding=2500)
        self.assertGreater(len(hello), 16384)
        parser = ClientHelloParser(limit=64 * 1024)
        self.assertEqual(parser.feed(hello).server_name, "db.example.com")

    def test_too_large(self):
        result = ClientHelloParser().feed(client_hello(padding=2500))
        self.assertIsInstance(result, NotTLS)
        self.assertIn("larger than the limit", result.reason)
        # Also when the length is not known yet: the buffer limit holds.
        parser = ClientHelloParser(limit=100)
        self.assertIsInstance(parser.feed(resplit(client_hello(), 40)[:120]), NotTLS)

    def test_no_sni(self):
        self.assertEqual(ClientHelloParser().feed(client_hello(None)), ClientHello(None))

    def test_not_tls_first_byte(self):
        """Other protocols are told apart on their first byte."""
        for first in (b"G", b"\x00", b"\x80", b"S"):
            self.assertIsInstance(ClientHelloParser().feed(first), NotTLS)

    def test_not_tls_second_byte(self):
        parser = ClientHelloParser()
        self.assertIsNone(parser.feed(b"\x16"))
        self.assertIsInstance(parser.feed(b"\x01"), NotTLS)

    def test_nothing_yet(self):
        self.assertIsNone(ClientHelloParser().feed(b""))

    def test_other_handshake_message(self):
        hello = bytearray(client_hello())
        hello[5] = 2  # ServerHello
        self.assertIsInstance(ClientHelloParser().feed(bytes(hello)), NotTLS)

    def test_alert_record(self):
        self.assertIsInstance(ClientHelloParser().feed(b"\x16\x03\x01\x00\x02\x01\x00\x15\x03"),
                              NotTLS)

    def test_server_name_not_a_host_name(self):
        """
        A server name that is no host name (control bytes, a line break that
        would forge a log line, punctuation, only dots) is malformed.
        """
        for name in (b"a\nb.example", b"a;b", b"a b", b"x\x01", b".", b"a..b", b"a/b"):
            self.assertIsInstance(ClientHelloParser().feed(client_hello(name)), NotTLS, name)
        self.assertEqual(
            ClientHelloParser().feed(client_hello(b"Xn--Bcher-Kva.Example.")),
            ClientHello("xn--bcher-kva.example"),
        )

    def test_malformed(self):
        """Truncated vectors inside a complete message are "not TLS", not an exception."""
        body = client_hello()[9:]
        for cut in (10, 40, 80, len(body) - 3):
            broken = body[:cut]
            message = b"\x01" + len(broken).to_bytes(3, "big") + broken
            record = b"\x16\x03\x01" + len(message).to_bytes(2, "big") + message
            result = ClientHelloParser().feed(record)
            self.assertIsInstance(result, NotTLS, cut)
        self.assertRaises(ValueError, parse_client_hello, b"\x03\x03")


def route(sni, cluster):
    return model.Route(match=model.Match(sni=sni), cluster=cluster)


class RouterTests(SynchronousTestCase):
    def test_routes(self):
        router = SNIRouter(
            [route("db.example.com", "db"), route("*.example.com", "web"), route("a.test", "a")],
            "default",
        )
        self.assertEqual(router.route("db.example.com"), "db")
        self.assertEqual(router.route("www.example.com"), "web")
        self.assertEqual(router.route("a.b.example.com"), "default")
        self.assertEqual(router.route("example.com"), "default")
        self.assertEqual(router.route(None), "default")

    def test_first_match_wins(self):
        router = SNIRouter([route("*.example.com", "web"), route("db.example.com", "db")], None)
        self.assertEqual(router.route("db.example.com"), "web")
        self.assertIsNone(router.route("other.test"))
