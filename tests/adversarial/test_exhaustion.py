# -*- test-case-name: tests.adversarial.test_exhaustion -*-
"""
Resource exhaustion against C{twistd -n balance} in a child process: out of
file descriptors (a low RLIMIT_NOFILE), many idle connections, and a large
upload to a slow backend.  CPU time and memory are read from
C{/proc/PID/stat} and C{/proc/PID/status}.
"""

from __future__ import annotations

import os
import socket
import sys
import time

from twisted.internet import reactor, task, threads
from twisted.trial.unittest import TestCase

from tests.helpers import free_port, port_open, wait_for
from tests.integration import twistd

CI = os.environ.get("CI", "").lower() == "true"


def cpu_seconds(pid: int) -> float:
    """User plus system CPU time of C{pid} so far."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def rss_bytes(pid: int) -> int:
    """The resident set size of C{pid}."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


class ChildTestCase(TestCase):
    timeout = 120

    def config(self, text: str) -> str:
        path = os.path.abspath(self.mktemp() + ".yaml")
        with open(path, "w") as f:
            f.write(text)
        return path

    async def start(self, config: str, port: int, nofile: int | None = None):
        """Run Balance on C{config}, with at most C{nofile} descriptors; wait until it listens."""
        collector = twistd._Collector()
        code = "from twisted.scripts.twistd import run; run()"
        if nofile is not None:
            code = (
                f"import resource; resource.setrlimit(resource.RLIMIT_NOFILE, ({nofile}, {nofile})); "
                + code
            )
        transport = reactor.spawnProcess(
            collector,
            sys.executable,
            [sys.executable, "-c", code, "-n", "--pidfile=", "balance", "--config", config],
            env=twistd.child_env(),
            path=twistd.ROOT,
        )
        proc = twistd.BalanceProcess(collector, transport)

        def cleanup():
            if proc.exit_code is None:
                proc.signal("KILL")
                return proc.ended

        self.addCleanup(cleanup)
        await wait_for(lambda: proc.exit_code is not None or port_open(port), 20, "listening")
        self.assertIsNone(proc.exit_code, proc.output)
        return proc

    async def cpu_over(self, pid: int, seconds: float) -> float:
        """The share of one core C{pid} used over the next C{seconds}."""
        start, c0 = time.monotonic(), cpu_seconds(pid)
        await wait_for(lambda: time.monotonic() - start >= seconds, seconds + 5)
        return (cpu_seconds(pid) - c0) / (time.monotonic() - start)


def get(port: int, path: str = "/", sock=None) -> bytes:
    """One GET; the raw response (on C{sock} if given, kept open)."""
    own = sock is None
    if own:
        sock = socket.create_connection(("127.0.0.1", port), timeout=5)
    try:
        sock.sendall(f"GET {path} HTTP/1.1\r\nHost: a\r\n\r\n".encode())
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
        head, _, body = data.partition(b"\r\n\r\n")
        for line in head.split(b"\r\n"):
            if line.lower().startswith(b"content-length:"):
                need = int(line.split(b":")[1])
                while len(body) < need:
                    chunk = sock.recv(65536)
                    if not chunk:
                        break
                    body += chunk
        return head + b"\r\n\r\n" + body
    finally:
        if own:
            sock.close()


class DescriptorExhaustionTests(ChildTestCase):
    """RLIMIT_NOFILE reached: refuse briefly, log once, no spinning, recover."""

    async def test_out_of_descriptors(self):
        port, who = free_port(), free_port()
        path = self.config(
            f"""
drain_timeout: 1s
listeners:
  - name: web
    listen: "tcp:{port}:interface=127.0.0.1"
    cluster: who
    timeouts: {{handshake: 60s, idle: 60s}}
clusters:
  - {{name: who, backends: ["127.0.0.1:{who}"]}}
whoami:
  - {{name: alpha, listen: "tcp:{who}:interface=127.0.0.1"}}
"""
        )
        proc = await self.start(path, port, nofile=128)
        # An established keep-alive client, with its backend connection pooled.
        established = socket.create_connection(("127.0.0.1", port), timeout=5)
        self.addCleanup(established.close)
        first = await threads.deferToThread(get, port, "/", established)
        self.assertIn(b" 200 ", first.split(b"\r\n")[0])
        baseline = open_fds(proc.pid)

        held = []

        def flood():
            for _ in range(400):
                s = socket.socket()
                s.setblocking(False)
                s.connect_ex(("127.0.0.1", port))
                held.append(s)

        await threads.deferToThread(flood)
        self.addCleanup(lambda: [s.close() for s in held])
        await wait_for(lambda: open_fds(proc.pid) >= 120, 10, "descriptors used up")
        share = await self.cpu_over(proc.pid, 2.0)
        self.assertLess(share, 0.5, f"Balance used {share:.0%} of a core while out of descriptors")
        self.assertIsNone(proc.exit_code, proc.output[-3000:])
        log = proc.output
        noisy = [line for line in log.splitlines() if "EMFILE" in line or "descriptor" in line]
        self.assertLessEqual(len(noisy), 3, "\n".join(noisy[:20]))
        self.assertGreaterEqual(len(noisy), 1, log[-3000:])
        # The established client is still served (its backend connection pooled).
        during = await threads.deferToThread(get, port, "/during", established)
        self.assertIn(b" 200 ", during.split(b"\r\n")[0])
        # Descriptors come back: new clients are served again.
        for s in held:
            s.close()
        held.clear()
        await wait_for(lambda: open_fds(proc.pid) <= baseline + 5, 30, "descriptors released")

        def fresh():
            return get(port, "/after")

        after = await threads.deferToThread(fresh)
        self.assertIn(b" 200 ", after.split(b"\r\n")[0])


