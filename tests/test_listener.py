"""
Tests for L{balance.listener.ListenerService}, over real loopback sockets.
"""

from __future__ import annotations

import os
import socket

from twisted.application.service import Application, IService
from twisted.internet import error, reactor, tcp
from twisted.internet.defer import inlineCallbacks
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger, LogLevel, formatEvent
from twisted.trial.unittest import TestCase

from balance._io import LeanServer
from balance.cluster.cluster import Cluster
from balance.config import model
from balance.l4.relay import L4ProxyFactory
from balance.listener import ListenerService
from tests.helpers import (
    CheckingClient,
    EchoFactory,
    SilentFactory,
    backend_model,
    connect_client,
    wait_for,
)

LOCAL = "tcp:0:interface=127.0.0.1"


class ListenTests(TestCase):
    """Starting listens; a port that cannot be bound stops startup."""

    def test_listens(self):
        """Once started, the port is bound and reachable as C{service.port}."""
        echo = EchoFactory()
        service = ListenerService(LOCAL, echo, reactor, 1.0)
        service.startService()
        self.addCleanup(service.stopService)
        self.assertTrue(service.running)
        self.assertNotEqual(service.port.getHost().port, 0)
        client = CheckingClient(b"hi")
        return connect_client(service.port.getHost().port, client).addCallback(
            lambda _: client.lost
        )

    @inlineCallbacks
    def test_lean_transports(self):
        """
        Accepted connections hold no log prefix or repr strings; both are
        still there when asked for, also after the connection closed.
        """
        echo = EchoFactory()
        service = ListenerService(LOCAL, echo, reactor, 1.0)
        service.startService()
        self.addCleanup(service.stopService)
        port = service.port.getHost().port
        client = CheckingClient(b"hi")
        yield connect_client(port, client)
        yield wait_for(lambda: echo.protocols, what="the connection accepted")
        transport = echo.protocols[0].transport
        self.assertIsInstance(transport, LeanServer)
        self.assertNotIn("logstr", vars(transport))
        self.assertNotIn("repstr", vars(transport))
        name = type(echo.protocols[0]).__name__
        self.assertEqual(transport.logPrefix(), f"{name},{transport.sessionno},127.0.0.1")
        self.assertEqual(repr(transport), f"<{name} #{transport.sessionno} on {port}>")
        yield client.lost
        self.assertIn(",127.0.0.1", transport.logPrefix())

    def test_lean_transport_state(self):
        """
        A L{LeanServer} starts with the state Twisted's C{tcp.Server} would
        have (less the two strings), so Twisted's code works on it.
        """
        port = reactor.listenTCP(0, Factory(), interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        made = []
        for kind in (tcp.Server, LeanServer):
            a, b = socket.socketpair()
            self.addCleanup(b.close)
            transport = kind(a, Protocol(), ("127.0.0.1", 4321), port, 7, reactor)
            transport.stopReading()
            self.addCleanup(a.close)
            made.append(transport)
        a = made[1].socket
        twisted_server, lean = made
        self.assertEqual(
            set(vars(lean)), set(vars(twisted_server)) - {"logstr", "repstr", "fileno"}
        )
        self.assertEqual(lean.fileno(), a.fileno())
        self.assertEqual(lean.getPeer(), twisted_server.getPeer())

    @inlineCallbacks
    def test_many_connections_at_once(self):
        """Connections that wait together are all accepted and served."""
        echo = EchoFactory()
        service = ListenerService(LOCAL, echo, reactor, 1.0)
        service.startService()
        self.addCleanup(service.stopService)
        port = service.port.getHost().port
        clients = [CheckingClient(b"hi %d" % i) for i in range(40)]
        for c in clients:
            yield connect_client(port, c)
        for c in clients:
            yield c.lost
        self.assertEqual(len(echo.protocols), 40)

    @inlineCallbacks
    def test_nodelay_on_listening_socket(self):
        """
        With C{nodelay}, the listening socket has TCP_NODELAY, and so has
        each accepted socket (Linux passes it on).
        """
        echo = EchoFactory()
        service = ListenerService(LOCAL, echo, reactor, 1.0, nodelay=True)
        service.startService()
        self.addCleanup(service.stopService)
        self.assertTrue(service.port.balance_nodelay)
        client = CheckingClient(b"hi")
        yield connect_client(service.port.getHost().port, client)
        yield wait_for(lambda: echo.protocols, what="the connection accepted")
        accepted = echo.protocols[0].transport.socket
        self.assertEqual(accepted.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY), 1)
        yield client.lost
        plain = ListenerService(LOCAL, EchoFactory(), reactor, 1.0)
        plain.startService()
        self.addCleanup(plain.stopService)
        self.assertFalse(plain.port.balance_nodelay)
        self.assertEqual(
            plain.port.socket.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY), 0
        )

    def test_bind_failure_raises(self):
        """
        A port that is taken makes startService raise, as twistd needs to
        abort at startup.
        """
        taken = reactor.listenTCP(0, Factory(), interface="127.0.0.1")
        self.addCleanup(taken.stopListening)
        description = f"tcp:{taken.getHost().port}:interface=127.0.0.1"
        service = ListenerService(description, Factory(), reactor, 1.0)
        self.assertRaises(error.CannotListenError, service.startService)
        self.assertIsNone(service.port)

    def test_bind_failure_in_application(self):
        """
        Through twistd's start sequence (privilegedStartService on the
        application), a bind failure raises too.
        """
        taken = reactor.listenTCP(0, Factory(), interface="127.0.0.1")
        self.addCleanup(taken.stopListening)
        application = Application("test")
        service = ListenerService(
            f"tcp:{taken.getHost().port}:interface=127.0.0.1", Factory(), reactor, 1.0
        )
        service.setServiceParent(application)
        self.assertRaises(error.CannotListenError, IService(application).privilegedStartService)

    def test_bad_description(self):
        """An invalid endpoint string is refused when the service is made."""
        self.assertRaises(ValueError, ListenerService, "bogus:1", Factory(), reactor, 1.0)

    def test_stop_unstarted(self):
        """Stopping a service that never started succeeds at once."""
        service = ListenerService(LOCAL, Factory(), reactor, 1.0)
        self.successResultOf(service.stopService())

    @inlineCallbacks
    def test_factory_without_drain(self):
        """A factory without C{drain} is not waited for: stopping only stops listening."""
        service = ListenerService(LOCAL, Factory(), reactor, 1.0)
        service.startService()
        yield service.stopService()
        self.assertFalse(service.running)


