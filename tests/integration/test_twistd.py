"""
Balance run the way users run it: C{twistd -n balance --config FILE}, in a
child process, driven by real clients.
"""

from __future__ import annotations

import os
import socket

from twisted.internet import reactor
from twisted.internet.defer import inlineCallbacks
from twisted.internet.utils import getProcessOutputAndValue
from twisted.trial import unittest

from tests.helpers import (
    CheckingClient,
    EchoFactory,
    connect_client,
    need_tool,
    unix_socket_path,
    wait_for,
)
from tests.integration import twistd

ETC = os.path.join(twistd.ROOT, "etc")




class CheckTests(unittest.TestCase):
    """C{--check} validates a file and starts nothing."""

    @inlineCallbacks
    def test_valid(self):
        """A valid file prints FILE: OK and exits 0."""
        path = os.path.join(ETC, "balance.yaml")
        code, out, err = yield twistd.run("-n", "balance", "--config", path, "--check")
        self.assertEqual((code, out, err), (0, f"{path}: OK\n", ""))

    @inlineCallbacks
    def test_invalid(self):
        """
        An invalid file prints exactly its error lines, no traceback, and
        exits 1, both with --check and when starting for real.
        """
        path = os.path.join(ETC, "invalid", "types.yaml")
        with open(os.path.join(ETC, "invalid", "types.expected")) as f:
            expected = [os.path.join(ETC, "invalid", line) for line in f.read().splitlines()]
        for args in (("--check",), ()):
            code, out, err = yield twistd.run("-n", "--pidfile=", "balance", "--config", path, *args)
            self.assertEqual(code, 1)
            self.assertEqual(out, "")
            self.assertEqual(err.splitlines(), expected)
            self.assertNotIn("Traceback", err)

    @inlineCallbacks
    def test_missingFile(self):
        """A file that does not exist is one clear line."""
        code, out, err = yield twistd.run("-n", "balance", "--config", "/nonexistent.yaml")
        self.assertEqual(code, 1)
        self.assertEqual(
            err, "/nonexistent.yaml:0: cannot read: No such file or directory\n"
        )

    @inlineCallbacks
    def test_noConfig(self):
        """Without --config twistd says it is required."""
        code, out, err = yield twistd.run("-n", "balance")
        self.assertEqual(code, 1)
        self.assertIn("--config FILE is required", out + err)


