"""
The admin API over real loopback HTTP: every path of CONFIG.md's table,
authentication, methods, and the reloader contract.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re

from twisted.internet.defer import Deferred, fail, inlineCallbacks, succeed
from twisted.internet.testing import MemoryReactorClock
from twisted.trial import unittest
from zope.interface.verify import verifyObject

from balance.admin import IAdminTarget, dashboard
from balance.config.validate import ConfigError
from balance.observe.metrics import CONTENT_TYPE
from tests.admin.fakes import Client, FakeTarget, load, start_admin
from tests.helpers import wait_for

TOKEN = "s3cret-t0ken"


class APITestsMixin:
    """A running admin service over a fake target, and a client for it."""

    token: str | None = None

    def setUp(self):
        self.target = FakeTarget(load(), MemoryReactorClock())
        token_file = None
        if self.token is not None:
            token_file = self.mktemp()
            with open(token_file, "w") as f:
                f.write(f"  {self.token}\n")
        self.service = start_admin(self, self.target, token_file)
        self.client = Client(self.service, self.token)

    def json(self, response) -> dict:
        self.assertEqual(response.header("content-type"), "application/json; charset=utf-8")
        return json.loads(response.body)


class ReadOnlyTests(APITestsMixin, unittest.TestCase):
    """The GET paths, without a token configured."""

    def test_target(self):
        """The test double provides the whole interface the API reads."""
        verifyObject(IAdminTarget, self.target)

    @inlineCallbacks
    def test_healthz(self):
        """GET /healthz answers 200 while the process runs."""
        response = yield self.client.get("/healthz")
        self.assertEqual((response.code, response.body), (200, b"ok\n"))

    @inlineCallbacks
    def test_ready(self):
        """
        GET /ready answers 200 once the target is ready, 503 before, and
        503 while it drains.
        """
        response = yield self.client.get("/ready")
        self.assertEqual((response.code, response.body), (200, b"ready\n"))
        self.target.ready = False
        response = yield self.client.get("/ready")
        self.assertEqual((response.code, response.body), (503, b"not ready\n"))
        self.target.ready = True
        self.target.draining = True
        response = yield self.client.get("/ready")
        self.assertEqual((response.code, response.body), (503, b"draining\n"))

    @inlineCallbacks
    def test_metrics(self):
        """GET /metrics is the Prometheus exposition, with its content type."""
        self.target.metrics.route("web", "0", "api").observe(200, 0.003)
        response = yield self.client.get("/metrics")
        self.assertEqual(response.code, 200)
        self.assertEqual(response.header("content-type"), CONTENT_TYPE)
        self.assertIn(
            b'balance_http_requests_total{cluster="api",code="200",listener="web",route="0"} 1.0',
            response.body,
        )

    @inlineCallbacks
    def test_metrics_absent(self):
        """A process without metrics answers 404 on /metrics, with a reason."""
        self.target.metrics = None
        response = yield self.client.get("/metrics")
        self.assertEqual(response.code, 404)
        self.assertIn("metrics", self.json(response)["error"])

    @inlineCallbacks
    def test_stats(self):
        """
        GET /stats: per listener and per cluster counters, from the metrics
        and the live backends.
        """
        m = self.target.metrics
        m.listener("web").connections_total = 7
        m.route("web", "0", "api").observe(200, 0.01)
        m.route("web", "default", "web").observe(502, 0.01)
        m.backend("api", "127.0.0.1:9002").observe(200)
        m.backend("api", "127.0.0.1:9002").connect_failures = 3
        self.target.clusters["api"].backend("127.0.0.1:9001").drained = True
        self.target.clusters["api"].backend("127.0.0.1:9003").active = 4
        stats = self.json((yield self.client.get("/stats")))
        self.assertEqual((stats["ready"], stats["draining"]), (True, False))
        web = stats["listeners"]["web"]
        self.assertEqual(web["connections_total"], 7)
        self.assertEqual(web["requests"], {"200": 1, "502": 1})
        self.assertEqual((web["listen"], web["protocol"]), ("tcp:8080", "http"))
        self.assertEqual(stats["listeners"]["db"]["connections_total"], 0)
        api = stats["clusters"]["api"]
        self.assertEqual(
            (api["lb"], api["backends_total"], api["backends_eligible"]),
            ("least_connections", 3, 2),
        )
        self.assertEqual(api["active_connections"], 4)
        self.assertEqual(
            api["backends"]["127.0.0.1:9002"],
            {
                "state": "up",
                "active_connections": 0,
                "responses": {"200": 1},
                "connect_failures": 3,
            },
        )
        self.assertEqual(api["backends"]["127.0.0.1:9001"]["state"], "drained")

    @inlineCallbacks
    def test_clusters(self):
        """
        GET /clusters lists every backend of every cluster, in config order,
        with health, active connections, weight and the ejected/drained
        flags under stable names.
        """
        api = self.target.clusters["api"]
        api.backend("127.0.0.1:9002").drained = True
        api.backend("127.0.0.1:9003").ejected = True
        api.backend("127.0.0.1:9003").active = 2
        document = self.json((yield self.client.get("/clusters")))
        self.assertEqual([c["name"] for c in document["clusters"]], ["api", "web", "db"])
        [first] = document["clusters"][:1]
        self.assertEqual(
            {k: v for k, v in first.items() if k != "backends"},
            {
                "name": "api",
                "lb": "least_connections",
                "panic": False,
                "backends_total": 3,
                "backends_eligible": 1,
                "backends_healthy": 3,
                "active_connections": 2,
            },
        )
        self.assertEqual(
            first["backends"][2],
            {
                "address": "127.0.0.1:9003",
                "name": "127.0.0.1:9003",
                "host": "127.0.0.1",
                "port": 9003,
                "ip": "127.0.0.1",
                "weight": 2,
                "active_connections": 2,
                "healthy": True,
                "ejected": True,
                "drained": False,
                "circuit_open": False,
                "panic": False,
                "eligible": False,
                "health": "healthy",
                "state": "ejected",
            },
        )
        self.assertEqual(
            [(b["address"], b["state"]) for b in first["backends"]],
            [
                ("127.0.0.1:9001", "up"),
                ("127.0.0.1:9002", "drained"),
                ("127.0.0.1:9003", "ejected"),
            ],
        )

    @inlineCallbacks
    def test_config(self):
        """GET /config is the effective config as JSON."""
        document = self.json((yield self.client.get("/config")))
        self.assertEqual(document["path"], "t.yaml")
        self.assertEqual(document["admin"], None)
        [web, db] = document["listeners"]
        self.assertEqual(web["routes"][0]["match"]["path_prefix"], "/api/")
        self.assertEqual(web["routes"][1]["direct_response"]["status"], 200)
        self.assertEqual(document["clusters"][0]["connect_timeout"], 2.0)
        self.assertEqual(document["clusters"][0]["backends"][2]["weight"], 2)

    @inlineCallbacks
    def test_config_follows_reload(self):
        """The API reads the target at each request: a swapped config shows."""
        self.target.config = load(
            """
            listeners: [{name: other, listen: "tcp:9000", cluster: c}]
            clusters: [{name: c, backends: ["127.0.0.1:1"]}]
            """
        )
        document = self.json((yield self.client.get("/config")))
        self.assertEqual([li["name"] for li in document["listeners"]], ["other"])

    @inlineCallbacks
    def test_not_found(self):
        """Unknown paths answer 404 with the path in the message."""
        response = yield self.client.get("/clusters/api")
        self.assertEqual(response.code, 404)
        self.assertEqual(self.json(response), {"error": "no admin resource at /clusters/api"})

    @inlineCallbacks
    def test_trailing_slash(self):
        """A trailing slash names the same resource."""
        response = yield self.client.get("/stats/")
        self.assertEqual(response.code, 200)

    @inlineCallbacks
    def test_method_not_allowed(self):
        """
        A known path with the wrong method answers 405 and says which
        methods it takes.
        """
        response = yield self.client.post("/stats")
        self.assertEqual(response.code, 405)
        self.assertEqual(response.header("allow"), "GET, HEAD")
        response = yield self.client.get("/reload")
        self.assertEqual(response.code, 405)
        self.assertEqual(response.header("allow"), "POST")
        response = yield self.client.request(
            "DELETE", "/clusters/api/backends/127.0.0.1:9001/drain"
        )
        self.assertEqual(response.code, 405)

    @inlineCallbacks
    def test_head(self):
        """HEAD answers like GET, without a body."""
        response = yield self.client.request("HEAD", "/clusters")
        self.assertEqual(response.code, 200)
        self.assertEqual(response.body, b"")

    @inlineCallbacks
    def test_no_cache(self):
        """Answers are live state: never cached."""
        response = yield self.client.get("/clusters")
        self.assertEqual(response.header("cache-control"), "no-store")


class DashboardPageTests(APITestsMixin, unittest.TestCase):
    """GET / serves the self-contained dashboard page."""

    @inlineCallbacks
    def test_page(self):
        """
        The page is HTML served by Balance itself; its Content-Security-Policy
        allows exactly its own inline script and style, and fetches to its
        own origin.
        """
        response = yield self.client.get("/")
        self.assertEqual(response.code, 200)
        self.assertEqual(response.header("content-type"), "text/html; charset=utf-8")
        self.assertEqual(response.body, dashboard.PAGE)
        policy = response.header("content-security-policy")
        page = response.body.decode("utf-8")
        for tag, directive in (("script", "script-src"), ("style", "style-src")):
            [source] = re.findall(f"<{tag}>(.*?)</{tag}>", page, re.S)
            digest = base64.b64encode(hashlib.sha256(source.encode()).digest()).decode()
            self.assertIn(f"{directive} 'sha256-{digest}'", policy)
        self.assertIn("connect-src 'self'", policy)
        self.assertIn("default-src 'none'", policy)

    def test_self_contained(self):
        """
        The page loads nothing from anywhere: no external script, style,
        font or image (the only URL is the SVG namespace name).
        """
        page = dashboard.PAGE.decode("utf-8")
        self.assertEqual(re.findall(r"\b(?:src|href)=\"(?!data:)[^\"]*\"", page), [])
        self.assertEqual(
            set(re.findall(r"https?://[^\s\"')]+", page)), {"http://www.w3.org/2000/svg"}
        )
        self.assertNotIn("@import", page)
        self.assertNotIn("url(", page)


class DrainTests(APITestsMixin, unittest.TestCase):
    """POST /clusters/NAME/backends/HOST:PORT/drain and /enable."""

    @inlineCallbacks
    def test_drain_and_enable(self):
        """
        Draining a backend takes it out of load balancing and answers its
        new state; enabling puts it back.
        """
        backend = self.target.clusters["api"].backend("127.0.0.1:9002")
        response = yield self.client.post("/clusters/api/backends/127.0.0.1:9002/drain")
        self.assertEqual(response.code, 200)
        document = self.json(response)
        self.assertEqual(
            (document["cluster"], document["address"], document["drained"]),
            ("api", "127.0.0.1:9002", True),
        )
        [answered] = document["backends"]
        self.assertEqual((answered["state"], answered["eligible"]), ("drained", False))
        self.assertTrue(backend.drained)
        self.assertFalse(backend.eligible)
        picks = {self.target.clusters["api"].pick() for _ in range(20)}
        self.assertNotIn(backend, picks)

        response = yield self.client.post("/clusters/api/backends/127.0.0.1:9002/enable")
        self.assertEqual(response.code, 200)
        self.assertEqual(self.json(response)["backends"][0]["state"], "up")
        self.assertFalse(backend.drained)
        self.assertTrue(backend.eligible)

    @inlineCallbacks
    def test_drain_shows_in_clusters(self):
        """A drained backend shows drained in GET /clusters."""
        yield self.client.post("/clusters/api/backends/127.0.0.1:9001/drain")
        document = self.json((yield self.client.get("/clusters")))
        states = {b["address"]: b["drained"] for b in document["clusters"][0]["backends"]}
        self.assertEqual(
            states, {"127.0.0.1:9001": True, "127.0.0.1:9002": False, "127.0.0.1:9003": False}
        )

    @inlineCallbacks
    def test_percent_encoded_ipv6(self):
        """An IPv6 backend's address may be percent-encoded in the path."""
        response = yield self.client.post("/clusters/web/backends/%5B%3A%3A1%5D%3A9102/drain")
        self.assertEqual(response.code, 200)
        self.assertTrue(self.target.clusters["web"].backend("[::1]:9102").drained)

    @inlineCallbacks
    def test_unknown_cluster(self):
        """An unknown cluster is 404, and nothing changes."""
        response = yield self.client.post("/clusters/nope/backends/127.0.0.1:9001/drain")
        self.assertEqual(response.code, 404)
        self.assertEqual(self.json(response), {"error": "no cluster named 'nope'"})
        self.assertFalse(self.target.clusters["api"].backend("127.0.0.1:9001").drained)

    @inlineCallbacks
    def test_unknown_backend(self):
        """A backend the cluster does not have is 404."""
        response = yield self.client.post("/clusters/api/backends/127.0.0.1:9101/drain")
        self.assertEqual(response.code, 404)
        self.assertEqual(
            self.json(response), {"error": "cluster 'api' has no backend '127.0.0.1:9101'"}
        )

    @inlineCallbacks
    def test_cross_site(self):
        """
        A page of another origin cannot make the operator's browser drain a
        backend (a plain form POST needs no CORS preflight); the dashboard's
        own requests, from the same origin, pass.
        """
        path = "/clusters/api/backends/127.0.0.1:9001/drain"
        response = yield self.client.post(path, headers={"origin": "http://evil.example"})
        self.assertEqual(response.code, 403)
        response = yield self.client.post(path, headers={"sec-fetch-site": "cross-site"})
        self.assertEqual(response.code, 403)
        self.assertFalse(self.target.clusters["api"].backend("127.0.0.1:9001").drained)
        origin = self.client.base
        response = yield self.client.post(
            path, headers={"origin": origin, "sec-fetch-site": "same-origin"}
        )
        self.assertEqual(response.code, 200)


