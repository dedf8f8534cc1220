"""
C{twistd balance --config NEW --check --diff-against OLD}: what a reload
from OLD (a file, or a running Balance's C{GET /config}) to NEW would
change, printed, exit 0.
"""

from __future__ import annotations

import os

from twisted.internet.defer import inlineCallbacks
from twisted.trial import unittest

from balance.tap import Options
from tests.integration import twistd

OLD = """\
admin: {{listen: "tcp:{admin}:interface=127.0.0.1"}}
listeners:
  - name: web
    listen: "tcp:{port}:interface=127.0.0.1"
    protocol: http
    routes:
      - match: {{path_prefix: /}}
        cluster: app
clusters:
  - name: app
    backends: ["127.0.0.1:{upstream}"]
whoami:
  - {{name: alpha, listen: "tcp:{upstream}:interface=127.0.0.1"}}
"""

NEW = """\
admin: {{listen: "tcp:{admin}:interface=127.0.0.1"}}
workers: 2
listeners:
  - name: web
    listen: "tcp:{port}:interface=127.0.0.1"
    protocol: http
    routes:
      - match: {{path_prefix: /api/}}
        cluster: api
      - match: {{path_prefix: /}}
        cluster: app
  - name: raw
    listen: "tcp:{other}:interface=127.0.0.1"
    protocol: tcp
    cluster: app
clusters:
  - name: app
    backends: ["127.0.0.1:{upstream}", "127.0.0.1:{other2}"]
  - name: api
    backends: ["127.0.0.1:{upstream}"]
whoami:
  - {{name: alpha, listen: "tcp:{upstream}:interface=127.0.0.1"}}
"""

EXPECTED = [
    "a reload from {old} would change:",
    "  listeners added: raw",
    "  listeners changed: web",
    "  clusters added: api",
    "  clusters changed: app",
    "  routes of listener web changed: 1 -> 2",
    "  backends of cluster app added: 127.0.0.1:{other2}",
    "  needs a restart (not applied by a reload): workers",
]


class DiffAgainstTests(unittest.TestCase):
    def setUp(self):
        self.ports = {
            name: twistd.free_port() for name in ("admin", "port", "upstream", "other", "other2")
        }
        self.old = self.write(OLD.format(**self.ports))
        self.new = self.write(NEW.format(**self.ports))

    def write(self, text: str) -> str:
        path = os.path.abspath(self.mktemp() + ".yaml")
        with open(path, "w") as f:
            f.write(text)
        return path

    def expected(self, old: str) -> list[str]:
        return [self.new + ": OK"] + [
            line.format(old=old, **self.ports) for line in EXPECTED
        ]

    def parse(self, *args: str):
        """Run the plugin's options in this process; return (exit code, stdout lines, stderr)."""
        import contextlib
        import io

        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            e = self.assertRaises(SystemExit, Options().parseOptions, list(args))
        return e.code, out.getvalue().splitlines(), err.getvalue()

    def test_file(self):
        """Against a file: every kind of change, one line each."""
        code, lines, err = self.parse("--config", self.new, "--check", "--diff-against", self.old)
        self.assertEqual((code, err), (0, ""))
        self.assertEqual(lines, self.expected(self.old))

    def test_no_changes(self):
        code, lines, err = self.parse("--config", self.old, "--diff-against", self.old)
        self.assertEqual(lines, [self.old + ": OK", f"a reload from {self.old} would change:",
                                 "  no changes"])

    def test_bad_old(self):
        """An invalid OLD file, or a URL that is not a Balance admin API: exit 1 with the reason."""
        bad = self.write("listeners: 3\n")
        code, lines, err = self.parse("--config", self.new, "--check", "--diff-against", bad)
        self.assertEqual(code, 1)
        self.assertIn("cannot compare with an invalid config", err)
        closed = twistd.free_port()
        code, lines, err = self.parse(
            "--config", self.new, "--check", "--diff-against", f"http://127.0.0.1:{closed}/config"
        )
        self.assertEqual(code, 1)
        self.assertIn("cannot read the running config", err)

    @inlineCallbacks
    def test_admin_url(self):
        """
        Against a running Balance's GET /config, with twistd as users run
        it: the same answer as against the file it runs.
        """
        yield twistd.start(self, self.old, self.ports["port"])
        url = "http://127.0.0.1:%d/config" % self.ports["admin"]
        code, out, err = yield twistd.run(
            "-n", "balance", "--config", self.new, "--check", "--diff-against", url
        )
        self.assertEqual((code, err), (0, ""))
        self.assertEqual(out.splitlines(), self.expected(url))
        # Not a Balance admin API: refused with a reason.
        code, lines, err = self.parse(
            "--config", self.new, "--diff-against", "http://127.0.0.1:%d/healthz" % self.ports["admin"]
        )
        self.assertEqual(code, 1)
        self.assertIn("cannot read the running config", err)
