"""
Tests for ``balance.whoami``, the built-in demo upstream.

Protocol behaviour is driven through in-memory transports, every input both in
one segment and one byte at a time; a few tests then use real loopback sockets
with real peers (a Twisted client, curl).
"""

from __future__ import annotations

import os
import random
import shutil
import socket

from twisted.internet import defer, protocol, task
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.testing import StringTransportWithDisconnection
from twisted.trial import unittest

from balance.whoami import DATA_MAX, SNIFF_LIMIT, WhoamiFactory, sniff_http

SERVER = IPv4Address("TCP", "127.0.0.1", 8080)
CLIENT = IPv4Address("TCP", "192.0.2.7", 54321)

GET = (
    b"GET /path?q HTTP/1.1\r\n"
    b"Host: 127.0.0.1:8080\r\n"
    b"User-Agent: curl/7.88.1\r\n"
    b"X-MiXeD-Case: Value With  Spaces\r\n"
    b"Accept: */*\r\n"
    b"\r\n"
)


class HalfCloseTransport(StringTransportWithDisconnection):
    """A memory transport that also records a half-close (loseWriteConnection)."""

    write_closed = False

    def loseWriteConnection(self):
        self.write_closed = True


class SmallBufferTransport(StringTransportWithDisconnection):
    """
    A memory transport whose send buffer fills at ``limit`` bytes: like a TCP
    transport, it pauses its streaming producer from inside ``write``.
    """

    limit = 100_000

    def write(self, data):
        super().write(data)
        if self.producer is not None and self.streaming and len(self.value()) > self.limit:
            self.producer.pauseProducing()


def connect(factory=None, transport_class=StringTransportWithDisconnection):
    """A whoami protocol connected to a fresh in-memory transport."""
    factory = factory or WhoamiFactory("alpha")
    proto = factory.buildProtocol(CLIENT)
    transport = transport_class(hostAddress=SERVER, peerAddress=CLIENT)
    transport.protocol = proto
    proto.makeConnection(transport)
    return proto, transport


def exchange(data, bytewise=False, factory=None, transport_class=StringTransportWithDisconnection):
    """Feed ``data`` to a new connection and return (written bytes, transport)."""
    proto, transport = connect(factory, transport_class)
    if bytewise:
        for i in range(len(data)):
            proto.dataReceived(data[i : i + 1])
    else:
        proto.dataReceived(data)
    return transport.value(), transport


def responses(data, head=False):
    """
    Split HTTP/1.1 responses written by whoami into (status, headers, body).

    :param head: the responses answer HEAD requests, so carry no body.
    """
    result = []
    while data:
        head_end = data.index(b"\r\n\r\n") + 4
        lines = data[: head_end - 4].split(b"\r\n")
        status = int(lines[0].split(b" ")[1])
        headers = dict(line.split(b": ", 1) for line in lines[1:])
        length = 0 if head or status < 200 else int(headers.get(b"Content-Length", 0))
        result.append((status, headers, data[head_end : head_end + length]))
        data = data[head_end + length :]
    return result


class SniffTests(unittest.SynchronousTestCase):
    """``sniff_http`` decides as early as the bytes allow, and not before."""

    def test_request_line(self):
        """A whole HTTP/1.0 or 1.1 request line is HTTP; each prefix of it is undecided."""
        for line in (b"GET / HTTP/1.1\r\n", b"M-SEARCH * HTTP/1.0\r\n", GET):
            end = line.index(b"\n") + 1
            for i in range(end):
                self.assertIsNone(sniff_http(line[:i]), line[:i])
            self.assertIs(sniff_http(line[:end]), True)

    def test_not_http(self):
        """Prefixes that no HTTP/1.x request line can start with are raw at once."""
        for data in (
            b"\x16\x03\x01",  # a TLS ClientHello
            b"get / HTTP/1.1\r\n",
            b"GET\x00",
            b"GET /\x00",
            b"GET  /",
            b"GET / HTTP/2.0\r\n",
            b"GET / HTTP/1.1\n",
            b"PRI * HTTP/2",
            b"A" * 21,
        ):
            self.assertIs(sniff_http(data), False, data)

    def test_limit(self):
        """A request line still unfinished at the sniff limit is raw."""
        self.assertIsNone(sniff_http(b"GET /" + b"a" * (SNIFF_LIMIT - 10)))
        self.assertIs(sniff_http(b"GET /" + b"a" * SNIFF_LIMIT), False)


