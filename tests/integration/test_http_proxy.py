# -*- test-case-name: tests.integration.test_http_proxy -*-
"""
The HTTP/1.1 reverse proxy over real loopback sockets.

Balance runs in this process (L{balance.service.build} on the reactor trial
runs), in front of real backends: the built-in whoami, and a recording
backend written here that logs exactly the bytes each connection receives
and answers with canned bytes.  Clients are real: curl in a subprocess, and
Python's blocking C{http.client} and raw sockets in threads, so that the
reactor keeps running Balance meanwhile.

Missing curl skips its tests locally and fails them in CI (CI=true).
"""

from __future__ import annotations

import http.client
import os
import shutil
import socket
import textwrap
import time

import httptools
from twisted.internet import reactor, threads
from twisted.internet.defer import Deferred
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.utils import getProcessOutputAndValue
from twisted.trial.unittest import SkipTest, TestCase

from balance.config.load import load_text
from balance.config.validate import validate
from balance.service import build
from balance.testing import ParsedRequest, parse_responses
from balance.whoami import WhoamiFactory
from tests.helpers import closed_port, wait_for

OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"


# -- a backend that records what it receives ---------------------------------------


class RecordingConnection(Protocol):
    """
    One connection to a L{RecordingBackend}.

    :ivar received: every byte received, in order.
    :ivar requests: the complete requests received.
    :ivar lost: fires when the connection is gone.
    """

    def __init__(self, backend: RecordingBackend):
        self.backend = backend
        self.received = bytearray()
        self.requests: list[ParsedRequest] = []
        self.lost = Deferred()
        self._parser = httptools.HttpRequestParser(self)
        self._current = None

    def dataReceived(self, data: bytes):
        self.received += data
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserError:
            self.transport.abortConnection()

    def on_message_begin(self):
        self._current = ParsedRequest()

    def on_url(self, url):
        self._current.target += url

    def on_header(self, name, value):
        self._current.headers.append((name, value))

    def on_body(self, body):
        self._current.body += body

    def on_message_complete(self):
        request, self._current = self._current, None
        request.method = self._parser.get_method()
        request.complete = True
        self.requests.append(request)
        self.backend.answer(request, self)

    def connectionLost(self, reason):
        self.lost.callback(None)


class RecordingBackend(Factory):
    """
    A backend that records the bytes of each connection, and answers each
    complete request by calling C{answer(request, connection)}, which
    writes what it likes to C{connection.transport}.
    """

    noisy = False

    def __init__(self, answer=None):
        self.answer = answer or (lambda request, conn: conn.transport.write(OK))
        self.connections: list[RecordingConnection] = []

    def buildProtocol(self, addr):
        conn = RecordingConnection(self)
        self.connections.append(conn)
        return conn

    @property
    def open(self) -> int:
        return sum(1 for c in self.connections if not c.lost.called)

    def requests(self) -> list[ParsedRequest]:
        return [r for c in self.connections for r in c.requests]


def blackhole() -> tuple[int, list[socket.socket]]:
    """
    A loopback port whose connection attempts hang: a listener that never
    accepts, its accept queue filled, so the kernel drops further SYNs.

    :return: the port, and the sockets to close afterwards.
    """
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(0)
    port = server.getsockname()[1]
    sockets = [server]
    for _ in range(16):
        filler = socket.socket()
        filler.setblocking(False)
        filler.connect_ex(("127.0.0.1", port))
        sockets.append(filler)
        time.sleep(0.02)
        try:
            filler.getpeername()
        except OSError:
            return port, sockets
    raise SkipTest("cannot make a connect attempt hang on this system")


# -- blocking clients, run in threads ------------------------------------------------


def read_responses(sock: socket.socket, count: int, methods=(), timeout: float = 10.0):
    """
    Read from C{sock} until C{count} complete responses (1xx excluded) or
    the end of the connection.

    :return: C{(responses, raw bytes, closed)}.
    """
    sock.settimeout(timeout)
    data = b""
    closed = False
    while True:
        try:
            responses = [r for r in parse_responses(data, methods) if r.status >= 200]
        except ValueError:
            responses = []
        if len(responses) >= count and all(r.complete for r in responses[:count]):
            break
        chunk = sock.recv(1 << 20)
        if not chunk:
            closed = True
            break
        data += chunk
    return parse_responses(data, methods), data, closed


