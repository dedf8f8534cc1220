"""
Structured logs: Balance's log events as JSON lines, in this process and
from a real C{twistd --logger balance.observe.logs.json}, single-process
and with workers (whose events reach the parent with their fields).
"""

from __future__ import annotations

import io
import json
import os

from twisted.internet.defer import inlineCallbacks
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase, TestCase

from balance.observe.logs import JSONLinesObserver
from tests.helpers import closed_port, wait_for
from tests.integration import twistd


class ObserverTests(SynchronousTestCase):
    def events(self, emit) -> list[dict]:
        out = io.StringIO()
        log = Logger(namespace="balance.test", observer=JSONLinesObserver(out))
        emit(log)
        return [json.loads(line) for line in out.getvalue().splitlines()]

    def test_fields(self):
        """Level, namespace, time, the text, and every field by name."""

        class Thing:
            def __repr__(self):
                return "<thing>"

        [event] = self.events(
            lambda log: log.warn(
                "backend {backend} is DOWN ({reason})",
                backend="10.0.0.1:80",
                reason="status 503",
                healthy=False,
                count=3,
                raw=b"bytes\xff",
                thing=Thing(),
                pair=("a", 1),
            )
        )
        self.assertEqual(event["level"], "warn")
        self.assertEqual(event["namespace"], "balance.test")
        self.assertEqual(event["message"], "backend 10.0.0.1:80 is DOWN (status 503)")
        self.assertRegex(event["time"], r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}\+00:00$")
        self.assertEqual(
            {k: event[k] for k in ("backend", "reason", "healthy", "count", "raw", "thing", "pair")},
            {
                "backend": "10.0.0.1:80",
                "reason": "status 503",
                "healthy": False,
                "count": 3,
                "raw": "bytes\ufffd",
                "thing": "<thing>",
                "pair": ["a", 1],
            },
        )
        self.assertFalse([k for k in event if k.startswith("log_")])

    def test_failure(self):
        def emit(log):
            try:
                raise ZeroDivisionError("division by zero")
            except ZeroDivisionError:
                log.failure("it broke", Failure())

        [event] = self.events(emit)
        self.assertEqual((event["level"], event["message"]), ("critical", "it broke"))
        self.assertIn("ZeroDivisionError", event["failure"])

    def test_fields_do_not_replace_the_record(self):
        [event] = self.events(lambda log: log.info("x {namespace}", namespace="mine", time="t"))
        self.assertEqual((event["namespace"], event["message"]), ("balance.test", "x mine"))
        self.assertNotEqual(event["time"], "t")


CONFIG = """\
{workers}
listeners:
  - name: web
    listen: "tcp:{port}:interface=127.0.0.1"
    cluster: app
clusters:
  - name: app
    backends: ["127.0.0.1:{dead}"]
    health_check: {{type: tcp, interval: 100ms}}
"""


class TwistdTests(TestCase):
    """C{twistd --logger balance.observe.logs.json}: JSON lines on stdout."""

    timeout = 60

    @inlineCallbacks
    def run_balance(self, workers: str):
        port = twistd.free_port()
        path = os.path.abspath(self.mktemp() + ".yaml")
        with open(path, "w") as f:
            f.write(CONFIG.format(workers=workers, port=port, dead=closed_port()))
        proc = yield twistd.start(
            self, path, port, twistd_args=("--logger", "balance.observe.logs.json")
        )

        def events():
            found = []
            for line in proc._collector.out.decode("utf-8", "replace").splitlines():
                self.assertTrue(line.startswith("{"), line)
                found.append(json.loads(line))
            return found

        yield wait_for(
            lambda: any(e.get("healthy") is False for e in events()), 30, "the DOWN event"
        )
        proc.signal("TERM")
        code = yield proc.ended
        self.assertEqual(code, 0, proc.output)
        return events()

    @inlineCallbacks
    def test_single_process(self):
        events = yield self.run_balance("")
        [down] = [e for e in events if e.get("healthy") is False]
        self.assertEqual(down["level"], "warn")
        self.assertEqual(down["cluster"], "app")
        self.assertEqual(down["reason"], "connection refused")
        self.assertIn("is DOWN", down["message"])
        self.assertTrue(down["namespace"].startswith("balance.cluster.health"), down)

    @inlineCallbacks
    def test_workers(self):
        """A worker's event reaches the parent's log with its fields and its index."""
        events = yield self.run_balance("workers: 2")
        downs = [e for e in events if e.get("healthy") is False]
        self.assertTrue(downs)
        for down in downs:
            self.assertEqual((down["level"], down["cluster"]), ("warn", "app"))
            self.assertIn(down["worker"], (0, 1))
            self.assertIn("is DOWN", down["message"])