class DrainTests(TestCase):
    """Stopping refuses new connections and lets those in flight finish."""

    timeout = 30

    def start(self, backend, drain_timeout):
        port = reactor.listenTCP(0, backend, interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        cluster = Cluster(
            model.Cluster(name="api", backends=[backend_model("127.0.0.1", port.getHost().port)]),
            reactor,
        )
        listener = model.Listener(name="l4", listen=LOCAL, protocol="tcp", cluster="api")
        self.factory = L4ProxyFactory(listener, {"api": cluster}, reactor)
        self.service = ListenerService(LOCAL, self.factory, reactor, drain_timeout)
        self.events = []
        self.service.log = Logger(observer=self.events.append, namespace="test")
        self.service.startService()
        self.addCleanup(
            lambda: wait_for(lambda: backend.open == 0, what="backend connections closed")
        )
        return self.service.port.getHost().port

    @inlineCallbacks
    def test_drain_empty(self):
        """With nothing in flight, stopping fires as soon as the port is closed."""
        self.start(EchoFactory(), 30.0)
        yield self.service.stopService()
        self.assertFalse(self.service.running)

    @inlineCallbacks
    def test_drain(self):
        """
        After stopService new connections are refused, while a transfer in
        flight completes byte for byte; then the stop Deferred fires.
        """
        port = self.start(EchoFactory(), 30.0)
        payload = os.urandom(2 * 1024 * 1024)
        client = CheckingClient(payload, half_close=False)
        yield connect_client(port, client)
        yield wait_for(lambda: client.received > 0, what="the transfer to start")

        stopped = self.service.stopService()
        yield wait_for(lambda: not self.service.running, what="the port to close")
        late = CheckingClient(b"late")
        yield self.assertFailure(connect_client(port, late), error.ConnectionRefusedError)
        self.assertNoResult(stopped)
        self.assertEqual(self.factory.active, 1)

        yield wait_for(lambda: client.received == len(payload), what="the whole echo")
        self.assertNoResult(stopped)
        client.transport.loseWriteConnection()
        yield client.lost
        self.assertTrue(client.complete)
        yield stopped
        self.assertEqual(self.factory.active, 0)
        self.assertEqual(self.events, [])

    @inlineCallbacks
    def test_drain_timeout_aborts(self):
        """A connection still open after the drain timeout is aborted, and stop fires."""
        silent = SilentFactory()
        port = self.start(silent, 0.2)
        client = CheckingClient(b"stuck", half_close=False, expected=b"")
        yield connect_client(port, client)
        yield wait_for(lambda: silent.protocols and silent.protocols[0].received == b"stuck")
        started = reactor.seconds()
        yield self.service.stopService()
        self.assertGreaterEqual(reactor.seconds() - started, 0.2)
        self.assertEqual(self.factory.active, 0)
        yield client.lost
        yield silent.protocols[0].lost
        warnings = [formatEvent(e) for e in self.events if e["log_level"] is LogLevel.warn]
        self.assertEqual(
            warnings,
            [f"listener {LOCAL} did not drain within 0.2s; aborting 1 connections"],
        )


class AcceptErrorLogTests(TestCase):
    """Connections refused for want of descriptors are logged once per episode."""

    def test_once_per_episode(self):
        from twisted.internet.task import Clock
        from twisted.logger import globalLogPublisher

        from balance.listener import _AcceptErrorLog

        clock = Clock()
        passed, warnings = [], []

        def capture(event):
            if "out of file descriptors" in (event.get("log_format") or ""):
                warnings.append(event)

        globalLogPublisher.addObserver(capture)
        self.addCleanup(globalLogPublisher.removeObserver, capture)
        log = _AcceptErrorLog(passed.append, "tcp:80", clock, quiet=60)
        emfile = {"log_format": "EMFILE recovery: Closed socket from {address}"}
        for _ in range(500):
            log(emfile)
            clock.advance(0.01)
        log({"log_format": "Could not accept new connection ({acceptError})"})
        self.assertEqual(len(warnings), 1)
        clock.advance(61)
        log(emfile)
        self.assertEqual(len(warnings), 2)
        log({"log_format": "something else"})
        self.assertEqual(passed, [{"log_format": "something else"}])


class BacklogTests(TestCase):
    """Listeners get a real backlog unless the endpoint string sets one."""

    def test_default_backlog(self):
        from balance.listener import BACKLOG, with_backlog

        self.assertEqual(with_backlog("tcp:80"), f"tcp:80:backlog={BACKLOG}")
        self.assertEqual(
            with_backlog("tcp6:80:interface=\\:\\:1"), f"tcp6:80:interface=\\:\\:1:backlog={BACKLOG}"
        )
        self.assertEqual(with_backlog("unix:/run/b.sock"), f"unix:/run/b.sock:backlog={BACKLOG}")
        self.assertEqual(with_backlog("tcp:80:backlog=5"), "tcp:80:backlog=5")
        self.assertEqual(with_backlog("systemd:domain=INET:index=0"), "systemd:domain=INET:index=0")

    def test_listening_socket_backlog(self):
        """The port is bound with that backlog."""
        from balance.listener import BACKLOG

        service = ListenerService("tcp:0:interface=127.0.0.1", Factory(), reactor, 1)
        service.privilegedStartService()
        self.addCleanup(service.stopService)
        self.assertEqual(service.port.backlog, BACKLOG)
