# -*- test-case-name: tests.integration.test_http_bulk -*-
"""
1 GiB through the HTTP/1.1 proxy in each direction, with bounded memory.

Balance runs as users run it, C{twistd -n balance}, in a child process, so
that its resident memory can be read from C{/proc/PID/status}.  The download
comes from whoami's C{/data} (in a second child process); the upload goes to
a backend written here, in a thread, that stops reading for a while in the
middle, as does the downloading client: were back-pressure missing in
either direction, Balance would buffer hundreds of megabytes meanwhile.
"""

from __future__ import annotations

import os
import socket
import sys
import threading
import time

import httptools
from twisted.internet import threads
from twisted.logger import Logger
from twisted.trial.unittest import SkipTest, TestCase

from tests.integration import twistd

GiB = 1 << 30
MiB = 1 << 20
STALL = 0.5  # seconds each slow peer stops reading, after a quarter of the data
MAX_GROWTH = 50 * MiB


def rss(pid: int) -> tuple[int, int]:
    """C{(VmRSS, VmHWM)} of process C{pid}, in bytes."""
    values = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, rest = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                values[key] = int(rest.split()[0]) * 1024
    return values["VmRSS"], values["VmHWM"]


class StallingUploadBackend:
    """
    A backend in a thread: accepts one connection, reads one request with a
    body (any framing), stops reading for L{STALL} seconds after a quarter
    of C{expected} body bytes, and answers with the number of body bytes.
    """

    def __init__(self, expected: int):
        self.expected = expected
        self.body_bytes = 0
        self.done = False
        self.error = None
        self._sock = socket.socket()
        self._sock.bind(("127.0.0.1", 0))
        self._sock.listen(1)
        self._sock.settimeout(60)
        self.port = self._sock.getsockname()[1]
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def on_body(self, body):
        self.body_bytes += len(body)

    def on_message_complete(self):
        self.done = True

    def _serve(self):
        try:
            conn, _ = self._sock.accept()
            with conn:
                conn.settimeout(30)
                parser = httptools.HttpRequestParser(self)
                buf = bytearray(MiB)
                view = memoryview(buf)
                stalled = False
                while not self.done:
                    n = conn.recv_into(buf)
                    if not n:
                        raise ConnectionError("client closed before the end of the body")
                    parser.feed_data(view[:n])
                    if not stalled and self.body_bytes > self.expected // 4:
                        stalled = True
                        time.sleep(STALL)
                answer = b"%d" % self.body_bytes
                conn.sendall(
                    b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\nConnection: close\r\n\r\n%s"
                    % (len(answer), answer)
                )
        except Exception as e:  # reported by the test
            self.error = e
        finally:
            self._sock.close()

    def join(self):
        self._thread.join(60)


def download(port: int, size: int) -> int:
    """
    GET whoami's C{/data?size=size} through Balance, stopping reading for
    L{STALL} seconds after a quarter; return the body bytes received.
    """
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.sendall(
            b"GET /data?size=%d HTTP/1.1\r\nHost: bulk\r\nConnection: close\r\n\r\n" % size
        )
        buf = bytearray(MiB)
        head = b""
        while b"\r\n\r\n" not in head:
            head += sock.recv(4096)
        head, _, first = head.partition(b"\r\n\r\n")
        if not head.startswith(b"HTTP/1.1 200 "):
            raise AssertionError(head)
        received = len(first)
        stalled = False
        while True:
            n = sock.recv_into(buf)
            if not n:
                return received
            received += n
            if not stalled and received > size // 4:
                stalled = True
                time.sleep(STALL)


def upload(port: int, size: int) -> bytes:
    """POST C{size} bytes, chunked in 1 MiB chunks, through Balance; return the answer's body."""
    chunk = b"100000\r\n" + b"u" * MiB + b"\r\n"
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.sendall(
            b"POST /upload HTTP/1.1\r\nHost: bulk\r\nConnection: close\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n"
        )
        for _ in range(size // MiB):
            sock.sendall(chunk)
        sock.sendall(b"0\r\n\r\n")
        answer = b""
        while True:
            data = sock.recv(65536)
            if not data:
                break
            answer += data
    return answer.partition(b"\r\n\r\n")[2]


class BulkTransferTests(TestCase):
    """Streaming both ways, through a Balance in its own process."""

    timeout = 120
    log = Logger()

    def setUp(self):
        if not sys.platform.startswith("linux"):
            raise SkipTest("reads the resident memory of a process from /proc")

    def write_config(self, text: str) -> str:
        # Absolute: twistd runs from the source tree, not from _trial_temp.
        path = os.path.abspath(self.mktemp())
        with open(path, "w") as f:
            f.write(text)
        return path

    async def test_one_gib_each_way(self):
        """
        1 GiB streams down (whoami /data) and 1 GiB up (chunked POST), both
        through slow peers that stop reading for a while; everything
        arrives, and Balance's resident memory grows by less than 50 MB.
        """
        whoami_port, balance_port = twistd.free_port(), twistd.free_port()
        backend = StallingUploadBackend(GiB)
        whoami_config = self.write_config(
            f'whoami:\n  - {{name: bulk, listen: "tcp:{whoami_port}:interface=127.0.0.1"}}\n'
        )
        balance_config = self.write_config(
            f"""
listeners:
  - name: web
    listen: "tcp:{balance_port}:interface=127.0.0.1"
    limits: {{max_body_bytes: 2GiB}}
    routes:
      - {{match: {{path: /upload}}, cluster: sink}}
      - {{match: {{path_prefix: /}}, cluster: who}}
clusters:
  - {{name: who, backends: ["127.0.0.1:{whoami_port}"]}}
  - {{name: sink, backends: ["127.0.0.1:{backend.port}"]}}
"""
        )
        await twistd.start(self, whoami_config, whoami_port)
        proc = await twistd.start(self, balance_config, balance_port)
        # Warm up: the first requests allocate what every later one reuses.
        self.assertEqual(await threads.deferToThread(download, balance_port, 10 * MiB), 10 * MiB)
        baseline, _ = rss(proc.pid)

        start = time.monotonic()
        received = await threads.deferToThread(download, balance_port, GiB)
        down = time.monotonic() - start
        self.assertEqual(received, GiB)

        start = time.monotonic()
        answer = await threads.deferToThread(upload, balance_port, GiB)
        up = time.monotonic() - start
        backend.join()
        self.assertIsNone(backend.error)
        self.assertEqual(answer, b"%d" % GiB)

        _, peak = rss(proc.pid)
        growth = peak - baseline
        self.assertLess(
            growth,
            MAX_GROWTH,
            f"Balance grew from {baseline // MiB} MiB to a peak of {peak // MiB} MiB",
        )
        self.log.info(
            "1 GiB down in {down:.2f}s, up in {up:.2f}s (each with a {stall}s stall); "
            "RSS {baseline} KiB, peak {peak} KiB",
            down=down,
            up=up,
            stall=STALL,
            baseline=baseline // 1024,
            peak=peak // 1024,
        )
        proc.signal("TERM")
        self.assertEqual(await proc.ended, 0)
