"""
The admin listener as a service: the token file read at start, bind
failures that stop start-up, the admin section of the config, and closing
kept-alive connections on stop.
"""

from __future__ import annotations

import socket

from twisted.internet import reactor
from twisted.internet.defer import inlineCallbacks
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.error import CannotListenError
from twisted.internet.protocol import Protocol
from twisted.internet.testing import MemoryReactorClock
from twisted.trial import unittest

from balance.admin import AdminService, AdminTokenError, read_token
from balance.config import model
from balance.config.validate import ConfigError
from tests.admin.fakes import FakeTarget, load
from tests.helpers import wait_for


class ReadTokenTests(unittest.SynchronousTestCase):
    """The token file."""

    def write(self, content: bytes) -> str:
        path = self.mktemp()
        with open(path, "wb") as f:
            f.write(content)
        return path

    def test_strip(self):
        """Whitespace around the token, a trailing newline above all, is not part of it."""
        self.assertEqual(read_token(self.write(b"\n  abc123 \n")), b"abc123")

    def test_missing(self):
        """A missing file is a sentence naming the key, the file and what to do."""
        path = self.mktemp()
        e = self.assertRaises(AdminTokenError, read_token, path)
        self.assertEqual(
            str(e),
            f"admin.token_file {path}: cannot read it (No such file or directory); create it "
            "with the token, readable by the user Balance starts as",
        )

    def test_empty(self):
        """An empty file would accept an empty token: refused."""
        e = self.assertRaises(AdminTokenError, read_token, self.write(b" \n"))
        self.assertIn("the file is empty", str(e))

    def test_unusable(self):
        """A token an Authorization header cannot carry is refused."""
        e = self.assertRaises(AdminTokenError, read_token, self.write(b"two words\n"))
        self.assertIn("spaces or non-ASCII", str(e))


class StartTests(unittest.TestCase):
    """Starting and stopping the admin listener."""

    def setUp(self):
        self.target = FakeTarget(load(), MemoryReactorClock())

    def service(self, listen="tcp:0:interface=127.0.0.1", token_file=None) -> AdminService:
        return AdminService(model.Admin(listen=listen, token_file=token_file), self.target, reactor)

    def test_token_file_aborts_start(self):
        """An unreadable token file stops start-up, before anything binds."""
        service = self.service(token_file=self.mktemp())
        self.assertRaises(AdminTokenError, service.privilegedStartService)
        self.assertIsNone(service.port)
        self.assertFalse(service.running)

    def test_bind_failure_aborts_start(self):
        """An admin address in use stops start-up with the bind error."""
        busy = socket.socket()
        self.addCleanup(busy.close)
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        port = busy.getsockname()[1]
        service = self.service(listen=f"tcp:{port}:interface=127.0.0.1")
        self.assertRaises(CannotListenError, service.startService)

    def test_default_loopback(self):
        """By default the admin API listens on loopback only (CONFIG.md)."""
        self.assertEqual(model.Admin().listen, "tcp:9901:interface=127.0.0.1")
        service = AdminService(model.Admin(), self.target, reactor)
        self.assertEqual(service.description, "tcp:9901:interface=127.0.0.1")
        self.assertEqual(service.name, "admin")

    @inlineCallbacks
    def test_stop_closes_connections(self):
        """
        Stopping closes connections kept alive by browsers, so that the
        process can exit without waiting for their idle timeout.
        """
        service = self.service()
        service.startService()
        port = service.port.getHost().port
        protocol = yield connectProtocol(
            TCP4ClientEndpoint(reactor, "127.0.0.1", port), _Recorder()
        )
        protocol.transport.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        yield wait_for(lambda: b"\r\n\r\nok\n" in protocol.received, what="the answer")
        yield service.stopService()
        yield wait_for(lambda: protocol.lost, what="the connection to close")
        self.assertFalse(service.running)

    def test_token_read_at_start(self):
        """The token is read when the service starts, not when it is built."""
        path = self.mktemp()
        service = self.service(token_file=path)
        with open(path, "w") as f:
            f.write("later\n")
        service.startService()
        self.addCleanup(service.stopService)
        self.assertTrue(service.resource._authorized(_FakeRequest(b"Bearer later")))
        self.assertFalse(service.resource._authorized(_FakeRequest(None)))


class _Recorder(Protocol):
    def __init__(self):
        self.received = b""
        self.lost = False

    def dataReceived(self, data):
        self.received += data

    def connectionLost(self, reason):
        self.lost = True


class _FakeRequest:
    def __init__(self, authorization):
        self._authorization = authorization

    def getHeader(self, name):
        return self._authorization if name == b"authorization" else None


class ConfigTests(unittest.SynchronousTestCase):
    """The admin section of the config is accepted now."""

    def test_admin_section(self):
        """admin: with listen and token_file validates into the model."""
        config = load(
            """
            admin: {listen: "tcp:9901:interface=127.0.0.1", token_file: /run/balance/token}
            listeners: [{name: a, listen: "tcp:8080", cluster: c}]
            clusters: [{name: c, backends: ["127.0.0.1:1"]}]
            """
        )
        self.assertEqual(
            config.admin,
            model.Admin(listen="tcp:9901:interface=127.0.0.1", token_file="/run/balance/token"),
        )

    def test_admin_defaults(self):
        """An empty admin section listens on loopback port 9901, without a token."""
        config = load(
            """
            admin: {}
            listeners: [{name: a, listen: "tcp:8080", cluster: c}]
            clusters: [{name: c, backends: ["127.0.0.1:1"]}]
            """
        )
        self.assertEqual(config.admin, model.Admin())

    def test_bad_listen(self):
        """A listen address that is not an endpoint string is a config error."""
        e = self.assertRaises(
            ConfigError,
            load,
            """
            admin: {listen: "nonsense:1"}
            listeners: [{name: a, listen: "tcp:8080", cluster: c}]
            clusters: [{name: c, backends: ["127.0.0.1:1"]}]
            """,
        )
        [error] = e.errors
        self.assertTrue(error.startswith("t.yaml:2: admin.listen: "), error)
