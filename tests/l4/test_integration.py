"""
The L4 proxy over real loopback sockets: real clients, a real listener, real
backends (tests.helpers), all on the reactor trial runs.
"""

from __future__ import annotations

import os
from collections import Counter

import attrs
from twisted.internet import error, reactor
from twisted.internet.defer import Deferred, DeferredList, inlineCallbacks
from twisted.internet.interfaces import IHalfCloseableProtocol
from twisted.internet.protocol import Protocol
from twisted.logger import Logger, LogLevel, formatEvent
from twisted.trial.unittest import SkipTest, TestCase
from zope.interface import implementer

from balance.cluster.cluster import Cluster
from balance.config import model
from balance.l4 import splice
from balance.l4.relay import L4ProxyFactory
from balance.listener import ListenerService
from balance.observe.metrics import ListenerMetrics
from tests.helpers import (
    CheckingClient,
    EchoFactory,
    SilentFactory,
    StreamFactory,
    backend_model,
    buffered,
    closed_port,
    connect_client,
    ipv6_available,
    wait_for,
)

MiB = 1024 * 1024


class ProxyTestCase(TestCase):
    """
    Runs an L4 proxy in front of real backends, and leaves nothing open:
    clients, proxy and backends are all closed and waited for.
    """

    timeout = 60
    #: Whether the proxy may splice (the fallback test classes say no).
    splice = True

    def setUp(self):
        self.clients = []
        self.events = []

    def start_proxy(self, backends, idle=60.0, host="127.0.0.1", extra=()):
        """
        Listen with each factory of C{backends} on C{host}, and start a proxy
        over them plus the C{(host, port)} pairs of C{extra}.
        """
        self.backends = list(backends)
        addresses = list(extra)
        for factory in self.backends:
            port = reactor.listenTCP(0, factory, interface=host)
            self.addCleanup(port.stopListening)
            addresses.append((host, port.getHost().port))
        self.cluster = Cluster(
            model.Cluster(
                name="api",
                backends=[backend_model(h, p) for h, p in addresses],
                connect_timeout=5.0,
            ),
            reactor,
        )
        self.cluster.log = Logger(observer=self.events.append, namespace="cluster")
        listener = model.Listener(
            name="l4",
            listen="tcp:0:interface=127.0.0.1",
            protocol="tcp",
            cluster="api",
            timeouts=model.Timeouts(idle=idle),
        )
        self.factory = L4ProxyFactory(listener, {"api": self.cluster}, reactor)
        self.factory.log = Logger(observer=self.events.append, namespace="relay")
        self.factory.splice = self.splice
        self.service = ListenerService(listener.listen, self.factory, reactor, 5.0)
        self.service.startService()
        self.port = self.service.port.getHost().port
        self.addCleanup(self._stop_proxy)
        self.addCleanup(self._close_clients)

    @inlineCallbacks
    def _close_clients(self):
        for client in self.clients:
            if not client.lost.called and client.transport is not None:
                client.transport.abortConnection()
        yield DeferredList([c.lost for c in self.clients if c.transport is not None])

    @inlineCallbacks
    def _stop_proxy(self):
        if self.service.running:
            yield self.service.stopService()
        yield wait_for(
            lambda: all(f.open == 0 for f in self.backends), what="backend connections closed"
        )

    def client(self, *args, **kwargs):
        """Connect a L{CheckingClient} to the proxy; return it."""
        client = CheckingClient(*args, **kwargs)
        self.clients.append(client)
        connect_client(self.port, client).addErrback(client.lost.errback)
        return client

    def sessions(self):
        return list(self.factory._sessions)

    def warnings(self):
        return [formatEvent(e) for e in self.events if e["log_level"] is LogLevel.warn]