class RunTests(unittest.TestCase):
    """A running Balance in front of real backends."""

    def write_config(self, text: str) -> str:
        path = os.path.abspath(self.mktemp() + ".yaml")
        with open(path, "w") as f:
            f.write(text)
        return path

    @inlineCallbacks
    def echo_proxy(self, drain_timeout: str):
        """
        A running twistd with a tcp listener in front of an echo backend.

        :return: (the listener's port, the L{twistd.BalanceProcess}).
        """
        backend_port = reactor.listenTCP(0, EchoFactory(), interface="127.0.0.1")
        self.addCleanup(backend_port.stopListening)
        port = twistd.free_port()
        path = self.write_config(
            f"""
listeners:
  - name: tcp
    listen: "tcp:{port}:interface=127.0.0.1"
    protocol: tcp
    cluster: echo
clusters:
  - name: echo
    backends: ["127.0.0.1:{backend_port.getHost().port}"]
drain_timeout: {drain_timeout}
"""
        )
        proc = yield twistd.start(self, path, port)
        return port, proc

    def shipped_config(self) -> tuple[str, int]:
        """etc/balance.yaml on free ports."""
        ports = [twistd.free_port() for _ in range(3)]
        with open(os.path.join(ETC, "balance.yaml")) as f:
            text = f.read()
        for old, new in zip(("8080", "9001", "9002"), ports, strict=True):
            text = text.replace(old, str(new))
        return self.write_config(text), ports[0]

    @inlineCallbacks
    def test_shippedConfigWithCurl(self):
        """
        The README's demo: curl twice through etc/balance.yaml shows the two
        built-in upstreams' names, and SIGTERM stops Balance with status 0.
        """
        curl = need_tool("curl")
        path, port = self.shipped_config()
        proc = yield twistd.start(self, path, port)
        names = []
        for _ in range(2):
            out, err, code = yield getProcessOutputAndValue(
                curl, ["-sS", "--max-time", "10", f"http://127.0.0.1:{port}/"]
            )
            self.assertEqual(code, 0, err)
            first = out.decode().splitlines()[0]
            self.assertTrue(first.startswith("Name: "), out)
            names.append(first)
        self.assertEqual(sorted(names), ["Name: alpha", "Name: beta"])
        proc.signal("TERM")
        code = yield proc.ended
        self.assertEqual(code, 0, proc.output)

    @inlineCallbacks
    def test_drainOnSigterm(self):
        """
        On SIGTERM Balance stops accepting at once, but a transfer already
        in flight through it completes byte for byte; then it exits 0.
        """
        port, proc = yield self.echo_proxy("20s")
        payload = os.urandom(4 * 1024 * 1024)
        client = CheckingClient(payload[: len(payload) // 2], payload, half_close=False)
        yield connect_client(port, client)
        yield wait_for(lambda: client.received > 0, what="the first echoed bytes")
        proc.signal("TERM")
        yield wait_for(lambda: not twistd.port_open(port), what="the listener to close")
        # The connection accepted before SIGTERM goes on: send the rest.
        client.payload = payload
        client.half_close = True
        if client.transport.producer is None:
            client.transport.registerProducer(client, True)
        client.resumeProducing()
        yield client.lost
        self.assertTrue(client.complete, f"received {client.received} of {len(payload)}")
        code = yield proc.ended
        self.assertEqual(code, 0, proc.output)

    @inlineCallbacks
    def test_drainTimeout(self):
        """
        A connection that does not finish within drain_timeout is cut, and
        Balance still exits 0.
        """
        port, proc = yield self.echo_proxy("500ms")
        client = CheckingClient(b"ping", b"ping", half_close=False)
        yield connect_client(port, client)
        yield wait_for(lambda: client.received == 4, what="the echo")
        proc.signal("TERM")
        yield client.lost
        code = yield proc.ended
        self.assertEqual(code, 0, proc.output)

    @inlineCallbacks
    def test_adminMetrics(self):
        """
        With an admin listener, a request through Balance shows in
        /metrics under the CONFIG.md names, and /ready says ready.
        """
        curl = need_tool("curl")
        path, port = self.shipped_config()
        admin_port = twistd.free_port()
        with open(path, "a") as f:
            f.write(f'admin: {{listen: "tcp:{admin_port}:interface=127.0.0.1"}}\n')
        proc = yield twistd.start(self, path, port)
        yield wait_for(lambda: twistd.port_open(admin_port), what="the admin listener")
        out, err, code = yield getProcessOutputAndValue(
            curl, ["-sS", "--max-time", "10", f"http://127.0.0.1:{port}/"]
        )
        self.assertEqual(code, 0, err)
        out, err, code = yield getProcessOutputAndValue(
            curl, ["-sS", "--max-time", "10", f"http://127.0.0.1:{admin_port}/metrics"]
        )
        self.assertEqual(code, 0, err)
        metrics = out.decode()
        self.assertIn(
            'balance_http_requests_total{cluster="whoami",code="200",listener="web",route="1"} 1.0',
            metrics,
        )
        out, err, code = yield getProcessOutputAndValue(
            curl, ["-sS", "-o", "/dev/null", "-w", "%{http_code}", f"http://127.0.0.1:{admin_port}/ready"]
        )
        self.assertEqual(out, b"200")
        proc.signal("TERM")
        self.assertEqual((yield proc.ended), 0, proc.output)

    @inlineCallbacks
    def test_sighupReload(self):
        """
        SIGHUP reloads the file: a new direct response route answers
        afterwards, on the same socket, without a restart.
        """
        curl = need_tool("curl")
        path, port = self.shipped_config()
        proc = yield twistd.start(self, path, port)
        url = f"http://127.0.0.1:{port}/hello"
        out, err, code = yield getProcessOutputAndValue(curl, ["-sS", "--max-time", "10", url])
        self.assertTrue(out.startswith(b"Name: "), out)
        with open(path) as f:
            text = f.read()
        with open(path, "w") as f:
            f.write(
                text.replace(
                    "      - match: {path: /healthz}",
                    '      - match: {path: /hello}\n        direct_response: {status: 200, body: "reloaded"}\n'
                    "      - match: {path: /healthz}",
                )
            )
        proc.signal("HUP")
        bodies = []

        @inlineCallbacks
        def answered():
            out, err, code = yield getProcessOutputAndValue(curl, ["-sS", "--max-time", "10", url])
            bodies.append(out)

        for _ in range(100):
            yield answered()
            if bodies[-1] == b"reloaded":
                break
        self.assertEqual(bodies[-1], b"reloaded")
        proc.signal("TERM")
        self.assertEqual((yield proc.ended), 0, proc.output)

    @inlineCallbacks
    def test_systemdNotify(self):
        """
        Under systemd (Type=notify) Balance says READY=1 once it listens and
        STOPPING=1 when it starts draining.
        """
        notify_path = unix_socket_path(self, "notify")
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        sock.bind(notify_path)
        sock.setblocking(False)
        self.addCleanup(sock.close)
        messages = []

        def received():
            try:
                messages.append(sock.recv(1000))
            except BlockingIOError:
                pass
            return messages

        path, port = self.shipped_config()
        proc = yield twistd.start(self, path, port, env={"NOTIFY_SOCKET": notify_path})
        yield wait_for(lambda: b"READY=1" in received(), what="READY=1")
        proc.signal("TERM")
        code = yield proc.ended
        self.assertEqual(code, 0, proc.output)
        yield wait_for(lambda: b"STOPPING=1" in received(), what="STOPPING=1")
        self.assertEqual(messages, [b"READY=1", b"STOPPING=1"])

    @inlineCallbacks
    def test_bindFailure(self):
        """
        A listen address already in use stops twistd at start-up with a
        non-zero status instead of running without the listener.
        """
        busy = socket.socket()
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        self.addCleanup(busy.close)
        port = busy.getsockname()[1]
        path = self.write_config(
            f"""
listeners:
  - name: tcp
    listen: "tcp:{port}:interface=127.0.0.1"
    protocol: tcp
    cluster: c
clusters:
  - name: c
    backends: ["127.0.0.1:1"]
"""
        )
        code, out, err = yield twistd.run("-n", "--pidfile=", "balance", "--config", path)
        self.assertNotEqual(code, 0)
        self.assertIn("Address already in use", out + err)
