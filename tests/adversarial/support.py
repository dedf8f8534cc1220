"""
What the adversarial tests share: an in-process Balance on a real loopback
listener in front of a recording backend, and a raw-socket client run in a
thread (so the reactor keeps serving meanwhile).

A case sends raw bytes and checks two things: what the client got, and
what the backend got, byte for byte (nothing for a refused request, one
request for one that must not be split in two).
"""

from __future__ import annotations

import socket

from balance.testing import parse_requests
from tests.integration.test_http_proxy import (
    OK,
    BalanceTestCase,
    RecordingBackend,
    closes,
    raw_exchange,
    read_responses,
)

__all__ = [
    "OK",
    "AdversarialCase",
    "RecordingBackend",
    "closes",
    "raw_exchange",
    "read_responses",
]


class AdversarialCase(BalanceTestCase):
    """
    Balance with one listener C{web} whose routes all go to a recording
    backend (cluster C{rec}), unless a subclass gives its own C{config}.

    :ivar backend: the L{RecordingBackend}.
    :ivar port: Balance's listening port.
    """

    timeout = 30
    limits = "{max_header_bytes: 8KiB, max_body_bytes: 1MiB}"
    timeouts = "{handshake: 2s, idle: 5s}"
    routes = ""

    def answer(self, request, conn):
        """How the backend answers each complete request (default: 200 ok)."""
        conn.transport.write(OK)

    def setUp(self):
        self.backend, self.backend_port = self.recording(self.answer)
        self.port = self.start_balance(self.config())
        self._seen = 0

    def config(self) -> str:
        return f"""
            drain_timeout: 1s
            listeners:
              - name: web
                listen: "tcp:0:interface=127.0.0.1"
                cluster: rec
                limits: {self.limits}
                timeouts: {self.timeouts}
                {self.routes}
            clusters:
              - {{name: rec, backends: ["127.0.0.1:{self.backend_port}"], connect_timeout: 1s}}
            """

    # -- what the backend saw -----------------------------------------------

    def backend_bytes(self) -> bytes:
        """Every byte the backend received, on all its connections, in order."""
        return b"".join(bytes(c.received) for c in self.backend.connections)

    def new_backend_bytes(self) -> bytes:
        """The bytes the backend received since the last call."""
        data = self.backend_bytes()
        new, self._seen = data[self._seen :], len(data)
        return new

    # -- exchanges ------------------------------------------------------------

    async def send(self, data: bytes, count: int = 1, methods=(), wait_close: bool = True):
        """
        Send C{data} on a new connection; wait for C{count} responses and
        (unless not C{wait_close}) the end of the connection (or 5s).

        :return: C{(responses, raw, closed)}.
        """
        return await self.in_thread(raw_exchange, self.port, data, count, methods, wait_close)

    async def assert_refused(self, data: bytes, statuses=(400,)) -> None:
        """
        C{data} is answered with one of C{statuses}, the connection closes,
        and not one byte reaches the backend.
        """
        self.new_backend_bytes()
        responses, raw, closed = await self.send(data)
        final = [r.status for r in responses if r.status >= 200]
        self.assertEqual(len(final), 1, (data, raw))
        self.assertIn(final[0], statuses, (data, raw))
        self.assertTrue(closed, data)
        # The backend would have answered by now: it had the whole request.
        self.assertEqual(self.new_backend_bytes(), b"", data)

    async def assert_one_request(self, data: bytes, body: bytes = b"", target=None):
        """
        C{data} is answered 200, and the backend receives exactly one
        complete request with C{body}, framed so that a strict parser
        finds nothing after it.

        :return: the L{balance.testing.ParsedRequest} the backend got.
        """
        self.new_backend_bytes()
        responses, raw, closed = await self.send(data, wait_close=False)
        self.assertEqual([r.status for r in responses], [200], (data, raw))
        seen = self.new_backend_bytes()
        requests = parse_requests(seen)
        self.assertEqual(len(requests), 1, (data, seen))
        [request] = requests
        self.assertTrue(request.complete, (data, seen))
        self.assertEqual(request.body, body, data)
        if target is not None:
            self.assertEqual(request.target, target)
        self.assertNotIn(b"smuggled", seen.lower())
        return request

    async def assert_refused_or_one(self, data: bytes, body: bytes = b"", statuses=(400,)):
        """
        Either refused (see L{assert_refused}) or passed on as exactly one
        request whose framing headers are unambiguous (see
        L{assert_one_request}); never anything in between.
        """
        self.new_backend_bytes()
        responses, raw, closed = await self.send(data, wait_close=False)
        seen = self.new_backend_bytes()
        final = [r.status for r in responses if r.status >= 200]
        self.assertEqual(len(final), 1, (data, raw))
        if final[0] != 200:
            self.assertIn(final[0], statuses, (data, raw))
            self.assertEqual(seen, b"", data)
            return None
        [request] = parse_requests(seen)
        self.assertTrue(request.complete, (data, seen))
        self.assertEqual(request.body, body, data)
        te = request.header_values(b"transfer-encoding")
        cl = request.header_values(b"content-length")
        self.assertFalse(te and cl, seen)
        self.assertLessEqual(len(te) + len(cl), 1, seen)
        if te:
            self.assertEqual(te, [b"chunked"], seen)
        return request


def connect(port: int, timeout: float = 10.0) -> socket.socket:
    """A blocking client socket connected to 127.0.0.1:C{port}."""
    return socket.create_connection(("127.0.0.1", port), timeout=timeout)