class HTTPTests(unittest.SynchronousTestCase):
    """Whoami answers HTTP/1.x requests with who it is and what it received."""

    def test_echo(self):
        """The body names the upstream, both addresses, the request line and headers as sent."""
        for bytewise in (False, True):
            written, transport = exchange(GET, bytewise)
            [(status, headers, body)] = responses(written)
            self.assertEqual(status, 200)
            self.assertEqual(headers[b"Content-Type"], b"text/plain; charset=utf-8")
            self.assertEqual(headers[b"X-Whoami-Name"], b"alpha")
            self.assertEqual(int(headers[b"Content-Length"]), len(body))
            hostname = socket.gethostname().encode()
            self.assertEqual(
                body,
                b"Name: alpha\nHostname: " + hostname + b"\nIP: 127.0.0.1\n"
                b"RemoteAddr: 192.0.2.7:54321\n"
                b"GET /path?q HTTP/1.1\n"
                b"Host: 127.0.0.1:8080\n"
                b"User-Agent: curl/7.88.1\n"
                b"X-MiXeD-Case: Value With  Spaces\n"
                b"Accept: */*\n",
            )
            self.assertTrue(transport.connected, "HTTP/1.1 keeps the connection open")

    def test_ipv6_addresses(self):
        """IPv6 addresses are reported with the peer in [host]:port form."""
        proto = WhoamiFactory("alpha").buildProtocol(None)
        transport = StringTransportWithDisconnection(
            hostAddress=IPv6Address("TCP", "::1", 8080),
            peerAddress=IPv6Address("TCP", "::1", 5555),
        )
        proto.makeConnection(transport)
        proto.dataReceived(GET)
        [(_, _, body)] = responses(transport.value())
        self.assertIn(b"\nIP: ::1\nRemoteAddr: [::1]:5555\n", body)

    def test_byte_by_byte(self):
        """Input split at every byte gets exactly the answer of the same input in one piece."""
        data = GET + b"POST /p HTTP/1.1\r\nContent-Length: 3\r\n\r\nabc" + GET
        self.assertEqual(exchange(data)[0], exchange(data, bytewise=True)[0])

    def test_pipelined(self):
        """Pipelined requests are answered in the order they were sent."""
        data = b"GET /first HTTP/1.1\r\n\r\nGET /second HTTP/1.1\r\n\r\n"
        for bytewise in (False, True):
            written, transport = exchange(data, bytewise)
            first, second = responses(written)
            self.assertIn(b"GET /first HTTP/1.1\n", first[2])
            self.assertIn(b"GET /second HTTP/1.1\n", second[2])
            self.assertTrue(transport.connected)

    def test_head(self):
        """HEAD gets the headers of the GET answer and no body."""
        written, _ = exchange(b"HEAD / HTTP/1.1\r\n\r\nHEAD /data?size=10 HTTP/1.1\r\n\r\n")
        [(status, headers, _), (_, data_headers, _)] = responses(written, head=True)
        self.assertEqual(status, 200)
        self.assertGreater(int(headers[b"Content-Length"]), 0)
        self.assertEqual(data_headers[b"Content-Length"], b"10")
        self.assertTrue(written.endswith(b"\r\n\r\n"), "no body bytes after the headers")

    def test_chunked_body(self):
        """A chunked request body is consumed, counted, and the connection stays usable."""
        data = (
            b"POST /up HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n"
            b"5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n" + GET
        )
        for bytewise in (False, True):
            written, _ = exchange(data, bytewise)
            posted, got = responses(written)
            self.assertIn(b"\nBody-Bytes: 11\n", posted[2])
            self.assertNotIn(b"Body-Bytes", got[2])

    def test_content_length_body(self):
        """A Content-Length request body is consumed and counted."""
        written, _ = exchange(b"PUT / HTTP/1.1\r\nContent-Length: 4\r\n\r\nabcd")
        self.assertTrue(responses(written)[0][2].endswith(b"\nBody-Bytes: 4\n"))

    def test_expect_continue(self):
        """A client that expects 100-continue gets it before it sends the body."""
        proto, transport = connect()
        proto.dataReceived(b"POST / HTTP/1.1\r\nExpect: 100-continue\r\nContent-Length: 2\r\n\r\n")
        self.assertEqual(transport.value(), b"HTTP/1.1 100 Continue\r\n\r\n")
        proto.dataReceived(b"ok")
        [cont, final] = responses(transport.value())
        self.assertEqual((cont[0], final[0]), (100, 200))
        self.assertIn(b"Body-Bytes: 2\n", final[2])

    def test_http10_closes(self):
        """HTTP/1.0 closes after the answer, unless the client asked for keep-alive."""
        written, transport = exchange(b"GET / HTTP/1.0\r\n\r\n")
        self.assertEqual(responses(written)[0][1][b"Connection"], b"close")
        self.assertFalse(transport.connected)
        written, transport = exchange(b"GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
        self.assertEqual(responses(written)[0][1][b"Connection"], b"keep-alive")
        self.assertTrue(transport.connected)

    def test_connection_close(self):
        """Connection: close is honoured, and requests pipelined after it are not answered."""
        data = b"GET / HTTP/1.1\r\nConnection: close\r\n\r\n" + GET
        for bytewise in (False, True):
            written, transport = exchange(data, bytewise)
            [(status, headers, _)] = responses(written)
            self.assertEqual((status, headers[b"Connection"]), (200, b"close"))
            self.assertFalse(transport.connected)

    def test_malformed(self):
        """Malformed HTTP gets 400 with a short body, then the connection closes."""
        for data in (
            b"GET / HTTP/1.1\r\nBad Header\r\n\r\n",
            b"FOO / HTTP/1.1\r\n\r\n",
            b"POST / HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n",
        ):
            for bytewise in (False, True):
                written, transport = exchange(GET + data, bytewise)
                [ok, (status, headers, body)] = responses(written)
                self.assertEqual((ok[0], status), (200, 400), data)
                self.assertEqual(headers[b"Connection"], b"close")
                self.assertTrue(body.startswith(b"Bad Request"))
                self.assertFalse(transport.connected)

    def test_upgrade_answered_then_closed(self):
        """An Upgrade request is answered like any other and the connection then closes."""
        data = b"GET /ws HTTP/1.1\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n\x81\x00"
        written, transport = exchange(data)
        [(status, headers, _)] = responses(written)
        self.assertEqual((status, headers[b"Connection"]), (200, b"close"))
        self.assertFalse(transport.connected)

    def test_health(self):
        """/health answers ok."""
        [(status, _, body)] = responses(exchange(b"GET /health HTTP/1.1\r\n\r\n")[0])
        self.assertEqual((status, body), (200, b"ok"))

    def test_status(self):
        """/status/NNN answers NNN with the echo body; 204 has no body; other codes are 400."""
        [(status, _, body)] = responses(exchange(b"GET /status/503 HTTP/1.1\r\n\r\n")[0])
        self.assertEqual(status, 503)
        self.assertIn(b"GET /status/503 HTTP/1.1\n", body)
        written, _ = exchange(b"GET /status/204 HTTP/1.1\r\n\r\n")
        self.assertTrue(written.startswith(b"HTTP/1.1 204 No Content\r\n"))
        self.assertTrue(written.endswith(b"\r\n\r\n"))
        self.assertNotIn(b"Content-Length", written)
        for bad in (b"150", b"600", b"abc", b"2000"):
            written, _ = exchange(b"GET /status/" + bad + b" HTTP/1.1\r\n\r\n")
            self.assertEqual(responses(written)[0][0], 400, bad)

    def test_data(self):
        """/data?size=N answers exactly N bytes of 'a'."""
        for size in (0, 1, 65536, 200_001):
            request = b"GET /data?x=1&size=%d HTTP/1.1\r\n\r\n" % size
            [(status, headers, body)] = responses(exchange(request)[0])
            self.assertEqual((status, int(headers[b"Content-Length"])), (200, size))
            self.assertEqual(body, b"a" * size)

    def test_data_capped_and_invalid(self):
        """Sizes above 1 GiB are capped; a missing or non-numeric size is 400."""
        written, _ = exchange(b"HEAD /data?size=99999999999999999999 HTTP/1.1\r\n\r\n")
        self.assertEqual(responses(written, head=True)[0][1][b"Content-Length"], b"%d" % DATA_MAX)
        for query in (b"", b"?size=-1", b"?size=1e3", b"?n=5"):
            written, _ = exchange(b"GET /data" + query + b" HTTP/1.1\r\n\r\n")
            self.assertEqual(responses(written)[0][0], 400, query)

    def test_data_backpressure(self):
        """
        /data stops writing when the transport's buffer is full, stops reading
        meanwhile, and continues, in order, when the client has read.
        """
        size = 1_000_000
        proto, transport = connect(transport_class=SmallBufferTransport)
        proto.dataReceived(b"GET /data?size=%d HTTP/1.1\r\n\r\n" % size + GET)
        received = transport.value()
        self.assertLess(len(received), SmallBufferTransport.limit + 70_000)
        self.assertEqual(transport.producerState, "paused", "stopped reading from the client")
        rounds = 0
        while transport.producerState == "paused":
            transport.clear()
            proto.resumeProducing()
            received += transport.value()
            rounds += 1
        self.assertGreater(rounds, 5)
        [(_, _, body), (_, _, echo)] = responses(received)
        self.assertEqual(body, b"a" * size)
        self.assertIn(b"GET /path?q HTTP/1.1\n", echo)
        self.assertEqual(transport.producerState, "producing")

    def test_half_close(self):
        """A client that half-closes after its requests gets its answers, then a close."""
        proto, transport = connect()
        proto.dataReceived(GET + GET)
        proto.readConnectionLost()
        self.assertEqual(len(responses(transport.value())), 2)
        self.assertFalse(transport.connected)

    def test_open_connections(self):
        """The factory counts connections while they are open."""
        factory = WhoamiFactory("alpha")
        _, first = connect(factory)
        _, second = connect(factory)
        self.assertEqual(factory.openConnections, 2)
        first.loseConnection()
        second.loseConnection()
        self.assertEqual(factory.openConnections, 0)


class RawTests(unittest.SynchronousTestCase):
    """Anything that does not start with an HTTP/1.x request line is echoed."""

    def test_echo(self):
        """Random binary and almost-HTTP prefixes come back exactly, in one piece or bytewise."""
        rng = random.Random(1)
        for data in (
            rng.randbytes(5000),
            b"GET\x00\x01\x02\xffrest of it",
            b"GET /x HTTP/1.2\r\n\r\n",
            b"SSH-2.0-OpenSSH_9.2\r\n",
            b"GET /" + b"a" * (SNIFF_LIMIT + 10),
        ):
            for bytewise in (False, True):
                written, transport = exchange(data, bytewise)
                self.assertEqual(written, data)
                self.assertTrue(transport.connected)

    def test_flow_control(self):
        """The echo reads from the client only as fast as the client reads."""
        _, transport = exchange(b"\x00hello")
        self.assertIs(transport.producer, transport)
        self.assertTrue(transport.streaming)

    def test_half_close(self):
        """When the client stops sending, the echo finishes and then half-closes."""
        for data in (b"\x00hello", b"GE", b""):
            proto, transport = connect(transport_class=HalfCloseTransport)
            proto.dataReceived(data)
            proto.readConnectionLost()
            self.assertEqual(transport.value(), data)
            self.assertTrue(transport.write_closed)
            self.assertIsNone(transport.producer)
            proto.writeConnectionLost()
            self.assertFalse(transport.connected)


class Collector(protocol.Protocol):
    """A client that keeps what it receives and reports the close."""

    def __init__(self):
        self.received = bytearray()
        self.closed = defer.Deferred()

    def dataReceived(self, data):
        self.received += data

    def connectionLost(self, reason):
        self.closed.callback(bytes(self.received))


class LoopbackTests(unittest.TestCase):
    """Whoami over real loopback sockets, with real clients."""

    def setUp(self):
        from twisted.internet import reactor

        self.reactor = reactor
        self.factory = WhoamiFactory("alpha", reactor)
        self.port = reactor.listenTCP(0, self.factory, interface="127.0.0.1")
        self.addCleanup(self.port.stopListening)
        # Cleanups run last-in first-out: wait for the server side to close
        # before the port stops, so trial finds a clean reactor.
        self.addCleanup(self.until, lambda: self.factory.openConnections == 0)

    async def until(self, condition, timeout=10.0):
        """Wait until ``condition()`` is true, polling the reactor."""
        deadline = self.reactor.seconds() + timeout
        while not condition():
            if self.reactor.seconds() > deadline:
                self.fail(f"condition not met within {timeout}s")
            await task.deferLater(self.reactor, 0.005, lambda: None)

    def curl(self):
        """The curl executable; missing curl skips locally and fails in CI."""
        path = shutil.which("curl")
        if path is None:
            if os.environ.get("CI") == "true":
                self.fail("curl is required in CI (CI=true) but is not installed")
            raise unittest.SkipTest("curl is not installed; install it to run this test")
        return path

    async def run_curl(self, *args):
        from twisted.internet.utils import getProcessOutputAndValue

        out, err, code = await getProcessOutputAndValue(
            self.curl(), ["-sS", "--max-time", "20", *args], env=os.environ, reactor=self.reactor
        )
        self.assertEqual(code, 0, err)
        return out

    async def test_curl(self):
        """curl gets an answer naming the upstream and echoing its own request."""
        url = f"http://127.0.0.1:{self.port.getHost().port}/hello?x=1"
        body = await self.run_curl("-H", "X-Test: yes", url)
        self.assertIn(b"Name: alpha\n", body)
        self.assertIn(b"GET /hello?x=1 HTTP/1.1\n", body)
        self.assertIn(b"X-Test: yes\n", body)

    async def test_curl_data(self):
        """A large /data body arrives complete over a real socket."""
        size = 20_000_000
        url = f"http://127.0.0.1:{self.port.getHost().port}/data?size={size}"
        out = await self.run_curl("-o", os.devnull, "-w", "%{http_code} %{size_download}", url)
        self.assertEqual(out, b"200 %d" % size)

    async def test_raw_echo(self):
        """1 MiB of random bytes comes back byte for byte, and the half-close is passed on."""
        from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol

        data = random.Random(7).randbytes(1 << 20)
        endpoint = TCP4ClientEndpoint(self.reactor, "127.0.0.1", self.port.getHost().port)
        client = await connectProtocol(endpoint, Collector())
        client.transport.write(data)
        client.transport.loseWriteConnection()
        received = await client.closed
        self.assertEqual(len(received), len(data))
        self.assertTrue(received == data, "echoed bytes differ")
