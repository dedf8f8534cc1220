# -*- test-case-name: tests.adversarial.test_backend -*-
"""
Hostile and broken backends behind a real Balance listener: response
splitting, lengths that disagree, resets in the middle of a response,
endless bodies, backends that answer early or never read, and names that
do not resolve.  A client must never be shown a response as complete when
it was not, nor a response meant for someone else.
"""

from __future__ import annotations

import socket
import time

from twisted.internet import reactor
from twisted.internet.protocol import Factory, Protocol

from balance.testing import parse_requests, parse_responses
from tests.adversarial.support import AdversarialCase, connect, raw_exchange
from tests.helpers import buffered, wait_for

OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"

# Target -> the bytes the backend answers with.
HOSTILE = {
    b"/cr-in-value": b"HTTP/1.1 200 OK\r\nX-A: a\rSet-Cookie: evil=1\r\nContent-Length: 2\r\n\r\nok",
    b"/lf-in-value": b"HTTP/1.1 200 OK\r\nX-A: a\nSet-Cookie: evil=1\r\nContent-Length: 2\r\n\r\nok",
    b"/crlf-in-reason": b"HTTP/1.1 200 OK\rSet-Cookie: evil=1\r\nContent-Length: 2\r\n\r\nok",
    b"/nul-in-value": b"HTTP/1.1 200 OK\r\nX-A: a\x00b\r\nContent-Length: 2\r\n\r\nok",
    b"/space-before-colon": b"HTTP/1.1 200 OK\r\nContent-Length : 2\r\n\r\nok",
    b"/obs-fold": b"HTTP/1.1 200 OK\r\nX-A: a\r\n Set-Cookie: evil=1\r\nContent-Length: 2\r\n\r\nok",
    b"/two-lengths": b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 40\r\n\r\nok",
    b"/length-list": b"HTTP/1.1 200 OK\r\nContent-Length: 2, 40\r\n\r\nok",
    b"/signed-length": b"HTTP/1.1 200 OK\r\nContent-Length: +2\r\n\r\nok",
    b"/bad-status": b"HTTP/1.1 2000 OK\r\nContent-Length: 2\r\n\r\nok",
    b"/short-status": b"HTTP/1.1 20 OK\r\nContent-Length: 2\r\n\r\nok",
    b"/bad-version": b"HTTP/1.1x 200 OK\r\nContent-Length: 2\r\n\r\nok",
}

# Answers that may pass, if the client sees one unambiguous response.
AMBIGUOUS = {
    b"/same-lengths": b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 2\r\n\r\nok",
    b"/length-and-chunked": (
        b"HTTP/1.1 200 OK\r\nContent-Length: 40\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"2\r\nok\r\n0\r\n\r\n"
    ),
    b"/chunked-twice": (
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"2\r\nok\r\n0\r\n\r\n"
    ),
}


