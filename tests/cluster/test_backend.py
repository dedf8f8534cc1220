"""
Tests for L{balance.cluster.backend}.
"""

from __future__ import annotations

from twisted.internet.endpoints import (
    HostnameEndpoint,
    TCP4ClientEndpoint,
    TCP6ClientEndpoint,
)
from twisted.internet.protocol import Factory
from twisted.internet.testing import MemoryReactorClock
from twisted.trial.unittest import SynchronousTestCase

from balance.cluster.backend import Backend, client_endpoint
from balance.cluster.endpoint import LeanTCP4ClientEndpoint, LeanTCP6ClientEndpoint
from balance.config import model


class BackendTests(SynchronousTestCase):
    """A runtime backend mirrors its config and carries mutable state."""

    def setUp(self):
        self.reactor = MemoryReactorClock()
        self.config = model.Backend(address="127.0.0.1:9001", host="127.0.0.1", port=9001, weight=3)

    def test_from_config(self):
        """Address, host, port and weight come from the config; state starts clean."""
        b = Backend.build(self.config, self.reactor, 2.0)
        self.assertIs(b.model, self.config)
        self.assertEqual(
            (b.address, b.host, b.port, b.weight, b.active, b.healthy, b.drained),
            ("127.0.0.1:9001", "127.0.0.1", 9001, 3, 0, True, False),
        )

    def test_eligible(self):
        """Only a healthy backend that is not drained is eligible."""
        b = Backend(self.config)
        self.assertTrue(b.eligible)
        b.drained = True
        self.assertFalse(b.eligible)
        b.drained = False
        b.healthy = False
        self.assertFalse(b.eligible)
        b.healthy = True
        self.assertTrue(b.eligible)

    def test_slots(self):
        """Backends have no per-instance dict, and reject unknown attributes."""
        b = Backend(self.config)
        self.assertFalse(hasattr(b, "__dict__"))
        self.assertRaises(AttributeError, setattr, b, "colour", "blue")

    def test_repr(self):
        """The repr names the address and the flags that matter."""
        b = Backend(self.config)
        b.healthy = False
        b.drained = True
        self.assertEqual(repr(b), "<Backend 127.0.0.1:9001 active=0 unhealthy drained>")

    def test_endpoint_built_once(self):
        """The endpoint is made once, and connects with the connect timeout."""
        b = Backend.build(self.config, self.reactor, 0.75)
        endpoint = b.endpoint
        endpoint.connect(Factory())
        self.assertIs(b.endpoint, endpoint)
        host, port, _, timeout, _ = self.reactor.tcpClients[0]
        self.assertEqual((host, port, timeout), ("127.0.0.1", 9001, 0.75))

    def test_endpoint_kinds(self):
        """
        IPv4 and IPv6 literals connect directly; names go through
        HostnameEndpoint, which resolves without blocking.
        """
        r = self.reactor
        self.assertIsInstance(client_endpoint(r, "10.1.2.3", 80, 1), LeanTCP4ClientEndpoint)
        self.assertIsInstance(client_endpoint(r, "::1", 80, 1), LeanTCP6ClientEndpoint)
        self.assertIsInstance(client_endpoint(r, "10.1.2.3", 80, 1), TCP4ClientEndpoint)
        self.assertIsInstance(client_endpoint(r, "::1", 80, 1), TCP6ClientEndpoint)
        self.assertIsInstance(client_endpoint(r, "fe80::1%lo", 80, 1), TCP6ClientEndpoint)
        self.assertIsInstance(client_endpoint(r, "backend.internal", 80, 1), HostnameEndpoint)

    def test_ipv6_endpoint_connects(self):
        """An IPv6 literal backend connects to that address."""
        config = model.Backend(address="[::1]:9002", host="::1", port=9002)
        Backend.build(config, self.reactor, 2.0).endpoint.connect(Factory())
        host, port, _, timeout, _ = self.reactor.tcpClients[0]
        self.assertEqual((host, port, timeout), ("::1", 9002, 2.0))


class BackendStateTests(SynchronousTestCase):
    """Eligibility, recovery and naming."""

    def setUp(self):
        self.config = model.Backend(address="127.0.0.1:9001", host="127.0.0.1", port=9001)

    def test_ejected(self):
        """An ejected backend is not eligible until the ejection ends."""
        b = Backend(self.config)
        b.ejected = True
        self.assertFalse(b.eligible)
        self.assertEqual(repr(b), "<Backend 127.0.0.1:9001 active=0 ejected>")
        b.ejected = False
        self.assertTrue(b.eligible)

    def test_on_recovery(self):
        """
        C{on_recovery} runs when a backend comes back into service: healthy
        again, or back from ejection; not on other changes.
        """
        b = Backend(self.config)
        recovered = []
        b.on_recovery = recovered.append
        b.healthy = True
        b.drained = True
        b.drained = False
        b.healthy = False
        self.assertEqual(recovered, [])
        b.healthy = True
        b.ejected = True
        b.ejected = False
        self.assertEqual(recovered, [b, b])

    def test_ip_literal(self):
        """An IP-literal backend's ip is its host, and its name its address."""
        b = Backend(self.config)
        self.assertEqual((b.ip, b.name), ("127.0.0.1", "127.0.0.1:9001"))
        self.assertEqual(b.healthy_since, float("-inf"))

    def test_resolved_name(self):
        """
        A backend resolved from a host name keeps the configured address and
        shows the IP in its name; its endpoint connects to the IP.
        """
        reactor = MemoryReactorClock()
        config = model.Backend(address="db.internal:5432", host="db.internal", port=5432)
        unresolved = Backend.build(config, reactor, 1.0)
        self.assertIsNone(unresolved.ip)
        self.assertEqual(unresolved.name, "db.internal:5432")
        self.assertIsInstance(unresolved.endpoint, HostnameEndpoint)
        b = Backend.build(config, reactor, 1.0, ip="10.1.2.3")
        self.assertEqual(
            (b.address, b.ip, b.name),
            ("db.internal:5432", "10.1.2.3", "db.internal:5432 (10.1.2.3)"),
        )
        b.endpoint.connect(Factory())
        self.assertEqual(reactor.tcpClients[0][:2], ("10.1.2.3", 5432))
