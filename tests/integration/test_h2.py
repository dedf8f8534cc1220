# -*- test-case-name: tests.integration.test_h2 -*-
"""
HTTP/2 through Balance over real loopback sockets, with real clients:
C{curl --http2-prior-knowledge}, C{nghttp} and C{h2load} (Debian package
C{nghttp2-client}) on a cleartext (h2c) listener, and over TLS with ALPN,
to the built-in whoami and to a recording HTTP/1.1 backend.

A missing tool skips its tests locally and fails them in CI (CI=true).
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
import textwrap

from twisted.internet import reactor
from twisted.internet.utils import getProcessOutputAndValue
from twisted.trial.unittest import SkipTest, TestCase

from balance.config.load import load_text
from balance.config.validate import validate
from balance.http.server import HTTPFactory
from balance.http.sniff import HTTPProtocols
from balance.service import build
from balance.whoami import WhoamiFactory
from tests.helpers import need_tool, wait_for
from tests.integration.test_http_proxy import RecordingBackend


class _H2Factory(HTTPFactory):
    """The listener factory with HTTP/2 (test-only until the wiring is applied)."""

    def __init__(self, context):
        super().__init__(context)
        self.protocols = HTTPProtocols(context)

    def buildProtocol(self, addr):
        if len(self.context.connections) >= self.max_connections:
            return None
        return self.protocols.build()


def require(tool: str) -> str:
    """The path of C{tool}; see L{tests.helpers.need_tool}."""
    return need_tool(tool, "nghttp2-client curl")


class H2TestCase(TestCase):
    timeout = 120

    def listen(self, factory) -> int:
        port = reactor.listenTCP(0, factory, interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        return port.getHost().port

    def whoami(self) -> int:
        factory = WhoamiFactory("alpha", reactor)
        port = self.listen(factory)
        self.addCleanup(
            wait_for, lambda: factory.openConnections == 0, what="whoami connections closed"
        )
        return port

    def start_balance(self, config: str, name: str = "web") -> int:
        """Run Balance on C{config}, its listener C{name} speaking HTTP/2; return its port."""
        model = validate(load_text(textwrap.dedent(config), "test.yaml"), "test.yaml")
        service = build(model, reactor)
        tls = service.tls.get(name)
        if tls is not None and b"h2" not in tls.alpn:
            raise SkipTest("the TLS listener does not offer h2 (service.py wiring not applied)")
        listener = service.listeners.getServiceNamed(name)
        factory = listener.factory
        if isinstance(factory, HTTPFactory):
            listener.factory = _H2Factory(factory.context)
        else:
            factory.wrappedFactory = _H2Factory(factory.wrappedFactory.context)
        service.startService()
        self.addCleanup(service.stopService)
        self.service = service
        return listener.port.getHost().port

    async def tool(self, tool: str, *args: str) -> str:
        out, err, code = await getProcessOutputAndValue(
            require(tool), list(args), env=os.environ, reactor=reactor
        )
        text = out.decode("utf-8", "replace")
        self.assertEqual(code, 0, text + err.decode("utf-8", "replace"))
        return text


class CleartextTests(H2TestCase):
    """h2c with prior knowledge on a cleartext listener."""

    def setUp(self):
        backend = self.whoami()
        self.recording = RecordingBackend(self.echo)
        recording = self.listen(self.recording)
        self.port = self.start_balance(
            f"""
            listeners:
              - name: web
                listen: "tcp:0:interface=127.0.0.1"
                cluster: who
                routes:
                  - {{match: {{path_prefix: "/echo"}}, cluster: echo}}
            clusters:
              - {{name: who, backends: ["127.0.0.1:{backend}"]}}
              - {{name: echo, backends: ["127.0.0.1:{recording}"]}}
            """
        )
        self.url = f"http://127.0.0.1:{self.port}"

    @staticmethod
    def echo(request, conn):
        body = request.body
        big = request.header(b"x-big")
        extra = b"X-Big: " + big + b"\r\n" if big else b""
        conn.transport.write(
            b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\nX-Len: %d\r\n%s\r\n%s"
            % (len(body), len(body), extra, body)
        )

    async def test_curl(self):
        """curl with prior knowledge speaks HTTP/2 to Balance, which asks whoami in HTTP/1.1."""
        out = await self.tool(
            "curl",
            "-sS",
            "--max-time",
            "20",
            "--http2-prior-knowledge",
            "-D",
            "-",
            "-w",
            "\n%{http_version}",
            "-H",
            "X-Test: yes",
            self.url + "/hello?x=1",
        )
        self.assertTrue(out.startswith("HTTP/2 200"), out)
        self.assertIn("GET /hello?x=1 HTTP/1.1", out)
        self.assertIn("x-test: yes", out.lower())
        self.assertIn("X-Forwarded-Proto: http", out)
        self.assertIn("via: 1.1 balance", out)
        self.assertTrue(out.endswith("\n2"), out)

    async def test_curl_upload(self):
        """A 3 MiB upload streams through with flow control, byte for byte."""
        body = os.urandom(3 * 1024 * 1024)
        with tempfile.NamedTemporaryFile(delete=False) as f:
            f.write(body)
        self.addCleanup(os.unlink, f.name)
        with tempfile.NamedTemporaryFile(delete=False) as out:
            pass
        self.addCleanup(os.unlink, out.name)
        await self.tool(
            "curl",
            "-sS",
            "--max-time",
            "30",
            "--http2-prior-knowledge",
            "--data-binary",
            "@" + f.name,
            "-o",
            out.name,
            self.url + "/echo",
        )
        with open(out.name, "rb") as received:
            self.assertEqual(received.read(), body)
        [request] = self.recording.requests()
        self.assertEqual(request.header(b"content-length"), b"%d" % len(body))

    async def test_nghttp_concurrent(self):
        """50 concurrent streams on one connection: every one gets its 200."""
        out = await self.tool("nghttp", "-v", "-m", "50", "-t", "20", self.url + "/many")
        self.assertEqual(out.count(":status: 200"), 50, out[-2000:])
        streams = set(
            re.findall(r"recv HEADERS frame <length=\d+, flags=0x\w+, stream_id=(\d+)>", out)
        )
        self.assertEqual(len(streams), 50)

    async def test_nghttp_post(self):
        with tempfile.NamedTemporaryFile(delete=False) as f:
            f.write(b"z" * 100000)
        self.addCleanup(os.unlink, f.name)
        out = await self.tool("nghttp", "-v", "-d", f.name, "-t", "20", self.url + "/echo")
        self.assertIn(":status: 200", out)
        self.assertIn("x-len: 100000", out)

    async def test_nghttp_large_header_blocks(self):
        """
        Header blocks larger than a frame, both ways: nghttp's request head
        comes in HEADERS and CONTINUATION frames, and the response head,
        with the same 30 KB field echoed by the backend, goes out so too.
        """
        big = "".join(chr(33 + i % 90) for i in range(30000)).replace(":", "=")
        out = await self.tool("nghttp", "-v", "-t", "20", "-H", "x-big: " + big, self.url + "/echo")
        self.assertIn(":status: 200", out)
        self.assertIn("x-big: " + big, out)
        [request] = self.recording.requests()
        self.assertEqual(request.header(b"x-big"), big.encode())

    async def test_h2load(self):
        """A short load: 2000 requests on 4 connections, 10 streams each, all succeed."""
        out = await self.tool("h2load", "-n", "2000", "-c", "4", "-m", "10", self.url + "/")
        self.assertIn("2000 succeeded, 0 failed, 0 errored, 0 timeout", out)
        self.assertIn("status codes: 2000 2xx", out)


class TLSTests(H2TestCase):
    """HTTP/2 over TLS, chosen by ALPN."""

    def setUp(self):
        from balance.tls.testing import CA

        directory = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, directory)
        ca = CA()
        cert, key = ca.issue(["example.com"]).write(directory, "site")
        self.ca = os.path.join(directory, "ca.pem")
        ca.write_cert(self.ca)
        backend = self.whoami()
        self.port = self.start_balance(
            f"""
            listeners:
              - name: web
                listen: "tcp:0:interface=127.0.0.1"
                tls:
                  certificates: [{{cert: {cert}, key: {key}}}]
                  alpn: [h2, http/1.1]
                cluster: who
            clusters:
              - {{name: who, backends: ["127.0.0.1:{backend}"]}}
            """
        )

    async def test_curl(self):
        out = await self.tool(
            "curl",
            "-sS",
            "--max-time",
            "20",
            "--http2",
            "--cacert",
            self.ca,
            "--resolve",
            f"example.com:{self.port}:127.0.0.1",
            "-w",
            "\n%{http_version}",
            f"https://example.com:{self.port}/tls",
        )
        self.assertIn("GET /tls HTTP/1.1", out)
        self.assertIn("X-Forwarded-Proto: https", out)
        self.assertTrue(out.endswith("\n2"), out)

    async def test_h2load(self):
        out = await self.tool(
            "h2load", "-n", "1000", "-c", "4", "-m", "10", f"https://127.0.0.1:{self.port}/"
        )
        self.assertIn("Application protocol: h2", out)
        self.assertIn("1000 succeeded, 0 failed, 0 errored, 0 timeout", out)