class ResponseSplittingTests(AdversarialCase):
    """A backend's malformed response is never passed on: 502."""

    def answer(self, request, conn):
        target = request.target
        if target in HOSTILE:
            conn.transport.write(HOSTILE[target])
        elif target in AMBIGUOUS:
            conn.transport.write(AMBIGUOUS[target])
        elif target == b"/longer":
            # More than declared: the excess looks like a next response.
            conn.transport.write(
                OK + b"HTTP/1.1 200 OK\r\nContent-Length: 8\r\nX-Poison: 1\r\n\r\npoisoned"
            )
        else:
            conn.transport.write(OK)

    async def test_malformed_responses(self):
        for target in HOSTILE:
            responses, raw, closed = await self.send(
                b"GET " + target + b" HTTP/1.1\r\nHost: a\r\n\r\n", wait_close=False
            )
            self.assertEqual([r.status for r in responses], [502], (target, raw))
            self.assertNotIn(b"evil", raw, target)
            self.assertNotIn(b"ok", raw[raw.index(b"\r\n\r\n") :], target)
            # A success between failures keeps the backend's breaker closed.
            responses, _, _ = await self.send(
                b"GET / HTTP/1.1\r\nHost: a\r\n\r\n", wait_close=False
            )
            self.assertEqual([r.status for r in responses], [200])

    async def test_ambiguous_responses(self):
        """
        Repeated equal lengths or a length beside chunked: 502, or one
        response to the client with exactly one framing header.
        """
        for target in AMBIGUOUS:
            responses, raw, closed = await self.send(
                b"GET " + target + b" HTTP/1.1\r\nHost: a\r\n\r\n", wait_close=False
            )
            [response] = responses
            if response.status == 502:
                continue
            self.assertEqual(response.status, 200, target)
            self.assertEqual(response.body, b"ok", target)
            framing = response.header_values(b"content-length") + response.header_values(
                b"transfer-encoding"
            )
            self.assertEqual(len(framing), 1, (target, raw))

    async def test_no_bare_line_ends_reach_the_client(self):
        """Whatever the backend sends, every line of the head a client gets ends in CRLF."""
        for target in (*HOSTILE, *AMBIGUOUS):
            _, raw, _ = await self.send(
                b"GET " + target + b" HTTP/1.1\r\nHost: a\r\n\r\n", wait_close=False
            )
            head = raw[: raw.index(b"\r\n\r\n") + 2]
            self.assertEqual(head.count(b"\r"), head.count(b"\n"), (target, head))
            self.assertEqual(head.count(b"\r\n"), head.count(b"\n"), (target, head))
            self.assertNotIn(b"\x00", head)

    async def test_body_longer_than_declared_not_served_to_others(self):
        """
        Response queue poisoning: the excess after a declared length is
        never the answer to another client's request on the pooled
        connection.
        """
        responses, raw, _ = await self.send(
            b"GET /longer HTTP/1.1\r\nHost: a\r\n\r\n", wait_close=False
        )
        self.assertEqual([r.body for r in responses], [b"ok"])
        for i in range(5):
            responses, raw, _ = await self.send(
                b"GET /next%d HTTP/1.1\r\nHost: a\r\n\r\n" % i, wait_close=False
            )
            self.assertEqual([(r.status, r.body) for r in responses], [(200, b"ok")], raw)
            self.assertNotIn(b"poison", raw)


class _Scripted(Protocol):
    """A backend connection that runs its factory's script on the first bytes."""

    def connectionMade(self):
        self.received = bytearray()
        self.factory.connections.append(self)
        self.lost = False
        self.started = False
        self.sent = 0
        self.paused = False
        if self.factory.on_connect is not None:
            self.factory.on_connect(self)

    def dataReceived(self, data):
        self.received += data
        if not self.started and b"\r\n\r\n" in self.received:
            self.started = True
            self.factory.script(self)

    def connectionLost(self, reason):
        self.lost = True


class Scripted(Factory):
    """Serves L{_Scripted}: C{script(conn)} once a request head has arrived."""

    protocol = _Scripted
    noisy = False

    def __init__(self, script, on_connect=None):
        self.script = script
        self.on_connect = on_connect
        self.connections: list[_Scripted] = []


class _Endless:
    """A push producer writing an endless body while the transport lets it."""

    def __init__(self, conn):
        self.conn = conn
        self.paused = False
        self.chunk = b"e" * 65536

    def resumeProducing(self):
        self.paused = False
        self._go()

    def _go(self):
        conn = self.conn
        while not self.paused and not conn.lost:
            conn.transport.write(self.chunk)
            conn.sent += len(self.chunk)
            # Let the reactor run between bursts: a push producer is paused
            # from inside write() once the buffer fills.
            if conn.sent % (1 << 20) == 0:
                reactor.callLater(0, self._go)
                return

    def pauseProducing(self):
        self.paused = True
        self.conn.paused = True

    def stopProducing(self):
        self.paused = True


def _endless(conn):
    conn.transport.write(b"HTTP/1.1 200 OK\r\nContent-Type: x\r\n\r\n")
    producer = _Endless(conn)
    conn.transport.registerProducer(producer, True)
    producer.resumeProducing()


def _reset_in_head(conn):
    conn.transport.write(b"HTTP/1.1 200 OK\r\nContent-Le")
    reactor.callLater(0.05, conn.transport.abortConnection)


def _reset_in_length_body(conn):
    conn.transport.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100000\r\n\r\n" + b"b" * 1000)
    reactor.callLater(0.05, conn.transport.abortConnection)


def _close_in_length_body(conn):
    conn.transport.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100000\r\n\r\n" + b"b" * 1000)
    reactor.callLater(0.05, conn.transport.loseConnection)