def raw_exchange(port: int, data: bytes, count: int = 1, methods=(), wait_close: bool = False):
    """
    Send C{data} on a new connection, read C{count} responses; see
    L{read_responses}.

    :param wait_close: then wait up to 5s for the connection to close,
        rather than only noting whether it already did.
    """
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(data)
        responses, raw, closed = read_responses(sock, count, methods)
        if wait_close and not closed:
            closed = closes(sock)
        return responses, raw, closed


def closes(sock: socket.socket, timeout: float = 5.0) -> bool:
    """Whether the peer closes C{sock} (EOF or reset) within C{timeout}."""
    sock.settimeout(timeout)
    try:
        while sock.recv(65536):
            pass
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False
    return True


class BalanceTestCase(TestCase):
    """
    Starts backends and an in-process Balance, and stops everything in
    cleanup: Balance first (it drains), then waits for the backends'
    connections to close, then stops the backends.
    """

    timeout = 60

    def listen(self, factory) -> int:
        port = reactor.listenTCP(0, factory, interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        return port.getHost().port

    def whoami(self, name: str = "alpha") -> int:
        factory = WhoamiFactory(name, reactor)
        port = self.listen(factory)
        self.addCleanup(
            wait_for, lambda: factory.openConnections == 0, what="whoami connections closed"
        )
        return port

    def recording(self, answer=None) -> tuple[RecordingBackend, int]:
        backend = RecordingBackend(answer)
        port = self.listen(backend)
        self.addCleanup(wait_for, lambda: backend.open == 0, what="backend connections closed")
        return backend, port

    def start_balance(self, config: str) -> int:
        """Run Balance on C{config}; return the port of its listener C{web}."""
        model = validate(load_text(textwrap.dedent(config), "test.yaml"), "test.yaml")
        self.service = build(model, reactor)
        self.service.startService()
        self.addCleanup(self.service.stopService)
        return self.service.listeners.getServiceNamed("web").port.getHost().port

    def in_thread(self, f, *args, **kwargs) -> Deferred:
        """Run a blocking client in a thread while the reactor serves it."""
        return threads.deferToThread(f, *args, **kwargs)

    def curl(self) -> str:
        """The curl executable; missing curl skips locally and fails in CI."""
        path = shutil.which("curl")
        if path is None:
            if os.environ.get("CI") == "true":
                self.fail("curl is required in CI (CI=true) but is not installed")
            raise SkipTest("curl is not installed; install it to run this test")
        return path

    async def run_curl(self, *args: str) -> bytes:
        out, err, code = await getProcessOutputAndValue(
            self.curl(), ["-sS", "--max-time", "20", *args], env=os.environ, reactor=reactor
        )
        self.assertEqual(code, 0, err)
        return out


class ForwardingTests(BalanceTestCase):
    """Requests and responses through Balance to real backends."""

    def setUp(self):
        self.whoami_port = self.whoami()
        self.backend, backend_port = self.recording()
        self.port = self.start_balance(
            f"""
            drain_timeout: 5s
            listeners:
              - name: web
                listen: "tcp:0:interface=127.0.0.1"
                cluster: who
                limits: {{max_body_bytes: 64MiB}}
                routes:
                  - match: {{path_prefix: /rec/}}
                    cluster: rec
                  - match: {{path_prefix: /}}
                    cluster: who
            clusters:
              - {{name: who, backends: ["127.0.0.1:{self.whoami_port}"]}}
              - {{name: rec, backends: ["127.0.0.1:{backend_port}"]}}
            """
        )

    async def test_curl_to_whoami(self):
        """
        curl through Balance to whoami: the backend sees the client's Host
        and headers, plus X-Forwarded-For, X-Forwarded-Proto, Forwarded and
        Via; the client sees whoami's own headers, plus Via.
        """
        out = await self.run_curl(
            "-i", "-H", "X-Test: yes", f"http://127.0.0.1:{self.port}/hello?x=1"
        )
        [response] = parse_responses(out)
        self.assertEqual(response.status, 200)
        self.assertEqual(response.header(b"x-whoami-name"), b"alpha")
        self.assertEqual(response.header(b"via"), b"1.1 balance")
        body = response.body
        self.assertIn(b"GET /hello?x=1 HTTP/1.1\n", body)
        self.assertIn(b"Host: 127.0.0.1:%d\n" % self.port, body)
        self.assertIn(b"X-Test: yes\n", body)
        self.assertIn(b"X-Forwarded-For: 127.0.0.1\n", body)
        self.assertIn(b"X-Forwarded-Proto: http\n", body)
        self.assertIn(
            b'Forwarded: for=127.0.0.1;host="127.0.0.1:%d";proto=http\n' % self.port, body
        )
        self.assertIn(b"Via: 1.1 balance\n", body)

    async def test_curl_keep_alive(self):
        """
        curl fetching several URLs reuses its connection, and Balance one
        backend connection for all of them.
        """
        base = f"http://127.0.0.1:{self.port}/rec/"
        urls = []
        for i in range(5):
            urls += ["-o", os.devnull, base + str(i)]
        out = await self.run_curl("-w", "%{num_connects}\n", *urls)
        self.assertEqual(out.split(), [b"1", b"0", b"0", b"0", b"0"])
        self.assertEqual(len(self.backend.connections), 1)
        self.assertEqual(
            [r.target for r in self.backend.requests()], [b"/rec/%d" % i for i in range(5)]
        )

    async def test_curl_bodies(self):
        """
        curl uploads 20 MB chunked (with C{Expect: 100-continue}) and
        downloads 20 MB, through Balance, intact.
        """
        size = 20_000_000
        path = self.mktemp()
        with open(path, "wb") as f:
            f.write(b"u" * size)
        out = await self.run_curl(
            "-H",
            "Transfer-Encoding: chunked",
            "-H",
            "Expect: 100-continue",
            "--data-binary",
            "@" + path,
            f"http://127.0.0.1:{self.port}/upload",
        )
        self.assertIn(b"Body-Bytes: %d\n" % size, out)
        self.assertIn(b"Transfer-Encoding: chunked\n", out)
        out = await self.run_curl(
            "-o",
            os.devnull,
            "-w",
            "%{http_code} %{size_download}",
            f"http://127.0.0.1:{self.port}/data?size={size}",
        )
        self.assertEqual(out, b"200 %d" % size)

    async def test_http_client_keep_alive(self):
        """
        Fifty requests on one http.client connection reach the backend on
        one connection, and so do two further clients after it closed.
        """

        def client(count: int, start: int):
            conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
            statuses = []
            for i in range(start, start + count):
                conn.request("GET", f"/rec/{i}")
                response = conn.getresponse()
                response.read()
                statuses.append(response.status)
            conn.close()
            return statuses

        self.assertEqual(await self.in_thread(client, 50, 0), [200] * 50)
        self.assertEqual(await self.in_thread(client, 3, 50), [200] * 3)
        self.assertEqual(await self.in_thread(client, 3, 53), [200] * 3)
        self.assertEqual(len(self.backend.connections), 1)
        self.assertEqual(
            [r.target for r in self.backend.connections[0].requests],
            [b"/rec/%d" % i for i in range(56)],
        )

    async def test_http_client_bodies(self):
        """
        http.client sends bodies with Content-Length and chunked; the
        backend receives them intact, each framed as it was sent.
        """

        def client():
            conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
            conn.request("POST", "/rec/length", body=b"x" * 100_000)
            conn.getresponse().read()
            conn.request(
                "POST",
                "/rec/chunked",
                body=iter([b"abc", b"defg", b"h" * 70_000]),
                encode_chunked=True,
            )
            conn.getresponse().read()
            conn.close()

        await self.in_thread(client)
        length, chunked = self.backend.requests()
        self.assertEqual(
            (length.header(b"content-length"), length.body), (b"100000", b"x" * 100_000)
        )
        self.assertEqual(chunked.header(b"transfer-encoding"), b"chunked")
        self.assertEqual(chunked.body, b"abcdefg" + b"h" * 70_000)

    async def test_pipelining(self):
        """Twenty pipelined requests, sent in one write, are answered in order."""
        data = b"".join(b"GET /p%d HTTP/1.1\r\nHost: a\r\n\r\n" % i for i in range(20))
        responses, _, closed = await self.in_thread(raw_exchange, self.port, data, 20)
        self.assertFalse(closed)
        self.assertEqual(len(responses), 20)
        for i, response in enumerate(responses):
            self.assertIn(b"GET /p%d HTTP/1.1\n" % i, response.body)

    async def test_expect_continue(self):
        """
        A client that waits for C{100 Continue} gets it, then sends its
        body, then gets the answer.
        """

        def client():
            with socket.create_connection(("127.0.0.1", self.port), timeout=10) as sock:
                sock.sendall(
                    b"POST /upload HTTP/1.1\r\nHost: a\r\nExpect: 100-continue\r\n"
                    b"Content-Length: 5\r\n\r\n"
                )
                interim = sock.recv(100)
                sock.sendall(b"hello")
                responses, _, _ = read_responses(sock, 1)
                return interim, responses

        interim, [final] = await self.in_thread(client)
        self.assertEqual(interim, b"HTTP/1.1 100 Continue\r\n\r\n")
        self.assertEqual(final.status, 200)
        self.assertIn(b"Body-Bytes: 5\n", final.body)

    async def test_head_and_no_body_statuses(self):
        """HEAD and 204/304 answers carry no body, and the connection stays usable."""

        def client():
            conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
            results = []
            for method, path in (
                ("HEAD", "/x"),
                ("GET", "/status/204"),
                ("GET", "/status/304"),
                ("GET", "/x"),
            ):
                conn.request(method, path)
                response = conn.getresponse()
                results.append((response.status, response.read()[:4]))
            conn.close()
            return results

        self.assertEqual(
            await self.in_thread(client), [(200, b""), (204, b""), (304, b""), (200, b"Name")]
        )


class PooledConnectionTests(BalanceTestCase):
    """Backends that close pooled connections."""

    def start(self, answer):
        self.backend, port = self.recording(answer)
        self.port = self.start_balance(
            f"""
            drain_timeout: 5s
            listeners:
              - {{name: web, listen: "tcp:0:interface=127.0.0.1", cluster: rec}}
            clusters:
              - {{name: rec, backends: ["127.0.0.1:{port}"]}}
            """
        )

    def requests(self, *bodies):
        """One http.client connection sends a request per item of C{bodies} (None: GET)."""

        def client():
            conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
            statuses = []
            for body in bodies:
                conn.request("GET" if body is None else "POST", "/", body=body)
                response = conn.getresponse()
                response.read()
                statuses.append(response.status)
            conn.close()
            return statuses

        return self.in_thread(client)

    async def test_closed_while_idle(self):
        """
        A backend that closes each connection shortly after answering: the
        next request, later, goes on a new connection and succeeds.
        """

        def answer(request, conn):
            conn.transport.write(OK)
            reactor.callLater(0.01, conn.transport.loseConnection)

        self.start(answer)
        for n in range(1, 4):
            self.assertEqual(await self.requests(None), [200])
            await wait_for(lambda: self.backend.open == 0, what="backend closed")
            self.assertEqual(len(self.backend.connections), n)

    async def test_closed_when_reused(self):
        """
        A backend that answers the first request of a connection and closes
        (or resets) it when the next one arrives, answering nothing: Balance
        sends that request again on a new connection, and the client sees
        only successes.
        """
        for close in ("loseConnection", "abortConnection"):

            def answer(request, conn, close=close):
                if len(conn.requests) == 1:
                    conn.transport.write(OK)
                else:
                    getattr(conn.transport, close)()

            self.start(answer)
            self.assertEqual(await self.requests(None, None, None, None), [200] * 4)
            self.assertEqual([len(c.requests) for c in self.backend.connections], [2, 2, 2, 1])
            await self.service.stopService()

    async def test_request_with_body_not_retried(self):
        """
        A request with a body is not sent twice: when the reused
        connection closes without an answer, the client gets 502.
        """

        def answer(request, conn):
            if len(conn.requests) == 1:
                conn.transport.write(OK)
            else:
                conn.transport.loseConnection()

        self.start(answer)
        self.assertEqual(await self.requests(None, b"payload"), [200, 502])
        self.assertEqual(len(self.backend.connections), 1)


class ErrorTests(BalanceTestCase):
    """Each error status Balance answers, over real sockets."""

    def setUp(self):
        who = self.whoami()
        silent, silent_port = self.recording(lambda request, conn: None)
        reset, reset_port = self.recording(lambda request, conn: conn.transport.abortConnection())
        garbage, garbage_port = self.recording(
            lambda request, conn: conn.transport.write(
                {
                    b"/cr": b"HTTP/1.1 200 OK\r\nX-A: a\rb\r\nContent-Length: 2\r\n\r\nok",
                    b"/lengths": b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\nok!",
                    b"/longer": b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
                    b"HTTP/1.1 200 OK\r\nContent-Length: 7\r\n\r\nsmuggle",
                }.get(request.target, OK)
            )
        )
        hole, sockets = blackhole()
        for s in sockets:
            self.addCleanup(s.close)
        self.port = self.start_balance(
            f"""
            drain_timeout: 5s
            listeners:
              - name: web
                listen: "tcp:0:interface=127.0.0.1"
                limits: {{max_header_bytes: 4KiB, max_body_bytes: 64KiB}}
                timeouts: {{handshake: 300ms}}
                routes:
                  - {{match: {{path: /refused}}, cluster: refused}}
                  - {{match: {{path: /reset}}, cluster: reset}}
                  - {{match: {{path_prefix: /garbage/}}, cluster: garbage, rewrite: {{path_prefix: /}}}}
                  - {{match: {{path: /down}}, cluster: down}}
                  - {{match: {{path: /slow}}, cluster: silent, timeout: 300ms}}
                  - {{match: {{path: /hole}}, cluster: hole}}
                  - {{match: {{path_prefix: /who/}}, cluster: who}}
            clusters:
              - {{name: refused, backends: ["127.0.0.1:{closed_port()}"]}}
              - {{name: reset, backends: ["127.0.0.1:{reset_port}"]}}
              - {{name: garbage, backends: ["127.0.0.1:{garbage_port}"]}}
              - {{name: down, backends: ["127.0.0.1:{who}"], panic_threshold: 0%}}
              - {{name: silent, backends: ["127.0.0.1:{silent_port}"]}}
              - {{name: hole, backends: ["127.0.0.1:{hole}"], connect_timeout: 300ms}}
              - {{name: who, backends: ["127.0.0.1:{who}"]}}
            """
        )
        for backend in self.service.clusters["down"].backends:
            backend.healthy = False

    async def status(self, data: bytes, wait_close: bool = False):
        """
        Send C{data} on a new connection; return the statuses and whether it
        closed (waiting for that if C{wait_close}).
        """
        responses, _, closed = await self.in_thread(
            raw_exchange, self.port, data, 1, wait_close=wait_close
        )
        return [r.status for r in responses], closed

    async def test_upstream_errors(self):
        """
        Refused and reset connections and malformed responses are answered
        502, no healthy backend 503, a slow backend (route timeout) and a
        connect timeout 504; the client connection stays open.
        """
        for path, status in (
            (b"/refused", 502),
            (b"/reset", 502),
            (b"/garbage/cr", 502),
            (b"/garbage/lengths", 502),
            (b"/down", 503),
            (b"/slow", 504),
            (b"/hole", 504),
        ):
            start = time.monotonic()
            self.assertEqual(
                await self.status(b"GET " + path + b" HTTP/1.1\r\nHost: a\r\n\r\n"),
                ([status], False),
                path,
            )
            self.assertLess(time.monotonic() - start, 3.0, path)

    async def test_no_route(self):
        """A request no route matches is answered 404."""
        self.assertEqual(
            await self.status(b"GET /nowhere HTTP/1.1\r\nHost: a\r\n\r\n"), ([404], False)
        )

    async def test_refused_requests(self):
        """
        Malformed requests (400), an unsupported version (505), heads over
        max_header_bytes (431), bodies over max_body_bytes (413), CONNECT
        (405), an unknown Expect (417) and an invalid WebSocket handshake
        (400) are answered, and the connection closed.
        """
        for data, status in (
            (b"GET / HTTP/1.1\r\nHost: a\r\nX-A : b\r\n\r\n", 400),
            (
                b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n",
                400,
            ),
            (b"GET / HTTP/2.0\r\nHost: a\r\n\r\n", 505),
            (b"GET /who/ HTTP/1.1\r\nHost: a\r\nX-Big: " + b"b" * 5000 + b"\r\n\r\n", 431),
            (b"POST /who/ HTTP/1.1\r\nHost: a\r\nContent-Length: 70000\r\n\r\n", 413),
            (b"CONNECT a:443 HTTP/1.1\r\nHost: a:443\r\n\r\n", 405),
            (b"GET /who/ HTTP/1.1\r\nHost: a\r\nExpect: coffee\r\n\r\n", 417),
            (
                b"GET /who/ HTTP/1.1\r\nHost: a\r\nConnection: upgrade\r\nUpgrade: websocket\r\n\r\n",
                400,
            ),
        ):
            self.assertEqual(await self.status(data, wait_close=True), ([status], True), data[:40])

    async def test_chunked_body_over_limit(self):
        """A chunked body growing past max_body_bytes is answered 413."""

        def client():
            with socket.create_connection(("127.0.0.1", self.port), timeout=10) as sock:
                sock.sendall(
                    b"POST /who/ HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n"
                )
                chunk = b"8000\r\n" + b"c" * 0x8000 + b"\r\n"
                sock.sendall(chunk * 2)
                sock.sendall(chunk)
                responses, _, _ = read_responses(sock, 1)
                return responses, closes(sock)

        [response], closed = await self.in_thread(client)
        self.assertEqual(response.status, 413)
        self.assertTrue(closed)

    async def test_slowloris(self):
        """
        A client trickling its request head is answered 408 once the
        handshake timeout (300ms) passes, and disconnected.
        """

        def client():
            with socket.create_connection(("127.0.0.1", self.port), timeout=10) as sock:
                start = time.monotonic()
                sock.sendall(b"GET /who/ HTTP/1.1\r\nHost: a\r\n")
                for _ in range(20):
                    time.sleep(0.05)
                    try:
                        sock.sendall(b"X")
                    except OSError:
                        break
                responses, _, _ = read_responses(sock, 1)
                return responses, closes(sock), time.monotonic() - start

        [response], closed, elapsed = await self.in_thread(client)
        self.assertEqual(response.status, 408)
        self.assertTrue(closed)
        self.assertLess(elapsed, 3.0)

    async def test_idle_connection_closed(self):
        """A connection that sends nothing is closed after the handshake timeout, silently."""

        def client():
            with socket.create_connection(("127.0.0.1", self.port), timeout=10) as sock:
                start = time.monotonic()
                closed = closes(sock)
                return closed, time.monotonic() - start

        closed, elapsed = await self.in_thread(client)
        self.assertTrue(closed)
        self.assertLess(elapsed, 3.0)

    async def test_body_longer_than_declared(self):
        """
        A backend whose response runs past its Content-Length: the excess
        never reaches the client, not even as the answer to its next,
        pipelined, request.
        """
        data = b"GET /garbage/longer HTTP/1.1\r\nHost: a\r\n\r\nGET /garbage/next HTTP/1.1\r\nHost: a\r\n\r\n"
        responses, raw, closed = await self.in_thread(raw_exchange, self.port, data, 2)
        self.assertEqual([r.body for r in responses], [b"ok", b"ok"])
        self.assertNotIn(b"smuggle", raw)
