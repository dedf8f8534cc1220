"""
Load-balancing policies over real loopback sockets: a real L4 listener,
real echo backends, real clients, on the reactor trial runs.
"""

from __future__ import annotations

from random import Random

from twisted.internet import reactor
from twisted.internet.defer import DeferredList, inlineCallbacks
from twisted.logger import Logger
from twisted.trial.unittest import TestCase

from balance.cluster.cluster import Cluster
from balance.config import model
from balance.l4.relay import L4ProxyFactory
from balance.listener import ListenerService
from tests.helpers import CheckingClient, EchoFactory, backend_model, connect_client, wait_for


class PolicyIntegrationTests(TestCase):
    """The configured policy decides where real connections go."""

    timeout = 60

    def setUp(self):
        self.clients: list[CheckingClient] = []
        self.events: list = []
        self.echoes: list[EchoFactory] = []

    def start_proxy(self, backends, **cluster_options):
        """
        Listen with an echo backend per C{(name, weight)} of C{backends}
        (or the given address), and start an L4 proxy over them.
        """
        configs = []
        for name, weight in backends:
            if isinstance(name, str) and ":" in name:
                host, port = name.rsplit(":", 1)
                configs.append(
                    model.Backend(address=name, host=host, port=int(port), weight=weight)
                )
                continue
            echo = EchoFactory(name)
            port = reactor.listenTCP(0, echo, interface="127.0.0.1")
            self.addCleanup(port.stopListening)
            self.echoes.append(echo)
            configs.append(backend_model("127.0.0.1", port.getHost().port, weight))
        self.cluster = Cluster(
            model.Cluster(name="api", backends=configs, connect_timeout=5.0, **cluster_options),
            reactor,
            rng=Random(1),
        )
        self.cluster.log = Logger(observer=self.events.append, namespace="cluster")
        listener = model.Listener(
            name="l4", listen="tcp:0:interface=127.0.0.1", protocol="tcp", cluster="api"
        )
        self.factory = L4ProxyFactory(listener, {"api": self.cluster}, reactor)
        self.service = ListenerService(listener.listen, self.factory, reactor, 5.0)
        self.service.startService()
        self.port = self.service.port.getHost().port
        self.addCleanup(self._stop)

    @inlineCallbacks
    def _stop(self):
        for client in self.clients:
            if not client.lost.called and client.transport is not None:
                client.transport.abortConnection()
        yield DeferredList([c.lost for c in self.clients if c.transport is not None])
        self.cluster.stop()
        if self.service.running:
            yield self.service.stopService()
        yield wait_for(lambda: all(f.open == 0 for f in self.echoes), what="backends closed")

    def client(self, payload: bytes) -> CheckingClient:
        client = CheckingClient(payload)
        self.clients.append(client)
        connect_client(self.port, client).addErrback(client.lost.errback)
        return client

    @inlineCallbacks
    def test_weighted_round_robin(self):
        """
        weighted_round_robin with weights 3 and 1: of 40 concurrent
        connections, exactly 30 reach the first backend and 10 the second,
        every echo intact.
        """
        self.start_proxy([("heavy", 3), ("light", 1)], lb="weighted_round_robin")
        clients = [self.client(b"hello %d" % i) for i in range(40)]
        yield DeferredList([c.lost for c in clients], fireOnOneErrback=True)
        self.assertTrue(all(c.complete for c in clients))
        self.assertEqual([len(f.protocols) for f in self.echoes], [30, 10])
        yield wait_for(lambda: self.factory.active == 0, what="proxy connections closed")
        self.assertEqual([b.active for b in self.cluster.backends], [0, 0])

    @inlineCallbacks
    def test_least_connections_avoids_busy(self):
        """
        least_connections over two backends: six long-lived connections
        split 3 and 3; once the second backend's three end, the next three
        connections all go to it, the less loaded one.
        """
        self.start_proxy([("a", 1), ("b", 1)], lb="least_connections")
        a, b = self.cluster.backends
        for i in range(6):
            # Clients that never shut down their side: the tunnels stay open.
            client = CheckingClient(b"held %d" % i, half_close=False)
            self.clients.append(client)
            connect_client(self.port, client).addErrback(client.lost.errback)
        yield wait_for(lambda: a.active + b.active == 6, what="six tunnels open")
        self.assertEqual((a.active, b.active), (3, 3))
        # Counted at connect time: wait until the backends have them all.
        yield wait_for(
            lambda: [len(f.protocols) for f in self.echoes] == [3, 3],
            what="the backends accepted all six",
        )
        for protocol in self.echoes[1].protocols:
            protocol.transport.loseConnection()
        yield wait_for(lambda: b.active == 0, what="the second backend's tunnels closed")
        clients = [self.client(b"next %d" % i) for i in range(3)]
        yield DeferredList([c.lost for c in clients], fireOnOneErrback=True)
        self.assertTrue(all(c.complete for c in clients))
        self.assertEqual([len(f.protocols) for f in self.echoes], [3, 6])

    @inlineCallbacks
    def test_resolved_name(self):
        """
        A backend named "localhost" is resolved through the reactor's real
        resolver, without blocking, into one backend per address; traffic
        flows to the address the echo server listens on.
        """
        echo = EchoFactory("named")
        port = reactor.listenTCP(0, echo, interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        self.echoes.append(echo)
        self.start_proxy([(f"localhost:{port.getHost().port}", 1)])
        yield self.cluster.start()
        ips = [b.ip for b in self.cluster.backends]
        self.assertIn("127.0.0.1", ips)
        self.assertEqual(
            {b.address for b in self.cluster.backends}, {f"localhost:{port.getHost().port}"}
        )
        for b in self.cluster.backends:
            if b.ip != "127.0.0.1":
                b.drained = True
        client = self.client(b"by name")
        yield client.lost
        self.assertTrue(client.complete)
        self.assertEqual(len(echo.protocols), 1)