def _reset_in_chunked_body(conn):
    conn.transport.write(
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3e8\r\n" + b"b" * 1000 + b"\r\n"
    )
    reactor.callLater(0.05, conn.transport.abortConnection)


def _close_in_chunked_body(conn):
    conn.transport.write(
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3e8\r\n" + b"b" * 1000 + b"\r\n"
    )
    reactor.callLater(0.05, conn.transport.loseConnection)


def _bad_chunk(conn):
    conn.transport.write(
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3e8\r\n"
        + b"b" * 1000
        + b"\r\nzz\r\nok\r\n0\r\n\r\n"
    )


def _answer_early(conn):
    # Answers as soon as the head is in, without reading the body.
    conn.transport.write(OK)


def _never_read(conn):
    conn.transport.pauseProducing()


def _read_all(sock: socket.socket, timeout: float = 10.0) -> tuple[bytes, bool]:
    """Read until EOF or reset; return the bytes and whether it was a reset."""
    sock.settimeout(timeout)
    data = b""
    try:
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                return data, False
            data += chunk
    except ConnectionResetError:
        return data, True


class BackendFaultTests(AdversarialCase):
    """Each route goes to a scripted backend of its own."""

    SCRIPTS = {
        "reset-head": (_reset_in_head, None),
        "reset-length": (_reset_in_length_body, None),
        "close-length": (_close_in_length_body, None),
        "reset-chunked": (_reset_in_chunked_body, None),
        "close-chunked": (_close_in_chunked_body, None),
        "bad-chunk": (_bad_chunk, None),
        "endless": (_endless, None),
        "early": (_answer_early, None),
        "deaf": (lambda conn: None, _never_read),
    }

    def setUp(self):
        self.scripted = {}
        routes = []
        clusters = []
        for name, (script, on_connect) in self.SCRIPTS.items():
            factory = Scripted(script, on_connect)
            port = self.listen(factory)
            self.scripted[name] = factory
            routes.append(f'{{match: {{path_prefix: "/{name}"}}, cluster: {name}, timeout: 1s}}')
            clusters.append(f'{{name: {name}, backends: ["127.0.0.1:{port}"]}}')
        routes.append('{match: {path_prefix: "/dns"}, cluster: dns}')
        clusters.append('{name: dns, backends: ["no-such-host.invalid:80"], connect_timeout: 1s}')
        self.port = self.start_balance(
            f"""
            drain_timeout: 1s
            listeners:
              - name: web
                listen: "tcp:0:interface=127.0.0.1"
                limits: {{max_body_bytes: 64MiB}}
                routes: [{", ".join(routes)}]
            clusters: [{", ".join(clusters)}]
            """
        )

    def tearDown(self):
        for factory in self.scripted.values():
            for conn in factory.connections:
                if not conn.lost:
                    conn.transport.abortConnection()

    async def test_reset_in_head(self):
        """A reset in the middle of the response head: 502."""
        responses, raw, _ = await self.in_thread(
            raw_exchange, self.port, b"GET /reset-head HTTP/1.1\r\nHost: a\r\n\r\n"
        )
        self.assertEqual([r.status for r in responses], [502], raw)

    async def test_cut_in_body(self):
        """
        A backend reset or closed in the middle of a body, or sending a
        malformed chunk after the head went out: the client gets
        the head and what came, then its connection ends, the body short of
        its length or without the last chunk: never shown as complete.
        """
        for path in (
            b"/reset-length",
            b"/close-length",
            b"/reset-chunked",
            b"/close-chunked",
            b"/bad-chunk",
        ):

            def client(path=path):
                with connect(self.port) as sock:
                    sock.sendall(b"GET " + path + b" HTTP/1.1\r\nHost: a\r\n\r\n")
                    return _read_all(sock)

            raw, _ = await self.in_thread(client)
            [response] = parse_responses(raw)
            self.assertEqual(response.status, 200, path)
            self.assertFalse(response.complete, (path, raw[-60:]))
            self.assertFalse(raw.endswith(b"0\r\n\r\n"), path)
            self.assertLessEqual(len(response.body), 1000, path)

    async def test_endless_body(self):
        """
        An endless body streams to a client that reads, and stops at the
        backend when the client stops reading (bounded memory); when the
        client closes, so does the backend connection.
        """
        factory = self.scripted["endless"]
        sock = connect(self.port)
        self.addCleanup(sock.close)
        sock.sendall(b"GET /endless HTTP/1.1\r\nHost: a\r\n\r\n")

        def read(n):
            got = 0
            while got < n:
                got += len(sock.recv(1 << 20))
            return got

        read_bytes = await self.in_thread(read, 8 << 20)
        [conn] = factory.connections
        last = [conn.sent, time.monotonic()]

        def settled():
            # The backend has sent nothing more for 0.3s.
            now = time.monotonic()
            if conn.sent != last[0]:
                last[:] = [conn.sent, now]
            return conn.paused and now - last[1] > 0.3

        await wait_for(settled, 10, "the backend held back")
        # What Balance holds for the client in user space stays small; the
        # rest sits in kernel socket buffers (autotuned up to tcp_rmem's
        # maximum, 32 MiB here, on each receiving side).
        ctx = self.service.listeners.getServiceNamed("web").factory.context
        [down] = list(ctx.connections)
        self.assertLess(buffered(down.transport), 1 << 20)
        self.assertLess(conn.sent - read_bytes, 96 << 20)
        sock.close()
        await wait_for(lambda: conn.lost, 10, "the backend connection closed")

    async def test_answer_before_body(self):
        """
        A backend that answers before reading the request body: the client
        gets the answer with C{Connection: close}, the rest of its body is
        never read as a request, and both connections close.
        """
        factory = self.scripted["early"]
        smuggled = b"GET /smuggled HTTP/1.1\r\nHost: a\r\n\r\n"
        body = smuggled * 8000

        def client():
            with connect(self.port) as sock:
                sock.sendall(
                    b"POST /early HTTP/1.1\r\nHost: a\r\nContent-Length: %d\r\n\r\n" % len(body)
                )
                sock.sendall(body[:1000])
                raw = b""
                while b"ok" not in raw:
                    raw += sock.recv(65536)
                try:
                    sock.sendall(body[1000:])
                except OSError:
                    pass
                more, _ = _read_all(sock)
                return raw + more

        raw = await self.in_thread(client)
        [response] = parse_responses(raw)
        self.assertEqual((response.status, response.body), (200, b"ok"))
        self.assertEqual(response.header(b"connection"), b"close")
        [conn] = factory.connections
        await wait_for(lambda: conn.lost, 10, "the backend connection closed")
        requests = parse_requests(bytes(conn.received))
        self.assertEqual(len(requests), 1)
        self.assertEqual(len(factory.connections), 1)

    async def test_backend_never_reads(self):
        """
        A backend that accepts and never reads a large upload: the client
        gets a 504 when the route's timeout expires, and Balance stopped
        reading from the client rather than buffering the upload.
        """
        factory = self.scripted["deaf"]
        size = 32 << 20

        def client():
            with connect(self.port, timeout=10) as sock:
                sock.sendall(b"POST /deaf HTTP/1.1\r\nHost: a\r\nContent-Length: %d\r\n\r\n" % size)
                sock.setblocking(False)
                chunk = b"u" * 65536
                sent = 0
                start = time.monotonic()
                raw = b""
                while time.monotonic() - start < 8:
                    try:
                        sent += sock.send(chunk)
                        continue
                    except BlockingIOError:
                        pass
                    except OSError:
                        # Answered and closed while we were still sending.
                        sock.setblocking(True)
                        more, _ = _read_all(sock)
                        raw += more
                        break
                    try:
                        data = sock.recv(65536)
                    except BlockingIOError:
                        time.sleep(0.01)
                        continue
                    except ConnectionResetError:
                        break
                    if not data:
                        break
                    raw += data
                return raw, sent, time.monotonic() - start

        raw, sent, elapsed = await self.in_thread(client)
        [response] = parse_responses(raw)
        self.assertEqual(response.status, 504)
        self.assertLess(elapsed, 5)
        self.assertLess(sent, 16 << 20)
        self.assertEqual(len(factory.connections), 1)

    async def test_name_does_not_resolve(self):
        """A backend whose name does not resolve: 502 or 503, quickly, every time."""
        for _ in range(3):
            start = time.monotonic()
            responses, raw, _ = await self.in_thread(
                raw_exchange, self.port, b"GET /dns HTTP/1.1\r\nHost: a\r\n\r\n"
            )
            self.assertIn([r.status for r in responses], ([502], [503]), raw)
            self.assertLess(time.monotonic() - start, 5)