class EchoTests(ProxyTestCase):
    """Bytes go through the proxy and back intact, spread over the backends."""

    @inlineCallbacks
    def test_many_clients_large_transfers(self):
        """
        Twenty concurrent clients each send 5 MB of random bytes and get the
        same bytes back; connections go round robin over three backends.
        """
        self.start_proxy([EchoFactory(name) for name in "abc"])
        payloads = [os.urandom(5 * MiB) for _ in range(20)]
        clients = [self.client(p) for p in payloads]
        yield DeferredList([c.lost for c in clients], fireOnOneErrback=True)
        for i, c in enumerate(clients):
            self.assertTrue(c.complete, f"client {i}: {c.received} bytes, mismatch {c.mismatch}")
        counts = Counter(f.name for f in self.backends for _ in f.protocols)
        self.assertEqual(sorted(counts.values()), [6, 7, 7])
        received = sorted(p.received for f in self.backends for p in f.protocols)
        self.assertEqual(received, [5 * MiB] * 20)
        yield wait_for(lambda: self.factory.active == 0, what="proxy connections closed")
        self.assertEqual([b.active for b in self.cluster.backends], [0, 0, 0])
        self.assertEqual(self.events, [])

    @inlineCallbacks
    def test_refused_backend_skipped(self):
        """
        A backend that refuses connections is skipped: clients see no error,
        and the failure is logged with the backend and reason.
        """
        dead = closed_port()
        self.start_proxy([EchoFactory("live")], extra=[("127.0.0.1", dead)])
        clients = [self.client(b"ping %d" % i) for i in range(4)]
        yield DeferredList([c.lost for c in clients], fireOnOneErrback=True)
        self.assertTrue(all(c.complete for c in clients))
        self.assertEqual(len(self.backends[0].protocols), 4)
        self.assertIn(
            f"connect to 127.0.0.1:{dead} in cluster api failed (connection refused); "
            "trying next backend",
            self.warnings(),
        )

    @inlineCallbacks
    def test_hostname_backend(self):
        """A backend given by host name is resolved (without blocking) and used."""
        echo = EchoFactory("named")
        port = reactor.listenTCP(0, echo, interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        self.start_proxy([], extra=[("localhost", port.getHost().port)])
        self.backends.append(echo)
        self.assertEqual(self.cluster.backends[0].host, "localhost")
        client = self.client(b"by name")
        yield client.lost
        self.assertTrue(client.complete)
        self.assertEqual(len(echo.protocols), 1)

    @inlineCallbacks
    def test_ipv6_backend(self):
        """An IPv6 literal backend works."""
        if not ipv6_available():
            raise SkipTest("no IPv6 loopback here")
        self.start_proxy([EchoFactory("v6")], host="::1")
        self.assertEqual(self.cluster.backends[0].address[:5], "[::1]")
        client = self.client(os.urandom(100_000))
        yield client.lost
        self.assertTrue(client.complete)


class FlowControlTests(ProxyTestCase):
    """A slow reader holds the sender back instead of filling the proxy."""

    @inlineCallbacks
    def test_slow_reader_bounded_buffers(self):
        """
        While the client does not read, a backend trying to send 50 MB is
        held back, and the proxy's own buffers stay under 1 MiB; once the
        client reads, all 50 MB arrive.
        """
        total = 50 * MiB
        stream = StreamFactory(total)
        self.start_proxy([stream])
        client = self.client(b"", expected=b"s" * total, half_close=False)
        yield client.ready
        client.transport.pauseProducing()
        yield wait_for(lambda: stream.protocols and self.sessions(), what="proxied connection")
        (session,) = self.sessions()
        backend = stream.protocols[0]

        def proxy_buffered():
            return buffered(session.transport) + buffered(session._up)

        # Wait until the whole chain is stalled (the backend is paused by its
        # transport and the proxy has stopped reading from the backend), or
        # until the backend got everything out, which only a proxy without
        # flow control allows.
        yield wait_for(
            lambda: (backend.paused and (session.transport.producerPaused or session._splice))
            or backend.sent == total,
            what="the backend to stall or finish",
        )
        self.assertLess(proxy_buffered(), MiB)
        self.assertLess(backend.sent, total // 2)

        peak = [0]

        def sample():
            peak[0] = max(peak[0], proxy_buffered())

        client.on_data = sample
        client.transport.resumeProducing()
        yield client.lost
        self.assertTrue(client.complete, f"{client.received} bytes, mismatch {client.mismatch}")
        self.assertLess(peak[0], MiB)


class HalfCloseTests(ProxyTestCase):
    """Shutting down one direction leaves the other flowing."""

    @inlineCallbacks
    def test_client_half_close(self):
        """
        A client that sends, then shuts down its write half, still gets the
        whole answer, then EOF.
        """
        self.start_proxy([EchoFactory("echo")])
        client = self.client(os.urandom(2 * MiB), half_close=True)
        yield client.lost
        self.assertTrue(client.complete)
        self.assertTrue(client.reason.check(error.ConnectionDone))

    @inlineCallbacks
    def test_backend_half_close(self):
        """
        A backend that answers, then shuts down its write half, still
        receives everything the client sends after that.
        """
        backends = _GreetingFactory()
        self.start_proxy([backends])
        client = _ReplyAfterEOF()
        self.clients.append(client)
        yield connect_client(self.port, client)
        yield client.lost
        self.assertEqual(client.received, b"hello")
        yield wait_for(lambda: backends.protocols and backends.protocols[0].lost.called)
        self.assertEqual(backends.protocols[0].received, b"thanks, and bye")


@implementer(IHalfCloseableProtocol)
class _Greeting(Protocol):
    """Says hello, shuts down its write half, and records what it gets."""

    def __init__(self):
        self.received = b""
        self.lost = Deferred()

    def connectionMade(self):
        self.transport.write(b"hello")
        self.transport.loseWriteConnection()

    def dataReceived(self, data):
        self.received += data

    def readConnectionLost(self):
        self.transport.loseConnection()

    def writeConnectionLost(self):
        pass

    def connectionLost(self, reason):
        self.reason = reason
        self.lost.callback(None)


class _GreetingFactory(SilentFactory):
    protocol = _Greeting


@implementer(IHalfCloseableProtocol)
class _ReplyAfterEOF(Protocol):
    """Reads until EOF, then answers and closes its write half."""

    def __init__(self):
        self.received = b""
        self.lost = Deferred()

    def dataReceived(self, data):
        self.received += data

    def readConnectionLost(self):
        self.transport.write(b"thanks, ")
        self.transport.write(b"and bye")
        self.transport.loseWriteConnection()

    def writeConnectionLost(self):
        self.transport.loseConnection()

    def connectionLost(self, reason):
        self.reason = reason
        self.lost.callback(None)


class _SlowFactory(SilentFactory):
    """A backend that does not read until told to (C{transport.resumeProducing()})."""

    class protocol(SilentFactory.protocol):
        def connectionMade(self):
            self.transport.pauseProducing()


class CloseTests(ProxyTestCase):
    """Either side going away closes the other."""

    @inlineCallbacks
    def connected_pair(self):
        silent = SilentFactory()
        self.start_proxy([silent])
        client = self.client(b"x", half_close=False, expected=b"")
        yield wait_for(lambda: silent.protocols and silent.protocols[0].received == b"x")
        return client, silent.protocols[0]

    @inlineCallbacks
    def test_client_abort_closes_upstream(self):
        """A client that resets the connection makes the backend see it close."""
        client, backend = yield self.connected_pair()
        client.transport.abortConnection()
        yield backend.lost
        yield wait_for(lambda: self.factory.active == 0)
        self.assertEqual(self.cluster.backends[0].active, 0)

    @inlineCallbacks
    def test_client_close_closes_upstream(self):
        """A client that closes makes the backend see the connection close."""
        client, backend = yield self.connected_pair()
        client.transport.loseConnection()
        yield backend.lost
        yield wait_for(lambda: self.factory.active == 0)

    @inlineCallbacks
    def test_backend_close_closes_client(self):
        """A backend that closes makes the client see the connection close."""
        client, backend = yield self.connected_pair()
        backend.transport.loseConnection()
        yield client.lost
        yield wait_for(lambda: self.factory.active == 0)

    @inlineCallbacks
    def test_backend_abort_closes_client(self):
        """A backend that resets the connection makes the client see it close."""
        client, backend = yield self.connected_pair()
        backend.transport.abortConnection()
        yield client.lost
        yield wait_for(lambda: self.factory.active == 0)
        self.assertEqual(self.cluster.backends[0].active, 0)

    @inlineCallbacks
    def test_bytes_before_close_delivered(self):
        """
        A client that sends 4 MB and closes at once: a backend that reads
        slowly still gets every byte, then sees the close.
        """
        slow = _SlowFactory()
        self.start_proxy([slow])
        payload = os.urandom(4 * MiB)
        client = self.client(payload, half_close=False, expected=b"")
        yield wait_for(lambda: client.sent == len(payload) and slow.protocols)
        client.transport.loseConnection()
        backend = slow.protocols[0]
        backend.transport.resumeProducing()
        yield backend.lost
        yield client.lost
        self.assertEqual(len(backend.received), len(payload))
        self.assertTrue(backend.received == payload)
        yield wait_for(lambda: self.factory.active == 0)

    @inlineCallbacks
    def test_idle_timeout(self):
        """A connection with no bytes either way for the idle timeout is closed on both sides."""
        silent = SilentFactory()
        self.start_proxy([silent], idle=0.2)
        started = reactor.seconds()
        client = self.client(b"", half_close=False, expected=b"")
        yield client.lost
        yield wait_for(lambda: silent.protocols and silent.protocols[0].lost.called)
        self.assertGreaterEqual(reactor.seconds() - started, 0.2)
        yield wait_for(lambda: self.factory.active == 0)

    @inlineCallbacks
    def test_idle_timeout_after_activity(self):
        """
        Bytes push the idle deadline back: a connection that echoes a byte
        every half timeout stays open well past the timeout; once quiet, it
        is closed no earlier than the timeout after its last byte, and not
        much later (deadlines are checked in buckets of 1/16 of it).
        """
        idle = 0.4
        self.start_proxy([EchoFactory()], idle=idle)
        client = self.client(b"", half_close=False, expected=b"x" * 4)
        yield client.ready
        started = reactor.seconds()
        for i in range(4):
            client.transport.write(b"x")
            yield wait_for(lambda n=i + 1: client.received == n, what="the echo")
            last = reactor.seconds()
            if i < 3:
                yield wait_for(lambda t=last: reactor.seconds() >= t + idle / 2, what="half idle")
        self.assertFalse(client.lost.called)
        yield client.lost
        closed = reactor.seconds()
        self.assertGreater(closed - started, 2 * idle)
        # The proxy saw the last byte a moment before the client did.
        self.assertGreaterEqual(closed - last, idle - 0.05)
        self.assertLess(closed - last, idle + idle / 16 + 0.5)
        yield wait_for(lambda: self.factory.active == 0)

    @inlineCallbacks
    def test_all_backends_down(self):
        """With every backend refusing, the client is closed promptly, with no bytes."""
        dead = [("127.0.0.1", closed_port()), ("127.0.0.1", closed_port())]
        self.start_proxy([], extra=dead)
        client = self.client(b"anyone?", half_close=False, expected=b"")
        yield client.lost
        self.assertEqual(client.received, 0)
        self.assertIn("closing connection from 127.0.0.1:", self.warnings()[-1])
        self.assertIn("no backend of cluster api accepted the connection", self.warnings()[-1])
        yield wait_for(lambda: self.factory.active == 0)


class AccessListTests(ProxyTestCase):
    """A tcp listener's allow/deny lists (CONFIG.md: close for tcp)."""

    @inlineCallbacks
    def test_denied_closed_allowed_relayed(self):
        """
        A client whose address a deny list names is closed at once and
        never reaches a backend; after the list changes to allow it, its
        bytes are relayed.
        """
        echo = EchoFactory()
        self.start_proxy([echo])
        self.factory.reconfigure(
            attrs.evolve(self.factory.listener, deny=("127.0.0.0/8",))
        )
        denied = self.client(b"secret", b"", half_close=False)
        yield denied.lost
        self.assertEqual(denied.received, 0)
        self.assertEqual(echo.protocols, [])
        self.factory.reconfigure(
            attrs.evolve(self.factory.listener, deny=(), allow=("127.0.0.1/32",))
        )
        allowed = self.client(b"hello")
        yield allowed.lost
        self.assertTrue(allowed.complete)
        self.assertEqual(len(echo.protocols), 1)


class SpliceTests(ProxyTestCase):
    """Where splice(2) is available, plain TCP tunnels use it."""

    def setUp(self):
        super().setUp()
        if not splice.ENABLED:
            raise SkipTest("splice(2) is not available here")

    @inlineCallbacks
    def test_tunnel_spliced_and_counted(self):
        """
        A proxied plain TCP connection is handed to the splice relay, and
        the listener's byte counters include what it moved.
        """
        self.start_proxy([EchoFactory()])
        self.factory.metrics = ListenerMetrics("l4")
        client = self.client(os.urandom(MiB), half_close=False)
        yield wait_for(lambda: client.received == MiB, what="the echo")
        (session,) = self.sessions()
        self.assertIsNotNone(session._splice)
        client.transport.loseConnection()
        yield client.lost
        yield wait_for(lambda: self.factory.active == 0)
        self.assertEqual(self.factory.metrics.bytes_in, MiB)
        self.assertEqual(self.factory.metrics.bytes_out, MiB)
        self.assertEqual(self.factory.metrics.connections_total, 1)
        self.assertEqual(self.factory.metrics.active, 0)


# Every behaviour above once more through the producer/consumer fallback (the
# path TLS tunnels and non-Linux systems take).
for _case in (EchoTests, FlowControlTests, HalfCloseTests, CloseTests, AccessListTests):
    _name = _case.__name__ + "Fallback"
    globals()[_name] = type(_name, (_case,), {"splice": False, "__module__": __name__})
del _case, _name
