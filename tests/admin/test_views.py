"""
The JSON documents of the admin API, built from live objects without HTTP:
field names, backend states, and secrets kept out of GET /config.
"""

from __future__ import annotations

import json

from twisted.internet.testing import MemoryReactorClock
from twisted.trial import unittest

from balance.admin import views
from tests.admin.fakes import FakeTarget, load


class BackendStateTests(unittest.SynchronousTestCase):
    """``state`` sums a backend's flags up in one word."""

    def setUp(self):
        target = FakeTarget(load(), MemoryReactorClock())
        self.backend = target.clusters["api"].backend("127.0.0.1:9001")

    def state(self):
        return views.backend_view(self.backend)["state"]

    def test_up(self):
        """A healthy backend nobody touched is up and eligible."""
        view = views.backend_view(self.backend)
        self.assertEqual((view["state"], view["health"], view["eligible"]), ("up", "healthy", True))

    def test_precedence(self):
        """
        An operator's drain shows over an ejection, which shows over failed
        health checks; the booleans keep every flag.
        """
        self.backend.healthy = False
        self.assertEqual(self.state(), "unhealthy")
        self.backend.ejected = True
        self.assertEqual(self.state(), "ejected")
        self.backend.drained = True
        self.assertEqual(self.state(), "drained")
        view = views.backend_view(self.backend)
        self.assertEqual(
            (view["healthy"], view["ejected"], view["drained"], view["health"]),
            (False, True, True, "unhealthy"),
        )

    def test_circuit_open(self):
        """A healthy backend whose circuit breaker is open shows it."""
        if not hasattr(type(self.backend), "circuit_open"):
            raise unittest.SkipTest("backends have no circuit breaker flag yet")
        self.backend.circuit_open = True
        view = views.backend_view(self.backend)
        self.assertEqual(
            (view["state"], view["circuit_open"], view["eligible"]), ("circuit_open", True, False)
        )
        self.backend.healthy = False
        self.assertEqual(self.state(), "unhealthy")


class ConfigViewTests(unittest.SynchronousTestCase):
    """GET /config: every field, as JSON, with secrets redacted."""

    CONFIG = """
    admin: {listen: "tcp:9901:interface=127.0.0.1", token_file: /etc/balance/admin.token}
    listeners:
      - name: web
        listen: "tcp:8080"
        routes:
          - match: {path_prefix: "/", headers: {x-canary: "1"}}
            cluster: app
            request_headers:
              set: {authorization: "Basic YWxhZGRpbjpvcGVuc2VzYW1l", x-api-key: k, x-env: prod}
          - match: {path: "/x"}
            direct_response: {status: 200, body: "hi", headers: {x-auth-token: abc}}
    clusters:
      - name: app
        backends: ["127.0.0.1:9001"]
    rate_limit_store: {redis: "redis://user:hunter2@redis.internal:6379/0"}
    """

    def setUp(self):
        self.view = views.config_view(load(self.CONFIG))

    def test_json(self):
        """The document is plain JSON: it survives a round trip unchanged."""
        self.assertEqual(json.loads(json.dumps(self.view)), self.view)

    def test_paths_shown(self):
        """File paths are not secrets: the token file's path shows, never its contents."""
        self.assertEqual(
            self.view["admin"],
            {"listen": "tcp:9901:interface=127.0.0.1", "token_file": "/etc/balance/admin.token"},
        )

    def test_header_secrets(self):
        """
        Header values under secret-looking names are redacted; others stay,
        and (name, value) pairs are JSON objects.
        """
        [first, second] = self.view["listeners"][0]["routes"]
        self.assertEqual(
            first["request_headers"]["set"],
            {"authorization": "<redacted>", "x-api-key": "<redacted>", "x-env": "prod"},
        )
        self.assertEqual(first["match"]["headers"], {"x-canary": "1"})
        self.assertEqual(second["direct_response"]["headers"], {"x-auth-token": "<redacted>"})

    def test_url_userinfo(self):
        """The userinfo of a Redis URL is redacted, the rest stays."""
        self.assertEqual(
            self.view["rate_limit_store"]["redis"], "redis://<redacted>@redis.internal:6379/0"
        )
        self.assertNotIn("hunter2", json.dumps(self.view))

    def test_redact_url(self):
        """URLs without userinfo and other strings are left alone."""
        self.assertEqual(views.redact_url("redis://127.0.0.1:6379/0"), "redis://127.0.0.1:6379/0")
        self.assertEqual(views.redact_url("http://a/b@c"), "http://a/b@c")
        self.assertEqual(views.redact_url("user@example.com"), "user@example.com")
        self.assertEqual(views.redact_url("rediss://:pw@h:1"), "rediss://<redacted>@h:1")

    def test_units(self):
        """Durations are seconds and sizes bytes, as in the model."""
        listener = self.view["listeners"][0]
        self.assertEqual(listener["timeouts"], {"handshake": 10.0, "idle": 60.0})
        self.assertEqual(listener["limits"]["max_header_bytes"], 65536)


class StatsViewTests(unittest.SynchronousTestCase):
    """GET /stats without metrics still shows the live state."""

    def test_no_metrics(self):
        """Every configured listener and backend shows, with zero counters."""
        target = FakeTarget(load(), MemoryReactorClock())
        stats = views.stats_view(target.config, target.clusters, None, False, True)
        self.assertEqual(
            (stats["ready"], stats["draining"], stats["config_reloads"]), (False, True, {})
        )
        self.assertEqual(sorted(stats["listeners"]), ["db", "web"])
        self.assertEqual(stats["listeners"]["db"]["protocol"], "tcp")
        self.assertEqual(
            stats["clusters"]["db"]["backends"],
            {
                "10.0.0.7:5432": {
                    "state": "up",
                    "active_connections": 0,
                    "responses": {},
                    "connect_failures": 0,
                }
            },
        )

    def test_removed(self):
        """Counters of listeners and clusters a reload removed still show."""
        target = FakeTarget(load(), MemoryReactorClock())
        target.metrics.listener("old").connections_total = 5
        target.metrics.backend("gone", "10.9.9.9:80").connect_failures = 2
        stats = views.stats_view(target.config, target.clusters, target.metrics, True, False)
        self.assertEqual(stats["listeners"]["old"]["connections_total"], 5)
        self.assertEqual(stats["listeners"]["old"]["listen"], None)
        self.assertEqual(
            stats["clusters"]["gone"]["backends"]["10.9.9.9:80"]["connect_failures"], 2
        )

    def test_config_reloads(self):
        """Reload outcomes are counted."""
        target = FakeTarget(load(), MemoryReactorClock())
        target.metrics.config_reload("success")
        target.metrics.config_reload("failure")
        target.metrics.config_reload("success")
        stats = views.stats_view(target.config, target.clusters, target.metrics, True, False)
        self.assertEqual(stats["config_reloads"], {"success": 2, "failure": 1})