class ReloadTests(APITestsMixin, unittest.TestCase):
    """POST /reload and POST /reload?dry_run=1, delegated to the target."""

    def reloader(self, answer):
        calls = []

        def reload(dry_run):
            calls.append(dry_run)
            return answer() if callable(answer) else succeed(answer)

        self.target.reload = reload
        return calls

    @inlineCallbacks
    def test_not_wired(self):
        """Without a reloader, reload answers 501."""
        response = yield self.client.post("/reload")
        self.assertEqual(response.code, 501)

    @inlineCallbacks
    def test_reload(self):
        """A valid reload answers 200 with the reloader's document."""
        calls = self.reloader({"ok": True, "errors": [], "changes": {"clusters": {"added": ["x"]}}})
        response = yield self.client.post("/reload")
        self.assertEqual(response.code, 200)
        self.assertEqual(
            self.json(response),
            {
                "ok": True,
                "dry_run": False,
                "errors": [],
                "changes": {"clusters": {"added": ["x"]}},
            },
        )
        self.assertEqual(calls, [False])

    @inlineCallbacks
    def test_dry_run(self):
        """?dry_run=1 asks the reloader for a dry run."""
        calls = self.reloader({"ok": True})
        response = yield self.client.post("/reload?dry_run=1")
        self.assertEqual(response.code, 200)
        self.assertEqual(self.json(response)["dry_run"], True)
        yield self.client.post("/reload?dry_run=true")
        yield self.client.post("/reload?dry_run=0")
        self.assertEqual(calls, [True, True, False])

    @inlineCallbacks
    def test_bad_dry_run(self):
        """A dry_run that is not a boolean is 400, and nothing is reloaded."""
        calls = self.reloader({"ok": True})
        response = yield self.client.post("/reload?dry_run=maybe")
        self.assertEqual(response.code, 400)
        self.assertEqual(calls, [])

    @inlineCallbacks
    def test_invalid(self):
        """An invalid config answers 400 with the validation errors."""
        errors = ["b.yaml:3: clusters[0].lb: expected one of ..., got nope"]
        self.reloader({"ok": False, "errors": errors})
        response = yield self.client.post("/reload")
        self.assertEqual(response.code, 400)
        self.assertEqual(self.json(response), {"ok": False, "dry_run": False, "errors": errors})

    @inlineCallbacks
    def test_config_error(self):
        """A reloader that fails with ConfigError is answered like an invalid file."""
        errors = ["b.yaml:1: listeners: expected at least one listener"]
        self.reloader(lambda: fail(ConfigError(errors)))
        response = yield self.client.post("/reload?dry_run=1")
        self.assertEqual(response.code, 400)
        self.assertEqual(self.json(response), {"ok": False, "dry_run": True, "errors": errors})

    @inlineCallbacks
    def test_failure(self):
        """A reloader that breaks answers 500, and the failure is logged."""
        self.reloader(lambda: fail(RuntimeError("disk on fire")))
        response = yield self.client.post("/reload")
        self.assertEqual(response.code, 500)
        self.assertEqual(
            self.json(response)["errors"], ["reload failed: disk on fire (details in the log)"]
        )
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)

    @inlineCallbacks
    def test_not_a_dict(self):
        """A reloader answering something else than a dict is a 500, logged."""
        self.reloader("yes")
        response = yield self.client.post("/reload")
        self.assertEqual(response.code, 500)
        self.assertEqual(len(self.flushLoggedErrors(TypeError)), 1)

    @inlineCallbacks
    def test_slow(self):
        """The answer waits for the reloader's Deferred."""
        pending = Deferred()
        calls = self.reloader(lambda: pending)
        answer = self.client.post("/reload")
        yield wait_for(lambda: calls, what="the reload request")
        self.assertNoResult(answer)
        pending.callback({"ok": True})
        response = yield answer
        self.assertEqual(response.code, 200)


