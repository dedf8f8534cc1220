"""
The dashboard in a real browser: headless Chromium, driven over the
DevTools protocol, loads ``GET /`` from a running admin service, asks for
the token, shows every backend, and drains one with its button.

Locally a missing ``chromium`` skips the test; in CI (``CI=true``) it
fails it.  With ``BALANCE_SCREENSHOT=PATH`` the test lets the charts fill
for a while and saves a screenshot there (``docs/dashboard.png`` of the
README is made this way).
"""

from __future__ import annotations

import http.client
import json
import os
import time

from twisted.internet import reactor
from twisted.internet.threads import deferToThread
from twisted.trial import unittest

from tests.admin.chromium import Browser
from tests.admin.fakes import FakeTarget, Traffic, load, start_admin
from tests.integration.test_redis import need_tool

TOKEN = "dashboard-test-token"
PNG = b"\x89PNG\r\n\x1a\n"


def clusters_state(port: int, token: str) -> dict[str, str]:
    """``{address: state}`` of every backend, from ``GET /clusters`` (blocking)."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        connection.request("GET", "/clusters", headers={"Authorization": f"Bearer {token}"})
        response = connection.getresponse()
        document = json.loads(response.read())
    finally:
        connection.close()
    return {b["address"]: b["state"] for c in document["clusters"] for b in c["backends"]}


def drive(chromium: str, profile: str, port: int, settle: float, budget: float) -> dict:
    """
    Use the dashboard like an operator, in a thread; return what was seen.

    :param settle: Seconds to let the charts fill before the screenshot.
    :param budget: Seconds everything may take, Chromium's start included.
    """
    seen: dict = {}
    browser = Browser(chromium, profile, time.monotonic() + budget)
    try:
        browser.connect()
        browser.call("Runtime.enable")
        browser.call("Log.enable")
        browser.call("Page.navigate", {"url": f"http://127.0.0.1:{port}/"})

        # A token is configured: the page asks for it before showing anything.
        browser.wait_for("!document.getElementById('auth').hidden", "the token form")
        seen["before_token"] = browser.evaluate("document.body.innerText")
        browser.evaluate(
            f"document.getElementById('token').value = {json.dumps(TOKEN)};"
            "document.getElementById('auth').requestSubmit(); true"
        )
        seen["text"] = browser.wait_for(
            "document.body.innerText.includes('10.0.0.7:5432') && document.body.innerText",
            "the backends to show",
        )
        # Two polls make a rate; then the charts have a line.
        seen["rps"] = browser.wait_for(
            "(t => t !== '–' && t)(document.getElementById('t-rps').textContent)",
            "a request rate",
        )
        seen["stored_token"] = browser.evaluate("sessionStorage.getItem('balance.admin.token')")

        browser.evaluate(
            'document.querySelector(\'button[data-action="drain"]'
            '[data-cluster="api"][data-address="127.0.0.1:9002"]\').click(); true'
        )
        deadline = time.monotonic() + 5
        while clusters_state(port, TOKEN)["127.0.0.1:9002"] != "drained":
            if time.monotonic() > deadline:
                break
            time.sleep(0.05)
        seen["after_click"] = clusters_state(port, TOKEN)
        seen["row_state"] = browser.wait_for(
            "(r => r && r.dataset.state === 'drained' && r.dataset.state)"
            "(document.querySelector('tr[data-address=\"127.0.0.1:9002\"]'))",
            "the drained badge",
        )
        seen["button"] = browser.evaluate(
            "document.querySelector('tr[data-address=\"127.0.0.1:9002\"] button').textContent"
        )
        time.sleep(settle)
        seen["chart"] = browser.evaluate(
            "document.querySelector('#chart-rps path:last-of-type').getAttribute('d')"
        )
        seen["screenshot"] = browser.screenshot()
        seen["events"] = list(browser.events)
    finally:
        browser.stop()
    seen["exit"] = browser.process.returncode
    return seen


class DashboardTests(unittest.TestCase):
    """The dashboard, in headless Chromium."""

    timeout = 90

    def setUp(self):
        self.chromium = need_tool("chromium", "chromium")

    async def test_dashboard(self):
        """
        An operator opens the dashboard, gives the token once, sees every
        backend with its state and live rates, and drains a backend with its
        button: the API then reports it drained, and the page says so.
        """
        target = FakeTarget(load(), reactor)
        target.clusters["web"].backend("[::1]:9102").healthy = False
        traffic = Traffic(target)
        traffic.start()
        self.addCleanup(traffic.stop)
        token_file = self.mktemp()
        with open(token_file, "w") as f:
            f.write(TOKEN + "\n")
        service = start_admin(self, target, token_file)
        port = service.port.getHost().port
        profile = os.path.abspath(self.mktemp())
        os.makedirs(profile)

        screenshot_path = os.environ.get("BALANCE_SCREENSHOT")
        settle = 45.0 if screenshot_path else 0.0
        began = time.monotonic()
        seen = await deferToThread(drive, self.chromium, profile, port, settle, 25.0 + settle)
        if not screenshot_path:
            self.assertLess(time.monotonic() - began, 30)

        self.assertNotIn("127.0.0.1:9001", seen["before_token"])
        for address in (
            "127.0.0.1:9001",
            "127.0.0.1:9002",
            "127.0.0.1:9003",
            "127.0.0.1:9101",
            "[::1]:9102",
            "10.0.0.7:5432",
        ):
            self.assertIn(address, seen["text"])
        for word in ("Listeners", "Routes", "Clusters", "least_connections", "prefix /api/"):
            self.assertIn(word, seen["text"])
        self.assertIn("unhealthy", seen["text"])
        self.assertEqual(seen["stored_token"], TOKEN)

        self.assertEqual(seen["after_click"]["127.0.0.1:9002"], "drained")
        self.assertEqual(seen["after_click"]["127.0.0.1:9001"], "up")
        self.assertTrue(target.clusters["api"].backend("127.0.0.1:9002").drained)
        self.assertEqual(seen["row_state"], "drained")
        self.assertEqual(seen["button"], "Enable")
        self.assertTrue(seen["chart"].startswith("M"), seen["chart"])

        # No script error and no Content-Security-Policy violation.
        errors = [
            e["params"]
            for e in seen["events"]
            if e["method"] == "Runtime.exceptionThrown"
            or (
                e["method"] == "Log.entryAdded"
                and e["params"]["entry"]["level"] == "error"
                and e["params"]["entry"]["source"] != "network"
            )
        ]
        self.assertEqual(errors, [])

        shot = seen["screenshot"]
        self.assertTrue(shot.startswith(PNG))
        self.assertLess(len(shot), 200 * 1024)
        if screenshot_path:
            with open(screenshot_path, "wb") as f:
                f.write(shot)