class MemoryTests(ChildTestCase):
    """Memory stays bounded with many idle connections and a huge upload."""

    IDLE = int(os.environ.get("BALANCE_IDLE_CONNECTIONS", 2000 if CI else 10000))
    UPLOAD_MB = int(os.environ.get("BALANCE_UPLOAD_MB", 128 if CI else 256))

    def balance_config(self, port: int, backend: int) -> str:
        return self.config(
            f"""
drain_timeout: 1s
listeners:
  - name: web
    listen: "tcp:{port}:interface=127.0.0.1"
    cluster: app
    limits: {{max_body_bytes: 4GiB}}
    timeouts: {{handshake: 120s, idle: 120s}}
clusters:
  - {{name: app, backends: ["127.0.0.1:{backend}"]}}
"""
        )

    async def test_idle_connections(self):
        """
        Thousands of idle connections cost a bounded, small amount each
        (printed: the per-connection bytes measured).
        """
        port = free_port()
        proc = await self.start(self.balance_config(port, free_port()), port)
        before_fds, before = open_fds(proc.pid), rss_bytes(proc.pid)
        held = []
        self.addCleanup(lambda: [s.close() for s in held])

        def connect_all():
            # In batches the listen backlog holds, each accepted before the
            # next: a burst of 10k SYNs overflows it, and the dropped ones
            # are retried by the kernel seconds later (a busy machine then
            # misses the deadline below).
            for i in range(self.IDLE):
                s = socket.socket()
                s.setblocking(False)
                s.connect_ex(("127.0.0.1", port))
                held.append(s)
                if i % 500 == 499:
                    deadline = time.monotonic() + 10
                    while (
                        open_fds(proc.pid) < before_fds + len(held) - 100
                        and time.monotonic() < deadline
                    ):
                        time.sleep(0.01)

        await threads.deferToThread(connect_all)
        await wait_for(
            lambda: open_fds(proc.pid) >= before_fds + self.IDLE, 60, "connections accepted"
        )
        per = (rss_bytes(proc.pid) - before) / self.IDLE
        print(f"\n{self.IDLE} idle connections: {per:.0f} bytes each")
        self.assertLess(per, 8 * 1024)
        share = await self.cpu_over(proc.pid, 1.0)
        self.assertLess(share, 0.2, "idle connections cost CPU")

    async def test_upload_to_slow_backend(self):
        """
        A large upload to a backend slower than the client: Balance stops
        reading from the client while the backend is behind, so its memory
        stays bounded, and every byte arrives.
        """
        size = self.UPLOAD_MB << 20
        backend = socket.socket()
        backend.bind(("127.0.0.1", 0))
        backend.listen(1)
        self.addCleanup(backend.close)
        port = free_port()
        proc = await self.start(self.balance_config(port, backend.getsockname()[1]), port)
        before = rss_bytes(proc.pid)

        def slow_backend():
            conn, _ = backend.accept()
            with conn:
                conn.settimeout(30)
                data = b""
                while b"\r\n\r\n" not in data:
                    data += conn.recv(65536)
                got = len(data) - data.index(b"\r\n\r\n") - 4
                while got < size:
                    chunk = conn.recv(65536)
                    if not chunk:
                        break
                    got += len(chunk)
                    # About 200 MB/s at most: slower than the client.
                    time.sleep(0.0003)
                conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
                return got

        def client():
            chunk = b"u" * (1 << 20)
            with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
                s.sendall(b"POST /up HTTP/1.1\r\nHost: a\r\nContent-Length: %d\r\n\r\n" % size)
                for _ in range(self.UPLOAD_MB):
                    s.sendall(chunk)
                return s.recv(65536)

        peak = [before]

        def sample():
            peak[0] = max(peak[0], rss_bytes(proc.pid))

        sampler = task.LoopingCall(sample)
        sampler.start(0.01)
        self.addCleanup(lambda: sampler.running and sampler.stop())
        received = threads.deferToThread(slow_backend)
        start = time.monotonic()
        answer = await threads.deferToThread(client)
        got = await received
        elapsed = time.monotonic() - start
        sampler.stop()
        peak = peak[0] - before
        print(
            f"\n{self.UPLOAD_MB} MiB upload in {elapsed:.1f}s; "
            f"Balance peak RSS growth {peak / 2**20:.2f} MiB (RSS before {before / 2**20:.1f} MiB)"
        )
        self.assertEqual(got, size)
        self.assertIn(b" 200 ", answer.split(b"\r\n")[0])
        self.assertLess(peak, 48 << 20)