class TokenTests(APITestsMixin, unittest.TestCase):
    """With admin.token_file, requests need the bearer token."""

    token = TOKEN

    @inlineCallbacks
    def test_token(self):
        """With the token (whitespace around it in the file ignored), 200."""
        response = yield self.client.get("/clusters")
        self.assertEqual(response.code, 200)

    @inlineCallbacks
    def test_missing(self):
        """Without the token, 401 with a Bearer challenge, and no data."""
        self.client.token = None
        for path in ("/clusters", "/stats", "/metrics", "/config"):
            response = yield self.client.get(path)
            self.assertEqual(response.code, 401, path)
            self.assertEqual(response.header("www-authenticate"), 'Bearer realm="balance admin"')
            self.assertEqual(self.json(response), {"error": "a valid bearer token is required"})

    @inlineCallbacks
    def test_wrong(self):
        """A wrong token, or another scheme, is 401; nothing changes."""
        self.client.token = "s3cret-t0ke"
        response = yield self.client.post("/clusters/api/backends/127.0.0.1:9001/drain")
        self.assertEqual(response.code, 401)
        self.assertFalse(self.target.clusters["api"].backend("127.0.0.1:9001").drained)
        self.client.token = None
        basic = base64.b64encode(f"admin:{TOKEN}".encode()).decode()
        response = yield self.client.get("/clusters", headers={"authorization": f"Basic {basic}"})
        self.assertEqual(response.code, 401)

    @inlineCallbacks
    def test_scheme_case(self):
        """The scheme name is case-insensitive (RFC 9110)."""
        self.client.token = None
        response = yield self.client.get("/clusters", headers={"authorization": f"bearer {TOKEN}"})
        self.assertEqual(response.code, 200)

    @inlineCallbacks
    def test_unknown_path_hidden(self):
        """Without the token, even unknown paths are 401: nothing is revealed."""
        self.client.token = None
        response = yield self.client.get("/nope")
        self.assertEqual(response.code, 401)

    @inlineCallbacks
    def test_open_paths(self):
        """
        The dashboard page (which holds no data) and the liveness and
        readiness probes answer without the token.
        """
        self.client.token = None
        for path, body in (("/healthz", b"ok\n"), ("/ready", b"ready\n"), ("/", dashboard.PAGE)):
            response = yield self.client.get(path)
            self.assertEqual((response.code, response.body), (200, body), path)
